"""IDX reading/writing, the MNIST/Fashion-MNIST loaders, the download path and the data layer.

Nothing here touches the internet: downloads go to an HTTP server on
127.0.0.1 that serves files the tests generate.
"""
import functools
import gzip
import hashlib
import http.server
import os
import re
import struct
import threading

import numpy as np
import pytest

import xpnn
from xpnn import datasets
from xpnn.datasets import (DataLayer, DatasetNotFoundError, IdxError, load_mnist_format,
                           read_idx, write_idx)


def idx_bytes(type_code, shape, data_bytes):
    """An IDX file built by hand from the format description (independent of write_idx)."""
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + data_bytes


def write_bytes(path, payload, gz=False):
    with open(path, "wb") as stream:
        stream.write(gzip.compress(payload) if gz else payload)
    return str(path)


# -- IDX round trips -------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_hand_made_uint8_images(tmp_path, gz):
    values = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_bytes(tmp_path / "images", idx_bytes(0x08, (2, 3, 4), values.tobytes()), gz)
    result = read_idx(path)
    assert result.dtype == np.uint8 and result.shape == (2, 3, 4)
    np.testing.assert_array_equal(result, values)


def test_read_hand_made_big_endian_int32(tmp_path):
    # 258 = 0x00000102 big-endian, -1 = 0xffffffff: byte order must be honoured.
    payload = idx_bytes(0x0C, (2,), b"\x00\x00\x01\x02\xff\xff\xff\xff")
    result = read_idx(write_bytes(tmp_path / "ints", payload))
    assert result.dtype == np.int32
    np.testing.assert_array_equal(result, [258, -1])


def test_write_matches_hand_made_bytes(tmp_path):
    labels = np.array([7, 0, 9], dtype=np.uint8)
    write_idx(tmp_path / "labels", labels)
    assert (tmp_path / "labels").read_bytes() == idx_bytes(0x08, (3,), b"\x07\x00\x09")
    write_idx(tmp_path / "labels.gz", labels)
    assert gzip.decompress((tmp_path / "labels.gz").read_bytes()) == idx_bytes(0x08, (3,), b"\x07\x00\x09")


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("shape", [(5,), (4, 3, 2)], ids=["1d", "3d"])
@pytest.mark.parametrize("name", ["data", "data.gz"], ids=["raw", "gz"])
def test_round_trip(tmp_path, dtype, shape, name):
    rng = np.random.default_rng(3)
    values = (rng.normal(size=shape) * 50).astype(dtype)
    write_idx(tmp_path / name, values)
    raw = (tmp_path / name).read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    result = read_idx(tmp_path / name)
    assert result.dtype == np.dtype(dtype) and result.shape == shape
    np.testing.assert_array_equal(result, values)


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="not an IDX type"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


# -- corrupt files -------------------------------------------------------------------

def expect_idx_error(path, *fragments):
    with pytest.raises(IdxError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message and "To fix" in message
    for fragment in fragments:
        assert fragment in message, message


def test_empty_file(tmp_path):
    expect_idx_error(write_bytes(tmp_path / "empty", b""), "empty")


def test_bad_magic(tmp_path):
    path = write_bytes(tmp_path / "page.gz", b"<!DOCTYPE html><html>Not Found</html>", gz=False)
    expect_idx_error(path, "not an IDX file", "0x3c 0x21")


def test_bad_magic_in_the_second_byte(tmp_path):
    # Both leading magic bytes must be zero: 00 01 <type 08> <ndim 1> with an otherwise
    # well-formed size (3) and payload (3 bytes) is not an IDX file.
    path = write_bytes(tmp_path / "second", bytes([0x00, 0x01, 0x08, 0x01]) + struct.pack(">I", 3)
                       + b"\x01\x02\x03")
    expect_idx_error(path, "not an IDX file", "0x00 0x01")


def test_unsupported_type(tmp_path):
    expect_idx_error(write_bytes(tmp_path / "t", idx_bytes(0x07, (1,), b"\x00")), "unsupported IDX value type 0x07")


def test_zero_dimensions(tmp_path):
    expect_idx_error(write_bytes(tmp_path / "z", bytes([0, 0, 8, 0])), "0 dimensions")


def test_wrong_ndim_truncated_header(tmp_path):
    # A header that claims 3 dimensions but holds the sizes of only one.
    expect_idx_error(write_bytes(tmp_path / "h", bytes([0, 0, 8, 3]) + struct.pack(">I", 2)),
                     "truncated header", "3 dimensions need 16 header bytes")


def test_wrong_ndim_for_labels(tmp_path):
    # A valid 2-D IDX file in the labels slot: the loader names the file and the shape it wanted.
    make_mnist_dir(tmp_path, n_train=4, n_test=2)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((4, 2), dtype=np.uint8))
    with pytest.raises(IdxError, match=r"train-labels-idx1-ubyte.gz: expected uint8 labels of shape \(n,\)"):
        load_mnist_format(tmp_path)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_truncated_data(tmp_path, gz):
    payload = idx_bytes(0x08, (10, 28, 28), bytes(10 * 28 * 28))[:-100]
    expect_idx_error(write_bytes(tmp_path / "cut", payload, gz), "truncated", "7840 data bytes", "only 7740")


