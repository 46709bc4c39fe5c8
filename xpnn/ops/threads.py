"""A small team of helper threads that run the parts of one job at the same time.

The CPU backend splits its hot operations (convolution, pooling, ReLU, batch
normalization) into independent parts, e.g. halves of the output rows or of
the channels. NumPy releases the GIL inside its loops and BLAS calls, so the
parts run on separate cores. The calling thread runs the first part itself;
each other part goes to one long-lived helper thread (daemon, started on first
use and again in a forked child process).
"""
import contextlib
import contextvars
import os
import queue
import threading
import weakref


def split_range(length, parts):
    """``(start, stop)`` of up to ``parts`` nearly equal, non-empty pieces of ``range(length)``."""
    parts = max(1, min(int(parts), int(length)))
    bounds = [length * index // parts for index in range(parts + 1)]
    return [(bounds[index], bounds[index + 1]) for index in range(parts)]


class Team:
    """Run ``task(part)`` for a few parts at once.

    Parameters
    ----------
    size : int
        The most parts run at once (the caller plus ``size - 1`` helpers).
    """

    def __init__(self, size):
        self.size = max(1, int(size))
        self._helpers = []  # their job queues (one list, kept: the finalizer holds it)
        self._pid = None
        self._handing_out = threading.Lock()  # held while a caller queues its parts
        self._local = threading.local()
        # The helpers hold the queues and the thread-local, not the team: a team no longer
        # used (ops.threads changed, its ops collected) ends its helpers.
        self._finalizer = weakref.finalize(self, _stop_helpers, self._helpers)
        _TEAMS.add(self)

    def close(self):
        """End the helper threads once the jobs queued for them are done. (Not while a
        caller queues its parts: they would land behind the stop. A later run starts
        helpers again.)"""
        with self._handing_out:
            self._finalizer()

    def run(self, task, parts):
        """Return ``[task(part) for part in parts]``, the parts computed at the same time.

        At most :attr:`size` parts. The first exception any part raised is
        re-raised once every part has finished (parts may write into shared
        output arrays, so none may still be running when the caller goes on).
        A call from inside a part runs its parts one after the other.
        """
        parts = list(parts)
        if len(parts) > self.size:
            raise ValueError(f"Team.run: {len(parts)} parts for a team of {self.size}")
        if len(parts) <= 1 or getattr(self._local, "helping", False):
            return [task(part) for part in parts]
        results = queue.SimpleQueue()
        # One caller's parts queued at once: two threads calling at the same time otherwise
        # interleave, each helper first serving the other's part, and parts that wait for each
        # other (batch norm's sums) wait for ever.
        with self._handing_out:
            for index, (part, jobs) in enumerate(zip(parts[1:], self._job_queues()), start=1):
                # The caller's context variables (e.g. NumPy's errstate) hold in the helper too.
                jobs.put((contextvars.copy_context(), task, part, index, results))
        self._local.helping = True  # the caller's own part runs its inner parts in turn too
        try:
            outcomes = [_outcome(task, parts[0], 0)]
        finally:
            self._local.helping = False
        outcomes += [results.get() for _ in parts[1:]]
        outcomes.sort(key=lambda outcome: outcome[0])
        for _, _, error in outcomes:
            if error is not None:
                raise error
        return [value for _, value, _ in outcomes]

    @contextlib.contextmanager
    def alone(self):
        """While inside: this thread's jobs run their parts in turn, on this thread."""
        helping = getattr(self._local, "helping", False)
        self._local.helping = True
        try:
            yield
        finally:
            self._local.helping = helping

    def inside_part(self):
        """True on a thread running one of this team's parts (its own calls then run in turn)."""
        return getattr(self._local, "helping", False)

    def _job_queues(self):
        """The helpers' job queues, (re)starting the helpers in a new process (called with
        ``_handing_out`` held)."""
        # First use, a fork (the helpers did not survive) or a use after close() (another
        # thread still held the team when ops.threads changed): start helpers.
        if self._pid != os.getpid() or len(self._helpers) < self.size - 1:
            self._pid = os.getpid()
            self._helpers[:] = [self._start_helper(index) for index in range(1, self.size)]
            if not self._finalizer.alive:
                self._finalizer = weakref.finalize(self, _stop_helpers, self._helpers)
        return self._helpers

    def _start_helper(self, index):
        jobs = queue.SimpleQueue()
        thread = threading.Thread(target=_serve, args=(jobs, self._local), daemon=True,
                                  name=f"xpnn-cpu-helper-{index}")
        thread.start()
        return jobs


#: Every team, for _fresh_locks_in_child.
_TEAMS = weakref.WeakSet()


def _fresh_locks_in_child():
    """In a forked child: a lock of its own for every team (a parent's thread may have held
    the copied one at the fork; no thread lives on here to release it)."""
    for team in list(_TEAMS):
        team._handing_out = threading.Lock()


os.register_at_fork(after_in_child=_fresh_locks_in_child)


def _serve(jobs, local):
    """A helper thread: run the parts queued on ``jobs`` until ``None`` comes."""
    local.helping = True
    while True:
        job = jobs.get()
        if job is None:
            return
        context, task, part, index, results = job
        results.put(context.run(_outcome, task, part, index))


def _stop_helpers(job_queues):
    """Tell every helper to end after its queued jobs (only in the process that started them:
    a forked child's copies of the queues lead to no thread)."""
    for jobs in job_queues:
        jobs.put(None)
    job_queues.clear()


def _outcome(task, part, index):
    """``(index, value, None)``, or ``(index, None, error)`` when ``task`` raised."""
    try:
        return index, task(part), None
    except BaseException as error:  # handed to the caller, who re-raises it
        return index, None, error
