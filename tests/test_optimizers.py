"""Optimizers and regularizers: two update steps against values derived by hand.

Common setting: w0 = [1, -2, 0.5], g1 = [0.5, 0.25, -1], g2 = [-0.5, 1, 2],
learning rate 0.1, regularizer alpha 0.5 (so lr * alpha = 0.05). Per DESIGN.md
a regularizer subtracts lr * regularizer_gradient(w) at the weights *before*
the step, on top of the optimizer's own step (which sees only g).
"""
import math

import numpy as np
import pytest

import xpnn
from xpnn.optimizers import Adam, Sgd, SgdWithMomentum
from xpnn.regularizers import L1_Regularizer, L2_Regularizer
from conftest import assert_close

W0 = [1.0, -2.0, 0.5]
G1 = [0.5, 0.25, -1.0]
G2 = [-0.5, 1.0, 2.0]


def _two_steps(backend, optimizer, regularizer=None):
    if regularizer is not None:
        optimizer.add_regularizer(regularizer)
    weights = backend.asarray(np.array(W0))
    first = optimizer.calculate_update(weights, backend.asarray(np.array(G1)))
    assert backend.owns(first)
    second = optimizer.calculate_update(first, backend.asarray(np.array(G2)))
    assert backend.owns(second)
    return first, second


# Sgd: w <- w - 0.1 g
#   w1 = [1 - 0.05, -2 - 0.025, 0.5 + 0.1]        = [0.95, -2.025, 0.6]
#   w2 = [0.95 + 0.05, -2.025 - 0.1, 0.6 - 0.2]    = [1.0, -2.125, 0.4]
# Sgd + L2: w <- w - 0.1 g - 0.05 w = 0.95 w - 0.1 g
#   w1 = [0.95 - 0.05, -1.9 - 0.025, 0.475 + 0.1]  = [0.9, -1.925, 0.575]
#   w2 = [0.855 + 0.05, -1.82875 - 0.1, 0.54625 - 0.2] = [0.905, -1.92875, 0.34625]
# Sgd + L1: w <- w - 0.1 g - 0.05 sign(w)
#   w1 = [1 - 0.05 - 0.05, -2 - 0.025 + 0.05, 0.5 + 0.1 - 0.05] = [0.9, -1.975, 0.55]
#   w2 = [0.9 + 0.05 - 0.05, -1.975 - 0.1 + 0.05, 0.55 - 0.2 - 0.05] = [0.9, -2.025, 0.3]
SGD_EXPECTED = {
    None: ([0.95, -2.025, 0.6], [1.0, -2.125, 0.4]),
    "L2": ([0.9, -1.925, 0.575], [0.905, -1.92875, 0.34625]),
    "L1": ([0.9, -1.975, 0.55], [0.9, -2.025, 0.3]),
}

# SgdWithMomentum(0.1, 0.9): v <- 0.9 v - 0.1 g; w <- w + v (v0 = 0)
#   v1 = -0.1 g1 = [-0.05, -0.025, 0.1];          w1 = [0.95, -2.025, 0.6]
#   v2 = 0.9 v1 - 0.1 g2 = [0.005, -0.1225, -0.11]; w2 = [0.955, -2.1475, 0.49]
# + L2 (velocity unchanged, extra -0.05 w_before):
#   w1 = w0 + v1 - 0.05 w0 = [0.9, -1.925, 0.575]
#   w2 = w1 + v2 - 0.05 w1 = [0.9 + 0.005 - 0.045, -1.925 - 0.1225 + 0.09625, 0.575 - 0.11 - 0.02875]
#      = [0.86, -1.95125, 0.43625]
# + L1 (extra -0.05 sign(w_before)):
#   w1 = [0.95 - 0.05, -2.025 + 0.05, 0.6 - 0.05] = [0.9, -1.975, 0.55]
#   w2 = [0.9 + 0.005 - 0.05, -1.975 - 0.1225 + 0.05, 0.55 - 0.11 - 0.05] = [0.855, -2.0475, 0.39]
MOMENTUM_EXPECTED = {
    None: ([0.95, -2.025, 0.6], [0.955, -2.1475, 0.49]),
    "L2": ([0.9, -1.925, 0.575], [0.86, -1.95125, 0.43625]),
    "L1": ([0.9, -1.975, 0.55], [0.855, -2.0475, 0.39]),
}


