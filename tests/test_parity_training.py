"""Parity of whole training runs: LeNet with batch norm and dropout, 20 Adam steps.

Every run builds ``lenet.build(batch_norm=True, dropout=True)`` after
``np.random.seed(SEED)`` (initializers draw on the host, so the initial weights
are the same on every backend) and trains it for ``STEPS`` steps of ``BATCH``
host-generated 28x28 images (class templates on a zero background, shifted and
speckled, quantized to multiples of 1/256 so they are exact in float32) under
:func:`xpnn.host_random` (dropout masks drawn from ``np.random`` on the host,
identical everywhere). Each backend configuration is trained once per session
and shared by the checks below.

What is compared, and the bounds (``TRAINING_TOLERANCE``; "measured" is the
worst over numpy, strict (all devices) and torch-CPU on the development machine;
``python tests/test_parity_training.py`` prints the figures for every usable
backend, e.g. to check them on a GPU):

==============================  ======================  ======================================
quantity                        float64                 float32
==============================  ======================  ======================================
loss at every step, relative    1e-9 (meas. 3e-15)      5e-3 (meas. 6.7e-4 numpy, 4e-5 torch)
test-phase probabilities        1e-6 (meas. 9e-9)       3e-2 (meas. 6.1e-3)
parameters, element-wise        1e-9·max|ref| + 1e-6    2e-2·max|ref| + 2·STEPS·lr
                                (meas. 8e-9 abs.)       (meas. ≤ 0.31 of the bound)
parameter displacement          1e-6 (meas. 1e-8)       0.2 (meas. 0.048)
==============================  ======================  ======================================

"Parameters" are every weight, bias, batch-norm γ/β and running statistic;
"displacement" is ``||θ - θ_ref|| / ||θ_ref - θ_initial||`` over all trainable
parameters together: how much of what training did differs.

Why the parameter bounds have an absolute part: batch normalization makes
some directions of parameter space free — the bias of a layer that feeds a
batch norm (its mean is subtracted again), and weights whose input is the
same for the whole batch (zero-background pixels). Their true gradient is
zero, so the gradient Adam sees there is rounding noise, and Adam's
normalization ``m / (sqrt(r) + 1e-8)`` turns noise of size ~1e-8 or more into a
step of about ±lr. In float64 the noise is ~1e-16 and the free parameters
differ by ≤ 1e-8 after 20 steps; in float32 they random-walk by up to
about lr per step, differently on each backend, so no element-wise relative
bound holds for them — hence ``2·STEPS·lr``, the farthest Adam can carry them,
plus the norm-wise displacement check (the free entries are few) and the
loss / prediction checks, which see the network's function, where the free
directions cancel. Float32 losses drift because every Adam step amplifies the
float32 rounding this way (measured per-step relative loss error grows from
3e-6 at step 1 to 6.7e-4 at step 18 on NumPy); 5e-3 leaves a margin of 7.

Checks:

* ``test_training_matches_reference``: each backend configuration against the
  NumPy float64 run, at its dtype's bounds.
* ``test_float32_drift_on_same_backend``: the same backend (library and
  device) trained in float32 and in float64, at the float32 bounds.
  strict's float32-only device has no float64; it is compared with strict's
  default device in float64.
* ``test_save_on_cpu_load_on_backend`` / ``test_save_on_backend_load_on_cpu``:
  a trained model saved with :func:`xpnn.network.save` and loaded with
  :func:`xpnn.network.load` on the other side predicts the same classes and
  probabilities (``PARITY_RTOL`` of the dtype, 1e-12 / 1e-5: one forward pass)
  as the model before saving, and its parameters live on the loading backend.
  The model is the 20-step run of the training side, in the loading side's dtype.
"""
import dataclasses
import functools

import numpy as np
import pytest

import xpnn
from xpnn import network
from xpnn.layers.base import TrainableLayer
from xpnn.layers.batch_normalization import BatchNormalization
from xpnn.models import lenet
from conftest import PARITY_RTOL
from parity_tools import REFERENCE, assert_backend_array, assert_parity, parity_error

pytestmark = pytest.mark.parity

SEED = 2024
STEPS = 20
BATCH = 8
TEST_IMAGES = 16
LEARNING_RATE = 5e-4      # lenet.build's default, the Adam step size
#: The farthest Adam (step ≈ ±lr) can carry a parameter in STEPS steps, twice over.
ADAM_REACH = 2 * STEPS * LEARNING_RATE


@dataclasses.dataclass(frozen=True)
class TrainingTolerance:
    """Bounds for comparing two training runs (see the module docstring)."""

    loss: float             # relative, every step
    predictions: float      # relative to the largest probability
    parameters: float       # relative to the array's largest entry ...
    free_parameters: float  # ... plus this absolute allowance
    displacement: float     # ||θ - θ_ref|| / ||θ_ref - θ_initial||


