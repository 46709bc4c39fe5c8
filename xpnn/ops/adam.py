"""Adam's array work (array API standard only), in place on the optimizer's own arrays."""


def adam_update(xp, weights, gradient, moments, mu, rho, step_size, inverse_root_correction,
                epsilon, learning_rate=0.0, decay=0.0):
    """One Adam step: update the moments in place and return the updated weights (a new array).

    Parameters
    ----------
    weights, gradient : arrays of one shape
    moments : (first_moment, second_moment, scratch)
        The optimizer's own arrays of the weights' shape: the two moments,
        updated in place, and a working array (unused here; NumPy's fast path
        writes into it).
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

    Notes
    -----
    Twelve array operations a step (fourteen with the decay), each one kernel
    launch on a GPU: the moments in place with the standard's in-place
    operators, and every scalar folded on the host. With ``c`` the inverse
    root correction, ``step_size * m / (sqrt(r) * c + eps)`` is computed as
    ``(step_size / c) * m / (sqrt(r) + eps / c)``, which saves the product of
    ``sqrt(r)`` by ``c`` (equal to rounding).
    """
    first, second, _ = moments
    scaled = gradient * (1.0 - mu)
    first *= mu
    first += scaled
    squared = gradient * gradient
    squared *= 1.0 - rho
    second *= rho
    second += squared
    denominator = xp.sqrt(second)
    denominator += epsilon / inverse_root_correction
    updated = first / denominator
    # w + (-s) q has the bits of w - s q (IEEE subtraction adds the negation), without
    # another array for the product.
    updated *= -(step_size / inverse_root_correction)
    updated += weights
    if decay:
        updated -= (learning_rate * decay) * weights
    return updated
