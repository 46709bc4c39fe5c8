"""NeuralNetwork.test on pieces of a batch (the NumPy backend's threads), frozen layers in training.

The NumPy backend's ``ops.map_samples`` runs pieces of a large batch on its
threads in testing phase, when every layer says it may (``runs_in_pieces``).
A layer's shape error then says that its shapes are a piece's.
"""
import re

import numpy as np
import pytest

import xpnn
from xpnn import NeuralNetwork
from xpnn.initializers import Constant, He
from xpnn.layers import Conv, Flatten, FullyConnected, Pooling, ReLU, SoftMax, TanH
from xpnn.layers.base import BaseLayer
from xpnn.losses import CrossEntropyLoss
from xpnn.models import lenet
from xpnn.ops import numpy_ops
from xpnn.ops.numpy_ops import NumpyOps
from xpnn.optimizers import Adam, Sgd
from xpnn.regularizers import L2_Regularizer
from conftest import CyclingBatches, assert_error_names_the_whole_batch

BATCH = 7


def _small_net():
    net = NeuralNetwork(Adam(1e-2, 0.9, 0.999), He(), Constant(0.1))
    net.optimizer.add_regularizer(L2_Regularizer(1e-3))
    for layer in (Conv((1, 1), (1, 3, 3), 3), ReLU(), Pooling((2, 2), (2, 2)), Flatten(),
                  FullyConnected(3 * 4 * 4, 6), TanH(), FullyConnected(6, 4), SoftMax()):
        net.append_layer(layer)
    net.loss_layer = CrossEntropyLoss()
    return net


def _data(count=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((count, 1, 8, 8)), np.eye(4)[rng.integers(0, 4, count)]


def test_a_frozen_layer_stays_frozen_and_the_rest_trains(backend):
    """trainable = False with an optimizer still set: no step moves the layer; the others move."""
    xpnn.seed(5)
    net = _small_net()
    frozen = [net.layers[0], net.layers[6]]  # the convolution and the last FC layer
    for layer in frozen:
        layer.trainable = False
    before = [(xpnn.to_numpy(layer.weights), xpnn.to_numpy(layer.bias)) for layer in frozen]
    free_before = xpnn.to_numpy(net.layers[4].weights)
    net.data_layer = CyclingBatches(*_data(), BATCH)
    net.train(3)
    for layer, (weights, bias) in zip(frozen, before):
        np.testing.assert_array_equal(xpnn.to_numpy(layer.weights), weights)
        np.testing.assert_array_equal(xpnn.to_numpy(layer.bias), bias)
    assert not np.array_equal(xpnn.to_numpy(net.layers[4].weights), free_before)


def test_a_shape_error_in_test_pieces_names_the_whole_batch(monkeypatch):
    """LeNet given 32x32 images: the error says its shapes are a piece's of the whole batch
    (it read "received (64, 576)" for a batch of 128)."""
    monkeypatch.setattr(numpy_ops, "MIN_SAMPLES_PER_THREAD", 4)  # (a small batch is cut)
    with xpnn.use_backend("cpu", dtype="float64") as backend:
        monkeypatch.setattr(backend, "ops", NumpyOps(backend, threads=2))
        net = lenet.build()
        images = np.random.default_rng(0).random((2 * BATCH, 1, 32, 32))
        with pytest.raises(ValueError) as raised:
            net.test(images)
    assert_error_names_the_whole_batch(raised.value, 2 * BATCH)
    # (test's pieces know their size, not their first row: no row range may be made up.)
    assert re.search(rf"\(while running \d+ rows of a batch of {2 * BATCH} in parallel pieces\)",
                     str(raised.value)), str(raised.value)


class BatchCentre(BaseLayer):
    """A layer of the user's own that works across the samples of its batch (not for pieces:
    ``runs_in_pieces`` stays False): it subtracts the batch mean."""

    def forward(self, input_tensor):
        return input_tensor - np.mean(input_tensor, axis=0, keepdims=True)

    def backward(self, error_tensor):
        return error_tensor - np.mean(error_tensor, axis=0, keepdims=True)


def test_test_runs_a_network_with_a_layer_not_for_pieces_whole(monkeypatch):
    monkeypatch.setattr(numpy_ops, "MIN_SAMPLES_PER_THREAD", 2)
    with xpnn.use_backend("cpu", dtype="float64") as backend:
        outputs = []
        for threads in (3, 1):
            monkeypatch.setattr(backend, "ops", NumpyOps(backend, threads=threads))
            xpnn.seed(5)
            net = _small_net()
            net.layers.insert(1, BatchCentre())
            outputs.append(xpnn.to_numpy(net.test(_data(count=301)[0])))
    assert outputs[0].shape[0] == 301
    np.testing.assert_array_equal(outputs[0], outputs[1])


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
    # A batch big enough to be cut: the network must not cut it for such a layer.
    monkeypatch.setattr(numpy_ops, "MIN_SAMPLES_PER_THREAD", 2)
    with xpnn.use_backend("cpu", "float64") as backend:
        monkeypatch.setattr(backend, "ops", NumpyOps(backend, threads=2))
        net = NeuralNetwork(Sgd(1e-2), He(), Constant(0.1))
        net.loss_layer = CrossEntropyLoss()
        for layer in (FullyConnected(4, 8), CourseStyleRecorder(), FullyConnected(8, 3), SoftMax()):
            net.append_layer(layer)
        inputs = np.random.default_rng(0).random((64, 4))
        CourseStyleRecorder.rows = []
        net.test(inputs)
        net.train_batch(inputs, np.eye(3)[np.arange(64) % 3])
    assert CourseStyleRecorder.rows == [64, 64]


@pytest.mark.parametrize("step", ["train", "train_batch", "test"])
def test_a_shape_error_in_a_batch_not_cut_says_nothing_of_pieces(step):
    # Training never cuts, and a batch of 4 is too small for test to cut: the shape error's
    # shapes are the batch's own, and the message must not claim pieces that did not run.
    with xpnn.use_backend("cpu", dtype="float64"):
        net = lenet.build()
        images = np.random.default_rng(0).random((4, 1, 32, 32))
        labels = np.eye(10)[[0, 1, 2, 3]]
        net.data_layer = CyclingBatches(images, labels, 4)
        run = {"train": lambda: net.train(1), "train_batch": lambda: net.train_batch(images, labels),
               "test": lambda: net.test(images)}[step]
        with pytest.raises(ValueError) as raised:
            run()
    message = str(raised.value)
    assert "parallel pieces" not in message, message
    assert message.startswith("FullyConnected: expected input of shape (batch, 784), received (4, ")
    assert message.endswith("raised in net.layers[7] (FullyConnected) of a network of 13 layers "
                            "given input of shape (4, 1, 32, 32)"), message
