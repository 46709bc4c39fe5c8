"""Parity of the recurrent layers (RNN, LSTM) on every backend against the NumPy float64 reference.

``test_recurrent_pass``: one forward and backward pass of a batch of sequences, after a first
sequence (whose states the second starts from with ``memorize``); compared: the output, the
input gradient, both fully connected parts' weight gradients and (memorize) the carried
states, at ``PARITY_RTOL`` (1e-12 float64, 1e-5 float32; see parity_tools.assert_parity).

``test_recurrent_training``: ``STEPS`` Adam steps on fixed sequences and targets (L2 loss),
with and without ``memorize``; compared: the loss at every step and both parts' weights
after the last step, at ``TRAINING_RTOL`` (1e-10 float64, 1e-5 float32: rounding may grow
with each step through Adam's normalization, as in test_parity_training). Measured worst
over numpy, strict (all devices) and torch-CPU on the development machine: 2.4e-16
(float64) and 1.1e-7 (float32) for training, 4.4e-16 and 2.5e-7 for the single pass.

All inputs and initial weights are drawn on the host and rounded to the backend's dtype
first, so both sides see identical numbers.
"""
import numpy as np
import pytest

import xpnn
from xpnn.initializers import Xavier
from xpnn.layers import LSTM, RNN
from xpnn.optimizers import Adam
from conftest import PARITY_RTOL
from parity_tools import assert_backend_array, assert_parity, reference_backend, representable

pytestmark = pytest.mark.parity

LAYERS = {"RNN": RNN, "LSTM": LSTM}
STEPS = 5
TRAINING_RTOL = {"float64": 1e-10, "float32": 1e-5}


def _host_data(kind, dtype_name):
    """Initial weights of both parts, two input sequences (time 6, batch 3), an error and
    training targets, drawn on the host and representable in ``dtype_name``."""
    rng = np.random.default_rng(18 + len(kind))
    np.random.seed(18)
    layer = LAYERS[kind](5, 4, 3)  # built on the current backend only for its shapes
    layer.initialize(Xavier(), Xavier())
    draw = lambda shape: representable(rng.standard_normal(shape), dtype_name)
    return {"weights": representable(xpnn.to_numpy(layer.weights), dtype_name),
            "output_weights": representable(xpnn.to_numpy(layer.output_weights), dtype_name),
            "sequences": [draw((6, 3, 5)), draw((6, 3, 5))], "error": draw((6, 3, 3)),
            "targets": representable(rng.random((6, 3, 3)), dtype_name)}


def _layer(backend, kind, data, memorize):
    with xpnn.use_backend(backend):
        layer = LAYERS[kind](5, 4, 3)
    layer.weights, layer.output_weights = data["weights"], data["output_weights"]
    layer.memorize = memorize
    return layer


def _run_pass(backend, kind, data, memorize):
    layer = _layer(backend, kind, data, memorize)
    first, second = (backend.asarray(s, dtype=backend.dtype) for s in data["sequences"])
    layer.forward(first)
    results = {"output": layer.forward(second),
               "input gradient": layer.backward(backend.asarray(data["error"], dtype=backend.dtype)),
               "gradient_weights": layer.gradient_weights,
               "output gradient_weights": layer.fc_output.gradient_weights}
    for name in layer.carried_names:
        if memorize:
            results[name] = getattr(layer, name)
    return results


@pytest.mark.parametrize("memorize", [False, True], ids=["fresh", "memorize"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_recurrent_pass(parity_backend, kind, memorize):
    data = _host_data(kind, parity_backend.dtype_name)
    reference = _run_pass(reference_backend(), kind, data, memorize)
    actual = _run_pass(parity_backend, kind, data, memorize)
    assert sorted(actual) == sorted(reference)
    for name, value in actual.items():
        assert_backend_array(value, parity_backend, name)
        assert_parity(value, xpnn.to_numpy(reference[name]), PARITY_RTOL[parity_backend.dtype_name],
                      name)


def _train(backend, kind, data, memorize):
    """STEPS Adam steps towards the targets; returns the losses and the final weights (host)."""
    layer = _layer(backend, kind, data, memorize)
    layer.optimizer = Adam(1e-2, 0.9, 0.999)
    xp = backend.xp
    targets = backend.asarray(data["targets"], dtype=backend.dtype)
    losses = []
    for step in range(STEPS):
        output = layer.forward(backend.asarray(data["sequences"][step % 2], dtype=backend.dtype))
        losses.append(xp.sum((output - targets) ** 2))
        layer.backward(2.0 * (output - targets))
    return {"losses": np.stack([xpnn.to_numpy(loss) for loss in losses]),
            "weights": xpnn.to_numpy(layer.weights),
            "output_weights": xpnn.to_numpy(layer.output_weights)}, layer


@pytest.mark.parametrize("memorize", [False, True], ids=["fresh", "memorize"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_recurrent_training(parity_backend, kind, memorize):
    data = _host_data(kind, parity_backend.dtype_name)
    reference, _ = _train(reference_backend(), kind, data, memorize)
    actual, layer = _train(parity_backend, kind, data, memorize)
    for value in (layer.weights, layer.output_weights):
        assert_backend_array(value, parity_backend, "weights")
    for name in reference:
        assert_parity(actual[name], reference[name], TRAINING_RTOL[parity_backend.dtype_name], name)
