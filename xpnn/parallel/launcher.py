"""The processes a program runs in: :func:`world`, and stopping them all when one fails."""
import os
import sys
import time

from xpnn.parallel.communicator import MPICommunicator, SingleProcessCommunicator

#: Set by MPI launchers in the processes they start: MPICH's and Intel MPI's ``mpiexec``
#: (hydra) and Slurm's PMI (``PMI_SIZE``), PMIx launchers (``PMIX_RANK``), Open MPI.
LAUNCHER_VARIABLES = ("PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE")
#: Seconds a failing rank waits, after printing, before it aborts the job (see below).
ABORT_GRACE_SECONDS = 1.0
MPI_FIX = 'pip install "xpnn[mpi]" (it installs mpi4py and the mpich wheel with its mpiexec)'

_WORLD = None  # this process's world, made on the first call of world()


class MPIUnavailableError(RuntimeError):
    """MPI was asked for (``mpiexec`` started the program, or ``world(mpi=True)``) and
    mpi4py or its MPI library cannot be loaded."""


def launched_by_mpi(environ=None):
    """The launcher variable that says an MPI launcher started this process, or None."""
    environ = os.environ if environ is None else environ
    return next((name for name in LAUNCHER_VARIABLES if name in environ), None)


def world(mpi=None):
    """The communicator of the processes this program was started with (made once).

    Parameters
    ----------
    mpi : bool, optional
        None (default): MPI's world when an MPI launcher (``mpiexec -n N``) started the
        program, else a :class:`SingleProcessCommunicator` (mpi4py is then not imported:
        nothing changes for a program run on its own). True: MPI's world in any case
        (size 1 without a launcher).

    Raises
    ------
    MPIUnavailableError
        When MPI is asked for and mpi4py cannot be imported; it names the fix.

    Notes
    -----
    On two ranks or more, an exception that nothing catches on one rank prints its
    traceback there and stops every rank (:func:`abort_on_uncaught_exception`): the
    others would otherwise wait for it forever in their next collective call.
    """
    global _WORLD
    if _WORLD is None or (mpi and isinstance(_WORLD, SingleProcessCommunicator)):
        variable = launched_by_mpi()
        if mpi or (mpi is None and variable):
            _WORLD = _mpi_world(variable)
        else:
            _WORLD = SingleProcessCommunicator()
    return _WORLD


def _mpi_world(variable):
    why = (f"this process was started by an MPI launcher ({variable}={os.environ[variable]})"
           if variable else "MPI was asked for")
    try:
        from mpi4py import MPI  # (initializes MPI)
    except ImportError as error:  # mpi4py missing, or its MPI library
        raise MPIUnavailableError(f"{why}, but mpi4py cannot be imported ({error}); to fix: "
                                  f"{MPI_FIX}") from error
    communicator = MPICommunicator(MPI.COMM_WORLD)
    if communicator.size > 1:
        abort_on_uncaught_exception(communicator)
    return communicator


def abort_on_uncaught_exception(communicator):
    """Make an uncaught exception print its traceback (once, on its rank) and then stop
    every rank of ``communicator`` with exit status 1 (``MPI_Abort``).

    Without it the failing rank's exit waits in ``MPI_Finalize`` while the others wait for
    it in their next collective call: no rank would ever exit.
    """
    previous = sys.excepthook

    def print_and_abort(kind, value, traceback):
        previous(kind, value, traceback)
        print(f"xpnn.parallel: rank {communicator.rank} of {communicator.size} failed; "
              f"stopping every rank", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # The launcher forwards a rank's output asynchronously and the abort kills the job at
        # once: on a loaded machine the message was lost (an empty output in a test). A short
        # wait lets it through; the job stops all the same.
        time.sleep(ABORT_GRACE_SECONDS)
        communicator.abort(1)

    sys.excepthook = print_and_abort
