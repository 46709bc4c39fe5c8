"""Checkpoints that load without executing code: NumPy ``.npz`` arrays plus JSON.

A checkpoint directory holds

``model.npz``
    Every array as NumPy (layer parameters, batch-norm running statistics,
    each optimizer's state and step count) plus, under the key ``__meta__``,
    the JSON metadata below. It is the one file a checkpoint *is*: written to
    a temporary file and renamed, so it is always complete and consistent.
``model.json``
    The architecture (model name and build options, dtype, backend it was
    trained on, the layer list with array shapes) for people and tools.
``resume.json``
    What training needs to continue exactly (data-layer position, random
    generator state, metrics so far), when the trainer gave it.

Both JSON files are copies of what ``model.npz`` embeds; loading reads the
``.npz`` only (``allow_pickle=False``), so a model trained on any backend, the
GPU included, loads on a CPU-only machine. :func:`xpnn.network.save`/``load``
keep the course's pickle API.
"""
import io
import json
import os
import re
import zipfile

import numpy as np

import xpnn
from xpnn.backend import get_backend, make_backend
from xpnn._files import atomic_write_bytes

FORMAT = "xpnn-checkpoint"
VERSION = 1
MODEL_FILE = "model.npz"
MODEL_JSON = "model.json"
RESUME_JSON = "resume.json"
META_KEY = "__meta__"

#: Attributes (when a layer lists them in ``state_names``) that a model needs;
#: gradients, masks and forward caches are not saved.
PERSISTENT_ATTRIBUTES = ("weights", "bias", "running_mean", "running_variance")
#: A layer's optimizers: the weights' and the bias's own copy.
OPTIMIZER_SLOTS = (("optimizer", "_optimizer"), ("bias_optimizer", "_bias_optimizer"))


class CheckpointError(ValueError):
    """A checkpoint is missing, from another format version, or does not fit the model."""


def _model_builders():
    from xpnn.models import lenet

    return {"lenet": lenet.build}


# -- arrays of a network ------------------------------------------------------------

def _persistent_attributes(layer):
    return [name for name in PERSISTENT_ATTRIBUTES if name in getattr(layer, "state_names", ())]


def optimizers_of(layer):
    """Yield (slot name, optimizer) for the layer's optimizers that exist."""
    for slot, attribute in OPTIMIZER_SLOTS:
        optimizer = getattr(layer, attribute, None)
        if optimizer is not None:
            yield slot, optimizer


def _optimizer_arrays(prefix, optimizer, to_numpy):
    arrays = {}
    for name in getattr(optimizer, "state_names", ()):
        value = getattr(optimizer, name, None)
        if value is not None:
            arrays[f"{prefix}.{name}"] = to_numpy(value)
    if isinstance(getattr(optimizer, "step_count", None), int):
        arrays[f"{prefix}.step_count"] = np.asarray(optimizer.step_count, dtype=np.int64)
    return arrays


def network_arrays(net):
    """Return every array a network needs to predict and to keep training, as NumPy.

    Keys are ``layers.<i>.<attribute>`` and ``layers.<i>.<optimizer slot>.<state>``.
    """
    arrays = {}
    for index, layer in enumerate(net.layers):
        to_numpy = layer.backend.to_numpy
        for name in _persistent_attributes(layer):
            value = getattr(layer, name, None)
            if value is not None:
                arrays[f"layers.{index}.{name}"] = to_numpy(value)
        for slot, optimizer in optimizers_of(layer):
            arrays.update(_optimizer_arrays(f"layers.{index}.{slot}", optimizer, to_numpy))
    return arrays


def non_finite_arrays(arrays):
    """Names of the float arrays in ``arrays`` that hold a NaN or an infinity."""
    return [key for key, value in arrays.items()
            if value.dtype.kind == "f" and not np.all(np.isfinite(value))]


