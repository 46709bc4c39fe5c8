"""The worker process of a training pass cut in two (see :mod:`xpnn.ops.numpy_processes`).

:class:`PieceWorker` is both ends of the channel to a forked process holding
copies of the network's layers: this process hands over the parameters, the
worker's piece of the input and the commands; the worker runs its piece and
hands back its output and gradients; each replica in it has a
:class:`xpnn.ops.worker_process.ProcessSlot` (the process mechanics live there).
:func:`layers_key` says what a worker was made for; each pass the worker's
copies take the layers' public settings (:func:`_settings`) and parameters.
"""
import multiprocessing
import os
import signal
import weakref

import numpy as np

from xpnn.backend import to_numpy
from xpnn.losses import CrossEntropyLoss
from xpnn.ops.delegated_updates import DelegatedUpdates
from xpnn.ops.shared_memory import MessageRing, SharedArrays, wait_until
from xpnn.ops.worker_process import (LIVE_WORKERS, ProcessSlot, keep_freed_memory, next_command,
                                     picklable, stop_worker)
from xpnn.piecewise import backward_chain, note_layer_position, note_piece, replica_in

#: Seconds this process waits for the worker's answer before giving up.
WAIT_SECONDS = 600.0
_SCALARS = (bool, int, float, str, type(None))
_PLAIN = frozenset(_SCALARS)


def layers_key(layers, piece_shape, dtype):
    """What a worker was made for: these layers, their parameters' shapes, the piece's shape."""
    shapes = tuple((name, tuple(array.shape)) for name, array in _parameters(layers))
    return tuple(id(layer) for layer in layers), shapes, tuple(piece_shape), str(dtype)


def _settings(layers):
    """Every layer's public attributes that are numbers, strings, None or tuples of those: its
    settings (e.g. a dropout probability), which the worker's copies take before each pass."""
    # (The exact types first: 36 instead of 52 µs for LeNet's 21 layers, each pass.)
    return [{name: value for name, value in vars(layer).items()
             if name[:1] != "_" and (type(value) in _PLAIN or _is_setting(value))} for layer in layers]


def _is_setting(value):
    """A number, string, None, or a tuple of those (e.g. a stride): not an array or object."""
    if isinstance(value, tuple):
        return all(isinstance(entry, _SCALARS) for entry in value)
    return isinstance(value, _SCALARS)


def _parameters(layers):
    """``(name, array)`` of every parameter that has a gradient: ``weights``/``bias`` per layer.

    A frozen layer's (``trainable`` False) too: the worker's copies read them
    every pass, so that parameters assigned to it after the fork reach them.
    """
    found = []
    for index, layer in enumerate(layers):
        gradient_names = getattr(layer, "gradient_names", ())
        for name in ("weights", "bias"):
            if getattr(layer, name, None) is not None and "gradient_" + name in gradient_names:
                found.append(((index, name), getattr(layer, name)))
    return found


