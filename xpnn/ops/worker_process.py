"""The process side of a training pass in two processes (see :mod:`xpnn.ops.piece_worker`).

What concerns the worker as a process rather than its piece of the pass: its
allocator (:func:`keep_freed_memory`), how it waits for commands
(:func:`next_command`), how it is ended (:func:`stop_worker`), what a user's
own ``os.fork`` does with it, and :class:`ProcessSlot`, a replica's place in
the pass, through which batch norm's sums and dropout's mask cross between
the two processes.
"""
import ctypes
import ctypes.util
import multiprocessing
import os
import pickle
import time
import weakref

from xpnn.ops.shared_memory import MessageRing

#: Seconds the worker keeps polling for its next command before it sleeps on the pipe: the
#: backward pass and the next step come within a millisecond or so while training, and a
#: sleeping process takes 0.1-0.2 ms to wake here (two wake-ups a step).
COMMAND_POLL_SECONDS = 0.005

#: glibc's ``mallopt`` parameters (malloc.h) and the worker's values: freed memory is kept
#: for the next pass (up to 1 GiB at the heap's top), arrays up to 32 MiB come from the heap.
#: Both, always: setting one turns glibc's adaptive thresholds off, and the trim threshold
#: alone (``MALLOC_TRIM_THRESHOLD_`` for a whole benchmark process) left every array over
#: 128 KiB mapped and unmapped afresh: both frameworks 2x slower.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_WORKER_MALLOC = ((_M_TRIM_THRESHOLD, 1 << 30), (_M_MMAP_THRESHOLD, 32 << 20))

#: The live workers' process objects (see _forget_workers_in_child).
LIVE_WORKERS = weakref.WeakSet()


def _forget_workers_in_child():
    """In a child forked by the user: multiprocessing would terminate the workers (daemonic
    children of the parent, not of this child) when the child exits; they are not its own."""
    children = getattr(multiprocessing.process, "_children", None)
    if children is not None:
        for process in list(LIVE_WORKERS):
            children.discard(process)


os.register_at_fork(after_in_child=_forget_workers_in_child)


def keep_freed_memory():
    """In the worker: glibc's malloc keeps the memory a pass frees for the next pass.

    By default glibc hands freed memory above a few MB back to the system, and
    every pass then pays page faults for it again (~120 a LeNet step in each
    process here). This is the worker's own process, so its allocator may be
    told otherwise (the owner's, the user's process, is left alone); its
    resident size stays at its peak. Measured on 2 cores, interleaved in one
    process: the worker's page faults 110-130 -> 1-2 a LeNet step; the step
    0.94-1.00 of its time at batch 64 (five runs, median 0.97), with batch
    norm and dropout 0.99-1.02. Returns False where the C library has no
    ``mallopt`` (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in _WORKER_MALLOC)


def next_command(connection):
    """The next command on ``connection``: polled for a while, then waited for asleep."""
    deadline = time.monotonic() + COMMAND_POLL_SECONDS
    while not connection.poll(0) and time.monotonic() < deadline:
        pass
    return connection.recv()


def picklable(error):
    """``error`` if it survives pickling, else a RuntimeError carrying its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # an exception type that cannot be rebuilt in the other process
        return RuntimeError(f"in the piece worker: {error!r}")


def stop_worker(process, connection, owner):
    """Ask the worker to end; one stuck in a pass (this process failed in its piece) is ended.

    Only in ``owner``, the process that started it: a child forked from there (by the user)
    runs this finalizer too when it exits, and must leave its parent's worker alone.
    """
    if os.getpid() != owner:
        return
    try:
        connection.send(("stop", None))
    except (OSError, ValueError):
        pass
    process.join(timeout=0.5)  # an idle worker reads "stop" at once
    if process.is_alive():
        process.terminate()
        process.join(timeout=5)
    connection.close()


def _travels_by_pipe(values):
    """True when a message of ``values`` may be too large for a ring's slot (it then goes
    through the pipe, whose writer blocks until the reader reads)."""
    return sum(getattr(value, "nbytes", 8) for value in values) > MessageRing.SLOT_BYTES // 2


class ProcessSlot:
    """Like :class:`xpnn.piecewise.PieceSlot`, for a piece in one of two processes.

    Attributes
    ----------
    bounds : (start, stop)
        The piece's rows of the whole batch.
    batch_size : int
        Samples in the whole batch.
    """

    def __init__(self, worker, index, bounds, batch_size):
        self._worker = worker
        self._index = index  # 0: this process, 1: the worker
        self.bounds = bounds
        self.batch_size = batch_size

    def all_sum(self, *values):
        """Each of ``values`` summed over both pieces, piece 0's first (the same bits in both)."""
        if self._index == 1 and _travels_by_pipe(values):
            # Too large for the ring: both sending first would leave both blocked writing
            # into a full pipe. The worker reads first (both sides see the same sizes).
            theirs = self._worker.receive("sum")
            self._worker.send("sum", values)
            return tuple(other + mine for mine, other in zip(values, theirs))
        self._worker.send("sum", values)
        if self._index == 0:  # (sums in piece order: both processes get the same bits)
            return tuple(mine + theirs for mine, theirs in zip(values, self._worker.receive("sum")))
        return tuple(theirs + mine for mine, theirs in zip(values, self._worker.receive("sum")))

    def shared(self, key, make):
        """``make()`` in piece 0's process (its random stream), handed to the other piece."""
        if self._index == 0:
            value = make()
            self._worker.send("shared", value)
            return value
        return self._worker.receive("shared")
