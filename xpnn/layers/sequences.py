"""Layers that turn images into sequences and sequences into one vector each, for a
recurrent classifier: :class:`ImageRows` and :class:`LastStep`."""
from xpnn.layers.base import BaseLayer


class ImageRows(BaseLayer):
    """Read images row by row: ``(batch, rows, columns)`` or ``(batch, channels, rows, columns)``
    becomes the sequences ``(rows, batch, channels * columns)`` a recurrent layer takes
    (time first). Backward puts the error back in the images' shape."""

    def __init__(self):
        super().__init__()
        self._input_shape = None

    def forward(self, input_tensor):
        xp = self.backend.xp
        images = self._as_input(input_tensor)
        if images.ndim not in (3, 4):
            raise ValueError(f"ImageRows: expected images of shape (batch, rows, columns) or "
                             f"(batch, channels, rows, columns), received {tuple(images.shape)}")
        self._input_shape = tuple(images.shape)
        if images.ndim == 3:
            return xp.permute_dims(images, (1, 0, 2))
        batch, channels, rows, columns = self._input_shape
        # (rows, batch, channels, columns): each row of every channel is one step's features.
        by_rows = xp.permute_dims(images, (2, 0, 1, 3))
        return xp.reshape(by_rows, (rows, batch, channels * columns))

    def backward(self, error_tensor):
        xp = self.backend.xp
        error_tensor = self._as_input(error_tensor)
        if self._input_shape is None:
            raise RuntimeError("ImageRows: backward called before forward")
        shape = self._input_shape
        expected = (shape[-2], shape[0], shape[-1] * (shape[1] if len(shape) == 4 else 1))
        if tuple(error_tensor.shape) != expected:
            raise ValueError(f"ImageRows: expected error of shape {expected}, received "
                             f"{tuple(error_tensor.shape)}")
        if len(shape) == 3:
            return xp.permute_dims(error_tensor, (1, 0, 2))
        batch, channels, rows, columns = shape
        by_rows = xp.reshape(error_tensor, (rows, batch, channels, columns))
        return xp.permute_dims(by_rows, (1, 2, 0, 3))


class LastStep(BaseLayer):
    """The last time step of sequences: ``(time, batch, features)`` -> ``(batch, features)``.
    Backward sends the error to that step and zeros to the others."""

    def __init__(self):
        super().__init__()
        self._input_shape = None

    def forward(self, input_tensor):
        sequences = self._as_input(input_tensor)
        if sequences.ndim != 3 or sequences.shape[0] < 1:
            raise ValueError(f"LastStep: expected sequences of shape (time, batch, features), "
                             f"at least one time step, received {tuple(sequences.shape)}")
        self._input_shape = tuple(sequences.shape)
        return sequences[-1, ...]

    def backward(self, error_tensor):
        xp = self.backend.xp
        error_tensor = self._as_input(error_tensor)
        if self._input_shape is None:
            raise RuntimeError("LastStep: backward called before forward")
        time, batch, features = self._input_shape
        if tuple(error_tensor.shape) != (batch, features):
            raise ValueError(f"LastStep: expected error of shape {(batch, features)}, received "
                             f"{tuple(error_tensor.shape)}")
        last = xp.expand_dims(error_tensor, axis=0)
        if time == 1:
            return last
        earlier = xp.zeros((time - 1, batch, features), dtype=error_tensor.dtype,
                           device=self.backend.device)
        return xp.concat([earlier, last], axis=0)
