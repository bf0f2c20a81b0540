"""What a captured graph baked in of its modules, and a check cheap enough for every replay.

A graph reads and writes the memory of the parameters and buffers its step used,
runs the kernels of the train/eval mode each module was in (dropout, batch norm)
and computes the gradients of the parameters that required them. Code outside the
step may change any of these between two steps: a callback freezing a layer or
putting batch norm in eval mode at some step, a hook assigning a new tensor to a
buffer. A replay after such a change would silently train the old way, so it must
be noticed before the next replay, not only at the epoch's end.
"""

from __future__ import annotations

import operator
import weakref
from itertools import repeat
from typing import Sequence

import torch
from torch.nn.modules import module as module_hooks

from lightning_graphs.metrics import is_metric

__all__ = ["ModuleStructure", "structure_key"]

CHANGED = "a parameter, a buffer, a train/eval mode, a requires_grad flag or a torchmetrics metric changed"


def structure_key(roots: Sequence[torch.nn.Module]) -> tuple:
    """Everything of ``roots`` a graph bakes in, for comparing (walks every module: not for every replay)."""
    modules = [m for root in roots for m in root.modules()]
    params = [p for root in roots for p in root.parameters()]
    buffers = [b for root in roots for b in root.buffers()]
    return (
        tuple(m.training for m in modules),
        tuple((id(p), p.data_ptr(), p.requires_grad) for p in params),
        tuple((id(b), b.data_ptr()) for b in buffers),
        tuple(id(m) for m in modules if is_metric(m)),  # a metric replaced by a new one
    )


class ModuleStructure:
    """The structure of ``roots`` when a graph was captured.

    :meth:`changed` compares the modes, ``requires_grad`` flags and the memory of
    every parameter and buffer directly (a few microseconds for a small model: a
    ``.data`` assigned anew, a dtype or device changed) and, only after a parameter,
    buffer or submodule was assigned on one of these modules (PyTorch's registration
    hooks say so), the whole :func:`structure_key`. Call :meth:`close` when done:
    the hooks are global.
    """

    def __init__(self, roots: Sequence[torch.nn.Module]) -> None:
        self._roots = list(roots)
        self.key = structure_key(self._roots)
        modules = [m for root in self._roots for m in root.modules()]
        # `training` is a plain instance attribute (a wrapper forwarding it, as a compiled module does,
        # has none of its own: the module it wraps is among the modules too)
        self._module_dicts = [m.__dict__ for m in modules]
        self._modes = [d.get("training") for d in self._module_dicts]
        self._params = [p for root in self._roots for p in root.parameters()]
        self._buffers = [b for root in self._roots for b in root.buffers()]
        self._flags = self._flags_now()
        self._assigned = False
        ids = {id(m) for m in modules}
        ref = weakref.ref(self)

        def note(module: torch.nn.Module, name: str, value: object) -> None:
            held = ref()
            if held is not None and id(module) in ids and value is not _registered(module, name):
                held._assigned = True

        self._handles = [
            module_hooks.register_module_parameter_registration_hook(note),
            module_hooks.register_module_buffer_registration_hook(note),
            module_hooks.register_module_module_registration_hook(note),
        ]

    def _flags_now(self) -> list:
        return [(p.requires_grad, p.data_ptr()) for p in self._params] + [b.data_ptr() for b in self._buffers]

    def changed(self) -> bool:
        """Whether anything the graph baked in of the modules is different now."""
        if self._assigned:
            self._assigned = False
            if structure_key(self._roots) != self.key:
                return True
        return (
            not all(map(operator.is_, map(dict.get, self._module_dicts, repeat("training")), self._modes))
            or self._flags_now() != self._flags
        )

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __del__(self) -> None:
        self.close()


def _registered(module: torch.nn.Module, name: str) -> object:
    """What ``module`` holds under ``name`` as a parameter, buffer or submodule (assigning the same again changes
    nothing)."""
    for slots in ("_parameters", "_buffers", "_modules"):
        held = module.__dict__.get(slots, {})
        if name in held:
            return held[name]
    return None
