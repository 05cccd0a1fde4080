"""Lint and type checks as tests, so `python -m pytest` (and CI) fails on a finding: `ruff check`
on the code (rules in pyproject.toml's [tool.ruff]) and `mypy` on the subset [tool.mypy] lists.
The same commands by hand: `ruff check shared services loadtest tests deploy` and `mypy`."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINTED = ["shared", "services", "loadtest", "tests", "deploy"]


def tool(name: str) -> str:
    """The tool installed beside this Python (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: pip install -e '.[test]'")
    return found


def run(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)


def test_ruff_finds_nothing():
    done = run([tool("ruff"), "check", "--no-cache", "--output-format", "concise", *LINTED], 300)
    assert done.returncode == 0, f"ruff check found:\n{done.stdout}{done.stderr}"


def test_mypy_finds_nothing_in_the_checked_subset():
    # no incremental cache in the tree (.mypy_cache): every run checks from scratch
    done = run([tool("mypy"), "--no-incremental", "--cache-dir", "/dev/null"], 600)
    assert done.returncode == 0, f"mypy found:\n{done.stdout}{done.stderr}"
