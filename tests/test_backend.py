"""The backend registry: names, errors, data movement, dtypes, random numbers."""
import os
import subprocess
import sys

import numpy as np
import pytest

import xpnn
from xpnn.backend import BackendUnavailableError, make_backend
from conftest import (FLOAT32_ONE_SEED, FLOAT32_ONE_SHAPE, assert_close, backend_unavailable_reason,
                      float32_draws_at_one)


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError) as info:
        xpnn.set_backend("tpu")
    message = str(info.value)
    for name in ("cpu", "gpu", "array-api-strict", "torch", "numpy", "cupy"):
        assert name in message


def test_aliases_give_the_same_backend():
    assert make_backend("numpy") is make_backend("cpu")
    assert make_backend("numpy").name == "cpu"


def test_unknown_dtype_rejected():
    with pytest.raises(ValueError, match="dtype"):
        make_backend("cpu", dtype="int32")


def test_default_dtype_is_float64_and_switchable():
    with xpnn.use_backend("cpu"):
        assert xpnn.get_backend().dtype_name == xpnn.get_default_dtype()
    try:
        xpnn.set_default_dtype("float32")
        with xpnn.use_backend("cpu"):
            assert xpnn.get_backend().dtype_name == "float32"
    finally:
        xpnn.set_default_dtype("float64")
    with xpnn.use_backend("cpu", dtype="float32") as backend:
        assert backend.dtype_name == "float32"


def test_use_backend_restores_previous():
    before = xpnn.get_backend()
    with xpnn.use_backend("array-api-strict") as inner:
        assert xpnn.get_backend() is inner
    assert xpnn.get_backend() is before


def test_environment_variable_selects_backend():
    code = "import xpnn; print(xpnn.get_backend().name)"
    env = dict(os.environ, XPNN_BACKEND="array-api-strict")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "array-api-strict"


def test_an_unknown_backend_in_the_environment_variable_names_the_variable():
    code = "import xpnn; xpnn.get_backend()"
    env = dict(os.environ, XPNN_BACKEND="bogus")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "XPNN_BACKEND='bogus'" in out.stderr and "valid names are" in out.stderr, out.stderr


def test_complex_input_to_a_layer_is_a_clear_error_on_every_path(backend):
    # (NumPy and PyTorch would drop the imaginary part with a warning only.)
    from xpnn.layers import FullyConnected

    with xpnn.use_backend(backend):
        layer = FullyConnected(2, 2)
    host = np.array([[1 + 2j, 3]])
    for given in (host, backend.asarray(host)):  # another library's, then the backend's own
        with pytest.raises(TypeError, match=r"complex input \(complex128\) where "
                                            + backend.dtype_name + r" is expected.*x\.real"):
            layer.forward(given)
    assert layer.forward(np.array([[1.0, 3.0]])).shape == (1, 2)  # (real input still runs)


def test_asarray_round_trip_and_no_copy(backend):
    host = np.arange(6.0).reshape(2, 3)
    moved = backend.asarray(host)
    assert backend.owns(moved)
    assert backend.asarray(moved) is moved
    assert_close(backend.to_numpy(moved), host)
    cast = backend.asarray(host, dtype="float32")
    assert backend.to_numpy(cast).dtype == np.float32


def test_asarray_of_numpy_arrays_on_the_cpu_backend():
    # The layers' fast path: a NumPy array already in the dtype comes back as it is (every
    # layout, read-only too); anything else is converted as before.
    backend = make_backend("cpu", "float32")
    plain = np.arange(12, dtype=np.float32).reshape(3, 4)
    read_only = plain.copy()
    read_only.flags.writeable = False
    for same in (plain, plain.T, plain[:, ::2], read_only):
        assert backend.asarray(same, dtype=backend.dtype) is same
        assert backend.asarray(same) is same
    for other in (plain.astype(np.float64), plain.astype(">f4"), plain.astype(np.int32), plain.tolist()):
        converted = backend.asarray(other, dtype=backend.dtype)
        assert type(converted) is np.ndarray and converted.dtype == np.float32
        assert converted.dtype.isnative and converted is not other
        np.testing.assert_array_equal(converted, plain)


