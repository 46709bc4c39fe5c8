"""The checks ``xpnn-train --resume`` makes of a checkpoint's training state before using it.

``model.npz`` embeds, under ``resume``, what :class:`xpnn.training.Run` needs to
continue exactly (metrics so far, the epoch in progress, the data layer's
position, NumPy's generator, the run's settings). Each field is checked for
its type and range here, so that an edited or damaged state is a
:class:`~xpnn.checkpoint.CheckpointError` naming the file and the field, never
a ``ZeroDivisionError``/``KeyError``/``TypeError`` later in training.
"""
import math

from xpnn.checkpoint_checks import DTYPES, CheckpointError

FIX = "start afresh with --overwrite, or use another copy"
#: Each epoch's metrics entry (metrics.json's), all finite numbers >= 0.
METRIC_KEYS = ("epoch", "train_loss", "train_accuracy", "test_accuracy", "seconds",
               "eval_seconds", "images_per_second")
#: The epoch in progress (training.EpochProgress).
PARTIAL_KEYS = ("steps", "samples", "loss_sum", "correct", "seconds")
#: The data layer's position (xpnn.data_layer.DataLayer.state_dict; fingerprint optional).
DATA_LAYER_KEYS = ("seed", "epoch", "position", "size", "shuffle", "batch_size")
#: NumPy's MT19937 state as training.numpy_random_state writes it.
MT_KEYS = 624


def _count(value, minimum=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _number(value, minimum=0.0):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= minimum)


def _optional_count(value):
    return value is None or _count(value, 1)


#: The run settings a resume takes from the checkpoint: what each must be.
SETTING_RULES = {
    "dataset": (lambda v: v in ("fashion-mnist", "mnist"), "fashion-mnist or mnist"),
    "data_dir": (lambda v: v is None or isinstance(v, str), "a path or null"),
    "epochs": (lambda v: _count(v, 1), "an integer >= 1"),
    "batch_size": (lambda v: _count(v, 1), "an integer >= 1"),
    "lr": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "batch_norm": (lambda v: isinstance(v, bool), "true or false"),
    "dropout": (lambda v: isinstance(v, bool), "true or false"),
    "keep_probability": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "dtype": (lambda v: v in DTYPES, " or ".join(DTYPES)),
    "seed": (lambda v: _count(v) and v < 2**32, "an integer from 0 to 2**32 - 1"),
    "limit_train": (_optional_count, "an integer >= 1 or null"),
    "limit_test": (_optional_count, "an integer >= 1 or null"),
}


class _Checker:
    """Raises CheckpointError naming the file and the field that fails."""

    def __init__(self, path):
        self.path = path

    def require(self, condition, field, value, expected):
        if not condition:
            raise CheckpointError(f"{self.path}: its training state is damaged: {field} is "
                                  f"{value!r}, expected {expected}; {FIX}")

    def keys(self, mapping, field, keys):
        """``mapping`` is a dict with every one of ``keys``."""
        self.require(isinstance(mapping, dict) and all(key in mapping for key in keys), field,
                     mapping, f"an object with {', '.join(keys)}")


def check_resume_state(path, resume):
    """Raise CheckpointError unless ``resume`` (from the checkpoint at ``path``) is usable."""
    check = _Checker(path)
    check.keys(resume, "resume", ("epochs_completed", "metrics", "partial_epoch", "data_layer",
                                  "numpy_random", "settings"))
    _check_settings(check, resume["settings"])
    _check_metrics(check, resume["metrics"], resume["epochs_completed"])
    if resume["partial_epoch"] is not None:
        _check_partial(check, resume["partial_epoch"])
    _check_data_layer(check, resume["data_layer"])
    _check_random_state(check, resume["numpy_random"])


def _check_settings(check, settings):
    check.require(isinstance(settings, dict), "settings", settings, "an object")
    for key, (rule, expected) in SETTING_RULES.items():
        check.require(key in settings, f"settings.{key}", "missing", expected)
        check.require(rule(settings[key]), f"settings.{key}", settings[key], expected)


def _check_metrics(check, metrics, epochs_completed):
    check.require(isinstance(metrics, list), "metrics", metrics, "a list of epochs")
    check.require(epochs_completed == len(metrics), "epochs_completed", epochs_completed,
                  f"the number of epochs in metrics, {len(metrics)}")
    for index, entry in enumerate(metrics):
        check.keys(entry, f"metrics[{index}]", METRIC_KEYS)
        check.require(entry["epoch"] == index + 1 and _count(entry["epoch"]),
                      f"metrics[{index}].epoch", entry["epoch"], index + 1)
        for key in METRIC_KEYS[1:]:
            check.require(_number(entry[key]), f"metrics[{index}].{key}", entry[key],
                          "a finite number >= 0")
        for key in ("train_accuracy", "test_accuracy"):
            check.require(entry[key] <= 1, f"metrics[{index}].{key}", entry[key], "at most 1")


