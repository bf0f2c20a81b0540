"""CUDA's graph API stood in for on CPU, so that the decisions around capture and
replay (and the Lightning callback's plumbing) run without a GPU. A stand-in graph
captures and replays nothing: the numbers are the GPU tests' business."""

from __future__ import annotations

import contextlib

import torch

from lightning_graphs import python_state
from lightning_graphs.graphed_step import Action


class StandInGraph:
    def capture_begin(self, pool=None, capture_error_mode=None):
        pass

    def capture_end(self):
        pass

    def replay(self):
        pass


class StandInStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass


def stand_in_graph_api(monkeypatch) -> None:
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "CUDAGraph", StandInGraph)
    monkeypatch.setattr(cuda, "Stream", StandInStream)
    monkeypatch.setattr(cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "current_stream", lambda device=None: StandInStream())
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(cuda, "graph_pool_handle", lambda: (0, 1))
    # the CPU stands in for the device: its generator is the one a graph's random kernels draw from,
    # not a host generator whose draws a replay would freeze
    monkeypatch.setattr(python_state, "_torch_cpu_state", lambda generator: b"")


def drive(step, fn, calls) -> str:
    """Run ``calls`` (each ``(inputs, variant)``) through a graphed step driven as the
    Lightning callback drives it; the actions taken, one letter each (W, C, R, E)."""
    actions = []
    for inputs, variant in calls:
        plan = step.plan(inputs, variant)
        actions.append(plan.action.name[0])
        if plan.action is Action.WARMUP:
            step.warmup(lambda: fn(*inputs), plan)
        elif plan.action is Action.CAPTURE:
            step.capture(plan, lambda static: fn(*static))
        elif plan.action is Action.REPLAY:
            step.replay(plan)
        else:
            step.eager(lambda: fn(*inputs), plan.reason)
    return "".join(actions)
