"""Training with half of each batch in a forked worker process (xpnn.ops.numpy_processes).

Only the NumPy backend's ops cut a batch this way (``NumpyOps.processes = 2``);
the generic Ops never do. The numbers must be those of a pass in one piece
(float64, up to the order of sums), batch norm's statistics and dropout's mask
included; the worker follows changes of the layers and ends with its network.
"""
import copy
import ctypes
import ctypes.util
import gc
import multiprocessing
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

import xpnn
from xpnn import NeuralNetwork
from xpnn.ops.shared_memory import MessageRing, SharedArrays
from xpnn.backend import make_backend
from xpnn.initializers import Constant, He
from xpnn.layers import (BatchNormalization, Conv, Dropout, Flatten, FullyConnected, Pooling,
                         ReLU, SoftMax)
from xpnn.layers.base import BaseLayer
from xpnn.losses import CrossEntropyLoss
from xpnn.models import lenet
from xpnn.ops import Ops
from xpnn.ops import numpy_ops, numpy_settings, piece_worker
from xpnn.optimizers import Sgd
from xpnn.regularizers import L2_Regularizer
from conftest import (CyclingBatches, assert_error_names_the_whole_batch, backend_unavailable_reason,
                      random_image_batches)

BATCH = 2 * numpy_ops.MIN_SAMPLES_PER_PROCESS

pytestmark = pytest.mark.skipif(not numpy_settings.can_fork(),
                                reason="worker processes need fork on x86-64 (not this machine)")


class FailsInTheWorker(BaseLayer):
    """Identity, but a forward pass on the second piece of a batch raises."""

    runs_in_pieces = True

    def forward(self, input_tensor):
        if self.piece is not None and self.piece.bounds[0] > 0:
            raise ValueError("FailsInTheWorker: the second piece")
        return input_tensor

    def backward(self, error_tensor):
        return error_tensor


def _net(extra=()):
    """Batch norm and dropout between convolutions and FC layers. Plain SGD: the bias in
    front of batch norm has a gradient of rounding noise only, which Adam would scale up
    to full steps of either sign (see test_fastpaths)."""
    net = NeuralNetwork(Sgd(0.05), He(), Constant(0.1))
    net.optimizer.add_regularizer(L2_Regularizer(1e-3))
    for layer in (Conv((1, 1), (1, 3, 3), 4), BatchNormalization(4), ReLU(), Pooling((2, 2), (2, 2)),
                  Flatten(), FullyConnected(4 * 4 * 4, 12), BatchNormalization(12), ReLU(),
                  Dropout(0.7), *extra, FullyConnected(12, 4), SoftMax()):
        net.append_layer(layer)
    net.loss_layer = CrossEntropyLoss()
    net.data_layer = random_image_batches(BATCH)
    return net


@pytest.fixture
def cpu64(monkeypatch):
    """The float64 NumPy backend, current, one thread (its ops patched back afterwards)."""
    backend = make_backend("cpu", "float64")
    monkeypatch.setattr(backend.ops, "threads", 1)
    previous = xpnn.get_backend()
    xpnn.set_backend("cpu", "float64")
    yield backend
    xpnn.set_backend(previous.name, previous.dtype_name)


def _train(backend, monkeypatch, processes, steps=3, net=None):
    monkeypatch.setattr(backend.ops, "processes", processes)
    xpnn.seed(5)
    net = net or _net()
    net.train(steps)
    return net


def _assert_same_training(cut, whole):
    np.testing.assert_allclose([float(v) for v in cut.loss], [float(v) for v in whole.loss], rtol=1e-12)
    for mine, theirs in zip(cut.layers, whole.layers):
        for name in ("weights", "bias", "gradient_weights", "gradient_bias", "running_mean",
                     "running_variance"):
            if getattr(theirs, name, None) is not None:
                # (atol: the convolution's bias gradient is rounding noise, ~1e-16, in both.)
                np.testing.assert_allclose(getattr(mine, name), getattr(theirs, name),
                                           rtol=1e-10, atol=1e-12, err_msg=f"{mine.name}.{name}")


