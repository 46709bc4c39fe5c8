"""MNIST-format data: the IDX file format, the MNIST and Fashion-MNIST loaders, and a data layer.

IDX files
---------
An IDX file starts with a 4-byte magic number ``0x00 0x00 <type> <ndim>``,
then ``ndim`` big-endian unsigned 32-bit dimension sizes, then the values in
row-major (C) order, big-endian. :func:`read_idx` reads gzipped or raw files
(told apart by content, not by name) and validates every part of that layout;
:func:`write_idx` writes them. A file that breaks the layout raises
:class:`IdxError` naming the file, what is wrong, and how to fix it.

Data sets
---------
:func:`fashion_mnist` reads Debian's ``dataset-fashion-mnist`` package (or a
directory given); :func:`mnist` reads a directory given or downloads the four
standard files into a cache directory, verifying each by SHA-256.

Data layer
----------
:class:`DataLayer` is the course's data layer: ``next()`` returns
``(images, one_hot_labels)`` on the backend, reshuffled every epoch from a
seed. The whole data set is moved to the backend's device once; batches are
gathered there, so a GPU is never fed from the host batch by batch.
"""
import gzip
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass

import numpy as np

from xpnn._files import _current_umask, atomic_write_bytes  # noqa: F401 (re-exported)
from xpnn.backend import get_backend, make_backend

# -- the IDX format ------------------------------------------------------------

#: IDX type code -> big-endian NumPy dtype of the stored values.
IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_TYPE_NAMES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32",
               0x0D: "float32", 0x0E: "float64"}
