"""Batch-innermost building blocks of the CPU fast paths in :mod:`xpnn.ops.numpy_ops`.

Plain NumPy functions and small classes with no threads: the turn between the
public ``(b, c, ...)`` shape and the batch-innermost layout, the geometry of a
"same" convolution on a ``(c, y, x, b)`` array, its window view (im2col) and
adjoint (col2im), the quarters of 2x2 pooling windows, batch-norm arithmetic
on ``(c, y*x*b)`` rows, and the opaque cache types the fast paths hand to
layers. ``numpy_ops`` and ``numpy_conv`` decide how the work is split over threads.
"""
import functools

import numpy as np

from xpnn.ops.windows import same_padding, window_output_shape


def same_width_integer(dtype):
    """The signed integer type as wide as a float type (int32 for float32)."""
    return np.dtype(f"int{np.dtype(dtype).itemsize * 8}")


def batch_innermost(x):
    """``(b, c, *spatial)`` -> a C-contiguous ``(c, *spatial, b)`` (free for our own views)."""
    return np.ascontiguousarray(x.transpose(tuple(range(1, x.ndim)) + (0,)))


def batch_outermost(t):
    """``(c, *spatial, b)`` -> a ``(b, c, *spatial)`` view (no copy)."""
    return t.transpose((t.ndim - 1,) + tuple(range(t.ndim - 1)))


def channel_index(part):
    """Index of the channels ``part`` (``(start, stop)`` on axis 1), or everything."""
    if part is None:
        return (Ellipsis,)
    return (slice(None), slice(*part))


class ConvCache(tuple):
    """(columns, Geometry)."""


class ConvInputCache(tuple):
    """(a copy of the batch-innermost input, Geometry): columns are rebuilt if needed."""


class NormCache(tuple):
    """(x̂ as a (c, y*x*b) matrix, 1/sqrt(variance + eps) (c,), batch statistics used,
    the all_sum of a batch spread over several processes or None)."""


class PoolCache(tuple):
    """(input shape (c, y, x, b), (top row wins, left wins in the top row, ... bottom row))."""


class Geometry:
    """Shapes of one 2-D "same" convolution in the batch-innermost layout."""

    def __init__(self, input_chw, kernel_shape, strides, batch):
        self.channels = input_chw[0]
        self.input_shape = input_chw + (batch,)
        self.kernel_shape = kernel_shape
        self.kernel_size = kernel_shape[0] * kernel_shape[1]
        self.strides = strides
        self.padding = same_padding(kernel_shape)
        self.output_shape = window_output_shape(input_chw[1:], kernel_shape, strides, self.padding)
        self.columns_shape = (self.channels,) + kernel_shape + self.output_shape + (batch,)
        self.row_size = self.output_shape[1] * batch  # flat columns per output row

    def columns_size(self, batch):
        """Entries of the columns for ``batch`` samples."""
        return self.channels * self.kernel_size * self.output_shape[0] * self.output_shape[1] * batch

    def column_block(self, rows):
        """Slice of the flat columns ``(c*m*n, y'*x'*b)`` holding output rows ``[start, stop)``."""
        return slice(rows[0] * self.row_size, rows[1] * self.row_size)


def pool_quarters(t):
    """The four entries of every 2x2 window of a ``(c, y, x, b)`` array, row-major (views)."""
    rows, columns = t.shape[1] // 2 * 2, t.shape[2] // 2 * 2
    return tuple(t[:, i:rows:2, j:columns:2, :] for i in (0, 1) for j in (0, 1))


def zero_padded(shape, padding, dtype):
    """Zeros of ``(c, y, x, b)`` grown by ``padding`` on the two spatial axes."""
    (top, bottom), (left, right) = padding
    channels, rows, columns, batch = shape
    return np.zeros((channels, rows + top + bottom, columns + left + right, batch), dtype=dtype)


def interior_view(padded, shape, padding):
    (top, _), (left, _) = padding
    return padded[:, top:top + shape[1], left:left + shape[2], :]


@functools.lru_cache(maxsize=256)
def window_indices(kernel_shape, strides, output_shape):
    """Per kernel offset ``(i, j)``: where every output position finds it in the padded input.

    Returns ``((i, j), index)`` pairs, ``index`` picking rows ``i, i + s, ...,
    i + s*(y' - 1)`` and columns ``j, j + t, ..., j + t*(x' - 1)`` of a padded
    ``(c, y, x, b)`` array.
    """
    (row_stride, column_stride), (rows, columns) = strides, output_shape
    return tuple(
        ((i, j), (slice(None), slice(i, i + row_stride * (rows - 1) + 1, row_stride),
                  slice(j, j + column_stride * (columns - 1) + 1, column_stride)))
        for i in range(kernel_shape[0]) for j in range(kernel_shape[1]))


