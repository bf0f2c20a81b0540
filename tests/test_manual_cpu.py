"""Manual optimization (``automatic_optimization = False``) without a GPU: CUDA's graph API
is stood in for, so that the callback's plumbing runs on CPU.

A stand-in replay runs nothing, so parameters and losses of replayed steps are not
compared here (the GPU tests' business, ``test_manual_gpu.py``). What the host does
around the graph is: Lightning's step counters and ``global_step``, the schedulers
stepped by hand (learning rates), what is logged at which step, what the step
returns, the patches and their removal, and the fallbacks with their warnings. A fit
that falls back before any capture trains exactly as eager, parameters included.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import models
from lightning_graphs import CUDAGraphCallback, GraphCaptureError, GraphWarning
from lightning_graphs import _lightning as internals
from lightning_graphs.manual import ReplayedCalls
from parity import MemoryLogger, Recorder, progress_of
from test_eval_graphs_cpu import cuda_on_cpu, same_batches  # noqa: F401  (a fixture)


class Spy(Callback):
    """Notes, at every batch, whether the manual loop's runner is stood in for."""

    def __init__(self) -> None:
        self.patched: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.patched.append("run" in internals.manual_optimization_loop(trainer).__dict__)


def _fit(make_module, callback=None, loader=lambda: same_batches(ragged=3), extra=(), **kwargs):
    """Fit a fresh seeded module on CPU; (module, trainer, recorder, logger, spy, graph warnings)."""
    pl.seed_everything(0, verbose=False)
    module = make_module()
    recorder, logger, spy = Recorder(), MemoryLogger(), Spy()
    options = dict(accelerator="cpu", max_epochs=2, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    options.update(kwargs)
    callbacks = [recorder, spy, *extra] + ([callback] if callback is not None else [])
    trainer = pl.Trainer(callbacks=callbacks, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GraphWarning)
        trainer.fit(module, train_dataloaders=loader())
    graph_warnings = [str(w.message) for w in caught if issubclass(w.category, GraphWarning)]
    return module, trainer, recorder, logger, spy, graph_warnings


def _assert_unpatched(trainer):
    assert "run" not in internals.automatic_optimization_loop(trainer).__dict__
    assert "run" not in internals.manual_optimization_loop(trainer).__dict__
    for optimizer in trainer.strategy._lightning_optimizers:
        assert "step" not in optimizer.__dict__ and "zero_grad" not in optimizer.__dict__
    for config in trainer.lr_scheduler_configs:
        assert "step" not in config.scheduler.__dict__
    for optimizer in trainer.optimizers:
        assert not optimizer._optimizer_step_pre_hooks


def _assert_counts_like(eager, graphed):
    """What Lightning counts and logs, step by step, is eager's."""
    _, eager_trainer, eager_rec, eager_log, _, _ = eager
    _, trainer, rec, log, _, _ = graphed
    assert trainer.global_step == eager_trainer.global_step
    assert rec.global_steps == eager_rec.global_steps
    assert progress_of(trainer) == progress_of(eager_trainer)
    assert rec.lrs == eager_rec.lrs  # the schedulers' own floats: exactly equal
    assert rec.output_keys == eager_rec.output_keys
    assert [(step, sorted(metrics)) for step, metrics in log.records] == [
        (step, sorted(metrics)) for step, metrics in eager_log.records
    ]


def _assert_trained_like(eager, graphed):
    """Parameters and logged values are eager's, to the bit (no step was replayed)."""
    eager_module, _, eager_rec, eager_log, _, _ = eager
    module, _, rec, log, _, _ = graphed
    assert rec.losses == eager_rec.losses
    assert log.records == eager_log.records
    for (name, a), b in zip(module.state_dict().items(), eager_module.state_dict().values()):
        assert torch.equal(a, b), name


# -- graphed: counts, schedulers, logs and outputs as eager ------------------------------------------


@pytest.mark.parametrize("returns", ["loss", "dict", "none"])
def test_a_replayed_manual_step_counts_steps_schedules_and_logs_as_eager(cuda_on_cpu, returns):
    make = lambda: models.ManualRegressor("adamw", "lambda", returns=returns)  # noqa: E731
    eager = _fit(make)
    callback = CUDAGraphCallback()
    graphed = _fit(make, callback)
    _assert_counts_like(eager, graphed)
    _, trainer, rec, _, spy, graph_warnings = graphed
    assert graph_warnings == []
    assert trainer.global_step == 2 * 9
    assert len({tuple(lr) for lr in rec.lrs}) == 18  # the lr changed at every step, replayed ones too
    stats = callback.stats
    # the full batches: three warm-ups, the capture, replays; the ragged last one: a warm-up, then its capture
    assert (stats.warmup_steps, stats.captures, stats.replays, stats.eager_steps) == (4, 2, 12, 0), stats.summary()
    assert spy.patched and all(spy.patched)
    _assert_unpatched(trainer)


def test_a_gan_step_with_two_optimizers_and_two_schedulers_is_one_graph(cuda_on_cpu):
    eager = _fit(models.ManualGAN)
    callback = CUDAGraphCallback()
    graphed = _fit(models.ManualGAN, callback)
    _assert_counts_like(eager, graphed)
    _, trainer, rec, log, _, graph_warnings = graphed
    assert graph_warnings == []
    assert trainer.global_step == 2 * 2 * 9  # both optimizers' steps count
    assert callback.stats.replays == 12 and callback.stats.disabled_reason is None, callback.stats.summary()
    assert sum("g_loss" in metrics for _, metrics in log.records) == 18 and "d_real" in trainer.callback_metrics
    # the requires_grad flags the toggles flip inside the step are back
    assert all(p.requires_grad for p in graphed[0].parameters())
    _assert_unpatched(trainer)


class StepsTwoSchedulersOfOneOptimizer(models.ManualRegressor):
    """Two schedulers on one optimizer whose order matters: the exponential decay multiplies
    the learning rate the lambda schedule sets."""

    def step_schedulers(self, batch_idx):
        lambda_lr, exponential = self.lr_schedulers()
        exponential.step()
        lambda_lr.step()
        exponential.step()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step)),
                       torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)]