def _adam_expected(regularizer):
    """Adam(0.1, mu=0.9, rho=0.999), eps 1e-8, derived element by element.

    Step 1: m1 = 0.1 g1, r1 = 0.001 g1^2; the bias corrections divide by
    1 - 0.9 = 0.1 and 1 - 0.999 = 0.001, so m1_hat = g1, r1_hat = g1^2 and
    w1 = w0 - 0.1 g1 / (|g1| + 1e-8).
    Step 2: m2 = 0.09 g1 + 0.1 g2, r2 = 0.000999 g1^2 + 0.001 g2^2,
    m2_hat = m2 / (1 - 0.81) = m2 / 0.19, r2_hat = r2 / (1 - 0.998001) = r2 / 0.001999,
    w2 = w1 - 0.1 m2_hat / (sqrt(r2_hat) + 1e-8).
    E.g. element 0 (g1 = 0.5, g2 = -0.5): r2_hat = 0.25, m2_hat = -0.005 / 0.19, so
    w2 = w1 + 0.1 * (0.005 / 0.19) / 0.5 = w1 + 1/190.
    A regularizer adds -0.1 * alpha * grad_R(w_before) to each step (alpha = 0.5).
    """
    def penalty(w):
        if regularizer == "L2":
            return 0.05 * w
        if regularizer == "L1":
            return 0.05 * math.copysign(1.0, w)
        return 0.0

    first, second = [], []
    for w0, g1, g2 in zip(W0, G1, G2):
        w1 = w0 - 0.1 * g1 / (abs(g1) + 1e-8) - penalty(w0)
        m2_hat = (0.09 * g1 + 0.1 * g2) / 0.19
        r2_hat = (0.000999 * g1 * g1 + 0.001 * g2 * g2) / 0.001999
        w2 = w1 - 0.1 * m2_hat / (math.sqrt(r2_hat) + 1e-8) - penalty(w1)
        first.append(w1)
        second.append(w2)
    return first, second


def _regularizer(name):
    return {None: None, "L2": L2_Regularizer(0.5), "L1": L1_Regularizer(0.5)}[name]


REGULARIZERS = [None, "L2", "L1"]


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_sgd_two_steps(backend, regularizer):
    first, second = _two_steps(backend, Sgd(0.1), _regularizer(regularizer))
    assert_close(first, SGD_EXPECTED[regularizer][0], rtol=1e-14)
    assert_close(second, SGD_EXPECTED[regularizer][1], rtol=1e-14)


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_momentum_two_steps(backend, regularizer):
    first, second = _two_steps(backend, SgdWithMomentum(0.1, 0.9), _regularizer(regularizer))
    assert_close(first, MOMENTUM_EXPECTED[regularizer][0], rtol=1e-14)
    assert_close(second, MOMENTUM_EXPECTED[regularizer][1], rtol=1e-14)


def test_momentum_uses_its_own_momentum_rate(backend):
    # The common setting uses momentum 0.9, which a hard-coded 0.9 would also pass.
    # SgdWithMomentum(1.0, 0.5), w0 = 0, g = 1 twice; v <- 0.5 v - 1 g; w <- w + v:
    #   v1 = -1,                 w1 = -1
    #   v2 = 0.5 * (-1) - 1 = -1.5, w2 = -1 - 1.5 = -2.5   (with 0.9: v2 = -1.9, w2 = -2.9)
    optimizer = SgdWithMomentum(1.0, 0.5)
    gradient = backend.asarray(np.array([1.0]))
    first = optimizer.calculate_update(backend.asarray(np.array([0.0])), gradient)
    second = optimizer.calculate_update(first, gradient)
    assert_close(first, [-1.0], rtol=1e-15)
    assert_close(second, [-2.5], rtol=1e-15)


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_adam_two_steps(backend, regularizer):
    first, second = _two_steps(backend, Adam(0.1, 0.9, 0.999), _regularizer(regularizer))
    expected_first, expected_second = _adam_expected(regularizer)
    assert_close(first, expected_first, rtol=1e-13)
    assert_close(second, expected_second, rtol=1e-13)
    if regularizer is None:   # the worked element of the docstring, as a literal (eps ignored)
        assert_close(xpnn.to_numpy(second)[0], 0.9 + 1 / 190, rtol=1e-7)


