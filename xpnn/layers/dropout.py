"""Dropout (course API): inverted dropout, identity in testing phase."""
from xpnn._checks import finite_float
from xpnn.layers.base import BaseLayer


class Dropout(BaseLayer):
    """Randomly zero units while training, scaling the kept ones by ``1 / probability``.

    Parameters
    ----------
    probability : float
        Fraction of units **kept**, in (0, 1]. ``Dropout(1.0)`` keeps everything.

    Attributes
    ----------
    mask : array or None
        The 0/1 mask of the last training-phase ``forward`` (in the layer's
        dtype); ``backward`` applies the same mask.

    Notes
    -----
    Inverted dropout: in training ``output = input * mask / probability`` so
    the expected activation is unchanged and testing phase is the identity.
    The mask is drawn from the backend's generator
    (:meth:`xpnn.backend.Backend.random_uniform`): on the NumPy backend that is
    ``np.random``, so ``np.random.seed(n)`` reproduces the masks; under
    :func:`xpnn.host_random` every backend sees the same masks.
    """

    state_names = ("mask", "_scale")
    runs_in_pieces = True  # (the identity in testing phase)

    def __init__(self, probability):
        super().__init__()
        self.probability = finite_float("Dropout", "probability", probability,
                                        positive=True, at_most=1.0)
        self.mask = None
        # mask / probability, kept so that backward multiplies by exactly
        # what forward multiplied by.
        self._scale = None
        self._testing_forward = False

    def forward(self, input_tensor):
        """Apply the dropout mask (training) or return the input unchanged (testing phase)."""
        input_tensor = self._as_input(input_tensor)
        self._testing_forward = self.testing_phase
        if self.testing_phase:
            return input_tensor
        draws = self.draw_uniform(tuple(input_tensor.shape))
        output, self.mask, self._scale = self.backend.ops.dropout_forward(
            input_tensor, draws, self.probability)
        return output

    def draw_uniform(self, shape):
        """Uniform draws on [0, 1) of ``shape`` for the mask, from the backend's generator.

        A subclass for a batch spread over several processes draws the whole
        batch's mask (the same on every process) and returns its own rows.
        """
        return self.backend.random_uniform(shape)

    def backward(self, error_tensor):
        """Route the error through the units kept in the last forward pass, with the same scaling."""
        error_tensor = self._as_input(error_tensor)
        if self._testing_forward:
            return error_tensor
        if self._scale is None:
            raise RuntimeError("Dropout: backward called before forward")
        if tuple(error_tensor.shape) != tuple(self._scale.shape):
            raise ValueError(
                f"Dropout: error tensor shape {tuple(error_tensor.shape)} does not match the "
                f"forward input shape {tuple(self._scale.shape)}")
        return error_tensor * self._scale
