"""A Lightning Fabric training loop with its whole step captured by GraphedStep.

Fabric leaves the loop to you; GraphedStep turns the step inside it into one CUDA
graph. Nothing else changes: ``fabric.setup`` wraps model and optimizer as usual,
``fabric.backward`` does the backward pass, the scheduler steps outside.

    python examples/fabric_loop.py
"""

from __future__ import annotations

import argparse

import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_graphs import GraphedStep


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)

    fabric = Fabric(accelerator="cuda" if torch.cuda.is_available() else "cpu", devices=1)
    fabric.seed_everything(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = fabric.setup(model, optimizer)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=args.steps)

    def train_step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        return loss.detach()

    step = GraphedStep(train_step, optimizers=[optimizer], modules=[model])
    data = torch.randn(8, 64, 32)
    targets = data.sum(-1, keepdim=True).sin()
    losses = []
    for index in range(args.steps):
        x, y = fabric.to_device((data[index % 8], targets[index % 8]))
        losses.append(step(x, y))
        scheduler.step()
    fabric.print(f"loss: first {float(losses[0]):.4f}, last {float(losses[-1]):.4f}")
    fabric.print(f"GraphedStep: {step.stats.summary()}")
    step.close()
    return {"losses": [float(loss) for loss in losses], "stats": step.stats}


if __name__ == "__main__":
    main()
