"""Training in pieces (xpnn.piecewise): the same numbers as one piece, on every backend.

A backend's ``ops.training_pieces`` decides the cut; the generic Ops never cuts,
so these tests make it cut (``monkeypatch``) to run the network-level logic
(replicas, joined outputs, summed gradients, the fused SoftMax step) on every
backend. The NumPy backend cuts large batches itself and runs the pieces on its
threads.
"""
import pickle
import threading

import numpy as np
import pytest

import xpnn
from xpnn import NeuralNetwork
from xpnn.backend import make_backend
from xpnn.initializers import Constant, He
from xpnn.layers.base import BaseLayer
from xpnn.layers import (BatchNormalization, Conv, Dropout, Flatten, FullyConnected, Pooling,
                         ReLU, SoftMax, TanH)
from xpnn.losses import CrossEntropyLoss
from xpnn.models import lenet
from xpnn.ops import Ops, numpy_ops
from xpnn.ops.numpy_ops import NumpyOps
from xpnn.ops.threads import split_range
from xpnn.optimizers import Adam, Sgd
from xpnn.regularizers import L2_Regularizer
from conftest import CyclingBatches, assert_close, assert_error_names_the_whole_batch

BATCH = 7


class UnfusedLoss(CrossEntropyLoss):
    """Cross-entropy with its own backward: the network then runs SoftMax.backward too."""

    def backward(self, label_tensor):
        return super().backward(label_tensor)


def _small_net(loss_layer, middle_activation=TanH):
    net = NeuralNetwork(Adam(1e-2, 0.9, 0.999), He(), Constant(0.1))
    net.optimizer.add_regularizer(L2_Regularizer(1e-3))
    for layer in (Conv((1, 1), (1, 3, 3), 3), ReLU(), Pooling((2, 2), (2, 2)), Flatten(),
                  FullyConnected(3 * 4 * 4, 6), middle_activation(), FullyConnected(6, 4),
                  SoftMax()):
        net.append_layer(layer)
    net.loss_layer = loss_layer
    return net


