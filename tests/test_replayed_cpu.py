"""Eager vs graphed training on CPU, with a stand-in graph that replays what it captured.

``replaying_graph.ReplayingGraph`` records a captured step's ATen operations and
reruns them on the same tensors at every replay, none of the step's Python: the
semantics of a CUDA graph, on the CPU. The fits below are the GPU parity tests'
(``test_callback_gpu.py``, ``test_manual_gpu.py``, ``test_eval_graphs_gpu.py``)
on a machine without a GPU, so that CI checks numbers too: per-step losses,
logged values, learning rates, ``global_step``, counters and final parameters.
What the stand-in cannot show (CUDA's memory pool, its random numbers, real
kernels) stays the GPU tests' business; models here draw no random numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import random
import types
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, LambdaCallback, LearningRateMonitor, StochasticWeightAveraging

import loss_settings
import models
from lightning_graphs import CUDAGraphCallback, GraphedStep, GraphWarning
from parity import assert_eager_with_one_warning, assert_same, fit, loader, regression_data
from replaying_graph import ReplayingGraph
from test_eval_graphs_cpu import cuda_on_cpu  # noqa: F401  (a fixture)


@pytest.fixture
def replaying(cuda_on_cpu, monkeypatch):  # noqa: F811
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)


def both(make_module, **kwargs):
    kwargs = {"accelerator": "cpu", **kwargs}
    return fit(make_module, graphed=False, **kwargs), fit(make_module, graphed=True, **kwargs)


def replayed(run, eager_steps=None):
    stats = run.callback.stats
    assert stats.captures >= 1 and stats.replays > 0 and stats.disabled_reason is None, stats.summary()
    if eager_steps is not None:
        assert stats.eager_steps == eager_steps, stats.summary()


@pytest.mark.parametrize("optimizer, scheduler, epochs", [
    ("adamw", "lambda", 3),  # the ragged last batch gets a graph of its own
    ("adamw", "onecycle", 2),  # betas cycled by the scheduler
    ("sgd", "step_epoch", 3),
    ("adam_two_groups", "cosine", 2),
    # (not RMSprop: its capturable mode, which the library uses, refuses CPU tensors)
])
def test_optimizers_and_schedulers(replaying, optimizer, scheduler, epochs):
    eager, graphed = both(lambda: models.Regressor(optimizer, scheduler, epochs=epochs), max_epochs=epochs)
    assert_same(eager, graphed)
    replayed(graphed, eager_steps=0)


@pytest.mark.parametrize("every", [2, 3])
def test_gradient_accumulation(replaying, every):
    eager, graphed = both(lambda: models.Regressor("adamw", "lambda", epochs=3), max_epochs=3,
                          accumulate_grad_batches=every, train_loader=lambda: loader(regression_data(n=67)))
    assert_same(eager, graphed)
    replayed(graphed, eager_steps=0)


def test_clipping_batchnorm_and_logging_from_an_in_step_hook(replaying):
    eager, graphed = both(lambda: models.LogsGradNorm("sgd", None, batchnorm=True), gradient_clip_val=0.5)
    assert_same(eager, graphed)
    replayed(graphed)


def test_an_accumulation_schedule_and_backbone_finetuning_capture_anew(replaying):
    from lightning.pytorch.callbacks import BackboneFinetuning, GradientAccumulationScheduler

    eager, graphed = both(
        lambda: models.WithBackbone("adamw", None), max_epochs=3,
        extra_callbacks=lambda: [GradientAccumulationScheduler({0: 1, 1: 2}),
                                 BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False)],
    )
    assert_same(eager, graphed)
    replayed(graphed)
    assert graphed.callback.stats.recaptures, graphed.callback.stats.summary()


def test_resuming_from_a_checkpoint_saved_while_graphed(replaying, tmp_path):
    make = lambda: models.Regressor("adamw", "lambda", epochs=4)  # noqa: E731
    straight = fit(make, graphed=True, accelerator="cpu", max_epochs=4)
    first = fit(make, graphed=True, accelerator="cpu", max_epochs=2)
    path = tmp_path / "mid.ckpt"
    first.trainer.save_checkpoint(path)
    resumed = fit(make, graphed=True, accelerator="cpu", max_epochs=4, ckpt_path=str(path))
    replayed(resumed)
    for name in straight.state:
        torch.testing.assert_close(resumed.state[name], straight.state[name], rtol=1e-6, atol=1e-6)
    assert resumed.global_step == straight.global_step


class ZeroGradAfterTheStep(models.ManualRegressor):
    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        self.log("loss", loss, prog_bar=True)


class SchedulerStepsEachEpoch(models.ManualRegressor):
    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        optimizer.step()
        self.log("loss", loss)

    def on_train_epoch_end(self):
        self.lr_schedulers().step()


@pytest.mark.parametrize("module", [models.ManualRegressor, ZeroGradAfterTheStep, SchedulerStepsEachEpoch])
def test_manual_optimization(replaying, module):
    eager, graphed = both(lambda: module("adamw", "lambda"), max_epochs=3)
    assert_same(eager, graphed)
    replayed(graphed, eager_steps=0)


def test_evaluation_graphs(replaying):
    eager, graphed = both(lambda: models.Evaluated("adamw", "lambda"), callback_kwargs={"graph_evaluation": True},
                          val_loader=lambda: loader(regression_data(n=37, seed=1)))
    assert_same(eager, graphed)
    replayed(graphed)
    assert graphed.callback.evaluation_stats["validation"].replays > 0


def test_a_replay_that_did_nothing_would_be_caught(replaying, monkeypatch):
    # the stand-in of the other CPU tests replays nothing: these comparisons must see it
    monkeypatch.setattr(ReplayingGraph, "replay", lambda self: None)
    eager, graphed = both(lambda: models.Regressor("adamw", "lambda"))
    with pytest.raises(AssertionError):
        assert_same(eager, graphed)


def train_in_a_plain_loop(graphed, make_model, make_optimizer, calls=10, before_call=lambda index, model: None):
    """Losses, final parameters and the step of a training loop as users write one around ``GraphedStep``."""
    torch.manual_seed(0)
    model = make_model()
    optimizer = make_optimizer(model.parameters())

    def step(x, y):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    run = GraphedStep(step, warmup_steps=2, optimizers=[optimizer], modules=[model], device="cuda") \
        if graphed else step
    generator = torch.Generator().manual_seed(1)
    losses = []
    for index in range(calls):
        before_call(index, model)
        losses.append(float(run(torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator))))
    return losses, list(model.parameters()), run


def assert_trained_alike(graphed, eager):
    (losses, params, _), (eager_losses, eager_params, _) = graphed, eager
    assert losses == pytest.approx(eager_losses, rel=1e-6, abs=1e-6)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_graphed_step_in_a_plain_loop(graph_api_on_cpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)
    runs = [
        train_in_a_plain_loop(
            graphed,
            lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.GELU(),
                                        torch.nn.Linear(8, 1)),
            lambda params: torch.optim.AdamW(params, lr=1e-2),
        )
        for graphed in (True, False)
    ]
    step = runs[0][2]
    assert step.stats.replays == 7, step.stats.summary()
    assert_trained_alike(*runs)


def accumulate_by_hand(graphed, optimizer_in_step):
    """Gradients of a weight over ten calls, zeroed outside the step every few calls (by the
    optimizer stepped in the step, or by hand around a backward-only micro-step)."""
    weight = torch.nn.Parameter(torch.ones(3))
    module = torch.nn.Module()
    module.weight = weight
    optimizer = torch.optim.SGD([weight], lr=0.0)  # (the weight stays put: only its gradients change)

    def step(x):
        (weight * x).sum().backward()
        if optimizer_in_step:
            optimizer.step()

    run = GraphedStep(step, optimizers=[optimizer] if optimizer_in_step else [], modules=[module], device="cuda") \
        if graphed else step
    gradients = []
    for index in range(10):
        if index % 3 == 0:
            optimizer.zero_grad()  # (set_to_none=True)
        run(torch.full((3,), float(index + 1)))
        gradients.append(None if weight.grad is None else float(weight.grad[0]))
    return gradients, run


@pytest.mark.parametrize("optimizer_in_step", [True, False], ids=["optimizer in the step", "backward only"])
def test_gradients_accumulated_by_hand_outside_the_step_are_added_to(graph_api_on_cpu, monkeypatch,
                                                                      optimizer_in_step):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)
    eager, _ = accumulate_by_hand(False, optimizer_in_step)
    with pytest.warns(GraphWarning, match="gradients from earlier calls are held"):
        graphed, step = accumulate_by_hand(True, optimizer_in_step)
    assert graphed == eager
    assert step.stats.replays > 0, step.stats.summary()


def test_micro_steps_accumulated_by_hand_stay_graphed_with_a_graphed_step_for_the_first(graph_api_on_cpu,
                                                                                          monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)

    def train(graphed):
        weight = torch.nn.Parameter(torch.ones(3))
        module = torch.nn.Module()
        module.weight = weight
        optimizer = torch.optim.SGD([weight], lr=0.1)

        def micro_step(x):
            (weight * x).sum().backward()

        first, rest = ((GraphedStep(micro_step, modules=[module], device="cuda") for _ in range(2)) if graphed
                       else (micro_step, micro_step))
        weights = []
        for index in range(30):
            (first if index % 3 == 0 else rest)(torch.full((3,), float(index + 1)))
            if index % 3 == 2:
                optimizer.step()
                optimizer.zero_grad()
            weights.append(weight.detach().clone())
        return weights, (first, rest)

    eager, _ = train(False)
    graphed, steps = train(True)
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(a, b)
    assert all(step.stats.replays > 0 and step.stats.eager_steps == 0 for step in steps)


def test_a_step_that_writes_no_gradients_leaves_those_held_alone(graph_api_on_cpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)
    model = torch.nn.Linear(3, 1)
    predict = GraphedStep(lambda x: model(x).detach(), warmup_steps=1, modules=[model], device="cuda")
    model(torch.ones(2, 3)).sum().backward()  # gradients a training loop holds between its own steps
    held = model.weight.grad
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphWarning)
        for index in range(6):
            if index == 4:
                model.zero_grad()  # (set_to_none=True)
            predict(torch.full((2, 3), float(index)))
            assert model.weight.grad is (held if index < 4 else None)
    assert predict.stats.replays == 4, predict.stats.summary()


class Oscillators:
    """A simulation as users write one: state and settings on an object, stepped by a method."""

    def __init__(self, count_time=False):
        self.position = torch.linspace(-1, 1, 32)
        self.velocity = torch.zeros(32)
        self.dt = 0.01
        self.time = 0.0
        self.count_time = count_time

    def advance(self):
        self.velocity.add_(-self.dt * self.position)
        self.position.add_(self.dt * self.velocity)
        if self.count_time:
            self.time += self.dt  # Python a replay would not run


def _simulate(graphed, change):
    sim = Oscillators(count_time=change == "a counter in the step")
    settings = {"damping": 1.0, "state": torch.ones(32)}

    def damp():
        settings["state"].mul_(0.99).add_(settings["damping"] * sim.position)

    steps = [GraphedStep(f, warmup_steps=1, device="cuda") if graphed else f for f in (sim.advance, damp)]
    trace = []
    for i in range(12):
        for step in steps:
            step()
        if i == 5:
            if change == "dt set on the object":
                sim.dt = 0.02
            elif change == "a closed-over dict's setting":
                settings["damping"] = 0.5
            elif change == "a closed-over dict's tensor replaced":
                settings["state"] = settings["state"] * 2
            for step in steps if graphed else ():
                step.request_structure_check()
        trace.append((float((sim.position ** 2).sum()), float(settings["state"].sum()), sim.time))
    return torch.tensor(trace, dtype=torch.float64), steps


@pytest.mark.parametrize("change", ["dt set on the object", "a closed-over dict's setting",
                                   "a closed-over dict's tensor replaced"])
def test_a_graphed_step_follows_what_its_object_and_closure_hold(graph_api_on_cpu, monkeypatch, change):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)
    eager, _ = _simulate(False, change)
    graphed, steps = _simulate(True, change)
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)
    assert all(step.stats.replays > 0 for step in steps), [step.stats.summary() for step in steps]
    # each change is captured anew once, by the step that read it (`damp` holds `sim` too, but reads no `dt`)
    assert sum(step.stats.captures for step in steps) == 3, [step.stats.summary() for step in steps]


def test_a_graphed_step_counting_on_its_object_runs_eagerly_with_a_warning(graph_api_on_cpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)
    eager, _ = _simulate(False, "a counter in the step")
    with pytest.warns(GraphWarning, match="changes `self.time`"):
        graphed, (advance, _) = _simulate(True, "a counter in the step")
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)
    assert advance.stats.replays == 0, advance.stats.summary()


# -- setups users write every day --------------------------------------------------------------------------------


class PlateauOnValidationLoss(models.Evaluated):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}


class WarmupThenDecayEveryThreeSteps(models.Regressor):
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=3)
        decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, decay], milestones=[3])
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 3}}


class ReturnsADict(models.Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = torch.nn.functional.mse_loss(pred, y)
        self.log_dict({"loss_seen": loss, "pred_mean": pred.mean()}, prog_bar=True)
        return {"loss": loss, "preds": pred.detach()}


_VALIDATION = lambda: loader(regression_data(n=37, seed=1))  # noqa: E731
_SETUPS = {
    "ReduceLROnPlateau on val_loss": (lambda: PlateauOnValidationLoss("adamw", None),
                                      dict(val_loader=_VALIDATION, max_epochs=4)),
    "SequentialLR every 3 steps": (lambda: WarmupThenDecayEveryThreeSteps("adamw", None), {}),
    "a dict returned, log_dict on the progress bar": (lambda: ReturnsADict("adamw", "lambda"), {}),
    "StochasticWeightAveraging": (lambda: models.Regressor("adamw", None, epochs=4), dict(
        max_epochs=4, extra_callbacks=lambda: [StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=2)])),
    "EarlyStopping": (lambda: models.Evaluated("adamw", "lambda", epochs=5), dict(
        val_loader=_VALIDATION, max_epochs=5, extra_callbacks=lambda: [EarlyStopping("val_loss", patience=0)])),
    "LearningRateMonitor": (lambda: models.Regressor("adamw", "onecycle"), dict(
        extra_callbacks=lambda: [LearningRateMonitor(logging_interval="step")])),
    "clipping by value": (lambda: models.Regressor("adamw", None), dict(
        gradient_clip_val=0.01, gradient_clip_algorithm="value")),
}


@pytest.mark.parametrize("setup", sorted(_SETUPS))
def test_common_lightning_setups(replaying, setup):
    make_module, options = _SETUPS[setup]
    eager, graphed = both(make_module, **options)
    assert_same(eager, graphed)
    replayed(graphed, eager_steps=0)
    assert not graphed.warnings, graphed.warnings


def test_bf16_mixed(replaying):
    eager, graphed = both(lambda: models.Regressor("adamw", "lambda"), precision="bf16-mixed")
    assert_same(eager, graphed, rtol=2e-2, atol=2e-2)  # a last-bit difference can flip a bf16 rounding
    replayed(graphed, eager_steps=0)


# -- Python values around the step ---------------------------------------------------------------------------------


class AnnealsBetaInHparams(models.Regressor):
    def __init__(self, beta: float = 0.25):
        super().__init__("adamw", None, epochs=3)
        self.save_hyperparameters()

    def on_train_epoch_start(self):
        self.hparams.beta = self.hparams.beta + 0.25

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = torch.nn.functional.mse_loss(pred, y) + self.hparams.beta * pred.pow(2).mean()
        self.log("train_loss", loss)
        return loss


class LossWeightsInADict(models.Regressor):
    def __init__(self):
        super().__init__("adamw", None, epochs=3)
        self.loss_weights = {"mse": 1.0}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y) * self.loss_weights["mse"]
        self.log("train_loss", loss)
        return loss


class WeightsDoubledEachEpoch(pl.Callback):
    def on_train_epoch_start(self, trainer, module):
        module.loss_weights["mse"] *= 2


class ReturnsItsBatchIndex(models.Regressor):
    def __init__(self):
        super().__init__("adamw", None)
        self.indices_seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": torch.nn.functional.mse_loss(self(x), y), "batch_idx": batch_idx}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.indices_seen.append(outputs["batch_idx"])


class StepsOnOddBatches(models.Regressor):
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure):
        if batch_idx % 2:
            optimizer.step(closure=optimizer_closure)
        else:
            optimizer_closure()


@pytest.mark.parametrize("make_module, options", [
    (AnnealsBetaInHparams, dict(max_epochs=3)),
    (LossWeightsInADict, dict(max_epochs=3, extra_callbacks=lambda: [WeightsDoubledEachEpoch()])),
], ids=["self.hparams annealed each epoch", "a dict of loss weights changed by a callback"])
def test_settings_in_containers_changed_between_epochs_are_captured_anew(replaying, make_module, options):
    eager, graphed = both(make_module, **options)
    assert_same(eager, graphed)
    replayed(graphed, eager_steps=0)
    assert graphed.callback.stats.captures >= 4, graphed.callback.stats.summary()  # each epoch's value, twice
    assert not graphed.warnings, graphed.warnings


def test_a_returned_batch_index_is_each_batchs_own(replaying):
    eager, graphed = both(ReturnsItsBatchIndex)
    assert_same(eager, graphed)
    replayed(graphed, eager_steps=0)
    assert graphed.module.indices_seen == eager.module.indices_seen == list(range(9)) * 2


def test_an_optimizer_step_deciding_on_its_batch_index_trains_eagerly_with_one_warning(replaying):
    eager, graphed = both(lambda: StepsOnOddBatches("adamw", None))
    assert_same(eager, graphed)
    assert graphed.callback.stats.replays == 0, graphed.callback.stats.summary()
    (warning,) = graphed.warnings
    assert "`optimizer_step` reads its `batch_idx` argument" in warning


class DecaysByHandAtAMilestone(models.Regressor):
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        if self.trainer.global_step == 10:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1


class WarmsUpInSteps(models.Regressor):
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * (0.1 if self.trainer.global_step < 6 else 1.0)
        optimizer.step(closure=optimizer_closure)


@pytest.mark.parametrize("make_module", [
    lambda: DecaysByHandAtAMilestone("adamw", None),
    lambda: WarmsUpInSteps("adamw", None),
    lambda: WarmsUpInSteps("sgd", None),  # (on the CPU its learning rate is a number in the graph)
], ids=["decays at a milestone", "warms up in steps", "warms up in steps, a number in the graph"])
def test_an_optimizer_step_deciding_on_the_trainers_step_count_trains_eagerly_with_one_warning(replaying, make_module):
    eager, graphed = both(make_module, max_epochs=3)
    assert_same(eager, graphed)
    assert graphed.callback.stats.replays == 0, graphed.callback.stats.summary()
    (warning,) = graphed.warnings
    assert "reads `self.trainer.global_step`" in warning


# -- values changed by hooks between steps -------------------------------------------------------------------------


class KLWeighted(models.Regressor):
    """A loss term weighted by a plain attribute that a callback anneals."""

    def __init__(self):
        super().__init__("adamw", None)
        self.kl_weight = 0.0
        self.last_loss = 0.0  # bookkeeping a hook writes and the step never reads

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = torch.nn.functional.mse_loss(pred, y) + self.kl_weight * pred.pow(2).mean()
        self.log("train_loss", loss)
        return loss


class AnnealEvery(pl.Callback):
    def __init__(self, every):
        self.every = every

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            module.kl_weight = trainer.global_step / 20


class KeepLastLoss(pl.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        module.last_loss = float(outputs["loss"])


@pytest.mark.parametrize("every", [1, 6])
def test_a_value_a_hook_changes_between_steps_is_never_replayed_stale(replaying, every):
    options = dict(max_epochs=3, extra_callbacks=lambda: [AnnealEvery(every)])
    eager, graphed = both(KLWeighted, **options)
    assert_same(eager, graphed)
    stats = graphed.callback.stats
    assert any("kl_weight" in reason for reason in stats.recaptures), stats.summary()


def test_bookkeeping_a_hook_writes_at_every_step_is_not_checked_at_every_step(replaying):
    eager, graphed = both(KLWeighted, max_epochs=3, extra_callbacks=lambda: [KeepLastLoss()])
    assert_same(eager, graphed)
    replayed(graphed, eager_steps=0)
    # the step never reads it: no re-capture between steps (the epoch boundaries' broader check may take it for a
    # setting and capture anew once an epoch)
    stats = graphed.callback.stats
    assert sum(stats.recaptures.values()) <= 2, (stats.summary(), stats.recaptures)  # 3 epochs: 2 boundaries


class ScalesItsInputsInPlace(models.Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        x.mul_(0.9)  # (each epoch scales a batch handed out again once more)
        return super().training_step((x, y), batch_idx)


class KeptBatches:
    """The same batch tensors every epoch, as a loader of data kept on the GPU hands them out."""

    def __init__(self):
        x, y = regression_data(n=64).tensors
        self.batches = [(x[i:i + 8].clone(), y[i:i + 8].clone()) for i in range(0, 64, 8)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class SumsTheBatch(pl.Callback):
    def __init__(self):
        self.sums = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.sums.append(float(batch[0].abs().sum()))


class ViewsOfOneTable(KeptBatches):
    """Inputs and targets as views side by side of one table per batch."""

    def __iter__(self):
        return iter([(table[:, :8], table[:, 8:]) for table in self.tables])

    def __init__(self):
        super().__init__()
        self.tables = [torch.cat([x, y], dim=1) for x, y in self.batches]


@pytest.mark.parametrize("batches", [KeptBatches, ViewsOfOneTable], ids=["tensors", "views of one table"])
def test_a_step_writing_its_batch_in_place_leaves_the_batch_as_eager_training_does(replaying, batches):
    sums = {False: SumsTheBatch(), True: SumsTheBatch()}
    eager, graphed = (
        fit(lambda: ScalesItsInputsInPlace("adamw", None), graphed=graphed, accelerator="cpu", max_epochs=3,
            train_loader=batches, extra_callbacks=lambda: [sums[graphed]])
        for graphed in (False, True)
    )
    assert_same(eager, graphed)
    replayed(graphed, eager_steps=0)
    assert sums[True].sums == pytest.approx(sums[False].sums, rel=1e-6)


class ScalesOneTensorOfTwoThatShareMemory(models.Regressor):
    def training_step(self, batch, batch_idx):
        x, y, same_x = batch
        x.mul_(0.5)
        return super().training_step((same_x, y), batch_idx)


class SharedMemoryBatches(KeptBatches):
    def __iter__(self):
        return iter([(x, y, x) for x, y in self.batches])


def test_a_step_writing_a_batch_tensor_that_shares_memory_trains_eagerly_with_one_warning(replaying):
    eager, graphed = both(lambda: ScalesOneTensorOfTwoThatShareMemory("adamw", None), train_loader=SharedMemoryBatches)
    assert_same(eager, graphed)
    assert graphed.callback.stats.replays == 0, graphed.callback.stats.summary()
    (warning,) = graphed.warnings
    assert "writes its batch in place, and batch[0], written in place, shares memory with batch[2]" in warning


GRADIENT_NORMS = []  # kept by a hook of the module below


class KeepsGradientNormsInAGlobal(models.Regressor):
    def on_after_backward(self):
        GRADIENT_NORMS.append(self.net[0].weight.grad.norm().detach())


def test_a_module_hook_appending_to_a_global_list_trains_eagerly_with_one_warning(replaying):
    try:
        eager = fit(lambda: KeepsGradientNormsInAGlobal("adamw", None), graphed=False, accelerator="cpu")
        kept_eagerly = GRADIENT_NORMS[:]
        GRADIENT_NORMS.clear()
        graphed = fit(lambda: KeepsGradientNormsInAGlobal("adamw", None), graphed=True, accelerator="cpu")
        assert_same(eager, graphed)
        assert len(GRADIENT_NORMS) == len(kept_eagerly) == 18
        (warning,) = graphed.warnings
        assert "grows `global GRADIENT_NORMS`" in warning
    finally:
        GRADIENT_NORMS.clear()


def test_a_lambda_callback_appending_to_a_list_trains_eagerly_with_one_warning(replaying):
    kept = {False: [], True: []}

    def run(graphed):
        keep = kept[graphed]
        on_after_backward = LambdaCallback(
            on_after_backward=lambda trainer, module: keep.append(module.net[0].weight.grad.norm().detach()))
        return fit(lambda: models.Regressor("adamw", None), graphed=graphed, accelerator="cpu",
                   extra_callbacks=lambda: [on_after_backward])

    eager, graphed = run(False), run(True)
    assert_same(eager, graphed)
    assert len(kept[True]) == len(kept[False]) == 18
    (warning,) = graphed.warnings
    assert "grows `closure variable keep`" in warning


class GradientNorms:
    def __init__(self):
        self.kept = []

    def keep(self, trainer, module):
        self.kept.append(module.net[0].weight.grad.norm().detach())


def keep_norm(kept, trainer, module):
    kept.append(module.net[0].weight.grad.norm().detach())


def keep_norm_into(trainer, module, *, kept):
    keep_norm(kept, trainer, module)


def counting_calls(hook):
    calls = []

    @functools.wraps(hook)
    def counted(*args, **kwargs):
        calls.append(1)
        return hook(*args, **kwargs)

    counted.calls = calls
    return counted


@pytest.mark.parametrize("make_hook, grown", [
    (lambda kept: GradientNorms.keep.__get__(kept), "GradientNorms.kept"),
    (lambda kept: functools.partial(keep_norm, kept.kept), "hook argument 0"),
    (lambda kept: functools.partial(keep_norm_into, kept=kept.kept), "hook argument kept"),
    (lambda kept: lambda trainer, module, _kept=kept.kept: keep_norm(_kept, trainer, module), "hook argument _kept"),
    (lambda kept: counting_calls(lambda trainer, module: None), "closure variable calls"),
], ids=["a bound method", "a partial", "a partial with a keyword", "a default argument", "a decorator's closure"])
def test_a_hook_keeping_state_in_what_it_holds_trains_eagerly_with_one_warning(replaying, make_hook, grown):
    keepers = {False: GradientNorms(), True: GradientNorms()}

    counts = {}

    def run(graphed):
        hook = make_hook(keepers[graphed])
        counts[graphed] = lambda: len(keepers[graphed].kept) + len(getattr(hook, "calls", []))
        return fit(lambda: models.Regressor("adamw", None), graphed=graphed, accelerator="cpu",
                   extra_callbacks=lambda: [LambdaCallback(on_after_backward=hook)])

    eager, graphed = run(False), run(True)
    assert_same(eager, graphed)
    assert counts[True]() == counts[False]() == 18
    (warning,) = graphed.warnings
    assert f"grows `{grown}` (a list" in warning


class WarmingUpAverage(torch.nn.Module):
    """An exponential moving average of weights whose decay warms up with a Python count of its updates."""

    def __init__(self):
        super().__init__()
        self.shadow = None
        self.updates = 0

    @torch.no_grad()
    def update(self, module):
        if self.shadow is None:
            self.shadow = torch.nn.ParameterList(
                [torch.nn.Parameter(p.detach().clone(), requires_grad=False) for p in module.parameters()])
        self.updates += 1
        decay = min(0.999, (1 + self.updates) / (10 + self.updates))
        for shadow, p in zip(self.shadow, module.parameters()):
            shadow.mul_(decay).add_(p.detach(), alpha=1 - decay)


class AveragesWeights(pl.Callback):
    def __init__(self):
        self.average = WarmingUpAverage()

    def on_before_zero_grad(self, trainer, module, optimizer):
        self.average.update(module)


def test_a_callback_updating_a_module_of_its_own_inside_the_step_trains_eagerly_with_one_warning(replaying):
    averages = {False: AveragesWeights(), True: AveragesWeights()}
    eager, graphed = (fit(lambda: models.Regressor("adamw", None), graphed=graphed, accelerator="cpu",
                          extra_callbacks=lambda: [averages[graphed]]) for graphed in (False, True))
    assert_same(eager, graphed)
    assert averages[True].average.updates == averages[False].average.updates == 18
    for a, b in zip(averages[True].average.shadow, averages[False].average.shadow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    (warning,) = graphed.warnings
    assert "callback AveragesWeights.average.updates" in warning


class CountsItsHookCalls(models.Regressor):
    @counting_calls
    def on_after_backward(self):
        pass


def test_a_decorated_module_hook_keeping_state_trains_eagerly_with_one_warning(replaying):
    calls = CountsItsHookCalls.on_after_backward.calls
    eager = fit(lambda: CountsItsHookCalls("adamw", None), graphed=False, accelerator="cpu")
    eager_calls = len(calls)
    graphed = fit(lambda: CountsItsHookCalls("adamw", None), graphed=True, accelerator="cpu")
    assert_same(eager, graphed)
    assert len(calls) - eager_calls == eager_calls == 18
    (warning,) = graphed.warnings
    assert "grows `closure variable calls`" in warning


class ShiftedTargets(models.Regressor):
    """Batch norm, and a buffer the loss reads (SGD: Adam's step amplifies the rounding noise of the
    near-zero gradients of the bias before batch norm)."""

    def __init__(self):
        super().__init__("sgd", None, batchnorm=True)
        self.register_buffer("target_shift", torch.zeros(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y + self.target_shift)
        self.log("train_loss", loss)
        return loss


class AtStep(pl.Callback):
    """Calls ``change(module)`` after the given global step, in the middle of an epoch."""

    def __init__(self, change, step=12):
        self.change, self.step = change, step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.change(module)


@pytest.mark.parametrize("change, reason", [
    (lambda module: module.net[0].requires_grad_(False), "parameter `net.0.weight` got `requires_grad=False`"),
    (lambda module: module.net[1].eval(), "`net.1` was put in eval mode"),
    (lambda module: setattr(module, "target_shift", torch.ones(1)), "assigns a new tensor to the buffer"),
    (lambda module: setattr(module.net[1], "running_mean", torch.zeros(32)),
     "buffer `net.1.running_mean` was assigned a new tensor"),
    (lambda module: setattr(module.net[0].weight, "data", module.net[0].weight.detach() * 0.5),
     "parameter `net.0.weight` got new memory"),
], ids=["freezes the first layer", "puts batch norm in eval mode", "assigns a new tensor to a buffer",
        "resets batch norm's statistics", "assigns a parameter's .data anew"])
def test_modules_changed_in_the_middle_of_an_epoch_are_captured_anew(replaying, change, reason):
    eager, graphed = both(ShiftedTargets, max_epochs=3, extra_callbacks=lambda: [AtStep(change)])
    assert_same(eager, graphed)
    replayed(graphed, eager_steps=0)
    assert any(reason in recapture for recapture in graphed.callback.stats.recaptures), graphed.callback.stats.recaptures


class AveragesTheLossInABuffer(ShiftedTargets):
    """Keeps a running loss in a buffer it assigns anew after every step (checkpointed with the model)."""

    def __init__(self, read_in_step):
        super().__init__()
        self.read_in_step = read_in_step
        self.register_buffer("loss_average", torch.zeros(()))

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss + self.loss_average * 0.1 if self.read_in_step else loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.loss_average = 0.9 * self.loss_average + 0.1 * outputs["loss"].detach()


def test_a_buffer_the_step_reads_assigned_anew_after_every_step_trains_eagerly_with_one_warning(replaying):
    eager, graphed = both(lambda: AveragesTheLossInABuffer(read_in_step=True), max_epochs=2)
    assert_same(eager, graphed)
    (warning,) = graphed.warnings
    assert "assigns a new tensor to the buffer `AveragesTheLossInABuffer.loss_average` since the capture (update a buffer in place" in warning


def test_a_buffer_the_step_does_not_read_may_be_assigned_anew_after_every_step(replaying):
    eager, graphed = both(lambda: AveragesTheLossInABuffer(read_in_step=False), max_epochs=2)
    assert_same(eager, graphed)
    replayed(graphed, eager_steps=0)
    assert not graphed.warnings


def test_graphed_step_notices_a_module_frozen_between_calls(graph_api_on_cpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)

    def freeze_then_evaluate(index, model):
        if index == 8:
            model[0].requires_grad_(False)
        if index == 12:
            model[1].eval()

    runs = [
        train_in_a_plain_loop(
            graphed,
            lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                        torch.nn.Linear(8, 1)),
            lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
            calls=16, before_call=freeze_then_evaluate,
        )
        for graphed in (True, False)
    ]
    step = runs[0][2]
    assert step.stats.captures == 3 and step.stats.replays > 0, step.stats.summary()
    assert_trained_alike(*runs)
    step.close()


@dataclasses.dataclass
class Options:
    noise_weight: float = 0.0
    terms: dict = dataclasses.field(default_factory=lambda: {"l1": 0.0})
    seen: int = 0  # bookkeeping a hook keeps, never read by the step


class ReadsItsOptions(models.Regressor):
    """A loss shaped by a config object, as users hold one: an attribute, or inside ``self.hparams``."""

    def __init__(self, options, in_hparams=False):
        super().__init__("adamw", None)
        if in_hparams:
            self.save_hyperparameters()
        else:
            self.options = options

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        options = self.hparams.options if "options" in self.hparams else self.options
        loss = (torch.nn.functional.mse_loss(pred, y) + options.noise_weight * pred.pow(2).mean()
                + options.terms["l1"] * pred.abs().mean())
        self.log("train_loss", loss)
        return loss


class AnnealOptions(pl.Callback):
    def __init__(self, every):
        self.every = every

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        options = module.hparams.options if "options" in module.hparams else module.options
        if trainer.global_step % self.every == 0:
            options.noise_weight = trainer.global_step / 20
            options.terms["l1"] = trainer.global_step / 30


class CountInOptions(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        module.options.seen += 1


@pytest.mark.parametrize("every", [1, 9])
@pytest.mark.parametrize("make_module", [
    lambda: ReadsItsOptions(Options()),
    lambda: ReadsItsOptions(types.SimpleNamespace(noise_weight=0.0, terms={"l1": 0.0}, seen=0)),
    lambda: ReadsItsOptions(Options(), in_hparams=True),
], ids=["a dataclass attribute", "a SimpleNamespace attribute", "a dataclass in self.hparams"])
def test_a_config_object_changed_by_a_hook_is_never_replayed_stale(replaying, make_module, every):
    eager, graphed = both(make_module, max_epochs=3, extra_callbacks=lambda: [AnnealOptions(every)])
    assert_same(eager, graphed)
    stats = graphed.callback.stats
    reasons = list(stats.recaptures) + [stats.disabled_reason or ""]
    assert any("options" in reason.lower() for reason in reasons), stats.summary()
    if every == 1:  # captured anew at every step: not worth it, eager with one warning
        assert stats.disabled_reason is not None and len(graphed.warnings) == 1, stats.summary()
    else:  # captured anew once an epoch, replayed in between
        replayed(graphed)
        assert stats.captures >= 4, stats.summary()


def test_bookkeeping_in_a_dataclass_the_step_reads_does_not_stop_the_replays(replaying):
    # the hook counts in `options.seen` at every step; the step reads the other fields, which stay
    eager, graphed = both(lambda: ReadsItsOptions(Options()), max_epochs=3, extra_callbacks=lambda: [CountInOptions()])
    assert_same(eager, graphed)
    replayed(graphed, eager_steps=0)
    stats = graphed.callback.stats
    # (the epoch boundaries' broader check compares the whole object: at most one capture each)
    assert sum(stats.recaptures.values()) <= 2, (stats.summary(), stats.recaptures)


class CountsInAHelper(models.Regressor):
    """A step that counts in an object of its own class: a replay would not count."""

    def __init__(self):
        super().__init__("adamw", None)
        self.helper = _Counter()

    def training_step(self, batch, batch_idx):
        self.helper.calls += 1
        return super().training_step(batch, batch_idx)


class _Counter:
    def __init__(self):
        self.calls = 0


def test_a_step_counting_in_a_helper_object_trains_eagerly_with_a_warning(replaying):
    eager, graphed = both(CountsInAHelper)
    assert_same(eager, graphed)
    assert graphed.module.helper.calls == eager.module.helper.calls == 18
    assert graphed.callback.stats.replays == 0, graphed.callback.stats.summary()
    (warning,) = graphed.warnings
    assert "self.helper" in warning, warning


class FlipsAtRandom(models.Regressor):
    """Augmentation decided with host random numbers, which a replay would not draw again."""

    def __init__(self, source):
        super().__init__("adamw", None)
        self.source = source
        self.rng = np.random.default_rng(0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        draw = {
            "random": random.random, "numpy": np.random.uniform, "generator": self.rng.uniform,
            "a global Random": SHUFFLER.random,
        }[self.source]()
        if draw < 0.5:
            x = x.flip(0)
            y = y.flip(0)
        loss = torch.nn.functional.mse_loss(self(x), y) * (1 + draw)
        self.log("train_loss", loss)
        return loss


SHUFFLER = random.Random(0)


@pytest.mark.parametrize("source, named", [
    ("random", "Python's `random` module"), ("numpy", "NumPy's global"), ("generator", "the generator `self.rng`"),
    ("a global Random", "the generator `global SHUFFLER`"),
])
def test_a_step_drawing_host_random_numbers_trains_eagerly_with_one_warning(replaying, source, named):
    SHUFFLER.seed(0)
    eager = fit(lambda: FlipsAtRandom(source), graphed=False, accelerator="cpu")
    SHUFFLER.seed(0)
    graphed = fit(lambda: FlipsAtRandom(source), graphed=True, accelerator="cpu")
    assert_same(eager, graphed)
    assert graphed.callback.stats.replays == 0, graphed.callback.stats.summary()
    (warning,) = graphed.warnings
    assert f"draws random numbers from {named}" in warning and "torch.rand" in warning, warning


class ScalesByTheLearningRate(models.Regressor):
    """A loss weighted by the scheduler's last learning rate, a host value the scheduler changes between steps."""

    def __init__(self):
        super().__init__("adamw", "lambda")

    def training_step(self, batch, batch_idx):
        x, y = batch
        lr = self.lr_schedulers().get_last_lr()[0]
        loss = torch.nn.functional.mse_loss(self(x), y) * (1 + 100 * lr)
        self.log("train_loss", loss)
        return loss


