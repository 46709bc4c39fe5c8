"""NeuralNetwork: regularization loss, phase, per-layer optimizers, Iris training, save/load, to()."""
import copy
import functools
import pickle

import numpy as np
import pytest

import xpnn
from xpnn import NeuralNetwork
from xpnn.initializers import Constant, He
from xpnn.layers import BatchNormalization, FullyConnected, ReLU, SoftMax, TanH
from xpnn.losses import CrossEntropyLoss
from xpnn.network import load, save
from xpnn.optimizers import Adam, Sgd, SgdWithMomentum
from xpnn.regularizers import L1_Regularizer, L2_Regularizer
from conftest import assert_close, backend_unavailable_reason

EPS64 = np.finfo(np.float64).eps


@functools.lru_cache(maxsize=None)
def iris():
    """Iris (shipped with scikit-learn): fixed shuffle, 100 train / 50 test, standardized.

    Features are standardized with the training part's mean and deviation.
    Returns (train_x, train_one_hot, test_x, test_classes).
    """
    datasets = pytest.importorskip("sklearn.datasets", reason="Iris comes from scikit-learn")
    bunch = datasets.load_iris()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    features, classes = bunch.data[order], bunch.target[order]
    train, test = features[:100], features[100:]
    mean, deviation = train.mean(axis=0), train.std(axis=0)
    one_hot = np.eye(3)[classes[:100]]
    return (train - mean) / deviation, one_hot, (test - mean) / deviation, classes[100:]


class IrisData:
    """Course-style data layer: ``next()`` cycles through the training set in batches of 25."""

    def __init__(self, batch_size=25):
        self.inputs, self.labels, _, _ = iris()
        self.batch_size = batch_size
        self.position = 0

    def next(self):
        batch = slice(self.position, self.position + self.batch_size)
        self.position = (self.position + self.batch_size) % len(self.labels)
        return self.inputs[batch], self.labels[batch]


class FixedData:
    """Always returns the same batch."""

    def __init__(self, inputs, labels):
        self.inputs, self.labels = inputs, labels

    def next(self):
        return self.inputs, self.labels


def build(optimizer, hidden=8, data_layer=None):
    """4 -> hidden -> 3 classifier with He weights and 0.1 biases (seeded by the caller)."""
    net = NeuralNetwork(optimizer, He(), Constant(0.1))
    net.data_layer = data_layer if data_layer is not None else IrisData()
    net.loss_layer = CrossEntropyLoss()
    for layer in (FullyConnected(4, hidden), ReLU(), FullyConnected(hidden, 3), SoftMax()):
        net.append_layer(layer)
    return net


def accuracy(net):
    _, _, test_inputs, test_classes = iris()
    predicted = np.argmax(xpnn.to_numpy(net.test(test_inputs)), axis=1)
    return np.mean(predicted == test_classes)


OPTIMIZERS = {
    "sgd": lambda: Sgd(1e-2),
    "momentum": lambda: SgdWithMomentum(5e-3, 0.9),
    "adam": lambda: Adam(1e-2, 0.9, 0.999),
}


# -- training on real data --------------------------------------------------------

@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_iris_reaches_90_percent(backend, optimizer):
    np.random.seed(0)
    net = build(OPTIMIZERS[optimizer]())
    net.train(300)   # 75 epochs of 4 batches
    assert accuracy(net) >= 0.9
    assert all(layer.backend is backend for layer in net.layers)


def test_loss_entries_stay_backend_arrays(backend):
    net = build(Sgd(1e-2))
    net.train(3)
    assert len(net.loss) == 3
    assert all(backend.owns(value) and value.ndim == 0 for value in net.loss)


def test_np_sum_of_loss_on_numpy():
    with xpnn.use_backend("cpu"):
        net = build(Sgd(1e-2))
        net.train(4)
    total = np.sum(net.loss)
    assert np.isfinite(total)
    assert total == pytest.approx(sum(float(value) for value in net.loss), rel=1e-14)


# -- the container ------------------------------------------------------------------