_CODE_OF_DTYPE = {dtype.name: code for code, dtype in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
_FIX = ("delete it and download it again, or point --data-dir (the root/directory argument) "
        "at a directory with intact MNIST-format files")


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
        unsupported value type, truncated, or longer than its header declares.
    FileNotFoundError
        When ``path`` does not exist.
    """
    path = os.fspath(path)
    payload = _read_payload(path)
    dtype, shape, header_size = _parse_header(path, payload)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
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


# -- MNIST-format data sets ------------------------------------------------------

#: The four standard files, by role.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
NUM_CLASSES = 10
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not where they were looked for; the message says what to do."""


class DownloadError(OSError):
    """A file could not be downloaded (offline, every mirror failed, or a checksum mismatch)."""


@dataclass
class MnistFormatData:
    """The four arrays of an MNIST-format data set and where they came from.

    Attributes
    ----------
    train_images, test_images : numpy.ndarray
        uint8, shape (n, rows, columns).
    train_labels, test_labels : numpy.ndarray
        uint8, shape (n,), values in [0, 10).
    directory : str
        The directory the files were read from.
    name : str
        ``"mnist"``, ``"fashion-mnist"`` or ``"mnist-format"``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    directory: str
    name: str = "mnist-format"


def find_mnist_file(directory, stem):
    """Return the path of ``stem`` in ``directory`` (raw, ``.gz``, or ``.idx`` spelled with a dot), or None."""
    dotted = stem.replace("-idx", ".idx")
    for candidate in (stem + ".gz", stem, dotted + ".gz", dotted):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _check_split(images, labels, image_path, label_path):
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxError(f"{image_path}: expected uint8 images of shape (n, rows, columns), got "
                       f"{images.dtype} of shape {images.shape}. To fix: {_FIX}.")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise IdxError(f"{label_path}: expected uint8 labels of shape (n,), got {labels.dtype} "
                       f"of shape {labels.shape}. To fix: {_FIX}.")
    if images.shape[0] != labels.shape[0]:
        raise IdxError(f"{image_path} holds {images.shape[0]} images but {label_path} holds "
                       f"{labels.shape[0]} labels; the counts must match. To fix: {_FIX}.")
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise IdxError(f"{label_path}: label {int(labels.max())} is out of range; MNIST-format "
                       f"labels lie in [0, {NUM_CLASSES}). To fix: {_FIX}.")


def load_mnist_format(directory, name="mnist-format"):
    """Read the four standard MNIST-format files from ``directory``.

    Each file may be gzipped (``train-images-idx3-ubyte.gz``) or raw
    (``train-images-idx3-ubyte``). Image and label counts must match and
    every label must lie in [0, 10).

    Returns
    -------
    MnistFormatData

    Raises
    ------
    DatasetNotFoundError
        When the directory or one of the files is missing.
    IdxError
        When a file is corrupt or the files do not fit together.
    """
    directory = os.fspath(directory)
    paths = {}
    for role, stem in MNIST_FILES.items():
        paths[role] = find_mnist_file(directory, stem)
    missing = [MNIST_FILES[role] for role, path in paths.items() if path is None]
    if missing:
        where = "does not exist" if not os.path.isdir(directory) else "lacks " + ", ".join(
            f"{stem}[.gz]" for stem in missing)
        raise DatasetNotFoundError(
            f"{directory} {where}; an MNIST-format directory holds the four files "
            f"{', '.join(s + '[.gz]' for s in MNIST_FILES.values())}. To fix: point --data-dir "
            f"(the root/directory argument) at a directory holding them")
    arrays = {role: read_idx(path) for role, path in paths.items()}
    for split in ("train", "test"):
        _check_split(arrays[f"{split}_images"], arrays[f"{split}_labels"],
                     paths[f"{split}_images"], paths[f"{split}_labels"])
    return MnistFormatData(directory=directory, name=name, **arrays)


def fashion_mnist(root=None):
    """Load Fashion-MNIST from ``root`` or from Debian's ``dataset-fashion-mnist`` package.

    Parameters
    ----------
    root : str, optional
        A directory with the four MNIST-format files; default
        ``/usr/share/datasets/fashion-mnist`` (where ``apt-get install
        dataset-fashion-mnist`` puts them).
    """
    if root is None:
        if not os.path.isdir(FASHION_MNIST_DIR):
            raise DatasetNotFoundError(
                f"Fashion-MNIST is not installed: {FASHION_MNIST_DIR} does not exist. To fix: "
                f"install Debian's package (sudo apt-get install dataset-fashion-mnist), or pass "
                f"--data-dir DIR with the four Fashion-MNIST IDX files")
        root = FASHION_MNIST_DIR
    return load_mnist_format(root, name="fashion-mnist")


# -- MNIST download ----------------------------------------------------------------

#: Public mirrors of the original MNIST files, tried in turn (yann.lecun.com
#: itself now often refuses automated downloads).
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
#: SHA-256 of the four gzipped MNIST files (the same bytes on every mirror).
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
_CHUNK = 1 << 16


def default_cache_dir():
    """Return xpnn's cache root: ``$XPNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/xpnn``, else ``~/.cache/xpnn``."""
    if os.environ.get("XPNN_CACHE_DIR"):
        return os.environ["XPNN_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xpnn")


def sha256_of(path):
    """Return the hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url, destination, expected_sha256, timeout):
    """Download ``url`` to ``destination`` atomically if its SHA-256 matches; raise DownloadError otherwise."""
    directory = os.path.dirname(os.path.abspath(destination))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    os.chmod(temporary, 0o666 & ~_current_umask())
    digest = hashlib.sha256()
    try:
        with os.fdopen(handle, "wb") as stream, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(_CHUNK), b""):
                digest.update(block)
                stream.write(block)
            stream.flush()
            os.fsync(stream.fileno())
        if digest.hexdigest() != expected_sha256:
            raise DownloadError(f"checksum mismatch for {url}: SHA-256 {digest.hexdigest()}, "
                                f"expected {expected_sha256} (file discarded)")
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def download_file(filename, directory, expected_sha256, mirrors=MNIST_MIRRORS, timeout=60.0):
    """Download ``filename`` into ``directory`` from the first mirror that serves the right bytes.

    Each mirror URL is ``mirror + filename``. The file is streamed to a
    temporary file, its SHA-256 checked, and only then renamed into place, so
    a failed or corrupt download never leaves a file behind.

    Returns
    -------
    str
        The path of the verified file.

    Raises
    ------
    DownloadError
        When no mirror delivered the file with the expected checksum; the
        message lists what each mirror answered.
    """
    os.makedirs(directory, exist_ok=True)
    destination = os.path.join(directory, filename)
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        print(f"xpnn: downloading {url}", file=sys.stderr)
        try:
            _fetch(url, destination, expected_sha256, timeout)
            return destination
        except DownloadError as error:
            failures.append(str(error))
        except (urllib.error.URLError, OSError, ValueError) as error:
            failures.append(f"{url}: {type(error).__name__}: {error}")
    raise DownloadError(f"could not download {filename}: " + "; ".join(failures))


def _cached_file_ok(path, expected_sha256):
    return os.path.isfile(path) and sha256_of(path) == expected_sha256


def _offline_message(cache, mirrors, failure):
    urls = ", ".join(m.rstrip("/") + "/" for m in mirrors)
    return (f"{failure}. MNIST is not in the cache {cache} and could not be downloaded (offline, "
            f"or the mirrors are unreachable). To fix: pass --data-dir DIR (mnist(root=DIR)) with "
            f"the four MNIST IDX files; or download {', '.join(MNIST_SHA256)} manually from one of "
            f"{urls} into {cache}; or train on Fashion-MNIST (--dataset fashion-mnist, "
            f"apt-get install dataset-fashion-mnist)")


def mnist(root=None, download=True, cache_dir=None, mirrors=None, *, checksums=None, timeout=60.0):
    """Load MNIST from a directory, or from a verified download cache.

    Parameters
    ----------
    root : str, optional
        A directory with the four MNIST-format files; when given, nothing is
        downloaded.
    download : bool
        Download missing (or corrupt) cached files from ``mirrors``.
    cache_dir : str, optional
        Where downloads go; default ``<cache root>/mnist`` with the cache root
        from :func:`default_cache_dir` (``$XPNN_CACHE_DIR`` overrides it).
    mirrors : sequence of str, optional
        Base URLs tried in turn; default :data:`MNIST_MIRRORS`.
    checksums : dict, optional
        File name -> SHA-256; default :data:`MNIST_SHA256`.
    timeout : float
        Seconds to wait for a mirror to answer.

    Raises
    ------
    DatasetNotFoundError
        When the files are not cached and cannot be (or may not be) downloaded;
        the message says what to do.
    """
    if root is not None:
        return load_mnist_format(root, name="mnist")
    cache = cache_dir or os.path.join(default_cache_dir(), "mnist")
    mirrors = tuple(mirrors or MNIST_MIRRORS)
    checksums = dict(checksums or MNIST_SHA256)
    for filename, expected in checksums.items():
        path = os.path.join(cache, filename)
        if _cached_file_ok(path, expected):
            continue
        if not download:
            raise DatasetNotFoundError(_offline_message(
                cache, mirrors, f"{path} is missing or fails its SHA-256 check and download=False"))
        try:
            download_file(filename, cache, expected, mirrors, timeout)
        except DownloadError as error:
            raise DatasetNotFoundError(_offline_message(cache, mirrors, str(error))) from error
    return load_mnist_format(cache, name="mnist")


def load_dataset(name, root=None):
    """Load ``"fashion-mnist"`` or ``"mnist"`` (from ``root`` when given)."""
    if name == "fashion-mnist":
        return fashion_mnist(root)
    if name == "mnist":
        return mnist(root)
    raise ValueError(f"unknown dataset {name!r}; choose 'fashion-mnist' or 'mnist'")


# -- the data layer ----------------------------------------------------------------

def _host_images(images):
    """Return images as a host array with a channel axis: (n, h, w) -> (n, 1, h, w)."""
    host = np.asarray(images)
    if host.ndim == 3:
        host = host.reshape(host.shape[0], 1, host.shape[1], host.shape[2])
    if host.ndim < 2:
        raise ValueError(f"DataLayer: images must have a leading sample axis and at least one "
                         f"feature axis, got shape {host.shape}")
    return host


def _host_labels(labels, count, num_classes):
    """Return integer class labels (n,) from class indices or one-hot rows; validate the range."""
    host = np.asarray(labels)
    if host.ndim == 2 and host.shape[1] == num_classes:
        host = np.argmax(host, axis=1)
    if host.ndim != 1 or host.shape[0] != count:
        raise ValueError(f"DataLayer: expected {count} labels of shape ({count},) or one-hot "
                         f"({count}, {num_classes}), got shape {np.shape(labels)}")
    if host.dtype.kind not in "iub":
        raise ValueError(f"DataLayer: labels must be integer class indices, got dtype {host.dtype}")
    if host.size and (int(host.min()) < 0 or int(host.max()) >= num_classes):
        raise ValueError(f"DataLayer: labels must lie in [0, {num_classes}), got values from "
                         f"{int(host.min())} to {int(host.max())}")
    return host.astype(np.int64)


class _DeviceSet:
    """One split (images and labels) resident on a backend's device.

    uint8 images stay uint8 on the device (a quarter of float32's memory) and
    are scaled to [0, 1] batch by batch; other images are cast to the
    backend's dtype once.
    """

    def __init__(self, images, labels, backend, num_classes):
        host_images = _host_images(images)
        count = host_images.shape[0]
        self.scale = host_images.dtype == np.uint8
        if not self.scale:
            host_images = host_images.astype(backend.dtype_name, copy=False)
        self.size = count
        self.backend = backend
        self.images = backend.asarray(host_images)
        self.labels = backend.asarray(_host_labels(labels, count, num_classes))
        xp = backend.xp
        self.classes = xp.arange(num_classes, dtype=xp.int64, device=backend.device)

    def prepare(self, images, labels):
        """Turn stored images/labels into (float images in the backend dtype, one-hot labels)."""
        xp = self.backend.xp
        dtype = self.backend.dtype
        images = xp.astype(images, dtype)
        if self.scale:
            images = images / 255.0
        one_hot = xp.astype(xp.expand_dims(labels, axis=1) == self.classes, dtype)
        return images, one_hot

    def rows(self, start, stop, order=None):
        """Rows ``start:stop`` of the set, or of ``order`` (a device index array) when given."""
        if order is None:
            return self.prepare(self.images[start:stop, ...], self.labels[start:stop])
        xp = self.backend.xp
        index = order[start:stop]
        return self.prepare(xp.take(self.images, index, axis=0), xp.take(self.labels, index, axis=0))


class DataLayer:
    """Course-style data layer: ``next()`` returns ``(images, one_hot_labels)`` on the backend.

    Parameters
    ----------
    images : array_like
        (n, rows, columns) (a channel axis is added), (n, channels, rows,
        columns) or (n, features). uint8 images are scaled to [0, 1]; others
        are cast to the backend's dtype unchanged.
    labels : array_like
        (n,) integer class indices in [0, num_classes), or one-hot (n, num_classes).
    batch_size : int
    backend : Backend or str, optional
        Default: the current backend. The whole set is moved to its device once.
    shuffle : bool
        Draw a new order every epoch; otherwise batches follow the stored order.
    seed : int, optional
        Epoch ``e``'s order is ``numpy.random.default_rng([seed, e]).permutation(n)``,
        drawn on the host. Default: drawn from NumPy's global generator, so
        ``np.random.seed(n)`` reproduces a run (as course code expects).
    test_images, test_labels : array_like, optional
        The split :meth:`get_test_set` returns.
    num_classes : int
        Width of the one-hot labels (10 for MNIST).

    Attributes
    ----------
    epoch : int
        Completed epochs (``next()`` has delivered every sample ``epoch`` times).
    position : int
        Samples of the current epoch already delivered.

    Notes
    -----
    An epoch delivers every sample exactly once: the last batch of an epoch is
    smaller when ``batch_size`` does not divide ``n``. Because each epoch's
    order is a function of ``(seed, epoch)``, :meth:`state_dict` (seed, epoch,
    position) is the complete generator state; :meth:`load_state_dict` resumes
    mid-epoch with the same remaining batches.
    """

    def __init__(self, images, labels, batch_size, backend=None, shuffle=True, seed=None,
                 test_images=None, test_labels=None, num_classes=NUM_CLASSES):
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"DataLayer: batch_size must be a positive integer, got {batch_size!r}")
        self.backend = get_backend() if backend is None else make_backend(backend)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.num_classes = int(num_classes)
        self.seed = int(np.random.randint(0, 2**31 - 1)) if seed is None else int(seed)
        self._train = _DeviceSet(images, labels, self.backend, self.num_classes)
        self._test = None
        if test_images is not None:
            self._test = _DeviceSet(test_images, test_labels, self.backend, self.num_classes)
        self.epoch = 0
        self.position = 0
        self._order = None
        self._order_epoch = None

    @property
    def size(self):
        """Number of samples per epoch."""
        return self._train.size

    @property
    def batches_per_epoch(self):
        """Number of ``next()`` calls that make one epoch (the last batch may be smaller)."""
        return -(-self.size // self.batch_size)

    def _epoch_order(self):
        """The current epoch's sample order as a device index array (drawn once per epoch)."""
        if self._order_epoch != self.epoch:
            generator = np.random.default_rng([self.seed, self.epoch])
            permutation = generator.permutation(self.size).astype(np.int64)
            self._order = self.backend.asarray(permutation)
            self._order_epoch = self.epoch
        return self._order

    def next(self):
        """Return the next batch ``(images, one_hot_labels)``; a new epoch starts after the last sample."""
        start = self.position
        stop = min(start + self.batch_size, self.size)
        order = self._epoch_order() if self.shuffle else None
        batch = self._train.rows(start, stop, order)
        self.position = stop
        if stop == self.size:
            self.epoch += 1
            self.position = 0
        return batch

    def epoch_batches(self):
        """Yield the remaining batches of the current epoch."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next()

    def get_test_set(self):
        """Return the whole test split as ``(images, one_hot_labels)`` arrays of the backend."""
        if self._test is None:
            raise ValueError("DataLayer: no test split was given; pass test_images= and "
                             "test_labels= to the constructor")
        return self._test.rows(0, self._test.size)

    def state_dict(self):
        """Return the position in the data stream as plain Python values (JSON-serializable)."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "size": self.size, "shuffle": self.shuffle, "batch_size": self.batch_size}

    def load_state_dict(self, state):
        """Continue from a :meth:`state_dict` of a data layer over the same samples."""
        if int(state["size"]) != self.size or bool(state["shuffle"]) != self.shuffle:
            raise ValueError(
                f"DataLayer: the saved state is for {state['size']} samples with "
                f"shuffle={state['shuffle']}, this layer has {self.size} with shuffle={self.shuffle}")
        position = int(state["position"])
        if not 0 <= position < self.size:
            raise ValueError(f"DataLayer: saved position {position} is outside [0, {self.size})")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = position
        self._order_epoch = None