def test_schedulers_stepped_by_hand_are_stepped_after_every_replay_in_their_order(cuda_on_cpu):
    eager = _fit(StepsTwoSchedulersOfOneOptimizer)
    callback = CUDAGraphCallback()

    class Notes(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if callback._engine is not None and callback._engine.graphs:
                self.notes = callback._engine.graphs[-1].notes["manual"]

    notes = Notes()
    graphed = _fit(StepsTwoSchedulersOfOneOptimizer, callback, extra=[notes])
    _assert_counts_like(eager, graphed)
    assert callback.stats.replays == 12, callback.stats.summary()
    scheduled = [type(s).__name__ for s in notes.notes.schedulers]
    assert scheduled == ["ExponentialLR", "LambdaLR", "ExponentialLR"]
    assert (notes.notes.ready, notes.notes.completed) == (1, 1)


def test_replayed_calls_advance_the_counters_and_step_the_schedulers():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    order = []

    class Named(torch.optim.lr_scheduler.LambdaLR):
        def __init__(self, name):
            self.name = name
            super().__init__(optimizer, lambda step: 1.0)

        def step(self, *args, **kwargs):
            order.append(self.name)
            super().step(*args, **kwargs)

    trainer = pl.Trainer(accelerator="cpu", logger=False)
    calls = ReplayedCalls(2, 2, [Named("b"), Named("a"), Named("b")])
    order.clear()
    calls(trainer)
    calls(trainer)
    assert order == ["b", "a", "b"] * 2
    total = internals.manual_optimization_loop(trainer).optim_step_progress.total
    assert (total.ready, total.completed) == (4, 4)


# -- what a replay cannot repeat: eager, with one warning -----------------------------------------------


@pytest.mark.parametrize(
    "make, needle",
    [
        (models.ManualEveryNBatches, "`batch_idx`"),
        (models.ManualAtEpochEnd, "`self.trainer.is_last_batch`"),
        (models.ManualSchedulerFirst, "steps the learning-rate scheduler `LambdaLR` before `step()`"),
        (models.ManualPlateau, "`ReduceLROnPlateau.step(...)` with arguments"),
        (models.ManualLBFGS, "LBFGS"),
    ],
)
def test_what_a_replay_cannot_repeat_trains_eagerly_with_one_warning(cuda_on_cpu, make, needle):
    eager = _fit(make)
    callback = CUDAGraphCallback()
    graphed = _fit(make, callback)
    _assert_counts_like(eager, graphed)
    _assert_trained_like(eager, graphed)
    graph_warnings = graphed[-1]
    assert len(graph_warnings) == 1 and needle in graph_warnings[0], graph_warnings
    assert callback.stats.replays == 0 and callback.stats.captures == 0, callback.stats.summary()
    _assert_unpatched(graphed[1])


class AlternatesEveryBatch(Callback):
    """Sets a flag the step branches on, from outside the step: the calls differ step by step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.alternate = batch_idx % 2 == 1


def test_a_step_calling_its_optimizers_differently_from_step_to_step_trains_eagerly(cuda_on_cpu):
    eager = _fit(models.ManualGAN, extra=[AlternatesEveryBatch()])
    callback = CUDAGraphCallback()
    graphed = _fit(models.ManualGAN, callback, extra=[AlternatesEveryBatch()])
    _assert_counts_like(eager, graphed)
    _assert_trained_like(eager, graphed)
    (warning,) = graphed[-1]
    assert "called its optimizers and schedulers differently in two steps" in warning
    assert "AdamW #1 step" in warning
    assert callback.stats.replays == 0, callback.stats.summary()


class SchedulerFirstFromBatch(models.ManualRegressor):
    """Steps the scheduler before the optimizer once a flag set from outside is up."""

    scheduler_first = False

    def training_step(self, batch, batch_idx):
        opt, scheduler = self.optimizers(), self.lr_schedulers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        if self.scheduler_first:
            scheduler.step()
        opt.step()
        if not self.scheduler_first:
            scheduler.step()
        self.log("train_loss", loss)
        return loss


class RaiseFlagAt(Callback):
    def __init__(self, batch_idx):
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx:
            pl_module.scheduler_first = True


def test_a_scheduler_stepped_before_its_optimizer_found_while_capturing_fails_the_capture(cuda_on_cpu, monkeypatch):
    from lightning_graphs import graphed_step

    # the CUDA generator a real failed capture releases does not exist here
    monkeypatch.setattr(graphed_step, "_release_generator_after_failed_capture", lambda device: None)
    # warm-up steps 0-2 step the scheduler last; the capture at batch 3 steps it first
    eager = _fit(SchedulerFirstFromBatch, extra=[RaiseFlagAt(3)])
    callback = CUDAGraphCallback()
    graphed = _fit(SchedulerFirstFromBatch, callback, extra=[RaiseFlagAt(3)])
    _assert_counts_like(eager, graphed)  # the failed capture's counts were taken back
    _assert_trained_like(eager, graphed)
    (warning,) = graphed[-1]
    assert "before `step()`" in warning
    stats = callback.stats
    assert stats.captures == 0 and stats.replays == 0 and stats.eager_reasons["capture failed"] == 1, stats.summary()
    assert stats.warmup_steps == 3 and "before `step()`" in stats.disabled_reason
    _assert_unpatched(graphed[1])


def test_strict_raises_for_a_scheduler_stepped_before_its_optimizer(cuda_on_cpu):
    callback = CUDAGraphCallback(strict=True)
    with pytest.raises(GraphCaptureError, match="before `step\\(\\)`"):
        _fit(models.ManualSchedulerFirst, callback)


# -- clean exit --------------------------------------------------------------------------------------------


class FailsInStep(models.ManualRegressor):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == 1:  # a warm-up step, with the calls watched
            raise RuntimeError("stop here")
        return loss


def test_an_exception_inside_a_watched_step_removes_every_patch(cuda_on_cpu):
    callback = CUDAGraphCallback()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.fit(FailsInStep(), train_dataloaders=same_batches())
    _assert_unpatched(trainer)


class FailAfterBatch(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 6:
            raise RuntimeError("stop here")


def test_a_failed_fit_unpatches_and_a_second_fit_graphs_again(cuda_on_cpu):
    callback = CUDAGraphCallback()
    pl.seed_everything(0, verbose=False)
    module = models.ManualRegressor()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[FailAfterBatch(), callback])
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.fit(module, train_dataloaders=same_batches())
    assert callback.stats.replays == 3, callback.stats.summary()
    _assert_unpatched(trainer)
    spy = Spy()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[spy, callback])
    trainer.fit(module, train_dataloaders=same_batches())
    assert all(spy.patched) and callback.stats.replays == 4, callback.stats.summary()
    _assert_unpatched(trainer)


def test_on_cpu_manual_optimization_warns_once_and_changes_nothing():
    eager = _fit(models.ManualGAN)
    callback = CUDAGraphCallback()
    graphed = _fit(models.ManualGAN, callback)
    _assert_counts_like(eager, graphed)
    _assert_trained_like(eager, graphed)
    assert len(graphed[-1]) == 1 and "CUDA" in graphed[-1][0]
    assert not any(graphed[4].patched)


# -- the pieces --------------------------------------------------------------------------------------------


def test_watching_manual_calls_reports_and_puts_back_what_was_there():
    module = models.ManualGAN()
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    trainer.strategy._lightning_module = module
    from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

    trainer.strategy.optimizers, trainer.strategy.lr_scheduler_configs = _init_optimizers_and_lr_schedulers(module)
    opt_g, opt_d = trainer.strategy._lightning_optimizers
    mine = lambda: "the user's own"  # noqa: E731
    opt_d.zero_grad = mine
    seen, scheduled = [], []

    def on_scheduler_step(index, original, args, kwargs):
        scheduled.append((index, args))

    with internals.watching_manual_calls(trainer, lambda name, i: seen.append((name, i)), on_scheduler_step):
        opt_g.zero_grad()
        assert opt_d.zero_grad() == "the user's own"
        trainer.lr_scheduler_configs[1].scheduler.step(3)
        with pytest.raises(RuntimeError, match="inside"):
            raise RuntimeError("inside")
    assert seen == [("zero_grad", 0), ("zero_grad", 1)]
    assert scheduled == [(1, (3,))]
    assert opt_d.zero_grad is mine and "zero_grad" not in opt_g.__dict__ and "step" not in opt_g.__dict__
    assert all("step" not in config.scheduler.__dict__ for config in trainer.lr_scheduler_configs)


def test_the_step_probe_notes_reads_of_is_last_batch():
    module = models.ManualAtEpochEnd()
    trainer = pl.Trainer(accelerator="cpu", logger=False)
    module.trainer = trainer
    probe = internals.StepProbe(module, capturing=False)
    with probe.active():
        module._current_fx_name = "on_train_batch_end"  # Lightning's own hooks may read it
        trainer.is_last_batch
        assert probe.problem is None
        module._current_fx_name = "training_step"
        trainer.is_last_batch
    assert "`self.trainer.is_last_batch`" in probe.problem
    assert isinstance(type(trainer).__dict__["is_last_batch"], property) and trainer.is_last_batch is False


# -- found in review ---------------------------------------------------------------------------


def test_zero_grad_through_the_lightning_optimizer_makes_a_graph_that_replaces_gradients(cuda_on_cpu):
    # with validation, Lightning sets gradients to None before it: a graph that took over
    # gradients could not continue after it and would fall back for a step
    held = []

    class Graphs(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            callback = next(c for c in trainer.callbacks if isinstance(c, CUDAGraphCallback))
            held.extend(callback._engine.graphs)

    callback = CUDAGraphCallback()
    _, trainer, *_ = _fit(lambda: models.ManualRegressor("adamw", "lambda"), callback,
                          loader=lambda: same_batches(8), extra=[Graphs()], num_sanity_val_steps=0,
                          limit_val_batches=2)
    assert held and all(graph.replaces_grads for graph in held)
    assert callback.stats.eager_steps == 0, callback.stats.summary()


class ManualGANFailingInCapture(models.ManualGAN):
    """Fails (as a host read does on a GPU) between toggle_optimizer and untoggle_optimizer
    while it is captured."""

    capturing = False

    def manual_backward(self, loss, *args, **kwargs):
        if ManualGANFailingInCapture.capturing:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return super().manual_backward(loss, *args, **kwargs)


def test_a_capture_failing_between_toggle_and_untoggle_leaves_the_eager_step_right(cuda_on_cpu, monkeypatch):
    from graph_api_stand_ins import StandInGraph

    from lightning_graphs import graphed_step

    monkeypatch.setattr(StandInGraph, "capture_begin",
                        lambda self, pool=None, capture_error_mode=None: setattr(ManualGANFailingInCapture,
                                                                                 "capturing", True))
    monkeypatch.setattr(StandInGraph, "capture_end",
                        lambda self: setattr(ManualGANFailingInCapture, "capturing", False))
    monkeypatch.setattr(graphed_step, "_release_generator_after_failed_capture", lambda device: None)
    eager = _fit(ManualGANFailingInCapture)
    # the simple profiler errs on an action started twice: the failed capture's must be stopped
    graphed = _fit(ManualGANFailingInCapture, CUDAGraphCallback(), profiler="simple")
    _assert_counts_like(eager, graphed)
    # (the numbers are the GPU tests' business: here the stand-in capture ran the noise draw)
    assert any("Could not capture" in w for w in graphed[5]), graphed[5]
    assert all(p.requires_grad for p in graphed[0].parameters())


class LogsTheLearningRateAfterItsScheduler(models.ManualRegressor):
    def step_schedulers(self, batch_idx):
        super().step_schedulers(batch_idx)
        self.log("lr_after", self.lr_schedulers().get_last_lr()[0])


def test_an_eager_step_reading_the_learning_rate_after_its_scheduler_sees_eagers_value(cuda_on_cpu):
    eager = _fit(LogsTheLearningRateAfterItsScheduler)
    graphed = _fit(LogsTheLearningRateAfterItsScheduler, CUDAGraphCallback())
    _assert_counts_like(eager, graphed)
    _assert_trained_like(eager, graphed)  # logged values included


class CollectsIntoOutputs(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(dict(outputs))
        outputs["batch_idx"] = batch_idx  # a callback writing into the outputs it is given


def test_replayed_outputs_without_tensors_are_a_dict_of_their_own(cuda_on_cpu):
    collector = CollectsIntoOutputs()
    _fit(lambda: models.ManualRegressor("adamw", "lambda", returns="none"), CUDAGraphCallback(),
         extra=[collector])
    assert all("batch_idx" not in seen for seen in collector.seen), collector.seen[:3]
