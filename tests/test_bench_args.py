"""``scripts/bench.py``'s command line: impossible values stop at start-up with a usage error.

Only the real argument parser runs here (the benchmark itself takes minutes
and needs PyTorch); a value it accepts would otherwise crash late, or, for
``--json``, only after the whole benchmark.
"""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO, "scripts", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def usage_error(bench, argv, capsys):
    """Parse ``argv``; return argparse's message after checking that it exits with status 2."""
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--rounds", "0"], "--rounds: must be a positive integer, got 0"),
    (["--iterations", "0"], "--iterations: must be a positive integer, got 0"),
    (["--threads", "0"], "--threads: must be a positive integer, got 0"),
    (["--batch-sizes", "64", "0"], "--batch-sizes: must be a positive integer, got 0"),
    (["--batch-sizes", "10001"], "--batch-sizes: must be at most 10000"),
    (["--batch-sizes", "20000"], "--batch-sizes: must be at most 10000"),
    (["--settle", "-1"], "--settle: must be a number >= 0"),
    (["--ranks", "0"], "--ranks: must be a positive integer, got 0"),
], ids=["rounds", "iterations", "threads", "batch-0", "batch-10001", "batch-20000", "settle", "ranks"])
def test_impossible_values_are_usage_errors(bench, argv, expected, capsys):
    assert expected in usage_error(bench, argv, capsys)


def test_largest_batch_is_the_synthetic_image_count(bench):
    # One batch of all the synthetic images is the most the benchmark can train on.
    assert bench.INFERENCE_IMAGES == 10_000
    assert len(bench._batches(*bench.synthetic_data(), 10_000)) == 1
    assert bench.parse_args(["--batch-sizes", "1", "10000"]).batch_sizes == [1, 10_000]


def test_json_path_is_checked_at_start_up(bench, tmp_path, capsys):
    missing = tmp_path / "nonexistent" / "b.json"
    err = usage_error(bench, ["--json", str(missing)], capsys)
    assert str(missing.parent) in err and "does not exist" in err, err
    assert "is a directory" in usage_error(bench, ["--json", str(tmp_path)], capsys)
    assert bench.parse_args(["--json", str(tmp_path / "b.json")]).json == str(tmp_path / "b.json")
    assert not (tmp_path / "b.json").exists(), "checking the path writes nothing"


def test_ranks_give_pytorch_as_many_threads(bench):
    assert bench.parse_args(["--ranks", "3", "--threads", "1"]).threads == 3
    assert bench.parse_args(["--threads", "1"]).ranks is None
