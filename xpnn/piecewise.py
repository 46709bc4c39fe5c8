"""Data-parallel training passes: a batch cut into pieces that go through the layers at once.

A backend's ``ops.training_pieces(shape)`` says how a training batch is cut (the
generic :class:`xpnn.ops.Ops` never cuts; the NumPy backend gives each thread a
piece of a large batch). When every layer of a network treats each sample on
its own (``layer.runs_in_pieces``), each piece goes through replicas of the
layers (shallow copies with their own forward caches, see
:meth:`xpnn.layers.base.BaseLayer.replica`), the pieces at the same time
(``ops.run_pieces``), and their outputs are joined into the prediction.

Backward sends each piece's error back through its replicas. The loss is a sum
over samples, so a trainable layer's gradient is the sum of its replicas'
gradients; the layer's own optimizer applies it once
(:meth:`xpnn.layers.base.TrainableLayer.take_gradients`). The values are those
of a pass in one piece up to the order of floating-point sums.

A network with a layer that couples the samples of a batch (batch
normalization: batch statistics; dropout: one mask drawn for the batch) is not
cut: running the layers between such layers in pieces and the coupling layers
whole was measured 1.03-1.05x slower than splitting each operation (LeNet with
batch norm and dropout, batch 256, 2 threads), against 0.84x for plain LeNet.
"""


class PiecewisePass:
    """One training forward pass over pieces of a batch, kept for its backward pass.

    Parameters
    ----------
    layers : list
        The network's layers, every one with ``runs_in_pieces`` (not modified:
        replicas run the pieces).
    pieces : list of (start, stop)
        How the batch is cut (``ops.training_pieces``).

    Attributes
    ----------
    output : array or None
        What :meth:`forward` returned (the network's prediction).
    """

    def __init__(self, layers, pieces):
        self.layers = layers
        self.pieces = pieces
        self.output = None
        self._replicas = [[layer.replica() for layer in layers] for _ in pieces]

    def forward(self, tensor):
        """Run every layer on ``tensor`` (the whole batch); returns the joined outputs."""
        def run(piece_index):
            first, last = self.pieces[piece_index]
            piece = tensor[first:last, ...]
            for layer in self._replicas[piece_index]:
                piece = layer.forward(piece)
            return piece

        self.output = self._ops().join_samples(self._ops().run_pieces(run, len(self.pieces)))
        return self.output

    def backward(self, error_tensor, stop):
        """Send ``error_tensor`` (of layer ``stop - 1``'s output) back down through ``layers[:stop]``.

        The first layer skips its input gradient, as in :meth:`xpnn.NeuralNetwork.backward`;
        then every trainable layer takes the sum of its replicas' gradients.
        """
        def run(piece_index):
            first, last = self.pieces[piece_index]
            piece = error_tensor[first:last, ...]
            replicas = self._replicas[piece_index]
            for index in reversed(range(1, stop)):
                piece = replicas[index].backward(piece)
            if stop:
                replicas[0].skip_input_gradient = True
                replicas[0].backward(piece)

        self._ops().run_pieces(run, len(self.pieces))
        for index, layer in enumerate(self.layers[:stop]):
            if layer.trainable:
                layer.take_gradients([replicas[index] for replicas in self._replicas])

    def _ops(self):
        return self.layers[0].backend.ops
