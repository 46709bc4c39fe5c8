"""Data-parallel training passes: a batch cut into pieces that go through the layers at once.

A backend's ``ops.training_pieces(shape)`` says how a training batch is cut (the
generic :class:`xpnn.ops.Ops` never cuts; the NumPy backend gives each thread a
piece of a large batch). When every layer of a network treats each sample on
its own or takes part as below (``layer.runs_in_pieces``; False, the default,
for a user's own layer keeps the network whole), each piece goes through replicas of the
layers (shallow copies with their own forward caches, see
:meth:`xpnn.layers.base.BaseLayer.replica`), the pieces at the same time
(``ops.run_pieces``), and their outputs are joined into the prediction.

Backward sends each piece's error back through its replicas. The loss is a sum
over samples, so a trainable layer's gradient is the sum of its replicas'
gradients; the layer's own optimizer applies it once
(:meth:`xpnn.layers.base.TrainableLayer.take_gradients`). The values are those
of a pass in one piece up to the order of floating-point sums.

Layers that couple the samples of a batch take part through the
:class:`PieceSlot` a replica gets as ``replica.piece``: batch normalization sums
its statistics (and its gradient's means) over the pieces with
:meth:`PieceSlot.all_sum`, so they are the whole batch's; dropout draws one mask
for the whole batch with :meth:`PieceSlot.shared` and uses its rows, so the
random stream is the one of a pass in one piece. ``all_sum`` waits for every
piece: the pieces must run at the same time (``ops.run_pieces`` on the NumPy
backend, one thread per piece). Measured (LeNet with batch norm and dropout,
batch 256, 2 threads): 0.88x the time of splitting each operation, where running
only the layers between batch norm and dropout in pieces and those two whole
(joining and cutting the batch around them) was 1.03-1.05x.
"""
import functools
import threading

#: Seconds a piece waits for the others in :meth:`PieceSlot.all_sum` before giving up
#: (they run at the same time; a piece that never comes means pieces run one by one).
WAIT_SECONDS = 600.0


def backward_chain(layers, error_tensor):
    """Send ``error_tensor`` back down through ``layers`` (last first).

    Nothing below the first layer needs its input gradient, so it runs with
    ``skip_input_gradient`` set and may skip that work.
    """
    for layer in reversed(layers[1:]):
        error_tensor = layer.backward(error_tensor)
    if layers:
        first = layers[0]
        first.skip_input_gradient = True
        try:
            first.backward(error_tensor)
        finally:
            first.skip_input_gradient = False


def note_piece(error, bounds, batch_size):
    """Say in a ValueError's message that it came from the rows ``bounds`` of a batch of ``batch_size``.

    A layer's shape error names the shape it received, whose first entry is
    then its piece's rows, not the batch's (a batch of 128 wrong-size images
    read "received (64, 576)"). The same exception object, so its type and
    traceback, gets the note appended to its message once (a worker's error
    arrives noted already); other exceptions, and a piece that is the whole
    batch, are left as they are. ``bounds`` is ``(first, last)``; ``first``
    None where only the piece's size is known. Returns ``error``.
    """
    first, last = bounds
    rows = last - (first or 0)
    if (isinstance(error, ValueError) and rows != batch_size and error.args
            and isinstance(error.args[0], str) and not getattr(error, "xpnn_piece_noted", False)):
        where = f"{rows} rows" if first is None else f"rows {first} to {last - 1}"
        error.args = (f"{error.args[0]} (while running {where} of a batch of {batch_size} "
                      f"in parallel pieces)", *error.args[1:])
        error.xpnn_piece_noted = True  # (an attribute survives the pickling from a worker)
    return error


def note_layer_position(error, position):
    """Record on a ValueError the ``position`` (in the list the pass ran: the run order, or its
    replicas for a pass in pieces, which keep the positions) of the layer whose forward raised
    it, for the network to name the layer (:func:`xpnn.network_rules.note_layer`). Called only
    on the error path; the first record stays. Returns ``error``."""
    if isinstance(error, ValueError) and getattr(error, "xpnn_layer_position", None) is None:
        error.xpnn_layer_position = position
    return error


