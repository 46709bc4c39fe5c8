"""One training run of ``xpnn-train``: steps, evaluation, progress, Ctrl-C and checkpoints.

:class:`Run` holds the network, the data layers and the metrics so far;
``xpnn.train`` builds it from the command line and reports its outcome.
"""
import math
import signal
import sys
import time

import numpy as np

import xpnn
from xpnn import checkpoint as ckpt
from xpnn.backend import namespace
from xpnn.parallel.communicator import SingleProcessCommunicator
from xpnn.reports import describe_model, write_metrics, write_plot


class Diverged(Exception):
    """The training loss became NaN or infinite."""


class StopRequested(Exception):
    """Ctrl-C or SIGTERM asked training to stop at the next step boundary."""


class Aborted(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: stop at once, without saving (``status``: the exit status)."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


# -- steps ----------------------------------------------------------------------------------

def count_correct(prediction, one_hot):
    """Number of rows whose arg-max matches the label's, as a 0-d device array (no sync)."""
    xp = namespace(prediction)
    hits = xp.argmax(prediction, axis=1) == xp.argmax(one_hot, axis=1)
    return xp.sum(xp.astype(hits, xp.int64))


def train_step(net, images, one_hot):
    """One forward/backward/update step; returns (summed data loss, correct count), both on the device.

    :meth:`xpnn.NeuralNetwork.train_batch`: unlike ``NeuralNetwork.forward``
    it keeps the prediction at hand for the running accuracy and skips the
    regularization loss.
    """
    loss, prediction = net.train_batch(images, one_hot)
    return loss, count_correct(prediction, one_hot)


def evaluate(net, test_layer, stop, communicator=None):
    """Test accuracy over the whole test split, in batches, in testing phase.

    On several ranks each tests its rows of every batch (``test_layer``'s part) and the
    counts are summed over the ranks.
    """
    communicator = communicator or SingleProcessCommunicator()
    correct = 0
    # (The backend's device current for the batches and the counting too, not only inside test.)
    with test_layer.backend.ops.compute_scope():
        for images, one_hot in test_layer.epoch_batches():
            if images.shape[0]:  # (a rank's part of a small last batch may be empty)
                correct = correct + count_correct(net.test(images), one_hot)
            if agreed_stop(stop, communicator):
                net.phase = False
                raise StopRequested
    net.phase = False
    (correct,) = communicator.all_sum(correct)
    return int(test_layer.backend.to_numpy(correct)) / test_layer.size


def agreed_stop(stop, communicator):
    """Whether Ctrl-C asked to stop, on any rank: every rank then stops at the same step
    (``mpiexec`` passes Ctrl-C to every rank, but each sees it at its own step)."""
    if communicator.size == 1:
        return stop.requested
    return communicator.allreduce(int(stop.requested)) > 0


class EpochProgress:
    """Host-side totals of the epoch in progress (saved with a mid-epoch checkpoint).

    ``loss_sum`` is the device's running sum of the epoch's step losses as last
    pulled (a value of the backend's dtype, exact as a Python float): a resumed
    epoch goes on adding to it, so the epoch's loss has the same bits whatever
    ``--log-every`` and wherever a stop came.
    """

    def __init__(self, steps=0, samples=0, loss_sum=0.0, correct=0, seconds=0.0):
        self.steps, self.samples, self.loss_sum = steps, samples, loss_sum
        self.correct, self.seconds = correct, seconds

    def to_json(self):
        return dict(vars(self))


class Window:
    """Device-side sums: the epoch's loss so far (from ``loss_so_far``, a host float), and the
    correct count, samples and steps since the sums were last pulled to the host."""

    def __init__(self, backend, loss_so_far=0.0):
        # In the backend's dtype, added to step by step in one order: pulling the sum (every
        # --log-every steps, or at a stop) does not change the bits of the epoch's loss.
        self.loss = 0.0 if not loss_so_far else backend.asarray(loss_so_far, dtype=backend.dtype)
        self.correct, self.samples, self.steps = 0, 0, 0

    def add(self, loss, correct, samples):
        self.loss = self.loss + loss
        self.correct = self.correct + correct
        self.samples += samples
        self.steps += 1

    def pulled(self):
        """Start the next window (the loss sum goes on)."""
        self.correct, self.samples, self.steps = 0, 0, 0


class StopFlag:
    """SIGINT and SIGTERM handler: the first asks for a clean stop, the second aborts at once.

    SIGTERM is what ``docker stop``, systemd and Slurm send before they kill a
    process: it gets the same clean stop as Ctrl-C. ``status`` is the exit
    status the stop calls for (128 + the signal's number: 130, 143).
    """

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self.requested = False
        self.status = None
        self.name = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise Aborted(128 + signum)
        self.requested = True
        self.status, self.name = 128 + signum, self.SIGNALS[signum]
        again = "press Ctrl-C again" if signum == signal.SIGINT else "send SIGTERM again"
        print(f"\nxpnn-train: {self.name}: stopping after this step and saving a checkpoint "
              f"({again} to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: plain KeyboardInterrupt semantics
                pass
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return False


# -- random state and learning rate --------------------------------------------------------

def numpy_random_state():
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_random_state(state):
    np.random.set_state((state["name"], np.asarray(state["keys"], dtype=np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


def set_learning_rate(net, learning_rate):
    for layer in net.layers:
        for _, optimizer in ckpt.optimizers_of(layer):
            optimizer.learning_rate = float(learning_rate)



# -- the run ------------------------------------------------------------------------------

class OtherData(ValueError):
    """A resume on training data other than the checkpoint's."""


class Run:
    """One training run: network, data layers, metrics so far, and the epoch in progress."""

    def __init__(self, settings, options, net, train_layer, test_layer, communicator=None):
        self.settings = settings
        self.options = options
        self.net = net
        self.train_layer = train_layer
        self.test_layer = test_layer
        self.backend = net.backend
        self.metrics = []
        self.partial = None
        self.stop = StopFlag()
        # The ranks training together (xpnn.parallel); rank 0 alone writes.
        self.communicator = communicator or SingleProcessCommunicator()
        self.root = self.communicator.rank == 0

    # -- state --------------------------------------------------------------------------
    def resume_state(self):
        return {"epochs_completed": len(self.metrics), "metrics": self.metrics,
                "partial_epoch": None if self.partial is None else self.partial.to_json(),
                "data_layer": self.train_layer.state_dict(),
                "numpy_random": numpy_random_state(), "settings": self.settings}

    def restore(self, resume):
        self.metrics = list(resume["metrics"])
        self.partial = None if resume["partial_epoch"] is None else EpochProgress(**resume["partial_epoch"])
        try:
            self.train_layer.load_state_dict(resume["data_layer"])
        except ValueError as error:  # the state is for other training data
            raise OtherData(str(error)) from None
        self._reseed_native(len(self.metrics), 0 if self.partial is None else self.partial.steps)
        try:
            set_numpy_random_state(resume["numpy_random"])
        except (KeyError, TypeError, ValueError) as error:
            raise ckpt.CheckpointError(f"the checkpoint's random-generator state is unreadable "
                                       f"({type(error).__name__}: {error}); start afresh with "
                                       f"--overwrite") from None

    def _reseed_native(self, epoch, step):
        """Reseed CuPy's or PyTorch's own generator (dropout) from the run's position.

        Their states cannot be saved portably. Every epoch starts from this seed,
        resumed or not, so a run resumed at an epoch's end equals an uninterrupted
        one; resumed within an epoch, it is reproducible but draws other masks.
        NumPy's generator, saved with the checkpoint, is left as it is.
        """
        if self.backend.name not in ("gpu", "torch"):
            return
        numpy_state = np.random.get_state()
        xpnn.seed(int(np.random.SeedSequence([self.settings["seed"], epoch, step])
                      .generate_state(1)[0]))
        np.random.set_state(numpy_state)

    def settings_record(self):
        """The settings plus what this run ran on, for metrics.json."""
        return {**self.settings, "backend": self.backend.name,
                "device": ckpt.device_label(self.backend), "train_images": self.train_layer.size,
                "test_images": self.test_layer.size, "ranks": self.communicator.size,
                "xpnn_version": xpnn.__version__}

    def save(self, out):
        """Checkpoint unless a parameter went non-finite (then the previous checkpoint stays).

        Every rank checks (the parameters are the same on every rank, so all stop
        together); rank 0 alone writes.
        """
        arrays = ckpt.network_arrays(self.net)
        broken = ckpt.non_finite_arrays(arrays)
        if broken:
            raise Diverged(f"after epoch {len(self.metrics)} the parameters hold NaN or infinite "
                           f"values ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''})")
        if self.root:
            ckpt.save_checkpoint(out, self.net, self.settings.get("model", "lenet"), self.options,
                                 resume=self.resume_state(), arrays=arrays)

    # -- training -----------------------------------------------------------------------
    def _pull(self, window, progress, epoch):
        """Move the window's sums to the host and stop on a non-finite loss."""
        if window.steps == 0:
            return
        # The sums of every rank (of their rows): the global batches' (the same on every rank).
        loss, correct, samples = self.communicator.all_sum(window.loss, window.correct, window.samples)
        loss = float(self.backend.to_numpy(loss))
        if not math.isfinite(loss):
            raise Diverged(f"the training loss became {loss} in epoch {epoch + 1} within steps "
                           f"{progress.steps - window.steps + 1}-{progress.steps}")
        progress.loss_sum = loss
        progress.correct += int(self.backend.to_numpy(correct))
        progress.samples += samples
        window.pulled()

    def _postfix(self, bar, progress, started):
        seconds = progress.seconds + time.perf_counter() - started
        if progress.samples:
            bar.set_postfix(loss=f"{progress.loss_sum / progress.samples:.4f}",
                            acc=f"{progress.correct / progress.samples:.4f}",
                            img_s=f"{progress.samples / max(seconds, 1e-9):.0f}", refresh=False)

    def train_epoch(self, epoch, show_bar, log_every):
        """Train the rest of ``epoch``; returns its EpochProgress (training part complete)."""
        from tqdm import tqdm

        if self.partial is None:
            self._reseed_native(epoch, 0)
        progress = self.partial = self.partial or EpochProgress()
        total = self.train_layer.batches_per_epoch
        # (The epoch's loss so far is everyone's: counted once, by rank 0.)
        window = Window(self.backend, progress.loss_sum if self.root else 0.0)
        bar = tqdm(total=total, initial=progress.steps, desc=f"epoch {epoch + 1}/{self.settings['epochs']}",
                   unit="batch", disable=not show_bar, file=sys.stderr, dynamic_ncols=True)
        started = time.perf_counter()
        self.net.phase = False
        try:
            # One compute scope for the epoch, as NeuralNetwork.train has: on the CPU, BLAS
            # then stays on one thread beside xpnn's own (15-19 % faster per step here).
            with self.backend.ops.compute_scope():
                while progress.steps < total:
                    images, one_hot = self.train_layer.next()
                    loss, correct = train_step(self.net, images, one_hot)
                    window.add(loss, correct, int(images.shape[0]))
                    progress.steps += 1
                    bar.update(1)
                    stop = agreed_stop(self.stop, self.communicator)
                    if progress.steps % log_every == 0 or progress.steps == total or stop:
                        self._pull(window, progress, epoch)
                        self._postfix(bar, progress, started)
                    if stop and progress.steps < total:
                        raise StopRequested  # (the data layer stands at the next batch: resumes there)
            self.backend.synchronize()
        finally:
            progress.seconds += time.perf_counter() - started
            bar.close()
        return progress

    def finish_epoch(self, epoch, progress, out):
        started = time.perf_counter()
        accuracy = evaluate(self.net, self.test_layer, self.stop, self.communicator)
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
        if not self.root:
            return
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
