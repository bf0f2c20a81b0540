"""A graph-safe Adam/AdamW step whose hyper-parameters live on the device.

PyTorch's own Adam kernels take the learning rate and betas as host numbers (its
capturable path accepts a tensor learning rate, but computes the bias corrections
in float32 on the device, about 1e-5 off the host's float64 for beta2 = 0.999).
A captured step would therefore either freeze the betas that schedulers such as
``OneCycleLR`` cycle every step, or drift from the eager optimizer.

This step reads ``lr`` and ``betas`` from float64 device tensors and computes every
scalar in float64 on the device, rounding it to float32 once, as the eager
optimizer does on the host; the per-element arithmetic is PyTorch's foreach
sequence. Only the rounding of two fused operations can differ from the eager
step (a few units in the last place of an update).

It stands in for ``optimizer.step`` only while a step is captured.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["adam_step_applies", "adam_step_on_device", "uniform_step_groups"]


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
    """Per param group, the parameters (with gradients) split by their step count.

    Bias corrections depend on the step count; parameters counted alike share one
    set of scalars. Reads the counts on the host: call it before capturing. A
    parameter without state yet is kept (its step then fails loudly, not silently)."""
    groups = []
    for group in optimizer.param_groups:
        by_count: dict[float | None, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state.get(p, {})
            by_count.setdefault(float(state["step"]) if "step" in state else None, []).append(p)
        groups.append(list(by_count.values()))
    return groups


@torch.no_grad()
def _step_params(optimizer: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]) -> None:
    state = [optimizer.state[p] for p in params]
    grads = [p.grad for p in params]
    exp_avgs = [s["exp_avg"] for s in state]
    exp_avg_sqs = [s["exp_avg_sq"] for s in state]
    steps = [s["step"] for s in state]
    lr, (beta1, beta2) = group["lr"], group["betas"]  # float64 device tensors
    eps, weight_decay = group["eps"], group["weight_decay"]
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))

    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    torch._foreach_add_(steps, 1)
    step = steps[0].double()  # every parameter here has this count
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(params, (1 - lr * weight_decay).float())
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    # exp_avg.lerp_(grad, 1 - beta1), with the weight read from the device
    difference = torch._foreach_sub(grads, exp_avgs)
    torch._foreach_mul_(difference, (1 - beta1).float())
    torch._foreach_add_(exp_avgs, difference)
    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    torch._foreach_mul_(exp_avg_sqs, beta2.float())
    torch._foreach_addcmul_(exp_avg_sqs, torch._foreach_mul(grads, (1 - beta2).float()), grads, 1.0)
    step_size = (lr / (1 - beta1**step)).float()
    bias_correction2_sqrt = (1 - beta2**step).sqrt().float()
    if group["amsgrad"]:
        max_exp_avg_sqs = [s["max_exp_avg_sq"] for s in state]
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        denom = torch._foreach_sqrt(max_exp_avg_sqs)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(update, step_size)
    torch._foreach_sub_(params, update)


def adam_step_on_device(optimizer: torch.optim.Optimizer, splits: list[list[list[torch.Tensor]]],
                        closure: Any = None) -> Any:
    """Adam/AdamW's step with ``lr`` and ``betas`` read from float64 device tensors.

    ``splits`` comes from :func:`uniform_step_groups`, taken before capture.
    """
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    for group, parts in zip(optimizer.param_groups, splits):
        for params in parts:
            _step_params(optimizer, group, params)
    return loss