def test_asarray_returns_the_backends_own_arrays_at_once_and_converts_the_others(backend):
    # Every layer's input goes through asarray(x, dtype=backend.dtype): its own array of
    # that dtype on its device comes back as it is, without the general ownership lookup;
    # the same library's array in another dtype is cast, on another device moved.
    from xpnn.backend import namespace

    own = backend.asarray(np.array([1.0, -2.0]), dtype=backend.dtype)
    assert backend.asarray(own, dtype=backend.dtype) is own and backend.asarray(own) is own
    narrow = backend.asarray(own, dtype="float32")
    assert narrow is not own and backend.owns(narrow) and narrow.dtype == backend.xp.float32
    assert backend.asarray(narrow, dtype=backend.dtype).dtype == backend.dtype
    if backend.name == "array-api-strict":
        elsewhere = make_backend("array-api-strict", "float64",
                                 "device1" if backend.device_spec is None else None)
        moved = backend.asarray(elsewhere.asarray(np.array([3.0])), dtype=backend.dtype)
        assert backend.owns(moved) and not elsewhere.owns(moved)
        assert_close(moved, [3.0])
    # namespace() answers a class it has seen from memory: the same namespace as the lookup.
    import array_api_compat

    assert namespace(own) is array_api_compat.array_namespace(own)
    assert namespace(own) is namespace(backend.asarray(np.zeros(2)))


def test_asarray_moves_between_backends(backend):
    strict = make_backend("array-api-strict", device="device1")
    other = strict.asarray(np.array([1.0, 2.0]))
    moved = backend.asarray(other)
    assert backend.owns(moved)
    assert_close(moved, [1.0, 2.0])


def test_random_uniform_shape_dtype_range(backend32):
    sample = backend32.random_uniform((1000,))
    host = backend32.to_numpy(sample)
    assert host.shape == (1000,) and host.dtype == np.float32
    assert host.min() >= 0.0 and host.max() < 1.0
    assert 0.4 < host.mean() < 0.6


def test_host_random_is_identical_across_backends(backend):
    np.random.seed(3)
    with xpnn.host_random():
        drawn = backend.to_numpy(backend.random_uniform((5,)))
    np.random.seed(3)
    assert_close(drawn, np.random.random_sample(5))


def test_seed_reproduces_draws(backend):
    xpnn.seed(7)
    first = backend.to_numpy(backend.random_uniform((4,)))
    xpnn.seed(7)
    second = backend.to_numpy(backend.random_uniform((4,)))
    np.testing.assert_array_equal(first, second)


def test_gpu_unavailable_is_a_clear_error():
    """No silent CPU fallback: on a machine without a working CUDA device, 'gpu' raises."""
    try:
        import cupy  # noqa: F401
    except Exception as error:  # not installed: the import failure is the reason
        with pytest.raises(BackendUnavailableError) as info:
            make_backend("gpu")
        assert "xpnn[gpu]" in str(info.value)
        assert str(error).split()[0] in info.value.reason or "CuPy" in info.value.reason
        return
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        cupy.zeros(1)
    except Exception:
        count = 0
    if count:
        pytest.skip("a CUDA device answers here, so the gpu backend is available")
    with pytest.raises(BackendUnavailableError) as info:
        xpnn.set_backend("gpu")
    assert info.value.backend_name == "gpu"
    assert info.value.reason  # the driver's message, e.g. cudaErrorInsufficientDriver
    assert "nvidia-smi" in str(info.value) and "--backend cpu" in str(info.value)
    if _driver_library_found():  # a driver, but too old for this CuPy (or no device)
        assert "xpnn[gpu]" in str(info.value) and "gpu-cuda13" in str(info.value)
    else:  # no driver: no CuPy package helps; the message says so
        assert "no NVIDIA driver" in info.value.reason and "xpnn[gpu]" not in str(info.value)


def _driver_library_found():
    """Whether the NVIDIA driver's libcuda is anywhere the loader or the driver's files say."""
    import ctypes.util
    import os

    return ctypes.util.find_library("cuda") is not None or os.path.exists("/proc/driver/nvidia")


def test_namespace_is_array_api_compats_on_every_backend(backend):
    from array_api_compat import array_namespace
    from xpnn.backend import namespace

    x = backend.asarray(np.arange(3.0))
    y = backend.asarray(np.ones(3))
    assert namespace(x) is array_namespace(x)
    assert namespace(x, y) is array_namespace(x, y)
    assert namespace(np.ones(2)) is array_namespace(np.ones(2))


