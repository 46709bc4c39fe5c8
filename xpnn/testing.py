"""Numerical gradient checks (central differences) that work on any backend.

The API follows the course framework: ``layers`` is a list whose last element
is a loss layer with ``forward(prediction, label)`` and ``backward(label)``;
the functions return the element-wise relative error between the analytical
and the numerical gradient as a NumPy array. Perturbations are made on host
copies and moved in through the layers' own input conversion, so the layers
under test may live on any backend. Use float64: the checks need it.
"""
import numpy as np

from xpnn.backend import seed as seed_all
from xpnn.backend import to_numpy

EPSILON = 1e-5


class L2Loss:
    """Sum of squared errors, the course's test loss: ``sum((p - y)**2)``."""

    def __init__(self):
        self.prediction_tensor = None

    def forward(self, prediction_tensor, label_tensor):
        self.prediction_tensor = prediction_tensor
        difference = to_numpy(prediction_tensor) - to_numpy(label_tensor)
        return float(np.sum(difference * difference))

    def backward(self, label_tensor):
        return 2.0 * (to_numpy(self.prediction_tensor) - to_numpy(label_tensor))


def _loss(layers, input_tensor, label_tensor, seed):
    if seed is not None:
        seed_all(seed)
    activation = input_tensor
    for layer in layers[:-1]:
        activation = layer.forward(activation)
    return float(to_numpy(layers[-1].forward(activation, label_tensor)))


def _backward(layers, input_tensor, label_tensor, seed):
    _loss(layers, input_tensor, label_tensor, seed)
    error_tensor = layers[-1].backward(label_tensor)
    for layer in reversed(layers[:-1]):
        error_tensor = layer.backward(error_tensor)
    return to_numpy(error_tensor)


def _relative_difference(analytical, numerical):
    scale = max(abs(analytical), abs(numerical))
    return 0.0 if scale < 1e-15 else abs(analytical - numerical) / scale


def gradient_check(layers, input_tensor, label_tensor, seed=None):
    """Relative error of the gradient with respect to the input, per element.

    Parameters
    ----------
    layers : list
        Layers followed by a loss layer (e.g. :class:`L2Loss`).
    input_tensor, label_tensor : array of any backend or NumPy
    seed : int, optional
        Re-seed every generator before each forward pass (layers that draw
        random numbers, such as Dropout, then see the same masks each time).

    Returns
    -------
    numpy.ndarray
        Same shape as ``input_tensor``.
    """
    host_input = np.array(to_numpy(input_tensor), dtype=np.float64)
    analytical = _backward(layers, host_input, label_tensor, seed)
    difference = np.zeros_like(host_input)
    for index in np.ndindex(host_input.shape):
        plus, minus = host_input.copy(), host_input.copy()
        plus[index] += EPSILON
        minus[index] -= EPSILON
        numerical = (_loss(layers, plus, label_tensor, seed)
                     - _loss(layers, minus, label_tensor, seed)) / (2 * EPSILON)
        difference[index] = _relative_difference(analytical[index], numerical)
    return difference


def gradient_check_weights(layers, input_tensor, label_tensor, bias=False, seed=None):
    """Relative error of the gradient with respect to ``layers[0]``'s weights (or bias).

    Parameters
    ----------
    bias : bool
        Check ``bias``/``gradient_bias`` instead of ``weights``/``gradient_weights``.

    Returns
    -------
    numpy.ndarray
        Same shape as the checked parameter.
    """
    layer = layers[0]
    name = "bias" if bias else "weights"
    parameter = np.array(to_numpy(getattr(layer, name)), dtype=np.float64)
    _backward(layers, input_tensor, label_tensor, seed)
    analytical = np.array(to_numpy(getattr(layer, "gradient_" + name)), dtype=np.float64)
    difference = np.zeros_like(parameter)
    for index in np.ndindex(parameter.shape):
        losses = []
        for step in (EPSILON, -EPSILON):
            shifted = parameter.copy()
            shifted[index] += step
            setattr(layer, name, shifted)
            losses.append(_loss(layers, input_tensor, label_tensor, seed))
        numerical = (losses[0] - losses[1]) / (2 * EPSILON)
        difference[index] = _relative_difference(analytical[index], numerical)
    setattr(layer, name, parameter)
    return difference
