"""The backend object and its registry.

This is the only module in xpnn that picks a library by name (NumPy, CuPy,
PyTorch, array-api-strict); the per-backend fast paths in :mod:`xpnn.ops`
(``NumpyOps``, ``CupyOps``) import their own library. Everything else receives
a :class:`Backend` and works through its ``xp`` namespace, which is an
array-api-compat namespace (or array-api-strict itself), so layers are written
once against the Python array API standard.

Names
-----
``"cpu"`` (alias ``"numpy"``), ``"gpu"`` (alias ``"cupy"``),
``"array-api-strict"`` (the standard and nothing more; a test backend) and
``"torch"`` (PyTorch tensors through array-api-compat, CPU or CUDA).
"""
import contextlib
import functools
import os
import sys

import numpy as np

from xpnn.ops import Ops
from xpnn.ops.numpy_ops import NumpyOps

#: Canonical backend names, then aliases that map to them.
BACKEND_NAMES = ("cpu", "gpu", "array-api-strict", "torch")
ALIASES = {"numpy": "cpu", "cupy": "gpu", "strict": "array-api-strict"}
FLOAT_DTYPES = ("float32", "float64")

GPU_FIX = (
    'install CuPy for your CUDA driver: pip install "xpnn[gpu]" (CuPy built for CUDA 12.x, '
    'driver >= 525) or pip install "xpnn[gpu-cuda13]" (CUDA 13.x, driver >= 580); from a '
    'checkout: pip install -e ".[gpu]"; check the driver with nvidia-smi; or use the cpu backend '
    '(set_backend("cpu"), xpnn-train --backend cpu)'
)
#: The fix where no NVIDIA driver is installed at all: no CuPy package helps then.
NO_DRIVER_FIX = (
    'run on a machine with an NVIDIA GPU and its driver (nvidia-smi lists them), or use the cpu '
    'backend (set_backend("cpu"), xpnn-train --backend cpu)'
)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for but cannot run on this machine.

    Attributes
    ----------
    backend_name : str
        The backend that was requested.
    reason : str
        What failed underneath (import error, driver message, ...).
    fix : str
        What the user can do about it.
    """

    def __init__(self, backend_name, reason, fix):
        self.backend_name = backend_name
        self.reason = reason
        self.fix = fix
        super().__init__(
            f"backend {backend_name!r} is unavailable: {reason}. To fix: {fix}"
        )


class Backend:
    """One array library on one device with a default float dtype.

    Parameters
    ----------
    name : str
        Canonical backend name (see ``BACKEND_NAMES``).
    xp : module
        The array-api-compat (or array-api-strict) namespace.
    device : object
        The device arrays are created on (pass it as ``device=``).
    dtype : str
        Default float dtype name, ``"float32"`` or ``"float64"``.
    library : module
        The underlying library (numpy, cupy, torch, array_api_strict).
    device_spec : str or None
        What the user asked for as device; kept for pickling and ``repr``.
    ops_class : type, optional
        The :class:`xpnn.ops.Ops` subclass with this library's hot paths; by
        default looked up by ``name`` (the generic ``Ops`` for most).

    Notes
    -----
    Backend objects are immutable and cached per (name, dtype, device), so
    ``layer.backend is other.backend`` tells whether two layers share one.
    """

    def __init__(self, name, xp, device, dtype, library, device_spec=None, ops_class=None):
        self.name = name
        self.xp = xp
        self.device = device
        self.dtype_name = dtype
        self.dtype = getattr(xp, dtype)
        self.library = library
        self.device_spec = device_spec
        self._array_class = _array_class(library)
        # Hot paths (im2col, pooling, ...): the generic array-API versions,
        # overridden per library only where a benchmark shows it pays
        # (NumPy: batch-innermost convolution and pooling, scripts/bench.py).
        # (GPU: fused CUDA kernels, passed in by the factory that imported CuPy.)
        self.ops = (ops_class or _OPS_CLASSES.get(name, Ops))(self)

    def __repr__(self):
        spec = f", device={self.device_spec!r}" if self.device_spec else ""
        return f"Backend({self.name!r}, dtype={self.dtype_name!r}{spec})"

    def __reduce__(self):
        return (make_backend, (self.name, self.dtype_name, self.device_spec))

    # -- moving data ---------------------------------------------------------
    def owns(self, x):
        """Return True when ``x`` is an array of this backend's library and device."""
        if type(x) is self._array_class:  # (the common case first: no library lookup)
            return self.library is np or x.device == self.device
        return _library_of(x) is self.library and _same_device(x, self.device)

    def asarray(self, x, dtype=None):
        """Return ``x`` as an array of this backend (no copy when it already is).

        Parameters
        ----------
        x : array of any backend, NumPy array, Python scalar or sequence
        dtype : str or dtype, optional
            Cast to this dtype; ``None`` keeps the dtype (Python floats become
            float64, as in NumPy).
        """
        # Layers call this on every input with dtype=self.dtype: skip the lookup then.
        target = None if dtype is None else (dtype if dtype is self.dtype else self._dtype(dtype))
        if type(x) is np.ndarray and self.library is np and (target is None or x.dtype == target):
            # (NumPy has one device. ~40 calls a training step in each process, each 3.5 µs
            # through owns() inside a step, the layers' objects out of cache; this ~1 µs.)
            return x
        if (type(x) is self._array_class and (target is None or x.dtype == target)
                and x.device == self.device and not getattr(x, "requires_grad", False)):
            # This backend's array already (torch: without autograd history): every layer's
            # input on CuPy, strict or torch, where owns() costs a dozen Python calls.
            return x
        x = _without_autograd(x)
        if self.owns(x):
            if target is not None and x.dtype != target:
                _refuse_complex(_numpy_dtype_name(x.dtype), target)
                return self.xp.astype(x, target)
            return x
        if _library_of(x) is self.library and (target is None or x.dtype == target):
            # array_api_compat.to_device: torch tensors have no .to_device method.
            return _to_device(x, self.device)
        # Another library, or another device and dtype: through the host (either device may
        # lack one of the dtypes: array-api-strict's "no_float64").
        host = _positive_strides(to_numpy(x))
        if target is not None:
            _refuse_complex(host.dtype.name, target)
            host = host.astype(_numpy_dtype_name(target), copy=False)
        return self.xp.asarray(host, device=self.device)

    def to_numpy(self, x):
        """Copy ``x`` (an array of any backend) to a NumPy array on the host."""
        return to_numpy(x)

    def _dtype(self, dtype):
        if isinstance(dtype, str):
            return getattr(self.xp, dtype)
        if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
            return getattr(self.xp, np.dtype(dtype).name)
        return dtype

    def synchronize(self):
        """Block until queued device work is done (for honest timing)."""
        if self.name == "gpu":
            with self.device:  # (the stream of this backend's GPU, not the current one's)
                self.library.cuda.get_current_stream().synchronize()
        elif self.name == "torch" and self.device.type == "cuda":
            self.library.cuda.synchronize(self.device)

    # -- random numbers --------------------------------------------------------
    def random_uniform(self, shape):
        """Uniform [0, 1) samples of ``shape`` in the default dtype, on the device.

        Drawn from the library's own global generator (``np.random`` for
        ``"cpu"``, ``cupy.random`` for ``"gpu"``, ``torch``'s for ``"torch"``);
        array-api-strict draws on the host. Under :func:`host_random` every
        backend draws from ``np.random`` on the host and moves the result, so
        all backends see the same numbers.
        """
        shape = tuple(int(n) for n in shape)
        if _RANDOM_SOURCE == "host" or self.name in ("cpu", "array-api-strict"):
            host = np.random.random_sample(shape).astype(self.dtype_name)
            if host.dtype == np.float32:
                # Draws of 1 - 2**-25 and above round to 1.0 in float32, out of [0, 1): a
                # dropout keeping everything (probability 1) would drop that unit.
                np.minimum(host, _LARGEST_BELOW_ONE_32, out=host)
            return self.xp.asarray(host, device=self.device)
        if self.name == "gpu":
            with self.device:  # (CuPy's generator and allocation are per current device)
                return self.library.random.random_sample(shape, dtype=self.dtype_name)
        return self.library.rand(shape, dtype=self.dtype, device=self.device)


