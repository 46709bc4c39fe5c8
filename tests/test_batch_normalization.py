"""BatchNormalization: statistics, running averages, reformat, gradients, PyTorch parity."""
import functools
import operator
import re
import threading

import numpy as np
import pytest

import xpnn
from xpnn.backend import make_backend
from xpnn.initializers import Constant
from xpnn.layers.batch_normalization import BatchNormalization
from xpnn.optimizers import Sgd
from xpnn.testing import L2Loss, gradient_check, gradient_check_weights
from conftest import assert_close

VECTOR_SHAPE = (7, 4)
IMAGE_SHAPE = (3, 4, 5, 6)
EPS = 1e-10


def _channel_axes(shape):
    """Axes the statistics run over: the batch, and space for images."""
    return (0,) if len(shape) == 2 else (0, 2, 3)


def _channel_view(vector, shape):
    """Broadcast a per-channel vector against a tensor of ``shape``."""
    return vector.reshape((1, -1) + (1,) * (len(shape) - 2))


def _reference_training(x, gamma, beta, eps=EPS):
    """Batch normalization written out by hand in NumPy (biased variance)."""
    axes = _channel_axes(x.shape)
    mean = x.mean(axis=axes, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    normalized = (x - mean) / np.sqrt(variance + eps)
    return _channel_view(gamma, x.shape) * normalized + _channel_view(beta, x.shape)


def _random_parameters(channels, seed=5):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2.0, channels), rng.standard_normal(channels)


def _layer(backend_obj, channels, gamma=None, beta=None, eps=EPS):
    layer = BatchNormalization(channels, eps=eps)
    assert layer.backend is backend_obj
    if gamma is not None:
        layer.weights, layer.bias = gamma, beta
    return layer


# -- numerical gradient checks (float64) ------------------------------------------

@pytest.mark.parametrize("shape", [VECTOR_SHAPE, IMAGE_SHAPE], ids=["vector", "image"])
@pytest.mark.parametrize("testing_phase", [False, True], ids=["train", "test"])
def test_gradient_checks(backend, shape, testing_phase):
    rng = np.random.default_rng(1)
    input_tensor = rng.standard_normal(shape) * 2.0 + 0.5
    label_tensor = rng.standard_normal(shape)
    gamma, beta = _random_parameters(shape[1])
    layer = _layer(backend, shape[1], gamma, beta)
    if testing_phase:
        layer.forward(rng.standard_normal(shape) + 1.0)   # running statistics from another batch
        layer.testing_phase = True
    layers = [layer, L2Loss()]
    assert np.max(gradient_check(layers, input_tensor, label_tensor)) < 1e-5
    assert np.max(gradient_check_weights(layers, input_tensor, label_tensor)) < 1e-5
    assert np.max(gradient_check_weights(layers, input_tensor, label_tensor, bias=True)) < 1e-5


