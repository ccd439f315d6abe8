"""runners/prefetch.py: pooled page preparation gives the serial tensors, in order, bounded, errors per batch."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llm_perf_opt.data.datasets import Page
from llm_perf_opt.errors import ConfigError, InputError
from llm_perf_opt.models.deepseek_ocr.preprocess import PreparedPage, PreprocessConfig, preprocess_page
from llm_perf_opt.runners.prefetch import Prefetcher

PROMPT_IDS = [1, 2, 3]
SIZES = [(300, 200), (200, 300), (640, 900), (900, 640), (260, 400)]


def _prepare(page: Page) -> PreparedPage:
    # crop mode on, so the larger pages get several tiles (the expensive part)
    return preprocess_page(page.load(), PreprocessConfig.for_mode("gundam"), 16, 10, PROMPT_IDS)


def test_pooled_preprocessing_equals_serial() -> None:
    pages = [Page(page_id=f"p{i}", synthetic_size=s, seed=i) for i, s in enumerate(SIZES * 2)]
    batches = [pages[i : i + 3] for i in range(0, len(pages), 3)]
    serial = [_prepare(p) for p in pages]  # the reference: one page after another, no pool
    with Prefetcher(_prepare, batches, workers=3, depth=2) as pool:
        pooled = [x for ready in pool for x in ready.prepared()]
    assert len(pooled) == len(serial)
    assert any(s.n_crops > 1 for s in serial)
    for a, b in zip(pooled, serial, strict=True):
        assert torch.equal(a.images_crop, b.images_crop) and torch.equal(a.images_ori, b.images_ori)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.images_seq_mask, b.images_seq_mask)
        assert a.images_spatial_crop == b.images_spatial_crop and a.page_size == b.page_size


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_in_order_bounded_and_failures_per_batch(workers: int) -> None:
    """A scripted prepare (sleeps, one failing item) records how many batches were started ahead of the consumer."""
    lock = threading.Lock()
    started: list[int] = []
    taken: list[int] = []
    ahead: list[int] = []

    def prepare(item: int) -> int:
        with lock:
            started.append(item)
            ahead.append(len({i // 2 for i in started}) - len(taken))
        time.sleep(0.01)
        if item == 5:
            raise InputError("page 5 is corrupt")
        return item * 10

    batches = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    got: list[list[int] | str] = []
    with Prefetcher(prepare, batches, workers=workers, depth=2) as pool:
        for ready in pool:
            taken.append(ready.pages[0] // 2)
            assert ready.wait_s >= 0
            try:
                got.append(ready.prepared())
            except InputError as exc:
                got.append(str(exc))
            time.sleep(0.03)  # the "GPU" work of this batch: the pool works ahead meanwhile
    assert got == [[0, 10], [20, 30], "page 5 is corrupt", [60, 70], [80, 90]]
    # never more than `depth` batches started beyond the ones taken (+1: the one being waited for)
    assert max(ahead) <= 2 + 1
    if workers:
        assert max(ahead) >= 2  # and it did work ahead


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="workers >= 0 and depth >= 1"):
        Prefetcher(_prepare, [], workers=-1)
