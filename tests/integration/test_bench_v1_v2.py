"""benchmarks/bench_v1_v2.py as a CPU smoke test: the tiny presets of v1 and v2 on one 600×500 page, every column
through the real CLI, then the native-vs-transformers logits check on the same page.

Oracles: the column set of the script's contract; image tokens hand-computed from the geometry (a 600×500 page
is below both crop thresholds, so only the 1024-px global view: v1 16·(16+1)+1 = 273 with its newlines and
separator, v2 16² + 1 = 257); the logits check's own tolerance (float32, 1e-4 relative, as the fixtures).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm_perf_opt.errors import ConfigError
from llm_perf_opt.runners.backends.hf_native import hf_native_class
from tests.integration.conftest import ROOT, cli_env

COLUMNS = [
    "v1 native eager",
    "v1 native fast",
    "v2 native eager",
    "v2 native eager + grouped experts",
    "v2 native fast",
    "v2 transformers native",
]
IMAGE_TOKENS = {"v1": 16 * (16 + 1) + 1, "v2": 16 * 16 + 1}


@pytest.mark.slow
def test_bench_v1_v2_tiny_on_cpu_has_every_column_and_passes_the_logits_check(tmp_path: Path) -> None:
    try:
        hf_native_class()
    except ConfigError as exc:
        pytest.skip(f"transformers' native DeepSeek-OCR-2 class is not available: {exc.message}")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_v1_v2.py"), "--tiny", "--device", "cpu",
           "--out", str(tmp_path), "--sizes", "600x500", "--repeats", "1", "--tokens", "3",
           "--warmup-rounds", "0", "--check-steps", "4"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (md,) = tmp_path.glob("*-cpu-v1v2-tiny.md")
    (js,) = tmp_path.glob("*-cpu-v1v2-tiny.json")
    text, res = md.read_text(), json.loads(js.read_text())

    header = next(line for line in text.splitlines() if line.startswith("| metric |"))
    assert header == "| metric | " + " | ".join(COLUMNS) + " |"
    cols = res["columns"]
    assert list(cols) == COLUMNS
    for name, col in cols.items():
        if name == "v2 native fast" and "absent" in col:  # refused until v2's fast path exists: a reason, no crash
            assert "ConfigError" in col["absent"] and "fast" in col["absent"]
            continue
        assert "absent" not in col, (name, col)
        assert col["image_tokens"] == str(IMAGE_TOKENS[name[:2]])
        assert col["sam_ms"] > 0 and col["clip_ms"] > 0 and col["projector_ms"] > 0 and col["tpot_ms"] > 0
        assert col["sam_ms"] + col["clip_ms"] + col["projector_ms"] <= col["vision_ms"] < col["prefill_ms"]
        assert col["peak_gib"] is None and col["sam_mfu_pct"] is None  # CPU: absent, with the reason below
    assert cols["v2 transformers native"]["backend"] == "hf_native"
    assert "- MFU: device is the CPU" in text

    chk = res["logits_check"]
    assert chk["passed"] and chk["greedy_tokens_equal"] and chk["greedy_steps"] == 4
    assert chk["prefill_max_rel_diff"] < 1e-4 and chk["teacher_forced_decode_max_rel_diff"] < 1e-4
    assert chk["prompt_tokens"] > IMAGE_TOKENS["v2"]
    assert "Verdict (max rel ≤ 0.0001 and tokens equal): PASS" in text
