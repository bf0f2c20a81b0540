"""Trainer flags under CUDAGraphCallback, eager vs graphed on a CUDA GPU: limits on the fit
(fast_dev_run, overfit_batches, limit_train_batches, max_steps, max_time), validation
scheduling, precision, data loading (pinned memory, workers, several train loaders), the
Tuner and repeated fits.

Each flag must change nothing but speed: every test trains the same seeded module eagerly
and graphed and compares what users observe (parity.assert_same). fp32 tolerance is
rtol = atol = 1e-6, as in test_callback_gpu.py; 16-mixed is compared at fp16 resolution
(1e-3); the true precisions train eagerly in both runs and must agree to the bit.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from typing import Any, Callable

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, Timer
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

import models
from lightning_graphs import CUDAGraphCallback, GraphWarning
from parity import (
    MemoryLogger, Recorder, Run, assert_same, fit, fit_both, graphs_used, loader, progress_of, regression_data,
)

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("deterministic")]


def regressor() -> models.Regressor:
    return models.Regressor("adamw", "lambda", epochs=3)


def val_data() -> DataLoader:
    return loader(regression_data(n=32, seed=1))  # 4 batches


# -- limits on the fit -------------------------------------------------------------------------


def test_fast_dev_run_true_one_batch_is_eager_and_silent():
    # a single train and val batch: fewer steps than the warm-up, nothing to graph, nothing to warn about
    eager, graphed = fit_both(regressor, val_loader=val_data, fast_dev_run=True)
    assert_same(eager, graphed)
    assert graphed.global_step == 1
    assert graphed.callback.stats.replays == 0, graphed.callback.stats.summary()
    assert graphed.warnings == [], graphed.warnings
    assert "val_loss" in graphed.final_metrics


def test_fast_dev_run_5_replays_the_last_steps():
    eager, graphed = fit_both(regressor, val_loader=val_data, fast_dev_run=5)
    assert_same(eager, graphed)
    assert graphed.global_step == 5
    graphs_used(graphed)
    assert graphed.warnings == [], graphed.warnings


def test_overfit_batches_2():
    # overfit_batches=2 trains on the same two batches every epoch (Lightning swaps in a sequential sampler)
    data = lambda: loader(regression_data(n=67), shuffle=True)  # noqa: E731
    eager, graphed = fit_both(regressor, train_loader=data, overfit_batches=2, max_epochs=5)
    assert_same(eager, graphed)
    assert graphed.global_step == 10
    graphs_used(graphed)


@pytest.mark.parametrize("limit, per_epoch", [(5, 5), (0.5, 4)])
def test_limit_train_batches(limit, per_epoch):
    eager, graphed = fit_both(regressor, limit_train_batches=limit, max_epochs=3)
    assert_same(eager, graphed)
    assert graphed.global_step == 3 * per_epoch
    graphs_used(graphed)


def test_max_steps_ending_mid_epoch():
    # 9 batches an epoch (the 9th ragged): stops at step 13, in the middle of the second epoch
    eager, graphed = fit_both(lambda: models.Regressor("adamw", "onecycle", epochs=2), max_steps=13, max_epochs=-1)
    assert_same(eager, graphed)
    assert graphed.global_step == eager.global_step == 13
    assert len(graphed.recorder.losses) == 13
    graphs_used(graphed)


def test_max_steps_ending_on_a_replayed_step_then_epoch_end_metrics():
    # stops right on a replayed step: the epoch-level values of that partial epoch must be eager's
    eager, graphed = fit_both(regressor, max_steps=16, max_epochs=-1, val_loader=val_data)
    assert_same(eager, graphed)
    assert graphed.global_step == 16
    assert "train_loss_epoch" in graphed.final_metrics
    graphs_used(graphed)


class Throttle(Callback):
    """Sleeps after each batch, outside the step: a few dozen steps in the timed second, so
    that the fit the clock stops is short, and the eager fit that repeats it too."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.02)


