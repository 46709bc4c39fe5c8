"""``xpnn-train``: train the seed's LeNet (or, with ``--model lstm`` / ``rnn``, a recurrent
classifier reading each image row by row) on MNIST-format data from one command.

Run ``xpnn-train --help`` (or ``python -m xpnn.train --help``). The command
shows a progress bar (on a terminal), prints the test accuracy after every
epoch and a final one-line summary, and writes into ``--out``:

``model.npz`` / ``model.json``
    The checkpoint (see :mod:`xpnn.checkpoint`): loads without executing code,
    on a CPU-only machine, with :func:`xpnn.checkpoint.load_model`; ``model.npz``
    also holds the training state that ``--resume`` continues from.
``metrics.json``
    ``{"epochs": [{"epoch", "train_loss", "train_accuracy", "test_accuracy",
    "seconds", "eval_seconds", "images_per_second"}, ...], "settings": {...}}``.
``plot.png``
    Training loss and accuracies per epoch.

Nothing is lost: a checkpoint is written at every epoch end (atomically);
a NaN or infinite loss stops training (exit status 3) leaving the last good
checkpoint untouched; Ctrl-C (SIGINT) or SIGTERM finishes the current step,
saves a checkpoint and exits with status 130 or 143; ``--resume`` continues
exactly where the checkpoint left off (on the NumPy backend, bit for bit).
One run at a time holds ``--out`` (a second exits with status 2); a file
system without room for the checkpoint and its temporary copy is refused
before training; a damaged checkpoint is refused with the file and the problem.

Exit status: 0 done, 1 error (data, backend, checkpoint, disk), 2 usage (or
``--out`` in use), 3 the loss became NaN/infinite, 130 interrupted, 143 terminated.
"""
import argparse
import contextlib
import math
import os
import sys

import numpy as np

import xpnn
from xpnn import checkpoint as ckpt
from xpnn._files import NO_ROOM, DirectoryLock
from xpnn.backend import BackendUnavailableError, canonical_name, make_backend
from xpnn.datasets import DataLayer, DatasetNotFoundError, IdxError, load_dataset
from xpnn.parallel import MPIUnavailableError, distribute, world
from xpnn.reports import describe_model, summary_line
from xpnn.train_ranks import (FailedElsewhere, agreed, one_thread_per_rank, rank_device, root_voice,
                              stop_all_on_error)
from xpnn.resume_checks import check_against_data, check_resume_state
from xpnn.train_checks import (UsageError, check_batches, check_no_checkpoint, check_room,
                               check_writable, take_lock)
from xpnn.training import Diverged, OtherData, Run, StopRequested, set_learning_rate

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
#: The file in --out whose lock (flock) one run holds; it records the holder's process id.
LOCK_FILE = ".xpnn-train.lock"
#: Run settings and their defaults; settings in LOCKED_ON_RESUME come from the
#: checkpoint on --resume and may not be changed there.
DEFAULTS = {"model": "lenet", "dataset": "fashion-mnist", "data_dir": None, "epochs": 1, "batch_size": 64,
            "lr": 5e-4, "batch_norm": True, "dropout": True, "keep_probability": 0.8,
            "dtype": "float32", "seed": 0,
            "limit_train": None, "limit_test": None}
LOCKED_ON_RESUME = ("model", "dataset", "batch_size", "batch_norm", "dropout", "keep_probability", "dtype",
                    "seed", "limit_train", "limit_test")
#: The recurrent models (xpnn.models.recurrent): their default learning rate, and the
#: LeNet-only options they refuse.
RECURRENT_LR = 1e-3
LENET_ONLY = ("batch_norm", "dropout", "keep_probability")


# -- command line ---------------------------------------------------------------------

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def seed_value(text):
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**32 - 1, got {text}")
    return value


