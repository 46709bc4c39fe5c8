"""Communicators for threads of one process, to test xpnn.parallel's layers without MPI.

Each thread plays one rank; a collective call meets the others at a barrier. Only what
the layers use: ``rank``, ``size``, ``allgather``, ``all_sum``, ``allreduce``.
"""
import functools
import operator
import threading


class ThreadCommunicator:
    """Rank ``rank`` of the threads that share ``exchange``."""

    def __init__(self, exchange, rank):
        self.exchange, self.rank, self.size = exchange, rank, exchange.size

    def allgather(self, value):
        return self.exchange.swap(self.rank, value)

    def all_sum(self, *values):
        everyone = self.exchange.swap(self.rank, values)
        return tuple(functools.reduce(operator.add, column) for column in zip(*everyone))

    def allreduce(self, value):
        return self.all_sum(value)[0]


class _Exchange:
    def __init__(self, size):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=60)

    def swap(self, rank, value):
        """Every rank's ``value``, in rank order."""
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # (no rank writes its next value before every rank has read)
        return values


def run_ranks(size, function):
    """``function(communicator)`` on ``size`` threads, one rank each; their results in rank
    order (the first exception raised, if any, is raised here)."""
    exchange = _Exchange(size)
    results, errors = [None] * size, []

    def run(rank):
        try:
            results[rank] = function(ThreadCommunicator(exchange, rank))
        except BaseException as error:  # (re-raised in the caller's thread)
            errors.append(error)
            exchange.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