def _reference_losses(net, inputs, labels):
    """Data loss and (weights incl. bias rows) sums of squares/absolutes, by hand in NumPy."""
    first, second = (xpnn.to_numpy(net.layers[i].weights) for i in (0, 2))
    hidden = np.maximum(np.hstack([inputs, np.ones((len(inputs), 1))]) @ first, 0.0)
    scores = np.hstack([hidden, np.ones((len(inputs), 1))]) @ second
    exponentials = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities = exponentials / exponentials.sum(axis=1, keepdims=True)
    data_loss = -np.sum(labels * np.log(probabilities + EPS64))
    squares = np.sum(first ** 2) + np.sum(second ** 2)
    absolutes = np.sum(np.abs(first)) + np.sum(np.abs(second))
    return data_loss, squares, absolutes


@pytest.mark.parametrize("regularizer", [None, "L2", "L1"])
def test_regularization_loss_present_iff_regularizer(backend, regularizer):
    inputs, labels, _, _ = iris()
    optimizer = Sgd(1e-2)
    if regularizer == "L2":
        optimizer.add_regularizer(L2_Regularizer(0.01))
    elif regularizer == "L1":
        optimizer.add_regularizer(L1_Regularizer(0.02))
    net = build(optimizer, data_layer=FixedData(inputs[:10], labels[:10]))
    loss = net.forward()
    assert backend.owns(loss) and loss.ndim == 0
    data_loss, squares, absolutes = _reference_losses(net, inputs[:10], labels[:10])
    extra = {None: 0.0, "L2": 0.01 * squares, "L1": 0.02 * absolutes}[regularizer]
    assert extra > 1e-3 or regularizer is None   # the term is large enough to be seen
    assert_close(loss, data_loss + extra, rtol=1e-12)


def test_phase_reaches_every_layer(backend):
    net = build(Sgd(1e-2))
    net.phase = True
    assert all(layer.testing_phase for layer in net.layers)
    net.append_layer(TanH())   # a layer added later joins the current phase
    assert net.layers[-1].testing_phase
    net.phase = False
    assert not any(layer.testing_phase for layer in net.layers)
    net.layers.pop()
    net.test(iris()[2])
    assert net.phase and all(layer.testing_phase for layer in net.layers)
    net.train(1)
    assert not net.phase and not any(layer.testing_phase for layer in net.layers)


def test_train_batch_after_test_trains_in_training_phase(backend):
    # train_batch is called by loops of one's own (not only xpnn.training, which sets
    # the phase itself): a step after test() must run in training phase, where batch
    # norm normalizes with the batch's statistics and records them as running ones.
    np.random.seed(0)
    net = NeuralNetwork(Sgd(1e-2), He(), Constant(0.1))
    net.loss_layer = CrossEntropyLoss()
    for layer in (FullyConnected(4, 5), BatchNormalization(5), ReLU(), FullyConnected(5, 3),
                  SoftMax()):
        net.append_layer(layer)
    rng = np.random.default_rng(3)
    inputs = rng.standard_normal((12, 4))
    labels = np.eye(3)[rng.integers(0, 3, 12)]
    batch_norm = net.layers[1]
    net.test(backend.asarray(inputs))
    assert net.phase and batch_norm.running_mean is None   # testing phase records nothing
    # The hidden layer's batch mean, by hand from the weights before the step (bias row last).
    weights = xpnn.to_numpy(net.layers[0].weights)
    batch_mean = (np.hstack([inputs, np.ones((12, 1))]) @ weights).mean(axis=0)
    net.train_batch(backend.asarray(inputs), backend.asarray(labels))
    assert net.phase is False and not any(layer.testing_phase for layer in net.layers)
    assert batch_norm.running_mean is not None, "the step ran in testing phase"
    assert_close(batch_norm.running_mean, batch_mean, rtol=1e-10, atol=1e-12)


def test_each_trainable_layer_has_its_own_optimizer(backend):
    net = build(SgdWithMomentum(5e-3, 0.9), hidden=6)
    first, second = net.layers[0], net.layers[2]
    assert first.optimizer is not second.optimizer
    assert net.optimizer not in (first.optimizer, second.optimizer)
    assert type(first.optimizer) is SgdWithMomentum
    net.train(2)
    # state is per layer: each velocity has its own layer's weight shape
    assert tuple(first.optimizer.velocity.shape) == (5, 6)
    assert tuple(second.optimizer.velocity.shape) == (7, 3)
    assert net.optimizer.velocity is None


def test_phase_refuses_a_string():
    net = build(Sgd(1e-2))
    with pytest.raises(TypeError, match="phase is a bool"):
        net.phase = "train"  # bool("train") would be True: the testing phase
    assert not net.phase and not any(layer.testing_phase for layer in net.layers)


