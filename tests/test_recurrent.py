"""RNN and LSTM: the course's semantics (sizes, state carried only with memorize, updates that
reduce the loss), batches of sequences, errors, the network, moves and saving."""
import copy
import pickle

import numpy as np
import pytest

import xpnn
from xpnn import checkpoint as ckpt
from xpnn.initializers import Constant, He, UniformRandom, Xavier
from xpnn.layers import LSTM, RNN, FullyConnected, SoftMax
from xpnn.losses import CrossEntropyLoss
from xpnn.network import NeuralNetwork, load, save
from xpnn.optimizers import Adam, Sgd
from xpnn.regularizers import L2_Regularizer
from conftest import assert_close, assert_passes_leave_inputs_unchanged

LAYERS = {"RNN": RNN, "LSTM": LSTM}
GATES = {"RNN": 1, "LSTM": 4}
pytestmark = pytest.mark.parametrize("kind", list(LAYERS))


def _make(kind, input_size=13, hidden_size=7, output_size=5, initializer=He()):
    np.random.seed(0)
    layer = LAYERS[kind](input_size, hidden_size, output_size)
    layer.initialize(initializer, initializer)
    return layer


def test_sizes_of_one_sequence_and_of_a_batch_of_sequences(backend, kind):
    layer = _make(kind)
    assert layer.trainable and not layer.memorize
    assert tuple(layer.weights.shape) == (13 + 7 + 1, GATES[kind] * 7)
    assert tuple(layer.output_weights.shape) == (7 + 1, 5)
    for shape, out in (((9, 13), (9, 5)), ((9, 4, 13), (9, 4, 5)), ((1, 13), (1, 5))):
        output = layer.forward(np.random.rand(*shape))
        assert backend.owns(output) and tuple(output.shape) == out
        error = layer.backward(np.random.rand(*out))
        assert backend.owns(error) and tuple(error.shape) == shape
        assert tuple(layer.gradient_weights.shape) == tuple(layer.weights.shape)


def test_the_state_runs_along_the_time_axis(backend, kind):
    """The course's check: the same row twice gives two different outputs (h_0 = 0, then h_1)."""
    layer = _make(kind)
    output = xpnn.to_numpy(layer.forward(np.tile(np.random.rand(1, 13), (2, 1))))
    assert np.sum((output[0] - output[1]) ** 2) > 1e-8


def test_sequences_of_a_batch_are_independent(backend, kind):
    """A 3-D batch gives each sequence the output it gets alone (2-D)."""
    layer = _make(kind)
    batch = np.random.default_rng(1).standard_normal((6, 3, 13))
    together = xpnn.to_numpy(layer.forward(batch))
    for index in range(3):
        alone = layer.forward(batch[:, index, :])
        assert_close(alone, together[:, index, :], rtol=1e-12)


def test_state_is_carried_only_with_memorize(backend, kind):
    layer = _make(kind)
    sequence = np.random.rand(4, 2, 13)
    first = xpnn.to_numpy(layer.forward(sequence))
    assert_close(layer.forward(sequence), first, rtol=1e-14)
    assert all(getattr(layer, name) is None for name in layer.carried_names)
    layer.memorize = True
    assert_close(layer.forward(sequence), first, rtol=1e-14)  # starts from zero
    carried = xpnn.to_numpy(layer.forward(sequence))
    assert np.sum((carried - first) ** 2) > 1e-8
    layer.memorize = False
    assert_close(layer.forward(sequence), first, rtol=1e-14)
    assert all(getattr(layer, name) is None for name in layer.carried_names)


def test_memorize_runs_a_long_sequence_in_pieces(backend, kind):
    """With memorize, three pieces of a sequence give what the whole sequence gives."""
    whole_layer, pieces_layer = _make(kind), _make(kind)
    sequence = np.random.default_rng(2).standard_normal((9, 2, 13))
    whole = whole_layer.forward(sequence)
    pieces_layer.memorize = True
    pieces = [xpnn.to_numpy(pieces_layer.forward(sequence[start:start + 3])) for start in (0, 3, 6)]
    assert_close(whole, np.concatenate(pieces), rtol=1e-12)
    for name in pieces_layer.carried_names:
        assert tuple(getattr(pieces_layer, name).shape) == (2, 7)


def test_a_state_assigned_from_numpy_is_used(backend, kind):
    layer = _make(kind)
    layer.memorize = True
    sequence = np.random.rand(3, 2, 13)
    layer.forward(sequence)
    states = {name: xpnn.to_numpy(getattr(layer, name)) for name in layer.carried_names}
    expected = xpnn.to_numpy(layer.forward(sequence))
    for name, value in states.items():
        setattr(layer, name, value)
    assert_close(layer.forward(sequence), expected, rtol=1e-14)


