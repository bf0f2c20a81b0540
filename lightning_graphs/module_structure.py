"""What a captured graph baked in of its modules, and a check cheap enough for every replay.

A graph reads and writes the memory of the parameters its step used, runs the
kernels of the train/eval mode each module was in (dropout, batch norm) and
computes the gradients of the parameters that required them. Code outside the step
may change any of these between two steps: a callback freezing a layer or putting
batch norm in eval mode at some step, a parameter's ``.data`` assigned anew. A
replay after such a change would silently train the old way, so it must be noticed
before the next replay, not only at the epoch's end. So must a buffer of PyTorch's
own modules assigned anew (batch norm's statistics reset by a callback); a buffer of
the user's own modules is followed where the step reads it, by
:class:`~lightning_graphs.python_state.StepReads`.
"""

from __future__ import annotations

import operator
import weakref
from itertools import repeat
from typing import Sequence

import torch
from torch.nn.modules import module as module_hooks

from lightning_graphs.metrics import is_metric
from lightning_graphs.python_state import framework_module

__all__ = ["ModuleStructure", "STRUCTURE_CHANGED", "structure_key", "parameters_key"]

STRUCTURE_CHANGED = "a parameter, a submodule, a train/eval mode, a requires_grad flag or a torchmetrics metric changed"


def structure_key(roots: Sequence[torch.nn.Module]) -> tuple:
    """Everything of ``roots`` a graph bakes in, for comparing (walks every module: not for every replay)."""
    modules = [m for root in roots for m in root.modules()]
    return (
        tuple(m.training for m in modules),
        tuple((id(p), p.data_ptr(), p.requires_grad) for root in roots for p in root.parameters()),
        # a submodule (an activation, a loss, a metric) replaced by another: by its `__dict__`, which a
        # ModuleStructure holds, so that a module made after the old one was freed cannot share its id
        tuple(id(m.__dict__) for m in modules),
    )


def parameters_key(roots: Sequence[torch.nn.Module]) -> tuple:
    """Which parameters ``roots`` have and which of them train: what an optimizer's state depends on."""
    return tuple((id(p), p.requires_grad) for root in roots for p in root.parameters())


class ModuleStructure:
    """The structure of ``roots`` when a graph was captured.

    :meth:`change` compares the modes, ``requires_grad`` flags and the memory of
    every parameter directly (a ``.data`` assigned anew, a dtype or device changed;
    a few microseconds for 30 parameters, growing with their number) and, only after
    a parameter or submodule was assigned on one of these modules (PyTorch's
    registration hooks say so), the whole :func:`structure_key`. Call :meth:`close`
    when done: the hooks are global.
    """

    def __init__(self, roots: Sequence[torch.nn.Module]) -> None:
        self._roots = list(roots)
        self._key = structure_key(self._roots)
        named = [(name, m) for root in self._roots for name, m in root.named_modules()]
        self._module_names = [name or type(m).__name__ for name, m in named]
        # `training` is a plain instance attribute (a wrapper forwarding it, as a compiled module does,
        # has none of its own: the module it wraps is among the modules too)
        self._module_dicts = [m.__dict__ for _, m in named]
        self._modes = [d.get("training") for d in self._module_dicts]
        params = [(name, p) for root in self._roots for name, p in root.named_parameters()]
        self._names = [f"parameter `{name}`" for name, _ in params]
        self._params = [p for _, p in params]
        self._tensor_state = self._tensor_state_now()
        # buffers of PyTorch's own modules (batch norm's running statistics), which the step reads through
        # PyTorch's code; those of the user's modules are followed where the step reads them (StepReads)
        own = [(f"{name}.{buffer_name}" if name else buffer_name, m._buffers, buffer_name, buffer)
               for name, m in named if framework_module(type(m).__module__)
               for buffer_name, buffer in m._buffers.items() if buffer is not None]
        self._buffer_names = [f"buffer `{path}`" for path, *_ in own]
        self._buffer_registries = [registry for _, registry, _, _ in own]
        self._buffer_keys = [key for _, _, key, _ in own]
        self._buffers = [buffer for *_, buffer in own]  # (held: their memory cannot go to another tensor)
        self._assigned = False
        ids = {id(m) for _, m in named}
        ref = weakref.ref(self)

        def note(module: torch.nn.Module, name: str, value: object) -> None:
            held = ref()
            if held is not None and id(module) in ids and value is not _registered(module, name):
                held._assigned = True

        self._handles = [
            module_hooks.register_module_parameter_registration_hook(note),
            module_hooks.register_module_module_registration_hook(note),
        ]

    def differs(self) -> bool:
        """Whether the whole :func:`structure_key` of the modules differs from the captured one (a walk of
        every module: for the epoch checks and after an assignment, not for every replay)."""
        return structure_key(self._roots) != self._key

    def _tensor_state_now(self) -> list:
        return [(p.requires_grad, p.data_ptr()) for p in self._params]

    def change(self) -> str | None:
        """What the graph baked in of the modules is different now, as a phrase, or ``None``."""
        if self._assigned:
            self._assigned = False
            if self.differs():
                return self._describe_assignment()
        # (written with map to stay in C: this runs before every replay)
        if not all(map(operator.is_, map(dict.get, self._module_dicts, repeat("training")), self._modes)):
            index = next(i for i, (d, mode) in enumerate(zip(self._module_dicts, self._modes))
                         if d.get("training") is not mode)
            now = "train" if self._module_dicts[index].get("training") else "eval"
            return f"`{self._module_names[index]}` was put in {now} mode"
        if not all(map(operator.is_, map(dict.get, self._buffer_registries, self._buffer_keys), self._buffers)):
            index = next(i for i, (registry, key, buffer) in enumerate(
                zip(self._buffer_registries, self._buffer_keys, self._buffers)) if registry.get(key) is not buffer)
            return (f"{self._buffer_names[index]} was assigned a new tensor (update a buffer in place, "
                    "`buf.copy_(value)`, to keep replaying)")
        flags = self._tensor_state_now()
        if flags == self._tensor_state:
            return None
        index = next(i for i, (a, b) in enumerate(zip(flags, self._tensor_state)) if a != b)
        if flags[index][0] != self._tensor_state[index][0]:
            return f"{self._names[index]} got `requires_grad={flags[index][0]}`"
        return f"{self._names[index]} got new memory (its `.data` assigned anew, or another dtype or device)"

    def _describe_assignment(self) -> str:
        """Which parameter or submodule is another object now, as a phrase."""
        held = dict(zip(self._names, self._params))
        modules = dict(zip(self._module_names, self._module_dicts))
        for root in self._roots:
            for name, module in root.named_modules():
                if name and modules.get(name) is not module.__dict__:
                    kind = "torchmetrics metric" if is_metric(module) else "submodule"
                    return f"{kind} `{name}` was replaced or added"
            for name, param in root.named_parameters():
                if held.get(f"parameter `{name}`") is not param:
                    return f"parameter `{name}` was replaced"
        return "a parameter or submodule was assigned anew"

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __del__(self) -> None:
        self.close()


def _registered(module: torch.nn.Module, name: str) -> object:
    """What ``module`` holds under ``name`` as a parameter or submodule (assigning the same again changes
    nothing)."""
    for registry in ("_parameters", "_modules"):
        held = module.__dict__.get(registry, {})
        if name in held:
            return held[name]
    return None
