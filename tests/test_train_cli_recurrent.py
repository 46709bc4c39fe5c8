"""``xpnn-train --model lstm`` / ``--model rnn``: the recurrent classifier (images read row by row)
through the same command, files, checkpoint and resume as LeNet, on small synthetic data."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import xpnn
from xpnn import checkpoint as ckpt
from xpnn.datasets import MNIST_FILES, load_mnist_format, write_idx
from xpnn.layers import LSTM, RNN, FullyConnected, ImageRows, LastStep, SoftMax
from test_train_cli import (PNG_SIGNATURE, SUMMARY, assert_same_arrays, environment, load_arrays,
                            run_cli, synthetic_images)

SMALL = ("--limit-train", "128", "--limit-test", "64")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic-mnist-rows")
    rng = np.random.default_rng(18)
    for role, count in (("train", 128), ("test", 64)):
        images, labels = synthetic_images(count, rng)
        write_idx(directory / (MNIST_FILES[f"{role}_images"] + ".gz"), images)
        write_idx(directory / (MNIST_FILES[f"{role}_labels"] + ".gz"), labels)
    return str(directory)


@pytest.mark.parametrize("model, cell", [("lstm", LSTM), ("rnn", RNN)])
def test_a_recurrent_model_trains_and_saves_like_lenet(data_dir, tmp_path, model, cell):
    out = tmp_path / model
    result = run_cli(data_dir, out, "--model", model, *SMALL, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert f"xpnn-train: {model.upper()} over image rows on mnist" in lines[0]
    assert SUMMARY.match(lines[-1]), lines[-1]
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["epochs"][0]
    assert metrics["settings"]["model"] == model and metrics["settings"]["lr"] == 1e-3
    assert (out / "plot.png").read_bytes()[:8] == PNG_SIGNATURE
    architecture = json.loads((out / "model.json").read_text())
    assert architecture["architecture"] == {"model": model, "options": {
        "hidden_size": 128, "output_size": 64, "learning_rate": 1e-3, "weight_decay": 0.0}}
    gates = 4 if model == "lstm" else 1
    arrays = load_arrays(out)
    assert arrays["layers.1.weights"].shape == (28 + 128 + 1, gates * 128)
    assert arrays["layers.1.output_weights"].shape == (129, 64)
    assert "layers.1.output_optimizer.first_moment" in arrays
    assert "layers.1.hidden_state" not in arrays  # no memorize: no state between batches
    # The saved model scores the reported test accuracy.
    with xpnn.use_backend("cpu"):
        net = ckpt.load_model(str(out))
    assert [type(layer) for layer in net.layers] == [ImageRows, cell, LastStep, FullyConnected,
                                                     SoftMax]
    data = load_mnist_format(data_dir)
    images = (data.test_images[:64, None, :, :] / 255.0).astype(np.float32)
    predicted = np.argmax(xpnn.to_numpy(net.test(images)), axis=1)
    assert np.mean(predicted == data.test_labels[:64]) == pytest.approx(entry["test_accuracy"],
                                                                        abs=1e-12)


def test_resume_equals_an_uninterrupted_run(data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(data_dir, straight, "--model", "rnn", *SMALL, "--epochs", "2").returncode == 0
    assert run_cli(data_dir, resumed, "--model", "rnn", *SMALL, "--epochs", "1").returncode == 0
    result = run_cli(data_dir, resumed, "--resume", "--epochs", "2")  # the model from the checkpoint
    assert result.returncode == 0, result.stderr
    assert "RNN over image rows" in result.stdout
    assert_same_arrays(load_arrays(straight), load_arrays(resumed))
    first, second = (json.loads((out / "metrics.json").read_text())["epochs"]
                     for out in (straight, resumed))
    assert [e["test_accuracy"] for e in first] == [e["test_accuracy"] for e in second]


def test_options_that_do_not_fit_the_model_are_usage_errors(data_dir, tmp_path):
    for option in ("--batch-norm", "--no-dropout"):
        result = run_cli(data_dir, tmp_path / "refused", "--model", "lstm", option, *SMALL)
        assert result.returncode == 2
        assert f"xpnn-train: error: {option}: only --model lenet has this option" in result.stderr
    out = tmp_path / "lstm"
    assert run_cli(data_dir, out, "--model", "lstm", *SMALL).returncode == 0
    result = run_cli(data_dir, out, "--resume", "--model", "lenet", "--epochs", "2")
    assert result.returncode == 2
    assert "--model lenet differs from the checkpoint's --model lstm" in result.stderr


def test_a_last_batch_of_one_image_is_fine_without_batch_norm(data_dir, tmp_path):
    """(LeNet's batch normalization refuses one; the recurrent models have none.)"""
    out = tmp_path / "one"
    result = run_cli(data_dir, out, "--model", "rnn", "--limit-train", "65", "--limit-test", "64")
    assert result.returncode == 0, result.stderr
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert not settings["batch_norm"] and not settings["dropout"]


def test_the_default_output_directory_is_named_after_the_model(data_dir, tmp_path):
    command = [sys.executable, "-m", "xpnn.train", "--model", "rnn", "--dataset", "mnist",
               "--data-dir", data_dir, *SMALL]
    result = subprocess.run(command, cwd=tmp_path, env=environment(tmp_path), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(tmp_path / "runs" / "rnn" / "model.npz")