TRAINING_TOLERANCE = {
    "float64": TrainingTolerance(loss=1e-9, predictions=1e-6, parameters=1e-9,
                                 free_parameters=1e-6, displacement=1e-6),
    "float32": TrainingTolerance(loss=5e-3, predictions=3e-2, parameters=2e-2,
                                 free_parameters=ADAM_REACH, displacement=0.2),
}


# -- host data -----------------------------------------------------------------
def _templates(rng):
    """Ten 28x28 class templates: a few bright bars on a zero background."""
    templates = np.zeros((10, 28, 28))
    for template in templates:
        for _ in range(3):
            top, left = rng.integers(4, 20, 2)
            height, width = rng.integers(2, 8, 2)
            template[top:top + height, left:left + width] = rng.uniform(0.5, 1.0)
    return templates


@functools.lru_cache(maxsize=None)
def host_dataset():
    """(training images, one-hot labels, test images), float64, exact in float32."""
    rng = np.random.default_rng(SEED)
    templates = _templates(rng)
    count = STEPS * BATCH + TEST_IMAGES
    labels = rng.integers(0, 10, count)
    shifts = rng.integers(-2, 3, (count, 2))
    images = np.stack([np.roll(templates[label], tuple(shift), axis=(0, 1))
                       for label, shift in zip(labels, shifts)])
    speckles = rng.random(images.shape) < 0.03
    images = np.where(speckles, rng.random(images.shape), images)
    # Multiples of 1/256: the same numbers in float32 and float64.
    images = np.round(images * 255.0) / 256.0
    images = images[:, np.newaxis, :, :]
    one_hot = np.eye(10)[labels]
    train = STEPS * BATCH
    return images[:train], one_hot[:train], images[train:]


class HostBatches:
    """A course-style data layer: ``next()`` hands out the fixed host batches in order."""

    def __init__(self, images, labels, batch_size):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.position = 0

    def next(self):
        start = self.position
        self.position = (start + self.batch_size) % len(self.images)
        return (self.images[start:start + self.batch_size],
                self.labels[start:start + self.batch_size])


# -- training runs -------------------------------------------------------------
def _state(net):
    """Every parameter and batch-norm running statistic, as named host arrays."""
    state = {}
    for index, layer in enumerate(net.layers):
        names = ("weights", "bias") if isinstance(layer, TrainableLayer) else ()
        if isinstance(layer, BatchNormalization):
            names += ("running_mean", "running_variance")
        for name in names:
            state[f"{index}:{type(layer).__name__}.{name}"] = getattr(layer, name)
    return state


@functools.lru_cache(maxsize=None)
def trained(name, dtype, device=None):
    """Train LeNet (batch norm + dropout) for STEPS steps on one backend configuration.

    Returns a dict: ``backend``, ``net`` (the trained network, on that backend),
    ``losses`` (host float64, one per step), ``state`` (name -> host array) and
    ``predictions`` (test-phase SoftMax output on the test images, host) and
    ``initial_state`` (the parameters before training; no running statistics yet).
    """
    backend = xpnn.make_backend(name, dtype, device)
    images, labels, test_images = host_dataset()
    with xpnn.use_backend(backend), xpnn.host_random():
        np.random.seed(SEED)            # initial weights (drawn on the host)
        net = lenet.build(batch_norm=True, dropout=True, learning_rate=LEARNING_RATE)
        net.data_layer = HostBatches(images, labels, BATCH)
        initial_state = {key: xpnn.to_numpy(value) for key, value in _state(net).items()
                         if value is not None}
        np.random.seed(SEED + 1)        # dropout masks (drawn on the host)
        net.train(STEPS)
        for step, loss in enumerate(net.loss):
            assert_backend_array(loss, backend, f"loss of step {step + 1}")
        losses = np.array([float(xpnn.to_numpy(loss)) for loss in net.loss])
        state = _state(net)
        for key, value in state.items():
            assert_backend_array(value, backend, key)
        predictions = net.test(backend.asarray(test_images, dtype=backend.dtype))
        assert_backend_array(predictions, backend, "predictions")
    return {"backend": backend, "net": net, "losses": losses,
            "state": {key: xpnn.to_numpy(value) for key, value in state.items()},
            "initial_state": initial_state,
            "predictions": xpnn.to_numpy(predictions)}


def _config(backend, dtype=None):
    """The ``trained`` key of a backend, optionally in another dtype."""
    return backend.name, dtype or backend.dtype_name, backend.device_spec


def _displacement_error(actual, expected):
    """``||θ - θ_ref|| / ||θ_ref - θ_initial||`` over every trainable parameter."""
    keys = sorted(expected["initial_state"])
    difference = np.concatenate([(actual["state"][key].astype(np.float64)
                                  - expected["state"][key]).ravel() for key in keys])
    moved = np.concatenate([(expected["state"][key] - expected["initial_state"][key]).ravel()
                            for key in keys])
    return float(np.linalg.norm(difference) / np.linalg.norm(moved))


