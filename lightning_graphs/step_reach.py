"""Optimizers, GradScalers, schedulers and iterators a step uses without having been given them.

A graph replays an optimizer step with the settings it was captured with unless the
optimizer was prepared for it (``optimizers=``), a GradScaler's skip of overflowing
steps needs to be built into the capture (``grad_scaler=``), a scheduler stepped
inside the step is never stepped by a replay, and a step that takes its data with
``next()`` replays the captured data. Optimizer step hooks run inside the step: what
they hold is watched like the step's own variables, and a step put in the place of
``Optimizer.step`` for capture calls them as it does. These helpers find such objects,
so that the step runs eagerly with a warning saying what to pass or move, instead of
replaying wrong numbers.
"""

from __future__ import annotations

import collections.abc
import contextlib
import io
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.optim import lr_scheduler
from torch.optim import optimizer as optimizer_module
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = [
    "held_values", "scaler_not_given", "iterator_held", "schedulers_stepped", "optimizers_stepped", "optimizer_hooks",
    "step_hooks", "with_step_hooks",
]


def held_values(reach: Sequence[tuple[str, Any]], objects: bool = True) -> Iterator[tuple[str, Any]]:
    """``(label, value)`` for every value one step into ``reach``: the variables of a
    closure view (and, with ``objects``, the attributes of an object, a bound step's ``self``)."""
    for label, holder in reach:
        try:
            view = getattr(holder, "_view_label", None)
        except Exception:  # an object whose `__getattr__` raises something else than AttributeError
            view = None
        if view is None and not objects:
            continue
        try:
            values = dict(vars(holder))
        except TypeError:  # an object without attributes to look at
            continue
        for name, value in values.items():
            yield (f"{view} `{name}`" if view else f"`{label}.{name}`"), value


def _named_globals(loaded: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(f"global `{name}`", value) for name, value in loaded]


def scaler_not_given(reach: Sequence[tuple[str, Any]], loaded: Sequence[tuple[str, Any]],
                     given: Sequence[Any]) -> str | None:
    """A sentence naming an enabled GradScaler the step holds or loads by name (``loaded``:
    module-level ``(name, value)`` pairs) but was not given, if any."""
    for label, value in [*held_values(reach), *_named_globals(loaded)]:
        if isinstance(value, torch.amp.GradScaler) and value.is_enabled() and all(value is not g for g in given):
            return (
                f"the step uses the GradScaler {label}, which was not given as `grad_scaler=`: a capture needs it "
                "to skip overflowing steps on the device as eager training does. Pass it (`grad_scaler=scaler`) "
                "to graph the step"
            )
    return None


def iterator_held(reach: Sequence[tuple[str, Any]], loaded: Sequence[tuple[str, Any]]) -> str | None:
    """A sentence naming an iterator the step closes over or loads by name (its data
    taken with ``next()``), if any. (An object's attributes are left out: a bound step's
    ``self`` may hold iterators it never reads; so are files, which are iterators too.)"""
    for label, value in [*held_values(reach, objects=False), *_named_globals(loaded)]:
        if isinstance(value, collections.abc.Iterator) and not isinstance(value, io.IOBase):
            return (
                f"the step holds the iterator {label} ({type(value).__name__}): a step that takes its data from it "
                "with `next()` would get the captured data at every replay. Pass each batch as an argument "
                "(`step(x, y)`) to graph the step"
            )
    return None


@contextlib.contextmanager
def schedulers_stepped(found: list[Any]) -> Iterator[None]:
    """Within the block, every learning-rate scheduler that steps is appended (once) to
    ``found``: the schedulers' ``step`` methods are stood in for, and put back after."""
    classes = [cls for cls in (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau) if "step" in vars(cls)]
    originals = [vars(cls)["step"] for cls in classes]

    def noting(original: Callable[..., Any]) -> Callable[..., Any]:
        def step(scheduler: Any, *args: Any, **kwargs: Any) -> Any:
            if all(scheduler is not seen for seen in found):
                found.append(scheduler)
            return original(scheduler, *args, **kwargs)

        return step

    for cls, original in zip(classes, originals):
        cls.step = noting(original)
    try:
        yield
    finally:
        for cls, original in zip(classes, originals):
            cls.step = original


@contextlib.contextmanager
def optimizers_stepped(found: list[torch.optim.Optimizer]) -> Iterator[None]:
    """Within the block, every optimizer that steps is appended (once) to ``found``."""

    def note(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if all(optimizer is not seen for seen in found):
            found.append(optimizer)

    handle = register_optimizer_step_post_hook(note)
    try:
        yield
    finally:
        handle.remove()


def step_hooks(optimizer: torch.optim.Optimizer) -> tuple[list[Callable[..., Any]], list[Callable[..., Any]]]:
    """The pre-hooks and post-hooks that run when ``optimizer`` steps, in the order
    ``Optimizer.step`` calls them (the global pre-hooks first, the global post-hooks last)."""
    own_pre, own_post = (list(getattr(optimizer, name, {}).values()) for name in _OWN_HOOKS)
    global_pre, global_post = (list(getattr(optimizer_module, name, {}).values()) for name in _GLOBAL_HOOKS)
    return global_pre + own_pre, own_post + global_post


def with_step_hooks(optimizer: torch.optim.Optimizer, step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` calling ``optimizer``'s step hooks around it as ``Optimizer.step`` does: a
    step put in its place for capture must run an EMA post-hook registered on the
    optimizer, as the step it stands in for would."""

    def stepped(*args: Any, **kwargs: Any) -> Any:
        pre_hooks, post_hooks = step_hooks(optimizer)
        for pre_hook in pre_hooks:
            result = pre_hook(optimizer, args, kwargs)
            if result is not None:
                args, kwargs = result
        out = step(*args, **kwargs)
        for post_hook in post_hooks:
            post_hook(optimizer, args, kwargs)
        return out

    return stepped


def optimizer_hooks(optimizers: Sequence[torch.optim.Optimizer]) -> list[tuple[Callable[..., Any], None]]:
    """``(hook, None)`` for every step hook that runs when ``optimizers`` step: their own
    (``register_step_pre_hook``, ``register_step_post_hook``) and the global ones."""
    registries = [getattr(o, name, {}) for o in optimizers for name in _OWN_HOOKS]
    registries += [getattr(optimizer_module, name, {}) for name in _GLOBAL_HOOKS]
    return [(hook, None) for registry in registries for hook in list(registry.values())]


# where PyTorch keeps step hooks: each optimizer's own (pre, post), and the global ones (pre, post)
_OWN_HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
_GLOBAL_HOOKS = ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