def test_a_step_reading_its_schedulers_last_learning_rate_trains_eagerly_with_one_warning(replaying):
    eager, graphed = both(ScalesByTheLearningRate)
    assert_same(eager, graphed)
    assert graphed.callback.stats.replays == 0, graphed.callback.stats.summary()
    (warning,) = graphed.warnings
    assert "reads `get_last_lr()` of its LambdaLR scheduler" in warning, warning
    assert "get_last_lr" not in torch.optim.lr_scheduler.LambdaLR.__dict__  # put back


class CurriculumData(pl.LightningDataModule):
    """A data module holding a setting the step reads, raised by a hook as training goes on."""

    def __init__(self):
        super().__init__()
        self.noise = 0.0

    def train_dataloader(self):
        return loader()


class ReadsTheDataModule(models.Regressor):
    def __init__(self):
        super().__init__("adamw", None)

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = torch.nn.functional.mse_loss(pred, y) + self.trainer.datamodule.noise * pred.pow(2).mean()
        self.log("train_loss", loss)
        return loss


class RaiseNoise(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step % 9 == 4:
            trainer.datamodule.noise += 0.25


def test_a_setting_on_the_data_module_is_followed(replaying):
    options = dict(max_epochs=3, datamodule=CurriculumData, extra_callbacks=lambda: [RaiseNoise()])
    eager, graphed = both(ReadsTheDataModule, **options)
    assert_same(eager, graphed)
    replayed(graphed)
    stats = graphed.callback.stats
    assert any("CurriculumData.noise" in reason for reason in stats.recaptures), (stats.summary(), stats.recaptures)


class TemperatureOnTheClass(models.Regressor):
    temperature = 1.0  # a class attribute, set on the object later by a callback

    def __init__(self):
        super().__init__("adamw", None)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x) / self.temperature, y)
        self.log("train_loss", loss)
        return loss