def test_a_network_without_initializers_keeps_the_layers_weights(backend):
    # The course's first exercise builds NeuralNetwork(optimizer) and its layers keep the
    # uniform [0, 1) weights they were made with.
    np.random.seed(2)
    layer = FullyConnected(3, 2)
    made_with = xpnn.to_numpy(layer.weights).copy()
    net = NeuralNetwork(Sgd(1e-2))
    net.append_layer(layer)
    np.testing.assert_array_equal(xpnn.to_numpy(layer.weights), made_with)
    assert layer.optimizer is not None
    with pytest.raises(ValueError, match="both a weights and a bias initializer, or neither"):
        NeuralNetwork(Sgd(1e-2), He())


class GeneratorData(IrisData):
    """A course data set: it holds a generator, which does not pickle."""

    def __init__(self):
        super().__init__()
        self.batches = (index for index in range(10))


def test_pickling_leaves_the_data_layer_out_and_a_deep_copy_keeps_it():
    net = build(Sgd(1e-2), data_layer=GeneratorData())
    with pytest.raises(TypeError):
        pickle.dumps(net.data_layer)  # (the premise)
    restored = pickle.loads(pickle.dumps(net))  # the course's rule: a data layer is not the model
    assert restored.data_layer is None and net.data_layer is not None
    np.testing.assert_array_equal(restored.layers[0].weights, net.layers[0].weights)
    plain = build(Sgd(1e-2))
    twin = copy.deepcopy(plain)
    assert isinstance(twin.data_layer, IrisData) and twin.data_layer is not plain.data_layer
    twin.train(1)
    shallow = copy.copy(plain)  # a shallow copy shares it
    assert shallow.data_layer is plain.data_layer and shallow.layers is plain.layers


def test_a_network_pickled_with_the_removed_parallel_engines_state_loads_and_trains():
    # Networks pickled before the worker process and the passes in pieces were removed carry
    # their (empty) state; it is dropped on load.
    net = build(Sgd(1e-2))
    net.train(1)
    state = net.__getstate__()
    state.update(_piecewise=None, _worker=None, _in_train=False, _ahead=False, _next_batch=None,
                 _given_next=None, _started_for_caller=False)
    del state["pool_before_relu"]  # (older still: pickled before it existed)
    old = object.__new__(NeuralNetwork)
    old.__setstate__(state)
    revived = pickle.loads(pickle.dumps(old))
    assert not {"_piecewise", "_worker", "_next_batch"} & set(vars(revived))
    assert revived.pool_before_relu is True and revived._order is None
    inputs, _, _, _ = iris()
    np.testing.assert_array_equal(xpnn.to_numpy(revived.test(inputs)), xpnn.to_numpy(net.test(inputs)))
    revived.data_layer = IrisData()
    revived.train(1)
    assert len(revived.loss) == 2


def test_fully_connected_initialized_on_append(backend):
    np.random.seed(5)
    net = NeuralNetwork(Sgd(1.0), Constant(0.3), Constant(-0.2))
    layer = FullyConnected(2, 2)
    net.append_layer(layer)
    assert_close(layer.weights, [[0.3, 0.3], [0.3, 0.3], [-0.2, -0.2]], rtol=0)


# -- save / load ----------------------------------------------------------------------

def _trained(backend_steps=20):
    np.random.seed(1)
    optimizer = Adam(1e-2, 0.9, 0.999)
    optimizer.add_regularizer(L2_Regularizer(1e-3))
    net = build(optimizer)
    net.train(backend_steps)
    return net


def test_save_load_round_trip_same_backend(backend, tmp_path):
    net = _trained()
    test_inputs = iris()[2]
    before = xpnn.to_numpy(net.test(test_inputs))
    path = tmp_path / "model.pkl"
    save(str(path), net)
    assert net.data_layer is not None   # saving does not detach the caller's data layer
    restored = load(str(path), IrisData())
    assert all(layer.backend.name == backend.name for layer in restored.layers)
    np.testing.assert_array_equal(xpnn.to_numpy(restored.test(test_inputs)), before)
    restored.train(2)   # optimizer state came along and lives on this backend