# -- statistics ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [VECTOR_SHAPE, IMAGE_SHAPE], ids=["per-feature", "per-channel"])
def test_training_output_has_mean_zero_variance_one(backend, shape):
    input_tensor = np.random.standard_normal(shape) * 3.0 - 2.0
    output = xpnn.to_numpy(_layer(backend, shape[1]).forward(input_tensor))
    axes = _channel_axes(shape)
    np.testing.assert_allclose(output.mean(axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(output.var(axis=axes), 1.0, rtol=1e-8)


@pytest.mark.parametrize("shape", [VECTOR_SHAPE, IMAGE_SHAPE], ids=["vector", "image"])
def test_training_output_matches_reference(backend, shape):
    input_tensor = np.random.standard_normal(shape) * 3.0 - 2.0
    gamma, beta = _random_parameters(shape[1])
    output = _layer(backend, shape[1], gamma, beta).forward(input_tensor)
    assert backend.owns(output)
    assert_close(output, _reference_training(input_tensor, gamma, beta), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("shape", [VECTOR_SHAPE, IMAGE_SHAPE], ids=["vector", "image"])
def test_running_statistics_start_from_first_batch_then_decay(backend, shape):
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal(shape) * scale + shift for scale, shift in ((1, 0), (2, 3), (0.5, -1))]
    axes = _channel_axes(shape)
    layer = _layer(backend, shape[1])
    expected_mean = expected_variance = None
    for batch in batches:
        layer.forward(batch)
        mean, variance = batch.mean(axis=axes), batch.var(axis=axes)
        if expected_mean is None:
            expected_mean, expected_variance = mean, variance
        else:
            expected_mean = 0.8 * expected_mean + 0.2 * mean
            expected_variance = 0.8 * expected_variance + 0.2 * variance
        assert_close(layer.running_mean, expected_mean, rtol=1e-12, atol=1e-14)
        assert_close(layer.running_variance, expected_variance, rtol=1e-12)


@pytest.mark.parametrize("shape", [VECTOR_SHAPE, IMAGE_SHAPE], ids=["vector", "image"])
def test_testing_phase_uses_running_statistics(backend, shape):
    rng = np.random.default_rng(3)
    first, second, probe = (rng.standard_normal(shape) + k for k in (0.0, 2.0, -1.0))
    gamma, beta = _random_parameters(shape[1])
    layer = _layer(backend, shape[1], gamma, beta)
    layer.forward(first)
    layer.forward(second)
    axes = _channel_axes(shape)
    mean = 0.8 * first.mean(axis=axes) + 0.2 * second.mean(axis=axes)
    variance = 0.8 * first.var(axis=axes) + 0.2 * second.var(axis=axes)
    layer.testing_phase = True
    output = layer.forward(probe)
    expected = (_channel_view(gamma, shape) * (probe - _channel_view(mean, shape))
                / np.sqrt(_channel_view(variance, shape) + EPS) + _channel_view(beta, shape))
    assert_close(output, expected, rtol=1e-12, atol=1e-13)
    # testing phase leaves the running statistics alone
    assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-14)
    assert_close(layer.running_variance, variance, rtol=1e-12)


def test_testing_phase_before_training_normalizes_with_zero_and_one(backend):
    input_tensor = np.random.standard_normal(VECTOR_SHAPE)
    layer = _layer(backend, VECTOR_SHAPE[1])
    layer.testing_phase = True
    assert_close(layer.forward(input_tensor), input_tensor / np.sqrt(1.0 + EPS))
    assert layer.running_mean is None


# -- layout ----------------------------------------------------------------------------

def test_reformat_round_trip(backend):
    images = np.random.standard_normal(IMAGE_SHAPE)
    batch, channels, height, width = IMAGE_SHAPE
    layer = _layer(backend, channels)
    rows = xpnn.to_numpy(layer.reformat(images))
    assert rows.shape == (batch * height * width, channels)
    # row (b, y, x) holds that pixel's channels
    np.testing.assert_array_equal(rows[(1 * height + 2) * width + 3, :], images[1, :, 2, 3])
    back = layer.reformat(layer.reformat(images))
    assert_close(back, images, rtol=0)


def test_reformat_back_after_an_image_forward(backend):
    images = np.random.standard_normal(IMAGE_SHAPE)
    layer = _layer(backend, IMAGE_SHAPE[1])
    output = xpnn.to_numpy(layer.forward(images))
    rows = np.transpose(output, (0, 2, 3, 1)).reshape(-1, IMAGE_SHAPE[1])
    assert_close(layer.reformat(rows), output, rtol=0)


def test_reformat_of_a_matrix_needs_an_image_first(backend):
    with pytest.raises(ValueError, match="BatchNormalization"):
        _layer(backend, 4).reformat(np.zeros((10, 4)))


@pytest.mark.parametrize("shape", [VECTOR_SHAPE, IMAGE_SHAPE], ids=["vector", "image"])
@pytest.mark.parametrize("testing_phase", [False, True], ids=["train", "test"])
def test_results_do_not_depend_on_position_in_batch(backend, shape, testing_phase):
    rng = np.random.default_rng(4)
    input_tensor = rng.standard_normal(shape)
    error_tensor = rng.standard_normal(shape)
    order = rng.permutation(shape[0])
    gamma, beta = _random_parameters(shape[1])
    results = []
    for permutation in (np.arange(shape[0]), order):
        layer = _layer(backend, shape[1], gamma, beta)
        layer.forward(input_tensor + 1.0)   # running statistics for the testing phase
        layer.testing_phase = testing_phase
        output = xpnn.to_numpy(layer.forward(input_tensor[permutation]))
        input_error = xpnn.to_numpy(layer.backward(error_tensor[permutation]))
        results.append((output, input_error, xpnn.to_numpy(layer.gradient_weights)))
    (output, input_error, gradient), (output_p, input_error_p, gradient_p) = results
    np.testing.assert_allclose(output_p, output[order], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(input_error_p, input_error[order], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(gradient_p, gradient, rtol=1e-12, atol=1e-13)


def test_testing_phase_sample_alone_equals_sample_in_batch(backend):
    rng = np.random.default_rng(6)
    layer = _layer(backend, IMAGE_SHAPE[1], *_random_parameters(IMAGE_SHAPE[1]))
    layer.forward(rng.standard_normal(IMAGE_SHAPE))
    layer.testing_phase = True
    batch = rng.standard_normal(IMAGE_SHAPE)
    together = xpnn.to_numpy(layer.forward(batch))
    alone = xpnn.to_numpy(layer.forward(batch[2:3]))
    np.testing.assert_allclose(alone, together[2:3], rtol=1e-14, atol=1e-15)


def test_forward_and_backward_do_not_modify_inputs(backend):
    host_input = np.random.standard_normal(IMAGE_SHAPE)
    host_error = np.random.standard_normal(IMAGE_SHAPE)
    input_tensor, error_tensor = backend.asarray(host_input.copy()), backend.asarray(host_error.copy())
    layer = _layer(backend, IMAGE_SHAPE[1])
    layer.forward(input_tensor)
    layer.backward(error_tensor)
    assert_close(input_tensor, host_input, rtol=0)
    assert_close(error_tensor, host_error, rtol=0)


# -- parameters and optimizer ------------------------------------------------------------

def test_parameters_ignore_initializers(backend):
    layer = _layer(backend, 3)
    assert layer.trainable
    layer.initialize(Constant(0.5), Constant(0.3))
    assert_close(layer.weights, np.ones(3), rtol=0)
    assert_close(layer.bias, np.zeros(3), rtol=0)
    assert backend.owns(layer.weights) and backend.owns(layer.bias)


def test_parameters_change_only_with_an_optimizer(backend):
    rng = np.random.default_rng(7)
    input_tensor, error_tensor = rng.standard_normal(VECTOR_SHAPE), rng.standard_normal(VECTOR_SHAPE)
    layer = _layer(backend, VECTOR_SHAPE[1])
    layer.forward(input_tensor)
    layer.backward(error_tensor)
    assert_close(layer.weights, np.ones(4), rtol=0)
    assert_close(layer.bias, np.zeros(4), rtol=0)
    normalized = _reference_training(input_tensor, np.ones(4), np.zeros(4))
    gradient_gamma = (error_tensor * normalized).sum(axis=0)
    gradient_beta = error_tensor.sum(axis=0)
    assert_close(layer.gradient_weights, gradient_gamma, rtol=1e-12, atol=1e-13)
    assert_close(layer.gradient_bias, gradient_beta, rtol=1e-12, atol=1e-13)
    layer.optimizer = Sgd(0.5)
    layer.forward(input_tensor)
    layer.backward(error_tensor)
    assert_close(layer.weights, 1.0 - 0.5 * gradient_gamma, rtol=1e-12)
    assert_close(layer.bias, -0.5 * gradient_beta, rtol=1e-12, atol=1e-13)


def test_to_moves_running_statistics():
    with xpnn.use_backend("cpu", dtype="float64"):
        layer = BatchNormalization(4)
        layer.forward(np.random.standard_normal(VECTOR_SHAPE))
    strict = make_backend("array-api-strict", "float64", "device1")
    layer.to(strict)
    for name in ("weights", "bias", "running_mean", "running_variance"):
        assert strict.owns(getattr(layer, name)), name
    layer.testing_phase = True
    assert strict.owns(layer.forward(np.zeros(VECTOR_SHAPE)))


def test_float32_stays_float32(backend32):
    layer = BatchNormalization(IMAGE_SHAPE[1], eps=1e-5)
    images = np.random.standard_normal(IMAGE_SHAPE).astype(np.float32)
    output = xpnn.to_numpy(layer.forward(images))
    error = xpnn.to_numpy(layer.backward(images))
    assert output.dtype == np.float32 and error.dtype == np.float32
    np.testing.assert_allclose(output, _reference_training(images.astype(np.float64), np.ones(4),
                                                           np.zeros(4), eps=1e-5), rtol=1e-4, atol=1e-5)


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5), (2, 5, 4, 4), (2, 4, 3), (4,), (2, 4, 3, 3, 1)],
                         ids=["vector-channels", "image-channels", "rank3", "rank1", "rank5"])