class Cool(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 12:
            module.temperature = 0.5


def test_a_class_attribute_set_on_the_module_later_is_followed(replaying):
    eager, graphed = both(TemperatureOnTheClass, max_epochs=3, extra_callbacks=lambda: [Cool()])
    assert_same(eager, graphed)
    replayed(graphed)
    assert any("temperature" in reason for reason in graphed.callback.stats.recaptures), \
        graphed.callback.stats.summary()


LOSS_SETTINGS = {"l2": 0.0}  # module-level settings, as scripts keep them


class ReadsAGlobal(models.Regressor):
    def __init__(self):
        super().__init__("adamw", None)

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = torch.nn.functional.mse_loss(pred, y) + LOSS_SETTINGS["l2"] * pred.pow(2).mean()
        self.log("train_loss", loss)
        return loss


class RaiseL2(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step % 9 == 4:
            LOSS_SETTINGS["l2"] += 0.25


def test_module_level_settings_the_step_reads_are_followed(replaying):
    options = dict(max_epochs=3, extra_callbacks=lambda: [RaiseL2()])
    LOSS_SETTINGS["l2"] = 0.0
    eager = fit(ReadsAGlobal, graphed=False, accelerator="cpu", **options)
    LOSS_SETTINGS["l2"] = 0.0
    graphed = fit(ReadsAGlobal, graphed=True, accelerator="cpu", **options)
    LOSS_SETTINGS["l2"] = 0.0
    assert_same(eager, graphed)
    replayed(graphed)
    assert any("global LOSS_SETTINGS" in reason for reason in graphed.callback.stats.recaptures), \
        graphed.callback.stats.summary()


def l1_penalty(pred):
    return loss_settings.L1_WEIGHT * pred.abs().mean()  # an attribute of a config module, in a helper


class CallsHelpers(models.Regressor):
    """A step reading module-level settings only through a method and a function it calls."""

    def __init__(self):
        super().__init__("adamw", None)

    def penalties(self, pred):
        return l1_penalty(pred) + LOSS_SETTINGS["l2"] * pred.pow(2).mean()

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = torch.nn.functional.mse_loss(pred, y) + self.penalties(pred)
        self.log("train_loss", loss)
        return loss


class RaiseBoth(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step % 9 == 4:
            LOSS_SETTINGS["l2"] += 0.25
        if trainer.global_step % 9 == 6:
            loss_settings.L1_WEIGHT += 0.5


def test_module_level_settings_read_in_functions_the_step_calls_are_followed(replaying):
    def run(graphed):
        LOSS_SETTINGS["l2"], loss_settings.L1_WEIGHT = 0.0, 0.0
        try:
            return fit(CallsHelpers, graphed=graphed, accelerator="cpu", max_epochs=3,
                       extra_callbacks=lambda: [RaiseBoth()])
        finally:
            LOSS_SETTINGS["l2"], loss_settings.L1_WEIGHT = 0.0, 0.0

    eager, graphed = run(False), run(True)
    assert_same(eager, graphed)
    replayed(graphed)
    reasons = " ".join(graphed.callback.stats.recaptures)
    assert "global LOSS_SETTINGS" in reasons and "global loss_settings.L1_WEIGHT" in reasons, reasons


def test_a_graphed_step_follows_what_it_read_without_being_asked(graph_api_on_cpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)

    def simulate(graphed):
        sim = Oscillators()
        step = GraphedStep(sim.advance, warmup_steps=1, device="cuda") if graphed else sim.advance
        trace = []
        for i in range(12):
            step()
            if i in (4, 8):
                sim.dt *= 2  # no request_structure_check()
            trace.append(float((sim.position ** 2).sum()))
        return torch.tensor(trace, dtype=torch.float64), step

    eager, _ = simulate(False)
    graphed, step = simulate(True)
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)
    assert step.stats.captures == 3 and step.stats.replays > 0, step.stats.summary()


class TensorLearningRate(models.Regressor):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=torch.tensor(1e-2), weight_decay=0.5)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.3)]


