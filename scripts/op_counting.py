"""How the operations of a step are counted (used by ``scripts/count_ops.py``).

* :class:`StrictCounter`: every array-api-strict operation xpnn calls, sorted into
  computing calls, views and allocations (:func:`operation_kind`) and put down to the
  layer and phase that made it (:func:`attribute`);
* :func:`torch_counter`: PyTorch's ATen operations (``TorchDispatchMode``), sorted alike
  (:func:`torch_kind`);
* :func:`cuda_kind`: a CUDA activity's kind (kernel, memset, copy) by its name.
"""
import collections
import sys

import array_api_strict
import numpy

#: Array operations that make no new values (the rest of the strict namespace computes).
VIEWS = {"reshape", "permute_dims", "matrix_transpose", "expand_dims", "squeeze",
         "broadcast_to", "broadcast_arrays", "unstack", "mT", "T"}
#: New arrays of constant (or no) values, or moved from elsewhere.
ALLOCATIONS = {"empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full",
               "full_like", "arange", "eye", "linspace", "from_dlpack"}
#: Array methods that are no array operation (conversions, printing, protocols).
NOT_OPERATIONS = {"__bool__", "__float__", "__int__", "__index__", "__complex__", "__array__",
                  "__dlpack__", "__dlpack_device__", "__repr__", "__iter__",
                  "__array_namespace__", "__new__", "__reduce__", "__buffer__", "__init__"}


# -- the generic path: array-api-strict, counted ----------------------------------------

class StrictCounter:
    """Counts every array-api-strict operation while active (a context manager).

    xpnn reaches the standard's functions both through ``backend.xp`` and
    through ``array_namespace(x)`` (optimizers, losses), which returns the
    ``array_api_strict`` module itself, and its operators through the arrays'
    class: so the counting namespace is array-api-strict itself, its public
    functions and its array methods replaced by counting ones while active
    (and restored after). Calls that array-api-strict makes inside an operation
    are not counted again.

    ``records`` lists ``(kind, name, owner, phase)`` per operation; ``owners``
    maps ``id(object)`` to ``(label, role)`` (see :func:`owners_of`).
    """

    def __init__(self, owners):
        self.owners = owners
        self.records = []
        self._depth = 0
        self._saved = []

    def __enter__(self):
        module, array = array_api_strict, array_api_strict._array_object.Array
        for name in module.__all__:
            value = getattr(module, name)
            if callable(value) and type(value).__name__ == "function":
                self._replace(module, name, self._counting(name, value))
        for name, value in list(vars(array).items()):
            if name in NOT_OPERATIONS:
                continue
            if isinstance(value, property) and name in ("mT", "T"):
                self._replace(array, name, property(self._counting(name, value.fget)))
            elif callable(value) and (name.startswith("__") or name == "to_device"):
                self._replace(array, name, self._counting(name, value))
        return self

    def __exit__(self, *exc):
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved = []

    def _replace(self, owner, name, value):
        self._saved.append((owner, name, getattr(owner, name) if owner is array_api_strict
                            else vars(owner)[name]))
        setattr(owner, name, value)

    def _counting(self, name, function):
        def counted(*args, **kwargs):
            if self._depth:  # (inside another operation)
                return function(*args, **kwargs)
            self._depth += 1
            try:
                result = function(*args, **kwargs)
            finally:
                self._depth -= 1
            kind = operation_kind(name, args, kwargs, result)
            if kind is not None:
                self.records.append((kind, name) + attribute(sys._getframe(1), self.owners))
            return result
        return counted


