"""xpnn.parallel in one process: communicators, the multi-node optimizer and layers, the split
of a batch over ranks, distribute(). (tests/test_parallel_mpi.py runs real ranks.)"""
import copy
import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import xpnn
from xpnn import checkpoint, network, parallel
from xpnn.datasets import DataLayer, batch_part
from xpnn.layers import BatchNormalization, Dropout
from xpnn.models import lenet
from xpnn.parallel.launcher import LAUNCHER_VARIABLES
from xpnn.optimizers import Adam, SgdWithMomentum
from xpnn.regularizers import L2_Regularizer
from conftest import assert_close
from thread_ranks import run_ranks

HAS_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpi4py = pytest.mark.skipif(not HAS_MPI4PY, reason='mpi4py is not installed (pip install "xpnn[mpi]")')


def _mpi_self():
    """MPI's communicator of this process alone: MPICommunicator's host-buffer path, size 1."""
    from mpi4py import MPI

    return parallel.MPICommunicator(MPI.COMM_SELF)


def _communicators():
    return [parallel.SingleProcessCommunicator()] + ([_mpi_self()] if HAS_MPI4PY else [])


# -- communicators ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [parallel.SingleProcessCommunicator,
                                  pytest.param(lambda: _mpi_self(), marks=needs_mpi4py)],
                         ids=["single", "mpi-self"])
def test_a_communicator_of_one_rank_sums_and_copies_arrays_of_its_backend(backend, make):
    communicator = make()
    assert (communicator.rank, communicator.size) == (0, 1)
    values = np.arange(6.0).reshape(2, 3) - 2.5
    x = backend.asarray(values)
    for result in (communicator.allreduce(x), communicator.broadcast(x)):
        assert backend.owns(result) and result.dtype == x.dtype
        assert_close(result, values)
    count, total, scalar = communicator.all_sum(7, x, 0.25)
    assert type(count) is int and count == 7 and scalar == 0.25
    assert backend.owns(total) and total.dtype == x.dtype
    assert_close(total, values)
    assert communicator.allgather(3) == [3]
    assert communicator.broadcast_object({"a": 1}) == {"a": 1}
    assert communicator.allreduce(2.5) == 2.5
    communicator.barrier()


@needs_mpi4py
def test_the_mpi_path_keeps_float32_and_leaves_its_input_alone(backend32):
    communicator = _mpi_self()
    values = np.linspace(-1, 1, 5, dtype=np.float32)
    x = backend32.asarray(values)
    total = communicator.allreduce(x)
    (summed,) = communicator.all_sum(x)
    for result in (total, summed):
        assert backend32.owns(result) and result.dtype == backend32.dtype
        assert_close(result, values)
    assert_close(x, values)
    host = values.copy()
    assert communicator.allreduce(host) is not host  # a NumPy array: a new array, input unchanged
    np.testing.assert_array_equal(host, values)


@needs_mpi4py
def test_an_mpi_communicator_deep_copies_to_itself_and_refuses_pickling():
    communicator = _mpi_self()
    assert copy.deepcopy(communicator) is communicator
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(communicator)


