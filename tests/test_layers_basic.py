"""FullyConnected, ReLU, TanH, Sigmoid, SoftMax and Flatten on every backend.

References are computed independently: NumPy by hand for forward values,
central differences (xpnn.testing) and torch.autograd for gradients.
"""
import re
import warnings

import numpy as np
import pytest

import xpnn
from xpnn.initializers import Constant
from xpnn.layers import Flatten, FullyConnected, ReLU, Sigmoid, SoftMax, TanH
from xpnn.optimizers import Sgd
from xpnn.testing import L2Loss, gradient_check, gradient_check_weights
from conftest import assert_close

ACTIVATIONS = [ReLU, TanH, Sigmoid, SoftMax]


def _inputs(shape, seed=1):
    """Normal inputs kept away from 0 (ReLU's kink) by at least 0.1."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape)
    return np.where(values >= 0, values + 0.1, values - 0.1)


def assert_relative(actual, expected, bound):
    """max |actual - expected| <= bound * max |expected| (relative to the array's scale)."""
    actual = xpnn.to_numpy(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape
    assert np.max(np.abs(actual - expected)) <= bound * np.max(np.abs(expected))


class RecordingInitializer:
    """Returns a fixed host array and records the arguments it was called with."""

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float64)
        self.calls = []

    def initialize(self, weights_shape, fan_in, fan_out):
        self.calls.append((tuple(weights_shape), fan_in, fan_out))
        return self.values.reshape(weights_shape)


# -- FullyConnected -------------------------------------------------------------

def test_fully_connected_forward_matches_numpy(backend):
    input_tensor = _inputs((5, 4))
    layer = FullyConnected(4, 3)
    weights = np.random.default_rng(2).standard_normal((5, 3))
    layer.weights = weights
    output = layer.forward(input_tensor)
    assert backend.owns(output)
    assert_close(output, input_tensor @ weights[:4] + weights[4], rtol=1e-12)


def test_fully_connected_default_weights_are_uniform_from_np_random(backend):
    np.random.seed(11)
    layer = FullyConnected(6, 5)
    np.random.seed(11)
    expected = np.random.uniform(0.0, 1.0, (7, 5))   # course convention: bias row last
    assert backend.owns(layer.weights)
    assert_close(layer.weights, expected, rtol=0)


def test_fully_connected_initialize_calls_and_layout(backend):
    weights_init = RecordingInitializer(np.arange(12.0))
    bias_init = RecordingInitializer([-1.0, -2.0, -3.0])
    layer = FullyConnected(4, 3)
    layer.initialize(weights_init, bias_init)
    assert weights_init.calls == [((4, 3), 4, 3)]
    assert bias_init.calls == [((1, 3), 1, 3)]
    expected = np.vstack([np.arange(12.0).reshape(4, 3), [[-1.0, -2.0, -3.0]]])
    assert_close(layer.weights, expected, rtol=0)
    assert_close(layer.bias, [-1.0, -2.0, -3.0], rtol=0)


def test_fully_connected_bias_is_last_row_and_setting_it_copies(backend):
    layer = FullyConnected(2, 3)
    shared = backend.asarray(np.arange(9.0).reshape(3, 3))
    layer.weights = shared
    assert_close(layer.bias, [6.0, 7.0, 8.0], rtol=0)
    layer.bias = np.array([10.0, 11.0, 12.0])
    assert_close(layer.weights, [[0, 1, 2], [3, 4, 5], [10, 11, 12]], rtol=0)
    # the array the weights were set from is not modified in place
    assert_close(shared, np.arange(9.0).reshape(3, 3), rtol=0)
    assert backend.owns(layer.weights) and backend.owns(layer.bias)


def test_fully_connected_backward_matches_numpy(backend):
    input_tensor = _inputs((5, 4))
    error_tensor = _inputs((5, 3), seed=3)
    weights = np.random.default_rng(2).standard_normal((5, 3))
    layer = FullyConnected(4, 3)
    layer.weights = weights
    layer.forward(input_tensor)
    input_error = layer.backward(error_tensor)
    augmented = np.hstack([input_tensor, np.ones((5, 1))])
    assert_close(input_error, error_tensor @ weights[:4].T, rtol=1e-12)
    assert_close(layer.gradient_weights, augmented.T @ error_tensor, rtol=1e-12)
    assert_close(layer.gradient_bias, error_tensor.sum(axis=0), rtol=1e-12)
    assert tuple(layer.gradient_weights.shape) == tuple(layer.weights.shape)


def test_fully_connected_optimizer_updates_weights_once(backend):
    """The bias row lives in the weights: one Sgd step moves it once, not twice."""
    input_tensor = _inputs((4, 3))
    error_tensor = _inputs((4, 2), seed=4)
    layer = FullyConnected(3, 2)
    layer.initialize(Constant(0.5), Constant(0.1))
    layer.optimizer = Sgd(0.25)
    layer.forward(input_tensor)
    input_error = layer.backward(error_tensor)
    augmented = np.hstack([input_tensor, np.ones((4, 1))])
    before = np.vstack([np.full((3, 2), 0.5), np.full((1, 2), 0.1)])
    assert_close(layer.weights, before - 0.25 * augmented.T @ error_tensor, rtol=1e-12)
    # the input error uses the weights of the forward pass (before the step)
    assert_close(input_error, error_tensor @ before[:3].T, rtol=1e-12)


def test_fully_connected_gradient_checks(backend):
    input_tensor = _inputs((6, 5))
    label_tensor = np.random.default_rng(5).random((6, 3))
    layer = FullyConnected(5, 3)
    layers = [layer, L2Loss()]
    assert np.max(gradient_check(layers, input_tensor, label_tensor)) < 1e-7
    assert np.max(gradient_check_weights(layers, input_tensor, label_tensor)) < 1e-7
    assert np.max(gradient_check_weights(layers, input_tensor, label_tensor, bias=True)) < 1e-7


def test_fully_connected_wrong_width_names_layer_and_shapes(backend):
    layer = FullyConnected(4, 3)
    with pytest.raises(ValueError) as info:
        layer.forward(np.ones((2, 5)))
    message = str(info.value)
    assert "FullyConnected" in message and "(batch, 4)" in message and "(2, 5)" in message
    with pytest.raises(ValueError, match="FullyConnected"):
        layer.forward(np.ones(4))


def test_fully_connected_wrong_error_and_weight_shapes(backend):
    layer = FullyConnected(4, 3)
    layer.forward(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"FullyConnected.*\(2, 3\).*\(2, 4\)"):
        layer.backward(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"FullyConnected.*\(5, 3\).*\(4, 3\)"):
        layer.weights = np.ones((4, 3))


@pytest.mark.parametrize("sizes", [(0, 3), (3, -1), (2.5, 3), (None, 3), ("4", 3), (True, 3)])
def test_fully_connected_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match="FullyConnected"):
        FullyConnected(*sizes)