def _assert_runs_agree(actual, expected, tolerance):
    assert actual["losses"].shape == (STEPS,)
    assert np.all(np.isfinite(actual["losses"]))
    # Losses are positive sums: each step is held to the relative tolerance.
    np.testing.assert_allclose(actual["losses"], expected["losses"], rtol=tolerance.loss,
                               err_msg="loss per step")
    assert sorted(actual["state"]) == sorted(expected["state"])
    for key, value in actual["state"].items():
        reference = expected["state"][key]
        scale = float(np.max(np.abs(reference)))
        np.testing.assert_allclose(
            value, reference, rtol=0.0,
            atol=tolerance.parameters * scale + tolerance.free_parameters, err_msg=key)
    displacement = _displacement_error(actual, expected)
    assert displacement <= tolerance.displacement, (
        f"parameter displacement differs by {displacement:.3g} (relative), "
        f"bound {tolerance.displacement:g}")
    assert_parity(actual["predictions"], expected["predictions"], tolerance.predictions,
                  "test-phase probabilities after training")


def test_training_matches_reference(parity_backend):
    actual = trained(*_config(parity_backend))
    assert actual["state"], "no parameters collected"
    for value in actual["state"].values():
        assert value.dtype == np.dtype(parity_backend.dtype_name)
    reference = trained(*REFERENCE)
    # Training must have moved every parameter array, or matching would prove little.
    for key, initial in reference["initial_state"].items():
        assert not np.array_equal(reference["state"][key], initial), f"{key} never moved"
    _assert_runs_agree(actual, reference, TRAINING_TOLERANCE[parity_backend.dtype_name])


def test_float32_drift_on_same_backend(parity_backend):
    float32_run = trained(*_config(parity_backend, "float32"))
    if parity_backend.device_spec == "no_float64":
        float64_run = trained(parity_backend.name, "float64", None)
    else:
        float64_run = trained(*_config(parity_backend, "float64"))
    _assert_runs_agree(float32_run, float64_run, TRAINING_TOLERANCE["float32"])


def _assert_same_predictions(predictions, expected, rtol):
    assert_parity(predictions, expected, rtol, "probabilities")
    classes = np.argmax(xpnn.to_numpy(predictions), axis=1)
    expected_classes = np.argmax(expected, axis=1)
    # A class may only differ where the reference's top two are within rounding.
    top_two = np.sort(expected, axis=1)[:, -2:]
    clear = (top_two[:, 1] - top_two[:, 0]) > 10 * rtol
    np.testing.assert_array_equal(classes[clear], expected_classes[clear])


def _load_and_predict(path, backend):
    _, _, test_images = host_dataset()
    with xpnn.use_backend(backend):
        loaded = network.load(str(path), data_layer=None)
        for key, value in _state(loaded).items():
            assert_backend_array(value, backend, f"loaded {key}")
        predictions = loaded.test(test_images)
        assert_backend_array(predictions, backend, "predictions")
    return predictions


def test_save_on_cpu_load_on_backend(parity_backend, tmp_path):
    numpy_run = trained("cpu", parity_backend.dtype_name)
    path = tmp_path / "lenet-numpy.pkl"
    network.save(str(path), numpy_run["net"])
    predictions = _load_and_predict(path, parity_backend)
    _assert_same_predictions(predictions, numpy_run["predictions"],
                             PARITY_RTOL[parity_backend.dtype_name])


def test_save_on_backend_load_on_cpu(parity_backend, tmp_path):
    backend_run = trained(*_config(parity_backend))
    path = tmp_path / "lenet-backend.pkl"
    network.save(str(path), backend_run["net"])
    numpy_backend = xpnn.make_backend("cpu", parity_backend.dtype_name)
    predictions = _load_and_predict(path, numpy_backend)
    _assert_same_predictions(predictions, backend_run["predictions"],
                             PARITY_RTOL[parity_backend.dtype_name])


def measured_errors(actual, expected, tolerance):
    """The quantities the bounds limit, as measured (for re-deriving the bounds)."""
    loss = float(np.max(np.abs(actual["losses"] / expected["losses"] - 1.0)))
    used = {key: float(np.max(np.abs(value.astype(np.float64) - expected["state"][key]))
                       / (tolerance.parameters * np.max(np.abs(expected["state"][key]))
                          + tolerance.free_parameters))
            for key, value in actual["state"].items()}
    worst = max(used, key=used.get)
    return {"loss": loss,
            "predictions": parity_error(actual["predictions"], expected["predictions"]),
            f"parameters (fraction of bound, worst: {worst})": used[worst],
            "displacement": _displacement_error(actual, expected)}


if __name__ == "__main__":
    # ``python tests/test_parity_training.py``: print what the bounds are set against.
    from conftest import PARITY_PARAMS, backend_unavailable_reason

    for backend_id, name, device, dtype in PARITY_PARAMS:
        if backend_unavailable_reason(name, device, dtype) is None:
            errors = measured_errors(trained(name, dtype, device), trained(*REFERENCE),
                                     TRAINING_TOLERANCE[dtype])
            print(backend_id, {key: f"{value:.2g}" for key, value in errors.items()})
