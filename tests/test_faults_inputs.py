"""Inputs a network cannot learn from show, on every backend: NaN and inf pixels reach the
loss and the prediction (ReLU keeps NaN); an empty batch and a one-sample batch through batch
normalization are clear errors raised before any layer's state changes."""
import re

import numpy as np
import pytest

import xpnn
from xpnn.layers import BatchNormalization, ReLU
from xpnn.models import lenet

pytestmark = pytest.mark.faults
#: NaN and inf in matrix products and sums warn (on NumPy); what these tests check is that they show.
non_finite_warnings = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _batch(size=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((size, 1, 28, 28)), np.eye(10)[rng.integers(0, 10, size)]


def _lenet():
    xpnn.seed(4)
    return lenet.build(batch_norm=True, dropout=True, batch_norm_eps=1e-5)


def _state(net):
    """Every layer's parameters and running statistics and every optimizer's state, as NumPy."""
    from xpnn import checkpoint as ckpt

    return ckpt.network_arrays(net)


def _assert_same_state(before, after):
    assert sorted(before) == sorted(after)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


# -- NaN and inf pixels -----------------------------------------------------------------

@non_finite_warnings
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_non_finite_pixel_in_training_gives_a_non_finite_loss(backend, value):
    # One bad pixel in one sample of the batch: the step's loss says so (it was finite before:
    # ReLU sent NaN to +0, and the parameters turned NaN unseen).
    net = _lenet()
    images, labels = _batch()
    net.train_batch(images, labels)  # (a good step first: running statistics exist)
    images[3, 0, 10, 12] = value
    loss, prediction = net.train_batch(images, labels)
    assert not np.isfinite(float(xpnn.to_numpy(loss)))
    assert not np.all(np.isfinite(xpnn.to_numpy(prediction)))


@non_finite_warnings
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_non_finite_pixel_in_test_shows_in_its_own_row_only(backend, value):
    net = _lenet()
    images, labels = _batch()
    net.train_batch(images, labels)
    clean = xpnn.to_numpy(net.test(images))
    assert np.all(np.isfinite(clean))
    images[5, 0, 3, 20] = value
    predicted = xpnn.to_numpy(net.test(images))
    assert np.all(np.isnan(predicted[5])), predicted[5]
    rows = [row for row in range(len(images)) if row != 5]
    np.testing.assert_allclose(predicted[rows], clean[rows], rtol=1e-10, atol=1e-14)


def test_relu_keeps_nan_and_sends_the_rest_below_or_at_zero_to_plus_zero(backend):
    layer = ReLU()
    x = np.array([[np.nan, -np.inf, -1.0, -0.0, 0.0, 2.0, np.inf]])
    output = xpnn.to_numpy(layer.forward(backend.asarray(x)))
    assert np.isnan(output[0, 0])
    np.testing.assert_array_equal(output[0, 1:], [0.0, 0.0, 0.0, 0.0, 2.0, np.inf])
    assert not np.any(np.signbit(output[0, 1:5]))
    # Backward passes the error where the input was positive or NaN (as PyTorch's ReLU).
    error = xpnn.to_numpy(layer.backward(backend.asarray(np.arange(1.0, 8.0)[None, :])))
    np.testing.assert_array_equal(error, [[1.0, 0.0, 0.0, 0.0, 0.0, 6.0, 7.0]])


# -- batches that cannot be trained on ----------------------------------------------------

def _trained_lenet():
    net = _lenet()
    net.train_batch(*_batch())  # running statistics and optimizer moments exist
    return net


def test_an_empty_training_batch_is_refused_naming_the_input_shape(backend):
    net = _trained_lenet()
    before = _state(net)
    images, labels = _batch()
    with pytest.raises(ValueError) as info:
        net.train_batch(images[:0], labels[:0])
    message = str(info.value)
    assert "NeuralNetwork.train_batch: the batch is empty (input of shape (0, 1, 28, 28))" in message
    assert "(batch, 1, y, x) (Conv)" in message, message
    _assert_same_state(before, _state(net))
    # Through train() (the course loop) too: its data layer gave the empty batch.
    net.data_layer = type("Empty", (), {"next": lambda self: (images[:0], labels[:0])})()
    with pytest.raises(ValueError, match=r"NeuralNetwork\.forward: the batch is empty"):
        net.train(1)
    _assert_same_state(before, _state(net))
    assert net.loss == []


def test_an_empty_test_batch_is_refused_naming_the_input_shape(backend):
    net = _trained_lenet()
    with pytest.raises(ValueError, match=r"NeuralNetwork\.test: the batch is empty \(input of "
                                         r"shape \(0, 1, 28, 28\)\).*\(batch, 1, y, x\) \(Conv\)"):
        net.test(_batch()[0][:0])


def test_one_sample_through_batch_norm_in_training_is_refused_before_any_state_changes(backend):
    net = _trained_lenet()
    before = _state(net)
    images, labels = _batch()
    with pytest.raises(ValueError) as info:
        net.train_batch(images[:1], labels[:1])
    message = str(info.value)
    # LeNet's first two batch norms see 28x28 and 14x14 values per channel and run; the third
    # (after the first fully connected layer) sees one: refused, and the first two's running
    # statistics are put back.
    assert message.startswith("BatchNormalization: batch statistics need at least 2 values per "
                              "channel in training, got input of shape (1, 120) (1 per channel)"), message
    assert "raised in net.layers[10] (BatchNormalization)" in message, message
    _assert_same_state(before, _state(net))
    # One sample in testing phase is fine: the running statistics are used.
    assert xpnn.to_numpy(net.test(images[:1])).shape == (1, 10)


@pytest.mark.parametrize("shape, values", [((1, 3), 1), ((0, 3), 0), ((1, 3, 1, 1), 1)])
def test_batch_norm_alone_refuses_fewer_than_two_values_per_channel(backend, shape, values):
    layer = BatchNormalization(3)
    with pytest.raises(ValueError, match=re.escape(f"got input of shape {shape} ({values} per channel)")):
        layer.forward(backend.asarray(np.ones(shape)))
    assert layer.running_mean is None
    # Two values per channel are enough (one sample of a 1 x 2 image, or two samples).
    layer.forward(backend.asarray(np.arange(6.0).reshape(1, 3, 1, 2)))
    layer.forward(backend.asarray(np.arange(6.0).reshape(2, 3)))
