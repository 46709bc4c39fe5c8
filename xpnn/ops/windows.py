"""Sliding windows over the trailing (spatial) axes, and their adjoint.

These are the building blocks of im2col/col2im (convolution) and of max
pooling, written against the array API standard only: the standard has no
``pad``, no ``as_strided``/``sliding_window_view`` and no scatter-add, so

* padding allocates a zero buffer and assigns the interior slice,
* window extraction loops over the (few) window offsets, takes one strided
  slice of the padded input per offset and stacks them,
* the adjoint (accumulation) adds each offset's values back with ``+=`` into
  the same strided slice of a zero buffer, which sums where windows overlap;
  windows that tile the array (strides equal to the window, as 2x2 pooling
  with stride 2) are put back by one transposing copy instead.

The loops run over window offsets (e.g. 25 for a 5x5 kernel), never over the
batch or over output positions.

(List comprehensions rather than generator expressions in the small shape helpers: a
generator is entered again for every item, which a LeNet step paid some 90 times.)

Arrays have ``lead`` leading axes (batch, channels) followed by the spatial
axes; ``window_shape``, ``strides`` and ``padding`` have one entry per spatial
axis, ``padding`` as ``(before, after)`` pairs.
"""
import itertools
import math


def same_padding(kernel_shape):
    """Zero padding per spatial axis that keeps the size at stride 1 ("same").

    Parameters
    ----------
    kernel_shape : tuple of int

    Returns
    -------
    tuple of (int, int)
        ``(before, after)`` per axis, ``before + after = k - 1``; an even kernel
        pads one more at the end than at the start.
    """
    return tuple([((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_shape])


def no_padding(window_shape):
    """``(0, 0)`` per spatial axis ("valid")."""
    return ((0, 0),) * len(window_shape)


def window_output_shape(spatial_shape, window_shape, strides, padding):
    """Number of window positions per axis: ``(n + before + after - k) // s + 1``.

    With "same" padding this is ``ceil(n / s)``; with none, ``(n - k) // s + 1``.
    """
    return tuple([(n + before + after - k) // s + 1
                  for n, k, s, (before, after) in zip(spatial_shape, window_shape, strides, padding)])


def _is_unpadded(padding):
    return not any([before or after for before, after in padding])


def _interior(lead, spatial_shape, padding):
    """Index of the unpadded region inside a padded array."""
    return (slice(None),) * lead + tuple(
        [slice(before, before + n) for n, (before, _) in zip(spatial_shape, padding)])


def _padded_shape(shape, padding):
    lead = len(shape) - len(padding)
    return tuple(shape[:lead]) + tuple(
        [n + before + after for n, (before, after) in zip(shape[lead:], padding)])


def zero_pad(xp, device, x, padding):
    """Return ``x`` zero-padded on its trailing axes (``x`` itself when no padding).

    The standard has no ``pad``: allocate zeros and assign the interior.
    """
    if _is_unpadded(padding):
        return x
    padded = xp.zeros(_padded_shape(tuple(x.shape), padding), dtype=x.dtype, device=device)
    padded[_interior(x.ndim - len(padding), tuple(x.shape[x.ndim - len(padding):]), padding)] = x
    return padded


def _offset_slices(window_shape, strides, output_shape):
    """Spatial index per window offset, offsets in row-major order (a list).

    The slice for offset ``o`` picks ``o, o + s, ..., o + s*(m - 1)``; its stop
    is the tight ``o + s*(m - 1) + 1`` because strict indexing requires stops
    within the axis length. (Each axis's slices made once and combined by
    ``itertools.product``: a generator of tuples built per offset cost a LeNet
    training step about 480 Python frames.)
    """
    per_axis = [[slice(o, o + s * (m - 1) + 1, s) for o in range(k)]
                for k, s, m in zip(window_shape, strides, output_shape)]
    return list(itertools.product(*per_axis))


def extract_windows(xp, device, x, window_shape, strides, padding):
    """Gather every window of ``x`` (zero-padded by ``padding``).

    Parameters
    ----------
    xp, device : the backend's namespace and device
    x : array, shape ``lead_shape + spatial_shape``
    window_shape, strides : tuple of int, one per spatial axis
    padding : tuple of (int, int), one per spatial axis

    Returns
    -------
    array, shape ``lead_shape + (prod(window_shape),) + output_shape``
        Entry ``[..., w, p...]`` is the input at window offset ``w`` (row-major
        over ``window_shape``) of the window at output position ``p``.
    """
    rank = len(window_shape)
    lead = x.ndim - rank
    output_shape = window_output_shape(tuple(x.shape[lead:]), window_shape, strides, padding)
    padded = zero_pad(xp, device, x, padding)
    keep = (slice(None),) * lead
    slices = [padded[keep + spatial]
              for spatial in _offset_slices(window_shape, strides, output_shape)]
    return xp.stack(slices, axis=lead)


def accumulate_windows(xp, device, windows, spatial_shape, window_shape, strides, padding):
    """Adjoint of :func:`extract_windows`: add every window entry back where it came from.

    Parameters
    ----------
    windows : array, shape ``lead_shape + (prod(window_shape),) + output_shape``
    spatial_shape : tuple of int
        The unpadded spatial shape of the input that was windowed.

    Returns
    -------
    array, shape ``lead_shape + spatial_shape``
        Sums where windows overlap; entries that fell into the padding are
        dropped.
    """
    rank = len(window_shape)
    lead = windows.ndim - rank - 1
    lead_shape = tuple(windows.shape[:lead])
    output_shape = tuple(windows.shape[lead + 1:])
    if len(output_shape) != rank or windows.shape[lead] != math.prod(window_shape):
        raise ValueError(f"windows of shape {tuple(windows.shape)} do not match "
                         f"window_shape {tuple(window_shape)}")
    padded_shape = _padded_shape(lead_shape + tuple(spatial_shape), padding)
    if tuple(strides) == tuple(window_shape):
        padded = _untile(xp, device, windows, padded_shape, window_shape)
    else:
        padded = _sum_back(xp, device, windows, padded_shape, window_shape, strides)
    if _is_unpadded(padding):
        return padded
    return padded[_interior(lead, tuple(spatial_shape), padding)]


def _sum_back(xp, device, windows, padded_shape, window_shape, strides):
    """Windows added back into a zero array of ``padded_shape``, one offset at a time."""
    lead = windows.ndim - len(window_shape) - 1
    output_shape = tuple(windows.shape[lead + 1:])
    padded = xp.zeros(padded_shape, dtype=windows.dtype, device=device)
    keep = (slice(None),) * lead
    for offset, spatial in enumerate(_offset_slices(window_shape, strides, output_shape)):
        # Slices of different offsets overlap when windows do: += sums them.
        padded[keep + spatial] += windows[keep + (offset, ...)]
    return padded


def _untile(xp, device, windows, padded_shape, window_shape):
    """Windows that tile the array (strides equal to the window) put back in place.

    No two windows share an entry, so nothing is summed: the window axis is
    unfolded next to the output axes it belongs to, ``(..., o1, w1, o2, w2)``,
    and merged with them (one copy instead of two operations per offset); the
    rows and columns past the last whole window get zeros.
    """
    rank = len(window_shape)
    lead = windows.ndim - rank - 1
    lead_shape, output_shape = tuple(windows.shape[:lead]), tuple(windows.shape[lead + 1:])
    unfolded = xp.reshape(windows, lead_shape + tuple(window_shape) + output_shape)
    order = list(range(lead)) + [lead + axis for pair in
                                 zip(range(rank, 2 * rank), range(rank)) for axis in pair]
    covered = tuple([o * w for o, w in zip(output_shape, window_shape)])
    tiles = xp.reshape(xp.permute_dims(unfolded, tuple(order)), lead_shape + covered)
    if covered == tuple(padded_shape[lead:]):
        return tiles
    padded = xp.zeros(padded_shape, dtype=windows.dtype, device=device)
    padded[(slice(None),) * lead + tuple([slice(0, n) for n in covered])] = tiles
    return padded
