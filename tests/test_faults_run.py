"""``xpnn-train`` under faults of the run itself: a NaN reaching the loss, SIGTERM, a second run
on the same ``--out``, a full disk. Real subprocesses receive the signals and hold the locks; a
real small file system (a tmpfs, mounted where the tests may) runs out of room."""
import contextlib
import errno
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from xpnn import checkpoint as ckpt
from xpnn import training
from xpnn.train import LOCK_FILE, main
from test_train_cli_errors import write_mnist_dir

pytestmark = pytest.mark.faults
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Four steps of 32 per epoch, float64 (exact resumes compare arrays bit for bit).
SMALL = ("--limit-train", "128", "--limit-test", "64", "--batch-size", "32", "--dtype", "float64",
         "--no-progress")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_mnist_dir(tmp_path_factory.mktemp("faults-mnist"), n_train=128, n_test=64)


def command(data_dir, out, *extra):
    return [sys.executable, "-m", "xpnn.train", "--backend", "cpu", "--dataset", "mnist",
            "--data-dir", str(data_dir), "--out", str(out), *extra]


def environment():
    env = dict(os.environ)
    env.pop("XPNN_BACKEND", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(data_dir, out, *extra):
    return subprocess.run(command(data_dir, out, *extra), cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def started(data_dir, out, *extra):
    """A training subprocess, once it has printed its start line (its lock is held by then)."""
    process = subprocess.Popen(command(data_dir, out, *extra), cwd=REPO, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line = process.stdout.readline()
        assert first_line.startswith("xpnn-train:"), first_line + process.stderr.read()
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=60)


def arrays_of(out):
    with np.load(os.path.join(out, ckpt.MODEL_FILE), allow_pickle=False) as stored:
        return {key: stored[key] for key in stored.files if key != ckpt.META_KEY}


def files_of(out):
    """Every file in ``out`` but the lock's (which holds the running process's id)."""
    out = pathlib.Path(out)
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out))
            if name != LOCK_FILE}


# -- a NaN reaches the loss ---------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", [("numpy", "cpu"), ("strict", "array-api-strict"),
                                     ("torch", "torch")], ids=lambda backend: backend[0])
def test_a_nan_pixel_stops_training_at_the_loss_and_keeps_the_last_good_checkpoint(
        backend, data_dir, tmp_path, monkeypatch, capsys):
    # (backend: (column of the faults table, --backend); every backend the CPU has.)
    if backend[1] == "torch":
        pytest.importorskip("torch")
    out = tmp_path / "run"
    args = ["--backend", backend[1], "--dataset", "mnist", "--data-dir", data_dir, "--out", str(out),
            *SMALL, "--log-every", "1"]
    assert main(args + ["--epochs", "1"]) == 0
    good = files_of(out)
    real_step, steps = training.train_step, []

    def nan_pixel_at_the_second_step(net, images, one_hot, *rest):
        steps.append(1)
        if len(steps) == 2:  # one pixel of one image of the batch
            host = net.backend.to_numpy(images).copy()
            host[7, 0, 14, 14] = np.nan
            images = net.backend.asarray(host)
        return real_step(net, images, one_hot, *rest)

    monkeypatch.setattr(training, "train_step", nan_pixel_at_the_second_step)
    capsys.readouterr()
    assert main(args + ["--resume", "--epochs", "3"]) == 3
    err = capsys.readouterr().err
    # Stopped by the loss (NaN through ReLU) at that step, not by the parameters at the epoch's end.
    assert "the training loss became nan in epoch 2 within steps 2-2" in err, err
    assert f"the last good checkpoint (after epoch 1) is kept in {out}" in err, err
    assert files_of(out) == good


# -- SIGTERM --------------------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint_exits_143_and_resume_continues_exactly(data_dir, tmp_path):
    out = tmp_path / "terminated"
    with started(data_dir, out, *SMALL, "--epochs", "1000") as process:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "xpnn-train: SIGTERM: stopping after this step" in stderr, stderr
    assert f"xpnn-train: SIGTERM: checkpoint saved in {out}" in stderr, stderr
    state = ckpt.read_checkpoint(str(out))[0]["resume"]
    epochs = state["epochs_completed"] + 1
    reference = tmp_path / "straight"
    assert run_cli(data_dir, reference, *SMALL, "--epochs", str(epochs)).returncode == 0
    resumed = run_cli(data_dir, out, "--resume", "--epochs", str(epochs), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    expected = arrays_of(reference)
    found = arrays_of(out)
    assert sorted(found) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(found[key], expected[key], err_msg=key)


# -- one run per directory ---------------------------------------------------------------------

def test_a_second_run_on_the_same_out_exits_2_naming_the_directory_and_process(data_dir, tmp_path):
    out = tmp_path / "shared"
    with started(data_dir, out, *SMALL, "--epochs", "1000") as first:
        for extra in ((), ("--resume",), ("--overwrite",)):
            second = run_cli(data_dir, out, *SMALL, "--epochs", "2", *extra)
            assert second.returncode == 2, (extra, second.stderr)
            assert (f"xpnn-train: error: {out} is in use by another xpnn-train run "
                    f"(process {first.pid})") in second.stderr, second.stderr
            assert "epoch" not in second.stdout
        # kill -9: the kernel drops the lock with the process; nothing stale stays behind.
        first.kill()
        first.wait(timeout=60)
    after = run_cli(data_dir, out, *SMALL, "--epochs", "1", "--overwrite")
    assert after.returncode == 0, after.stderr


# -- a full disk ------------------------------------------------------------------------------

@pytest.fixture
def small_disk():
    """Mount a tmpfs of a given size (root only); yields ``mount(size) -> path``; unmounts."""
    mounted = []

    def mount(size):
        directory = tempfile.mkdtemp(prefix="xpnn-small-disk-")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", directory],
                                capture_output=True, text=True)
        if result.returncode != 0:
            os.rmdir(directory)
            pytest.skip(f"cannot mount a small tmpfs here to fill up (mount says: "
                        f"{result.stderr.strip() or result.returncode}); run as root to test a "
                        f"full disk")
        mounted.append(directory)
        return directory

    try:
        yield mount
    finally:
        for directory in mounted:
            subprocess.run(["umount", directory], check=False)
            os.rmdir(directory)


