"""Hydra entry: ``python -m llm_perf_opt.runners.llm_profile_runner [overrides]`` (also ``llm-perf-opt``).

Thin on purpose: compose the config, call ``run_stage1``.  A user error prints one line plus a hint and
exits non-zero; the full traceback goes to the run log only.
"""

from __future__ import annotations

import logging
import secrets
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from llm_perf_opt.errors import LlmPerfOptError

CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")
log = logging.getLogger("llm_perf_opt")

# A short random suffix, fixed for the life of the process (use_cache): run dirs of two jobs started in
# the same second differ, while every reference to run_id within one job agrees.
OmegaConf.register_new_resolver("run_suffix", lambda: secrets.token_hex(2), use_cache=True, replace=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from llm_perf_opt.runners.stage1 import run_stage1

    try:
        run_stage1(cfg)
    except LlmPerfOptError as exc:
        _log_to_files_only(exc)
        print(exc.one_line(), file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception:
        log.exception("run failed with an unexpected error (traceback above is also in the run log)")
        raise


def _log_to_files_only(exc: BaseException) -> None:
    """The traceback belongs in run.log, not on the console (where one line + hint is printed)."""
    record = logging.LogRecord("llm_perf_opt", logging.ERROR, __file__, 0, "run failed: %s", (exc,), None)
    record.exc_info = (type(exc), exc, exc.__traceback__)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


if __name__ == "__main__":
    main()