def test_bad_input_shape(backend, shape):
    layer = _layer(backend, 4)
    with pytest.raises(ValueError, match=r"BatchNormalization") as info:
        layer.forward(np.zeros(shape))
    message = str(info.value)
    assert str(shape) in message and "(batch, 4)" in message


def test_bad_error_shape(backend):
    layer = _layer(backend, 4)
    layer.forward(np.random.standard_normal(VECTOR_SHAPE))
    with pytest.raises(ValueError, match="BatchNormalization"):
        layer.backward(np.zeros((6, 4)))


@pytest.mark.parametrize("channels", [0, -1, 2.5])
def test_bad_channels(channels):
    with pytest.raises(ValueError, match="BatchNormalization"):
        BatchNormalization(channels)


def test_bad_eps():
    with pytest.raises(ValueError, match="BatchNormalization.*eps"):
        BatchNormalization(3, eps=-1.0)


# -- PyTorch parity ------------------------------------------------------------------------

def _torch_batch_norm(torch, input_tensor, error_tensor, gamma, beta, training, running=None):
    """Output and input/γ/β gradients of torch.nn.functional.batch_norm via autograd."""
    x = torch.tensor(input_tensor, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor(gamma, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    running_mean, running_var = (None, None) if running is None else (
        torch.tensor(running[0], dtype=torch.float64), torch.tensor(running[1], dtype=torch.float64))
    output = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias,
                                            training=training, momentum=0.2, eps=EPS)
    (output * torch.tensor(error_tensor, dtype=torch.float64)).sum().backward()
    host = [t.detach().numpy() for t in (output, x.grad, weight.grad, bias.grad)]
    if running is not None:
        host += [running_mean.numpy(), running_var.numpy()]
    return host


def _assert_relative(actual, expected, name):
    """Equal to 1e-10 relative to the reference's largest magnitude."""
    actual = xpnn.to_numpy(actual)
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10 * np.max(np.abs(expected)),
                               err_msg=name)


