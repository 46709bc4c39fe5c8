"""xpnn.train_ranks in one process: the setup that fails alike or on one rank, a rank's own
error stopping every rank, each rank's device. (tests/test_parallel_mpi.py runs xpnn-train
on real ranks.)"""
import pytest

from xpnn import train_ranks
from xpnn.parallel import SingleProcessCommunicator
from thread_ranks import run_ranks


def _setup(failures):
    """A setup for each rank: rank r raises failures[r] (an exception) or returns r."""
    def function(communicator):
        def setup():
            if failures[communicator.rank] is not None:
                raise failures[communicator.rank]
            return communicator.rank

        try:
            return train_ranks.agreed(communicator, setup)
        except Exception as error:  # (what each rank's main would see)
            return error
    return function


def test_a_setup_that_succeeds_everywhere_returns_each_ranks_result():
    assert run_ranks(2, _setup([None, None])) == [0, 1]


def test_a_setup_failing_alike_is_said_by_the_first_rank_only():
    error = ValueError("no such file")
    first, second, third = run_ranks(3, _setup([None, error, ValueError("no such file")]))
    assert isinstance(first, train_ranks.FailedElsewhere) and first.cause is None
    assert second is error  # (the lowest rank with this message says it)
    assert isinstance(third, train_ranks.FailedElsewhere) and isinstance(third.cause, ValueError)


def test_different_setup_failures_are_each_said():
    first, second = run_ranks(2, _setup([OSError("disk"), ValueError("device")]))
    assert isinstance(first, OSError) and isinstance(second, ValueError)


class _Aborting:
    """A rank of two whose abort records its status instead of stopping the process."""

    rank, size = 1, 2

    def __init__(self):
        self.status = None

    def abort(self, code=1):
        self.status = code


def test_a_ranks_own_error_prints_its_message_and_stops_every_rank(capsys):
    communicator = _Aborting()
    with train_ranks.stop_all_on_error(communicator, lambda error: (1, f"message: {error}")):
        raise OSError("cannot write")
    assert communicator.status == 1
    err = capsys.readouterr().err
    assert err.count("message: cannot write") == 1 and "rank 1 of 2 failed" in err


def test_errors_every_rank_raises_together_pass_and_one_process_raises_as_before():
    class Together(Exception):
        pass

    communicator = _Aborting()
    with pytest.raises(Together):
        with train_ranks.stop_all_on_error(communicator, lambda error: None, (Together,)):
            raise Together
    assert communicator.status is None
    with pytest.raises(OSError):
        with train_ranks.stop_all_on_error(SingleProcessCommunicator(), lambda error: (1, "")):
            raise OSError("one process")


def test_an_unknown_error_prints_its_traceback_before_stopping(capsys):
    communicator = _Aborting()
    with train_ranks.stop_all_on_error(communicator, lambda error: None):
        raise ZeroDivisionError("a bug")
    assert communicator.status == 1
    assert "Traceback" in capsys.readouterr().err


class _Rank:
    def __init__(self, size, local_rank):
        self.size, self.local_rank = size, local_rank


@pytest.mark.parametrize("backend, device, size, expected", [
    ("gpu", None, 2, "1"), ("cupy", None, 2, "1"), ("gpu", "0", 2, "0"), ("gpu", None, 1, None),
    ("torch", "cuda", 2, "cuda:1"), ("torch", None, 2, None), ("cpu", None, 2, None)])
def test_each_rank_takes_the_gpu_of_its_local_rank_unless_told(backend, device, size, expected):
    assert train_ranks.rank_device(backend, device, _Rank(size, 1)) == expected