def test_truncated_gzip_stream(tmp_path):
    compressed = gzip.compress(idx_bytes(0x08, (10, 28, 28), os.urandom(10 * 28 * 28)))
    path = tmp_path / "cut.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    expect_idx_error(path, "gzip data is truncated or corrupt")


@pytest.mark.parametrize("data", [b"", b"\x01\x02"], ids=["no-data", "two-bytes"])
def test_huge_declared_size_is_reported_as_truncated(tmp_path, data):
    # 2**31 x 2**31 x 4 values = 2**64 bytes: 0 in int64 arithmetic, which would pass as "no data".
    payload = idx_bytes(0x08, (2**31, 2**31, 4), data)
    expect_idx_error(write_bytes(tmp_path / "huge", payload), "truncated",
                     "2147483648 x 2147483648 x 4", f"= {2**64} data bytes", f"only {len(data)} follow")


def test_255_dimensions_are_more_than_numpy_supports(tmp_path):
    # 255: the most an IDX header's one byte can declare; NumPy arrays have at most 32 or 64.
    path = write_bytes(tmp_path / "dims255", idx_bytes(0x08, (1,) * 255, b"\x07"))
    expect_idx_error(path, "declares 255 dimensions", "at most")


def test_numpy_max_dims_is_the_real_limit(tmp_path):
    from xpnn.idx import NUMPY_MAX_DIMS

    widest = read_idx(write_bytes(tmp_path / "widest", idx_bytes(0x08, (1,) * NUMPY_MAX_DIMS, b"\x07")))
    assert widest.shape == (1,) * NUMPY_MAX_DIMS
    with pytest.raises(ValueError, match="maximum supported dimension"):
        np.empty((1,) * (NUMPY_MAX_DIMS + 1))
    expect_idx_error(write_bytes(tmp_path / "wider", idx_bytes(0x08, (1,) * (NUMPY_MAX_DIMS + 1), b"\x07")),
                     f"declares {NUMPY_MAX_DIMS + 1} dimensions", f"at most {NUMPY_MAX_DIMS}")


def test_trailing_bytes(tmp_path):
    payload = idx_bytes(0x08, (3,), b"\x01\x02\x03") + b"\x00\x00"
    expect_idx_error(write_bytes(tmp_path / "long", payload), "2 unexpected trailing bytes")


# -- MNIST-format directories -----------------------------------------------------------

