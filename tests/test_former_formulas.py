"""Paths rewritten in fewer array operations give what the former ones gave, to rounding.

Each former formula is kept here, as it read before the rewrite, as the
reference: Adam's step (16 operations a parameter, 19 with an L2 decay; now
12 and 14), FullyConnected's testing-phase forward (a column of ones
concatenated; now the bias row added), the L2 norm's sum of squares (a
product and its sum; now one inner product) and batch normalization (its
statistics in four calls, now two; its input gradient in eleven, now ten).
Every backend runs both on the same inputs (float64; Adam in float32 too,
strict's float32-only device included).
"""
import math

import numpy as np
import pytest

import xpnn
from xpnn.ops import Ops
from conftest import assert_close

RTOL = {"float64": 1e-12, "float32": 2e-6}


def _random(backend, shape, seed, scale=1.0):
    values = np.random.default_rng(seed).standard_normal(shape) * scale
    return backend.asarray(values, dtype=backend.dtype)


# -- Adam ------------------------------------------------------------------------------------

def former_adam_update(xp, weights, gradient, moments, mu, rho, step_size, inverse_root_correction,
                       epsilon, learning_rate=0.0, decay=0.0):
    """xpnn.ops.adam.adam_update before it was cut to 12 operations (19 with the decay)."""
    first, second, scratch = moments
    scratch[...] = gradient
    scratch *= 1.0 - mu
    first *= mu
    first += scratch
    scratch[...] = gradient
    scratch *= gradient
    scratch *= 1.0 - rho
    second *= rho
    second += scratch
    denominator = xp.sqrt(second)
    denominator *= inverse_root_correction
    denominator += epsilon
    scratch[...] = first
    scratch /= denominator
    scratch *= step_size
    updated = weights - scratch
    if decay:
        updated -= learning_rate * (decay * weights)
    return updated


def _adam_against_the_former(backend, ops, decay, shape=(7, 5)):
    xp = backend.xp
    weights = {name: _random(backend, shape, seed=1) for name in ("now", "former")}
    moments = {name: tuple(xp.zeros(shape, dtype=backend.dtype, device=backend.device)
                           for _ in range(3)) for name in weights}
    for step in range(1, 6):
        gradient = _random(backend, shape, seed=10 + step, scale=1e-2)
        hyper = (0.9, 0.999, 1e-3 / (1 - 0.9 ** step), 1 / math.sqrt(1 - 0.999 ** step), 1e-8,
                 1e-3, decay)
        weights["now"] = ops.adam_update(weights["now"], gradient, moments["now"], *hyper)
        weights["former"] = former_adam_update(xp, weights["former"], gradient, moments["former"],
                                               *hyper)
        tolerance = RTOL[backend.dtype_name]
        assert_close(weights["now"], xpnn.to_numpy(weights["former"]), rtol=tolerance,
                     err_msg=f"weights after step {step}")
        for index in (0, 1):
            assert_close(moments["now"][index], xpnn.to_numpy(moments["former"][index]),
                         rtol=tolerance, err_msg=f"moment {index} after step {step}")
        assert weights["now"].dtype == backend.dtype


@pytest.mark.parametrize("decay", [0.0, 4e-1], ids=["no-l2", "l2"])
def test_adam_update_gives_the_former_steps(backend, decay):
    # The backend's own path (NumPy's writes into its arrays) and the generic one.
    _adam_against_the_former(backend, backend.ops, decay)
    _adam_against_the_former(backend, Ops(backend), decay)


@pytest.mark.parametrize("decay", [0.0, 4e-1], ids=["no-l2", "l2"])
def test_adam_update_gives_the_former_steps_in_float32(backend32, decay):
    _adam_against_the_former(backend32, backend32.ops, decay)


# -- FullyConnected in testing phase ------------------------------------------------------------

def test_fully_connected_testing_phase_adds_the_bias_row_as_the_ones_column_did(backend):
    # Former: [x, 1] @ weights with a column of ones made each forward, in either phase. Now
    # testing phase adds the bias row to x @ weights[:-1] (no copy of the input); a backward
    # after it still gives the gradient of the augmented input.
    from xpnn.layers import FullyConnected

    layer = FullyConnected(6, 4)
    layer.weights = np.random.default_rng(2).standard_normal((7, 4))
    host = np.random.default_rng(3).standard_normal((5, 6))
    x = backend.asarray(host, dtype=backend.dtype)
    xp = backend.xp
    ones = xp.ones((5, 1), dtype=backend.dtype, device=backend.device)
    former = xp.matmul(xp.concat([x, ones], axis=1), layer.weights)
    for testing_phase in (True, False, True):
        layer.testing_phase = testing_phase
        assert_close(layer.forward(x), xpnn.to_numpy(former), rtol=1e-12, atol=1e-15,
                     err_msg=f"testing_phase={testing_phase}")
    layer.testing_phase = False
    layer.forward(backend.asarray(-host, dtype=backend.dtype))  # (not what backward must use)
    layer.testing_phase = True
    layer.forward(x)
    error = np.random.default_rng(4).standard_normal((5, 4))
    layer.backward(backend.asarray(error, dtype=backend.dtype))
    augmented = np.hstack([host, np.ones((5, 1))])
    assert_close(layer.gradient_weights, augmented.T @ error, rtol=1e-12, atol=1e-15)