def _run(code, **environment):
    """Run ``code`` in a fresh interpreter (this environment, no launcher's, plus ``environment``)."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env.update(environment)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


def test_without_a_launcher_the_world_is_one_process_and_mpi4py_stays_unimported():
    done = _run("import sys, xpnn.parallel as p; c = p.world(); "
                "print(type(c).__name__, c.rank, c.size, 'mpi4py' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SingleProcessCommunicator", "0", "1", "False"]


def test_under_a_launcher_without_mpi4py_the_error_names_the_extra():
    # (mpi4py made unimportable: what a machine without the extra sees.)
    done = _run("import sys; sys.modules['mpi4py'] = None\n"
                "import xpnn.parallel as p\n"
                "try:\n    p.world()\nexcept p.MPIUnavailableError as error:\n    print(error)",
                PMI_SIZE="2")
    assert done.returncode == 0, done.stderr
    assert "started by an MPI launcher (PMI_SIZE=2)" in done.stdout
    assert 'pip install "xpnn[mpi]"' in done.stdout


# -- the split of a batch ---------------------------------------------------------------------

@pytest.mark.parametrize("count", [0, 1, 5, 7, 64])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_batch_parts_are_contiguous_blocks_in_rank_order_within_one_row_of_each_other(count, size):
    parts = [batch_part(count, rank, size) for rank in range(size)]
    assert parts[0][0] == 0 and parts[-1][1] == count
    assert all(stop == start for (_, stop), (start, _) in zip(parts, parts[1:]))
    lengths = [stop - start for start, stop in parts]
    assert max(lengths) - min(lengths) <= 1


def test_a_data_layers_parts_make_its_global_batches(backend):
    images = np.random.default_rng(0).integers(0, 256, (23, 4, 4)).astype(np.uint8)
    labels = np.arange(23) % 10

    def layer(part=(0, 1)):
        return DataLayer(images, labels, 5, backend=backend, shuffle=True, seed=3, part=part)

    whole, parts = layer(), [layer((rank, 3)) for rank in range(3)]
    for _ in range(2 * whole.batches_per_epoch):  # (two epochs: the last batch has 3 rows)
        expected = [xpnn.to_numpy(array) for array in whole.next()]
        got = [part.next() for part in parts]
        for index in range(2):
            assert_close(backend.xp.concat([batch[index] for batch in got], axis=0), expected[index])
        assert all(part.state_dict() == whole.state_dict() for part in parts)
    with pytest.raises(ValueError, match="0 <= rank < size"):
        layer((2, 2))


def test_rank_batches_keep_the_ranks_rows_of_a_course_data_layer():
    class Batches:
        def next(self):
            return np.arange(14.0).reshape(7, 2), np.eye(7)

    rows, labels = parallel.RankBatches(Batches(), _PretendRank(1, 2)).next()
    np.testing.assert_array_equal(rows, np.arange(14.0).reshape(7, 2)[3:])
    np.testing.assert_array_equal(labels, np.eye(7)[3:])


# -- layers over ranks (threads as ranks) -------------------------------------------------------

def _split(array, rank, size):
    start, stop = batch_part(array.shape[0], rank, size)
    return array[start:stop]


@pytest.mark.parametrize("shape", [(7, 4), (7, 3, 5, 4)], ids=["vectors", "images"])
def test_batch_norm_over_ranks_is_batch_norm_of_the_global_batch(backend, shape):
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal(shape) * 3 + 1 for _ in range(2)]
    errors = [rng.standard_normal(shape) for _ in range(2)]
    channels = shape[1]
    plain = BatchNormalization(channels)
    expected = [(xpnn.to_numpy(plain.forward(x)), xpnn.to_numpy(plain.backward(e)),
                 xpnn.to_numpy(plain.gradient_weights), xpnn.to_numpy(plain.gradient_bias))
                for x, e in zip(batches, errors)]

    def rank_run(communicator):
        layer = parallel.MultiNodeBatchNormalization(channels, communicator=communicator)
        results = []
        for x, e in zip(batches, errors):
            output = layer.forward(_split(x, communicator.rank, communicator.size))
            results.append((output, layer.backward(_split(e, communicator.rank, communicator.size)),
                            layer.gradient_weights, layer.gradient_bias))
        return results, layer

    ranks = run_ranks(3, rank_run)  # (rows 2, 2, 3)
    for step, (output, input_error, gamma, beta) in enumerate(expected):
        got = [results[step] for results, _ in ranks]
        assert_close(backend.xp.concat([g[0] for g in got], axis=0), output, rtol=1e-12, atol=1e-12)
        assert_close(backend.xp.concat([g[1] for g in got], axis=0), input_error, rtol=1e-10, atol=1e-12)
        # Each rank's parameter gradients are of its rows: their sum is the batch's.
        assert_close(sum(xpnn.to_numpy(g[2]) for g in got), gamma, rtol=1e-12, atol=1e-12)
        assert_close(sum(xpnn.to_numpy(g[3]) for g in got), beta, rtol=1e-12, atol=1e-12)
    for _, layer in ranks:
        assert_close(layer.running_mean, xpnn.to_numpy(plain.running_mean), rtol=1e-12, atol=1e-14)
        assert_close(layer.running_variance, xpnn.to_numpy(plain.running_variance), rtol=1e-12)


def test_dropout_over_ranks_keeps_its_rows_of_the_global_batchs_mask(backend):
    x = backend.asarray(np.random.default_rng(2).standard_normal((7, 6)) + 2.0)
    with xpnn.host_random():
        np.random.seed(11)
        expected = xpnn.to_numpy(Dropout(0.5).forward(x))
        for rank in range(2):
            np.random.seed(11)  # (every rank's stream is the same)
            layer = parallel.MultiNodeDropout(0.5, communicator=_PretendRank(rank, 2, rows=[3, 4]))
            start, stop = batch_part(7, rank, 2)
            output = layer.forward(x[start:stop, ...])
            assert_close(output, expected[start:stop])
            assert_close(layer.backward(backend.asarray(np.ones((stop - start, 6)))),
                         (expected[start:stop] != 0) * 2.0)
    assert 0 < np.count_nonzero(expected) < expected.size


# -- the multi-node optimizer ---------------------------------------------------------------------

class _PretendRank:
    """Rank ``rank`` of ``size`` whose partners are pretend: the other ranks hold the same
    gradients (``allreduce`` returns ``size`` times its input), ``rows`` rows each, and
    rank 0's broadcast arrays are ``root_arrays``."""

    def __init__(self, rank, size, rows=None, root_arrays=None):
        self.rank, self.size, self.rows, self.root_arrays = rank, size, rows, root_arrays

    def allreduce(self, value):
        return value * self.size

    def all_sum(self, *values):
        return tuple(value * self.size for value in values)

    def allgather(self, value):
        return list(self.rows)

    def broadcast_object(self, value, root=0):
        return self.root_arrays if self.rank != root else value

    def __deepcopy__(self, memo):
        return self


