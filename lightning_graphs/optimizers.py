"""Graph-safe optimizer preparation.

A captured optimizer step replays the kernels it recorded, with every Python
number that was passed to them baked in. Three measures keep each replay equal to
the step the user's optimizer would take eagerly:

1. **Scalar state on the device.** Adam-style optimizers count steps in 0-dim CPU
   tensors, which a graph would freeze. From the first capture on they live on the
   parameters' device; the user's eager steps read them from there.
2. **Live hyper-parameters.** The learning rate (and Adam's betas, which
   schedulers such as ``OneCycleLR`` cycle every step) is swapped for a device
   tensor while capturing only. Before each replay the tensor is refreshed from the
   Python float the scheduler wrote, so the user's ``param_groups`` keep their
   floats and every scheduler works unchanged.
3. **Baked hyper-parameters.** Everything else the kernels bake in (weight decay,
   momentum, eps, ...) is snapshotted at capture; any change makes the graph stale,
   and it is captured again.

While capturing, a few group settings differ from the user's: Adam and AdamW are
stepped by :mod:`lightning_graphs.adam_step`, SGD by its fused kernel (which reads
a tensor learning rate), other optimizers with ``capturable=True``. Eager steps
always run the user's settings. Optimizers that cannot be captured at all
(``LBFGS``, state held on the host) are reported with the reason.
"""

from __future__ import annotations

import numbers
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import torch

from lightning_graphs.adam_step import AdamHostScalars, adam_step_applies, adam_step_on_device, uniform_step_groups
from lightning_graphs.step_reach import with_step_hooks

__all__ = ["OptimizerPlan", "GraphSafeOptimizer", "plan_for"]

_MISSING = object()


@dataclass(frozen=True)
class OptimizerPlan:
    """How one optimizer is made graph-safe, or why it cannot be."""

    unsupported: str | None = None
    live_keys: tuple[str, ...] = ()  # swapped for device tensors while capturing
    live_dtype: torch.dtype = torch.float32  # what the capturing kernels read them as
    while_capturing: dict[str, Any] = field(default_factory=dict)  # group settings only while capturing
    scalar_state_on_device: bool = False  # move 0-dim CPU state (step counters) to the device
    own_adam_step: bool = False  # capture adam_step_on_device instead of optimizer.step
    rounding: str | None = None  # how the captured step rounds differently from the eager one, if it does


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
    tensor_setting = _tensor_setting(groups)
    if tensor_setting is not None:
        return OptimizerPlan(
            unsupported=f"{name}'s {tensor_setting} is a tensor, which schedulers change in place and a captured step "
            "may have read as a number once (a CPU tensor, or a factor computed from it); give it as a Python "
            "number (`lr=1e-3`) to graph the step"
        )

    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        if adam_step_applies(optimizer):
            return OptimizerPlan(
                live_keys=("lr", "betas"), live_dtype=torch.float64, scalar_state_on_device=True, own_adam_step=True
            )
        if all(group.get("fused") for group in groups):
            # fused kernels read a tensor lr and keep their step counts on the device already
            return OptimizerPlan(live_keys=("lr",))
        return OptimizerPlan(live_keys=("lr",), while_capturing={"capturable": True}, scalar_state_on_device=True)

    if isinstance(optimizer, torch.optim.SGD):
        if "fused" in groups[0] and _is_dense_cuda_float(optimizer):
            # the fused kernel reads the learning rate from a tensor; the foreach path cannot
            return OptimizerPlan(live_keys=("lr",), while_capturing={"fused": True, "foreach": False})
        return OptimizerPlan()

    if all("capturable" in group for group in groups):
        # PyTorch's other capturable optimizers (RMSprop, NAdam, RAdam, Adamax, ...):
        # device-side state, hyper-parameters baked and re-captured when changed
        rounding = None
        if isinstance(optimizer, (torch.optim.NAdam, torch.optim.RAdam)):
            rounding = (
                f"{name} is graphed through PyTorch's capturable {name}, which computes its step-dependent "
                f"factors in float32 tensors on the device where eager {name} uses Python floats: parameters "
                f"differ from eager training's by rounding (about 1e-5 after 25 steps of a small model), and the "
                "difference can grow with training"
            )
        return OptimizerPlan(while_capturing={"capturable": True}, scalar_state_on_device=True, rounding=rounding)

    return OptimizerPlan()


def _tensor_setting(groups: list[dict]) -> str | None:
    """The first hyper-parameter given as a tensor (``lr=torch.tensor(1e-3)``, tensor
    ``betas``), as ``param_groups[i]['key']``."""
    for index, group in enumerate(groups):
        for key, value in group.items():
            if key == "params":
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            if any(isinstance(v, torch.Tensor) for v in values):
                return f"param_groups[{index}][{key!r}]"
    return None


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


