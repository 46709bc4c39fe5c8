"""The case x outcome table of ``pytest -m faults``: cases by backend, 'any' for cases run once."""
import os
import pathlib
import shutil
import subprocess
import sys

import fault_table

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent


def test_table_printed_by_a_real_run(tmp_path):
    # A small suite with the real conftest: a backend case failing on strict only, a case run
    # once, a parametrized case run once that skips; an unmarked test stays out of the table.
    for name in ("conftest.py", "parity_table.py", "fault_table.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    faults: faults\n    parity: p\n")
    (tmp_path / "test_demo.py").write_text(
        "import pytest\n"
        "@pytest.mark.faults\n"
        "def test_on_every_backend(backend):\n"
        "    assert backend.name != 'array-api-strict'\n"
        "@pytest.mark.faults\n"
        "def test_once():\n"
        "    pass\n"
        "@pytest.mark.faults\n"
        "@pytest.mark.parametrize('size', [3, 1])\n"
        "def test_sized(size):\n"
        "    if size == 1:\n"
        "        pytest.skip('size 1 is not interesting')\n"
        "def test_not_a_fault():\n"
        "    pass\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not torch and "
         "not cupy", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120)
    output = result.stdout
    assert result.returncode == 1, output + result.stderr
    table = output[output.index(fault_table.TITLE):].splitlines()
    assert table[1].split() == ["case", "numpy", "strict", "strict-device1", "any"]
    rows = {line.split()[0]: line.split()[1:] for line in table[2:6]}
    assert rows == {"test_on_every_backend": ["passed", "FAILED", "FAILED", "-"],
                    "test_once": ["-", "-", "-", "passed"],
                    "test_sized[3]": ["-", "-", "-", "passed"],
                    "test_sized[1]": ["-", "-", "-", "skipped"]}
    assert table[6].startswith("3 passed, 2 failed, 1 skipped (4 cases x 4 backends")
    assert "skipped any (1x): size 1 is not interesting" in table
