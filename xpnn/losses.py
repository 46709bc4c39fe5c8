"""Loss layers (course API)."""
from array_api_compat import is_array_api_obj

from xpnn.backend import Backend, asarray_like, get_backend, make_backend, namespace


def _shape_mismatch(prediction_shape, label_shape):
    """The message for labels whose shape differs from the prediction's (a hint to one-hot
    encode labels that look like class indices: (batch,) or (batch, 1))."""
    message = (f"CrossEntropyLoss: the labels have shape {label_shape}, the prediction "
               f"{prediction_shape}: both must be (batch, classes), the labels one-hot")
    if (len(prediction_shape) == 2 and label_shape[:1] == prediction_shape[:1]
            and label_shape[1:] in ((), (1,))):
        indices = "labels.ravel()" if label_shape[1:] else "labels"
        message += (f"; these look like class indices: one-hot encode them, e.g. "
                    f"np.eye({prediction_shape[1]})[{indices}]")
    return message


class CrossEntropyLoss:
    """Cross-entropy of a probability prediction (e.g. SoftMax output) and one-hot labels.

    ``forward(prediction, label) = -sum(label * log(prediction + eps))`` summed
    over the whole batch (not averaged), with ``eps`` the machine epsilon of
    the prediction's dtype, returned as a 0-d array of the prediction's
    backend (no host-device sync). ``backward(label) = -label / prediction``:
    the course's formula, with ``eps`` only in the forward loss (an ``eps`` in
    the backward pass would shrink the gradient of a confidently wrong sample,
    whose right class has a probability far below ``eps``, to almost nothing).

    Labels may come from any backend (or NumPy, or integer one-hot arrays):
    they are moved to the prediction's backend and dtype at entry.

    Attributes
    ----------
    backend : xpnn.backend.Backend
        Used only for a prediction that is not an array (e.g. nested lists);
        bound at construction, changed by :meth:`to`.
    """

    def __init__(self):
        self.backend = get_backend()
        self.prediction_tensor = None

    def _operands(self, prediction_tensor, label_tensor):
        """Return (prediction, label) on the prediction's backend, checking their shapes."""
        if not is_array_api_obj(prediction_tensor):
            prediction_tensor = self.backend.asarray(prediction_tensor, dtype=self.backend.dtype)
        label_tensor = asarray_like(label_tensor, prediction_tensor)
        if tuple(label_tensor.shape) != tuple(prediction_tensor.shape):
            raise ValueError(_shape_mismatch(tuple(prediction_tensor.shape), tuple(label_tensor.shape)))
        return prediction_tensor, label_tensor

    @staticmethod
    def _epsilon(prediction_tensor):
        xp = namespace(prediction_tensor)
        # A Python float: NumPy scalars must not meet other libraries' arrays.
        return float(xp.finfo(prediction_tensor.dtype).eps)

    def forward(self, prediction_tensor, label_tensor):
        """Return ``-sum(label * log(prediction + eps))`` as a 0-d array."""
        prediction_tensor, label_tensor = self._operands(prediction_tensor, label_tensor)
        xp = namespace(prediction_tensor)
        self.prediction_tensor = prediction_tensor
        epsilon = self._epsilon(prediction_tensor)
        return -xp.sum(label_tensor * xp.log(prediction_tensor + epsilon))

    def backward(self, label_tensor):
        """Return ``-label / prediction`` for the prediction of the last forward (no eps)."""
        if self.prediction_tensor is None:
            raise RuntimeError("CrossEntropyLoss: backward called before forward")
        prediction_tensor, label_tensor = self._operands(self.prediction_tensor, label_tensor)
        return -label_tensor / prediction_tensor

    def backward_through_softmax(self, label_tensor):
        """Gradient with respect to the input of the SoftMax whose output was the last prediction.

        What ``SoftMax.backward(self.backward(label))`` simplifies to:
        ``p * sum(label, axis=1) - label`` (``p - label`` for one-hot labels),
        with ``p`` the prediction. Unlike the composition it is finite for any
        logits (no division: a hopeless sample, its right class at
        ``p ~ 1e-44``, still gets its full gradient of about -1 there), and
        it costs three array operations. :class:`xpnn.NeuralNetwork` uses it
        when a SoftMax layer feeds this loss.
        """
        if self.prediction_tensor is None:
            raise RuntimeError("CrossEntropyLoss: backward called before forward")
        prediction_tensor, label_tensor = self._operands(self.prediction_tensor, label_tensor)
        xp = namespace(prediction_tensor)
        return prediction_tensor * xp.sum(label_tensor, axis=1, keepdims=True) - label_tensor

    def to(self, backend, dtype=None):
        """Rebind to ``backend`` (name or Backend) and move the cached prediction; returns self."""
        if isinstance(backend, Backend) and dtype is None:
            target = backend
        else:
            target = make_backend(backend, dtype or self.backend.dtype_name)
        self.backend = target
        if self.prediction_tensor is not None:
            host = target.to_numpy(self.prediction_tensor)
            self.prediction_tensor = target.asarray(host, dtype=target.dtype)
        return self