# -- activations ------------------------------------------------------------------

def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x):
    exponentials = np.exp(x - x.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


NUMPY_FORWARD = {ReLU: lambda x: np.maximum(x, 0.0), TanH: np.tanh,
                 Sigmoid: _sigmoid, SoftMax: _softmax}


@pytest.mark.parametrize("layer_class", ACTIVATIONS)
def test_activation_forward_matches_numpy(backend, layer_class):
    input_tensor = _inputs((4, 6)) * 3.0
    untouched = input_tensor.copy()
    output = layer_class().forward(input_tensor)
    assert backend.owns(output)
    assert_close(output, NUMPY_FORWARD[layer_class](input_tensor), rtol=1e-12)
    np.testing.assert_array_equal(input_tensor, untouched)


@pytest.mark.parametrize("layer_class", ACTIVATIONS)
def test_activation_gradient_check(backend, layer_class):
    input_tensor = _inputs((4, 5))
    label_tensor = np.random.default_rng(7).random((4, 5))
    difference = gradient_check([layer_class(), L2Loss()], input_tensor, label_tensor)
    assert np.max(difference) < 1e-6


@pytest.mark.parametrize("layer_class", ACTIVATIONS)
def test_activation_backward_shape_checks(backend, layer_class):
    layer = layer_class()
    with pytest.raises(RuntimeError, match=layer_class.__name__):
        layer.backward(np.ones((2, 3)))
    layer.forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match=rf"{layer_class.__name__}.*\(2, 3\).*\(3, 2\)"):
        layer.backward(np.ones((3, 2)))


def test_relu_backward_is_error_where_input_positive(backend):
    input_tensor = np.array([[-2.0, 0.0, 3.0], [1e-300, -1e-300, 5.0]])
    error_tensor = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    layer = ReLU()
    layer.forward(input_tensor)
    assert_close(layer.backward(error_tensor), [[0.0, 0.0, 3.0], [4.0, 0.0, 6.0]], rtol=0)