@pytest.mark.parametrize("shape", [VECTOR_SHAPE, IMAGE_SHAPE], ids=["vector", "image"])
def test_torch_parity_training(backend, shape):
    torch = pytest.importorskip("torch", reason="PyTorch is the reference for batch_norm parity")
    rng = np.random.default_rng(8)
    first, input_tensor = rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape) * 3 - 1
    error_tensor = rng.standard_normal(shape)
    gamma, beta = _random_parameters(shape[1])
    layer = _layer(backend, shape[1], gamma, beta)
    layer.forward(first)
    running_before = (xpnn.to_numpy(layer.running_mean), xpnn.to_numpy(layer.running_variance))
    output = layer.forward(input_tensor)
    input_error = layer.backward(error_tensor)
    expected = _torch_batch_norm(torch, input_tensor, error_tensor, gamma, beta, True, running_before)
    for name, ours, theirs in zip(("output", "input gradient", "gamma gradient", "beta gradient"),
                                  (output, input_error, layer.gradient_weights, layer.gradient_bias),
                                  expected):
        _assert_relative(ours, theirs, name)
    # Torch's momentum 0.2 is our decay 0.8, so the running means agree. Its running
    # variance averages the unbiased batch variance (ours: biased, as used for normalizing);
    # convert by removing 0.2 * unbiased / n, with n values per channel.
    _assert_relative(layer.running_mean, expected[4], "running mean")
    count = input_tensor.size // shape[1]
    unbiased = torch.var(torch.tensor(input_tensor), dim=_channel_axes(shape), correction=1).numpy()
    _assert_relative(layer.running_variance, expected[5] - 0.2 * unbiased / count, "running variance")


