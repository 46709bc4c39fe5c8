"""What the recurrent layers (:class:`~xpnn.layers.RNN`, :class:`~xpnn.layers.LSTM`) share.

Both are built, as in the course, from the library's own layers: a hidden
:class:`~xpnn.layers.FullyConnected` part ``FC_h`` that maps ``[x_t, h_{t-1}]``
to the cell's pre-activations, and an output part ``y_t = sigmoid(FC_y(h_t))``.
The recurrence (one step after the other) is the subclass's; the output part is
the same for every step, so it runs once on the whole sequence, as do its
gradient and its update.

Shapes: the course's 2-D input ``(time, features)`` is one sequence whose
batch axis is its time axis; a 3-D input ``(time, batch, features)`` holds
``batch`` independent sequences, run at once.
"""
import copy

from xpnn._checks import positive_int
from xpnn.layers.activations import Sigmoid
from xpnn.layers.base import BaseLayer
from xpnn.layers.fully_connected import FullyConnected


class RecurrentLayer(BaseLayer):
    """The interface and the output part of a recurrent layer (see the module docstring).

    Parameters
    ----------
    input_size, hidden_size, output_size : int
        Features of ``x_t``, of the hidden state ``h_t`` and of ``y_t``.
    hidden_outputs : int
        Output features of ``FC_h``: ``hidden_size`` for the Elman cell,
        ``4 * hidden_size`` for the LSTM's four gates.

    Attributes
    ----------
    memorize : bool
        False (default): every ``forward`` starts from a zero state. True: it
        starts from the state the last ``forward`` ended in (truncated
        back-propagation through time: ``backward`` stops at the sequence's
        start). The state is kept only while ``memorize`` is True.
    weights, gradient_weights : array, shape (input_size + hidden_size + 1, hidden_outputs)
        ``FC_h``'s: the rows of ``x_t``, then of ``h_{t-1}``, then the bias row
        (the course's stacking). ``gradient_weights`` is summed over the time
        steps (and sequences) of the last ``backward``.
    output_weights : array, shape (hidden_size + 1, output_size)
        ``FC_y``'s (its bias as the last row); saved in checkpoints.
    optimizer : optimizer or None
        Set: ``backward`` steps ``FC_h`` with it and ``FC_y`` with a deep copy
        of it (each part keeps its own optimizer state).
    """

    #: The states carried between sequences with ``memorize`` (subclasses name theirs).
    carried_names = ()

    def __init__(self, input_size, hidden_size, output_size, hidden_outputs):
        super().__init__()
        self.trainable = True
        self.memorize = False
        name = type(self).__name__
        self.input_size = positive_int(name, "input_size", input_size)
        self.hidden_size = positive_int(name, "hidden_size", hidden_size)
        self.output_size = positive_int(name, "output_size", output_size)
        self.fc_hidden = FullyConnected(self.input_size + self.hidden_size, hidden_outputs)
        self.fc_output = FullyConnected(self.hidden_size, self.output_size)
        self.sigmoid_output = Sigmoid()
        self._optimizer = None
        self._output_optimizer = None
        self._steps = None  # per time step, what backward needs (the subclass's tuples)
        self._output_shape = None  # the shape the last forward returned
        for state in self.carried_names:
            setattr(self, state, None)

    # -- parameters ------------------------------------------------------------
    @property
    def weights(self):
        return self.fc_hidden.weights

    @weights.setter
    def weights(self, value):
        self.fc_hidden.weights = value

    @property
    def gradient_weights(self):
        return self.fc_hidden.gradient_weights

    @property
    def output_weights(self):
        return self.fc_output.weights

    @output_weights.setter
    def output_weights(self, value):
        self.fc_output.weights = value

    @property
    def optimizer(self):
        return self._optimizer

    @optimizer.setter
    def optimizer(self, value):
        self._optimizer = value
        self._output_optimizer = None if value is None else copy.deepcopy(value)

    def regularized_weights(self):
        """Both parts' weights: the optimizer regularizes both, so the network's
        regularization loss counts both (see :meth:`xpnn.NeuralNetwork.regularization_loss`)."""
        return (self.fc_hidden.weights, self.fc_output.weights)

    def initialize(self, weights_initializer, bias_initializer):
        """Initialize both fully connected parts (fan-in ``input_size + hidden_size`` for
        ``FC_h``, ``hidden_size`` for ``FC_y``), as the course does."""
        self.fc_hidden.initialize(weights_initializer, bias_initializer)
        self.fc_output.initialize(weights_initializer, bias_initializer)

    def _parts(self):
        """The layers this one is built from (moved with it by :meth:`to`)."""
        return [self.fc_hidden, self.fc_output, self.sigmoid_output]

    def to(self, backend, dtype=None):
        """Move parameters, carried states, optimizer states and forward caches; returns self."""
        # The parts first: the weights setters then find FC_h and FC_y on the new backend.
        for part in self._parts():
            part.to(backend, dtype)
        super().to(backend, dtype)
        if self._output_optimizer is not None:
            self._output_optimizer.to(self.backend)
        if self._steps is not None:
            move = self._move_array
            self._steps = [tuple(move(value) for value in step) for step in self._steps]
        return self

    def _move_array(self, value):
        """``value`` (a float array of any backend) on this layer's backend and dtype."""
        return self.backend.asarray(self.backend.to_numpy(value), dtype=self.backend.dtype)

    # -- passes ------------------------------------------------------------------
    def _sequences(self, input_tensor):
        """The input as ``(time, batch, input_size)`` on this backend, checked, and whether
        it was one sequence (2-D)."""
        xp = self.backend.xp
        tensor = self._as_input(input_tensor)
        if tensor.ndim not in (2, 3) or tensor.shape[-1] != self.input_size or tensor.shape[0] < 1:
            raise ValueError(f"{self.name}: expected input of shape (time, {self.input_size}) "
                             f"(one sequence) or (time, batch, {self.input_size}) (a batch of "
                             f"sequences), at least one time step, received {tuple(tensor.shape)}")
        if tensor.ndim == 2:
            return xp.reshape(tensor, (tensor.shape[0], 1, self.input_size)), True
        return tensor, False

    def _zeros(self, batch):
        return self.backend.xp.zeros((batch, self.hidden_size), dtype=self.backend.dtype,
                                     device=self.backend.device)

    def _start_state(self, name, batch):
        """The state ``name`` a forward starts from: carried with ``memorize``, else zeros."""
        carried = getattr(self, name)
        if not self.memorize or carried is None:
            return self._zeros(batch)
        carried = self._as_input(carried)  # (a state assigned as a NumPy array, say)
        if tuple(carried.shape) != (batch, self.hidden_size):
            raise ValueError(f"{self.name}: memorize carries the {name} of {carried.shape[0]} "
                             f"sequence(s), shape {tuple(carried.shape)}, but this input has "
                             f"{batch}: give batches of {carried.shape[0]} sequences, or start "
                             f"afresh with layer.{name} = None")
        return carried

    def _keep_state(self, name, value):
        setattr(self, name, value if self.memorize else None)

    def forward(self, input_tensor):
        """Run the sequence(s); returns ``(time, output_size)`` for a 2-D input, else
        ``(time, batch, output_size)``."""
        xp = self.backend.xp
        sequences, one_sequence = self._sequences(input_tensor)
        time, batch = sequences.shape[0], sequences.shape[1]
        hidden = self._run_steps(sequences)  # (time, batch, hidden_size)
        flat = xp.reshape(hidden, (time * batch, self.hidden_size))
        output = self.sigmoid_output.forward(self.fc_output.forward(flat))
        shape = (time, self.output_size) if one_sequence else (time, batch, self.output_size)
        self._output_shape = shape
        return xp.reshape(output, shape)

    def backward(self, error_tensor):
        """Back-propagate through time; sum both parts' gradients over the sequence, step
        them with the optimizer (if set and trainable); return the input's error."""
        xp = self.backend.xp
        error_tensor = self._as_input(error_tensor)
        if self._steps is None:
            raise RuntimeError(f"{self.name}: backward called before forward")
        if tuple(error_tensor.shape) != self._output_shape:
            raise ValueError(f"{self.name}: expected error of shape {self._output_shape} (the "
                             f"forward output), received {tuple(error_tensor.shape)}")
        time, batch = len(self._steps), self._steps[0][0].shape[0]
        flat = xp.reshape(error_tensor, (time * batch, self.output_size))
        hidden_error = self.fc_output.backward(self.sigmoid_output.backward(flat))
        input_error = self._back_steps(xp.reshape(hidden_error, (time, batch, self.hidden_size)))
        self._update_parameters()
        if len(self._output_shape) == 2:
            return xp.reshape(input_error, (time, self.input_size))
        return input_error

    def _accumulate_step(self, step_input, pre_activation_error, total):
        """``FC_h``'s backward for one step (its input restored first, as the course restores
        each step's input into its layer); returns (the step's input error, gradient sum)."""
        self.fc_hidden._augmented_input = step_input
        step_error = self.fc_hidden.backward(pre_activation_error)
        gradient = self.fc_hidden.gradient_weights
        return step_error, gradient if total is None else total + gradient

    def _update_parameters(self):
        """Step ``FC_h`` and ``FC_y`` with their optimizers (a frozen layer keeps its weights)."""
        if self._optimizer is None or not self.trainable:
            return
        self.fc_hidden.weights = self._optimizer.calculate_update(
            self.fc_hidden.weights, self.fc_hidden.gradient_weights)
        self.fc_output.weights = self._output_optimizer.calculate_update(
            self.fc_output.weights, self.fc_output.gradient_weights)

    def _run_steps(self, sequences):
        """Run the cell over ``(time, batch, input_size)``; keep ``_steps``; return h_t stacked."""
        raise NotImplementedError

    def _back_steps(self, hidden_error):
        """Back-propagate ``(time, batch, hidden_size)`` errors of h_t through time, set
        ``FC_h``'s summed gradient; return the input's error ``(time, batch, input_size)``."""
        raise NotImplementedError
