"""FullyConnected (course API): an affine map with the bias stored as the last weight row."""
from xpnn._checks import positive_int
from xpnn.initializers import UniformRandom
from xpnn.layers.base import TrainableLayer


class FullyConnected(TrainableLayer):
    """``output = [input, 1] @ weights``: a dense layer in the course's convention.

    Parameters
    ----------
    input_size, output_size : int
        Number of input and output features (positive integers).

    Attributes
    ----------
    weights : array, shape (input_size + 1, output_size)
        The first ``input_size`` rows are the weight matrix, the last row is
        the bias (the input gets a column of ones appended). Assigning a NumPy
        array or an array of another backend moves it to this layer's backend.
    gradient_weights : array or None
        Same shape as ``weights``; set by ``backward``.
    bias : array, shape (output_size,)
        The last row of ``weights``. Assigning it replaces that row (a new
        weights array is built; the old one is not modified in place).
    gradient_bias : array or None, shape (output_size,)
        The last row of ``gradient_weights`` (read-only).

    Notes
    -----
    Until :meth:`initialize` is called the weights (bias row included) are
    uniform on [0, 1), drawn on the host from ``np.random`` as course code
    expects. There is no separate bias array, so only the weights optimizer
    runs: the bias row is updated together with the weights.
    """

    runs_in_pieces = True

    # bias and gradient_bias are views of rows of these; moving them is enough.
    state_names = ("weights", "gradient_weights")
    # The input of the last testing-phase forward, for a backward after it (a class
    # default: a layer pickled before it existed loads without it).
    _input = None

    def __init__(self, input_size, output_size):
        super().__init__()
        self.input_size = positive_int("FullyConnected", "input_size", input_size)
        self.output_size = positive_int("FullyConnected", "output_size", output_size)
        self.weights = UniformRandom().initialize(
            (self.input_size + 1, self.output_size), self.input_size, self.output_size)
        # The training input with its column of ones, kept for the weight gradient.
        self._augmented_input = None

    # -- parameters ------------------------------------------------------------
    def parameter_shapes(self):
        # The weights carry the bias as their last row: (input_size + 1, output_size).
        return {"weights": (self.input_size + 1, self.output_size)}

    @property
    def bias(self):
        return self._weights[self.input_size, :]

    @bias.setter
    def bias(self, value):
        xp = self.backend.xp
        value = self._as_input(value)
        if tuple(value.shape) not in ((self.output_size,), (1, self.output_size)):
            raise ValueError(f"FullyConnected: bias must have shape ({self.output_size},), "
                             f"received {tuple(value.shape)}")
        row = xp.reshape(value, (1, self.output_size))
        # A new array: the old weights may be shared (e.g. with a caller).
        self._weights = xp.concat([self._weights[:self.input_size, :], row], axis=0)

    @property
    def gradient_bias(self):
        if self.gradient_weights is None:
            return None
        return self.gradient_weights[self.input_size, :]

    def initialize(self, weights_initializer, bias_initializer):
        """Draw the weight matrix and the bias row from the given initializers.

        ``weights_initializer.initialize((input_size, output_size), input_size,
        output_size)`` and ``bias_initializer.initialize((1, output_size), 1,
        output_size)``; both return host arrays that are moved here.
        """
        xp = self.backend.xp
        matrix = self._as_input(weights_initializer.initialize(
            (self.input_size, self.output_size), self.input_size, self.output_size))
        bias_row = self._as_input(bias_initializer.initialize(
            (1, self.output_size), 1, self.output_size))
        bias_row = xp.reshape(bias_row, (1, self.output_size))
        self.weights = xp.concat([matrix, bias_row], axis=0)

    # -- passes ------------------------------------------------------------------
    def forward(self, input_tensor):
        """Return ``[input, 1] @ weights`` for an input of shape (batch, input_size).

        In training the input gets its column of ones (shared, made once per
        batch size), and the weight gradient is then one matrix product; in
        testing phase the bias row is added to ``input @ weights[:-1]`` instead
        (equal to rounding), without the copy of the input.
        """
        xp = self.backend.xp
        input_tensor = self._as_input(input_tensor)
        if input_tensor.ndim != 2 or input_tensor.shape[1] != self.input_size:
            raise ValueError(f"FullyConnected: expected input of shape (batch, {self.input_size}), "
                             f"received {tuple(input_tensor.shape)}")
        if self.testing_phase:
            self._augmented_input, self._input = None, input_tensor
            matrix, bias = self._weights[:self.input_size, :], self._weights[self.input_size, :]
            return xp.matmul(input_tensor, matrix) + bias
        self._augmented_input, self._input = self._augmented(input_tensor), None
        return xp.matmul(self._augmented_input, self._weights)

    def _augmented(self, input_tensor):
        """``[input, 1]``: the input with a column of ones appended."""
        ones = self.backend.ops.ones_column(input_tensor.shape[0])
        return self.backend.xp.concat([input_tensor, ones], axis=1)

    def backward(self, error_tensor):
        """Set ``gradient_weights``, update through the optimizer, return the input error."""
        xp = self.backend.xp
        error_tensor = self._as_input(error_tensor)
        augmented_input = self._augmented_input
        if augmented_input is None and self._input is not None:  # after a testing-phase forward
            augmented_input = self._augmented(self._input)
        if augmented_input is None:
            raise RuntimeError("FullyConnected: backward called before forward")
        expected = (augmented_input.shape[0], self.output_size)
        if tuple(error_tensor.shape) != expected:
            raise ValueError(f"FullyConnected: expected error of shape {expected}, "
                             f"received {tuple(error_tensor.shape)}")
        self.gradient_weights = xp.matmul(xp.matrix_transpose(augmented_input), error_tensor)
        # The input error uses the weights of the forward pass, before the update.
        input_error = xp.matmul(error_tensor,
                                xp.matrix_transpose(self._weights[:self.input_size, :]))
        self._update_parameters()
        return input_error
