"""Issue 16 through the real CLI: no input may destroy a file, corrupt the journal, pass as success or print a
traceback.  One test (or parametrised group) per defect class:

1. run-dir safety (marker, lock)        2. journal torn / corrupt, resume on it
3. full disk (real tmpfs where the machine allows, else injected ENOSPC per file)
4. exit status tells the truth          5. unexpected errors and Ctrl-C: one line, traceback in run.log only
6. inputs as users have them (.PNG, 16-bit / float pages, FIFOs, names with | and newlines)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import (
    ROOT,
    SMALL,
    CliResult,
    assert_clean_failure,
    cli_command,
    cli_env,
    read_jsonl,
    read_metrics,
    run_cli,
)
from tests.integration.inject_oom import INJECT_OOM_ENV

TWO_PAGES = [*SMALL, "dataset.sizes=[[300,200],[400,300]]", "infer.ignore_eos=true"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_no_traceback(result: CliResult) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.describe()
    assert "--- Logging error ---" not in result.stderr, result.describe()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete two-page run; tests copy it before touching it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli(TWO_PAGES, run_dir)
    assert result.returncode == 0, result.describe()
    return run_dir


def _copy(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


# ------------------------------------------------------------------------------------------ 1. run-dir safety


def test_config_dir_is_never_a_run_dir() -> None:
    before = _sha(ROOT / "conf" / "config.yaml")
    result = run_cli(SMALL, ROOT / "conf")
    line = assert_clean_failure(result, "OutputError", "conf")
    print(f"\nconf as run dir: {line}")
    assert _sha(ROOT / "conf" / "config.yaml") == before
    assert not (ROOT / "conf" / ".hydra").exists() and not (ROOT / "conf" / "run.log").exists()


@pytest.mark.parametrize(
    ("arg", "needle"),
    [("hydra.run.dir=", "hydra.run.dir is empty"), ("hydra.run.dir=.", "project root")],
    ids=["empty", "repo-root"],
)
def test_empty_or_root_run_dir_is_refused(arg: str, needle: str) -> None:
    before = sorted(os.listdir(ROOT))
    line = assert_clean_failure(run_cli([*SMALL, arg]), "OutputError", needle)
    print(f"\n{arg}: {line}")
    assert sorted(os.listdir(ROOT)) == before


def test_foreign_directory_is_refused_and_untouched(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own file\n")
    line = assert_clean_failure(run_cli(SMALL, mine), "OutputError", "not empty", "no run created it")
    print(f"\nforeign dir: {line}")
    assert os.listdir(mine) == ["config.yaml"] and (mine / "config.yaml").read_text() == "my own file\n"


def test_finished_run_is_not_rerun_into_without_resume(tmp_path: Path, finished_run: Path) -> None:
    run_dir = _copy(finished_run, tmp_path / "run")
    journal = (run_dir / "pages.jsonl").read_bytes()
    line = assert_clean_failure(run_cli(TWO_PAGES, run_dir), "OutputError", "already holds a run", "2 journaled")
    print(f"\nrerun into finished: {line}")
    assert (run_dir / "pages.jsonl").read_bytes() == journal
    assert len(read_metrics(run_dir)["pages"]) == 2


def test_run_dir_under_proc_is_one_line(tmp_path: Path) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    line = assert_clean_failure(run_cli(SMALL, Path("/proc/llm-perf-opt-x")), "OutputError", "/proc/llm-perf-opt-x")
    print(f"\n/proc: {line}")


def test_live_lock_makes_a_second_writer_fail_fast(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(["sleep", "60"])  # a live process that "holds" the lock
    try:
        (run_dir / ".lock").write_text(f"{holder.pid} {os.uname().nodename}\n")
        line = assert_clean_failure(run_cli(SMALL, run_dir), "OutputError", f"another run (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    print(f"\nlocked: {line}")
    assert not (run_dir / "pages.jsonl").exists() and not (run_dir / "metrics.json").exists()


def test_stale_lock_is_taken_over_with_a_note(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is no longer running
    (run_dir / ".lock").write_text(f"{dead.pid} {os.uname().nodename}\n")
    result = run_cli(SMALL, run_dir)
    assert result.returncode == 0, result.describe()
    notes = read_metrics(run_dir)["notes"]
    assert any(f"took over the stale lock {run_dir / '.lock'} of pid {dead.pid}" in n for n in notes), notes
    assert not (run_dir / ".lock").exists()  # released at the end


def test_two_concurrent_writers_into_one_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*SMALL, f"hydra.run.dir={run_dir}"]
    procs = [
        subprocess.Popen(cli_command(args), cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    codes = sorted(p.returncode for p in procs)
    stderr = "\n".join(err.decode() for _, err in outs)
    assert codes == [0, 2], stderr
    assert "Traceback" not in stderr
    assert "another run (pid" in stderr or "already holds a run" in stderr, stderr
    assert len(read_jsonl(run_dir / "pages.jsonl")) == 1
    assert len(read_metrics(run_dir)["pages"]) == 1


# ------------------------------------------------------------------------------------------ 2. journal


def test_torn_journal_resume_twice(tmp_path: Path, finished_run: Path) -> None:
    """SIGKILL tore the last line; resume must neither glue onto it nor die on it, now or next time."""
    run_dir = _copy(finished_run, tmp_path / "run")
    journal = run_dir / "pages.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])  # page 2's record torn mid-write
    args = [*TWO_PAGES, "repeats=2", f"resume={run_dir}"]
    first = run_cli(args, run_dir)
    assert first.returncode == 0, first.describe()
    _assert_no_traceback(first)
    assert (
        "pages.jsonl line 2: torn (no newline at the end: a crash mid-write), skipped"
        in (run_dir / "run.log").read_text()
    )
    raw = journal.read_bytes().split(b"\n")
    assert raw[1] == lines[1][: len(lines[1]) // 2]  # the torn text kept its own line
    keys = {(r["page_id"], r["repeat"]) for r in (json.loads(x) for x in raw[2:] if x)}
    # page 2 repeat 0 (torn) was measured again, plus both pages of repeat 1; page 1 repeat 0 carried over
    assert keys == {("synthetic-400x300-1", 0), ("synthetic-300x200-0", 1), ("synthetic-400x300-1", 1)}
    again = run_cli(args, run_dir)  # the next resume reads the same journal: nothing left to run
    assert again.returncode == 0, again.describe()
    _assert_no_traceback(again)
    metrics = read_metrics(run_dir)
    assert metrics["run"]["status"] == "complete"
    assert len(metrics["pages"]) == 4 and all(p["status"] == "ok" for p in metrics["pages"])


@pytest.mark.parametrize(
    "bad", [b"garbage", b'{"foo": 1}', b"\xff\xfe\x00binary"], ids=["garbage", "foreign-json", "not-utf8"]
)
def test_bad_journal_line_is_skipped_and_named(tmp_path: Path, finished_run: Path, bad: bytes) -> None:
    run_dir = _copy(finished_run, tmp_path / "run")
    journal = run_dir / "pages.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + bad + b"\n" + lines[1])
    result = run_cli([*TWO_PAGES, "repeats=2", f"resume={run_dir}"], tmp_path / "next")
    assert result.returncode == 0, result.describe()
    _assert_no_traceback(result)
    notes = read_metrics(tmp_path / "next")["notes"]
    assert any(n.startswith("resume: pages.jsonl line 2:") for n in notes), notes
    assert len(read_metrics(tmp_path / "next")["pages"]) == 4


def test_duplicate_records_are_collapsed(tmp_path: Path, finished_run: Path) -> None:
    run_dir = _copy(finished_run, tmp_path / "run")
    journal = run_dir / "pages.jsonl"
    journal.write_bytes(journal.read_bytes() * 3)  # every record three times
    result = run_cli([*TWO_PAGES, f"resume={run_dir}"], tmp_path / "next")
    assert result.returncode == 0, result.describe()
    pages = read_metrics(tmp_path / "next")["pages"]
    assert len(pages) == 2  # not 6: n in the aggregates counts each (page, repeat) once
    assert read_metrics(tmp_path / "next")["aggregates"]["prefill_ms"]["n"] == 2


@pytest.mark.parametrize(
    ("override", "needle"),
    [("seed=1", "seed: 0 -> 1"), ("use_flash_attn=false", "use_flash_attn: True -> False")],
    ids=["seed", "flash-attn"],
)
def test_resume_refuses_other_weights_seed_or_attention(
    tmp_path: Path, finished_run: Path, override: str, needle: str
) -> None:
    result = run_cli([*TWO_PAGES, override, f"resume={finished_run}"], tmp_path / "r")
    line = assert_clean_failure(result, "ConfigError", needle)
    print(f"\nresume {override}: {line}")


def test_resume_without_config_yaml_still_checks(tmp_path: Path, finished_run: Path) -> None:
    run_dir = _copy(finished_run, tmp_path / "run")
    (run_dir / "config.yaml").unlink()
    mixed = run_cli([*TWO_PAGES, "infer.max_new_tokens=16", f"resume={run_dir}"], tmp_path / "a")
    assert_clean_failure(mixed, "ConfigError", "infer.max_new_tokens: 8 -> 16")  # from metrics.json's run.config
    (run_dir / "metrics.json").unlink()
    blind = run_cli([*TWO_PAGES, f"resume={run_dir}"], tmp_path / "b")
    line = assert_clean_failure(blind, "ConfigError", "cannot tell which settings")
    print(f"\nresume without config: {line}")


def test_resume_into_a_run_of_an_older_version(tmp_path: Path, finished_run: Path) -> None:
    """A run written before a setting existed lacks its key: at the default it resumes (and says so), at another
    value it is refused like any other difference."""
    import yaml

    run_dir = _copy(finished_run, tmp_path / "run")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    del config["infer"]["context_len_mode"]  # what a round-1 run's config.yaml looks like
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    at_default = run_cli([*TWO_PAGES, "repeats=2", f"resume={run_dir}"], tmp_path / "next")
    assert at_default.returncode == 0, at_default.describe()
    metrics = read_metrics(tmp_path / "next")
    assert any("predates infer.context_len_mode" in n for n in metrics["notes"]), metrics["notes"]
    assert any("2 finished page runs carried over" in n for n in metrics["notes"]), metrics["notes"]
    other = run_cli([*TWO_PAGES, "infer.context_len_mode=max", f"resume={run_dir}"], tmp_path / "other")
    assert_clean_failure(other, "ConfigError", "infer.context_len_mode: 'auto' -> 'max'")


def _png(path: Path, shade: int, size: tuple[int, int] = (300, 200)) -> None:
    Image.new("RGB", size, (shade, shade, shade)).save(path)


def test_resume_remeasures_a_page_whose_file_changed(tmp_path: Path) -> None:
    pages = tmp_path / "pages"
    pages.mkdir()
    _png(pages / "a.png", 255)
    _png(pages / "b.png", 200)
    args = [*SMALL, "dataset=folder", f"dataset.root={pages}", "infer.ignore_eos=true"]
    first = run_cli(args, tmp_path / "run1")
    assert first.returncode == 0, first.describe()
    _png(pages / "b.png", 10)  # another image under the same name
    second = run_cli([*args, f"resume={tmp_path / 'run1'}"], tmp_path / "run2")
    assert second.returncode == 0, second.describe()
    notes = read_metrics(tmp_path / "run2")["notes"]
    assert any(n.startswith("resume: page b.png is measured again: its content changed") for n in notes), notes
    predictions = read_jsonl(tmp_path / "run2" / "predictions.jsonl")
    assert [p["page_id"] for p in predictions] == ["b.png"]  # a.png carried over, b.png decoded again


# ------------------------------------------------------------------------------------------ 3. full disk

ENOSPC_HOOK = '''
"""Test double: writes to one file name fail with ENOSPC (after ENOSPC_AFTER successful ones)."""
import errno
import os

_real_write = os.write
_target = os.environ.get("ENOSPC_FILE", "")
_after = int(os.environ.get("ENOSPC_AFTER", "0"))
_seen = [0]


def _write(fd, data):
    try:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        name = ""
    if name == _target:
        _seen[0] += 1
        if _seen[0] > _after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _real_write(fd, data)


if _target:
    os.write = _write

if os.environ.get("ENOSPC_TRACE"):
    import torch.profiler

    def _export(self, path, *args, **kwargs):
        with open(path, "w") as fh:  # half a trace, then the disk is full
            fh.write('{"traceEvents": [')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    torch.profiler.profile.export_chrome_trace = _export
'''


def _hook_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(textwrap.dedent(ENOSPC_HOOK))
    pythonpath = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": pythonpath, **extra}


def _assert_nothing_left_behind(run_dir: Path) -> None:
    leftovers = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp") or p.name == "trace.json"]
    assert leftovers == [], leftovers
    assert not (run_dir / ".space-reserve").exists() and not (run_dir / ".lock").exists()


THREE_PAGES = [*SMALL, "dataset.sizes=[[300,200],[400,300],[500,400]]"]


@pytest.mark.parametrize(
    ("target", "after", "journaled"),
    [("pages.jsonl", 1, 1), ("predictions.jsonl", 1, 2)],
    ids=["journal", "predictions"],
)
def test_injected_enospc_loses_no_measured_page(tmp_path: Path, target: str, after: int, journaled: int) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(THREE_PAGES, run_dir, env=_hook_env(tmp_path, ENOSPC_FILE=target, ENOSPC_AFTER=str(after)))
    line = assert_clean_failure(result, "OutputError", target, os.strerror(28))
    print(f"\nENOSPC on {target}: {line}")
    _assert_no_traceback(result)
    metrics = read_metrics(run_dir)
    assert metrics["run"]["status"] == "partial", metrics["run"]
    assert "2 of 3 page run(s) finished" in metrics["run"]["status_reason"]  # the failing page was measured
    journal = read_jsonl(run_dir / "pages.jsonl")
    assert len(journal) == journaled  # the journal is written before predictions: page 2 is in it
    assert {p["page_id"] for p in metrics["pages"]} >= {r["page_id"] for r in journal}
    assert len(metrics["pages"]) == 2  # every measured page reached metrics.json
    assert "PARTIAL" in (run_dir / "report.md").read_text()
    _assert_nothing_left_behind(run_dir)


def test_injected_enospc_in_the_trace_leaves_no_temp_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(SMALL, run_dir, env=_hook_env(tmp_path, ENOSPC_TRACE="1"))
    assert result.returncode == 0, result.describe()
    _assert_no_traceback(result)
    _assert_nothing_left_behind(run_dir)
    assert not (run_dir / "trace.json.gz").exists()
    unavailable = {u["metric"]: u["reason"] for u in read_metrics(run_dir)["unavailable"]}
    assert "No space left on device" in unavailable["operators"]


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path) -> None:
    """Write until the filesystem refuses: the next write of the run fails with ENOSPC."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for block in (b"\0" * 65536, b"\0" * 4096, b"\0" * 1):
            with contextlib.suppress(OSError):
                while os.write(fd, block):
                    pass
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_real_full_disk_mid_run(tmp_path: Path) -> None:
    """A 4 MB tmpfs filled to the last byte after the first page: PARTIAL, nothing lost, one line."""
    with _tmpfs(tmp_path / "disk", "4m") as disk:
        run_dir = disk / "run"
        args = [*THREE_PAGES, "infer.max_new_tokens=48", "infer.ignore_eos=true", f"hydra.run.dir={run_dir}"]
        journal = run_dir / "pages.jsonl"
        pipe = subprocess.PIPE
        proc = subprocess.Popen(cli_command(args), cwd=ROOT, env=cli_env(), stdout=pipe, stderr=pipe)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.is_file() and journal.read_bytes().count(b"\n") >= 1:
                _fill(disk)
                break
            time.sleep(0.02)
        out, err = proc.communicate(timeout=180)
        result = CliResult(args, proc.returncode, out.decode(), err.decode(), run_dir)
        measured = {(r["page_id"], r["repeat"]) for r in read_jsonl(journal)}
        if result.returncode == 0:
            pytest.skip("the run finished before the disk could be filled")
        line = assert_clean_failure(result, "OutputError", "No space left on device")
        print(f"\nreal full disk: {line}")
        _assert_no_traceback(result)
        metrics = read_metrics(run_dir)
        assert metrics["run"]["status"] == "partial", metrics["run"]
        assert measured <= {(p["page_id"], p["repeat"]) for p in metrics["pages"]}
        assert "PARTIAL" in (run_dir / "report.md").read_text()
        _assert_nothing_left_behind(run_dir)


