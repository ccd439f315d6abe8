"""Hydra entry: ``python -m llm_perf_opt.runners.llm_profile_runner [overrides]`` (also ``llm-perf-opt``).

Thin on purpose: compose the config, call ``run_stage1``.  A user error prints one line plus a hint and
exits non-zero; the full traceback goes to the run log only.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the slow imports below: Ctrl-C while they load is one line too
    from llm_perf_opt.runners.startup import install_startup_handler

    install_startup_handler()

import logging
import os
import secrets
import sys
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig, OmegaConf

from llm_perf_opt import paths
from llm_perf_opt.errors import LlmPerfOptError, OutputError, RunInterrupted
from llm_perf_opt.runners.cli_errors import (
    check_dir_argument,
    create_run_dir,
    interrupted_error,
    unexpected_error_line,
)
from llm_perf_opt.runners.startup import take_back_sigint

CONF_DIR = str(paths.CONF_DIR)
log = logging.getLogger("llm_perf_opt")

# A short random suffix, fixed for the life of the process (use_cache): run dirs of two jobs started in
# the same second differ, while every reference to run_id within one job agrees.
OmegaConf.register_new_resolver("run_suffix", lambda: secrets.token_hex(2), use_cache=True, replace=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    # A log file on a full disk must not print "--- Logging error ---" with a traceback per record.
    logging.raiseExceptions = False
    job = _sweep_job_number()
    take_back_sigint()
    try:
        from llm_perf_opt.runners.settings import load_settings
        from llm_perf_opt.runners.stage1 import run_stage1  # slow (torch): inside the try, so Ctrl-C is one line

        # the one conversion: typed, validated settings before anything is loaded or written
        run_stage1(load_settings(cfg))
    except LlmPerfOptError as exc:
        _log_to_files_only(exc)
        if job is not None and not isinstance(exc, RunInterrupted):
            # One job of a sweep: sys.exit here would end the whole sweep (the in-process launcher runs the
            # jobs in this process) and skip sweep.md.  Report it, let the other jobs run; the job's row in
            # sweep.md is marked failed (no metrics.json / status failed) and main() exits non-zero.
            print(f"job {job}: {exc.one_line()}", file=sys.stderr)
            _FAILED_JOBS.append(job)
            return
        print(exc.one_line(), file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        # Ctrl-C before the run's own SIGINT handler is installed (model load, dataset scan) or after it is
        # removed: one line like every other stop, not a traceback.
        _log_to_files_only(exc)
        err = interrupted_error(Path(str(OmegaConf.select(cfg, "output.dir"))))
        print(err.one_line(), file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as exc:
        # A bug or an input nothing checked: one line on the console, the traceback only in run.log.
        _log_to_files_only(exc)
        line = unexpected_error_line(exc, _run_log())
        if job is not None:  # the sweep and its summary go on
            print(f"job {job}: {line}", file=sys.stderr)
            _FAILED_JOBS.append(job)
            return
        print(line, file=sys.stderr)
        sys.exit(1)


# Sweep jobs that failed in this process (the default launcher runs every job here).
_FAILED_JOBS: list[int] = []


def _sweep_job_number() -> int | None:
    """This job's number inside a multirun, or None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return int(hc.job.num) if hc.mode == RunMode.MULTIRUN else None


def main() -> None:
    """Console entry (``python -m ...``, ``llm-perf-opt``): check the run dir can be made, then Hydra."""
    problem = preflight_output_dir(sys.argv[1:])
    if problem is not None:
        print(problem.one_line(), file=sys.stderr)
        sys.exit(problem.exit_code)
    logging.raiseExceptions = False  # Hydra logs too: a full disk must not print handler tracebacks
    try:
        _hydra_main()
    except KeyboardInterrupt:  # inside Hydra's own start-up or shut-down, outside the job
        print(interrupted_error(None).one_line(), file=sys.stderr)
        sys.exit(RunInterrupted.exit_code)
    # A multirun with failed jobs normally ends in SweepSummaryCallback (it sees every launcher's jobs); this
    # covers a sweep run without that callback (hydra.callbacks overridden) on the in-process launcher.
    failed = sorted({str(j) for j in _FAILED_JOBS}, key=int)
    if failed:
        print(f"{len(failed)} sweep job(s) failed: {failed} (see sweep.md)", file=sys.stderr)
        sys.exit(LlmPerfOptError.exit_code)


_INFO_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion", "-p"}


def preflight_output_dir(argv: list[str], cwd: Path | None = None) -> OutputError | None:
    """Why the run (or sweep) dir cannot be created, or None.

    Hydra creates that directory itself, before ``_hydra_main`` runs, and a failure there (a parent is a
    regular file, or not writable) reaches the console as a raw traceback.  So the literal part of the
    directory (up to the first ``${``) is checked here first: the nearest existing ancestor must be a
    writable directory.
    """
    if any(a in _INFO_FLAGS for a in argv):
        return None
    multirun = any(a in ("-m", "--multirun") for a in argv) or "hydra.mode=MULTIRUN" in argv
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    value = _argv_value(argv, key)
    if value is None:
        try:
            tree = yaml.safe_load((Path(CONF_DIR) / "config.yaml").read_text())
            value = str(tree["hydra"]["sweep" if multirun else "run"]["dir"])
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            return None  # Hydra will report a broken config itself
    safety = check_dir_argument(key, value, _argv_value(argv, "resume"), cwd or Path.cwd(), multirun)
    if safety is not None:
        return safety
    literal = value.split("${", 1)[0]
    if not literal:
        return None
    target = Path(literal) if literal.endswith(("/", "\\")) or "${" not in value else Path(literal).parent
    if not target.is_absolute():
        target = (cwd or Path.cwd()) / target
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    hint = f"choose another with {key}=PATH"
    if not existing.is_dir():
        return OutputError(f"cannot create the run directory {value}: {existing} is a file, not a directory", hint)
    if not os.access(existing, os.W_OK | os.X_OK):
        return OutputError(f"cannot create the run directory {value}: {existing} is not writable", hint)
    return create_run_dir(key, value, cwd or Path.cwd()) if not multirun else None


def _argv_value(argv: list[str], key: str) -> str | None:
    """The value of the last ``key=value`` override (quotes stripped), or None."""
    value: str | None = None
    for arg in argv:
        name, sep, raw = arg.partition("=")
        if sep and name.lstrip("+~") == key:
            value = raw.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
    return value


def _run_log() -> Path | None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    return None


def _log_to_files_only(exc: BaseException) -> None:
    """The traceback belongs in run.log, not on the console (where one line + hint is printed)."""
    record = logging.LogRecord("llm_perf_opt", logging.ERROR, __file__, 0, "run failed: %s", (exc,), None)
    record.exc_info = (type(exc), exc, exc.__traceback__)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


if __name__ == "__main__":
    main()
