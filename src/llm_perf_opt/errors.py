"""One error hierarchy for everything a user can get wrong.

Every error carries what was wrong (the message, naming the file / key / page) and how to fix it
(``hint``).  The CLI prints ``str(err)`` as one line plus the hint and exits non-zero; the full
traceback goes to the run log only.
"""

from __future__ import annotations


class LlmPerfOptError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def one_line(self) -> str:
        kind = type(self).__name__
        text = f"{kind}: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ConfigError(LlmPerfOptError):
    """A config value is missing, out of range, or inconsistent with another."""


class ModelLoadError(LlmPerfOptError):
    """The checkpoint directory, its config or its weights cannot be used."""


class InputError(LlmPerfOptError):
    """A dataset page or prompt cannot be used (missing, unreadable, not an image)."""


class DeviceError(LlmPerfOptError):
    """The requested device or dtype is not available on this machine."""


class OutputError(LlmPerfOptError):
    """The run directory cannot be written."""


class RunInterrupted(LlmPerfOptError):
    """SIGINT/SIGTERM arrived; finished pages are on disk and the report is marked partial."""

    exit_code = 130


class PageError(LlmPerfOptError):
    """A page failed and ``fail_fast=true`` stopped the run; the pages finished before it are kept."""
