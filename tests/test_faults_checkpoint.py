"""Hostile checkpoints: every damaged or edited ``model.npz`` is a CheckpointError naming the file
and the problem, or loads exactly what was saved; nothing missing is silently re-initialised.

The byte-level cases (a flip of every byte, a cut at every length) use a tiny model, registered
as a model builder for these tests only, so that they stay fast; the training-state edits go
through ``xpnn-train --resume`` on a small LeNet run.
"""
import json
import os
import re
import signal

import numpy as np
import pytest

import xpnn
from xpnn import NeuralNetwork, checkpoint as ckpt
from xpnn import training
from xpnn.initializers import Constant, He
from xpnn.layers import BatchNormalization, FullyConnected, ReLU, SoftMax
from xpnn.losses import CrossEntropyLoss
from xpnn.optimizers import Adam
from xpnn.train import main
from test_train_cli_errors import write_mnist_dir

pytestmark = pytest.mark.faults


def tiny_build(hidden=False, learning_rate=1e-3):
    """Batch norm of 2 features and SoftMax (after FC 2 -> 2 and ReLU if ``hidden``), Adam.

    Without ``hidden``: every kind of array a checkpoint holds (weights, a bias, running
    statistics, two optimizers' moments and step counts) in 10 arrays, ~8 kB: each read costs
    per array, and the byte tests read the file some 16,000 times.
    """
    net = NeuralNetwork(Adam(learning_rate, 0.9, 0.999), He(), Constant(0.1))
    for layer in (([FullyConnected(2, 2), ReLU()] if hidden else [])
                  + [BatchNormalization(2), SoftMax()]):
        net.append_layer(layer)
    net.loss_layer = CrossEntropyLoss()
    return net


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """A trained tiny model saved in ``tmp_path``: ``(directory, its arrays, model.npz's bytes)``."""
    builders = ckpt._model_builders()
    monkeypatch.setattr(ckpt, "_model_builders", lambda: {**builders, "tiny": tiny_build})
    with xpnn.use_backend("cpu", dtype="float64"):
        xpnn.seed(1)
        net = tiny_build()
        rng = np.random.default_rng(0)
        for _ in range(2):  # (moments, step counts and running statistics exist)
            net.train_batch(rng.random((5, 2)), np.eye(2)[rng.integers(0, 2, 5)])
        ckpt.save_checkpoint(str(tmp_path), net, "tiny", {"hidden": False, "learning_rate": 1e-3})
    return str(tmp_path), ckpt.network_arrays(net), (tmp_path / ckpt.MODEL_FILE).read_bytes()


def loads_the_same_or_refuses(directory, arrays, path, saved=None):
    """Load ``directory``: a CheckpointError naming ``path``, or exactly ``arrays``.

    ``saved``: the intact file's ``read_checkpoint``; a read that gives exactly it is the
    intact checkpoint (loading it is deterministic), which saves building the model."""
    if saved is not None:
        try:
            meta, stored = ckpt.read_checkpoint(directory)
        except ckpt.CheckpointError as error:
            assert path in str(error), str(error)
            return "refused"
        if meta == saved[0] and sorted(stored) == sorted(saved[1]) and all(
                stored[key].dtype == value.dtype and np.array_equal(stored[key], value)
                for key, value in saved[1].items()):
            return "identical"
    try:
        net = ckpt.load_model(directory, backend="cpu")
    except ckpt.CheckpointError as error:
        assert path in str(error), str(error)
        return "refused"
    loaded = ckpt.network_arrays(net)
    assert sorted(loaded) == sorted(arrays)
    for key in arrays:
        np.testing.assert_array_equal(loaded[key], arrays[key], err_msg=key)
    return "identical"


