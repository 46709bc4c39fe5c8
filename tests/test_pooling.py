"""Pooling: forward/backward against NumPy loops, numerical gradients, PyTorch parity, errors."""
import numpy as np
import pytest

import xpnn
import conv_reference as ref
from conftest import assert_close, assert_passes_leave_inputs_unchanged
from xpnn.layers.pooling import Pooling
from xpnn.testing import L2Loss, gradient_check

# (stride_shape, pooling_shape, input shape)
CASES = {
    "subsampling-2x2/2": ((2, 2), (2, 2), (2, 2, 6, 4)),
    "overlapping-3x3/1": ((1, 1), (3, 3), (2, 2, 5, 5)),
    "overlapping-3x3/2": ((2, 2), (3, 3), (2, 2, 7, 6)),
    "rectangular-3x2/(2,1)": ((2, 1), (3, 2), (2, 3, 7, 5)),
    "gaps-2x2/3": (3, 2, (1, 2, 8, 7)),
    "whole-image": ((1, 1), (4, 3), (2, 1, 4, 3)),
}


def _layer(case):
    stride_shape, pooling_shape, input_shape = CASES[case]
    layer = Pooling(stride_shape, pooling_shape)
    return layer, np.random.standard_normal(input_shape)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_backward_match_reference(backend, case):
    layer, x = _layer(case)
    output = layer.forward(x)
    assert backend.owns(output)
    expected = ref.max_pool_forward(x, layer.pooling_shape, layer.stride_shape)
    assert_close(output, expected, rtol=0)
    error = np.random.standard_normal(expected.shape)
    gradient = layer.backward(error)
    assert backend.owns(gradient)
    # overlapping windows sum in another order than the reference: allow rounding
    assert_close(gradient, ref.max_pool_backward(x, layer.pooling_shape, layer.stride_shape, error),
                 rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_check_input(backend, case):
    layer, x = _layer(case)
    label = np.random.standard_normal(tuple(layer.forward(x).shape))
    assert np.max(gradient_check([layer, L2Loss()], x, label)) < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_pytorch_autograd(backend, case):
    torch = pytest.importorskip("torch", reason="PyTorch is the reference for parity tests")
    layer, x = _layer(case)
    output = layer.forward(x)
    error = np.random.standard_normal(tuple(output.shape))
    gradient = layer.backward(error)
    x_t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    expected = torch.nn.functional.max_pool2d(x_t, layer.pooling_shape, layer.stride_shape)
    expected.backward(torch.tensor(error, dtype=torch.float64))
    assert ref.relative_error(xpnn.to_numpy(output), expected.detach().numpy()) <= 1e-10
    assert ref.relative_error(xpnn.to_numpy(gradient), x_t.grad.numpy()) <= 1e-10


def test_ties_go_to_the_first_maximum_and_overlaps_sum(backend):
    x = np.array([[[[1.0, 1.0, 0.0],
                    [1.0, 1.0, 2.0],
                    [0.0, 2.0, 2.0]]]])
    layer = Pooling((1, 1), (2, 2))
    assert_close(layer.forward(x), np.array([[[[1.0, 2.0], [2.0, 2.0]]]]), rtol=0)
    gradient = layer.backward(np.array([[[[1.0, 10.0], [100.0, 1000.0]]]]))
    # windows: (0,0) ties four 1s -> (0,0); (0,1) -> (1,2); (1,0) -> (2,1);
    # (1,1) ties three 2s, first in row-major order is (1,2) -> overlaps with window (0,1).
    expected = np.array([[[[1.0, 0.0, 0.0],
                           [0.0, 0.0, 1010.0],
                           [0.0, 100.0, 0.0]]]])
    assert_close(gradient, expected, rtol=0)


def test_constant_image_routes_every_error_once(backend):
    layer = Pooling((2, 2), (2, 2))
    layer.forward(np.zeros((2, 3, 4, 6)))
    gradient = xpnn.to_numpy(layer.backward(np.ones((2, 3, 2, 3))))
    expected = np.zeros((2, 3, 4, 6))
    expected[:, :, ::2, ::2] = 1.0      # top-left corner of each window
    np.testing.assert_array_equal(gradient, expected)


def test_result_does_not_depend_on_position_in_batch(backend):
    layer = Pooling((2, 1), (3, 2))
    x = np.random.standard_normal((4, 2, 7, 5))
    order = np.array([3, 1, 0, 2])
    output = xpnn.to_numpy(layer.forward(x))
    error = np.random.standard_normal(output.shape)
    gradient = xpnn.to_numpy(layer.backward(error))
    assert_close(layer.forward(x[order]), output[order], rtol=0)
    assert_close(layer.backward(error[order]), gradient[order], rtol=0)
    for sample in range(4):
        assert_close(layer.forward(x[sample:sample + 1]), output[sample:sample + 1], rtol=0)


def test_forward_and_backward_leave_their_inputs_unchanged(backend):
    layer, x = _layer("overlapping-3x3/1")
    assert_passes_leave_inputs_unchanged(layer, x, backend)


def test_float32(backend32):
    layer = Pooling((2, 2), (2, 2))
    x = np.random.standard_normal((2, 2, 4, 4)).astype(np.float32)
    output = layer.forward(x)
    gradient = layer.backward(output)
    assert output.dtype == backend32.dtype and gradient.dtype == backend32.dtype
    assert_close(output, ref.max_pool_forward(x, (2, 2), (2, 2)), rtol=0)


@pytest.mark.parametrize("input_shape", [(2, 3, 4), (2, 1, 3, 4, 4), (4, 4)])
def test_wrong_rank_raises_value_error_naming_layer_and_shape(backend, input_shape):
    with pytest.raises(ValueError) as info:
        Pooling((2, 2), (2, 2)).forward(np.zeros(input_shape))
    message = str(info.value)
    assert "Pooling" in message and str(input_shape) in message
    assert "(batch, channels, y, x)" in message


@pytest.mark.parametrize("input_shape", [(1, 1, 2, 5), (1, 1, 5, 1)])
def test_input_smaller_than_window_raises(backend, input_shape):
    with pytest.raises(ValueError) as info:
        Pooling((1, 1), (3, 2)).forward(np.zeros(input_shape))
    message = str(info.value)
    assert "Pooling" in message and str(input_shape) in message and "(3, 2)" in message


def test_bad_error_shape_raises(backend):
    layer = Pooling((2, 2), (2, 2))
    layer.forward(np.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match=r"Pooling.*\(1, 2, 2, 2\).*\(1, 2, 4, 4\)"):
        layer.backward(np.zeros((1, 2, 4, 4)))


def test_backward_before_forward_raises():
    with xpnn.use_backend("cpu"), pytest.raises(RuntimeError, match="Pooling"):
        Pooling(2, 2).backward(np.zeros((1, 1, 2, 2)))


@pytest.mark.parametrize("stride_shape, pooling_shape, strides, window", [
    (2, 3, (2, 2), (3, 3)), ((2,), [3, 2], (2, 2), (3, 2)), ((1, 2), (2, 2), (1, 2), (2, 2))])
def test_argument_forms(stride_shape, pooling_shape, strides, window):
    with xpnn.use_backend("cpu"):
        layer = Pooling(stride_shape, pooling_shape)
    assert layer.stride_shape == strides and layer.pooling_shape == window
    assert not layer.trainable


@pytest.mark.parametrize("arguments", [
    ((0, 2), (2, 2)), ((2, 2, 2), (2, 2)), ((2, 2), (2, 0)), ((2, 2), (2.0, 2)), ((2, 2), ()),
    ("2", (2, 2)),
    # arrays: floats, booleans, 2-D, empty, non-positive, a 0-D float
    (np.array([2.0, 2.0]), (2, 2)), ((2, 2), np.array([1.5, 2.0])), (np.array([True, True]), 2),
    (np.array([[2, 2]]), 2), (2, np.array([], dtype=np.int64)), (2, np.array([2, 0])),
    (np.array([-2, 2]), 2), (np.array(2.0), 2),
])
def test_constructor_rejects_bad_arguments(arguments):
    with xpnn.use_backend("cpu"), pytest.raises(ValueError, match="Pooling"):
        Pooling(*arguments)


@pytest.mark.parametrize("form", ["numpy-int64", "numpy-int32", "array-api-strict"])
def test_shapes_given_as_integer_arrays(backend, form):
    """Strides and window as 1-D integer arrays (NumPy's or another library's) build
    the same layer as Python ints: same attributes, same output and gradient."""
    convert = {"numpy-int64": np.array, "numpy-int32": lambda v: np.array(v, dtype=np.int32),
               "array-api-strict": lambda v: pytest.importorskip("array_api_strict").asarray(v)}[form]
    layer, reference = Pooling(convert([2, 1]), convert([2, 3])), Pooling((2, 1), (2, 3))
    assert layer.stride_shape == (2, 1) and layer.pooling_shape == (2, 3)
    assert all(type(entry) is int for entry in layer.stride_shape + layer.pooling_shape)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 7))
    assert_close(layer.forward(x), xpnn.to_numpy(reference.forward(x)), rtol=0.0)
    error = np.random.default_rng(1).standard_normal(tuple(layer.forward(x).shape))
    assert_close(layer.backward(error), xpnn.to_numpy(reference.backward(error)), rtol=0.0)


