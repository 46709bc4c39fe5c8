"""Communicators: the processes of a data-parallel run and the sums and copies between them.

:class:`MPICommunicator` runs on mpi4py (one process per rank, started by ``mpiexec``);
:class:`SingleProcessCommunicator` is the world of a program started on its own (size 1,
no MPI needed). :func:`world` gives the one that fits how the program was started.

Arrays of any backend are accepted: a NumPy array is handed to MPI as its own buffer,
any other (PyTorch, array-api-strict, CuPy) goes through a host copy and comes back as
an array of its library and device. (Between GPUs NCCL would be the fast path: see
``docs/design.md``; not built yet.)
"""
import numpy as np

from xpnn.backend import asarray_like, to_numpy


class SingleProcessCommunicator:
    """The world of one process: rank 0 of 1; every sum and broadcast returns its input.

    What :func:`world` returns when the program was not started by an MPI launcher, so
    that code written for several ranks runs unchanged in one process.
    """

    rank = 0
    size = 1
    local_rank = 0

    def allreduce(self, value):
        """The sum of ``value`` over the ranks: ``value`` itself (it may be returned as is)."""
        return value

    def all_sum(self, *values):
        """Each of ``values`` summed over the ranks, as a tuple (see :meth:`MPICommunicator.all_sum`)."""
        return values

    def broadcast(self, array, root=0):
        """Rank ``root``'s ``array``: ``array`` itself."""
        return array

    def broadcast_object(self, value, root=0):
        """Rank ``root``'s ``value`` (any picklable object): ``value`` itself."""
        return value

    def allgather(self, value):
        """Every rank's ``value`` in rank order: ``[value]``."""
        return [value]

    def barrier(self):
        """Wait for every rank (nothing to wait for)."""

    def abort(self, code=1):
        """Stop every rank with exit status ``code``: here, this process."""
        raise SystemExit(code)

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return "SingleProcessCommunicator()"


class MPICommunicator:
    """The ranks of an MPI communicator (``MPI.COMM_WORLD`` by default), through mpi4py.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Default: ``MPI.COMM_WORLD``.

    Attributes
    ----------
    rank, size : int
        This process's rank and the number of ranks.
    local_rank : int
        This process's rank among the ranks on its machine (which GPU it takes).
    comm : mpi4py.MPI.Comm

    Notes
    -----
    Every method is collective: every rank calls it, in the same order, with arrays of
    the same shape and dtype. A deep copy of a communicator is the communicator itself
    (a layer deep-copies its optimizer, and the copy must talk to the same ranks); a
    communicator is not pickled (a saved model holds plain layers: see
    :func:`xpnn.parallel.distribute`).
    """

    def __init__(self, comm=None):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        machine = self.comm.Split_type(MPI.COMM_TYPE_SHARED)  # (collective: made here, once)
        self.local_rank = machine.Get_rank()
        machine.Free()

    def allreduce(self, value):
        """The sum of ``value`` (an array of any backend, or a Python number) over the ranks.

        Returns a new array of ``value``'s library, device and dtype (a number for a number).
        A NumPy array is MPI's send buffer itself; other arrays travel through a host copy.
        """
        if isinstance(value, (int, float)):
            return self.comm.allreduce(value)
        host = np.ascontiguousarray(to_numpy(value))
        total = np.empty_like(host)
        self.comm.Allreduce(host, total, op=self._mpi.SUM)
        return total if type(value) is np.ndarray else asarray_like(total, value)

    def all_sum(self, *values):
        """Each of ``values`` (Python numbers and arrays of any backend) summed over the ranks.

        One MPI call for all of them: they travel in one float64 host buffer (exact for
        counts below 2**53; float32 arrays are summed in float64 and rounded back). Returns
        a tuple: ints for ints, floats for floats, arrays of each array's library, device
        and dtype. This is the ``all_sum`` contract of ``ops.batch_norm_forward``.
        """
        hosts = [np.asarray(to_numpy(value)) for value in values]
        buffer = np.concatenate([host.astype(np.float64).ravel() for host in hosts])
        self.comm.Allreduce(self._mpi.IN_PLACE, buffer, op=self._mpi.SUM)
        sums, start = [], 0
        for value, host in zip(values, hosts):
            part = buffer[start:start + host.size].reshape(host.shape)
            start += host.size
            sums.append(_like(part, value, host))
        return tuple(sums)

    def broadcast(self, array, root=0):
        """Rank ``root``'s ``array`` (any backend): every rank passes an array of the same
        shape and dtype and gets a new one of its own library and device back, holding
        ``root``'s values."""
        host = np.array(to_numpy(array), copy=True, order="C")
        self.comm.Bcast(host, root=root)
        return host if type(array) is np.ndarray else asarray_like(host, array)

    def broadcast_object(self, value, root=0):
        """Rank ``root``'s ``value``, any picklable object (the other ranks may pass None)."""
        return self.comm.bcast(value, root=root)

    def allgather(self, value):
        """Every rank's ``value`` (a small picklable object, e.g. a row count), in rank order."""
        return self.comm.allgather(value)

    def barrier(self):
        """Wait until every rank has called it."""
        self.comm.Barrier()

    def abort(self, code=1):
        """Stop every rank at once with exit status ``code`` (``MPI_Abort``): for a rank that
        fails while the others wait for it in a collective call, where they would hang."""
        self.comm.Abort(code)

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __reduce__(self):
        raise TypeError("an MPICommunicator cannot be pickled: it names processes of this run; "
                        "xpnn.network.save writes a distributed network as plain layers")

    def __repr__(self):
        return f"MPICommunicator(rank={self.rank}, size={self.size})"


def _like(total, value, host):
    """``total`` (float64 host) as ``value`` was: a Python int or float, or an array of its
    library, device and dtype."""
    if isinstance(value, (bool, int, np.integer)):
        return int(round(float(total)))
    if isinstance(value, (float, np.floating)):
        return float(total)
    total = total.astype(host.dtype, copy=False)
    return total if type(value) is np.ndarray else asarray_like(total, value)