def make_mnist_dir(directory, n_train=12, n_test=6, gz=True, seed=0):
    """Write four small MNIST-format files; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    suffix = ".gz" if gz else ""
    for role, stem in datasets.MNIST_FILES.items():
        write_idx(os.path.join(directory, stem + suffix), arrays[role])
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_mnist_format(tmp_path, gz):
    arrays = make_mnist_dir(tmp_path, gz=gz)
    data = load_mnist_format(tmp_path)
    for role, expected in arrays.items():
        np.testing.assert_array_equal(getattr(data, role), expected)
    assert data.directory == str(tmp_path)


def test_label_count_mismatch(tmp_path):
    make_mnist_dir(tmp_path, n_train=12)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11, dtype=np.uint8))
    with pytest.raises(IdxError, match="holds 12 images but .*train-labels-idx1-ubyte.gz holds 11 labels"):
        load_mnist_format(tmp_path)


def test_label_out_of_range(tmp_path):
    make_mnist_dir(tmp_path, n_test=6)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 12], dtype=np.uint8))
    with pytest.raises(IdxError, match=r"label 12 is out of range"):
        load_mnist_format(tmp_path)


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_split_is_rejected(tmp_path, split):
    make_mnist_dir(tmp_path, **{f"n_{split}": 0})
    images = "train-images-idx3-ubyte.gz" if split == "train" else "t10k-images-idx3-ubyte.gz"
    with pytest.raises(IdxError, match=rf"{images}: the header declares 0 images.*To fix"):
        load_mnist_format(tmp_path)


def test_empty_labels_file_is_rejected(tmp_path):
    make_mnist_dir(tmp_path, n_test=6)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(0, dtype=np.uint8))
    with pytest.raises(IdxError, match=r"t10k-labels-idx1-ubyte.gz: the header declares 0 labels"):
        load_mnist_format(tmp_path)


def test_missing_file_and_directory(tmp_path):
    make_mnist_dir(tmp_path)
    os.remove(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DatasetNotFoundError, match=r"lacks t10k-images-idx3-ubyte\[.gz\].*--data-dir"):
        load_mnist_format(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_mnist_format(tmp_path / "nowhere")


def test_fashion_mnist_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        datasets.fashion_mnist()


@pytest.mark.skipif(not os.path.isdir(datasets.FASHION_MNIST_DIR),
                    reason=f"{datasets.FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_installed():
    data = datasets.fashion_mnist()
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
    np.testing.assert_array_equal(np.bincount(data.train_labels, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(data.test_labels, minlength=10), [1000] * 10)


# -- download against a local server -------------------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def file_server(tmp_path):
    """Serve two directories on 127.0.0.1: yields (root dir, base URL); mirrors are subdirectories."""
    root = tmp_path / "served"
    root.mkdir()
    handler = type("Handler", (_QuietHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()


def publish(directory, seed=0):
    """Write the four gz files into ``directory``; return their SHA-256 and the arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = make_mnist_dir(directory, seed=seed)
    sums = {stem + ".gz": hashlib.sha256((directory / (stem + ".gz")).read_bytes()).hexdigest()
            for stem in datasets.MNIST_FILES.values()}
    return sums, arrays


def leftovers(directory):
    return sorted(name for name in os.listdir(directory) if name.startswith(".tmp-")) if directory.exists() else []


def test_download_good_files(file_server, tmp_path):
    root, url, requests = file_server
    sums, arrays = publish(root / "m1")
    cache = tmp_path / "cache"
    data = datasets.mnist(cache_dir=str(cache), mirrors=[url + "/m1/"], checksums=sums)
    np.testing.assert_array_equal(data.train_images, arrays["train_images"])
    for name, digest in sums.items():
        assert hashlib.sha256((cache / name).read_bytes()).hexdigest() == digest
    assert leftovers(cache) == []
    count = len(requests)
    datasets.mnist(cache_dir=str(cache), mirrors=[url + "/m1/"], checksums=sums)
    assert len(requests) == count, "verified cached files must not be downloaded again"


def test_download_wrong_checksum_leaves_nothing(file_server, tmp_path):
    root, url, _ = file_server
    sums, _ = publish(root / "m1")
    sums["train-images-idx3-ubyte.gz"] = "0" * 64
    cache = tmp_path / "cache"
    with pytest.raises(DatasetNotFoundError) as info:
        datasets.mnist(cache_dir=str(cache), mirrors=[url + "/m1/"], checksums=sums)
    message = str(info.value)
    assert "checksum mismatch" in message and "--data-dir" in message
    assert not (cache / "train-images-idx3-ubyte.gz").exists()
    assert leftovers(cache) == []


def test_atomic_write_syncs_the_file_before_the_rename(tmp_path, monkeypatch):
    # Downloads, IDX files and checkpoints are written through xpnn._files: the data
    # must reach the disk (fsync of the temporary file) before the rename publishes it,
    # or a crash can leave a renamed but empty file. The real calls still run.
    from xpnn import _files
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))   # which file: its inode
        return real_fsync(fd)

    def replace(source, destination):
        events.append(("replace", os.stat(source).st_ino))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "payload.bin"
    _files.atomic_write_bytes(str(target), b"abc")
    assert target.read_bytes() == b"abc"
    kinds = [kind for kind, _ in events]
    assert "fsync" in kinds and "replace" in kinds, events
    assert kinds.index("fsync") < kinds.index("replace"), events
    renamed = events[kinds.index("replace")][1]
    assert ("fsync", renamed) in events[:kinds.index("replace")], "the renamed file was synced first"