def test_two_processes_train_like_one_piece(cpu64, monkeypatch):
    whole = _train(cpu64, monkeypatch, processes=1)
    cut = _train(cpu64, monkeypatch, processes=2)
    assert whole._worker is None and cut._worker is not None and cut._worker.alive
    assert cut.layers[0]._cache is None  # the replicas ran the pieces, not the layers
    _assert_same_training(cut, whole)


class LabelsOfAnotherBackend:
    """The batches of ``batches`` with their labels converted by ``convert`` (another backend's)."""

    def __init__(self, batches, convert):
        self.batches, self.convert = batches, convert

    def next(self):
        images, labels = self.batches.next()
        return images, self.convert(labels)


def _labels_of(source):
    if source == "strict-device1":
        reason = backend_unavailable_reason("array-api-strict", "device1")
        if reason is not None:
            pytest.skip(reason)
        return make_backend("array-api-strict", "float64", "device1").asarray
    reason = backend_unavailable_reason("torch")
    if reason is not None:
        pytest.skip(f"torch: {reason}")
    import torch
    return lambda labels: torch.tensor(labels, requires_grad=True)  # (NumPy cannot read these)


@pytest.mark.parametrize("source", ["strict-device1", "torch-requires-grad"])
def test_labels_of_another_backend_train_in_two_processes_like_numpy_labels(cpu64, monkeypatch, source):
    convert = _labels_of(source)
    with_numpy_labels = _train(cpu64, monkeypatch, processes=2, net=_seeded_net(()))
    net = _seeded_net(())
    net.data_layer = LabelsOfAnotherBackend(net.data_layer, convert)
    assert not isinstance(net.data_layer.next()[1], np.ndarray)  # (then back to the first batch)
    net.data_layer.batches.position = 0
    with_other_labels = _train(cpu64, monkeypatch, processes=2, net=net)
    assert with_other_labels._worker is not None and with_other_labels._worker.alive
    _assert_same_training(with_other_labels, with_numpy_labels)


