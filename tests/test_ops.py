"""Generic hot paths (backend.ops): windows, im2col/col2im, convolution and max-pool kernels.

References are NumPy loops (tests/conv_reference.py); identities (adjointness)
hold for any correct pair of operator and adjoint.
"""
import numpy as np
import pytest

import xpnn
from xpnn.ops import Ops
from xpnn.ops import conv as _conv
import conv_reference as ref
from conftest import assert_close

IM2COL_CASES = [
    # (input shape, kernel shape, strides)
    ((2, 3, 7, 5), (3, 3), (1, 1)),
    ((2, 2, 7, 5), (2, 4), (2, 3)),
    ((1, 1, 4, 4), (1, 1), (2, 2)),
    ((3, 2, 9), (4,), (2,)),
    ((2, 1, 6), (5,), (1,)),
]


@pytest.mark.parametrize("shape, kernel_shape, strides", IM2COL_CASES)
def test_im2col_matches_reference(backend, shape, kernel_shape, strides):
    x = np.random.standard_normal(shape)
    columns = backend.ops.im2col(backend.asarray(x), kernel_shape, strides)
    assert backend.owns(columns)
    assert_close(columns, ref.im2col(x, kernel_shape, strides), rtol=0)


@pytest.mark.parametrize("shape, kernel_shape, strides", IM2COL_CASES)
def test_col2im_is_adjoint_of_im2col(backend, shape, kernel_shape, strides):
    x = np.random.standard_normal(shape)
    columns_shape = ref.im2col(x, kernel_shape, strides).shape
    y = np.random.standard_normal(columns_shape)
    forward = xpnn.to_numpy(backend.ops.im2col(backend.asarray(x), kernel_shape, strides))
    adjoint = backend.ops.col2im(backend.asarray(y), shape[2:], kernel_shape, strides)
    assert backend.owns(adjoint)
    adjoint = xpnn.to_numpy(adjoint)
    assert adjoint.shape == shape
    # <col2im(y), x> == <y, im2col(x)>
    np.testing.assert_allclose(np.sum(adjoint * x), np.sum(y * forward), rtol=1e-12)


@pytest.mark.parametrize("window_shape, strides, padding", [
    ((3, 3), (1, 1), ((0, 0), (0, 0))),      # overlapping, valid
    ((3, 2), (2, 1), ((1, 1), (0, 1))),      # overlapping, padded
    ((2, 2), (2, 2), ((0, 0), (0, 0))),      # tiling
    ((2, 2), (3, 3), ((0, 0), (0, 0))),      # gaps between windows
    ((2, 3), (2, 3), ((0, 1), (1, 1))),      # tiling a padded array
    ((7, 6), (7, 6), ((0, 0), (0, 0))),      # one window, the whole array
])
def test_accumulate_windows_is_adjoint_of_extract_windows(backend, window_shape, strides, padding):
    x = np.random.standard_normal((2, 3, 7, 6))
    windows = backend.ops.extract_windows(backend.asarray(x), window_shape, strides, padding)
    y = np.random.standard_normal(tuple(windows.shape))
    adjoint = xpnn.to_numpy(backend.ops.accumulate_windows(
        backend.asarray(y), (7, 6), window_shape, strides, padding))
    np.testing.assert_allclose(np.sum(adjoint * x), np.sum(y * xpnn.to_numpy(windows)), rtol=1e-12)


def test_extract_windows_layout(backend):
    x = np.arange(2 * 1 * 5 * 4, dtype=np.float64).reshape(2, 1, 5, 4)
    windows = xpnn.to_numpy(backend.ops.extract_windows(
        backend.asarray(x), (2, 3), (2, 1), ((0, 0), (0, 0))))
    assert windows.shape == (2, 1, 6, 2, 2)       # (b, c, window offsets, *output)
    for i, j in np.ndindex(2, 2):
        expected = x[:, :, 2 * i:2 * i + 2, j:j + 3].reshape(2, 1, 6)
        np.testing.assert_array_equal(windows[:, :, :, i, j], expected)


