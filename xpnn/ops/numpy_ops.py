"""NumPy fast paths for the hot operations of the ``"cpu"`` backend.

:class:`NumpyOps` overrides the convolution and max-pooling methods of the
generic :class:`xpnn.ops.Ops` (which stays the reference that
``tests/test_fastpaths.py`` compares these against). ``xpnn/backend.py``
selects it for the NumPy backend; this module is NumPy-specific code and may
therefore use NumPy directly.

Internal layout: batch innermost
--------------------------------
Arrays keep the public shape ``(b, c, y, x)``, but what these functions return
is a transposed *view* of a contiguous ``(c, y, x, b)`` array (the batch is the
fastest-varying axis in memory). Every shifted-window slice of such an array
copies runs of ``x * b`` (or ``b``) contiguous values instead of a few
values per row, which makes im2col, col2im and pooling 2-4x cheaper than on
channel-first arrays, and the columns come out ready for one large matrix
product ``(k, c*m*n) @ (c*m*n, y*x*b)`` instead of a batch of small ones.

NumPy's element-wise functions keep an input's memory order (``order="K"``),
so the layout survives ReLU, batch normalization and dropout between two
convolutions for free, and turning such a view back into ``(c, y, x, b)`` is
free too. An input in the ordinary C order is transposed once (one copy).
Values never depend on the layout; only strides do.
"""
import functools

import numpy as np

from xpnn.ops import Ops
from xpnn.ops.windows import same_padding, window_output_shape


def batch_innermost(x):
    """``(b, c, *spatial)`` -> a C-contiguous ``(c, *spatial, b)`` (free for our own views)."""
    return np.ascontiguousarray(np.transpose(x, tuple(range(1, x.ndim)) + (0,)))


def batch_outermost(t):
    """``(c, *spatial, b)`` -> a ``(b, c, *spatial)`` view (no copy)."""
    return np.transpose(t, (t.ndim - 1,) + tuple(range(t.ndim - 1)))


@functools.lru_cache(maxsize=256)
def _window_indices(kernel_shape, strides, output_shape):
    """Index of a ``(c, y, x, b)`` array per kernel offset ``(i, j)``, row-major over the kernel.

    The index for offset ``(i, j)`` picks, for every output position, the input
    entry at that offset of its window: ``i, i + s, ..., i + s*(m - 1)`` per axis.
    """
    return tuple(
        ((i, j), (slice(None),) + tuple(slice(o, o + s * (m - 1) + 1, s)
                                        for o, s, m in zip((i, j), strides, output_shape)))
        for i in range(kernel_shape[0]) for j in range(kernel_shape[1]))


