"""MNIST-format data: the IDX file format, the MNIST and Fashion-MNIST loaders, and a data layer.

IDX files
---------
:func:`read_idx` reads gzipped or raw IDX files and validates every part of
the layout; :func:`write_idx` writes them; a file that breaks the layout raises
:class:`IdxError` naming the file, what is wrong, and how to fix it (written
in :mod:`xpnn.idx`, public here).

Data sets
---------
:func:`fashion_mnist` reads Debian's ``dataset-fashion-mnist`` package (or a
directory given); :func:`mnist` reads a directory given or downloads the four
standard files into a cache directory, verifying each by SHA-256.

Data layer
----------
:class:`DataLayer` (written in :mod:`xpnn.data_layer`, public here) is the
course's data layer: ``next()`` returns ``(images, one_hot_labels)`` on the
backend, reshuffled every epoch from a seed. The whole data set is moved to
the backend's device once; batches are gathered there, so a GPU is never fed
from the host batch by batch.
"""
import hashlib
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

from xpnn._files import atomic_writer
from xpnn.data_layer import NUM_CLASSES, DataLayer, batch_part  # noqa: F401 (public here)
from xpnn.idx import IDX_DTYPES, IdxError, read_idx, write_idx  # noqa: F401 (public here)
from xpnn.idx import _FIX

# -- MNIST-format data sets ------------------------------------------------------

#: The four standard files, by role.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
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
    for path, array, what in ((image_path, images, "images"), (label_path, labels, "labels")):
        # An empty split would pass every other check and then divide by zero in training.
        if array.shape[0] == 0:
            raise IdxError(f"{path}: the header declares 0 {what}; a data set needs at least one. "
                           f"To fix: {_FIX}.")
    if images.shape[0] != labels.shape[0]:
        raise IdxError(f"{image_path} holds {images.shape[0]} images but {label_path} holds "
                       f"{labels.shape[0]} labels; the counts must match. To fix: {_FIX}.")
    if int(labels.max()) >= NUM_CLASSES:  # (labels is not empty: checked above)
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
        When a file is corrupt, holds no images or labels, or the files do not
        fit together.
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
            f"{', '.join(s + '[.gz]' for s in MNIST_FILES.values())}. To fix: point xpnn-train's --data-dir "
            f"(in Python: the directory or root argument) at a directory holding them")
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
    digest = hashlib.sha256()
    with atomic_writer(destination) as stream, urllib.request.urlopen(url, timeout=timeout) as response:
        for block in iter(lambda: response.read(_CHUNK), b""):
            digest.update(block)
            stream.write(block)
        if digest.hexdigest() != expected_sha256:
            raise DownloadError(f"checksum mismatch for {url}: SHA-256 {digest.hexdigest()}, "
                                f"expected {expected_sha256} (file discarded)")


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
        When ``directory`` cannot be created, or no mirror delivered the file
        with the expected checksum; the message lists what each mirror answered.
    """
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:  # e.g. a path below a regular file: NotADirectoryError
        raise DownloadError(f"cannot create the download directory {directory} "
                            f"({type(error).__name__}: {error})") from error
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


def _make_cache_dir(cache):
    """Create the download cache ``cache``, or raise DatasetNotFoundError naming it and the fix."""
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as error:  # a path below a regular file, or one that cannot be created
        raise DatasetNotFoundError(
            f"cannot create the MNIST download cache {cache} ({type(error).__name__}: {error}). "
            f"To fix: set XPNN_CACHE_DIR (cache_dir=) to a directory that can be created and "
            f"written, or pass --data-dir DIR (mnist(root=DIR)) with the four MNIST IDX files") from error


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
        When the files are not cached and cannot be (or may not be) downloaded,
        or the cache directory cannot be created; the message says what to do.
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
        _make_cache_dir(cache)  # its failure is no network problem: say so, not "offline"
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
