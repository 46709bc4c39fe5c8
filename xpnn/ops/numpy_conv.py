"""NumPy fast paths of 2-D convolution for :class:`xpnn.ops.numpy_ops.NumpyOps`.

:class:`ConvolutionPaths` holds NumpyOps's convolution methods (NumpyOps
inherits them; they split their work with its ``_parallel`` and ``_parts``):
im2col by a copy from a window view of the zero-padded batch-innermost input
into columns ``(c, m, n, y', x', b)``, one matrix product per part of the
output rows, and backward as the weight gradient's products per part of the
rows beside the input gradient (a product, then col2im's ``+=`` into slices).
See :mod:`xpnn.ops.numpy_ops` for the layout and the threads.
"""
import functools

import numpy as np

from xpnn.ops.numpy_columns import (
    ConvCache,
    ConvInputCache,
    Geometry,
    batch_innermost,
    batch_outermost,
    conv_backward_job,
    interior_view,
    window_view,
    zero_padded)
from xpnn.ops.threads import split_range

#: Convolutions with fewer column entries than this run in one part (a hand-off to a
#: helper thread costs 50-150 µs on a virtual machine).
MIN_PARALLEL_COLUMNS = 1 << 18
#: A weight gradient (kernels x column rows) smaller than this is one matrix product:
#: with so few outputs its long inner dimension does not share well. LeNet's first
#: convolution (6 x 25, batch 64): 0.67 ms in one call, 0.84 ms as two halves on two
#: threads (its backward in a training step 0.98 instead of 1.17 ms); the second
#: (16 x 150): 1.07 ms in one call, 0.61 ms as two halves.
MIN_PARALLEL_WEIGHT_GRADIENT = 1 << 10
#: Columns per block of output rows of a testing-phase convolution: the block's buffer
#: stays in cache from im2col to the matrix product. Measured on one thread, 128 samples:
#: LeNet's first convolution 10.6 ms in cache-sized batch chunks (each chunk's output then
#: copied into a strided slice), 2.5 ms in row blocks of 512 KiB or 1 MiB, 4.4 ms of 3 MiB;
#: the second 8.1 ms in chunks, 3.8-3.9 ms in row blocks of 512 KiB-1 MiB. A whole
#: LeNet pass over 500 images went from ~40 to 29.4 ms.
BLOCK_BYTES = 1 << 20