def test_download_falls_back_to_next_mirror(file_server, tmp_path):
    root, url, requests = file_server
    sums, arrays = publish(root / "m2")
    (root / "m1").mkdir()  # the first mirror answers 404 for everything
    data = datasets.mnist(cache_dir=str(tmp_path / "cache"),
                          mirrors=[url + "/m1/", url + "/m2/"], checksums=sums)
    np.testing.assert_array_equal(data.test_labels, arrays["test_labels"])
    assert "/m1/train-images-idx3-ubyte.gz" in requests and "/m2/train-images-idx3-ubyte.gz" in requests


def test_download_missing_everywhere(file_server, tmp_path):
    root, url, _ = file_server
    sums, _ = publish(root / "m1")
    os.remove(root / "m1" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetNotFoundError) as info:
        datasets.mnist(cache_dir=str(tmp_path / "cache"), mirrors=[url + "/m1/"], checksums=sums)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte.gz" in message and "404" in message and "--data-dir" in message


def closed_port_url():
    """A URL on 127.0.0.1 that nobody listens on: any download from it fails at once."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/"


def test_download_unreachable_and_download_off(tmp_path):
    # A port nobody listens on: the "offline" case, without touching the internet.
    with pytest.raises(DatasetNotFoundError, match="could not be downloaded.*--data-dir"):
        datasets.mnist(cache_dir=str(tmp_path / "c"), mirrors=[closed_port_url()], timeout=5)
    with pytest.raises(DatasetNotFoundError, match="download=False"):
        datasets.mnist(cache_dir=str(tmp_path / "c"), download=False)


def test_cache_dir_that_cannot_be_created(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("XPNN_CACHE_DIR", str(blocker / "c"))  # below a regular file
    with pytest.raises(DatasetNotFoundError) as info:
        datasets.mnist(mirrors=[closed_port_url()], timeout=5)
    message = str(info.value)
    assert str(blocker / "c" / "mnist") in message and "NotADirectoryError" in message
    assert "XPNN_CACHE_DIR" in message and "--data-dir" in message
    assert "offline" not in message, "the network is not the problem"
    with pytest.raises(datasets.DownloadError, match="cannot create the download directory " + re.escape(str(blocker))):
        datasets.download_file("f.gz", str(blocker / "d"), "0" * 64, [closed_port_url()], timeout=5)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XPNN_CACHE_DIR", str(tmp_path / "xc"))
    assert datasets.default_cache_dir() == str(tmp_path / "xc")
    cache = tmp_path / "xc" / "mnist"
    cache.mkdir(parents=True)
    make_mnist_dir(cache)
    # Cached files whose checksums match are used without any download.
    sums = {name: datasets.sha256_of(cache / name) for name in os.listdir(cache)}
    data = datasets.mnist(download=False, checksums=sums)
    assert data.train_images.shape == (12, 28, 28)


def test_mnist_from_directory(tmp_path):
    arrays = make_mnist_dir(tmp_path, gz=False)
    np.testing.assert_array_equal(datasets.mnist(root=str(tmp_path)).test_images, arrays["test_images"])


# -- the data layer ---------------------------------------------------------------------

def indexed_images(count):
    """Float images whose every pixel holds the sample's index (floats are not rescaled)."""
    return np.repeat(np.arange(count, dtype=np.float64), 4).reshape(count, 2, 2)


def batch_indices(images):
    return np.rint(xpnn.to_numpy(images)[:, 0, 0, 0]).astype(int)


def test_batches_shapes_one_hot_and_scaling(backend32):
    images = np.full((10, 28, 28), 255, dtype=np.uint8)
    images[:, 0, 0] = 51
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], dtype=np.uint8)
    layer = DataLayer(images, labels, 4, shuffle=False)
    batch_images, one_hot = layer.next()
    assert batch_images.shape == (4, 1, 28, 28) and one_hot.shape == (4, 10)
    assert batch_images.dtype == backend32.dtype and one_hot.dtype == backend32.dtype
    assert layer.backend.owns(batch_images) and layer.backend.owns(one_hot)
    host = xpnn.to_numpy(batch_images)
    np.testing.assert_allclose(host[:, 0, 0, 0], 0.2, rtol=1e-6)
    np.testing.assert_allclose(host[:, 0, 1, 1], 1.0)
    np.testing.assert_array_equal(xpnn.to_numpy(one_hot), np.eye(10)[labels[:4]])


