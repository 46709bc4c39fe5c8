"""Independent NumPy references for convolution and max pooling (direct loops, float64).

Written from the definitions, not from xpnn's code: explicit ``np.pad``, a
Python loop over output positions, ``np.argmax`` on each flattened window.
Slow, so tests keep shapes small.
"""
import math

import numpy as np


def same_pads(kernel_shape):
    """``(before, after)`` per axis; even kernels pad one more at the end."""
    return [((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in kernel_shape]


def conv_forward(x, weights, bias, strides):
    """"Same"-padded strided cross-correlation.

    x (b, c, *n), weights (k, c, *m), bias (k,) -> (b, k, *ceil(n / s)).
    """
    kernel_shape = weights.shape[2:]
    padded = np.pad(x, [(0, 0), (0, 0)] + same_pads(kernel_shape))
    output_shape = tuple(math.ceil(n / s) for n, s in zip(x.shape[2:], strides))
    output = np.zeros((x.shape[0], weights.shape[0]) + output_shape)
    for position in np.ndindex(output_shape):
        window = padded[(slice(None), slice(None)) + tuple(
            slice(p * s, p * s + k) for p, s, k in zip(position, strides, kernel_shape))]
        value = np.tensordot(window, weights, axes=(list(range(1, x.ndim)), list(range(1, x.ndim))))
        output[(slice(None), slice(None)) + position] = value + bias
    return output


def conv_backward(x, weights, strides, error):
    """Gradients (input, weights, bias) of :func:`conv_forward` for output gradient ``error``."""
    kernel_shape = weights.shape[2:]
    pads = same_pads(kernel_shape)
    padded = np.pad(x, [(0, 0), (0, 0)] + pads)
    gradient_padded = np.zeros_like(padded)
    gradient_weights = np.zeros_like(weights)
    for position in np.ndindex(error.shape[2:]):
        index = (slice(None), slice(None)) + tuple(
            slice(p * s, p * s + k) for p, s, k in zip(position, strides, kernel_shape))
        local_error = error[(slice(None), slice(None)) + position]          # (b, k)
        gradient_weights += np.tensordot(local_error, padded[index], axes=([0], [0]))
        gradient_padded[index] += np.tensordot(local_error, weights, axes=([1], [0]))
    interior = (slice(None), slice(None)) + tuple(
        slice(before, before + n) for (before, _), n in zip(pads, x.shape[2:]))
    gradient_bias = error.sum(axis=(0,) + tuple(range(2, error.ndim)))
    return gradient_padded[interior], gradient_weights, gradient_bias


def im2col(x, kernel_shape, strides):
    """Columns (b, c*K, P): row = channel*K + row-major kernel offset, column = output position."""
    padded = np.pad(x, [(0, 0), (0, 0)] + same_pads(kernel_shape))
    output_shape = tuple(math.ceil(n / s) for n, s in zip(x.shape[2:], strides))
    batch, channels = x.shape[:2]
    columns = np.zeros((batch, channels * math.prod(kernel_shape), math.prod(output_shape)))
    for column, position in enumerate(np.ndindex(output_shape)):
        for row_offset, offset in enumerate(np.ndindex(tuple(kernel_shape))):
            index = tuple(p * s + o for p, s, o in zip(position, strides, offset))
            for channel in range(channels):
                row = channel * math.prod(kernel_shape) + row_offset
                columns[:, row, column] = padded[(slice(None), channel) + index]
    return columns


def max_pool_forward(x, pool_shape, strides):
    """"Valid" max pooling of (b, c, y, x)."""
    output_shape = tuple((n - p) // s + 1 for n, p, s in zip(x.shape[2:], pool_shape, strides))
    output = np.zeros(x.shape[:2] + output_shape)
    for i, j in np.ndindex(output_shape):
        window = x[:, :, i * strides[0]:i * strides[0] + pool_shape[0],
                   j * strides[1]:j * strides[1] + pool_shape[1]]
        output[:, :, i, j] = window.max(axis=(2, 3))
    return output


def max_pool_backward(x, pool_shape, strides, error):
    """Each error goes to its window's first maximum (row-major); overlapping windows sum."""
    gradient = np.zeros_like(x)
    for b, c, i, j in np.ndindex(error.shape):
        top, left = i * strides[0], j * strides[1]
        window = x[b, c, top:top + pool_shape[0], left:left + pool_shape[1]]
        row, col = np.unravel_index(np.argmax(window), window.shape)
        gradient[b, c, top + row, left + col] += error[b, c, i, j]
    return gradient


def relative_error(actual, expected):
    """max |actual - expected| / max |expected| (0 when both vanish)."""
    scale = np.max(np.abs(expected))
    if scale == 0:
        return float(np.max(np.abs(actual)))
    return float(np.max(np.abs(actual - expected)) / scale)
