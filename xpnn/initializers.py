"""Weight initializers (course API).

Each ``initialize(weights_shape, fan_in, fan_out)`` returns a host (NumPy)
array drawn from NumPy's global generator (``np.random``, so
``np.random.seed(n)`` reproduces course code); the layer moves it to its backend.
Drawing on the host is what gives the same initial weights on every backend
for a given seed.
"""
import math

import numpy as np

from xpnn._checks import finite_float


class Constant:
    """Every weight equals ``value`` (default 0.1)."""

    def __init__(self, value=0.1):
        self.value = finite_float("Constant", "value", value)

    def initialize(self, weights_shape, fan_in, fan_out):
        return np.full(tuple(weights_shape), self.value)


class UniformRandom:
    """Weights drawn uniformly from [0, 1)."""

    def initialize(self, weights_shape, fan_in, fan_out):
        return np.random.uniform(0.0, 1.0, tuple(weights_shape))


class Xavier:
    """Normal with standard deviation sqrt(2 / (fan_in + fan_out)) (Glorot)."""

    def initialize(self, weights_shape, fan_in, fan_out):
        sigma = math.sqrt(2.0 / (fan_in + fan_out))
        return np.random.normal(0.0, sigma, tuple(weights_shape))


class He:
    """Normal with standard deviation sqrt(2 / fan_in) (for ReLU networks)."""

    def initialize(self, weights_shape, fan_in, fan_out):
        sigma = math.sqrt(2.0 / fan_in)
        return np.random.normal(0.0, sigma, tuple(weights_shape))
