"""``xpnn-train``'s errors: each bad input stops with a clear message, before any training.

The command runs in process through ``main(argv)`` on tiny MNIST-format data
sets that the tests write with ``write_idx`` (a few dozen images): no
download, no Fashion-MNIST package.
"""
import os

import numpy as np
import pytest

from xpnn import checkpoint as ckpt
from xpnn.datasets import MNIST_FILES, write_idx
from xpnn.train import main

# Tiny runs: two training steps of 32 images, one evaluation batch.
TINY = ("--limit-train", "64", "--limit-test", "32", "--batch-size", "32", "--no-progress")


def write_mnist_dir(directory, n_train=64, n_test=32, test_side=28, seed=0):
    """Write the four IDX files of a random MNIST-format data set; return the directory."""
    rng = np.random.default_rng(seed)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
              "test_images": rng.integers(0, 256, (n_test, test_side, test_side), dtype=np.uint8),
              "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8)}
    os.makedirs(directory, exist_ok=True)
    for role, array in arrays.items():
        write_idx(os.path.join(directory, MNIST_FILES[role] + ".gz"), array)
    return str(directory)


def train(data_dir, out, *extra):
    """Run ``xpnn-train`` in process on the CPU; return its exit status."""
    return main(["--backend", "cpu", "--dataset", "mnist", "--data-dir", str(data_dir),
                 "--out", str(out), *extra])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_mnist_dir(tmp_path_factory.mktemp("tiny-mnist"))


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """A one-epoch run's output directory (its files are copied, never changed, by the tests)."""
    out = tmp_path_factory.mktemp("finished")
    assert train(data_dir, out, *TINY) == 0
    return out


