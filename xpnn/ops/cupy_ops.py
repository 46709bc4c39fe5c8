"""CuPy hot paths: one CUDA kernel where the generic code launches many.

On a GPU, a LeNet step of the generic array-API code is bound by the host:
every operation is a kernel launch that costs the Python side 10–30 µs while
the GPU finishes the work in a few. So the hot chains become one kernel each
(``cupy.ElementwiseKernel`` / ``cupy.ReductionKernel``, compiled on first use
and cached on disk by CuPy):

* sliding windows (im2col and its adjoint) for two spatial axes: one gather
  kernel each instead of a strided slice per kernel offset and a stack;
* max pooling for two spatial axes: window maximum and first arg-max in one
  kernel, the backward pass as one gather;
* batch normalization: statistics in two reductions, normalization in one
  kernel, the input gradient in one, the running statistics in one;
* dropout: mask, scale and output in one kernel after the draw;
* Adam (with an L2 regularizer's step): moments and weights in one kernel.

Every result equals the generic method's (:class:`xpnn.ops.Ops`) bit for bit
where the same operations run in the same order (windows, pooling, dropout)
and to rounding elsewhere (the compiler may fuse a multiply and an add);
``tests/test_cupy_ops.py`` compares each with the generic path. Other shapes
(one or three spatial axes) and batch-norm sums over several processes fall back to the
generic methods; ReLU always does (``kernels.RELU`` hides NaN, see ``CupyOps``).
"""
import math

import cupy

from xpnn.ops import Ops
from xpnn.ops import conv as _conv
from xpnn.ops import cupy_kernels as kernels
from xpnn.ops.windows import same_padding, window_output_shape

