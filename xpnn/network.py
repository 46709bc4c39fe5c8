"""The network container (course API); its pickle save/load (xpnn.network_files) and rules
(xpnn.network_rules) are importable from here too."""
import copy
import functools

from xpnn.backend import Backend, get_backend, make_backend
from xpnn.layers.activations import SoftMax
from xpnn.losses import CrossEntropyLoss
from xpnn.network_files import load, save
from xpnn.network_rules import (NO_DATA_LAYER, NO_LOSS_LAYER, check_batch, check_layer, note_layer,
                                run_order, running_statistics_kept_on_error, runs_in_pieces)
from xpnn.piecewise import PiecewisePass, backward_chain, forward_chain, note_piece

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
        self._piecewise = None  # the last training forward's PiecewisePass, if it ran in pieces
        self._worker = None  # the backend's worker process for passes in processes, once started
        self._in_train = False  # inside train(): a backward pass follows every forward pass
        self._ahead = False  # inside train(), and another step follows this one
        self._next_batch = None  # the next batch, when train() took it early (see backward)
        self._given_next = None  # the next batch, as train_batch was given it
        self._started_for_caller = False  # the worker runs ahead on a batch train_batch was given

    def __getstate__(self):
        # A pass in pieces holds replicas and their caches, a worker is a process: not the model.
        # Nor is the data layer (the course's rule: its data sets hold generators, which do not
        # pickle); load(filename, data_layer) sets one. A deep copy keeps it (__deepcopy__).
        return {**self.__dict__, "_piecewise": None, "_worker": None, "_order": None,
                "_next_batch": None, "_given_next": None, "_in_train": False, "_ahead": False,
                "_started_for_caller": False, "data_layer": None}

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
        self.__dict__.update(state)
        self.__dict__.setdefault("_piecewise", None)  # pickled before passes in pieces existed
        self.__dict__.setdefault("_worker", None)
        self.__dict__.setdefault("_order", None)
        self.__dict__.setdefault("pool_before_relu", True)
        self.__dict__.setdefault("_next_batch", None)
        self.__dict__.setdefault("_given_next", None)
        for name in ("_in_train", "_ahead", "_started_for_caller"):
            self.__dict__.setdefault(name, False)

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

    def _run_layers(self, input_tensor, labels=None):
        """Every layer's forward in turn (in :func:`run_order`); in training, on pieces of the
        batch where the backend cuts it (``labels``: see :meth:`_labels_ahead`). A layer's
        ValueError (a shape error) says which layer of the network raised it; a layer refusing
        the batch leaves every running statistic as it was."""
        try:
            with running_statistics_kept_on_error(self.layers):
                return self._run_layers_unnoted(input_tensor, labels)
        except ValueError as error:
            note_layer(error, self.layers, self._order, input_tensor)
            raise

    def _run_layers_unnoted(self, input_tensor, labels=None):
        """:meth:`_run_layers` without the note of the layer on an error (see :meth:`test`)."""
        layers = self._order = run_order(self.layers) if self.pool_before_relu else list(self.layers)
        if not self._testing_phase:  # (testing runs its own pieces, on helper threads: see test)
            pass_in_pieces = self._piecewise_pass(input_tensor, layers)
            if pass_in_pieces is not None:
                # The last pass (its replicas' caches) goes only once this one has run: freed
                # first, its memory went back to the system and the new arrays paid page faults.
                tensor = self.backend.asarray(input_tensor, dtype=self.backend.dtype)
                output = pass_in_pieces.forward(tensor, labels)
                self._piecewise = pass_in_pieces
                return output
            self._piecewise = None
        return forward_chain(layers, input_tensor)

    def _piecewise_pass(self, input_tensor, layers):
        """A pass over pieces of the batch through ``layers`` (in run order) when the backend
        cuts this batch (in processes, else on threads: :class:`~xpnn.piecewise.PiecewisePass`),
        else None."""
        shape = getattr(input_tensor, "shape", None)
        if not shape or not layers or not all(runs_in_pieces(layer) for layer in layers):
            return None
        ahead_input = None if self._worker is None else self._worker.ahead_input
        if ahead_input is not None and (ahead_input is not input_tensor or (
                self._started_for_caller and not self._worker.ahead_matches(
                    input_tensor, self._labels_ahead(), layers))):
            # It runs ahead on a batch this pass is not for, or (started by train_batch, whose
            # caller may have changed the network since) with settings or parameters gone stale.
            self._worker.close()
            self._worker = None
        ops = self.backend.ops
        pass_in_processes, self._worker = ops.process_pass(layers, tuple(shape), self._worker)
        if pass_in_processes is not None:
            return pass_in_processes
        pieces = ops.training_pieces(tuple(shape))
        return PiecewisePass(layers, pieces) if len(pieces) > 1 else None

    def regularization_loss(self):
        """Sum of ``regularizer.norm(weights)`` over trainable layers (0 without one)."""
        total = 0.0
        for layer in self.layers:
            regularizer = getattr(layer.optimizer, "regularizer", None) if layer.trainable else None
            if regularizer is not None:
                total = total + regularizer.norm(layer.weights)
        return total

    def forward(self):
        """Pull the next batch, run every layer and the loss; return data + regularization loss."""
        if self.loss_layer is None:  # (before the batch taken early is used up)
            raise RuntimeError(NO_LOSS_LAYER.format("forward"))
        batch, self._next_batch = self._next_batch, None
        if isinstance(batch, _FailedBatch):
            raise batch.error  # where it would have been raised had it not been taken early
        if batch is None and self.data_layer is None:
            raise RuntimeError(NO_DATA_LAYER)
        input_tensor, self.label_tensor = batch if batch is not None else self.data_layer.next()
        check_batch(input_tensor, self.layers, "train" if self._in_train else "forward")
        prediction = self._run_layers(input_tensor, self._labels_ahead())
        return self.loss_layer.forward(prediction, self.label_tensor) + self.regularization_loss()

    def _labels_ahead(self):
        """The labels, for a pass in pieces to start each piece's backward pass by itself:
        inside :meth:`train` with a plain SoftMax last and a plain CrossEntropyLoss (the
        fused gradient of a row is that row's alone); else None."""
        if (self._in_train and self.layers and type(self.layers[-1]) is SoftMax
                and type(self.loss_layer) is CrossEntropyLoss):
            return self.label_tensor
        return None

    def _following(self):
        """Inside :meth:`train`, when another step follows and the pass can start on it
        while this one updates the parameters: the next batch, taken now (the next
        :meth:`forward` uses it); else None."""
        if not (self._ahead and self._piecewise.runs_ahead):
            return None
        if self._given_next is not None:  # (train_batch's)
            return self._given_next
        try:
            self._next_batch = self.data_layer.next()
        except Exception as error:  # raised by the next forward, as without taking it early
            self._next_batch = _FailedBatch(error)
            return None
        return self._next_batch

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
        if self._piecewise is not None:
            self._piecewise.backward(error_tensor, len(layers), self._following())
        else:
            backward_chain(layers, error_tensor)

    def _softmax_feeds_cross_entropy(self):
        """True when the last forward ran a plain SoftMax straight into a plain CrossEntropyLoss."""
        last = self.layers[-1] if self.layers else None
        if last is None or getattr(type(last), "backward", None) is not SoftMax.backward:
            return False
        prediction = last._saved if self._piecewise is None else self._piecewise.output
        return (type(self.loss_layer).backward is CrossEntropyLoss.backward
                and prediction is not None and prediction is self.loss_layer.prediction_tensor)

    def train(self, iterations):
        """Run ``iterations`` forward/backward passes in training phase, recording the loss.

        The data layer's ``next()`` is called once per iteration; a pass in a
        worker process (the NumPy backend on 2 cores) takes the next batch
        already during the backward pass, before the parameters are updated,
        and starts on it meanwhile.
        """
        self.phase = False
        self._started_for_caller = False  # (its next batch comes from the data layer)
        count = int(iterations)
        with self.backend.ops.compute_scope():
            try:
                for step in range(count):
                    self._in_train, self._ahead = True, step + 1 < count
                    self.loss.append(self.forward())
                    self.backward()
            finally:
                self._in_train = self._ahead = False

    def train_batch(self, input_tensor, label_tensor, following=None):
        """One training step on a batch of your own; returns ``(data loss, prediction)``.

        What an iteration of :meth:`train` does, for a loop that takes its
        batches itself (``xpnn-train``'s): the forward pass in training phase,
        the loss, the backward pass and the updates. The regularization loss
        is left out (it does not change the update: the optimizers apply its
        gradient). ``following``: the next batch ``(input, labels)`` when another
        step follows, to be passed to the next call as its batch (the same
        objects): a pass in a worker process starts on it while this one
        updates the parameters, as inside :meth:`train`. Changed in between
        (other labels, a layer's setting, a parameter array replaced), the
        next call drops that start and runs its batch afresh; a parameter
        changed in place (``layer.weights[...] = ...``) is not seen, so do
        that without ``following``.
        """
        if self.loss_layer is None:  # (before any state of the step is set)
            raise RuntimeError(NO_LOSS_LAYER.format("train_batch"))
        check_batch(input_tensor, self.layers, "train_batch")
        if self._testing_phase:  # (e.g. after test(): train() sets the training phase too)
            self.phase = False
        self._in_train, self._ahead, self._given_next = True, following is not None, following
        try:
            self.label_tensor = label_tensor
            prediction = self._run_layers(input_tensor, self._labels_ahead())
            self._started_for_caller = False
            loss = self.loss_layer.forward(prediction, label_tensor)
            self.backward()
            if following is not None and self._worker is not None and self._worker.ahead_input is not None:
                # Checked against the next call's network (see _piecewise_pass).
                self._worker.note_parameters(self._order or self.layers)
                self._started_for_caller = True
        finally:
            self._in_train = self._ahead = False
            self._given_next = None
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
            note_piece(error, (None, piece.shape[0]), batch_size)
            raise

    def to(self, backend, dtype=None):
        """Move every layer's parameters and optimizer state to ``backend``; returns self.

        A backend name keeps the network's dtype unless ``dtype`` is given; a
        Backend object is used with its own device and dtype.
        """
        if not isinstance(backend, Backend) and dtype is None:
            dtype = self.backend.dtype_name
        target = make_backend(backend, dtype)
        if self._worker is not None:  # its copies hold the old backend's arrays
            self._worker.close()
            self._worker = None
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


class _FailedBatch:
    """The data layer's failure to give the batch that :meth:`NeuralNetwork.train` took early."""

    def __init__(self, error):
        self.error = error
