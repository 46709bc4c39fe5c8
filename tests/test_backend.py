"""The backend registry: names, errors, data movement, dtypes, random numbers."""
import os
import subprocess
import sys

import numpy as np
import pytest

import xpnn
from xpnn.backend import BackendUnavailableError, make_backend
from conftest import assert_close


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
    assert "xpnn[gpu]" in str(info.value) and "nvidia-smi" in str(info.value)


def test_namespace_is_array_api_compats_on_every_backend(backend):
    from array_api_compat import array_namespace
    from xpnn.backend import namespace

    x = backend.asarray(np.arange(3.0))
    y = backend.asarray(np.ones(3))
    assert namespace(x) is array_namespace(x)
    assert namespace(x, y) is array_namespace(x, y)
    assert namespace(np.ones(2)) is array_namespace(np.ones(2))
