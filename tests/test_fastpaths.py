"""Backend-specific fast paths against the generic array-API reference (xpnn.ops.Ops).

Each fast path (``backend.ops`` of the NumPy backend is a
:class:`xpnn.ops.numpy_ops.NumpyOps`) must give the generic path's results on
random inputs of several shapes (odd sizes, strides, even kernels, 1-D and 2-D),
in float32 and float64, whatever the memory layout of its inputs. Where the
result is a selection (ReLU, max pooling) it must be bit for bit the same.
"""
import math

import numpy as np
import pytest

import xpnn
from xpnn.backend import make_backend
from xpnn.models import lenet
from xpnn.ops import Ops
from conftest import CyclingBatches
from xpnn.ops.numpy_ops import NumpyOps
from xpnn.ops.threads import split_range

DTYPES = ["float32", "float64"]
RTOL = {"float32": 2e-5, "float64": 1e-12}

CONV_CASES = [
    # (input shape, kernel (spatial), strides)
    ((2, 3, 7, 5), (3, 3), (1, 1)),
    ((3, 2, 8, 6), (2, 4), (2, 3)),       # even kernels pad one more at the end
    ((1, 1, 4, 4), (1, 1), (2, 2)),
    ((4, 6, 14, 14), (5, 5), (1, 1)),     # LeNet's second convolution, small batch
    ((2, 3, 9, 7), (5, 5), (3, 2)),
    ((5, 1, 11, 3), (3, 1), (1, 2)),
    ((3, 2, 9), (4,), (2,)),              # 1-D
    ((2, 1, 6), (5,), (1,)),
]
CONV_IDS = ["x".join(map(str, shape)) + f"-k{kernel}-s{strides}" for shape, kernel, strides in CONV_CASES]


@pytest.fixture(params=[("float32", 1), ("float64", 1), ("float32", 3), ("float64", 2)],
                ids=["float32", "float64", "float32-3threads", "float64-2threads"])
def numpy_pair(request):
    """(fast ops, generic ops, dtype name) on the NumPy backend; the fast ops split in threads."""
    dtype, threads = request.param
    backend = make_backend("cpu", dtype)
    assert isinstance(backend.ops, NumpyOps)
    fast = NumpyOps(backend, threads=threads)
    # Split even the small test arrays, so the parts really run on the helper threads.
    return _SplitAlways(fast), Ops(backend), dtype


class _SplitAlways:
    """A NumpyOps whose operations split into its threads whatever their size."""

    def __init__(self, ops):
        self._ops = ops
        ops._parts = lambda length, elements, minimum=0: split_range(length, ops.threads)

    def __getattr__(self, name):
        return getattr(self._ops, name)


def _random(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _layouts(x):
    """The same values in three memory layouts: C order, batch innermost, reversed last axis."""
    batch_innermost = np.transpose(
        np.ascontiguousarray(np.moveaxis(x, 0, -1)), (x.ndim - 1,) + tuple(range(x.ndim - 1)))
    reversed_last = np.flip(np.flip(x, axis=-1).copy(), axis=-1)
    return {"c-order": x, "batch-innermost": batch_innermost, "negative-strides": reversed_last}


def _close(actual, expected, dtype):
    assert actual.dtype == expected.dtype == np.dtype(dtype)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=RTOL[dtype])


# -- convolution ------------------------------------------------------------------

@pytest.mark.parametrize("shape, kernel_shape, strides", CONV_CASES, ids=CONV_IDS)
def test_conv_forward_and_backward_match_generic(numpy_pair, shape, kernel_shape, strides):
    fast, generic, dtype = numpy_pair
    kernels = 4
    weights = _random((kernels, shape[1]) + kernel_shape, dtype, seed=1)
    bias = _random((kernels,), dtype, seed=2)
    x = _random(shape, dtype)
    expected, generic_cache = generic.conv_forward(x, weights, bias, strides)
    error = _random(expected.shape, dtype, seed=3)
    expected_gradients = generic.conv_backward(error, weights, generic_cache)
    for layout, x_in in _layouts(x).items():
        for error_layout, error_in in _layouts(error).items():
            output, cache = fast.conv_forward(x_in, weights, bias, strides)
            _close(output, expected, dtype)
            gradients = fast.conv_backward(error_in, weights, cache)
            for name, actual, reference in zip(("input", "weights", "bias"), gradients,
                                               expected_gradients):
                assert actual.shape == reference.shape, (layout, error_layout, name)
                _close(actual, reference, dtype)


