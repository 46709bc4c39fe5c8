"""Regularizers that optimizers carry (course names kept on purpose).

They augment the loss independently of the loss function: the optimizer
subtracts ``learning_rate * calculate_gradient(w)`` and the network adds
``norm(w)`` of every trainable layer to the data loss.
"""
from xpnn._checks import finite_float
from xpnn.backend import get_backend, namespace


class L2_Regularizer:  # noqa: N801 - course name
    """Weight decay: gradient ``alpha * w``, norm ``alpha * sum(w**2)``."""

    def __init__(self, alpha):
        self.alpha = finite_float("L2_Regularizer", "alpha", alpha)

    def calculate_gradient(self, weights):
        return self.alpha * weights

    def norm(self, weights):
        xp = namespace(weights)
        backend = get_backend()
        if backend.xp is xp:  # the current backend's path (a BLAS dot product on the CPU)
            return self.alpha * backend.ops.sum_of_squares(weights)
        return self.alpha * xp.sum(weights * weights)


class L1_Regularizer:  # noqa: N801 - course name
    """Sparsity: gradient ``alpha * sign(w)``, norm ``alpha * sum(|w|)``."""

    def __init__(self, alpha):
        self.alpha = finite_float("L1_Regularizer", "alpha", alpha)

    def calculate_gradient(self, weights):
        xp = namespace(weights)
        return self.alpha * xp.sign(weights)

    def norm(self, weights):
        xp = namespace(weights)
        return self.alpha * xp.sum(xp.abs(weights))