def test_a_tensor_learning_rate_a_scheduler_changes_in_place_trains_eagerly_with_one_warning(replaying):
    # the decoupled weight decay of a replay used the captured learning rate's factor
    eager, graphed = both(TensorLearningRate, max_epochs=3)
    assert_same(eager, graphed)
    assert graphed.callback.stats.replays == 0, graphed.callback.stats.summary()
    (warning,) = [w for w in graphed.warnings if "is a tensor" in w]
    assert "param_groups[0]['lr']" in warning


class ClippingTightenedEachEpoch(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        trainer.gradient_clip_val = [0.5, 0.05, 0.01][trainer.current_epoch]
        trainer.gradient_clip_algorithm = ["norm", "norm", "value"][trainer.current_epoch]


def test_trainer_clipping_a_callback_changes_between_epochs_is_captured_anew(replaying):
    eager, graphed = both(lambda: models.Regressor("adamw", "lambda"), max_epochs=3, gradient_clip_val=0.5,
                          extra_callbacks=lambda: [ClippingTightenedEachEpoch()])
    assert_same(eager, graphed)
    stats = graphed.callback.stats
    assert stats.captures >= 3 and stats.replays > 0 and stats.disabled_reason is None, stats.summary()


def train_with_what_the_step_holds(graphed, holds):
    """Twelve calls of a plain-loop step that steps a scheduler, steps an optimizer it
    was not given, or scales its loss with a GradScaler it was not given."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = (torch.optim.SGD if holds == "optimizer" else torch.optim.AdamW)(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=8, gamma=0.1)  # flat through the warm-up
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0) if holds == "scaler" else None

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        if holds == "scaler":
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if holds == "scheduler":
            scheduler.step()
        return loss.detach()

    given = [] if holds == "optimizer" else [optimizer]
    run = GraphedStep(step, optimizers=given, modules=[model], device="cuda") if graphed else step
    generator = torch.Generator().manual_seed(1)
    losses = []
    for index in range(12):
        if holds == "optimizer" and index % 4 == 3:
            scheduler.step()
        x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)
        losses.append(float(run(x, y)))
    return losses, [p.detach().clone() for p in model.parameters()], run


@pytest.mark.parametrize("holds, needle", [
    ("scheduler", "steps a StepLR learning-rate scheduler each time it runs"),
    ("optimizer", "steps a SGD optimizer it was not given"),
    ("scaler", "GradScaler closure variable `scaler`, which was not given as `grad_scaler=`"),
])
def test_a_step_using_what_it_was_not_given_trains_eagerly_with_one_warning(graph_api_on_cpu, monkeypatch,
                                                                           holds, needle):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)
    eager_losses, eager_params, _ = train_with_what_the_step_holds(False, holds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GraphWarning)
        losses, params, step = train_with_what_the_step_holds(True, holds)
    assert losses == eager_losses
    for a, b in zip(params, eager_params):
        assert torch.equal(a, b)
    assert step.stats.replays == 0, step.stats.summary()
    (warning,) = [str(w.message) for w in caught if issubclass(w.category, GraphWarning)]
    assert needle in warning


class SwapsAParameterFreeModule(models.Regressor):
    """Switches an activation off, and the loss to L1, from the second epoch: modules without parameters."""

    def __init__(self, when):
        super().__init__("adamw", "lambda")
        self.when = when
        self.loss_fn = torch.nn.MSELoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        if self.when == "mid-epoch" and self.current_epoch == 0 and batch_idx == 5:
            self._swap()

    def on_train_epoch_start(self):
        if self.when == "epoch start" and self.current_epoch == 1:
            self._swap()

    def _swap(self):
        activation = next(i for i, m in enumerate(self.net) if isinstance(m, torch.nn.GELU))
        self.net[activation] = torch.nn.Identity()
        self.loss_fn = torch.nn.L1Loss()


@pytest.mark.parametrize("when", ["epoch start", "mid-epoch"])
def test_a_submodule_without_parameters_swapped_by_a_hook_is_captured_anew(replaying, when):
    eager, graphed = both(lambda: SwapsAParameterFreeModule(when))
    assert_same(eager, graphed)
    stats = graphed.callback.stats
    assert stats.captures >= 3 and stats.replays > 0 and stats.disabled_reason is None, stats.summary()


class NamedSamples(torch.utils.data.Dataset):
    """Samples carrying their own name: with shuffling, no two batches hold the same names."""

    def __init__(self):
        self.data = regression_data(n=64)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        x, y = self.data[index]
        return {"x": x, "y": y, "name": f"sample{index}"}


class OnNamedBatches(models.Regressor):
    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self(batch["x"]), batch["y"])
        self.log("train_loss", loss)
        return loss


def test_batches_whose_signature_never_recurs_train_eagerly_with_one_warning(replaying):
    data = lambda: torch.utils.data.DataLoader(NamedSamples(), batch_size=8, shuffle=True)  # noqa: E731
    eager, graphed = both(lambda: OnNamedBatches("adamw", None), train_loader=data, max_epochs=10)
    assert_same(eager, graphed)
    stats = graphed.callback.stats
    assert stats.captures == 0 and stats.disabled_reason is not None, stats.summary()
    (warning,) = graphed.warnings
    assert "no batch signature recurred in 64 calls in a row" in warning and "batch['name']" in warning, warning
    assert "one before had" in warning and "captured graph" not in warning, warning


class SwitchesToSGD(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            trainer.optimizers = [torch.optim.SGD(pl_module.parameters(), lr=0.05)]


class SetsUpOptimizersAgain(pl.Callback):
    """Fresh optimizer state at a stage boundary, as `strategy.setup_optimizers` gives."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            trainer.strategy.setup_optimizers(trainer)


@pytest.mark.parametrize("make_module, replaces", [
    (lambda: models.Regressor("adamw", None), SwitchesToSGD),
    (lambda: models.Regressor("adamw", None), SetsUpOptimizersAgain),
    (models.ManualRegressor, SwitchesToSGD),
], ids=["switches to SGD", "sets up the optimizers again", "manual optimization switches to SGD"])
def test_optimizers_replaced_during_the_fit_train_eagerly_from_then_with_one_warning(replaying, make_module, replaces):
    eager, graphed = both(make_module, max_epochs=3, extra_callbacks=lambda: [replaces()])
    assert_same(eager, graphed)
    stats = graphed.callback.stats
    assert stats.replays > 0 and stats.disabled_reason is not None, stats.summary()
    (warning,) = graphed.warnings
    assert "optimizers were replaced during the fit" in warning, warning


class CutsTheLearningRateInAStepHook(models.Regressor):
    """The learning rate cut tenfold at the sixth optimizer step, counted by a step pre-hook."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        count = {"steps": 0}

        def cut(optimizer, args, kwargs):
            count["steps"] += 1
            if count["steps"] == 6:
                for group in optimizer.param_groups:
                    group["lr"] *= 0.1

        optimizer.register_step_pre_hook(cut)
        return optimizer


class AverageWithWarmUp:
    """A weight average whose decay warms up with the number of updates, as EMA helpers do."""

    def __init__(self, module):
        self.module, self.updates = module, 0
        self.average = [p.detach().clone() for p in module.parameters()]

    def __call__(self, optimizer, args, kwargs):
        self.updates += 1
        decay = min(0.999, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for average, p in zip(self.average, self.module.parameters()):
                average.mul_(decay).add_(p, alpha=1 - decay)


class AveragesInAStepPostHook(models.Regressor):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        self.averaging = AverageWithWarmUp(self.net)
        optimizer.register_step_post_hook(self.averaging)
        return optimizer


@pytest.mark.parametrize("make_module, needle", [
    (CutsTheLearningRateInAStepHook, "`closure variable count`"),
    (AveragesInAStepPostHook, "`self.averaging`"),
])
def test_optimizer_step_hooks_counting_in_python_train_eagerly_with_one_warning(replaying, make_module, needle):
    eager, graphed = both(make_module)
    assert_same(eager, graphed)
    assert graphed.callback.stats.replays == 0, graphed.callback.stats.summary()
    (warning,) = graphed.warnings
    assert needle in warning, warning
    if make_module is AveragesInAStepPostHook:
        for a, b in zip(eager.module.averaging.average, graphed.module.averaging.average):
            assert torch.equal(a, b)


def test_a_step_taking_its_data_with_next_trains_eagerly_with_one_warning(graph_api_on_cpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)

    def train(graphed):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(1)
        batches = iter([(torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator))
                        for _ in range(10)])

        def step():
            x, y = next(batches)
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            return loss.detach()

        run = GraphedStep(step, optimizers=[optimizer], modules=[model], device="cuda") if graphed else step
        return [float(run()) for _ in range(10)], run

    eager, _ = train(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GraphWarning)
        graphed, step = train(True)
    assert graphed == eager
    assert step.stats.replays == 0, step.stats.summary()
    (warning,) = [str(w.message) for w in caught if issubclass(w.category, GraphWarning)]
    assert "holds the iterator closure variable `batches`" in warning and "`next()`" in warning


LOSS_WEIGHT = 1.0


@pytest.mark.parametrize("where", ["closure dict", "global"])
def test_a_value_read_by_a_helper_the_step_closes_over_is_followed(graph_api_on_cpu, monkeypatch, where):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)

    def train(graphed):
        global LOSS_WEIGHT
        LOSS_WEIGHT = 1.0
        settings = {"loss_weight": 1.0}
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

        def weighted_mse(prediction, target):  # a helper defined next to the step: held in its closure
            weight = settings["loss_weight"] if where == "closure dict" else LOSS_WEIGHT
            return weight * torch.nn.functional.mse_loss(prediction, target)

        def step(x, y):
            optimizer.zero_grad()
            loss = weighted_mse(model(x), y)
            loss.backward()
            optimizer.step()
            return loss.detach()

        run = GraphedStep(step, optimizers=[optimizer], modules=[model], device="cuda") if graphed else step
        generator = torch.Generator().manual_seed(1)
        losses = []
        for index in range(12):
            if index == 7:
                settings["loss_weight"] = LOSS_WEIGHT = 0.1
            losses.append(float(run(torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator))))
        return losses, run

    eager, _ = train(False)
    graphed, step = train(True)
    assert graphed == eager
    assert step.stats.replays > 0 and step.stats.disabled_reason is None, step.stats.summary()


GLOBAL_SCHEDULE: dict = {}


def _global_schedule_step(x, y):
    GLOBAL_SCHEDULE["optimizer"].zero_grad()
    loss = torch.nn.functional.mse_loss(GLOBAL_SCHEDULE["model"](x), y)
    loss.backward()
    GLOBAL_SCHEDULE["optimizer"].step()
    GLOBAL_SCHEDULE["scheduler"].step()  # a scheduler reached through module-level data
    return loss.detach()


def test_a_scheduler_a_step_reaches_through_a_global_is_noticed(graph_api_on_cpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    GLOBAL_SCHEDULE.update(model=model, optimizer=optimizer,
                           scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=6, gamma=0.1))
    step = GraphedStep(_global_schedule_step, optimizers=[optimizer], modules=[model], device="cuda")
    with pytest.warns(GraphWarning, match="steps a StepLR learning-rate scheduler"):
        for _ in range(5):
            step(torch.randn(8, 4), torch.randn(8, 1))
    assert step.stats.replays == 0, step.stats.summary()


class Trainer:
    """A plain training loop's object: the step is its method; it also holds the loop's own iterator and a log file."""

    def __init__(self, log):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.batches = itertools.cycle([(torch.randn(8, 4), torch.randn(8, 1))])  # read by the loop, not the step
        self.log = log

    def step(self, x, y):
        self.optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def test_a_bound_step_whose_object_holds_an_iterator_and_a_file_it_does_not_read_is_graphed(
        graph_api_on_cpu, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)
    with open(tmp_path / "log.txt", "w") as log:
        trainer = Trainer(log)
        step = GraphedStep(trainer.step, optimizers=[trainer.optimizer], modules=[trainer.model], device="cuda")
        for _ in range(8):
            step(*next(trainer.batches))
    assert step.stats.replays > 0 and step.stats.disabled_reason is None, step.stats.summary()


def test_an_optimizer_made_inside_the_step_for_an_inner_loop_is_graphed(graph_api_on_cpu, monkeypatch):
    """An adversarial perturbation optimized by a fresh optimizer at every call: that optimizer's settings are
    the same every time, so the graph replays them rightly."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)

    def train(graphed):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

        def step(x, y):
            delta = torch.zeros_like(x, requires_grad=True)
            inner = torch.optim.SGD([delta], lr=0.1)
            (-torch.nn.functional.mse_loss(model(x + delta), y)).backward(inputs=[delta])
            inner.step()
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x + delta.detach()), y)
            loss.backward()
            optimizer.step()
            return loss.detach()

        run = GraphedStep(step, optimizers=[optimizer], modules=[model], device="cuda") if graphed else step
        generator = torch.Generator().manual_seed(1)
        return [float(run(torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)))
                for _ in range(10)], run

    eager, _ = train(False)
    graphed, step = train(True)
    assert graphed == pytest.approx(eager, rel=1e-6)  # (AdamW's step rounds in the last place now and then)
    assert step.stats.replays > 0 and step.stats.disabled_reason is None, step.stats.summary()


