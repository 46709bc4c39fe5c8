"""Checkpoints that load without executing code: NumPy ``.npz`` arrays plus JSON.

A checkpoint directory holds

``model.npz``
    Every array as NumPy (layer parameters, batch-norm running statistics,
    each optimizer's state and step count) plus, under the key ``__meta__``,
    the JSON metadata below. It is the one file a checkpoint *is*: written to
    a temporary file and renamed, so it is always complete and consistent.
``model.json``
    The architecture (model name and build options, dtype, backend it was
    trained on, the layer list with array shapes) for people and tools: a
    copy of what ``model.npz`` embeds.

Loading reads the ``.npz`` only (``allow_pickle=False``), so a model trained on
any backend, the GPU included, loads on a CPU-only machine; what training needs
to continue exactly (data-layer position, random generator state, metrics so
far) is embedded there too, under ``resume`` (a separate ``resume.json`` copy
is no longer written: a copy that loading does not read could only disagree).
Every field and array is checked on loading (:mod:`xpnn.checkpoint_checks`):
a damaged or edited file is a :class:`CheckpointError` naming it and the
problem. A checkpoint is never written from parameters, running statistics or
optimizer state that hold NaN or infinity (:class:`NonFiniteState`).
:func:`xpnn.network.save`/``load`` keep the course's pickle API.
"""
import io
import json
import os
import re

import numpy as np

import xpnn
from xpnn.backend import get_backend, make_backend
from xpnn._files import atomic_write_bytes
from xpnn.checkpoint_checks import (FIX, CheckpointError, check_arrays, check_meta, check_options,
                                    manifest)

FORMAT = "xpnn-checkpoint"
VERSION = 1
MODEL_FILE = "model.npz"
MODEL_JSON = "model.json"
RESUME_JSON = "resume.json"
META_KEY = "__meta__"

#: Attributes (when a layer lists them in ``state_names``) that a model needs;
#: gradients, masks and forward caches are not saved. (A recurrent layer's output part and,
#: with ``memorize``, the states it carries to the next sequence.)
PERSISTENT_ATTRIBUTES = ("weights", "bias", "running_mean", "running_variance",
                         "output_weights", "hidden_state", "cell_state")
#: A layer's optimizers: the weights' and the bias's own copy (a recurrent layer's output part's).
OPTIMIZER_SLOTS = (("optimizer", "_optimizer"), ("bias_optimizer", "_bias_optimizer"),
                   ("output_optimizer", "_output_optimizer"))
#: The parameter each optimizer slot steps (its state arrays have that parameter's shape).
SLOT_PARAMETERS = {"optimizer": "weights", "bias_optimizer": "bias",
                   "output_optimizer": "output_weights"}


class NonFiniteState(CheckpointError):
    """The network's arrays hold NaN or infinity: no checkpoint is written from them.

    Attributes
    ----------
    names : list of str
        The keys (as in :func:`network_arrays`) of the arrays that are not finite.
    """

    def __init__(self, names):
        super().__init__(f"the network's arrays hold NaN or infinite values "
                         f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); no "
                         f"checkpoint is written from them (the previous one, if any, is kept)")
        self.names = names


def _model_builders():
    from xpnn.models import lenet, recurrent

    return {"lenet": lenet.build, "lstm": recurrent.build_lstm, "rnn": recurrent.build_rnn}


def model_builder(model):
    """The function that builds ``model`` (``"lenet"``, ``"lstm"``, ``"rnn"``) from its options."""
    return _model_builders()[model]


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


def _required(key, arrays, owner):
    """``arrays[key]``; a missing one is refused, never replaced by a fresh value."""
    if key not in arrays:
        raise CheckpointError(f"checkpoint lacks {key} ({owner})")
    return arrays[key]


def _restore_optimizer(prefix, optimizer, arrays, backend, parameter):
    """Restore an optimizer's state; a step count says which state arrays must be there
    (Adam's moments after its first step), each of the shape of the ``parameter`` it steps."""
    counted = isinstance(getattr(optimizer, "step_count", None), int)
    if counted:
        optimizer.step_count = int(_required(f"{prefix}.step_count", arrays, type(optimizer).__name__))
    for name in getattr(optimizer, "state_names", ()):
        key = f"{prefix}.{name}"
        if key not in arrays and not (counted and optimizer.step_count > 0):
            continue  # (no step yet: no state; without a step count the manifest decides)
        value = _required(key, arrays, f"{type(optimizer).__name__} after step {optimizer.step_count}"
                          if counted else type(optimizer).__name__)
        _check_shape(key, value, parameter)
        setattr(optimizer, name, backend.asarray(value, dtype=backend.dtype))


