"""The benchmark workloads, shared with the tests (at a tiny size).

* ``mlp``: launch-bound. 64 -> Linear 256 -> GELU, then 7 x (Linear 256, LayerNorm,
  GELU, Dropout 0.1) -> Linear 1; batch 32; MSE; AdamW(lr=1e-3).
* ``rollout``: a learned force field in a differentiable integrator: MLP
  4 -> 128 -> 128 -> 2 with tanh; state (16, 64, 4) holding positions and
  velocities; 16 semi-implicit Euler steps (acc = net(pos, vel) - 0.1 pos,
  dt = 0.01); MSE of the final positions against targets. The model is the
  integrator with the force field inside it, so ``torch.compile(model)`` compiles
  the whole rollout, fusing the integrator's arithmetic with the network's.
* ``pinn``: a physics-informed network for the heat equation: MLP 2 -> 64 x 3 -> 1
  with tanh; 1024 interior collocation points whose PDE residual needs first and
  second input derivatives (``autograd.grad(..., create_graph=True)``, then a
  double backward), plus 256 initial and 256 boundary points. ``torch.compile``
  does not support the double backward, so its mode is skipped here.
* ``big``: compute-bound control. MLP of width 4096 and depth 4, batch 2048.

Each yields 8 distinct pinned CPU batches, cycled through a ``DataLoader(batch_size=None)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], tuple[torch.Tensor, ...]]
    loss: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
    lr: float = 1e-3
    compilable: bool = True  # whether torch.compile can train it

    def batches(self, count: int = 8, pin: bool = True, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
        generator = torch.Generator().manual_seed(seed)
        batches = [self.make_batch(generator) for _ in range(count)]
        if pin and torch.cuda.is_available():
            batches = [tuple(t.pin_memory() for t in batch) for batch in batches]
        return batches


class MLP(nn.Module):
    def __init__(self, features: int, width: int, depth: int, dropout: float = 0.1, norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(features, width), nn.GELU()]
        for _ in range(depth):
            layers.append(nn.Linear(width, width))
            if norm:
                layers.append(nn.LayerNorm(width))
            layers.append(nn.GELU())
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _regression_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


class ForceField(nn.Module):
    """Learned force on each particle from its position and velocity."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 2))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state)


def rollout_positions(model: nn.Module, state: torch.Tensor, steps: int, dt: float = 0.01) -> torch.Tensor:
    """Semi-implicit Euler: v += dt * a(p, v); p += dt * v, with a = net(p, v) - 0.1 p."""
    pos, vel = state[..., :2], state[..., 2:]
    for _ in range(steps):
        acc = model(torch.cat([pos, vel], dim=-1)) - 0.1 * pos
        vel = vel + dt * acc
        pos = pos + dt * vel
    return pos


class Rollout(nn.Module):
    """The integrator around a learned force field: final positions from a state."""

    def __init__(self, steps: int, hidden: int = 128) -> None:
        super().__init__()
        self.field = ForceField(hidden)
        self.steps = steps

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return rollout_positions(self.field, state, self.steps)


def mlp(tiny: bool = False) -> Workload:
    features, width, depth, batch = (8, 16, 2, 4) if tiny else (64, 256, 7, 32)
    return Workload(
        name="mlp",
        make_model=lambda: MLP(features, width, depth),
        make_batch=lambda g: (torch.randn(batch, features, generator=g), torch.randn(batch, 1, generator=g)),
        loss=_regression_loss,
    )


def rollout(tiny: bool = False) -> Workload:
    systems, particles, steps, hidden = (2, 4, 3, 8) if tiny else (16, 64, 16, 128)
    return Workload(
        name="rollout",
        make_model=lambda: Rollout(steps, hidden),
        make_batch=lambda g: (torch.randn(systems, particles, 4, generator=g),
                              torch.randn(systems, particles, 2, generator=g)),
        loss=_regression_loss,
    )


def heat_residual_loss(model: nn.Module, batch: tuple[torch.Tensor, ...], alpha: float = 0.1) -> torch.Tensor:
    """u_t = alpha u_xx on (x, t) in [0, 1]^2; u(x, 0) = sin(pi x); u = 0 at x = 0 and 1.

    The interior points are made to require grad here, as users write it."""
    interior, initial, boundary = batch
    interior = interior.requires_grad_()
    u = model(interior)
    (du,) = torch.autograd.grad(u.sum(), interior, create_graph=True)
    (du_x,) = torch.autograd.grad(du[:, 0].sum(), interior, create_graph=True)
    residual = du[:, 1] - alpha * du_x[:, 0]
    start = model(torch.cat([initial, torch.zeros_like(initial)], 1)) - torch.sin(torch.pi * initial)
    edges = model(torch.cat([torch.cat([boundary * 0, boundary], 1), torch.cat([boundary * 0 + 1, boundary], 1)]))
    return (residual**2).mean() + (start**2).mean() + (edges**2).mean()


def pinn(tiny: bool = False) -> Workload:
    points, width = (16, 8) if tiny else (1024, 64)
    return Workload(
        name="pinn",
        make_model=lambda: nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                         nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)),
        make_batch=lambda g: (torch.rand(points, 2, generator=g), torch.rand(points // 4, 1, generator=g),
                              torch.rand(points // 4, 1, generator=g)),
        loss=heat_residual_loss,
        compilable=False,
    )


def big(tiny: bool = False) -> Workload:
    width, depth, batch = (32, 2, 8) if tiny else (4096, 4, 2048)
    return Workload(
        name="big",
        make_model=lambda: MLP(width, width, depth, dropout=0.0, norm=False),
        make_batch=lambda g: (torch.randn(batch, width, generator=g), torch.randn(batch, 1, generator=g)),
        loss=_regression_loss,
    )


WORKLOADS: dict[str, Callable[..., Workload]] = {"mlp": mlp, "rollout": rollout, "pinn": pinn, "big": big}


def hand_written_graph(workload: Workload, static: tuple[torch.Tensor, ...]):
    """The whole-step graph users write by hand over the inputs ``static`` (CUDA
    tensors): a fresh model with AdamW (``capturable=True``), three warm-up steps on a
    side stream, then one step captured. Returns ``(graph, model, optimizer)``; keep
    all three alive while replaying."""
    torch.manual_seed(0)
    model = workload.make_model().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=workload.lr, capturable=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        workload.loss(model, static).backward()
        optimizer.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()
    return graph, model, optimizer


class WorkloadModule(pl.LightningModule):
    """A workload as users would write it in Lightning: ``self.log`` of the loss every step."""

    def __init__(self, workload: Workload, compile_mode: str | None = None, prog_bar: bool = False) -> None:
        super().__init__()
        self.workload = workload
        self.prog_bar = prog_bar
        self.model = workload.make_model()
        self.forward_model = torch.compile(self.model, mode=compile_mode) if compile_mode else self.model

    def training_step(self, batch, batch_idx):
        loss = self.workload.loss(self.forward_model, batch)
        self.log("train_loss", loss, prog_bar=self.prog_bar)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.workload.lr)


class CycledBatches(torch.utils.data.IterableDataset):
    """Yields ``length`` items cycling through a few pre-made batches."""

    def __init__(self, batches: list, length: int) -> None:
        self.batches, self.length = batches, length

    def __iter__(self):
        for index in range(self.length):
            yield self.batches[index % len(self.batches)]

    def __len__(self) -> int:
        return self.length


def loader(workload: Workload, length: int, pin: bool = True) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(CycledBatches(workload.batches(pin=pin), length), batch_size=None)
