"""xpnn.checkpoint: what a checkpoint refuses, keeps and leaves alone (no code runs on load)."""
import json

import numpy as np
import pytest

import xpnn
from xpnn import checkpoint as ckpt
from xpnn.models import lenet


def _saved(tmp_path, dtype="float64"):
    with xpnn.use_backend("cpu", dtype=dtype):
        net = lenet.build()
        ckpt.save_checkpoint(str(tmp_path), net, "lenet", {})
    return net


def _rewrite(tmp_path, change):
    """Rewrite model.npz with ``change(meta, arrays)`` applied (read raw: it may be edited already)."""
    with np.load(tmp_path / ckpt.MODEL_FILE) as stored:
        arrays = {key: stored[key] for key in stored.files}
    meta = json.loads(str(arrays.pop(ckpt.META_KEY)))
    change(meta, arrays)
    arrays[ckpt.META_KEY] = np.asarray(json.dumps(meta))
    np.savez(tmp_path / ckpt.MODEL_FILE, **arrays)


def test_an_object_array_in_the_checkpoint_is_refused_not_unpickled(tmp_path):
    _saved(tmp_path)
    _rewrite(tmp_path, lambda meta, arrays: arrays.update(extra=np.array([{"code": 1}], dtype=object)))
    with pytest.raises(ckpt.CheckpointError, match="is not a readable .npz file"):
        ckpt.read_checkpoint(str(tmp_path))


def test_another_format_version_is_refused(tmp_path):
    _saved(tmp_path)
    _rewrite(tmp_path, lambda meta, arrays: meta.update(version=ckpt.VERSION + 1))
    with pytest.raises(ckpt.CheckpointError, match=f"version {ckpt.VERSION + 1}, expected "):
        ckpt.load_model(str(tmp_path))


def test_arrays_that_do_not_fit_the_model_are_refused(tmp_path):
    _saved(tmp_path)
    _rewrite(tmp_path, lambda meta, arrays: arrays.update({"layers.0.weights": np.zeros((2, 2))}))
    with pytest.raises(ckpt.CheckpointError, match=r"layers\.0\.weights is shape \(2, 2\) float64, "
                                                   r"listed as shape \(6, 1, 5, 5\)"):
        ckpt.load_model(str(tmp_path))

    def listed_too(meta, arrays):  # the checkpoint's own list of its arrays agrees: the model refuses
        meta["arrays"]["layers.0.weights"] = [[2, 2], "float64"]

    _rewrite(tmp_path, listed_too)
    with pytest.raises(ckpt.CheckpointError, match=r"layers\.0\.weights has shape \(2, 2\), the "
                                                   r"model expects \(6, 1, 5, 5\)"):
        ckpt.load_model(str(tmp_path))

    def removed(meta, arrays):
        arrays.pop("layers.0.weights")
        del meta["arrays"]["layers.0.weights"]

    _rewrite(tmp_path, removed)
    with pytest.raises(ckpt.CheckpointError, match=r"lacks layers\.0\.weights \(Conv\)"):
        ckpt.load_model(str(tmp_path))


def test_layers_that_do_not_match_the_rebuilt_model_are_refused(tmp_path):
    _saved(tmp_path)
    _rewrite(tmp_path, lambda meta, arrays: meta["layers"].reverse())
    with pytest.raises(ckpt.CheckpointError, match="do not match the rebuilt model's"):
        ckpt.load_model(str(tmp_path))


def test_loading_leaves_the_callers_random_stream_alone(tmp_path):
    _saved(tmp_path)
    np.random.seed(5)
    expected = np.random.random_sample(4)
    np.random.seed(5)
    ckpt.load_model(str(tmp_path))   # (building the model draws initial weights)
    np.testing.assert_array_equal(np.random.random_sample(4), expected)


def test_a_float32_checkpoint_loads_as_float32_on_a_float64_backend(tmp_path):
    net = _saved(tmp_path, dtype="float32")
    meta, _ = ckpt.read_checkpoint(str(tmp_path))
    assert meta["dtype"] == "float32"
    with xpnn.use_backend("cpu", dtype="float64"):
        loaded = ckpt.load_model(str(tmp_path))
    assert loaded.backend.dtype_name == "float32"
    assert xpnn.to_numpy(loaded.layers[0].weights).dtype == np.float32
    np.testing.assert_array_equal(xpnn.to_numpy(loaded.layers[0].weights),
                                  xpnn.to_numpy(net.layers[0].weights))


@pytest.mark.parametrize("name, device, label", [("cpu", None, "cpu"),
                                                 ("array-api-strict", None, "CPU_DEVICE"),
                                                 ("array-api-strict", "device1", "device1")])
def test_device_label_is_a_short_name_without_spaces(name, device, label):
    assert ckpt.device_label(xpnn.backend.make_backend(name, "float64", device)) == label


def test_a_save_that_fails_before_its_renames_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    # model.npz is the checkpoint: written to a temporary file and renamed, never in place, so a
    # crash while saving leaves the previous checkpoint whole.
    import os

    _saved(tmp_path)
    before = (tmp_path / ckpt.MODEL_FILE).read_bytes()

    def replace(source, destination):
        raise OSError("simulated crash before the rename")

    with xpnn.use_backend("cpu", dtype="float64"):
        net = lenet.build(learning_rate=1e-3)   # other optimizer settings: other bytes
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save_checkpoint(str(tmp_path), net, "lenet", {"learning_rate": 1e-3})
    monkeypatch.undo()
    assert (tmp_path / ckpt.MODEL_FILE).read_bytes() == before
    ckpt.load_model(str(tmp_path))
