"""Small LightningModules written the way users write them: float learning rates,
stock optimizers and schedulers, ``training_step(batch, batch_idx)``, ``self.log``."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


def mlp(features: int = 8, width: int = 32, dropout: float = 0.0, batchnorm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(features, width)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.GELU(), nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class Regressor(pl.LightningModule):
    """MSE regression with per-step and per-epoch logging and a configurable optimizer."""

    def __init__(self, optimizer: str = "adamw", scheduler: str | None = "lambda", dropout: float = 0.0,
                 batchnorm: bool = False, steps_per_epoch: int = 9, epochs: int = 2) -> None:
        super().__init__()
        self.net = mlp(dropout=dropout, batchnorm=batchnorm)
        self.optimizer_name = optimizer
        self.scheduler_name = scheduler
        self.total_steps = steps_per_epoch * epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = F.mse_loss(pred, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_mae", (pred - y).abs().mean(), on_step=False, on_epoch=True)
        self.log_dict({"pred_mean": pred.mean(), "pred_max": pred.max()}, reduce_fx="max", on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), prog_bar=True)

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        elif self.optimizer_name == "adam_two_groups":
            opt = torch.optim.Adam(
                [{"params": self.net[0].parameters(), "lr": 3e-3}, {"params": list(self.net.parameters())[2:]}],
                lr=1e-3, weight_decay=1e-4,
            )
        elif self.optimizer_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
        elif self.optimizer_name == "rmsprop":
            opt = torch.optim.RMSprop(self.parameters(), lr=1e-3)
        elif self.optimizer_name == "adagrad":
            opt = torch.optim.Adagrad(self.parameters(), lr=1e-2)
        elif self.optimizer_name == "lbfgs":
            opt = torch.optim.LBFGS(self.parameters(), lr=0.1)
        else:
            raise ValueError(self.optimizer_name)
        if self.scheduler_name is None:
            return opt
        if self.scheduler_name == "lambda":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if self.scheduler_name == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=self.total_steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if self.scheduler_name == "step_epoch":
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}
        if self.scheduler_name == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total_steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        raise ValueError(self.scheduler_name)


class OneArgStep(Regressor):
    def training_step(self, batch):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss


class ThreeArgStep(Regressor):
    def training_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return {"loss": loss, "residual": (self(x) - y).detach().abs().mean()}


class DictBatchStep(Regressor):
    """A dict batch with a list-of-strings leaf."""

    def training_step(self, batch, batch_idx):
        x, y = batch["x"], batch["y"]
        scale = 2.0 if batch["names"][0] == "double" else 1.0
        loss = scale * F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss


class ItemInStep(Regressor):
    """Reads a value on the host inside the step: cannot be captured."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if loss.item() > 100.0:  # host sync
            loss = loss * 0.5
        self.log("train_loss", loss)
        return loss


class CollectsOutputs(Regressor):
    """The Lightning 2 pattern for epoch-end aggregation: append in training_step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_losses: list[torch.Tensor] = []
        self.epoch_means: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.step_losses.append(loss.detach())
        return loss

    def on_train_epoch_end(self):
        self.epoch_means.append(float(torch.stack(self.step_losses).mean()))
        self.step_losses.clear()


class BranchesOnBatchIdx(Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if batch_idx % 2 == 0:
            loss = loss * 2.0
        self.log("train_loss", loss)
        return loss


class ReadsEpoch(Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y) * (1.0 + self.current_epoch)
        self.log("train_loss", loss)
        return loss


class LogsPythonNumber(Regressor):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss


class ManualWarmupInOptimizerStep(Regressor):
    """Lightning's documented manual lr warm-up: writes the lr inside optimizer_step."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        scale = min(1.0, float(self.trainer.global_step + 1) / 5.0)
        for group in optimizer.param_groups:
            group["lr"] = scale * 1e-3
        optimizer.step(closure=optimizer_closure)


class LogsGradNorm(Regressor):
    """Logs a tensor from an in-step hook: replayed like training_step's logs."""

    def on_before_optimizer_step(self, optimizer):
        norms = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        self.log("grad_norm", torch.stack(norms).norm(), on_step=True, on_epoch=True)


class UpdatesMetric(Regressor):
    """A torchmetrics object updated and logged inside the step (not graphed yet)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import torchmetrics

        self.train_mse = torchmetrics.MeanSquaredError()

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = F.mse_loss(pred, y)
        self.train_mse(pred, y)
        self.log("train_mse", self.train_mse, on_step=True, on_epoch=True)
        return loss


class WithBackbone(Regressor):
    """Trains the head first; BackboneFinetuning unfreezes the first layer later."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone = self.net[0]

    def configure_optimizers(self):
        return torch.optim.AdamW(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-3)


# -- evaluation steps ----------------------------------------------------------------------------


class Evaluated(Regressor):
    """``validation_step``, ``test_step`` and ``predict_step`` as users write them."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = F.mse_loss(pred, y)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_max_error", (pred - y).abs().max(), reduce_fx="max")
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        self.log("test_loss", F.mse_loss(pred, y))
        self.log("test_mae", (pred - y).abs().mean(), on_step=True)
        return {"pred": pred}

    def predict_step(self, batch, batch_idx):
        x, _ = batch
        return self(x)


class TwoValidationLoaders(Evaluated):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("val_loss", loss)
        return loss


class CollectsValidationOutputs(Evaluated):
    """The Lightning 2 pattern for validation-epoch aggregation: append in validation_step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_losses: list[torch.Tensor] = []
        self.collected: list[int] = []  # how many outputs each validation run collected

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.val_losses.append(loss)
        self.log("val_loss", loss)

    def on_validation_epoch_end(self):
        self.log("val_mean_of_batches", torch.stack(self.val_losses).mean())
        self.collected.append(len(self.val_losses))
        self.val_losses.clear()


class ReadsBatchIdxInValidation(Evaluated):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y) * (2.0 if batch_idx % 2 else 1.0)
        self.log("val_loss", loss)
        return loss


class ItemInValidation(Evaluated):
    """Reads a value on the host inside validation_step: cannot be captured."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if loss.item() > 100.0:  # host sync
            loss = loss * 0.5
        self.log("val_loss", loss)
        return loss


class UpdatesMetricInValidation(Evaluated):
    """The usual torchmetrics pattern: update and log the metric object in validation_step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import torchmetrics

        self.val_mse = torchmetrics.MeanSquaredError()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_mse(self(x), y)
        self.log("val_mse", self.val_mse)
