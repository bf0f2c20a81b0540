"""Manual optimization (``automatic_optimization = False``), eager vs graphed, on a CUDA GPU.

Every test trains the same seeded module twice (TF32 off, deterministic kernels) and
compares what users observe (``parity.assert_same``): per-step losses, logged values,
callback metrics, what the step returned, the learning rate of every param group,
``global_step``, the manual loop's step counters and the batch counters, and the final
parameters and buffers. Tolerances as in ``test_callback_gpu.py``; the GAN's two coupled
Adam updates get 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import models
from parity import assert_same, fit, fit_both, graphs_used, loader, regression_data

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("deterministic")]

# 67 samples in batches of 8: 8 full batches and a ragged one of 3 per epoch
BATCHES_PER_EPOCH = 9


def trained_eagerly(run, needle):
    stats = run.callback.stats
    assert stats.replays == 0 and stats.disabled_reason is not None, stats.summary()
    warned = [w for w in run.warnings if needle in w]
    assert len(warned) == 1, run.warnings


def scheduler_states(run):
    return [config.scheduler.state_dict() for config in run.trainer.lr_scheduler_configs]


# -- one optimizer, a scheduler stepped by hand after opt.step() ---------------------------------------


@pytest.mark.parametrize("optimizer, scheduler", [("adamw", "lambda"), ("adamw", "onecycle"), ("sgd", "step")])
def test_one_optimizer_with_a_scheduler_stepped_by_hand_after_the_step(optimizer, scheduler):
    eager, graphed = fit_both(lambda: models.ManualRegressor(optimizer, scheduler))
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    assert graphed.global_step == 2 * BATCHES_PER_EPOCH
    # the learning rate changed at every step, replayed steps included, and the schedulers end where eager's do
    assert len({tuple(lr) for lr in graphed.recorder.lrs}) == 2 * BATCHES_PER_EPOCH
    eager_states, graphed_states = scheduler_states(eager), scheduler_states(graphed)
    assert [s["last_epoch"] for s in graphed_states] == [s["last_epoch"] for s in eager_states]
    assert [s["_last_lr"] for s in graphed_states] == [s["_last_lr"] for s in eager_states]
    assert not graphed.warnings, graphed.warnings


@pytest.mark.parametrize("returns", ["dict", "none"])
def test_what_the_manual_step_returns_is_handled_as_eager(returns):
    eager, graphed = fit_both(lambda: models.ManualRegressor("adamw", "lambda", returns=returns))
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    if returns == "none":
        assert graphed.recorder.output_keys == [[]] * (2 * BATCHES_PER_EPOCH)
    else:
        assert graphed.recorder.output_keys[-1] == ["loss", "pred_mean"]


def test_logged_values_and_returned_losses_are_each_manual_steps_own():
    eager, graphed = fit_both(lambda: models.ManualRegressor("adamw", "lambda", dropout=0.2))
    assert_same(eager, graphed)
    graphs_used(graphed)
    losses = graphed.recorder.losses
    assert len(set(losses)) == len(losses)
    logged = [r[1]["train_loss_step"] for r in graphed.logger.records if "train_loss_step" in r[1]]
    assert len(set(logged)) == len(logged) == 2 * BATCHES_PER_EPOCH
    # outputs["loss"] kept from every step: each its own tensor, not the graph's memory
    kept = graphed.recorder.loss_tensors
    assert len({t.data_ptr() for t in kept}) == len(kept)


def test_gradient_clipping_with_clip_gradients_inside_the_step():
    eager, graphed = fit_both(lambda: models.ManualRegressor("adamw", "lambda", clip=0.05))
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)


# -- several optimizers: a GAN-style step -----------------------------------------------------------------


@pytest.mark.parametrize("schedulers", [True, False])
def test_gan_generator_and_discriminator_updates_in_one_graph(schedulers):
    eager, graphed = fit_both(lambda: models.ManualGAN(schedulers=schedulers))
    assert_same(eager, graphed, rtol=1e-5, atol=1e-6)
    graphs_used(graphed, eager_steps=0)
    # both optimizers' steps count, in every replay too
    assert graphed.global_step == eager.global_step == 2 * 2 * BATCHES_PER_EPOCH
    stats = graphed.callback.stats
    assert stats.replays == 2 * BATCHES_PER_EPOCH - stats.warmup_steps - stats.captures, stats.summary()
    # the toggles inside the step left every flag as it found it
    assert all(p.requires_grad for p in graphed.module.parameters())
    if schedulers:
        assert len({tuple(lr) for lr in graphed.recorder.lrs}) == 2 * BATCHES_PER_EPOCH
        assert [s["last_epoch"] for s in scheduler_states(graphed)] == [2 * BATCHES_PER_EPOCH] * 2


# -- the ragged last batch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ragged", [3, 1])
def test_the_ragged_last_batch_gets_its_own_manual_graph(ragged):
    data = lambda: loader(regression_data(n=64 + ragged))  # noqa: E731
    eager, graphed = fit_both(models.ManualGAN, train_loader=data, max_epochs=3)
    assert_same(eager, graphed, rtol=1e-5, atol=1e-6)
    graphs_used(graphed, eager_steps=0)
    stats = graphed.callback.stats
    assert stats.captures == 2 and stats.most_graphs_held == 2, stats.summary()
    assert stats.replays == 27 - stats.warmup_steps - stats.captures, stats.summary()


def test_with_one_graph_the_ragged_last_manual_step_runs_eagerly():
    eager, graphed = fit_both(lambda: models.ManualRegressor("adamw", "lambda"), callback_kwargs={"max_graphs": 1})
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=2)  # the ragged batch of each of the 2 epochs
    assert any("shape (3, 8)" in w for w in graphed.warnings), graphed.warnings


# -- what a replay cannot repeat: eager, with one warning, and still right ------------------------------------


@pytest.mark.parametrize(
    "module, needle",
    [
        (models.ManualEveryNBatches, "`batch_idx`"),
        (models.ManualAtEpochEnd, "`self.trainer.is_last_batch`"),
        (models.ManualSchedulerFirst, "before `step()` of the optimizer it drives"),
        (models.ManualPlateau, "with arguments"),
        (models.ManualLBFGS, "LBFGS"),
    ],
)
def test_schedulers_a_replay_cannot_step_train_eagerly_and_right(module, needle):
    eager, graphed = fit_both(module)
    assert_same(eager, graphed)
    trained_eagerly(graphed, needle)
    if module in (models.ManualEveryNBatches, models.ManualAtEpochEnd):
        # the scheduler really stepped now and then only
        assert 1 < len({tuple(lr) for lr in graphed.recorder.lrs}) < 2 * BATCHES_PER_EPOCH


class Alternate(Callback):
    """Sets a flag the GAN's step branches on, from outside the step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.alternate = batch_idx % 2 == 1