def rewrite(directory, change):
    """Rewrite model.npz with ``change(meta, arrays)`` applied (valid zip, valid CRCs)."""
    path = os.path.join(directory, ckpt.MODEL_FILE)
    with np.load(path) as stored:
        arrays = {key: stored[key] for key in stored.files}
    meta = json.loads(str(arrays.pop(ckpt.META_KEY)))
    change(meta, arrays)
    arrays[ckpt.META_KEY] = np.asarray(json.dumps(meta))
    np.savez(path, **arrays)


# -- bytes --------------------------------------------------------------------------------

def test_every_flipped_byte_is_refused_or_loads_identical_arrays(tiny):
    directory, arrays, payload = tiny
    path = os.path.join(directory, ckpt.MODEL_FILE)
    saved = ckpt.read_checkpoint(directory)
    assert loads_the_same_or_refuses(directory, arrays, path) == "identical"
    outcomes = {"refused": 0, "identical": 0}
    for position in range(len(payload)):
        with open(path, "wb") as stream:
            stream.write(payload[:position] + bytes([payload[position] ^ 0xFF]) + payload[position + 1:])
        outcomes[loads_the_same_or_refuses(directory, arrays, path, saved)] += 1
    # Most bytes are array data and metadata under a CRC; some are zip fields a reader ignores.
    assert outcomes["refused"] > len(payload) // 2 and outcomes["identical"] > 0, outcomes


def test_a_cut_at_every_length_is_refused(tiny):
    directory, arrays, payload = tiny
    path = os.path.join(directory, ckpt.MODEL_FILE)
    for length in range(len(payload)):
        with open(path, "wb") as stream:
            stream.write(payload[:length])
        assert loads_the_same_or_refuses(directory, arrays, path) == "refused", length


# -- fields and arrays, edited with valid CRCs -----------------------------------------------

def _set(*keys_and_value):
    """An edit of the metadata: ``meta[k1][k2]... = value``."""
    *keys, value = keys_and_value

    def change(meta, arrays):
        target = meta
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


def _set_array(key, value):
    def change(meta, arrays):
        arrays[key] = value
        if "arrays" in meta and key in meta["arrays"]:  # (listed as it now is: the model refuses)
            meta["arrays"][key] = [list(np.shape(value)), str(np.asarray(value).dtype)]
    return change


META_EDITS = {
    "format": _set("format", 3),
    "version": _set("version", "1"),
    "architecture": _set("architecture", ["tiny"]),
    "architecture.model-type": _set("architecture", "model", 7),
    "architecture.model-unknown": _set("architecture", "model", "resnet"),
    "architecture.options-type": _set("architecture", "options", "hidden"),
    "options.unknown": _set("architecture", "options", "depth", 3),
    "options.bool-as-string": _set("architecture", "options", "hidden", "no"),
    "options.number-as-string": _set("architecture", "options", "learning_rate", "0.001"),
    "options.number-as-bool": _set("architecture", "options", "learning_rate", True),
    "options.out-of-range": _set("architecture", "options", "learning_rate", -1.0),
    "options.other-architecture": _set("architecture", "options", "hidden", True),
    "dtype-unknown": _set("dtype", "float16"),
    "dtype-type": _set("dtype", 64),
    "layers-type": _set("layers", {"type": "BatchNormalization"}),
    "layers.type": _set("layers", 0, "type", None),
    "layers.arrays": _set("layers", 0, "arrays", []),
    "layers-reordered": lambda meta, arrays: meta["layers"].reverse(),
    "arrays-list-type": _set("arrays", ["layers.0.weights"]),
    "arrays-list-entry": _set("arrays", "layers.0.weights", [2, "float64"]),
    "resume-type": _set("resume", "epoch 3"),
    "array-shape": _set_array("layers.0.weights", np.ones(3)),
    "array-dtype": _set_array("layers.0.bias", np.zeros(2, dtype=np.float32)),
    "array-integers": _set_array("layers.0.weights", np.ones(2, dtype=np.int64)),
    "array-text": _set_array("layers.0.weights", np.asarray(["1", "2"])),
    "array-nan": _set_array("layers.0.weights", np.array([1.0, np.nan])),
    "array-inf": _set_array("layers.0.optimizer.first_moment", np.array([np.inf, 0.0])),
    "variance-negative": _set_array("layers.0.running_variance", np.array([1.0, -0.5])),
    "second-moment-negative": _set_array("layers.0.optimizer.second_moment", np.array([-1.0, 0.0])),
    "moment-shape": _set_array("layers.0.bias_optimizer.first_moment", np.zeros(3)),
    "step_count-negative": _set_array("layers.0.optimizer.step_count", np.asarray(-1)),
    "step_count-float": _set_array("layers.0.optimizer.step_count", np.asarray(2.0)),
    "step_count-vector": _set_array("layers.0.bias_optimizer.step_count", np.arange(2)),
    "array-unlisted": lambda meta, arrays: arrays.update(extra=np.zeros(2)),
}