#: The largest float32 below 1 (where float32 draws that rounded up to 1.0 go).
_LARGEST_BELOW_ONE_32 = np.nextafter(np.float32(1), np.float32(0))


# -- library helpers (the only place that names libraries) --------------------

def namespace(*arrays):
    """``array_api_compat.array_namespace(*arrays)``, answered at once for NumPy arrays and,
    after a first lookup, for one array of a class seen before.

    Optimizers, regularizers and losses ask on every training step, for every
    parameter (~30 times a LeNet step); the general lookup costs 5 µs a call, this 0.5.
    """
    if len(arrays) == 1:
        if type(arrays[0]) is np.ndarray:
            return _numpy_namespace()
        known = _NAMESPACES.get(type(arrays[0]))
        if known is not None:
            return known
    import array_api_compat as compat

    xp = compat.array_namespace(*arrays)
    if len(arrays) == 1:
        # (The namespace follows from the array's class: CuPy's, torch's, array-api-strict's.)
        _NAMESPACES[type(arrays[0])] = xp
    return xp


#: The namespace of each array class :func:`namespace` has seen.
_NAMESPACES = {}


def _array_class(library):
    """The class of ``library``'s arrays (``Backend.asarray`` returns those of its own at once)."""
    if library.__name__ == "torch":
        return library.Tensor
    if library.__name__ == "array_api_strict":
        return library._array_object.Array
    return library.ndarray  # NumPy, CuPy