def test_the_multi_node_optimizer_steps_with_the_gradient_summed_over_ranks(backend):
    rng = np.random.default_rng(3)
    weights, gradient = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    for make in (lambda: Adam(1e-2, 0.9, 0.999), lambda: SgdWithMomentum(0.1, 0.9)):
        plain, inner = make(), make()
        for optimizer in (plain, inner):
            optimizer.add_regularizer(L2_Regularizer(0.01))
        wrapped = parallel.MultiNodeOptimizer(inner, _PretendRank(0, 2))
        expected, got = backend.asarray(weights), backend.asarray(weights)
        for _ in range(3):
            expected = plain.calculate_update(expected, backend.asarray(2.0 * gradient))
            got = wrapped.calculate_update(got, backend.asarray(gradient))
        assert_close(got, xpnn.to_numpy(expected), rtol=1e-14)


def test_the_multi_node_optimizer_is_the_wrapped_one_for_everything_else():
    inner = Adam(1e-3, 0.9, 0.999)
    wrapped = parallel.MultiNodeOptimizer(inner, _PretendRank(0, 2))
    wrapped.calculate_update(np.ones(3), np.ones(3))
    assert wrapped.step_count == 1 and wrapped.first_moment is inner.first_moment
    wrapped.learning_rate = 0.5
    wrapped.add_regularizer(L2_Regularizer(0.1))
    assert inner.learning_rate == 0.5 and wrapped.regularizer is inner.regularizer
    twin = copy.deepcopy(wrapped)  # (a layer's bias optimizer)
    assert isinstance(twin, parallel.MultiNodeOptimizer) and twin.communicator is wrapped.communicator
    assert twin.optimizer is not inner and twin.first_moment is not inner.first_moment
    np.testing.assert_array_equal(twin.first_moment, inner.first_moment)
    shallow = copy.copy(wrapped)
    assert isinstance(shallow, parallel.MultiNodeOptimizer) and shallow.optimizer is not inner
    loaded = pickle.loads(pickle.dumps(wrapped))
    assert type(loaded) is Adam and loaded.step_count == 1 and loaded.learning_rate == 0.5
    np.testing.assert_array_equal(loaded.first_moment, inner.first_moment)