def probability(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def build_parser():
    """The argument parser; run settings default to SUPPRESS so that given ones can be told apart."""
    quiet = argparse.SUPPRESS
    parser = argparse.ArgumentParser(
        prog="xpnn-train", description="Train the seed's LeNet (with batch norm and dropout by "
        "default), or an LSTM or Elman RNN reading each image row by row (--model), on "
        "Fashion-MNIST or MNIST and save the model, metrics and a plot.",
        epilog="Exit status: 0 done, 1 error, 2 usage (or --out in use by another run), 3 loss "
        "became NaN/inf, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); after 130 or 143 a "
        "checkpoint was saved: continue with --resume.", argument_default=quiet)
    add = parser.add_argument
    add("--backend", default=os.environ.get("XPNN_BACKEND", "cpu"),
        help="cpu (NumPy), gpu (CuPy), torch or array-api-strict (default: $XPNN_BACKEND, else cpu)")
    add("--device", default=None, help="device for the backend (e.g. 1 for gpu, cuda:1 for torch)")
    add("--model", choices=("lenet", "lstm", "rnn"), help="lenet (default); lstm or rnn: a "
        "recurrent classifier reading each image as 28 steps of 28 pixels")
    add("--dataset", choices=("fashion-mnist", "mnist"), help="default: fashion-mnist")
    add("--data-dir", help="directory with the four MNIST-format IDX files (default: Debian's "
        "/usr/share/datasets/fashion-mnist; MNIST is downloaded to ~/.cache/xpnn/mnist)")
    add("--epochs", type=positive_int, help="total epochs to train, resumed ones included (default: 1)")
    add("--batch-size", type=positive_int, help="default: 64")
    add("--lr", type=positive_float, help="Adam learning rate (default: 5e-4 for lenet, 1e-3 for "
        "lstm and rnn); may be changed on --resume")
    add("--batch-norm", action=argparse.BooleanOptionalAction, help="batch normalization (default: on)")
    add("--dropout", action=argparse.BooleanOptionalAction, help="dropout (default: on)")
    add("--keep-probability", type=probability, help="fraction of units dropout keeps, in (0, 1] "
        "(default: 0.8; see the README for why not 0.5)")
    add("--dtype", choices=("float32", "float64"), help="default: float32")
    add("--seed", type=seed_value, help="seed for initial weights, dropout and shuffling (default: 0)")
    add("--out", default=None, help="output directory (default: runs/MODEL, e.g. runs/lenet)")
    add("--resume", action="store_true", default=False, help="continue the checkpoint in --out")
    add("--overwrite", action="store_true", default=False,
        help="start afresh even if --out holds a checkpoint (replaced at the first epoch's end)")
    add("--limit-train", type=positive_int, help="use only the first N training images")
    add("--limit-test", type=positive_int, help="use only the first N test images")
    add("--progress", action=argparse.BooleanOptionalAction, default=None,
        help="progress bar on stderr (default: only when stderr is a terminal)")
    add("--log-every", type=positive_int, default=50,
        help="pull the loss to the host (and check it is finite) every N steps (default: 50)")
    add("--eval-batch-size", type=positive_int, default=500, help="batch size for testing (default: 500)")
    return parser


def resolve_settings(given, saved=None):
    """Merge defaults, a checkpoint's settings (on resume) and the options given."""
    settings = dict(DEFAULTS)
    if saved is not None:
        for key in LOCKED_ON_RESUME:
            if key in given and key in saved and given[key] != saved[key]:
                raise UsageError(f"{_as_option(key, given[key])} differs from the checkpoint's "
                                 f"{_as_option(key, saved[key])}; it cannot change on --resume")
        settings.update({key: saved[key] for key in DEFAULTS if key in saved})
    settings.update({key: given[key] for key in DEFAULTS if key in given})
    if settings["model"] != "lenet":
        refused = [_as_option(key, given[key]) for key in LENET_ONLY if key in given]
        if refused:
            raise UsageError(f"{', '.join(refused)}: only --model lenet has this option")
        if "lr" not in given and (saved is None or "lr" not in saved):
            settings["lr"] = RECURRENT_LR
        settings.update(batch_norm=False, dropout=False)  # (not in the model)
    return settings


def _as_option(key, value):
    """``key`` = ``value`` as written on the command line: ``--no-dropout``, ``--seed 3``."""
    option = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{option}" if value else f"--no-{option}"
    return f"--{option} {value}"


def model_options(settings):
    """Keyword arguments of the model's builder (``lenet.build``, ``recurrent.build_lstm``, ...)."""
    if settings.get("model", "lenet") != "lenet":
        return {"hidden_size": 128, "output_size": 64, "learning_rate": settings["lr"],
                "weight_decay": 0.0}
    return {"batch_norm": settings["batch_norm"], "dropout": settings["dropout"],
            "keep_probability": settings["keep_probability"], "learning_rate": settings["lr"],
            "weight_decay": 4e-4, "batch_norm_eps": 1e-10}



# -- setting up -------------------------------------------------------------------------------

def load_data(settings):
    data = load_dataset(settings["dataset"], settings["data_dir"])
    train = (data.train_images[:settings["limit_train"]], data.train_labels[:settings["limit_train"]])
    test = (data.test_images[:settings["limit_test"]], data.test_labels[:settings["limit_test"]])
    for split, images in (("training", data.train_images), ("test", data.test_images)):
        # (Checked before training: a wrong test size would otherwise show after an epoch.)
        if images.shape[1:] != (28, 28):
            model = "LeNet" if settings["model"] == "lenet" else settings["model"].upper()
            raise IdxError(f"{data.directory}: {model} needs 28 x 28 images, the {split} files "
                           f"hold {' x '.join(str(n) for n in images.shape[1:])}")
    return train, test


def prepare_run(args, given, communicator, lock):
    """Settings, backend, data, network and data layers for a fresh or resumed run (this
    rank's rows of every batch, the network distributed over the ranks); rank 0 takes
    ``lock`` (on ``--out``) before the directory's contents are looked at."""
    out = args.out
    meta = arrays = None
    if args.resume:
        take_lock(lock, out, create=False)  # (before anything is read: see below)
        meta, arrays = read_resume_checkpoint(out)
    settings = resolve_settings(given, meta["resume"]["settings"] if meta else None)
    try:
        canonical_name(args.backend)
        backend = make_backend(args.backend, settings["dtype"],
                               rank_device(args.backend, args.device, communicator))
    except ValueError as error:  # an unknown name, or a device the backend does not have
        raise UsageError(str(error)) from None
    # (After the backend: a run that cannot start there should say so first.) An --out that
    # exists is locked before its contents count; a new one once the data is good (a run that
    # fails before leaves none), and its contents are looked at again then.
    take_lock(lock, out, create=False)
    has_checkpoint = check_no_checkpoint(args)
    (train_images, train_labels), (test_images, test_labels) = load_data(settings)
    check_batches(settings, len(train_images))
    if lock is not None and not lock.held:
        take_lock(lock, out, create=True)
        has_checkpoint = check_no_checkpoint(args)
    if lock is not None:
        check_writable(out)  # before an epoch of training, not at its end
    options = model_options(settings)
    net = distribute(build_network(settings, options, backend, meta, arrays,
                                   os.path.join(out, ckpt.MODEL_FILE)), communicator)
    part = (communicator.rank, communicator.size)  # (this rank's rows of every batch)
    train_layer = DataLayer(train_images, train_labels, settings["batch_size"], backend=backend,
                            shuffle=True, seed=settings["seed"], part=part)
    test_layer = DataLayer(test_images, test_labels, args.eval_batch_size, backend=backend,
                           shuffle=False, part=part)
    run = Run(settings, options, net, train_layer, test_layer, communicator)
    if meta is not None:
        try:
            run.restore(meta["resume"])
        except OtherData as error:  # the data layer's state is for another dataset
            raise UsageError(f"{error}; resume with the data the run started with, or start "
                             f"afresh with --overwrite") from None
        check_against_data(os.path.join(out, ckpt.MODEL_FILE), meta["resume"], train_layer)
    check_room(out, run, has_checkpoint)
    return run


def read_resume_checkpoint(out):
    """The checkpoint in ``out`` with its training state checked (a CheckpointError names the
    file and the field); its settings must agree with its architecture."""
    meta, arrays = ckpt.read_checkpoint(out)
    path = os.path.join(out, ckpt.MODEL_FILE)
    if not meta.get("resume"):
        raise ckpt.CheckpointError(f"{path} holds no training state to resume")
    check_resume_state(path, meta["resume"])
    built_with = meta["architecture"]["options"]
    if model_options(resolve_settings({}, meta["resume"]["settings"])) != built_with:
        raise ckpt.CheckpointError(f"{path}: its training state's settings do not match its "
                                   f"architecture's options {built_with}; start afresh with "
                                   f"--overwrite, or use another copy")
    return meta, arrays


def build_network(settings, options, backend, meta=None, arrays=None, path=None):
    """A fresh model for these options (seeded), or the checkpoint's (``meta``, ``arrays``,
    read from ``path``)."""
    xpnn.seed(settings["seed"])
    if meta is None:
        with xpnn.use_backend(backend):
            return ckpt.model_builder(settings.get("model", "lenet"))(**options)
    net = ckpt.restore_model(path, meta, arrays, backend)
    set_learning_rate(net, settings["lr"])
    return net


def start_line(run, out):
    settings, backend = run.settings, run.backend
    done = len(run.metrics)
    where = f"resuming at epoch {done + 1}" + (f" step {run.partial.steps + 1}" if run.partial else "") \
        if (done or run.partial) else "starting"
    return (f"xpnn-train: {describe_model(settings)} ({run.train_layer.size} training / "
            f"{run.test_layer.size} test images) | backend {backend.name} | device "
            f"{ckpt.device_label(backend)}{_ranks_note(run.communicator)} | {backend.dtype_name} | "
            f"batch {settings['batch_size']} | "
            f"lr {settings['lr']:g} | {where}, {settings['epochs']} epoch(s) in all -> {out}")


def _ranks_note(communicator):
    """`` x 2 ranks`` on several ranks (the batch is the global one), else nothing."""
    return f" x {communicator.size} ranks" if communicator.size > 1 else ""


def report_divergence(error, run, out, resumed):
    if run.metrics or resumed:
        kept = f"the last good checkpoint (after epoch {len(run.metrics)}) is kept in {out}"
    elif os.path.isfile(os.path.join(out, ckpt.MODEL_FILE)):  # --overwrite, before an epoch ended
        kept = f"this run wrote no checkpoint; the one in {out} is the previous run's, unchanged"
    else:
        kept = "no checkpoint was written"
    print(f"xpnn-train: error: {error}; training stopped and nothing more was saved; {kept}. "
          f"Try a smaller --lr.", file=sys.stderr, flush=True)


def execute(args, given, communicator):
    """Run training, rank 0 holding ``--out``'s lock throughout; returns the exit status."""
    # Rank 0 alone holds the lock, checks and writes; the other ranks get None.
    root = communicator.rank == 0
    with DirectoryLock(args.out, LOCK_FILE) if root else contextlib.nullcontext() as lock:
        run = agreed(communicator, lambda: prepare_run(args, given, communicator, lock))
        return train_run(run, args, communicator)


def train_run(run, args, communicator):
    """Train ``run`` to its epochs; a stop saves a checkpoint; returns the exit status."""
    out = args.out
    root = communicator.rank == 0  # (the one that prints)
    if len(run.metrics) >= run.settings["epochs"]:  # (a saved partial epoch beyond them too)
        if root:
            print(f"xpnn-train: {out} holds {len(run.metrics)} trained epoch(s) and --epochs is "
                  f"{run.settings['epochs']}: nothing to train (raise --epochs to train on)",
                  file=sys.stderr, flush=True)
            print(summary_line(run.metrics, run.backend, run.backend.dtype_name), flush=True)
        return EXIT_OK
    show_bar = root and (sys.stderr.isatty() if args.progress is None else args.progress)
    with run.stop, np.errstate(all="ignore"), \
            stop_all_on_error(communicator, lambda error: describe_error(error, args),
                              (Diverged, StopRequested)):
        # Overflow warnings would flood the terminal; non-finite losses and
        # parameters are detected and reported below instead.
        if root:
            print(start_line(run, out), flush=True)
        try:
            try:
                run.train(out, show_bar, args.log_every)
            except StopRequested:  # (every rank, at the same step)
                run.save(out)
                if root:
                    print(f"xpnn-train: {run.stop.name}: checkpoint saved in {out} (epoch "
                          f"{len(run.metrics) + 1}, step {run.partial.steps if run.partial else 0}"
                          f"); continue with: xpnn-train --resume --out {out}",
                          file=sys.stderr, flush=True)
                return run.stop.status
        except Diverged as error:
            if root:
                report_divergence(error, run, out, args.resume)
            return EXIT_DIVERGED
    if run.metrics and root:
        print(summary_line(run.metrics, run.backend, run.backend.dtype_name), flush=True)
    return EXIT_OK


def _path_hint(error, args):
    """What to change for an OSError on a path: the option the path came from, if one did."""
    filename = getattr(error, "filename", None)
    if not filename:
        return ""
    path = os.path.abspath(os.fspath(filename))
    fix = "free some space there" if error.errno in NO_ROOM else "check the path and its permissions"
    for option, value in (("--out", args.out), ("--data-dir", args.data_dir)):
        if value is not None and (path + os.sep).startswith(os.path.abspath(value) + os.sep):
            return f"; {fix}, or choose another {option}"
    return f"; {fix}"


def describe_error(error, args):
    """``(exit status, message)`` for the errors the command reports, None for others."""
    if isinstance(error, UsageError):
        return EXIT_USAGE, f"xpnn-train: error: {error}"
    if isinstance(error, (BackendUnavailableError, DatasetNotFoundError, IdxError,
                          ckpt.CheckpointError)):
        return EXIT_ERROR, f"xpnn-train: error: {error}"
    if isinstance(error, OSError):  # e.g. a file or directory that cannot be read or written
        return EXIT_ERROR, f"xpnn-train: error: {error}{_path_hint(error, args)}"
    if isinstance(error, KeyboardInterrupt):  # (a second Ctrl-C or SIGTERM: aborted)
        return getattr(error, "status", EXIT_INTERRUPTED), (f"\nxpnn-train: aborted; nothing was saved now (an earlier "
                                  f"checkpoint in {args.out}, if any, is unchanged)")
    return None


def main(argv=None):
    """Entry point of ``xpnn-train``; returns the exit status.

    Under ``mpiexec -n N`` every rank runs it (data-parallel training, see
    :mod:`xpnn.train_ranks`); rank 0 prints and writes.
    """
    try:
        communicator = world()
    except MPIUnavailableError as error:
        print(f"xpnn-train: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    with root_voice(communicator):
        args = build_parser().parse_args(argv)
    given = {key: value for key, value in vars(args).items() if key in DEFAULTS}
    if args.out is None:
        args.out = os.path.join("runs", given.get("model", DEFAULTS["model"]))
    try:
        with one_thread_per_rank(communicator):
            return execute(args, given, communicator)
    except FailedElsewhere as error:  # (another rank printed why)
        described = None if error.cause is None else describe_error(error.cause, args)
        return EXIT_ERROR if described is None else described[0]
    except (Exception, KeyboardInterrupt) as error:
        described = describe_error(error, args)
        if described is None:
            raise
        print(described[1], file=sys.stderr)
        return described[0]


if __name__ == "__main__":
    sys.exit(main())
