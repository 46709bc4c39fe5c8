"""The IDX file format of MNIST-style data sets: a validating reader and a writer.

An IDX file starts with a 4-byte magic number ``0x00 0x00 <type> <ndim>``,
then ``ndim`` big-endian unsigned 32-bit dimension sizes, then the values in
row-major (C) order, big-endian. :func:`read_idx` reads gzipped or raw files
(told apart by content, not by name) and validates every part of that layout;
:func:`write_idx` writes them. A file that breaks the layout raises
:class:`IdxError` naming the file, what is wrong, and how to fix it.
Public through :mod:`xpnn.datasets`.
"""
import gzip
import math
import os
import zlib

import numpy as np

from xpnn._files import atomic_write_bytes

#: IDX type code -> big-endian NumPy dtype of the stored values.
IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_TYPE_NAMES = {code: dtype.name for code, dtype in IDX_DTYPES.items()}  # 0x0B: "int16", ...
_CODE_OF_DTYPE = {dtype.name: code for code, dtype in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
#: The most dimensions a NumPy array can have (NPY_MAXDIMS: 32 before NumPy 2.0, 64 since);
#: an IDX header may declare up to 255.
NUMPY_MAX_DIMS = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32
_FIX = ("delete it and download it again, or point xpnn-train's --data-dir (in Python: the "
        "directory or root argument) at a directory with intact MNIST-format files")


class IdxError(ValueError):
    """A file is not a valid IDX file (foreign, truncated, corrupt, unsupported type)."""


def _fail(path, problem, fix=_FIX):
    raise IdxError(f"{path}: {problem}. To fix: {fix}.")


def _read_payload(path):
    """Return the file's bytes, gunzipped when the content is gzip."""
    with open(path, "rb") as stream:
        raw = stream.read()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as error:
        _fail(path, f"the gzip data is truncated or corrupt ({type(error).__name__}: {error}; "
                    f"{len(raw)} compressed bytes on disk)")


def _parse_header(path, payload):
    """Validate the magic number and dimensions; return (dtype, shape, header_size)."""
    if len(payload) == 0:
        _fail(path, "the file is empty (0 bytes), not an IDX file")
    if len(payload) < 4:
        _fail(path, f"the file has only {len(payload)} bytes, too short for an IDX magic number")
    zero_a, zero_b, type_code, ndim = payload[:4]
    if zero_a != 0 or zero_b != 0:
        _fail(path, f"not an IDX file: the magic number starts with bytes 0x{zero_a:02x} "
                    f"0x{zero_b:02x}, an IDX file starts with 0x00 0x00 <type> <ndim> "
                    f"(is it an HTML error page or another format?)")
    if type_code not in IDX_DTYPES:
        supported = ", ".join(f"0x{code:02x} ({name})" for code, name in _TYPE_NAMES.items())
        _fail(path, f"unsupported IDX value type 0x{type_code:02x}; supported: {supported}")
    if ndim == 0:
        _fail(path, "the IDX header declares 0 dimensions; an IDX file has at least 1")
    if ndim > NUMPY_MAX_DIMS:
        _fail(path, f"the IDX header declares {ndim} dimensions; NumPy {np.__version__} arrays "
                    f"have at most {NUMPY_MAX_DIMS} (MNIST-format files have 1 or 3)")
    header_size = 4 + 4 * ndim
    if len(payload) < header_size:
        _fail(path, f"truncated header: {ndim} dimensions need {header_size} header bytes, "
                    f"the file has {len(payload)}")
    shape = tuple(int(n) for n in np.frombuffer(payload, dtype=">u4", count=ndim, offset=4))
    return IDX_DTYPES[type_code], shape, header_size


def read_idx(path):
    """Read an IDX file (gzipped or raw) into a NumPy array in native byte order.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    numpy.ndarray
        Shape and dtype as the header declares them (uint8 for MNIST).

    Raises
    ------
    IdxError
        When the file is empty, foreign (wrong magic number), of an
        unsupported value type, declares more dimensions than NumPy supports,
        is truncated, or is longer than its header declares.
    FileNotFoundError
        When ``path`` does not exist.
    """
    path = os.fspath(path)
    payload = _read_payload(path)
    dtype, shape, header_size = _parse_header(path, payload)
    # Python ints: a declared size past 2**63 (e.g. 2**31 x 2**31 x 4) would wrap around
    # in int64, to 0 for that one, and pass as "no data".
    expected = math.prod(shape) * dtype.itemsize
    actual = len(payload) - header_size
    dims = " x ".join(str(n) for n in shape)
    if actual < expected:
        _fail(path, f"truncated: the header declares {dims} values of {dtype.itemsize} byte(s) "
                    f"= {expected} data bytes, but only {actual} follow the header")
    if actual > expected:
        _fail(path, f"{actual - expected} unexpected trailing bytes: the header declares {dims} "
                    f"values = {expected} data bytes, but {actual} follow the header "
                    f"(a wrong header, or two files concatenated)")
    values = np.frombuffer(payload, dtype=dtype, count=expected // dtype.itemsize, offset=header_size)
    return values.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def write_idx(path, array, compress=None):
    """Write ``array`` as an IDX file, atomically (temporary file, then rename).

    Parameters
    ----------
    path : str or os.PathLike
    array : array_like
        uint8, int8, int16, int32, float32 or float64 values, at least 1-D.
    compress : bool, optional
        gzip the file; by default when ``path`` ends with ``.gz``.
    """
    path = os.fspath(path)
    array = np.asarray(array)
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"write_idx: an IDX array needs 1 to 255 dimensions, got shape {array.shape}")
    code = _CODE_OF_DTYPE.get(array.dtype.name)
    if code is None:
        raise ValueError(f"write_idx: dtype {array.dtype} is not an IDX type; use one of "
                         f"{', '.join(_TYPE_NAMES.values())}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if compress is None:
        compress = path.endswith(".gz")
    if compress:
        payload = gzip.compress(payload, mtime=0)
    atomic_write_bytes(path, payload)