def _data(count=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((count, 1, 8, 8)), np.eye(4)[rng.integers(0, 4, count)]


def _train(backend, monkeypatch, pieces, loss_layer, steps=3, middle_activation=TanH):
    """Three steps of the small network; ``pieces`` cuts each batch (None: the backend decides)."""
    if pieces is not None:
        monkeypatch.setattr(backend.ops, "training_pieces",
                            lambda shape: split_range(shape[0], pieces))
    xpnn.seed(5)
    net = _small_net(loss_layer, middle_activation)
    images, labels = _data()
    net.data_layer = CyclingBatches(images, labels, BATCH)
    net.train(steps)
    monkeypatch.undo()
    return net


@pytest.mark.parametrize("loss_layer", [CrossEntropyLoss, UnfusedLoss], ids=["fused", "unfused"])
def test_training_in_pieces_gives_the_one_piece_numbers(backend, monkeypatch, loss_layer):
    whole = _train(backend, monkeypatch, 1, loss_layer())
    cut = _train(backend, monkeypatch, 3, loss_layer())
    assert whole._piecewise is None and cut._piecewise is not None
    # The replicas ran the pieces: the network's own layers never saw a batch.
    assert cut.layers[0]._cache is None and cut.layers[-1]._saved is None
    for actual, expected in zip(cut.loss, whole.loss):
        assert_close(actual, xpnn.to_numpy(expected), rtol=1e-12)
    for cut_layer, whole_layer in zip(cut.layers, whole.layers):
        if whole_layer.trainable:
            for name in ("weights", "bias", "gradient_weights", "gradient_bias"):
                expected = xpnn.to_numpy(getattr(whole_layer, name))
                assert_close(getattr(cut_layer, name), expected, rtol=1e-11,
                             atol=1e-14 * np.max(np.abs(expected)), err_msg=name)
    images, _ = _data(5, seed=1)
    assert_close(cut.test(images), xpnn.to_numpy(whole.test(images)), rtol=1e-11)


def test_numpy_does_not_cut_a_batch_inside_one_of_its_own_parts():
    # Pieces that wait for each other (batch norm) could not run at the same time there.
    ops = NumpyOps(make_backend("cpu", "float32"), threads=2)
    inside = ops._team.run(lambda part: ops.training_pieces((512, 3)), [0, 1])
    assert inside == [[(0, 512)], [(0, 512)]]
    assert ops.training_pieces((512, 3)) == [(0, 256), (256, 512)]


def test_pieces_are_joined_in_order_and_the_prediction_is_the_joined_output(backend, monkeypatch):
    monkeypatch.setattr(backend.ops, "training_pieces", lambda shape: split_range(shape[0], 2))
    xpnn.seed(5)
    net = _small_net(CrossEntropyLoss())
    images, _ = _data()
    prediction = net._run_layers(images)
    monkeypatch.undo()
    expected = xpnn.to_numpy(net._run_layers(images))  # one piece, same parameters
    assert net._piecewise is None
    assert_close(prediction, expected, rtol=1e-13)


def run_pieces_on_threads(task, count):
    """``[task(i) for i in range(count)]`` with every piece on its own thread at the same time,
    as batch normalization in pieces needs (its sums wait for every piece)."""
    results, errors = [None] * count, [None] * count

    def run(index):
        try:
            results[index] = task(index)
        except BaseException as error:
            errors[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results


def _coupled_net(loss_layer):
    """The small network with batch norm after the convolution and the first FC, and dropout.

    Plain SGD: the bias in front of batch norm has a gradient of rounding noise only,
    which Adam would scale up to full steps of either sign (see test_fastpaths).
    """
    net = NeuralNetwork(Sgd(0.05), He(), Constant(0.1))
    for layer in (Conv((1, 1), (1, 3, 3), 3), BatchNormalization(3, eps=1e-5), ReLU(),
                  Pooling((2, 2), (2, 2)), Flatten(), FullyConnected(3 * 4 * 4, 6),
                  BatchNormalization(6, eps=1e-5), TanH(), Dropout(0.5), FullyConnected(6, 4),
                  SoftMax()):
        net.append_layer(layer)
    net.loss_layer = loss_layer
    return net


def _train_coupled(backend, monkeypatch, pieces, steps=3):
    monkeypatch.setattr(backend.ops, "training_pieces", lambda shape: split_range(shape[0], pieces))
    monkeypatch.setattr(backend.ops, "run_pieces", run_pieces_on_threads)
    xpnn.seed(5)
    np.random.seed(7)  # the dropout masks on the NumPy backend
    net = _coupled_net(CrossEntropyLoss())
    net.data_layer = CyclingBatches(*_data(), BATCH)
    net.train(steps)
    monkeypatch.undo()
    return net


def test_batch_norm_and_dropout_in_pieces_give_the_one_piece_numbers(backend, monkeypatch):
    # Batch norm sums its statistics and its gradient's means over the pieces; dropout
    # takes its rows of one draw for the whole batch: the same numbers as one piece.
    whole = _train_coupled(backend, monkeypatch, 1)
    cut = _train_coupled(backend, monkeypatch, 3)
    assert whole._piecewise is None and cut._piecewise is not None
    assert cut.layers[1]._cache is None  # the replicas ran the pieces
    for actual, expected in zip(cut.loss, whole.loss):
        assert_close(actual, xpnn.to_numpy(expected), rtol=1e-11)
    for cut_layer, whole_layer in zip(cut.layers, whole.layers):
        names = ("weights", "bias", "gradient_weights", "gradient_bias") if whole_layer.trainable else ()
        if isinstance(whole_layer, BatchNormalization):
            names += ("running_mean", "running_variance")
        for name in names:
            expected = xpnn.to_numpy(getattr(whole_layer, name))
            # (atol: the convolution's bias gradient is rounding noise, ~1e-16, in both.)
            assert_close(getattr(cut_layer, name), expected, rtol=1e-10, atol=1e-12, err_msg=name)


class FailsOnLaterPieces(ReLU):
    """A ReLU that raises on every piece but the first."""

    def forward(self, input_tensor):
        if self.piece is not None and self.piece.bounds[0] > 0:
            raise ValueError("FailsOnLaterPieces: this piece failed")
        return super().forward(input_tensor)


def test_a_failing_piece_raises_its_own_error_and_frees_the_waiting_ones(monkeypatch):
    with xpnn.use_backend("cpu", dtype="float64") as backend:
        monkeypatch.setattr(backend.ops, "training_pieces", lambda shape: split_range(shape[0], 2))
        monkeypatch.setattr(backend.ops, "run_pieces", run_pieces_on_threads)
        net = _coupled_net(CrossEntropyLoss())
        net.layers[2] = FailsOnLaterPieces()  # after the first batch norm's sums: piece 0 waits
        net.layers[2].testing_phase = False
        net.data_layer = CyclingBatches(*_data(), BATCH)
        with pytest.raises(ValueError, match="this piece failed"):
            net.train(1)


def test_a_frozen_layer_stays_frozen_in_one_piece_and_in_pieces(backend, monkeypatch):
    """trainable = False with an optimizer still set: no step moves the layer, cut or not
    (one piece used to update it, pieces never did), and the rest trains the same."""
    runs = []
    for pieces in (1, 3):
        monkeypatch.setattr(backend.ops, "training_pieces", lambda shape: split_range(shape[0], pieces))
        xpnn.seed(5)
        net = _small_net(CrossEntropyLoss())
        frozen = [net.layers[0], net.layers[6]]  # the convolution and the last FC layer
        for layer in frozen:
            layer.trainable = False
        before = [(xpnn.to_numpy(layer.weights), xpnn.to_numpy(layer.bias)) for layer in frozen]
        net.data_layer = CyclingBatches(*_data(), BATCH)
        net.train(3)
        monkeypatch.undo()
        for layer, (weights, bias) in zip(frozen, before):
            np.testing.assert_array_equal(xpnn.to_numpy(layer.weights), weights)
            np.testing.assert_array_equal(xpnn.to_numpy(layer.bias), bias)
        runs.append(net)
    whole, cut = runs
    assert whole._piecewise is None and cut._piecewise is not None
    for actual, expected in zip(cut.loss, whole.loss):
        assert_close(actual, xpnn.to_numpy(expected), rtol=1e-12)
    for cut_layer, whole_layer in zip(cut.layers, whole.layers):
        if hasattr(whole_layer, "weights"):
            assert_close(cut_layer.weights, xpnn.to_numpy(whole_layer.weights), rtol=1e-11)


@pytest.mark.parametrize("step", ["train", "train_batch", "test"])
def test_a_shape_error_in_pieces_names_the_whole_batch(monkeypatch, step):
    """LeNet given 32x32 images: the error says its shapes are a piece's of the whole batch
    (it read "received (64, 576)" for a batch of 128), on the threads of training and test."""
    monkeypatch.setattr(numpy_ops, "MIN_SAMPLES_PER_THREAD", 4)  # (a small batch is cut)
    with xpnn.use_backend("cpu", dtype="float64") as backend:
        monkeypatch.setattr(backend, "ops", NumpyOps(backend, threads=2, processes=1))
        net = lenet.build()
        rng = np.random.default_rng(0)
        images, labels = rng.random((2 * BATCH, 1, 32, 32)), np.eye(10)[rng.integers(0, 10, 2 * BATCH)]
        net.data_layer = CyclingBatches(images, labels, 2 * BATCH)
        run = {"train": lambda: net.train(1), "train_batch": lambda: net.train_batch(images, labels),
               "test": lambda: net.test(images)}[step]
        with pytest.raises(ValueError) as raised:
            run()
    assert_error_names_the_whole_batch(raised.value, 2 * BATCH)


class CountingReLU(ReLU):
    """A ReLU that records which thread ran each forward call and on how many samples."""

    calls = []

    def forward(self, input_tensor):
        CountingReLU.calls.append((threading.get_ident(), input_tensor.shape[0]))
        return super().forward(input_tensor)


@pytest.mark.parametrize("coupled", [False, True], ids=["plain", "bn-dropout"])
@pytest.mark.parametrize("threads", [2, 3])
def test_numpy_runs_the_pieces_of_a_large_batch_on_its_threads(monkeypatch, threads, coupled):
    import xpnn.ops.numpy_ops as numpy_ops

    monkeypatch.setattr(numpy_ops, "MIN_SAMPLES_PER_THREAD", 2)
    with xpnn.use_backend("cpu", dtype="float64") as backend:
        results = []
        for ops in (NumpyOps(backend, threads=threads), NumpyOps(backend, threads=1)):
            monkeypatch.setattr(backend, "ops", ops)
            CountingReLU.calls = []
            xpnn.seed(5)
            np.random.seed(7)
            if coupled:
                net = _coupled_net(CrossEntropyLoss())
                net.layers[7] = CountingReLU()  # in place of the TanH
            else:
                net = _small_net(CrossEntropyLoss(), middle_activation=CountingReLU)
            net.data_layer = CyclingBatches(*_data(), BATCH)
            net.train(2)
            results.append((net, list(CountingReLU.calls)))
    (cut, cut_calls), (whole, whole_calls) = results
    assert len({ident for ident, _ in cut_calls}) == threads
    assert sorted(size for _, size in cut_calls[:threads]) == sorted(
        stop - start for start, stop in split_range(BATCH, threads))
    assert whole._piecewise is None and [size for _, size in whole_calls] == [BATCH, BATCH]
    for cut_layer, whole_layer in zip(cut.layers, whole.layers):
        if whole_layer.trainable:
            np.testing.assert_allclose(cut_layer.weights, whole_layer.weights, rtol=1e-11)


def test_numpy_training_pieces_cut_only_large_batches():
    ops = NumpyOps(make_backend("cpu", "float32"), threads=2)
    assert ops.training_pieces((255, 1, 28, 28)) == [(0, 255)]
    assert ops.training_pieces((256, 1, 28, 28)) == [(0, 128), (128, 256)]
    assert NumpyOps(make_backend("cpu", "float32"), threads=1).training_pieces((512, 3)) == [(0, 512)]
    assert Ops(make_backend("cpu", "float32")).training_pieces((4096, 3)) == [(0, 4096)]


@pytest.mark.parametrize("shape", [(5, 3, 4, 2), (5, 6)])
def test_numpy_join_samples_matches_generic_and_keeps_images_batch_innermost(shape):
    backend = make_backend("cpu", "float64")
    rng = np.random.default_rng(0)
    # Pieces as the NumPy fast paths return them: transposed views of (c, y, x, b) arrays.
    pieces = [np.moveaxis(rng.random(shape[1:] + (count,)), -1, 0) for count in (2, 3)]
    joined = NumpyOps(backend).join_samples(pieces)
    np.testing.assert_array_equal(joined, Ops(backend).join_samples(pieces))
    assert joined.shape == (5,) + shape[1:]
    if len(shape) == 4:
        assert joined.strides[0] == joined.itemsize


def test_take_gradients_sums_the_replicas_and_steps_once(backend):
    layer = FullyConnected(3, 2)
    layer.optimizer = Sgd(0.5)
    before = xpnn.to_numpy(layer.weights)
    replicas = [layer.replica() for _ in range(2)]
    assert all(twin.optimizer is None for twin in replicas)
    rng = np.random.default_rng(0)
    inputs, errors = rng.random((2, 4, 3)), rng.random((2, 4, 2))
    for twin, x, e in zip(replicas, inputs, errors):
        twin.forward(x)
        twin.backward(e)
    assert_close(layer.weights, before)  # the replicas did not step
    layer.take_gradients(replicas)
    augmented = np.concatenate([inputs.reshape(8, 3), np.ones((8, 1))], axis=1)
    gradient = augmented.T @ errors.reshape(8, 2)
    assert_close(layer.gradient_weights, gradient, rtol=1e-13)
    assert_close(layer.weights, before - 0.5 * gradient, rtol=1e-13)


def test_a_network_trained_in_pieces_pickles_without_its_pass(monkeypatch):
    with xpnn.use_backend("cpu", dtype="float64") as backend:
        net = _train(backend, monkeypatch, 2, CrossEntropyLoss(), steps=1)
        assert net._piecewise is not None
        copy = pickle.loads(pickle.dumps(net))
        assert copy._piecewise is None
        images, _ = _data(3)
        np.testing.assert_allclose(copy.test(images), net.test(images), rtol=1e-13)
        del copy.__dict__["_piecewise"]  # a network pickled before passes in pieces existed
        revived = pickle.loads(pickle.dumps(copy))
        assert revived._piecewise is None


def test_a_float32_step_in_pieces_stays_float32(monkeypatch):
    # tests/test_float32.py checks whole batches; the joined outputs, summed gradients
    # and batch-norm sums of a step in pieces must keep float32 too.
    import xpnn.ops.numpy_ops as numpy_ops

    monkeypatch.setattr(numpy_ops, "MIN_SAMPLES_PER_THREAD", 2)
    with xpnn.use_backend("cpu", dtype="float32") as backend:
        monkeypatch.setattr(backend, "ops", NumpyOps(backend, threads=2))
        xpnn.seed(5)
        np.random.seed(7)
        net = _coupled_net(CrossEntropyLoss())
        images, labels = _data()
        net.data_layer = CyclingBatches(images.astype(np.float32), labels.astype(np.float32), BATCH)
        net.train(1)
    assert net._piecewise is not None and net._piecewise.output.dtype == np.float32
    assert net.loss[0].dtype == np.float32
    for layer in net.layers:
        for name in ("weights", "bias", "gradient_weights", "gradient_bias", "running_mean",
                     "running_variance"):
            value = getattr(layer, name, None)
            if value is not None:
                assert value.dtype == np.float32, (type(layer).__name__, name)


class BatchCentre(BaseLayer):
    """A layer of the user's own that works across the samples of its batch (not for pieces:
    ``runs_in_pieces`` stays False): it subtracts the batch mean."""

    def forward(self, input_tensor):
        return input_tensor - np.mean(input_tensor, axis=0, keepdims=True)

    def backward(self, error_tensor):
        return error_tensor - np.mean(error_tensor, axis=0, keepdims=True)


def test_test_runs_a_network_with_a_layer_not_for_pieces_whole(monkeypatch):
    import xpnn.ops.numpy_ops as numpy_ops

    monkeypatch.setattr(numpy_ops, "MIN_SAMPLES_PER_THREAD", 2)
    with xpnn.use_backend("cpu", dtype="float64") as backend:
        outputs = []
        for threads in (3, 1):
            monkeypatch.setattr(backend, "ops", NumpyOps(backend, threads=threads))
            xpnn.seed(5)
            net = _small_net(CrossEntropyLoss())
            net.layers.insert(1, BatchCentre())
            outputs.append(xpnn.to_numpy(net.test(_data(count=301)[0])))
    assert outputs[0].shape[0] == 301
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_a_pass_cut_for_more_threads_than_now_finishes_its_backward(monkeypatch):
    # ops.threads lowered between the forward and the backward pass of a batch cut in three:
    # batch norm's sums need all three pieces at once.
    import xpnn.ops.numpy_ops as numpy_ops

    monkeypatch.setattr(numpy_ops, "MIN_SAMPLES_PER_THREAD", 2)
    with xpnn.use_backend("cpu", dtype="float64") as backend:
        nets = []
        for threads in (3, 1):
            ops = NumpyOps(backend, threads=threads, processes=1)
            monkeypatch.setattr(backend, "ops", ops)
            xpnn.seed(5)
            np.random.seed(7)
            net = _coupled_net(CrossEntropyLoss())
            net.data_layer = CyclingBatches(*_data(), BATCH)
            net.forward()
            ops.threads = 2 if threads == 3 else 1
            net.backward()
            nets.append(net)
    cut, whole = nets
    assert cut._piecewise is not None and len(cut._piecewise.pieces) == 3
    for cut_layer, whole_layer in zip(cut.layers, whole.layers):
        if whole_layer.trainable:
            np.testing.assert_allclose(cut_layer.weights, whole_layer.weights, rtol=1e-11)


class CourseStyleRecorder:
    """A layer of the user's own with no xpnn base class (no runs_in_pieces): records row counts."""
    trainable = False
    rows = []

    def forward(self, input_tensor):
        CourseStyleRecorder.rows.append(input_tensor.shape[0])
        return input_tensor

    def backward(self, error_tensor):
        return error_tensor


def test_a_layer_without_runs_in_pieces_runs_on_whole_batches(monkeypatch):
    # Batches big enough to be cut: the network must not cut them for such a layer (a layer
    # taken for one that runs in pieces failed with "has no attribute 'replica'").
    monkeypatch.setattr(numpy_ops, "MIN_SAMPLES_PER_THREAD", 2)
    with xpnn.use_backend("cpu", "float64") as backend:
        monkeypatch.setattr(backend, "ops", NumpyOps(backend, threads=2, processes=1))
        net = NeuralNetwork(Sgd(1e-2), He(), Constant(0.1))
        net.loss_layer = CrossEntropyLoss()
        for layer in (FullyConnected(4, 8), CourseStyleRecorder(), FullyConnected(8, 3), SoftMax()):
            net.append_layer(layer)
        inputs = np.random.default_rng(0).random((64, 4))
        CourseStyleRecorder.rows = []
        net.test(inputs)
        net.train_batch(inputs, np.eye(3)[np.arange(64) % 3])
    assert CourseStyleRecorder.rows == [64, 64]


def test_a_shape_error_in_test_pieces_names_the_pieces_size(monkeypatch):
    # (test's pieces know their size, not their first row: no row range may be made up.)
    import re

    monkeypatch.setattr(numpy_ops, "MIN_SAMPLES_PER_THREAD", 4)
    with xpnn.use_backend("cpu", dtype="float64") as backend:
        monkeypatch.setattr(backend, "ops", NumpyOps(backend, threads=2, processes=1))
        net = lenet.build()
        with pytest.raises(ValueError) as raised:
            net.test(np.random.default_rng(0).random((16, 1, 32, 32)))
    assert re.search(r"\(while running \d+ rows of a batch of 16 in parallel pieces\)",
                     str(raised.value)), str(raised.value)


@pytest.mark.parametrize("step", ["train_batch", "test"])
def test_a_shape_error_in_a_batch_not_cut_says_nothing_of_pieces(step):
    # A batch of 4 is run whole (too small to cut): its shape error's shapes are the batch's
    # own, and the message must not claim pieces that did not run.
    with xpnn.use_backend("cpu", dtype="float64"):
        net = lenet.build()
        images = np.random.default_rng(0).random((4, 1, 32, 32))
        run = {"train_batch": lambda: net.train_batch(images, np.eye(10)[[0, 1, 2, 3]]),
               "test": lambda: net.test(images)}[step]
        with pytest.raises(ValueError) as raised:
            run()
    assert "parallel pieces" not in str(raised.value), str(raised.value)
