"""The checks ``xpnn-train`` makes before it trains, so that nothing fails after an epoch that
could have failed before it: whether ``--out`` may be used (a checkpoint there, another run
holding its lock), whether every batch can be trained on, whether the directory can be written
and has room for the checkpoints. Each failure is a :class:`UsageError` (exit status 2) or an
OSError naming the path (exit status 1).
"""
import os
import tempfile

from xpnn import checkpoint as ckpt
from xpnn._files import DirectoryBusy, free_bytes, no_room_error
from xpnn.checkpoint_room import checkpoint_bytes, room_needed


class UsageError(Exception):
    """The command line asks for something impossible (exit status 2)."""


def check_no_checkpoint(args):
    """Whether ``--out`` holds a checkpoint; a UsageError if it does and the run neither resumes
    nor overwrites it."""
    has_checkpoint = os.path.isfile(os.path.join(args.out, ckpt.MODEL_FILE))
    if has_checkpoint and not (args.resume or args.overwrite):
        raise UsageError(f"{args.out} already holds a checkpoint; continue it with --resume, "
                         f"replace it with --overwrite, or choose another --out")
    return has_checkpoint


def take_lock(lock, out, create):
    """Hold ``lock`` (on ``out``) for the run; a run holding it already is a UsageError naming
    its process. Without ``create``, a missing ``out`` is left alone (not locked). Taking a held
    lock again does nothing; ``lock`` None (a rank other than 0) takes nothing."""
    if lock is None or lock.held or (not create and not os.path.isdir(out)):
        return
    try:
        lock.acquire()
    except DirectoryBusy as busy:
        holder = f"process {busy.pid}" if busy.pid else "a process that has not written its id yet"
        raise UsageError(f"{out} is in use by another xpnn-train run ({holder}); wait for it to "
                         f"end, or choose another --out") from None


def check_batches(settings, count):
    """Refuse, before training, an epoch whose last batch is one image with batch norm on
    (batch statistics need two: it would stop the run there)."""
    size = settings["batch_size"]
    if settings["batch_norm"] and count % size == 1:
        raise UsageError(f"{count} training images in batches of {size} leave a last batch of 1 "
                         f"image, and batch normalization needs at least 2 per batch: choose "
                         f"another --batch-size or --limit-train, or --no-batch-norm")


def check_room(out, run, has_checkpoint):
    """Refuse, before training, a file system without room for the run's saves (see
    :mod:`xpnn.checkpoint_room`): an OSError (ENOSPC) with the path, bytes needed and free."""
    size = checkpoint_bytes(run.net, run.settings.get("model", "lenet"), run.options,
                            run.resume_state())
    needed = room_needed(size, has_checkpoint)
    if free_bytes(out) < needed:
        copies = "its temporary copy" if has_checkpoint else "a second, temporary copy"
        raise no_room_error(out, needed, f"the checkpoint ({size} bytes), {copies} and the "
                            f"metrics and plot need", "nothing was trained")


def check_writable(out):
    """Create ``out`` and write a file there, so that a directory that cannot take the
    checkpoint fails now, with the reason (an OSError naming the path)."""
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryFile(dir=out):
        pass
