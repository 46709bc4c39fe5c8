"""xpnn.parallel on real ranks: ``mpiexec -n 2`` in subprocesses, each with a timeout (a hang
fails the test rather than blocking CI). The launcher is the one installed beside this
Python (``pip install "xpnn[mpi]"`` puts MPICH's ``mpiexec`` in the environment's bin/)."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from xpnn import parallel
from xpnn.parallel.launcher import LAUNCHER_VARIABLES
import mpi_training
import test_train_cli
from test_parity_training import TRAINING_TOLERANCE, _assert_runs_agree

TESTS = os.path.dirname(os.path.abspath(__file__))
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
#: Seconds an MPI run may take before the test fails (a run takes 2-10 s here).
TIMEOUT = 120


def _missing_mpi():
    if importlib.util.find_spec("mpi4py") is None:
        return 'mpi4py is not installed (pip install "xpnn[mpi]")'
    if not os.access(MPIEXEC, os.X_OK):
        return f'no mpiexec next to {sys.executable} (pip install "xpnn[mpi]" installs MPICH\'s)'
    return None


pytestmark = pytest.mark.skipif(_missing_mpi() is not None, reason=str(_missing_mpi()))
data_dir = test_train_cli.data_dir  # (the synthetic MNIST-format set, a module fixture)


def mpiexec(ranks, *arguments, cwd=None):
    """``mpiexec -n ranks python arguments...``: the finished process (stdout and stderr)."""
    environment = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, *arguments],
                          capture_output=True, text=True, timeout=TIMEOUT, env=environment, cwd=cwd)


def test_two_ranks_train_as_one_process(tmp_path):
    # 7 rows a batch: the ranks take 3 and 4 (an uneven split).
    out = tmp_path / "two-ranks.npz"
    done = mpiexec(2, os.path.join(TESTS, "mpi_training.py"), str(out), "7")
    assert done.returncode == 0, done.stdout + done.stderr
    one_process = mpi_training.train(parallel.SingleProcessCommunicator(), 7)
    two_ranks = mpi_training.load(out)
    for key, initial in one_process["initial_state"].items():
        assert not np.array_equal(one_process["state"][key], initial), f"{key} never moved"
    _assert_runs_agree(two_ranks, one_process, TRAINING_TOLERANCE["float64"])


def test_a_failing_rank_stops_every_rank_with_its_message_once(tmp_path):
    done = mpiexec(2, os.path.join(TESTS, "mpi_training.py"), str(tmp_path / "x.npz"), "7", "fail", "1")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert output.count(mpi_training.FAILURE.format(rank=1)) == 1, output
    assert not (tmp_path / "x.npz").exists()


# -- xpnn-train -----------------------------------------------------------------------------------

def _train(ranks, data_dir, out, *extra):
    """``xpnn-train`` on ``ranks`` ranks (1: a plain process) on the synthetic MNIST set."""
    arguments = test_train_cli.command(data_dir, out, "--dtype", "float64", "--batch-size", "37",
                                       "--eval-batch-size", "50", *extra)[1:]
    environment = {key: value for key, value in test_train_cli.environment(out).items()
                   if key not in LAUNCHER_VARIABLES}
    launcher = [MPIEXEC, "-n", str(ranks)] if ranks > 1 else []
    done = subprocess.run(launcher + [sys.executable, *arguments], capture_output=True, text=True,
                          timeout=TIMEOUT, env=environment, cwd=test_train_cli.REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_xpnn_train_on_two_ranks_writes_once_and_resumes_with_any_number_of_ranks(data_dir, tmp_path):
    # 256 training images in batches of 37 (18 + 19 rows a rank; the last batch 34) and 128
    # test images in batches of 50: every epoch has uneven parts.
    mixed, single = tmp_path / "mixed", tmp_path / "single"
    done = _train(2, data_dir, mixed, "--epochs", "1")
    # (rank 0's lock file on --out, once; no resume.json any more: model.npz holds the state)
    assert sorted(os.listdir(mixed)) == [".xpnn-train.lock", "metrics.json", "model.json",
                                         "model.npz", "plot.png"]
    assert done.stdout.count("epoch 1/1 |") == 1 and " x 2 ranks | " in done.stdout
    _train(1, data_dir, mixed, "--epochs", "2", "--resume")
    _train(2, data_dir, mixed, "--epochs", "3", "--resume")
    _train(1, data_dir, single, "--epochs", "3")
    with open(mixed / "metrics.json") as mixed_file, open(single / "metrics.json") as single_file:
        got, expected = json.load(mixed_file), json.load(single_file)
    assert [entry["epoch"] for entry in got["epochs"]] == [1, 2, 3]
    assert got["settings"]["ranks"] == 2 and expected["settings"]["ranks"] == 1
    for entry, reference in zip(got["epochs"], expected["epochs"]):
        for key in ("train_loss", "train_accuracy", "test_accuracy"):
            assert entry[key] == pytest.approx(reference[key], rel=1e-9), key
    reference = test_train_cli.load_arrays(single)
    for key, value in test_train_cli.load_arrays(mixed).items():
        # (The parity suite's float64 bounds: batch norm's free directions drift by rounding.)
        scale = float(np.max(np.abs(reference[key]))) if reference[key].size else 0.0
        np.testing.assert_allclose(value, reference[key], rtol=0, atol=1e-9 * scale + 1e-6, err_msg=key)


def test_xpnn_train_on_two_ranks_says_a_setup_error_once(data_dir, tmp_path):
    arguments = test_train_cli.command(str(tmp_path / "missing"), tmp_path / "out")[1:]
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, *arguments], capture_output=True,
                          text=True, timeout=TIMEOUT, env=test_train_cli.environment(tmp_path))
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert output.count("xpnn-train: error:") == 1 and "missing" in output, output


def test_the_benchmarks_ranks_follow_its_commands_and_end_with_it():
    sys.path.insert(0, os.path.join(test_train_cli.REPO, "scripts"))
    try:
        import bench_ranks
    finally:
        sys.path.pop(0)
    runner = bench_ranks.RanksRunner(2, "cpu", "lenet-bn-dropout", 8)
    try:
        runner.train(2)
        runner.infer()
        assert runner.peak_mib() > 0
    finally:
        runner.close()
    assert runner.job.returncode == 0 and not os.path.exists(runner.directory)
