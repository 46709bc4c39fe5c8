"""Conv: forward against a NumPy loop reference, numerical gradients, PyTorch parity, errors."""
import math
import re

import numpy as np
import pytest

import xpnn
import conv_reference as ref
from conftest import assert_close, assert_passes_leave_inputs_unchanged, tolerance
from xpnn.initializers import Constant
from xpnn.layers.conv import Conv
from xpnn.optimizers import Sgd, SgdWithMomentum
from xpnn.testing import L2Loss, gradient_check, gradient_check_weights

# (stride_shape, convolution_shape, num_kernels, input shape); gradient checks use them too,
# so they stay small.
CASES = {
    "1d": ((1,), (2, 3), 3, (2, 2, 7)),
    "1d-stride2-even": ((2,), (2, 4), 2, (2, 2, 9)),
    "2d": ((1, 1), (2, 3, 3), 3, (2, 2, 5, 4)),
    "2d-stride2": ((2, 2), (2, 3, 3), 2, (2, 2, 7, 5)),
    "2d-uneven-stride": ((2, 3), (1, 3, 3), 2, (2, 1, 7, 5)),
    "2d-even-kernel": ((1, 1), (2, 2, 4), 2, (2, 2, 7, 5)),
    "2d-1x1": ((1, 1), (3, 1, 1), 2, (2, 3, 4, 3)),
    "2d-1x1-stride2": ((2, 2), (3, 1, 1), 2, (2, 3, 5, 4)),
}


