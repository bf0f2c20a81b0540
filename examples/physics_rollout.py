"""Learn a force field through a differentiable integrator, with Lightning.

Particles move under an unknown force. A small network learns it by being rolled
out through ``T`` semi-implicit Euler steps and compared with where the particles
really ended up. Every training step is hundreds of tiny kernels (forward and
backward through the unrolled integrator), so it is launch-bound: the case CUDA
graphs are made for.

    python examples/physics_rollout.py              # eager, then CUDAGraphCallback
    python examples/physics_rollout.py --steps 50 --tiny

Without a GPU both runs are eager (the callback warns and changes nothing), so the
speed comparison is only meaningful on a CUDA device.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_graphs import CUDAGraphCallback

DT = 0.01


def true_acceleration(pos: torch.Tensor, vel: torch.Tensor) -> torch.Tensor:
    """The physics to discover: a spring, drag, and a non-linear pull."""
    return -pos - 0.1 * vel + 0.5 * torch.sin(3 * pos).flip(-1)


def integrate(accelerate, state: torch.Tensor, steps: int) -> torch.Tensor:
    """Semi-implicit Euler; ``state[..., :2]`` are positions, ``state[..., 2:]`` velocities."""
    pos, vel = state[..., :2], state[..., 2:]
    for _ in range(steps):
        vel = vel + DT * accelerate(pos, vel)
        pos = pos + DT * vel
    return pos


class ForceField(nn.Module):
    """acceleration = network(position, velocity) - 0.1 * position."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 2))

    def forward(self, pos: torch.Tensor, vel: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([pos, vel], dim=-1)) - 0.1 * pos


class RolloutModel(pl.LightningModule):
    def __init__(self, rollout_steps: int, total_steps: int) -> None:
        super().__init__()
        self.field = ForceField()
        self.rollout_steps = rollout_steps
        self.total_steps = total_steps

    def training_step(self, batch, batch_idx):
        state, target = batch
        final = integrate(self.field, state, self.rollout_steps)
        loss = nn.functional.mse_loss(final, target)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def make_batches(count: int, batch: tuple[int, ...], rollout_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        state = torch.randn(*batch, 4, generator=generator)
        with torch.no_grad():
            target = integrate(true_acceleration, state, rollout_steps)
        batches.append((state, target))
    return batches


class LossAndSpeed(pl.Callback):
    """Keeps every step's loss (as tensors: reading them each step would stall the GPU)
    and times the steps after the first ``skip``."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.losses: list[torch.Tensor] = []
        self.started = self.steps_per_s = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.skip:
            _sync(pl_module.device)
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"])

    def on_train_end(self, trainer, pl_module):
        _sync(pl_module.device)
        if self.started is not None:
            self.steps_per_s = (len(self.losses) - self.skip) / (time.perf_counter() - self.started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(graphed: bool, args: argparse.Namespace, batches: list) -> tuple[list[float], float | None, nn.Module]:
    pl.seed_everything(0, verbose=False)
    model = RolloutModel(args.rollout_steps, args.steps)
    meter = LossAndSpeed(skip=min(20, args.steps // 2))
    callbacks = [meter] + ([CUDAGraphCallback()] if graphed else [])
    loader = torch.utils.data.DataLoader(batches * (args.steps // len(batches) + 1), batch_size=None,
                                         pin_memory=torch.cuda.is_available())
    # one device: on a host with several GPUs Lightning would otherwise start DDP
    trainer = pl.Trainer(max_steps=args.steps, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    trainer.fit(model, loader)
    return [float(loss) for loss in meter.losses], meter.steps_per_s, model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps per run")
    parser.add_argument("--rollout-steps", type=int, default=16, help="integrator steps unrolled in each loss")
    parser.add_argument("--tiny", action="store_true", help="a small problem, for a quick check")
    args = parser.parse_args(argv)
    batch = (4, 8) if args.tiny else (16, 64)
    if not torch.cuda.is_available():
        print("No CUDA device: both runs are eager here (the callback needs a GPU to capture anything).")
    batches = make_batches(8, batch, args.rollout_steps)

    eager_losses, eager_speed, eager_model = train(False, args, batches)
    graph_losses, graph_speed, graph_model = train(True, args, batches)

    print(f"\n{'step':>6} {'eager loss':>12} {'graphed loss':>13}")
    for step in range(0, args.steps, max(1, args.steps // 10)):
        print(f"{step:>6} {eager_losses[step]:>12.6f} {graph_losses[step]:>13.6f}")
    difference = max(
        (a - b).abs().max().item() for a, b in zip(eager_model.parameters(), graph_model.parameters())
    )
    print(f"largest difference between the two runs' final parameters: {difference:.2e}")
    if eager_speed and graph_speed:
        print(f"steps/s: eager {eager_speed:.0f}, CUDAGraphCallback {graph_speed:.0f} "
              f"({graph_speed / eager_speed:.2f}x)")
    return {"eager_losses": eager_losses, "graph_losses": graph_losses, "parameter_difference": difference,
            "eager_steps_per_s": eager_speed, "graph_steps_per_s": graph_speed}


if __name__ == "__main__":
    main()