def test_move_to_another_backend_drops_the_forward_cache():
    with xpnn.use_backend("cpu"):
        layer = Pooling((1, 1), (2, 2))
        layer.forward(np.random.standard_normal((1, 2, 4, 4)))
    layer.to("array-api-strict")
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((1, 2, 3, 3)))
    rng = np.random.default_rng(12)
    x, error = rng.standard_normal((1, 2, 4, 4)), rng.standard_normal((1, 2, 3, 3))
    output = layer.forward(x)
    gradient = layer.backward(error)
    assert layer.backend.owns(output) and layer.backend.owns(gradient)
    # overlapping windows sum in another order than the reference: allow rounding
    assert_close(gradient, ref.max_pool_backward(x, (2, 2), (1, 1), error), rtol=1e-13, atol=1e-15)


def test_torch_boolean_arrays_are_refused_as_shapes():
    torch = pytest.importorskip("torch", reason="PyTorch's boolean scalars pass operator.index")
    with xpnn.use_backend("cpu"):
        for flags in (torch.tensor([True, True]), torch.tensor(True)):
            with pytest.raises(ValueError, match="Pooling: stride_shape"):
                Pooling(flags, 2)
            with pytest.raises(ValueError, match="Pooling: pooling_shape"):
                Pooling(1, flags)


def test_an_empty_shape_is_called_empty():
    with xpnn.use_backend("cpu"), pytest.raises(ValueError) as info:
        Pooling((), 2)
    assert str(info.value).startswith("Pooling: stride_shape must be a positive integer or a "
                                      "non-empty sequence"), str(info.value)
