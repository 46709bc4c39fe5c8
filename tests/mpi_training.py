"""Data-parallel training runs for tests/test_parallel_mpi.py.

``mpiexec -n 2 python tests/mpi_training.py OUT.npz BATCH`` trains the parity suite's float64
LeNet (batch norm and dropout, Adam with L2) for ``STEPS`` steps of ``BATCH`` rows over the
ranks; rank 0 writes the losses, parameters, running statistics and test predictions to
``OUT.npz``. The test imports :func:`train` to run the same steps in one process.

``python tests/mpi_training.py OUT.npz BATCH fail RANK`` makes rank ``RANK``'s data layer
raise at the third step, the others waiting for it in a collective call.
"""
import pickle
import sys

import numpy as np

import xpnn
from xpnn import parallel
from xpnn.models import lenet
from test_parity_training import LEARNING_RATE, SEED, STEPS, HostBatches, _state, host_dataset

#: What the failing rank's data layer raises (the test looks for it once in the output).
FAILURE = "the data layer of rank {rank} failed on purpose"


class FailingBatches(HostBatches):
    """HostBatches that raise at the third batch."""

    def __init__(self, images, labels, batch_size, message):
        super().__init__(images, labels, batch_size)
        self.message, self.calls = message, 0

    def next(self):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError(self.message)
        return super().next()


def train(communicator, batch_size, failing_rank=None):
    """STEPS training steps of the global batch ``batch_size`` over ``communicator``'s ranks.

    Returns what :func:`test_parity_training._assert_runs_agree` compares: ``losses`` (the
    global batch's data loss plus the regularization loss, per step), ``state``,
    ``initial_state`` and ``predictions`` (host arrays).
    """
    backend = xpnn.make_backend("cpu", "float64")
    images, labels, test_images = host_dataset()
    with xpnn.use_backend(backend), xpnn.host_random():
        np.random.seed(SEED)  # initial weights, as the parity suite draws them
        net = lenet.build(batch_norm=True, dropout=True, learning_rate=LEARNING_RATE)
        initial_state = {key: xpnn.to_numpy(value) for key, value in _state(net).items()
                         if value is not None}
        net = parallel.distribute(net, communicator)
        batches = HostBatches(images, labels, batch_size)
        if communicator.rank == failing_rank:
            batches = FailingBatches(images, labels, batch_size, FAILURE.format(rank=failing_rank))
        data = parallel.RankBatches(batches, communicator)
        np.random.seed(SEED + 1)  # dropout masks: the same stream on every rank
        losses = []
        for _ in range(STEPS):
            rows, one_hot = data.next()
            regularization = net.regularization_loss()  # (of the weights before the step)
            loss, _ = net.train_batch(rows, one_hot)
            losses.append(communicator.allreduce(float(loss)) + float(regularization))
        predictions = net.test(test_images)
    # Pickled, a distributed network is the plain one (the state's keys name the classes).
    plain = pickle.loads(pickle.dumps(net))
    return {"losses": np.array(losses), "initial_state": initial_state,
            "state": {key: xpnn.to_numpy(value) for key, value in _state(plain).items()},
            "predictions": xpnn.to_numpy(predictions)}


def save(path, run):
    arrays = {"losses": run["losses"], "predictions": run["predictions"]}
    arrays.update({f"state/{key}": value for key, value in run["state"].items()})
    arrays.update({f"initial_state/{key}": value for key, value in run["initial_state"].items()})
    np.savez(path, **arrays)


def load(path):
    with np.load(path) as stored:
        run = {"losses": stored["losses"], "predictions": stored["predictions"],
               "state": {}, "initial_state": {}}
        for key in stored.files:
            group, _, name = key.partition("/")
            if name:
                run[group][name] = stored[key]
    return run


def main(argv):
    out, batch_size = argv[0], int(argv[1])
    failing_rank = int(argv[3]) if len(argv) > 3 and argv[2] == "fail" else None
    communicator = parallel.world()
    run = train(communicator, batch_size, failing_rank)
    if communicator.rank == 0:
        save(out, run)


if __name__ == "__main__":
    main(sys.argv[1:])
