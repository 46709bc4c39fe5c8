"""How many threads and processes the CPU backend uses, and its handle on BLAS's threads.

Split from :mod:`xpnn.ops.numpy_ops` (the operations); see its docstring for why
the counts are what they are.
"""
import contextlib
import functools
import os
import threading


def default_threads():
    """``XPNN_NUM_THREADS`` if set, else the usable cores (at most 4); 1 without threadpoolctl.

    Without threadpoolctl BLAS cannot be held to one thread while the parts
    run, and two BLAS calls that each start threads on every core fight.
    """
    configured = os.environ.get("XPNN_NUM_THREADS")
    if configured:
        return max(1, int(configured))
    if blas_controller() is None:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def default_processes(threads):
    """``XPNN_PROCESSES`` if set (1 or 2), else 2 with 2 threads, else 1.

    Two processes were measured on two cores only (batch 64: 0.80-0.85x the time
    of the threads' step, see :mod:`xpnn.ops.numpy_processes`); with more cores the
    threads have more to share and keep the work.
    """
    configured = os.environ.get("XPNN_PROCESSES")
    if not configured:
        return 2 if threads == 2 else 1
    if configured.strip() not in ("1", "2"):
        raise ValueError(f"XPNN_PROCESSES must be 1 or 2, got {configured!r}")
    return int(configured)


def can_fork():
    """True where a worker process can be forked: Linux-style fork, x86-64 (the shared-memory
    messages rely on its store order, see ``xpnn.ops.shared_memory``), not inside a daemonic
    process (which may have no children)."""
    import multiprocessing
    import platform

    return ("fork" in multiprocessing.get_all_start_methods()
            and platform.machine().lower() in ("x86_64", "amd64")
            and not multiprocessing.current_process().daemon)


_BLAS_LOCK = threading.Lock()
_blas_holders = 0  # scopes inside blas_on_one_thread, over all threads
_blas_limiter = None  # threadpoolctl's limiter while any is inside


def _fresh_blas_lock():
    """In a forked child: a lock of its own (the parent's other threads may have held the
    copied one at the fork, and none of them lives on here to release it)."""
    global _BLAS_LOCK
    _BLAS_LOCK = threading.Lock()


# (Held across a fork, so the counters are copied in a consistent state.)
os.register_at_fork(before=lambda: _BLAS_LOCK.acquire(), after_in_parent=lambda: _BLAS_LOCK.release(),
                    after_in_child=_fresh_blas_lock)


@contextlib.contextmanager
def blas_on_one_thread():
    """Inside: NumPy's BLAS on one thread (threadpoolctl), for the whole process.

    Counted over the program's threads: a limit is process-wide, and two threads that each
    saved and restored it in overlapping scopes left it at 1 for good. The first scope in
    sets it, the last one out restores it. Without threadpoolctl, nothing.
    """
    global _blas_holders, _blas_limiter
    controller = blas_controller()
    if controller is None:
        yield
        return
    with _BLAS_LOCK:
        if _blas_holders == 0:
            _blas_limiter = controller.limit(limits=1)
        _blas_holders += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _blas_holders -= 1
            if _blas_holders == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


@functools.lru_cache(maxsize=1)
def blas_controller():
    """threadpoolctl's handle on the loaded BLAS libraries, or None without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController().select(user_api="blas")