def test_float_images_reach_the_batch_without_a_copy(backend):
    # Float images are stored in the backend's dtype: preparing a batch of them casts
    # nothing, so it makes no copy (astype to the dtype they have changes nothing).
    images = np.random.default_rng(0).random((6, 1, 3, 3))
    layer = DataLayer(images, np.arange(6) % 3, 4, shuffle=False)
    stored = layer._train
    rows = stored.images[0:4, ...]
    prepared, one_hot = stored.prepare(rows, stored.labels[0:4])
    assert prepared is rows and one_hot.dtype == backend.dtype
    batch, _ = layer.next()
    np.testing.assert_array_equal(xpnn.to_numpy(batch), images[:4])


def test_each_epoch_covers_every_sample_once(backend):
    count, labels = 23, np.arange(23) % 10
    layer = DataLayer(indexed_images(count), labels, 5, seed=7)
    assert layer.batches_per_epoch == 5
    orders = []
    for epoch in range(3):
        seen = []
        for images, one_hot in layer.epoch_batches():
            indices = batch_indices(images)
            np.testing.assert_array_equal(np.argmax(xpnn.to_numpy(one_hot), axis=1), labels[indices])
            seen.extend(indices)
        assert sorted(seen) == list(range(count)) and layer.epoch == epoch + 1
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2], "every epoch must be reshuffled"
    assert orders[0] != list(range(count))


def test_same_seed_same_batches_and_resume_mid_epoch(backend):
    first = DataLayer(indexed_images(20), np.zeros(20, dtype=int), 6, seed=11)
    second = DataLayer(indexed_images(20), np.zeros(20, dtype=int), 6, seed=11)
    other = DataLayer(indexed_images(20), np.zeros(20, dtype=int), 6, seed=12)
    stream = [batch_indices(first.next()[0]).tolist() for _ in range(6)]
    assert stream == [batch_indices(second.next()[0]).tolist() for _ in range(6)]
    assert stream != [batch_indices(other.next()[0]).tolist() for _ in range(6)]
    # Resume from a state taken mid-epoch: the remaining batches are the same.
    replay = DataLayer(indexed_images(20), np.zeros(20, dtype=int), 6, seed=99)
    probe = DataLayer(indexed_images(20), np.zeros(20, dtype=int), 6, seed=11)
    for _ in range(5):
        probe.next()
    replay.load_state_dict(probe.state_dict())
    assert (replay.epoch, replay.position) == (1, 6)
    assert batch_indices(replay.next()[0]).tolist() == stream[5]


def test_load_state_dict_drops_the_cached_epoch_order(backend):
    # A layer that has drawn its epoch-0 order (seed 1) and then loads a seed-2 state at
    # epoch 0 must continue in seed 2's order, not in the order it had cached.
    def make(seed):
        return DataLayer(indexed_images(20), np.zeros(20, dtype=int), 6, seed=seed)

    seed_one_first = batch_indices(make(1).next()[0]).tolist()
    seed_two_first = batch_indices(make(2).next()[0]).tolist()
    assert seed_one_first != seed_two_first   # (else the test could not tell them apart)
    layer = make(1)
    layer.next()
    layer.load_state_dict(make(2).state_dict())
    assert (layer.seed, layer.epoch, layer.position) == (2, 0, 0)
    assert batch_indices(layer.next()[0]).tolist() == seed_two_first