def test_adam_steps_integer_weights_in_floats():
    # As Sgd does (an int array minus a float step is a float array); the moments may not be
    # integers. One step from w = 2 with g = 1: m = 0.1, r = 0.001, m_hat = 1, r_hat = 1.
    updated = Adam(0.5, 0.9, 0.999).calculate_update(np.array([2, 2]), np.array([1, 1]))
    np.testing.assert_allclose(updated, 2 - 0.5 * 1 / (1 + 1e-8), rtol=1e-15)
    assert updated.dtype == np.float64


def test_python_scalars(backend):
    # Sgd(1): 1 - 1 * 1 = 0 (the course's own example)
    assert Sgd(1.0).calculate_update(1.0, 1.0) == 0.0
    assert isinstance(Sgd(1.0).calculate_update(1.0, 1.0), float)
    # momentum(1, 0.9), g = 1 twice: v1 = -1, w1 = 0; v2 = -0.9 - 1 = -1.9, w2 = -1.9
    momentum = SgdWithMomentum(1.0, 0.9)
    assert momentum.calculate_update(1.0, 1.0) == pytest.approx(0.0, abs=1e-15)
    assert momentum.calculate_update(0.0, 1.0) == pytest.approx(-1.9, rel=1e-14)
    # Adam(1, 0.9, 0.999), g = 1 twice: both bias-corrected moments are 1, so each
    # step subtracts 1 / (1 + 1e-8)
    adam = Adam(1.0, 0.9, 0.999)
    step = 1.0 / (1.0 + 1e-8)
    first = adam.calculate_update(1.0, 1.0)
    assert first == pytest.approx(1.0 - step, abs=1e-15)
    assert adam.calculate_update(first, 1.0) == pytest.approx(1.0 - 2 * step, abs=1e-14)
    # L2(0.5) with Sgd(0.1) on scalars: 2 - 0.1 * 1 - 0.1 * 0.5 * 2 = 1.8
    regularized = Sgd(0.1)
    regularized.add_regularizer(L2_Regularizer(0.5))
    assert regularized.calculate_update(2, 1) == pytest.approx(1.8, rel=1e-15)


def test_zero_d_arrays_and_scalar_gradient(backend):
    weights = backend.asarray(np.array(3.0))
    updated = Sgd(0.5).calculate_update(weights, backend.asarray(np.array(2.0)))
    assert backend.owns(updated) and updated.ndim == 0
    assert_close(updated, 2.0, rtol=0)
    # a Python-scalar gradient next to an array of weights: w - 0.5 * 1
    updated = Sgd(0.5).calculate_update(backend.asarray(np.array(W0)), 1.0)
    assert_close(updated, [0.5, -2.5, 0.0], rtol=0)


def test_regularizer_norms_and_gradients(backend):
    weights = backend.asarray(np.array(W0))
    # L2: 0.5 * (1 + 4 + 0.25) = 2.625, gradient 0.5 w; L1: 0.5 * 3.5 = 1.75, gradient 0.5 sign(w)
    assert_close(L2_Regularizer(0.5).norm(weights), 2.625, rtol=1e-15)
    assert_close(L2_Regularizer(0.5).calculate_gradient(weights), [0.5, -1.0, 0.25], rtol=0)
    assert_close(L1_Regularizer(0.5).norm(weights), 1.75, rtol=1e-15)
    assert_close(L1_Regularizer(0.5).calculate_gradient(weights), [0.5, -0.5, 0.5], rtol=0)


@pytest.mark.parametrize("make", [lambda: Sgd(0.1), lambda: SgdWithMomentum(0.1, 0.9),
                                  lambda: Adam(0.1, 0.9, 0.999)])
@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_float32_stays_float32(backend32, make, regularizer):
    optimizer = make()
    if regularizer is not None:
        optimizer.add_regularizer(_regularizer(regularizer))
    weights = backend32.asarray(np.array(W0), dtype="float32")
    for gradient in (G1, G2):
        weights = optimizer.calculate_update(weights, backend32.asarray(np.array(gradient), dtype="float32"))
        assert weights.dtype == backend32.dtype and backend32.owns(weights)


