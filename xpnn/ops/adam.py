"""Adam's array work (array API standard only), in place on the optimizer's own arrays."""


def adam_update(xp, weights, gradient, moments, mu, rho, step_size, inverse_root_correction,
                epsilon, learning_rate=0.0, decay=0.0):
    """One Adam step: update the moments in place and return the updated weights (a new array).

    Parameters
    ----------
    weights, gradient : arrays of one shape
    moments : (first_moment, second_moment, scratch)
        The optimizer's own arrays of the weights' shape: the two moments,
        updated in place, and a working array whose values are not used.
    mu, rho : float
        Decay rates of the first and second moment.
    step_size : float
        ``learning_rate / (1 - mu**k)`` (the first bias correction folded in).
    inverse_root_correction : float
        ``1 / sqrt(1 - rho**k)`` (the second bias correction).
    epsilon : float
    learning_rate, decay : float
        An L2 regularizer's step, ``learning_rate * (decay * weights)``, is
        subtracted too (weight decay, coupled as in the course's optimizers);
        ``decay=0`` skips it.

    Returns
    -------
    array
        ``weights - step_size * m / (sqrt(r) * inverse_root_correction + epsilon)``
        ``- learning_rate * (decay * weights)``.
    """
    # The standard's in-place operators and setitem: a step allocates two arrays
    # instead of seven. Same operations, same rounding, as m = mu m + (1-mu) g;
    # r = rho r + (1-rho) g²; step = (m/c1) / (sqrt(r/c2) + eps).
    first, second, scratch = moments
    scratch[...] = gradient
    scratch *= 1.0 - mu
    first *= mu
    first += scratch
    scratch[...] = gradient
    scratch *= gradient
    scratch *= 1.0 - rho
    second *= rho
    second += scratch
    denominator = xp.sqrt(second)
    denominator *= inverse_root_correction
    denominator += epsilon
    scratch[...] = first
    scratch /= denominator
    scratch *= step_size
    updated = weights - scratch
    if decay:
        updated -= learning_rate * (decay * weights)
    return updated
