"""Warnings and errors the library raises, and the once-per-run rule for warnings."""

from __future__ import annotations

import warnings
from typing import Callable

__all__ = ["GraphWarning", "GraphCaptureError", "WarnOnce"]


class GraphWarning(UserWarning):
    """A step could not be graphed, or is run eagerly; training goes on correctly.

    Filter it like any warning category, e.g.
    ``warnings.filterwarnings("ignore", category=GraphWarning)``.
    """


class GraphCaptureError(RuntimeError):
    """Raised instead of falling back to eager execution when ``strict=True``."""


def _default_emit(message: str) -> None:
    warnings.warn(message, GraphWarning, stacklevel=3)


class WarnOnce:
    """Emits each warning once, keyed on a stable id rather than on the text, so that
    values inside the text (shapes, step numbers) do not defeat the deduplication."""

    def __init__(self, emit: Callable[[str], None] | None = None) -> None:
        self._emit = emit or _default_emit
        self._seen: set[str] = set()

    def __call__(self, key: str, message: str) -> bool:
        """Warn with ``message`` unless ``key`` was warned about already; says whether it warned."""
        if key in self._seen:
            return False
        self._seen.add(key)
        self._emit(message)
        return True

    def reset(self) -> None:
        self._seen.clear()
