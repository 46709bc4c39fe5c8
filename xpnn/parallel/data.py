"""Each rank's rows of every global batch, for a course-style data layer."""
from xpnn.data_layer import batch_part
from xpnn.parallel.launcher import world


class RankBatches:
    """A data layer whose ``next()`` returns this rank's rows of the wrapped one's batch.

    Every rank wraps the same data layer (same data, same seed): each ``next()`` gives
    every rank the same global batch, of which it keeps its block of rows
    (:func:`xpnn.datasets.batch_part`), so the global batch and its order do not depend
    on the number of ranks. (:class:`xpnn.datasets.DataLayer` takes ``part=(rank, size)``
    instead and gathers only those rows.)

    Parameters
    ----------
    data_layer : object
        Anything whose ``next()`` returns ``(input_tensor, label_tensor)`` with the
        samples along the first axis.
    communicator : communicator, optional
        Default: :func:`xpnn.parallel.world`'s.
    """

    def __init__(self, data_layer, communicator=None):
        self.data_layer = data_layer
        self.communicator = world() if communicator is None else communicator

    def next(self):
        """This rank's rows of the wrapped data layer's next batch."""
        input_tensor, label_tensor = self.data_layer.next()
        start, stop = batch_part(input_tensor.shape[0], self.communicator.rank, self.communicator.size)
        return input_tensor[start:stop, ...], label_tensor[start:stop, ...]