@pytest.fixture
def global_backend_state():
    """Restore the default dtype and the current backend that the test changes."""
    default = xpnn.get_default_dtype()
    with xpnn.use_backend(xpnn.get_backend()):  # (restores the current backend on exit)
        try:
            yield
        finally:
            xpnn.set_backend("cpu", default)
            xpnn.set_default_dtype(default)


def _skip_without(name, device=None, dtype="float64"):
    reason = backend_unavailable_reason(name, device, dtype)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")


# -- conversions of torch tensors that record autograd -----------------------------------

def test_torch_tensors_that_record_autograd_leave_no_graph_in_weights_or_adam_moments():
    """Weights assigned from a tensor with requires_grad and inputs that require grad: after
    training steps the weights, gradients and Adam moments record no autograd history (a
    graph growing every step), and the weights are those of Adam computed in NumPy."""
    _skip_without("torch")
    import torch
    from xpnn.layers import FullyConnected
    from xpnn.optimizers import Adam

    rng = np.random.default_rng(0)
    start = rng.standard_normal((4, 2))
    inputs, errors = rng.standard_normal((3, 5, 3)), rng.standard_normal((3, 5, 2))
    learning_rate, mu, rho = 1e-2, 0.9, 0.999
    with xpnn.use_backend("torch", "float64"):
        layer = FullyConnected(3, 2)
        layer.optimizer = Adam(learning_rate, mu, rho)
        user_weights = torch.tensor(start, requires_grad=True)
        layer.weights = user_weights
        for x, error in zip(inputs, errors):
            layer.forward(torch.tensor(x, requires_grad=True))
            layer.backward(torch.tensor(error, requires_grad=True))
    for name, tensor in (("weights", layer.weights), ("gradient_weights", layer.gradient_weights),
                         ("first_moment", layer.optimizer.first_moment),
                         ("second_moment", layer.optimizer.second_moment)):
        assert isinstance(tensor, torch.Tensor), name
        assert not tensor.requires_grad and tensor.grad_fn is None, name
    assert user_weights.requires_grad  # (the caller's tensor keeps its own flag)
    # Adam by hand: m = mu m + (1-mu) g; r = rho r + (1-rho) g**2; w -= lr m^ / (sqrt(r^) + 1e-8).
    weights, first, second = start.copy(), np.zeros_like(start), np.zeros_like(start)
    for step, (x, error) in enumerate(zip(inputs, errors), start=1):
        gradient = np.hstack([x, np.ones((len(x), 1))]).T @ error
        first = mu * first + (1 - mu) * gradient
        second = rho * second + (1 - rho) * gradient**2
        weights = weights - learning_rate * (first / (1 - mu**step)) / (
            np.sqrt(second / (1 - rho**step)) + 1e-8)
    assert_close(layer.weights, weights, rtol=1e-12)


# -- cast, then move ---------------------------------------------------------------------------

def test_float64_arrays_are_cast_before_they_move_to_a_device_without_float64():
    from xpnn.backend import asarray_like

    _skip_without("array-api-strict", "no_float64", "float32")
    strict64 = make_backend("array-api-strict", "float64")
    no_float64 = make_backend("array-api-strict", "float32", "no_float64")
    host = np.array([[0.1, 2.5, -3.0], [1e-3, 4.0, 1.0 / 3.0]])
    source = strict64.asarray(host, dtype=strict64.dtype)
    assert strict64.owns(source) and source.dtype == strict64.xp.float64
    reference = no_float64.asarray(np.zeros(2), dtype=no_float64.dtype)
    for how, moved in (("Backend.asarray", lambda: no_float64.asarray(source, dtype=no_float64.dtype)),
                       ("asarray_like", lambda: asarray_like(source, reference))):
        result = moved()
        assert no_float64.owns(result) and result.dtype == no_float64.xp.float32, how
        assert result.device == no_float64.device, how
        np.testing.assert_array_equal(xpnn.to_numpy(result), host.astype(np.float32), err_msg=how)