def test_saved_file_holds_only_numpy_arrays(backend, tmp_path):
    net = _trained(5)
    path = tmp_path / "model.pkl"
    save(str(path), net)
    payload = path.read_bytes()
    assert b"torch" not in payload and b"array_api_strict" not in payload and b"cupy" not in payload
    with xpnn.use_backend("cpu"):
        restored = pickle.loads(payload)
    assert all(isinstance(value, float) for value in restored.loss)


def test_save_on_any_backend_load_on_numpy(backend, tmp_path):
    net = _trained()
    test_inputs = iris()[2]
    before = xpnn.to_numpy(net.test(test_inputs))
    path = tmp_path / "model.pkl"
    save(str(path), net)
    with xpnn.use_backend("cpu") as cpu:
        restored = load(str(path), IrisData())
        assert all(cpu.owns(layer.weights) for layer in restored.layers if layer.trainable)
        after = xpnn.to_numpy(restored.test(test_inputs))
    np.testing.assert_array_equal(np.argmax(after, axis=1), np.argmax(before, axis=1))
    np.testing.assert_allclose(after, before, rtol=1e-12, atol=1e-300)


# -- moving a network -------------------------------------------------------------------

def test_to_moves_layers_and_optimizer_state(backend):
    """Train 3 steps on NumPy, move, train 3 more: same weights as 6 steps on NumPy."""
    with xpnn.use_backend("cpu"):
        np.random.seed(2)
        reference = build(Adam(1e-2, 0.9, 0.999))
        reference.train(6)
        np.random.seed(2)
        net = build(Adam(1e-2, 0.9, 0.999))
        net.train(3)
    net.to(backend)
    for layer in net.layers:
        assert layer.backend is backend   # a Backend object keeps its device (strict device1)
    for layer in (net.layers[0], net.layers[2]):
        assert backend.owns(layer.weights) and backend.owns(layer.optimizer.first_moment)
    net.train(3)
    for moved, expected in zip(net.layers, reference.layers):
        if moved.trainable:
            assert_close(moved.weights, xpnn.to_numpy(expected.weights), rtol=1e-10)
    net.to("cpu")
    assert all(layer.backend.name == "cpu" and layer.backend.dtype_name == "float64"
               for layer in net.layers)


def test_to_by_name_keeps_the_network_dtype():
    with xpnn.use_backend("cpu", dtype="float32"):
        net = build(Sgd(1e-2))
    net.to("array-api-strict")
    assert all(layer.backend.dtype_name == "float32" for layer in net.layers)
    assert net.layers[0].weights.dtype == net.layers[0].backend.xp.float32
    net.train(1)


def _random_data(seed=0, batch=6):
    rng = np.random.default_rng(seed)
    return FixedData(rng.standard_normal((batch, 4)), np.eye(3)[rng.integers(0, 3, batch)])


def test_to_accepts_the_dtype_object_of_another_library():
    """net.to("torch", dtype=<the cpu backend's dtype object, np.float32>) names float32."""
    reason = backend_unavailable_reason("torch", dtype="float32")
    if reason is not None:
        pytest.skip(f"torch: {reason}")
    with xpnn.use_backend("cpu", "float64"):
        np.random.seed(5)
        net = build(Adam(1e-2, 0.9, 0.999), data_layer=_random_data())
    before = [xpnn.to_numpy(layer.weights).copy() for layer in net.layers if layer.trainable]
    net.to("torch", dtype=xpnn.make_backend("cpu", "float32").dtype)
    torch32 = xpnn.make_backend("torch", "float32")
    assert all(layer.backend is torch32 for layer in net.layers)
    moved = [layer.weights for layer in net.layers if layer.trainable]
    for weights, expected in zip(moved, before):
        assert torch32.owns(weights) and weights.dtype == torch32.dtype
        np.testing.assert_array_equal(xpnn.to_numpy(weights), expected.astype(np.float32))
    net.train(1)
    assert torch32.owns(net.loss[-1]) and net.loss[-1].dtype == torch32.dtype


def _float_arrays(net):
    """(where, array) of every float NumPy array attribute of the layers and their optimizers."""
    found = []
    for index, layer in enumerate(net.layers):
        owners = [(f"{index}.{layer.name}", layer)] + [
            (f"{index}.{layer.name}.{name}", getattr(layer, name))
            for name in ("_optimizer", "_bias_optimizer") if getattr(layer, name, None) is not None]
        for where, owner in owners:
            found += [(f"{where}.{attribute}", value) for attribute, value in vars(owner).items()
                      if isinstance(value, np.ndarray) and value.dtype.kind == "f"]
    return found


