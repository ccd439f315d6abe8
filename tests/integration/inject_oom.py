"""The real CLI with a simulated CUDA OOM in one page's timed runs: ``python -m tests.integration.inject_oom``.

``LLM_PERF_OPT_INJECT_OOM=<page_id>`` names the page.  The fault is injected here, by patching the session before
the CLI starts, so the production code carries no test hook; warm-up and profiler-pass runs (repeat -1) are
spared, as a real OOM on a large page would only hit the measured runs in this test's setup.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from llm_perf_opt.runners import llm_profile_runner
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession

INJECT_OOM_ENV = "LLM_PERF_OPT_INJECT_OOM"


def install(victim: str) -> None:
    original = DeepSeekOCRSession.run

    def run(self: DeepSeekOCRSession, page: Any, max_new_tokens: int, repeat: int = 0, **kwargs: Any) -> Any:
        if page.page_id == victim and repeat >= 0:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated by {INJECT_OOM_ENV} for page {victim})")
        return original(self, page, max_new_tokens, repeat, **kwargs)

    DeepSeekOCRSession.run = run  # type: ignore[method-assign]


if __name__ == "__main__":
    install(os.environ[INJECT_OOM_ENV])
    llm_profile_runner.main()
