"""Parity: every optimizer, with and without each regularizer, on every backend.

Three update steps from the same host-drawn weights and gradients are run on
the backend under test and on the NumPy float64 reference; the weights after
each step must agree to the dtype's tolerance (conftest.PARITY_RTOL).
"""
import numpy as np
import pytest

import xpnn
from xpnn import optimizers, regularizers
from conftest import PARITY_RTOL, assert_close

pytestmark = pytest.mark.parity

OPTIMIZERS = {
    "Sgd": lambda: optimizers.Sgd(0.1),
    "SgdWithMomentum": lambda: optimizers.SgdWithMomentum(0.1, 0.9),
    "Adam": lambda: optimizers.Adam(0.01, 0.9, 0.999),
}
REGULARIZERS = {
    "none": lambda: None,
    "L1": lambda: regularizers.L1_Regularizer(0.05),
    "L2": lambda: regularizers.L2_Regularizer(0.05),
}


def _make(optimizer_name, regularizer_name):
    optimizer = OPTIMIZERS[optimizer_name]()
    regularizer = REGULARIZERS[regularizer_name]()
    if regularizer is not None:
        optimizer.add_regularizer(regularizer)
    return optimizer


def _run(backend, optimizer, weights, gradients):
    current = backend.asarray(weights, dtype=backend.dtype)
    trajectory = []
    for gradient in gradients:
        current = optimizer.calculate_update(current, backend.asarray(gradient, dtype=backend.dtype))
        trajectory.append(backend.to_numpy(current))
    return trajectory


@pytest.mark.parametrize("regularizer_name", list(REGULARIZERS))
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_optimizer_update(parity_backend, optimizer_name, regularizer_name):
    rng = np.random.default_rng(1)
    # Weights away from 0 keep sign(w) (L1) identical in float32 and float64.
    weights = rng.uniform(0.5, 1.5, (4, 3)) * rng.choice([-1.0, 1.0], (4, 3))
    gradients = [rng.standard_normal((4, 3)) for _ in range(3)]
    reference = _run(xpnn.make_backend("cpu", "float64"),
                     _make(optimizer_name, regularizer_name), weights, gradients)
    actual = _run(parity_backend, _make(optimizer_name, regularizer_name), weights, gradients)
    rtol = PARITY_RTOL[parity_backend.dtype_name]
    for step, (got, expected) in enumerate(zip(actual, reference)):
        assert got.dtype == np.dtype(parity_backend.dtype_name)
        assert_close(got, expected, rtol=rtol, atol=rtol, err_msg=f"step {step + 1}")