def test_a_disk_without_room_for_the_checkpoint_is_refused_before_training(
        small_disk, data_dir, tmp_path, capsys):
    out = os.path.join(small_disk("1m"), "run")
    assert main(["--dataset", "mnist", "--data-dir", data_dir, "--out", out, *SMALL]) == 1
    captured = capsys.readouterr()
    found = re.search(r"xpnn-train: error: \[Errno 28\] no space left on the device of (\S+): "
                      r"the checkpoint \((\d+) bytes\), a second, temporary copy and the metrics "
                      r"and plot need (\d+) bytes, (\d+) are free; nothing was trained: '(\S+)'; "
                      r"free some space there, or choose another --out", captured.err)
    assert found, captured.err
    assert found[1] == out and found[5] == out
    size, needed, free = int(found[2]), int(found[3]), int(found[4])
    # LeNet's ~108,000 parameters, Adam's two moments for each, in float64: ~2.6 MB.
    assert 2_500_000 < size < 2_800_000 and needed >= 2 * size and free < needed
    assert "epoch" not in captured.out and not os.path.exists(os.path.join(out, ckpt.MODEL_FILE))


def test_a_save_on_a_full_disk_names_the_file_and_room_and_keeps_the_checkpoint(
        small_disk, data_dir, tmp_path, monkeypatch, capsys):
    disk = small_disk("16m")
    out = os.path.join(disk, "run")
    kept = {}
    real_write_plot = training.write_plot

    def fill_the_disk_after_epoch_1(directory, metrics, title):
        real_write_plot(directory, metrics, title)
        if len(metrics) == 1:  # (the checkpoint of epoch 1 is saved by now)
            kept.update(files_of(out))
            with open(os.path.join(disk, "filler"), "wb") as filler:
                free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                filler.write(b"\0" * max(0, free - 64 * 1024))

    monkeypatch.setattr(training, "write_plot", fill_the_disk_after_epoch_1)
    assert main(["--dataset", "mnist", "--data-dir", data_dir, "--out", out, *SMALL,
                 "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    path = os.path.join(out, ckpt.MODEL_FILE)
    found = re.search(r"no space left on the device of (\S+): its temporary copy needs (\d+) "
                      r"bytes, (\d+) are free; model\.npz is unchanged: '(\S+)'; free some space "
                      r"there, or choose another --out", err)
    assert found, err
    assert found[1] == out and found[4] == path and int(found[2]) > int(found[3])
    assert files_of(out) == kept  # epoch 1's checkpoint, whole; no temporary left
    assert ckpt.read_checkpoint(out)[0]["resume"]["epochs_completed"] == 1


# -- a full disk, simulated (wherever no tmpfs can be mounted) -----------------------------------

def test_a_write_that_finds_the_disk_full_keeps_the_old_file_and_says_how_much_room(
        tmp_path, monkeypatch):
    from xpnn import _files

    target = tmp_path / "model.npz"
    target.write_bytes(b"previous")

    def full(descriptor):  # (where a network file system reports it: at the flush to disk)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        _files.atomic_write_bytes(str(target), b"x" * 5000)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert f"no space left on the device of {tmp_path}: its temporary copy needs 5000 bytes, " \
        in message and "model.npz is unchanged" in message, message
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model.npz"]


def test_too_little_free_room_is_refused_before_training_with_the_numbers(
        data_dir, tmp_path, monkeypatch, capsys):
    from xpnn import train_checks

    monkeypatch.setattr(train_checks, "free_bytes", lambda path: 123_456)
    out = tmp_path / "run"
    assert main(["--dataset", "mnist", "--data-dir", data_dir, "--out", str(out), *SMALL]) == 1
    captured = capsys.readouterr()
    assert re.search(rf"no space left on the device of {re.escape(str(out))}: the checkpoint "
                     r"\(\d+ bytes\), a second, temporary copy and the metrics and plot need \d+ "
                     r"bytes, \d+ are free; nothing was trained", captured.err), captured.err
    assert "epoch" not in captured.out and not (out / ckpt.MODEL_FILE).exists()
