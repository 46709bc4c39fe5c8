"""Data-parallel training: one process per rank, started by ``mpiexec``, on mpi4py.

Every rank holds the whole model and trains on its rows of every global batch; the
gradients are summed over the ranks before each optimizer step, batch normalization
uses the global batch's statistics and dropout the global batch's mask, so N ranks
compute what one process computes, up to the order of sums::

    import xpnn.parallel as parallel

    communicator = parallel.world()            # MPI's world under mpiexec, else one process
    net = parallel.distribute(lenet.build(), communicator)
    net.data_layer = parallel.RankBatches(data_layer, communicator)
    net.train(iterations)                     # mpiexec -n 2 python train.py

mpi4py is an optional extra (``pip install "xpnn[mpi]"``); without a launcher nothing
here imports it. See ``docs/design.md`` ("Parallel training").
"""
from xpnn.data_layer import batch_part
from xpnn.parallel.communicator import MPICommunicator, SingleProcessCommunicator
from xpnn.parallel.data import RankBatches
from xpnn.parallel.distribute import distribute
from xpnn.parallel.layers import MultiNodeBatchNormalization, MultiNodeDropout
from xpnn.parallel.optimizer import MultiNodeOptimizer
from xpnn.parallel.launcher import (MPIUnavailableError, abort_on_uncaught_exception,
                                 launched_by_mpi, world)

__all__ = [
    "MPICommunicator", "MPIUnavailableError", "MultiNodeBatchNormalization", "MultiNodeDropout",
    "MultiNodeOptimizer", "RankBatches", "SingleProcessCommunicator",
    "abort_on_uncaught_exception", "batch_part", "distribute", "launched_by_mpi", "world",
]
