"""Convolution ("same"-padded cross-correlation with strides) as im2col + one matmul.

Column layout (channel-first, batch outermost)
----------------------------------------------
``columns`` has shape ``(b, c*K, P)`` where ``K = prod(kernel_shape)`` and
``P = prod(output_shape)``: row ``ch*K + w`` holds channel ``ch`` at kernel
offset ``w`` (row-major over the kernel), column ``p`` is output position
``p`` (row-major over the output). It is a free reshape of the stacked windows
``(b, c, K, *output_shape)`` and matches ``weights`` reshaped to
``(num_kernels, c*K)``, so

* forward:          ``(k, c*K) @ (b, c*K, P) -> (b, k, P)``, reshaped to
  ``(b, k, *output_shape)`` with no transpose;
* weight gradient:  ``(b, k, P) @ (b, P, c*K) -> (b, k, c*K)``, summed over b;
* input gradient:   the "full" correlation of the error with the kernels
  flipped and their channel axes swapped: the error spread onto a zero grid
  (entry ``p`` at ``after + s*p`` per axis), its stride-1 columns
  ``(b, k*K, N)`` (``N = prod(spatial_shape)``), then
  ``(c, k*K) @ (b, k*K, N) -> (b, c, N)``.

Each is a single (batched) ``xp.matmul``; no Python loop over the batch or
over output positions. The input gradient by correlation takes a few array
operations where col2im, the adjoint of im2col, takes two per kernel offset
(the standard has no scatter-add), at the cost of multiplying the zeros
between a strided error's entries. A backend may override these functions
(through :class:`xpnn.ops.Ops`) with another internal layout, e.g.
batch-innermost, or pass its own col2im to :func:`conv_backward`.
"""
import math

from xpnn.ops.windows import (
    accumulate_windows,
    extract_windows,
    no_padding,
    same_padding,
    window_output_shape,
)


def same_output_shape(spatial_shape, kernel_shape, strides):
    """Output spatial shape of a "same" convolution with strides: ``ceil(n / s)`` per axis."""
    return window_output_shape(spatial_shape, kernel_shape, strides, same_padding(kernel_shape))


def im2col(xp, device, x, kernel_shape, strides):
    """Columns of a "same"-padded strided cross-correlation.

    Parameters
    ----------
    x : array, shape ``(b, c, *spatial_shape)``
    kernel_shape, strides : tuple of int, one per spatial axis

    Returns
    -------
    array, shape ``(b, c*prod(kernel_shape), prod(output_shape))``
        See the module docstring for the layout.
    """
    windows = extract_windows(xp, device, x, kernel_shape, strides, same_padding(kernel_shape))
    batch, channels = x.shape[0], x.shape[1]
    positions = math.prod(windows.shape[3:])
    return xp.reshape(windows, (batch, channels * math.prod(kernel_shape), positions))