def _check_shape(key, value, expected):
    if expected is not None and tuple(value.shape) != tuple(expected.shape):
        raise CheckpointError(f"checkpoint array {key} has shape {tuple(value.shape)}, the model "
                              f"expects {tuple(expected.shape)}")


def _restore_optimizer(prefix, optimizer, arrays, backend):
    for name in getattr(optimizer, "state_names", ()):
        key = f"{prefix}.{name}"
        if key in arrays:
            setattr(optimizer, name, backend.asarray(arrays[key], dtype=backend.dtype))
    if f"{prefix}.step_count" in arrays:
        optimizer.step_count = int(arrays[f"{prefix}.step_count"])


def restore_network_arrays(net, arrays):
    """Put arrays from :func:`network_arrays` back into ``net`` (on its layers' backend)."""
    for index, layer in enumerate(net.layers):
        backend = layer.backend
        for name in _persistent_attributes(layer):
            key = f"layers.{index}.{name}"
            if key not in arrays:
                if name in ("weights",):
                    raise CheckpointError(f"checkpoint lacks {key} ({type(layer).__name__})")
                continue
            _check_shape(key, arrays[key], getattr(layer, name, None))
            if name in ("weights", "bias"):
                setattr(layer, name, arrays[key])  # the setters move to the layer's backend
            else:
                setattr(layer, name, backend.asarray(arrays[key], dtype=backend.dtype))
        for slot, optimizer in optimizers_of(layer):
            _restore_optimizer(f"layers.{index}.{slot}", optimizer, arrays, backend)


# -- metadata --------------------------------------------------------------------------

def describe_layers(net):
    """The layer list of ``model.json``: type and saved array shapes per layer."""
    described = []
    for layer in net.layers:
        shapes = {name: list(getattr(layer, name).shape) for name in _persistent_attributes(layer)
                  if getattr(layer, name, None) is not None}
        # (A layer standing in for a plain one, as xpnn.parallel's do, is saved as that one.)
        kind = getattr(layer, "plain_class", None) or type(layer)
        described.append({"type": kind.__name__, "arrays": shapes})
    return described


def device_label(backend):
    """A short, space-free name of the backend's device (``cpu``, ``cuda:0``, ``device1``)."""
    device = backend.device
    if backend.name == "gpu" and hasattr(device, "id"):
        return f"cuda:{device.id}"
    text = str(device)
    quoted = re.fullmatch(r"[\w.]*Device\('([^']+)'\)", text)  # array-api-strict's Device('CPU_DEVICE')
    return (quoted.group(1) if quoted else text).replace(" ", "")


def model_metadata(net, model, options):
    """The architecture JSON: model name and build options, dtype, backend, layers."""
    backend = net.backend
    return {"format": FORMAT, "version": VERSION, "xpnn_version": xpnn.__version__,
            "architecture": {"model": model, "options": dict(options)},
            "dtype": backend.dtype_name, "backend": backend.name, "device": device_label(backend),
            "layers": describe_layers(net)}


def _json_bytes(value):
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def save_checkpoint(directory, net, model="lenet", options=None, resume=None, arrays=None):
    """Write ``model.npz`` (+ ``model.json``, ``resume.json``) into ``directory`` atomically.

    Parameters
    ----------
    directory : str
        Created when missing.
    net : xpnn.NeuralNetwork
        Built by the builder named ``model`` with ``options``.
    model : str
        Builder name (``"lenet"``: :func:`xpnn.models.lenet.build`).
    options : dict
        The builder's keyword arguments (JSON values).
    resume : dict, optional
        JSON-serializable training state stored with the model.
    arrays : dict, optional
        ``network_arrays(net)`` when the caller has it already.

    Returns
    -------
    dict
        The metadata written (``resume`` included).
    """
    os.makedirs(directory, exist_ok=True)
    meta = model_metadata(net, model, options or {})
    meta["resume"] = resume
    arrays = dict(network_arrays(net) if arrays is None else arrays)
    arrays[META_KEY] = np.asarray(json.dumps(meta, sort_keys=True))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(os.path.join(directory, MODEL_FILE), buffer.getvalue())
    architecture = {key: value for key, value in meta.items() if key != "resume"}
    atomic_write_bytes(os.path.join(directory, MODEL_JSON), _json_bytes(architecture))
    if resume is not None:
        atomic_write_bytes(os.path.join(directory, RESUME_JSON), _json_bytes(resume))
    return meta


