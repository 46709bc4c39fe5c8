"""Training passes with a batch cut in two pieces: one in this process, one in a forked worker.

The NumPy backend's (``NumpyOps.process_pass``); the network holds the worker it returns.

The threads of :mod:`xpnn.piecewise` share one GIL and hand work over in tens
of microseconds, so on two cores a batch of 64 gains little from them. A
worker *process* shares neither: :class:`PieceWorker` forks once with a copy
of the network's layers and then runs the second piece of every training
pass, while this process runs the first. Parameters, the worker's piece of the
input and its gradients travel through shared arrays; the commands (the
backward one with the worker's piece of the error) through a pipe, which the
worker polls for a few milliseconds after each pass before it sleeps; its
output and the sums that batch normalization and dropout need across the
pieces (see :class:`xpnn.piecewise.PieceSlot`) through rings of messages in
shared memory that the receiver polls (:mod:`xpnn.ops.shared_memory`). Every trainable layer
then takes the sum of the two pieces' gradients and its optimizer steps once,
as for threads: the numbers are those of a pass in one piece up to the order
of floating-point sums, and dropout's mask comes from this process's random
stream.

Measured on 2 cores, LeNet, batch 64, one process alternating both ways: 9.0
-> 7.5 ms a step (plain), 12.1 -> 9.8 ms (batch norm and dropout; with its 14
exchanges a step through a pipe instead of the rings: 11.1 ms).

Inside :meth:`xpnn.NeuralNetwork.train` the worker also runs ahead of this
process (see :class:`ProcessPass`): it computes its rows' loss gradient
itself, and starts the next batch while this process updates the parameters.

The worker holds copies of the layers made when it forked. Each pass they take
the current parameters and every layer's public settings (numbers, strings,
tuples of those: e.g. a dropout probability); other changes to a layer after
the fork do not reach them. Other layers, parameter shapes or batch shapes
start a new worker (see :func:`xpnn.ops.piece_worker.layers_key`). A failure in either piece ends
the worker; the next pass starts another. Linux on x86-64 only (``fork``, and
the store order the message rings rely on).
"""
from xpnn.backend import to_numpy
from xpnn.ops.piece_worker import PieceWorker, layers_key
from xpnn.ops.worker_process import ProcessSlot
from xpnn.piecewise import backward_chain, forward_chain, note_piece, replica_in


def process_pass(layers, pieces, shape, dtype, worker):
    """A :class:`ProcessPass` over ``pieces`` of a batch of ``shape`` and the worker it runs in.

    ``worker`` (the last one, or None) is kept when it was made for these layers
    and this piece shape, else closed and replaced. Returns ``(None, worker)``
    when a layer's gradients are not all of weights/bias (see :func:`supports`).
    """
    if not supports(layers):
        return None, worker
    piece_shape = (pieces[1][1] - pieces[1][0],) + tuple(shape[1:])
    key = layers_key(layers, piece_shape, dtype)
    # (A backward pass the worker went into by itself, for a forward pass whose own backward
    # never came, e.g. the loss raised: its answer would be taken for the next pass's.)
    stale = worker is not None and worker.owes_backward and worker.ahead_input is None
    if worker is None or not worker.alive or worker.key != key or stale:
        if worker is not None:
            worker.close()
        worker = PieceWorker(layers, piece_shape, dtype)
    return ProcessPass(worker, layers, pieces), worker


def supports(layers):
    """True when the worker's copies can run these layers: every trainable layer's gradients
    are of its ``weights``/``bias`` (what the worker hands back), and no layer is in testing
    phase on its own (a frozen batch norm: the worker's copies would normalize with the
    running statistics they had at the fork; such passes keep the threads)."""
    for layer in layers:
        if getattr(layer, "testing_phase", False):
            return False
        if layer.trainable and not set(layer.gradient_names) <= {"gradient_weights", "gradient_bias"}:
            return False
    return True


