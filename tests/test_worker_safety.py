"""The worker process of a training pass cut in two, where a user's program does unusual
things: wide batch norms, its own forked children, frozen layers, changes between
``train_batch`` calls, steps that never come (xpnn.ops.piece_worker, numpy_processes).

Each test compares against the same training in one piece (``processes = 1``) or checks
that the worker neither hangs, dies nor holds a core.
"""
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import xpnn
from xpnn.layers import SoftMax
from xpnn.losses import CrossEntropyLoss
from xpnn.ops import numpy_settings
from xpnn.ops.shared_memory import MessageRing
from test_process_pieces import BATCH, _assert_same_training, _net, cpu64  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not numpy_settings.can_fork(),
                                reason="worker processes need fork on x86-64 (not this machine)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_script(body, timeout=240):
    """Run ``body`` in a fresh Python (a hang ends in a timeout, not a stuck suite)."""
    script = "import sys; sys.path[:0] = [%r, %r]\n" % (ROOT, os.path.join(ROOT, "tests"))
    result = subprocess.run([sys.executable, "-c", script + textwrap.dedent(body)],
                            capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_batch_norm_sums_larger_than_a_ring_slot_do_not_deadlock():
    features = 20000  # two float64 sums: 320 KB, more than a slot: they go through the pipe
    assert 2 * 8 * features > MessageRing.SLOT_BYTES
    output = _run_script(f"""
        import numpy as np, xpnn
        from xpnn import NeuralNetwork
        from xpnn.initializers import Constant, He
        from xpnn.layers import BatchNormalization, Flatten, FullyConnected, ReLU, SoftMax
        from xpnn.losses import CrossEntropyLoss
        from xpnn.optimizers import Sgd
        from conftest import random_image_batches
        from test_process_pieces import BATCH
        backend = xpnn.set_backend("cpu", "float64")
        backend.ops.threads = 1
        for processes in (1, 2):
            backend.ops.processes = processes
            xpnn.seed(1)
            net = NeuralNetwork(Sgd(0.01), He(), Constant(0.1))
            for layer in (Flatten(), FullyConnected(64, {features}), BatchNormalization({features}),
                          ReLU(), FullyConnected({features}, 4), SoftMax()):
                net.append_layer(layer)
            net.loss_layer = CrossEntropyLoss()
            net.data_layer = random_image_batches(BATCH)
            net.train(2)
            print(processes, net._worker is not None, repr([float(v) for v in net.loss]))
    """)
    lines = dict(line.split(" ", 1) for line in output.splitlines())
    one, two = eval(lines["1"].split(" ", 1)[1]), eval(lines["2"].split(" ", 1)[1])
    assert lines["2"].startswith("True")  # the worker ran
    np.testing.assert_allclose(two, one, rtol=1e-12)


def test_a_child_forked_by_the_user_leaves_the_workers_alone():
    output = _run_script("""
        import os, sys, time, xpnn
        from test_process_pieces import _net
        backend = xpnn.set_backend("cpu", "float64")
        backend.ops.threads, backend.ops.processes = 1, 2
        net = _net()
        net.train(1)
        worker = net._worker.pid
        child = os.fork()
        if child == 0:
            net.train(1)  # the child trains with a worker of its own
            sys.exit(0 if net._worker.pid != worker else 1)  # (a normal exit: atexit runs)
        _, status = os.waitpid(child, 0)
        time.sleep(0.2)
        alive = net._worker.alive
        net.train(2)
        print(alive, net._worker.pid == worker, os.waitstatus_to_exitcode(status))
    """)
    assert output.split() == ["True", "True", "0"]


def test_a_batch_norm_in_testing_phase_trains_like_one_piece(cpu64, monkeypatch):
    nets = {}
    for processes in (1, 2):
        monkeypatch.setattr(cpu64.ops, "processes", processes)
        xpnn.seed(5)
        net = nets[processes] = _net()
        for step in range(4):
            if step == 2:  # frozen statistics, e.g. for fine-tuning (train() would unfreeze)
                net.layers[1].testing_phase = True
            net.train_batch(*net.data_layer.next())
        assert net.layers[1].testing_phase
    _assert_same_training(nets[2], nets[1])


def _steps_with_a_change_between(backend, monkeypatch, processes, change):
    """Four train_batch calls, each given the next batch; ``change(net, batch)`` runs after
    the second and returns the batch the third call trains on."""
    monkeypatch.setattr(backend.ops, "processes", processes)
    xpnn.seed(5)
    net = _net()
    batches = [net.data_layer.next() for _ in range(4)]
    batch = batches[0]
    for step in range(4):
        following = batches[step + 1] if step < 3 else None
        net.train_batch(*batch, following=following)
        batch = change(net, following) if step == 1 else following
    return net


@pytest.mark.parametrize("change", ["weights", "setting", "labels"])
def test_changes_between_train_batch_calls_reach_the_pass_started_ahead(cpu64, monkeypatch, change):
    def apply(net, batch):
        if change == "weights":
            for layer in net.layers:
                if getattr(layer, "weights", None) is not None and layer.trainable:
                    layer.weights = layer.weights * 0.5
        elif change == "setting":
            net.layers[8].probability = 0.4  # the dropout's
        else:
            return batch[0], batch[1][:, ::-1].copy()  # other labels for the same images
        return batch

    whole = _steps_with_a_change_between(cpu64, monkeypatch, 1, apply)
    cut = _steps_with_a_change_between(cpu64, monkeypatch, 2, apply)
    assert cut._worker is not None
    for mine, theirs in zip(cut.layers, whole.layers):
        for name in ("weights", "bias", "running_mean", "running_variance"):
            if getattr(theirs, name, None) is not None:
                np.testing.assert_allclose(getattr(mine, name), getattr(theirs, name),
                                           rtol=1e-10, atol=1e-12, err_msg=f"{mine.name}.{name}")


def _cpu_seconds(pid):
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_worker_left_waiting_sleeps_instead_of_spinning(cpu64, monkeypatch):
    if not os.path.exists(f"/proc/{os.getpid()}/stat"):
        pytest.skip("needs Linux /proc to read the worker's CPU time")
    monkeypatch.setattr(cpu64.ops, "processes", 2)
    net = _net()
    first, second = net.data_layer.next(), net.data_layer.next()
    net.train_batch(*first, following=second)  # the worker starts on `second`; no step takes it
    pid = net._worker.pid
    time.sleep(0.2)  # past the polling for an answer that comes within a step
    before = _cpu_seconds(pid)
    time.sleep(1.0)
    used = _cpu_seconds(pid) - before
    net._worker.close()
    assert used < 0.3, f"the waiting worker used {used:.2f} s of CPU in 1 s"


class OwnSoftMax(SoftMax):
    """A SoftMax of the user's own (e.g. a wrapper): the network does not fuse it with the loss."""

    def backward(self, error_tensor):
        return super().backward(error_tensor)


def test_a_network_without_the_fused_softmax_trains_ahead_like_one_piece(cpu64, monkeypatch):
    # Its backward pass starts from the loss's gradient through OwnSoftMax: the worker may
    # not go into its backward pass by itself, for this step or the one it starts ahead.
    nets = {}
    for processes in (1, 2):
        monkeypatch.setattr(cpu64.ops, "processes", processes)
        xpnn.seed(5)
        net = nets[processes] = _net()
        net.layers[-1] = OwnSoftMax()
        net.train(3)
    assert nets[2]._worker is not None
    _assert_same_training(nets[2], nets[1])


def _workers_over_steps(backend, monkeypatch, between):
    """Four train_batch calls given the next batch, ``between(net, batch)`` before each of
    the last three (it returns the batch to train on); returns (worker pids, net)."""
    monkeypatch.setattr(backend.ops, "processes", 2)
    xpnn.seed(5)
    net = _net()
    batches = [net.data_layer.next() for _ in range(4)]
    pids, batch = [], batches[0]
    for step in range(4):
        following = batches[step + 1] if step < 3 else None
        net.train_batch(*batch, following=following)
        pids.append(net._worker.pid)
        batch = between(net, following) if following is not None else None
    return pids, net


def test_equal_labels_in_new_arrays_keep_the_pass_started_ahead(cpu64, monkeypatch):
    pids, net = _workers_over_steps(cpu64, monkeypatch, lambda net, batch: (batch[0], batch[1].copy()))
    assert len(set(pids)) == 1  # no restart (a fork) each step
    _, reference = _workers_over_steps(cpu64, monkeypatch, lambda net, batch: batch)
    for mine, theirs in zip(net.layers, reference.layers):
        if getattr(theirs, "weights", None) is not None:
            np.testing.assert_array_equal(mine.weights, theirs.weights)


def test_a_test_between_steps_keeps_the_pass_started_ahead(cpu64, monkeypatch):
    def test_some(net, batch):
        net.test(batch[0][:5])  # another batch size: Flatten's cached shape changes
        return batch

    pids, _ = _workers_over_steps(cpu64, monkeypatch, test_some)
    assert len(set(pids)) == 1


def test_another_loss_layer_between_steps_drops_the_pass_started_ahead(cpu64, monkeypatch):
    class OwnLoss(CrossEntropyLoss):
        """Not the plain loss: the network then runs SoftMax's backward, no fused gradient."""

        def backward(self, label_tensor):
            return super().backward(label_tensor)

    def swap(net, batch):
        net.loss_layer = OwnLoss()
        return batch

    results = []
    for processes in (2, 1):
        monkeypatch.setattr(cpu64.ops, "processes", processes)
        if processes == 2:
            _, net = _workers_over_steps(cpu64, monkeypatch, swap)
        else:
            monkeypatch.setattr(cpu64.ops, "processes", 1)
            xpnn.seed(5)
            net = _net()
            batches = [net.data_layer.next() for _ in range(4)]
            for step, batch in enumerate(batches):
                if step == 1:
                    net.loss_layer = OwnLoss()
                net.train_batch(*batch)
        results.append(net)
    for mine, theirs in zip(*(net.layers for net in results)):
        if getattr(theirs, "weights", None) is not None:
            np.testing.assert_allclose(mine.weights, theirs.weights, rtol=1e-10, atol=1e-12)