#: What the error says for each edit (after the file's path).
SAYS = {
    "format": "format 3 version 1, expected 'xpnn-checkpoint' version 1",
    "version": "version '1', expected 'xpnn-checkpoint' version 1",
    "architecture": "its architecture is not {",
    "architecture.model-type": "its architecture is not {",
    "architecture.model-unknown": "unknown model 'resnet'",
    "architecture.options-type": "its architecture is not {",
    "options.unknown": "option 'depth', which model 'tiny' does not take",
    "options.bool-as-string": "option hidden is 'no', not true or false",
    "options.number-as-string": "option learning_rate is '0.001', not a finite number",
    "options.number-as-bool": "option learning_rate is True, not a finite number",
    "options.out-of-range": "options do not build a tiny (Adam: learning_rate must be > 0",
    "options.other-architecture": "do not match the rebuilt model's ['FullyConnected', 'ReLU'",
    "dtype-unknown": "its dtype 'float16' is not one of float32, float64",
    "dtype-type": "its dtype 64 is not one of",
    "layers-type": "its layer list is not a list of",
    "layers.type": "its layer list is not a list of",
    "layers.arrays": "its layer list is not a list of",
    "layers-reordered": "the checkpoint's layers ['SoftMax', 'BatchNormalization'] do not match",
    "arrays-list-type": "its array list is not {name: [shape, dtype]}",
    "arrays-list-entry": "its array list is not {name: [shape, dtype]}",
    "resume-type": "its training state is not a JSON object",
    "array-shape": "layers.0.weights has shape (3,), the model expects (2,)",
    "array-dtype": "layers.0.bias is shape (2,) float32, not of the checkpoint's dtype float64",
    "array-integers": "layers.0.weights is shape (2,) int64, not of the checkpoint's dtype",
    "array-text": "layers.0.weights is shape (2,) <U1, not of the checkpoint's dtype",
    "array-nan": "layers.0.weights holds NaN or infinite values",
    "array-inf": "layers.0.optimizer.first_moment holds NaN or infinite values",
    "variance-negative": "layers.0.running_variance holds negative values",
    "second-moment-negative": "layers.0.optimizer.second_moment holds negative values",
    "moment-shape": "layers.0.bias_optimizer.first_moment has shape (3,), the model expects (2,)",
    "step_count-negative": "step_count is shape () int64 = -1, not a step count",
    "step_count-float": "step_count is shape () float64 = 2.0, not a step count",
    "step_count-vector": "step_count is shape (2,) int64, not a step count",
    "array-unlisted": "it holds extra, which it does not list",
}


@pytest.mark.parametrize("edit", sorted(META_EDITS))
def test_an_edited_field_or_array_is_refused_naming_file_and_problem(tiny, edit):
    directory, arrays, _ = tiny
    rewrite(directory, META_EDITS[edit])
    path = os.path.join(directory, ckpt.MODEL_FILE)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_model(directory, backend="cpu")
    assert str(info.value).startswith(f"{path}: ") and SAYS[edit] in str(info.value), str(info.value)


