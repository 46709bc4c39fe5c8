"""What a checkpoint must hold before xpnn trusts it (used by :mod:`xpnn.checkpoint`).

A damaged or hand-edited ``model.npz`` (a zip whose CRCs a careful edit keeps
valid) must end in a :class:`CheckpointError` that names the file and the
problem: not in a traceback from deep inside NumPy or the zip reader, and not
in a model that trains on with fresh values where arrays are missing. So every
metadata field that loading uses is checked for its type and range, and every
array against the list the checkpoint makes of them (and against the model, see
``checkpoint.restore_network_arrays``).
"""
import inspect
import math

import numpy as np

#: The dtypes a checkpoint may declare.
DTYPES = ("float32", "float64")
#: Arrays of variances (by key ending): a negative entry would make the next step NaN.
NON_NEGATIVE = ("running_variance", "second_moment")
#: What to do about a damaged checkpoint.
FIX = "delete it (xpnn-train: or start afresh with --overwrite), or use another copy"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, from another format version, or does not fit the model."""


def _require(condition, path, problem):
    if not condition:
        raise CheckpointError(f"{path}: {problem}; {FIX}")


def _is_count(value, minimum=0):
    """An int (not a bool) >= ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_manifest_entry(entry):
    """``[shape, dtype]``: a list of counts and a dtype name."""
    return (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
            and all(_is_count(n) for n in entry[0]) and isinstance(entry[1], str))


def check_meta(path, meta):
    """Raise CheckpointError unless the metadata fields that loading uses have their types."""
    architecture = meta.get("architecture")
    _require(isinstance(architecture, dict) and isinstance(architecture.get("model"), str)
             and isinstance(architecture.get("options"), dict), path,
             "its architecture is not {\"model\": name, \"options\": {...}}")
    _require(meta.get("dtype") in DTYPES, path,
             f"its dtype {meta.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    layers = meta.get("layers")
    _require(isinstance(layers, list) and all(
        isinstance(layer, dict) and isinstance(layer.get("type"), str)
        and isinstance(layer.get("arrays", {}), dict) for layer in layers), path,
        "its layer list is not a list of {\"type\": name, \"arrays\": {...}}")
    _require(meta.get("resume") is None or isinstance(meta["resume"], dict), path,
             "its training state is not a JSON object")
    manifest = meta.get("arrays")  # (checkpoints before it existed have none)
    _require(manifest is None or (isinstance(manifest, dict) and all(
        _is_manifest_entry(entry) for entry in manifest.values())), path,
        "its array list is not {name: [shape, dtype]}")


def manifest(arrays):
    """The array list a checkpoint stores: ``{key: [shape, dtype name]}``."""
    return {key: [list(value.shape), str(value.dtype)] for key, value in arrays.items()}


def check_arrays(path, meta, arrays):
    """Raise CheckpointError unless ``arrays`` are the ones the metadata lists, of its dtype,
    finite, with step counts that are counts and variances that are not negative."""
    listed = meta.get("arrays")
    if listed is not None:
        missing = sorted(set(listed) - set(arrays))
        _require(not missing, path, f"it lacks {', '.join(missing)}, which it lists")
        extra = sorted(set(arrays) - set(listed))
        _require(not extra, path, f"it holds {', '.join(extra)}, which it does not list")
        for key, value in arrays.items():
            _require(manifest({key: value})[key] == listed[key], path,
                     f"array {key} is {_described(value)}, listed as shape "
                     f"{tuple(listed[key][0])} {listed[key][1]}")
    for key, value in arrays.items():
        if key.endswith(".step_count"):
            _require(value.shape == () and value.dtype.kind in "iu" and int(value) >= 0, path,
                     f"{key} is {_described(value)}, not a step count (an integer >= 0)")
            continue
        _require(value.dtype == np.dtype(meta["dtype"]), path,
                 f"array {key} is {_described(value)}, not of the checkpoint's dtype {meta['dtype']}")
        _require(bool(np.all(np.isfinite(value))), path,
                 f"array {key} holds NaN or infinite values (xpnn never saves such a checkpoint)")
        _require(not key.endswith(NON_NEGATIVE) or bool(np.all(value >= 0)), path,
                 f"array {key} holds negative values, but it holds variances")


def _described(value):
    return f"shape {tuple(value.shape)} {value.dtype}" + (f" = {value.item()!r}" if value.size == 1
                                                          else "")


def check_options(builder, model, options):
    """Raise CheckpointError unless every build option is one ``builder`` takes, with a value
    of its default's kind (a bool for a bool, a finite number for a number): the builder
    itself checks ranges, but would take the string ``"no"`` for ``batch_norm=True``."""
    parameters = inspect.signature(builder).parameters
    for name, value in options.items():
        if name not in parameters:
            raise CheckpointError(f"its architecture has an option {name!r}, which model "
                                  f"{model!r} does not take")
        default = parameters[name].default
        if isinstance(default, bool):
            kind_ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, (int, float)):
            kind_ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                       and math.isfinite(value))
            kind = "a finite number"
        else:
            continue  # (no default of a known kind: the builder judges the value)
        if not kind_ok:
            raise CheckpointError(f"its architecture option {name} is {value!r}, not {kind}")