class AveragesInAHookRegisteredLater(models.Regressor):
    """A constant-decay weight average in an optimizer post-hook registered once training runs."""

    def on_train_batch_start(self, batch, batch_idx):
        if not hasattr(self, "average"):
            self.average = [p.detach().clone() for p in self.net.parameters()]

            def update(optimizer, args, kwargs):
                with torch.no_grad():
                    for average, p in zip(self.average, self.net.parameters()):
                        average.mul_(0.9).add_(p, alpha=0.1)

            self.trainer.optimizers[0].register_step_post_hook(update)


def test_an_optimizer_hook_registered_once_training_runs_is_replayed(replaying):
    eager, graphed = both(lambda: AveragesInAHookRegisteredLater("adamw", "lambda"))
    assert_same(eager, graphed)
    assert graphed.callback.stats.replays > 0, graphed.callback.stats.summary()
    for a, b in zip(eager.module.average, graphed.module.average):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# -- values the fit changes between steps, read from the step ------------------------------------------------------


@pytest.mark.parametrize("value", list(models.FIT_VALUES))
def test_a_step_reading_a_value_the_fit_changes_between_steps_trains_eagerly_with_one_warning(replaying, value):
    read, named = models.FIT_VALUES[value]
    eager, graphed = both(lambda: models.RampedBy(read), max_epochs=3, val_loader=lambda: loader(batch_size=16))
    assert_eager_with_one_warning(eager, graphed, named, "updates in place")


