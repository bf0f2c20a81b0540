"""Graph-safe optimizer preparation.

A captured optimizer step replays the kernels it recorded, with every Python
number that was passed to them baked in. Three measures keep each replay equal to
the step the user's optimizer would take eagerly:

1. **State on the device.** Adam-style optimizers keep ``state["step"]`` on the CPU
   and compute bias corrections on the host unless ``capturable=True``. From the
   first capture on, such groups are capturable and their step counters live on the
   parameters' device (eager steps then use the same device-side arithmetic).
2. **Live hyper-parameters.** The learning rate (and Adam's betas, which
   schedulers such as ``OneCycleLR`` cycle every step) is swapped for a device
   tensor while capturing only. Before each replay the tensor is refreshed from the
   Python float the scheduler wrote, so the user's ``param_groups`` keep their
   floats and every scheduler works unchanged.
3. **Baked hyper-parameters.** Everything else the kernels bake in (weight decay,
   momentum, eps, ...) is snapshotted at capture; any change makes the graph stale,
   and it is captured again.

Optimizers that cannot be captured at all (``LBFGS``, state held on the host) are
reported with the reason, and the caller runs them eagerly.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

__all__ = ["OptimizerPlan", "GraphSafeOptimizer", "plan_for"]



@dataclass(frozen=True)
class OptimizerPlan:
    """How one optimizer is made graph-safe, or why it cannot be."""

    unsupported: str | None = None
    live_keys: tuple[str, ...] = ()  # swapped for device tensors while capturing
    persistent: dict[str, Any] = field(default_factory=dict)  # group settings kept from the first capture on
    while_capturing: dict[str, Any] = field(default_factory=dict)  # group settings only while capturing
    step_on_device: bool = False  # move state["step"] to the parameter's device
    # Adam's betas can be made live too, through a step of our own (PyTorch's foreach
    # kernels take betas as host numbers); done once a scheduler is seen to change them
    live_betas_possible: bool = False


def _is_dense_cuda_float(optimizer: torch.optim.Optimizer) -> bool:
    return all(
        p.is_cuda and p.is_floating_point() and p.layout is torch.strided
        for group in optimizer.param_groups
        for p in group["params"]
    )


def plan_for(optimizer: torch.optim.Optimizer) -> OptimizerPlan:
    """Decide how ``optimizer`` is captured, from its class and its groups' settings."""
    name = type(optimizer).__name__
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.LBFGS):
        return OptimizerPlan(
            unsupported="LBFGS re-evaluates its closure a data-dependent number of times and reads the loss on the host"
        )
    if isinstance(optimizer, torch.optim.SparseAdam):
        return OptimizerPlan(unsupported="SparseAdam works on sparse gradients, which a graph cannot replay")
    if any(group.get("differentiable") for group in groups):
        return OptimizerPlan(unsupported=f"{name} was built with differentiable=True")

    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        if all(group.get("fused") for group in groups):
            # fused kernels read a tensor lr and keep their step counts on the device already
            return OptimizerPlan(live_keys=("lr",))
        return OptimizerPlan(
            live_keys=("lr",), persistent={"capturable": True}, step_on_device=True,
            live_betas_possible=_adam_step_applies(optimizer),
        )

    if isinstance(optimizer, torch.optim.SGD):
        if "fused" in groups[0] and _is_dense_cuda_float(optimizer):
            # the fused kernel reads the learning rate from a tensor; the foreach path cannot
            return OptimizerPlan(live_keys=("lr",), while_capturing={"fused": True, "foreach": False})
        return OptimizerPlan()

    if all("capturable" in group for group in groups):
        # PyTorch's other capturable optimizers (RMSprop, NAdam, RAdam, Adamax, ...):
        # device-side state, hyper-parameters baked and re-captured when changed
        return OptimizerPlan(persistent={"capturable": True}, step_on_device=True)

    return OptimizerPlan()


_MISSING = object()