@pytest.mark.parametrize("clock", ["max_time", "Timer"])
def test_a_fit_stopped_by_the_clock_ends_cleanly_and_matches_eager_stopped_at_the_same_step(clock):
    # the clock is not deterministic: train graphed until it stops the fit (Trainer(max_time=...) or a
    # Timer callback of its own), then eagerly for exactly as many steps, and compare at that step
    one_second = {"seconds": 1}
    timer = [Timer(duration=one_second, interval="step")] if clock == "Timer" else []
    graphed = fit(regressor, graphed=True, max_epochs=10_000, extra_callbacks=lambda: timer + [Throttle()],
                  **({"max_time": one_second} if clock == "max_time" else {}))
    steps = graphed.global_step
    assert steps > 0 and len(graphed.recorder.losses) == steps
    assert graphed.progress["automatic"]["optimizer"]["step"]["total"]["completed"] == steps
    assert graphed.recorder.global_steps == list(range(1, steps + 1))
    # nothing left patched: the loop's own runner is back, the optimizer as the user made it
    assert "run" not in graphed.trainer.fit_loop.epoch_loop.automatic_optimization.__dict__
    assert graphed.trainer.optimizers[0].param_groups[0]["capturable"] is False
    eager = fit(regressor, graphed=False, max_steps=steps, max_epochs=10_000)
    assert eager.global_step == steps
    torch.testing.assert_close(torch.tensor(graphed.recorder.losses), torch.tensor(eager.recorder.losses),
                               rtol=1e-6, atol=1e-6)
    assert graphed.recorder.lrs == eager.recorder.lrs
    for name in eager.state:
        torch.testing.assert_close(graphed.state[name], eager.state[name], rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    if steps > 5:
        assert graphed.callback.stats.replays > 0, graphed.callback.stats.summary()


# -- validation scheduling ---------------------------------------------------------------------


def five_val_batches() -> DataLoader:
    return loader(regression_data(n=40, seed=1))


class ValidationCounter(Callback):
    """Counts validation batches and validation runs from outside the module."""

    def __init__(self):
        self.batches = 0
        self.epochs = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches += 1

    def on_validation_epoch_end(self, trainer, pl_module):
        self.epochs += 1


class LogsValEpoch(models.Regressor):
    """Logs the validation loss and an epoch-level mean of its predictions."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        self.log("val_loss", F.mse_loss(pred, y), prog_bar=True)
        self.log("val_pred_mean", pred.mean(), on_epoch=True)


def logs_val_epoch() -> LogsValEpoch:
    return LogsValEpoch("adamw", "lambda", epochs=3)


def fit_both_counting_validation(**kwargs: Any) -> tuple[Run, Run, ValidationCounter]:
    """parity.fit_both of a LogsValEpoch on five validation batches, checking that both runs
    validated as often and as much; returns the graphed run's counter too."""
    counters: list[ValidationCounter] = []

    def counter():
        counters.append(ValidationCounter())
        return [counters[-1]]

    eager, graphed = fit_both(logs_val_epoch, val_loader=five_val_batches, extra_callbacks=counter, **kwargs)
    counted_eager, counted = counters
    assert (counted.batches, counted.epochs) == (counted_eager.batches, counted_eager.epochs)
    return eager, graphed, counted


@pytest.mark.parametrize("interval, per_epoch", [(0.5, 2), (3, 3)])
def test_val_check_interval(interval, per_epoch):
    eager, graphed, counted = fit_both_counting_validation(val_check_interval=interval, max_epochs=3)
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    assert counted.epochs == 3 * per_epoch
    # validation in the middle of the epoch changes nothing the step reads: no new captures
    # (one graph for the full batches, one for the ragged last batch)
    assert graphed.callback.stats.captures == 2, graphed.callback.stats.summary()
    assert graphed.warnings == [], graphed.warnings


def test_check_val_every_n_epoch_2():
    eager, graphed, counted = fit_both_counting_validation(check_val_every_n_epoch=2, max_epochs=4)
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    assert (counted.batches, counted.epochs) == (10, 2)


@pytest.mark.parametrize("limit", [2, 0.4])
def test_limit_val_batches(limit):
    eager, graphed, counted = fit_both_counting_validation(limit_val_batches=limit, val_check_interval=4)
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    assert counted.batches == 2 * counted.epochs and counted.epochs == 4


def test_num_sanity_val_steps_2():
    eager, graphed, counted = fit_both_counting_validation(num_sanity_val_steps=2, max_epochs=3)
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    # 2 sanity batches, then 5 per epoch
    assert (counted.batches, counted.epochs) == (2 + 15, 4)
    assert graphed.warnings == [], graphed.warnings


def test_sanity_check_and_mid_epoch_validation_with_graph_evaluation():
    # opt-in evaluation graphs: the sanity check only warms up; every value still eager's
    eager, graphed, _ = fit_both_counting_validation(num_sanity_val_steps=2, max_epochs=3, val_check_interval=3,
                                                     callback_kwargs={"graph_evaluation": True})
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    assert graphed.callback.evaluation_stats["validation"].replays > 0
    assert graphed.warnings == [], graphed.warnings


class CountsValidationBatchesIn(LogsValEpoch):
    """Adds one to the attribute named ``counter`` at each validation batch; the training step never reads it."""

    def __init__(self, counter: str):
        super().__init__("adamw", "lambda", epochs=3)
        self.counter = counter
        setattr(self, counter, 0)

    def validation_step(self, batch, batch_idx):
        setattr(self, self.counter, getattr(self, self.counter) + 1)
        super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("counter", ["val_batches_seen", "_seen"])
def test_a_validation_counter_costs_the_graphs_when_public_and_nothing_when_private(counter):
    # public plain attributes changed outside the step are compared after validation, in case the step
    # reads them unseen (as compiled code does): a public counter bumped by validation every 3 steps
    # costs a capture each time, so graphs are given up with advice; a private one is left out
    eager, graphed = fit_both(lambda: CountsValidationBatchesIn(counter), val_loader=five_val_batches,
                              val_check_interval=3, max_epochs=3)
    assert_same(eager, graphed)
    assert getattr(graphed.module, counter) == getattr(eager.module, counter) > 0
    if counter.startswith("_"):
        graphs_used(graphed, eager_steps=0)
        assert graphed.warnings == [], graphed.warnings
    else:
        (warning,) = graphed.warnings
        assert f"`self.{counter}`" in warning and "private attribute" in warning, warning


# -- precision, and accumulation with clipping ----------------------------------------------------


@pytest.mark.parametrize("optimizer, scheduler", [("adamw", "onecycle"), ("sgd", "step_epoch")])
def test_accumulate_3_with_norm_clipping_and_a_ragged_last_batch(optimizer, scheduler):
    # 11 batches an epoch, the last of 5 rows: cycles of 3, 3, 3 and a last one of 2 ending on the ragged batch
    data = lambda: loader(regression_data(n=8 * 10 + 5))  # noqa: E731
    eager, graphed = fit_both(lambda: models.Regressor(optimizer, scheduler, steps_per_epoch=4, epochs=3),
                              train_loader=data, max_epochs=3, accumulate_grad_batches=3,
                              gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    assert_same(eager, graphed)
    assert graphed.global_step == eager.global_step == 12
    graphs_used(graphed, eager_steps=0)


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_true_precisions_train_eagerly_with_one_warning_naming_them(precision, dtype):
    # documented as eager: the parameters live in that dtype; both runs are eager, so equal to the bit
    eager, graphed = fit_both(lambda: models.Regressor("adamw", "lambda"), precision=precision)
    assert graphed.module.net[0].weight.dtype == dtype
    assert_same(eager, graphed, rtol=0, atol=0)
    stats = graphed.callback.stats
    assert stats is None or stats.replays == 0, stats.summary()
    (warning,) = graphed.warnings
    assert precision in warning, warning


def test_16_mixed_with_sgd():
    # fp16 autocast rounds activations to 11 bits of mantissa: the last-bit difference of the replayed
    # optimizer step can flip a rounding, so agreement is checked at fp16 resolution
    eager, graphed = fit_both(lambda: models.Regressor("sgd", "step_epoch", epochs=3), precision="16-mixed",
                              max_epochs=3)
    assert_same(eager, graphed, rtol=1e-3, atol=1e-3)
    graphs_used(graphed, eager_steps=0)
    assert graphed.warnings == [], graphed.warnings
    if eager.trainer.precision == "16-mixed":  # (without CUDA, Lightning trains bf16-mixed, without a scaler)
        scale = graphed.trainer.precision_plugin.scaler.get_scale()
        assert scale == eager.trainer.precision_plugin.scaler.get_scale()


def test_16_mixed_with_sgd_accumulation_and_clipping():
    eager, graphed = fit_both(lambda: models.Regressor("sgd", None), precision="16-mixed", max_epochs=3,
                              accumulate_grad_batches=2, gradient_clip_val=0.5)
    assert_same(eager, graphed, rtol=1e-3, atol=1e-3)
    graphs_used(graphed, eager_steps=0)


# -- data loading ------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    lambda: {"pin_memory": True, "num_workers": 2, "persistent_workers": True},
    lambda: {"shuffle": True, "generator": torch.Generator().manual_seed(1234)},
    # no generator: each epoch's order is drawn from PyTorch's global CPU generator, which the
    # callback (warm-up, capture, replays) must not draw from
    lambda: {"shuffle": True, "num_workers": 2},
], ids=["pinned_memory_persistent_workers", "shuffle_seeded_generator", "shuffle_seeded_by_seed_everything_workers"])
def test_dataloader_options(options):
    data = lambda: DataLoader(regression_data(n=67), batch_size=8, **options())  # noqa: E731
    eager, graphed = fit_both(regressor, train_loader=data, max_epochs=3)
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)