# ------------------------------------------------------------------------------------------ 4. exit status


def test_zero_measured_pages_is_failed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(SMALL, run_dir, env={INJECT_OOM_ENV: "synthetic-300x200-0"}, module="tests.integration.inject_oom")
    line = assert_clean_failure(result, "PageError", "no page was measured", "out of memory")
    print(f"\nzero pages: {line}")
    metrics = read_metrics(run_dir)
    assert metrics["run"]["status"] == "failed"
    report = (run_dir / "report.md").read_text()
    assert "FAILED" in report and "COMPLETE" not in report


HOOK_RAISE = '''
"""Test double: the second timed page raises a bug-like RuntimeError (RAISE_IN_PAGE)."""
import llm_perf_opt.runners.stage1 as _stage1

_real = _stage1.Stage1Run.run_page
_calls = [0]


def _run_page(self, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == 2:
        raise RuntimeError("simulated bug in page 2")
    return _real(self, *args, **kwargs)


_stage1.Stage1Run.run_page = _run_page
'''


def test_unexpected_error_is_one_line_and_reports_end_failed(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(HOOK_RAISE))
    pythonpath = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    run_dir = tmp_path / "run"
    result = run_cli(THREE_PAGES, run_dir, env={"PYTHONPATH": pythonpath})
    assert result.returncode == 1, result.describe()
    _assert_no_traceback(result)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("UnexpectedError:")]
    assert lines == [f"UnexpectedError: RuntimeError: simulated bug in page 2 (details in {run_dir / 'run.log'})"]
    assert "simulated bug in page 2" not in result.stdout  # printed once, not twice
    assert "Traceback" in (run_dir / "run.log").read_text()
    metrics = read_metrics(run_dir)
    assert metrics["run"]["status"] == "failed"  # never left at RUNNING
    assert [p["page_id"] for p in metrics["pages"]] == ["synthetic-300x200-0"]
    assert "FAILED" in (run_dir / "report.md").read_text()


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cli_command(args),
        cwd=ROOT,
        env=cli_env(),
        stdout=open(tmp_path / "stdout", "wb"),
        stderr=open(tmp_path / "stderr", "wb"),
    )


