"""The network container (course API); its pickle save/load (xpnn.network_files) and rules
(xpnn.network_rules) are importable from here too."""
import copy
import functools

from xpnn.backend import Backend, get_backend, make_backend
from xpnn.layers.activations import SoftMax
from xpnn.losses import CrossEntropyLoss
from xpnn.network_files import load, save
from xpnn.network_rules import (NO_DATA_LAYER, NO_LOSS_LAYER, backward_chain, check_batch,
                                check_layer, forward_chain, note_layer, note_piece, run_order,
                                running_statistics_kept_on_error, runs_in_pieces)

__all__ = ["NeuralNetwork", "load", "run_order", "save"]


class NeuralNetwork:
    """A stack of layers trained with one optimizer, loss layer and data layer.

    Parameters
    ----------
    optimizer : xpnn.optimizers.Optimizer
        Every trainable layer gets its own deep copy (state is per layer).
    weights_initializer, bias_initializer : initializer, optional
        Used by ``append_layer`` to initialize trainable layers. Both or
        neither: without (the course's first exercise) layers keep the weights
        they were made with (uniform on [0, 1)).

    Attributes
    ----------
    layers : list
    loss : list
        One entry per training iteration: data loss plus regularization loss,
        kept as a 0-d array of the layers' backend (no host-device sync while
        training; ``np.sum(net.loss)`` works on the NumPy backend).
    data_layer : object
        Anything whose ``next()`` returns ``(input_tensor, one_hot_labels)``.
    loss_layer : object
        E.g. :class:`xpnn.losses.CrossEntropyLoss`.
    pool_before_relu : bool
        True (default): a ReLU right before a max pooling runs after it, on a
        quarter of the values (see :func:`run_order`); False runs the layers
        exactly as appended.
    """

    def __init__(self, optimizer, weights_initializer=None, bias_initializer=None):
        self.optimizer = optimizer
        if (weights_initializer is None) != (bias_initializer is None):
            raise ValueError("NeuralNetwork: give both a weights and a bias initializer, or "
                             "neither (the layers then keep the weights they were made with)")
        self.weights_initializer = weights_initializer
        self.bias_initializer = bias_initializer
        self.layers = []
        self.loss = []
        self.data_layer = None
        self.loss_layer = None
        self.label_tensor = None
        self.pool_before_relu = True
        self._testing_phase = False
        self._order = None  # the layers in the order the last forward ran them

    def __getstate__(self):
        # Not the data layer (the course's rule: its data sets hold generators, which do not
        # pickle); load(filename, data_layer) sets one. A deep copy keeps it (__deepcopy__).
        return {**self.__dict__, "_order": None, "data_layer": None}

    def __copy__(self):
        twin = object.__new__(type(self))
        twin.__setstate__({**self.__getstate__(), "data_layer": self.data_layer})
        return twin

    def __deepcopy__(self, memo):
        twin = object.__new__(type(self))
        memo[id(self)] = twin
        twin.__setstate__(copy.deepcopy({**self.__getstate__(), "data_layer": self.data_layer}, memo))
        return twin

    def __setstate__(self, state):
        # (Networks pickled by older versions carry the state of a parallel engine since removed.)
        obsolete = ("_piecewise", "_worker", "_in_train", "_ahead", "_next_batch", "_given_next",
                    "_started_for_caller")
        self.__dict__.update({name: value for name, value in state.items() if name not in obsolete})
        self.__dict__.setdefault("_order", None)
        self.__dict__.setdefault("pool_before_relu", True)

    @property
    def phase(self):
        """False while training, True in testing phase; setting it reaches every layer."""
        return self._testing_phase

    @phase.setter
    def phase(self, testing_phase):
        if isinstance(testing_phase, str):  # bool("train") is True: the testing phase
            raise TypeError(f"NeuralNetwork.phase is a bool (True: testing phase, False: "
                            f"training), not the string {testing_phase!r}")
        self._testing_phase = bool(testing_phase)
        for layer in self.layers:
            layer.testing_phase = self._testing_phase

    def append_layer(self, layer):
        """Add ``layer``; a trainable one gets a copy of the optimizer and is initialized (when
        the network has initializers: built without, as in the course's first exercise, its
        layers keep the weights they were made with)."""
        check_layer(layer)
        if layer.trainable:
            layer.optimizer = copy.deepcopy(self.optimizer)
            if self.weights_initializer is not None or self.bias_initializer is not None:
                layer.initialize(self.weights_initializer, self.bias_initializer)
        layer.testing_phase = self._testing_phase
        self.layers.append(layer)

    def _run_layers(self, input_tensor):
        """Every layer's forward in turn (in :func:`run_order`); a layer's ValueError (a shape
        error) says which layer of the network raised it; a layer refusing the batch leaves
        every running statistic as it was."""
        try:
            with running_statistics_kept_on_error(self.layers):
                return self._run_layers_unnoted(input_tensor)
        except ValueError as error:
            note_layer(error, self.layers, self._order, input_tensor)
            raise

    def _run_layers_unnoted(self, input_tensor):
        """:meth:`_run_layers` without the note of the layer on an error (see :meth:`test`)."""
        layers = self._order = run_order(self.layers) if self.pool_before_relu else list(self.layers)
        return forward_chain(layers, input_tensor)

    def regularization_loss(self):
        """Sum of ``regularizer.norm(weights)`` over trainable layers (0 without one).

        The backend adds the norms (:meth:`xpnn.ops.Ops.total`: one reduction where
        they are its arrays). A layer whose optimizer steps more than its ``weights`` (a
        recurrent layer's two fully connected parts) lists them in ``regularized_weights()``.
        """
        norms = []
        for layer in self.layers:
            regularizer = getattr(layer.optimizer, "regularizer", None) if layer.trainable else None
            if regularizer is None:
                continue
            parts = layer.regularized_weights() if hasattr(layer, "regularized_weights") else (
                layer.weights,)
            norms.extend(regularizer.norm(weights) for weights in parts)
        return self.backend.ops.total(norms)

    def forward(self):
        """Pull the next batch, run every layer and the loss; return data + regularization loss."""
        if self.loss_layer is None:
            raise RuntimeError(NO_LOSS_LAYER.format("forward"))
        if self.data_layer is None:
            raise RuntimeError(NO_DATA_LAYER)
        input_tensor, self.label_tensor = self.data_layer.next()
        check_batch(input_tensor, self.layers, "forward")
        prediction = self._run_layers(input_tensor)
        return self.loss_layer.forward(prediction, self.label_tensor) + self.regularization_loss()

    def backward(self):
        """Propagate the loss gradient down through every layer (updating parameters)."""
        # In the order the forward pass ran them, reversed (a SoftMax stays last: run_order).
        layers = self._order if self._order is not None else self.layers
        if self.loss_layer is None:
            raise RuntimeError(NO_LOSS_LAYER.format("backward"))
        if self.label_tensor is None:
            raise RuntimeError("NeuralNetwork.backward: there is no forward pass to go back through "
                               "(no labels yet): call net.forward() first, or net.train(iterations), "
                               "which runs forward and backward for each iteration")
        if self._softmax_feeds_cross_entropy():
            # One fused step instead of the loss's and the SoftMax's backward (same result).
            error_tensor = self.loss_layer.backward_through_softmax(self.label_tensor)
            layers = layers[:-1]
        else:
            error_tensor = self.loss_layer.backward(self.label_tensor)
        backward_chain(layers, error_tensor)

    def _softmax_feeds_cross_entropy(self):
        """True when the last forward ran a plain SoftMax straight into a plain CrossEntropyLoss."""
        last = self.layers[-1] if self.layers else None
        if last is None or getattr(type(last), "backward", None) is not SoftMax.backward:
            return False
        prediction = last._saved
        return (type(self.loss_layer).backward is CrossEntropyLoss.backward
                and prediction is not None and prediction is self.loss_layer.prediction_tensor)

    def train(self, iterations):
        """Run ``iterations`` forward/backward passes in training phase, recording the loss
        (data loss plus regularization loss, one entry per iteration)."""
        self.phase = False
        with self.backend.ops.compute_scope():
            for _ in range(int(iterations)):
                self.loss.append(self.forward())
                self.backward()

    def train_batch(self, input_tensor, label_tensor):
        """One training step on a batch of your own; returns ``(data loss, prediction)``.

        What an iteration of :meth:`train` does, for a loop that takes its
        batches itself (``xpnn-train``'s): the forward pass in training phase,
        the loss, the backward pass and the updates. The regularization loss
        is left out (it does not change the update: the optimizers apply its
        gradient).
        """
        if self.loss_layer is None:  # (before any state of the step is set)
            raise RuntimeError(NO_LOSS_LAYER.format("train_batch"))
        check_batch(input_tensor, self.layers, "train_batch")
        if self._testing_phase:  # (e.g. after test(): train() sets the training phase too)
            self.phase = False
        self.label_tensor = label_tensor
        prediction = self._run_layers(input_tensor)
        loss = self.loss_layer.forward(prediction, label_tensor)
        self.backward()
        return loss, prediction

    def test(self, input_tensor):
        """Run the layers in testing phase; returns the last layer's output (SoftMax)."""
        self.phase = True
        ops = self.backend.ops
        with ops.compute_scope():
            # Samples are independent in testing phase (batch norm uses its running
            # statistics), so a backend may run pieces of the batch at the same time.
            # The layers' backward caches then hold one piece's: test is not for training.
            input_tensor = self.backend.asarray(input_tensor, dtype=self.backend.dtype)
            check_batch(input_tensor, self.layers, "test")
            if not all(runs_in_pieces(layer) for layer in self.layers):
                return self._run_layers(input_tensor)  # a layer of your own: the whole batch
            try:
                return ops.map_samples(functools.partial(self._run_piece, input_tensor.shape[0]),
                                       input_tensor)
            except ValueError as error:
                note_layer(error, self.layers, self._order, input_tensor)
                raise

    def _run_piece(self, batch_size, piece):
        """:meth:`_run_layers_unnoted` on a piece of a batch of ``batch_size`` (see :meth:`test`);
        a ValueError (a layer's shape error) says so: its shapes are the piece's."""
        try:
            return self._run_layers_unnoted(piece)
        except ValueError as error:
            note_piece(error, piece.shape[0], batch_size)
            raise

    def to(self, backend, dtype=None):
        """Move every layer's parameters and optimizer state to ``backend``; returns self.

        A backend name keeps the network's dtype unless ``dtype`` is given; a
        Backend object is used with its own device and dtype.
        """
        if not isinstance(backend, Backend) and dtype is None:
            dtype = self.backend.dtype_name
        target = make_backend(backend, dtype)
        for layer in self.layers:
            if hasattr(layer, "to"):  # (a layer of your own without one keeps its arrays)
                layer.to(target)
        if self.loss_layer is not None and hasattr(self.loss_layer, "to"):
            self.loss_layer.to(target)
        # The losses recorded so far too: np.sum(net.loss) must work after a move to the cpu.
        self.loss = [value if isinstance(value, (int, float)) else target.asarray(value)
                     for value in self.loss]
        return self

    @property
    def backend(self):
        """The backend of the first layer that has one (xpnn's layers do; a course-style layer
        of your own need not), else the current backend."""
        for layer in self.layers:
            backend = getattr(layer, "backend", None)
            if isinstance(backend, Backend):
                return backend
        return get_backend()