# -- distribute ----------------------------------------------------------------------------------

def _lenet(seed):
    np.random.seed(seed)
    return lenet.build(batch_norm=True, dropout=True)


def test_distribute_leaves_a_network_alone_on_one_rank():
    net = _lenet(0)
    layers, optimizer = list(net.layers), net.optimizer
    assert parallel.distribute(net, parallel.SingleProcessCommunicator()) is net
    assert net.layers == layers and net.optimizer is optimizer


def test_distribute_takes_rank_0s_state_and_swaps_in_the_layers_over_ranks():
    root = _lenet(0)
    root.layers[0].optimizer.calculate_update(root.layers[0].weights, root.layers[0].weights)
    net = parallel.distribute(_lenet(1), _PretendRank(1, 2, root_arrays=checkpoint.network_arrays(root)))
    for key, value in checkpoint.network_arrays(root).items():
        np.testing.assert_array_equal(checkpoint.network_arrays(net)[key], value, err_msg=key)
    kinds = {type(layer) for layer in net.layers}
    assert BatchNormalization not in kinds and Dropout not in kinds
    assert {parallel.MultiNodeBatchNormalization, parallel.MultiNodeDropout} <= kinds
    for layer in net.layers:
        if layer.trainable:
            assert isinstance(layer.optimizer, parallel.MultiNodeOptimizer)
            assert isinstance(layer._bias_optimizer, parallel.MultiNodeOptimizer)
            assert layer._bias_optimizer.optimizer is not layer.optimizer.optimizer
    assert isinstance(net.optimizer, parallel.MultiNodeOptimizer)
    for layer in net.layers[1], net.layers[12]:  # (batch norm, dropout)
        for twin in copy.copy(layer), copy.deepcopy(layer):
            assert type(twin) is type(layer) and twin.communicator is layer.communicator


def test_a_distributed_network_saves_as_the_plain_one(tmp_path):
    net = parallel.distribute(_lenet(0), _PretendRank(0, 2))
    images = np.random.default_rng(4).random((3, 1, 28, 28))
    expected = net.test(images)
    network.save(str(tmp_path / "net.pkl"), net)
    checkpoint.save_checkpoint(str(tmp_path / "checkpoint"), net, "lenet",
                               {"batch_norm": True, "dropout": True})
    for loaded in (network.load(str(tmp_path / "net.pkl"), None),
                   checkpoint.load_model(str(tmp_path / "checkpoint"))):
        plain = [type(layer) for layer in _lenet(0).layers]
        assert [type(layer) for layer in loaded.layers] == plain
        for layer in loaded.layers:
            assert not hasattr(layer, "communicator")
            assert not isinstance(getattr(layer, "optimizer", None), parallel.MultiNodeOptimizer)
        assert_close(loaded.test(images), expected, rtol=1e-12)
    assert b"xpnn.parallel" not in (tmp_path / "net.pkl").read_bytes()


def test_distribute_refuses_layers_whose_training_over_ranks_would_differ():
    class MyNorm(BatchNormalization):
        pass

    net = _lenet(0)
    net.layers[1] = MyNorm(6)
    with pytest.raises(TypeError, match=r"layer 1 \(MyNorm\) is a subclass of BatchNormalization"):
        parallel.distribute(net, _PretendRank(0, 2))
