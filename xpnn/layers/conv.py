"""Convolution layer (course API): 1-D and 2-D "same"-padded strided cross-correlation."""
import math

from xpnn._checks import positive_int
from xpnn.initializers import UniformRandom
from xpnn.layers._shapes import positive_ints, spatial_tuple
from xpnn.layers.base import TrainableLayer


class Conv(TrainableLayer):
    """Multi-channel cross-correlation with "same" zero padding and strides.

    Parameters
    ----------
    stride_shape : int, or sequence or 1-D array of int
        Stride per spatial axis; an int or a 1-sequence applies to every axis,
        otherwise one entry per axis (``(s,)`` for 1-D, ``(s, t)`` for 2-D).
    convolution_shape : sequence or 1-D array of int
        ``(c, m)`` for 1-D input ``(b, c, y)``; ``(c, m, n)`` for 2-D input
        ``(b, c, y, x)``; ``c`` is the number of input channels.
    num_kernels : int
        Number of kernels, i.e. output channels.

    Attributes
    ----------
    weights : array, shape ``(num_kernels, c, m[, n])``
    bias : array, shape ``(num_kernels,)``
    gradient_weights, gradient_bias : arrays of the same shapes, set by ``backward``

    Notes
    -----
    "Same" padding adds ``k - 1`` zeros per axis, ``(k - 1) // 2`` before and
    the rest after, so an even kernel pads one more at the end. A stride
    subsamples the stride-1 result: the output has ``ceil(y / s)`` positions
    per axis. Until :meth:`initialize` is called, weights and bias are uniform
    on [0, 1) (course convention), drawn on the host from ``np.random`` so a
    seed gives the same values on every backend. The array work lives in
    ``backend.ops`` (``conv_forward``/``conv_backward``, im2col + one matmul).
    """

    runs_in_pieces = True

    def __init__(self, stride_shape, convolution_shape, num_kernels):
        super().__init__()
        shape = positive_ints("Conv", "convolution_shape", convolution_shape)
        if len(shape) not in (2, 3):
            raise ValueError("Conv: convolution_shape must be (channels, m) for 1-D or "
                             f"(channels, m, n) for 2-D, got {convolution_shape!r}")
        self.convolution_shape = shape
        self.num_kernels = positive_int("Conv", "num_kernels", num_kernels)
        strides = positive_ints("Conv", "stride_shape", stride_shape)
        if len(shape) == 2 and len(strides) == 2:  # e.g. Conv((1, 1), (5, 5), 6)
            raise ValueError(
                f"Conv: convolution_shape {convolution_shape!r} is 1-D, but stride_shape "
                f"{stride_shape!r} has 2 entries (2-D): convolution_shape is (c, m) for 1-D data "
                f"(b, c, y) and (c, m, n) for 2-D data (b, c, y, x), c the number of input "
                f"channels. Is the channel count missing from convolution_shape? For one input "
                f"channel: Conv({stride_shape!r}, {(1,) + shape!r}, {num_kernels!r})")
        self.stride_shape = spatial_tuple("Conv", "stride_shape", stride_shape, len(shape) - 1)
        self._cache = None
        self._input_shape = None
        uniform = UniformRandom()
        self.weights = uniform.initialize(self.weights_shape, self.fan_in, self.fan_out)
        self.bias = uniform.initialize((self.num_kernels,), self.fan_in, self.fan_out)

    @property
    def weights_shape(self):
        """``(num_kernels, c, m[, n])``."""
        return (self.num_kernels,) + self.convolution_shape

    @property
    def fan_in(self):
        """Inputs per output value: ``c * m * n``."""
        return math.prod(self.convolution_shape)

    @property
    def fan_out(self):
        """``num_kernels * m * n``."""
        return self.num_kernels * math.prod(self.convolution_shape[1:])

    def parameter_shapes(self):
        return {"weights": self.weights_shape, "bias": (self.num_kernels,)}

    def initialize(self, weights_initializer, bias_initializer):
        """Draw weights ``(num_kernels, c, m[, n])`` and bias ``(num_kernels,)`` afresh.

        The weights are kept as the initializer returns them, as the course's
        layer does (its tests hand in one that checks only ``fan_in`` and
        ``fan_out``); a shape that does not fit is reported by :meth:`forward`.
        """
        weights = weights_initializer.initialize(self.weights_shape, self.fan_in, self.fan_out)
        try:
            self.weights = weights
        except ValueError:
            self._weights = self._as_input(weights)
        self.bias = bias_initializer.initialize((self.num_kernels,), self.fan_in, self.fan_out)

    def forward(self, input_tensor):
        """Cross-correlate ``(b, c, y[, x])`` with every kernel: ``(b, num_kernels, y'[, x'])``."""
        input_tensor = self._as_input(input_tensor)
        self._check_input(tuple(input_tensor.shape))
        output, self._cache = self.backend.ops.conv_forward(
            input_tensor, self.weights, self.bias, self.stride_shape,
            need_backward=not self.testing_phase)
        self._input_shape = tuple(input_tensor.shape)
        return output

    def backward(self, error_tensor):
        """Compute the gradients, update the parameters (if an optimizer is set).

        Sets ``gradient_weights`` and ``gradient_bias`` and returns the
        gradient with respect to the forward input, ``(b, c, y[, x])`` (None
        while ``skip_input_gradient`` is set, as a network does for its first layer).
        """
        if self._cache is None:
            raise RuntimeError("Conv: backward called before forward")
        error_tensor = self._as_input(error_tensor)
        self._check_error(tuple(error_tensor.shape))
        gradient_input, self.gradient_weights, self.gradient_bias = self.backend.ops.conv_backward(
            error_tensor, self.weights, self._cache, input_gradient=not self.skip_input_gradient)
        # The input gradient above used the weights of the forward pass; only now update them.
        self._update_parameters()
        return gradient_input

    def to(self, backend, dtype=None):
        """Move parameters and optimizer state; the forward cache is dropped (run forward again)."""
        self._cache = None
        return super().to(backend, dtype)

    def _expected_input(self):
        spatial = ("y", "x")[:len(self.convolution_shape) - 1]
        return "(batch, " + ", ".join((str(self.convolution_shape[0]),) + spatial) + ")"

    def _check_input(self, shape):
        rank = len(self.convolution_shape) - 1
        if len(shape) != rank + 2 or shape[1] != self.convolution_shape[0] or 0 in shape[2:]:
            hint = ""
            if len(shape) == rank + 1:  # e.g. (N, 28, 28) images for (batch, 1, y, x)
                hint = "; the input has one axis fewer than expected: " + _missing_axis_hint(
                    shape, self.convolution_shape[0])
            raise ValueError(f"Conv: expected input of shape {self._expected_input()} for "
                             f"convolution_shape {self.convolution_shape}, got {shape}{hint}")
        if tuple(self._weights.shape) != self.weights_shape:  # (see initialize)
            raise ValueError(f"Conv: weights must have shape {self.weights_shape}, have "
                             f"{tuple(self._weights.shape)} (as the weights initializer returned "
                             f"them); assign weights of that shape or initialize again")

    def _check_error(self, shape):
        spatial = self._input_shape[2:]
        output = tuple(-(-n // s) for n, s in zip(spatial, self.stride_shape))
        expected = (self._input_shape[0], self.num_kernels) + output
        if shape != expected:
            raise ValueError(f"Conv: error tensor must have the forward output's shape "
                             f"{expected}, got {shape}")


def _missing_axis_hint(shape, channels):
    """What input of ``shape``, one axis short, most likely lacks, and how to add it."""
    if channels == 1:
        return "is the channel axis missing? Add it with x[:, None]"
    if shape[0] == channels:  # (channels, y, x): one image
        return "is the batch axis missing (one image)? Add it with x[None]"
    return f"is the channel axis missing? It comes second, with {channels} entries"

