"""The layer protocol shared by every layer (course-compatible)."""
import copy

from array_api_compat import is_array_api_obj

from xpnn.backend import Backend, get_backend, make_backend


class BaseLayer:
    """A layer with ``forward``/``backward``, bound to the backend current at construction.

    Attributes
    ----------
    trainable : bool
        True for layers with parameters that an optimizer updates. Setting it
        to False on such a layer freezes it: ``backward`` still returns the
        error for the layer below, but no optimizer step changes its
        parameters, even with an optimizer set; the network leaves it out of
        the regularization loss.
    testing_phase : bool
        False while training; True switches layers such as Dropout and
        BatchNormalization to their inference behaviour.
    backend : xpnn.backend.Backend
        Where this layer's parameters live and what ``forward`` returns.
    """

    #: Names of the attributes holding arrays that ``to()`` must move.
    state_names = ()
    #: When True, ``backward`` may skip the input gradient and return None.
    #: :class:`xpnn.NeuralNetwork` sets it on its first layer for the
    #: duration of that layer's ``backward`` (nothing below it needs the
    #: gradient); a layer used on its own always computes it.
    skip_input_gradient = False
    #: True for a layer whose testing-phase ``forward`` treats every sample on its own
    #: and may run on two pieces of a batch at the same time (two threads): then
    #: :meth:`xpnn.NeuralNetwork.test` lets the backend cut a large batch
    #: (``ops.map_samples``). False (the safe default, e.g. for a user's own layer)
    #: keeps the whole network on the whole batch.
    runs_in_pieces = False

    def __init__(self):
        self.trainable = False
        self.testing_phase = False
        self.backend = get_backend()

    @property
    def name(self):
        """The layer's class name, used in error messages."""
        return type(self).__name__

    def _as_input(self, tensor):
        """Move ``tensor`` (any backend, NumPy or nested lists) here, in the layer's dtype."""
        return self.backend.asarray(tensor, dtype=self.backend.dtype)

    def to(self, backend, dtype=None):
        """Move this layer's arrays to ``backend`` (a name or Backend); returns self.

        A name keeps the layer's dtype unless ``dtype`` is given; a Backend
        object is used as it is (its device and dtype). Besides the attributes
        in ``state_names``, every other array attribute (forward caches,
        running statistics) moves too, so that a pickled layer holds no array
        of the old backend (``network.save`` relies on this).
        """
        if isinstance(backend, Backend) and dtype is None:
            target = backend
        else:
            target = make_backend(backend, dtype or self.backend.dtype_name)
        # Switch first: the weights/bias setters convert to ``self.backend``.
        self.backend = target
        for attribute in self.state_names:
            value = getattr(self, attribute, None)
            if value is not None:
                setattr(self, attribute, _move(value, target))
        for attribute, value in list(vars(self).items()):
            if is_array_api_obj(value) and not _settled(value, target):
                setattr(self, attribute, _move(value, target))
        for attribute in ("_optimizer", "_bias_optimizer"):
            optimizer = getattr(self, attribute, None)
            if optimizer is not None:
                optimizer.to(target)
        return self

    def forward(self, input_tensor):
        raise NotImplementedError

    def backward(self, error_tensor):
        raise NotImplementedError


def _without_leading_ones(shape):
    """``shape`` without its leading axes of length 1."""
    shape = tuple(int(n) for n in shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def _settled(value, target):
    """True when array ``value`` needs no move to ``target``: its array already, and in its
    float dtype if a float array (a cache after ``to(dtype=...)`` would keep the old one)."""
    return target.owns(value) and (value.dtype == target.dtype
                                   or not target.xp.isdtype(value.dtype, "real floating"))


def _move(value, target):
    """Move an array to ``target`` keeping float arrays in its dtype, other dtypes as they are."""
    if isinstance(value, (int, float)):
        return value
    host = target.to_numpy(value)
    dtype = target.dtype_name if host.dtype.kind == "f" else None
    return target.asarray(host, dtype=dtype)


class TrainableLayer(BaseLayer):
    """A layer with ``weights`` (and usually ``bias``) and an optional optimizer.

    ``weights`` and ``bias`` are properties: assigning a NumPy array (or an
    array of another backend) moves it to this layer's backend and dtype.
    Each layer owns its optimizer object; :class:`xpnn.NeuralNetwork` gives
    every trainable layer a deep copy of the network's optimizer.
    ``trainable = False`` freezes the layer (see :class:`BaseLayer`): its
    parameters stay as they are (or as assigned), its optimizer is not stepped.
    """

    state_names = ("weights", "bias", "gradient_weights", "gradient_bias")
    # Class-level defaults rather than assignments in __init__, so that a
    # subclass may expose a gradient as a read-only property
    # (FullyConnected's gradient_bias is a row of gradient_weights).
    gradient_weights = None
    gradient_bias = None

    def __init__(self):
        super().__init__()
        self.trainable = True
        self._weights = None
        self._bias = None
        self._optimizer = None
        self._bias_optimizer = None

    @property
    def weights(self):
        return self._weights

    @weights.setter
    def weights(self, value):
        self._weights = self._checked_parameter("weights", value)

    @property
    def bias(self):
        return self._bias

    @bias.setter
    def bias(self, value):
        self._bias = self._checked_parameter("bias", value)

    def parameter_shapes(self):
        """``{"weights": shape, "bias": shape}`` that assigned parameters must have ({}: any)."""
        return {}

    def _checked_parameter(self, name, value):
        """``value`` on this layer's backend and dtype; a wrong shape is a clear error now,
        not a broken matrix product in the next forward pass.

        A shape that differs only by leading axes of length 1 is reshaped: course code
        assigns a single kernel as ``(3, 3)`` and then adds the leading axes with
        ``np.expand_dims``. (Inner ones may not move: ``(1, 2, 3, 1)`` is no ``(2, 1, 1, 3)``.)
        """
        value = self._as_input(value)
        expected = self.parameter_shapes().get(name)
        if expected is not None and tuple(value.shape) != tuple(expected):
            if _without_leading_ones(value.shape) != _without_leading_ones(expected):
                raise ValueError(f"{type(self).__name__}: {name} must have shape "
                                 f"{tuple(expected)}, received {tuple(value.shape)}")
            value = self.backend.xp.reshape(value, tuple(expected))
        return value

    @property
    def optimizer(self):
        return self._optimizer

    @optimizer.setter
    def optimizer(self, value):
        # The bias gets its own deep copy so that stateful optimizers
        # (momentum, Adam) keep separate state per parameter.
        self._optimizer = value
        self._bias_optimizer = None if value is None else copy.deepcopy(value)

    def _update_parameters(self):
        """Apply the optimizer (if set) to weights and bias after a backward pass; a frozen
        layer (``trainable`` False) keeps its parameters."""
        if self._optimizer is None or not self.trainable:
            return
        self._weights = self._optimizer.calculate_update(self._weights, self.gradient_weights)
        if self._bias is not None and self.gradient_bias is not None:
            self._bias = self._bias_optimizer.calculate_update(self._bias, self.gradient_bias)
