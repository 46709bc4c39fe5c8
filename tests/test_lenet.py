"""The seed's LeNet: structure, options, every backend, and a smoke test on Fashion-MNIST."""
import gzip
import math
import os

import numpy as np
import pytest

import xpnn
from xpnn.layers import (BatchNormalization, Dropout, Flatten, FullyConnected, SoftMax)
from xpnn.layers.conv import Conv
from xpnn.layers.pooling import Pooling
from xpnn.losses import CrossEntropyLoss
from xpnn.models import lenet
from xpnn.optimizers import Adam
from xpnn.regularizers import L2_Regularizer

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

PLAIN = ["Conv", "ReLU", "Pooling", "Conv", "ReLU", "Pooling", "Flatten",
         "FullyConnected", "ReLU", "FullyConnected", "ReLU", "FullyConnected", "SoftMax"]
WITH_BATCH_NORM = ["Conv", "BatchNormalization", "ReLU", "Pooling",
                   "Conv", "BatchNormalization", "ReLU", "Pooling", "Flatten",
                   "FullyConnected", "BatchNormalization", "ReLU",
                   "FullyConnected", "BatchNormalization", "ReLU", "FullyConnected", "SoftMax"]
WITH_DROPOUT = ["Conv", "ReLU", "Pooling", "Conv", "ReLU", "Pooling", "Flatten",
                "FullyConnected", "ReLU", "Dropout", "FullyConnected", "ReLU", "Dropout",
                "FullyConnected", "SoftMax"]
WITH_BOTH = ["Conv", "BatchNormalization", "ReLU", "Pooling",
             "Conv", "BatchNormalization", "ReLU", "Pooling", "Flatten",
             "FullyConnected", "BatchNormalization", "ReLU", "Dropout",
             "FullyConnected", "BatchNormalization", "ReLU", "Dropout", "FullyConnected", "SoftMax"]
OPTIONS = [(False, False, PLAIN), (True, False, WITH_BATCH_NORM),
           (False, True, WITH_DROPOUT), (True, True, WITH_BOTH)]
OPTION_IDS = ["plain", "batch_norm", "dropout", "batch_norm+dropout"]


class ArrayData:
    """A course-style data layer cycling over fixed host arrays in batches."""

    def __init__(self, images, labels, batch_size):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.position = 0

    def next(self):
        index = np.arange(self.position, self.position + self.batch_size) % len(self.images)
        self.position += self.batch_size
        return self.images[index], self.labels[index]


