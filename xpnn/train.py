"""``xpnn-train``: train the seed's LeNet on MNIST-format data from one command.

Run ``xpnn-train --help`` (or ``python -m xpnn.train --help``). The command
shows a progress bar (on a terminal), prints the test accuracy after every
epoch and a final one-line summary, and writes into ``--out``:

``model.npz`` / ``model.json`` / ``resume.json``
    The checkpoint (see :mod:`xpnn.checkpoint`): loads without executing code,
    on a CPU-only machine, with :func:`xpnn.checkpoint.load_model`.
``metrics.json``
    ``{"epochs": [{"epoch", "train_loss", "train_accuracy", "test_accuracy",
    "seconds", "eval_seconds", "images_per_second"}, ...], "settings": {...}}``.
``plot.png``
    Training loss and accuracies per epoch.

Nothing is lost: a checkpoint is written at every epoch end (atomically);
a NaN or infinite loss stops training (exit status 3) leaving the last good
checkpoint untouched; Ctrl-C finishes the current step, saves a checkpoint
and exits with status 130; ``--resume`` continues exactly where the
checkpoint left off (on the NumPy backend, bit for bit).

Exit status: 0 done, 1 error (data, backend, checkpoint), 2 usage,
3 the loss became NaN/infinite, 130 interrupted.
"""
import argparse
import io
import json
import math
import os
import re
import signal
import sys
import time

import numpy as np
from array_api_compat import array_namespace

import xpnn
from xpnn import checkpoint as ckpt
from xpnn.backend import BackendUnavailableError, canonical_name, make_backend
from xpnn._files import atomic_write_bytes
from xpnn.datasets import DataLayer, DatasetNotFoundError, IdxError, load_dataset

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
METRICS_FILE = "metrics.json"
PLOT_FILE = "plot.png"
#: Run settings and their defaults; settings in LOCKED_ON_RESUME come from the
#: checkpoint on --resume and may not be changed there.
DEFAULTS = {"dataset": "fashion-mnist", "data_dir": None, "epochs": 1, "batch_size": 64,
            "lr": 5e-4, "batch_norm": True, "dropout": True, "keep_probability": 0.8,
            "dtype": "float32", "seed": 0,
            "limit_train": None, "limit_test": None}
LOCKED_ON_RESUME = ("dataset", "batch_size", "batch_norm", "dropout", "keep_probability", "dtype",
                    "seed", "limit_train", "limit_test")
#: The summary line, for scripts: test accuracy, seconds per epoch, backend, device, dtype.
SUMMARY_PATTERN = re.compile(r"^test accuracy (?P<accuracy>[0-9.]+) \| (?P<seconds>[0-9.]+) s/epoch "
                             r"\| backend (?P<backend>\S+) \| device (?P<device>\S+) \| (?P<dtype>\w+)$")


class UsageError(Exception):
    """The command line asks for something impossible (exit status 2)."""


class Diverged(Exception):
    """The training loss became NaN or infinite."""


