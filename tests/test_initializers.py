"""Weight initializers against DESIGN.md's formulas: Constant(0.1), UniformRandom on [0, 1),
Xavier σ = √(2/(fan_in+fan_out)), He σ = √(2/fan_in), all drawn on the host from np.random."""
import math

import numpy as np
import pytest

import xpnn
from xpnn.initializers import Constant, He, UniformRandom, Xavier
from xpnn.layers import FullyConnected
from conftest import assert_close

# fan_in and fan_out far apart: a formula that swaps or drops one of them is far off.
SHAPE, FAN_IN, FAN_OUT = (40, 50), 10, 90


@pytest.mark.parametrize("make, sigma", [
    (Xavier, math.sqrt(2.0 / (FAN_IN + FAN_OUT))),
    (He, math.sqrt(2.0 / FAN_IN)),
], ids=["Xavier", "He"])
def test_normal_initializers_draw_with_the_design_sigma(make, sigma):
    # The same seed reproduces np.random.normal(0, sigma) (course code re-seeds np.random) ...
    np.random.seed(7)
    weights = make().initialize(SHAPE, FAN_IN, FAN_OUT)
    np.random.seed(7)
    np.testing.assert_array_equal(weights, np.random.normal(0.0, sigma, SHAPE))
    # ... and the draws are centred with that spread (2000 draws: within 10 %).
    assert abs(np.std(weights) / sigma - 1) < 0.1 and abs(np.mean(weights)) < 0.1 * sigma


def test_uniform_random_draws_from_zero_to_one():
    np.random.seed(7)
    weights = UniformRandom().initialize(SHAPE, FAN_IN, FAN_OUT)
    assert weights.shape == SHAPE and weights.min() >= 0.0 and weights.max() < 1.0
    assert weights.min() < 0.01 and weights.max() > 0.99   # the whole interval, not a part
    np.random.seed(7)
    np.testing.assert_array_equal(weights, np.random.random_sample(SHAPE))


def test_constant_is_0_1_by_default_and_its_value_otherwise():
    np.testing.assert_array_equal(Constant().initialize((2, 3), 2, 3), np.full((2, 3), 0.1))
    np.testing.assert_array_equal(Constant(-0.25).initialize((4,), 4, 1), np.full(4, -0.25))
    with pytest.raises(ValueError, match="Constant: value must be a real number"):
        Constant("0.1x")


def test_xavier_gives_the_same_weights_on_every_backend(backend):
    # Drawn on the host, then moved: the seed fixes the weights whatever the backend.
    layer = FullyConnected(FAN_IN, FAN_OUT)
    np.random.seed(11)
    layer.initialize(Xavier(), Constant(0.3))
    np.random.seed(11)
    expected = np.random.normal(0.0, math.sqrt(2.0 / (FAN_IN + FAN_OUT)), (FAN_IN, FAN_OUT))
    assert backend.owns(layer.weights)
    assert_close(layer.weights, np.vstack([expected, np.full((1, FAN_OUT), 0.3)]), rtol=0)