@pytest.mark.parametrize("rows_per_block", [1, 2])
@pytest.mark.parametrize("shape, kernel_shape, strides", CONV_CASES, ids=CONV_IDS)
def test_testing_phase_conv_forward_in_row_blocks_matches_generic(numpy_pair, monkeypatch, shape,
                                                               kernel_shape, strides, rows_per_block):
    import xpnn.ops.numpy_conv as numpy_conv

    fast, generic, dtype = numpy_pair
    # Blocks of one or two output rows (an odd row count leaves a short last block):
    # several blocks per part, parts on the threads.
    output_columns = -(-shape[3] // strides[1]) if len(shape) == 4 else 1
    row_bytes = (shape[1] * math.prod(kernel_shape) * output_columns * shape[0]
                 * np.dtype(dtype).itemsize)
    monkeypatch.setattr(numpy_conv, "BLOCK_BYTES", rows_per_block * row_bytes)
    weights = _random((4, shape[1]) + kernel_shape, dtype, seed=1)
    bias = _random((4,), dtype, seed=2)
    x = _random(shape, dtype)
    expected, generic_cache = generic.conv_forward(x, weights, bias, strides)
    output, cache = fast.conv_forward(_layouts(x)["batch-innermost"], weights, bias, strides,
                                      need_backward=False)
    _close(output, expected, dtype)
    # A backward pass after it (rebuilding the columns) still gives the gradients.
    error = _random(expected.shape, dtype, seed=3)
    for actual, reference in zip(fast.conv_backward(error, weights, cache),
                                 generic.conv_backward(error, weights, generic_cache)):
        _close(actual, reference, dtype)


def test_testing_phase_conv_cache_does_not_alias_the_input():
    backend = make_backend("cpu", "float64")
    x, weights, bias = _random((2, 3, 6, 5), "float64"), _random((2, 3, 3, 3), "float64", 1), \
        _random((2,), "float64", 2)
    _, cache = backend.ops.conv_forward(x, weights, bias, (1, 1), need_backward=False)
    _, reference_cache = Ops(backend).conv_forward(x, weights, bias, (1, 1))
    x[...] = 0.0   # the caller reuses its buffer before calling backward
    error = _random((2, 2, 6, 5), "float64", 3)
    np.testing.assert_allclose(backend.ops.conv_backward(error, weights, cache)[1],
                               Ops(backend).conv_backward(error, weights, reference_cache)[1])


@pytest.mark.parametrize("shape, kernel_shape, strides", CONV_CASES[:3] + CONV_CASES[-1:],
                         ids=CONV_IDS[:3] + CONV_IDS[-1:])
def test_conv_backward_without_input_gradient(numpy_pair, shape, kernel_shape, strides):
    fast, generic, dtype = numpy_pair
    weights = _random((3, shape[1]) + kernel_shape, dtype, seed=1)
    bias = _random((3,), dtype, seed=2)
    x = _random(shape, dtype)
    output, cache = fast.conv_forward(x, weights, bias, strides)
    error = _random(output.shape, dtype, seed=3)
    _, generic_cache = generic.conv_forward(x, weights, bias, strides)
    _, expected_weights, expected_bias = generic.conv_backward(error, weights, generic_cache)
    gradient_input, gradient_weights, gradient_bias = fast.conv_backward(
        error, weights, cache, input_gradient=False)
    assert gradient_input is None
    _close(gradient_weights, expected_weights, dtype)
    _close(gradient_bias, expected_bias, dtype)


def test_conv_leaves_its_inputs_unchanged(numpy_pair):
    fast, _, dtype = numpy_pair
    x, weights, bias = (_random((2, 3, 6, 5), dtype), _random((4, 3, 3, 3), dtype, 1),
                        _random((4,), dtype, 2))
    copies = [a.copy() for a in (x, weights, bias)]
    output, cache = fast.conv_forward(x, weights, bias, (1, 1))
    error = _random(output.shape, dtype, 3)
    error_copy = error.copy()
    fast.conv_backward(error, weights, cache)
    for array, copy in zip((x, weights, bias, error), copies + [error_copy]):
        np.testing.assert_array_equal(array, copy)


# -- max pooling --------------------------------------------------------------------

POOL_SHAPES = [(2, 3, 8, 6), (3, 2, 7, 5), (1, 1, 2, 2), (4, 6, 28, 28), (2, 1, 3, 9)]


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=["x".join(map(str, s)) for s in POOL_SHAPES])
@pytest.mark.parametrize("values", ["random", "ties"])
def test_max_pool_2x2_matches_generic_bit_for_bit(numpy_pair, shape, values):
    fast, generic, dtype = numpy_pair
    x = _random(shape, dtype)
    if values == "ties":  # few distinct values and zero borders: many tied maxima
        x = np.round(x).astype(dtype)
        x[..., :1, :] = 0.0
    expected, generic_cache = generic.max_pool_forward(x, (2, 2), (2, 2))
    error = _random(expected.shape, dtype, seed=3)
    expected_gradient = generic.max_pool_backward(error, generic_cache)
    for layout, x_in in _layouts(x).items():
        for error_in in _layouts(error).values():
            output, cache = fast.max_pool_forward(x_in, (2, 2), (2, 2))
            assert output.dtype == expected.dtype and output.shape == expected.shape
            np.testing.assert_array_equal(output, expected, err_msg=layout)
            gradient = fast.max_pool_backward(error_in, cache)
            assert gradient.dtype == expected_gradient.dtype
            np.testing.assert_array_equal(gradient, expected_gradient, err_msg=layout)


