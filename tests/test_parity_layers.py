"""Parity: every layer and the loss, forward and backward, on every backend.

Each case builds a layer on the backend under test and on the NumPy float64
reference, gives both the same host-generated parameters, input and error
(rounded to the backend's dtype first, so both sides see identical numbers),
runs ``forward`` then ``backward`` and compares the output, the input
gradient, ``gradient_weights`` / ``gradient_bias`` and (batch norm) the running
statistics. Layers with phases (Dropout, BatchNormalization) are checked in
training and in testing phase; Dropout's masks come from
:func:`xpnn.host_random`, so they are identical on every backend.

Tolerance (conftest.PARITY_RTOL): ``|actual - reference| <= rtol * (|reference|
+ max|reference|)`` element-wise with rtol = 1e-12 for float64 and 1e-5 for
float32 backends (see parity_tools.assert_parity). Every result must be an
array of the backend under test (library and device) in its dtype.
"""
import dataclasses
import zlib
from typing import Callable

import numpy as np
import pytest

import xpnn
from xpnn.layers import (BatchNormalization, Conv, Dropout, Flatten, FullyConnected, Pooling,
                         ReLU, Sigmoid, SoftMax, TanH)
from xpnn.losses import CrossEntropyLoss
from conftest import PARITY_RTOL
from parity_tools import (assert_backend_array, assert_parity, reference_backend,
                          representable)

pytestmark = pytest.mark.parity


@dataclasses.dataclass
class Case:
    """One layer configuration: how to build it and what to feed it."""

    make: Callable
    input_shape: tuple
    testing_phase: bool = False
    warmup_batches: int = 0     # training-phase forwards before the checked pass
    scale: float = 1.0          # input = scale * standard normal + offset
    offset: float = 0.0
    rectified: bool = False     # clip the input at 0: ties at 0 as in real images


CASES = {
    "FullyConnected": Case(lambda: FullyConnected(5, 7), (4, 5)),
    "ReLU": Case(ReLU, (4, 6)),
    "TanH": Case(TanH, (4, 6), scale=2.0),
    "Sigmoid": Case(Sigmoid, (4, 6), scale=3.0),
    "SoftMax": Case(SoftMax, (4, 10), scale=3.0),
    # Logits around 500 overflow exp unless the row maximum is subtracted.
    "SoftMax-large-logits": Case(SoftMax, (4, 10), scale=3.0, offset=500.0),
    "Flatten": Case(Flatten, (3, 2, 4, 5)),
    "Conv-1d-stride1": Case(lambda: Conv((1,), (3, 3), 4), (2, 3, 9)),
    "Conv-1d-stride2-even-kernel": Case(lambda: Conv((2,), (3, 4), 4), (2, 3, 9)),
    "Conv-2d-stride1": Case(lambda: Conv((1, 1), (3, 3, 3), 4), (2, 3, 7, 6)),
    "Conv-2d-stride2-even-kernel": Case(lambda: Conv((2, 2), (3, 4, 4), 4), (2, 3, 7, 8)),
    "Conv-2d-stride1x2-kernel2x3": Case(lambda: Conv((1, 2), (2, 2, 3), 3), (2, 2, 6, 7)),
    "Conv-2d-1x1": Case(lambda: Conv((1, 1), (3, 1, 1), 2), (2, 3, 4, 5)),
    "Conv-2d-lenet-5x5": Case(lambda: Conv((1, 1), (1, 5, 5), 6), (2, 1, 12, 12)),
    "Pooling-2x2-stride2": Case(lambda: Pooling((2, 2), (2, 2)), (2, 3, 8, 8)),
    "Pooling-2x2-stride2-odd-size": Case(lambda: Pooling((2, 2), (2, 2)), (2, 3, 7, 9)),
    "Pooling-2x2-stride2-ties": Case(lambda: Pooling((2, 2), (2, 2)), (2, 3, 8, 8),
                                     rectified=True),
    "Pooling-3x3-stride2-overlapping": Case(lambda: Pooling((2, 2), (3, 3)), (2, 2, 9, 8)),
    "Pooling-2x3-stride1-overlapping-ties": Case(lambda: Pooling((1, 1), (2, 3)), (2, 2, 5, 6),
                                                 rectified=True),
    "Dropout-training": Case(lambda: Dropout(0.6), (4, 12)),
    "Dropout-testing": Case(lambda: Dropout(0.6), (4, 12), testing_phase=True),
    "Dropout-image-training": Case(lambda: Dropout(0.5), (2, 3, 4, 4)),
    "BatchNormalization-vector-training": Case(lambda: BatchNormalization(5), (8, 5),
                                               scale=2.0, offset=1.0, warmup_batches=1),
    "BatchNormalization-vector-testing": Case(lambda: BatchNormalization(5), (8, 5), scale=2.0,
                                              offset=1.0, testing_phase=True, warmup_batches=2),
    "BatchNormalization-image-training": Case(lambda: BatchNormalization(3), (4, 3, 5, 6),
                                              scale=2.0, offset=-1.0),
    "BatchNormalization-image-testing": Case(lambda: BatchNormalization(3), (4, 3, 5, 6),
                                             scale=2.0, offset=-1.0, testing_phase=True,
                                             warmup_batches=2),
}


