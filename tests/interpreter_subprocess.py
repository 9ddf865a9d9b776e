"""Run a file of Triton-interpreter tests in a child pytest whose environment alone has TRITON_INTERPRET=1.

The fused kernels read TRITON_INTERPRET once, when pmserve.kernels.fused_lora is first imported, so the variable
has to be set before that import. Setting it in this pytest process would leak into every later test (and a test
that imported the kernels first would leave them compiled for CUDA). Instead tests/test_kernel*.py start a child
`python -m pytest tests/interpreted_*.py` with TRITON_INTERPRET=1 in its environment only and check what it ran:
exit status 0, exactly the expected number of tests, none failed, errored or skipped. The child's output is the
failure message when it is not so.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VAR = "TRITON_INTERPRET"
TIMEOUT_S = 1800


def require_interpreter(module: str) -> None:
    """Called first thing by a tests/interpreted_*.py module: it must run in a child that has TRITON_INTERPRET=1."""
    if os.environ.get(VAR) != "1":
        raise RuntimeError(
            f"{module}: needs {VAR}=1 in the environment before anything imports Triton; it runs through "
            f"tests/test_kernel*.py (a child pytest), or by hand as {VAR}=1 python -m pytest <this file>"
        )


def junit_counts(path: Path) -> dict[str, int]:
    """tests / failures / errors / skipped summed over the test suites of a JUnit XML report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def run_interpreted(cases: str, expected: int, tmp_path: Path) -> None:
    """Run the pytest file `cases` (relative to the repository root) in a child process with TRITON_INTERPRET=1
    and assert it ran exactly `expected` tests, all passed; this process's environment is left as it was."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")  # reported in this process's summary, with its reason
    before = os.environ.get(VAR)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}  # e.g. a -k there would drop tests
    env[VAR] = "1"
    report = tmp_path / "child-junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(ROOT / cases),
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        f"--basetemp={tmp_path / 'child'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    output = (proc.stdout + proc.stderr)[-20000:]
    assert os.environ.get(VAR) == before, f"{VAR} changed in the parent pytest process"
    assert proc.returncode == 0, f"{cases} with {VAR}=1 exited {proc.returncode}:\n{output}"
    assert report.is_file(), f"{cases}: the child wrote no JUnit report:\n{output}"
    counts = junit_counts(report)
    want = {"tests": expected, "failures": 0, "errors": 0, "skipped": 0}
    assert counts == want, f"{cases} with {VAR}=1 ran {counts}, expected {want}:\n{output}"
