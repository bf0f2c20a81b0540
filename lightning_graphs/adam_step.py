"""A graph-safe Adam/AdamW step whose hyper-parameters live on the device.

PyTorch's own Adam kernels take the learning rate and betas as host numbers (its
capturable path accepts a tensor learning rate, but computes the bias corrections
in float32 on the device, about 1e-5 off the host's float64 for beta2 = 0.999).
A captured step would therefore either freeze the betas that schedulers such as
``OneCycleLR`` cycle every step, or drift from the eager optimizer.

This step reads ``lr`` and ``betas`` from float64 device tensors and computes every
scalar in float64 on the device, rounding it to float32 once, as the eager
optimizer does on the host; the per-element arithmetic follows PyTorch's foreach
sequence. Only the rounding of a few fused operations can differ from the eager
step (a few units in the last place of an update). Temporaries are freed as soon
as they are used, so a captured step holds no more memory than an eager one.

Given ``found_inf`` (a GradScaler's device flag), the step skips itself on the
device when it is nonzero: gradients are read as zeros and the weights of the
moment updates, the decay factor and the step size become those of a step that
changes nothing, so a skipped step leaves counts, moments and parameters exactly
as they were; a step that is not skipped computes exactly what it would without
the flag.

It stands in for ``optimizer.step`` only while a step is captured.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["adam_step_applies", "adam_step_on_device", "uniform_step_groups", "AdamHostScalars"]


def adam_step_applies(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`adam_step_on_device` computes what this optimizer's own step
    would: PyTorch's Adam or AdamW (not a subclass), float32 parameters, neither
    fused nor differentiable, no step hooks."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return False
    return all(
        not group.get("fused") and not group.get("differentiable")
        and all(p.dtype == torch.float32 for p in group["params"])
        for group in optimizer.param_groups
    )


def uniform_step_groups(optimizer: torch.optim.Optimizer) -> list[list[list[torch.Tensor]]]:
    """Per param group, the parameters split by their step count.

    Bias corrections depend on the step count; parameters counted alike share one
    set of scalars. Reads the counts on the host: call it before capturing. Which
    of them are updated is decided when the step runs (those with gradients then).
    A parameter without state yet is kept apart (its step then fails loudly, not
    silently)."""
    groups = []
    for group in optimizer.param_groups:
        by_count: dict[float | None, list[torch.Tensor]] = {}
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            by_count.setdefault(float(state["step"]) if "step" in state else None, []).append(p)
        groups.append(list(by_count.values()))
    return groups


# Tensors at least this large are updated one by one: a per-tensor lerp_ reads and
# writes each element once where the foreach emulation of a tensor-weighted lerp
# needs three passes, which outweighs a few extra launches. Smaller tensors share
# foreach launches.
_PER_TENSOR_NUMEL = 1 << 22


class AdamHostScalars:
    """One param group's float32 device scalars that do not depend on the step count
    (``1 - beta1``, ``beta2``, ``1 - beta2``, ``1 - lr * weight_decay``).

    They are computed on the host in float64, as the eager step computes them, and
    written to the device only when the group's values change (the learning rate,
    at most once a step), so a replay spends no kernels on them."""

    _NAMES = ("one_minus_beta1", "beta2", "one_minus_beta2", "decay")

    def __init__(self, device: torch.device) -> None:
        for name in self._NAMES:
            setattr(self, name, torch.zeros((), dtype=torch.float32, device=device))
        self._written: dict[str, float] = {}

    def write(self, group: dict) -> AdamHostScalars:
        """Refresh from ``group``'s Python numbers (``lr``, ``betas``, ``weight_decay``)."""
        beta1, beta2 = (float(b) for b in group["betas"])
        values = {
            "one_minus_beta1": 1 - beta1,
            "beta2": beta2,
            "one_minus_beta2": 1 - beta2,
            "decay": 1 - float(group["lr"]) * group["weight_decay"],
        }
        for name, value in values.items():
            if self._written.get(name) != value:
                getattr(self, name).fill_(value)
                self._written[name] = value
        return self


class _SkippableScalars:
    """:class:`AdamHostScalars` made neutral on the device where ``found_inf`` is set:
    no moment update (weight 0, ``beta2`` 1) and no decay (factor 1). Where it is
    not set the values are the host ones exactly (``x * 1 + 0``)."""

    def __init__(self, host: AdamHostScalars, found_inf: torch.Tensor) -> None:
        self.skipped = found_inf != 0
        self.keep = (~self.skipped).float()
        skipped = self.skipped.float()
        self.one_minus_beta1 = host.one_minus_beta1 * self.keep
        self.beta2 = host.beta2 * self.keep + skipped
        self.one_minus_beta2 = host.one_minus_beta2
        self.decay = host.decay * self.keep + skipped