def operation_kind(name, args, kwargs, result):
    """``"compute"``, ``"view"``, ``"alloc"`` or None (not an array operation: ``finfo``, ...)."""
    Array = array_api_strict._array_object.Array
    if name == "__setitem__":
        return "compute"
    if not (isinstance(result, Array) or (isinstance(result, (tuple, list)) and result
                                         and isinstance(result[0], Array))):
        return None
    if name == "__getitem__":
        key = args[1] if isinstance(args[1], tuple) else (args[1],)
        return "compute" if any(isinstance(part, Array) for part in key) else "view"
    if name in ("asarray", "to_device"):
        moved = not isinstance(args[0], Array) or result.device != args[0].device
        copied = kwargs.get("copy") is True
        return "alloc" if moved else ("compute" if copied else "view")
    if name in VIEWS:
        # A reshape that cannot be a view (of a transposed array, say) copies: a kernel.
        return "view" if _shares_memory(args[0], result) else "compute"
    if name in ALLOCATIONS:
        return "alloc"
    return "compute"


def _shares_memory(source, result):
    """Whether ``result`` (an array or a list of them) views ``source``'s memory."""
    Array = array_api_strict._array_object.Array
    first = result[0] if isinstance(result, (tuple, list)) else result
    if not isinstance(source, Array):
        return True  # (broadcast_arrays and the like: counted as views)
    return bool(numpy.may_share_memory(source._array, first._array))


def owners_of(net):
    """``{id(object): (label, role)}``: the network's layers, their optimizers and regularizers,
    the loss layer and the network; ``label`` is ``"<index> <class>"`` for a layer."""
    owners = {id(net): ("network", "network"), id(net.loss_layer): ("loss", "loss")}
    for index, layer in enumerate(net.layers):
        label = f"{index} {type(layer).__name__}"
        owners[id(layer)] = (label, "layer")
        for optimizer in (getattr(layer, "_optimizer", None), getattr(layer, "_bias_optimizer", None)):
            if optimizer is not None:
                owners[id(optimizer)] = (label, "optimizer")
                if getattr(optimizer, "regularizer", None) is not None:
                    owners[id(optimizer.regularizer)] = (label, "regularizer")
    return owners


def attribute(frame, owners):
    """``(owner, phase)`` of the operation called from ``frame``: the innermost optimizer
    (``update``), regularizer (``update`` or ``norm``), loss layer, or layer's ``forward``/
    ``backward`` among the callers."""
    while frame is not None:
        function = frame.f_code.co_name
        owner = owners.get(id(frame.f_locals.get("self")))
        if owner is not None:
            label, role = owner
            if role == "optimizer":
                return label, "update"
            if role == "regularizer":
                return label, "norm" if function == "norm" else "update"
            if role == "loss":
                return label, "forward" if function == "forward" else "backward"
            if role == "layer" and function in ("forward", "backward"):
                return label, function
        frame = frame.f_back
    return "network", "other"


def torch_kind(func):
    """``"compute"``, ``"view"``, ``"alloc"`` or ``"host"`` (a scalar read to the host, e.g.
    Adam's step count on the CPU: no kernel) for an ATen operation."""
    name = func.overloadpacket.__name__
    if name == "_local_scalar_dense":
        return "host"
    if func.is_view or name in ("detach", "alias", "lift_fresh"):
        return "view"
    if name.split("_like")[0] in ("empty", "empty_strided", "zeros", "ones", "full"):
        return "alloc"
    return "compute"


def torch_counter():
    """A ``TorchDispatchMode`` that counts ATen operations by ``(kind, phase)`` in ``counts``;
    ``with counter.during("forward"):`` counts what runs inside as that phase."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class TorchCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.phase, self.counts = None, collections.Counter()

        def during(self, phase):
            self.phase = phase
            return self

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace != "profiler":  # (record_function markers: no array work)
                self.counts[torch_kind(func), self.phase] += 1
            return func(*args, **(kwargs or {}))

    return TorchCounter()


def cuda_kind(name):
    """``"kernel"``, ``"memset"`` or ``"copy"``: what a CUDA activity named ``name`` is."""
    lowered = name.lower()
    return "memset" if "memset" in lowered else "copy" if "memcpy" in lowered else "kernel"
