"""The thread pool behind the CPU backend's multi-threaded operations."""
import threading

import pytest

from xpnn.ops.threads import PartPool, split_range


@pytest.mark.parametrize("length, parts, expected", [
    (10, 2, [(0, 5), (5, 10)]),
    (7, 3, [(0, 2), (2, 4), (4, 7)]),
    (1, 4, [(0, 1)]),
    (5, 1, [(0, 5)]),
])
def test_split_range(length, parts, expected):
    assert split_range(length, parts) == expected


def test_parts_run_at_the_same_time_on_different_threads_and_results_keep_their_order():
    pool = PartPool(3)
    barrier = threading.Barrier(3, timeout=10)

    def task(part):
        barrier.wait()  # each part waits for the others: only parts running at once finish
        return part, threading.current_thread().name

    for _ in range(3):  # (again once the pool's threads exist and idle)
        names = pool.run(task, [0, 1, 2])
        assert [part for part, _ in names] == [0, 1, 2]
        assert len({name for _, name in names}) == 3
        assert names[0][1] == threading.current_thread().name   # the caller runs the first part


def test_an_exception_is_raised_after_every_part_finished():
    pool = PartPool(2)
    finished = []

    def task(part):
        if part == 0:
            raise KeyError("part 0")
        threading.Event().wait(0.05)
        finished.append(part)
        return part

    with pytest.raises(KeyError, match="part 0"):
        pool.run(task, [0, 1])
    assert finished == [1]
    assert pool.run(lambda part: part * 2, [1, 2]) == [2, 4]   # the pool still works


def test_a_pool_thread_exception_reaches_the_caller():
    with pytest.raises(ValueError, match="helper"):
        PartPool(2).run(lambda part: (_ for _ in ()).throw(ValueError("helper")) if part else 0, [0, 1])


def test_nested_calls_run_inline_and_too_many_parts_are_refused():
    pool = PartPool(2)
    assert pool.run(lambda part: pool.run(lambda inner: inner + part, [10, 20]), [0, 1]) == [
        [10, 20], [11, 21]]
    with pytest.raises(ValueError, match="3 parts"):
        pool.run(lambda part: part, [0, 1, 2])


def test_nested_calls_from_every_part_stay_on_that_parts_thread():
    # The caller's own part must not hand inner parts to a pool thread busy with its outer part
    # (it would wait for that whole part): inner parts run inline on the caller too.
    pool = PartPool(2)

    def outer(part):
        inner = pool.run(lambda _: threading.get_ident(), [0, 1])
        return threading.get_ident(), inner

    for ident, inner in pool.run(outer, [0, 1]):
        assert inner == [ident, ident]
    assert len(set(pool.run(lambda part: threading.get_ident(), [0, 1]))) == 2  # flag reset


def test_pool_threads_see_the_callers_context_variables():
    import contextvars

    import numpy as np

    flag = contextvars.ContextVar("flag", default="unset")
    pool = PartPool(2)
    token = flag.set("caller")
    try:
        assert pool.run(lambda part: flag.get(), [0, 1]) == ["caller", "caller"]
        with np.errstate(over="raise"):
            with pytest.raises(FloatingPointError):
                pool.run(lambda part: np.float32(3e38) * np.float32(part * 10), [0, 1])
    finally:
        flag.reset(token)
    assert pool.run(lambda part: flag.get(), [0, 1]) == ["unset", "unset"]


def _pool_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("xpnn-cpu-part")]


def test_a_closed_pool_ends_its_threads():
    import time

    # Compare thread objects, not counts: other tests' pools may end theirs meanwhile.
    before = set(_pool_threads())
    pool = PartPool(3)
    assert pool.run(lambda part: part, [0, 1, 2]) == [0, 1, 2]
    assert [thread for thread in _pool_threads() if thread not in before]   # (the premise)
    pool.close()

    def started_here():
        return [thread for thread in _pool_threads() if thread not in before]

    deadline = time.monotonic() + 10
    while started_here() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started_here() == []


def test_blas_held_from_two_threads_is_restored_when_the_last_leaves():
    # Two threads of the program, each in a compute scope of its own (BLAS on one thread),
    # leaving in the order they did not enter: BLAS must end as it began, not at 1.
    import numpy as np

    from xpnn.backend import make_backend
    from xpnn.ops.numpy_ops import NumpyOps
    from xpnn.ops.numpy_settings import blas_controller

    controller = blas_controller()
    if controller is None or not controller.info():
        pytest.skip("threadpoolctl or a BLAS it controls is missing")
    original = [entry["num_threads"] for entry in controller.info()]
    if max(original) == 1:
        pytest.skip("BLAS runs on one thread here already: a restore could not be told apart")
    backend = make_backend("cpu", "float64")
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with NumpyOps(backend, threads=2).compute_scope():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with NumpyOps(backend, threads=2).compute_scope():
            second_in.set()
            first_out.wait(10)
            np.ones((64, 64)) @ np.ones((64, 64))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert [entry["num_threads"] for entry in blas_controller().info()] == original


def test_a_closed_pool_used_again_starts_threads_again():
    # Another thread may still hold a pool when ops.threads replaces (and closes) it.
    pool = PartPool(2)
    assert pool.run(lambda part: part, [0, 1]) == [0, 1]
    pool.close()
    outcome = []
    runner = threading.Thread(target=lambda: outcome.append(pool.run(lambda part: part, [0, 1])),
                              daemon=True)
    runner.start()
    runner.join(10)
    assert outcome == [[0, 1]], "the run on the closed pool did not finish"
    pool.close()
