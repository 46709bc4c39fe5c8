"""Layers that couple the samples of a batch, over a batch split between ranks.

Each rank holds its rows of every global batch (:func:`xpnn.datasets.batch_part`: contiguous,
in rank order). Batch normalization then needs the global batch's statistics, and dropout
the global batch's mask; these subclasses give both through the base classes' hooks
(``statistics_sum``, ``draw_uniform``), so that N ranks compute what one process computes.
Saved (pickle or checkpoint) they are the plain layers they stand for.
"""
import copy

from xpnn.layers.batch_normalization import BatchNormalization
from xpnn.layers.dropout import Dropout
from xpnn.parallel.plain import pickled_as
from xpnn.parallel.launcher import world


class _OverRanks:
    """What both layers share: the communicator, plain copies, copies that stay over ranks
    (``copy.copy`` and ``copy.deepcopy`` would otherwise follow ``__reduce_ex__``)."""

    #: The plain class this one stands for; saved files name it (see ``xpnn.checkpoint``).
    plain_class = None

    @classmethod
    def from_layer(cls, layer, communicator):
        """This layer over ranks, holding ``layer``'s settings, parameters and state."""
        twin = object.__new__(cls)  # (its state is the plain layer's: copied as it is)
        twin.__dict__.update(layer.__dict__)
        twin.communicator = communicator
        return twin

    def plain(self):
        """The plain layer with this one's settings, parameters and state (the same arrays)."""
        layer = object.__new__(self.plain_class)
        layer.__dict__.update(self.__dict__)
        del layer.__dict__["communicator"]
        return layer

    def __copy__(self):
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    def __deepcopy__(self, memo):
        twin = object.__new__(type(self))
        memo[id(self)] = twin
        # (The communicator deep-copies to itself: the copy talks to the same ranks.)
        twin.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return twin

    def __reduce_ex__(self, protocol):
        # Pickled as the plain layer: a saved model loads without MPI (xpnn.network.save).
        return pickled_as(self.plain())


class MultiNodeBatchNormalization(_OverRanks, BatchNormalization):
    """Batch normalization with the statistics of the global batch, summed over the ranks.

    Forward: each channel's count, sum and centred sum of squares are summed over the
    ranks (two calls, as in one process: mean first, then the variance about it);
    backward: the sums behind the gradient's means likewise. The running statistics
    are therefore the same on every rank, and the same as one process's.

    Parameters
    ----------
    channels, eps : see :class:`xpnn.layers.BatchNormalization`
    communicator : communicator, optional
        Default: :func:`xpnn.parallel.world`'s.
    """

    plain_class = BatchNormalization

    def __init__(self, channels, eps=1e-10, communicator=None):
        super().__init__(channels, eps)
        self.communicator = world() if communicator is None else communicator

    def statistics_sum(self):
        return self.communicator.all_sum

    def _check_batch_statistics(self, shape):
        """Nothing to check on this rank's rows alone: the statistics are the global batch's, and
        a rank may hold one row or none of a small batch (xpnn-train checks the global batch)."""


class MultiNodeDropout(_OverRanks, Dropout):
    """Dropout whose mask is the global batch's: every rank draws the whole batch's
    uniforms from the common random stream (every rank has the same seed) and keeps
    its rows, so the masks are those of one process.

    Parameters
    ----------
    probability : see :class:`xpnn.layers.Dropout`
    communicator : communicator, optional
        Default: :func:`xpnn.parallel.world`'s.
    """

    plain_class = Dropout

    def __init__(self, probability, communicator=None):
        super().__init__(probability)
        self.communicator = world() if communicator is None else communicator

    def draw_uniform(self, shape):
        # Every rank's row count, in rank order: the global batch and where this rank's rows are.
        counts = self.communicator.allgather(shape[0])
        first = sum(counts[:self.communicator.rank])
        draws = self.backend.random_uniform((sum(counts),) + tuple(shape[1:]))
        return draws[first:first + shape[0], ...]
