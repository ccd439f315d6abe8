"""tests/gpu/conftest.py: a test that leaves the CUDA context unusable stops the GPU suite, naming it.

Run through a real pytest process on a scratch suite whose conftest is the GPU suite's hook: the first test raises
the error torch raises after a device-side assert, the second would pass, the third raises an ordinary error.  The
oracle is pytest's own outcome line and the stop message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu.conftest import sticky_cuda_error

ROOT = Path(__file__).resolve().parents[2]


def test_sticky_errors_are_recognised() -> None:
    assert sticky_cuda_error(RuntimeError("CUDA error: device-side assert triggered\nSearch for ...")) == (
        "device-side assert triggered"
    )
    assert sticky_cuda_error(RuntimeError("CUDA error: an illegal memory access was encountered")) is not None
    assert sticky_cuda_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) is None  # recoverable
    assert sticky_cuda_error(AssertionError("device-side assert triggered")) is None  # a test's own assert
    assert sticky_cuda_error(None) is None


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(
        "from tests.gpu.conftest import pytest_configure, pytest_runtest_logreport, pytest_runtest_makereport"
        "  # noqa: F401\n"
    )
    (tmp_path / "test_scratch.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_the_suite_stops_after_a_sticky_cuda_error(tmp_path: Path) -> None:
    proc = _run(
        tmp_path,
        "def test_faults():\n"
        "    raise RuntimeError('CUDA error: device-side assert triggered')\n"
        "def test_after():\n"
        "    pass\n",
    )
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, proc.stdout  # not a plain failure: the rest never ran
    assert "1 failed in" in proc.stdout and "passed" not in proc.stdout  # test_after never ran
    assert "Interrupted: test_scratch.py::test_faults left the CUDA context unusable (device-side assert" in proc.stdout


def test_an_ordinary_failure_does_not_stop_the_suite(tmp_path: Path) -> None:
    proc = _run(tmp_path, "def test_fails():\n    assert 1 == 2\ndef test_after():\n    pass\n")
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED and "1 failed, 1 passed" in proc.stdout, proc.stdout
    assert "CUDA context" not in proc.stdout


def test_a_failures_traceback_is_written_when_it_fails_not_only_at_the_end(tmp_path: Path) -> None:
    """Round 31: the suite's time limit cut pytest before its summary, and the one failure left only its name.
    The traceback must sit between the failing test and the next one in the output."""
    proc = _run(
        tmp_path,
        "def test_fails():\n    assert 1 == 2, 'the message'\n"
        "def test_after():\n    print('AFTER')\n    assert 0, 'second'\n",
    )
    out = proc.stdout
    first = out.index("---- test_scratch.py::test_fails failed (call) ----")
    end = out.index("---- end of test_scratch.py::test_fails ----")
    assert first < out.index("the message", first) < end  # the message inside the early block
    assert end < out.index("---- test_scratch.py::test_after failed (call) ----")  # before the next test's
    assert end < out.index("short test summary info")  # and before pytest's own summary
