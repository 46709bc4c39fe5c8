"""The helper-thread team behind the CPU backend's multi-threaded operations."""
import multiprocessing
import threading

import pytest

from xpnn.ops.threads import Team, split_range


@pytest.mark.parametrize("length, parts, expected", [
    (10, 2, [(0, 5), (5, 10)]),
    (7, 3, [(0, 2), (2, 4), (4, 7)]),
    (1, 4, [(0, 1)]),
    (5, 1, [(0, 5)]),
])
def test_split_range(length, parts, expected):
    assert split_range(length, parts) == expected


def test_parts_run_on_different_threads_and_results_keep_their_order():
    team = Team(3)
    names = team.run(lambda part: (part, threading.current_thread().name), [0, 1, 2])
    assert [part for part, _ in names] == [0, 1, 2]
    assert len({name for _, name in names}) == 3
    assert names[0][1] == threading.current_thread().name   # the caller runs the first part


def test_parts_really_overlap():
    team = Team(2)
    barrier = threading.Barrier(2, timeout=10)
    # Each part waits for the other: this only finishes if they run at the same time.
    assert team.run(lambda part: barrier.wait() is not None, [0, 1]) == [True, True]


def test_an_exception_is_raised_after_every_part_finished():
    team = Team(2)
    finished = []

    def task(part):
        if part == 0:
            raise KeyError("part 0")
        threading.Event().wait(0.05)
        finished.append(part)
        return part

    with pytest.raises(KeyError, match="part 0"):
        team.run(task, [0, 1])
    assert finished == [1]
    assert team.run(lambda part: part * 2, [1, 2]) == [2, 4]   # the team still works


def test_a_helper_exception_reaches_the_caller():
    with pytest.raises(ValueError, match="helper"):
        Team(2).run(lambda part: (_ for _ in ()).throw(ValueError("helper")) if part else 0, [0, 1])


def test_nested_calls_run_inline_and_too_many_parts_are_refused():
    team = Team(2)
    assert team.run(lambda part: team.run(lambda inner: inner + part, [10, 20]), [0, 1]) == [
        [10, 20], [11, 21]]
    with pytest.raises(ValueError, match="3 parts"):
        team.run(lambda part: part, [0, 1, 2])


def test_nested_calls_from_every_part_stay_on_that_parts_thread():
    # The caller's own part must not hand inner parts to a helper busy with its outer part
    # (it would wait for that whole part): inner parts run inline on the caller too.
    team = Team(2)

    def outer(part):
        inner = team.run(lambda _: threading.get_ident(), [0, 1])
        return threading.get_ident(), inner

    for ident, inner in team.run(outer, [0, 1]):
        assert inner == [ident, ident]
    assert len(set(team.run(lambda part: threading.get_ident(), [0, 1]))) == 2  # flag reset


def _child(team, queue):
    queue.put(team.run(lambda part: part + 1, [1, 2]))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_starts_its_own_helpers():
    team = Team(2)
    assert team.run(lambda part: part, [0, 1]) == [0, 1]   # helpers started in the parent
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(team, queue))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == [2, 3]


def test_helpers_see_the_callers_context_variables():
    import contextvars

    import numpy as np

    flag = contextvars.ContextVar("flag", default="unset")
    team = Team(2)
    token = flag.set("caller")
    try:
        assert team.run(lambda part: flag.get(), [0, 1]) == ["caller", "caller"]
        with np.errstate(over="raise"):
            with pytest.raises(FloatingPointError):
                team.run(lambda part: np.float32(3e38) * np.float32(part * 10), [0, 1])
    finally:
        flag.reset(token)
    assert team.run(lambda part: flag.get(), [0, 1]) == ["unset", "unset"]


def _helper_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("xpnn-cpu-helper")]


def test_a_team_no_longer_used_ends_its_helpers():
    import gc
    import time

    # Compare thread objects, not counts: helpers of other tests' teams may end meanwhile
    # (the garbage collection below can collect them), which a count would read as a failure.
    before = set(_helper_threads())
    for size in (3, 4, 2, 3) * 3:  # as ops.threads changing, or short-lived ops objects
        team = Team(size)
        team.run(lambda part: part, list(range(size)))
    del team
    gc.collect()

    def started_here():
        return [thread for thread in _helper_threads() if thread not in before]

    deadline = time.monotonic() + 10
    while started_here() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started_here() == []
    closed = Team(2)
    assert closed.run(lambda part: part, [0, 1]) == [0, 1]
    closed.close()  # jobs queued before it still run; the helper then ends
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
        with NumpyOps(backend, threads=2, processes=1).compute_scope():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with NumpyOps(backend, threads=2, processes=1).compute_scope():
            second_in.set()
            first_out.wait(10)
            np.ones((64, 64)) @ np.ones((64, 64))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert [entry["num_threads"] for entry in blas_controller().info()] == original


def test_a_closed_team_used_again_starts_helpers_again():
    # Another thread may still hold a team when ops.threads replaces (and closes) it.
    team = Team(2)
    assert team.run(lambda part: part, [0, 1]) == [0, 1]
    team.close()
    outcome = []
    runner = threading.Thread(target=lambda: outcome.append(team.run(lambda part: part, [0, 1])),
                              daemon=True)
    runner.start()
    runner.join(10)
    assert outcome == [[0, 1]], "the run on the closed team did not finish"
    team.close()


def test_a_fork_while_another_thread_holds_the_blas_lock_leaves_the_child_a_usable_one():
    import os
    import time

    from xpnn.ops import numpy_settings

    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    held = threading.Event()

    def hold_briefly():
        with numpy_settings._BLAS_LOCK:
            held.set()
            time.sleep(0.3)

    holder = threading.Thread(target=hold_briefly)
    holder.start()
    held.wait(10)
    child = os.fork()  # (waits for the lock: the child's copy is then a consistent one)
    if child == 0:
        import signal

        signal.alarm(10)  # a child stuck on a copied, held lock dies here
        with numpy_settings.blas_on_one_thread():
            pass
        os._exit(0)
    _, status = os.waitpid(child, 0)
    holder.join()
    assert os.waitstatus_to_exitcode(status) == 0
