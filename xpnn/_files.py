"""Atomic file writes: a temporary file in the same directory, then a rename.

A reader (or a crash) therefore sees either the old file or the new one,
never a truncated one. Used for downloads, checkpoints, pickled networks,
metrics and plots.
"""
import contextlib
import os
import tempfile


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
    """Write ``payload`` to ``path`` through a temporary file in the same directory and a rename."""
    with atomic_writer(path) as stream:
        stream.write(payload)