@functools.lru_cache(maxsize=1)
def _numpy_namespace():
    import array_api_compat.numpy as xp

    return xp


def _library_of(x):
    import array_api_compat as compat

    if type(x) is np.ndarray:  # the common case, checked first: this runs per layer call
        return np
    if compat.is_numpy_array(x):
        return np
    if compat.is_cupy_array(x):
        return sys.modules["cupy"]
    if compat.is_torch_array(x):
        return sys.modules["torch"]
    if "array_api_strict" in sys.modules and isinstance(x, sys.modules["array_api_strict"]._array_object.Array):
        return sys.modules["array_api_strict"]
    return None


def _without_autograd(x):
    """A torch tensor that records autograd history, detached (same memory): a parameter
    or moment built from it would grow the graph every step; anything else as it is."""
    if getattr(x, "requires_grad", False) and _library_of(x) is sys.modules.get("torch"):
        return x.detach()
    return x


def _same_device(x, device):
    import array_api_compat as compat

    return compat.device(x) == device


def _to_device(x, device):
    import array_api_compat as compat

    return compat.to_device(x, device)


def asarray_like(x, reference):
    """Return ``x`` as an array of ``reference``'s library, device and dtype.

    No copy is made when ``x`` already is one. Used where an operand must
    follow another array rather than a layer's backend (e.g. labels follow
    the prediction in a loss).

    Parameters
    ----------
    x : array of any backend, NumPy array, Python scalar or sequence
    reference : array of any backend
    """
    import array_api_compat as compat

    xp = compat.array_namespace(reference)
    device = compat.device(reference)
    x = _without_autograd(x)
    if _library_of(x) is _library_of(reference):
        if _same_device(x, device):
            return x if x.dtype == reference.dtype else xp.astype(x, reference.dtype)
        if x.dtype == reference.dtype:
            return _to_device(x, device)
    # (Another device and dtype: through the host, see Backend.asarray.)
    host = _positive_strides(to_numpy(x)).astype(_numpy_dtype_name(reference.dtype), copy=False)
    return xp.asarray(host, device=device)


def _refuse_complex(source_name, target):
    """Raise TypeError for complex values cast to a real dtype: the cast would drop the
    imaginary part with only a warning (NumPy, PyTorch), and no layer here computes in complex."""
    target_name = _numpy_dtype_name(target)
    if source_name.startswith("complex") and not target_name.startswith("complex"):
        raise TypeError(f"complex input ({source_name}) where {target_name} is expected: xpnn "
                        f"computes in real numbers; pass the part you mean, e.g. x.real or abs(x)")


def _positive_strides(host):
    """Copy a NumPy view with negative strides (``x[::-1]``): torch.asarray rejects those."""
    if any(stride < 0 for stride in host.strides):
        return np.ascontiguousarray(host)
    return host


def _numpy_dtype_name(dtype):
    """NumPy's name of a dtype of any library (``torch.uint8``, ``float32``, np.int16, ...)."""
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        return np.dtype(dtype).name
    text = str(dtype).rsplit(".", 1)[-1]  # ("torch.float32"; array-api-strict's prints bare)
    try:
        return np.dtype(text).name
    except TypeError:
        raise TypeError(f"unsupported dtype {dtype!r}") from None


def to_numpy(x):
    """Copy an array of any backend (or a Python scalar/sequence) to NumPy."""
    library = _library_of(x)
    if library is None or library is np:
        return np.asarray(x)
    if library.__name__ == "cupy":
        return x.get()
    if library.__name__ == "torch":
        return x.detach().cpu().numpy()
    return np.asarray(x.to_device(library.Device("CPU_DEVICE")))


def _make_numpy(dtype, device):
    import array_api_compat.numpy as xp

    if device not in (None, "cpu"):
        raise ValueError(f"the cpu backend has only the device 'cpu', not {device!r}")
    return Backend("cpu", xp, "cpu", dtype, np)