class GraphSafeOptimizer:
    """Prepares one optimizer for capture, keeps its live hyper-parameters in sync
    and tells when a captured step has gone stale.

    The user's optimizer object is used as it is; :meth:`restore` undoes every change.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.plan = plan_for(optimizer)
        self._moved_state: list[tuple[dict, str, torch.device]] = []  # (state, key, original device)
        self._live: dict[tuple[int, str], Any] = {}  # (group index, key) -> device tensor(s)
        self._synced: dict[tuple[int, str], Any] = {}  # (group index, key) -> value last written to the device
        self._swapped: dict[tuple[int, str], Any] = {}  # live slots swapped for tensors in this capture
        self._while_capturing: list[dict[str, Any]] = []  # per group: settings to restore after capturing
        self._saved_step: Any = _MISSING  # the optimizer's own `step` attribute, while ours stands in
        self._saved_zero_grad: Any = _MISSING  # its own `zero_grad` attribute, while a watcher stands in
        # whether the captured step called zero_grad before it touched the gradients it
        # found (then its graph reads none of them; one zeroing after its backward read them)
        self.zeroed_in_capture = False
        self._host_scalars: list[AdamHostScalars | None] = []  # per group, for our Adam step
        self._updated: list[torch.Tensor] = []  # parameters our Adam step updated in the capture under way
        # parameters the graphs held update: our Adam step shares bias corrections among
        # parameters counted alike, so every step must keep updating the same ones
        self._graph_updates: frozenset[int] | None = None
        self._baked: list[dict[str, Any]] | None = None  # per group: baked values when captured
        self._baked_raw: list[tuple[int, dict[str, Any]]] = []  # per group: (item count, the values themselves)
        self._structure: tuple | None = None  # identities that a captured graph depends on

    # -- checks ---------------------------------------------------------------

    @property
    def unsupported(self) -> str | None:
        return self.plan.unsupported

    def host_state(self) -> str | None:
        """Names optimizer state that lives on the host, which a graph would freeze."""
        for index, (param, state) in enumerate(self.optimizer.state.items()):
            if not isinstance(state, dict):
                continue
            for key, value in state.items():
                where = f"{type(self.optimizer).__name__}.state[param {index}][{key!r}]"
                if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                    if value.dim() == 0 and self.plan.scalar_state_on_device:
                        continue  # moved to the device at capture
                    # a scalar on the host is a counter the host updates (Adagrad's step);
                    # larger CPU state only matters when the parameters live elsewhere
                    if value.dim() == 0 or (isinstance(param, torch.Tensor) and param.device.type != "cpu"):
                        return f"{where} is a CPU tensor that changes on the host at every step"
                if isinstance(value, numbers.Number):
                    return f"{where} is a Python number that changes on the host at every step"
        return None

    def skip_on_device_unsupported(self) -> str | None:
        """Why a captured step of this optimizer cannot skip itself on the device
        when a GradScaler finds an inf or NaN (fp16 mixed precision), if so."""
        if self.plan.own_adam_step or self.plan.while_capturing.get("fused"):
            return None
        if all(group.get("fused") for group in self.optimizer.param_groups):
            return None  # fused kernels take found_inf
        return (
            f"{type(self.optimizer).__name__} cannot skip an overflowing fp16 step on the device (Adam, AdamW, SGD "
            "and fused optimizers can)"
        )

    def step_unless_found_inf(self, found_inf: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """While capturing: the optimizer step, changing nothing at replays where
        ``found_inf`` is nonzero (see :mod:`lightning_graphs.amp`)."""
        if self.plan.own_adam_step:
            return self.optimizer.step(*args, found_inf=found_inf, **kwargs)
        # fused kernels read the flag from the optimizer, where GradScaler puts it for them
        self.optimizer.found_inf = found_inf
        try:
            return self.optimizer.step(*args, **kwargs)
        finally:
            del self.optimizer.found_inf

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

    def enter_capture(self) -> None:
        """Make the optimizer capturable; swap live hyper-parameters for device tensors."""
        groups = self.optimizer.param_groups
        if self.plan.scalar_state_on_device:
            self._move_scalar_state_to_device()
        if self.plan.own_adam_step:
            # kept across captures, like the live tensors: every graph held reads the same ones
            held = self._host_scalars
            self._host_scalars = [
                (held[i] if i < len(held) and held[i] is not None else AdamHostScalars(g["params"][0].device)).write(g)
                if g["params"] else None
                for i, g in enumerate(groups)
            ]
        self._while_capturing = [{k: g.get(k) for k in self.plan.while_capturing} for g in groups]
        for group in groups:
            group.update(self.plan.while_capturing)
        self._swapped = {}
        for index, group in enumerate(groups):
            if not group["params"]:
                continue
            for key in self.plan.live_keys:
                value = group.get(key)
                if not _is_live_value(value):
                    continue  # a tensor already, or not a number: leave it as the user set it
                slot = (index, key)
                if slot not in self._live:
                    self._live[slot] = self._new_live(value, group["params"][0].device)
                self._write_live(slot, value)
                self._swapped[slot] = value
                group[key] = self._live[slot]
        self.zeroed_in_capture = False
        self._saved_zero_grad = self.optimizer.__dict__.get("zero_grad", _MISSING)
        zero_grad = self.optimizer.zero_grad
        found = [(p, p.grad, p.grad._version) for group in groups for p in group["params"] if p.grad is not None]
        called = False

        def watched_zero_grad(*args: Any, **kwargs: Any) -> Any:
            nonlocal called
            if not called:  # the first zeroing decides
                called = True
                self.zeroed_in_capture = all(p.grad is grad and grad._version == version for p, grad, version in found)
            return zero_grad(*args, **kwargs)

        self.optimizer.zero_grad = watched_zero_grad
        if self.plan.own_adam_step:
            self._saved_step = self.optimizer.__dict__.get("step", _MISSING)
            self._updated = []
            self.optimizer.step = with_step_hooks(self.optimizer, partial(
                adam_step_on_device, self.optimizer, uniform_step_groups(self.optimizer), self._host_scalars,
                self._updated,
            ))
        self._baked = self._baked_snapshot()

    def stood_in_values(self) -> dict[int, Any]:
        """While capturing: the user's value each live device tensor stands in for, by the tensor's id."""
        found: dict[int, Any] = {}
        for slot, value in self._swapped.items():
            live = self._live[slot]
            pairs = zip(live, value) if isinstance(live, (tuple, list)) else [(live, value)]
            found.update((id(tensor), number) for tensor, number in pairs if isinstance(tensor, torch.Tensor))
        return found

    def exit_capture(self) -> str | None:
        """Put the user's settings back; names a hyper-parameter the step itself changed, if any.

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
        self._swapped = {}
        if problem is None:
            change = self.describe_change(self._baked, self._baked_snapshot())
            if change is not None:
                problem = f"the step changed its optimizer's hyper-parameters while it ran: {change}"
        for group, saved in zip(groups, self._while_capturing):
            group.update(saved)
        self._while_capturing = []
        if self._saved_zero_grad is not _MISSING:
            self.optimizer.zero_grad = self._saved_zero_grad
        else:
            self.optimizer.__dict__.pop("zero_grad", None)
        self._saved_zero_grad = _MISSING
        if self._saved_step is not _MISSING:
            self.optimizer.step = self._saved_step
        elif self.plan.own_adam_step:
            self.optimizer.__dict__.pop("step", None)
        self._saved_step = _MISSING
        if problem is None and self._updated:
            updated = frozenset(id(p) for p in self._updated)
            if self._graph_updates is None:
                self._graph_updates = updated
            elif updated != self._graph_updates:
                problem = (
                    f"the steps captured update different sets of parameters ({len(updated)} against "
                    f"{len(self._graph_updates)}); the graph-safe {type(self.optimizer).__name__} step needs every "
                    "step to update the same ones"
                )
        self._updated = []
        self._baked_raw = [(len(group), baked) for group, baked in zip(groups, self._baked_values())]
        self._baked = [{k: _frozen(v) for k, v in baked.items()} for _, baked in self._baked_raw]
        self._structure = self.structure_key()
        return problem

    def _baked_values(self) -> list[dict[str, Any]]:
        """Per group, the hyper-parameters a graph bakes in: all but the params and the live slots."""
        return [
            {k: v for k, v in group.items() if k != "params" and (i, k) not in self._live}
            for i, group in enumerate(self.optimizer.param_groups)
        ]

    def _baked_snapshot(self) -> list[dict[str, Any]]:
        """:meth:`_baked_values`, comparable (see ``_frozen``)."""
        return [{k: _frozen(v) for k, v in baked.items()} for baked in self._baked_values()]

    def structure_key(self) -> tuple:
        """Identities of the state, the param groups and their parameter lists, and how
        many parameters have state (``optimizer.state.clear()`` resets it in place)."""
        opt = self.optimizer
        return (id(opt.state), len(opt.state), id(opt.param_groups), tuple(id(g["params"]) for g in opt.param_groups))

    def _move_scalar_state_to_device(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                for key, value in list((state or {}).items()):
                    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.device != p.device:
                        self._moved_state.append((state, key, value.device))
                        state[key] = value.to(device=p.device)

    def _new_live(self, value: Any, device: torch.device) -> Any:
        make = partial(torch.zeros, (), dtype=self.plan.live_dtype, device=device)
        return tuple(make() for _ in value) if isinstance(value, tuple) else make()

    def _write_live(self, slot: tuple[int, str], value: Any) -> None:
        live = self._live[slot]
        if isinstance(live, tuple):
            for tensor, v in zip(live, value):
                tensor.fill_(float(v))
        else:
            live.fill_(float(value))
        self._synced[slot] = value

    # -- eager steps while graphs are held -----------------------------------------

    @contextmanager
    def watching_steps(self) -> Iterator[list[frozenset[int]] | None]:
        """Within the block, record each step the optimizer takes (eagerly) as the set
        of parameters it updated: those with gradients. ``None`` where the optimizer
        offers no step hooks (an object that only looks like a torch optimizer)."""
        taken: list[frozenset[int]] = []

        def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            taken.append(
                frozenset(id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None)
            )

        try:
            handle = self.optimizer.register_step_post_hook(record)
        except (AttributeError, TypeError):  # an optimizer-like object without torch's hooks
            yield None
            return
        try:
            yield taken
        finally:
            handle.remove()

    def diverging_update(self, taken: list[frozenset[int]] | None) -> str | None:
        """Why eager steps ``taken`` leave step counts the graphs held do not expect, if so."""
        if not taken or self._graph_updates is None or not self.plan.own_adam_step:
            return None
        if any(updated != self._graph_updates for updated in taken):
            return f"an eager {type(self.optimizer).__name__} step updated other parameters than the captured steps"
        return None

    def forget_graphs(self) -> None:
        """No graph is held any more: the next capture sets the parameters updated."""
        self._graph_updates = None

    # -- replay ---------------------------------------------------------------

    def stale_reason(self) -> tuple[str | None, bool]:
        """Why a graph captured earlier no longer matches this optimizer, if it does not,
        and whether its parameters changed (new ones get their state from an eager step).

        Runs before every replay, so the common case (nothing changed) is a few
        identity checks per hyper-parameter."""
        name = type(self.optimizer).__name__
        if self._structure != self.structure_key():
            return f"{name}'s state or param_groups were replaced or extended", True
        if self._baked_values_changed():
            change = self.describe_change(self._baked, self._baked_snapshot())
            if change is not None:
                if "['momentum']" in change:  # a number in the graph: cycled at every step, it thrashes
                    change += (" (OneCycleLR and CyclicLR cycle it by default: `cycle_momentum=False` keeps it "
                               "fixed and graphed)")
                return f"{name} {change}", False
        groups = self.optimizer.param_groups
        for index, key in self._live:
            if not _is_live_value(groups[index].get(key)):
                return f"{name} param_groups[{index}][{key!r}] is no longer a number", False
        return None, False

    def _baked_values_changed(self) -> bool:
        groups = self.optimizer.param_groups
        if len(groups) != len(self._baked_raw):
            return True
        for group, (count, baked) in zip(groups, self._baked_raw):
            if len(group) != count:
                return True
            for key, value in baked.items():
                current = group.get(key, _MISSING)
                if current is not value and _frozen(current) != _frozen(value):
                    return True
        return False

    def sync_live(self) -> None:
        """Write hyper-parameters the scheduler changed since the last replay into the graph's tensors."""
        groups = self.optimizer.param_groups
        changed = None
        for slot in self._live:
            value = groups[slot[0]].get(slot[1])
            if value != self._synced[slot]:
                self._write_live(slot, value)
                changed = (changed or set()) | {slot[0]}
        for index in changed or ():
            host = self._host_scalars[index] if index < len(self._host_scalars) else None
            if host is not None:
                host.write(groups[index])

    # -- teardown -------------------------------------------------------------

    def restore(self) -> None:
        """Undo every change: state where it was, group settings as the user made them."""
        if self._while_capturing:  # a capture an exception left unfinished
            self.exit_capture()
        for state, key, device in self._moved_state:
            value = state.get(key)
            if isinstance(value, torch.Tensor):
                state[key] = value.to(device)
        self._moved_state = []
        self._live.clear()
        self._synced.clear()
        self._host_scalars = []
        self._graph_updates = None
        self._baked = self._structure = None
        self._baked_raw = []

    def user_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` as the user's unprepared optimizer would have saved it (for checkpoints)."""
        if not self._moved_state:
            return state_dict
        # state_dict() shares the live per-parameter dicts: copy the ones we change
        moved: dict[int, list[tuple[str, torch.device]]] = {}
        for state, key, device in self._moved_state:
            moved.setdefault(id(state), []).append((key, device))
        entries = {}
        for index, entry in state_dict["state"].items():
            changes = moved.get(id(entry), ())
            if changes:
                entry = dict(entry)
                for key, device in changes:
                    if isinstance(entry.get(key), torch.Tensor):
                        entry[key] = entry[key].to(device)
            entries[index] = entry
        return {**state_dict, "state": entries}
