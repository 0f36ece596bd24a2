"""Runs tests/isolated/ (the executable cache) in a fresh pytest process: a serialised XLA CPU executable loaded
into a process that has compiled other programs first can fail with "Function ... not found" (why the executable
cache is opt-in, EngineArgs.executable_cache), so its tests must not inherit this session's compilations."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_isolated_suite():
    env = {**os.environ, "JAXINFER_ISOLATED": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join("tests", "isolated")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