class CupyOps(Ops):
    """:class:`xpnn.ops.Ops` with fused CUDA kernels for the hot paths (see the module docstring)."""

    def compute_scope(self):
        """The backend's GPU as CuPy's current device for a whole pass.

        CuPy allocates and launches on the current device (the kernels of
        :mod:`xpnn.ops.cupy_kernels` and ``cupy.empty`` take no ``device=``),
        so a backend on ``device=1`` runs its passes there.
        """
        return self.backend.device

    # -- sliding windows -------------------------------------------------------
    def extract_windows(self, x, window_shape, strides, padding):
        if len(window_shape) != 2:
            return super().extract_windows(x, window_shape, strides, padding)
        x = cupy.ascontiguousarray(x)
        lead_shape, spatial_shape = tuple(x.shape[:-2]), tuple(x.shape[-2:])
        output_shape = window_output_shape(spatial_shape, tuple(window_shape), tuple(strides),
                                           tuple(padding))
        windows = cupy.empty(lead_shape + (math.prod(window_shape),) + output_shape, dtype=x.dtype)
        arguments = _window_args(spatial_shape, window_shape, output_shape, strides, padding)
        kernels.EXTRACT_WINDOWS(x, *arguments, windows)
        return windows

    def accumulate_windows(self, windows, spatial_shape, window_shape, strides, padding):
        if len(window_shape) != 2 or windows.ndim < 3 or windows.shape[-3] != math.prod(window_shape):
            return super().accumulate_windows(windows, spatial_shape, window_shape, strides, padding)
        windows = cupy.ascontiguousarray(windows)
        lead_shape, output_shape = tuple(windows.shape[:-3]), tuple(windows.shape[-2:])
        image = cupy.empty(lead_shape + tuple(spatial_shape), dtype=windows.dtype)
        arguments = _window_args(spatial_shape, window_shape, output_shape, strides, padding)
        kernels.ACCUMULATE_WINDOWS(windows, *arguments, image)
        return image

    # -- convolution: the generic layout, with the windows above -------------------
    def im2col(self, x, kernel_shape, strides):
        if len(kernel_shape) != 2:
            return super().im2col(x, kernel_shape, strides)
        windows = self.extract_windows(x, kernel_shape, strides, same_padding(kernel_shape))
        batch, rows = x.shape[0], x.shape[1] * math.prod(kernel_shape)
        return cupy.reshape(windows, (batch, rows, math.prod(windows.shape[3:])))

    def col2im(self, columns, spatial_shape, kernel_shape, strides):
        if len(kernel_shape) != 2:
            return super().col2im(columns, spatial_shape, kernel_shape, strides)
        padding = same_padding(kernel_shape)
        output_shape = window_output_shape(tuple(spatial_shape), tuple(kernel_shape),
                                           tuple(strides), padding)
        kernel_size = math.prod(kernel_shape)
        windows = cupy.reshape(columns, (columns.shape[0], columns.shape[1] // kernel_size,
                                         kernel_size) + output_shape)
        return self.accumulate_windows(windows, spatial_shape, kernel_shape, strides, padding)

    def conv_forward(self, x, weights, bias, strides, need_backward=True):
        return _conv.conv_forward(self.xp, self.backend.device, x, weights, bias, tuple(strides),
                                  make_columns=self.im2col)

    def conv_backward(self, error, weights, cache, input_gradient=True):
        return _conv.conv_backward(self.xp, self.backend.device, error, weights, cache,
                                   input_gradient, sum_columns=self.col2im)

    # -- max pooling -----------------------------------------------------------
    def max_pool_forward(self, x, pool_shape, strides):
        if len(pool_shape) != 2:
            return super().max_pool_forward(x, pool_shape, strides)
        x = cupy.ascontiguousarray(x)
        lead_shape, spatial_shape = tuple(x.shape[:-2]), tuple(x.shape[-2:])
        padding = ((0, 0), (0, 0))
        output_shape = window_output_shape(spatial_shape, tuple(pool_shape), tuple(strides), padding)
        output = cupy.empty(lead_shape + output_shape, dtype=x.dtype)
        first_max = cupy.empty(lead_shape + output_shape, dtype=cupy.int64)
        arguments = _window_args(spatial_shape, pool_shape, output_shape, strides, padding)
        kernels.MAX_POOL(x, *arguments, output, first_max)
        # The generic cache: either backward can use it.
        return output, (first_max, spatial_shape, tuple(pool_shape), tuple(strides))

    def max_pool_backward(self, error, cache):
        first_max, spatial_shape, pool_shape, strides = cache
        if len(pool_shape) != 2:
            return super().max_pool_backward(error, cache)
        error = cupy.ascontiguousarray(error)
        first_max = cupy.ascontiguousarray(first_max)
        lead_shape, output_shape = tuple(error.shape[:-2]), tuple(error.shape[-2:])
        gradient = cupy.empty(lead_shape + tuple(spatial_shape), dtype=error.dtype)
        kernels.MAX_POOL_BACKWARD(error, first_max, *_window_args(
            spatial_shape, pool_shape, output_shape, strides, ((0, 0), (0, 0))), gradient)
        return gradient

    # -- ReLU ------------------------------------------------------------------
    # The generic methods: kernels.RELU (``x > 0 ? x : 0``) sends NaN to +0, which hid a
    # non-finite input from the loss; a kernel that keeps NaN lands only with a GPU run.

    # -- batch normalization ---------------------------------------------------
    def batch_norm_forward(self, x, gamma, beta, eps, axes, statistics=None, all_sum=None):
        if all_sum is not None:  # a batch spread over processes: the generic sums over them
            return super().batch_norm_forward(x, gamma, beta, eps, axes, statistics, all_sum)
        axes = tuple(axes)
        channels = x.shape[1]
        vector_shape = (1, channels) + (1,) * (x.ndim - 2)
        if statistics is None:
            mean = cupy.mean(x, axis=axes, keepdims=True)
            squares = kernels.CENTERED_SQUARES(x, mean, axis=axes, keepdims=True)
            variance, inverse_std = kernels.VARIANCE(squares, float(x.size // channels), float(eps))
        else:
            mean, variance = (cupy.reshape(statistic, vector_shape) for statistic in statistics)
            inverse_std = kernels.INVERSE_STD(variance, float(eps))
        normalized, output = kernels.NORMALIZE(x, mean, inverse_std,
                                               cupy.reshape(gamma, vector_shape),
                                               cupy.reshape(beta, vector_shape))
        used = (cupy.reshape(mean, (channels,)), cupy.reshape(variance, (channels,)))
        # The generic cache: either backward can use it.
        return output, used, (normalized, inverse_std, axes, statistics is None, None)

    def batch_norm_backward(self, error, gamma, cache):
        normalized, inverse_std, axes, batch_statistics, all_sum = cache
        if all_sum is not None or not batch_statistics:
            return super().batch_norm_backward(error, gamma, cache)
        gradient_gamma = kernels.PRODUCT_SUM(error, normalized, axis=axes)
        gradient_beta = cupy.sum(error, axis=axes)
        vector_shape = tuple(inverse_std.shape)
        gradient_input = kernels.BATCH_NORM_INPUT_GRADIENT(
            error, normalized, cupy.reshape(gamma, vector_shape), inverse_std,
            cupy.reshape(gradient_beta, vector_shape), cupy.reshape(gradient_gamma, vector_shape),
            float(error.size // error.shape[1]))
        return gradient_input, gradient_gamma, gradient_beta

    def batch_norm_running_statistics(self, running_mean, running_variance, mean, variance,
                                      decay):
        return kernels.RUNNING_STATISTICS(running_mean, running_variance, mean, variance, decay,
                                   1.0 - decay)

    # -- dropout ----------------------------------------------------------------
    def dropout_forward(self, x, draws, probability):
        if draws.dtype != x.dtype:  # one kernel type T: leave mixed dtypes to the generic path
            return super().dropout_forward(x, draws, probability)
        mask, scale, output = kernels.DROPOUT(x, draws, probability)
        return output, mask, scale

    # -- optimizers ------------------------------------------------------------
    def adam_update(self, weights, gradient, moments, mu, rho, step_size,
                    inverse_root_correction, epsilon, learning_rate=0.0, decay=0.0):
        first_moment, second_moment, _ = moments
        if not weights.dtype == gradient.dtype == first_moment.dtype == second_moment.dtype:
            # One kernel type T: integer weights (float moments) or a gradient of another
            # dtype go the generic way, which promotes as NumPy does.
            return super().adam_update(weights, gradient, moments, mu, rho, step_size,
                                       inverse_root_correction, epsilon, learning_rate, decay)
        updated = cupy.empty_like(weights)
        kernels.ADAM(weights, gradient, mu, 1.0 - mu, rho, 1.0 - rho, inverse_root_correction,
                     epsilon, step_size, learning_rate, decay, first_moment, second_moment,
                     updated)
        return updated


def _window_args(spatial_shape, window_shape, output_shape, strides, padding):
    """The scalar arguments shared by the window kernels, in ``kernels.WINDOW_PARAMS`` order."""
    return (spatial_shape[0], spatial_shape[1], window_shape[0], window_shape[1],
            output_shape[0], output_shape[1], strides[0], strides[1],
            padding[0][0], padding[1][0])
