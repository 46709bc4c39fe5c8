"""``scripts/bench_recurrent.py`` on a tiny synthetic data set: both models start from the same
weights (PyTorch's gate order mapped right), train, and the results are written."""
import importlib.util
import json
import os

import numpy as np
import pytest

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
