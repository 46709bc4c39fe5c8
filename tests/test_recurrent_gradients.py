"""RNN and LSTM gradients: numerical checks in float64 (input, FC_h's and FC_y's weights, with
and without memorize) and the same equations differentiated by PyTorch's autograd.

The numerical checks sum the element-wise relative differences (the course's criterion,
<= 1e-5 here). That sum is noise-bound wherever a gradient entry nearly cancels (its
finite difference then has few correct digits), so the layers here are small, on fixed
data; the comparison with autograd is the tight one (<= 1e-10 relative).
"""
import numpy as np
import pytest

import xpnn
from xpnn.initializers import Xavier
from xpnn.layers import LSTM, RNN
from xpnn.testing import L2Loss, gradient_check, gradient_check_weights

torch = pytest.importorskip("torch")

LAYERS = {"RNN": RNN, "LSTM": LSTM}


class FixedStart:
    """A recurrent layer in a gradient check: every forward starts from the same carried
    states (with memorize, each forward would otherwise start where the last ended), and
    ``weights``/``gradient_weights`` are those of the part under check."""

    trainable = False

    def __init__(self, layer, states, part="hidden"):
        self.layer, self.states, self.part = layer, states, part

    @property
    def _fully_connected(self):
        return self.layer.fc_hidden if self.part == "hidden" else self.layer.fc_output

    @property
    def weights(self):
        return self._fully_connected.weights

    @weights.setter
    def weights(self, value):
        self._fully_connected.weights = value

    @property
    def gradient_weights(self):
        return self._fully_connected.gradient_weights

    def forward(self, input_tensor):
        for name, value in self.states.items():
            setattr(self.layer, name, value)
        return self.layer.forward(input_tensor)

    def backward(self, error_tensor):
        return self.layer.backward(error_tensor)


def _layer_and_data(kind, shape, memorize):
    """A small Xavier-initialized layer (4 inputs, 3 hidden, 2 outputs), an input of ``shape``
    and labels; with memorize, the states after a first sequence (of ``shape`` too)."""
    np.random.seed(3)
    layer = LAYERS[kind](4, 3, 2)
    layer.initialize(Xavier(), Xavier())
    rng = np.random.default_rng(4)
    first, second = rng.standard_normal(shape), rng.standard_normal(shape)
    labels = rng.random(shape[:-1] + (2,))
    layer.memorize = memorize
    layer.forward(first)
    states = {name: getattr(layer, name) for name in layer.carried_names}
    if memorize:
        assert all(value is not None for value in states.values())
    return layer, states, second, labels


@pytest.mark.parametrize("memorize", [False, True], ids=["fresh", "memorize"])
@pytest.mark.parametrize("shape", [(6, 4), (4, 3, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_numerical_gradients(backend, kind, shape, memorize):
    layer, states, input_tensor, labels = _layer_and_data(kind, shape, memorize)
    checks = {
        "input": gradient_check([FixedStart(layer, states), L2Loss()], input_tensor, labels),
        "FC_h weights": gradient_check_weights([FixedStart(layer, states), L2Loss()],
                                               input_tensor, labels),
        "FC_y weights": gradient_check_weights([FixedStart(layer, states, "output"), L2Loss()],
                                               input_tensor, labels),
    }
    for name, difference in checks.items():
        assert np.sum(difference) <= 1e-5, f"{kind} {name}: {np.sum(difference)}"


# -- PyTorch autograd ------------------------------------------------------------------

def torch_reference(kind, weights, output_weights, sequences, error, hidden, cell):
    """The layer's equations written in torch (float64): returns the output, the gradients
    of ``sum(output * error)`` with respect to the input, FC_h's and FC_y's weights, and the
    last hidden and cell states. Gate columns: forget, input, output, candidate."""
    weights = torch.tensor(weights, requires_grad=True)
    output_weights = torch.tensor(output_weights, requires_grad=True)
    sequences = torch.tensor(sequences, requires_grad=True)
    hidden, cell = torch.tensor(hidden), torch.tensor(cell)
    size, ones = hidden.shape[1], torch.ones((hidden.shape[0], 1), dtype=torch.float64)
    outputs = []
    for step in sequences:
        pre = torch.cat([step, hidden, ones], dim=1) @ weights
        if kind == "RNN":
            hidden = torch.tanh(pre)
        else:
            forget, input_gate, output_gate = (torch.sigmoid(pre[:, k * size:(k + 1) * size])
                                               for k in range(3))
            cell = forget * cell + input_gate * torch.tanh(pre[:, 3 * size:])
            hidden = output_gate * torch.tanh(cell)
        outputs.append(torch.sigmoid(torch.cat([hidden, ones], dim=1) @ output_weights))
    output = torch.stack(outputs)
    (output * torch.tensor(error)).sum().backward()
    return {"output": output.detach().numpy(), "input": sequences.grad.numpy(),
            "FC_h": weights.grad.numpy(), "FC_y": output_weights.grad.numpy(),
            "hidden": hidden.detach().numpy(), "cell": cell.detach().numpy()}


def _relative(actual, expected):
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


@pytest.mark.parametrize("memorize", [False, True], ids=["fresh", "memorize"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradients_match_pytorch_autograd(backend, kind, memorize):
    """Two sequences of a batch of 3 (the second starting from the first's states with
    memorize); the second's output, gradients and final states against autograd."""
    np.random.seed(5)
    layer = LAYERS[kind](5, 4, 3)
    layer.initialize(Xavier(), Xavier())
    layer.memorize = memorize
    rng = np.random.default_rng(6)
    first, second = rng.standard_normal((7, 3, 5)), rng.standard_normal((7, 3, 5))
    error = rng.standard_normal((7, 3, 3))
    weights, output_weights = (xpnn.to_numpy(w) for w in (layer.weights, layer.output_weights))
    zeros = np.zeros((3, 4))
    start = torch_reference(kind, weights, output_weights, first, error, zeros, zeros)
    layer.forward(first)
    hidden, cell = (start["hidden"], start["cell"]) if memorize else (zeros, zeros)
    expected = torch_reference(kind, weights, output_weights, second, error, hidden, cell)
    actual = {"output": layer.forward(second), "input": layer.backward(error),
              "FC_h": layer.gradient_weights, "FC_y": layer.fc_output.gradient_weights}
    if memorize:
        actual["hidden"] = layer.hidden_state
        if kind == "LSTM":
            actual["cell"] = layer.cell_state
    for name, value in actual.items():
        assert backend.owns(value), name
        assert _relative(xpnn.to_numpy(value), expected[name]) <= 1e-10, name
