"""Explaining why a capture failed, in terms of the user's own code.

CUDA reports "operation not permitted when stream is capturing" and similar; what a
user needs is the operation and the line of their code that caused it. The
traceback holds it: the innermost frame outside PyTorch, Lightning, this library
and the standard library is the user's line.
"""

from __future__ import annotations

import importlib.util
import linecache
import os
import re
import sysconfig
import traceback
from types import TracebackType

__all__ = ["explain_capture_error", "user_frame"]


def _package_dir(module_name: str) -> str | None:
    """Where a package lives, found without importing it."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.abspath(list(spec.submodule_search_locations)[0]) + os.sep


_FRAMEWORK_DIRS = tuple(
    d
    for d in (
        _package_dir("torch"),
        _package_dir("lightning"),
        _package_dir("pytorch_lightning"),
        _package_dir("lightning_utilities"),
        _package_dir("torchmetrics"),
        os.path.dirname(os.path.abspath(__file__)) + os.sep,
        os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep,
    )
    if d
)

# source patterns that synchronise with the host, most specific first
_SYNC_PATTERNS = [
    (r"param_groups", "reading an optimizer setting as a number: while a step is captured, the settings a scheduler "
                      "changes (the learning rate, Adam's betas) are device tensors, so that replays follow them; "
                      "use the setting as a tensor (`loss * group['lr']`) or read it outside the step"),
    (r"\.item\(\)", "`.item()` copies a GPU value to the host"),
    (r"\.tolist\(\)", "`.tolist()` copies GPU values to the host"),
    (r"\.cpu\(\)", "`.cpu()` copies a GPU tensor to the host"),
    (r"\.numpy\(\)", "`.numpy()` copies a GPU tensor to the host"),
    (r"\bprint\(", "`print` of a tensor copies its values to the host"),
    (r"\btorch\.(tensor|as_tensor)\(", "`torch.tensor(...)` copies host data to the GPU"),
    (r"\b(float|int|bool)\(", "converting a tensor to a Python number reads it on the host"),
    (r"\bif\b|\bwhile\b|\band\b|\bor\b|\bnot\b", "a Python condition on a tensor reads its value on the host"),
    (r"\.to\(|\.cuda\(", "copying host data to the GPU during capture"),
    (r"nonzero|masked_select|unique|repeat_interleave", "an operation whose output size depends on the data"),
]


def user_frame(tb: TracebackType | None) -> traceback.FrameSummary | None:
    """The innermost traceback frame in the user's code, if there is one."""
    found = None
    for frame in traceback.extract_tb(tb):
        filename = os.path.abspath(frame.filename)
        if filename.startswith(_FRAMEWORK_DIRS) or frame.filename.startswith("<"):
            continue
        found = frame
    return found


def _innermost(exc: BaseException) -> BaseException:
    """The exception that started it all (capture_end errors chain the original)."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return exc


def _short_name(frame: traceback.FrameSummary) -> str:
    """A framework file as ``package/module.py``, any other by its base name."""
    parts = os.path.abspath(frame.filename).split(os.sep)
    in_packages = "site-packages" in parts or "dist-packages" in parts
    return os.sep.join(parts[-3:]) if in_packages else os.path.basename(frame.filename)


def _raised_in(tb: TracebackType | None) -> str:
    """Where an error was raised, as ``package/module.py:line (function)``."""
    frames = traceback.extract_tb(tb)
    if not frames:
        return ""
    return f"{_short_name(frames[-1])}:{frames[-1].lineno} ({frames[-1].name})"


def _source(frame: traceback.FrameSummary) -> str:
    return (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()


# what a line inside a library is read for: reads of a value on the host, which such a line names
# plainly (its conditions and copies are too common there to tell anything)
_READS = [(pattern, meaning) for pattern, meaning in _SYNC_PATTERNS
          if pattern in (r"param_groups", r"\.item\(\)", r"\.tolist\(\)", r"\.cpu\(\)", r"\.numpy\(\)",
                         r"\btorch\.(tensor|as_tensor)\(", r"\b(float|int|bool)\(")]


def _operation(line: str, exc: BaseException, inner_line: str = "") -> str:
    """What the failed operation was: from the user's line, else from the line inside
    a library that raised (``inner_line``: host reads only), else from the error."""
    candidates = [(line, _SYNC_PATTERNS)]
    if inner_line and not re.match(r"(raise|assert)\b", inner_line):
        candidates.append((inner_line, _READS))
    for text, patterns in candidates:
        for pattern, meaning in patterns:
            if re.search(pattern, text):
                return meaning
    text = str(exc)
    if "capturing" in text or "capture" in text:
        return "an operation that is not allowed while a CUDA graph is being captured"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _own_generator(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch refusing a draw from a CUDA generator the graph does
    not manage (one the user made: ``torch.Generator(device="cuda")``)."""
    text = str(exc).lower()
    return "generator" in text and ("capture" in text or "graph" in text)


_GENERATOR_ADVICE = (
    "A CUDA graph replays fresh random numbers only from PyTorch's default CUDA generator; draw from it "
    "(leave out `generator=` and seed with `torch.manual_seed`) for the step to be graphed."
)


def explain_capture_error(
    exc: BaseException, what: str = "the training step", batch_end_hook: str = "on_train_batch_end"
) -> str:
    """One paragraph: what failed, where in the user's code, and what to do (``batch_end_hook``: the
    Lightning hook suggested for host reads)."""
    origin = _innermost(exc)
    frame = user_frame(origin.__traceback__) or user_frame(exc.__traceback__)
    first_line = (str(origin).strip().splitlines() or [""])[0]
    if frame is not None:
        line = _source(frame)
        where = f"{os.path.basename(frame.filename)}:{frame.lineno} in `{frame.name}`: `{line}`"
        frames = traceback.extract_tb(origin.__traceback__)
        inner = frames[-1] if frames else None
        inner_line = ""
        if inner is not None and (inner.filename, inner.lineno) != (frame.filename, frame.lineno) \
                and not inner.filename.startswith("<"):
            inner_line = _source(inner)  # the line inside a library that raised (BatchNorm reading a count, say)
            if inner_line:
                where += f", inside {_short_name(inner)}:{inner.lineno}: `{inner_line}`"
        if _own_generator(origin):
            return (
                f"Could not capture {what} as a CUDA graph: it draws random numbers from a `torch.Generator` of "
                f"its own, at {where} ({type(origin).__name__}: {first_line}). {_GENERATOR_ADVICE}"
            )
        operation = _operation(line, origin, inner_line)
        return (
            f"Could not capture {what} as a CUDA graph: {operation}, at {where} "
            f"({type(origin).__name__}: {first_line}). A graph can only hold GPU work that needs no answer "
            "from the host; keep such reads out of the step (with Lightning, log the tensor itself with "
            f"`self.log`, or read values in `{batch_end_hook}`; in a loop of your own, return the tensor and "
            "read it after the call)."
        )
    raised = _raised_in(origin.__traceback__)
    raised = f", raised in {raised}" if raised else ""
    if _own_generator(origin):
        return (
            f"Could not capture {what} as a CUDA graph: it draws random numbers from a `torch.Generator` of its "
            f"own ({type(origin).__name__}: {first_line}{raised}). {_GENERATOR_ADVICE}"
        )
    return (
        f"Could not capture {what} as a CUDA graph ({type(origin).__name__}: {first_line}{raised}). "
        "To find the operation, run one eager step under `torch.cuda.set_sync_debug_mode('error')`, "
        "which raises at the first host synchronisation and names its line."
    )

