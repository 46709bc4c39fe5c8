"""Optimizers (course API): ``calculate_update(weight_tensor, gradient_tensor)``.

Each returns the updated weights. When a regularizer is set it additionally
subtracts ``learning_rate * regularizer.calculate_gradient(w)``, evaluated at
the weights before the step. Hyper-parameters stay Python floats; state arrays
live on the backend of the weights they belong to. Python scalars and 0-d
arrays are accepted (``Sgd(1.).calculate_update(1., 1.)`` returns ``0.0``).
"""
import math

from xpnn._checks import finite_float
from xpnn.backend import asarray_like, get_backend, namespace
from xpnn.ops.adam import adam_update
from xpnn.regularizers import L2_Regularizer


def _as_arrays(optimizer, weight_tensor, gradient_tensor):
    """Return (weights, gradient, scalar_input): Python numbers made 0-d arrays, a sequence of
    weights an array of the current backend, a gradient of fewer entries (a number, a 0-d
    array, shape (1,), ...) broadcast to the weights' shape, as the update would.

    Raises ValueError naming ``optimizer``'s class when the gradient's shape does not
    broadcast to the weights' (e.g. (4, 3) for (3, 4) weights).
    """
    if isinstance(weight_tensor, (int, float)):
        backend = get_backend()
        weights = backend.asarray(float(weight_tensor), dtype=backend.dtype)
        gradient = backend.asarray(float(gradient_tensor), dtype=backend.dtype)
        return weights, gradient, True
    if not hasattr(weight_tensor, "shape"):  # a list or tuple of weights
        backend = get_backend()
        weight_tensor = backend.asarray(weight_tensor, dtype=backend.dtype)
    weight_shape = tuple(weight_tensor.shape)
    if isinstance(gradient_tensor, (int, float)):
        xp = namespace(weight_tensor)
        gradient_tensor = xp.full(weight_shape, float(gradient_tensor),
                                  dtype=weight_tensor.dtype, device=weight_tensor.device)
        return weight_tensor, gradient_tensor, False
    if not hasattr(gradient_tensor, "shape"):  # a list or tuple
        gradient_tensor = asarray_like(gradient_tensor, weight_tensor)
    gradient_shape = tuple(gradient_tensor.shape)
    if gradient_shape != weight_shape:
        if not _broadcasts_to(gradient_shape, weight_shape):
            raise ValueError(
                f"{type(optimizer).__name__}.calculate_update: the gradient must have the "
                f"weights' shape: weight_tensor has shape {weight_shape}, gradient_tensor "
                f"{gradient_shape} (pass calculate_update(weights, gradient) of one "
                f"parameter, in that order)")
        # (Broadcast here, not in each step: a momentum's velocity takes the weights' shape.)
        gradient_tensor = namespace(gradient_tensor).broadcast_to(gradient_tensor, weight_shape)
    return weight_tensor, gradient_tensor, False


def _broadcasts_to(shape, target):
    """True when an array of ``shape`` broadcasts to ``target`` (and not beyond it)."""
    return len(shape) <= len(target) and all(
        size in (1, wanted) for size, wanted in zip(shape[::-1], target[::-1]))


#: What an optimizer calls on its regularizer (:meth:`Optimizer.calculate_update`) and a
#: network on the optimizer's (:meth:`xpnn.NeuralNetwork.regularization_loss`).
REGULARIZER_METHODS = ("calculate_gradient", "norm")


def _check_regularizer(owner, regularizer):
    """Raise TypeError unless ``regularizer`` is None or an object with :data:`REGULARIZER_METHODS`."""
    if regularizer is None:
        return
    if isinstance(regularizer, type):
        name = regularizer.__name__
        raise TypeError(f"{owner}.add_regularizer: got the class {name}, not a regularizer: pass "
                        f"an instance: {name}(alpha), e.g. {name}(4e-4)")
    missing = [name for name in REGULARIZER_METHODS if not callable(getattr(regularizer, name, None))]
    if missing:
        hint = (" (regularizers are objects, not names: e.g. add_regularizer(L2_Regularizer(4e-4)) "
                "after from xpnn.regularizers import L2_Regularizer)"
                if isinstance(regularizer, str) else "")
        raise TypeError(f"{owner}.add_regularizer: expected a regularizer (an object with methods "
                        f"calculate_gradient(weights) and norm(weights), e.g. "
                        f"xpnn.regularizers.L2_Regularizer(4e-4)), got {type(regularizer).__name__} "
                        f"{regularizer!r}, which lacks {' and '.join(missing)}{hint}")


class Optimizer:
    """Base class: holds the regularizer and applies its gradient."""

    #: Names of the attributes holding state arrays (moved by ``to``).
    state_names = ()

    def __init__(self):
        self.regularizer = None

    def add_regularizer(self, regularizer):
        """Attach a regularizer (e.g. ``L2_Regularizer(4e-4)``) to every later update.

        Any object with ``calculate_gradient(weights)`` and ``norm(weights)`` will
        do (None removes it); anything else raises TypeError here, not in training.
        """
        _check_regularizer(type(self).__name__, regularizer)
        self.regularizer = regularizer

    def calculate_update(self, weight_tensor, gradient_tensor):
        weights, gradient, scalar_input = _as_arrays(self, weight_tensor, gradient_tensor)
        updated = self._step(weights, gradient)
        if self.regularizer is not None:
            updated = updated - self.learning_rate * self.regularizer.calculate_gradient(weights)
        return float(updated) if scalar_input else updated

    def _step(self, weights, gradient):
        raise NotImplementedError

    def to(self, backend):
        """Move the optimizer's state arrays to ``backend`` (used by ``NeuralNetwork.to``)."""
        for attribute in self.state_names:
            value = getattr(self, attribute)
            if value is not None:
                setattr(self, attribute, backend.asarray(backend.to_numpy(value), dtype=backend.dtype))
        return self


