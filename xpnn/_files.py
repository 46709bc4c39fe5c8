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
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
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


def atomic_write_bytes(path, payload):
    """Write ``payload`` to ``path`` through a temporary file in the same directory and a rename."""
    with atomic_writer(path) as stream:
        stream.write(payload)