def test_a_state_of_other_samples_of_the_same_number_is_refused(backend):
    images = indexed_images(20)
    layer = DataLayer(images, np.zeros(20, dtype=int), 6, seed=1)
    same = DataLayer(images.copy(), np.zeros(20, dtype=int), 6, seed=1)
    same.next()
    layer.load_state_dict(same.state_dict())  # the same samples (another copy): taken
    assert layer.position == 6
    for other_images, other_labels in ((images[::-1].copy(), np.zeros(20, dtype=int)),
                                       (images, np.arange(20) % 10)):
        other = DataLayer(other_images, other_labels, 6, seed=1)
        with pytest.raises(ValueError, match="saved state is for other samples"):
            layer.load_state_dict(other.state_dict())
    state = same.state_dict()
    del state["fingerprint"]  # a state saved before fingerprints: the count check only
    layer.load_state_dict(state)
    # Float images: the fingerprint is of the samples as given, not of the backend's dtype.
    floats = np.random.default_rng(4).random((20, 1, 3, 3))
    with xpnn.use_backend("cpu", dtype="float32"):
        single = DataLayer(floats, np.zeros(20, dtype=int), 6, seed=1)
    with xpnn.use_backend("cpu", dtype="float64"):
        DataLayer(floats, np.zeros(20, dtype=int), 6, seed=1).load_state_dict(single.state_dict())


def test_default_seed_follows_numpy_global_seed():
    np.random.seed(5)
    first = DataLayer(indexed_images(8), np.zeros(8, dtype=int), 8).next()[0]
    np.random.seed(5)
    second = DataLayer(indexed_images(8), np.zeros(8, dtype=int), 8).next()[0]
    np.testing.assert_array_equal(batch_indices(first), batch_indices(second))


def test_test_set_and_bad_input(backend):
    layer = DataLayer(indexed_images(4), [0, 1, 2, 3], 2,
                      test_images=np.zeros((3, 28, 28), np.uint8), test_labels=[9, 8, 7])
    images, one_hot = layer.get_test_set()
    assert images.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(xpnn.to_numpy(one_hot), np.eye(10)[[9, 8, 7]])
    with pytest.raises(ValueError, match="no test split"):
        DataLayer(indexed_images(4), [0, 1, 2, 3], 2).get_test_set()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        DataLayer(indexed_images(2), [0, 10], 2)
    with pytest.raises(ValueError, match="expected 2 labels"):
        DataLayer(indexed_images(2), [0, 1, 2], 2)
    with pytest.raises(ValueError, match="batch_size"):
        DataLayer(indexed_images(2), [0, 1], 0)


def _arrays_of(source):
    """A function giving arrays of ``source`` (another backend's) from NumPy arrays, or None
    where that backend cannot run here."""
    from conftest import backend_unavailable_reason

    if source == "strict-device1":
        if backend_unavailable_reason("array-api-strict", "device1") is not None:
            return None
        strict = xpnn.make_backend("array-api-strict", "float64", "device1")
        return strict.asarray
    if backend_unavailable_reason("torch") is not None:
        return None
    import torch
    if source == "torch":
        return torch.asarray
    # Tensors that record autograd (floats only): NumPy cannot read them without detach().
    return lambda host: torch.tensor(host.astype(np.float64), requires_grad=True)


@pytest.mark.parametrize("source", ["strict-device1", "torch", "torch-requires-grad"])
def test_images_and_labels_of_another_backend_give_the_batches_of_numpy_copies(backend, source):
    convert = _arrays_of(source)
    if convert is None:
        pytest.skip(f"{source} cannot run here")
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (11, 4, 4)).astype(np.uint8)
    labels = rng.integers(0, 10, 11)
    test_images, test_labels = images[:3], labels[:3]
    if source == "torch-requires-grad":  # (floats: not rescaled; one-hot labels)
        images, test_images = images / 255.0, test_images / 255.0
        labels, test_labels = np.eye(10)[labels], np.eye(10)[test_labels]
    given = DataLayer(convert(images), convert(labels), 4, seed=5,
                      test_images=convert(test_images), test_labels=convert(test_labels))
    copies = DataLayer(images.copy(), labels.copy(), 4, seed=5,
                       test_images=test_images.copy(), test_labels=test_labels.copy())
    for _ in range(5):  # (two epochs of 3 batches, the last of each 3 samples)
        for mine, theirs in zip(given.next(), copies.next()):
            assert backend.owns(mine) and mine.dtype == theirs.dtype == backend.dtype
            np.testing.assert_array_equal(xpnn.to_numpy(mine), xpnn.to_numpy(theirs))
    assert (given.epoch, given.position) == (copies.epoch, copies.position) == (1, 8)
    for mine, theirs in zip(given.get_test_set(), copies.get_test_set()):
        assert backend.owns(mine)
        np.testing.assert_array_equal(xpnn.to_numpy(mine), xpnn.to_numpy(theirs))
    # (and the NumPy copies' batches are the images scaled to [0, 1], with one-hot labels)
    images_batch, one_hot = copies.get_test_set()
    host_images = images[:3] if images.dtype != np.uint8 else images[:3] / 255.0
    np.testing.assert_allclose(xpnn.to_numpy(images_batch)[:, 0], host_images, rtol=1e-12)
    classes = labels[:3] if labels.ndim == 1 else np.argmax(labels[:3], axis=1)
    np.testing.assert_array_equal(xpnn.to_numpy(one_hot), np.eye(10)[classes])


