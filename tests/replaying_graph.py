"""A CPU stand-in for ``torch.cuda.CUDAGraph`` that replays what it captured.

Capture records every ATen operation the step runs (below autograd, so backward
and optimizer operations too) with the tensors it read and wrote; a replay runs
the same operations again on the same tensors: results of out-of-place operations
are copied into the tensors the capture produced, in-place operations and views
act on the tensors themselves. Python in the step does not run again, and
numbers it read then stay baked in: the semantics of a CUDA graph, without its
memory pool (tensors freed during capture are not reused) and with the CPU's
random generator (a replay draws new numbers, not the ones an eager step would).

A host read inside a capture (``.item()``) raises, as CUDA does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _tensor_arguments(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Every tensor an operation is given: any may be written in place (some
    operations write more than their schema says, batch norm's running statistics)."""
    found = []
    for value in list(args) + list(kwargs.values()):
        values = value if isinstance(value, (list, tuple)) else [value]
        found.extend(v for v in values if isinstance(v, torch.Tensor))
    return found


class _Recorder(TorchDispatchMode):
    """Records operations; keeps the data of every tensor made before the capture
    that they touch, so that the capture itself changes nothing (a CUDA capture
    runs no kernel)."""

    def __init__(self, ops: list) -> None:
        super().__init__()
        self.ops = ops
        self.saved: dict[int, tuple[Any, Any]] = {}  # storage pointer -> (storage, its data before the capture)
        self.created: set[int] = set()  # storages of tensors the capture made

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            raise RuntimeError("operation not permitted when stream is capturing (a host read)")
        for tensor in _tensor_arguments(args, kwargs):
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer not in self.created and pointer not in self.saved:
                self.saved[pointer] = (storage, storage.clone())
        out = func(*args, **kwargs)
        fresh = _fresh_positions(func, args, kwargs, out)
        outputs = _flat_outputs(func, out)
        for position in fresh:
            self.created.add(outputs[position].untyped_storage().data_ptr())
        self.ops.append((func, args, kwargs, out, fresh))
        return out

    def undo(self) -> None:
        for storage, before in self.saved.values():
            storage.copy_(before)


def _flat_outputs(func: Any, out: Any) -> list:
    """An operation's outputs, one entry per tensor (lists of tensors flattened)."""
    returns = func._schema.returns
    outs = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
    flat = []
    for value in outs:
        flat.extend(value if isinstance(value, (list, tuple)) else [value])
    return flat


def _fresh_positions(func: Any, args: tuple, kwargs: dict, out: Any) -> list[int]:
    """Where in :func:`_flat_outputs` the outputs a replay must refresh are: tensors in
    memory of their own. Not views or inputs written in place, which the replay acts on
    directly; but an output that may alias its input and did not (``.to(dtype)``,
    ``reshape`` of a non-contiguous tensor) is new."""
    inputs = {t.untyped_storage().data_ptr() for t in _tensor_arguments(args, kwargs)}
    return [i for i, value in enumerate(_flat_outputs(func, out))
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in inputs]


class ReplayingGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` (see the module docstring)."""

    _capturing: list[ReplayingGraph] = []  # the graphs capturing now

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._ops: list = []
        self._recorder: _Recorder | None = None
        self._broken = False

    def capture_begin(self, pool: Any = None, capture_error_mode: Any = None) -> None:
        self._ops = []
        self._broken = False
        self._recorder = _Recorder(self._ops)
        self._recorder.__enter__()
        ReplayingGraph._capturing.append(self)

    def capture_end(self) -> None:
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self._recorder.undo()
            self._recorder = None
        if self in ReplayingGraph._capturing:
            ReplayingGraph._capturing.remove(self)
        if self._broken:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, out, fresh in self._ops:
                again = func(*args, **kwargs)
                targets, values = _flat_outputs(func, out), _flat_outputs(func, again)
                for position in fresh:
                    if targets[position] is not values[position]:
                        targets[position].copy_(values[position])

    def reset(self) -> None:
        # as CUDA: releasing a graph while another captures is not permitted, and fails that capture
        for other in ReplayingGraph._capturing:
            if other is not self:
                other._broken = True
        self._ops = []

    def __del__(self) -> None:
        self.reset()