class ConvolutionPaths:
    """NumpyOps's convolution methods (same contracts as :class:`xpnn.ops.Ops`'s)."""

    def conv_forward(self, x, weights, bias, strides, need_backward=True):
        """Same contract as :meth:`xpnn.ops.Ops.conv_forward` (cache differs; opaque).

        Without ``need_backward`` the columns are built a block of output rows
        at a time into a small buffer that stays in cache (2-4x faster), and
        none are kept: the cache then holds a copy of the input, and a backward
        pass rebuilds the columns.
        """
        if x.ndim == 3:
            output, cache = self.conv_forward(x[..., None], weights[..., None], bias,
                                              tuple(strides) + (1,), need_backward)
            return output[..., 0], cache
        if x.ndim != 4:
            return super().conv_forward(x, weights, bias, strides, need_backward)
        geometry = Geometry(tuple(x.shape[1:]), tuple(weights.shape[2:]), tuple(strides), x.shape[0])
        inputs = batch_innermost(x)
        if not need_backward:
            output = self._conv_forward_in_row_blocks(inputs, weights, bias, geometry)
            if np.may_share_memory(inputs, x):  # the caller may change x before a backward pass
                inputs = np.array(inputs, copy=True)
            return batch_outermost(output), ConvInputCache((inputs, geometry))
        columns, output = self._conv_forward_columns(inputs, weights, bias, geometry)
        return batch_outermost(output), ConvCache((columns, geometry))

    def _conv_forward_columns(self, inputs, weights, bias, geometry):
        """Columns ``(c, m, n, y', x', b)`` and output ``(k, y', x', b)``, split by output rows.

        ``weights=None``: the columns only.
        """
        windows = _padded_windows(inputs, geometry)
        columns = np.empty(geometry.columns_shape, dtype=inputs.dtype)
        flat_columns = columns.reshape((geometry.channels * geometry.kernel_size, -1))
        output = None
        if weights is not None:
            output = np.empty((weights.shape[0],) + geometry.output_shape + (inputs.shape[3],),
                              dtype=inputs.dtype)
            flat_weights = weights.reshape((weights.shape[0], -1))
            flat_output = output.reshape((weights.shape[0], -1))

        def output_rows(rows):
            # One copy per part: a part that needs the GIL less often runs better beside another.
            columns[:, :, :, rows[0]:rows[1]] = windows[:, :, :, rows[0]:rows[1]]
            if weights is not None:
                block = geometry.column_block(rows)
                np.matmul(flat_weights, flat_columns[:, block], out=flat_output[:, block])
                flat_output[:, block] += bias.reshape((-1, 1))

        rows = geometry.output_shape[0]
        self._parallel(output_rows, self._parts(rows, columns.size, MIN_PARALLEL_COLUMNS))
        return columns, output

    def _conv_forward_in_row_blocks(self, inputs, weights, bias, geometry):
        """Output ``(k, y', x', b)``, its columns built block by block in a cached buffer (none kept)."""
        windows = _padded_windows(inputs, geometry)
        column_rows = geometry.channels * geometry.kernel_size
        output = np.empty((weights.shape[0],) + geometry.output_shape + (inputs.shape[3],),
                          dtype=inputs.dtype)
        flat_weights = weights.reshape((weights.shape[0], -1))
        flat_output = output.reshape((weights.shape[0], -1))
        block_rows = max(1, BLOCK_BYTES // (column_rows * geometry.row_size * inputs.itemsize))

        def output_rows(rows):
            buffer = np.empty((column_rows, block_rows * geometry.row_size), dtype=inputs.dtype)
            for start in range(rows[0], rows[1], block_rows):
                stop = min(start + block_rows, rows[1])
                columns = buffer[:, :(stop - start) * geometry.row_size]
                # Each axis of the 2-D view splits on its own: a view, no copy.
                window_shape = geometry.columns_shape[:3] + (stop - start,) + geometry.columns_shape[4:]
                columns.reshape(window_shape)[...] = windows[:, :, :, start:stop]
                block = geometry.column_block((start, stop))
                np.matmul(flat_weights, columns, out=flat_output[:, block])
                flat_output[:, block] += bias.reshape((-1, 1))

        rows = geometry.output_shape[0]
        columns_size = geometry.columns_size(inputs.shape[3])
        self._parallel(output_rows, self._parts(rows, columns_size, MIN_PARALLEL_COLUMNS))
        return output

    def conv_backward(self, error, weights, cache, input_gradient=True):
        """Same contract as :meth:`xpnn.ops.Ops.conv_backward`."""
        if error.ndim == 3:
            gradients = self.conv_backward(error[..., None], weights[..., None], cache,
                                           input_gradient)
            gradient_input, gradient_weights, gradient_bias = gradients
            if gradient_input is not None:
                gradient_input = gradient_input[..., 0]
            return gradient_input, gradient_weights[..., 0], gradient_bias
        if isinstance(cache, ConvInputCache):  # after a testing-phase forward
            inputs, geometry = cache
            columns, _ = self._conv_forward_columns(inputs, None, None, geometry)
            cache = ConvCache((columns, geometry))
        if not isinstance(cache, ConvCache):
            return super().conv_backward(error, weights, cache, input_gradient)
        columns, geometry = cache
        flat_error = batch_innermost(error).reshape((weights.shape[0], -1))
        flat_weights = weights.reshape((weights.shape[0], -1))
        flat_columns = columns.reshape((flat_weights.shape[1], -1))
        gradient = None
        if input_gradient:
            gradient = zero_padded(geometry.input_shape, geometry.padding, error.dtype)
        job = functools.partial(conv_backward_job, flat_error, flat_weights, flat_columns,
                                gradient, geometry)
        jobs = self._conv_backward_jobs(geometry, columns.size, input_gradient, weights.shape[0])
        outcomes = self._parallel(job, jobs)
        partials = [outcome for outcome in outcomes if outcome is not None]
        gradient_bias = functools.reduce(np.add, (partial[0] for partial in partials))
        gradient_weights = functools.reduce(np.add, (partial[1] for partial in partials))
        gradient_weights = gradient_weights.reshape(weights.shape)
        if not input_gradient:
            return None, gradient_weights, gradient_bias
        interior = interior_view(gradient, geometry.input_shape, geometry.padding)
        return batch_outermost(interior), gradient_weights, gradient_bias

    def _conv_backward_jobs(self, geometry, columns_size, input_gradient, kernels):
        """The parts of a backward pass: ``None`` for the input gradient, output rows for the rest.

        The input gradient (a product, then col2im's many short ``+=`` calls)
        runs on the calling thread; the weight gradient splits by output rows
        over the others (two long calls each, the GIL released throughout),
        unless it is a small product (:data:`MIN_PARALLEL_WEIGHT_GRADIENT`).
        """
        products = kernels * geometry.channels * geometry.kernel_size
        splittable = columns_size if products >= MIN_PARALLEL_WEIGHT_GRADIENT else 0
        parts = len(self._parts(geometry.output_shape[0], splittable, MIN_PARALLEL_COLUMNS))
        weight_parts = parts - 1 if input_gradient and parts > 1 else parts
        rows = split_range(geometry.output_shape[0], weight_parts)
        return ([None] if input_gradient else []) + rows


def _padded_windows(inputs, geometry):
    """The window view (see ``window_view``) of a zero-padded copy of ``inputs`` (c, y, x, b)."""
    padded = zero_padded(inputs.shape, geometry.padding, inputs.dtype)
    interior_view(padded, inputs.shape, geometry.padding)[...] = inputs
    return window_view(padded, geometry)
