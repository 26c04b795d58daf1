"""The one exception the export pipeline raises for a choice it cannot carry out.

``ExportError`` carries a one-line reason (a backend SDK that is missing, an architecture the
exporter cannot handle, a quantisation a format does not support). The CLI prints it as
``edgetune export: <reason>``; ``bad_choice`` tells it which exit code to use (2 for a bad
choice by the user, 1 for an export or parity check that failed).
"""

from __future__ import annotations

__all__ = ["ExportError", "RunnerUnavailable"]


class ExportError(RuntimeError):
    """An export could not be done; the message is a one-line reason.

    Args:
        reason: what went wrong, in one line, naming the bad value or the missing piece.
        bad_choice: ``True`` when the user asked for something unsupported here (exit 2),
            ``False`` when the export itself or its parity check failed (exit 1).
    """

    def __init__(self, reason: str, *, bad_choice: bool = True) -> None:
        super().__init__(reason)
        self.bad_choice = bad_choice


class RunnerUnavailable(ExportError):
    """The artefact was written but cannot run on this machine (e.g. a Core ML delegate on
    Linux); the parity check is skipped and its report says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, bad_choice=False)
