"""Runs the multi-device tests (tests/multidevice/) in their own pytest process with 8 virtual CPU devices:
XLA's device count is fixed when JAX starts, and the rest of the suite runs on one device."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_multidevice_suite():
    env = {**os.environ, "JAXINFER_MULTIDEVICE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10",
                           os.path.join("tests", "multidevice")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3000)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