def test_to_another_dtype_leaves_no_float_array_of_the_old_dtype():
    """Forward caches, not only parameters and optimizer state, follow net.to(dtype=...)."""
    with xpnn.use_backend("cpu", "float64"):
        np.random.seed(6)
        net = NeuralNetwork(Adam(1e-2, 0.9, 0.999), He(), Constant(0.1))
        net.data_layer, net.loss_layer = _random_data(1), CrossEntropyLoss()
        for layer in (FullyConnected(4, 8), BatchNormalization(8), TanH(), FullyConnected(8, 3), SoftMax()):
            net.append_layer(layer)
        net.train(2)
        net.forward()  # (a forward pass after the last step: its caches in float64)
    before = _float_arrays(net)
    state = {f"{index}.{layer.name}.{name}" for index, layer in enumerate(net.layers)
             for name in layer.state_names}
    caches = [where for where, value in before if value.dtype == np.float64 and where not in state]
    assert caches, "no float64 forward cache to move: the test would not see one left behind"
    net.to("cpu", "float32")
    assert [where for where, value in _float_arrays(net) if value.dtype != np.float32] == []
    net.train(1)
    assert net.loss[-1].dtype == np.float32


def test_np_sum_of_loss_after_moving_from_strict_device1_to_the_cpu():
    strict = xpnn.make_backend("array-api-strict", "float64", "device1")
    with xpnn.use_backend(strict):
        np.random.seed(7)
        net = build(Sgd(1e-2), data_layer=_random_data(2))
        net.train(3)
    assert all(strict.owns(value) for value in net.loss)
    recorded = [float(xpnn.to_numpy(value)) for value in net.loss]
    net.to("cpu")
    total = np.sum(net.loss)
    assert total == pytest.approx(sum(recorded), rel=1e-14)
    np.testing.assert_array_equal([float(value) for value in net.loss], recorded)


# -- bad input ----------------------------------------------------------------------------

def test_wrong_input_width_names_layer_and_shapes(backend):
    net = build(Sgd(1e-2))
    with pytest.raises(ValueError) as info:
        net.test(np.ones((2, 5)))
    message = str(info.value)
    assert "FullyConnected" in message and "(batch, 4)" in message and "(2, 5)" in message


def test_unknown_backend_lists_valid_names():
    net = build(Sgd(1e-2))
    for action in (lambda: xpnn.set_backend("tpu"), lambda: net.to("tpu")):
        with pytest.raises(ValueError) as info:
            action()
        for name in ("cpu", "gpu", "array-api-strict", "torch"):
            assert name in str(info.value)


def test_train_without_a_data_layer_says_how_to_set_one():
    net = build(Sgd(1e-2))
    net.data_layer = None
    with pytest.raises(RuntimeError) as info:
        net.train(1)
    message = str(info.value)
    assert "no data_layer" in message and "net.data_layer = " in message and "next()" in message
    assert "or pass batches yourself with net.train_batch(input_tensor, labels)" in message
    assert net.loss == []


@pytest.mark.parametrize("step", ["train", "forward", "train_batch", "backward"])
def test_a_network_without_a_loss_layer_says_so(step):
    net = build(Sgd(1e-2))
    net.loss_layer = None
    inputs, labels, _, _ = iris()
    run = {"train": lambda: net.train(1), "forward": net.forward, "backward": net.backward,
           "train_batch": lambda: net.train_batch(inputs[:5], labels[:5])}[step]
    with pytest.raises(RuntimeError) as info:
        run()
    assert "loss_layer is not set" in str(info.value)
    assert "net.loss_layer = CrossEntropyLoss()" in str(info.value)
    assert net.loss == []


@pytest.mark.parametrize("layers", ["some", "none"])
def test_backward_before_forward_says_so(layers):
    net = build(Sgd(1e-2))
    if layers == "none":
        net.layers = []
    with pytest.raises(RuntimeError) as info:
        net.backward()
    assert "NeuralNetwork.backward" in str(info.value) and "net.forward() first" in str(info.value)