@torch.no_grad()
def _step_params(
    optimizer: torch.optim.Optimizer, group: dict, params: list[torch.Tensor], host: AdamHostScalars,
    found_inf: torch.Tensor | None = None,
) -> None:
    params = [p for p in params if p.grad is not None]  # as the eager step: only those with gradients
    if not params:
        return
    state = [optimizer.state[p] for p in params]
    steps = [s["step"] for s in state]
    lr, (beta1, beta2) = group["lr"], group["betas"]  # float64 device tensors
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    skip = _SkippableScalars(host, found_inf) if found_inf is not None else None

    if skip is not None:
        torch._foreach_add_(steps, [skip.keep] * len(steps))  # a list: the tensor-scalar overload syncs on CUDA
    else:
        torch._foreach_add_(steps, 1)
    step = steps[0].double()  # every parameter here has this count
    # The step-dependent scalars, in float64 and rounded once, as the eager step
    # computes them on the host. The update is the eager one,
    # p - step_size * m / (sqrt(v) / sqrt(bc2) + eps), written as
    # p + m / ((sqrt(v) / sqrt(bc2) + eps) / -step_size) so that it ends in one
    # addcdiv_ without a host number.
    bias_correction2_sqrt = (1 - beta2**step).sqrt().float()
    neg_step_size = (lr / (beta1**step - 1)).float()
    if skip is not None:
        # a zero step size divides the denominator into +-inf: the update adds +-0
        neg_step_size = neg_step_size * skip.keep
        host = skip
    if group["weight_decay"] != 0 and decoupled:
        torch._foreach_mul_(params, host.decay)
    coupled_decay = group["weight_decay"] if not decoupled else 0
    scalars = (host, bias_correction2_sqrt, neg_step_size)
    small = [i for i, p in enumerate(params) if p.numel() < _PER_TENSOR_NUMEL]
    if small:
        _foreach_update([params[i] for i in small], [state[i] for i in small], group, coupled_decay, *scalars)
    for p, s in zip(params, state):
        if p.numel() >= _PER_TENSOR_NUMEL:
            _tensor_update(p, s, group, coupled_decay, *scalars)


def _foreach_update(
    params: list[torch.Tensor], state: list[dict], group: dict, decay: float,
    c: AdamHostScalars | _SkippableScalars, bias_correction2_sqrt: torch.Tensor, neg_step_size: torch.Tensor,
) -> None:
    grads = [p.grad for p in params]
    exp_avgs = [s["exp_avg"] for s in state]
    exp_avg_sqs = [s["exp_avg_sq"] for s in state]
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    if decay != 0:
        grads = torch._foreach_add(grads, params, alpha=decay)
    if isinstance(c, _SkippableScalars):
        grads = [torch.where(c.skipped, 0.0, g) for g in grads]  # a skipped step reads zeros, not infs
    # temporaries are dropped as soon as they are used: a graph's pool keeps its peak
    # exp_avg.lerp_(grad, 1 - beta1), with the weight read from the device
    difference = torch._foreach_sub(grads, exp_avgs)
    torch._foreach_mul_(difference, c.one_minus_beta1)
    torch._foreach_add_(exp_avgs, difference)
    del difference
    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    torch._foreach_mul_(exp_avg_sqs, c.beta2)
    scaled = torch._foreach_mul(grads, c.one_minus_beta2)
    torch._foreach_addcmul_(exp_avg_sqs, scaled, grads)
    del scaled
    if group["amsgrad"]:
        max_exp_avg_sqs = [s["max_exp_avg_sq"] for s in state]
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        exp_avg_sqs = max_exp_avg_sqs
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, group["eps"])
    torch._foreach_div_(denom, neg_step_size)
    torch._foreach_addcdiv_(params, exp_avgs, denom)


def _tensor_update(
    p: torch.Tensor, state: dict, group: dict, decay: float,
    c: AdamHostScalars | _SkippableScalars, bias_correction2_sqrt: torch.Tensor, neg_step_size: torch.Tensor,
) -> None:
    grad = p.grad
    if group["maximize"]:
        grad = -grad
    if decay != 0:
        grad = grad.add(p, alpha=decay)
    if isinstance(c, _SkippableScalars):
        grad = torch.where(c.skipped, 0.0, grad)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, c.one_minus_beta1)
    exp_avg_sq.mul_(c.beta2).addcmul_(grad * c.one_minus_beta2, grad)
    if group["amsgrad"]:
        exp_avg_sq = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(group["eps"]).div_(neg_step_size)
    p.addcdiv_(exp_avg, denom)


def adam_step_on_device(optimizer: torch.optim.Optimizer, splits: list[list[list[torch.Tensor]]],
                        host_scalars: list[AdamHostScalars], updated: list[torch.Tensor] | None = None,
                        closure: Any = None, found_inf: torch.Tensor | None = None) -> Any:
    """Adam/AdamW's step with ``lr`` and ``betas`` read from float64 device tensors.

    ``splits`` comes from :func:`uniform_step_groups`, taken before capture;
    ``host_scalars`` holds one :class:`AdamHostScalars` per param group. The
    parameters updated (those with gradients) are appended to ``updated``. With
    ``found_inf``, the step changes nothing where it is nonzero (on the device).
    """
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    for group, parts, host in zip(optimizer.param_groups, splits, host_scalars):
        for params in parts:
            if updated is not None:
                updated.extend(p for p in params if p.grad is not None)
            _step_params(optimizer, group, params, host, found_inf)
    return loss
