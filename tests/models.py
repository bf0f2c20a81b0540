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


def loss_read_on_the_host(module: pl.LightningModule, batch, name: str) -> torch.Tensor:
    """An MSE loss, logged as ``name``, after a branch on its value: a host read, which cannot be captured."""
    x, y = batch
    loss = F.mse_loss(module(x), y)
    if loss.item() > 100.0:  # host sync
        loss = loss * 0.5
    module.log(name, loss)
    return loss


class ItemInStep(Regressor):
    """Reads a value on the host inside the step: cannot be captured."""

    def training_step(self, batch, batch_idx):
        return loss_read_on_the_host(self, batch, "train_loss")


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
    """The usual torchmetrics pattern: call the metric object in the step and log it,
    on step (the batch's value) and on epoch (computed over the epoch, then reset)."""

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


class LogsMetricValues(Regressor):
    """A metric called in the step, its batch value logged as a tensor, and two updated
    in the step and computed at the epoch's end; one of them (Pearson's) updates its
    whole state at every step (``full_state_update``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import torchmetrics

        self.train_mae = torchmetrics.MeanAbsoluteError()
        self.train_pearson = torchmetrics.PearsonCorrCoef()
        self.train_mean = torchmetrics.MeanMetric(nan_strategy="disable")

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = F.mse_loss(pred, y)
        self.log("train_mae", self.train_mae(pred, y), on_step=True, on_epoch=True)
        self.train_pearson.update(pred.squeeze(-1), y.squeeze(-1))
        self.train_mean.update(loss)
        return loss

    def on_train_epoch_end(self):
        # states accumulated over the epoch's replays, read and reset outside the step
        self.log("epoch_pearson", self.train_pearson.compute())
        self.log("epoch_mean_loss", self.train_mean.compute())
        self.train_pearson.reset()
        self.train_mean.reset()


class UpdatesAccuracy(Regressor):
    """A classification metric updated in the step and computed at the end of the epoch."""

    def __init__(self, *args, validate_args: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        from torchmetrics.classification import BinaryAccuracy

        self.train_acc = BinaryAccuracy(validate_args=validate_args)

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = F.mse_loss(pred, y)
        self.train_acc.update(pred.squeeze(-1), (y.squeeze(-1) > 0).long())
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss


class ForwardsPearson(Regressor):
    """Pearson's batch value, computed in the step: its compute reads the host, so the
    capture fails after the metric's Python already ran once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import torchmetrics

        self.train_pearson = torchmetrics.PearsonCorrCoef()

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        self.log("train_pearson", self.train_pearson(pred.squeeze(-1), y.squeeze(-1)), on_step=True, on_epoch=True)
        return F.mse_loss(pred, y)


