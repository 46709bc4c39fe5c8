"""Batch normalization's array work (array API standard only).

Statistics are per channel (axis 1) over ``axes`` (the batch axis, and the
spatial axes of an image): reducing an image over ``(0, 2, 3)`` in place gives
exactly the statistics of its ``(b*y*x, channels)`` reformatted matrix over
rows, without the transposing copies.
"""


def _vector_shape(ndim, channels):
    """Shape in which a per-channel vector broadcasts against the input: ``(1, c[, 1, 1])``."""
    return (1, channels) + (1,) * (ndim - 2)


def batch_norm_forward(xp, x, gamma, beta, eps, axes, statistics=None, all_sum=None):
    """Normalize ``x`` per channel, then scale by ``gamma`` and shift by ``beta``.

    Parameters
    ----------
    x : array, shape ``(b, c)`` or ``(b, c, y, x)``
    gamma, beta : arrays, shape ``(c,)``
    eps : float
        Added to the variance before the square root.
    axes : tuple of int
        The axes the statistics run over (every axis but 1).
    statistics : (mean, variance) of shape ``(c,)``, optional
        Use these (testing phase); by default the batch's own (biased)
        statistics are computed (training).
    all_sum : callable, optional
        For ``x`` the rows one process holds of a batch spread over several
        (:meth:`xpnn.layers.BatchNormalization.statistics_sum`):
        ``all_sum(*values)`` returns a tuple of each value summed over every
        process (the values are arrays, and the count of values a channel's
        statistics run over as a Python int, first), so that the statistics
        (and, in backward, the gradient's means) are those of the whole batch.

    Returns
    -------
    output : array, the shape of ``x``
    statistics : (mean, variance), shape ``(c,)`` each
        The statistics used.
    cache : tuple
        What :func:`batch_norm_backward` needs; opaque to callers.
    """
    channels = x.shape[1]
    vector_shape = _vector_shape(x.ndim, channels)
    if statistics is None and all_sum is not None:
        count, total = all_sum(_count(x, axes), xp.sum(x, axis=axes, keepdims=True))
        mean = total / count
        centered = x - mean
        variance = all_sum(xp.sum(centered * centered, axis=axes, keepdims=True))[0] / count
    elif statistics is None:
        # Two calls (the standard's var: biased, correction 0) instead of a product array
        # and a second mean over the centered input.
        mean = xp.mean(x, axis=axes, keepdims=True)
        variance = xp.var(x, axis=axes, keepdims=True)
        centered = x - mean
    else:
        mean, variance = (xp.reshape(statistic, vector_shape) for statistic in statistics)
        centered = x - mean
    inverse_std = (variance + eps) ** -0.5
    normalized = centered * inverse_std
    output = xp.reshape(gamma, vector_shape) * normalized + xp.reshape(beta, vector_shape)
    used = (xp.reshape(mean, (channels,)), xp.reshape(variance, (channels,)))
    return output, used, (normalized, inverse_std, axes, statistics is None, all_sum)


def _count(x, axes):
    """How many values each channel's statistics run over."""
    count = 1
    for axis in axes:
        count *= x.shape[axis]
    return count


def batch_norm_backward(xp, error, gamma, cache):
    """Gradients of :func:`batch_norm_forward`: ``(input, gamma, beta)``.

    With batch statistics (training) the mean and variance depend on the
    input (standard derivation); with given statistics they are constants.
    """
    normalized, inverse_std, axes, batch_statistics, all_sum = cache
    gradient_gamma = xp.sum(error * normalized, axis=axes)
    gradient_beta = xp.sum(error, axis=axes)
    vector_shape = tuple(inverse_std.shape)
    scale = xp.reshape(gamma, vector_shape) * inverse_std  # γ / sqrt(var + eps), per channel
    if not batch_statistics:
        return error * scale, gradient_gamma, gradient_beta
    # dx = γ/σ · (e - mean(e) - x̂ · mean(e · x̂)), means per channel over the batch: β's and
    # γ's gradients divided by the count (the standard derivation, dx̂ = γ e, with γ taken
    # out of the means). Ten operations in all, instead of eleven through γ e.
    count, projection, error_sum = _count(error, axes), gradient_gamma, gradient_beta
    if all_sum is not None:  # the whole batch's sums
        count, projection, error_sum = all_sum(count, projection, error_sum)
    gradient_input = error - xp.reshape(error_sum, vector_shape) * (1.0 / count)
    gradient_input -= normalized * (xp.reshape(projection, vector_shape) * (1.0 / count))
    gradient_input *= scale
    return gradient_input, gradient_gamma, gradient_beta