def col2im(xp, device, columns, spatial_shape, kernel_shape, strides):
    """Adjoint of :func:`im2col`: sum column entries back into ``(b, c, *spatial_shape)``."""
    kernel_size = math.prod(kernel_shape)
    batch, rows = columns.shape[0], columns.shape[1]
    output_shape = same_output_shape(spatial_shape, kernel_shape, strides)
    windows = xp.reshape(columns, (batch, rows // kernel_size, kernel_size) + output_shape)
    return accumulate_windows(xp, device, windows, spatial_shape, kernel_shape, strides,
                              same_padding(kernel_shape))


def conv_forward(xp, device, x, weights, bias, strides, make_columns=None):
    """"Same"-padded strided cross-correlation plus bias.

    Parameters
    ----------
    x : array, shape ``(b, c, *spatial_shape)``
    weights : array, shape ``(k, c, *kernel_shape)``
    bias : array, shape ``(k,)``
    strides : tuple of int, one per spatial axis
    make_columns : callable ``(x, kernel_shape, strides) -> columns``, optional
        A backend's own :func:`im2col` (same layout); by default this module's.

    Returns
    -------
    output : array, shape ``(b, k, *output_shape)``
    cache : tuple
        What :func:`conv_backward` needs (the columns and the input's shape);
        opaque to callers.
    """
    kernels = weights.shape[0]
    kernel_shape = tuple(weights.shape[2:])
    spatial_shape = tuple(x.shape[2:])
    if make_columns is None:
        columns = im2col(xp, device, x, kernel_shape, strides)
    else:
        columns = make_columns(x, kernel_shape, strides)
    flat_weights = xp.reshape(weights, (kernels, columns.shape[1]))
    output_shape = same_output_shape(spatial_shape, kernel_shape, strides)
    products = xp.matmul(flat_weights, columns)
    output = xp.reshape(products, (x.shape[0], kernels) + output_shape)
    output = output + xp.reshape(bias, (1, kernels) + (1,) * len(kernel_shape))
    return output, (columns, spatial_shape, tuple(strides))


def conv_backward(xp, device, error, weights, cache, input_gradient=True, sum_columns=None):
    """Gradients of :func:`conv_forward`.

    Parameters
    ----------
    error : array, shape ``(b, k, *output_shape)``
        Gradient of the loss with respect to the forward output.
    weights : array, shape ``(k, c, *kernel_shape)``
        The weights the forward pass used.
    cache : tuple
        The cache :func:`conv_forward` returned.
    input_gradient : bool
        Compute the gradient with respect to the input (a first layer does
        not need it).
    sum_columns : callable ``(columns, spatial_shape, kernel_shape, strides) -> image``, optional
        A backend's own :func:`col2im` (one kernel on a GPU), applied to the
        column gradient ``(c*K, k) @ (b, k, P)``; by default the input
        gradient is :func:`input_gradient_by_correlation`.

    Returns
    -------
    gradient_input : array ``(b, c, *spatial_shape)`` or None
    gradient_weights : array ``(k, c, *kernel_shape)``
    gradient_bias : array ``(k,)``
    """
    columns, spatial_shape, strides = cache
    batch, kernels = error.shape[0], error.shape[1]
    flat_error = xp.reshape(error, (batch, kernels, columns.shape[2]))
    gradient_bias = xp.sum(flat_error, axis=(0, 2))
    per_sample = xp.matmul(flat_error, xp.permute_dims(columns, (0, 2, 1)))
    gradient_weights = xp.reshape(xp.sum(per_sample, axis=0), tuple(weights.shape))
    if not input_gradient:
        return None, gradient_weights, gradient_bias
    if sum_columns is None:
        return (input_gradient_by_correlation(xp, device, error, weights, spatial_shape, strides),
                gradient_weights, gradient_bias)
    flat_weights = xp.reshape(weights, (kernels, columns.shape[1]))
    column_gradient = xp.matmul(xp.permute_dims(flat_weights, (1, 0)), flat_error)
    gradient_input = sum_columns(column_gradient, spatial_shape, tuple(weights.shape[2:]), strides)
    return gradient_input, gradient_weights, gradient_bias


def input_gradient_by_correlation(xp, device, error, weights, spatial_shape, strides):
    """Gradient of :func:`conv_forward` with respect to its input, as one correlation.

    Input entry ``i`` received ``W[w] * e[p]`` wherever ``s*p + w - before = i``
    (per axis, ``before``/``after`` the "same" padding). Put ``e[p]`` at
    ``after + s*p`` of a zero grid of ``n + K - 1`` entries; then entry ``i``
    is the valid, stride-1 correlation of that grid with the kernel flipped,
    ``sum_w' W[K-1-w'] grid[i + w']``, summed over the kernels (their channel
    axes swapped with the input's).

    Parameters
    ----------
    error : array, shape ``(b, k, *output_shape)``
    weights : array, shape ``(k, c, *kernel_shape)``
    spatial_shape, strides : tuple of int
        The forward input's spatial shape and the strides.

    Returns
    -------
    array, shape ``(b, c, *spatial_shape)``
    """
    kernels, channels = weights.shape[0], weights.shape[1]
    kernel_shape = tuple(weights.shape[2:])
    rank = len(kernel_shape)
    batch, output_shape = error.shape[0], tuple(error.shape[2:])
    grid = xp.zeros((batch, kernels) + tuple([n + k - 1 for n, k in zip(spatial_shape, kernel_shape)]),
                    dtype=error.dtype, device=device)
    spread = tuple([slice(after, after + s * (m - 1) + 1, s) for (_, after), s, m
                    in zip(same_padding(kernel_shape), strides, output_shape)])
    grid[(slice(None), slice(None)) + spread] = error
    windows = extract_windows(xp, device, grid, kernel_shape, (1,) * rank, no_padding(kernel_shape))
    columns = xp.reshape(windows, (batch, kernels * math.prod(kernel_shape), math.prod(spatial_shape)))
    flipped = xp.flip(weights, axis=tuple(range(2, 2 + rank)))
    flipped = xp.permute_dims(xp.reshape(flipped, (kernels, channels, -1)), (1, 0, 2))
    products = xp.matmul(xp.reshape(flipped, (channels, columns.shape[1])), columns)
    return xp.reshape(products, (batch, channels) + tuple(spatial_shape))