def test_ctrl_c_during_startup_is_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start([*SMALL, f"hydra.run.dir={run_dir}"], tmp_path)
    # The preflight creates the run dir after the start-up handler is in and Hydra is imported: from then on
    # the signal lands in Hydra's set-up, the torch import or the model load.  (Before the interpreter reaches
    # our first line nothing of ours can act; a test runner started in the background even ignores SIGINT.)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not run_dir.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    stderr = (tmp_path / "stderr").read_text()
    assert rc == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert len([ln for ln in stderr.splitlines() if ln.startswith("RunInterrupted:")]) == 1, stderr
    assert "resume=" not in stderr, stderr  # nothing finished: no resume hint that would then be refused


def test_ctrl_c_before_any_page_finished_gives_no_resume_hint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*SMALL, "infer.max_new_tokens=5000", "infer.ignore_eos=true", f"hydra.run.dir={run_dir}"]
    proc = _start(args, tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run_dir / "metrics.json").is_file():
        time.sleep(0.05)
    time.sleep(0.5)  # in warmup, the profiler pass or the first (5000-token) page
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    stderr = (tmp_path / "stderr").read_text()
    assert rc == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "resume=" not in stderr and "nothing to resume" in stderr, stderr
    assert read_metrics(run_dir)["run"]["status"] == "failed"  # no page measured: not PARTIAL, not RUNNING
    again = run_cli([*args[:-1], "infer.max_new_tokens=8"], run_dir)  # and the dir is reusable as the hint says
    assert again.returncode == 0 or "already holds a run" not in again.stderr, again.describe()


