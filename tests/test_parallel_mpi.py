"""xpnn.parallel on real ranks: ``mpiexec -n 2`` in subprocesses, each with a timeout (a hang
fails the test rather than blocking CI). The launcher is the one installed beside this
Python (``pip install "xpnn[mpi]"`` puts MPICH's ``mpiexec`` in the environment's bin/)."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from xpnn import parallel
from xpnn.parallel.launcher import LAUNCHER_VARIABLES
import mpi_training
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
