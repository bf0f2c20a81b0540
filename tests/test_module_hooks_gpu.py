"""LightningModule hooks users override, graphed on a CUDA GPU.

Scheduler and optimizer hooks (``lr_scheduler_step``, ``optimizer_zero_grad`` with
``set_to_none=False``, the Lightning docs' learning rate warm-up in ``optimizer_step``,
scheduler ``frequency``, ReduceLROnPlateau on val_loss and on an epoch-level train_loss),
an EMA of the weights kept with ``AveragedModel``, gradient hooks and gradient norms
logged from in-step hooks, and classification with torchmetrics.

Every test trains the same seeded module eagerly and with the callback (TF32 off,
deterministic kernels) and compares them with ``parity.assert_same``: fp32 values within
rtol = atol = 1e-6, learning rates, global_step and progress counters exactly. EMA
weights after every batch, gradients left after the fit and torchmetrics states compare
within the same tolerance.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

import models
from parity import assert_same, fit, fit_both, graphs_used, loader

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("deterministic")]


def graphed_quietly_or_eager_with_one_warning(run, *needles: str) -> None:
    """Either the step was replayed without a word, or it trained eagerly after exactly one
    warning naming one of ``needles`` (any warning where none are given)."""
    if run.callback.stats.replays > 0:
        assert not run.warnings, run.warnings
    else:
        (warning,) = run.warnings
        assert not needles or any(needle in warning for needle in needles), warning


def logged(run, key: str) -> list[float]:
    """Every value the logger received for ``key``, step by step."""
    return [metrics[key] for _, metrics in run.logger.records if key in metrics]


def callback_of(run, kind: type[pl.Callback]) -> pl.Callback:
    """The run's callback of type ``kind``, to read what it kept."""
    return next(callback for callback in run.trainer.callbacks if isinstance(callback, kind))


# -- scheduler and optimizer hooks ------------------------------------------------------------------


class OverridesLrSchedulerStep(models.Regressor):
    """Steps its per-step scheduler through ``lr_scheduler_step``, written as in Lightning's docs."""

    def __init__(self):
        super().__init__()
        self.scheduler_calls = 0

    def lr_scheduler_step(self, scheduler, metric):
        self.scheduler_calls += 1
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)


def test_lr_scheduler_step_override_is_called_every_step_and_the_lr_reaches_the_graph():
    eager, graphed = fit_both(OverridesLrSchedulerStep)
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert not graphed.warnings, graphed.warnings
    assert graphed.module.scheduler_calls == eager.module.scheduler_calls == 18
    assert len({lr[0] for lr in graphed.recorder.lrs}) == 18  # a new lr every step


class ZeroGradToZeros(models.Regressor):
    """Zeroes the gradients in place instead of freeing them."""

    def __init__(self):
        super().__init__("sgd", "step_epoch")

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=False)


def test_optimizer_zero_grad_with_set_to_none_false():
    eager, graphed = fit_both(ZeroGradToZeros, max_epochs=3)
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert not graphed.warnings, graphed.warnings
    # both runs end with gradient tensors (not None), and the same ones
    for (name, eager_param), (_, graphed_param) in zip(eager.module.named_parameters(),
                                                       graphed.module.named_parameters()):
        assert eager_param.grad is not None and graphed_param.grad is not None, name
        torch.testing.assert_close(graphed_param.grad.cpu(), eager_param.grad.cpu(), rtol=1e-6, atol=1e-6)


def test_optimizer_zero_grad_set_to_none_false_with_accumulation():
    # zero_grad only at accumulation boundaries: the graph of a later micro-step must add
    # to the gradient the one before left, never zero it
    eager, graphed = fit_both(ZeroGradToZeros, max_epochs=3, accumulate_grad_batches=3)
    assert_same(eager, graphed)
    graphs_used(graphed)


class DocsWarmup(models.Regressor):
    """The Lightning docs' learning rate warm-up in ``optimizer_step``, without a scheduler,
    over 10 steps so that it ends mid-fit."""

    peak_lr = 1e-3  # the lr configure_optimizers gives AdamW

    def __init__(self):
        super().__init__("adamw", None)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure):
        optimizer.step(closure=optimizer_closure)
        if self.trainer.global_step < 10:
            lr_scale = min(1.0, float(self.trainer.global_step + 1) / 10.0)
            for group in optimizer.param_groups:
                group["lr"] = lr_scale * self.peak_lr