def _check_partial(check, partial):
    check.keys(partial, "partial_epoch", PARTIAL_KEYS)
    check.require(set(partial) == set(PARTIAL_KEYS), "partial_epoch", sorted(partial),
                  f"exactly {', '.join(PARTIAL_KEYS)}")
    for key in ("steps", "samples", "correct"):
        check.require(_count(partial[key]), f"partial_epoch.{key}", partial[key], "an integer >= 0")
    for key in ("loss_sum", "seconds"):
        check.require(_number(partial[key]), f"partial_epoch.{key}", partial[key],
                      "a finite number >= 0")
    check.require(partial["samples"] >= partial["steps"] and (partial["samples"] == 0) == (
        partial["steps"] == 0), "partial_epoch.samples", partial["samples"],
        f"at least one per step ({partial['steps']} steps), none without a step")
    check.require(partial["correct"] <= partial["samples"], "partial_epoch.correct",
                  partial["correct"], f"at most the samples, {partial['samples']}")


def _check_data_layer(check, state):
    check.keys(state, "data_layer", DATA_LAYER_KEYS)
    for key, minimum in (("seed", 0), ("epoch", 0), ("position", 0), ("size", 1),
                         ("batch_size", 1)):
        check.require(_count(state[key], minimum), f"data_layer.{key}", state[key],
                      f"an integer >= {minimum}")
    check.require(isinstance(state["shuffle"], bool), "data_layer.shuffle", state["shuffle"],
                  "true or false")
    check.require(isinstance(state.get("fingerprint", ""), str), "data_layer.fingerprint",
                  state.get("fingerprint"), "a string")


def _check_random_state(check, state):
    check.keys(state, "numpy_random", ("name", "keys", "pos", "has_gauss", "cached_gaussian"))
    check.require(state["name"] == "MT19937", "numpy_random.name", state["name"], "'MT19937'")
    keys = state["keys"]
    check.require(isinstance(keys, list) and len(keys) == MT_KEYS and all(
        _count(key) and key < 2**32 for key in keys), "numpy_random.keys",
        f"{type(keys).__name__} of {len(keys) if isinstance(keys, list) else '?'} entries",
        f"a list of {MT_KEYS} integers from 0 to 2**32 - 1")
    check.require(_count(state["pos"]) and state["pos"] <= MT_KEYS, "numpy_random.pos",
                  state["pos"], f"an integer from 0 to {MT_KEYS}")
    check.require(_count(state["has_gauss"]) and state["has_gauss"] <= 1, "numpy_random.has_gauss",
                  state["has_gauss"], "0 or 1")
    check.require(isinstance(state["cached_gaussian"], (int, float)) and not isinstance(
        state["cached_gaussian"], bool) and math.isfinite(state["cached_gaussian"]),
        "numpy_random.cached_gaussian", state["cached_gaussian"], "a finite number")


def check_against_data(path, resume, train_layer):
    """Raise CheckpointError unless the training state's position fits ``train_layer`` (the data
    layer of the resumed run, over the data the state was saved for: its size is checked by
    ``DataLayer.load_state_dict``): the epoch in progress ends within the epoch's batches, and
    the data layer stands where its steps left it."""
    check = _Checker(path)
    state, partial = resume["data_layer"], resume["partial_epoch"]
    settings = resume["settings"]
    check.require(state["seed"] == settings["seed"], "data_layer.seed", state["seed"],
                  f"the run's seed, {settings['seed']}")
    check.require(state["batch_size"] == settings["batch_size"], "data_layer.batch_size",
                  state["batch_size"], f"the run's batch size, {settings['batch_size']}")
    steps = 0 if partial is None else partial["steps"]
    total = train_layer.batches_per_epoch
    check.require(steps <= total, "partial_epoch.steps", steps, f"at most the epoch's {total} batches")
    samples = min(steps * train_layer.batch_size, train_layer.size)
    if partial is not None:
        check.require(partial["samples"] == samples, "partial_epoch.samples", partial["samples"],
                      f"{samples} for {steps} steps of {train_layer.batch_size}")
    check.require(state["position"] == samples % train_layer.size, "data_layer.position",
                  state["position"], f"{samples % train_layer.size} after {steps} steps")
    epoch = resume["epochs_completed"] + (steps == total)
    check.require(state["epoch"] == epoch, "data_layer.epoch", state["epoch"], epoch)