class ProcessPass:
    """One training pass over two pieces, piece 1 in ``worker``; the interface of
    :class:`xpnn.piecewise.PiecewisePass` (``forward``, ``backward``, ``output``).

    The worker's replicas stay in the worker: ``take_forward_state`` sees this
    process's replica only (batch norm's running statistics are the same in both).

    Within :meth:`xpnn.NeuralNetwork.train` two more things overlap: given the
    labels, the worker goes on into its backward pass without waiting for this
    process's forward pass and loss (``forward(tensor, labels)``); and given the
    next batch (``backward(..., following)``), the worker starts that batch's
    forward pass while this process still updates the parameters, each layer
    as soon as its own are updated. Measured on 2 cores, interleaved with the
    step without them: LeNet batch 64 0.90-0.99 of the time (four runs, median
    0.97), batch 256 0.96; with batch norm and dropout (whose sums make the
    worker wait for this process anyway) 0.97-0.98.
    """

    #: The network may hand :meth:`backward` the next batch (see ``following``).
    runs_ahead = True

    def __init__(self, worker, layers, pieces):
        self.worker = worker
        self.layers = layers
        self.pieces = pieces
        self.output = None
        self._replicas = None
        self._shape = None
        self._with_labels = False  # the forward pass was given labels (see forward)

    def forward(self, tensor, labels=None):
        """Both pieces through the layers at once; returns the joined outputs.

        ``labels`` (one-hot, the whole batch's): the last layer is a SoftMax
        whose output goes into a cross-entropy loss, and the backward pass
        follows with that loss's gradient (the worker computes its rows').
        """
        try:
            return self._forward(tensor, labels)
        except BaseException:
            self.worker.close()  # the pieces may have stopped at different places
            raise

    def backward(self, error_tensor, stop, following=None):
        """Send ``error_tensor`` back down through ``layers[:stop]`` in both pieces; step once.

        ``following``: ``(input, labels)`` of the next training batch; the
        worker starts on it while the parameters are updated (when it has this
        batch's shape).
        """
        try:
            self._backward(error_tensor, stop, following)
        except BaseException:
            self.worker.close()
            raise

    def _forward(self, tensor, labels):
        (first, middle), (_, last) = self.pieces
        ops = self.layers[0].backend.ops
        self._shape = tuple(tensor.shape)
        self._with_labels = labels is not None
        if self.worker.ahead_input is not None:  # started by the last pass's backward, on this batch
            self.worker.ahead_input = None
        else:
            self.worker.start_forward(self.layers, tensor[middle:last, ...], (middle, last),
                                      last - first, *self._speculation(labels))
        self._replicas = [replica_in(ProcessSlot(self.worker, 0, (first, middle), last - first), layer)
                          for layer in self.layers]
        piece = tensor[first:middle, ...]
        with ops.one_part():
            try:
                piece = forward_chain(self._replicas, piece)
            except ValueError as error:  # (one the worker sent came noted with its own rows)
                note_piece(error, (first, middle), last - first)
                raise
        other = self.worker.receive("done")
        self.output = ops.join_samples([piece, ops.backend.asarray(other)])
        for index, layer in enumerate(self.layers):
            layer.take_forward_state([self._replicas[index]])
        return self.output

    def _speculation(self, labels):
        """``(labels, stop)`` of the worker's rows for a backward pass it starts by itself."""
        if labels is None:
            return None, None
        middle, last = self.pieces[1]
        return to_numpy(labels)[middle:last, ...], len(self.layers) - 1  # (down to below the SoftMax)

    def _backward(self, error_tensor, stop, following):
        (first, middle), (_, last) = self.pieces
        ops = self.layers[0].backend.ops
        if not self.worker.owes_backward:
            self.worker.start_backward(error_tensor[middle:last, ...], stop)
        elif stop != len(self.layers) - 1:
            raise RuntimeError("piece worker: its backward pass went down from another layer")
        with ops.one_part():
            try:
                backward_chain(self._replicas[:stop], error_tensor[first:middle, ...])
            except ValueError as error:
                note_piece(error, (first, middle), last - first)
                raise
        self.worker.receive("done")
        self.worker.owes_backward = False
        delegated = self.worker.updates.active(self.layers, stop)
        for index in delegated:  # first: the worker steps them while this process steps the others
            self.layers[index].sum_gradients(self._pieces_gradients(index))
        if delegated:
            self.worker.start_update(self.layers, delegated)
        ahead = following is not None and tuple(getattr(following[0], "shape", ())) == self._shape
        if ahead:
            tensor = ops.backend.asarray(following[0], dtype=ops.backend.dtype)
            self.worker.start_forward(self.layers, tensor[middle:last, ...], (middle, last), last - first,
                                      *self._speculation(following[1] if self._with_labels else None),
                                      ahead_input=following[0],
                                      ahead_labels=following[1])
        try:
            for index, layer in enumerate(self.layers[:stop]):
                if layer.trainable and index not in delegated:
                    layer.take_gradients(self._pieces_gradients(index))
                if layer.trainable and ahead:
                    self.worker.publish(self.layers, index, copy=index not in delegated)
        finally:  # (also after a failure here: the delegated layers' steps are counted already)
            if delegated:
                self.worker.finish_update(self.layers, delegated)

    def _pieces_gradients(self, index):
        """What ``take_gradients`` of layer ``index`` sums: this process's replica, the worker's."""
        return [self._replicas[index], _Gradients(self.worker.gradients(index))]


class _Gradients:
    """Stands in for the worker's replica in ``take_gradients``: its gradients only."""

    def __init__(self, gradients):
        self.__dict__.update(gradients)
