"""Optimizers, GradScalers, schedulers and iterators a step uses without having been given them.

A graph replays an optimizer step with the settings it was captured with unless the
optimizer was prepared for it (``optimizers=``), a GradScaler's skip of overflowing
steps needs to be built into the capture (``grad_scaler=``), a scheduler stepped
inside the step is never stepped by a replay, and a step that takes its data with
``next()`` replays the captured data. Optimizer step hooks run inside the step: what
they hold is watched like the step's own variables. These helpers find such objects, so that
the step runs eagerly with a warning saying what to pass or move, instead of replaying
wrong numbers.
"""

from __future__ import annotations

import collections.abc
import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.optim import optimizer as optimizer_module
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = [
    "held_values", "scaler_not_given", "iterator_held", "scheduler_counts", "stepped_scheduler", "optimizers_stepped",
    "optimizer_hooks",
]

_SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def held_values(reach: Sequence[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """``(label, value)`` for every value one step into ``reach``: the variables of a
    closure or module-level view, the attributes of an object (a bound step's ``self``)."""
    for label, holder in reach:
        try:
            values = dict(vars(holder))
        except TypeError:  # an object without attributes to look at
            continue
        view = getattr(holder, "_view_label", None)
        for name, value in values.items():
            yield (f"{view} `{name}`" if view else f"`{label}.{name}`"), value


def scaler_not_given(reach: Sequence[tuple[str, Any]], given: Sequence[Any]) -> str | None:
    """A sentence naming an enabled GradScaler the step reaches but was not given, if any."""
    for label, value in held_values(reach):
        if isinstance(value, torch.amp.GradScaler) and value.is_enabled() and all(value is not g for g in given):
            return (
                f"the step uses the GradScaler {label}, which was not given as `grad_scaler=`: a capture needs it "
                "to skip overflowing steps on the device as eager training does. Pass it (`grad_scaler=scaler`) "
                "to graph the step"
            )
    return None


def iterator_held(reach: Sequence[tuple[str, Any]]) -> str | None:
    """A sentence naming an iterator the step holds (its data taken with ``next()``), if any."""
    for label, value in held_values(reach):
        if isinstance(value, collections.abc.Iterator):
            return (
                f"the step holds the iterator {label} ({type(value).__name__}): a step that takes its data from it "
                "with `next()` would get the captured data at every replay. Pass each batch as an argument "
                "(`step(x, y)`) to graph the step"
            )
    return None


def scheduler_counts(reach: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any, int], ...]:
    """``(label, scheduler, last_epoch)`` for every learning-rate scheduler the step reaches."""
    return tuple(
        (label, value, value.last_epoch)
        for label, value in held_values(reach)
        if isinstance(value, _SCHEDULERS)
    )


def stepped_scheduler(before: tuple[tuple[str, Any, int], ...]) -> str | None:
    """Which scheduler of ``before`` (see :func:`scheduler_counts`) was stepped since, if any."""
    for label, scheduler, last_epoch in before:
        if scheduler.last_epoch != last_epoch:
            return f"{label} ({type(scheduler).__name__})"
    return None


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


def optimizer_hooks(optimizers: Sequence[torch.optim.Optimizer]) -> list[tuple[Callable[..., Any], None]]:
    """``(hook, None)`` for every step hook that runs when ``optimizers`` step: their own
    (``register_step_pre_hook``, ``register_step_post_hook``) and the global ones."""
    registries = [getattr(o, name, {}) for o in optimizers
                  for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")]
    registries += [getattr(optimizer_module, name, {})
                   for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")]
    return [(hook, None) for registry in registries for hook in list(registry.values())]
