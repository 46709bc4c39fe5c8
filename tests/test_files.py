"""xpnn._files: writes are atomic (a temporary file beside the target, then a rename)."""
import os
import stat

import pytest

from xpnn import _files


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_write_that_fails_before_the_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    # A crash between writing and publishing must leave the previous file whole (the target is
    # never written directly) and no temporary file behind.
    target = tmp_path / "model.pkl"
    target.write_bytes(b"old contents")

    def replace(source, destination):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        _files.atomic_write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["model.pkl"]


def test_an_error_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="checksum"):
        with _files.atomic_writer(str(target)) as stream:
            stream.write(b"partial")
            raise ValueError("checksum mismatch")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["data.bin"]


def test_the_temporary_file_is_in_the_targets_directory(tmp_path, monkeypatch):
    # os.replace is atomic only within one file system: the temporary file sits beside the target.
    sources, real_replace = [], os.replace

    def replace(source, destination):
        sources.append(os.path.abspath(source))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "sub" / "out.json"
    target.parent.mkdir()
    _files.atomic_write_bytes(str(target), b"{}")
    assert target.read_bytes() == b"{}"
    assert len(sources) == 1 and os.path.dirname(sources[0]) == str(target.parent)
    assert sources[0] != str(target)


def test_the_written_file_gets_the_usual_umask_mode_not_the_private_temporary_one(tmp_path):
    target = tmp_path / "metrics.json"
    _files.atomic_write_bytes(str(target), b"[]")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~_umask()


def test_a_missing_directory_is_named_with_how_to_create_it(tmp_path):
    target = tmp_path / "missing" / "out.bin"
    with pytest.raises(FileNotFoundError) as info:
        _files.atomic_write_bytes(str(target), b"x")
    message = str(info.value)
    assert f"its directory {tmp_path / 'missing'} does not exist" in message
    assert f"os.makedirs({str(tmp_path / 'missing')!r})" in message and info.value.filename == str(target)