# -- the L2 regularizer's norm ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(785, 120), (16, 6, 5, 5), (7,), ()], ids=["fc", "conv", "1d", "0d"])
def test_sum_of_squares_gives_the_former_sum_of_the_product(backend, shape):
    # Former: xp.sum(x * x); now the inner product of the flattened x with itself.
    x = _random(backend, shape, seed=5)
    former = backend.xp.sum(x * x)
    for ops in (backend.ops, Ops(backend)):
        value = ops.sum_of_squares(x)
        assert tuple(getattr(value, "shape", ())) == ()
        assert_close(value, xpnn.to_numpy(former), rtol=1e-12)


# -- batch normalization -------------------------------------------------------------------------

def former_batch_norm_forward(xp, x, gamma, beta, eps, axes, statistics=None):
    """xpnn.ops.batch_norm.batch_norm_forward before its statistics took two calls (one piece)."""
    vector_shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    if statistics is None:
        mean = xp.mean(x, axis=axes, keepdims=True)
        centered = x - mean
        variance = xp.mean(centered * centered, axis=axes, keepdims=True)
    else:
        mean, variance = (xp.reshape(statistic, vector_shape) for statistic in statistics)
        centered = x - mean
    inverse_std = 1.0 / xp.sqrt(variance + eps)
    normalized = centered * inverse_std
    output = xp.reshape(gamma, vector_shape) * normalized + xp.reshape(beta, vector_shape)
    return output, (mean, variance), (normalized, inverse_std)


def former_batch_norm_backward(xp, error, gamma, normalized, inverse_std, axes, batch_statistics):
    """xpnn.ops.batch_norm.batch_norm_backward before it took γ out of the means (one piece)."""
    gradient_gamma = xp.sum(error * normalized, axis=axes)
    gradient_beta = xp.sum(error, axis=axes)
    gamma = xp.reshape(gamma, tuple(inverse_std.shape))
    normalized_error = error * gamma
    if not batch_statistics:
        return normalized_error * inverse_std, gradient_gamma, gradient_beta
    mean_error = xp.mean(normalized_error, axis=axes, keepdims=True)
    mean_projection = xp.mean(normalized_error * normalized, axis=axes, keepdims=True)
    gradient_input = (normalized_error - mean_error - normalized * mean_projection) * inverse_std
    return gradient_input, gradient_gamma, gradient_beta


@pytest.mark.parametrize("shape", [(16, 5), (8, 3, 6, 4)], ids=["vectors", "images"])
@pytest.mark.parametrize("given", [False, True], ids=["batch-statistics", "running-statistics"])
def test_batch_norm_gives_the_former_output_and_gradients(backend, shape, given):
    # The backend's own path (NumPy has one for images) and the generic one, against the
    # former generic formulas; the input has a large mean, as real activations may.
    xp = backend.xp
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    x = _random(backend, shape, seed=6, scale=3.0) + 5.0
    gamma, beta = _random(backend, (shape[1],), seed=7), _random(backend, (shape[1],), seed=8)
    error = _random(backend, shape, seed=9)
    statistics = ((_random(backend, (shape[1],), seed=10),
                   xp.abs(_random(backend, (shape[1],), seed=11)) + 0.5) if given else None)
    output, used, (normalized, inverse_std) = former_batch_norm_forward(
        xp, x, gamma, beta, 1e-5, axes, statistics)
    expected = (output,) + tuple(xp.reshape(value, (shape[1],)) for value in used) + \
        former_batch_norm_backward(xp, error, gamma, normalized, inverse_std, axes, not given)
    names = ("output", "mean", "variance", "input gradient", "gamma gradient", "beta gradient")
    for ops in (backend.ops, Ops(backend)):
        output, used, cache = ops.batch_norm_forward(x, gamma, beta, 1e-5, axes, statistics)
        actual = (output,) + tuple(used) + tuple(ops.batch_norm_backward(error, gamma, cache))
        for name, value, reference in zip(names, actual, expected):
            assert_close(value, xpnn.to_numpy(reference), rtol=1e-10, atol=1e-12,
                         err_msg=f"{name} ({type(ops).__name__})")


# -- the regularization loss -------------------------------------------------------------------------

class _FloatNorm:
    """A course-style regularizer of one's own whose norm is a Python float."""

    def calculate_gradient(self, weights):
        return 0.0 * weights

    def norm(self, weights):
        return 0.25


@pytest.mark.parametrize("own", [False, True], ids=["l2-everywhere", "one-float-norm"])
def test_regularization_loss_gives_the_former_sum_added_in_turn(backend, own):
    # Former: total = 0.0; total = total + norm, layer by layer. Now the backend adds them
    # (one stack and sum for four or more of its own 0-d arrays).
    from xpnn.layers import FullyConnected, ReLU
    from xpnn.network import NeuralNetwork
    from xpnn.optimizers import Sgd
    from xpnn.regularizers import L2_Regularizer
    from xpnn.initializers import He, Constant

    optimizer = Sgd(0.1)
    optimizer.add_regularizer(L2_Regularizer(4e-2))
    net = NeuralNetwork(optimizer, He(), Constant(0.1))
    for size in (5, 4, 3, 6, 2):
        net.append_layer(FullyConnected(size, size + 1))
        net.append_layer(ReLU())
    if own:
        net.layers[2].optimizer.add_regularizer(_FloatNorm())
    former = 0.0
    for layer in net.layers:
        if layer.trainable:
            former = former + layer.optimizer.regularizer.norm(layer.weights)
    total = net.regularization_loss()
    assert_close(total, xpnn.to_numpy(former), rtol=1e-12)
    assert backend.owns(total)
    net.layers[4].trainable = False  # (a frozen layer's norm is left out, as before)
    left_out = net.layers[4].optimizer.regularizer.norm(net.layers[4].weights)
    assert_close(net.regularization_loss(), xpnn.to_numpy(former - left_out), rtol=1e-12)