def test_backward_of_an_empty_network_after_forward_runs():
    net = NeuralNetwork(Sgd(1e-2))
    net.loss_layer = CrossEntropyLoss()
    net.data_layer = FixedData(np.full((2, 3), 1 / 3), np.eye(3)[[0, 1]])
    net.forward()
    net.backward()  # (nothing to update; it read "type object 'NoneType' has no attribute ...")


@pytest.mark.parametrize("given, expected", [
    ("relu", "got str 'relu'"),
    (ReLU, "got the class ReLU, not a layer: pass an instance: ReLU()"),
    (FullyConnected, "pass an instance: FullyConnected()"),
    (object(), "lacks forward, backward, trainable"),
])
def test_append_layer_refuses_what_is_not_a_layer(given, expected):
    net = build(Sgd(1e-2))
    with pytest.raises(TypeError) as info:
        net.append_layer(given)
    assert str(info.value).startswith("NeuralNetwork.append_layer: ")
    assert expected in str(info.value)
    assert len(net.layers) == 4


def test_append_layer_takes_a_course_style_layer_of_its_own():
    class Identity:  # (no base class: the course's protocol only)
        trainable = False

        def forward(self, input_tensor):
            return input_tensor

        def backward(self, error_tensor):
            return error_tensor

    net = build(Sgd(1e-2))
    net.append_layer(Identity())
    assert type(net.layers[-1]) is Identity


class CourseFullyConnected:
    """A student's own fully connected layer in NumPy: the course's protocol, no xpnn base
    class (no backend, runs_in_pieces or to); bias as the weights' last row."""

    def __init__(self, input_size, output_size):
        self.trainable, self.testing_phase, self.optimizer = True, False, None
        self.weights = np.random.default_rng(3).uniform(0, 1, (input_size + 1, output_size))

    def initialize(self, weights_initializer, bias_initializer):
        fan_in, fan_out = self.weights.shape[0] - 1, self.weights.shape[1]
        self.weights = np.vstack([weights_initializer.initialize((fan_in, fan_out), fan_in, fan_out),
                                  bias_initializer.initialize((1, fan_out), fan_in, fan_out)])

    def forward(self, input_tensor):
        self.input_tensor = np.hstack([input_tensor, np.ones((input_tensor.shape[0], 1))])
        return self.input_tensor @ self.weights

    def backward(self, error_tensor):
        self.gradient_weights = self.input_tensor.T @ error_tensor
        error_below = error_tensor @ self.weights[:-1].T
        if self.optimizer is not None:
            self.weights = self.optimizer.calculate_update(self.weights, self.gradient_weights)
        return error_below


@pytest.mark.parametrize("place", ["first", "middle"])
def test_a_course_style_layer_of_ones_own_trains_tests_and_moves(place, tmp_path):
    with xpnn.use_backend("cpu", "float64") as cpu64:
        _course_layer_round(cpu64, place, tmp_path)


def _course_layer_round(cpu64, place, tmp_path):
    # (CPU only: the layer computes with NumPy itself.) It has no backend, runs_in_pieces or
    # to(): the network runs it on whole batches, takes its backend from xpnn's layers, and
    # leaves its arrays alone in to().
    np.random.seed(0)
    net = NeuralNetwork(Sgd(5e-2), He(), Constant(0.1))
    net.data_layer, net.loss_layer = IrisData(), CrossEntropyLoss()
    layers = ([CourseFullyConnected(4, 8), ReLU(), FullyConnected(8, 3), SoftMax()]
              if place == "first" else
              [FullyConnected(4, 8), ReLU(), CourseFullyConnected(8, 3), SoftMax()])
    for layer in layers:
        net.append_layer(layer)
    own = next(layer for layer in layers if type(layer) is CourseFullyConnected)
    before = own.weights.copy()
    net.train(60)
    assert net.loss[-1] < 0.7 * net.loss[0] and not np.array_equal(own.weights, before)
    assert net.backend is cpu64
    _, _, test_x, test_classes = iris()
    accuracy = np.mean(np.argmax(xpnn.to_numpy(net.test(test_x)), axis=1) == test_classes)
    assert accuracy > 0.8 and all(layer.testing_phase for layer in layers)
    net.to("cpu")
    save(str(tmp_path / "net.pkl"), net)
    loaded = load(str(tmp_path / "net.pkl"), None)
    np.testing.assert_array_equal(xpnn.to_numpy(loaded.test(test_x)), xpnn.to_numpy(net.test(test_x)))