class NumpyOps(Ops):
    """:class:`xpnn.ops.Ops` with batch-innermost NumPy convolution and 2x2 max pooling.

    1-D convolutions run as 2-D ones with a trailing spatial axis of size 1;
    pooling other than 2x2 with stride 2 uses the generic methods.
    """

    # -- convolution ----------------------------------------------------------
    def conv_forward(self, x, weights, bias, strides):
        """Same contract as :meth:`xpnn.ops.Ops.conv_forward` (cache differs; opaque)."""
        if x.ndim == 3:
            output, cache = self.conv_forward(x[..., None], weights[..., None], bias,
                                              tuple(strides) + (1,))
            return output[..., 0], cache
        if x.ndim != 4:
            return super().conv_forward(x, weights, bias, strides)
        kernel_shape = tuple(weights.shape[2:])
        strides = tuple(strides)
        padding = same_padding(kernel_shape)
        inputs = batch_innermost(x)
        output_shape = window_output_shape(inputs.shape[1:3], kernel_shape, strides, padding)
        columns = _im2col(inputs, kernel_shape, strides, padding, output_shape)
        flat_weights = np.reshape(weights, (weights.shape[0], columns.shape[0]))
        output = np.matmul(flat_weights, columns)
        output += np.reshape(bias, (-1, 1))
        output = np.reshape(output, (weights.shape[0],) + output_shape + (x.shape[0],))
        cache = _ConvCache((columns, tuple(inputs.shape), kernel_shape, strides, padding))
        return batch_outermost(output), cache

    def conv_backward(self, error, weights, cache, input_gradient=True):
        """Same contract as :meth:`xpnn.ops.Ops.conv_backward`."""
        if error.ndim == 3:
            gradients = self.conv_backward(error[..., None], weights[..., None], cache,
                                           input_gradient)
            gradient_input, gradient_weights, gradient_bias = gradients
            if gradient_input is not None:
                gradient_input = gradient_input[..., 0]
            return gradient_input, gradient_weights[..., 0], gradient_bias
        if not isinstance(cache, _ConvCache):
            return super().conv_backward(error, weights, cache, input_gradient)
        columns, input_shape, kernel_shape, strides, padding = cache
        kernels = weights.shape[0]
        flat_error = np.reshape(batch_innermost(error), (kernels, columns.shape[1]))
        gradient_bias = np.sum(flat_error, axis=1)
        gradient_weights = np.reshape(np.matmul(flat_error, columns.T), weights.shape)
        if not input_gradient:
            return None, gradient_weights, gradient_bias
        flat_weights = np.reshape(weights, (kernels, columns.shape[0]))
        column_gradient = np.matmul(flat_weights.T, flat_error)
        gradient_input = _col2im(column_gradient, input_shape, kernel_shape, strides, padding,
                                 tuple(error.shape[2:]))
        return batch_outermost(gradient_input), gradient_weights, gradient_bias

    # -- ReLU -------------------------------------------------------------------
    def relu_forward(self, x):
        """Same results as :meth:`xpnn.ops.Ops.relu_forward`, bit for bit.

        ``np.where`` branches per element and costs ~5 ns per value on a
        ReLU's random sign pattern; AND-ing the value's bits with an integer
        mask of all ones (keep) or zeros (+0.0) is branch-free and ~10x faster.
        The mask is that integer array (same memory order as ``x``).
        """
        integer = _same_width_integer(x.dtype)
        mask = np.negative((x > 0.0).view(np.int8), dtype=integer)
        return np.bitwise_and(x.view(integer), mask).view(x.dtype), mask

    def relu_backward(self, error, mask):
        """Same results as :meth:`xpnn.ops.Ops.relu_backward`, bit for bit."""
        if not (isinstance(mask, np.ndarray) and mask.dtype.kind == "i"):
            return super().relu_backward(error, mask)
        integer = _same_width_integer(error.dtype)
        if mask.dtype != integer:
            mask = mask.astype(integer)
        return np.bitwise_and(error.view(integer), mask).view(error.dtype)

    # -- batch normalization ----------------------------------------------------
    def batch_norm_forward(self, x, gamma, beta, eps, axes, statistics=None):
        """Same contract as :meth:`xpnn.ops.Ops.batch_norm_forward` (cache differs; opaque).

        Images are normalized as a ``(c, y*x*b)`` matrix (free for the
        batch-innermost views the other fast paths return): every reduction
        runs along contiguous rows, where the generic reduction over axes
        (0, 2, 3) walks the array with strides (~7x slower here).
        """
        if x.ndim != 4 or tuple(axes) != (0, 2, 3):
            return super().batch_norm_forward(x, gamma, beta, eps, axes, statistics)
        inputs = batch_innermost(x)
        rows = np.reshape(inputs, (inputs.shape[0], -1))
        if statistics is None:
            mean = np.mean(rows, axis=1)
            normalized = rows - mean[:, None]
            variance = np.mean(np.square(normalized), axis=1)
        else:
            mean, variance = statistics
            normalized = rows - mean[:, None]
        inverse_std = 1.0 / np.sqrt(variance + eps)
        normalized *= inverse_std[:, None]
        output = normalized * gamma[:, None]
        output += beta[:, None]
        cache = _NormCache((normalized, inverse_std, statistics is None))
        return batch_outermost(np.reshape(output, inputs.shape)), (mean, variance), cache

    def batch_norm_backward(self, error, gamma, cache):
        """Same contract as :meth:`xpnn.ops.Ops.batch_norm_backward`."""
        if not isinstance(cache, _NormCache):
            return super().batch_norm_backward(error, gamma, cache)
        normalized, inverse_std, batch_statistics = cache
        errors = batch_innermost(error)
        rows = np.reshape(errors, normalized.shape)
        gradient_beta = np.sum(rows, axis=1)
        gradient_gamma = np.sum(rows * normalized, axis=1)
        scale = gamma * inverse_std
        if not batch_statistics:
            gradient = rows * scale[:, None]
        else:
            # (e - mean(e) - x̂ mean(e x̂)) γ / σ: γ is per channel, so it factors out of the means.
            count = normalized.shape[1]
            gradient = normalized * (gradient_gamma / count)[:, None]
            np.subtract(rows, gradient, out=gradient)
            gradient -= (gradient_beta / count)[:, None]
            gradient *= scale[:, None]
        return batch_outermost(np.reshape(gradient, errors.shape)), gradient_gamma, gradient_beta

    # -- max pooling ----------------------------------------------------------
    def max_pool_forward(self, x, pool_shape, strides):
        """Same contract as :meth:`xpnn.ops.Ops.max_pool_forward` (cache differs; opaque)."""
        if x.ndim != 4 or tuple(pool_shape) != (2, 2) or tuple(strides) != (2, 2):
            return super().max_pool_forward(x, pool_shape, strides)
        inputs = batch_innermost(x)
        quarters = _quarters(inputs)
        top, bottom = np.maximum(quarters[0], quarters[1]), np.maximum(quarters[2], quarters[3])
        output = np.maximum(top, bottom)
        # First maximum in row-major window order: the top row wins ties with
        # the bottom row, the left column ties with the right one.
        routing = (top >= bottom, quarters[0] >= quarters[1], quarters[2] >= quarters[3])
        return batch_outermost(output), _PoolCache((tuple(inputs.shape), routing))

    def max_pool_backward(self, error, cache):
        """Same contract as :meth:`xpnn.ops.Ops.max_pool_backward`."""
        if not isinstance(cache, _PoolCache):
            return super().max_pool_backward(error, cache)
        input_shape, (top_wins, left_wins_top, left_wins_bottom) = cache
        error = batch_innermost(error)
        gradient = np.empty(input_shape, dtype=error.dtype)
        if input_shape[1] % 2 or input_shape[2] % 2:
            gradient[...] = 0.0  # the odd last row/column lies in no window
        quarters = _quarters(gradient)
        top_error = error * top_wins
        bottom_error = error - top_error
        np.multiply(top_error, left_wins_top, out=quarters[0])
        np.subtract(top_error, quarters[0], out=quarters[1])
        np.multiply(bottom_error, left_wins_bottom, out=quarters[2])
        np.subtract(bottom_error, quarters[2], out=quarters[3])
        return batch_outermost(gradient)