@pytest.mark.parametrize("shape, kernel_shape, strides", [
    ((2, 3, 7, 5), (3, 3), (2, 2)), ((2, 2, 6, 5), (2, 4), (1, 2)), ((3, 2, 9), (4,), (2,)),
])
def test_conv_forward_and_backward_match_reference(backend, shape, kernel_shape, strides):
    x = np.random.standard_normal(shape)
    weights = np.random.standard_normal((4, shape[1]) + kernel_shape)
    bias = np.random.standard_normal(4)
    output, cache = backend.ops.conv_forward(
        backend.asarray(x), backend.asarray(weights), backend.asarray(bias), strides)
    expected = ref.conv_forward(x, weights, bias, strides)
    assert_close(output, expected, rtol=1e-12, atol=1e-13)
    error = np.random.standard_normal(expected.shape)
    gradients = backend.ops.conv_backward(backend.asarray(error), backend.asarray(weights), cache)
    for actual, wanted in zip(gradients, ref.conv_backward(x, weights, strides, error)):
        assert backend.owns(actual)
        assert ref.relative_error(xpnn.to_numpy(actual), wanted) <= 1e-12


CORRELATION_CASES = IM2COL_CASES + [
    ((2, 2, 8, 7), (5, 5), (1, 1)),          # LeNet's kernel
    ((2, 3, 7, 5), (2, 2), (3, 2)),          # even kernel, strides that leave a remainder
    ((1, 2, 6, 6), (2, 2), (4, 4)),          # gaps between windows
    ((2, 2, 5, 4, 3), (3, 2, 2), (2, 1, 2)),  # three spatial axes
]