def test_a_layers_shape_error_names_its_place_in_the_network(backend):
    net = build(Sgd(1e-2))
    net.data_layer = FixedData(np.ones((2, 5)), np.eye(3)[[0, 1]])
    for run in (lambda: net.test(np.ones((2, 5))), lambda: net.train(1)):
        with pytest.raises(ValueError) as info:
            run()
        assert str(info.value).endswith("; raised in net.layers[0] (FullyConnected) of a network "
                                        "of 4 layers given input of shape (2, 5)")
    with pytest.raises(ValueError) as info:
        net.train_batch(np.ones((2, 4)), np.eye(4)[[0, 1]])  # (the loss's error: not a layer's)
    assert "raised in net.layers" not in str(info.value)


def test_a_layer_object_at_two_places_is_named_at_the_one_that_failed(backend):
    from xpnn.layers import Flatten, Pooling

    with xpnn.use_backend(backend):
        pooling = Pooling((2, 2), (2, 2))
        net = NeuralNetwork(Sgd(1e-2))
        net.loss_layer = CrossEntropyLoss()
        for layer in (pooling, Flatten(), pooling):  # the second use gets a flat input
            net.append_layer(layer)
    with pytest.raises(ValueError) as info:
        net.test(np.ones((8, 1, 8, 8)))
    assert str(info.value).endswith("; raised in net.layers[2] (Pooling) of a network of 3 "
                                    "layers given input of shape (8, 1, 8, 8)"), str(info.value)


def test_save_into_a_missing_directory_names_the_path_and_the_directory(tmp_path):
    target = tmp_path / "missing" / "net.pkl"
    with pytest.raises(FileNotFoundError) as info:
        save(str(target), build(Sgd(1e-2)))  # it named the temporary file ".tmp-....part"
    message = str(info.value)
    assert f"cannot write the file: its directory {tmp_path / 'missing'} does not exist" in message
    assert info.value.filename == str(target) and message.endswith(f": '{target}'")
    assert ".part" not in message and not (tmp_path / "missing").exists()


def test_load_of_a_checkpoint_of_xpnn_train_points_to_load_model(tmp_path):
    from xpnn import checkpoint
    from xpnn.models import lenet

    with xpnn.use_backend("cpu"):
        checkpoint.save_checkpoint(str(tmp_path), lenet.build(), "lenet", {})
        model = tmp_path / checkpoint.MODEL_FILE
        with pytest.raises(pickle.UnpicklingError) as info:  # it read "A load persistent id ..."
            load(str(model), None)
        assert str(info.value) == (
            f"xpnn.network.load: {model} is a zip archive (.npz), not a pickle written by "
            f"xpnn.network.save(filename, net); a checkpoint of xpnn-train (a directory holding "
            f"model.npz and model.json) loads with xpnn.checkpoint.load_model(directory), here "
            f"xpnn.checkpoint.load_model({str(tmp_path)!r})")
        with pytest.raises(IsADirectoryError, match=r"xpnn\.checkpoint\.load_model\(directory\)"):
            load(str(tmp_path), None)
        checkpoint.load_model(str(tmp_path))  # (what the message says works)


@pytest.mark.parametrize("content, error", [(b"", EOFError), (b'{"a": 1}', pickle.UnpicklingError)])
def test_load_of_a_file_that_is_no_pickle_says_so(tmp_path, content, error):
    path = tmp_path / "net.pkl"
    path.write_bytes(content)
    with pytest.raises(error) as info:
        load(str(path), None)
    assert str(info.value).startswith(f"xpnn.network.load: {path} is not a pickle written by "
                                      f"xpnn.network.save(filename, net), or it is truncated (pickle: ")


def test_append_layer_of_a_name_says_layers_are_objects():
    with pytest.raises(TypeError) as info:
        build(Sgd(1e-2)).append_layer("relu")
    assert "(layers are objects, not names: e.g. net.append_layer(ReLU())" in str(info.value)


def test_save_below_a_file_names_the_path_and_the_directory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    target = blocker / "net.pkl"
    with pytest.raises(NotADirectoryError) as info:
        save(str(target), build(Sgd(1e-2)))
    assert f"a part of its directory {blocker} is not a directory" in str(info.value)
    assert info.value.filename == str(target)


