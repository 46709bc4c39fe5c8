"""Batch normalization (course API) for vector and image inputs."""
import math

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
    For images the statistics are per channel over batch and space, i.e. over
    the rows of the ``(b·m·n, h)`` matrix that :meth:`reformat` makes of a
    ``(b, h, m, n)`` batch. ``forward``/``backward`` compute exactly those
    statistics by reducing the image over axes (0, 2, 3) in place, which
    saves the two transposing copies; :meth:`reformat` (both directions) is
    kept for course code and tests.

    Before any training batch has been seen, testing phase normalizes with
    mean 0 and variance 1 (as PyTorch's untrained ``BatchNorm`` in eval mode).
    """

    #: Weight of the old running statistics in the moving average.
    decay = 0.8
    #: Testing phase uses the running statistics: each sample on its own.
    runs_in_pieces = True
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
        self._cache = None           # what backend.ops needs for backward (opaque)
        self._forward_shape = None   # shape of the last forward input
        self.initialize()

    def parameter_shapes(self):
        return {"weights": (self.channels,), "bias": (self.channels,)}

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

    def _check_batch_statistics(self, shape):
        """Training normalizes with the batch's own statistics: they need 2 values per channel.

        With one value the variance is 0 and every output is β, whatever the
        input (PyTorch refuses it too); with none they are NaN. Raised before
        any state of the layer changes.
        """
        values = shape[0] * math.prod(shape[2:])
        if values < 2:
            raise ValueError(
                f"BatchNormalization: batch statistics need at least 2 values per channel in "
                f"training, got input of shape {shape} ({values} per channel): train on batches "
                f"of 2 or more samples (the testing phase, e.g. net.test, takes single samples)")

    def _statistics_axes(self, tensor):
        """Axes the statistics run over: (batch, y, x) for images, (batch,) for vectors.

        Reducing an image over (batch, y, x) in place gives exactly the
        statistics of its :meth:`reformat` matrix over rows, without the two
        transposing copies (about 2.5x faster for LeNet's first layer). An
        image's shape is remembered for :meth:`reformat`, as course code expects.
        """
        if tensor.ndim == 4:
            self._image_shape = tuple(tensor.shape)
            return (0, 2, 3)
        return (0,)

    # -- passes ------------------------------------------------------------------
    def forward(self, input_tensor):
        """Normalize with batch statistics (training) or the running ones (testing phase)."""
        input_tensor = self._as_input(input_tensor)
        self._check_input(input_tensor, "input")
        if not self.testing_phase:
            self._check_batch_statistics(tuple(input_tensor.shape))
        axes = self._statistics_axes(input_tensor)
        given = self._inference_statistics() if self.testing_phase else None
        all_sum = None if self.testing_phase else self.statistics_sum()
        # The array work lives in backend.ops (NumPy has a faster one for images).
        output, (mean, variance), self._cache = self.backend.ops.batch_norm_forward(
            input_tensor, self._weights, self._bias, self.eps, axes, given, all_sum)
        self._forward_shape = tuple(input_tensor.shape)
        if not self.testing_phase:
            self._update_running_statistics(mean, variance)
        return output

    def _update_running_statistics(self, mean, variance):
        """First batch: its statistics; then ``decay * running + (1 - decay) * batch``."""
        if self.running_mean is None:
            self.running_mean, self.running_variance = mean, variance
        else:
            self.running_mean, self.running_variance = self.backend.ops.batch_norm_running_statistics(
                self.running_mean, self.running_variance, mean, variance, self.decay)

    def statistics_sum(self):
        """How training sums the statistics over the batch: None, this process holds the whole batch.

        A subclass for a batch spread over several processes returns a function
        ``all_sum(*values) -> tuple`` that sums each value over every process's
        rows (see :func:`xpnn.ops.batch_norm.batch_norm_forward`); the forward
        pass and its backward then use the whole batch's statistics.
        """
        return None

    def _inference_statistics(self):
        if self.running_mean is not None:
            return self.running_mean, self.running_variance
        xp, backend = self.backend.xp, self.backend
        return (xp.zeros((self.channels,), dtype=backend.dtype, device=backend.device),
                xp.ones((self.channels,), dtype=backend.dtype, device=backend.device))

    def backward(self, error_tensor):
        """Gradients for γ, β and the input; then the optimizer step when one is set.

        In training the batch statistics depend on the input (standard
        derivation); after a testing-phase forward they are constants.
        """
        if self._cache is None:
            raise RuntimeError("BatchNormalization: backward called before forward")
        error_tensor = self._as_input(error_tensor)
        if tuple(error_tensor.shape) != self._forward_shape:
            raise ValueError(
                f"BatchNormalization: error tensor shape {tuple(error_tensor.shape)} does not "
                f"match the last forward pass's {self._forward_shape}")
        input_error, self.gradient_weights, self.gradient_bias = self.backend.ops.batch_norm_backward(
            error_tensor, self._weights, self._cache)
        self._update_parameters()
        return input_error

    def to(self, backend, dtype=None):
        """Move parameters, running statistics and optimizer state; the forward cache is dropped."""
        self._cache = None
        return super().to(backend, dtype)
