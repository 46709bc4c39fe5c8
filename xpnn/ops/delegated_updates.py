"""Adam steps that the worker process runs while this process runs the others.

After a training pass in two processes (:mod:`xpnn.ops.numpy_processes`) this
process used to apply every optimizer step alone while the worker had little
to do: a quarter of a millisecond of serial work a LeNet step for its first
fully connected layer alone. :class:`DelegatedUpdates` hands the array work of
some layers' Adam steps to the worker instead:

* before the fork, the chosen layers' Adam moments move into shared memory
  (the optimizer objects keep them as their own arrays, values unchanged);
* after each backward pass this process sums the layer's gradients as
  :meth:`~xpnn.layers.base.TrainableLayer.take_gradients` does, hands the sum
  over, and counts the step on its own optimizer
  (:meth:`xpnn.optimizers.Adam.next_step`: step count, bias corrections);
* the worker runs ``ops.adam_update`` with those numbers on the shared
  moments and the shared parameters (which its next forward pass reads),
  while this process updates the other layers; this process then takes the
  updated parameters back.

The same operations on the same values: the same bits as this process's own
step. Only a layer whose update is the base class's and whose optimizers are
exactly :class:`~xpnn.optimizers.Adam` with no regularizer or exactly an
:class:`~xpnn.regularizers.L2_Regularizer` is chosen, and only while its
optimizers still hold the shared moments (a replaced optimizer is stepped by
this process again). A failing step in this process still takes the worker's
results; a step failing in the worker (its error is raised here) leaves that
layer's step counted and its parameters as they were.
"""
import numpy as np

from xpnn.layers.base import TrainableLayer
from xpnn.ops.shared_memory import SharedArrays
from xpnn.optimizers import Adam
from xpnn.regularizers import L2_Regularizer

#: The fixed cost of one Adam step in parameter values: its ~16 short NumPy calls take
#: about as long as the arithmetic on this many values (~12 µs here).
CALL_VALUES = 5000
#: Layers with fewer parameter values than this stay here: handing a step over and taking it
#: back costs this process ~20 µs, what the step itself costs at ~4,000 values.
MIN_VALUES = 1 << 13


class DelegatedUpdates:
    """The layers whose Adam steps the worker runs, and their shared arrays.

    Made in this process before the fork (the arrays are shared mappings).

    Parameters
    ----------
    layers : list
        The network's layers (in run order).
    parameters : list of ((layer index, name), array)
        The parameters the worker holds, in its order (``piece_worker._parameters``).
    dtype : dtype
        The backend's float dtype (that of the shared arrays).

    Attributes
    ----------
    layers : list of int
        Indices of the layers chosen (see :func:`choose`).
    """

    def __init__(self, layers, parameters, dtype):
        self.layers = choose(layers, parameters, dtype)
        self._positions = [position for position, ((index, _), _) in enumerate(parameters)
                           if index in self.layers]
        self._names = [parameters[position][0] for position in self._positions]
        shapes = [tuple(parameters[position][1].shape) for position in self._positions]
        self._sums = SharedArrays(shapes, dtype).arrays
        self._first = SharedArrays(shapes, dtype).arrays
        self._second = SharedArrays(shapes, dtype).arrays
        self._scratch = [None] * len(shapes)  # the worker's own working arrays
        for slot, (index, name) in enumerate(self._names):
            optimizer = optimizer_of(layers[index], name)
            for shared, attribute in ((self._first[slot], "first_moment"),
                                      (self._second[slot], "second_moment")):
                value = getattr(optimizer, attribute)
                if value is not None and tuple(value.shape) == shared.shape:
                    shared[...] = value  # (else zeros: what a first step makes)
                setattr(optimizer, attribute, shared)

    def active(self, layers, stop):
        """The chosen layers below ``stop`` that are trainable (not frozen since) and whose
        optimizers still hold the shared moments."""
        found = set(self.layers)
        for slot, (index, name) in enumerate(self._names):
            optimizer = optimizer_of(layers[index], name)
            if (index >= stop or not layers[index].trainable or type(optimizer) is not Adam
                    or optimizer.first_moment is not self._first[slot]
                    or optimizer.second_moment is not self._second[slot]
                    or not _plain_regularizer(optimizer)):
                found.discard(index)
        return found

    def hand_over(self, layers, indices):
        """In this process: put the summed gradients of ``indices`` where the worker reads them
        and count their steps; returns the worker's part, ``[(slot, hyper), ...]``."""
        steps = []
        for slot, (index, name) in enumerate(self._names):
            if index not in indices:
                continue
            layer = layers[index]
            self._sums[slot][...] = getattr(layer, "gradient_" + name)
            optimizer = optimizer_of(layer, name)
            decay = 0.0 if optimizer.regularizer is None else optimizer.regularizer.alpha
            _, hyper = optimizer.next_step(getattr(layer, name), decay)
            steps.append((slot, hyper))
        return steps

    def run(self, steps, ops, shared_parameters):
        """In the worker: each step's ``ops.adam_update``, in place on the shared parameters."""
        for slot, hyper in steps:
            weights = shared_parameters[self._positions[slot]]
            if self._scratch[slot] is None:
                self._scratch[slot] = np.empty_like(weights)
            moments = (self._first[slot], self._second[slot], self._scratch[slot])
            weights[...] = ops.adam_update(weights, self._sums[slot], moments, *hyper)

    def take_back(self, layers, indices, shared_parameters):
        """In this process, once the worker has run: the updated parameters of ``indices``."""
        for slot, (index, name) in enumerate(self._names):
            if index in indices:
                setattr(layers[index], name, np.array(shared_parameters[self._positions[slot]]))


