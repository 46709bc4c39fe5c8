"""Batch normalization (course API) for vector and image inputs."""
from xpnn._checks import finite_float, positive_int
from xpnn.layers.base import TrainableLayer


class BatchNormalization(TrainableLayer):
    """Normalize each channel to mean 0 / variance 1, then scale by γ and shift by β.

    Parameters
    ----------
    channels : int
        Number of features (vector input ``(b, channels)``) or channels (image
        input ``(b, channels, y, x)``).
    eps : float, optional
        Added to the variance before the square root. The default 1e-10 keeps
        the course's numerical gradient checks exact; a float32 network may
        pass a larger value (e.g. 1e-5).

    Attributes
    ----------
    weights, bias : array
        γ (ones) and β (zeros), shape ``(channels,)``.
    gradient_weights, gradient_bias : array
        Gradients of the last ``backward`` with respect to γ and β.
    running_mean, running_variance : array or None
        Statistics used in testing phase: the first training batch's mean and
        (biased) variance, then ``decay * running + (1 - decay) * batch``.

    Notes
    -----
    For images the statistics are per channel over batch and space:
    :meth:`reformat` turns ``(b, h, m, n)`` into ``(b·m·n, h)``, the vector code
    runs on that, and :meth:`reformat` turns the result back.

    Before any training batch has been seen, testing phase normalizes with
    mean 0 and variance 1 (as PyTorch's untrained ``BatchNorm`` in eval mode).
    """

    #: Weight of the old running statistics in the moving average.
    decay = 0.8
    state_names = TrainableLayer.state_names + ("running_mean", "running_variance")

    def __init__(self, channels, eps=1e-10):
        super().__init__()
        self.channels = positive_int("BatchNormalization", "channels", channels)
        self.eps = finite_float("BatchNormalization", "eps", eps)
        if self.eps < 0:
            raise ValueError(f"BatchNormalization: eps must be >= 0, got {eps!r}")
        self.running_mean = None
        self.running_variance = None
        self._image_shape = None
        self._normalized = None      # x̂ of the last forward, (rows, channels)
        self._inverse_std = None     # 1 / sqrt(variance + eps), (channels,)
        self._testing_forward = False
        self.initialize()

    def initialize(self, weights_initializer=None, bias_initializer=None):
        """Reset γ to ones and β to zeros; initializers are ignored (course convention)."""
        xp, backend = self.backend.xp, self.backend
        self._weights = xp.ones((self.channels,), dtype=backend.dtype, device=backend.device)
        self._bias = xp.zeros((self.channels,), dtype=backend.dtype, device=backend.device)

    # -- shapes ------------------------------------------------------------------
    def reformat(self, tensor):
        """Turn an image batch ``(b, h, m, n)`` into ``(b·m·n, h)``, or such a matrix back.

        The image shape is remembered from the last 4-D tensor reformatted, so
        ``reformat(reformat(images))`` returns ``images``.
        """
        xp = self.backend.xp
        tensor = self._as_input(tensor)
        if tensor.ndim == 4:
            self._image_shape = tuple(tensor.shape)
            batch, channels, height, width = self._image_shape
            channels_last = xp.permute_dims(tensor, (0, 2, 3, 1))
            return xp.reshape(channels_last, (batch * height * width, channels))
        if tensor.ndim == 2 and self._image_shape is not None:
            batch, channels, height, width = self._image_shape
            if tuple(tensor.shape) != (batch * height * width, channels):
                raise ValueError(
                    f"BatchNormalization.reformat: expected a matrix of shape "
                    f"{(batch * height * width, channels)} for the remembered image shape "
                    f"{self._image_shape}, got {tuple(tensor.shape)}")
            channels_last = xp.reshape(tensor, (batch, height, width, channels))
            return xp.permute_dims(channels_last, (0, 3, 1, 2))
        raise ValueError(
            f"BatchNormalization.reformat: expected an image batch (b, h, m, n) or, after one, "
            f"a matrix (b*m*n, h); got shape {tuple(tensor.shape)}")

    def _check_input(self, tensor, what):
        shape = tuple(tensor.shape)
        if tensor.ndim not in (2, 4) or shape[1] != self.channels:
            raise ValueError(
                f"BatchNormalization: expected {what} of shape (batch, {self.channels}) or "
                f"(batch, {self.channels}, y, x), got {shape}")

    def _to_rows(self, tensor):
        return self.reformat(tensor) if tensor.ndim == 4 else tensor

    def _from_rows(self, rows, like_image):
        return self.reformat(rows) if like_image else rows

    # -- passes ------------------------------------------------------------------
    def forward(self, input_tensor):
        """Normalize with batch statistics (training) or the running ones (testing phase)."""
        input_tensor = self._as_input(input_tensor)
        self._check_input(input_tensor, "input")
        rows = self._to_rows(input_tensor)
        self._testing_forward = self.testing_phase
        if self.testing_phase:
            mean, variance = self._inference_statistics()
        else:
            mean, variance = self._batch_statistics(rows)
        self._inverse_std = 1.0 / self.backend.xp.sqrt(variance + self.eps)
        self._normalized = (rows - mean) * self._inverse_std
        output = self._weights * self._normalized + self._bias
        return self._from_rows(output, input_tensor.ndim == 4)

    def _batch_statistics(self, rows):
        """Biased batch mean/variance per channel; updates the running statistics."""
        xp = self.backend.xp
        mean = xp.mean(rows, axis=0)
        centered = rows - mean
        variance = xp.mean(centered * centered, axis=0)
        if self.running_mean is None:
            self.running_mean, self.running_variance = mean, variance
        else:
            keep, take = self.decay, 1.0 - self.decay
            self.running_mean = keep * self.running_mean + take * mean
            self.running_variance = keep * self.running_variance + take * variance
        return mean, variance

    def _inference_statistics(self):
        if self.running_mean is not None:
            return self.running_mean, self.running_variance
        xp, backend = self.backend.xp, self.backend
        return (xp.zeros((self.channels,), dtype=backend.dtype, device=backend.device),
                xp.ones((self.channels,), dtype=backend.dtype, device=backend.device))

    def backward(self, error_tensor):
        """Gradients for γ, β and the input; then the optimizer step when one is set."""
        if self._normalized is None:
            raise RuntimeError("BatchNormalization: backward called before forward")
        error_tensor = self._as_input(error_tensor)
        self._check_input(error_tensor, "error tensor")
        error_rows = self._to_rows(error_tensor)
        if tuple(error_rows.shape) != tuple(self._normalized.shape):
            raise ValueError(
                f"BatchNormalization: error tensor shape {tuple(error_tensor.shape)} does not "
                f"match the last forward pass")
        xp = self.backend.xp
        self.gradient_weights = xp.sum(error_rows * self._normalized, axis=0)
        self.gradient_bias = xp.sum(error_rows, axis=0)
        input_error = self._input_gradient(error_rows)
        self._update_parameters()
        return self._from_rows(input_error, error_tensor.ndim == 4)

    def _input_gradient(self, error_rows):
        """dL/dx; in training the batch statistics depend on x (standard derivation)."""
        normalized_error = error_rows * self._weights
        if self._testing_forward:
            return normalized_error * self._inverse_std
        xp = self.backend.xp
        # dx = (dx̂ - mean(dx̂) - x̂ · mean(dx̂ · x̂)) / sqrt(var + eps), means over rows
        mean_error = xp.mean(normalized_error, axis=0)
        mean_projection = xp.mean(normalized_error * self._normalized, axis=0)
        return (normalized_error - mean_error - self._normalized * mean_projection) * self._inverse_std
