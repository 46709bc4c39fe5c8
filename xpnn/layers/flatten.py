"""Flatten (course API): (batch, ...) -> (batch, features) and back."""
import math

from xpnn.layers.base import BaseLayer


class Flatten(BaseLayer):
    """Reshape each sample to a vector; backward reshapes the error back.

    Attributes
    ----------
    input_shape : tuple or None
        Shape of the last forward input, used by ``backward`` (read-only: a
        cache, not a setting).
    """

    runs_in_pieces = True

    def __init__(self):
        super().__init__()
        self._input_shape = None

    @property
    def input_shape(self):
        return self._input_shape

    def __setstate__(self, state):
        if "input_shape" in state:  # (pickled when it was a plain attribute)
            state["_input_shape"] = state.pop("input_shape")
        self.__dict__.update(state)

    def forward(self, input_tensor):
        """Return the input reshaped to (batch, product of the other dimensions)."""
        input_tensor = self._as_input(input_tensor)
        if input_tensor.ndim < 1:
            raise ValueError("Flatten: expected input of shape (batch, ...), received ()")
        # (A local first: test() may run pieces of a batch through this layer at once.)
        shape = self._input_shape = tuple(input_tensor.shape)
        return self.backend.xp.reshape(input_tensor, (shape[0], math.prod(shape[1:])))

    def backward(self, error_tensor):
        """Return the error reshaped to the last forward input's shape."""
        error_tensor = self._as_input(error_tensor)
        if self.input_shape is None:
            raise RuntimeError("Flatten: backward called before forward")
        expected = (self.input_shape[0], math.prod(self.input_shape[1:]))
        if tuple(error_tensor.shape) != expected:
            raise ValueError(f"Flatten: expected error of shape {expected}, "
                             f"received {tuple(error_tensor.shape)}")
        return self.backend.xp.reshape(error_tensor, self.input_shape)
