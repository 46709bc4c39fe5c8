"""A ReLU right before max pooling runs after it (xpnn.network.run_order).

The swap may change the time only: the same bits as the layers in the order
they were appended, training and testing, on every backend; a
NaN in a pooling window gives NaN in either order (checked here too).
"""
import copy

import numpy as np
import pytest

import xpnn
from xpnn import NeuralNetwork
from xpnn.initializers import Constant, He
from xpnn.layers import (BatchNormalization, Conv, Dropout, Flatten, FullyConnected, Pooling, ReLU,
                         SoftMax, TanH)
from xpnn.losses import CrossEntropyLoss
from xpnn.models import lenet
from xpnn.network import load, run_order, save
from xpnn.optimizers import Adam
from xpnn.regularizers import L2_Regularizer
from conftest import CyclingBatches

BATCH = 64


class MyReLU(ReLU):
    """A user's ReLU: it may do anything, so it keeps its place."""


def _names(layers):
    return [type(layer).__name__ for layer in layers]


def test_run_order_moves_the_library_relu_after_max_pooling_only():
    relu, pool, tanh, mine = ReLU(), Pooling(2, 2), TanH(), MyReLU()
    written = [relu, pool, tanh, Pooling(2, 2), mine, Pooling(2, 2), ReLU(), Pooling(2, 2),
               Pooling(2, 2), Flatten(), ReLU()]
    order = run_order(written)
    assert _names(order) == ["Pooling", "ReLU", "TanH", "Pooling", "MyReLU", "Pooling", "Pooling",
                             "Pooling", "ReLU", "Flatten", "ReLU"]
    assert order[0] is pool and order[1] is relu
    assert written[0] is relu  # the network's own list is left as appended
    assert _names(run_order(lenet.build().layers)) == [
        "Conv", "Pooling", "ReLU", "Conv", "Pooling", "ReLU", "Flatten", "FullyConnected", "ReLU",
        "FullyConnected", "ReLU", "FullyConnected", "SoftMax"]


def _net(images):
    """Convolutions whose windows tie (zero borders, a bias of 0 and one below 0), batch norm,
    dropout and Adam with L2: every case where the two orders could part."""
    net = NeuralNetwork(Adam(1e-3, 0.9, 0.999), He(), Constant(0.1))
    net.optimizer.add_regularizer(L2_Regularizer(1e-3))
    for layer in (Conv((1, 1), (1, 3, 3), 3), ReLU(), Pooling((2, 2), (2, 2)),
                  Conv((1, 1), (3, 3, 3), 4), BatchNormalization(4), ReLU(), Pooling((1, 1), (2, 2)),
                  Flatten(), FullyConnected(4 * 3 * 3, 10), ReLU(), Dropout(0.7),
                  FullyConnected(10, 4), SoftMax()):
        net.append_layer(layer)
    first = net.layers[0]
    first.bias = xpnn.to_numpy(first.bias) * np.array([1.0, 0.0, -1.0])  # ties at > 0, at 0, below 0
    net.loss_layer = CrossEntropyLoss()
    labels = np.eye(4)[np.random.default_rng(1).integers(0, 4, len(images))]
    net.data_layer = CyclingBatches(images, labels, BATCH)
    return net


def _images(count=2 * BATCH):
    images = np.random.default_rng(0).standard_normal((count, 1, 8, 8))
    images[:, :, :3, :] = 0.0  # equal values in many pooling windows
    return images


def _trained(net, pool_before_relu, steps=3):
    net.pool_before_relu = pool_before_relu
    xpnn.seed(7)
    net.train(steps)
    return net


def _host(array):
    return xpnn.to_numpy(array)


def test_pooling_first_trains_and_tests_to_the_same_bits(backend):
    images = _images()
    written = _net(images)
    swapped = _trained(copy.deepcopy(written), True)
    _trained(written, False)
    assert [float(value) for value in swapped.loss] == [float(value) for value in written.loss]
    for mine, theirs in zip(swapped.layers, written.layers):
        for name in ("weights", "bias", "running_mean", "running_variance"):
            if getattr(theirs, name, None) is not None:
                np.testing.assert_array_equal(_host(getattr(mine, name)), _host(getattr(theirs, name)),
                                              err_msg=f"{mine.name}.{name}")
    np.testing.assert_array_equal(_host(swapped.test(images[:9])), _host(written.test(images[:9])))


def test_the_network_runs_relu_after_pooling_unless_told_not_to(backend):
    net = _net(_images())
    net.data_layer.batch_size = 4
    net.train(1)
    assert tuple(net.layers[1]._saved.shape) == (4, 3, 4, 4)  # the pooled values, not (4, 3, 8, 8)
    net.pool_before_relu = False
    net.train(1)
    assert tuple(net.layers[1]._saved.shape) == (4, 3, 8, 8)


def test_a_nan_in_a_pooling_window_gives_nan_in_both_orders(backend):
    net = NeuralNetwork(Adam(1e-3, 0.9, 0.999), He(), Constant(0.1))
    for layer in (ReLU(), Pooling((2, 2), (2, 2))):
        net.append_layer(layer)
    window = np.array([[[[np.nan, 5.0], [1.0, -2.0]], [[-1.0, -3.0], [-0.5, -2.0]]]])
    for pool_before_relu in (True, False):
        net.pool_before_relu = pool_before_relu
        output = _host(net.test(window))
        # ReLU(max) = ReLU(NaN) = NaN; max(ReLU) = max(NaN, 5, 1, +0) = NaN (NaN is never hidden).
        assert np.isnan(output[0, 0, 0, 0]), pool_before_relu
        assert output[0, 1, 0, 0] == 0.0 and not np.signbit(output[0, 1, 0, 0]), pool_before_relu


def test_a_pickled_network_keeps_the_setting_and_older_pickles_get_the_default(tmp_path):
    net = lenet.build()
    net.pool_before_relu = False
    save(str(tmp_path / "net.pkl"), net)
    assert load(str(tmp_path / "net.pkl"), None).pool_before_relu is False
    state = net.__getstate__()
    del state["pool_before_relu"]  # as pickled before the setting existed
    older = NeuralNetwork.__new__(NeuralNetwork)
    older.__setstate__(state)
    assert older.pool_before_relu is True


class MyPooling(Pooling):
    """A user's pooling: it may do anything (average, say), so a ReLU before it keeps its place."""


def test_run_order_keeps_a_relu_before_a_pooling_of_ones_own():
    relu, mine, pool = ReLU(), MyPooling(2, 2), Pooling(2, 2)
    order = run_order([relu, mine, ReLU(), pool])
    assert _names(order) == ["ReLU", "MyPooling", "Pooling", "ReLU"]
    assert order[0] is relu and order[1] is mine and order[2] is pool
