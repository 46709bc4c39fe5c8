"""Adam steps that the worker process runs (xpnn.ops.delegated_updates).

With a batch cut in two processes the worker runs the array work of the
largest layers' Adam steps on moments in shared memory while this process
steps the others. The bits must be those of this process stepping every layer
itself (the same operations on the same values), the optimizer objects must
stay the truth (moments, step counts), and anything the worker cannot do
exactly (another optimizer, a replaced one, a regularizer other than L2) is
stepped here.
"""
import copy

import numpy as np
import pytest

import xpnn
from xpnn import NeuralNetwork
from xpnn.backend import make_backend
from xpnn.initializers import Constant, He
from xpnn.layers import BatchNormalization, Conv, Flatten, FullyConnected, Pooling, ReLU, SoftMax
from xpnn.losses import CrossEntropyLoss
from xpnn.ops import delegated_updates, numpy_ops, numpy_settings
from xpnn.ops.numpy_ops import NumpyOps
from xpnn.optimizers import Adam, Sgd
from xpnn.regularizers import L1_Regularizer, L2_Regularizer
from conftest import CyclingBatches, random_image_batches

BATCH = 2 * numpy_ops.MIN_SAMPLES_PER_PROCESS
BIG = (16 * 4 * 4 + 1, 120)  # the first fully connected layer's weights: the worker's step

pytestmark = pytest.mark.skipif(not numpy_settings.can_fork(),
                                reason="worker processes need fork on x86-64 (not this machine)")


@pytest.fixture
def cpu64(monkeypatch):
    """The float64 NumPy backend, current, one thread, two processes."""
    backend = make_backend("cpu", "float64")
    monkeypatch.setattr(backend.ops, "threads", 1)
    monkeypatch.setattr(backend.ops, "processes", 2)
    previous = xpnn.get_backend()
    xpnn.set_backend("cpu", "float64")
    yield backend
    xpnn.set_backend(previous.name, previous.dtype_name)


def _net(seed=5):
    xpnn.seed(seed)
    optimizer = Adam(1e-3, 0.9, 0.999)
    optimizer.add_regularizer(L2_Regularizer(1e-3))
    net = NeuralNetwork(optimizer, He(), Constant(0.1))
    for layer in (Conv((1, 1), (1, 3, 3), 16), BatchNormalization(16), ReLU(), Pooling((2, 2), (2, 2)),
                  Flatten(), FullyConnected(BIG[0] - 1, BIG[1]), ReLU(), FullyConnected(BIG[1], 4),
                  SoftMax()):
        net.append_layer(layer)
    net.loss_layer = CrossEntropyLoss()
    net.data_layer = random_image_batches(BATCH)
    return net


@pytest.fixture
def steps_here(monkeypatch):
    """Shapes of the weights whose Adam steps ran in this process (the worker's are its own)."""
    shapes = []
    step = NumpyOps.adam_update

    def recording(self, weights, *arguments):
        shapes.append(tuple(weights.shape))
        return step(self, weights, *arguments)

    monkeypatch.setattr(NumpyOps, "adam_update", recording)
    return shapes


def _without_delegation(monkeypatch):
    monkeypatch.setattr(delegated_updates, "choose", lambda layers, parameters, dtype: [])


def _state(net):
    """Every number that training changes, bit for bit comparable."""
    found = [np.asarray([float(value) for value in net.loss])]
    for layer in net.layers:
        if not layer.trainable:
            continue
        found += [layer.weights, layer.gradient_weights, np.asarray(layer.optimizer.step_count)]
        found += [layer.optimizer.first_moment, layer.optimizer.second_moment]
        if layer._bias is not None:
            found += [layer.bias, layer.gradient_bias, layer._bias_optimizer.first_moment]
    return [np.array(value, copy=True) for value in found]


def _assert_same_bits(mine, theirs):
    assert len(mine) == len(theirs)
    for index, (a, b) in enumerate(zip(mine, theirs)):
        np.testing.assert_array_equal(a, b, err_msg=f"entry {index}")


def _changed_midway_same_bits_as_without_delegation(monkeypatch, change, check=None):
    """Train two steps, ``change(net)``, two more, then ``check(net)``; the same again
    without delegation must give the same bits."""
    def train():
        net = _net()
        net.train(2)
        change(net)
        net.train(2)
        if check is not None:
            check(net)
        return net

    delegating = _state(train())
    _without_delegation(monkeypatch)
    _assert_same_bits(delegating, _state(train()))


