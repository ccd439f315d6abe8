"""Forward hooks that time the vision sub-modules (SAM, CLIP, projector) without touching model code.

A pre-hook pushes a range and records a start mark; the post-hook records the end mark and pops.  Marks
are resolved to milliseconds only at the end of a page (one synchronisation), and times accumulate over
every call within the page: crops and the global view each call SAM/CLIP/projector once.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from llm_perf_opt.profiling.ranges import RangeMarker
from llm_perf_opt.profiling.timers import DeviceClock


class StageHooks:
    """Installed once per session; ``collect_ms`` drains the marks of the current page."""

    def __init__(self, modules: dict[str, nn.Module], clock: DeviceClock, ranges: RangeMarker) -> None:
        self.clock = clock
        self.ranges = ranges
        self._spans: dict[str, list[tuple[object, object]]] = {name: [] for name in modules}
        self._pending: dict[str, list[object]] = {name: [] for name in modules}
        self._handles: list[RemovableHandle] = []
        self.enabled = True
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._make_pre(name)))
            self._handles.append(module.register_forward_hook(self._make_post(name), always_call=True))

    def _make_pre(self, name: str) -> Any:
        def pre(_module: nn.Module, _args: Any) -> None:
            if not self.enabled:
                return
            self.ranges.push(name)
            self._pending[name].append(self.clock.mark())

        return pre

    def _make_post(self, name: str) -> Any:
        def post(_module: nn.Module, _args: Any, _out: Any) -> None:
            if not self.enabled:
                return
            start = self._pending[name].pop()
            self._spans[name].append((start, self.clock.mark()))
            self.ranges.pop()

        return post

    def reset(self) -> None:
        for spans in self._spans.values():
            self.clock.release([m for span in spans for m in span])
            spans.clear()
        for pending in self._pending.values():
            pending.clear()

    def collect_ms(self) -> dict[str, float]:
        """Per-module total ms since the last reset (the caller has synchronised)."""
        out = {name: sum(self.clock.elapsed_ms(a, b) for a, b in spans) for name, spans in self._spans.items()}
        calls = {name: len(spans) for name, spans in self._spans.items()}
        self.reset()
        self.last_calls = calls
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def module_named(root: object, dotted: str) -> nn.Module:
    """``model.model.sam_model`` style lookup with an error naming what exists (``root``: a model, typed by the
    session's protocol rather than as a module)."""
    mod: object = root
    for part in dotted.split("."):
        if not hasattr(mod, part):
            children = ", ".join(n for n, _ in mod.named_children()) if isinstance(mod, nn.Module) else "none"
            raise AttributeError(f"module has no '{part}' (in '{dotted}'); children: {children}")
        mod = getattr(mod, part)
    if not isinstance(mod, nn.Module):
        raise AttributeError(f"'{dotted}' is not a module")
    return mod