@pytest.mark.parametrize("shape", [VECTOR_SHAPE, IMAGE_SHAPE], ids=["vector", "image"])
def test_torch_parity_evaluation(backend, shape):
    torch = pytest.importorskip("torch", reason="PyTorch is the reference for batch_norm parity")
    rng = np.random.default_rng(9)
    input_tensor, error_tensor = rng.standard_normal(shape) * 2 + 0.5, rng.standard_normal(shape)
    gamma, beta = _random_parameters(shape[1])
    layer = _layer(backend, shape[1], gamma, beta)
    for shift in (1.0, -2.0):
        layer.forward(rng.standard_normal(shape) * 1.5 + shift)
    layer.testing_phase = True
    # eval mode normalizes with the running statistics it is given: feed it ours
    running = (xpnn.to_numpy(layer.running_mean), xpnn.to_numpy(layer.running_variance))
    output = layer.forward(input_tensor)
    input_error = layer.backward(error_tensor)
    expected = _torch_batch_norm(torch, input_tensor, error_tensor, gamma, beta, False, running)
    for name, ours, theirs in zip(("output", "input gradient", "gamma gradient", "beta gradient"),
                                  (output, input_error, layer.gradient_weights, layer.gradient_bias),
                                  expected):
        _assert_relative(ours, theirs, name)


@pytest.mark.parametrize("name", ["weights", "bias"])
def test_wrongly_shaped_parameters_are_refused_when_assigned(backend, name):
    layer = BatchNormalization(3)
    for shape in ((2,), (3, 3)):
        with pytest.raises(ValueError, match=rf"BatchNormalization: {name} must have shape \(3,\), "
                                             rf"received {re.escape(str(shape))}"):
            setattr(layer, name, np.ones(shape))
    setattr(layer, name, np.full(3, 2.0))
    assert backend.owns(getattr(layer, name))
    np.testing.assert_array_equal(xpnn.to_numpy(getattr(layer, name)), np.full(3, 2.0))
    # Only axes of length 1 may differ (course code that keeps gamma as (1, channels)).
    setattr(layer, name, np.full((1, 3), 4.0))
    assert tuple(getattr(layer, name).shape) == (3,)
    np.testing.assert_array_equal(xpnn.to_numpy(getattr(layer, name)), np.full(3, 4.0))


def test_move_to_another_backend_drops_the_forward_cache():
    with xpnn.use_backend("cpu", dtype="float64"):
        layer = BatchNormalization(IMAGE_SHAPE[1])
        layer.forward(np.random.standard_normal(IMAGE_SHAPE))
    strict = make_backend("array-api-strict", "float64", "device1")
    layer.to(strict)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones(IMAGE_SHAPE))
    rng = np.random.default_rng(10)
    input_tensor, error_tensor = rng.standard_normal(IMAGE_SHAPE), rng.standard_normal(IMAGE_SHAPE)
    layer.forward(input_tensor)
    input_error = layer.backward(error_tensor)
    assert strict.owns(input_error)
    normalized = _reference_training(input_tensor, np.ones(4), np.zeros(4))
    assert_close(layer.gradient_weights, (error_tensor * normalized).sum(axis=(0, 2, 3)),
                 rtol=1e-12, atol=1e-12)


def test_checkpoint_arrays_keep_the_running_statistics(backend):
    # A checkpoint saves what a layer lists in state_names: the running statistics must be
    # among them, or a restored network normalizes with 0 and 1 in testing phase.
    from types import SimpleNamespace

    from xpnn.checkpoint import network_arrays, restore_network_arrays

    batch = np.random.default_rng(11).standard_normal(IMAGE_SHAPE) * 2.0 + 1.0
    trained = _layer(backend, IMAGE_SHAPE[1])
    trained.forward(batch)
    arrays = network_arrays(SimpleNamespace(layers=[trained]))
    restored = _layer(backend, IMAGE_SHAPE[1])
    restore_network_arrays(SimpleNamespace(layers=[restored]), arrays)
    assert restored.running_mean is not None and backend.owns(restored.running_mean)
    assert_close(restored.running_mean, batch.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-14)
    assert_close(restored.running_variance, batch.var(axis=(0, 2, 3)), rtol=1e-12)