def test_the_worker_steps_the_largest_layer_with_the_same_bits(cpu64, monkeypatch, steps_here):
    net = _net()
    net.train(4)
    delegated = net._order.index(net.layers[5])  # (run order: the ReLU moved behind the pooling)
    assert net._worker.updates.layers == [delegated]
    assert BIG not in steps_here and (16, 1, 3, 3) in steps_here  # the worker stepped it, this not
    # The optimizer keeps the moments the worker updated (they live in shared memory).
    moment = net.layers[5].optimizer.first_moment
    assert np.count_nonzero(moment) > moment.size // 2 and net.layers[5].optimizer.step_count == 4
    delegating = _state(net)
    net._worker.close()
    _without_delegation(monkeypatch)
    steps_here.clear()
    reference = _net()
    reference.train(4)
    assert reference._worker.updates.layers == [] and BIG in steps_here
    _assert_same_bits(delegating, _state(reference))


def test_a_replaced_optimizer_is_stepped_here(cpu64, monkeypatch, steps_here):
    def replace(net):
        replacement = copy.deepcopy(net.layers[5].optimizer)  # same numbers, its own moments
        net.layers[5].optimizer = replacement
        net.layers[5]._bias_optimizer = copy.deepcopy(replacement)
        steps_here.clear()

    def no_longer_the_workers(net):
        assert BIG in steps_here

    _changed_midway_same_bits_as_without_delegation(monkeypatch, replace, no_longer_the_workers)


def test_a_new_worker_takes_the_moments_over(cpu64, monkeypatch):
    # Another batch shape starts another worker: it moves the moments (then in the old
    # worker's shared memory) into its own, values unchanged.
    first_workers = []

    def another_batch_size(net):
        first_workers.append(net._worker)
        net.data_layer = CyclingBatches(net.data_layer.images, net.data_layer.labels, BATCH + 32)

    def another_worker(net):
        assert net._worker is not first_workers[-1]

    _changed_midway_same_bits_as_without_delegation(monkeypatch, another_batch_size, another_worker)


def test_a_delegating_network_pickles_and_copies_with_its_moments(cpu64):
    import pickle

    net = _net()
    net.train(2)
    shared = net.layers[5].optimizer.first_moment
    results = []
    pickled = pickle.loads(pickle.dumps(net))
    assert pickled.data_layer is None  # (the course's rule; network.load sets one)
    pickled.data_layer = copy.deepcopy(net.data_layer)
    for twin in (pickled, copy.deepcopy(net)):
        moment = twin.layers[5].optimizer.first_moment
        assert moment is not shared and not np.shares_memory(moment, shared)
        np.testing.assert_array_equal(moment, shared)
        xpnn.seed(7)
        twin.train(1)  # a worker of its own, the moments moved into its shared memory
        assert twin._worker is not net._worker and twin.layers[5].optimizer.first_moment is not moment
        results.append(_state(twin))
        twin._worker.close()
    xpnn.seed(7)
    net.train(1)
    for result in results:
        _assert_same_bits(result, _state(net))


def test_a_failing_step_here_still_takes_the_workers_steps(cpu64, monkeypatch):
    # The last layer's step fails on the third backward pass; the worker has already run the
    # large layer's step, counted by its optimizer: this process must take its result, as a
    # pass stepping every layer here would have stepped it before the failing one.
    class FailsOnTheThirdStep(Adam):
        def calculate_update(self, weight_tensor, gradient_tensor):
            if self.step_count == 2:
                raise FloatingPointError("FailsOnTheThirdStep")
            return super().calculate_update(weight_tensor, gradient_tensor)

    def train(net):
        net.layers[7].optimizer = FailsOnTheThirdStep(1e-3, 0.9, 0.999)
        with pytest.raises(FloatingPointError, match="FailsOnTheThirdStep"):
            net.train(4)
        return _state(net)

    delegating = train(_net())
    _without_delegation(monkeypatch)
    _assert_same_bits(delegating, train(_net()))


class OwnUpdate(FullyConnected):
    """A fully connected layer that steps its parameters its own way (here: as usual)."""

    def _update_parameters(self):
        super()._update_parameters()


@pytest.mark.parametrize("change", ["sgd", "l1", "own update", "float32"])
def test_only_plain_adam_steps_of_the_layers_dtype_are_delegated(change):
    layer = OwnUpdate(128, 64) if change == "own update" else FullyConnected(128, 64)
    optimizer = Sgd(0.1) if change == "sgd" else Adam(1e-3, 0.9, 0.999)
    if change == "l1":
        optimizer.add_regularizer(L1_Regularizer(1e-3))
    layer.optimizer = optimizer
    layer.initialize(He(), Constant(0.1))
    parameters = [((0, "weights"), layer.weights)]
    dtype = np.float32 if change == "float32" else layer.weights.dtype
    assert delegated_updates.choose([layer], parameters, dtype) == []
    plain = FullyConnected(128, 64)
    plain.optimizer = Adam(1e-3, 0.9, 0.999)
    plain.initialize(He(), Constant(0.1))
    assert delegated_updates.choose([plain], [((0, "weights"), plain.weights)], plain.weights.dtype) == [0]


