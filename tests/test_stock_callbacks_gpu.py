"""Lightning's stock callbacks next to CUDAGraphCallback, eager vs graphed on a CUDA GPU:
LearningRateMonitor, EarlyStopping, ModelCheckpoint and resuming from its checkpoints,
StochasticWeightAveraging, GradientAccumulationScheduler, Timer and the progress bars.
(A Timer that stops the fit is tested with Trainer(max_time=...) in test_trainer_flags_gpu.py.)

What a callback sees, logs, decides or writes must be eager's: fp32 tolerance is
rtol = atol = 1e-6, as in test_callback_gpu.py; learning rates, steps, stop decisions and
checkpoint file names must match exactly.
"""

from __future__ import annotations

import lightning.pytorch.callbacks
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    Callback, EarlyStopping, GradientAccumulationScheduler, LearningRateMonitor, ModelCheckpoint,
    StochasticWeightAveraging, Timer,
)

import models
from parity import Run, assert_same, fit, fit_both, graphs_used, loader, regression_data

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("deterministic")]


def val_data():
    return loader(regression_data(n=32, seed=1))


def logged(run: Run, key: str) -> list[tuple[int, float]]:
    """Every (step, value) of ``key`` the run's logger received."""
    return [(step, values[key]) for step, values in run.logger.records if key in values]


# -- LearningRateMonitor -------------------------------------------------------------------------


@pytest.mark.parametrize("log_momentum", [False, True])
def test_learning_rate_monitor_every_step_with_onecycle(log_momentum):
    eager, graphed = fit_both(
        lambda: models.Regressor("adamw", "onecycle", epochs=3), max_epochs=3,
        extra_callbacks=lambda: [LearningRateMonitor(logging_interval="step", log_momentum=log_momentum)],
    )
    assert_same(eager, graphed)
    graphs_used(graphed)
    lrs = logged(graphed, "lr-AdamW")
    assert len(lrs) == 27 and lrs == logged(eager, "lr-AdamW")
    assert len({lr for _, lr in lrs}) > 20  # the lr really cycled
    # the logged lr is the one the step used
    assert [lr for _, lr in lrs] == [group[0] for group in graphed.recorder.lrs]
    if log_momentum:
        momenta = logged(graphed, "lr-AdamW-momentum")
        assert momenta == logged(eager, "lr-AdamW-momentum") and len({m for _, m in momenta}) > 20


# -- EarlyStopping --------------------------------------------------------------------------------


def test_early_stopping_on_val_loss_stops_mid_epoch_at_eagers_step():
    # min_delta so large that only the first validation counts as an improvement: with patience=2
    # and validation every 4 steps of 10 an epoch (steps 4, 8, 14) the fit stops mid-epoch at step 14
    def stopper():
        return [EarlyStopping(monitor="val_loss", min_delta=10.0, patience=2, mode="min")]

    data = lambda: loader(regression_data(n=80))  # noqa: E731
    eager, graphed = fit_both(lambda: models.Regressor("adamw", "lambda"), train_loader=data, val_loader=val_data,
                              val_check_interval=4, max_epochs=5, extra_callbacks=stopper)
    assert_same(eager, graphed)
    assert eager.global_step == 14 and graphed.global_step == 14
    assert graphed.trainer.should_stop
    graphs_used(graphed)


def test_early_stopping_on_a_real_plateau_of_val_loss():
    # the stop decision depends on the values: graphed must stop where eager stops
    def stopper():
        return [EarlyStopping(monitor="val_loss", patience=0, min_delta=1e-3, mode="min")]

    eager, graphed = fit_both(lambda: models.Regressor("sgd", None), val_loader=val_data, max_epochs=12,
                              extra_callbacks=stopper)
    assert_same(eager, graphed)
    assert eager.trainer.current_epoch < 12  # it did stop early
    graphs_used(graphed)


def test_early_stopping_on_a_train_metric_at_train_epoch_end():
    def stopper():
        return [EarlyStopping(monitor="train_loss_epoch", min_delta=10.0, patience=1, mode="min",
                              check_on_train_epoch_end=True)]

    eager, graphed = fit_both(lambda: models.Regressor("adamw", "lambda"), max_epochs=6, extra_callbacks=stopper)
    assert_same(eager, graphed)
    assert graphed.global_step == eager.global_step == 18
    graphs_used(graphed)


# -- ModelCheckpoint and resuming ------------------------------------------------------------------


def onecycle_over_4_epochs() -> models.Regressor:
    return models.Regressor("adamw", "onecycle", epochs=4)


