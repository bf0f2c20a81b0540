"""fp16 mixed precision inside a captured step: the GradScaler's skip on the device.

``GradScaler.step`` skips the optimizer step when the unscaled gradients hold an
inf or NaN. It decides on the host (``found_inf.item()``), a synchronisation that
a graph cannot contain, and whose outcome a graph could not repeat anyway: which
steps overflow changes from replay to replay.

While a step is captured, each scaler given here hands ``found_inf`` (a device
tensor) to the optimizer step instead, and the step skips itself on the device at
every replay: step counts, moments and parameters are left exactly as they were,
as the eager scaler leaves them (see
:meth:`~lightning_graphs.optimizers.GraphSafeOptimizer.step_unless_found_inf`).
The unscale, the inf check and ``update()``'s back-off and growth of the scale are
device operations already and are captured as they are. Optimizers that unscale
inside their own step (``fused=True``) take ``found_inf`` from the scaler directly.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["graph_safe_grad_scalers", "scaler_of"]

# skip_step(optimizer, found_inf, args, kwargs): the optimizer's step, skipped on the device where found_inf != 0
SkipStep = Callable[[torch.optim.Optimizer, torch.Tensor, tuple, dict], Any]


def scaler_of(optimizer: Any) -> torch.amp.GradScaler | None:
    """The enabled GradScaler of the precision plugin behind an optimizer wrapped by
    Fabric or Lightning (``fabric.setup(model, optimizer)``), if any."""
    strategy = getattr(optimizer, "_strategy", None)
    precision = getattr(strategy, "precision", None)
    scaler = getattr(precision, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None


def _step_unless_found_inf(
    skip_step: SkipStep, optimizer: torch.optim.Optimizer, optimizer_state: dict, *args: Any, **kwargs: Any
) -> Any:
    """Stands in for ``GradScaler._maybe_opt_step`` while capturing."""
    found = list(optimizer_state["found_inf_per_device"].values())
    if not found:
        return optimizer.step(*args, **kwargs)  # nothing was unscaled: the scaler's own check would pass too
    found_inf = found[0]
    for other in found[1:]:
        found_inf = found_inf + other.to(found_inf.device, non_blocking=True)
    return skip_step(optimizer, found_inf, args, kwargs)


@contextmanager
def graph_safe_grad_scalers(scalers: Sequence[torch.amp.GradScaler], skip_step: SkipStep) -> Iterator[None]:
    """Within the block, every ``scalers[i].step`` leaves the skip decision to the
    device, through ``skip_step``. If the block raises (a failed capture), each
    scaler's per-optimizer bookkeeping is put back as it was, so that the step can
    run again eagerly."""
    patched, saved = [], []
    try:
        for scaler in scalers:
            if "_maybe_opt_step" in scaler.__dict__:
                continue  # given twice
            saved.append({key: dict(state) for key, state in scaler._per_optimizer_states.items()})
            scaler._maybe_opt_step = partial(_step_unless_found_inf, skip_step)
            patched.append(scaler)
        yield
    except BaseException:
        for scaler, states in zip(patched, saved):
            scaler._per_optimizer_states.clear()
            scaler._per_optimizer_states.update(states)
        raise
    finally:
        for scaler in patched:
            scaler.__dict__.pop("_maybe_opt_step", None)