def _windows_with_nans(dtype):
    """Random (2, 16, 4, 6) images whose 2x2 windows in channel k hold a NaN at the
    positions (row-major) of k's set bits: every pattern of NaNs in a window, in
    every window position, with -inf, +inf and ties in some of them."""
    x = _random((2, 16, 4, 6), dtype)
    x[1, :, :2, 2:4] = 1.0  # ties beside the NaNs
    x[0, :, 2:, :2] = -np.inf
    x[1, :, 2:, 4:] = np.inf
    for channel in range(16):
        for offset in range(4):
            if channel >> offset & 1:
                x[:, channel, offset // 2::2, offset % 2::2] = np.nan
    return x


@pytest.mark.parametrize("case", ["every-pattern", "sprinkled", "one-part"])
def test_max_pool_2x2_routes_nans_like_generic(numpy_pair, case):
    """A window holding a NaN pools to NaN and sends its error to its first NaN
    (argmax's rule), on the fast path as on the generic one."""
    fast, generic, dtype = numpy_pair
    if case == "every-pattern":
        x = _windows_with_nans(dtype)
    else:  # a few NaNs among LeNet-sized maps; "one-part": only in the first channel
        x = _random((4, 6, 28, 28), dtype)
        nans = np.random.default_rng(5).random(x.shape) < 0.02
        if case == "one-part":
            nans[:, 1:] = False
        x[nans] = np.nan
    expected, generic_cache = generic.max_pool_forward(x, (2, 2), (2, 2))
    assert np.isnan(expected).any() and not np.isnan(expected).all()
    error = _random(expected.shape, dtype, seed=3)
    expected_gradient = generic.max_pool_backward(error, generic_cache)
    for layout, x_in in _layouts(x).items():
        output, cache = fast.max_pool_forward(x_in, (2, 2), (2, 2))
        np.testing.assert_array_equal(output, expected, err_msg=layout)
        gradient = fast.max_pool_backward(error, cache)
        np.testing.assert_array_equal(gradient, expected_gradient, err_msg=layout)


@pytest.mark.parametrize("pool_shape, strides", [((3, 3), (2, 2)), ((2, 2), (1, 1)),
                                                 ((2, 3), (2, 3))])
def test_other_pooling_windows_use_the_generic_path(numpy_pair, pool_shape, strides):
    fast, generic, dtype = numpy_pair
    x = _random((2, 3, 7, 9), dtype)
    output, cache = fast.max_pool_forward(x, pool_shape, strides)
    expected, generic_cache = generic.max_pool_forward(x, pool_shape, strides)
    np.testing.assert_array_equal(output, expected)
    error = _random(expected.shape, dtype, seed=3)
    np.testing.assert_array_equal(fast.max_pool_backward(error, cache),
                                  generic.max_pool_backward(error, generic_cache))


# -- batch normalization ------------------------------------------------------------------

BN_SHAPES = [(2, 3, 7, 5), (4, 6, 28, 28), (1, 2, 1, 3), (8, 5)]


@pytest.mark.parametrize("shape", BN_SHAPES, ids=["x".join(map(str, s)) for s in BN_SHAPES])
@pytest.mark.parametrize("phase", ["batch-statistics", "given-statistics"])
def test_batch_norm_matches_generic(numpy_pair, shape, phase):
    fast, generic, dtype = numpy_pair
    channels = shape[1]
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    x = _random(shape, dtype) * 3.0 + 1.5
    gamma, beta = _random((channels,), dtype, 1), _random((channels,), dtype, 2)
    given = None
    if phase == "given-statistics":
        given = (_random((channels,), dtype, 4), np.abs(_random((channels,), dtype, 5)) + 0.5)
    expected, expected_statistics, generic_cache = generic.batch_norm_forward(
        x, gamma, beta, 1e-5, axes, given)
    error = _random(shape, dtype, 3)
    expected_gradients = generic.batch_norm_backward(error, gamma, generic_cache)
    for layout, x_in in _layouts(x).items():
        for error_in in _layouts(error).values():
            output, statistics, cache = fast.batch_norm_forward(x_in, gamma, beta, 1e-5, axes, given)
            _close(output, expected, dtype)
            for actual, reference in zip(statistics, expected_statistics):
                _close(actual, reference, dtype)
            gradients = fast.batch_norm_backward(error_in, gamma, cache)
            for actual, reference in zip(gradients, expected_gradients):
                _close(actual, reference, dtype)


# -- ReLU -------------------------------------------------------------------------------

def _special_values(shape, dtype):
    x = _random(shape, dtype)
    flat = x.reshape(-1)
    flat[:6] = [0.0, -0.0, np.inf, -np.inf, np.nan, np.finfo(dtype).tiny]
    return x


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 5)])
def test_relu_matches_generic_bit_for_bit(numpy_pair, shape):
    fast, generic, dtype = numpy_pair
    x = _special_values(shape, dtype)
    error = _special_values(shape, dtype)[::-1].copy() if len(shape) == 1 else _special_values(shape, dtype)
    expected, generic_mask = generic.relu_forward(x)
    expected_error = generic.relu_backward(error, generic_mask)
    for x_in in _layouts(x).values():
        for error_in in _layouts(error).values():
            output, mask = fast.relu_forward(x_in)
            assert output.dtype == expected.dtype
            # Bit patterns: +0.0 where the generic path gives +0.0, NaN handled alike.
            _assert_same_bits(output, expected)
            backward = fast.relu_backward(error_in, mask)
            _assert_same_bits(backward, expected_error)
    # A mask of the generic form (a layer moved here from another backend) works too.
    np.testing.assert_array_equal(fast.relu_backward(error, generic_mask), expected_error)
    # Testing phase (need_backward=False): the same results, and backward still works.
    for x_in in _layouts(x).values():
        output, stand_in = fast.relu_forward(x_in, need_backward=False)
        _assert_same_bits(output, expected)
        backward = fast.relu_backward(error, stand_in)
        _assert_same_bits(backward, expected_error)
        # ... also when the layer then moves to a backend with the generic ops.
        np.testing.assert_array_equal(generic.relu_backward(error, stand_in), expected_error)


