"""The backend x check table of the parity suite: layout, order, failures and skip reasons."""
import os
import pathlib
import shutil
import subprocess
import sys
import types

import parity_table

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent


def _report(check, backend, when="call", outcome="passed", reason="", order=(0,)):
    longrepr = ("test_x.py", 1, f"Skipped: {reason}") if outcome == "skipped" else None
    return types.SimpleNamespace(
        when=when, passed=outcome == "passed", failed=outcome == "failed",
        skipped=outcome == "skipped", longrepr=longrepr,
        user_properties=[(parity_table.PROPERTY, {"check": check, "backend": backend,
                                                  "order": ["test_x.py", 10, *order]})])


def test_rows_columns_failures_and_skip_reasons():
    table = parity_table.ParityTable(["numpy", "strict", "cupy"])
    # Out of order on purpose, as with pytest-xdist.
    table.record(_report("test_b", "strict", outcome="failed", order=(1,)))
    table.record(_report("test_b", "cupy", when="setup", outcome="skipped",
                         reason="gpu: no CUDA device", order=(1,)))
    table.record(_report("test_a", "strict", order=(0,)))
    table.record(_report("test_a", "numpy", order=(0,)))
    table.record(_report("test_b", "numpy", order=(1,)))
    table.record(_report("test_b", "numpy", when="teardown", outcome="failed", order=(1,)))
    table.record(_report("test_b", "strict", when="teardown", order=(1,)))
    table.record(types.SimpleNamespace(when="call", passed=True, failed=False, skipped=False,
                                       longrepr=None, user_properties=[]))   # not parity
    lines = table.lines()
    assert lines[0].split() == ["check", "numpy", "strict", "cupy"]
    assert lines[1].split() == ["test_a", "passed", "passed", "-"]
    assert lines[2].split() == ["test_b", "FAILED", "FAILED", "skipped"]
    assert lines[3].startswith("2 passed, 2 failed, 1 skipped")
    assert lines[4] == "skipped cupy (1x): gpu: no CUDA device"


def test_no_parity_tests_no_table():
    assert parity_table.ParityTable(["numpy"]).lines() == []


def test_table_printed_by_a_real_run(tmp_path):
    # A small suite with the real conftest: one check fails on strict only, one skips.
    for name in ("conftest.py", "parity_table.py", "fault_table.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    parity: parity\n")
    (tmp_path / "test_demo.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.parity\n"
        "def test_fails_on_one_library(parity_backend):\n"
        "    assert parity_backend.name != 'array-api-strict'\n"
        "@pytest.mark.parametrize('size', [3, 1])\n"
        "def test_sized(parity_backend, size):\n"
        "    if size == 1:\n"
        "        pytest.skip('size 1 is not interesting')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "parity",
         "-k", "numpy or strict", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout
    assert result.returncode == 1, output + result.stderr
    table = output[output.index(parity_table.TITLE):].splitlines()
    header = table[1].split()
    assert header == ["check", "numpy", "numpy-f32", "strict", "strict-device1",
                      "strict-no_float64"]
    rows = {line.split()[0]: line.split()[1:] for line in table[2:5]}
    assert rows["test_fails_on_one_library"] == ["passed", "passed", "FAILED", "FAILED", "FAILED"]
    assert rows["test_sized[3]"] == ["passed"] * 5
    assert rows["test_sized[1]"] == ["skipped"] * 5
    assert any(line.startswith("skipped numpy (1x): size 1 is not interesting")
               for line in table)
