"""A physics-informed network for the heat equation, in a plain PyTorch loop.

Solves u_t = ALPHA * u_xx on x in [0, 1], t in [0, 1], with u(0, t) = u(1, t) = 0
and u(x, 0) = sin(pi x), whose exact solution is exp(-ALPHA pi^2 t) sin(pi x).
The PDE residual needs u_t and u_xx: derivatives of the network with respect to
its inputs, taken with ``torch.autograd.grad(..., create_graph=True)`` and then
differentiated again by ``loss.backward()``. All of it, with the optimizer step,
is captured as one CUDA graph by :class:`lightning_graphs.GraphedStep`.

Fresh collocation points are drawn every step outside the graph (they require
grad); each call copies them into the graph's static inputs, which keep
``requires_grad``.

    python examples/pinn.py                 # graphed, then eager for the speed comparison
    python examples/pinn.py --steps 200     # a quick run

Without a GPU the step runs eagerly (with a warning), which is correct but slow.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from lightning_graphs import GraphedStep

ALPHA = 0.1


def exact(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.exp(-ALPHA * math.pi**2 * t) * torch.sin(math.pi * x)


def network() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 1))


def pde_loss(model: nn.Module, interior: torch.Tensor, initial: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """Residual, initial-condition and boundary terms. ``interior`` holds (x, t) rows
    that require grad; ``initial`` holds x values; ``boundary`` holds t values."""
    u = model(interior)
    (du,) = torch.autograd.grad(u.sum(), interior, create_graph=True)
    u_x, u_t = du[:, :1], du[:, 1:]
    (du_x,) = torch.autograd.grad(u_x.sum(), interior, create_graph=True)
    u_xx = du_x[:, :1]
    residual = u_t - ALPHA * u_xx
    at_start = model(torch.cat([initial, torch.zeros_like(initial)], dim=1))
    zero = torch.zeros_like(boundary)
    at_edges = model(torch.cat([torch.cat([zero, boundary], 1), torch.cat([zero + 1, boundary], 1)]))
    return (residual**2).mean() + ((at_start - torch.sin(math.pi * initial)) ** 2).mean() + (at_edges**2).mean()


def collocation_points(generator: torch.Generator, count: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    interior = torch.rand(count, 2, generator=generator, device=device).requires_grad_()
    initial = torch.rand(count // 4, 1, generator=generator, device=device)
    boundary = torch.rand(count // 4, 1, generator=generator, device=device)
    return interior, initial, boundary


def relative_error(model: nn.Module, device: torch.device) -> float:
    """Relative L2 error against the exact solution on a 101 x 101 grid."""
    grid = torch.linspace(0, 1, 101, device=device)
    x, t = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([x.flatten(), t.flatten()], dim=1)
    with torch.no_grad():
        predicted = model(points).squeeze(1)
    truth = exact(points[:, 0], points[:, 1])
    return float((predicted - truth).norm() / truth.norm())


def train(steps: int, points: int, graphed: bool, device: torch.device) -> tuple[nn.Module, list[float], float]:
    torch.manual_seed(0)
    model = network().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.1 ** (1 / steps))

    def step(interior, initial, boundary):
        optimizer.zero_grad(set_to_none=True)
        loss = pde_loss(model, interior, initial, boundary)
        loss.backward()
        optimizer.step()
        return loss.detach()

    graphed_step = GraphedStep(step, optimizers=[optimizer], modules=[model]) if graphed else None
    generator = torch.Generator(device=device).manual_seed(1)
    losses = []
    started = None
    for index in range(steps):
        if index == 20:
            _sync(device)
            started = time.perf_counter()
        inputs = collocation_points(generator, points, device)
        losses.append(graphed_step(*inputs) if graphed else step(*inputs))  # a tensor of its own: no sync here
        scheduler.step()
    _sync(device)
    speed = (steps - 20) / (time.perf_counter() - started) if started else float("nan")
    if graphed_step is not None:
        print(f"GraphedStep: {graphed_step.stats.summary()}")
        graphed_step.close()
    return model, [float(loss) for loss in losses], speed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--points", type=int, default=1024, help="interior collocation points per step")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager run (speed comparison)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("No CUDA device: the graphed step warns and runs eagerly.")

    model, losses, speed = train(args.steps, args.points, graphed=True, device=device)
    error = relative_error(model, device)
    for index in range(0, args.steps, max(1, args.steps // 10)):
        print(f"step {index:>6}: loss {losses[index]:.3e}")
    print(f"relative L2 error against the exact solution: {error:.2e}")
    result = {"losses": losses, "relative_error": error, "graph_steps_per_s": speed}
    if not args.no_eager:
        eager_model, _, eager_speed = train(args.steps, args.points, graphed=False, device=device)
        result["eager_relative_error"] = relative_error(eager_model, device)
        result["eager_steps_per_s"] = eager_speed
        print(f"eager run: relative L2 error {result['eager_relative_error']:.2e}")
        print(f"steps/s: eager {eager_speed:.0f}, GraphedStep {speed:.0f} ({speed / eager_speed:.2f}x)")
    return result


if __name__ == "__main__":
    main()