def choose(layers, parameters, dtype):
    """Indices of the layers whose steps the worker runs: about half of the work.

    The work of a layer's update is its parameters' values plus
    :data:`CALL_VALUES` per parameter. Layers that may go (see :func:`delegable`;
    at least :data:`MIN_VALUES` values), largest first, go to the worker while
    its share is not larger than this process's (which starts with the layers
    that may not go).
    """
    owned = {}
    for (owner, name), array in parameters:
        owned.setdefault(owner, []).append((name, array))
    work, fixed = {}, 0
    for index, arrays in owned.items():
        values = sum(array.size for _, array in arrays)
        cost = values + CALL_VALUES * len(arrays)
        if (values >= MIN_VALUES and {array.dtype for _, array in arrays} == {np.dtype(dtype)}
                and delegable(layers[index], [name for name, _ in arrays])):
            work[index] = cost
        else:
            fixed += cost
    mine, theirs, chosen = fixed, 0, []
    for index in sorted(work, key=lambda index: -work[index]):
        if theirs <= mine:
            chosen.append(index)
            theirs += work[index]
        else:
            mine += work[index]
    return sorted(chosen)


def delegable(layer, names):
    """True when the worker may run ``layer``'s update of parameters ``names``.

    The layer is trainable (not frozen), updates as the base class does,
    exactly ``names`` (its bias too when it has one of its own), each with an
    optimizer that is exactly Adam with no regularizer or exactly an L2 one.
    """
    if (not layer.trainable or type(layer).take_gradients is not TrainableLayer.take_gradients
            or type(layer)._update_parameters is not TrainableLayer._update_parameters):
        return False
    if set(names) != ({"weights", "bias"} if layer._bias is not None else {"weights"}):
        return False
    return all(type(optimizer_of(layer, name)) is Adam and _plain_regularizer(optimizer_of(layer, name))
               for name in names)


def optimizer_of(layer, name):
    """The optimizer that steps ``layer``'s parameter ``name`` (the bias has its own copy)."""
    return layer._bias_optimizer if name == "bias" else layer.optimizer


def _plain_regularizer(optimizer):
    return optimizer.regularizer is None or type(optimizer.regularizer) is L2_Regularizer
