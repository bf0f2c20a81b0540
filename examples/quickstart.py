"""Quick start: train a small, launch-bound model with and without CUDAGraphCallback.

    python examples/quickstart.py

The only change to a Lightning script is ``callbacks=[CUDAGraphCallback()]``.
On a CUDA GPU this prints the steps/s of both runs and the speed-up; on a machine
without one it says so and trains eagerly.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_graphs import CUDAGraphCallback


class SmallRegressor(pl.LightningModule):
    """A deep, narrow MLP on small batches: hundreds of tiny kernels per step."""

    def __init__(self, width: int = 256, depth: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(64, width), nn.GELU()]
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(0.1)]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def synthetic_data(samples: int = 32 * 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 64, generator=generator)
    y = torch.sin(x[:, :1]) + 0.1 * torch.randn(samples, 1, generator=generator)
    return TensorDataset(x, y)


class StepTimer(pl.Callback):
    """Steps per second after the first ``skip`` steps (warm-up and capture)."""

    def __init__(self, skip: int = 20) -> None:
        self.skip, self.start, self.steps = skip, None, 0

    def _sync(self, trainer):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.skip:
            self._sync(trainer)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self._sync(trainer)
        self.steps = trainer.global_step - self.skip
        self.rate = self.steps / (time.perf_counter() - self.start)


def train(graphed: bool, steps: int) -> tuple[float, float]:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks = [timer] + ([CUDAGraphCallback()] if graphed else [])
    trainer = pl.Trainer(
        max_steps=steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, callbacks=callbacks,
    )
    model = SmallRegressor()
    trainer.fit(model, DataLoader(synthetic_data(), batch_size=32, shuffle=True, drop_last=True, pin_memory=True))
    return timer.rate, float(trainer.callback_metrics["train_loss"])


def main() -> None:
    cuda = torch.cuda.is_available()
    steps = 1000 if cuda else 60
    if not cuda:
        print("No CUDA GPU here: CUDA graphs need one, so both runs train eagerly and run at the same speed.")
    eager_rate, eager_loss = train(graphed=False, steps=steps)
    graphed_rate, graphed_loss = train(graphed=True, steps=steps)
    print(f"\n{'':12}{'steps/s':>10}{'final loss':>14}")
    print(f"{'eager':12}{eager_rate:>10.0f}{eager_loss:>14.5f}")
    print(f"{'graphed':12}{graphed_rate:>10.0f}{graphed_loss:>14.5f}")
    print(f"speed-up: {graphed_rate / eager_rate:.2f}x" + ("" if cuda else " (no GPU: no graphs)"))


if __name__ == "__main__":
    main()
