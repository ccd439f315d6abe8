"""profiling/rss.py: the run's own peak RSS (reset, then read back), and the fallback when the reset is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm_perf_opt.profiling.rss import peak_rss_bytes, reset_peak_rss

MIB = 2**20


# Run in a fresh interpreter: inside a long test session the heap may already hold freed, still-resident pages that
# a new block reuses without raising the RSS (one full-suite run measured no growth at all from a 256 MiB block).
_RESET_SCRIPT = """
import json
from llm_perf_opt.profiling.rss import peak_rss_bytes, reset_peak_rss
out = {"refused": reset_peak_rss()}
out["base"] = peak_rss_bytes()
block = bytearray(b"\\x01") * (256 << 20)  # every byte written: resident
out["grown"] = peak_rss_bytes()
del block
out["reset_again"] = reset_peak_rss()
out["after"] = peak_rss_bytes()
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak-RSS reset is Linux's /proc/self/clear_refs")
def test_reset_forgets_an_earlier_peak_and_a_new_allocation_raises_it() -> None:
    res = subprocess.run([sys.executable, "-c", _RESET_SCRIPT], capture_output=True, text=True, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    if got["refused"] is not None:
        pytest.skip("this kernel refuses clear_refs")
    assert got["grown"] >= got["base"] + 200 * MIB  # the 256 MiB block is in the peak
    assert got["reset_again"] is None
    assert got["after"] < got["grown"] - 200 * MIB  # the freed block's peak is gone after the reset


def test_a_refused_reset_says_why_and_the_reading_falls_back(tmp_path: Path) -> None:
    proc = tmp_path / "proc"  # no clear_refs and no status: a non-Linux or locked-down /proc
    reason = reset_peak_rss(proc)
    assert reason is not None and "lifetime high-water mark" in reason
    assert peak_rss_bytes(proc) > 10 * MIB  # ru_maxrss of this interpreter, in bytes


def test_vmhwm_is_read_in_bytes(tmp_path: Path) -> None:
    (tmp_path / "status").write_text("Name:\tpython\nVmPeak:\t  999 kB\nVmHWM:\t  12345 kB\nVmRSS:\t 100 kB\n")
    assert peak_rss_bytes(tmp_path) == 12345 * 1024
