"""The multi-node optimizer: the gradient summed over the ranks, then the optimizer's own step."""
import copy

from xpnn.parallel.plain import pickled_as


class MultiNodeOptimizer:
    """An optimizer whose every update first sums the gradient over the ranks.

    Parameters
    ----------
    optimizer : xpnn.optimizers.Optimizer
        Makes the step (Sgd, SgdWithMomentum, Adam, with a regularizer or not).
    communicator : communicator
        E.g. :func:`xpnn.parallel.world`'s.

    Notes
    -----
    The loss is a sum over the batch, so the global batch's gradient is the sum of every
    rank's gradient of its rows: after the sum every rank's optimizer makes the step one
    process would make, on identical weights, and applies the regularizer there. A layer
    calls its optimizer in its ``backward``, so each layer's gradient is summed while the
    layers below it have still to go back: communication interleaves with the backward pass.

    In every other respect it is the optimizer it wraps: other attributes are read from
    and written to that optimizer (``learning_rate``, ``regularizer``, Adam's moments,
    ``to``), so checkpoints and learning-rate changes see the real state. A deep copy
    (a layer's bias optimizer) wraps a deep copy on the same communicator; pickled
    (``xpnn.network.save``) it is the plain optimizer, which loads without MPI.
    """

    def __init__(self, optimizer, communicator):
        # (object.__setattr__: this class's own __setattr__ writes to the wrapped optimizer.)
        object.__setattr__(self, "optimizer", optimizer)
        object.__setattr__(self, "communicator", communicator)

    def calculate_update(self, weight_tensor, gradient_tensor):
        """The wrapped optimizer's update with the gradient summed over the ranks."""
        return self.optimizer.calculate_update(weight_tensor, self.communicator.allreduce(gradient_tensor))

    def __getattr__(self, name):
        # Called only for names this object lacks, i.e. the wrapped optimizer's.
        if name in ("optimizer", "communicator"):  # (not set yet: an object being copied)
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __setattr__(self, name, value):
        setattr(self.optimizer, name, value)

    def __copy__(self):
        return MultiNodeOptimizer(copy.copy(self.optimizer), self.communicator)

    def __deepcopy__(self, memo):
        return MultiNodeOptimizer(copy.deepcopy(self.optimizer, memo), self.communicator)

    def __reduce_ex__(self, protocol):
        # Pickled as the optimizer it wraps: a saved model loads as plain classes, without MPI.
        return pickled_as(self.optimizer)

    def __repr__(self):
        return f"MultiNodeOptimizer({self.optimizer!r}, {self.communicator!r})"