class Sgd(Optimizer):
    """Plain gradient descent: ``w - learning_rate * g``."""

    def __init__(self, learning_rate):
        super().__init__()
        self.learning_rate = finite_float("Sgd", "learning_rate", learning_rate, positive=True)

    def _step(self, weights, gradient):
        return weights - self.learning_rate * gradient


class SgdWithMomentum(Optimizer):
    """Momentum: ``v <- momentum_rate * v - learning_rate * g``; ``w <- w + v``."""

    state_names = ("velocity",)

    def __init__(self, learning_rate, momentum_rate):
        super().__init__()
        self.learning_rate = finite_float("SgdWithMomentum", "learning_rate", learning_rate, positive=True)
        self.momentum_rate = finite_float("SgdWithMomentum", "momentum_rate", momentum_rate)
        self.velocity = None

    def _step(self, weights, gradient):
        step = -self.learning_rate * gradient
        if self.velocity is None or self.velocity.shape != weights.shape:
            self.velocity = step
        else:
            # In place: the velocity is this optimizer's own array.
            self.velocity *= self.momentum_rate
            self.velocity += step
        return weights + self.velocity


class Adam(Optimizer):
    """Adam with bias correction (step count k from 1) and epsilon 1e-8.

    ``m <- mu m + (1-mu) g``; ``r <- rho r + (1-rho) g^2``;
    ``w <- w - learning_rate * m_hat / (sqrt(r_hat) + eps)``.
    """

    state_names = ("first_moment", "second_moment")
    epsilon = 1e-8

    def __init__(self, learning_rate, mu, rho):
        super().__init__()
        self.learning_rate = finite_float("Adam", "learning_rate", learning_rate, positive=True)
        self.mu = finite_float("Adam", "mu", mu)
        self.rho = finite_float("Adam", "rho", rho)
        for name, rate in (("mu", self.mu), ("rho", self.rho)):
            if not 0.0 <= rate < 1.0:  # (the bias corrections divide by 1 - rate**k)
                raise ValueError(f"Adam: {name} must lie in [0, 1), got {rate!r}")
        self.first_moment = None
        self.second_moment = None
        self.step_count = 0
        self._scratch = None  # working array of the weights' shape (not state: not saved)

    def calculate_update(self, weight_tensor, gradient_tensor):
        # An L2 regularizer's gradient (alpha * w) is folded into the step itself,
        # the same operations in the same order as the base class applies it
        # (one fused kernel on the GPU instead of four); any other regularizer,
        # a subclass of L2's included, is applied by the base class.
        if type(self.regularizer) is not L2_Regularizer:
            return super().calculate_update(weight_tensor, gradient_tensor)
        weights, gradient, scalar_input = _as_arrays(self, weight_tensor, gradient_tensor)
        updated = self._step(weights, gradient, decay=self.regularizer.alpha)
        return float(updated) if scalar_input else updated

    def _step(self, weights, gradient, decay=0.0):
        xp = namespace(weights)
        moments, hyper = self.next_step(weights, decay)
        backend = get_backend()
        if backend.xp is xp:  # the current backend's hot path (a fused kernel on the GPU)
            return backend.ops.adam_update(weights, gradient, moments, *hyper)
        return adam_update(xp, weights, gradient, moments, *hyper)

    def next_step(self, weights, decay=0.0):
        """Count one more step; returns ``(moments, hyper)`` for ``ops.adam_update``.

        All of a step but the array work: the moments made (zeros) if missing,
        the step count advanced, the bias corrections computed. ``moments`` is
        ``(first_moment, second_moment, scratch)``; ``hyper`` the arguments
        after them, ``decay`` an L2 regularizer's alpha (0: none).
        """
        xp = namespace(weights)
        # (Integer weights step in floats, as Sgd's do: the moments may not be integers.)
        dtype = None if xp.isdtype(weights.dtype, "real floating") else xp.float64
        if self.first_moment is None or self.first_moment.shape != weights.shape:
            # Moments of another shape cannot apply: start afresh, step count
            # included (the bias corrections assume moments that began at zero at k = 1).
            self.step_count = 0
            self.first_moment = xp.zeros_like(weights, dtype=dtype)
            self.second_moment = xp.zeros_like(weights, dtype=dtype)
            self._scratch = xp.empty_like(weights, dtype=dtype)
        elif getattr(self, "_scratch", None) is None:  # after to(), or pickled before it existed
            self._scratch = xp.empty_like(self.first_moment)
        self.step_count += 1
        # Bias corrections are Python floats computed on the host: no device sync.
        # m_hat / (sqrt(r_hat) + eps) = (m / c1) / (sqrt(r) / sqrt(c2) + eps)
        step_size = self.learning_rate / (1.0 - self.mu ** self.step_count)
        inverse_root_correction = 1.0 / math.sqrt(1.0 - self.rho ** self.step_count)
        moments = (self.first_moment, self.second_moment, self._scratch)
        return moments, (self.mu, self.rho, step_size, inverse_root_correction, self.epsilon,
                         self.learning_rate, decay)

    def to(self, backend):
        """Move the moments; the scratch array is made afresh on the new backend."""
        self._scratch = None
        return super().to(backend)