def test_anomaly_detection_trains_eagerly_with_one_warning_naming_it(replaying):
    eager, graphed = both(lambda: models.Regressor("adamw", "lambda"), detect_anomaly=True)
    assert_eager_with_one_warning(eager, graphed, "detect_anomaly=True")
    assert graphed.callback.stats is None or graphed.callback.stats.captures == 0  # refused before capturing


class WarmupThenFlat(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler of one's own: its `get_lr` reads its own step count."""

    def get_lr(self):
        return [base * min(1.0, (self.last_epoch + 1) / 5) for base in self.base_lrs]


class CountKeptApart(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler keeping its step count behind a property of its own."""

    @property
    def last_epoch(self):
        return self._count

    @last_epoch.setter
    def last_epoch(self, value):
        self._count = value

    def get_lr(self):
        return [base / (1 + 0.1 * self.last_epoch) for base in self.base_lrs]


class CountKeptApartByItsBase(CountKeptApart):
    pass


class SchedulerOfOnesOwn(models.ManualRegressor):
    def __init__(self, scheduler):
        super().__init__("adamw", None)
        self.make_scheduler = scheduler

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return [opt], [self.make_scheduler(opt)]


@pytest.mark.parametrize("scheduler", [WarmupThenFlat, CountKeptApartByItsBase])
def test_a_scheduler_of_ones_own_stepped_in_a_manual_step_stays_graphed(replaying, scheduler):
    eager, graphed = both(lambda: SchedulerOfOnesOwn(scheduler), max_epochs=2)
    assert_same(eager, graphed)
    assert not graphed.warnings
    replayed(graphed)


@pytest.mark.parametrize("stage", ["validate", "predict"])
def test_an_evaluation_step_writing_its_batch_in_place_leaves_it_written_under_inference_mode(replaying, stage):
    seen, callbacks = {}, {}
    for graphed in (False, True):
        pl.seed_everything(0, verbose=False)
        sums = models.BatchSums()
        callbacks[graphed] = CUDAGraphCallback(graph_evaluation=True) if graphed else None
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[sums] + ([callbacks[graphed]] if graphed else []))
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(48.0).reshape(12, 4)),
                                           batch_size=2)
        getattr(trainer, stage)(models.ScalesItsBatch(), dataloaders=data)
        seen[graphed] = sums.sums
    assert seen[True] == seen[False]
    stats = callbacks[True].evaluation_stats["validation" if stage == "validate" else "predict"]
    assert stats.replays > 0, stats.summary()


def test_an_evaluation_batch_holding_one_tensor_twice_is_not_graphed_under_inference_mode(replaying):
    logged, warned = {}, {}
    for graphed in (False, True):
        pl.seed_everything(0, verbose=False)
        callback = CUDAGraphCallback(graph_evaluation=True)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback] if graphed else [])
        with torch.inference_mode():  # (as batches moved to the device in an evaluation loop)
            table = torch.arange(48.0).reshape(12, 4)
        data = torch.utils.data.DataLoader([(table[i:i + 2], table[i:i + 2]) for i in range(0, 12, 2)],
                                           batch_size=None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GraphWarning)
            logged[graphed] = trainer.validate(models.SameTensorTwice(), dataloaders=data)[0]["val_out"]
        warned[graphed] = [str(w.message) for w in caught if issubclass(w.category, GraphWarning)]
    assert logged[True] == pytest.approx(logged[False])
    (warning,) = warned[True]
    assert "may write its batch in place" in warning and "may write in place" in warning, warning
    assert "shares memory with batch[1]" in warning, warning


def test_a_step_that_prints_stays_graphed_and_says_once_where_its_messages_go(replaying, capsys):
    eager, graphed = both(lambda: models.PrintsEachStep("adamw", "lambda"), max_epochs=2)
    assert_same(eager, graphed)
    replayed(graphed)
    (warning,) = graphed.warnings
    assert "prints from inside the step" in warning and "on_train_batch_end" in warning, warning


class KeepsHistory(pl.Callback):
    """A callback with a hook inside the step, keeping a history outside it."""

    def __init__(self):
        self.history = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append(batch_idx)


class LooksUpOptions(KeepsHistory):
    def __getattr__(self, name):
        raise AttributeError(name)


class SlottedCounter(pl.Callback):
    __slots__ = ("count",)

    def __init__(self):
        self.count = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.count += 1


@pytest.mark.parametrize("make_callback", [KeepsHistory, LooksUpOptions, SlottedCounter])
def test_a_callback_keeping_bookkeeping_outside_the_step_leaves_it_graphed(replaying, make_callback):
    eager, graphed = both(lambda: models.Regressor("adamw", "lambda"), max_epochs=2,
                          extra_callbacks=lambda: [make_callback()])
    assert_same(eager, graphed)
    assert not graphed.warnings
    replayed(graphed, eager_steps=0)


def test_a_learning_rate_returned_by_the_step_stays_a_python_number_with_one_warning(replaying):
    eager, graphed = both(lambda: models.ReturnsItsLearningRate("adamw", "lambda"),
                          extra_callbacks=lambda: [models.KeepsReturnedNumbers()])
    assert_eager_with_one_warning(eager, graphed, "returns `outputs['lr']` as a Python number")
    assert models.returned_numbers(graphed) == models.returned_numbers(eager)


class CountsValidationBatches(models.Regressor):
    """A count of validation batches, kept where the training step never reads it."""

    def __init__(self, name):
        super().__init__("adamw", None)
        self.name = name
        setattr(self, name, 0)

    def validation_step(self, batch, batch_idx):
        setattr(self, self.name, getattr(self, self.name) + 1)
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))


@pytest.mark.parametrize("name", ["seen", "_seen"])
def test_bookkeeping_in_validation_costs_captures_when_public_and_nothing_when_private(replaying, name):
    eager, graphed = both(lambda: CountsValidationBatches(name), val_loader=lambda: loader(regression_data(16, seed=1)),
                          val_check_interval=3, max_epochs=2)
    assert_same(eager, graphed)
    assert getattr(graphed.module, name) == getattr(eager.module, name) > 0
    if name == "_seen":
        replayed(graphed)
        assert not graphed.callback.stats.recaptures and not graphed.warnings, graphed.callback.stats.summary()
    else:  # compared in case the step reads it unseen: captured anew after each validation, then given up
        (warning,) = graphed.warnings
        assert "changes `self.seen`" in warning and "private attribute" in warning, warning


class LegacyWeightNorm(models.Regressor):
    def __init__(self, reparametrize):
        super().__init__("adamw", "lambda")
        reparametrize(self.net[0])


@pytest.mark.parametrize("reparametrize, advised", [
    (torch.nn.utils.weight_norm, "parametrizations.weight_norm"),
    (torch.nn.utils.spectral_norm, "parametrizations.spectral_norm"),
])
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_a_legacy_weight_reparametrization_trains_eagerly_and_names_its_replacement(replaying, reparametrize, advised):
    eager, graphed = both(lambda: LegacyWeightNorm(reparametrize))
    assert_eager_with_one_warning(eager, graphed, advised)


class CountsBesideALegacyWeightNorm(LegacyWeightNorm):
    """A legacy weight norm on a layer the step uses, and a count of steps kept in Python."""

    def __init__(self):
        super().__init__(torch.nn.utils.weight_norm)
        self.steps_taken = 0

    def training_step(self, batch, batch_idx):
        self.steps_taken += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_a_side_effect_beside_a_legacy_weight_norm_is_named_for_itself(replaying):
    eager, graphed = both(CountsBesideALegacyWeightNorm)
    assert_eager_with_one_warning(eager, graphed, "changes `self.steps_taken`", "Move it out of the step")
    assert "parametrizations" not in graphed.warnings[0]