@pytest.mark.parametrize("ragged", [1, 7])
def test_drop_last_false_ragged_last_batch(ragged):
    data = lambda: DataLoader(regression_data(n=16 * 4 + ragged), batch_size=16, drop_last=False)  # noqa: E731
    eager, graphed = fit_both(regressor, train_loader=data, max_epochs=3)
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)


class TwoSources(models.Regressor):
    """training_step receives {"a": (x, y), "b": (x, y)}, Lightning's CombinedLoader of a dict;
    under ``max_size`` "b" is None once it ran out (a Python decision on the batch's structure)."""

    def training_step(self, batch, batch_idx):
        xa, ya = batch["a"]
        loss = loss_a = F.mse_loss(self(xa), ya)
        if batch["b"] is not None:
            xb, yb = batch["b"]
            loss_b = F.mse_loss(self(xb), yb)
            loss = loss_a + 0.5 * loss_b
            self.log("loss_a", loss_a, on_epoch=True)
            self.log("loss_b", loss_b, on_epoch=True)
        self.log("train_loss", loss, prog_bar=True)
        return loss


def two_loaders() -> dict[str, DataLoader]:
    # "a": 9 batches (the last of 3 rows); "b": 5 batches of 4 (the last of 2), cycled under max_size_cycle
    return {"a": loader(regression_data(n=67)), "b": loader(regression_data(n=18, seed=5), batch_size=4)}