def test_float32_arrays_leave_a_device_without_float64_for_float64():
    # The other direction: the source device cannot hold the target dtype (cast there fails).
    from xpnn.backend import asarray_like

    _skip_without("array-api-strict", "no_float64", "float32")
    strict64 = make_backend("array-api-strict", "float64")
    no_float64 = make_backend("array-api-strict", "float32", "no_float64")
    host = np.array([0.1, 2.5, -3.0], dtype=np.float32)
    source = no_float64.asarray(host, dtype=no_float64.dtype)
    reference = strict64.asarray(np.zeros(2), dtype=strict64.dtype)
    for how, moved in (("Backend.asarray", lambda: strict64.asarray(source, dtype=strict64.dtype)),
                       ("asarray_like", lambda: asarray_like(source, reference))):
        result = moved()
        assert strict64.owns(result) and result.dtype == strict64.xp.float64, how
        np.testing.assert_array_equal(xpnn.to_numpy(result), host.astype(np.float64), err_msg=how)


# -- dtype names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["array-api-strict", "torch"])
def test_asarray_keeps_the_exact_integer_dtype_asked_for(name):
    """uint8 stays uint8 (it once became int8: 200 -> -56); int16 and uint16 convert."""
    _skip_without(name)
    backend = make_backend(name, "float64")
    for values, source_dtype, dtype in (([200, 3], np.uint8, "uint8"),
                                        ([-300, 3], np.int64, "int16"),
                                        ([60000, 3], np.int64, "uint16")):
        converted = backend.asarray(np.array(values, source_dtype), dtype=dtype)
        assert backend.owns(converted) and converted.dtype == getattr(backend.xp, dtype), dtype
        host = xpnn.to_numpy(converted)
        assert host.dtype == np.dtype(dtype), dtype
        np.testing.assert_array_equal(host, values, err_msg=dtype)


def test_numpy_scalar_types_are_accepted_as_dtypes(global_backend_state):
    """np.float32 (the cpu backend's own dtype object) names a dtype like "float32" does."""
    cpu32 = make_backend("cpu", "float32")
    assert cpu32.dtype is np.float32  # (the object a cpu network's backend.dtype gives)
    assert xpnn.set_backend("cpu", dtype=np.float32) is cpu32
    assert xpnn.set_backend("cpu", dtype=np.float64).dtype_name == "float64"
    assert xpnn.set_backend("cpu", dtype=cpu32.dtype) is cpu32
    xpnn.set_default_dtype(np.float32)
    assert xpnn.get_default_dtype() == "float32" and xpnn.get_backend() is cpu32
    assert make_backend("array-api-strict").dtype_name == "float32"
    xpnn.set_default_dtype(np.dtype(np.float64))
    assert xpnn.get_default_dtype() == "float64" and xpnn.get_backend().dtype_name == "float64"


def test_a_default_dtype_the_current_device_refuses_changes_nothing(global_backend_state):
    _skip_without("array-api-strict", "no_float64", "float32")
    xpnn.set_default_dtype("float32")
    current = xpnn.set_backend("array-api-strict", "float32", "no_float64")
    with pytest.raises(ValueError, match="float32"):
        xpnn.set_default_dtype("float64")
    assert xpnn.get_default_dtype() == "float32"
    assert xpnn.get_backend() is current
    assert make_backend("cpu").dtype_name == "float32"  # (the default still applies)


# -- float32 draws -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, device", [("cpu", None), ("array-api-strict", None),
                                          ("array-api-strict", "no_float64"), ("torch", None)],
                         ids=["numpy", "strict", "strict-no_float64", "torch-host_random"])
def test_float32_host_draws_stay_below_one(name, device):
    """A float64 draw of 1 - 2**-25 or more rounds to 1.0 in float32, out of [0, 1); the
    draw must stay below 1, every other draw is the float32 rounding of NumPy's."""
    _skip_without(name, device, "float32")
    backend = make_backend(name, "float32", device)
    draws, at_one = float32_draws_at_one()
    np.random.seed(FLOAT32_ONE_SEED)
    with xpnn.host_random():  # (torch draws on the host only then; the others always do)
        sample = xpnn.to_numpy(backend.random_uniform(FLOAT32_ONE_SHAPE))
    assert sample.shape == FLOAT32_ONE_SHAPE and sample.dtype == np.float32
    assert sample.max() < 1.0 and sample.min() >= 0.0
    assert np.all(sample[at_one] >= np.float32(0.99))  # (still a draw near 1)
    np.testing.assert_array_equal(sample[~at_one], draws[~at_one].astype(np.float32))


