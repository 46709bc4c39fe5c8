"""Make a network data-parallel: :func:`distribute`."""
from xpnn import checkpoint
from xpnn.layers.base import TrainableLayer
from xpnn.layers.batch_normalization import BatchNormalization
from xpnn.layers.dropout import Dropout
from xpnn.layers.recurrent import RecurrentLayer
from xpnn.parallel.layers import MultiNodeBatchNormalization, MultiNodeDropout
from xpnn.parallel.optimizer import MultiNodeOptimizer
from xpnn.parallel.launcher import world

#: The plain layers that couple a batch's samples, and what stands in for them over ranks.
OVER_RANKS = {BatchNormalization: MultiNodeBatchNormalization, Dropout: MultiNodeDropout}
#: A trainable layer's optimizers (the weights' and the bias's own copy; a recurrent layer's
#: output part's).
OPTIMIZER_ATTRIBUTES = ("_optimizer", "_bias_optimizer", "_output_optimizer")
#: The xpnn layers whose every optimizer step goes through OPTIMIZER_ATTRIBUTES.
XPNN_TRAINABLE = (TrainableLayer, RecurrentLayer)


def distribute(net, communicator=None):
    """Make ``net`` train data-parallel over the ranks of ``communicator``; returns ``net``.

    Every rank calls it on the same network (built the same way, or loaded from the
    same checkpoint), then trains on its rows of every global batch
    (:func:`xpnn.datasets.batch_part`). It

    1. broadcasts rank 0's parameters, running statistics and optimizer state;
    2. puts :class:`MultiNodeBatchNormalization` and :class:`MultiNodeDropout` in place
       of the batch normalization and dropout layers (the global batch's statistics and
       masks);
    3. wraps every optimizer (the network's too, for layers appended later) in a
       :class:`MultiNodeOptimizer` (gradients summed over the ranks before each step).

    Parameters
    ----------
    net : xpnn.NeuralNetwork
    communicator : communicator, optional
        Default: :func:`xpnn.parallel.world`'s. With one rank ``net`` is left as it is.

    Notes
    -----
    The network keeps no other state: saved on rank 0 (:func:`xpnn.network.save`,
    :mod:`xpnn.checkpoint`) it is the plain network, which loads in one process
    without MPI. A layer of a subclass of BatchNormalization or Dropout is refused
    (its batch would be the rank's rows only), as is a trainable layer of your own
    (its gradient would not be summed). A recurrent layer (RNN, LSTM) takes its rows of
    the network's input: batches of sequences behind :class:`~xpnn.layers.ImageRows`
    (each rank its images' sequences), not the course's 2-D single sequence, whose rows
    are time steps.
    """
    communicator = world() if communicator is None else communicator
    if communicator.size == 1:
        return net
    _check_layers(net.layers)
    arrays = communicator.broadcast_object(
        checkpoint.network_arrays(net) if communicator.rank == 0 else None)
    if communicator.rank != 0:
        checkpoint.restore_network_arrays(net, arrays)
    for index, layer in enumerate(net.layers):
        if type(layer) in OVER_RANKS:
            net.layers[index] = layer = OVER_RANKS[type(layer)].from_layer(layer, communicator)
        for attribute in OPTIMIZER_ATTRIBUTES:
            optimizer = getattr(layer, attribute, None)
            if optimizer is not None and not isinstance(optimizer, MultiNodeOptimizer):
                setattr(layer, attribute, MultiNodeOptimizer(optimizer, communicator))
    if net.optimizer is not None and not isinstance(net.optimizer, MultiNodeOptimizer):
        net.optimizer = MultiNodeOptimizer(net.optimizer, communicator)
    return net


def _check_layers(layers):
    """Refuse layers whose training over ranks would silently differ from one process's."""
    for index, layer in enumerate(layers):
        kind = type(layer)
        coupled = [base for base in OVER_RANKS if isinstance(layer, base)]
        if coupled and kind not in OVER_RANKS and kind not in OVER_RANKS.values():
            raise TypeError(f"xpnn.parallel.distribute: layer {index} ({kind.__name__}) is a "
                            f"subclass of {coupled[0].__name__}, whose batch would be this rank's "
                            f"rows only; use {coupled[0].__name__} itself")
        if getattr(layer, "trainable", False) and not isinstance(layer, XPNN_TRAINABLE):
            raise TypeError(f"xpnn.parallel.distribute: layer {index} ({kind.__name__}) is "
                            f"trainable but not an xpnn layer (xpnn.layers.base.TrainableLayer): "
                            f"its gradient would not be summed over the ranks")