def read_checkpoint(directory):
    """Return ``(metadata, arrays)`` of the checkpoint in ``directory`` (no code is executed).

    Raises
    ------
    CheckpointError
        When ``model.npz`` is missing or not an xpnn checkpoint of this version.
    """
    path = os.path.join(directory, MODEL_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(_no_checkpoint(os.fspath(directory)))
    fix = "delete it (xpnn-train: or start afresh with --overwrite), or use another copy"
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        # A truncated file is EOFError/BadZipFile, a flipped byte BadZipFile (CRC).
        raise CheckpointError(f"{path} is not a readable .npz file ({type(error).__name__}: "
                              f"{error}); {fix}") from error
    if META_KEY not in arrays:
        raise CheckpointError(f"{path} is not an xpnn checkpoint (no {META_KEY} entry)")
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except ValueError as error:  # json.JSONDecodeError
        raise CheckpointError(f"{path}: its metadata is not valid JSON ({error}); {fix}") from error
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its metadata is not an xpnn checkpoint's; {fix}")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} version "
                              f"{meta.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    return meta, arrays


def _no_checkpoint(directory):
    """Why ``directory`` holds no checkpoint, and what to pass instead."""
    wanted = (f"pass the directory an xpnn-train run wrote (its --out), which holds {MODEL_FILE} "
              f"and {MODEL_JSON}")
    if os.path.isfile(directory):
        if os.path.basename(directory) == MODEL_FILE:
            return (f"{directory} is the checkpoint's file; pass its directory, "
                    f"{os.path.dirname(directory) or '.'}")
        return f"{directory} is a file, not a checkpoint directory; {wanted}"
    if not os.path.isdir(directory):
        return f"no checkpoint in {directory}: the directory does not exist; {wanted}"
    return f"no checkpoint in {directory}: {MODEL_FILE} does not exist there; {wanted}"


def build_model(meta, backend):
    """Build the architecture in ``meta`` on ``backend`` without disturbing ``np.random``."""
    architecture = meta["architecture"]
    builders = _model_builders()
    if architecture["model"] not in builders:
        raise CheckpointError(f"unknown model {architecture['model']!r}; known: {sorted(builders)}")
    # Building draws initial weights from np.random; they are overwritten
    # anyway, and the caller's random stream must not shift.
    random_state = np.random.get_state()
    try:
        with xpnn.use_backend(backend):
            net = builders[architecture["model"]](**architecture["options"])
    finally:
        np.random.set_state(random_state)
    found = [type(layer).__name__ for layer in net.layers]
    expected = [layer["type"] for layer in meta["layers"]]
    if found != expected:
        raise CheckpointError(f"the checkpoint's layers {expected} do not match the rebuilt "
                              f"model's {found}")
    return net


def load_model(directory, backend=None, device=None):
    """Load the model saved in ``directory`` onto ``backend`` (default: the current one).

    The saved dtype is kept. Works on a CPU-only machine whatever backend the
    model was trained on.

    Returns
    -------
    xpnn.NeuralNetwork
        With parameters, batch-norm statistics and optimizer state restored;
        ``data_layer`` is None.
    """
    meta, arrays = read_checkpoint(directory)
    if backend is None:
        current = get_backend()
        target = make_backend(current.name, meta["dtype"], device or current.device_spec)
    else:
        target = make_backend(backend, meta["dtype"], device)
    net = build_model(meta, target)
    restore_network_arrays(net, arrays)
    return net