def test_a_dict_of_train_dataloaders_max_size_cycle():
    eager, graphed = fit_both(lambda: TwoSources("adamw", "lambda", epochs=3), train_loader=two_loaders, max_epochs=3)
    assert_same(eager, graphed)
    assert graphed.global_step == 27
    graphs_used(graphed)
    # "b" cycles through 5 positions against "a"'s 9: several signatures, all trained right
    assert graphed.callback.stats.replays > 9, graphed.callback.stats.summary()


@pytest.mark.parametrize("mode", ["min_size", "max_size"])
def test_a_combined_loader_in_other_modes(mode):
    data = lambda: CombinedLoader(two_loaders(), mode=mode)  # noqa: E731
    eager, graphed = fit_both(lambda: TwoSources("adamw", "lambda", epochs=3), train_loader=data, max_epochs=3)
    assert_same(eager, graphed)
    graphs_used(graphed)


# -- the Tuner and repeated fits ----------------------------------------------------------------


def trainer_for(run: Run, **kwargs: Any) -> pl.Trainer:
    """A new Trainer holding ``run``'s recorder, logger and graph callback, otherwise as quiet as parity.fit's."""
    callbacks = [run.recorder] + ([run.callback] if run.callback else [])
    return pl.Trainer(accelerator="gpu", devices=1, logger=run.logger, log_every_n_steps=1, callbacks=callbacks,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **kwargs)