def _assert_same_bits(actual, expected):
    """Equal bit patterns (+0.0 is not -0.0; NaNs must match too)."""
    np.testing.assert_array_equal(actual.view(f"u{actual.itemsize}"),
                                  expected.view(f"u{expected.itemsize}"))


def test_generic_relu_backward_accepts_the_numpy_mask():
    backend = make_backend("cpu", "float64")
    x, error = _random((4, 5), "float64"), _random((4, 5), "float64", 1)
    _, fast_mask = backend.ops.relu_forward(x)
    np.testing.assert_array_equal(Ops(backend).relu_backward(error, fast_mask),
                                  np.where(x > 0, error, 0.0))


# -- the whole network ------------------------------------------------------------------



def _train_lenet(batch_norm, dtype, steps):
    np.random.seed(5)
    rng = np.random.default_rng(5)
    images = rng.random((8, 1, 28, 28)).astype(dtype)
    images[:, :, :4, :] = 0.0
    labels = np.eye(10, dtype=dtype)[rng.integers(0, 10, 8)]
    net = lenet.build(batch_norm=batch_norm, dropout=batch_norm, batch_norm_eps=1e-5)
    net.data_layer = CyclingBatches(images, labels, 4)
    net.train(steps)
    trainable = [layer for layer in net.layers if layer.trainable]
    return {"loss": np.array([float(value) for value in net.loss]),
            "weights": [xpnn.to_numpy(layer.weights) for layer in trainable],
            "gradients": [xpnn.to_numpy(layer.gradient_weights) for layer in trainable],
            "prediction": xpnn.to_numpy(net.test(images))}


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn-dropout"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lenet_training_matches_the_generic_path(monkeypatch, batch_norm, dtype):
    # float64: three steps agree to rounding. float32: one step, because a bias
    # in front of batch normalization has a zero gradient up to rounding noise,
    # which Adam scales up to a full learning-rate step (either sign).
    steps = 3 if dtype == "float64" else 1
    with xpnn.use_backend("cpu", dtype=dtype) as backend:
        fast = _train_lenet(batch_norm, dtype, steps)
        monkeypatch.setattr(backend, "ops", Ops(backend))
        generic = _train_lenet(batch_norm, dtype, steps)
    # (In float64 that noise is ~1e-17, below Adam's epsilon, but with batch
    # normalization it still shows in the eighth digit after three steps.)
    rtol = 1e-4 if dtype == "float32" else (1e-6 if batch_norm else 1e-9)
    np.testing.assert_allclose(fast["loss"], generic["loss"], rtol=rtol)
    if dtype == "float64" or not batch_norm:
        # (Testing phase uses the running mean, which does not follow that noisy bias step.)
        np.testing.assert_allclose(fast["prediction"], generic["prediction"], rtol=rtol,
                                   atol=rtol * 1e-2)
    for actual, expected in zip(fast["gradients"], generic["gradients"]):
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.max(np.abs(expected)))
    if dtype == "float64":
        for actual, expected in zip(fast["weights"], generic["weights"]):
            np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * 1e-2)


def test_network_lets_its_first_layer_skip_the_input_gradient():
    with xpnn.use_backend("cpu", dtype="float64"):
        net = lenet.build()
        rng = np.random.default_rng(0)
        images = rng.random((4, 1, 28, 28))
        net.data_layer = CyclingBatches(images, np.eye(10)[rng.integers(0, 10, 4)], 2)
        first = net.layers[0]
        seen = []
        backward = first.backward

        def spy(error_tensor):
            seen.append(first.skip_input_gradient)
            result = backward(error_tensor)
            seen.append(result)
            return result

        first.backward = spy
        net.train(1)
        assert seen[0] is True and seen[1] is None
        assert first.skip_input_gradient is False      # reset after the network's pass
        # Used on its own, the same layer computes the input gradient.
        output = first.forward(images[:2])
        gradient = backward(np.ones(output.shape))
        assert gradient is not None and gradient.shape == (2, 1, 28, 28)