def _random_batch(batch_size, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((batch_size, 1, 28, 28)).astype(dtype)
    labels = np.eye(10, dtype=dtype)[rng.integers(0, 10, batch_size)]
    return images, labels


# -- structure ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch_norm, dropout, expected", OPTIONS, ids=OPTION_IDS)
def test_layer_order(batch_norm, dropout, expected):
    net = lenet.build(batch_norm=batch_norm, dropout=dropout)
    assert [type(layer).__name__ for layer in net.layers] == expected
    assert isinstance(net.loss_layer, CrossEntropyLoss)


def test_default_is_the_design_lenet():
    net = lenet.build()
    convolutions = [layer for layer in net.layers if isinstance(layer, Conv)]
    assert [(c.stride_shape, c.convolution_shape, c.num_kernels) for c in convolutions] == [
        ((1, 1), (1, 5, 5), 6), ((1, 1), (6, 5, 5), 16)]
    poolings = [layer for layer in net.layers if isinstance(layer, Pooling)]
    assert [(p.stride_shape, p.pooling_shape) for p in poolings] == [((2, 2), (2, 2))] * 2
    dense = [layer for layer in net.layers if isinstance(layer, FullyConnected)]
    assert [(d.input_size, d.output_size) for d in dense] == [(784, 120), (120, 84), (84, 10)]
    assert isinstance(net.layers[-1], SoftMax) and isinstance(net.layers[6], Flatten)


def test_options_parameters():
    net = lenet.build(batch_norm=True, dropout=True, keep_probability=0.7, batch_norm_eps=1e-5)
    norms = [layer for layer in net.layers if isinstance(layer, BatchNormalization)]
    assert [n.channels for n in norms] == [6, 16, 120, 84]
    assert all(n.eps == 1e-5 for n in norms)
    assert [d.probability for d in net.layers if isinstance(d, Dropout)] == [0.7, 0.7]
    assert all(n.eps == 1e-10 for n in lenet.build(batch_norm=True).layers
               if isinstance(n, BatchNormalization))
    default_dropout = lenet.build(dropout=True).layers
    assert [d.probability for d in default_dropout if isinstance(d, Dropout)] == [0.8, 0.8]


def test_optimizer_and_regularizer():
    net = lenet.build(learning_rate=1e-3, weight_decay=1e-4)
    trainable = [layer for layer in net.layers if layer.trainable]
    optimizers = [layer.optimizer for layer in trainable]
    assert len({id(o) for o in optimizers}) == len(optimizers)   # one copy per layer
    for optimizer in optimizers:
        assert isinstance(optimizer, Adam)
        assert (optimizer.learning_rate, optimizer.mu, optimizer.rho) == (1e-3, 0.9, 0.999)
        assert isinstance(optimizer.regularizer, L2_Regularizer)
        assert optimizer.regularizer.alpha == 1e-4
    default = lenet.build().layers[0].optimizer
    assert (default.learning_rate, default.regularizer.alpha) == (5e-4, 4e-4)
    for weight_decay in (0, 0.0, None):
        assert lenet.build(weight_decay=weight_decay).layers[0].optimizer.regularizer is None
    with pytest.raises(ValueError, match="weight_decay"):
        lenet.build(weight_decay=-1e-3)


def test_he_weights_and_constant_biases():
    np.random.seed(3)
    net = lenet.build(batch_norm=True)
    first_dense = next(layer for layer in net.layers if isinstance(layer, FullyConnected))
    weights = xpnn.to_numpy(first_dense.weights)
    # 94080 normal draws: the sample std is within 1 % of sigma with overwhelming probability
    assert abs(np.std(weights[:784, :]) / math.sqrt(2 / 784) - 1) < 0.02
    np.testing.assert_array_equal(weights[784, :], 0.1)
    second_conv = [layer for layer in net.layers if isinstance(layer, Conv)][1]
    assert abs(np.std(xpnn.to_numpy(second_conv.weights)) / math.sqrt(2 / 150) - 1) < 0.1
    np.testing.assert_array_equal(xpnn.to_numpy(second_conv.bias), 0.1)
    for norm in (layer for layer in net.layers if isinstance(layer, BatchNormalization)):
        np.testing.assert_array_equal(xpnn.to_numpy(norm.weights), 1.0)
        np.testing.assert_array_equal(xpnn.to_numpy(norm.bias), 0.0)


# -- every backend ----------------------------------------------------------------------------

@pytest.mark.parametrize("batch_norm, dropout, expected", OPTIONS, ids=OPTION_IDS)
def test_output_is_a_probability_per_sample(backend, batch_norm, dropout, expected):
    net = lenet.build(batch_norm=batch_norm, dropout=dropout)
    assert all(layer.backend is backend for layer in net.layers)
    output = net.test(_random_batch(3)[0])
    assert backend.owns(output)
    host = xpnn.to_numpy(output)
    assert host.shape == (3, 10) and host.dtype == np.float64
    assert np.all(host >= 0)
    np.testing.assert_allclose(host.sum(axis=1), 1.0, rtol=1e-12)


def test_float32_output_is_a_probability_per_sample(backend32):
    net = lenet.build(batch_norm=True, dropout=True, batch_norm_eps=1e-5)
    host = xpnn.to_numpy(net.test(_random_batch(3, np.float32)[0]))
    assert host.shape == (3, 10) and host.dtype == np.float32
    np.testing.assert_allclose(host.sum(axis=1), 1.0, rtol=1e-5)


def _train_a_few_steps(eps, dtype):
    images, labels = _random_batch(4, dtype)
    net = lenet.build(batch_norm=True, dropout=True, batch_norm_eps=eps)
    net.data_layer = ArrayData(images, labels, batch_size=2)
    net.train(3)
    losses = [float(xpnn.to_numpy(value)) for value in net.loss]
    assert len(losses) == 3 and all(math.isfinite(value) and value > 0 for value in losses)
    host = xpnn.to_numpy(net.test(images))
    assert host.dtype == dtype and np.all(np.isfinite(host))


def test_training_steps_float64(backend):
    _train_a_few_steps(1e-10, np.float64)


def test_training_steps_float32(backend32):
    _train_a_few_steps(1e-5, np.float32)


def test_testing_phase_does_not_depend_on_position_in_batch(backend):
    images, labels = _random_batch(5, seed=1)
    net = lenet.build(batch_norm=True, dropout=True)
    net.data_layer = ArrayData(images, labels, batch_size=5)
    net.train(1)   # running statistics exist after a step
    together = xpnn.to_numpy(net.test(images))
    alone = xpnn.to_numpy(net.test(images[3:4]))
    reversed_order = xpnn.to_numpy(net.test(images[::-1]))
    np.testing.assert_allclose(alone, together[3:4], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(reversed_order, together[::-1], rtol=1e-10, atol=1e-14)


# -- smoke test on real data ------------------------------------------------------------------

def _read_idx(name, header_bytes):
    """An IDX file read by hand (gzip + frombuffer), independently of xpnn.datasets."""
    with gzip.open(os.path.join(FASHION_MNIST, name)) as stream:
        return np.frombuffer(stream.read(), dtype=np.uint8, offset=header_bytes)


def _fashion_mnist(train_count, test_count):
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    missing = [n for n in names if not os.path.exists(os.path.join(FASHION_MNIST, n))]
    if missing:
        pytest.skip(f"Fashion-MNIST not found in {FASHION_MNIST} (missing {', '.join(missing)}; "
                    "install Debian's dataset-fashion-mnist package)")
    train_images = _read_idx(names[0], 16).reshape(-1, 1, 28, 28)[:train_count]
    train_labels = _read_idx(names[1], 8)[:train_count]
    test_images = _read_idx(names[2], 16).reshape(-1, 1, 28, 28)[:test_count]
    test_labels = _read_idx(names[3], 8)[:test_count]
    scale = np.float32(1 / 255)
    return (train_images * scale, np.eye(10, dtype=np.float32)[train_labels],
            test_images * scale, test_labels)


@pytest.mark.slow
@pytest.mark.parametrize("batch_norm, dropout", [(False, False), (True, True)],
                         ids=["plain", "batch_norm+dropout"])
def test_fashion_mnist_smoke(batch_norm, dropout):
    train_images, train_labels, test_images, test_labels = _fashion_mnist(6400, 1000)
    with xpnn.use_backend("cpu", dtype="float32"):
        np.random.seed(0)
        net = lenet.build(batch_norm=batch_norm, dropout=dropout, batch_norm_eps=1e-5)
        net.data_layer = ArrayData(train_images, train_labels, batch_size=32)
        net.train(200)
        prediction = xpnn.to_numpy(net.test(test_images))
    accuracy = np.mean(np.argmax(prediction, axis=1) == test_labels)
    # chance is 10 %; this reaches about 75 % after 200 steps of 32
    assert accuracy >= 0.6, f"test accuracy {accuracy:.3f} after 200 steps"
    assert float(np.mean(net.loss[-20:])) < float(np.mean(net.loss[:20]))


# -- wrong input --------------------------------------------------------------------------------

@pytest.mark.parametrize("step", ["train", "test"])
def test_images_of_another_size_name_the_layer_and_the_networks_input(backend, step):
    """32x32 images: it read only "FullyConnected: expected input of shape (batch, 784), received
    (3, 1024)", not which layer of the network nor what the network was given."""
    images = np.random.default_rng(0).random((3, 1, 32, 32))
    net = lenet.build(batch_norm=True)
    net.data_layer = ArrayData(images, np.eye(10)[[0, 1, 2]], batch_size=3)
    with pytest.raises(ValueError) as info:
        net.train(1) if step == "train" else net.test(images)
    assert str(info.value) == (
        "FullyConnected: expected input of shape (batch, 784), received (3, 1024); raised in "
        "net.layers[9] (FullyConnected) of a network of 17 layers given input of shape (3, 1, 32, 32)")


@pytest.mark.parametrize("step", ["train", "test"])
def test_images_without_the_channel_axis_hint_at_it(backend, step):
    images, labels = _random_batch(3)
    net = lenet.build()
    net.data_layer = ArrayData(images[:, 0], labels, batch_size=3)
    with pytest.raises(ValueError) as info:
        net.train(1) if step == "train" else net.test(images[:, 0])
    message = str(info.value)
    assert message.startswith("Conv: expected input of shape (batch, 1, y, x) for convolution_shape "
                              "(1, 5, 5), got (3, 28, 28); the input has one axis fewer than "
                              "expected: is the channel axis missing? Add it with x[:, None]; ")
    assert message.endswith("; raised in net.layers[0] (Conv) of a network of 13 layers given input "
                            "of shape (3, 28, 28)")