NON_FINITE = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("make", [
    lambda bad: Sgd(bad),
    lambda bad: SgdWithMomentum(bad, 0.9),
    lambda bad: SgdWithMomentum(0.1, bad),
    lambda bad: Adam(bad, 0.9, 0.999),
    lambda bad: Adam(0.1, bad, 0.999),
    lambda bad: Adam(0.1, 0.9, bad),
    lambda bad: L1_Regularizer(bad),
    lambda bad: L2_Regularizer(bad),
], ids=["Sgd.lr", "Momentum.lr", "Momentum.rate", "Adam.lr", "Adam.mu", "Adam.rho", "L1", "L2"])
def test_non_finite_hyper_parameters_rejected(make, bad):
    with pytest.raises(ValueError, match="finite"):
        make(bad)


@pytest.mark.parametrize("make", [lambda: Sgd("fast"), lambda: Sgd(None), lambda: Sgd(0.0),
                                  lambda: Sgd(-1.0), lambda: Adam(-0.1, 0.9, 0.999)])
def test_bad_learning_rates_rejected(make):
    with pytest.raises(ValueError, match="learning_rate"):
        make()


@pytest.mark.parametrize("name, mu, rho", [("mu", 1.0, 0.999), ("rho", 0.9, 1.0),
                                           ("mu", -0.1, 0.999), ("rho", 0.9, 1.5)])
def test_adam_decay_rates_outside_zero_to_one_rejected(name, mu, rho):
    # (mu = 1 or rho = 1 would divide by zero in the first step's bias correction.)
    with pytest.raises(ValueError, match=f"Adam: {name} must lie in"):
        Adam(1e-3, mu, rho)
    Adam(1e-3, 0.0, 0.0)  # the ends of [0, 1) that are allowed


@pytest.mark.parametrize("make", [lambda: Sgd(0.1), lambda: SgdWithMomentum(0.1, 0.9),
                                  lambda: Adam(0.1, 0.9, 0.999)], ids=["sgd", "momentum", "adam"])
def test_updates_leave_the_weights_and_gradient_they_are_given_alone(backend, make):
    # Adam works in place on its own arrays (moments, scratch): never on its inputs.
    optimizer = make()
    optimizer.add_regularizer(L2_Regularizer(0.5))
    weights, gradient = backend.asarray(np.array(W0)), backend.asarray(np.array(G1))
    for _ in range(3):
        updated = optimizer.calculate_update(weights, gradient)
    assert_close(weights, W0, rtol=0)
    assert_close(gradient, G1, rtol=0)
    assert updated is not weights


def test_adam_keeps_stepping_after_moving_to_another_backend(backend):
    optimizer = Adam(0.1, 0.9, 0.999)
    with xpnn.use_backend("cpu", dtype="float64"):
        expected = Adam(0.1, 0.9, 0.999)
        host = expected.calculate_update(np.array(W0), np.array(G1))
        host = expected.calculate_update(host, np.array(G2))
    first = optimizer.calculate_update(np.array(W0), np.array(G1))  # scratch made for NumPy
    optimizer.to(backend)
    second = optimizer.calculate_update(backend.asarray(first), backend.asarray(np.array(G2)))
    assert backend.owns(second)
    assert_close(second, host, rtol=1e-15)


def test_adam_folds_l2_into_its_step_exactly_as_the_base_class_applies_it(backend):
    # Adam + L2 runs the decay inside its own step (one kernel on the GPU); the
    # numbers must be those of the base class: Adam's step, then - lr * (alpha * w).
    folded = Adam(0.1, 0.9, 0.999)
    folded.add_regularizer(L2_Regularizer(0.5))
    plain = Adam(0.1, 0.9, 0.999)
    weights = backend.asarray(np.array(W0))
    for gradient in (G1, G2):
        gradient = backend.asarray(np.array(gradient))
        updated = folded.calculate_update(weights, gradient)
        expected = plain.calculate_update(weights, gradient) - 0.1 * (0.5 * weights)
        assert_close(updated, xpnn.to_numpy(expected), rtol=1e-15 if backend.name == "gpu" else 0)
        weights = updated