def test_caches_survive_deepcopy_and_pickle():
    import copy
    import pickle

    backend = make_backend("cpu", "float32")
    x = _random((2, 3, 6, 6), "float32")
    _, conv_cache = backend.ops.conv_forward(x, _random((2, 3, 3, 3), "float32"),
                                             _random((2,), "float32"), (1, 1))
    _, pool_cache = backend.ops.max_pool_forward(x, (2, 2), (2, 2))
    for cache in (conv_cache, pool_cache):
        for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
            assert type(clone) is type(cache) and len(clone) == len(cache)


# -- fused SoftMax + cross-entropy gradient ------------------------------------------------

@pytest.mark.parametrize("labels", ["one-hot", "soft"])
def test_fused_softmax_cross_entropy_gradient_equals_the_composition(backend32, labels):
    from xpnn.layers import SoftMax
    from xpnn.losses import CrossEntropyLoss

    rng = np.random.default_rng(7)
    # Spread logits: some probabilities far below the dtype's eps (no eps in either gradient).
    logits = (rng.standard_normal((6, 10)) * 12.0).astype(np.float32)
    label = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 6)]
    label[0] = np.eye(10, dtype=np.float32)[int(np.argmin(logits[0]))]  # a hopeless sample
    if labels == "soft":
        label = rng.dirichlet(np.ones(10), 6).astype(np.float32)
    softmax, loss = SoftMax(), CrossEntropyLoss()
    loss.forward(softmax.forward(logits), label)
    fused = xpnn.to_numpy(loss.backward_through_softmax(label))
    composed = xpnn.to_numpy(softmax.backward(loss.backward(label)))
    assert fused.dtype == np.float32 and fused.shape == (6, 10)
    np.testing.assert_allclose(fused, composed, rtol=1e-5, atol=1e-6)


def test_fused_gradient_float64_and_network_use(backend, monkeypatch):
    from xpnn.initializers import He, Constant
    from xpnn.layers import FullyConnected, ReLU, SoftMax
    from xpnn.losses import CrossEntropyLoss
    from xpnn.optimizers import Sgd

    rng = np.random.default_rng(3)
    images = rng.standard_normal((5, 4)) * 6.0
    labels = np.eye(3)[rng.integers(0, 3, 5)]

    def gradients(fused):
        np.random.seed(1)
        net = xpnn.NeuralNetwork(Sgd(1e-3), He(), Constant(0.1))
        for layer in (FullyConnected(4, 8), ReLU(), FullyConnected(8, 3), SoftMax()):
            net.append_layer(layer)
        net.loss_layer = CrossEntropyLoss()
        net.data_layer = CyclingBatches(images, labels, 5)
        if not fused:
            monkeypatch.setattr(net, "_softmax_feeds_cross_entropy", lambda: False)
        net.forward()
        assert net._softmax_feeds_cross_entropy() is fused
        net.backward()
        return [xpnn.to_numpy(layer.gradient_weights) for layer in net.layers if layer.trainable]

    for actual, expected in zip(gradients(True), gradients(False)):
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-13)


def test_network_does_not_fuse_a_subclassed_softmax_or_loss():
    from xpnn.layers import SoftMax
    from xpnn.losses import CrossEntropyLoss
    from xpnn.optimizers import Sgd
    from xpnn.initializers import Constant

    class LoudSoftMax(SoftMax):
        def backward(self, error_tensor):
            return super().backward(error_tensor)

    for last, loss in ((LoudSoftMax(), CrossEntropyLoss()), (SoftMax(), type("L", (CrossEntropyLoss,), {
            "backward": lambda self, label: CrossEntropyLoss.backward(self, label)})())):
        net = xpnn.NeuralNetwork(Sgd(1.0), Constant(0.1), Constant(0.1))
        net.append_layer(last)
        net.loss_layer = loss
        net.data_layer = CyclingBatches(np.zeros((2, 3)), np.eye(3)[:2], 2)
        net.forward()
        assert not net._softmax_feeds_cross_entropy()