def test_docs_manual_warmup_in_optimizer_step():
    eager, graphed = fit_both(DocsWarmup, max_epochs=3)
    assert_same(eager, graphed)
    assert len({lr[0] for lr in eager.recorder.lrs}) == 10  # the warm-up really ran, then held
    graphed_quietly_or_eager_with_one_warning(graphed, "global_step", "optimizer_step")


class EveryOtherStep(models.Regressor):
    """A per-step scheduler with ``frequency: 2``."""

    def configure_optimizers(self):
        config = super().configure_optimizers()
        config["lr_scheduler"]["frequency"] = 2
        return config


def test_step_scheduler_with_frequency_2():
    eager, graphed = fit_both(EveryOtherStep, max_epochs=3)
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert not graphed.warnings, graphed.warnings
    lrs = [lr[0] for lr in graphed.recorder.lrs]
    assert lrs[0] == lrs[1] != lrs[2] == lrs[3]


class PlateauOn(models.Regressor):
    """ReduceLROnPlateau monitoring ``monitor``; train_loss is then logged per epoch only."""

    def __init__(self, monitor: str):
        super().__init__()
        self.monitor = monitor

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=self.monitor != "train_loss", on_epoch=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        # a 50% relative threshold: every check counts as no improvement and halves the lr
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5, threshold=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor}}


@pytest.mark.parametrize("monitor", ["val_loss", "train_loss"])
def test_reduce_lr_on_plateau(monitor):
    val = (lambda: loader(batch_size=16)) if monitor == "val_loss" else None
    eager, graphed = fit_both(lambda: PlateauOn(monitor), max_epochs=4, val_loader=val)
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert not graphed.warnings, graphed.warnings
    assert len({lr[0] for lr in eager.recorder.lrs}) >= 2  # the plateau did reduce the lr


class PlateauCheckedMidEpoch(PlateauOn):
    """The plateau on a per-step scheduler stepped every 4 steps, after each validation."""

    def configure_optimizers(self):
        config = super().configure_optimizers()
        config["lr_scheduler"].update(interval="step", frequency=4)
        return config


def test_reduce_lr_on_plateau_on_val_loss_checked_mid_epoch():
    eager, graphed = fit_both(lambda: PlateauCheckedMidEpoch("val_loss"), val_loader=lambda: loader(batch_size=16),
                              val_check_interval=4, check_val_every_n_epoch=None)
    assert_same(eager, graphed)
    graphs_used(graphed)


# -- an EMA of the weights ---------------------------------------------------------------------------


class WithEMA(models.Regressor):
    """Keeps an ``AveragedModel`` EMA of its network, updated in the hook named ``where``,
    and logs the EMA's validation loss."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.99))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.where == "on_train_batch_end":  # the usual place: after the step
            self.ema.update_parameters(self.net)

    def on_before_zero_grad(self, optimizer):
        if self.where == "on_before_zero_grad":  # inside the step
            self.ema.update_parameters(self.net)

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        x, y = batch
        self.log("val_loss_ema", F.mse_loss(self.ema(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3)  # the EMA's copy is not trained
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class EMAHistory(pl.Callback):
    """The EMA after every batch, as a user's callback (or a checkpoint) would see it."""

    def __init__(self):
        self.snapshots = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        weights = [p.detach().cpu().clone() for p in pl_module.ema.module.parameters()]
        self.snapshots.append((int(pl_module.ema.n_averaged), weights))


def fit_both_with_ema(where: str, **kwargs):
    return fit_both(lambda: WithEMA(where), extra_callbacks=lambda: [EMAHistory()],
                    val_loader=lambda: loader(batch_size=16), **kwargs)


def assert_same_ema(eager, graphed) -> None:
    """The EMA's count and weights after every batch agree, and it really lags the model."""
    want, got = callback_of(eager, EMAHistory).snapshots, callback_of(graphed, EMAHistory).snapshots
    assert len(got) == len(want)
    for i, ((got_count, got_weights), (want_count, want_weights)) in enumerate(zip(got, want)):
        assert got_count == want_count, f"n_averaged after batch {i}"
        for a, b in zip(got_weights, want_weights):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"EMA weights after batch {i}: {m}")
    model = [p.detach().cpu() for p in graphed.module.net.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(got[-1][1], model))  # an average, not a copy


def test_ema_updated_in_on_train_batch_end_is_graphed_and_matches():
    eager, graphed = fit_both_with_ema("on_train_batch_end", max_epochs=3)
    assert_same(eager, graphed)  # the state dicts include ema.* and ema.n_averaged
    assert_same_ema(eager, graphed)
    graphs_used(graphed)
    assert not graphed.warnings, graphed.warnings
    assert "val_loss_ema" in graphed.final_metrics