def _host_data(case_name, dtype_name):
    """Inputs, error and parameters for a case, drawn on the host (float64 values)."""
    case = CASES[case_name]
    rng = np.random.default_rng(zlib.crc32(case_name.encode()))   # fixed per case
    with xpnn.use_backend(reference_backend()):
        layer = case.make()   # only to learn the parameter and output shapes

    def draw(shape, scale=case.scale, offset=case.offset):
        values = scale * rng.standard_normal(shape) + offset
        if case.rectified:
            values = np.maximum(values, 0.0)
        return representable(values, dtype_name)

    batches = [draw(case.input_shape) for _ in range(case.warmup_batches + 1)]
    output_shape = tuple(layer.forward(batches[-1]).shape)
    data = {"batches": batches, "error": draw(output_shape, 1.0, 0.0)}
    if layer.trainable:
        data["weights"] = representable(
            rng.uniform(0.5, 1.5, tuple(layer.weights.shape)), dtype_name)
        if not isinstance(layer, FullyConnected):   # its bias is the last weight row
            data["bias"] = representable(rng.standard_normal(tuple(layer.bias.shape)), dtype_name)
    return data


def _run(backend, case, data):
    """Build the layer on ``backend``, run the case; return the named results (backend arrays)."""
    with xpnn.use_backend(backend), xpnn.host_random():
        layer = case.make()
        if "weights" in data:
            layer.weights = data["weights"]
        if "bias" in data:
            layer.bias = data["bias"]
        np.random.seed(1234)          # the dropout masks (drawn on the host)
        for batch in data["batches"][:-1]:
            layer.forward(backend.asarray(batch, dtype=backend.dtype))
        layer.testing_phase = case.testing_phase
        results = {"output": layer.forward(backend.asarray(data["batches"][-1],
                                                           dtype=backend.dtype))}
        results["input gradient"] = layer.backward(backend.asarray(data["error"],
                                                                   dtype=backend.dtype))
    for name in ("gradient_weights", "gradient_bias", "running_mean", "running_variance", "mask"):
        value = getattr(layer, name, None)
        if value is not None:
            results[name] = value
    return results


def _compare(actual, reference, backend):
    assert sorted(actual) == sorted(reference)
    rtol = PARITY_RTOL[backend.dtype_name]
    for name, value in actual.items():
        assert_backend_array(value, backend, name)
        assert_parity(value, xpnn.to_numpy(reference[name]), rtol, name)


@pytest.mark.parametrize("case_name", list(CASES))
def test_layer(parity_backend, case_name):
    case = CASES[case_name]
    data = _host_data(case_name, parity_backend.dtype_name)
    reference = _run(reference_backend(), case, data)
    actual = _run(parity_backend, case, data)
    _compare(actual, reference, parity_backend)


def _loss_data(dtype_name):
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((6, 5))
    softmax = np.exp(logits) / np.sum(np.exp(logits), axis=1, keepdims=True)
    # Keep every probability >= 0.1: the loss adds the dtype's machine epsilon
    # (DESIGN.md), which then changes a float32 result by at most ~1e-6 relative.
    prediction = representable(0.5 * softmax + 0.1, dtype_name)
    labels = np.eye(5)[rng.integers(0, 5, 6)]
    return prediction, labels


def _run_loss(backend, prediction, labels):
    with xpnn.use_backend(backend):
        loss = CrossEntropyLoss()
        value = loss.forward(backend.asarray(prediction, dtype=backend.dtype), labels)
        gradient = loss.backward(labels)
    return {"loss": value, "gradient": gradient}


def test_cross_entropy_loss(parity_backend):
    prediction, labels = _loss_data(parity_backend.dtype_name)
    reference = _run_loss(reference_backend(), prediction, labels)
    actual = _run_loss(parity_backend, prediction, labels)
    assert actual["loss"].ndim == 0
    _compare(actual, reference, parity_backend)