def test_compute_scope_keeps_blas_to_one_thread_only_while_threaded():
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="BLAS threads are set through it")
    backend = make_backend("cpu", "float32")

    def blas_threads():
        # NumPy's BLAS: the one xpnn's work calls. (SciPy, once imported by another test,
        # brings its own OpenBLAS, which is not xpnn's to hold.) A NumPy linked to a
        # system BLAS has none under its own name: then every BLAS counts.
        libraries = [lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
        numpys = [lib for lib in libraries if "numpy" in lib["filepath"]]
        return [lib["num_threads"] for lib in numpys or libraries]

    before = blas_threads()
    threaded = NumpyOps(backend, threads=2)
    with threaded.compute_scope():
        assert set(blas_threads()) == {1}
        with threaded.compute_scope():       # nested: still one thread, restored once
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {1}
    assert blas_threads() == before
    with NumpyOps(backend, threads=1).compute_scope(), Ops(backend).compute_scope():
        assert blas_threads() == before


def test_activations_stay_batch_innermost_between_fast_paths():
    # Not a timing test: the layout is what makes the fast paths fast, so check that
    # convolution, batch norm, ReLU and pooling hand it on (the batch axis has the
    # smallest stride) and that Flatten's (b, features) is a view, not a copy.
    from xpnn.layers import BatchNormalization, Conv, Flatten, Pooling, ReLU

    with xpnn.use_backend("cpu", dtype="float32"):
        layers = [Conv((1, 1), (1, 5, 5), 4), BatchNormalization(4, eps=1e-5), ReLU(),
                  Pooling((2, 2), (2, 2)), Conv((1, 1), (4, 3, 3), 3), ReLU()]
        tensor = _random((5, 1, 12, 10), "float32")
        for layer in layers:
            tensor = layer.forward(tensor)
            assert tensor.strides[0] == tensor.itemsize, type(layer).__name__
        flat = Flatten().forward(tensor)
        assert np.shares_memory(flat, tensor)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn-dropout"])
def test_network_test_in_pieces_matches_one_call(monkeypatch, threads, batch_norm):
    # NumpyOps.map_samples runs pieces of the batch on the threads; every layer's
    # testing-phase forward must give the one-call values on every piece, in order.
    import threading
    import xpnn.ops.numpy_ops as numpy_ops

    monkeypatch.setattr(numpy_ops, "MIN_SAMPLES_PER_THREAD", 2)
    with xpnn.use_backend("cpu", dtype="float64") as backend:
        xpnn.seed(3)
        net = lenet.build(batch_norm=batch_norm, dropout=batch_norm)
        images = _random((7, 1, 28, 28), "float64", seed=4)
        net.data_layer = CyclingBatches(images, np.eye(10)[np.arange(7) % 10], 7)
        net.train(2)                                    # running statistics exist
        monkeypatch.setattr(backend, "ops", Ops(backend))
        expected = net.test(images)
        fast = NumpyOps(backend, threads=threads)
        monkeypatch.setattr(backend, "ops", fast)
        seen = set()
        run_layers = net._run_layers_unnoted  # (what test runs on each piece)

        def recording(piece):
            seen.add((threading.get_ident(), piece.shape[0]))
            return run_layers(piece)

        monkeypatch.setattr(net, "_run_layers_unnoted", recording)
        for _ in range(3):
            np.testing.assert_allclose(net.test(images), expected, rtol=1e-12, atol=1e-15)
    pieces = {size for _, size in seen}
    assert len({ident for ident, _ in seen}) == threads and sum(pieces) <= 7 and max(pieces) < 7


def test_map_samples_keeps_small_batches_whole_and_generic_ops_call_once():
    backend = make_backend("cpu", "float32")
    calls = []

    def function(x):
        calls.append(x.shape[0])
        return x * 2.0

    x = _random((100, 3), "float32")
    np.testing.assert_array_equal(NumpyOps(backend, threads=2).map_samples(function, x), x * 2.0)
    np.testing.assert_array_equal(Ops(backend).map_samples(function, x), x * 2.0)
    assert calls == [100, 100]
    big = _random((1000, 3), "float32")
    np.testing.assert_array_equal(NumpyOps(backend, threads=2).map_samples(function, big), big * 2.0)
    assert sorted(calls[2:]) == [500, 500]


# -- Adam ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(785, 120), (16, 6, 5, 5), (7,), ()], ids=["fc", "conv", "1d", "0d"])
@pytest.mark.parametrize("decay", [0.0, 4e-4], ids=["no-l2", "l2"])
def test_adam_update_matches_generic_bit_for_bit(numpy_pair, shape, decay):
    fast, generic, dtype = numpy_pair
    weights = {name: np.asarray(_random(shape, dtype, seed=1)) for name in ("fast", "generic")}
    moments = {name: tuple(np.zeros(shape, dtype=dtype) for _ in range(2)) + (np.empty(shape, dtype=dtype),)
               for name in weights}
    for step in range(1, 6):
        gradient = np.asarray(_random(shape, dtype, seed=10 + step) * 1e-2)
        before = gradient.copy()
        hyper = (0.9, 0.999, 5e-4 / (1 - 0.9 ** step), 1 / math.sqrt(1 - 0.999 ** step), 1e-8, 5e-4, decay)
        previous = weights["fast"].copy()
        weights["fast"] = fast.adam_update(weights["fast"], gradient, moments["fast"], *hyper)
        weights["generic"] = generic.adam_update(weights["generic"], gradient, moments["generic"], *hyper)
        _assert_same_bits(weights["fast"], weights["generic"])
        for actual, expected in zip(moments["fast"][:2], moments["generic"][:2]):
            _assert_same_bits(actual, expected)
        assert not np.array_equal(weights["fast"], previous)  # it did take a step
        np.testing.assert_array_equal(gradient, before)  # and left its gradient alone


@pytest.mark.parametrize("shape", [(785, 120), (16, 6, 5, 5), (7,), ()], ids=["fc", "conv", "1d", "0d"])
def test_sum_of_squares_matches_generic(numpy_pair, shape):
    fast, generic, dtype = numpy_pair
    for x in _layouts(_random(shape, dtype, seed=3)).values() if shape else [_random(shape, dtype)]:
        x = np.asarray(x)
        actual, expected = np.asarray(fast.sum_of_squares(x)), np.asarray(generic.sum_of_squares(x))
        _close(actual, expected, dtype)


def test_l2_norm_uses_the_backends_sum_of_squares(monkeypatch):
    from xpnn.regularizers import L2_Regularizer

    weights = _random((785, 120), "float32", seed=4)
    seen = []
    with xpnn.use_backend("cpu", dtype="float32") as backend:
        monkeypatch.setattr(NumpyOps, "sum_of_squares",
                            lambda self, x: seen.append(x.shape) or np.float32(2.0))
        assert float(L2_Regularizer(0.5).norm(weights)) == 1.0 and seen == [(785, 120)]
        monkeypatch.undo()
        np.testing.assert_allclose(float(L2_Regularizer(0.5).norm(weights)),
                                   0.5 * float(Ops(backend).sum_of_squares(weights)), rtol=2e-5)


@pytest.mark.parametrize("shape, kernel_shape, strides", CONV_CASES, ids=CONV_IDS)
def test_window_view_holds_every_window_entry(shape, kernel_shape, strides):
    from numpy.lib.stride_tricks import sliding_window_view
    from xpnn.ops.numpy_columns import Geometry, window_view, zero_padded

    if len(shape) != 4:
        pytest.skip("window_view is of images (1-D inputs get a unit axis first)")
    geometry = Geometry(shape[1:], kernel_shape, strides, shape[0])
    padded = zero_padded(geometry.input_shape, geometry.padding, np.float32)
    padded[...] = _random(padded.shape, "float32", seed=5)
    # Every window entry, from NumPy's own sliding windows, in the view's axis order.
    windows = np.transpose(sliding_window_view(padded, kernel_shape, axis=(1, 2)), (0, 4, 5, 1, 2, 3))
    expected = windows[:, :, :, ::strides[0], ::strides[1]][:, :, :, :geometry.output_shape[0],
                                                            :geometry.output_shape[1]]
    view = window_view(padded, geometry)
    _assert_same_bits(view, expected)
    assert not view.flags.writeable
    needed_rows = (geometry.output_shape[0] - 1) * strides[0] + kernel_shape[0]
    with pytest.raises(ValueError, match="do not fit"):  # one row short
        window_view(np.ascontiguousarray(padded[:, :needed_rows - 1]), geometry)
    with pytest.raises(ValueError, match="do not fit"):  # not C-contiguous
        window_view(np.asfortranarray(padded), geometry)


def test_adam_update_with_a_gradient_of_another_dtype_matches_generic():
    backend = make_backend("cpu", "float32")
    fast, generic = backend.ops, Ops(backend)
    results = []
    for ops in (fast, generic):
        weights = _random((4, 3), "float32", seed=1)
        moments = (np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32), np.empty((4, 3), np.float32))
        gradient = _random((4, 3), "float64", seed=2) / 3.0  # not representable in float32
        results.append(ops.adam_update(weights, gradient, moments, 0.9, 0.999, 1e-2, 1.5, 1e-8, 1e-2, 0.1))
    assert results[0].dtype == np.float32
    _assert_same_bits(results[0], results[1])