def restore_network_arrays(net, arrays, meta=None):
    """Put arrays from :func:`network_arrays` back into ``net`` (on its layers' backend).

    Every array the model has (weights, biases; running statistics that ``meta``'s
    layer list says were saved; an optimizer's state after its first step) must be
    there with the model's shape: a missing one is a CheckpointError, never
    silently left at its fresh value.
    """
    described = meta["layers"] if meta is not None else [{}] * len(net.layers)
    for index, (layer, saved) in enumerate(zip(net.layers, described)):
        backend = layer.backend
        for name in _persistent_attributes(layer):
            key = f"layers.{index}.{name}"
            if key not in arrays and getattr(layer, name, None) is None and name not in saved.get(
                    "arrays", {}):
                continue  # (e.g. running statistics before any training batch)
            value = _required(key, arrays, type(layer).__name__)
            # (Running statistics have one entry per channel, as γ has.)
            _check_shape(key, value, layer.weights if name.startswith("running_") else
                         getattr(layer, name, None))
            if name in ("weights", "bias"):
                setattr(layer, name, value)  # the setters move to the layer's backend
            else:
                setattr(layer, name, backend.asarray(value, dtype=backend.dtype))
        for slot, optimizer in optimizers_of(layer):
            parameter = getattr(layer, SLOT_PARAMETERS[slot], None)
            _restore_optimizer(f"layers.{index}.{slot}", optimizer, arrays, backend, parameter)


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
    """Write ``model.npz`` (+ ``model.json``) into ``directory`` atomically.

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

    Raises
    ------
    NonFiniteState
        When an array holds NaN or infinity (one pass over each, on the host
        copies the file needs anyway): nothing is written, a previous
        checkpoint stays as it was.
    """
    arrays = dict(network_arrays(net) if arrays is None else arrays)
    broken = non_finite_arrays(arrays)
    if broken:
        raise NonFiniteState(broken)
    os.makedirs(directory, exist_ok=True)
    meta = model_metadata(net, model, options or {})
    meta["arrays"] = manifest(arrays)
    meta["resume"] = resume
    arrays[META_KEY] = np.asarray(json.dumps(meta, sort_keys=True))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(os.path.join(directory, MODEL_FILE), buffer.getvalue())
    architecture = {key: value for key, value in meta.items() if key not in ("resume", "arrays")}
    atomic_write_bytes(os.path.join(directory, MODEL_JSON), _json_bytes(architecture))
    stale = os.path.join(directory, RESUME_JSON)  # (written by earlier versions; now a stale copy)
    if os.path.isfile(stale):
        os.remove(stale)
    return meta


def read_checkpoint(directory):
    """Return ``(metadata, arrays)`` of the checkpoint in ``directory`` (no code is executed).

    Raises
    ------
    CheckpointError
        When ``model.npz`` is missing, not an xpnn checkpoint of this version, or
        damaged: unreadable, a metadata field of the wrong type, an array missing,
        of another shape or dtype than listed, or not finite.
    """
    path = os.path.join(directory, MODEL_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(_no_checkpoint(os.fspath(directory)))
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except Exception as error:  # noqa: BLE001 -- see below
        # The zip and .npy readers parse bytes from disk: a damaged file raises whatever
        # the damage leads to (BadZipFile for a CRC, EOFError when truncated,
        # NotImplementedError for a flipped compression method, zlib.error, ...), all of
        # which mean only that the file cannot be read.
        raise CheckpointError(f"{path} is not a readable .npz file ({type(error).__name__}: "
                              f"{error}); {FIX}") from error
    if META_KEY not in arrays:
        raise CheckpointError(f"{path} is not an xpnn checkpoint (no {META_KEY} entry)")
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except ValueError as error:  # json.JSONDecodeError
        raise CheckpointError(f"{path}: its metadata is not valid JSON ({error}); {FIX}") from error
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its metadata is not an xpnn checkpoint's; {FIX}")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} version "
                              f"{meta.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    check_meta(path, meta)
    check_arrays(path, meta, arrays)
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
    builder = builders[architecture["model"]]
    check_options(builder, architecture["model"], architecture["options"])
    # Building draws initial weights from np.random; they are overwritten
    # anyway, and the caller's random stream must not shift.
    random_state = np.random.get_state()
    try:
        with xpnn.use_backend(backend):
            net = builder(**architecture["options"])
    except (TypeError, ValueError) as error:  # an option out of its range
        raise CheckpointError(f"its architecture options do not build a {architecture['model']} "
                              f"({error})") from None
    finally:
        np.random.set_state(random_state)
    found = [type(layer).__name__ for layer in net.layers]
    expected = [layer["type"] for layer in meta["layers"]]
    if found != expected:
        raise CheckpointError(f"the checkpoint's layers {expected} do not match the rebuilt "
                              f"model's {found}")
    return net


def restore_model(path, meta, arrays, backend):
    """The network that :func:`read_checkpoint`'s ``(meta, arrays)`` from ``path`` describe,
    on ``backend``; a CheckpointError names ``path``."""
    try:
        net = build_model(meta, backend)
        restore_network_arrays(net, arrays, meta)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}; {FIX}") from None
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
    return restore_model(os.path.join(directory, MODEL_FILE), meta, arrays, target)