def test_ema_updated_in_on_before_zero_grad_matches_eager():
    # AveragedModel.update_parameters reads `n_averaged == 0` on the host, which a capture
    # cannot; a graph that does capture it must still update and count at every step
    eager, graphed = fit_both_with_ema("on_before_zero_grad", max_epochs=3)
    assert_same(eager, graphed)
    assert_same_ema(eager, graphed)
    graphed_quietly_or_eager_with_one_warning(graphed)


def test_ema_in_on_train_batch_end_with_ragged_last_batch_and_accumulation():
    eager, graphed = fit_both_with_ema("on_train_batch_end", accumulate_grad_batches=2)
    assert_same(eager, graphed)
    assert_same_ema(eager, graphed)
    assert graphed.callback.stats.replays > 0, graphed.callback.stats.summary()


# -- gradient norms logged from in-step hooks --------------------------------------------------------


class TotalNormAfterBackward(models.Regressor):
    def on_after_backward(self):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.log("grad_total_norm", torch.nn.utils.get_total_norm(grads), on_step=True, on_epoch=True)


class ManualNormAfterBackward(models.Regressor):
    def on_after_backward(self):
        total = 0.0
        for p in self.parameters():
            if p.grad is not None:
                total = total + p.grad.detach().pow(2).sum()
        self.log("grad_norm_manual", total ** 0.5)


@pytest.mark.parametrize("module, key", [(TotalNormAfterBackward, "grad_total_norm_step"),
                                         (ManualNormAfterBackward, "grad_norm_manual")])
def test_grad_norm_logged_in_on_after_backward(module, key):
    eager, graphed = fit_both(module)
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert not graphed.warnings, graphed.warnings
    norms = logged(graphed, key)
    assert len(norms) == 18 and len(set(norms)) == 18  # each step's own norm


class LightningGradNorm(models.Regressor):
    def on_before_optimizer_step(self, optimizer):
        self.log_dict(grad_norm(self, norm_type=2))


def test_lightning_grad_norm_utility_in_on_before_optimizer_step():
    # grad_norm builds its total with torch.tensor(a list of device scalars): a copy to the host
    eager, graphed = fit_both(LightningGradNorm)
    assert_same(eager, graphed)
    totals = logged(graphed, "grad_2.0_norm_total")
    assert len(totals) == 18 and len(set(totals)) == 18
    graphed_quietly_or_eager_with_one_warning(graphed)


# -- gradient hooks ----------------------------------------------------------------------------------


class LossHook(models.Regressor):
    """Halves the gradient flowing from the loss: a hook on the loss, registered every step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        loss.register_hook(lambda g: g * 0.5)
        return loss


class ClampsIntermediateGrad(models.Regressor):
    """Clamps the gradient of the first hidden activation: a hook registered every step."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = self.net[:2](x)
        hidden.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
        loss = F.mse_loss(self.net[2:](hidden), y)
        self.log("train_loss", loss)
        return loss


@pytest.mark.parametrize("module", [LossHook, ClampsIntermediateGrad])
def test_tensor_hooks_registered_in_training_step(module):
    eager, graphed = fit_both(module)
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert not graphed.warnings, graphed.warnings


def test_tensor_hooks_really_change_training():
    # else the parity test above would prove nothing
    plain = fit(models.Regressor, graphed=False)
    hooked = fit(ClampsIntermediateGrad, graphed=False)
    assert not torch.allclose(plain.state["net.0.weight"], hooked.state["net.0.weight"])


class ParamHookInInit(models.Regressor):
    def __init__(self):
        super().__init__()
        for p in self.net[0].parameters():
            p.register_hook(lambda g: g.clamp(-0.01, 0.01))


class ParamHookInSetup(models.Regressor):
    def setup(self, stage):
        for p in self.net[-1].parameters():
            p.register_hook(lambda g: g.clamp(-1e-3, 1e-3))


class PostAccumulateHook(models.Regressor):
    """Clamps each ``.grad`` in place once it is fully accumulated."""

    def __init__(self):
        super().__init__()

        def clamp_grad(param):
            param.grad.clamp_(-0.02, 0.02)

        for p in self.net.parameters():
            p.register_post_accumulate_grad_hook(clamp_grad)


@pytest.mark.parametrize("module", [ParamHookInInit, ParamHookInSetup, PostAccumulateHook])
def test_parameter_hooks_registered_once(module):
    eager, graphed = fit_both(module)
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert not graphed.warnings, graphed.warnings
    plain = fit(models.Regressor, graphed=False)
    assert any(not torch.allclose(plain.state[k], eager.state[k]) for k in plain.state)  # the hook mattered