def after(run: Run, trainer: pl.Trainer, fitting: Callable[[], Any]) -> Run:
    """``run`` as users see it once ``fitting`` has fitted its module on ``trainer`` (more), with the
    graph warnings of before and of ``fitting``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GraphWarning)
        fitting()
    return replace(
        run,
        trainer=trainer,
        global_step=trainer.global_step,
        progress=progress_of(trainer),
        final_metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
        state={k: v.detach().cpu().clone() for k, v in run.module.state_dict().items()},
        warnings=run.warnings + [str(w.message) for w in caught if issubclass(w.category, GraphWarning)],
    )


class Tunable(models.Regressor):
    """A Regressor with the attributes the Tuner looks for (``lr``, ``batch_size``) and its own loaders."""

    def __init__(self):
        super().__init__("adamw", "lambda")
        self.lr = 1e-3
        self.batch_size = 4

    def train_dataloader(self):
        return loader(regression_data(n=67), batch_size=self.batch_size)

    def val_dataloader(self):
        return loader(regression_data(n=32, seed=1), batch_size=16)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def tuned_then_fit(graphed: bool, root, tune: Callable[[Tuner, Tunable], Any]) -> tuple[Run, Any]:
    """A Tunable tuned by ``tune`` on a Trainer that holds the graph callback (when ``graphed``), then fitted
    on that Trainer; returns the run and what ``tune`` found."""
    pl.seed_everything(0, verbose=False)
    module = Tunable()
    unfitted = Run(recorder=Recorder(), logger=MemoryLogger(), final_metrics={}, state={}, progress={}, global_step=0,
                   callback=CUDAGraphCallback() if graphed else None, module=module)
    trainer = trainer_for(unfitted, max_epochs=2, default_root_dir=str(root / ("graphed" if graphed else "eager")))
    found = []

    def tune_and_fit():
        found.append(tune(Tuner(trainer), module))
        trainer.fit(module)

    return after(unfitted, trainer, tune_and_fit), found[0]


def test_lr_find_then_fit(tmp_path):
    def tune(tuner, module):
        finder = tuner.lr_find(module, min_lr=1e-5, max_lr=1e-1, num_training=30)
        return finder.results, finder.suggestion(), module.lr

    eager, (eager_results, eager_suggestion, eager_lr) = tuned_then_fit(False, tmp_path, tune)
    graphed, (graphed_results, graphed_suggestion, graphed_lr) = tuned_then_fit(True, tmp_path, tune)
    assert graphed_results["lr"] == eager_results["lr"]
    torch.testing.assert_close(torch.tensor(graphed_results["loss"]), torch.tensor(eager_results["loss"]),
                               rtol=1e-6, atol=1e-6, equal_nan=True)
    assert graphed_suggestion == eager_suggestion and graphed_lr == eager_lr == eager_suggestion
    assert_same(eager, graphed)
    # 17 batches of 4 an epoch: the fit itself, from step 0 after the finder restored the model
    assert graphed.global_step == 34
    assert graphed.recorder.lrs[0] == [eager_suggestion]
    graphs_used(graphed)
    assert graphed.warnings == [], graphed.warnings


def test_scale_batch_size_then_fit(tmp_path):
    def tune(tuner, module):
        return tuner.scale_batch_size(module, mode="power", steps_per_trial=6, init_val=4, max_trials=3)

    eager, eager_size = tuned_then_fit(False, tmp_path, tune)
    graphed, graphed_size = tuned_then_fit(True, tmp_path, tune)
    assert graphed_size == eager_size == 16  # trials of 4, 8 and 16: nothing runs out of memory here
    assert graphed.module.batch_size == 16
    assert_same(eager, graphed)
    assert graphed.global_step == 2 * 5  # 67 rows in batches of 16: 5 an epoch
    graphs_used(graphed)


def fit_again(run: Run, trainer: pl.Trainer) -> Run:
    """``run`` once its module is fitted again, on ``trainer``, on the same training data."""
    return after(run, trainer, lambda: trainer.fit(run.module, train_dataloaders=loader()))


def test_fit_twice_on_one_trainer_continues():
    eager_first, graphed_first = fit_both(lambda: models.Regressor("adamw", "onecycle", epochs=4))
    assert graphed_first.callback.stats.replays > 0, graphed_first.callback.stats.summary()
    eager_first.trainer.fit_loop.max_epochs = graphed_first.trainer.fit_loop.max_epochs = 4
    eager, graphed = fit_again(eager_first, eager_first.trainer), fit_again(graphed_first, graphed_first.trainer)
    assert_same(eager, graphed)
    assert graphed.global_step == 4 * 9
    graphs_used(graphed)
    assert graphed.warnings == [], graphed.warnings


def test_fit_twice_with_a_new_trainer_and_the_same_module_and_callback():
    # the same callback object given to a second Trainer: its graphs of the first must not leak into the second
    eager, graphed = (fit_again(run, trainer_for(run, max_epochs=3))
                      for run in fit_both(lambda: models.Regressor("sgd", "step_epoch", epochs=4)))
    assert_same(eager, graphed)
    graphs_used(graphed)