def window_view(padded, geometry):
    """View ``(c, m, n, y', x', b)`` of a padded ``(c, y, x, b)`` input: every window entry.

    Entry ``[ch, i, j, p, q, :]`` is the input at kernel offset ``(i, j)`` of the
    window of output position ``(p, q)``: copying it gives the im2col columns.
    Made from strides directly (1 µs; ``sliding_window_view`` and a transpose
    took 18 µs, twice a LeNet step in each process); read-only.
    """
    channels, rows, columns, batch = padded.shape
    (row_stride, column_stride), (out_rows, out_columns) = geometry.strides, geometry.output_shape
    kernel_rows, kernel_columns = geometry.kernel_shape
    if not (padded.flags.c_contiguous and (out_rows - 1) * row_stride + kernel_rows <= rows
            and (out_columns - 1) * column_stride + kernel_columns <= columns):
        raise ValueError(f"window_view: {geometry.output_shape} windows of {geometry.kernel_shape} "
                         f"do not fit a padded input of {padded.shape}")
    channel_step, row_step, column_step, batch_step = padded.strides
    view = np.ndarray((channels, kernel_rows, kernel_columns, out_rows, out_columns, batch),
                      padded.dtype, padded, 0,
                      (channel_step, row_step, column_step, row_step * row_stride,
                       column_step * column_stride, batch_step))
    view.flags.writeable = False
    return view


def conv_backward_job(flat_error, flat_weights, flat_columns, gradient, geometry, rows):
    """One part of a convolution's backward pass (see ``NumpyOps._conv_backward_jobs``).

    ``rows=None``: add the input gradient into the padded ``gradient`` and
    return None; else return the bias and weight gradients of output rows
    ``rows`` (partial sums).
    """
    if rows is None:
        col2im(gradient, np.matmul(flat_weights.T, flat_error), geometry)
        return None
    block = geometry.column_block(rows)
    return (flat_error[:, block].sum(axis=1),
            np.matmul(flat_error[:, block], flat_columns[:, block].T))


def col2im(padded, column_gradient, geometry):
    """Adjoint of im2col: ``+=`` the column rows ``(c*m*n, y'*x'*b)`` into ``padded`` (c, ...)."""
    channels = padded.shape[0]
    windows = column_gradient.reshape((channels,) + geometry.kernel_shape + geometry.columns_shape[3:])
    indices = window_indices(geometry.kernel_shape, geometry.strides, geometry.output_shape)
    for (i, j), index in indices:
        # Offsets overlap where windows do: += sums them.
        padded[index] += windows[:, i, j]


def row_dots(a, b):
    """``sum(a * b, axis=1)`` of two 2-D arrays as one BLAS dot product per row.

    No product array is made: 3-4x faster here than the sum of products for
    batch norm's rows (e.g. 6 x 25,088 float32: 25 instead of 86 µs). The sum
    runs in another order, so it differs from NumPy's pairwise sum in the last
    bits.
    """
    return np.matmul(a[:, None, :], b[:, :, None])[:, 0, 0]


class NormState:
    """Output and statistics arrays of one batch-norm forward, filled channel part by part."""

    def __init__(self, rows, statistics):
        self.output = np.empty_like(rows)
        self.normalized = np.empty_like(rows)
        self.inverse_std = np.empty(rows.shape[0], dtype=rows.dtype)
        self.given = statistics
        if statistics is None:
            self.mean = np.empty(rows.shape[0], dtype=rows.dtype)
            self.variance = np.empty(rows.shape[0], dtype=rows.dtype)
        else:
            self.mean, self.variance = statistics


def normalize_with_all_sum(state, rows, gamma, beta, eps, all_sum):
    """Batch norm of every channel of one process's rows of a batch, with the whole batch's statistics.

    ``all_sum(*values)`` sums values over the processes (see
    :func:`xpnn.ops.batch_norm.batch_norm_forward`).
    """
    count, total = all_sum(rows.shape[1], rows.sum(axis=1))
    state.mean[...] = total / count
    np.subtract(rows, state.mean[:, None], out=state.normalized)
    squares = row_dots(state.normalized, state.normalized)
    state.variance[...] = all_sum(squares)[0] / count
    state.inverse_std[...] = 1.0 / np.sqrt(state.variance + eps)
    state.normalized *= state.inverse_std[:, None]
    np.multiply(state.normalized, gamma[:, None], out=state.output)
    state.output += beta[:, None]


def normalize_channels(state, rows, gamma, beta, eps, c):
    """Batch norm of the channel rows ``c``: statistics (unless given), x̂, γ x̂ + β."""
    normalized = state.normalized[c]
    if state.given is None:
        state.mean[c] = rows[c].mean(axis=1)
        np.subtract(rows[c], state.mean[c][:, None], out=normalized)
        state.variance[c] = row_dots(normalized, normalized) / rows.shape[1]
    else:
        np.subtract(rows[c], state.mean[c][:, None], out=normalized)
    state.inverse_std[c] = 1.0 / np.sqrt(state.variance[c] + eps)
    normalized *= state.inverse_std[c][:, None]
    np.multiply(normalized, gamma[c][:, None], out=state.output[c])
    state.output[c] += beta[c][:, None]