class UpdatesListMetric(Regressor):
    """A metric that keeps list states (Spearman's), which a graph cannot grow."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import torchmetrics

        self.train_spearman = torchmetrics.SpearmanCorrCoef()

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = F.mse_loss(pred, y)
        self.train_spearman.update(pred.squeeze(-1), y.squeeze(-1))
        return loss

    def on_train_epoch_end(self):
        self.log("epoch_spearman", self.train_spearman.compute())
        self.train_spearman.reset()


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
        return loss_read_on_the_host(self, batch, "val_loss")


class UpdatesMetricInValidation(Evaluated):
    """The usual torchmetrics pattern: update and log the metric object in validation_step
    (and a training metric alongside, so that both steps' graphs hold metrics)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import torchmetrics

        self.val_mse = torchmetrics.MeanSquaredError()
        self.train_mse = torchmetrics.MeanSquaredError()

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        self.train_mse(pred, y)
        self.log("train_mse", self.train_mse, on_step=True, on_epoch=True)
        return F.mse_loss(pred, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_mse(self(x), y)
        self.log("val_mse", self.val_mse)


# -- manual optimization -------------------------------------------------------------------------


class ManualRegressor(pl.LightningModule):
    """Manual optimization as the Lightning docs write it: ``zero_grad``, ``manual_backward``,
    optional ``clip_gradients``, ``opt.step()``, then a scheduler stepped by hand."""

    def __init__(self, optimizer: str = "adamw", scheduler: str | None = "lambda", clip: float | None = None,
                 returns: str = "loss", dropout: float = 0.0) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = mlp(dropout=dropout)
        self.optimizer_name = optimizer
        self.scheduler_name = scheduler
        self.clip = clip
        self.returns = returns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        pred = self(x)
        loss = F.mse_loss(pred, y)
        opt.zero_grad()
        self.manual_backward(loss)
        if self.clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt.step()
        self.step_schedulers(batch_idx)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_mae", (pred - y).abs().mean(), on_step=False, on_epoch=True)
        if self.returns == "dict":
            return {"loss": loss, "pred_mean": pred.detach().mean()}
        return loss if self.returns == "loss" else None

    def step_schedulers(self, batch_idx):
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        elif self.optimizer_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        elif self.optimizer_name == "lbfgs":
            opt = torch.optim.LBFGS(self.parameters(), lr=0.1)
        else:
            raise ValueError(self.optimizer_name)
        if self.scheduler_name is None:
            return opt
        if self.scheduler_name == "lambda":
            return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))]
        if self.scheduler_name == "onecycle":
            return [opt], [torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=40)]
        if self.scheduler_name == "step":
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)]
        raise ValueError(self.scheduler_name)


class ManualEveryNBatches(ManualRegressor):
    """Steps the scheduler every 3 batches, deciding on ``batch_idx``."""

    def step_schedulers(self, batch_idx):
        if (batch_idx + 1) % 3 == 0:
            self.lr_schedulers().step()


class ManualAtEpochEnd(ManualRegressor):
    """Steps the scheduler at the last batch of each epoch, as Lightning's docs suggest."""

    def step_schedulers(self, batch_idx):
        if self.trainer.is_last_batch:
            self.lr_schedulers().step()


class ManualSchedulerFirst(ManualRegressor):
    """Steps the scheduler before the optimizer: this step's own learning rate changes."""

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.mse_loss(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        self.lr_schedulers().step()
        opt.step()
        self.log("train_loss", loss)
        return loss


class ManualPlateau(ManualRegressor):
    """Steps ``ReduceLROnPlateau`` with the step's loss from inside the step."""

    def step_schedulers(self, batch_idx):
        pass

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.lr_schedulers().step(loss.detach())
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return [opt], [torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)]


class ManualLBFGS(ManualRegressor):
    """``optimizer.step(closure)`` with LBFGS, which re-evaluates the closure."""

    def __init__(self, *args, **kwargs):
        super().__init__("lbfgs", None)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch

        def closure():
            loss = F.mse_loss(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            return loss

        loss = opt.step(closure=closure)
        self.log("train_loss", loss)
        return loss


class ManualGAN(pl.LightningModule):
    """A GAN-style step: the generator's and the discriminator's updates, each between
    ``toggle_optimizer`` and ``untoggle_optimizer``, fresh noise drawn inside the step,
    a scheduler per optimizer stepped after both updates."""

    def __init__(self, features: int = 8, noise: int = 4, width: int = 32, schedulers: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.noise = noise
        self.generator = nn.Sequential(nn.Linear(noise, width), nn.GELU(), nn.Linear(width, features))
        self.discriminator = nn.Sequential(nn.Linear(features, width), nn.LayerNorm(width), nn.GELU(),
                                           nn.Linear(width, 1))
        self.schedulers = schedulers
        self.alternate = False  # set between steps by a test: the step then calls its optimizers differently

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        real, _ = batch
        z = torch.randn(real.shape[0], self.noise, device=real.device)

        self.toggle_optimizer(opt_g)
        fake = self.generator(z)
        logits = self.discriminator(fake)
        g_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        self.toggle_optimizer(opt_d)
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake.detach())
        d_loss = 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                        + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        if not self.alternate:
            opt_d.step()
        self.untoggle_optimizer(opt_d)

        if self.schedulers:
            for scheduler in self.lr_schedulers():
                scheduler.step()
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss}, prog_bar=True)
        self.log("d_real", torch.sigmoid(real_logits).mean(), on_step=False, on_epoch=True)
        return {"loss": g_loss + d_loss, "d_loss": d_loss.detach()}

    def configure_optimizers(self):
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
        opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=1e-3, betas=(0.5, 0.999))
        if not self.schedulers:
            return [opt_g, opt_d]
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda step: 1.0 / (1.0 + 0.05 * step))
        sched_d = torch.optim.lr_scheduler.ExponentialLR(opt_d, gamma=0.97)
        return [opt_g, opt_d], [sched_g, sched_d]