class StopRequested(Exception):
    """Ctrl-C asked training to stop at the next step boundary."""


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
        "default) on Fashion-MNIST or MNIST and save the model, metrics and a plot.",
        epilog="Exit status: 0 done, 1 error, 2 usage, 3 loss became NaN/inf, 130 interrupted "
        "(a checkpoint was saved; continue with --resume).", argument_default=quiet)
    add = parser.add_argument
    add("--backend", default=os.environ.get("XPNN_BACKEND", "cpu"),
        help="cpu (NumPy), gpu (CuPy), torch or array-api-strict (default: $XPNN_BACKEND, else cpu)")
    add("--device", default=None, help="device for the backend (e.g. 1 for gpu, cuda:1 for torch)")
    add("--dataset", choices=("fashion-mnist", "mnist"), help="default: fashion-mnist")
    add("--data-dir", help="directory with the four MNIST-format IDX files (default: Debian's "
        "/usr/share/datasets/fashion-mnist; MNIST is downloaded to ~/.cache/xpnn/mnist)")
    add("--epochs", type=positive_int, help="total epochs to train, resumed ones included (default: 1)")
    add("--batch-size", type=positive_int, help="default: 64")
    add("--lr", type=positive_float, help="Adam learning rate (default: 5e-4); may be changed on --resume")
    add("--batch-norm", action=argparse.BooleanOptionalAction, help="batch normalization (default: on)")
    add("--dropout", action=argparse.BooleanOptionalAction, help="dropout (default: on)")
    add("--keep-probability", type=probability, help="fraction of units dropout keeps, in (0, 1] "
        "(default: 0.8; see the README for why not 0.5)")
    add("--dtype", choices=("float32", "float64"), help="default: float32")
    add("--seed", type=int, help="seed for initial weights, dropout and shuffling (default: 0)")
    add("--out", default=os.path.join("runs", "lenet"), help="output directory (default: runs/lenet)")
    add("--resume", action="store_true", default=False, help="continue the checkpoint in --out")
    add("--overwrite", action="store_true", default=False,
        help="start afresh even if --out holds a checkpoint (it is replaced)")
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
                raise UsageError(f"--{key.replace('_', '-')} {given[key]} differs from the checkpoint's "
                                 f"{saved[key]}; it cannot change on --resume")
        settings.update({key: saved[key] for key in DEFAULTS if key in saved})
    settings.update({key: given[key] for key in DEFAULTS if key in given})
    return settings


# -- training ---------------------------------------------------------------------------

def count_correct(prediction, one_hot):
    """Number of rows whose arg-max matches the label's, as a 0-d device array (no sync)."""
    xp = array_namespace(prediction)
    hits = xp.argmax(prediction, axis=1) == xp.argmax(one_hot, axis=1)
    return xp.sum(xp.astype(hits, xp.int64))


def train_step(net, images, one_hot):
    """One forward/backward/update step; returns (summed data loss, correct count), both on the device.

    Unlike ``NeuralNetwork.forward`` this keeps the prediction at hand for
    the running accuracy and skips the regularization loss, which does not
    influence the update (the optimizers apply its gradient).
    """
    net.label_tensor = one_hot
    prediction = net._run_layers(images)
    loss = net.loss_layer.forward(prediction, one_hot)
    net.backward()
    return loss, count_correct(prediction, one_hot)


def evaluate(net, test_layer, stop):
    """Test accuracy over the whole test split, in batches, in testing phase."""
    correct = 0
    for images, one_hot in test_layer.epoch_batches():
        correct = correct + count_correct(net.test(images), one_hot)
        if stop.requested:
            net.phase = False
            raise StopRequested
    net.phase = False
    return int(test_layer.backend.to_numpy(correct)) / test_layer.size


class EpochProgress:
    """Host-side totals of the epoch in progress (saved with a mid-epoch checkpoint)."""

    def __init__(self, steps=0, samples=0, loss_sum=0.0, correct=0, seconds=0.0):
        self.steps, self.samples, self.loss_sum = steps, samples, loss_sum
        self.correct, self.seconds = correct, seconds

    def to_json(self):
        return dict(vars(self))


class Window:
    """Device-side loss and accuracy sums since the loss was last pulled to the host."""

    def __init__(self):
        self.loss, self.correct, self.samples, self.steps = 0.0, 0, 0, 0

    def add(self, loss, correct, samples):
        self.loss = self.loss + loss
        self.correct = self.correct + correct
        self.samples += samples
        self.steps += 1