def test_adam_leaves_a_subclassed_regularizer_to_the_base_class(backend):
    class ScaledL2(L2_Regularizer):
        def calculate_gradient(self, weights):
            return 3.0 * super().calculate_gradient(weights)

    optimizer = Adam(0.1, 0.9, 0.999)
    optimizer.add_regularizer(ScaledL2(0.5))
    plain = Adam(0.1, 0.9, 0.999)
    weights, gradient = backend.asarray(np.array(W0)), backend.asarray(np.array(G1))
    expected = plain.calculate_update(weights, gradient) - 0.1 * (1.5 * weights)
    assert_close(optimizer.calculate_update(weights, gradient), xpnn.to_numpy(expected), rtol=1e-15)


OPTIMIZER_MAKERS = {"Sgd": lambda: Sgd(0.1), "SgdWithMomentum": lambda: SgdWithMomentum(0.1, 0.9),
                    "Adam": lambda: Adam(0.1, 0.9, 0.999)}


@pytest.mark.parametrize("name", list(OPTIMIZER_MAKERS))
@pytest.mark.parametrize("given, expected", [
    ("l2", "got str 'l2', which lacks calculate_gradient and norm (regularizers are objects"),
    (L2_Regularizer, "got the class L2_Regularizer, not a regularizer: pass an instance: "
                     "L2_Regularizer(alpha)"),
    (0.5, "got float 0.5, which lacks calculate_gradient and norm"),
], ids=["name", "class", "number"])
def test_add_regularizer_refuses_what_is_not_a_regularizer(name, given, expected):
    optimizer = OPTIMIZER_MAKERS[name]()
    with pytest.raises(TypeError) as info:
        optimizer.add_regularizer(given)  # (it failed only in training: no attribute 'norm')
    assert str(info.value).startswith(f"{name}.add_regularizer: ") and expected in str(info.value)
    assert optimizer.regularizer is None


def test_add_regularizer_takes_a_course_style_regularizer_of_its_own_and_none(backend):
    class Halving:  # (no base class: only the methods optimizers and networks call)
        def calculate_gradient(self, weights):
            return 0.5 * weights

        def norm(self, weights):
            return 0.0

    optimizer = Sgd(0.1)
    optimizer.add_regularizer(Halving())
    weights = backend.asarray(np.array(W0))
    assert_close(optimizer.calculate_update(weights, 0.0), [0.95, -1.9, 0.475], rtol=1e-15)
    optimizer.add_regularizer(None)
    assert optimizer.regularizer is None


@pytest.mark.parametrize("name", list(OPTIMIZER_MAKERS))
def test_calculate_update_names_the_optimizer_and_both_shapes(backend, name):
    weights, gradient = backend.asarray(np.ones((3, 4))), backend.asarray(np.ones((4, 3)))
    with pytest.raises(ValueError) as info:
        OPTIMIZER_MAKERS[name]().calculate_update(weights, gradient)
    message = str(info.value)
    assert message.startswith(f"{name}.calculate_update: ") and "(3, 4)" in message and "(4, 3)" in message


@pytest.mark.parametrize("name", list(OPTIMIZER_MAKERS))
def test_a_gradient_of_fewer_entries_steps_as_the_full_gradient(backend, name):
    # A 0-d array or shape (1,) applies to every weight, as a Python number does; before, a
    # momentum took the 0-d gradient's shape for its velocity and restarted it every step.
    results = {}
    for kind in ("full", "number", "0-d", "(1,)"):
        optimizer, weights = OPTIMIZER_MAKERS[name](), backend.asarray(np.array(W0))
        gradient = {"full": backend.asarray(np.full(3, 0.5)), "number": 0.5,
                    "0-d": backend.asarray(np.array(0.5)), "(1,)": backend.asarray(np.array([0.5]))}[kind]
        for _ in range(3):
            weights = optimizer.calculate_update(weights, gradient)
        results[kind] = backend.to_numpy(weights)
        assert tuple(weights.shape) == (3,), kind
    for kind in ("number", "0-d", "(1,)"):
        np.testing.assert_array_equal(results[kind], results["full"], err_msg=kind)