def test_a_gan_step_skipping_the_discriminator_now_and_then_trains_eagerly():
    eager, graphed = fit_both(models.ManualGAN, extra_callbacks=lambda: [Alternate()])
    assert_same(eager, graphed)
    trained_eagerly(graphed, "differently in two steps")


# -- fp16 mixed precision: the GradScaler inside the manual step ----------------------------------------------


class Scales(Callback):
    def __init__(self):
        self.scales = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


def overflowing_data():
    """8 batches an epoch; at positions 4 and 6 the targets are so large that fp16
    gradients overflow at the scales the scaler tries."""
    x, y = regression_data(n=64).tensors
    y = y.clone()
    y[32:40] *= 1e2
    y[48:56] *= 1e4
    return loader(torch.utils.data.TensorDataset(x, y))


def test_16_mixed_manual_step_skips_the_same_overflowing_steps_as_eager():
    runs, traces = [], []
    for graphed in (False, True):
        trace = Scales()
        runs.append(fit(lambda: models.ManualRegressor("adamw", "lambda"), graphed=graphed,
                        train_loader=overflowing_data, extra_callbacks=lambda: [trace], precision="16-mixed",
                        max_epochs=4))
        traces.append(trace)
    (eager, graphed), (eager_trace, graphed_trace) = runs, traces
    backoffs = [i for i in range(1, len(eager_trace.scales)) if eager_trace.scales[i] < eager_trace.scales[i - 1]]
    assert any(i > 8 for i in backoffs), eager_trace.scales  # the scaler backed off during replays
    assert graphed_trace.scales == eager_trace.scales
    assert_same(eager, graphed, rtol=1e-3, atol=1e-3)
    graphs_used(graphed, eager_steps=0)
