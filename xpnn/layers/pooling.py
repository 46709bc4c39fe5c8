"""Max-pooling layer (course API): 2-D, "valid", any window and stride."""
from xpnn.layers._shapes import spatial_tuple
from xpnn.layers.base import BaseLayer


class Pooling(BaseLayer):
    """2-D max pooling without padding; windows may overlap.

    Parameters
    ----------
    stride_shape : int, or sequence or 1-D array of int
        ``(s, t)``; an int or a 1-sequence applies to both spatial axes.
    pooling_shape : int, or sequence or 1-D array of int
        Window ``(p, q)``; an int or a 1-sequence gives a square window.

    Notes
    -----
    Input ``(b, c, y, x)``, output ``(b, c, (y - p) // s + 1, (x - q) // t + 1)``.
    ``backward`` sends each error to the first maximum of its window (row-major
    order inside the window) and sums where overlapping windows share an input.
    The array work lives in ``backend.ops`` (``max_pool_forward``/``max_pool_backward``).
    """

    runs_in_pieces = True

    def __init__(self, stride_shape, pooling_shape):
        super().__init__()
        self.stride_shape = spatial_tuple("Pooling", "stride_shape", stride_shape, 2)
        self.pooling_shape = spatial_tuple("Pooling", "pooling_shape", pooling_shape, 2)
        self._cache = None
        self._output_shape = None

    def forward(self, input_tensor):
        """Max over every window of ``(b, c, y, x)``."""
        input_tensor = self._as_input(input_tensor)
        self._check_input(tuple(input_tensor.shape))
        output, self._cache = self.backend.ops.max_pool_forward(
            input_tensor, self.pooling_shape, self.stride_shape)
        self._output_shape = tuple(output.shape)
        return output

    def backward(self, error_tensor):
        """Route each error to its window's first maximum; returns the input gradient."""
        if self._cache is None:
            raise RuntimeError("Pooling: backward called before forward")
        error_tensor = self._as_input(error_tensor)
        if tuple(error_tensor.shape) != self._output_shape:
            raise ValueError(f"Pooling: error tensor must have the forward output's shape "
                             f"{self._output_shape}, got {tuple(error_tensor.shape)}")
        return self.backend.ops.max_pool_backward(error_tensor, self._cache)

    def to(self, backend, dtype=None):
        """Switch backend; the forward cache is dropped (run forward again)."""
        self._cache = None
        return super().to(backend, dtype)

    def _check_input(self, shape):
        if len(shape) != 4:
            raise ValueError("Pooling: expected input of shape (batch, channels, y, x), "
                             f"got {shape}")
        if shape[2] < self.pooling_shape[0] or shape[3] < self.pooling_shape[1]:
            raise ValueError(f"Pooling: input of shape {shape} is smaller than the pooling window "
                             f"{self.pooling_shape}; need y >= {self.pooling_shape[0]} and "
                             f"x >= {self.pooling_shape[1]}")
