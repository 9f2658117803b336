"""What the GPU suite (bench/gpu_suite.sh) relies on, checked here without a GPU.

The GPU image may lack optional packages and each device call is limited in time: the test
modules must import without hypothesis, and the suite must keep to its call budget and pack
what it has.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "bench" / "gpu_suite.sh"

BLOCK_HYPOTHESIS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hypothesis":
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
"""


def test_suite_script_parses():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


def test_test_modules_collect_without_hypothesis():
    """Property tests skip, every other test of the module is still collected."""
    code = BLOCK_HYPOTHESIS + (
        "import pytest\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:hypothesispytest', '-p', 'no:cacheprovider', "
        "'tests/test_block.py', 'tests/test_convert.py', '-k', 'random or transition_matches', "
        "'-rs']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "hypothesis is not installed" in out.stdout
    assert " passed" in out.stdout  # the non-hypothesis tests selected ran


def test_suite_keeps_to_its_call_budget_and_packs_what_it_has(tmp_path):
    """A step whose budget does not fit what is left of the call is not started (and counts
    as a failure); the results folder is packed for the device tool's $OUT."""
    results, pack = tmp_path / "gpu", tmp_path / "out"
    out = subprocess.run(
        ["bash", str(SUITE), str(results), "env,tests", str(pack)],
        cwd=ROOT,
        env={**os.environ, "CALL_BUDGET": "10", "PY": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "tests: not started" in (results / "steps.log").read_text()
    assert "hypothesis: present" in (results / "environment.txt").read_text()
    with tarfile.open(pack / "gpu-suite-upto-tests.tgz") as tgz:
        names = tgz.getnames()
    assert "gpu/environment.txt" in names and "gpu/steps.log" in names
