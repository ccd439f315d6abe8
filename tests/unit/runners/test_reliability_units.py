"""Issue 16, the pure parts: run-dir rules, lock, run outcome, high-bit-depth pages, glob case, markdown cells."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llm_perf_opt.data.datasets import Page, build_pages, case_insensitive_glob, scale_to_8_bit
from llm_perf_opt.errors import InputError, OutputError
from llm_perf_opt.report.format import md_escape, table
from llm_perf_opt.runners.outcome import final_status
from llm_perf_opt.runners.rundir import LOCK, MARKER, check_run_dir, claim_run_dir, unsafe_reason
from tests.unit.builders import make_failed_page, make_page

ROOT = Path(__file__).resolve().parents[3]

# ------------------------------------------------------------------------------------------ run dir


def test_unsafe_dirs() -> None:
    assert unsafe_reason(ROOT, ROOT) == f"{ROOT} is the project root"
    assert unsafe_reason(Path("/"), ROOT) is not None
    assert unsafe_reason(ROOT / "conf", ROOT) is not None
    assert unsafe_reason(ROOT / "conf" / "new", ROOT) is not None
    assert unsafe_reason(ROOT / "tmp" / "stage1" / "x", ROOT) is None


def test_check_run_dir_rules(tmp_path: Path) -> None:
    check_run_dir(tmp_path / "new", None, ROOT)  # does not exist yet
    hydra_only = tmp_path / "h"
    (hydra_only / ".hydra").mkdir(parents=True)
    (hydra_only / "run.log").write_text("")
    check_run_dir(hydra_only, None, ROOT)  # Hydra's own files do not count
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match="no run created it"):
        check_run_dir(foreign, None, ROOT)
    owned = tmp_path / "o"
    owned.mkdir()
    (owned / MARKER).write_text("{}")
    check_run_dir(owned, None, ROOT)  # a run dir in which nothing was journaled: reusable
    (owned / "pages.jsonl").write_text("{}\n{}\n")
    with pytest.raises(OutputError, match="2 journaled page run"):
        check_run_dir(owned, None, ROOT)
    check_run_dir(owned, str(owned), ROOT)  # resume=<itself>
    with pytest.raises(OutputError, match=r"not a directory|is a file"):
        check_run_dir(foreign / "notes.txt", None, ROOT)


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    with claim_run_dir(tmp_path, None, ROOT) as notes:
        assert notes == []
        assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())
        refused = pytest.raises(OutputError, match=rf"another run \(pid {os.getpid()}\)")
        with refused, claim_run_dir(tmp_path, None, ROOT):
            pass
        assert (tmp_path / LOCK).exists()  # the refused claim did not remove the holder's lock
    assert not (tmp_path / LOCK).exists()
    assert (tmp_path / MARKER).is_file()


def test_stale_lock_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / LOCK).write_text(f"{dead.pid} {os.uname().nodename}\n")
    with claim_run_dir(tmp_path, None, ROOT) as notes:
        assert notes == [f"took over the stale lock {tmp_path / LOCK} of pid {dead.pid} (no longer running)"]


# ------------------------------------------------------------------------------------------ outcome


def test_outcome_rules() -> None:
    ok, bad = make_page("a"), make_failed_page("b", error="oom")
    assert final_status("complete", None, [ok], None, 0, 1) == ("complete", None)
    # stopped with 2 of 5 done: partial, and it says how many
    assert final_status("complete", None, [ok, ok], "SIGINT", 3, 5) == (
        "partial",
        "stopped by SIGINT; 2 of 5 page run(s) finished",
    )
    # stopped after the last page: complete
    status, reason = final_status("complete", None, [ok], "SIGINT", 0, 1)
    assert status == "complete" and "after the last timed page" in (reason or "")
    # nothing measured: failed, whatever stopped it
    assert final_status("complete", None, [bad], None, 0, 1) == (
        "failed",
        "no page was measured (all 1 page run(s) failed); first error: b: oom",
    )
    assert final_status("complete", None, [], "SIGINT", 1, 1)[0] == "failed"


# ------------------------------------------------------------------------------------------ inputs


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    assert scale_to_8_bit(values, "I;16", Path("p")).tolist() == [[0, 1, 128, 255]]  # v * 255 / 65535
    assert scale_to_8_bit(values.astype(np.int32), "I", Path("p")).tolist() == [[0, 1, 128, 255]]


def test_float_pages_are_scaled_or_refused() -> None:
    assert scale_to_8_bit(np.array([[0.0, 0.5, 1.0]], np.float32), "F", Path("p")).tolist() == [[0, 128, 255]]
    assert scale_to_8_bit(np.array([[0.0, 100.0, 255.0]], np.float32), "F", Path("p")).tolist() == [[0, 100, 255]]
    with pytest.raises(InputError, match=r"values -1\.\.2: no known range"):
        scale_to_8_bit(np.array([[-1.0, 2.0]], np.float32), "F", Path("p"))
    with pytest.raises(InputError, match="NaN"):
        scale_to_8_bit(np.array([[np.nan]], np.float32), "F", Path("p"))
    with pytest.raises(InputError, match="no known range"):
        scale_to_8_bit(np.array([[0, 1 << 20]], np.int32), "I", Path("p"))


def test_sixteen_bit_png_loads_with_its_gray_levels(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    Image.fromarray(np.array([[0, 32896], [65535, 257]], dtype=np.uint16)).save(path)
    rgb = np.asarray(Page(page_id="g", path=path).load())
    assert rgb.shape == (2, 2, 3)
    assert rgb[..., 0].tolist() == [[0, 128], [255, 1]]  # Pillow's plain convert("RGB") gives [[0, 255], [255, 255]]


def test_fifo_page_is_refused_before_opening(tmp_path: Path) -> None:
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="FIFO"):
        Page(page_id="x", path=fifo).load()  # would block forever in open()


def test_case_insensitive_glob(tmp_path: Path) -> None:
    assert case_insensitive_glob("*.png") == "*.[pP][nN][gG]"
    assert case_insensitive_glob("img/[ab]*.jpg") == "[iI][mM][gG]/[ab]*.[jJ][pP][gG]"
    for name in ("a.png", "B.PNG", "c.Png", "d.txt"):
        (tmp_path / name).write_bytes(b"x")
    ds = {"kind": "files", "root": str(tmp_path), "fallback_patterns": ["*.png"]}
    assert [p.page_id for p in build_pages(ds, tmp_path)] == ["B.PNG", "a.png", "c.Png"]


def test_markdown_cells_survive_odd_names() -> None:
    assert md_escape("a|b\nc") == "a\\|b\\nc"
    rendered = table(["page", "n"], [["x|y\nz", "1"]])
    assert rendered.splitlines()[-1] == "| x\\|y\\nz | 1 |"


def test_fifo_in_subset_list_is_named(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "subset.txt").write_text("fifo.png\n")
    ds = {"kind": "files", "root": str(tmp_path), "subset_filelist": "subset.txt"}
    with pytest.raises(InputError, match=r"subset.txt:1: page 'fifo.png' is a FIFO \(named pipe\), not an image"):
        build_pages(ds, tmp_path)


def test_fifo_weight_file_is_refused_before_opening(tmp_path: Path) -> None:
    from llm_perf_opt.errors import ModelLoadError
    from llm_perf_opt.models.deepseek_ocr.weights import _read_headers, find_weight_files

    (tmp_path / "config.json").write_text("{}")
    os.mkfifo(tmp_path / "x.safetensors")
    files = find_weight_files(tmp_path)
    with pytest.raises(ModelLoadError, match=r"x.safetensors is not a regular file \(a FIFO"):
        _read_headers(files)  # safe_open on the FIFO would block forever


def test_write_probe_is_this_processs_own(tmp_path: Path) -> None:
    """Two runs started into one dir probe it at once (the CLI test of two concurrent writers once failed in CI-like
    load as "not writable: No such file or directory": with one shared probe name one run's unlink removed the
    other's probe).  Another process's probe is left alone, ours leaves nothing behind, and many probes at once (8
    threads, file calls release the GIL) never fail."""
    import threading
    from types import SimpleNamespace

    from llm_perf_opt.runners.stage1 import prepare_run_dir

    out = tmp_path / "run"
    out.mkdir()
    foreign = out / ".write-probe"  # the old shared name, as another process's probe in flight
    foreign.write_text("theirs")
    settings = SimpleNamespace(output=SimpleNamespace(dir=str(out)))
    assert prepare_run_dir(settings) == out  # type: ignore[arg-type]
    assert sorted(p.name for p in out.iterdir()) == [".write-probe"] and foreign.read_text() == "theirs"
    errors: list[BaseException] = []

    def probe_many() -> None:
        try:
            for _ in range(50):
                prepare_run_dir(settings)  # type: ignore[arg-type]
        except BaseException as exc:  # collected for the assertion below, not swallowed
            errors.append(exc)

    threads = [threading.Thread(target=probe_many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in out.iterdir()) == [".write-probe"]