TINY_ARRAYS = ("layers.0.weights", "layers.0.bias", "layers.0.running_mean",
               "layers.0.running_variance") + tuple(
    f"layers.0.{slot}.{name}" for slot in ("optimizer", "bias_optimizer")
    for name in ("first_moment", "second_moment", "step_count"))


@pytest.mark.parametrize("listed", ["listed", "unlisted", "no-list"])
@pytest.mark.parametrize("key", TINY_ARRAYS)
def test_each_missing_array_is_refused_not_reinitialised(tiny, key, listed):
    # listed: the array alone is gone; unlisted: its entry in the checkpoint's list too; no-list:
    # the list is gone (as in checkpoints written before it existed): the model's own rules.
    directory, arrays, _ = tiny
    assert sorted(arrays) == sorted(TINY_ARRAYS)

    def remove(meta, stored):
        del stored[key]
        if listed == "unlisted":
            del meta["arrays"][key]
        elif listed == "no-list":
            del meta["arrays"]
    rewrite(directory, remove)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(key)) as info:
        ckpt.load_model(directory, backend="cpu")
    assert str(info.value).startswith(os.path.join(directory, ckpt.MODEL_FILE)), str(info.value)


def test_a_checkpoint_is_never_written_from_non_finite_arrays(tiny):
    directory, arrays, payload = tiny
    with xpnn.use_backend("cpu", dtype="float64"):
        net = ckpt.load_model(directory)
        net.layers[0].running_mean = net.backend.asarray(np.array([0.0, np.nan]))
        with pytest.raises(ckpt.NonFiniteState, match=r"layers\.0\.running_mean"):
            ckpt.save_checkpoint(directory, net, "tiny", {})
    assert (open(os.path.join(directory, ckpt.MODEL_FILE), "rb").read()) == payload


# -- the training state, edited, through xpnn-train --resume -------------------------------------