def test_updates_reduce_the_loss(backend, kind):
    """Ten steps of Adam towards fixed targets, with and without memorize: the L2 loss falls."""
    for memorize in (False, True):
        layer = _make(kind, initializer=Xavier())
        layer.optimizer = Adam(1e-2, 0.9, 0.999)
        layer.memorize = memorize
        rng = np.random.default_rng(3)
        sequence, target = rng.standard_normal((5, 3, 13)), rng.random((5, 3, 5))
        losses = []
        for _ in range(10):
            output = xpnn.to_numpy(layer.forward(sequence))
            losses.append(np.sum((output - target) ** 2))
            layer.backward(2.0 * (output - target))
        assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses


def test_optimizer_steps_both_parts_with_their_own_copies(backend, kind):
    layer = _make(kind)
    layer.optimizer = Sgd(0.5)
    assert layer._output_optimizer is not layer.optimizer
    hidden, output = (xpnn.to_numpy(w) for w in (layer.weights, layer.output_weights))
    layer.forward(np.random.rand(4, 13))
    layer.backward(np.random.rand(4, 5))
    assert_close(layer.weights, hidden - 0.5 * xpnn.to_numpy(layer.gradient_weights), rtol=1e-12)
    assert_close(layer.output_weights,
                 output - 0.5 * xpnn.to_numpy(layer.fc_output.gradient_weights), rtol=1e-12)
    layer.trainable = False  # frozen: gradients, no steps
    frozen = xpnn.to_numpy(layer.weights)
    layer.forward(np.random.rand(4, 13))
    layer.backward(np.random.rand(4, 5))
    assert_close(layer.weights, frozen, rtol=0.0)


def test_initialize_uses_each_parts_fans(kind):
    class Recording:
        def __init__(self):
            self.calls = []

        def initialize(self, shape, fan_in, fan_out):
            self.calls.append((tuple(shape), fan_in, fan_out))
            return np.full(shape, 0.25)

    weights, bias = Recording(), Recording()
    layer = LAYERS[kind](13, 7, 5)
    layer.initialize(weights, bias)
    gates = GATES[kind] * 7
    assert weights.calls == [((20, gates), 20, gates), ((7, 5), 7, 5)]
    assert bias.calls == [((1, gates), 1, gates), ((1, 5), 1, 5)]
    assert np.all(xpnn.to_numpy(layer.weights) == 0.25)


def test_the_bias_reaches_the_output(backend, kind):
    """The course's check: zero input, uniform weights: the bias rows make the output positive."""
    layer = _make(kind, 1000, 20, 1, initializer=UniformRandom())
    assert float(xpnn.to_numpy(layer.forward(np.zeros((1, 1000)))).sum()) > 0


def test_passes_leave_their_inputs_unchanged(backend, kind):
    assert_passes_leave_inputs_unchanged(_make(kind), np.random.rand(4, 2, 13), backend)


def test_float32_throughout(backend32, kind):
    layer = _make(kind)
    layer.memorize = True
    output = layer.forward(np.random.rand(3, 2, 13))
    error = layer.backward(np.random.rand(3, 2, 5))
    for value in (output, error, layer.gradient_weights, layer.hidden_state):
        assert backend32.owns(value) and value.dtype == backend32.dtype


# -- errors ----------------------------------------------------------------------------

def test_bad_input_names_the_layer_and_the_shapes(backend, kind):
    layer = _make(kind)
    for shape in ((9, 12), (9,), (2, 3, 4, 13), (0, 13)):
        with pytest.raises(ValueError) as info:
            layer.forward(np.zeros(shape))
        assert str(info.value).startswith(f"{kind}: expected input of shape (time, 13) (one "
                                          f"sequence) or (time, batch, 13)"), str(info.value)
        assert f"received {shape}" in str(info.value)
    with pytest.raises(RuntimeError, match=f"{kind}: backward called before forward"):
        layer.backward(np.zeros((9, 5)))
    layer.forward(np.zeros((9, 2, 13)))
    with pytest.raises(ValueError, match=rf"{kind}: expected error of shape \(9, 2, 5\)"):
        layer.backward(np.zeros((9, 5)))


def test_memorize_with_another_batch_size_says_how_to_start_afresh(backend, kind):
    layer = _make(kind)
    layer.memorize = True
    layer.forward(np.zeros((3, 4, 13)))
    with pytest.raises(ValueError, match=r"memorize carries the hidden_state of 4 sequence\(s\)"
                                         r".*this input has 2.*layer\.hidden_state = None"):
        layer.forward(np.zeros((3, 2, 13)))
    for name in layer.carried_names:
        setattr(layer, name, None)
    assert tuple(layer.forward(np.zeros((3, 2, 13))).shape) == (3, 2, 5)


# -- in a network, moved, saved --------------------------------------------------------

class _Sequence:
    """A data layer: one fixed sequence of 12 steps (the course's batch axis is time)."""

    def __init__(self, classes=3):
        rng = np.random.default_rng(4)
        self.inputs = rng.standard_normal((12, 13))
        self.labels = np.eye(classes)[rng.integers(0, classes, 12)]

    def next(self):
        return self.inputs, self.labels