class CountingBatches(CyclingBatches):
    """Counts ``next()``; raises ``fail_at``'s error on that call (1-based) when given."""

    def __init__(self, images, labels, batch_size, fail_at=None):
        super().__init__(images, labels, batch_size)
        self.calls, self.fail_at = 0, fail_at

    def next(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise StopIteration("CountingBatches: no more data")
        return super().next()


def _counting(net, images_count=3 * BATCH, fail_at=None):
    images = np.random.default_rng(0).random((images_count, 1, 8, 8))
    labels = np.eye(4)[np.random.default_rng(1).integers(0, 4, images_count)]
    net.data_layer = CountingBatches(images, labels, BATCH, fail_at)
    return net


class SlowSgd(Sgd):
    """Sgd that takes its time: the worker, started ahead, must wait for each layer's update."""

    def calculate_update(self, weight_tensor, gradient_tensor):
        time.sleep(0.01)
        return super().calculate_update(weight_tensor, gradient_tensor)


def _slow(net):
    for layer in net.layers:
        if layer.trainable:
            layer.optimizer = SlowSgd(0.05)
            layer.optimizer.add_regularizer(L2_Regularizer(1e-3))
    return net


def test_train_takes_each_batch_once_and_equals_steps_one_by_one(cpu64, monkeypatch):
    # In two processes train() takes the next batch during the backward pass and the worker
    # starts on it (and goes into its own backward pass) while this process still updates
    # the parameters (slowly here); the numbers and the batches taken are those of
    # forward() / backward() one step at a time.
    monkeypatch.setattr(cpu64.ops, "processes", 2)
    xpnn.seed(5)
    ahead = _counting(_slow(_net()))
    ahead.train(5)
    monkeypatch.setattr(cpu64.ops, "processes", 1)
    xpnn.seed(5)
    one_by_one = _counting(_slow(_net()))
    for _ in range(5):
        one_by_one.loss.append(one_by_one.forward())
        one_by_one.backward()
    assert ahead.data_layer.calls == one_by_one.data_layer.calls == 5
    _assert_same_training(ahead, one_by_one)


def test_train_batch_given_the_next_batch_equals_steps_one_by_one(cpu64, monkeypatch):
    # xpnn-train's loop takes its batches itself and hands each step the next one: the worker
    # starts on it ahead (and the next step uses that pass), with the numbers of plain steps.
    monkeypatch.setattr(cpu64.ops, "processes", 2)
    xpnn.seed(5)
    ahead = _slow(_net())
    batches = [ahead.data_layer.next() for _ in range(4)]
    ahead.test(batches[0][0])  # (the testing phase: train_batch trains in the training phase)
    workers = set()
    for index, (images, labels) in enumerate(batches):
        following = batches[index + 1] if index + 1 < len(batches) else None
        loss, prediction = ahead.train_batch(images, labels, following)
        ahead.loss.append(loss)
        assert prediction.shape == labels.shape
        workers.add(ahead._worker.pid)
        assert (ahead._worker.ahead_input is not None) == (following is not None)
    assert len(workers) == 1  # every pass started ahead was the next step's
    monkeypatch.setattr(cpu64.ops, "processes", 1)
    xpnn.seed(5)
    one_by_one = _slow(_net())
    for _ in range(4):
        one_by_one.loss.append(one_by_one.forward() - one_by_one.regularization_loss())
        one_by_one.backward()
    _assert_same_training(ahead, one_by_one)


def test_a_pass_on_another_batch_than_the_one_started_ahead_restarts_the_worker(cpu64, monkeypatch):
    # A step of train() stopped between its backward pass (the worker started on the next
    # batch) and the next forward pass, then a training pass on other data (as
    # xpnn.training.train_step runs them): the worker's pass ahead must not be used.
    from xpnn.training import train_step

    def steps(processes):
        monkeypatch.setattr(cpu64.ops, "processes", processes)
        xpnn.seed(5)
        net = _counting(_net())
        net._in_train, net._ahead = True, True  # as inside train(), a step before the last
        net.loss.append(net.forward())
        net.backward()
        net._in_train = net._ahead = False
        started_ahead = net._worker is not None and net._worker.ahead_input is not None
        images, labels = net.data_layer.images[-BATCH:], net.data_layer.labels[-BATCH:]
        net.loss.append(train_step(net, images, labels)[0])
        return net, started_ahead

    (cut, started_ahead), (whole, _) = steps(2), steps(1)
    assert started_ahead and cut._worker is not None and cut._worker.ahead_input is None
    _assert_same_training(cut, whole)


def test_a_forward_pass_without_its_backward_pass_inside_train_is_harmless(cpu64, monkeypatch):
    # The worker went into its backward pass by itself; the step stopped before this process's
    # (the loss raised): the next training pass must not take that answer for its own.
    class FailsOnce(CrossEntropyLoss):
        failed = False

        def forward(self, prediction_tensor, label_tensor):
            if not FailsOnce.failed:
                FailsOnce.failed = True
                raise ValueError("FailsOnce: the first loss")
            return super().forward(prediction_tensor, label_tensor)

    def trained(processes):
        monkeypatch.setattr(cpu64.ops, "processes", processes)
        xpnn.seed(5)
        net = _counting(_net())
        FailsOnce.failed = False
        net.loss_layer = FailsOnce()
        monkeypatch.setattr(NeuralNetwork, "_labels_ahead", lambda self: self.label_tensor)
        with pytest.raises(ValueError, match="the first loss"):
            net.train(3)
        net.train(3)
        return net

    _assert_same_training(trained(2), trained(1))


def test_a_short_batch_and_a_loss_of_your_own_train_as_one_piece(cpu64, monkeypatch):
    # A short last batch (no worker for it, none started ahead) and a CrossEntropyLoss
    # subclass (the worker waits for this process's error instead of computing its own).
    class MyLoss(CrossEntropyLoss):
        pass

    def trained(processes):
        monkeypatch.setattr(cpu64.ops, "processes", processes)
        xpnn.seed(5)
        net = _counting(_net(), images_count=3 * BATCH + 10)
        net.train(5)  # batches of 64, 64, 64, 10, 64
        net.loss_layer = MyLoss()
        net.train(3)
        return net

    _assert_same_training(trained(2), trained(1))


def test_a_data_layer_failing_during_train_fails_where_it_would_have(cpu64, monkeypatch):
    # train() takes batch 4 early, in step 3's backward pass; its failure must not stop step
    # 3's update and is raised by step 4's forward pass, as without taking it early.
    def trained(processes):
        monkeypatch.setattr(cpu64.ops, "processes", processes)
        xpnn.seed(5)
        net = _counting(_net(), fail_at=4)
        with pytest.raises(StopIteration, match="no more data"):
            net.train(6)
        return net

    cut, whole = trained(2), trained(1)
    assert len(cut.loss) == len(whole.loss) == 3 and cut.data_layer.calls == 4
    _assert_same_training(cut, whole)


def test_the_worker_lasts_and_follows_the_layers_settings(cpu64, monkeypatch):
    def train(processes):
        # Two steps, a testing pass (other shapes pass through the layers), a layer's
        # setting changes (the worker's copies must follow) and two more steps; the
        # global random stream runs through once per network.
        net = _train(cpu64, monkeypatch, processes, steps=2)
        worker = net._worker
        net.test(net.data_layer.images[:5])
        net.layers[8].probability = 0.4
        net.train(2)
        assert net._worker is worker  # the same worker (or none), step after step
        return net

    cut, whole = train(2), train(1)
    assert cut._worker.alive
    _assert_same_training(cut, whole)


def test_other_layers_or_batch_shapes_start_another_worker(cpu64, monkeypatch):
    net = _train(cpu64, monkeypatch, processes=2, steps=1)
    first = net._worker
    net.data_layer.batch_size = BATCH + 2  # another piece shape
    net.train(1)
    second = net._worker
    net.layers[2] = ReLU()  # another layer
    net.data_layer.position = 0  # (a whole batch again: the data end cut the last one short)
    net.train(1)
    assert len({first.pid, second.pid, net._worker.pid}) == 3
    assert not first.alive and not second.alive and net._worker.alive


def test_a_failure_in_the_worker_is_raised_here_and_the_next_pass_starts_another(cpu64, monkeypatch):
    monkeypatch.setattr(cpu64.ops, "processes", 2)
    net = _net(extra=[FailsInTheWorker()])
    with pytest.raises(ValueError, match="the second piece"):
        net.train(1)
    failed = net._worker
    assert not failed.alive
    net.layers[9] = ReLU()  # the failing layer replaced: training goes on in a new worker
    net.train(1)
    assert net._worker is not failed and net._worker.alive


def _frozen_lenet_steps(backend, monkeypatch, processes):
    """LeNet trained with layers frozen (trainable = False, optimizers still set), then one
    of them given new weights while frozen, then thawed; asserts that no step moved a frozen
    layer. Returns the network."""
    monkeypatch.setattr(backend.ops, "processes", processes)
    xpnn.seed(5)
    net = lenet.build()
    convolution, largest = net.layers[3], net.layers[7]  # (the worker steps the largest one)
    rng = np.random.default_rng(0)
    net.data_layer = CyclingBatches(rng.random((3 * BATCH, 1, 28, 28)),
                                    np.eye(10)[rng.integers(0, 10, 3 * BATCH)], BATCH)
    net.train(1)  # (a worker with every layer trainable)
    if processes == 2:  # the worker's own steps must leave it alone too
        assert any(net._order[index] is largest for index in net._worker.updates.layers)
    for layer in (convolution, largest):
        layer.trainable = False
    frozen = [(layer, layer.weights.copy(), layer.bias.copy()) for layer in (convolution, largest)]
    net.train(2)
    largest.weights = frozen[1][1] * 0.5  # assigned while frozen: the worker must use it too
    frozen[1] = (largest, largest.weights.copy(), largest.bias.copy())
    net.train(2)
    for layer, weights, bias in frozen:
        np.testing.assert_array_equal(layer.weights, weights, err_msg=layer.name)
        np.testing.assert_array_equal(layer.bias, bias, err_msg=layer.name)
    largest.trainable = True
    net.train(2)
    return net


def test_a_frozen_layer_stays_frozen_in_two_processes_as_in_one(cpu64, monkeypatch):
    whole = _frozen_lenet_steps(cpu64, monkeypatch, processes=1)
    cut = _frozen_lenet_steps(cpu64, monkeypatch, processes=2)
    assert whole._worker is None and cut._worker is not None
    np.testing.assert_allclose([float(v) for v in cut.loss], [float(v) for v in whole.loss], rtol=1e-12)
    for mine, theirs in zip(cut.layers, whole.layers):
        if hasattr(theirs, "weights"):
            np.testing.assert_allclose(mine.weights, theirs.weights, rtol=1e-10, atol=1e-12,
                                       err_msg=mine.name)


@pytest.mark.parametrize("step", ["train", "train_batch", "train_batch-following"])
def test_a_shape_error_in_two_processes_names_the_whole_batch(cpu64, monkeypatch, step):
    """LeNet given 32x32 images: the error says its shapes are a piece's of the whole batch
    (it read "received (64, 576)" for a batch of 128)."""
    monkeypatch.setattr(cpu64.ops, "processes", 2)
    net = lenet.build()
    rng = np.random.default_rng(0)
    images, labels = rng.random((BATCH, 1, 32, 32)), np.eye(10)[rng.integers(0, 10, BATCH)]
    net.data_layer = CyclingBatches(images, labels, BATCH)
    run = {"train": lambda: net.train(2), "train_batch": lambda: net.train_batch(images, labels),
           "train_batch-following": lambda: net.train_batch(images, labels, (images, labels))}[step]
    with pytest.raises(ValueError) as raised:
        run()
    assert net._worker is not None  # (the batch was cut)
    assert_error_names_the_whole_batch(raised.value, BATCH)


def test_an_error_in_the_worker_names_its_rows_of_the_batch(cpu64, monkeypatch):
    monkeypatch.setattr(cpu64.ops, "processes", 2)
    net = _net(extra=[FailsInTheWorker()])
    with pytest.raises(ValueError) as raised:
        net.train(1)
    assert_error_names_the_whole_batch(raised.value, BATCH, "FailsInTheWorker: the second piece",
                                       (9, "FailsInTheWorker"))


def test_the_worker_ends_with_its_network(cpu64, monkeypatch):
    net = _train(cpu64, monkeypatch, processes=2, steps=1)
    process = net._worker._process
    assert process.is_alive()
    del net
    gc.collect()
    process.join(timeout=10)
    assert not process.is_alive()


def test_a_network_with_a_worker_pickles_and_copies_without_it(cpu64, monkeypatch):
    net = _train(cpu64, monkeypatch, processes=2, steps=1)
    for twin in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        assert twin._worker is None
        np.testing.assert_array_equal(twin.layers[0].weights, net.layers[0].weights)
    assert net._worker.alive


def test_which_batches_run_in_two_processes():
    ops = numpy_ops.NumpyOps(make_backend("cpu", "float32"), threads=1, processes=2)
    assert ops.process_pieces((BATCH, 1, 8, 8)) == [(0, BATCH // 2), (BATCH // 2, BATCH)]
    assert ops.process_pieces((BATCH - 1, 1, 8, 8)) is None  # pieces under the minimum
    with ops.one_part():  # a piece (in a worker or a thread) never cuts again
        assert ops.process_pieces((BATCH, 1, 8, 8)) is None
    ops.processes = 1
    assert ops.process_pieces((BATCH, 1, 8, 8)) is None
    assert ops.process_pass([], (BATCH, 1, 8, 8), "last") == (None, "last")
    assert Ops(make_backend("cpu", "float32")).process_pass([], (BATCH, 1, 8, 8), "last") == (None, "last")


def test_processes_default_to_two_on_two_threads_and_follow_the_environment(monkeypatch):
    monkeypatch.delenv("XPNN_PROCESSES", raising=False)
    assert [numpy_settings.default_processes(threads) for threads in (1, 2, 4)] == [1, 2, 1]
    monkeypatch.setenv("XPNN_PROCESSES", "1")
    assert numpy_settings.default_processes(2) == 1
    monkeypatch.setenv("XPNN_PROCESSES", "2")
    assert numpy_settings.default_processes(4) == 2
    monkeypatch.setenv("XPNN_PROCESSES", "3")
    with pytest.raises(ValueError, match="XPNN_PROCESSES must be 1 or 2"):
        numpy_settings.default_processes(2)


def _echo(ring_in, ring_out, connection):
    connection_alive = lambda: True  # noqa: E731
    while True:
        message = ring_in.take(connection, connection_alive, 60)
        if message is None:
            return
        ring_out.post(message, connection, connection_alive, 60)


def test_message_ring_keeps_order_wraps_around_and_sends_large_messages_by_pipe():
    context = multiprocessing.get_context("fork")
    to_child, to_parent = MessageRing(slots=2, slot_bytes=256), MessageRing(slots=2, slot_bytes=256)
    mine, theirs = context.Pipe()
    child = context.Process(target=_echo, args=(to_child, to_parent, theirs), daemon=True)
    child.start()
    alive = child.is_alive
    messages = [("small", index) for index in range(5)] + [("large", np.arange(1000.0))]
    for message in messages:  # more messages than slots: the ring wraps around
        to_child.post(message, mine, alive, 60)
        kind, value = to_parent.take(mine, alive, 60)
        assert kind == message[0]
        np.testing.assert_array_equal(value, message[1])
    to_child.post(None, mine, alive, 60)
    child.join(timeout=10)
    assert child.exitcode == 0


def test_message_ring_carries_arrays_of_every_kind_exactly():
    # Arrays travel as (dtype, shape, bytes), not pickled: the same values, dtype, shape.
    context = multiprocessing.get_context("fork")
    to_child, to_parent = MessageRing(), MessageRing()
    mine, theirs = context.Pipe()
    child = context.Process(target=_echo, args=(to_child, to_parent, theirs), daemon=True)
    child.start()
    grid = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    values = (3, 2.5, None, np.float64(0.25), np.array(-0.0), np.array([np.nan, np.inf]),
              grid, grid[:, ::2, ::-1], np.asfortranarray(grid[0]), np.array([True, False]),
              np.arange(5, dtype=np.int64), (np.ones((0, 3)), ("nested", np.int8(7))))
    to_child.post(("sum", values), mine, child.is_alive, 60)
    kind, echoed = to_parent.take(mine, child.is_alive, 60)
    to_child.post(None, mine, child.is_alive, 60)
    child.join(timeout=10)
    assert kind == "sum" and len(echoed) == len(values)
    flat_sent = list(values[:-1]) + [values[-1][0], values[-1][1][1]]
    flat_echoed = list(echoed[:-1]) + [echoed[-1][0], echoed[-1][1][1]]
    assert echoed[-1][1][0] == "nested"
    for sent, got in zip(flat_sent, flat_echoed):
        assert type(got) is type(sent)
        if isinstance(sent, np.ndarray):
            assert got.dtype == sent.dtype and got.shape == sent.shape and got.flags.writeable
            np.testing.assert_array_equal(got, sent)
            if sent.dtype.kind == "f":  # (-0.0 keeps its sign)
                np.testing.assert_array_equal(np.signbit(got), np.signbit(sent))
        else:
            assert got == sent


class FailsHere(BaseLayer):
    """Identity, but a forward pass on the first piece of a batch (this process's) raises."""

    runs_in_pieces = True

    def forward(self, input_tensor):
        if self.piece is not None and self.piece.bounds[0] == 0:
            raise ValueError("FailsHere: the first piece")
        return input_tensor

    def backward(self, error_tensor):
        return error_tensor


def test_a_failure_here_ends_the_worker_waiting_in_the_pass(cpu64, monkeypatch):
    # The failing layer sits before batch norm: the worker waits for this piece's sums.
    monkeypatch.setattr(cpu64.ops, "processes", 2)
    net = _net()
    net.layers.insert(1, FailsHere())
    with pytest.raises(ValueError, match="the first piece"):
        net.train(1)
    process = net._worker._process
    process.join(timeout=10)
    assert not process.is_alive()


class ScaleWithOwnGradient(BaseLayer):
    """A trainable layer of one's own (a learnt scale) whose gradient is not named like its weights."""

    runs_in_pieces = True
    gradient_names = ("gradient_scale",)

    def __init__(self):
        super().__init__()
        self.trainable = True
        self.weights = np.ones(1)
        self.gradient_scale = None

    def initialize(self, weights_initializer, bias_initializer):
        self.weights = np.ones(1)

    def forward(self, input_tensor):
        self._input = input_tensor
        return input_tensor * self.weights[0]

    def backward(self, error_tensor):
        self.gradient_scale = np.sum(error_tensor * self._input)
        return error_tensor * self.weights[0]

    def take_gradients(self, replicas):
        self.gradient_scale = sum(replica.gradient_scale for replica in replicas)


def test_layers_with_other_gradients_keep_the_threads(cpu64, monkeypatch):
    net = _train(cpu64, monkeypatch, 2, steps=1, net=_seeded_net(extra=[ScaleWithOwnGradient()]))
    assert net._worker is None
    whole = _train(cpu64, monkeypatch, 1, steps=1, net=_seeded_net(extra=[ScaleWithOwnGradient()]))
    np.testing.assert_allclose(net.layers[9].gradient_scale, whole.layers[9].gradient_scale, rtol=1e-12)


def _seeded_net(extra):
    xpnn.seed(5)
    return _net(extra)


def test_moving_the_network_ends_its_worker(cpu64, monkeypatch):
    net = _train(cpu64, monkeypatch, processes=2, steps=1)
    worker = net._worker
    net.to("cpu", "float32")
    assert net._worker is None and not worker.alive


#: Run in a fresh Python, not a fork of this one: a forked child inherits this process's heap,
#: and a free block of 16 MB or more left there by an earlier test (e.g. the Fashion-MNIST
#: images) is reused before fresh memory is mapped, so nothing would be given back by default.
_FREED_MEMORY_SCRIPT = """
import ctypes, ctypes.util, os, sys
import numpy as np
from xpnn.ops import piece_worker

def resident_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD: glibc's documented defaults
mallopt(-3, 128 * 1024)
given_back = []
for keep in (False, True):
    if keep:
        assert piece_worker.keep_freed_memory()
    array = np.ones(4 << 20, dtype=np.float32)  # 16 MB
    peak = resident_bytes()
    del array
    given_back.append(peak - resident_bytes())
print(*given_back)
"""


@pytest.mark.skipif(not ctypes.util.find_library("c"), reason="no C library with mallopt here")
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_keep_freed_memory_keeps_a_freed_array_for_the_next_one():
    # (resident bytes given back after freeing 16 MB) with the defaults, then after
    # keep_freed_memory().
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _FREED_MEMORY_SCRIPT], capture_output=True,
                            text=True, timeout=120, cwd=root,
                            env=dict(os.environ, PYTHONPATH=root + os.pathsep
                                     + os.environ.get("PYTHONPATH", "")))
    assert result.returncode == 0, result.stderr[-3000:]
    by_default, kept = (int(word) for word in result.stdout.split())
    assert by_default > 8 << 20 and kept < 1 << 20, (by_default, kept)


def test_the_worker_keeps_the_memory_it_frees(cpu64, monkeypatch):
    # The worker (forked from this process, with this module as patched here) calls
    # keep_freed_memory() first thing, and it succeeds; what it does is checked above.
    called = SharedArrays([(1,)], np.int64).arrays[0]

    def recording():
        kept = keep_freed_memory()
        called[0] = 1 if kept else -1
        return kept

    keep_freed_memory = piece_worker.keep_freed_memory
    monkeypatch.setattr(piece_worker, "keep_freed_memory", recording)
    net = _train(cpu64, monkeypatch, processes=2, steps=1)
    assert int(called[0]) == 1
    net._worker.close()


def test_the_first_failing_layer_in_the_worker_is_the_one_named(cpu64, monkeypatch):
    # A later layer's error (batch norm's sums, when the worker's piece failed before them)
    # must not take the place of the layer that failed first.
    monkeypatch.setattr(cpu64.ops, "processes", 2)
    net = NeuralNetwork(Sgd(0.05), He(), Constant(0.1))
    for layer in (Conv((1, 1), (1, 3, 3), 4), FailsInTheWorker(), BatchNormalization(4), ReLU(),
                  Flatten(), FullyConnected(4 * 8 * 8, 4), SoftMax()):
        net.append_layer(layer)
    net.loss_layer = CrossEntropyLoss()
    net.data_layer = random_image_batches(BATCH)
    with pytest.raises(ValueError) as raised:
        net.train(1)
    assert_error_names_the_whole_batch(raised.value, BATCH, "FailsInTheWorker: the second piece",
                                       (1, "FailsInTheWorker"))