def checkpointed_then_resumed(tmp_path, graphed: bool, stop: dict) -> tuple[Run, Run, object]:
    """A fit stopped by ``stop`` that saves every 3 steps and last.ckpt, then a fit to epoch 4
    resumed from last.ckpt; returns both runs and the checkpoint folder."""
    directory = tmp_path / ("graphed" if graphed else "eager")

    def checkpoint():
        return [ModelCheckpoint(dirpath=directory, every_n_train_steps=3, save_last=True, save_top_k=-1)]

    first = fit(onecycle_over_4_epochs, graphed=graphed, extra_callbacks=checkpoint, enable_checkpointing=True,
                default_root_dir=str(tmp_path), **stop)
    last = directory / "last.ckpt"
    assert last.exists()
    resumed = fit(onecycle_over_4_epochs, graphed=graphed, extra_callbacks=checkpoint, enable_checkpointing=True,
                  default_root_dir=str(tmp_path), ckpt_path=str(last), max_epochs=4)
    return first, resumed, directory


def assert_same_checkpoint(a_path, b_path) -> None:
    """Two checkpoint files hold the same progress, the same weights and optimizer state (each
    tensor on the device and in the dtype eager training saves it with) and the same schedulers."""
    a = torch.load(a_path, weights_only=False, map_location="cpu")
    b = torch.load(b_path, weights_only=False, map_location="cpu")
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    for name in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][name], a["state_dict"][name], rtol=1e-6, atol=1e-6)
    assert a["loops"] == b["loops"]
    assert a["lr_schedulers"] == b["lr_schedulers"]
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for key, state in opt_a["state"].items():
        for field, value in state.items():
            other = opt_b["state"][key][field]
            assert type(other) is type(value), (key, field)
            if isinstance(value, torch.Tensor):
                assert other.device == value.device and other.dtype == value.dtype, (key, field)
                torch.testing.assert_close(other, value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stop", [{"max_epochs": 2}, {"max_steps": 14, "max_epochs": 4}],
                         ids=["at_epoch_end", "mid_epoch"])
def test_model_checkpoint_every_3_steps_then_resume_from_last(tmp_path, stop):
    eager_first, eager_resumed, eager_dir = checkpointed_then_resumed(tmp_path, False, stop)
    graphed_first, graphed_resumed, graphed_dir = checkpointed_then_resumed(tmp_path, True, stop)
    assert_same(eager_first, graphed_first)
    graphs_used(graphed_first)
    # every checkpoint file the same, as eager would have written it
    eager_files = sorted(p.name for p in eager_dir.iterdir())
    assert sorted(p.name for p in graphed_dir.iterdir()) == eager_files
    for name in eager_files:
        assert_same_checkpoint(eager_dir / name, graphed_dir / name)
    assert_same(eager_resumed, graphed_resumed)
    graphs_used(graphed_resumed)
    assert graphed_resumed.global_step == eager_resumed.global_step


def test_resuming_a_graphed_fit_from_an_eager_checkpoint(tmp_path):
    # a checkpoint written without the callback, resumed with it, trains as eager resumed
    first = fit(onecycle_over_4_epochs, graphed=False, max_epochs=2, enable_checkpointing=True,
                default_root_dir=str(tmp_path),
                extra_callbacks=lambda: [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                                                         save_last=True)])
    path = tmp_path / "ckpt" / "last.ckpt"
    assert first.global_step == 18 and path.exists()
    eager_resumed, graphed_resumed = fit_both(onecycle_over_4_epochs, max_epochs=4, ckpt_path=str(path))
    assert_same(eager_resumed, graphed_resumed)
    graphs_used(graphed_resumed)


def test_model_checkpoint_monitoring_a_step_logged_train_loss(tmp_path):
    # top-k decided every 3 steps on the value logged by the replayed step
    def checkpoint(which):
        return lambda: [ModelCheckpoint(dirpath=tmp_path / which, monitor="train_loss_step", every_n_train_steps=3,
                                        save_top_k=2, mode="min")]

    make = lambda: models.Regressor("adamw", "lambda")  # noqa: E731
    eager = fit(make, graphed=False, extra_callbacks=checkpoint("eager"), enable_checkpointing=True, max_epochs=3)
    graphed = fit(make, graphed=True, extra_callbacks=checkpoint("graphed"), enable_checkpointing=True, max_epochs=3)
    assert_same(eager, graphed)
    graphs_used(graphed)
    best_e, best_g = eager.trainer.checkpoint_callback, graphed.trainer.checkpoint_callback
    assert sorted(p.split("/")[-1] for p in best_g.best_k_models) == sorted(
        p.split("/")[-1] for p in best_e.best_k_models)
    torch.testing.assert_close(best_g.best_model_score.cpu(), best_e.best_model_score.cpu(), rtol=1e-6, atol=1e-6)


# -- StochasticWeightAveraging ---------------------------------------------------------------------