def test_complex64_input_is_refused_too():
    from xpnn.layers import FullyConnected

    with xpnn.use_backend("cpu", "float32"):
        layer = FullyConnected(2, 2)
        with pytest.raises(TypeError, match=r"complex input \(complex64\) where float32"):
            layer.forward(np.array([[1 + 2j, 3]], dtype=np.complex64))


def test_an_unusable_backend_in_the_environment_variable_names_the_variable():
    code = "import xpnn; xpnn.get_backend()"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, XPNN_BACKEND="gpu"),
                         capture_output=True, text=True)
    if out.returncode == 0:
        pytest.skip("the gpu backend works here")
    assert "XPNN_BACKEND='gpu'" in out.stderr and "unset XPNN_BACKEND" in out.stderr, out.stderr


def test_the_driver_probe_answers_by_whether_libcuda_loads(monkeypatch):
    import ctypes

    from xpnn import backend as backend_module

    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())
    assert backend_module._nvidia_driver_present() is True

    def refuse(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    assert backend_module._nvidia_driver_present() is False


def test_backend_names_ignore_case_and_surrounding_spaces():
    assert make_backend(" CPU ") is make_backend("cpu")
    assert make_backend("NumPy\n") is make_backend("cpu")
    assert make_backend("Array-API-Strict") is make_backend("array-api-strict")


def test_a_backend_object_given_a_new_dtype_keeps_its_device():
    device1 = make_backend("array-api-strict", "float64", "device1")
    moved = make_backend(device1, "float32")
    assert moved.dtype_name == "float32" and moved.device_spec == "device1"
    assert moved.device == device1.device
    assert make_backend(moved, device="device1") is moved


def test_a_backend_made_after_seed_is_seeded_then(monkeypatch):
    # xpnn.seed seeds the libraries whose backends exist; one made later (here torch, made
    # afresh: an empty registry) is seeded when it is made, with the same seed.
    _skip_without("torch")
    import torch
    from xpnn import backend as backend_module

    monkeypatch.setattr(backend_module, "_CACHE", {})
    xpnn.seed(5)
    torch.manual_seed(12345)   # (what the library's generator would hold otherwise)
    made = make_backend("torch", "float64")
    drawn = made.to_numpy(made.random_uniform((4,)))
    torch.manual_seed(5)
    np.testing.assert_array_equal(drawn, torch.rand((4,), dtype=torch.float64).numpy())


def test_asarray_like_moves_an_array_of_the_same_library_to_the_references_device(backend):
    # Same library and dtype, another device (array-api-strict's device1): moved, not kept.
    from xpnn.backend import asarray_like

    strict1 = make_backend("array-api-strict", "float64", "device1")
    strict0 = make_backend("array-api-strict", "float64")
    source = strict1.asarray(np.array([1.0, -2.0]))
    reference = strict0.asarray(np.zeros(3))
    moved = asarray_like(source, reference)
    assert moved.device == reference.device and strict0.owns(moved)
    assert_close(moved, [1.0, -2.0], rtol=0)
    # And onto the backend of the test (NumPy, torch, strict): its library, device and dtype.
    on_backend = asarray_like(source, backend.asarray(np.zeros(2)))
    assert backend.owns(on_backend) and on_backend.dtype == backend.dtype
    assert_close(on_backend, [1.0, -2.0], rtol=0)


def test_asarray_of_a_reversed_numpy_view(backend):
    # A view with negative strides (x[::-1]), which torch.asarray refuses, converts on every backend.
    from xpnn.backend import asarray_like

    reversed_view = np.arange(4.0)[::-1]
    assert_close(backend.asarray(reversed_view), [3.0, 2.0, 1.0, 0.0], rtol=0)
    assert_close(backend.asarray(reversed_view, dtype=backend.dtype), [3.0, 2.0, 1.0, 0.0], rtol=0)
    reference = backend.asarray(np.zeros(4))
    assert_close(asarray_like(reversed_view, reference), [3.0, 2.0, 1.0, 0.0], rtol=0)


def test_to_numpy_of_a_torch_tensor_that_records_autograd():
    _skip_without("torch")
    import torch

    tensor = torch.tensor([1.5, -2.0], dtype=torch.float64, requires_grad=True)
    host = xpnn.to_numpy(tensor * 2.0)   # (a tensor with history, as a user's loss would be)
    assert type(host) is np.ndarray
    np.testing.assert_array_equal(host, [3.0, -4.0])
