"""``scripts/bench_recurrent.py`` on a tiny synthetic data set: both models start from the same
weights (PyTorch's gate order mapped right), train, and the results are written."""
import importlib.util
import json
import os

import numpy as np
import pytest

import xpnn
from xpnn.datasets import MNIST_FILES, write_idx
from test_train_cli import synthetic_images

pytest.importorskip("torch")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    path = os.path.join(REPO, "scripts", "bench_recurrent.py")
    spec = importlib.util.spec_from_file_location("bench_recurrent", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_both_models_start_alike_train_and_report(bench, cell, tmp_path):
    rng = np.random.default_rng(5)
    for role, count in (("train", 96), ("test", 40)):
        images, labels = synthetic_images(count, rng)
        write_idx(tmp_path / (MNIST_FILES[f"{role}_images"] + ".gz"), images)
        write_idx(tmp_path / (MNIST_FILES[f"{role}_labels"] + ".gz"), labels)
    out = tmp_path / "bench.json"
    epochs = bench.main(["--cell", cell, "--data-dir", str(tmp_path), "--epochs", "2",
                         "--batch-size", "32", "--hidden-size", "6", "--output-size", "5",
                         "--threads", "1", "--json", str(out)])
    assert xpnn.get_backend().dtype_name == "float64"  # (the script changed no global backend)
    written = json.loads(out.read_text())
    assert written["epochs"] == epochs and len(epochs) == 2
    settings = written["settings"]
    assert settings["initial_difference"] < 1e-6  # float32 rounding only
    assert (settings["cell"], settings["train_images"], settings["test_images"]) == (cell, 96, 40)
    for entry in epochs:
        assert entry["xpnn_seconds"] > 0 and entry["torch_seconds"] > 0
        assert entry["ratio"] == pytest.approx(entry["xpnn_seconds"] / entry["torch_seconds"])
        for name in ("xpnn_test_accuracy", "torch_test_accuracy"):
            assert entry[name] in {k / 40 for k in range(41)}


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_one_step_of_each_lands_on_the_same_model(bench, cell, tmp_path):
    """Same weights, batch, loss and Adam step: after two steps the models still agree to
    float32 rounding (later, Adam amplifies rounding differences, as in the parity suite)."""
    import torch

    rng = np.random.default_rng(6)
    for role, count in (("train", 64), ("test", 32)):
        images, labels = synthetic_images(count, rng)
        write_idx(tmp_path / (MNIST_FILES[f"{role}_images"] + ".gz"), images)
        write_idx(tmp_path / (MNIST_FILES[f"{role}_labels"] + ".gz"), labels)
    args = bench.parse_args(["--cell", cell, "--data-dir", str(tmp_path), "--hidden-size", "6",
                             "--output-size", "5", "--lr", "0.01"])
    (images, labels), (test_images, _) = bench.load(args)
    net, model, optimizer, _ = bench.build_both(args, torch, test_images)
    before = bench.probability_difference(net, model, test_images)
    order = np.arange(64)
    bench.xpnn_epoch(net, images, np.eye(10, dtype=np.float32)[labels], 32, order)
    bench.torch_epoch(model, optimizer, torch.from_numpy(images), torch.from_numpy(labels), 32,
                      torch.from_numpy(order))
    after = bench.probability_difference(net, model, test_images)
    moved = np.max(np.abs(xpnn.to_numpy(net.layers[1].weights) - initial_weights(bench, args)))
    assert moved > 1e-3 and before < 1e-6 and after < 1e-5, (moved, before, after)


def initial_weights(bench, args):
    """FC_h's weights as build_both draws them (seeded), for how far training moved them."""
    import torch

    net, _, _, _ = bench.build_both(args, torch, np.zeros((1, 1, 28, 28), dtype=np.float32))
    return xpnn.to_numpy(net.layers[1].weights)
