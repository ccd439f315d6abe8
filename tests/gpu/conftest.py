"""The GPU suite stops at the first test that leaves the CUDA context unusable.

A device-side assert (an out-of-bounds index in a kernel), an illegal address or a launch failure is sticky: every
later CUDA call in the process raises the same error.  Round 27's first full run on an H100 turned one such fault
into 43 failures and 20 errors in tests that had nothing wrong with them.  After such a test the session stops
(as ``-x`` would) and says which test it was and how to run the rest in a fresh process.

Each failure's traceback is also written the moment the test fails, not only in pytest's summary at the end:
the device runs the suite under a time limit, and round 31's run was cut before its summary, so the one failure
it had left only its name.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

# messages of the CUDA errors after which the process's context cannot run another kernel
STICKY_CUDA_ERRORS = (
    "device-side assert triggered",
    "an illegal memory access was encountered",
    "an illegal instruction was encountered",
    "unspecified launch failure",
    "misaligned address",
)


def sticky_cuda_error(exc: BaseException | None) -> str | None:
    """The sticky CUDA error ``exc`` reports (one of :data:`STICKY_CUDA_ERRORS`), or None."""
    if not isinstance(exc, RuntimeError):  # torch.AcceleratorError is a RuntimeError
        return None
    text = str(exc)
    return next((msg for msg in STICKY_CUDA_ERRORS if msg in text), None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, Any]:
    report = yield
    error = sticky_cuda_error(call.excinfo.value if call.excinfo is not None else None)
    if error is not None:
        item.session.shouldstop = (
            f"{item.nodeid} left the CUDA context unusable ({error}); every later test in this process would fail "
            "with it. Find the kernel with CUDA_LAUNCH_BLOCKING=1 on that test alone, and run the tests after it in "
            "a new process"
        )
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A failed test's traceback, written as soon as it fails (between ``-v``'s result lines)."""
    if not report.failed or _config is None:
        return
    # looked up here: the terminal reporter registers itself in its own pytest_configure, after this conftest's
    reporter = _config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    reporter.write_line("")
    reporter.write_line(f"---- {report.nodeid} failed ({report.when}) ----")
    for line in report.longreprtext.splitlines():
        reporter.write_line(line)
    reporter.write_line(f"---- end of {report.nodeid} ----")


_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config
