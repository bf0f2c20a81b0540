"""lightning-graphs: whole-step CUDA graphs for PyTorch Lightning and plain PyTorch loops.

``Trainer(callbacks=[CUDAGraphCallback()])`` captures the training step (forward,
backward, optimizer step) once and replays it, one launch per step. The
framework-free core, :class:`GraphedStep`, does the same for a plain PyTorch loop;
importing it does not import Lightning.
"""

from typing import Any

from lightning_graphs.graphed_step import GraphedStep, GraphStats, Phase
from lightning_graphs.messages import GraphCaptureError, GraphWarning

__all__ = ["CUDAGraphCallback", "GraphedStep", "GraphStats", "Phase", "GraphCaptureError", "GraphWarning"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # the Lightning adapter is imported on first use, so the core stays Lightning-free
    if name == "CUDAGraphCallback":
        from lightning_graphs.callback import CUDAGraphCallback

        return CUDAGraphCallback
    raise AttributeError(f"module 'lightning_graphs' has no attribute {name!r}")
