"""Model backends behind one interface (:class:`~llm_perf_opt.runners.backends.base.Backend`), chosen by
``model.backend``: ``native`` (our plain-PyTorch model) and ``hf_remote`` (the vendor's remote code)."""

from llm_perf_opt.runners.backends.base import Backend, build_backend

__all__ = ["Backend", "build_backend"]
