"""The course's data layer over a whole data set resident on the backend's device.

Public through :mod:`xpnn.datasets`: ``next()`` returns ``(images,
one_hot_labels)`` on the backend, reshuffled every epoch from a seed. The
whole data set is moved to the backend's device once; batches are gathered
there, so a GPU is never fed from the host batch by batch.
"""
import hashlib

import numpy as np

from xpnn._checks import positive_int
from xpnn.backend import get_backend, make_backend, to_numpy

#: Classes of the MNIST-format data sets (the default width of one-hot labels).
NUM_CLASSES = 10


def _host_images(images):
    """Return images as a host array with a channel axis: (n, h, w) -> (n, 1, h, w)."""
    host = to_numpy(images)  # (from any backend or device, as layers accept)
    if host.ndim == 3:
        host = host.reshape(host.shape[0], 1, host.shape[1], host.shape[2])
    if host.ndim < 2:
        raise ValueError(f"DataLayer: images must have a leading sample axis and at least one "
                         f"feature axis, got shape {host.shape}")
    return host


def _host_labels(labels, count, num_classes):
    """Return integer class labels (n,) from class indices or one-hot rows; validate the range."""
    host = to_numpy(labels)
    given_shape = host.shape
    if host.ndim == 2 and host.shape[1] == num_classes:
        host = np.argmax(host, axis=1)
    if host.ndim != 1 or host.shape[0] != count:
        raise ValueError(f"DataLayer: expected {count} labels of shape ({count},) or one-hot "
                         f"({count}, {num_classes}), got shape {given_shape}")
    if host.dtype.kind not in "iub":
        raise ValueError(f"DataLayer: labels must be integer class indices, got dtype {host.dtype}")
    if host.size and (int(host.min()) < 0 or int(host.max()) >= num_classes):
        raise ValueError(f"DataLayer: labels must lie in [0, {num_classes}), got values from "
                         f"{int(host.min())} to {int(host.max())}")
    return host.astype(np.int64)


def _fingerprint(images, labels):
    """A short hash of the labels and of about 512 images spread over the set: tells a saved
    position's data from other data of the same size (~2 ms for MNIST's 60,000)."""
    stride = max(1, images.shape[0] // 512)
    digest = hashlib.sha256(np.ascontiguousarray(labels).tobytes())
    digest.update(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images[::stride]).tobytes())
    return digest.hexdigest()[:16]


def batch_part(count, rank, size):
    """The rows ``(start, stop)`` that rank ``rank`` of ``size`` takes of a batch of ``count``.

    Contiguous blocks in rank order whose sizes differ by at most one (7 rows on 2 ranks:
    3 and 4; a rank may get none when ``count < size``). Data-parallel training relies on
    both: the global batch, its order and its dropout mask are one process's, each rank
    holding a block of it (:mod:`xpnn.parallel`).
    """
    return rank * count // size, (rank + 1) * count // size


def _checked_part(part):
    """``part`` as ``(rank, size)`` ints, or a clear error."""
    try:
        rank, size = (int(value) for value in part)
    except (TypeError, ValueError):
        raise ValueError(f"DataLayer: part must be (rank, size), got {part!r}") from None
    if not 0 <= rank < size:
        raise ValueError(f"DataLayer: part (rank, size) needs 0 <= rank < size, got {part!r}")
    return rank, size


class _DeviceSet:
    """One split (images and labels) resident on a backend's device.

    uint8 images stay uint8 on the device (a quarter of float32's memory) and
    are scaled to [0, 1] batch by batch; other images are cast to the
    backend's dtype once.
    """

    def __init__(self, images, labels, backend, num_classes):
        host_images = _host_images(images)
        count = host_images.shape[0]
        host_labels = _host_labels(labels, count, num_classes)
        # (Of the samples as given: the same data in a float32 and a float64 layer is the same.)
        self.fingerprint = _fingerprint(host_images, host_labels)
        self.scale = host_images.dtype == np.uint8
        if not self.scale:
            host_images = host_images.astype(backend.dtype_name, copy=False)
        self.size = count
        self.backend = backend
        self.images = backend.asarray(host_images)
        self.labels = backend.asarray(host_labels)
        xp = backend.xp
        self.classes = xp.arange(num_classes, dtype=xp.int64, device=backend.device)

    def prepare(self, images, labels):
        """Turn stored images/labels into (float images in the backend dtype, one-hot labels)."""
        xp = self.backend.xp
        dtype = self.backend.dtype
        # (copy=False: float images are stored in the dtype already, and a copy changes nothing.)
        images = xp.astype(images, dtype, copy=False)
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
    part : (rank, size), optional
        Data-parallel training: ``next()`` returns rank ``rank``'s rows of each batch of
        ``batch_size`` (:func:`batch_part`), of ``size`` ranks; ``batch_size``, the order,
        ``size`` and :meth:`state_dict` stay the global batch's. Default ``(0, 1)``: all.

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
                 test_images=None, test_labels=None, num_classes=NUM_CLASSES, part=(0, 1)):
        self.batch_size = positive_int("DataLayer", "batch_size", batch_size)
        self.part = _checked_part(part)
        self.backend = get_backend() if backend is None else make_backend(backend)
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
        """Return the next batch ``(images, one_hot_labels)`` (this rank's rows of it, see
        ``part``); a new epoch starts after the last sample."""
        start = self.position
        stop = min(start + self.batch_size, self.size)
        order = self._epoch_order() if self.shuffle else None
        first, last = batch_part(stop - start, *self.part)
        batch = self._train.rows(start + first, start + last, order)
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
                "size": self.size, "shuffle": self.shuffle, "batch_size": self.batch_size,
                "fingerprint": self._train.fingerprint}

    def load_state_dict(self, state):
        """Continue from a :meth:`state_dict` of a data layer over the same samples."""
        if int(state["size"]) != self.size or bool(state["shuffle"]) != self.shuffle:
            raise ValueError(
                f"DataLayer: the saved state is for {state['size']} samples with "
                f"shuffle={state['shuffle']}, this layer has {self.size} with shuffle={self.shuffle}")
        saved = state.get("fingerprint")  # (states saved before it existed have none)
        if saved is not None and saved != self._train.fingerprint:
            raise ValueError(f"DataLayer: the saved state is for other samples (their fingerprint "
                             f"{saved}, this layer's {self._train.fingerprint}), though as many")
        position = int(state["position"])
        if not 0 <= position < self.size:
            raise ValueError(f"DataLayer: saved position {position} is outside [0, {self.size})")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = position
        self._order_epoch = None