class StopFlag:
    """SIGINT handler: the first Ctrl-C asks for a clean stop, the second aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nxpnn-train: Ctrl-C: stopping after this step and saving a checkpoint "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: plain KeyboardInterrupt semantics
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# -- checkpoints, metrics, plot -----------------------------------------------------------

def numpy_random_state():
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_random_state(state):
    np.random.set_state((state["name"], np.asarray(state["keys"], dtype=np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


def model_options(settings):
    """Keyword arguments of ``lenet.build`` for these settings."""
    return {"batch_norm": settings["batch_norm"], "dropout": settings["dropout"],
            "keep_probability": settings["keep_probability"], "learning_rate": settings["lr"],
            "weight_decay": 4e-4, "batch_norm_eps": 1e-10}


def set_learning_rate(net, learning_rate):
    for layer in net.layers:
        for _, optimizer in ckpt.optimizers_of(layer):
            optimizer.learning_rate = float(learning_rate)


def write_metrics(out, metrics, settings):
    payload = {"epochs": metrics, "settings": settings}
    atomic_write_bytes(os.path.join(out, METRICS_FILE),
                       (json.dumps(payload, indent=2) + "\n").encode("utf-8"))


def write_plot(out, metrics, title):
    """Loss and accuracy per epoch as a PNG (matplotlib's Agg canvas, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [entry["epoch"] for entry in metrics]
    figure = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [entry["train_loss"] for entry in metrics], "o-", label="train")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy per image", title="training loss")
    accuracy_axes.plot(epochs, [entry["train_accuracy"] for entry in metrics], "o-", label="train")
    accuracy_axes.plot(epochs, [entry["test_accuracy"] for entry in metrics], "s-", label="test")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    accuracy_axes.legend()
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(os.path.join(out, PLOT_FILE), buffer.getvalue())


# -- the run ------------------------------------------------------------------------------

class Run:
    """One training run: network, data layers, metrics so far, and the epoch in progress."""

    def __init__(self, settings, options, net, train_layer, test_layer):
        self.settings = settings
        self.options = options
        self.net = net
        self.train_layer = train_layer
        self.test_layer = test_layer
        self.backend = net.backend
        self.metrics = []
        self.partial = None
        self.stop = StopFlag()

    # -- state --------------------------------------------------------------------------
    def resume_state(self):
        return {"epochs_completed": len(self.metrics), "metrics": self.metrics,
                "partial_epoch": None if self.partial is None else self.partial.to_json(),
                "data_layer": self.train_layer.state_dict(),
                "numpy_random": numpy_random_state(), "settings": self.settings}

    def restore(self, resume):
        self.metrics = list(resume["metrics"])
        self.partial = None if resume["partial_epoch"] is None else EpochProgress(**resume["partial_epoch"])
        self.train_layer.load_state_dict(resume["data_layer"])
        if self.backend.name in ("gpu", "torch"):
            # Their native generators (dropout) cannot be saved portably: reseed
            # them from the position, so a resumed GPU run is reproducible.
            step = 0 if self.partial is None else self.partial.steps
            xpnn.seed(int(np.random.SeedSequence([self.settings["seed"], len(self.metrics), step])
                          .generate_state(1)[0]))
        set_numpy_random_state(resume["numpy_random"])

    def settings_record(self):
        """The settings plus what this run ran on, for metrics.json."""
        return {**self.settings, "backend": self.backend.name,
                "device": ckpt.device_label(self.backend), "train_images": self.train_layer.size,
                "test_images": self.test_layer.size, "xpnn_version": xpnn.__version__}

    def save(self, out):
        """Checkpoint unless a parameter went non-finite (then the previous checkpoint stays)."""
        arrays = ckpt.network_arrays(self.net)
        broken = ckpt.non_finite_arrays(arrays)
        if broken:
            raise Diverged(f"after epoch {len(self.metrics)} the parameters hold NaN or infinite "
                           f"values ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''})")
        ckpt.save_checkpoint(out, self.net, "lenet", self.options, resume=self.resume_state(),
                             arrays=arrays)

    # -- training -----------------------------------------------------------------------
    def _pull(self, window, progress, epoch):
        """Move the window's sums to the host and stop on a non-finite loss."""
        if window.steps == 0:
            return
        loss = float(self.backend.to_numpy(window.loss))
        if not math.isfinite(loss):
            raise Diverged(f"the training loss became {loss} in epoch {epoch + 1} within steps "
                           f"{progress.steps - window.steps + 1}-{progress.steps}")
        progress.loss_sum += loss
        progress.correct += int(self.backend.to_numpy(window.correct))
        progress.samples += window.samples
        window.__init__()

    def _postfix(self, bar, progress, started):
        seconds = progress.seconds + time.perf_counter() - started
        if progress.samples:
            bar.set_postfix(loss=f"{progress.loss_sum / progress.samples:.4f}",
                            acc=f"{progress.correct / progress.samples:.4f}",
                            img_s=f"{progress.samples / max(seconds, 1e-9):.0f}", refresh=False)

    def train_epoch(self, epoch, show_bar, log_every):
        """Train the rest of ``epoch``; returns its EpochProgress (training part complete)."""
        from tqdm import tqdm

        progress = self.partial = self.partial or EpochProgress()
        total = self.train_layer.batches_per_epoch
        window = Window()
        bar = tqdm(total=total, initial=progress.steps, desc=f"epoch {epoch + 1}/{self.settings['epochs']}",
                   unit="batch", disable=not show_bar, file=sys.stderr, dynamic_ncols=True)
        started = time.perf_counter()
        self.net.phase = False
        try:
            while progress.steps < total:
                images, one_hot = self.train_layer.next()
                loss, correct = train_step(self.net, images, one_hot)
                window.add(loss, correct, int(images.shape[0]))
                progress.steps += 1
                bar.update(1)
                if progress.steps % log_every == 0 or progress.steps == total or self.stop.requested:
                    self._pull(window, progress, epoch)
                    self._postfix(bar, progress, started)
                if self.stop.requested and progress.steps < total:
                    raise StopRequested
            self.backend.synchronize()
        finally:
            progress.seconds += time.perf_counter() - started
            bar.close()
        return progress

    def finish_epoch(self, epoch, progress, out):
        started = time.perf_counter()
        accuracy = evaluate(self.net, self.test_layer, self.stop)
        epochs_before = list(self.metrics)
        entry = {"epoch": epoch + 1, "train_loss": progress.loss_sum / progress.samples,
                 "train_accuracy": progress.correct / progress.samples, "test_accuracy": accuracy,
                 "seconds": progress.seconds, "eval_seconds": time.perf_counter() - started,
                 "images_per_second": progress.samples / max(progress.seconds, 1e-9)}
        self.metrics.append(entry)
        self.partial = None
        try:
            self.save(out)
        except Diverged:
            self.metrics = epochs_before
            raise
        write_metrics(out, self.metrics, self.settings_record())
        write_plot(out, self.metrics, describe_model(self.settings))
        print(f"epoch {entry['epoch']}/{self.settings['epochs']} | train loss {entry['train_loss']:.4f} | "
              f"train accuracy {entry['train_accuracy']:.4f} | test accuracy {accuracy:.4f} | "
              f"{entry['seconds']:.1f} s | {entry['images_per_second']:.0f} images/s", flush=True)

    def train(self, out, show_bar, log_every):
        while len(self.metrics) < self.settings["epochs"]:
            epoch = len(self.metrics)
            progress = self.train_epoch(epoch, show_bar, log_every)
            self.finish_epoch(epoch, progress, out)