RUN = ("--backend", "cpu", "--dataset", "mnist", "--limit-train", "128", "--limit-test", "32",
       "--batch-size", "32", "--dtype", "float64", "--no-progress")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped (Ctrl-C) at step 2 of epoch 2: ``(data directory, output directory)``."""
    data = write_mnist_dir(tmp_path_factory.mktemp("state-mnist"), n_train=128, n_test=32)
    out = tmp_path_factory.mktemp("stopped")
    args = [*RUN, "--data-dir", data, "--out", str(out)]
    assert main(args + ["--epochs", "1"]) == 0
    real_step, steps = training.train_step, []

    def ctrl_c_at_the_second_step(*step_args):
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*step_args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "train_step", ctrl_c_at_the_second_step)
        assert main(args + ["--resume", "--epochs", "3"]) == 130
    resume = ckpt.read_checkpoint(str(out))[0]["resume"]
    assert resume["partial_epoch"]["steps"] == 2 and resume["epochs_completed"] == 1
    return data, out


#: (field of the training state, value it is set to); None as the value deletes the field.
STATE_EDITS = [
    ("epochs_completed", 2), ("epochs_completed", "1"), ("metrics", {}), ("metrics", []),
    ("metrics.0", "epoch 1"), ("metrics.0.train_loss", "low"), ("metrics.0.test_accuracy", 2.0),
    ("metrics.0.epoch", 0), ("metrics.0.seconds", None),
    ("partial_epoch", "half"), ("partial_epoch.steps", -1), ("partial_epoch.steps", "2"),
    ("partial_epoch.steps", 10**6), ("partial_epoch.samples", 0), ("partial_epoch.samples", 10**9),
    ("partial_epoch.loss_sum", float("nan")), ("partial_epoch.correct", 10**6),
    ("partial_epoch.extra", 1), ("partial_epoch.seconds", None),
    ("data_layer", None), ("data_layer.position", -1), ("data_layer.position", 17),
    ("data_layer.size", "128"), ("data_layer.size", 0), ("data_layer.shuffle", "yes"),
    ("data_layer.seed", -1), ("data_layer.batch_size", 0), ("data_layer.batch_size", 16),
    ("data_layer.epoch", 7),
    ("numpy_random.keys", []), ("numpy_random.pos", 700), ("numpy_random.name", "PCG64"),
    ("numpy_random.has_gauss", 2), ("numpy_random.cached_gaussian", "x"),
    ("settings", None), ("settings.batch_size", 0), ("settings.batch_size", "32"),
    ("settings.batch_size", 16), ("settings.lr", -1), ("settings.lr", "fast"),
    ("settings.dtype", "float16"), ("settings.seed", 2**40), ("settings.epochs", 0),
    ("settings.keep_probability", 2), ("settings.batch_norm", "no"), ("settings.batch_norm", False),
    ("settings.dataset", "cifar"), ("settings.limit_train", 0), ("settings.seed", None),
]


#: Where an edit is named by another field than its own (a check that comes first).
NAMED = {
    ("metrics", "[]"): "epochs_completed",
    ("metrics.0.seconds", "None"): "metrics[0]",
    ("partial_epoch.extra", "1"): "partial_epoch",
    ("partial_epoch.seconds", "None"): "partial_epoch",
    ("partial_epoch.steps", repr(10**6)): "partial_epoch.samples",
    ("data_layer", "None"): "resume",
    ("settings", "None"): "resume",
    ("settings.batch_size", "16"): "data_layer.batch_size",
    ("settings.batch_norm", "False"): "its training state's settings do not match its architecture",
}


def resume_args(data, out):
    """``--resume`` with the settings the checkpoint holds (none given, none to differ)."""
    return ["--backend", "cpu", "--dataset", "mnist", "--data-dir", data, "--out", str(out),
            "--resume", "--epochs", "3", "--no-progress"]


def _edit_state(field, value):
    def change(meta, arrays):
        *path, last = field.split(".")
        target = meta["resume"]
        for key in path:
            target = target[int(key) if isinstance(target, list) else key]
        if value is None:
            del target[int(last) if isinstance(target, list) else last]
        else:
            target[int(last) if isinstance(target, list) else last] = value
    return change


@pytest.mark.parametrize("field, value", STATE_EDITS,
                         ids=[f"{field}={value!r}" for field, value in STATE_EDITS])
def test_an_edited_training_state_is_refused_before_training(stopped_run, field, value, tmp_path,
                                                            capsys):
    data, stopped = stopped_run
    out = tmp_path / "run"
    out.mkdir()
    for name in os.listdir(stopped):
        (out / name).write_bytes((stopped / name).read_bytes())
    rewrite(str(out), _edit_state(field, value))
    edited = (out / ckpt.MODEL_FILE).read_bytes()
    capsys.readouterr()
    assert main(resume_args(data, out)) == 1
    captured = capsys.readouterr()
    named = NAMED.get((field, repr(value)), re.sub(r"\.(\d+)", r"[\1]", field))
    says = named if named.startswith("its ") else f"its training state is damaged: {named} is "
    assert captured.err.startswith(f"xpnn-train: error: {out / ckpt.MODEL_FILE}: "), captured.err
    assert says in captured.err, captured.err
    assert "epoch" not in captured.out and (out / ckpt.MODEL_FILE).read_bytes() == edited


@pytest.mark.parametrize("key, value", [("layers.0.optimizer.step_count", np.asarray(-3)),
                                        ("layers.1.optimizer.step_count", np.asarray(1.5))])
def test_an_edited_step_count_is_refused_by_xpnn_train(stopped_run, key, value, tmp_path, capsys):
    data, stopped = stopped_run
    out = tmp_path / "run"
    out.mkdir()
    for name in os.listdir(stopped):
        (out / name).write_bytes((stopped / name).read_bytes())
    rewrite(str(out), _set_array(key, value))
    assert main(resume_args(data, out)) == 1
    assert f"{key} is shape ()" in capsys.readouterr().err