def _network(kind, optimizer):
    np.random.seed(1)
    net = NeuralNetwork(optimizer, Xavier(), Constant(0.1))
    net.data_layer, net.loss_layer = _Sequence(), CrossEntropyLoss()
    for layer in (LAYERS[kind](13, 7, 5), FullyConnected(5, 3), SoftMax()):
        net.append_layer(layer)
    return net


def test_a_course_network_with_the_layer_trains(backend, kind):
    net = _network(kind, Adam(1e-2, 0.9, 0.999))
    net.train(30)
    losses = [float(xpnn.to_numpy(value)) for value in net.loss]
    assert losses[-1] < 0.7 * losses[0], losses
    assert tuple(net.test(net.data_layer.inputs).shape) == (12, 3)


def test_regularization_loss_includes_both_parts(backend, kind):
    optimizer = Sgd(1e-2)
    optimizer.add_regularizer(L2_Regularizer(0.01))
    net = _network(kind, optimizer)
    recurrent, dense = net.layers[0], net.layers[1]
    squares = sum(np.sum(xpnn.to_numpy(w) ** 2) for w in (recurrent.weights,
                                                        recurrent.output_weights, dense.weights))
    assert_close(net.regularization_loss(), 0.01 * squares, rtol=1e-12)


def test_to_moves_parameters_states_caches_and_optimizers(backend, kind):
    """A step on the CPU, a forward pass, the move, then its backward pass and one more step:
    the numbers of a layer that stayed on the CPU, every array on the new backend."""
    with xpnn.use_backend("cpu", dtype="float64"):
        reference, moved = _make(kind), _make(kind)
    rng = np.random.default_rng(5)
    sequences, errors = rng.random((3, 3, 2, 13)), rng.random((3, 3, 2, 5))
    for layer in (reference, moved):
        layer.optimizer, layer.memorize = Adam(1e-2, 0.9, 0.999), True
        layer.forward(sequences[0])
        layer.backward(errors[0])
        layer.forward(sequences[1])
    assert moved.to(backend) is moved
    for layer in (reference, moved):
        layer.backward(errors[1])
    assert_close(moved.forward(sequences[2]), xpnn.to_numpy(reference.forward(sequences[2])),
                 rtol=1e-12)
    for name in ("weights", "output_weights", "hidden_state"):
        value = getattr(moved, name)
        assert backend.owns(value)
        assert_close(value, xpnn.to_numpy(getattr(reference, name)), rtol=1e-12, err_msg=name)
    for value in (moved.fc_hidden.weights, moved._optimizer.first_moment,
                  moved._output_optimizer.first_moment, moved._output_optimizer.second_moment):
        assert backend.owns(value)


def _trained_with_state(kind):
    net = _network(kind, Adam(1e-2, 0.9, 0.999))
    net.layers[0].memorize = True
    net.train(3)
    return net


def _assert_same_model(loaded, net, backend):
    for name in ("weights", "output_weights") + net.layers[0].carried_names:
        value = getattr(loaded.layers[0], name)
        assert value is not None and backend.owns(value), name
        assert_close(value, xpnn.to_numpy(getattr(net.layers[0], name)), rtol=0.0, err_msg=name)
    assert loaded.layers[0].memorize
    inputs = net.data_layer.inputs
    assert_close(loaded.test(inputs), xpnn.to_numpy(net.test(inputs)), rtol=1e-12)


def test_pickle_save_and_load_keep_weights_and_state(backend, kind, tmp_path):
    net = _trained_with_state(kind)
    save(str(tmp_path / "net.pkl"), net)
    loaded = load(str(tmp_path / "net.pkl"), net.data_layer)
    _assert_same_model(loaded, net, backend)
    assert pickle.loads(pickle.dumps(loaded)).layers[0].memorize


def test_npz_checkpoint_keeps_weights_state_and_optimizers(backend, kind, tmp_path):
    net = _trained_with_state(kind)
    ckpt.save_checkpoint(str(tmp_path), net, model="test")
    _, arrays = ckpt.read_checkpoint(str(tmp_path))
    assert {"layers.0.output_weights", "layers.0.hidden_state",
            "layers.0.output_optimizer.first_moment"} <= set(arrays)
    fresh = _network(kind, Adam(1e-2, 0.9, 0.999))
    fresh.layers[0].memorize = True
    ckpt.restore_network_arrays(fresh, arrays)
    _assert_same_model(fresh, net, backend)
    for slot in ("_optimizer", "_output_optimizer"):
        restored, original = (getattr(n.layers[0], slot) for n in (fresh, net))
        assert restored.step_count == original.step_count == 3
        assert_close(restored.second_moment, xpnn.to_numpy(original.second_moment), rtol=0.0)


def test_a_deep_copy_is_independent(backend, kind):
    layer = _make(kind)
    twin = copy.deepcopy(layer)
    twin.weights = np.zeros(tuple(layer.weights.shape))
    assert np.any(xpnn.to_numpy(layer.weights) != 0.0)