# -- values the fit changes between steps, messages, evaluation steps writing their batch ---------


class RampedBy(Regressor):
    """A penalty ramped up by a count or a metric the fit keeps, read where the step runs."""

    def __init__(self, read):
        super().__init__("adamw", "cosine", epochs=3)
        self.read = read

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        ramp = self.read(self)
        loss = F.mse_loss(pred, y) * (1.0 + ramp) + 0.1 * ramp * pred.pow(2).mean()
        self.log("train_loss", loss)
        return loss


# what a RampedBy reads, and the words its warning must hold
FIT_VALUES = {
    "last_epoch": (lambda m: min(1.0, m.lr_schedulers().last_epoch / 10), "reads `last_epoch` of its"),
    "callback_metrics": (lambda m: m.trainer.callback_metrics.get("val_loss", torch.tensor(0.0)),
                         "reads `self.trainer.callback_metrics`"),
    "total_batch_idx": (lambda m: min(1.0, m.trainer.fit_loop.total_batch_idx / 10),
                        "reads `self.trainer.fit_loop.total_batch_idx`"),
    "epoch batch_idx": (lambda m: m.trainer.fit_loop.epoch_loop.batch_idx / 10,
                        "reads `self.trainer.fit_loop.epoch_loop.batch_idx`"),
}


class PrintsEachStep(Regressor):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.print("a step")
        return loss


class ScalesItsBatch(pl.LightningModule):
    """Evaluation steps that write their batch in place before the forward."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        x.mul_(0.5)
        self.log("val_out", self.net(x).mean())

    def predict_step(self, batch, batch_idx):
        (x,) = batch
        x.mul_(0.5)
        return self.net(x)


class SameTensorTwice(ScalesItsBatch):
    def validation_step(self, batch, batch_idx):
        x, again = batch
        x.mul_(0.5)  # eagerly, `again` is the same memory and sees the write
        self.log("val_out", self.net(x).mean() + again.sum())


class BatchSums(pl.Callback):
    """What hooks after the step see of the batch."""

    def __init__(self):
        self.sums = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.sums.append(float(batch[0].sum()))

    on_predict_batch_end = on_validation_batch_end


class ReturnsItsLearningRate(Regressor):
    """Returns the learning rate it read (a Python number eagerly) beside the loss."""

    def training_step(self, batch, batch_idx):
        lr = self.optimizers().param_groups[0]["lr"]
        return {"loss": super().training_step(batch, batch_idx), "lr": lr, "half_lr": lr / 2}


class KeepsReturnedNumbers(pl.Callback):
    """What a ReturnsItsLearningRate step returned, step by step."""

    def __init__(self):
        self.returned = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.returned.append((outputs["lr"], outputs["half_lr"]))


def returned_numbers(run) -> list[tuple[float, float]]:
    """What a run's KeepsReturnedNumbers kept, each checked to be a Python float as eager training returns it."""
    kept = next(c for c in run.trainer.callbacks if isinstance(c, KeepsReturnedNumbers)).returned
    assert all(type(value) is float for pair in kept for value in pair), kept
    return kept
