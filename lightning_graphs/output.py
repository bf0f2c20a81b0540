"""Messages a step prints or logs: a replay runs none of the step's Python, so they
appear only on the steps that run eagerly. Noticed while a step is captured, so that
the user can be told once; training itself is not affected."""

from __future__ import annotations

import builtins
import contextlib
import logging
import sys
import threading
from typing import Any, Iterator

from lightning_graphs.python_state import users_code

__all__ = ["output_noticed"]

_FRAMES_LOOKED_AT = 6  # how far up from a print its caller is looked for (Lightning's `self.print` calls print)


def _from_users_code(frame: Any) -> bool:
    """Whether a frame or one of its callers close by runs the user's own code (not
    Python's, nor an installed package's)."""
    for _ in range(_FRAMES_LOOKED_AT):
        if frame is None:
            return False
        if users_code(frame.f_globals.get("__name__")):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def output_noticed(found: list[str]) -> Iterator[None]:
    """Within the block, a ``print`` or a ``logging`` record made by the user's own code
    in this thread is named in ``found`` ("print", "logging")."""
    printing, handling = builtins.print, logging.Logger.handle
    thread = threading.get_ident()

    def notice(kind: str) -> None:
        # (the frame two up: the caller of the print or of the logger's handle)
        if kind not in found and threading.get_ident() == thread and _from_users_code(sys._getframe(2)):
            found.append(kind)

    def noticed_print(*args: Any, **kwargs: Any) -> None:
        notice("print")
        printing(*args, **kwargs)

    def noticed_handle(logger: logging.Logger, record: logging.LogRecord) -> None:
        notice("logging")
        handling(logger, record)

    builtins.print, logging.Logger.handle = noticed_print, noticed_handle
    try:
        yield
    finally:
        builtins.print, logging.Logger.handle = printing, handling