def test_small_weight_gradients_are_one_product_and_large_ones_split():
    from xpnn.ops.numpy_columns import Geometry

    ops = NumpyOps(make_backend("cpu", "float32"), threads=2)
    first = Geometry((1, 28, 28), (5, 5), (1, 1), 64)     # LeNet's first convolution: 6 x 25
    second = Geometry((6, 14, 14), (5, 5), (1, 1), 64)    # and its second: 16 x 150
    assert ops._conv_backward_jobs(first, first.columns_size(64), False, 6) == [(0, 28)]
    assert ops._conv_backward_jobs(second, second.columns_size(64), False, 16) == [(0, 7), (7, 14)]
    # With an input gradient to compute, that runs beside the weight gradient either way.
    assert ops._conv_backward_jobs(first, first.columns_size(64), True, 6) == [None, (0, 28)]
    assert ops._conv_backward_jobs(second, second.columns_size(64), True, 16) == [None, (0, 14)]


# -- mutation-audit additions ------------------------------------------------------------

def test_batch_norm_with_given_statistics_ignores_all_sum_like_generic(numpy_pair):
    """Given statistics win over ``all_sum`` (the generic contract): the output uses them,
    and the caller's statistics arrays are left as they were."""
    fast, generic, dtype = numpy_pair
    x = _random((3, 4, 5, 6), dtype) * 3.0 + 1.5
    gamma, beta = _random((4,), dtype, 1), _random((4,), dtype, 2)
    given = (_random((4,), dtype, 4), np.abs(_random((4,), dtype, 5)) + 0.5)
    copies = [array.copy() for array in given]

    def one_piece(*values):  # all_sum of a batch in a single piece
        return values

    expected, expected_statistics, _ = generic.batch_norm_forward(
        x, gamma, beta, 1e-5, (0, 2, 3), given, one_piece)
    # Independent of both paths: the formula with the given statistics.
    mean, variance = (array.reshape((1, -1, 1, 1)).astype(np.float64) for array in copies)
    formula = ((x - mean) / np.sqrt(variance + 1e-5) * gamma.reshape((1, -1, 1, 1)).astype(np.float64)
               + beta.reshape((1, -1, 1, 1)))
    np.testing.assert_allclose(expected, formula, rtol=RTOL[dtype], atol=RTOL[dtype])
    output, statistics, _ = fast.batch_norm_forward(x, gamma, beta, 1e-5, (0, 2, 3), given, one_piece)
    _close(output, expected, dtype)
    for actual, reference, array, copy in zip(statistics, expected_statistics, given, copies):
        _close(actual, reference, dtype)
        np.testing.assert_array_equal(array, copy)


