"""The recurrent classifier trained over ranks (xpnn.parallel.distribute; thread ranks, no MPI)
computes what one process computes on the global batch."""
import numpy as np
import pytest

import xpnn
from xpnn import parallel
from xpnn.datasets import batch_part
from xpnn.models import recurrent
from thread_ranks import ThreadCommunicator, run_ranks

STEPS, BATCH = 3, 7


class BroadcastingThreads(ThreadCommunicator):
    """Thread ranks with the broadcast :func:`~xpnn.parallel.distribute` makes of rank 0's state."""

    def broadcast_object(self, value):
        return self.exchange.swap(self.rank, value)[0]


def _build(cell):
    xpnn.seed(4)
    return recurrent.build(cell, hidden_size=5, output_size=4, learning_rate=1e-2)


@pytest.mark.parametrize("cell", sorted(recurrent.CELLS))
def test_two_ranks_train_what_one_process_trains(backend, cell):
    rng = np.random.default_rng(3)
    images = rng.random((STEPS, BATCH, 1, 28, 28))
    labels = np.eye(10)[rng.integers(0, 10, (STEPS, BATCH))]
    reference = _build(cell)
    for step in range(STEPS):
        reference.train_batch(images[step], labels[step])
    nets = [_build(cell) for _ in range(2)]  # (built here: the seeded draws are not thread-safe)

    def rank_run(communicator):
        net = parallel.distribute(nets[communicator.rank], BroadcastingThreads(
            communicator.exchange, communicator.rank))
        start, stop = batch_part(BATCH, communicator.rank, 2)
        for step in range(STEPS):
            net.train_batch(images[step, start:stop], labels[step, start:stop])
        return net

    for net in run_ranks(2, rank_run):
        layer, expected = net.layers[1], reference.layers[1]
        assert isinstance(layer._output_optimizer, parallel.MultiNodeOptimizer)
        for name in ("weights", "output_weights"):
            np.testing.assert_allclose(xpnn.to_numpy(getattr(layer, name)),
                                       xpnn.to_numpy(getattr(expected, name)),
                                       rtol=1e-10, atol=1e-12, err_msg=name)