def swa_from_epoch_1():
    return [StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1)]


def test_stochastic_weight_averaging():
    # from epoch 1 SWALR replaces the schedule and the weights are averaged at every epoch end
    eager, graphed = fit_both(lambda: models.Regressor("sgd", "step_epoch", epochs=3), max_epochs=3,
                              extra_callbacks=swa_from_epoch_1)
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    assert len({tuple(lr) for lr in graphed.recorder.lrs}) >= 3  # SWALR annealed the lr
    assert graphed.warnings == [], graphed.warnings


def test_stochastic_weight_averaging_with_batchnorm_graphs_the_training_epochs():
    # with batch norm Lightning adds one more epoch after the last: forward passes only, every
    # BatchNorm's momentum set to None, to recompute the running statistics of the averaged weights.
    # BatchNorm with momentum=None reads `float(self.num_batches_tracked)` on the host, so that epoch
    # cannot be replayed: the training epochs replayed, the extra one eager, every number eager's.
    # On an H200 its steps ran as eager warm-up steps and no capture of them was tried; where one
    # is tried, it fails with one warning naming the read on the host.
    eager, graphed = fit_both(lambda: models.Regressor("sgd", "step_epoch", batchnorm=True, epochs=3), max_epochs=3,
                              extra_callbacks=swa_from_epoch_1)
    assert_same(eager, graphed)
    assert eager.trainer.current_epoch == 4  # the extra epoch ran
    stats = graphed.callback.stats
    assert stats.replays >= 18, stats.summary()  # the three training epochs
    assert len(graphed.warnings) <= 1, graphed.warnings
    assert all("Could not capture the training step" in w and "on the host" in w for w in graphed.warnings)


# -- GradientAccumulationScheduler ----------------------------------------------------------------


def test_gradient_accumulation_scheduler_with_clipping_and_a_ragged_batch():
    data = lambda: loader(regression_data(n=8 * 10 + 5))  # noqa: E731  11 batches, the last of 5
    eager, graphed = fit_both(
        lambda: models.Regressor("adamw", "onecycle", steps_per_epoch=11, epochs=4), train_loader=data,
        max_epochs=4, gradient_clip_val=0.5,
        extra_callbacks=lambda: [GradientAccumulationScheduler({1: 2, 2: 3})],
    )
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)


# -- Timer ---------------------------------------------------------------------------------------


def test_timer_callback_measures_and_changes_nothing():
    timers = []

    def timer():
        timers.append(Timer(duration="00:00:10:00", interval="step"))
        return [timers[-1]]

    eager, graphed = fit_both(lambda: models.Regressor("adamw", "lambda"), extra_callbacks=timer, val_loader=val_data)
    assert_same(eager, graphed)
    graphs_used(graphed)
    graphed_timer = timers[1]
    assert graphed_timer.time_elapsed("train") > 0 and graphed_timer.time_elapsed("validate") > 0
    assert graphed_timer.start_time("train") is not None and graphed_timer.end_time("train") is not None


# -- progress bars ---------------------------------------------------------------------------------


class BarRecorder(Callback):
    """What the progress bar shows after each step."""

    def __init__(self):
        self.shown = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.progress_bar_callback.get_metrics(trainer, pl_module)
        self.shown.append({k: (v if isinstance(v, str) else float(v)) for k, v in metrics.items() if k != "v_num"})


class ProgBarLoss(models.Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("loss_on_bar", loss, prog_bar=True)
        self.log("abs_err", (self(x) - y).abs().mean(), prog_bar=True, on_step=False, on_epoch=True)
        return loss


@pytest.mark.parametrize("bar", ["TQDMProgressBar", "RichProgressBar"])
def test_progress_bar_shows_each_steps_own_value(bar):
    if bar == "RichProgressBar":
        pytest.importorskip("rich")
    recorders = []

    def bar_and_recorder():
        recorders.append(BarRecorder())
        return [getattr(lightning.pytorch.callbacks, bar)(refresh_rate=1), recorders[-1]]

    eager, graphed = fit_both(lambda: ProgBarLoss("adamw", "lambda"), extra_callbacks=bar_and_recorder,
                              enable_progress_bar=True, val_loader=val_data)
    assert_same(eager, graphed)
    graphs_used(graphed)
    shown_eager, shown_graphed = (r.shown for r in recorders)
    assert [sorted(s) for s in shown_graphed] == [sorted(s) for s in shown_eager]
    for got, want in zip(shown_graphed, shown_eager):
        for key in want:
            if isinstance(want[key], str):
                assert got[key] == want[key], key
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key
    values = [s["loss_on_bar"] for s in shown_graphed]
    assert len(set(values)) == len(values)  # each step's own value, none frozen