def test_sigmoid_is_stable_for_extreme_inputs(backend):
    input_tensor = np.array([[-800.0, -40.0, 0.0, 40.0, 800.0]])
    output = xpnn.to_numpy(Sigmoid().forward(input_tensor))
    assert np.all(np.isfinite(output))
    # 1/(1+e^40) ~ e^-40: full relative precision, not 0 from 1 - (1 - tiny)
    np.testing.assert_allclose(output, [[0.0, np.exp(-40.0) / (1 + np.exp(-40.0)), 0.5,
                                         1.0 / (1.0 + np.exp(-40.0)), 1.0]], rtol=1e-14)


def test_softmax_is_stable_and_rows_sum_to_one(backend):
    input_tensor = np.array([[1000.0, 1001.0, 1002.0], [-1000.0, -1000.0, -1000.0]])
    output = xpnn.to_numpy(SoftMax().forward(input_tensor))
    np.testing.assert_allclose(output[0], _softmax(np.array([[0.0, 1.0, 2.0]]))[0], rtol=1e-14)
    np.testing.assert_allclose(output[1], [1 / 3] * 3, rtol=1e-14)
    np.testing.assert_allclose(output.sum(axis=1), 1.0, rtol=1e-15)


def test_softmax_backward_matches_jacobian(backend):
    """y * (e - sum(e * y)) equals e @ J with J = diag(y) - y y^T, row by row."""
    input_tensor = _inputs((3, 4))
    error_tensor = _inputs((3, 4), seed=9)
    layer = SoftMax()
    layer.forward(input_tensor)
    output = _softmax(input_tensor)
    expected = np.stack([error_tensor[i] @ (np.diag(output[i]) - np.outer(output[i], output[i]))
                         for i in range(3)])
    assert_close(layer.backward(error_tensor), expected, rtol=1e-12)


def test_softmax_rejects_non_matrix(backend):
    with pytest.raises(ValueError, match=r"SoftMax.*\(batch, classes\).*\(2, 3, 4\)"):
        SoftMax().forward(np.ones((2, 3, 4)))


# -- Flatten ----------------------------------------------------------------------------

def test_flatten_forward_backward(backend):
    input_tensor = _inputs((3, 2, 4, 5))
    layer = Flatten()
    output = layer.forward(input_tensor)
    assert backend.owns(output)
    assert_close(output, input_tensor.reshape(3, 40), rtol=0)
    error_tensor = _inputs((3, 40), seed=2)
    assert_close(layer.backward(error_tensor), error_tensor.reshape(3, 2, 4, 5), rtol=0)
    assert np.max(gradient_check([Flatten(), L2Loss()], _inputs((2, 3, 2)),
                                 np.random.default_rng(3).random((2, 6)))) < 1e-7


def test_flatten_wrong_error_shape(backend):
    layer = Flatten()
    layer.forward(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"Flatten.*\(2, 12\).*\(2, 11\)"):
        layer.backward(np.ones((2, 11)))


# -- dtype: float32 stays float32 (strict's float32-only device catches a float64) ------

def test_layers_keep_float32(backend32):
    from xpnn.losses import CrossEntropyLoss

    layers = [Flatten(), FullyConnected(6, 5), ReLU(), TanH(), Sigmoid(), FullyConnected(5, 3),
              SoftMax()]
    layers[1].optimizer = Sgd(0.1)
    activation = _inputs((4, 2, 3))
    for layer in layers:
        activation = layer.forward(activation)
        assert activation.dtype == backend32.dtype
    loss_layer = CrossEntropyLoss()
    labels = np.eye(3)[[0, 1, 2, 1]]
    assert loss_layer.forward(activation, labels).dtype == backend32.dtype
    error_tensor = loss_layer.backward(labels)
    for layer in reversed(layers):
        error_tensor = layer.backward(error_tensor)
        assert error_tensor.dtype == backend32.dtype
    assert layers[1].weights.dtype == backend32.dtype


# -- against torch.autograd -------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch", reason="PyTorch is the autograd reference (pip install torch)")


TORCH_FUNCTIONS = {ReLU: "relu", TanH: "tanh", Sigmoid: "sigmoid", SoftMax: "softmax"}


@pytest.mark.parametrize("layer_class", ACTIVATIONS)
def test_activation_matches_torch_autograd(backend, layer_class):
    torch = _torch()
    input_tensor = _inputs((5, 7)) * 2.0
    error_tensor = _inputs((5, 7), seed=8)
    reference_input = torch.tensor(input_tensor, dtype=torch.float64, requires_grad=True)
    if layer_class is SoftMax:
        reference_output = torch.softmax(reference_input, dim=1)
    else:
        reference_output = getattr(torch, TORCH_FUNCTIONS[layer_class])(reference_input)
    reference_output.backward(torch.tensor(error_tensor, dtype=torch.float64))
    layer = layer_class()
    assert_relative(layer.forward(input_tensor), reference_output.detach().numpy(), 1e-10)
    assert_relative(layer.backward(error_tensor), reference_input.grad.numpy(), 1e-10)