# -- more IDX and loader checks (each the one thing a test above leaves open) ----------------

def test_bad_magic_in_the_first_byte(tmp_path):
    # 01 00 <type 08> <ndim 1>: the second byte is zero, the first is not; still no IDX file.
    path = write_bytes(tmp_path / "first", bytes([0x01, 0x00, 0x08, 0x01]) + struct.pack(">I", 3)
                       + b"\x01\x02\x03")
    expect_idx_error(path, "not an IDX file", "0x01 0x00")


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_data_one_byte_short_is_reported_as_truncated(tmp_path, gz):
    # 2 x 3 int16 values = 12 data bytes; the file holds 11.
    payload = idx_bytes(0x0B, (2, 3), bytes(11))
    expect_idx_error(write_bytes(tmp_path / "short", payload, gz), "truncated", "12 data bytes", "only 11")


def test_gzip_with_a_wrong_crc_is_an_idx_error(tmp_path):
    # Complete gzip data whose CRC-32 (the trailer's first 4 bytes, RFC 1952) does not match:
    # corrupt, not truncated.
    compressed = gzip.compress(idx_bytes(0x08, (3,), b"\x01\x02\x03"))
    broken = compressed[:-8] + bytes([compressed[-8] ^ 0xFF]) + compressed[-7:]
    path = tmp_path / "crc.gz"
    path.write_bytes(broken)
    expect_idx_error(path, "gzip data is truncated or corrupt")


def test_read_idx_returns_a_writable_array_of_its_own(tmp_path):
    # Callers may normalize in place: the array must not be a read-only view of the file's bytes.
    path = write_bytes(tmp_path / "labels", idx_bytes(0x08, (3,), b"\x07\x00\x09"))
    labels = read_idx(path)
    labels[0] = 1
    labels *= 2
    np.testing.assert_array_equal(labels, [2, 0, 18])
    np.testing.assert_array_equal(read_idx(path), [7, 0, 9])


def test_write_rejects_a_0d_array(tmp_path):
    with pytest.raises(ValueError, match="1 to 255 dimensions"):
        write_idx(tmp_path / "scalar", np.uint8(3))
    assert not (tmp_path / "scalar").exists()


def test_gzipped_idx_files_are_byte_for_byte_reproducible(tmp_path):
    # The gzip header's MTIME (bytes 4-7, RFC 1952) is 0: the same array gives the same bytes,
    # so a published file's SHA-256 does not depend on when it was written.
    write_idx(tmp_path / "a.gz", np.arange(5, dtype=np.uint8))
    raw = (tmp_path / "a.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\x00\x00\x00\x00"


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_mnist_format_finds_names_spelled_with_a_dot(tmp_path, gz):
    # Some copies name the files train-images.idx3-ubyte (a dot before "idx").
    (tmp_path / "dashed").mkdir()
    arrays = make_mnist_dir(tmp_path / "dashed", gz=gz)
    (tmp_path / "dotted").mkdir()
    suffix = ".gz" if gz else ""
    for stem in datasets.MNIST_FILES.values():
        os.rename(tmp_path / "dashed" / (stem + suffix),
                  tmp_path / "dotted" / (stem.replace("-idx", ".idx") + suffix))
    assert os.path.exists(tmp_path / "dotted" / ("train-images.idx3-ubyte" + suffix))
    data = load_mnist_format(tmp_path / "dotted")
    for role, expected in arrays.items():
        np.testing.assert_array_equal(getattr(data, role), expected)


def test_images_without_rows_and_columns_are_rejected(tmp_path):
    make_mnist_dir(tmp_path, n_train=4, n_test=2)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 784), dtype=np.uint8))
    with pytest.raises(IdxError, match=r"train-images-idx3-ubyte.gz: expected uint8 images of shape "
                                       r"\(n, rows, columns\), got uint8 of shape \(4, 784\)"):
        load_mnist_format(tmp_path)