def test_blas_limit_is_set_by_the_first_scope_and_restored_by_the_last(monkeypatch):
    """Overlapping scopes (as two threads' would be) set BLAS's limit once and restore it
    once, after the last one ends; then a new scope sets it again."""
    from xpnn.ops import numpy_settings

    events = []

    class Limiter:
        def restore_original_limits(self):
            events.append("restore")

    class Controller:
        def limit(self, limits):
            events.append(("limit", limits))
            return Limiter()

    monkeypatch.setattr(numpy_settings, "blas_controller", lambda: Controller())
    for _ in range(2):
        first, second = numpy_settings.blas_on_one_thread(), numpy_settings.blas_on_one_thread()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)     # not nested: the first one ends first
        assert events[-1] == ("limit", 1)    # the other scope still holds the limit
        second.__exit__(None, None, None)
        assert events[-1] == "restore"
        with numpy_settings.blas_on_one_thread():
            with numpy_settings.blas_on_one_thread():
                pass
            assert events[-1] == ("limit", 1)
        assert events[-1] == "restore"
    assert events == [("limit", 1), "restore"] * 4


def test_default_threads_follow_the_environment_else_the_cores_at_most_four(monkeypatch):
    from xpnn.ops import numpy_settings

    monkeypatch.delenv("XPNN_NUM_THREADS", raising=False)
    monkeypatch.setattr(numpy_settings, "blas_controller", lambda: object())
    for cores, expected in ((1, 1), (2, 2), (3, 3), (4, 4), (16, 4)):
        monkeypatch.setattr(numpy_settings.os, "sched_getaffinity",
                            lambda pid, count=cores: set(range(count)), raising=False)
        assert numpy_settings.default_threads() == expected, cores
    monkeypatch.setattr(numpy_settings, "blas_controller", lambda: None)
    assert numpy_settings.default_threads() == 1  # without threadpoolctl
    for value, expected in (("3", 3), ("1", 1), ("0", 1), ("-2", 1)):
        monkeypatch.setenv("XPNN_NUM_THREADS", value)
        assert numpy_settings.default_threads() == expected, value


def test_testing_phase_conv_parts_build_their_columns_in_buffers_of_their_own(monkeypatch):
    """Each part of the output rows has its own column buffer: with both parts held at their
    first matrix product until each has built its first block (a fixed interleaving of
    the two threads), both still give the generic values."""
    import threading
    import types

    import xpnn.ops.numpy_conv as numpy_conv

    for dtype in DTYPES:
        barrier, waited = threading.Barrier(2, timeout=10), threading.local()

        def matmul(*args, **kwargs):
            if not getattr(waited, "done", False):  # each thread's first product
                waited.done = True
                barrier.wait()
            return np.matmul(*args, **kwargs)

        shim = types.SimpleNamespace(**{name: getattr(np, name) for name in dir(np)
                                        if not name.startswith("__")})
        shim.matmul = matmul
        backend = make_backend("cpu", dtype)
        fast, generic = _SplitAlways(NumpyOps(backend, threads=2)), Ops(backend)
        x, weights, bias = (_random((2, 3, 6, 5), dtype), _random((4, 3, 3, 3), dtype, 1),
                            _random((4,), dtype, 2))
        expected, _ = generic.conv_forward(x, weights, bias, (1, 1))
        with monkeypatch.context() as patch:
            patch.setattr(numpy_conv, "BLOCK_BYTES", 1)  # one output row per block
            patch.setattr(numpy_conv, "np", shim)
            output, _ = fast.conv_forward(x, weights, bias, (1, 1), need_backward=False)
        _close(output, expected, dtype)
