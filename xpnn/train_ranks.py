"""``xpnn-train`` on several ranks (``mpiexec -n N xpnn-train ...``): each rank's device, one
voice for what every rank would say alike, and every rank stopping together.

Every rank runs the whole command on its rows of each batch (see :mod:`xpnn.parallel`);
rank 0 alone prints and writes. With one process (no launcher) all of this is a no-op.
"""
import contextlib
import io
import os
import sys
import traceback
import time

from xpnn.backend import canonical_name
from xpnn.ops.numpy_settings import blas_on_one_thread
from xpnn.parallel.launcher import ABORT_GRACE_SECONDS


class FailedElsewhere(Exception):
    """The setup failed on another rank, which says why: this rank exits too, quietly.

    ``cause`` is this rank's own error when it failed alike (else None).
    """

    def __init__(self, cause=None):
        super().__init__("the setup failed on another rank")
        self.cause = cause


def rank_device(backend_name, device, communicator):
    """The device this rank trains on.

    ``device`` when one is given, except that on several ranks ``--backend gpu`` without
    ``--device``, or ``--backend torch --device cuda``, takes the GPU of the rank's local
    rank (its number among the ranks on its machine): one GPU per rank.
    """
    if communicator.size == 1 or device not in (None, "cuda"):
        return device
    name = canonical_name(backend_name)
    if name == "gpu" and device is None:
        return str(communicator.local_rank)
    if name == "torch" and device == "cuda":
        return f"cuda:{communicator.local_rank}"
    return device


@contextlib.contextmanager
def root_voice(communicator):
    """Only rank 0's stderr inside (argparse's usage errors are the same on every rank)."""
    if communicator.rank == 0:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def agreed(communicator, function):
    """``function()``'s result on every rank, or the same failure on every rank.

    The setup (arguments, data, checkpoint, backend) mostly fails alike on every rank. When
    it fails on any: the lowest rank with each distinct error raises it (its message is
    printed once), the others raise :class:`FailedElsewhere`, and every rank exits; no
    rank is left waiting for another.
    """
    if communicator.size == 1:
        return function()
    try:
        result, failure = function(), None
    except Exception as error:  # (told to every rank below, then raised)
        result, failure = None, error
    errors = communicator.allgather(None if failure is None else f"{type(failure).__name__}: {failure}")
    if not any(errors):
        return result
    if failure is None or errors.index(errors[communicator.rank]) < communicator.rank:
        raise FailedElsewhere(failure) from failure
    raise failure


@contextlib.contextmanager
def stop_all_on_error(communicator, describe, agreed_errors=()):
    """On several ranks, an exception on this rank alone stops every rank.

    Every rank raises ``agreed_errors`` at the same step (they follow from sums over the
    ranks): they pass. Any other exception is this rank's own (a file it cannot write, a
    bug): its message (``describe(error)`` gives ``(status, message)``, None: print the
    traceback) is printed here, and ``MPI_Abort`` stops every rank with that status, as
    the others would wait for this one forever.
    """
    try:
        yield
    except agreed_errors:
        raise
    except BaseException as error:
        if communicator.size == 1:
            raise
        described = describe(error)
        if described is None:
            traceback.print_exc()
            status = 1
        else:
            status, message = described
            print(message, file=sys.stderr)
        print(f"xpnn-train: rank {communicator.rank} of {communicator.size} failed; stopping "
              f"every rank", file=sys.stderr, flush=True)
        time.sleep(ABORT_GRACE_SECONDS)  # (for the launcher to forward the message: see there)
        communicator.abort(status)


@contextlib.contextmanager
def one_thread_per_rank(communicator):
    """On several ranks, each rank computes on one thread: xpnn's CPU operations
    (``XPNN_NUM_THREADS=1`` unless it is set) and NumPy's BLAS, for the whole run.

    The ranks take one core each; more threads than cores, each spin-waiting (BLAS's
    threads, MPI's), made a 2-rank epoch on 2 cores take 198 s against 11 s in one process.
    """
    if communicator.size == 1:
        yield
        return
    os.environ.setdefault("XPNN_NUM_THREADS", "1")
    with blas_on_one_thread():
        yield