def test_each_layer_gets_a_deep_copy_of_the_optimizer_state_and_regularizer(backend):
    # A deep copy (DESIGN.md): an optimizer that already holds state (here a velocity of the
    # layers' weight shape) and its regularizer are copied per layer, not shared; a shared
    # velocity would be stepped in place by both layers.
    optimizer = SgdWithMomentum(5e-3, 0.9)
    optimizer.add_regularizer(L2_Regularizer(1e-3))
    optimizer.calculate_update(backend.asarray(np.zeros((5, 5))), backend.asarray(np.ones((5, 5))))
    net = NeuralNetwork(optimizer, He(), Constant(0.1))
    first, second = FullyConnected(4, 5), FullyConnected(4, 5)
    net.append_layer(first)
    net.append_layer(second)
    velocities = [net.optimizer.velocity, first.optimizer.velocity, second.optimizer.velocity]
    assert len({id(velocity) for velocity in velocities}) == 3
    regularizers = [net.optimizer.regularizer, first.optimizer.regularizer, second.optimizer.regularizer]
    assert len({id(regularizer) for regularizer in regularizers}) == 3
    assert_close(first.optimizer.velocity, np.full((5, 5), -5e-3), rtol=1e-15)


def test_a_course_style_layer_of_ones_own_sees_whole_batches_where_the_backend_cuts_them(monkeypatch):
    # A layer without runs_in_pieces may keep state across the batch: the network runs it on the
    # whole batch, in training and in testing, even where the backend runs xpnn's own layers'
    # testing phase in pieces (the NumPy backend with two threads cuts a batch of 2 x 128).
    class Recording:
        trainable = False

        def __init__(self):
            self.sizes = []

        def forward(self, input_tensor):
            self.sizes.append(input_tensor.shape[0])
            return input_tensor

        def backward(self, error_tensor):
            return error_tensor

    from xpnn.ops.numpy_ops import MIN_SAMPLES_PER_THREAD

    batch = 2 * MIN_SAMPLES_PER_THREAD
    with xpnn.use_backend("cpu", "float64") as cpu64:
        monkeypatch.setattr(cpu64.ops, "threads", 2)
        cut = cpu64.ops.map_samples(lambda piece: piece[:1], np.zeros((batch, 4)))
        assert cut.shape[0] == 2   # (the premise: xpnn's own layers would run in two pieces)
        rng = np.random.default_rng(0)
        inputs, labels = rng.standard_normal((batch, 4)), np.eye(3)[rng.integers(0, 3, batch)]
        recording = Recording()
        net = NeuralNetwork(Sgd(1e-2), He(), Constant(0.1))
        net.data_layer, net.loss_layer = FixedData(inputs, labels), CrossEntropyLoss()
        for layer in (FullyConnected(4, 5), recording, ReLU(), FullyConnected(5, 3), SoftMax()):
            net.append_layer(layer)
        net.train(1)
        net.test(inputs)
    assert recording.sizes == [batch, batch]


def test_a_layer_error_is_noted_once_however_often_it_is_noted():
    from xpnn.network_rules import note_layer

    layers = [ReLU(), FullyConnected(4, 3)]
    error = ValueError("FullyConnected: expected input of shape (batch, 4), received (2, 5)")
    error.xpnn_layer_position = 1
    for _ in range(2):
        note_layer(error, layers, layers, np.ones((2, 5)))
    assert str(error) == ("FullyConnected: expected input of shape (batch, 4), received (2, 5); "
                          "raised in net.layers[1] (FullyConnected) of a network of 2 layers given "
                          "input of shape (2, 5)")


def test_save_keeps_the_dtype_and_leaves_the_last_labels_out(backend32, tmp_path):
    # A float32 network loads as float32 (not widened to the default float64), and the last
    # batch's labels (a device array on a GPU data layer) are not model state.
    net = _trained(2)
    assert net.label_tensor is not None   # (the premise)
    path = tmp_path / "model.pkl"
    save(str(path), net)
    restored = load(str(path), IrisData())
    assert restored.label_tensor is None
    for layer in restored.layers:
        assert layer.backend.dtype_name == "float32"
        if layer.trainable:
            assert backend32.owns(layer.weights) and layer.weights.dtype == backend32.dtype
            assert layer.optimizer.first_moment.dtype == backend32.dtype
    restored.train(1)
