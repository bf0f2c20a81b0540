"""Time-step a 2D wave equation with a graphed update (no training at all).

The field lives in two tensors that the update changes in place, so they are the
graph's static state: nothing is copied in or out per step. One graph call
advances ``--every`` steps; between calls the host checks a stopping criterion
(the field's energy), as CUDA graph guidance recommends: data-dependent decisions
stay outside the graph, and are taken every k steps rather than every step.

    python examples/simulation_loop.py              # graphed and eager, compared
    python examples/simulation_loop.py --grid 64 --steps 200

The eager loop runs the same update from the same start, so the two trajectories
must agree to the last bit.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_graphs import GraphedStep

COURANT = 0.5  # c * dt / dx; stable below 1 / sqrt(2)


def initial_field(grid: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian pulse at rest: (current, previous) displacement."""
    axis = torch.linspace(-1, 1, grid, device=device)
    x, y = torch.meshgrid(axis, axis, indexing="ij")
    current = torch.exp(-((x - 0.2) ** 2 + y**2) / 0.01)
    return current, current.clone()


def advance(current: torch.Tensor, previous: torch.Tensor, steps: int) -> None:
    """Leapfrog steps of u_tt = c^2 (u_xx + u_yy), fixed (zero) edges, in place."""
    for _ in range(steps):
        laplacian = torch.zeros_like(current)
        inner = current[1:-1, 1:-1]
        laplacian[1:-1, 1:-1] = (current[2:, 1:-1] + current[:-2, 1:-1] + current[1:-1, 2:] + current[1:-1, :-2]
                                 - 4 * inner)
        following = 2 * current - previous + COURANT**2 * laplacian
        previous.copy_(current)
        current.copy_(following)


def energy(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    return ((current - previous) ** 2).sum() + COURANT**2 * (current**2).sum()


def simulate(grid: int, steps: int, every: int, graphed: bool, device: torch.device, limit: float) -> dict:
    current, previous = initial_field(grid, device)
    start_energy = float(energy(current, previous))
    update = GraphedStep(lambda: advance(current, previous, every), warmup_steps=1, device=device) if graphed else None
    done = 0
    stopped_early = False
    _sync(device)
    started = time.perf_counter()
    while done < steps:
        if update is not None:
            update()
        else:
            advance(current, previous, every)
        done += every
        # the stopping criterion, read on the host once per `every` steps
        if float(energy(current, previous)) > limit * start_energy:
            stopped_early = True
            break
    _sync(device)
    seconds = time.perf_counter() - started
    summary = update.stats.summary() if update is not None else None
    if update is not None:
        update.close()
    return {"field": current, "steps": done, "steps_per_s": done / seconds, "stopped_early": stopped_early,
            "summary": summary}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=50, help="steps per graph call (between host checks)")
    parser.add_argument("--energy-limit", type=float, default=10.0,
                        help="stop when the energy exceeds this multiple of the initial energy (a blow-up)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: nothing to graph here; running the eager loop only.")
        result = simulate(args.grid, args.steps, args.every, False, torch.device("cpu"), args.energy_limit)
        print(f"eager: {result['steps']} steps, {result['steps_per_s']:.0f} steps/s")
        return {"eager": result}
    device = torch.device("cuda")
    graphed = simulate(args.grid, args.steps, args.every, True, device, args.energy_limit)
    eager = simulate(args.grid, args.steps, args.every, False, device, args.energy_limit)
    difference = float((graphed["field"] - eager["field"]).abs().max())
    print(f"GraphedStep: {graphed['summary']}")
    print(f"{graphed['steps']} steps; largest difference between the graphed and eager fields: {difference:.1e}")
    print(f"steps/s: eager {eager['steps_per_s']:.0f}, graphed {graphed['steps_per_s']:.0f} "
          f"({graphed['steps_per_s'] / eager['steps_per_s']:.2f}x)")
    return {"graphed": graphed, "eager": eager, "difference": difference}


if __name__ == "__main__":
    main()