def _frozen(value: Any) -> Any:
    """A comparable stand-in for a hyper-parameter value: plain values as they are,
    tensors and other objects by identity."""
    if value is None or isinstance(value, (bool, int, float, complex, str)):
        return value
    if isinstance(value, tuple):
        return tuple(_frozen(v) for v in value)
    return ("object", id(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_live_value(value: Any) -> bool:
    """Whether a hyper-parameter is a plain number (or a tuple of them) that a device tensor can stand in for."""
    if isinstance(value, tuple):
        return len(value) > 0 and all(_is_number(v) for v in value)
    return _is_number(value)


def _to_live(value: Any, device: torch.device) -> Any:
    """A float32 device tensor (or a tuple of them) holding ``value``."""
    if isinstance(value, tuple):
        return tuple(torch.tensor(float(v), dtype=torch.float32, device=device) for v in value)
    return torch.tensor(float(value), dtype=torch.float32, device=device)


class GraphSafeOptimizer:
    """Prepares one optimizer for capture, keeps its live hyper-parameters in sync
    and tells when a captured step has gone stale.

    The user's optimizer object is used as it is; only group settings named by its
    :class:`OptimizerPlan` change, and :meth:`restore` puts them back.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.plan = plan_for(optimizer)
        self.live_keys: tuple[str, ...] = self.plan.live_keys
        self._saved_step: Any = _MISSING  # the optimizer's own `step` attribute, while ours stands in
        self._originals: list[dict[str, Any]] = []  # per group: settings before the first capture
        self._moved_steps: list[tuple[dict, torch.device]] = []  # state dicts whose step we moved
        self._live: dict[tuple[int, str], Any] = {}  # (group index, key) -> device tensor(s)
        self._synced: dict[tuple[int, str], Any] = {}  # (group index, key) -> value last written to the device
        self._baked: list[dict[str, Any]] | None = None  # per group: baked values when captured
        self._structure: tuple | None = None  # identities that a captured graph depends on
        self._while_capturing: list[dict[str, Any]] = []  # per group: settings to restore after capturing
        self._swapped: dict[tuple[int, str], Any] = {}  # live slots swapped for tensors in this capture
        self._warned_flag: Any = _MISSING  # PyTorch's "capturable but uncaptured" warning flag, before us

    # -- checks ---------------------------------------------------------------

    @property
    def unsupported(self) -> str | None:
        return self.plan.unsupported

    def host_state(self) -> str | None:
        """Names optimizer state that lives on the host, which a graph would freeze."""
        moved = self.plan.step_on_device
        for index, (param, state) in enumerate(self.optimizer.state.items()):
            if not isinstance(state, dict):
                continue
            for key, value in state.items():
                if moved and key == "step":
                    continue
                where = f"{type(self.optimizer).__name__}.state[param {index}][{key!r}]"
                if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                    # a scalar on the host is a counter the host updates (Adagrad's step);
                    # larger CPU state only matters when the parameters live elsewhere
                    if value.dim() == 0 or (isinstance(param, torch.Tensor) and param.device.type != "cpu"):
                        return f"{where} is a CPU tensor that changes on the host at every step"
                if isinstance(value, numbers.Number):
                    return f"{where} is a Python number that changes on the host at every step"
        return None

    def hyperparameters(self) -> list[dict[str, Any]]:
        """A comparable snapshot of every group's hyper-parameters (not its params)."""
        return [{k: _frozen(v) for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]

    @staticmethod
    def describe_change(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str | None:
        if len(before) != len(after):
            return f"the number of param_groups changed from {len(before)} to {len(after)}"
        for index, (a, b) in enumerate(zip(before, after)):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    return f"param_groups[{index}][{key!r}] changed from {a.get(key)!r} to {b.get(key)!r}"
        return None

    # -- capture --------------------------------------------------------------

    def _first_device(self, group: dict) -> torch.device:
        return group["params"][0].device

    def enter_capture(self) -> None:
        """Make the optimizer capturable; swap live hyper-parameters for device tensors."""
        groups = self.optimizer.param_groups
        if not self._originals:
            self._originals = [{k: g.get(k) for k in self.plan.persistent} for g in groups]
            # eager steps between replays run capturable groups uncaptured, on purpose
            self._warned_flag = self.optimizer.__dict__.get("_warned_capturable_if_run_uncaptured", _MISSING)
            self.optimizer._warned_capturable_if_run_uncaptured = True
        for group in groups:
            group.update(self.plan.persistent)
        if self.plan.step_on_device:
            self._move_steps_to_device()
        self._while_capturing = [{k: g.get(k) for k in self.plan.while_capturing} for g in groups]
        for group in groups:
            group.update(self.plan.while_capturing)
        self._swapped = {}
        for index, group in enumerate(groups):
            if not group["params"]:
                continue
            for key in self.live_keys:
                value = group.get(key)
                slot = (index, key)
                if not _is_live_value(value):
                    continue  # a tensor already, or not a number: leave it as the user set it
                if slot not in self._live:
                    self._live[slot] = _to_live(value, self._first_device(group))
                self._write_live(slot, value)
                self._swapped[slot] = value
                group[key] = self._live[slot]
        if "betas" in self.live_keys:
            self._saved_step = self.optimizer.__dict__.get("step", _MISSING)
            self.optimizer.step = partial(adam_step_with_tensor_hyperparameters, self.optimizer)
        self._baked = self._baked_snapshot()

    def exit_capture(self) -> str | None:
        """Put the user's floats back; names a hyper-parameter the step itself changed, if any.

        A step that writes its own hyper-parameters (an ``optimizer_step`` override
        setting a warm-up learning rate, say) cannot be replayed: the graph would
        keep the value of the captured step forever.
        """
        problem = None
        groups = self.optimizer.param_groups
        for (index, key), value in self._swapped.items():
            group = groups[index] if index < len(groups) else None
            if group is not None and group.get(key) is self._live[(index, key)]:
                group[key] = value
            elif problem is None:
                problem = f"the step wrote param_groups[{index}][{key!r}] while it ran"
        if problem is None:
            change = self.describe_change(self._baked, self._baked_snapshot())
            if change is not None:
                problem = f"the step changed its optimizer's hyper-parameters while it ran: {change}"
        for group, saved in zip(groups, self._while_capturing):
            group.update(saved)
        if "betas" in self.live_keys:
            if self._saved_step is _MISSING:
                self.optimizer.__dict__.pop("step", None)
            else:
                self.optimizer.step = self._saved_step
            self._saved_step = _MISSING
        self._baked = self._baked_snapshot()
        self._structure = self._structure_key()
        return problem

    def _baked_snapshot(self) -> list[dict[str, Any]]:
        """Hyper-parameters a graph bakes in: all but the params and the live slots."""
        return [
            {k: _frozen(v) for k, v in group.items() if k != "params" and (i, k) not in self._live}
            for i, group in enumerate(self.optimizer.param_groups)
        ]

    def _structure_key(self) -> tuple:
        opt = self.optimizer
        return (id(opt.state), id(opt.param_groups), tuple(id(g["params"]) for g in opt.param_groups))

    def _move_steps_to_device(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if not state or "step" not in state:
                    continue
                step = state["step"]
                if isinstance(step, torch.Tensor) and step.device != p.device:
                    self._moved_steps.append((state, step.device))
                    state["step"] = step.to(device=p.device, dtype=torch.float32)

    def _write_live(self, slot: tuple[int, str], value: Any) -> None:
        live = self._live[slot]
        if isinstance(live, tuple):
            for tensor, v in zip(live, value):
                tensor.fill_(float(v))
        else:
            live.fill_(float(value))
        self._synced[slot] = value

    # -- replay ---------------------------------------------------------------

    def stale_reason(self) -> str | None:
        """Why a graph captured earlier no longer matches this optimizer, if it does not."""
        if self._structure != self._structure_key():
            return f"{type(self.optimizer).__name__}'s state or param_groups were replaced (a checkpoint was loaded?)"
        change = self.describe_change(self._baked, self._baked_snapshot())
        if change is not None:
            if "['betas']" in change and self.plan.live_betas_possible and "betas" not in self.live_keys:
                self.live_keys = (*self.live_keys, "betas")  # a scheduler cycles them: capture them live
            return f"{type(self.optimizer).__name__} {change}"
        groups = self.optimizer.param_groups
        for index, key in self._live:
            if not _is_live_value(groups[index].get(key)):
                return f"{type(self.optimizer).__name__} param_groups[{index}][{key!r}] is no longer a number"
        return None

    def sync_live(self) -> None:
        """Write hyper-parameters the scheduler changed since the last replay into the graph's tensors."""
        groups = self.optimizer.param_groups
        for slot in self._live:
            value = groups[slot[0]].get(slot[1])
            if value != self._synced[slot]:
                self._write_live(slot, value)

    # -- teardown -------------------------------------------------------------

    def restore(self) -> None:
        """Undo every change: group settings as the user made them, step counters where they were."""
        for group, saved in zip(self.optimizer.param_groups, self._originals):
            group.update(saved)
        if self._originals:
            if self._warned_flag is _MISSING:
                self.optimizer.__dict__.pop("_warned_capturable_if_run_uncaptured", None)
            else:
                self.optimizer._warned_capturable_if_run_uncaptured = self._warned_flag
        for state, device in self._moved_steps:
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.to(device)
        self._originals, self._moved_steps = [], []
        self._live.clear()
        self._synced.clear()
        self._baked = self._structure = None
        self.live_keys = self.plan.live_keys

    def user_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` as the user's unprepared optimizer would have saved it (for checkpoints)."""
        if not self._originals and not self._moved_steps:
            return state_dict
        groups = [dict(g) for g in state_dict["param_groups"]]
        for group, saved in zip(groups, self._originals):
            group.update(saved)
        # state_dict() shares the live per-parameter dicts: copy the ones we change
        devices = {id(state): device for state, device in self._moved_steps}
        state = {}
        for key, entry in state_dict["state"].items():
            if id(entry) in devices and isinstance(entry.get("step"), torch.Tensor):
                entry = {**entry, "step": entry["step"].to(devices[id(entry)])}
            state[key] = entry
        return {**state_dict, "state": state, "param_groups": groups}


def _adam_step_applies(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`adam_step_with_tensor_hyperparameters` computes exactly what this optimizer's
    own capturable step would: PyTorch's Adam or AdamW, real parameters, no step hooks."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return False
    return all(
        not group.get("fused") and not group.get("differentiable") and not any(p.is_complex() for p in group["params"])
        for group in optimizer.param_groups
    )


@torch.no_grad()
def _adam_group_step(optimizer: torch.optim.Optimizer, group: dict) -> None:
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        state = optimizer.state[p]
        params.append(p)
        grads.append(p.grad)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        steps.append(state["step"])
        if group["amsgrad"]:
            max_exp_avg_sqs.append(state["max_exp_avg_sq"])
    if not params:
        return
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    torch._foreach_add_(steps, 1)
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    # exp_avg.lerp_(grad, 1 - beta1), spelled with ops that take a device tensor as the weight
    difference = torch._foreach_sub(grads, exp_avgs)
    torch._foreach_mul_(difference, 1 - beta1)
    torch._foreach_add_(exp_avgs, difference)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, torch._foreach_mul(grads, 1 - beta2), grads, 1.0)
    # bias corrections exactly as PyTorch's capturable path computes them
    bias_correction1 = torch._foreach_pow([beta1] * len(steps), steps)
    bias_correction2 = torch._foreach_pow([beta2] * len(steps), steps)
    torch._foreach_sub_(bias_correction1, 1)
    torch._foreach_sub_(bias_correction2, 1)
    torch._foreach_neg_(bias_correction2)
    torch._foreach_div_(bias_correction1, lr)
    torch._foreach_reciprocal_(bias_correction1)  # -lr / (1 - beta1^t)
    torch._foreach_sqrt_(bias_correction2)
    if group["amsgrad"]:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        denom = torch._foreach_sqrt(max_exp_avg_sqs)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2)
    torch._foreach_add_(denom, eps)
    torch._foreach_div_(denom, bias_correction1)
    torch._foreach_addcdiv_(params, exp_avgs, denom)


def adam_step_with_tensor_hyperparameters(optimizer: torch.optim.Optimizer, closure: Any = None) -> Any:
    """Adam/AdamW's capturable step with ``lr`` and ``betas`` read from device tensors.

    PyTorch's own foreach kernels take the betas as host numbers, so a captured step
    would keep them fixed; schedulers such as ``OneCycleLR`` cycle them every step.
    This step stands in for ``optimizer.step`` while capturing, with the same
    arithmetic as PyTorch's capturable path (up to the rounding of one lerp).
    """
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    for group in optimizer.param_groups:
        _adam_group_step(optimizer, group)
    return loss