# ------------------------------------------------------------------------------------------ 6. inputs


def test_pages_as_users_have_them(tmp_path: Path) -> None:
    """Upper-case extensions, 16-bit and float pages, a FIFO among the pages, | and a newline in a name."""
    pages = tmp_path / "pages"
    pages.mkdir()
    _png(pages / "UPPER.PNG", 128)
    Image.new("RGB", (300, 200), (90, 90, 90)).save(pages / "photo.JPG")
    gray16 = (np.linspace(0, 65535, 300 * 200).reshape(200, 300)).astype(np.uint16)
    Image.fromarray(gray16).save(pages / "deep16.png")
    Image.fromarray(np.full((200, 300), 0.5, dtype=np.float32), mode="F").save(pages / "float.tiff")
    _png(pages / "bar|and\nnewline.png", 60)
    os.mkfifo(pages / "fifo.png")
    result = run_cli([*SMALL, "dataset=folder", f"dataset.root={pages}"], tmp_path / "run", timeout=180)
    assert result.returncode == 0, result.describe()
    metrics = read_metrics(tmp_path / "run")
    status = {p["page_id"]: p["status"] for p in metrics["pages"]}
    assert status == {
        "UPPER.PNG": "ok",
        "photo.JPG": "ok",
        "deep16.png": "ok",
        "float.tiff": "ok",
        "bar|and\nnewline.png": "ok",
    }  # the FIFO is not a page (never opened: no hang)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "`bar\\|and\\nnewline.png`" in report
    table_lines = [ln for ln in report.splitlines() if ln.startswith("| `")]
    assert all(ln.endswith("|") for ln in table_lines), table_lines