def _same_width_integer(dtype):
    """The signed integer type as wide as a float type (int32 for float32)."""
    return np.dtype(f"int{np.dtype(dtype).itemsize * 8}")


class _ConvCache(tuple):
    """(columns, input shape (c, y, x, b), kernel shape, strides, padding)."""


class _NormCache(tuple):
    """(x̂ as a (c, y*x*b) matrix, 1/sqrt(variance + eps) (c,), batch statistics used)."""


class _PoolCache(tuple):
    """(input shape (c, y, x, b), (top row wins, left wins in the top row, ... bottom row))."""


def _quarters(t):
    """The four entries of every 2x2 window of a ``(c, y, x, b)`` array, row-major (views)."""
    rows, columns = t.shape[1] // 2 * 2, t.shape[2] // 2 * 2
    return tuple(t[:, i:rows:2, j:columns:2, :] for i in (0, 1) for j in (0, 1))


def _padded(shape, padding, dtype):
    (top, bottom), (left, right) = padding
    channels, rows, columns, batch = shape
    return np.zeros((channels, rows + top + bottom, columns + left + right, batch), dtype=dtype)


def _interior(padded, shape, padding):
    (top, _), (left, _) = padding
    return padded[:, top:top + shape[1], left:left + shape[2], :]


def _im2col(inputs, kernel_shape, strides, padding, output_shape):
    """Columns ``(c*m*n, y'*x'*b)``: row ``(ch, i, j)``, column ``(p, q, sample)``."""
    padded = _padded(inputs.shape, padding, inputs.dtype)
    _interior(padded, inputs.shape, padding)[...] = inputs
    channels, batch = inputs.shape[0], inputs.shape[3]
    columns = np.empty((channels,) + kernel_shape + output_shape + (batch,), dtype=inputs.dtype)
    for (i, j), index in _window_indices(kernel_shape, strides, output_shape):
        columns[:, i, j] = padded[index]
    return np.reshape(columns, (columns.shape[0] * kernel_shape[0] * kernel_shape[1], -1))


def _col2im(column_gradient, input_shape, kernel_shape, strides, padding, output_shape):
    """Adjoint of :func:`_im2col`: ``+=`` every column entry back into a ``(c, y, x, b)`` array."""
    channels, batch = input_shape[0], input_shape[3]
    windows = np.reshape(column_gradient, (channels,) + kernel_shape + output_shape + (batch,))
    padded = _padded(input_shape, padding, column_gradient.dtype)
    for (i, j), index in _window_indices(kernel_shape, strides, output_shape):
        padded[index] += windows[:, i, j]
    return _interior(padded, input_shape, padding)