def test_fully_connected_matches_torch_autograd(backend):
    torch = _torch()
    input_tensor = _inputs((6, 4))
    error_tensor = _inputs((6, 3), seed=8)
    weights = np.random.default_rng(2).standard_normal((5, 3))
    reference_input = torch.tensor(input_tensor, requires_grad=True)
    reference_matrix = torch.tensor(weights[:4], requires_grad=True)
    reference_bias = torch.tensor(weights[4], requires_grad=True)
    reference_output = torch.nn.functional.linear(reference_input, reference_matrix.T, reference_bias)
    reference_output.backward(torch.tensor(error_tensor))
    layer = FullyConnected(4, 3)
    layer.weights = weights
    assert_relative(layer.forward(input_tensor), reference_output.detach().numpy(), 1e-10)
    assert_relative(layer.backward(error_tensor), reference_input.grad.numpy(), 1e-10)
    assert_relative(layer.gradient_weights[:4, :], reference_matrix.grad.numpy(), 1e-10)
    assert_relative(layer.gradient_bias, reference_bias.grad.numpy(), 1e-10)


@pytest.mark.parametrize("shape", [(3, 1), (2,), (4,)])
def test_fully_connected_bias_of_another_shape_is_refused(backend, shape):
    # (3, 1) has the bias row's size: reshaped, it would be taken without a word.
    layer = FullyConnected(4, 3)
    before = xpnn.to_numpy(layer.weights).copy()
    with pytest.raises(ValueError, match=rf"FullyConnected: bias must have shape \(3,\), "
                                         rf"received {re.escape(str(shape))}"):
        layer.bias = np.ones(shape)
    np.testing.assert_array_equal(xpnn.to_numpy(layer.weights), before)


def test_sigmoid_keeps_the_subnormal_tail_and_warns_of_no_overflow(backend):
    # Below x = -709 exp(-x) overflows: 1 / (1 + exp(-x)) would give 0 (and NumPy an overflow
    # warning), but sigmoid(x) = e^x / (1 + e^x) ~ e^x is still a (subnormal) double there.
    input_tensor = np.array([[-720.0, -740.0, 720.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output = xpnn.to_numpy(Sigmoid().forward(input_tensor))
    tail = np.exp(input_tensor[0, :2])
    assert np.all(tail > 0.0)
    np.testing.assert_allclose(output[0, :2], tail / (1.0 + tail), rtol=1e-3)
    assert output[0, 2] == 1.0


def test_flatten_refuses_a_0d_input(backend):
    with pytest.raises(ValueError, match=r"Flatten: expected input of shape \(batch, \.\.\.\), "
                                         r"received \(\)"):
        Flatten().forward(backend.asarray(np.array(1.0)))


def test_flatten_restores_the_state_of_a_layer_pickled_with_a_plain_input_shape(backend):
    # Layers pickled before input_shape became a read-only property hold it as a plain
    # attribute; unpickling them must give a layer whose backward still works.
    layer = Flatten()
    layer.forward(np.ones((2, 3, 4)))
    state = dict(vars(layer))
    state["input_shape"] = state.pop("_input_shape")
    restored = Flatten.__new__(Flatten)
    restored.__setstate__(state)
    assert restored.input_shape == (2, 3, 4)
    error_tensor = _inputs((2, 12), seed=3)
    assert_close(restored.backward(error_tensor), error_tensor.reshape(2, 3, 4), rtol=0)


def test_to_another_dtype_moves_the_forward_caches_too():
    # The augmented input kept for the weight gradient is no listed state: it must still
    # take the new dtype, or the next backward computes in the old one.
    with xpnn.use_backend("cpu", dtype="float64"):
        layer = FullyConnected(4, 3)
        layer.forward(_inputs((2, 4)))
    layer.to("cpu", dtype="float32")
    error_tensor = np.ones((2, 3), dtype=np.float32)
    input_error = layer.backward(error_tensor)
    assert layer.gradient_weights.dtype == np.float32 and input_error.dtype == np.float32
    augmented = np.hstack([_inputs((2, 4)), np.ones((2, 1))])
    np.testing.assert_allclose(xpnn.to_numpy(layer.gradient_weights), augmented.T @ error_tensor,
                               rtol=1e-6)