@pytest.mark.parametrize("module", [ParamHookInInit, PostAccumulateHook])
def test_parameter_hooks_with_accumulation_and_clipping(module):
    eager, graphed = fit_both(module, accumulate_grad_batches=2, gradient_clip_val=0.5)
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert not graphed.warnings, graphed.warnings


class CountsHookCalls(models.Regressor):
    """A post-accumulate hook that counts in Python, which a replay would not run."""

    def __init__(self):
        super().__init__()
        self.hook_calls = 0

        def count(param):
            self.hook_calls += 1

        self.net[0].weight.register_post_accumulate_grad_hook(count)


def test_a_gradient_hook_counting_in_python_counts_every_step():
    eager, graphed = fit_both(CountsHookCalls)
    assert_same(eager, graphed)
    assert graphed.module.hook_calls == eager.module.hook_calls == 18


# -- classification with torchmetrics ----------------------------------------------------------------

CLASSES = 4


def classification_data(n: int = 70, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    w = torch.randn(8, CLASSES, generator=generator)
    labels = (x @ w + 0.5 * torch.randn(n, CLASSES, generator=generator)).argmax(dim=1)  # int64
    return TensorDataset(x, labels)


class Classifier(pl.LightningModule):
    """Cross-entropy with label smoothing on int64 labels; torchmetrics Accuracy and F1
    updated in the step and logged as metric objects."""

    def __init__(self, validate_args: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, CLASSES))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        task = dict(task="multiclass", num_classes=CLASSES, validate_args=validate_args)
        self.train_acc = torchmetrics.Accuracy(**task)
        self.train_f1 = torchmetrics.F1Score(average="macro", **task)
        self.val_acc = torchmetrics.Accuracy(**task)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, labels = batch
        logits = self(x)
        loss = self.criterion(logits, labels)
        preds = logits.argmax(dim=1)
        self.train_acc(preds, labels)
        self.train_f1.update(preds, labels)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        self.log("train_f1", self.train_f1, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, labels = batch
        logits = self(x)
        self.val_acc(logits, labels)
        self.log("val_loss", F.cross_entropy(logits, labels))
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=27)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class PlainClassifier(Classifier):
    """Only the label-smoothing loss, logged per step and per epoch."""

    def training_step(self, batch, batch_idx):
        x, labels = batch
        loss = self.criterion(self(x), labels)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss


def fit_both_classifying(make_module, **kwargs):
    """Three epochs of 70 samples in batches of 8 (a ragged last batch of 6), validated on 40 others."""
    options = dict(train_loader=lambda: DataLoader(classification_data(), batch_size=8),
                   val_loader=lambda: DataLoader(classification_data(n=40, seed=1), batch_size=16), max_epochs=3)
    return fit_both(make_module, **{**options, **kwargs})


def assert_same_metric_states(eager, graphed) -> None:
    metrics = [(name, m) for name, m in graphed.module.named_modules() if isinstance(m, torchmetrics.Metric)]
    for name, metric in metrics:
        want = eager.module.get_submodule(name)
        assert metric._update_count == want._update_count, name
        torch.testing.assert_close(metric.metric_state, want.metric_state, msg=name)


def test_label_smoothing_cross_entropy_with_accuracy_and_f1_graphed():
    eager, graphed = fit_both_classifying(lambda: Classifier(validate_args=False))
    assert_same(eager, graphed)
    assert_same_metric_states(eager, graphed)
    graphs_used(graphed)
    assert not graphed.warnings, graphed.warnings
    assert {"train_acc_epoch", "train_f1", "val_acc"} <= set(graphed.final_metrics)
    accuracies = logged(graphed, "train_acc_step")
    assert len(accuracies) == 27 and len(set(accuracies)) > 3  # each step's own accuracy


def test_default_metrics_validate_args_train_eagerly_with_one_warning_naming_it():
    # validate_args=True, torchmetrics' default, checks the labels on the host
    eager, graphed = fit_both_classifying(Classifier)
    assert_same(eager, graphed)
    assert_same_metric_states(eager, graphed)
    (warning,) = graphed.warnings
    assert "validate_args" in warning, warning


def test_cross_entropy_label_smoothing_plain_graphed():
    eager, graphed = fit_both_classifying(PlainClassifier, val_loader=None)
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert not graphed.warnings, graphed.warnings
