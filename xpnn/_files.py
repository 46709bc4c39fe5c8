"""Atomic file writes (a temporary file in the same directory, then a rename) and a lock on a
directory for one run at a time.

A reader (or a crash) therefore sees either the old file or the new one,
never a truncated one. Used for downloads, checkpoints, pickled networks,
metrics and plots. A write that finds the disk full says how much room it
needed and how much there was, and leaves the old file as it was.
"""
import contextlib
import errno
import fcntl
import os
import shutil
import tempfile

#: errno values that mean the file system has no room (ENOSPC; EDQUOT: the user's quota).
NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def _current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path):
    """A binary stream whose bytes replace ``path`` only when the block ends without an error.

    The stream is a temporary file in the same directory, flushed, synced and
    renamed over ``path`` on success; on any exception (the caller may raise
    one, e.g. on a checksum mismatch) it is removed and ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    except OSError as error:  # it named the temporary file, which the caller never heard of
        raise _about_target(error, path, directory) from None
    try:
        # mkstemp creates the file private (0600); give it the usual umask-based mode.
        os.chmod(temporary, 0o666 & ~_current_umask())
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _about_target(error, path, directory):
    """``error`` (from making the temporary file) as the same type, about ``path`` (its
    ``filename``, which callers read, e.g. to say which option the path came from) and its
    directory."""
    if isinstance(error, FileNotFoundError) and not os.path.isdir(directory):
        reason = (f"its directory {directory} does not exist (create it first, e.g. "
                  f"os.makedirs({directory!r}), or pick another path)")
    elif isinstance(error, NotADirectoryError):
        reason = f"a part of its directory {directory} is not a directory"
    else:
        reason = f"no file can be made in its directory {directory}: {error.strerror or error}"
    return type(error)(error.errno, f"cannot write the file: {reason}", os.fspath(path))


def atomic_write_bytes(path, payload):
    """Write ``payload`` to ``path`` through a temporary file in the same directory and a rename.

    A full disk is an OSError (ENOSPC) that names ``path``, the bytes the
    temporary copy needs and the bytes free there; ``path`` keeps its old contents.
    """
    try:
        with atomic_writer(path) as stream:
            stream.write(payload)
    except OSError as error:
        if error.errno not in NO_ROOM:
            raise
        raise no_room_error(path, len(payload), "its temporary copy needs",
                            f"{os.path.basename(path)} is unchanged") from None


def free_bytes(path):
    """Bytes free for an unprivileged user on the file system of ``path`` (a directory)."""
    return shutil.disk_usage(path).free


def no_room_error(path, needed, what, outcome):
    """An ENOSPC OSError about ``path``: ``what`` ``needed`` bytes, how many are free, ``outcome``."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return OSError(errno.ENOSPC, f"no space left on the device of {directory}: {what} {needed} "
                   f"bytes, {free_bytes(directory)} are free; {outcome}", os.fspath(path))


class DirectoryBusy(Exception):
    """Another process holds the lock on a directory (see :class:`DirectoryLock`)."""

    def __init__(self, directory, pid):
        super().__init__(directory, pid)
        self.directory, self.pid = directory, pid


class DirectoryLock:
    """An exclusive advisory lock (``flock``) on a file in a directory, held until :meth:`release`.

    The kernel drops the lock when the process ends, however it ends (kill -9
    included), so no stale lock is ever left behind: the file stays, and the
    next run takes it over. While held, the file holds the holder's process id,
    which a refused process reports; it is emptied on release.
    """

    def __init__(self, directory, name):
        self.path = os.path.join(directory, name)
        self._handle = None

    def acquire(self):
        """Take the lock (creating the directory); raises DirectoryBusy naming the holder's pid."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handle = open(self.path, "a+")  # (never truncates what the holder wrote)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise DirectoryBusy(os.path.dirname(self.path), holder or None) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    @property
    def held(self):
        """Whether this object holds the lock."""
        return self._handle is not None

    def release(self):
        """Empty the file and drop the lock (nothing when not held)."""
        if self._handle is not None:
            self._handle.truncate(0)
            self._handle.close()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False
