"""Max pooling ("valid", any window and stride, overlapping windows allowed).

Forward stacks every window offset's strided slice into ``(b, c, K, *output)``
(``K = prod(pool_shape)``) and reduces over the window axis. Backward sends
each error to its window's FIRST maximum (``argmax`` returns the first
occurrence, as the standard requires): the error where the window offset is
the arg-max, zero elsewhere, then the windows' adjoint (``+=`` into strided
slices) sums where windows overlap. Scatter-add is not in the standard, and an
equality mask would send the error to every tied maximum (real images with
zero backgrounds tie), so both are avoided.
"""
import math

from xpnn.ops.windows import accumulate_windows, extract_windows, no_padding


def max_pool_forward(xp, device, x, pool_shape, strides):
    """Max over every window of ``x``.

    Parameters
    ----------
    x : array, shape ``lead_shape + spatial_shape``
    pool_shape, strides : tuple of int, one per spatial axis

    Returns
    -------
    output : array, shape ``lead_shape + output_shape``,
        ``output_shape = (n - p) // s + 1`` per axis
    cache : tuple
        What :func:`max_pool_backward` needs; opaque to callers.
    """
    lead = x.ndim - len(pool_shape)
    windows = extract_windows(xp, device, x, pool_shape, strides, no_padding(pool_shape))
    first_max = xp.argmax(windows, axis=lead)
    output = xp.max(windows, axis=lead)
    cache = (first_max, tuple(x.shape[lead:]), tuple(pool_shape), tuple(strides))
    return output, cache


def max_pool_backward(xp, device, error, cache):
    """Route ``error`` (shape of the forward output) to each window's first maximum.

    Returns
    -------
    array, shape of the forward input
    """
    first_max, spatial_shape, pool_shape, strides = cache
    rank = len(pool_shape)
    lead = error.ndim - rank
    window_size = math.prod(pool_shape)
    offsets = xp.arange(window_size, dtype=first_max.dtype, device=device)
    offsets = xp.reshape(offsets, (1,) * lead + (window_size,) + (1,) * rank)
    is_first_max = xp.expand_dims(first_max, axis=lead) == offsets
    routed = xp.where(is_first_max, xp.expand_dims(error, axis=lead), 0.0)
    return accumulate_windows(xp, device, routed, spatial_shape, pool_shape, strides,
                              no_padding(pool_shape))