def _make_strict(dtype, device):
    try:
        import array_api_strict as strict
    except ImportError as error:
        raise BackendUnavailableError(
            "array-api-strict", f"array-api-strict is not installed ({error})",
            'pip install "xpnn[test]"') from error
    strict.set_array_api_strict_flags(api_version="2024.12")
    spec = device or "CPU_DEVICE"
    if dtype == "float64" and spec == "no_float64":
        raise ValueError("array-api-strict's 'no_float64' device needs dtype='float32'")
    return Backend("array-api-strict", strict, strict.Device(spec), dtype, strict,
                   device_spec=device)


def _make_torch(dtype, device):
    try:
        import torch
        import array_api_compat.torch as xp
    except ImportError as error:
        raise BackendUnavailableError(
            "torch", f"PyTorch is not installed ({error})", "pip install torch") from error
    spec = device or "cpu"
    torch_device = torch.device(spec)
    if torch_device.type == "cuda":
        try:
            # "cuda" names the current device, but a tensor's device always has its
            # index ("cuda:0"), and the two compare unequal: keep the index.
            torch_device = torch.zeros(1, device=torch_device).device
        except Exception as error:  # any driver/runtime failure means: unusable
            raise BackendUnavailableError(
                "torch", f"{type(error).__name__}: {error}",
                "use a CUDA build of PyTorch on a machine with an NVIDIA GPU, or device='cpu'") from error
    _seed_library_once(torch)
    return Backend("torch", xp, torch_device, dtype, torch, device_spec=device)


def _make_cupy(dtype, device):
    try:
        import cupy
        import array_api_compat.cupy as xp
    except Exception as error:
        raise BackendUnavailableError("gpu", f"CuPy cannot be imported ({error})", GPU_FIX) from error
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        if count == 0:
            raise RuntimeError("no CUDA device found")
        cuda_device = cupy.cuda.Device(int(device or 0))
        with cuda_device:
            cupy.zeros(1)  # the first allocation is where a bad driver shows up
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        if not _nvidia_driver_present():
            raise BackendUnavailableError(
                "gpu", f"no NVIDIA driver on this machine (libcuda cannot be loaded; CuPy says "
                f"{reason})", NO_DRIVER_FIX) from error
        raise BackendUnavailableError("gpu", reason, GPU_FIX) from error
    _seed_library_once(cupy, cuda_device)
    from xpnn.ops.cupy_ops import CupyOps  # compiles nothing yet: kernels build on first use

    return Backend("gpu", xp, cuda_device, dtype, cupy,
                   device_spec=None if device is None else str(device), ops_class=CupyOps)


def _nvidia_driver_present():
    """True when the NVIDIA driver's CUDA library loads (CuPy reports a missing driver and
    one too old for its CUDA alike, "insufficient driver"; only the second wants another CuPy)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1" if os.name == "posix" else "nvcuda.dll")
    except OSError:
        return False
    return True


#: Backends whose hot paths have a library-specific implementation.
_OPS_CLASSES = {"cpu": NumpyOps}

_FACTORIES = {"cpu": _make_numpy, "gpu": _make_cupy,
              "array-api-strict": _make_strict, "torch": _make_torch}

# The global state of xpnn: the current backend, the default dtype, and how
# random numbers are drawn. Nothing else is global.
_CACHE = {}
_CURRENT = None
_DEFAULT_DTYPE = "float64"
_RANDOM_SOURCE = "native"
_SEED = None
_SEEDED = set()


def canonical_name(name):
    """Map an alias to its canonical backend name; unknown names raise ValueError."""
    if isinstance(name, Backend):
        return name.name
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in _FACTORIES:
        valid = ", ".join(BACKEND_NAMES + tuple(ALIASES))
        raise ValueError(f"unknown backend {name!r}; valid names are: {valid}")
    return key


def _check_dtype(dtype):
    if isinstance(dtype, type) and issubclass(dtype, np.generic):  # np.float32, the cpu backend's
        dtype = np.dtype(dtype)
    name = getattr(dtype, "name", None) or str(dtype)
    name = name.replace("torch.", "").replace("array_api_strict.", "")
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, not {dtype!r}")
    return name


def make_backend(name, dtype=None, device=None):
    """Return the (cached) backend ``name`` without making it current.

    Parameters
    ----------
    name : str or Backend
        A backend name or alias; a Backend is returned as is unless ``dtype``
        or ``device`` is given, and otherwise keeps its device and dtype.
    dtype : str, optional
        Default float dtype; the global default when omitted.
    device : str or int, optional
        Library-specific device: ``"cuda"``/``"cuda:1"`` for torch, an index
        for CuPy, ``"device1"``/``"no_float64"`` for array-api-strict.

    Raises
    ------
    ValueError
        For an unknown name or dtype.
    BackendUnavailableError
        When the library is missing or no device answers.
    """
    if isinstance(name, Backend):
        if dtype is None and device is None:
            return name
        # A Backend given with only a new dtype keeps its device (and vice versa).
        device = name.device_spec if device is None else device
        dtype = name.dtype_name if dtype is None else dtype
    key = canonical_name(name)
    dtype = _check_dtype(dtype or _DEFAULT_DTYPE)
    cache_key = (key, dtype, None if device is None else str(device))
    if cache_key not in _CACHE:
        _CACHE[cache_key] = _FACTORIES[key](dtype, device)
    return _CACHE[cache_key]


def set_backend(name, dtype=None, device=None):
    """Make ``name`` the current backend and return it (see :func:`make_backend`)."""
    global _CURRENT
    _CURRENT = make_backend(name, dtype, device)
    return _CURRENT


def get_backend():
    """Return the current backend (from ``XPNN_BACKEND``, default ``"cpu"``, on first use)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = _backend_from_environment()
    return _CURRENT


