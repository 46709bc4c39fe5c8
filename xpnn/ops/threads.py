"""Run the parts of one job at the same time on a standard thread pool.

The CPU backend splits its hot operations (convolution, pooling, ReLU, batch
normalization) into independent parts, e.g. halves of the output rows or of
the channels, and a large inference batch into pieces. NumPy releases the GIL
inside its loops and BLAS calls, so the parts run on separate cores. The
calling thread runs the first part itself; the others go to a
:class:`concurrent.futures.ThreadPoolExecutor` (started on first use).
"""
import concurrent.futures
import contextvars
import threading


def split_range(length, parts):
    """``(start, stop)`` of up to ``parts`` nearly equal, non-empty pieces of ``range(length)``."""
    parts = max(1, min(int(parts), int(length)))
    bounds = [length * index // parts for index in range(parts + 1)]
    return [(bounds[index], bounds[index + 1]) for index in range(parts)]


class PartPool:
    """Run ``task(part)`` for a few parts at once.

    Parameters
    ----------
    size : int
        The most parts run at once (the caller plus ``size - 1`` pool threads).
    """

    def __init__(self, size):
        self.size = max(1, int(size))
        self._executor = None  # made on first use: a pool of one runs nothing on threads
        self._lock = threading.Lock()
        self._local = threading.local()

    def run(self, task, parts):
        """Return ``[task(part) for part in parts]``, the parts computed at the same time.

        At most :attr:`size` parts. The first exception a part raised (in part
        order) is re-raised once every part has finished: parts may write into
        shared output arrays, so none may still run when the caller goes on. A
        call from inside a part runs its parts one after the other, on that
        part's thread (a pool thread waiting for a part queued behind its own
        would wait for ever).
        """
        parts = list(parts)
        if len(parts) > self.size:
            raise ValueError(f"PartPool.run: {len(parts)} parts for a pool of {self.size}")
        if len(parts) <= 1 or self.inside_part():
            return [task(part) for part in parts]
        executor = self._executor_made()
        # The caller's context variables (e.g. NumPy's errstate) hold in the pool threads too.
        futures = [executor.submit(contextvars.copy_context().run, self._outcome, task, part)
                   for part in parts[1:]]
        outcomes = [self._outcome(task, parts[0])] + [future.result() for future in futures]
        for _, error in outcomes:
            if error is not None:
                raise error
        return [value for value, _ in outcomes]

    def inside_part(self):
        """True on a thread running one of this pool's parts (its own calls then run in turn)."""
        return getattr(self._local, "inside", False)

    def close(self):
        """Let the pool threads end once their queued parts are done (a later run starts new ones)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    def _executor_made(self):
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    self.size - 1, thread_name_prefix="xpnn-cpu-part")
            return self._executor

    def _outcome(self, task, part):
        """``(value, None)``, or ``(None, error)`` when ``task`` raised; marks the thread as
        inside a part meanwhile."""
        inside = self.inside_part()
        self._local.inside = True
        try:
            return task(part), None
        except BaseException as error:  # handed to the caller, who re-raises it
            return None, error
        finally:
            self._local.inside = inside
