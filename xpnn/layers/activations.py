"""Activation layers (course API): ReLU, TanH, Sigmoid and SoftMax.

Each keeps what its backward pass needs from the forward pass (ReLU the mask
of positive inputs, the others their output) and never modifies its input.
"""
from xpnn.layers.base import BaseLayer


class _Activation(BaseLayer):
    """Element-wise activation: shared entry checks for forward and backward."""

    runs_in_pieces = True

    def __init__(self):
        super().__init__()
        # The array backward differentiates through (mask or output), set by forward.
        self._saved = None

    def _error_input(self, error_tensor):
        """Move the error here and check it matches the last forward output."""
        error_tensor = self._as_input(error_tensor)
        if self._saved is None:
            raise RuntimeError(f"{self.name}: backward called before forward")
        if tuple(error_tensor.shape) != tuple(self._saved.shape):
            raise ValueError(f"{self.name}: expected error of shape {tuple(self._saved.shape)} "
                             f"(the forward output), received {tuple(error_tensor.shape)}")
        return error_tensor


class ReLU(_Activation):
    """``max(x, 0)``; the gradient is 1 where the input was positive, else 0."""

    def forward(self, input_tensor):
        input_tensor = self._as_input(input_tensor)
        # The array work (and the mask's form) lives in backend.ops: NumPy has a faster one.
        output, self._saved = self.backend.ops.relu_forward(
            input_tensor, need_backward=not self.testing_phase)
        return output

    def backward(self, error_tensor):
        error_tensor = self._error_input(error_tensor)
        return self.backend.ops.relu_backward(error_tensor, self._saved)


class TanH(_Activation):
    """``tanh(x)``; backward uses the stored output: ``e * (1 - y**2)``."""

    def forward(self, input_tensor):
        xp = self.backend.xp
        output = xp.tanh(self._as_input(input_tensor))
        self._saved = output
        return output

    def backward(self, error_tensor):
        error_tensor = self._error_input(error_tensor)
        return error_tensor * (1.0 - self._saved * self._saved)


class Sigmoid(_Activation):
    """``1 / (1 + exp(-x))``; backward uses the stored output: ``e * y * (1 - y)``."""

    def forward(self, input_tensor):
        xp = self.backend.xp
        input_tensor = self._as_input(input_tensor)
        # exp(-|x|) never overflows, and each branch keeps full relative
        # precision (1 - sigmoid(x) would cancel for large x).
        decay = xp.exp(-xp.abs(input_tensor))
        output = xp.where(input_tensor >= 0.0, 1.0 / (1.0 + decay), decay / (1.0 + decay))
        self._saved = output
        return output

    def backward(self, error_tensor):
        error_tensor = self._error_input(error_tensor)
        return error_tensor * self._saved * (1.0 - self._saved)


class SoftMax(_Activation):
    """Row-wise softmax of a (batch, classes) input, numerically stable (row max subtracted).

    Backward: ``y * (e - sum(e * y, axis=1))`` with ``y`` the stored output.
    """

    def forward(self, input_tensor):
        xp = self.backend.xp
        input_tensor = self._as_input(input_tensor)
        if input_tensor.ndim != 2:
            raise ValueError(f"SoftMax: expected input of shape (batch, classes), "
                             f"received {tuple(input_tensor.shape)}")
        shifted = input_tensor - xp.max(input_tensor, axis=1, keepdims=True)
        exponentials = xp.exp(shifted)
        output = exponentials / xp.sum(exponentials, axis=1, keepdims=True)
        self._saved = output
        return output

    def backward(self, error_tensor):
        xp = self.backend.xp
        error_tensor = self._error_input(error_tensor)
        output = self._saved
        return output * (error_tensor - xp.sum(error_tensor * output, axis=1, keepdims=True))
