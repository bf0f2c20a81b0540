"""CUDA's graph API stood in for on CPU, so that the decisions around capture and
replay (and the Lightning callback's plumbing) run without a GPU. A stand-in graph
captures and replays nothing: the numbers are the GPU tests' business."""

from __future__ import annotations

import contextlib

import torch


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