def describe_model(settings):
    extras = [name for name, on in (("batch norm", settings["batch_norm"]), ("dropout", settings["dropout"])) if on]
    return f"LeNet ({', '.join(extras) or 'plain'}) on {settings['dataset']}"


def summary_line(metrics, backend, dtype):
    """``test accuracy 0.8675 | 13.8 s/epoch | backend cpu | device cpu | float32`` (SUMMARY_PATTERN)."""
    seconds = sum(entry["seconds"] for entry in metrics) / len(metrics)
    return (f"test accuracy {metrics[-1]['test_accuracy']:.4f} | {seconds:.1f} s/epoch | "
            f"backend {backend.name} | device {ckpt.device_label(backend)} | {dtype}")


# -- setting up -------------------------------------------------------------------------------

def load_data(settings):
    data = load_dataset(settings["dataset"], settings["data_dir"])
    train = (data.train_images[:settings["limit_train"]], data.train_labels[:settings["limit_train"]])
    test = (data.test_images[:settings["limit_test"]], data.test_labels[:settings["limit_test"]])
    if data.train_images.shape[1:] != (28, 28):
        raise IdxError(f"{data.directory}: LeNet needs 28 x 28 images, the files hold "
                       f"{data.train_images.shape[1]} x {data.train_images.shape[2]}")
    return train, test


