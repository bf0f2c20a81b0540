"""``torch.compile`` inside a captured step.

A model compiled in the default mode runs Inductor's fused kernels; captured in a
whole-step graph they cost one launch with everything else. Three things keep that
correct:

* **No compilation inside a capture.** Compiling launches work and synchronises,
  which a capture cannot hold. Every input signature runs eagerly before it is
  captured, which compiles what it needs; while capturing, the compiler's stance is
  ``"fail_on_recompile"``, so a guard that would still fail stops the capture
  before anything compiles (:func:`is_recompile_refusal`), and the step runs eagerly
  once more first.
* **Nothing graphs twice.** ``mode="reduce-overhead"`` (and ``"max-autotune"``)
  make Inductor capture CUDA graphs of its own, which cannot be nested in the
  whole-step graph: :func:`own_graphs` finds them so the user can be told.
* **Opt-in compilation.** :func:`compile_children` compiles a module's children in
  place for the user, and undoes it.

Python values a compiled forward specialises on (an attribute it reads) are baked
into its kernels as they are into any captured step; the caller's staleness checks
decide when graphs are captured again.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

__all__ = [
    "compiled_parts", "own_graphs", "own_graphs_requested", "no_compilation", "is_recompile_refusal", "compile_children",
]

_REFUSAL = "fail_on_recompile"


def _is_compiled(obj: Any) -> bool:
    return hasattr(obj, "_torchdynamo_orig_callable") or getattr(obj, "_is_torch_compile", False)


def compiled_parts(root: torch.nn.Module) -> list[tuple[str, Any]]:
    """``(name, compiled object)`` for every compiled module or function held by
    ``root`` or its submodules: ``torch.compile(module)``, ``module.compile()`` and
    compiled functions or methods stored as attributes (``forward`` included)."""
    found = []
    for name, module in root.named_modules():
        label = name or type(root).__name__
        if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            found.append((label, module))
            continue  # its own `forward` is the compiled one
        in_place = module.__dict__.get("_compiled_call_impl")
        if in_place is not None:
            found.append((label, in_place))
        for attribute, value in module.__dict__.items():
            if attribute != "_compiled_call_impl" and callable(value) and _is_compiled(value):
                found.append((f"{name}.{attribute}" if name else attribute, value))
    return found


def _inductor_options(compiled: Any) -> dict | None:
    """The Inductor options ``torch.compile`` was called with, where they can be found."""
    context = getattr(compiled, "dynamo_ctx", None)
    if context is None:
        for cell in getattr(compiled, "__closure__", None) or ():
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if hasattr(content, "callback") and hasattr(content, "first_ctx"):
                context = content
                break
    backend = getattr(context, "callback", None)
    for _ in range(8):  # the backend sits under a few wrappers
        if backend is None or isinstance(getattr(backend, "config", None), dict):
            break
        backend = getattr(backend, "_torchdynamo_orig_backend", None)
    options = getattr(backend, "config", None)
    return options if isinstance(options, dict) else None


def own_graphs(compiled: Any) -> bool:
    """Whether Inductor captures CUDA graphs of its own for ``compiled``
    (``mode="reduce-overhead"`` or ``"max-autotune"``, or ``triton.cudagraphs``)."""
    options = _inductor_options(compiled)
    if options is not None and "triton.cudagraphs" in options:
        return bool(options["triton.cudagraphs"])
    return bool(options is not None and torch._inductor.config.triton.cudagraphs)


@contextlib.contextmanager
def no_compilation() -> Iterator[None]:
    """Within the block, a compiled function whose guards fail raises instead of
    compiling (see :func:`is_recompile_refusal`)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # older PyTorch: a compile in a capture fails the capture instead
        yield
        return
    with set_stance(_REFUSAL):
        yield


def is_recompile_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is the compiler refusing
    to compile inside :func:`no_compilation`."""
    seen = 0
    while exc is not None and seen < 8:
        if _REFUSAL in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


# containers whose own forward is never called: their members are compiled instead
_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)


def _compilable_children(root: torch.nn.Module) -> Iterator[torch.nn.Module]:
    for child in root.children():
        if isinstance(child, _CONTAINERS):
            yield from _compilable_children(child)
        else:
            yield child


def own_graphs_requested(options: dict[str, Any]) -> bool:
    """Whether ``torch.compile(**options)`` would capture CUDA graphs of its own."""
    mode = options.get("mode")
    inductor = options.get("options") or {}
    return mode in ("reduce-overhead", "max-autotune") or bool(inductor.get("triton.cudagraphs"))


def compile_children(root: torch.nn.Module, options: dict[str, Any]) -> Callable[[], None]:
    """Compile, in place, the ``forward`` of each child of ``root`` that holds
    parameters (and is not compiled already) with ``torch.compile(**options)``; the
    members of a ``ModuleList`` or ``ModuleDict`` child, whose own ``forward`` is
    never called, are compiled one by one. Returns a function that puts every
    ``forward`` back."""
    compiled = []
    for child in _compilable_children(root):
        if isinstance(child, torch._dynamo.eval_frame.OptimizedModule) or "forward" in child.__dict__:
            continue
        if child.__dict__.get("_compiled_call_impl") is not None or next(child.parameters(), None) is None:
            continue
        child.forward = torch.compile(child.forward, **options)
        compiled.append(child)

    def undo() -> None:
        for child in compiled:
            child.__dict__.pop("forward", None)
        compiled.clear()

    return undo