@pytest.mark.parametrize("shape, kernel_shape, strides", CORRELATION_CASES)
def test_input_gradient_by_correlation_is_col2im_of_the_column_gradient(backend, shape,
                                                                         kernel_shape, strides):
    # The generic input gradient (a correlation of the spread error with the flipped kernels)
    # against the route it replaced, the column gradient summed back by col2im, and against
    # the loop reference; Ops(backend) is the generic path on every backend, NumPy's included.
    generic = Ops(backend)
    x = np.random.standard_normal(shape)
    weights = np.random.standard_normal((3, shape[1]) + kernel_shape)
    _, cache = generic.conv_forward(backend.asarray(x), backend.asarray(weights),
                                    backend.asarray(np.zeros(3)), strides)
    error_shape = (shape[0], 3) + tuple(-(-n // s) for n, s in zip(shape[2:], strides))
    error = np.random.standard_normal(error_shape)
    by_correlation = generic.conv_backward(backend.asarray(error), backend.asarray(weights), cache)[0]
    by_col2im = _conv.conv_backward(backend.xp, backend.device, backend.asarray(error),
                                    backend.asarray(weights), cache, sum_columns=generic.col2im)[0]
    assert backend.owns(by_correlation) and by_correlation.dtype == backend.dtype
    assert_close(by_correlation, xpnn.to_numpy(by_col2im), rtol=1e-12, atol=1e-13)
    assert ref.relative_error(xpnn.to_numpy(by_correlation),
                              ref.conv_backward(x, weights, strides, error)[0]) <= 1e-12


def test_conv_backward_can_skip_the_input_gradient(backend):
    x = np.random.standard_normal((2, 2, 5, 5))
    weights = np.random.standard_normal((3, 2, 3, 3))
    _, cache = backend.ops.conv_forward(backend.asarray(x), backend.asarray(weights),
                                        backend.asarray(np.zeros(3)), (1, 1))
    error = np.random.standard_normal((2, 3, 5, 5))
    gradient_input, gradient_weights, _ = backend.ops.conv_backward(
        backend.asarray(error), backend.asarray(weights), cache, input_gradient=False)
    assert gradient_input is None
    assert_close(gradient_weights, ref.conv_backward(x, weights, (1, 1), error)[1], rtol=1e-12)


@pytest.mark.parametrize("pool_shape, strides",
                         [((2, 2), (2, 2)), ((3, 3), (1, 1)), ((3, 2), (2, 1))])
def test_max_pool_matches_reference(backend, pool_shape, strides):
    x = np.random.standard_normal((2, 3, 7, 6))
    output, cache = backend.ops.max_pool_forward(backend.asarray(x), pool_shape, strides)
    assert_close(output, ref.max_pool_forward(x, pool_shape, strides), rtol=0)
    error = np.random.standard_normal(tuple(output.shape))
    gradient = backend.ops.max_pool_backward(backend.asarray(error), cache)
    assert_close(gradient, ref.max_pool_backward(x, pool_shape, strides, error),
                 rtol=1e-13, atol=1e-15)


def test_max_pool_routes_ties_to_the_first_maximum(backend):
    x = np.zeros((1, 1, 4, 4))        # every window is one big tie
    x[0, 0, 3, 3] = -1.0
    output, cache = backend.ops.max_pool_forward(backend.asarray(x), (2, 2), (1, 1))
    gradient = xpnn.to_numpy(backend.ops.max_pool_backward(
        backend.asarray(np.ones((1, 1, 3, 3))), cache))
    expected = np.zeros((4, 4))
    expected[:3, :3] = 1.0            # window (i, j) routes to its top-left corner (i, j)
    np.testing.assert_array_equal(gradient[0, 0], expected)


def test_ops_leave_their_inputs_unchanged(backend):
    x = np.random.standard_normal((2, 2, 5, 4))
    x_device = backend.asarray(x)
    columns = backend.ops.im2col(x_device, (3, 3), (1, 1))
    columns_host = xpnn.to_numpy(columns).copy()
    backend.ops.col2im(columns, (5, 4), (3, 3), (1, 1))
    _, cache = backend.ops.max_pool_forward(x_device, (2, 2), (1, 1))
    error = backend.asarray(np.random.standard_normal((2, 2, 4, 3)))
    error_host = xpnn.to_numpy(error).copy()
    backend.ops.max_pool_backward(error, cache)
    np.testing.assert_array_equal(xpnn.to_numpy(x_device), x)
    np.testing.assert_array_equal(xpnn.to_numpy(columns), columns_host)
    np.testing.assert_array_equal(xpnn.to_numpy(error), error_host)


def test_float32_stays_float32(backend32):
    x = backend32.asarray(np.random.standard_normal((2, 2, 5, 4)), dtype="float32")
    weights = backend32.asarray(np.random.standard_normal((3, 2, 3, 2)), dtype="float32")
    bias = backend32.asarray(np.zeros(3), dtype="float32")
    output, cache = backend32.ops.conv_forward(x, weights, bias, (1, 2))
    gradients = backend32.ops.conv_backward(output, weights, cache)
    pooled, pool_cache = backend32.ops.max_pool_forward(x, (2, 2), (1, 1))
    routed = backend32.ops.max_pool_backward(pooled, pool_cache)
    for array in (output, pooled, routed) + tuple(gradients):
        assert array.dtype == backend32.dtype


@pytest.mark.parametrize("offsets", [5, 7])
def test_accumulate_windows_refuses_windows_of_another_window_size(backend, offsets):
    # A (2, 3) window has 6 offsets: with 7 the last would be dropped silently, with 5
    # the loop would fail on an index; both are the caller's mistake, named as such.
    windows = backend.asarray(np.ones((2, 1, offsets, 2, 2)))
    with pytest.raises(ValueError, match=rf"windows of shape \(2, 1, {offsets}, 2, 2\) do not "
                                         r"match window_shape \(2, 3\)"):
        backend.ops.accumulate_windows(windows, (5, 4), (2, 3), (2, 1), ((0, 0), (0, 0)))