def prepare_run(args, given):
    """Settings, backend, data, network and data layers for a fresh or resumed run."""
    out = args.out
    has_checkpoint = os.path.isfile(os.path.join(out, ckpt.MODEL_FILE))
    meta = arrays = None
    if args.resume:
        meta, arrays = ckpt.read_checkpoint(out)
        if not meta.get("resume"):
            raise ckpt.CheckpointError(f"{out}/{ckpt.MODEL_FILE} holds no training state to resume")
    elif has_checkpoint and not args.overwrite:
        raise UsageError(f"{out} already holds a checkpoint; continue it with --resume, replace it "
                         f"with --overwrite, or choose another --out")
    settings = resolve_settings(given, meta["resume"]["settings"] if meta else None)
    try:
        canonical_name(args.backend)
    except ValueError as error:
        raise UsageError(str(error)) from None
    backend = make_backend(args.backend, settings["dtype"], args.device)
    (train_images, train_labels), (test_images, test_labels) = load_data(settings)
    options = model_options(settings)
    xpnn.seed(settings["seed"])
    if meta is None:
        with xpnn.use_backend(backend):
            from xpnn.models import lenet
            net = lenet.build(**options)
    else:
        net = ckpt.build_model(meta, backend)
        ckpt.restore_network_arrays(net, arrays)
        set_learning_rate(net, settings["lr"])
    train_layer = DataLayer(train_images, train_labels, settings["batch_size"], backend=backend,
                            shuffle=True, seed=settings["seed"])
    test_layer = DataLayer(test_images, test_labels, args.eval_batch_size, backend=backend, shuffle=False)
    run = Run(settings, options, net, train_layer, test_layer)
    if meta is not None:
        run.restore(meta["resume"])
    return run


def start_line(run, out):
    settings, backend = run.settings, run.backend
    done = len(run.metrics)
    where = f"resuming at epoch {done + 1}" + (f" step {run.partial.steps + 1}" if run.partial else "") \
        if (done or run.partial) else "starting"
    return (f"xpnn-train: {describe_model(settings)} ({run.train_layer.size} training / "
            f"{run.test_layer.size} test images) | backend {backend.name} | device "
            f"{ckpt.device_label(backend)} | {backend.dtype_name} | batch {settings['batch_size']} | "
            f"lr {settings['lr']:g} | {where}, {settings['epochs']} epoch(s) in all -> {out}")


def report_divergence(error, run, out, resumed):
    if run.metrics or resumed:
        kept = f"the last good checkpoint (after epoch {len(run.metrics)}) is kept in {out}"
    else:
        kept = "no checkpoint was written"
    print(f"xpnn-train: error: {error}; training stopped and nothing more was saved; {kept}. "
          f"Try a smaller --lr.", file=sys.stderr, flush=True)


def execute(args, given):
    """Run training; returns the exit status."""
    run = prepare_run(args, given)
    out = args.out
    os.makedirs(out, exist_ok=True)
    show_bar = sys.stderr.isatty() if args.progress is None else args.progress
    with run.stop, np.errstate(all="ignore"):
        # Overflow warnings would flood the terminal; non-finite losses and
        # parameters are detected and reported below instead.
        print(start_line(run, out), flush=True)
        try:
            try:
                run.train(out, show_bar, args.log_every)
            except StopRequested:
                run.save(out)
                print(f"xpnn-train: interrupted; checkpoint saved in {out} (epoch "
                      f"{len(run.metrics) + 1}, step {run.partial.steps if run.partial else 0}); "
                      f"continue with: xpnn-train --resume --out {out}", file=sys.stderr, flush=True)
                return EXIT_INTERRUPTED
        except Diverged as error:
            report_divergence(error, run, out, args.resume)
            return EXIT_DIVERGED
    if run.metrics:
        print(summary_line(run.metrics, run.backend, run.backend.dtype_name), flush=True)
    return EXIT_OK


def main(argv=None):
    """Entry point of ``xpnn-train``; returns the exit status."""
    args = build_parser().parse_args(argv)
    given = {key: value for key, value in vars(args).items() if key in DEFAULTS}
    try:
        return execute(args, given)
    except UsageError as error:
        print(f"xpnn-train: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (BackendUnavailableError, DatasetNotFoundError, IdxError, ckpt.CheckpointError) as error:
        print(f"xpnn-train: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"\nxpnn-train: aborted; nothing was saved now (an earlier checkpoint in {args.out}, "
              f"if any, is unchanged)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
