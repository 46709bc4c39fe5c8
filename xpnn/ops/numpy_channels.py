"""NumPy fast paths of ReLU, batch normalization and 2x2 max pooling for :class:`xpnn.ops.numpy_ops.NumpyOps`.

:class:`ChannelPaths` holds NumpyOps's methods that work channel by channel on
the batch-innermost layout (see :mod:`xpnn.ops.numpy_ops`); NumpyOps inherits
them, and they split their work with its ``_parallel`` and ``_parts``, one
part per group of channels.
"""
import numpy as np

from xpnn.ops.numpy_columns import (
    NormCache,
    NormState,
    PoolCache,
    batch_innermost,
    batch_outermost,
    channel_index,
    normalize_channels,
    normalize_with_all_sum,
    pool_quarters,
    row_dots,
    same_width_integer)


class ChannelPaths:
    """NumpyOps's ReLU, batch-norm and max-pooling methods (same contracts as :class:`xpnn.ops.Ops`'s)."""

    # -- ReLU -------------------------------------------------------------------
    def relu_forward(self, x, need_backward=True):
        """Same results as :meth:`xpnn.ops.Ops.relu_forward`, bit for bit (NaN stays NaN).

        ``np.where`` branches per element and costs ~5 ns per value on a
        ReLU's random sign pattern; AND-ing the value's bits with an integer
        mask of all ones (keep) or zeros (+0.0) is branch-free and ~10x faster.
        The mask is that integer array (same memory order as ``x``): ``x <= 0``
        (1 or 0) minus 1 gives 0 (drop) or -1 (all ones, keep); NaN compares
        false and is kept. ``need_backward`` changes nothing here: ``fmax``,
        the one-pass form the testing phase once used, sends NaN to +0.
        """
        output = np.empty_like(x)
        integer = same_width_integer(x.dtype)
        mask = np.empty_like(x, dtype=integer)

        def channels(part):
            index = channel_index(part)
            np.subtract(np.less_equal(x[index], 0.0).view(np.int8), 1, dtype=integer,
                        out=mask[index])
            np.bitwise_and(x[index].view(integer), mask[index], out=output[index].view(integer))

        self._parallel(channels, self._channel_parts(x))
        return output, mask

    def relu_backward(self, error, mask):
        """Same results as :meth:`xpnn.ops.Ops.relu_backward`, bit for bit."""
        if not (isinstance(mask, np.ndarray) and mask.dtype.kind in "if"):
            return super().relu_backward(error, mask)
        integer = same_width_integer(error.dtype)
        if mask.dtype.kind == "f":  # a forward output given as the mask: keep where it is not +0
            mask = np.subtract(np.equal(mask, 0.0).view(np.int8), 1, dtype=integer)
        elif mask.dtype != integer:
            mask = mask.astype(integer)
        output = np.empty_like(error)

        def channels(part):
            index = channel_index(part)
            np.bitwise_and(error[index].view(integer), mask[index],
                           out=output[index].view(integer))

        self._parallel(channels, self._channel_parts(error))
        return output

    def _channel_parts(self, x):
        """Parts along axis 1 (the channels) of an activation, or one part."""
        if x.ndim < 2:
            return [None]
        return self._parts(x.shape[1], x.size)

    # -- batch normalization ----------------------------------------------------
    def batch_norm_forward(self, x, gamma, beta, eps, axes, statistics=None, all_sum=None):
        """Same contract as :meth:`xpnn.ops.Ops.batch_norm_forward` (cache differs; opaque).

        Images are normalized as a ``(c, y*x*b)`` matrix (free for the
        batch-innermost views the other fast paths return): every reduction
        runs along contiguous rows, where the generic reduction over axes
        (0, 2, 3) walks the array with strides (~7x slower here).
        """
        if x.ndim != 4 or tuple(axes) != (0, 2, 3):
            return super().batch_norm_forward(x, gamma, beta, eps, axes, statistics, all_sum)
        inputs = batch_innermost(x)
        rows = inputs.reshape((inputs.shape[0], -1))
        state = NormState(rows, statistics)
        if all_sum is not None and statistics is None:
            normalize_with_all_sum(state, rows, gamma, beta, eps, all_sum)
        else:
            def channels(part):
                normalize_channels(state, rows, gamma, beta, eps, slice(*part))

            self._parallel(channels, self._parts(rows.shape[0], rows.size))
            all_sum = None
        output = batch_outermost(state.output.reshape(inputs.shape))
        cache = NormCache((state.normalized, state.inverse_std, statistics is None, all_sum))
        return output, (state.mean, state.variance), cache

    def batch_norm_backward(self, error, gamma, cache):
        """Same contract as :meth:`xpnn.ops.Ops.batch_norm_backward`."""
        if not isinstance(cache, NormCache):
            return super().batch_norm_backward(error, gamma, cache)
        normalized, inverse_std, batch_statistics, all_sum = cache
        errors = batch_innermost(error)
        rows = errors.reshape(normalized.shape)
        gradient = np.empty_like(rows)
        gradient_gamma = np.empty(rows.shape[0], dtype=rows.dtype)
        gradient_beta = np.empty(rows.shape[0], dtype=rows.dtype)
        totals = None  # the whole batch's (count, Σ e x̂, Σ e) when this process holds part of it

        def channels(part):
            c = slice(*part)
            if totals is None:  # (else computed below, before the sums over the processes)
                gradient_beta[c] = rows[c].sum(axis=1)
                gradient_gamma[c] = row_dots(rows[c], normalized[c])
            scale = (gamma[c] * inverse_std[c])[:, None]
            if not batch_statistics:
                np.multiply(rows[c], scale, out=gradient[c])
                return
            count, projection, error_sum = totals or (rows.shape[1], gradient_gamma, gradient_beta)
            # (e - mean(e) - x̂ mean(e x̂)) γ/σ: γ is per channel, so it factors out of the means.
            np.multiply(normalized[c], (projection[c] / count)[:, None], out=gradient[c])
            np.subtract(rows[c], gradient[c], out=gradient[c])
            gradient[c] -= (error_sum[c] / count)[:, None]
            gradient[c] *= scale

        if all_sum is None:
            self._parallel(channels, self._parts(rows.shape[0], rows.size))
        else:  # the sums over every process first (all_sum), then this process's rows
            gradient_beta[...] = rows.sum(axis=1)
            gradient_gamma[...] = row_dots(rows, normalized)
            totals = all_sum(rows.shape[1], gradient_gamma, gradient_beta)
            channels((0, rows.shape[0]))
        return batch_outermost(gradient.reshape(errors.shape)), gradient_gamma, gradient_beta

    # -- max pooling ----------------------------------------------------------
    def max_pool_forward(self, x, pool_shape, strides):
        """Same contract as :meth:`xpnn.ops.Ops.max_pool_forward` (cache differs; opaque).

        The maximum of the four strided quarter-slices; three boolean arrays
        record where each window's first maximum (row-major) lies: the top
        row wins ties with the bottom row, the left column with the right one.
        A NaN counts as the maximum and the first NaN wins, as with the generic
        path's ``argmax`` (see :func:`_route_to_first_nan`).
        """
        if x.ndim != 4 or tuple(pool_shape) != (2, 2) or tuple(strides) != (2, 2):
            return super().max_pool_forward(x, pool_shape, strides)
        inputs = batch_innermost(x)
        pooled_shape = (inputs.shape[0], inputs.shape[1] // 2, inputs.shape[2] // 2, inputs.shape[3])
        output = np.empty(pooled_shape, dtype=x.dtype)
        routing = tuple(np.empty(pooled_shape, dtype=bool) for _ in range(3))

        def channels(part):
            c = slice(*part)
            quarters = pool_quarters(inputs[c])
            top = np.maximum(quarters[0], quarters[1])
            bottom = np.maximum(quarters[2], quarters[3])
            np.maximum(top, bottom, out=output[c])
            # np.maximum propagates NaN: the largest pooled value of the part
            # (a quarter of its input, just written, in cache) is NaN exactly
            # when a window holds one.
            holds_nan = output[c].size and np.isnan(np.maximum.reduce(output[c], axis=None))
            np.greater_equal(top, bottom, out=routing[0][c])
            np.greater_equal(quarters[0], quarters[1], out=routing[1][c])
            np.greater_equal(quarters[2], quarters[3], out=routing[2][c])
            if holds_nan:  # ``>=`` is false against a NaN
                _route_to_first_nan(quarters, top, routing, c)

        self._parallel(channels, self._parts(inputs.shape[0], inputs.size))
        return batch_outermost(output), PoolCache((tuple(inputs.shape), routing))

    def max_pool_backward(self, error, cache):
        """Same contract as :meth:`xpnn.ops.Ops.max_pool_backward`."""
        if not isinstance(cache, PoolCache):
            return super().max_pool_backward(error, cache)
        input_shape, (top_wins, left_wins_top, left_wins_bottom) = cache
        error = batch_innermost(error)
        gradient = np.empty(input_shape, dtype=error.dtype)
        # An odd last row or column lies in no window.
        gradient[:, input_shape[1] // 2 * 2:] = 0.0
        gradient[:, :, input_shape[2] // 2 * 2:] = 0.0

        def channels(part):
            c = slice(*part)
            quarters = pool_quarters(gradient[c])
            top_error = error[c] * top_wins[c]
            bottom_error = error[c] - top_error
            np.multiply(top_error, left_wins_top[c], out=quarters[0])
            np.subtract(top_error, quarters[0], out=quarters[1])
            np.multiply(bottom_error, left_wins_bottom[c], out=quarters[2])
            np.subtract(bottom_error, quarters[2], out=quarters[3])

        self._parallel(channels, self._parts(input_shape[0], gradient.size))
        return batch_outermost(gradient)


def _route_to_first_nan(quarters, top, routing, part):
    """Make the 2x2 routing of ``part`` (channels) send a window holding a NaN to its first NaN.

    A comparison ``a >= b`` is false when either is NaN; ``(a >= b) | isnan(a)``
    also picks ``a`` when it is NaN, and still ``b`` when only ``b`` is. ``top``
    is NaN exactly when the top row holds one, which then comes first
    (row-major), as NumPy's ``argmax`` has it.
    """
    routing[0][part] |= np.isnan(top)
    routing[1][part] |= np.isnan(quarters[0])
    routing[2][part] |= np.isnan(quarters[2])