def forward_chain(layers, tensor):
    """Every layer's ``forward`` in turn on ``tensor``; a ValueError records which position
    raised it (:func:`note_layer_position`)."""
    position = None
    try:
        for position, layer in enumerate(layers):
            tensor = layer.forward(tensor)
    except ValueError as error:
        note_layer_position(error, position)
        raise
    return tensor


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

    #: Threads do not run ahead: ``labels`` and ``following`` (see
    #: :class:`xpnn.ops.numpy_processes.ProcessPass`) are not used here.
    runs_ahead = False

    def __init__(self, layers, pieces):
        self.layers = layers
        self.pieces = pieces
        self.output = None
        self._groups = [PieceGroup(pieces) for _ in layers]
        self._replicas = [[replica_in(PieceSlot(group, index), layer)
                           for layer, group in zip(layers, self._groups)]
                          for index in range(len(pieces))]

    def forward(self, tensor, labels=None):
        """Run every layer on ``tensor`` (the whole batch); returns the joined outputs."""
        def run(piece_index):
            first, last = self.pieces[piece_index]
            return forward_chain(self._replicas[piece_index], tensor[first:last, ...])

        self.output = self._ops().join_samples(self._run(run))
        for index, layer in enumerate(self.layers):
            layer.take_forward_state([replicas[index] for replicas in self._replicas])
        return self.output

    def backward(self, error_tensor, stop, following=None):
        """Send ``error_tensor`` (of layer ``stop - 1``'s output) back down through ``layers[:stop]``.

        The first layer skips its input gradient, as in :meth:`xpnn.NeuralNetwork.backward`;
        then every trainable layer takes the sum of its replicas' gradients.
        """
        def run(piece_index):
            first, last = self.pieces[piece_index]
            backward_chain(self._replicas[piece_index][:stop], error_tensor[first:last, ...])

        self._run(run)
        for index, layer in enumerate(self.layers[:stop]):
            if layer.trainable:
                layer.take_gradients([replicas[index] for replicas in self._replicas])

    def _run(self, task):
        """``ops.run_pieces(task)``; a piece that fails releases the others from their waits.

        The error raised is the failing piece's own, not the others' broken waits
        (a ValueError says which rows of the batch it came from: :func:`note_piece`).
        """
        def guarded(piece_index):
            try:
                return True, task(piece_index)
            except BaseException as error:  # re-raised below, once every piece has returned
                for group in self._groups:
                    group.abort()
                batch_size = self.pieces[-1][1] - self.pieces[0][0]
                return False, note_piece(error, self.pieces[piece_index], batch_size)

        outcomes = self._ops().run_pieces(guarded, len(self.pieces))
        errors = [value for succeeded, value in outcomes if not succeeded]
        if errors:
            raise next((error for error in errors
                        if not isinstance(error, threading.BrokenBarrierError)), errors[0])
        return [value for _, value in outcomes]

    def _ops(self):
        return self.layers[0].backend.ops


def replica_in(slot, layer):
    """``layer.replica()`` with ``slot`` as its ``piece``."""
    twin = layer.replica()
    twin.piece = slot
    return twin


class PieceGroup:
    """What the replicas of one layer share while their pieces run at the same time."""

    def __init__(self, pieces):
        self.pieces = pieces
        self.batch_size = pieces[-1][1] - pieces[0][0]
        # Two sets of slots, used in turn: a piece may start the next sum while
        # another still reads the last one.
        self._slots = ([None] * len(pieces), [None] * len(pieces))
        self._lock = threading.Lock()
        self._shared = {}
        self._barrier = None  # made by the first sum: most layers never need one
        self._aborted = False

    def sum(self, index, call, values):
        """Piece ``index``'s ``values`` for its sum number ``call``: once every piece has
        given its own, each value summed over the pieces (in piece order, so every piece
        gets bit-identical sums)."""
        slots = self._slots[call % 2]
        slots[index] = values
        self._barrier_made().wait()
        return tuple(functools.reduce(lambda left, right: left + right, terms)
                     for terms in zip(*slots))

    def shared(self, key, make):
        """``make()`` called by the first piece that asks for ``key``; every piece gets that value."""
        with self._lock:
            if key not in self._shared:
                self._shared[key] = make()
            return self._shared[key]

    def _barrier_made(self):
        """The barrier the pieces meet at (made on first use; broken once aborted)."""
        with self._lock:
            if self._barrier is None:
                self._barrier = threading.Barrier(len(self.pieces), timeout=WAIT_SECONDS)
                if self._aborted:
                    self._barrier.abort()
            return self._barrier

    def abort(self):
        """Release every piece waiting at (or later coming to) the barrier with BrokenBarrierError."""
        with self._lock:
            self._aborted = True
            if self._barrier is not None:
                self._barrier.abort()


class PieceSlot:
    """One replica's place in its :class:`PieceGroup` (``replica.piece``).

    Attributes
    ----------
    bounds : (start, stop)
        The replica's rows of the whole batch.
    batch_size : int
        Samples in the whole batch.
    """

    def __init__(self, group, index):
        self._group = group
        self._index = index
        self._calls = 0
        self.bounds = group.pieces[index]
        self.batch_size = group.batch_size

    def all_sum(self, *values):
        """Each of ``values`` summed over every piece (every piece must call this in turn)."""
        self._calls += 1
        return self._group.sum(self._index, self._calls, values)

    def shared(self, key, make):
        """``make()`` called by the first piece that asks for ``key``; every piece gets that value."""
        return self._group.shared(key, make)
