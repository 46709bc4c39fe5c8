"""xpnn.testing: the numerical gradient checks must catch a wrong gradient, not only pass a right one.

Toy layers with gradients known in closed form (x³ and w·x), right and deliberately wrong,
checked on every backend; the loss is the course's L2Loss, Σ(p − y)².
"""
import numpy as np
import pytest

import xpnn
from xpnn.testing import L2Loss, gradient_check, gradient_check_weights
from conftest import assert_close


class Cube:
    """y = x³ element-wise; backward multiplies by 3x² times ``factor`` (1: right)."""

    trainable = False

    def __init__(self, factor=1.0):
        self.backend = xpnn.get_backend()
        self.factor = factor

    def forward(self, input_tensor):
        self.input = self.backend.asarray(input_tensor, dtype=self.backend.dtype)
        return self.input * self.input * self.input

    def backward(self, error_tensor):
        error = self.backend.asarray(error_tensor, dtype=self.backend.dtype)
        factor = self.backend.asarray(np.asarray(self.factor, dtype=np.float64), dtype=self.backend.dtype)
        return 3.0 * self.input * self.input * error * factor


class Scale:
    """y = w·x per feature (w of shape (features,)); gradient_weights = Σ_batch e·x times ``factor``."""

    trainable = True

    def __init__(self, weights, factor=1.0):
        self.backend = xpnn.get_backend()
        self.weights = weights
        self.factor = factor
        self.gradient_weights = None

    @property
    def weights(self):
        return self._weights

    @weights.setter
    def weights(self, value):
        self._weights = self.backend.asarray(value, dtype=self.backend.dtype)

    def forward(self, input_tensor):
        self.input = self.backend.asarray(input_tensor, dtype=self.backend.dtype)
        return self.input * self._weights

    def backward(self, error_tensor):
        error = self.backend.asarray(error_tensor, dtype=self.backend.dtype)
        factor = self.backend.asarray(np.asarray(self.factor, dtype=np.float64), dtype=self.backend.dtype)
        xp = self.backend.xp
        self.gradient_weights = xp.sum(error * self.input, axis=0) * factor
        return error * self._weights


INPUT = np.array([[0.7, -1.2, 0.9], [1.1, 0.8, -0.6]])
LABEL = np.array([[0.1, 0.2, -0.3], [0.0, 0.5, 0.4]])


def test_l2_loss_is_the_sum_of_squares_and_its_gradient_twice_the_difference(backend):
    loss = L2Loss()
    prediction = backend.asarray(INPUT)
    assert loss.forward(prediction, backend.asarray(LABEL)) == pytest.approx(
        np.sum((INPUT - LABEL) ** 2), rel=1e-14)
    assert_close(loss.backward(backend.asarray(LABEL)), 2.0 * (INPUT - LABEL), rtol=1e-14)


def test_gradient_check_passes_a_right_gradient_to_central_difference_accuracy(backend):
    # x³ under Σ(x³ - y)²: a curved loss, where a step much larger than 1e-5 is off by ~1e-4.
    difference = gradient_check([Cube(), L2Loss()], backend.asarray(INPUT), backend.asarray(LABEL))
    assert difference.shape == INPUT.shape and np.max(difference) < 1e-7


def test_gradient_check_reports_every_wrong_element(backend):
    # The last element's gradient off by a factor 1.5: relative error |1.5 - 1| / 1.5 = 1/3 there,
    # central-difference accuracy everywhere else.
    factor = np.ones(INPUT.shape)
    factor[-1, -1] = 1.5
    difference = gradient_check([Cube(factor), L2Loss()], backend.asarray(INPUT), backend.asarray(LABEL))
    assert difference[-1, -1] == pytest.approx(1 / 3, rel=1e-5)
    difference[-1, -1] = 0.0
    assert np.max(difference) < 1e-7


def test_gradient_check_weights_passes_right_and_reports_wrong_and_leaves_the_weights(backend):
    weights = np.array([0.5, -1.5, 2.0])
    right = Scale(weights)
    difference = gradient_check_weights([right, L2Loss()], backend.asarray(INPUT), backend.asarray(LABEL))
    assert difference.shape == (3,) and np.max(difference) < 1e-7
    assert_close(right.weights, weights, rtol=0)   # put back after the perturbations
    wrong = Scale(weights, factor=np.array([1.0, 1.0, 2.0]))   # the last weight's gradient doubled
    difference = gradient_check_weights([wrong, L2Loss()], backend.asarray(INPUT), backend.asarray(LABEL))
    assert difference[2] == pytest.approx(0.5, rel=1e-5) and np.max(difference[:2]) < 1e-7
    assert_close(wrong.weights, weights, rtol=0)