def _layer_and_data(case):
    stride_shape, convolution_shape, num_kernels, input_shape = CASES[case]
    layer = Conv(stride_shape, convolution_shape, num_kernels)
    weights = np.random.standard_normal((num_kernels,) + convolution_shape)
    bias = np.random.standard_normal(num_kernels)
    layer.weights, layer.bias = weights, bias
    strides = layer.stride_shape
    return layer, np.random.standard_normal(input_shape), weights, bias, strides


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_reference(backend, case):
    layer, x, weights, bias, strides = _layer_and_data(case)
    output = layer.forward(x)
    assert backend.owns(output)
    assert_close(output, ref.conv_forward(x, weights, bias, strides), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_matches_reference(backend, case):
    layer, x, weights, bias, strides = _layer_and_data(case)
    output = xpnn.to_numpy(layer.forward(x))
    error = np.random.standard_normal(output.shape)
    gradient_input = layer.backward(error)
    expected = ref.conv_backward(x, weights, strides, error)
    actual = (gradient_input, layer.gradient_weights, layer.gradient_bias)
    for name, value, wanted in zip(("input", "weights", "bias"), actual, expected):
        assert backend.owns(value), name
        assert ref.relative_error(xpnn.to_numpy(value), wanted) <= 1e-12, name


@pytest.mark.parametrize("case", ["1d-stride2-even", "2d-stride2", "2d-even-kernel", "2d-1x1"])
def test_output_shape_is_ceil_of_size_over_stride(backend, case):
    layer, x, _, _, strides = _layer_and_data(case)
    output = layer.forward(x)
    expected = (x.shape[0], layer.num_kernels) + tuple(
        math.ceil(n / s) for n, s in zip(x.shape[2:], strides))
    assert tuple(output.shape) == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_check_input(backend, case):
    layer, x, _, _, _ = _layer_and_data(case)
    label = np.random.standard_normal(tuple(layer.forward(x).shape))
    assert np.max(gradient_check([layer, L2Loss()], x, label)) < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("bias", [False, True], ids=["weights", "bias"])
def test_gradient_check_parameters(backend, case, bias):
    layer, x, _, _, _ = _layer_and_data(case)
    label = np.random.standard_normal(tuple(layer.forward(x).shape))
    difference = gradient_check_weights([layer, L2Loss()], x, label, bias=bias)
    assert np.max(difference) < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_pytorch_autograd(backend, case):
    torch = pytest.importorskip("torch", reason="PyTorch is the reference for parity tests")
    functional = torch.nn.functional
    layer, x, weights, bias, strides = _layer_and_data(case)
    output = layer.forward(x)
    error = np.random.standard_normal(tuple(output.shape))
    gradient_input = layer.backward(error)

    x_t, w_t, b_t = (torch.tensor(a, dtype=torch.float64, requires_grad=True)
                     for a in (x, weights, bias))
    # F.pad takes (before, after) pairs starting from the LAST axis.
    pads = [p for pair in reversed(ref.same_pads(weights.shape[2:])) for p in pair]
    convolve = functional.conv1d if weights.ndim == 3 else functional.conv2d
    expected = convolve(functional.pad(x_t, pads), w_t, b_t, stride=tuple(strides))
    expected.backward(torch.tensor(error, dtype=torch.float64))
    pairs = [(output, expected.detach()), (gradient_input, x_t.grad),
             (layer.gradient_weights, w_t.grad), (layer.gradient_bias, b_t.grad)]
    for actual, wanted in pairs:
        assert ref.relative_error(xpnn.to_numpy(actual), wanted.numpy()) <= 1e-10


@pytest.mark.parametrize("case", ["1d-stride2-even", "2d-stride2"])
def test_result_does_not_depend_on_position_in_batch(backend, case):
    layer, _, _, _, _ = _layer_and_data(case)
    input_shape = CASES[case][3]
    x = np.random.standard_normal((4,) + input_shape[1:])
    order = np.array([2, 0, 3, 1])
    output = xpnn.to_numpy(layer.forward(x))
    error = np.random.standard_normal(output.shape)
    gradient = xpnn.to_numpy(layer.backward(error))
    gradient_weights = xpnn.to_numpy(layer.gradient_weights)
    assert_close(layer.forward(x[order]), output[order], rtol=1e-13, atol=1e-14)
    assert_close(layer.backward(error[order]), gradient[order], rtol=1e-13, atol=1e-14)
    assert_close(layer.gradient_weights, gradient_weights, rtol=1e-12)
    for sample in range(4):
        single = layer.forward(x[sample:sample + 1])
        assert_close(single, output[sample:sample + 1], rtol=1e-13, atol=1e-14)


def test_forward_and_backward_leave_their_inputs_unchanged(backend):
    layer, x, _, _, _ = _layer_and_data("2d-stride2")
    assert_passes_leave_inputs_unchanged(layer, x, backend)


def test_testing_phase_backward_uses_the_input_as_it_was_at_forward(backend):
    # In testing phase the forward keeps its input (not the columns) for a later
    # backward. Given a view of the caller's array (here the transposed view of a
    # batch-last array, which the NumPy path can use as it is), that kept input must
    # not change when the caller then overwrites its array.
    layer, x, weights, _, strides = _layer_and_data("2d-stride2")
    layer.testing_phase = True
    batch_last = backend.asarray(np.ascontiguousarray(np.moveaxis(x, 0, -1)))  # (c, y, x, b)
    view = backend.xp.permute_dims(batch_last, (3, 0, 1, 2))                  # (b, c, y, x)
    output = layer.forward(view)
    error = np.random.standard_normal(tuple(output.shape))
    batch_last[...] = 0.0   # the caller reuses its buffer before the backward pass
    layer.backward(error)
    expected_gradient_weights = ref.conv_backward(x, weights, strides, error)[1]
    assert ref.relative_error(xpnn.to_numpy(layer.gradient_weights),
                              expected_gradient_weights) <= 1e-12


def test_optimizer_updates_weights_and_bias_after_computing_the_input_gradient(backend):
    layer, x, weights, bias, strides = _layer_and_data("2d")
    layer.optimizer = Sgd(0.5)
    error = np.random.standard_normal(tuple(layer.forward(x).shape))
    gradient_input = layer.backward(error)
    expected_input, expected_weights, expected_bias = ref.conv_backward(x, weights, strides, error)
    assert ref.relative_error(xpnn.to_numpy(gradient_input), expected_input) <= 1e-12
    assert_close(layer.weights, weights - 0.5 * expected_weights, rtol=1e-12, atol=1e-13)
    assert_close(layer.bias, bias - 0.5 * expected_bias, rtol=1e-12, atol=1e-13)


def test_no_update_without_optimizer(backend):
    layer, x, weights, bias, _ = _layer_and_data("2d")
    layer.backward(np.ones(tuple(layer.forward(x).shape)))
    assert_close(layer.weights, weights, rtol=0)
    assert_close(layer.bias, bias, rtol=0)


class RecordingInitializer:
    """Records the arguments it was called with and returns a constant."""

    def __init__(self, value):
        self.value, self.calls = value, []

    def initialize(self, weights_shape, fan_in, fan_out):
        self.calls.append((tuple(weights_shape), fan_in, fan_out))
        return np.full(tuple(weights_shape), self.value)


@pytest.mark.parametrize("convolution_shape, fan_in, fan_out", [
    ((3, 5, 4), 3 * 5 * 4, 7 * 5 * 4), ((2, 3), 2 * 3, 7 * 3)])
def test_initialize_shapes_and_fans(backend, convolution_shape, fan_in, fan_out):
    layer = Conv(1, convolution_shape, 7)
    weights_init, bias_init = RecordingInitializer(0.25), RecordingInitializer(-1.0)
    layer.initialize(weights_init, bias_init)
    assert weights_init.calls == [((7,) + convolution_shape, fan_in, fan_out)]
    assert bias_init.calls == [((7,), fan_in, fan_out)]
    assert backend.owns(layer.weights) and backend.owns(layer.bias)
    assert_close(layer.weights, np.full((7,) + convolution_shape, 0.25), rtol=0)
    assert_close(layer.bias, np.full(7, -1.0), rtol=0)


def test_default_parameters_are_uniform_on_host_and_same_on_every_backend(backend):
    np.random.seed(7)
    layer = Conv((1, 1), (2, 3, 3), 4)
    np.random.seed(7)
    expected_weights = np.random.uniform(0.0, 1.0, (4, 2, 3, 3))
    expected_bias = np.random.uniform(0.0, 1.0, (4,))
    assert_close(layer.weights, expected_weights, rtol=0)
    assert_close(layer.bias, expected_bias, rtol=0)


def test_works_with_constant_initializer_and_numpy_weights(backend):
    layer = Conv((1,), (1, 3), 1)
    layer.initialize(Constant(1.0), Constant(0.5))
    x = np.arange(5, dtype=np.float64).reshape(1, 1, 5)
    # sums of 3 neighbours with zero padding, plus 0.5
    assert_close(layer.forward(x), np.array([[[1.5, 3.5, 6.5, 9.5, 7.5]]]), rtol=0)


def test_accepts_arrays_of_another_backend(backend):
    layer, x, weights, bias, strides = _layer_and_data("2d")
    with xpnn.use_backend("array-api-strict"):
        other = xpnn.get_backend().asarray(x)
    assert_close(layer.forward(other), ref.conv_forward(x, weights, bias, strides),
                 rtol=1e-12, atol=1e-13)


def test_float32_forward_and_backward(backend32):
    layer = Conv((2, 1), (2, 3, 3), 3)
    x = np.random.standard_normal((2, 2, 6, 5))
    output = layer.forward(x)
    gradient = layer.backward(np.ones(tuple(output.shape)))
    for array in (output, gradient, layer.gradient_weights, layer.gradient_bias):
        assert array.dtype == backend32.dtype
    expected = ref.conv_forward(x, xpnn.to_numpy(layer.weights).astype(np.float64),
                                xpnn.to_numpy(layer.bias).astype(np.float64), (2, 1))
    assert_close(output, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("convolution_shape, input_shape", [
    ((3, 3, 3), (2, 2, 5, 5)),     # wrong channel count, 2-D
    ((2, 3), (2, 3, 5)),           # wrong channel count, 1-D
    ((2, 3, 3), (2, 2, 5)),        # rank 3 for a 2-D layer
    ((2, 3), (2, 2, 5, 5)),        # rank 4 for a 1-D layer
    ((2, 3, 3), (5, 5)),           # no batch nor channel axis
])
def test_bad_input_raises_value_error_naming_layer_and_shapes(backend, convolution_shape,
                                                             input_shape):
    layer = Conv(1, convolution_shape, 2)
    with pytest.raises(ValueError) as info:
        layer.forward(np.zeros(input_shape))
    message = str(info.value)
    assert "Conv" in message and str(input_shape) in message
    assert f"(batch, {convolution_shape[0]}, y" in message


def test_bad_error_shape_raises(backend):
    layer = Conv((2, 2), (1, 3, 3), 2)
    layer.forward(np.zeros((2, 1, 5, 5)))
    with pytest.raises(ValueError, match=r"Conv.*\(2, 2, 3, 3\).*\(2, 2, 5, 5\)"):
        layer.backward(np.zeros((2, 2, 5, 5)))


def test_backward_before_forward_raises(backend):
    with pytest.raises(RuntimeError, match="Conv"):
        Conv(1, (1, 3, 3), 2).backward(np.zeros((1, 2, 3, 3)))


@pytest.mark.parametrize("stride_shape", [2, (2,), [2], (2, 2)])
def test_stride_forms(stride_shape):
    with xpnn.use_backend("cpu"):
        assert Conv(stride_shape, (1, 3, 3), 1).stride_shape == (2, 2)
        if not (isinstance(stride_shape, tuple) and len(stride_shape) == 2):
            assert Conv(stride_shape, (1, 3), 1).stride_shape == (2,)


@pytest.mark.parametrize("arguments", [
    ((0, 1), (1, 3, 3), 1), ((1, 1, 1), (1, 3, 3), 1), ((1, 2), (1, 3), 1), ((1.5,), (1, 3), 1),
    (1, (1, 3, 3, 3), 1), (1, (3,), 1), (1, (1, 0, 3), 1), (1, (1, 3, 3), 0), (1, (1, 3, 3), 2.5),
    ((True,), (1, 3), 1),
    # arrays: floats, booleans, 2-D, empty, non-positive, a 0-D float
    (np.array([1.5, 1.0]), (1, 3, 3), 1), (1, np.array([1.0, 3.0, 3.0]), 1),
    (np.array([True, True]), (1, 3, 3), 1), (np.array([[1, 1]]), (1, 3, 3), 1),
    (1, np.array([[1, 3, 3]]), 1), (1, np.array([], dtype=np.int64), 1),
    (1, np.array([1, 0, 3]), 1), (np.array([1, -1]), (1, 3, 3), 1), (np.array(1.0), (1, 3), 1),
])
def test_constructor_rejects_bad_arguments(arguments):
    with xpnn.use_backend("cpu"), pytest.raises(ValueError, match="Conv"):
        Conv(*arguments)


@pytest.mark.parametrize("form", ["numpy-int64", "numpy-int32", "numpy-uint8", "array-api-strict"])
def test_shapes_given_as_integer_arrays(backend, form):
    """Strides and the convolution shape as 1-D integer arrays (NumPy's or
    another library's) build the same layer as Python ints: same attributes, same output."""
    convert = {"numpy-int64": np.array, "numpy-int32": lambda v: np.array(v, dtype=np.int32),
               "numpy-uint8": lambda v: np.array(v, dtype=np.uint8),
               "array-api-strict": lambda v: pytest.importorskip("array_api_strict").asarray(v)}[form]
    layer = Conv(convert([1, 2]), convert([2, 5, 5]), 3)
    reference = Conv((1, 2), (2, 5, 5), 3)
    assert layer.stride_shape == (1, 2) and layer.convolution_shape == (2, 5, 5)
    assert all(type(entry) is int for entry in layer.stride_shape + layer.convolution_shape)
    reference.weights, reference.bias = xpnn.to_numpy(layer.weights), xpnn.to_numpy(layer.bias)
    x = np.random.default_rng(0).standard_normal((2, 2, 6, 7))
    assert_close(layer.forward(x), xpnn.to_numpy(reference.forward(x)), rtol=0.0)


def test_move_to_another_backend_drops_the_forward_cache():
    with xpnn.use_backend("cpu"):
        layer = Conv(1, (1, 3, 3), 2)
        layer.forward(np.ones((1, 1, 4, 4)))
    layer.to("array-api-strict")
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((1, 2, 4, 4)))
    output = layer.forward(np.ones((1, 1, 4, 4)))
    assert layer.backend.owns(output) and layer.backend.owns(layer.backward(np.ones((1, 2, 4, 4))))


@pytest.mark.parametrize("name, shape", [("weights", (4, 3, 3, 3)), ("weights", (4, 2, 3)),
                                         ("weights", (2, 4, 3, 3)), ("weights", (4, 2, 3, 3, 1)),
                                         ("weights", (4, 1, 2, 3, 3)), ("bias", (3,)), ("bias", (2, 2)),
                                         ("bias", (4, 1))])
def test_wrongly_shaped_parameters_are_refused_when_assigned(backend, name, shape):
    conv = Conv((1, 1), (2, 3, 3), 4)
    before = xpnn.to_numpy(getattr(conv, name))
    expected = "(4, 2, 3, 3)" if name == "weights" else "(4,)"
    with pytest.raises(ValueError, match=rf"Conv: {name} must have shape {re.escape(expected)}, "
                                         rf"received {re.escape(str(shape))}"):
        setattr(conv, name, np.zeros(shape))
    np.testing.assert_array_equal(xpnn.to_numpy(getattr(conv, name)), before)
    setattr(conv, name, np.ones(before.shape))   # the right shape is taken, on this backend
    assert backend.owns(getattr(conv, name))


def test_a_kernel_assigned_without_its_unit_axes_is_taken_as_the_course_does(backend):
    # The course's tests assign one kernel as (1, 3, 3) and then add the kernel axis with
    # np.expand_dims on what they read back; only axes of length 1 may differ.
    conv = Conv((1, 1), (1, 3, 3), 1)
    kernel = np.array([[1.0, 2.0, 1.0], [2.0, 3.0, 2.0], [1.0, 2.0, 1.0]]) / 15.0
    conv.weights = kernel[np.newaxis]
    conv.weights = np.expand_dims(xpnn.to_numpy(conv.weights), 0)  # (1, 1, 1, 3, 3): 1-axes only
    conv.bias = np.array([[0.0]])
    assert tuple(conv.weights.shape) == (1, 1, 3, 3) and tuple(conv.bias.shape) == (1,)
    image = np.random.default_rng(3).random((1, 1, 5, 6))
    padded = np.pad(image[0, 0], 1)
    expected = np.array([[np.sum(padded[y:y + 3, x:x + 3] * kernel) for x in range(6)]
                         for y in range(5)])
    np.testing.assert_allclose(xpnn.to_numpy(conv.forward(image))[0, 0], expected,
                               rtol=tolerance(backend))


def test_initialize_keeps_what_the_initializer_returns_and_forward_reports_a_misfit(backend):
    # The course's initialization test hands in an initializer that returns a fixed
    # (1, 3, 3, 3) array whatever the layer, and checks only fan_in and fan_out.
    class FixedInitializer:
        def initialize(self, shape, fan_in, fan_out):
            self.fan_in, self.fan_out = fan_in, fan_out
            return np.zeros((1, 3, 3, 3))

    conv = Conv((1, 1), (3, 5, 8), 4)
    initializer = FixedInitializer()
    conv.initialize(initializer, Constant(0.1))
    assert (initializer.fan_in, initializer.fan_out) == (3 * 5 * 8, 4 * 5 * 8)
    with pytest.raises(ValueError, match=r"Conv: weights must have shape \(4, 3, 5, 8\), have "
                                         r"\(1, 3, 3, 3\)"):
        conv.forward(np.ones((1, 3, 6, 6)))
    conv.initialize(Constant(0.5), Constant(0.1))  # a fitting initializer puts it right
    assert tuple(conv.forward(np.ones((1, 3, 6, 6))).shape) == (1, 4, 6, 6)


def test_only_leading_unit_axes_may_differ(backend):
    # Inner ones would move a kernel's axes: a vertical (1 x 3) kernel is no horizontal one.
    vertical = Conv((1, 1), (1, 1, 3), 2)
    with pytest.raises(ValueError, match=r"Conv: weights must have shape \(2, 1, 1, 3\)"):
        vertical.weights = np.ones((1, 2, 3, 1))
    one_dimensional = Conv(1, (1, 3), 4)  # 4 kernels over 1 channel, not 1 over 4
    with pytest.raises(ValueError, match=r"Conv: weights must have shape \(4, 1, 3\)"):
        one_dimensional.weights = np.ones((1, 4, 3))


@pytest.mark.parametrize("stride_shape", [(1, 1), [1, 1], np.array([2, 1])])
def test_a_convolution_shape_without_channels_says_so(stride_shape):
    """Conv((1, 1), (5, 5), 6): it read "stride_shape must have 1 or 1 entries for 1-D data"."""
    with xpnn.use_backend("cpu"), pytest.raises(ValueError) as info:
        Conv(stride_shape, (5, 5), 6)
    message = str(info.value)
    assert message.startswith("Conv: convolution_shape (5, 5) is 1-D, but stride_shape ")
    assert "(c, m) for 1-D" in message and "(c, m, n) for 2-D" in message
    assert "channel count missing from convolution_shape" in message and "(1, 5, 5), 6)" in message


def test_too_many_strides_for_1d_data_says_one_entry():
    with xpnn.use_backend("cpu"), pytest.raises(ValueError) as info:
        Conv((1, 1, 1), (1, 5), 6)
    assert str(info.value) == ("Conv: stride_shape must have 1 entry for 1-D data, got (1, 1, 1) "
                               "(3 entries)")


@pytest.mark.parametrize("convolution_shape, input_shape, hint", [
    ((1, 5, 5), (6, 28, 28), "Add it with x[:, None]"),
    ((1, 5), (6, 28), "Add it with x[:, None]"),
    ((3, 5, 5), (6, 28, 28), "It comes second, with 3 entries"),
])
def test_input_without_the_channel_axis_says_so(backend, convolution_shape, input_shape, hint):
    layer = Conv(1, convolution_shape, 2)
    with pytest.raises(ValueError) as info:
        layer.forward(np.zeros(input_shape))
    assert str(info.value).endswith("has one axis fewer than expected: is the channel axis "
                                    f"missing? {hint}")


def test_one_image_without_the_batch_axis_says_so(backend):
    layer = Conv(1, (3, 5, 5), 2)
    with pytest.raises(ValueError) as info:
        layer.forward(np.zeros((3, 32, 32)))  # (channels, y, x): one image
    assert str(info.value).endswith("has one axis fewer than expected: is the batch axis "
                                    "missing (one image)? Add it with x[None]"), str(info.value)


def test_input_with_the_channel_axis_at_the_wrong_count_gets_no_hint(backend):
    with pytest.raises(ValueError) as info:
        Conv(1, (1, 5, 5), 2).forward(np.zeros((6, 3, 28, 28)))
    assert "axis fewer" not in str(info.value)


@pytest.mark.parametrize("form", ["1-D", "0-D"])
def test_torch_boolean_arrays_are_refused_as_shapes(form):
    # operator.index takes a PyTorch boolean scalar as 0 or 1: its dtype must refuse it,
    # as a Python bool is refused.
    torch = pytest.importorskip("torch", reason="PyTorch's boolean scalars pass operator.index")
    flag = torch.tensor([True, True]) if form == "1-D" else torch.tensor(True)
    with xpnn.use_backend("cpu"):
        with pytest.raises(ValueError, match="Conv: stride_shape must be a positive integer"):
            Conv(flag, (1, 3, 3), 1)
        with pytest.raises(ValueError, match="Conv: convolution_shape must be a positive integer"):
            Conv(1, torch.tensor([True, True, True]), 1)


@pytest.mark.parametrize("stride_shape, convolution_shape, name", [
    ((), (1, 3, 3), "stride_shape"), ([], (1, 3), "stride_shape"), (1, (), "convolution_shape")])
def test_empty_shapes_are_called_empty(stride_shape, convolution_shape, name):
    with xpnn.use_backend("cpu"), pytest.raises(ValueError) as info:
        Conv(stride_shape, convolution_shape, 1)
    assert str(info.value).startswith(f"Conv: {name} must be a positive integer or a non-empty "
                                      "sequence"), str(info.value)


def test_weights_and_bias_keep_their_own_momentum(backend):
    # The bias gets its own copy of the optimizer: one shared velocity would mix them.
    layer, x, weights, bias, strides = _layer_and_data("2d")
    layer.optimizer = SgdWithMomentum(0.1, 0.9)
    velocity_weights, velocity_bias = np.zeros_like(weights), np.zeros_like(bias)
    for _ in range(3):
        error = np.random.standard_normal(tuple(layer.forward(x).shape))
        layer.backward(error)
        _, gradient_weights, gradient_bias = ref.conv_backward(x, weights, strides, error)
        velocity_weights = 0.9 * velocity_weights - 0.1 * gradient_weights
        velocity_bias = 0.9 * velocity_bias - 0.1 * gradient_bias
        weights, bias = weights + velocity_weights, bias + velocity_bias
    assert_close(layer.weights, weights, rtol=1e-12, atol=1e-13)
    assert_close(layer.bias, bias, rtol=1e-12, atol=1e-13)