def test_labels_of_another_type_are_rejected(tmp_path):
    make_mnist_dir(tmp_path, n_train=4, n_test=2)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2], dtype=np.int16))
    with pytest.raises(IdxError, match=r"t10k-labels-idx1-ubyte.gz: expected uint8 labels of shape "
                                       r"\(n,\), got int16"):
        load_mnist_format(tmp_path)


def test_label_10_is_out_of_range_and_9_is_not(tmp_path):
    make_mnist_dir(tmp_path, n_test=6)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 9, 9], dtype=np.uint8))
    np.testing.assert_array_equal(load_mnist_format(tmp_path).test_labels, [0, 1, 2, 3, 9, 9])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 9, 10], dtype=np.uint8))
    with pytest.raises(IdxError, match=r"label 10 is out of range"):
        load_mnist_format(tmp_path)


def test_a_corrupt_cached_file_is_downloaded_again(file_server, tmp_path):
    root, url, requests = file_server
    sums, arrays = publish(root / "m1")
    cache = tmp_path / "cache"
    cache.mkdir()
    good = (root / "m1" / "t10k-images-idx3-ubyte.gz").read_bytes()
    (cache / "t10k-images-idx3-ubyte.gz").write_bytes(good[:len(good) // 2])  # a torn earlier copy
    data = datasets.mnist(cache_dir=str(cache), mirrors=[url + "/m1/"], checksums=sums)
    np.testing.assert_array_equal(data.test_images, arrays["test_images"])
    assert (cache / "t10k-images-idx3-ubyte.gz").read_bytes() == good
    assert "/m1/t10k-images-idx3-ubyte.gz" in requests


def test_download_falls_back_when_a_mirror_serves_other_bytes(file_server, tmp_path):
    root, url, requests = file_server
    sums, arrays = publish(root / "good")
    publish(root / "stale", seed=1)  # the same names, other bytes: every checksum fails there
    cache = tmp_path / "cache"
    data = datasets.mnist(cache_dir=str(cache), mirrors=[url + "/stale/", url + "/good/"], checksums=sums)
    np.testing.assert_array_equal(data.train_labels, arrays["train_labels"])
    assert "/stale/train-images-idx3-ubyte.gz" in requests and "/good/train-images-idx3-ubyte.gz" in requests
    for name, digest in sums.items():
        assert hashlib.sha256((cache / name).read_bytes()).hexdigest() == digest
    assert leftovers(cache) == []


def test_default_cache_dir_follows_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("XPNN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.default_cache_dir() == os.path.join(str(tmp_path / "xdg"), "xpnn")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.default_cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "xpnn")


def test_a_saved_position_outside_the_epoch_is_refused(backend):
    layer = DataLayer(indexed_images(20), np.zeros(20, dtype=int), 6, seed=1)
    for position in (20, -1):
        state = layer.state_dict()
        state["position"] = position
        with pytest.raises(ValueError, match=rf"saved position {position} is outside \[0, 20\)"):
            layer.load_state_dict(state)
    assert (layer.epoch, layer.position) == (0, 0)


def test_default_seed_differs_with_numpy_global_seed():
    orders = []
    for global_seed in (5, 6):
        np.random.seed(global_seed)
        layer = DataLayer(indexed_images(20), np.zeros(20, dtype=int), 20)
        orders.append(batch_indices(layer.next()[0]).tolist())
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(20))
    assert orders[0] != orders[1], "the default seed must come from NumPy's global generator"


def test_one_hot_labels_give_the_same_batches_as_class_indices(backend):
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
    as_indices = DataLayer(indexed_images(12), labels, 5, seed=2)
    as_one_hot = DataLayer(indexed_images(12), np.eye(10)[labels].astype(np.uint8), 5, seed=2)
    for _ in range(3):
        (images, one_hot), (other_images, other_one_hot) = as_indices.next(), as_one_hot.next()
        indices = batch_indices(images)
        np.testing.assert_array_equal(batch_indices(other_images), indices)
        np.testing.assert_array_equal(xpnn.to_numpy(one_hot), np.eye(10)[labels[indices]])
        np.testing.assert_array_equal(xpnn.to_numpy(other_one_hot), np.eye(10)[labels[indices]])