# -- statistics over a batch spread over several processes (statistics_sum) -----------------

class ThreadSum:
    """``all_sum`` functions for ``count`` layers that run at the same time on threads, as the
    processes of a data-parallel run would: each value summed over every layer (in order)."""

    def __init__(self, count):
        self._barrier = threading.Barrier(count, timeout=30)
        self._slots = [None] * count

    def for_member(self, index):
        def all_sum(*values):
            self._slots[index] = values
            self._barrier.wait()
            totals = tuple(functools.reduce(operator.add, terms) for terms in zip(*self._slots))
            self._barrier.wait()  # every member has its totals before any slot is reused
            return totals
        return all_sum


class SpreadBatchNormalization(BatchNormalization):
    """Batch norm of one member's rows of a batch, statistics summed by ``all_sum``."""

    def __init__(self, channels, all_sum, eps=EPS):
        super().__init__(channels, eps=eps)
        self._all_sum = all_sum

    def statistics_sum(self):
        return self._all_sum


def _on_threads(tasks):
    """Run the callables at the same time on threads; return their results in order."""
    results, errors = [None] * len(tasks), []

    def run(index):
        try:
            results[index] = tasks[index]()
        except BaseException as error:  # re-raised in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(tasks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]
    return results


def test_a_plain_layer_sums_its_statistics_over_nothing_else(backend):
    assert BatchNormalization(3).statistics_sum() is None


@pytest.mark.parametrize("shape", [(8, 4), (5, 4, 5, 6)], ids=["vector", "image"])
def test_statistics_sum_gives_every_member_the_whole_batchs_numbers(backend, shape):
    """Two members with 3 and the rest of the rows, statistics summed through
    ``statistics_sum``: each member's output and input gradient are its rows of those of one
    layer on the whole batch, its gradients its rows' share (they add up to the whole
    batch's), and every member's running statistics are the whole batch's."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape) * 2.0 + 0.5
    error = rng.standard_normal(shape)
    gamma, beta = _random_parameters(shape[1])
    whole = _layer(backend, shape[1], gamma, beta)
    expected_output = xpnn.to_numpy(whole.forward(x))
    assert_close(expected_output, _reference_training(x, gamma, beta), rtol=1e-12, atol=1e-12)
    expected_input_gradient = xpnn.to_numpy(whole.backward(error))
    summer = ThreadSum(2)
    members = [SpreadBatchNormalization(shape[1], summer.for_member(index)) for index in range(2)]
    rows = [slice(0, 3), slice(3, shape[0])]
    for member in members:
        member.weights, member.bias = gamma, beta
    outputs = _on_threads([lambda m=m, r=r: m.forward(x[r]) for m, r in zip(members, rows)])
    gradients = _on_threads([lambda m=m, r=r: m.backward(error[r]) for m, r in zip(members, rows)])
    for member, r, output, gradient in zip(members, rows, outputs, gradients):
        assert_close(output, expected_output[r], rtol=1e-11, atol=1e-12)
        assert_close(gradient, expected_input_gradient[r], rtol=1e-10, atol=1e-12)
        assert_close(member.running_mean, xpnn.to_numpy(whole.running_mean), rtol=1e-12, atol=1e-14)
        assert_close(member.running_variance, xpnn.to_numpy(whole.running_variance), rtol=1e-12)
    for name in ("gradient_weights", "gradient_bias"):
        total = sum(xpnn.to_numpy(getattr(member, name)) for member in members)
        assert_close(total, xpnn.to_numpy(getattr(whole, name)), rtol=1e-11, atol=1e-12, err_msg=name)


def test_testing_phase_asks_for_no_sums(backend):
    """Testing phase uses the running statistics: no member waits for the others' sums."""
    def refuse(*values):
        raise AssertionError("all_sum called in testing phase")

    layer = SpreadBatchNormalization(4, refuse)
    layer.testing_phase = True
    x = np.random.default_rng(4).standard_normal((3, 4))
    assert_close(layer.forward(x), x / np.sqrt(1.0 + EPS), rtol=1e-12)