def test_weights_and_gradient_as_lists_step_as_arrays():
    with xpnn.use_backend("cpu", "float64"):
        updated = SgdWithMomentum(0.1, 0.9).calculate_update(list(W0), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(xpnn.to_numpy(updated), np.array(W0) - 0.1, rtol=1e-15)


def test_a_gradient_with_more_axes_than_the_weights_is_refused():
    with pytest.raises(ValueError) as info:
        Sgd(1.0).calculate_update(np.ones(3), np.ones((1, 3)))  # (would make the weights 2-D)
    assert str(info.value).startswith("Sgd.calculate_update: ") and "(1, 3)" in str(info.value)


def test_shape_error_says_how_to_call_calculate_update(backend):
    # The message carries the fix (the usual cause: weights and gradient swapped, or the
    # gradient of another parameter), not the shapes alone.
    weights, gradient = backend.asarray(np.ones((3, 4))), backend.asarray(np.ones((4, 3)))
    with pytest.raises(ValueError) as info:
        Sgd(0.1).calculate_update(weights, gradient)
    assert "pass calculate_update(weights, gradient) of one parameter, in that order" in str(info.value)


def test_weights_and_gradient_as_lists_take_the_current_backend_and_its_dtype(backend32):
    # Lists are made arrays of the current backend in its dtype (here float32), as Python
    # numbers are: w - 0.5 g with w = W0, g = 1.
    updated = Sgd(0.5).calculate_update(list(W0), [1.0, 1.0, 1.0])
    assert backend32.owns(updated) and updated.dtype == backend32.dtype
    assert_close(updated, np.array(W0) - 0.5, rtol=1e-7)


def test_momentum_restarts_its_velocity_for_weights_of_another_shape(backend):
    # One optimizer stepped on a parameter of another shape (course code reuses one object in
    # its unit tests): the old velocity cannot apply, the step is that of a fresh optimizer.
    # SgdWithMomentum(0.1, 0.9): fresh, v = -0.1 g, so w = [1, 2] - 0.1 [1, -1] = [0.9, 2.1].
    optimizer = SgdWithMomentum(0.1, 0.9)
    optimizer.calculate_update(backend.asarray(np.array(W0)), backend.asarray(np.array(G1)))
    updated = optimizer.calculate_update(backend.asarray(np.array([1.0, 2.0])),
                                         backend.asarray(np.array([1.0, -1.0])))
    assert_close(updated, [0.9, 2.1], rtol=1e-15)
    assert tuple(optimizer.velocity.shape) == (2,)


def test_adam_makes_new_moments_for_weights_of_another_shape(backend):
    # As the momentum's velocity: moments of the old shape cannot apply to the new weights.
    optimizer = Adam(0.1, 0.9, 0.999)
    optimizer.calculate_update(backend.asarray(np.array(W0)), backend.asarray(np.array(G1)))
    updated = optimizer.calculate_update(backend.asarray(np.array([1.0, 2.0])),
                                         backend.asarray(np.array([1.0, -1.0])))
    assert tuple(updated.shape) == (2,) and np.all(np.isfinite(xpnn.to_numpy(updated)))
    assert tuple(optimizer.first_moment.shape) == (2,) and tuple(optimizer.second_moment.shape) == (2,)
    # The moments hold only the new gradient: m = (1 - mu) g, r = (1 - rho) g^2.
    assert_close(optimizer.first_moment, [0.1, -0.1], rtol=1e-15)
    assert_close(optimizer.second_moment, [0.001, 0.001], rtol=1e-13)
    # And the step is a fresh optimizer's (k = 1): m_hat = g, r_hat = g^2, w - 0.1 g / (|g| + eps).
    assert optimizer.step_count == 1
    assert_close(updated, [1.0 - 0.1 / (1.0 + 1e-8), 2.0 + 0.1 / (1.0 + 1e-8)], rtol=1e-15)


def test_regularizer_norms_of_weights_of_another_backend_than_the_current(backend):
    # A network moved with net.to() while another backend is current asks for the norms of
    # weights that are not the current backend's (the generic path, not the current one's).
    weights = backend.asarray(np.array(W0))
    other = "array-api-strict" if backend.name == "cpu" else "cpu"
    with xpnn.use_backend(other, dtype="float64"):
        # L2: 0.5 * (1 + 4 + 0.25) = 2.625; L1: 0.5 * 3.5 = 1.75 (as in the test above)
        assert_close(L2_Regularizer(0.5).norm(weights), 2.625, rtol=1e-15)
        assert_close(L1_Regularizer(0.5).norm(weights), 1.75, rtol=1e-15)