class PieceWorker:
    """A forked process with copies of ``layers`` that runs piece 1 of each training pass.

    Parameters
    ----------
    layers : list
        The network's layers (all ``runs_in_pieces``).
    piece_shape : tuple
        Shape of the worker's piece of the input.
    dtype : dtype
        The backend's float dtype (shared arrays).
    """

    def __init__(self, layers, piece_shape, dtype):
        self.key = layers_key(layers, piece_shape, dtype)
        names = [name for name, _ in _parameters(layers)]
        shapes = [tuple(array.shape) for _, array in _parameters(layers)]
        self._parameters = SharedArrays(shapes, dtype).arrays
        self._gradients = SharedArrays(shapes, dtype).arrays
        # Per layer: (name, shared parameter, shared gradient) of each of its parameters.
        self._of_layer = {}
        for (index, name), parameter, gradient in zip(names, self._parameters, self._gradients):
            self._of_layer.setdefault(index, []).append((name, parameter, gradient))
        self._input = SharedArrays([piece_shape], dtype).arrays[0]
        # Per layer: the number of the last forward pass whose parameters it holds (see publish).
        self._ready = SharedArrays([(len(layers),)], np.int64).arrays[0]
        #: The layers whose optimizer steps this worker runs (see :mod:`xpnn.ops.delegated_updates`).
        self.updates = DelegatedUpdates(layers, _parameters(layers), dtype)
        self._passes = 0
        #: The input (as the data layer gave it) of the batch the worker runs a forward pass
        #: on ahead of this process (see :meth:`start_forward`), else None.
        self.ahead_input = None
        # What that pass was started with: labels, settings, and (see note_parameters) the
        # parameter arrays once updated; compared by ahead_matches.
        self._ahead_with = None
        #: True from a start with labels (the worker goes on into its backward pass by
        #: itself) until this process has taken that backward pass's answer.
        self.owes_backward = False
        self._to_worker, self._to_main = MessageRing(), MessageRing()
        self._in_worker = False
        self._parent = os.getpid()
        context = multiprocessing.get_context("fork")
        self._connection, worker_end = context.Pipe()
        self._process = context.Process(target=self._serve, args=(worker_end, layers),
                                        name="xpnn-piece-worker", daemon=True)
        self._process.start()
        LIVE_WORKERS.add(self._process)
        worker_end.close()
        self._finalizer = weakref.finalize(self, stop_worker, self._process, self._connection, self._parent)

    @property
    def pid(self):
        """The worker process's id."""
        return self._process.pid

    @property
    def alive(self):
        # (Not in a child the user forked: the worker is its parent's, not its own.)
        return os.getpid() == self._parent and self._finalizer.alive and self._process.is_alive()

    def close(self):
        """End the worker process (also done when this object is collected or Python exits)."""
        self._finalizer()

    # -- this process's side -------------------------------------------------------
    def start_forward(self, layers, piece, bounds, batch_size, labels=None, stop=None,
                      ahead_input=None, ahead_labels=None):
        """Hand the worker's ``piece`` over (and the parameters); it starts its forward pass.

        With ``labels`` (its rows of the one-hot labels) the worker goes on
        into its backward pass without waiting for the error: the gradient of
        SoftMax + cross-entropy of a row is that row's alone (the same values
        :meth:`xpnn.losses.CrossEntropyLoss.backward_through_softmax` gives),
        down through ``layers[:stop]``. With ``ahead_input`` (the batch's input as
        the data layer gave it, of which ``piece`` is the worker's rows) the
        parameters are not handed over now: this process is still updating
        them, and :meth:`publish` hands over each layer's as soon as it is
        updated; the worker waits for them layer by layer.
        """
        self._passes += 1
        if ahead_input is None:
            for shared, (_, array) in zip(self._parameters, _parameters(layers)):
                shared[...] = array
            self._ready[...] = self._passes
        self._input[...] = piece
        self.ahead_input, self.owes_backward = ahead_input, labels is not None
        settings = _settings(layers)
        self._ahead_with = None if ahead_input is None else [ahead_labels, settings, None]
        self._connection.send(("forward", bounds, batch_size, settings, self._passes,
                               None if labels is None else np.asarray(labels), stop))

    def note_parameters(self, layers):
        """Remember the layers' parameter arrays, updated for the pass started ahead."""
        if self._ahead_with is not None:
            self._ahead_with[2] = [array for _, array in _parameters(layers)]

    def ahead_matches(self, input_tensor, labels, layers):
        """True when the pass started ahead is this step's: on ``input_tensor`` (the object it
        was started with); on labels of the same values if it went into its backward pass by
        itself with them, and only if this step's pass would (``labels`` not None: see
        :meth:`xpnn.NeuralNetwork._labels_ahead`); with the layers' settings and parameter
        arrays as they were then (:meth:`note_parameters`). A parameter changed in place is
        not seen."""
        if self._ahead_with is None or input_tensor is not self.ahead_input:
            return False
        started_labels, settings, parameters = self._ahead_with
        if (labels is not None) != self.owes_backward:  # e.g. another loss layer since
            return False
        if self.owes_backward and labels is not started_labels and not np.array_equal(
                to_numpy(labels), to_numpy(started_labels)):
            return False
        if parameters is None or _settings(layers) != settings:
            return False
        now = [array for _, array in _parameters(layers)]
        return len(now) == len(parameters) and all(a is b for a, b in zip(now, parameters))

    def publish(self, layers, index, copy=True):
        """Hand over layer ``index``'s parameters for the forward pass started ahead
        (``copy=False``: the worker updated them itself, see :meth:`start_update`)."""
        if copy:
            for name, shared, _ in self._of_layer.get(index, ()):
                shared[...] = getattr(layers[index], name)
        self._ready[index] = self._passes

    def start_update(self, layers, indices):
        """The worker runs the optimizer steps of layers ``indices`` (their gradients summed:
        :meth:`DelegatedUpdates.hand_over`) before its next command."""
        self._connection.send(("update", self.updates.hand_over(layers, indices)))

    def finish_update(self, layers, indices):
        """Wait for the steps of :meth:`start_update`; the layers take their updated parameters."""
        self.receive("updated")
        self.updates.take_back(layers, indices, self._parameters)

    def start_backward(self, error, stop):
        """Hand the worker its piece of the error of layer ``stop - 1``'s output."""
        self._connection.send(("backward", np.ascontiguousarray(error), stop))

    def gradients(self, index):
        """The worker's gradients of layer ``index`` after a backward pass, by name."""
        return {"gradient_" + name: gradient for name, _, gradient in self._of_layer.get(index, ())}

    def send(self, kind, value):
        """A message to the other process of the pass (from either side)."""
        ring = self._to_main if self._in_worker else self._to_worker
        ring.post((kind, value), self._connection, self._other_alive, WAIT_SECONDS)

    def receive(self, expected):
        """The other process's next message, which must be of kind ``expected``.

        A failure the worker reports is raised here (in this process).
        """
        ring = self._to_worker if self._in_worker else self._to_main
        try:
            kind, value = ring.take(self._connection, self._other_alive, WAIT_SECONDS)
        except (EOFError, OSError):
            raise RuntimeError("the piece worker process ended unexpectedly") from None
        if kind == "error":
            raise value
        if kind != expected:
            raise RuntimeError(f"piece worker: {kind!r} came where {expected!r} was due")
        return value

    def _other_alive(self):
        if self._in_worker:
            return os.getppid() == self._parent
        return self._process.is_alive()

    # -- the worker's side (in the forked process) ----------------------------------
    def _serve(self, connection, layers):
        # Ctrl-C reaches the whole process group: this process's owner handles it (and ends us).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        keep_freed_memory()
        self._connection.close()  # this process's copy of the other end: EOF once that one goes
        self._connection, self._in_worker = connection, True
        ops = layers[0].backend.ops
        replicas, piece = None, ((0, 0), 0)
        with ops.one_part():
            while True:
                try:
                    message = next_command(connection)
                except (EOFError, OSError):
                    return
                try:
                    if message[0] == "forward":
                        piece = message[1:3]  # (bounds, batch size) for a note on its errors
                        # (The last pass's replicas go only once this one has made its own
                        # caches: freed first, their memory went back to the system and
                        # every new array paid its page faults again.)
                        replicas = self._forward(layers, *message[1:5])
                        self.send("done", self._output)
                        labels, stop = message[5:7]
                        if labels is not None:
                            self._backward(replicas, _fused_error(self._output, labels), stop)
                    elif message[0] == "backward":
                        self._backward(replicas, message[1], message[2])
                    elif message[0] == "update":
                        self.updates.run(message[1], ops, self._parameters)
                        self.send("updated", None)
                    else:
                        return
                except BaseException as error:  # handed over; this worker's state is now unknown
                    if message[0] in ("forward", "backward"):
                        note_piece(error, *piece)
                    self.send("error", picklable(error))
                    return

    def _forward(self, layers, bounds, batch_size, settings, number):
        """Take the settings, run the worker's piece through the shared parameters (each
        layer's once it holds those of pass ``number``); returns the replicas."""
        for layer, values in zip(layers, settings):
            vars(layer).update(values)
        for index, entries in self._of_layer.items():
            for name, parameter, _ in entries:
                setattr(layers[index], name, parameter)
        replicas = [replica_in(ProcessSlot(self, 1, bounds, batch_size), layer) for layer in layers]
        piece = np.array(self._input)
        index = None
        try:
            for index, replica in enumerate(replicas):
                if replica.trainable:
                    wait_until(lambda: int(self._ready[index]) >= number, self._other_alive, WAIT_SECONDS)
                piece = replica.forward(piece)
        except ValueError as error:  # (the network names the layer: note_layer_position)
            note_layer_position(error, index)
            raise
        self._output = piece
        return replicas

    def _backward(self, replicas, error, stop):
        backward_chain(replicas[:stop], error)
        self._put_gradients(replicas)
        self.send("done", None)

    def _put_gradients(self, replicas):
        for index, entries in self._of_layer.items():
            if not replicas[index].trainable:  # frozen: no step takes its gradients
                continue
            for name, _, shared in entries:
                shared[...] = getattr(replicas[index], "gradient_" + name)


def _fused_error(output, labels):
    """The gradient of cross-entropy through SoftMax for these rows (``output``: their SoftMax)."""
    loss = CrossEntropyLoss()
    loss.forward(output, labels)
    return loss.backward_through_softmax(labels)