def _backend_from_environment():
    name = os.environ.get("XPNN_BACKEND", "cpu")
    try:
        return make_backend(name)
    except ValueError as error:  # (say where the name came from: no call of the user's has it)
        raise ValueError(f"environment variable XPNN_BACKEND={name!r}: {error}") from None
    except BackendUnavailableError as error:
        raise BackendUnavailableError(
            error.backend_name, f"{error.reason} (the backend named by XPNN_BACKEND={name!r})",
            f"{error.fix}; or unset XPNN_BACKEND") from error


@contextlib.contextmanager
def use_backend(name, dtype=None, device=None):
    """Context manager: make a backend current, restore the previous one after."""
    global _CURRENT
    previous = _CURRENT
    try:
        yield set_backend(name, dtype, device)
    finally:
        _CURRENT = previous


def set_default_dtype(dtype):
    """Set the default float dtype; the current backend is switched to it too."""
    global _DEFAULT_DTYPE, _CURRENT
    name = _check_dtype(dtype)
    if _CURRENT is not None:  # (first: a device without that dtype changes nothing)
        _CURRENT = make_backend(_CURRENT.name, name, _CURRENT.device_spec)
    _DEFAULT_DTYPE = name


def get_default_dtype():
    """Return the default float dtype name."""
    return _DEFAULT_DTYPE


def _seed_library_once(library, device=None):
    if _SEED is not None and _seeded_key(library, device) not in _SEEDED:
        _seed_library(library, _SEED, device)


def _seeded_key(library, device):
    """What one seeding covers: CuPy keeps a generator per GPU, the others one for all."""
    return (library.__name__, getattr(device, "id", None) if library.__name__ == "cupy" else None)


def _seed_library(library, value, device=None):
    """Seed ``library``'s generator; CuPy's of ``device`` (a backend's GPU; default the
    current one), without touching GPUs no backend uses (each would get a CUDA context)."""
    if library.__name__ == "torch":
        library.manual_seed(value)  # (every device's generator)
    elif library.__name__ == "cupy":
        with device if device is not None else contextlib.nullcontext():
            library.random.seed(value)
    else:
        library.random.seed(value)
    _SEEDED.add(_seeded_key(library, device))


def seed(value):
    """Seed every random generator xpnn draws from (NumPy's, CuPy's, PyTorch's).

    Libraries not imported yet are seeded when their backend is first created.
    """
    global _SEED
    _SEED = int(value)
    _SEEDED.clear()
    _seed_library(np, _SEED)
    for backend in list(_CACHE.values()):
        if backend.name in ("gpu", "torch"):
            _seed_library(backend.library, _SEED, backend.device if backend.name == "gpu" else None)


def set_random_source(source):
    """Choose where random numbers are drawn: ``"native"`` or ``"host"``.

    ``"host"`` draws every random array (dropout masks) from ``np.random`` and
    moves it to the device, so all backends see the same masks (parity runs).
    """
    global _RANDOM_SOURCE
    if source not in ("native", "host"):
        raise ValueError(f"random source must be 'native' or 'host', not {source!r}")
    _RANDOM_SOURCE = source


@contextlib.contextmanager
def host_random():
    """Context manager: draw all random arrays on the host (see :func:`set_random_source`)."""
    previous = _RANDOM_SOURCE
    set_random_source("host")
    try:
        yield
    finally:
        set_random_source(previous)