def test_the_worker_takes_about_half_of_the_work():
    # Largest first, each to the side with less: one large layer is the worker's alone.
    layers, parameters = [], []
    for index, shape in enumerate([(785, 120), (121, 84), (85, 10), (120, 2)]):
        layer = FullyConnected(shape[0] - 1, shape[1])
        layer.optimizer = Adam(1e-3, 0.9, 0.999)
        layer.initialize(He(), Constant(0.1))
        layers.append(layer)
        parameters.append(((index, "weights"), layer.weights))
    dtype = layers[0].weights.dtype
    assert delegated_updates.choose(layers, parameters, dtype) == [0]
    # Two equal layers: one each. Small ones stay here (handing them over costs more).
    assert delegated_updates.choose(layers[1:2] * 2, [((0, "weights"), layers[1].weights),
                                                      ((1, "weights"), layers[1].weights)], dtype) == [0]
    assert delegated_updates.choose(layers[2:3], [((0, "weights"), layers[2].weights)], dtype) == []


class ScaledL2(L2_Regularizer):
    """An L2 of one's own: its gradient is not alpha * w, so the worker's fused decay is wrong."""

    def calculate_gradient(self, weights):
        return 3.0 * super().calculate_gradient(weights)


class AdamOfOnesOwn(Adam):
    """Adam with a step of one's own (here: as usual), which the worker does not know."""


@pytest.mark.parametrize("change", ["adam subclass", "l2 subclass"])
def test_subclasses_of_adam_or_l2_are_not_delegated(change):
    layer = FullyConnected(128, 64)
    layer.optimizer = AdamOfOnesOwn(1e-3, 0.9, 0.999) if change == "adam subclass" else Adam(1e-3, 0.9, 0.999)
    if change == "l2 subclass":
        layer.optimizer.add_regularizer(ScaledL2(1e-3))
    layer.initialize(He(), Constant(0.1))
    assert delegated_updates.choose([layer], [((0, "weights"), layer.weights)], layer.weights.dtype) == []


def test_a_layer_is_delegated_only_with_all_of_its_parameters():
    # A convolution's bias is a parameter of its own: handed over without it, the layer stays here.
    conv = Conv((1, 1), (16, 5, 5), 64)
    conv.optimizer = Adam(1e-3, 0.9, 0.999)
    conv.initialize(He(), Constant(0.1))
    dtype = conv.weights.dtype
    assert delegated_updates.choose([conv], [((0, "weights"), conv.weights)], dtype) == []
    assert delegated_updates.choose([conv], [((0, "weights"), conv.weights), ((0, "bias"), conv.bias)],
                                    dtype) == [0]


def test_a_regularizer_changed_after_the_worker_started_is_applied_here(cpu64, monkeypatch):
    def add_l1(net):
        for optimizer in (net.layers[5].optimizer, net.layers[5]._bias_optimizer):
            optimizer.add_regularizer(L1_Regularizer(1e-2))   # not the worker's fused L2

    _changed_midway_same_bits_as_without_delegation(monkeypatch, add_l1)


def test_a_layer_frozen_after_the_worker_started_is_not_stepped(cpu64):
    net = _net()
    net.train(2)
    big = net.layers[5]
    big.trainable = False
    weights, step_count = np.array(big.weights, copy=True), big.optimizer.step_count
    net.train(2)
    np.testing.assert_array_equal(big.weights, weights)
    assert big.optimizer.step_count == step_count


def test_weights_a_user_holds_keep_their_values_while_training_goes_on(cpu64):
    # The course API hands out new weight arrays at each step: an array read from a delegated
    # layer between steps is the user's, not a view of the shared memory the worker steps in place.
    net = _net()
    net.train(2)
    big = net.layers[5]
    held_weights, held_bias = big.weights, big.bias
    weights, bias = np.array(held_weights, copy=True), np.array(held_bias, copy=True)
    net.train(2)
    assert not np.array_equal(big.weights, weights)   # (the premise: the layer went on training)
    np.testing.assert_array_equal(held_weights, weights)
    np.testing.assert_array_equal(held_bias, bias)
