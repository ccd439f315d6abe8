"""Hydra callback that ends a multirun: writes the sweep summary and sets the exit status from it.

The summary (``report/sweep.py``) is the one place that sees every job, whichever launcher ran them (in this
process, joblib workers, SLURM), so the sweep's exit status is decided here from its rows: a failed job
prints one line and exits non-zero, after every job ran and sweep.md was written.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from llm_perf_opt.errors import LlmPerfOptError
from llm_perf_opt.report.sweep import summarize_sweep

log = logging.getLogger(__name__)


class SweepSummaryCallback(Callback):
    """Writes sweep.md / sweep.json when a multirun ends; exits non-zero when a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(str(config.hydra.sweep.dir))
        if not root.is_dir():
            return
        rows = summarize_sweep(root)
        log.info("sweep summary: %s", root / "sweep.md")
        failed = [str(r["job"]) for r in rows if r["status"] == "failed"]
        if failed:
            print(f"{len(failed)} sweep job(s) failed: {failed} (see sweep.md)", file=sys.stderr)
            # SystemExit passes through Hydra's error reporting (it catches Exception only): the process ends
            # with the project's exit code, after the summary is on disk.
            raise SystemExit(LlmPerfOptError.exit_code)