def file_bytes(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def copy_run(source, destination):
    destination.mkdir()
    for name, payload in file_bytes(source).items():
        (destination / name).write_bytes(payload)
    return destination


# -- a. a corrupt checkpoint ----------------------------------------------------------------

def truncated(payload):
    return payload[:len(payload) // 2]


def emptied(payload):
    return b""


def one_byte_flipped(payload):
    # The middle of model.npz lies inside an array's stored bytes: the zip's CRC catches it.
    middle = len(payload) // 2
    return payload[:middle] + bytes([payload[middle] ^ 0xFF]) + payload[middle + 1:]


@pytest.mark.parametrize("corrupt", [truncated, emptied, one_byte_flipped])
def test_corrupt_checkpoint_is_a_checkpoint_error_naming_file_and_fix(
        corrupt, data_dir, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    model = out / ckpt.MODEL_FILE
    model.write_bytes(corrupt(model.read_bytes()))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_model(str(out))
    assert str(model) in str(info.value) and "--overwrite" in str(info.value)
    capsys.readouterr()
    assert train(data_dir, out, "--resume", "--epochs", "2", "--no-progress") == 1
    captured = capsys.readouterr()
    assert str(model) in captured.err and "--overwrite" in captured.err, captured.err
    assert "epoch" not in captured.out, "nothing may train on a corrupt checkpoint"


# -- b. test images of another size -------------------------------------------------------

def test_test_images_of_another_size_stop_before_training(tmp_path, capsys):
    data = write_mnist_dir(tmp_path / "mixed", test_side=32)
    out = tmp_path / "run"
    assert train(data, out, *TINY) == 1
    captured = capsys.readouterr()
    assert data in captured.err and "test files hold 32 x 32" in captured.err, captured.err
    assert captured.out == "", "no training may start"
    assert not (out / ckpt.MODEL_FILE).exists()


def test_empty_training_files_stop_before_training(tmp_path, capsys):
    data = write_mnist_dir(tmp_path / "empty", n_train=0)
    out = tmp_path / "run"
    assert train(data, out, "--no-progress") == 1
    captured = capsys.readouterr()
    assert os.path.join(data, "train-images-idx3-ubyte.gz") in captured.err, captured.err
    assert "declares 0 images" in captured.err and "--data-dir" in captured.err
    assert captured.out == "" and not out.exists()


def test_mnist_cache_that_cannot_be_created_names_it_and_the_fix(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    # Below a regular file: creating the cache fails before any download is tried.
    monkeypatch.setenv("XPNN_CACHE_DIR", str(blocker / "c"))
    out = tmp_path / "run"
    assert main(["--backend", "cpu", "--dataset", "mnist", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(blocker / "c" / "mnist") in err and "XPNN_CACHE_DIR" in err and "--data-dir" in err, err
    assert not out.exists()


# -- c. an --out that cannot be written -----------------------------------------------------

@pytest.mark.parametrize("below", [False, True], ids=["out-is-a-file", "out-below-a-file"])
def test_unwritable_out_stops_before_training(below, data_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a directory")
    out = blocker / "run" if below else blocker  # NotADirectoryError / FileExistsError
    assert train(data_dir, out, *TINY) == 1
    captured = capsys.readouterr()
    assert str(blocker) in captured.err and "--out" in captured.err, captured.err
    assert captured.out == "", "no training may start"
    assert blocker.read_bytes() == b"not a directory"


# -- d. a bad --seed or --device ---------------------------------------------------------------

@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_out_of_range_is_a_usage_error(seed, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--seed", seed, "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2
    assert "--seed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_device_the_backend_lacks_is_a_usage_error(data_dir, tmp_path, capsys):
    assert train(data_dir, tmp_path / "run", "--device", "1", *TINY) == 2
    err = capsys.readouterr().err
    assert "the cpu backend has only the device 'cpu', not '1'" in err, err
    assert not (tmp_path / "run").exists()


# -- e. --overwrite, then the new run diverges ------------------------------------------------

def test_overwrite_then_divergence_says_the_previous_checkpoint_is_kept(
        data_dir, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = file_bytes(out)
    # A learning rate of 1e10 makes the loss non-finite within the first epoch (as in
    # test_train_cli's divergence test); --log-every 1 checks it after every step.
    assert train(data_dir, out, *TINY, "--overwrite", "--lr", "1e10", "--log-every", "1") == 3
    err = capsys.readouterr().err
    assert "this run wrote no checkpoint" in err and "previous run's, unchanged" in err, err
    assert file_bytes(out) == before


# -- f. resume on a data set of another size ---------------------------------------------------

@pytest.mark.parametrize("other, expected", [
    ({"n_train": 96}, ("64 samples", "96")),  # more images
    ({"seed": 1}, ("other samples",)),         # as many images, other ones
], ids=["more-images", "same-number"])
def test_resume_on_other_data_is_a_usage_error(tmp_path, capsys, other, expected):
    out = tmp_path / "run"
    assert train(write_mnist_dir(tmp_path / "first", n_train=64, seed=0), out, "--batch-size", "32",
                 "--no-progress") == 0
    before = file_bytes(out)
    capsys.readouterr()
    assert train(write_mnist_dir(tmp_path / "other", **other), out, "--resume", "--epochs", "2",
                 "--no-progress") == 2
    err = capsys.readouterr().err
    assert all(text in err for text in expected), err
    assert "resume with the data the run started with" in err, err
    assert file_bytes(out) == before


def test_an_unreadable_random_state_in_the_checkpoint_is_a_clear_error(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    assert train(write_mnist_dir(tmp_path / "data"), out, "--batch-size", "32", "--no-progress") == 0
    stored = dict(np.load(out / "model.npz", allow_pickle=False))
    meta = json.loads(str(stored["__meta__"]))
    meta["resume"]["numpy_random"]["name"] = "PCG64"  # not a state set_state takes
    stored["__meta__"] = np.asarray(json.dumps(meta, sort_keys=True))
    np.savez(out / "model.npz", **stored)
    capsys.readouterr()
    assert train(tmp_path / "data", out, "--resume", "--epochs", "2", "--no-progress") == 1
    err = capsys.readouterr().err
    assert f"{out / 'model.npz'}: its training state is damaged: numpy_random.name is 'PCG64', " \
        "expected 'MT19937'" in err, err


# -- g. torch: an epoch-end resume equals the uninterrupted run --------------------------------

def test_torch_resume_at_epoch_end_equals_uninterrupted_bit_for_bit(data_dir, tmp_path):
    pytest.importorskip("torch", reason="PyTorch is not installed (pip install \"xpnn[torch]\")")
    torch_run = ("--backend", "torch", "--dataset", "mnist", "--data-dir", data_dir, *TINY)
    # Dropout is on by default: its masks come from PyTorch's own generator.
    assert main([*torch_run, "--out", str(tmp_path / "straight"), "--epochs", "2"]) == 0
    assert main([*torch_run, "--out", str(tmp_path / "resumed"), "--epochs", "1"]) == 0
    assert main(["--backend", "torch", "--dataset", "mnist", "--data-dir", data_dir, "--no-progress",
                 "--out", str(tmp_path / "resumed"), "--resume", "--epochs", "2"]) == 0
    straight_meta, straight = ckpt.read_checkpoint(str(tmp_path / "straight"))
    resumed_meta, resumed = ckpt.read_checkpoint(str(tmp_path / "resumed"))
    assert straight_meta["architecture"]["options"]["dropout"]
    assert straight_meta["resume"]["epochs_completed"] == resumed_meta["resume"]["epochs_completed"] == 2
    assert sorted(straight) == sorted(resumed)
    for key in straight:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)


# -- f. what a user meant: the option to change, the backend first, nothing to train ----------

def test_a_locked_switch_on_resume_is_named_as_written(data_dir, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    assert train(data_dir, out, "--resume", "--no-dropout", *TINY) == 2
    err = capsys.readouterr().err
    assert "--no-dropout differs from the checkpoint's --dropout" in err, err


def test_a_device_the_backend_lacks_is_named_before_an_existing_checkpoint(
        data_dir, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    assert train(data_dir, out, "--device", "1", *TINY) == 2
    err = capsys.readouterr().err
    assert "only the device 'cpu'" in err and "already holds" not in err, err


def test_an_os_error_names_the_option_its_path_came_from(tmp_path):
    # (Root reads every file here, so the error is made directly: the hint is what is tested.)
    import argparse
    import errno

    from xpnn.train import _path_hint

    args = argparse.Namespace(out=str(tmp_path / "run"), data_dir=str(tmp_path / "data"))
    for path, option in ((tmp_path / "data" / "x.gz", "--data-dir"),
                         (tmp_path / "run" / "model.npz", "--out"), (tmp_path / "run", "--out")):
        hint = _path_hint(OSError(errno.EACCES, "Permission denied", str(path)), args)
        assert hint.endswith(f"choose another {option}"), (path, hint)
    assert "--" not in _path_hint(OSError(errno.EACCES, "denied", str(tmp_path / "runs")), args)
    from xpnn._files import atomic_write_bytes

    with pytest.raises(OSError) as failed:  # a checkpoint write that fails names its file
        atomic_write_bytes(str(tmp_path / "run" / "gone" / "model.npz"), b"")
    assert _path_hint(failed.value, args).endswith("choose another --out")
    assert _path_hint(OSError("no path"), args) == ""


def test_resume_of_a_finished_run_says_there_is_nothing_to_train(
        data_dir, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = file_bytes(out)
    assert train(data_dir, out, "--resume", *TINY) == 0
    captured = capsys.readouterr()
    assert "nothing to train" in captured.err and "--epochs" in captured.err, captured.err
    assert captured.out.startswith("test accuracy "), captured.out
    assert "resuming" not in captured.out
    assert file_bytes(out) == before


# -- g. a stop between two pulls of the loss ----------------------------------------------------

def test_a_stop_between_loss_pulls_keeps_the_epochs_loss_bit_for_bit(tmp_path, monkeypatch):
    # The loss is summed on the device (float32 here) and pulled every --log-every steps. A stop
    # at step 5 of 16 with pulls every 4 steps, resumed with pulls every 50, must not make the
    # epoch's loss a sum of other partial sums (float32 rounds those differently): the metrics
    # must equal an uninterrupted run's.
    import json
    import signal

    from xpnn import training

    data = write_mnist_dir(tmp_path / "data", n_train=512)
    run = ("--limit-train", "512", "--batch-size", "32", "--log-every", "4", "--dtype", "float32",
           "--no-progress", "--limit-test", "32")
    assert train(data, tmp_path / "straight", *run) == 0
    real_step, steps = training.train_step, []

    def step_then_ctrl_c(*args):
        result = real_step(*args)
        steps.append(1)
        if len(steps) == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the run's own handler: stop after this step
        return result

    monkeypatch.setattr(training, "train_step", step_then_ctrl_c)
    assert train(data, tmp_path / "stopped", *run) == 130
    assert ckpt.read_checkpoint(str(tmp_path / "stopped"))[0]["resume"]["partial_epoch"]["steps"] == 5
    monkeypatch.setattr(training, "train_step", real_step)
    assert train(data, tmp_path / "stopped", "--resume", "--no-progress") == 0
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text())["epochs"][0]
               for name in ("straight", "stopped")}
    for key in ("train_loss", "train_accuracy", "test_accuracy"):
        assert metrics["stopped"][key] == metrics["straight"][key], key
    straight, stopped = (ckpt.read_checkpoint(str(tmp_path / name))[1] for name in ("straight", "stopped"))
    for name in straight:
        np.testing.assert_array_equal(stopped[name], straight[name], err_msg=name)


def test_resume_with_fewer_epochs_than_done_and_a_partial_one_trains_nothing(tmp_path, monkeypatch,
                                                                             capsys):
    import signal

    from xpnn import training

    data = write_mnist_dir(tmp_path / "data", n_train=128)
    real_step, steps = training.train_step, []

    def step_then_ctrl_c(*args):
        result = real_step(*args)
        steps.append(1)
        if len(steps) == 6:  # epoch 2, step 2 (4 steps an epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(training, "train_step", step_then_ctrl_c)
    out = tmp_path / "run"
    assert train(data, out, "--epochs", "3", "--limit-train", "128", "--limit-test", "32",
                 "--batch-size", "32", "--no-progress") == 130
    monkeypatch.setattr(training, "train_step", real_step)
    before = file_bytes(out)
    capsys.readouterr()
    assert train(data, out, "--resume", "--epochs", "1", "--no-progress") == 0
    captured = capsys.readouterr()
    assert "nothing to train" in captured.err and "resuming" not in captured.out, captured
    assert file_bytes(out) == before


def test_a_carried_loss_sum_continues_in_the_backends_dtype():
    # (A Python float would make the rest of the epoch's sum float64 under NumPy 1.x rules.)
    from xpnn.backend import make_backend
    from xpnn.training import Window

    backend = make_backend("cpu", "float32")
    window = Window(backend, 0.1)
    assert not isinstance(window.loss, float)
    assert backend.to_numpy(window.loss).dtype == np.float32
    assert float(backend.to_numpy(window.loss)) == float(np.float32(0.1))


# -- h. what the training loop itself must get right ------------------------------------------

def test_an_infinite_loss_stops_training_like_nan(tmp_path, monkeypatch, capsys):
    # The loss check is for NaN *and* infinity (exit status 3); the step's parameters stay finite
    # here, so only the loss check can stop the run.
    from xpnn import training

    data = write_mnist_dir(tmp_path / "data")
    real_step, steps = training.train_step, []

    def infinite_second_loss(*args):
        loss, correct = real_step(*args)
        steps.append(1)
        return (loss + float("inf") if len(steps) == 2 else loss), correct

    monkeypatch.setattr(training, "train_step", infinite_second_loss)
    out = tmp_path / "run"
    assert train(data, out, *TINY, "--log-every", "1") == 3
    err = capsys.readouterr().err
    assert "the training loss became inf in epoch 1 within steps 2-2" in err, err
    assert "no checkpoint was written" in err, err
    assert not (out / ckpt.MODEL_FILE).exists() and not (out / "metrics.json").exists()


def test_each_epoch_trains_on_every_training_image_once_in_full_and_short_batches(tmp_path, monkeypatch):
    # 40 images in batches of 16: every epoch is 16 + 16 + 8 images, each image exactly once,
    # and the second epoch starts with a batch of its own (nothing taken ahead into it).
    from xpnn import training
    from xpnn.datasets import load_mnist_format

    data = write_mnist_dir(tmp_path / "data", n_train=64)
    train_images = load_mnist_format(data).train_images[:40]
    index_of = {image.tobytes(): index for index, image in enumerate(train_images)}
    assert len(index_of) == 40
    real_step, batches = training.train_step, []

    def recorded(net, images, *rest):
        host = np.rint(net.backend.to_numpy(images)[:, 0] * 255).astype(np.uint8)
        batches.append([index_of[image.tobytes()] for image in host])
        return real_step(net, images, *rest)

    monkeypatch.setattr(training, "train_step", recorded)
    assert train(data, tmp_path / "run", "--epochs", "2", "--limit-train", "40", "--limit-test", "32",
                 "--batch-size", "16", "--log-every", "1", "--no-progress") == 0
    assert [len(batch) for batch in batches] == [16, 16, 8, 16, 16, 8]
    for epoch in (batches[:3], batches[3:]):
        assert sorted(index for batch in epoch for index in batch) == list(range(40))
    assert batches[:3] != batches[3:], "every epoch is reshuffled"


def test_the_epochs_train_loss_and_accuracy_are_per_image_over_the_whole_epoch(tmp_path):
    # With a learning rate of 1e-30 the weights do not move, and without batch norm and dropout a
    # training step predicts what the saved model predicts: the epoch's train loss must be the
    # mean cross-entropy -log(p[label]) per image and its accuracy the fraction of arg-max hits,
    # both over all 64 images of the 4 steps, computed here from the saved model.
    import json

    import xpnn

    data = write_mnist_dir(tmp_path / "data", n_train=64)
    out = tmp_path / "run"
    assert train(data, out, "--limit-train", "64", "--limit-test", "32", "--batch-size", "16",
                 "--no-batch-norm", "--no-dropout", "--lr", "1e-30", "--dtype", "float64",
                 "--log-every", "1", "--no-progress") == 0
    entry = json.loads((out / "metrics.json").read_text())["epochs"][0]
    from xpnn.datasets import load_mnist_format
    mnist = load_mnist_format(data)
    with xpnn.use_backend("cpu", dtype="float64"):
        net = ckpt.load_model(str(out))
        prediction = xpnn.to_numpy(net.test(mnist.train_images[:, None, :, :] / 255.0))
    labels = mnist.train_labels.astype(int)
    np.testing.assert_allclose(prediction.sum(axis=1), 1.0, rtol=1e-12)
    expected_loss = np.mean(-np.log(prediction[np.arange(64), labels] + np.finfo(np.float64).eps))
    expected_accuracy = np.mean(np.argmax(prediction, axis=1) == labels)
    assert 0 < expected_accuracy < 1   # (else the count could be right by accident)
    assert entry["train_loss"] == pytest.approx(expected_loss, rel=1e-9)
    assert entry["train_accuracy"] == pytest.approx(expected_accuracy, abs=1e-12)
    assert entry["images_per_second"] == pytest.approx(64 / entry["seconds"], rel=1e-9)


def test_the_documented_defaults_are_the_ones_a_run_uses(data_dir, tmp_path):
    # --help: 1 epoch, batch 64, lr 5e-4, batch norm and dropout on, keep probability 0.8,
    # float32, seed 0. A run without those options records them and trains as --seed 0 does.
    import json

    few = ("--limit-train", "64", "--limit-test", "32", "--no-progress")
    assert train(data_dir, tmp_path / "defaults", *few) == 0
    settings = json.loads((tmp_path / "defaults" / "metrics.json").read_text())["settings"]
    expected = {"epochs": 1, "batch_size": 64, "lr": 5e-4, "batch_norm": True, "dropout": True,
                "keep_probability": 0.8, "dtype": "float32", "seed": 0}
    assert {key: settings[key] for key in expected} == expected
    assert train(data_dir, tmp_path / "seed0", *few, "--seed", "0") == 0
    assert train(data_dir, tmp_path / "seed1", *few, "--seed", "1") == 0
    default, seed0, seed1 = (ckpt.read_checkpoint(str(tmp_path / name))[1]
                             for name in ("defaults", "seed0", "seed1"))
    for name in default:
        np.testing.assert_array_equal(default[name], seed0[name], err_msg=name)
    assert any(not np.array_equal(default[name], seed1[name]) for name in default)


@pytest.mark.parametrize("changed, saved", [
    (("--seed", "1"), "--seed 0"),
    (("--dtype", "float64"), "--dtype float32"),
    (("--batch-size", "16"), "--batch-size 32"),
    (("--no-batch-norm",), "--batch-norm"),
    (("--limit-train", "32"), "--limit-train 64"),
    (("--limit-test", "16"), "--limit-test 32"),
    (("--dataset", "fashion-mnist"), "--dataset mnist"),
], ids=["seed", "dtype", "batch-size", "batch-norm", "limit-train", "limit-test", "dataset"])
def test_every_locked_setting_is_refused_on_resume(changed, saved, data_dir, finished_run, tmp_path,
                                                   capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = file_bytes(out)
    capsys.readouterr()
    assert train(data_dir, out, "--resume", "--epochs", "2", "--no-progress", *changed) == 2
    err = capsys.readouterr().err
    assert f"{' '.join(changed)} differs from the checkpoint's {saved}" in err, err
    assert file_bytes(out) == before


@pytest.mark.parametrize("option, value, says", [
    ("--lr", "inf", "positive finite number"), ("--lr", "nan", "positive finite number"),
    ("--lr", "0", "positive finite number"), ("--lr", "-0.001", "positive finite number"),
    ("--epochs", "0", "positive integer"), ("--batch-size", "0", "positive integer"),
    ("--limit-train", "0", "positive integer"), ("--log-every", "0", "positive integer"),
    ("--eval-batch-size", "-2", "positive integer"),
])
def test_out_of_range_numbers_are_usage_errors(option, value, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([option, value, "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert option in err and says in err, err
    assert not (tmp_path / "run").exists()
