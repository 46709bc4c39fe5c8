"""How many threads the CPU backend uses, and its handle on BLAS's threads.

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


_BLAS_LOCK = threading.Lock()
_blas_holders = 0  # scopes inside blas_on_one_thread, over all threads
_blas_limiter = None  # threadpoolctl's limiter while any is inside


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
