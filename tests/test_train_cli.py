"""The ``xpnn-train`` command end to end, its checkpoints, resume, NaN handling and Ctrl-C.

The command runs in a subprocess on a small synthetic MNIST-format data set
that the tests write (``--dataset mnist --data-dir``): no download, no
dependency on Debian's Fashion-MNIST package, a few hundred images at most.
"""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import xpnn
from xpnn import checkpoint as ckpt
from xpnn.datasets import MNIST_FILES, write_idx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Written here from the documented format, not taken from xpnn.train.
SUMMARY = re.compile(r"^test accuracy (0\.\d{4}|1\.0000) \| (\d+\.\d) s/epoch \| backend (\S+) "
                     r"\| device (\S+) \| (float32|float64)$")


def synthetic_images(count, rng):
    """Learnable 28x28 uint8 images: class k lights a 6x6 block at its own place, plus noise."""
    labels = rng.integers(0, 10, size=count).astype(np.uint8)
    images = rng.integers(0, 60, size=(count, 28, 28)).astype(np.uint8)
    for index, label in enumerate(labels):
        row, column = 3 + 12 * (label // 5), 1 + 5 * (label % 5)
        images[index, row:row + 6, column:column + 6] = 230
    return images, labels


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic-mnist")
    rng = np.random.default_rng(2024)
    train_images, train_labels = synthetic_images(256, rng)
    test_images, test_labels = synthetic_images(128, rng)
    for role, array in (("train_images", train_images), ("train_labels", train_labels),
                        ("test_images", test_images), ("test_labels", test_labels)):
        write_idx(directory / (MNIST_FILES[role] + ".gz"), array)
    return str(directory)


def command(data_dir, out, *extra):
    return [sys.executable, "-m", "xpnn.train", "--dataset", "mnist", "--data-dir", data_dir,
            "--out", str(out), *extra]


def environment(tmp_dir):
    env = dict(os.environ)
    env.pop("XPNN_BACKEND", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["XPNN_CACHE_DIR"] = str(tmp_dir)  # nothing may be downloaded; never the user's cache
    return env


def run_cli(data_dir, out, *extra, timeout=120):
    return subprocess.run(command(data_dir, out, *extra), cwd=REPO, env=environment(out),
                          capture_output=True, text=True, timeout=timeout)


def load_arrays(out):
    with np.load(os.path.join(out, "model.npz"), allow_pickle=False) as stored:
        return {key: stored[key] for key in stored.files if key != ckpt.META_KEY}


def assert_same_arrays(first, second):
    assert sorted(first) == sorted(second)
    for key in first:
        np.testing.assert_allclose(first[key], second[key], rtol=1e-12, atol=0, err_msg=key)


# -- end to end ---------------------------------------------------------------------------

def test_end_to_end_files_and_summary(data_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli(data_dir, out, "--limit-train", "192", "--limit-test", "96", "--epochs", "1")
    assert result.returncode == 0, result.stderr
    # No terminal: no progress bar on stderr.
    assert "\r" not in result.stderr and "batch/s" not in result.stderr and "it/s" not in result.stderr
    lines = result.stdout.strip().splitlines()
    summary = SUMMARY.match(lines[-1])
    assert summary, lines[-1]
    assert summary.group(3) == "cpu" and summary.group(4) == "cpu" and summary.group(5) == "float32"

    metrics = json.loads((out / "metrics.json").read_text())
    assert [sorted(entry) for entry in metrics["epochs"]] == [sorted(
        ["epoch", "train_loss", "train_accuracy", "test_accuracy", "seconds", "eval_seconds",
         "images_per_second"])]
    entry = metrics["epochs"][0]
    assert entry["epoch"] == 1 and 0.0 <= entry["test_accuracy"] <= 1.0
    assert np.isfinite(entry["train_loss"]) and entry["seconds"] > 0 and entry["images_per_second"] > 0
    assert float(summary.group(1)) == pytest.approx(entry["test_accuracy"], abs=5e-5)
    settings = metrics["settings"]
    assert settings["batch_size"] == 64 and settings["dtype"] == "float32" and settings["batch_norm"]
    assert settings["dropout"] and settings["lr"] == 5e-4 and settings["train_images"] == 192

    png = (out / "plot.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 10_000
    architecture = json.loads((out / "model.json").read_text())
    assert architecture["architecture"] == {"model": "lenet", "options": {
        "batch_norm": True, "dropout": True, "keep_probability": 0.8, "learning_rate": 5e-4,
        "weight_decay": 4e-4, "batch_norm_eps": 1e-10}}
    arrays = load_arrays(out)  # allow_pickle=False: loading runs no code
    assert arrays["layers.0.weights"].shape == (6, 1, 5, 5)
    assert arrays["layers.0.weights"].dtype == np.float32

    # The reported test accuracy is what the saved model scores on the test images.
    with xpnn.use_backend("cpu"):
        net = ckpt.load_model(str(out))
    data = xpnn.datasets.load_mnist_format(data_dir)
    images = (data.test_images[:96, None, :, :] / 255.0).astype(np.float32)
    predicted = np.argmax(xpnn.to_numpy(net.test(images)), axis=1)
    assert np.mean(predicted == data.test_labels[:96]) == pytest.approx(entry["test_accuracy"], abs=1e-12)


def test_progress_bar_when_asked(data_dir, tmp_path, capsys):
    from xpnn.train import main

    status = main(["--dataset", "mnist", "--data-dir", data_dir, "--out", str(tmp_path / "bar"),
                   "--limit-train", "64", "--limit-test", "32", "--progress", "--log-every", "1"])
    captured = capsys.readouterr()
    assert status == 0
    assert "epoch 1/1" in captured.err and "loss=" in captured.err and "img_s=" in captured.err


def test_training_steps_run_inside_the_backends_compute_scope(data_dir, tmp_path, monkeypatch):
    # NeuralNetwork.train and xpnn-train both hold the backend's compute scope around their
    # steps (on the CPU: BLAS kept to one thread beside xpnn's own threads).
    import contextlib
    from xpnn import training
    from xpnn.ops.numpy_ops import NumpyOps
    from xpnn.train import main

    depth, seen = [0], []
    scope = NumpyOps.compute_scope

    @contextlib.contextmanager
    def counted(self):
        with scope(self):
            depth[0] += 1
            try:
                yield
            finally:
                depth[0] -= 1

    step = training.train_step

    def recorded(*args):
        seen.append(depth[0])
        return step(*args)

    monkeypatch.setattr(NumpyOps, "compute_scope", counted)
    monkeypatch.setattr(training, "train_step", recorded)
    assert main(["--dataset", "mnist", "--data-dir", data_dir, "--out", str(tmp_path / "scope"),
                 "--limit-train", "64", "--limit-test", "32", "--batch-size", "16", "--no-progress"]) == 0
    assert len(seen) == 4 and min(seen) >= 1


# -- checkpoints in process ------------------------------------------------------------------

def small_lenet_trained(steps=2):
    from xpnn.models import lenet

    xpnn.seed(3)
    net = lenet.build(batch_norm=True, dropout=True)
    rng = np.random.default_rng(0)
    images = rng.random((8, 1, 28, 28))
    labels = np.eye(10)[rng.integers(0, 10, 8)]

    class Batches:
        def next(self):
            return images, labels

    net.data_layer = Batches()
    net.train(steps)
    return net, images


def test_load_model_round_trip_identical_predictions(tmp_path):
    with xpnn.use_backend("cpu", dtype="float64"):
        net, images = small_lenet_trained()
        expected = xpnn.to_numpy(net.test(images))
        ckpt.save_checkpoint(str(tmp_path), net, "lenet", {"batch_norm": True, "dropout": True})
        loaded = ckpt.load_model(str(tmp_path))
        np.testing.assert_array_equal(xpnn.to_numpy(loaded.test(images)), expected)
        # Optimizer state came back too: one more identical step gives identical weights.
        loaded.data_layer = net.data_layer
        np.random.seed(9)
        net.train(1)
        np.random.seed(9)
        loaded.train(1)
        for index, (before, after) in enumerate(zip(net.layers, loaded.layers)):
            if before.trainable:
                np.testing.assert_array_equal(xpnn.to_numpy(after.weights), xpnn.to_numpy(before.weights),
                                              err_msg=f"layer {index}")
    # A checkpoint loads onto another backend (here array-api-strict) with the same predictions.
    with xpnn.use_backend("array-api-strict"):
        strict_net = ckpt.load_model(str(tmp_path))
        assert strict_net.backend.name == "array-api-strict"
        np.testing.assert_allclose(xpnn.to_numpy(strict_net.test(images)), expected, rtol=1e-12, atol=1e-15)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="model.npz does not exist there; pass the "
                                                   "directory an xpnn-train run wrote"):
        ckpt.load_model(str(tmp_path))
    with pytest.raises(ckpt.CheckpointError, match="the directory does not exist; pass"):
        ckpt.load_model(str(tmp_path / "none"))
    np.savez(tmp_path / "model.npz", weights=np.zeros(3))
    with pytest.raises(ckpt.CheckpointError, match="not an xpnn checkpoint"):
        ckpt.load_model(str(tmp_path))
    with pytest.raises(ckpt.CheckpointError) as info:  # the file where its directory was meant
        ckpt.load_model(str(tmp_path / "model.npz"))
    assert f"is the checkpoint's file; pass its directory, {tmp_path}" in str(info.value)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ckpt.CheckpointError, match="is a file, not a checkpoint directory"):
        ckpt.load_model(str(tmp_path / "notes.txt"))


def test_non_finite_arrays_names_infinities_and_nans():
    # The divergence check must catch +inf and -inf as well as NaN; finite arrays,
    # huge values included, and integer arrays are not named.
    arrays = {
        "finite": np.array([1.0, -2.0, np.finfo(np.float64).max]),
        "plus_inf": np.array([0.0, np.inf]),
        "minus_inf": np.array([[-np.inf, 1.0]], dtype=np.float32),
        "nan": np.array([np.nan, 0.0]),
        "integers": np.array([1, 2, 3]),
    }
    assert sorted(ckpt.non_finite_arrays(arrays)) == ["minus_inf", "nan", "plus_inf"]
    assert ckpt.non_finite_arrays({"finite": arrays["finite"]}) == []


# -- resume, Ctrl-C, divergence ---------------------------------------------------------------

RESUME_ARGS = ("--limit-train", "128", "--limit-test", "64", "--batch-size", "32", "--dtype", "float64")


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """Three epochs without interruption: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight")
    result = run_cli(data_dir, out, *RESUME_ARGS, "--epochs", "3")
    assert result.returncode == 0, result.stderr
    return out


def test_resume_equals_uninterrupted(data_dir, straight_run, tmp_path):
    out = tmp_path / "resumed"
    first = run_cli(data_dir, out, *RESUME_ARGS, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    from xpnn.train import main
    assert main(["--dataset", "mnist", "--data-dir", data_dir, "--out", str(out), "--resume",
                 "--batch-size", "64"]) == 2, "a locked setting may not change on --resume"
    second = run_cli(data_dir, out, "--resume", "--epochs", "3")
    assert second.returncode == 0, second.stderr
    assert "resuming at epoch 2" in second.stdout
    assert_same_arrays(load_arrays(out), load_arrays(straight_run))
    resumed = json.loads((out / "metrics.json").read_text())["epochs"]
    straight = json.loads((straight_run / "metrics.json").read_text())["epochs"]
    assert [e["test_accuracy"] for e in resumed] == [e["test_accuracy"] for e in straight]
    np.testing.assert_allclose([e["train_loss"] for e in resumed], [e["train_loss"] for e in straight],
                               rtol=1e-12)


def test_ctrl_c_saves_and_resume_continues_exactly(data_dir, straight_run, tmp_path):
    out = tmp_path / "interrupted"
    process = subprocess.Popen(command(data_dir, out, *RESUME_ARGS, "--epochs", "1000"), cwd=REPO,
                               env=environment(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        first_line = process.stdout.readline()  # printed once training is about to start
        assert first_line.startswith("xpnn-train:"), first_line
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "checkpoint saved" in stderr
    state = ckpt.read_checkpoint(str(out))[0]["resume"]  # (model.npz holds it; resume.json is gone)
    assert not (out / "resume.json").exists()
    load_arrays(out)
    # The checkpoint sits at a step boundary: resuming gives the uninterrupted result. (On a
    # loaded machine the signal may come after epoch 3: then a longer uninterrupted run is
    # the reference, rather than a failure that says nothing about the feature.)
    epochs = max(3, state["epochs_completed"] + 1)
    reference = straight_run
    if epochs > 3:
        reference = tmp_path / "straight-longer"
        straight = run_cli(data_dir, reference, *RESUME_ARGS, "--epochs", str(epochs))
        assert straight.returncode == 0, straight.stderr
    resumed = run_cli(data_dir, out, "--resume", "--epochs", str(epochs))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_arrays(load_arrays(out), load_arrays(reference))


def test_diverging_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    out = tmp_path / "diverge"
    good = run_cli(data_dir, out, "--limit-train", "256", "--limit-test", "64", "--batch-size", "32")
    assert good.returncode == 0, good.stderr
    before = {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}
    assert set(before) >= {"model.npz", "model.json", "metrics.json", "plot.png"}
    result = run_cli(data_dir, out, "--resume", "--lr", "1e10", "--epochs", "3", "--log-every", "2")
    assert result.returncode == 3, result.stdout + result.stderr
    assert re.search(r"(nan|inf|NaN)", result.stderr) and "last good checkpoint" in result.stderr
    assert "RuntimeWarning" not in result.stderr
    after = {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}
    assert after == before, "the good epoch's files must be left untouched"
    with xpnn.use_backend("cpu"):
        net = ckpt.load_model(str(out))
    assert all(np.all(np.isfinite(value)) for value in load_arrays(out).values())
    assert net.layers[0].weights.shape == (6, 1, 5, 5)


# -- usage errors (in process, no training) ---------------------------------------------------

def test_usage_errors(data_dir, tmp_path, capsys):
    from xpnn.train import main

    out = tmp_path / "existing"
    out.mkdir()
    (out / "model.npz").write_bytes(b"placeholder")
    assert main(["--dataset", "mnist", "--data-dir", data_dir, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err and (out / "model.npz").read_bytes() == b"placeholder"
    assert main(["--dataset", "mnist", "--data-dir", str(tmp_path / "none"), "--out",
                 str(tmp_path / "x")]) == 1
    assert "--data-dir" in capsys.readouterr().err
    assert main(["--backend", "tpu", "--out", str(tmp_path / "y")]) == 2
    assert "valid names" in capsys.readouterr().err
    assert main(["--resume", "--out", str(tmp_path / "nothing")]) == 1
    assert "the directory does not exist; pass the directory an xpnn-train run wrote (its --out)" \
        in capsys.readouterr().err


def test_device_label_is_one_token():
    from xpnn.backend import make_backend

    assert ckpt.device_label(make_backend("cpu", "float32")) == "cpu"
    assert ckpt.device_label(make_backend("array-api-strict", "float32", "device1")) == "device1"


def test_keep_probability_option_reaches_the_model_and_is_checked(data_dir, tmp_path, capsys):
    from xpnn.layers import Dropout
    from xpnn.train import main

    out = tmp_path / "keep"
    assert main(["--dataset", "mnist", "--data-dir", data_dir, "--out", str(out), "--no-progress",
                 "--keep-probability", "0.6", "--limit-train", "64", "--limit-test", "32"]) == 0
    options = json.loads((out / "model.json").read_text())["architecture"]["options"]
    assert options["keep_probability"] == 0.6
    with xpnn.use_backend("cpu"):
        net = ckpt.load_model(str(out))
    assert [layer.probability for layer in net.layers if isinstance(layer, Dropout)] == [0.6, 0.6]
    assert main(["--dataset", "mnist", "--data-dir", data_dir, "--out", str(out), "--resume",
                 "--keep-probability", "0.5"]) == 2, "keep probability is locked on --resume"
    assert "keep-probability" in capsys.readouterr().err
    for bad in ("0", "1.5", "nan"):
        with pytest.raises(SystemExit) as stopped:
            main(["--keep-probability", bad, "--out", str(tmp_path / "bad")])
        assert stopped.value.code == 2
        assert "(0, 1]" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"),
                    reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist "
                           "(ci/setup.sh does)")
def test_the_readme_command_reaches_85_percent_after_one_epoch(tmp_path, capsys):
    # The README's first command with its defaults: LeNet with batch norm and dropout,
    # Fashion-MNIST, CPU, float32, batch 64, seed 0, one epoch (~15-25 s on 2 cores).
    # Five seeds gave 86.6-87.1 %; the issue asks for >= 85 %.
    from xpnn.train import main

    assert main(["--out", str(tmp_path / "run"), "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = SUMMARY.match(last)
    assert match, last
    assert match.group(3) == "cpu" and match.group(5) == "float32"
    assert float(match.group(1)) >= 0.85, last
