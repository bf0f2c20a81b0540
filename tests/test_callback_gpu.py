"""Eager vs graphed training, side by side, on a CUDA GPU.

Every test trains the same seeded module twice (TF32 off, deterministic kernels)
and compares what users observe. fp32 tolerance is rtol = atol = 1e-6: a captured
optimizer step reads its learning rate from a device tensor, so a few of its
operations cannot be the eager kernels themselves (Adam's lerp and final update,
SGD's fused kernel), which rounds differently in the last place now and then.
Learning rates, global_step and progress counters must match exactly.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import models
from lightning_graphs import CUDAGraphCallback, GraphCaptureError
from lightning_graphs.graphed_step import Phase
from parity import assert_eager_with_one_warning, assert_same, fit, fit_both, graphs_used, loader, regression_data

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("deterministic")]


# -- stock optimizers and schedulers, ragged last batches ---------------------------------------


@pytest.mark.parametrize("ragged", [3, 1])
def test_the_ragged_last_batch_gets_its_own_graph(ragged):
    # epoch 1: an eager warm-up step of the ragged shape; epoch 2: captured; epoch 3: replayed
    data = lambda: loader(regression_data(n=64 + ragged))  # noqa: E731
    eager, graphed = fit_both(lambda: models.Regressor("adamw", "lambda"), train_loader=data, max_epochs=3)
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    stats = graphed.callback.stats
    assert stats.captures == 2 and stats.most_graphs_held == 2, stats.summary()
    assert stats.replays == 27 - stats.warmup_steps - stats.captures, stats.summary()
    assert not any("shape" in w for w in graphed.warnings), graphed.warnings


@pytest.mark.parametrize("ragged", [3, 1])
def test_with_one_graph_the_ragged_last_batch_runs_eagerly(ragged):
    data = lambda: loader(regression_data(n=64 + ragged))  # noqa: E731
    eager, graphed = fit_both(lambda: models.Regressor("adamw", "lambda"), train_loader=data,
                          callback_kwargs={"max_graphs": 1})
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=2)  # the ragged batch of each of the 2 epochs
    assert any(f"shape ({ragged}, 8)" in w for w in graphed.warnings), graphed.warnings


def test_onecycle_betas_reach_every_graph_held():
    data = lambda: loader(regression_data(n=64 + 5))  # noqa: E731
    eager, graphed = fit_both(lambda: models.Regressor("adamw", "onecycle", epochs=3), train_loader=data, max_epochs=3)
    assert_same(eager, graphed)
    assert graphed.callback.stats.captures == 2, graphed.callback.stats.summary()


def test_more_recurring_shapes_than_max_graphs_end_eager_with_a_warning():
    def data():
        sizes = [8, 6, 4] * 8
        dataset = regression_data(n=sum(sizes))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        batches = [[dataset[j] for j in range(start, start + size)] for start, size in zip(starts, sizes)]
        collate = torch.utils.data.default_collate
        return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=collate)

    eager, graphed = fit_both(lambda: models.Regressor("adamw", "lambda"), train_loader=data, max_epochs=1)
    assert_same(eager, graphed)
    stats = graphed.callback.stats
    assert stats.evictions >= 3 and stats.eager_steps > 0, stats.summary()
    assert any("max_graphs=2" in w for w in graphed.warnings), graphed.warnings


def test_adamw_with_onecycle_cycling_lr_and_betas():
    eager, graphed = fit_both(lambda: models.Regressor("adamw", "onecycle"), max_epochs=2)
    assert_same(eager, graphed)
    graphs_used(graphed)


def test_sgd_nesterov_weight_decay_with_per_epoch_steplr():
    eager, graphed = fit_both(lambda: models.Regressor("sgd", "step_epoch", epochs=3), max_epochs=3)
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert len({tuple(lr) for lr in graphed.recorder.lrs}) == 3  # the lr really changed each epoch


def test_adam_two_param_groups_with_cosine():
    eager, graphed = fit_both(lambda: models.Regressor("adam_two_groups", "cosine"))
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert len(graphed.recorder.lrs[0]) == 2


def test_rmsprop_without_scheduler():
    eager, graphed = fit_both(lambda: models.Regressor("rmsprop", None))
    assert_same(eager, graphed)
    graphs_used(graphed)


@pytest.mark.parametrize("optimizer, why", [("lbfgs", "LBFGS"), ("adagrad", "Adagrad")])
def test_optimizers_that_cannot_be_graphed_train_eagerly_with_one_warning(optimizer, why):
    eager, graphed = fit_both(lambda: models.Regressor(optimizer, None))
    assert_same(eager, graphed)
    assert graphed.callback.stats.replays == 0
    warned = [w for w in graphed.warnings if why in w]
    assert len(warned) == 1, graphed.warnings


# -- training_step signatures, batch structures ------------------------------------------------


@pytest.mark.parametrize("module", [models.OneArgStep, models.Regressor, models.ThreeArgStep])
def test_training_step_signatures(module):
    eager, graphed = fit_both(lambda: module("adamw", "lambda"))
    assert_same(eager, graphed)
    graphs_used(graphed)


def _dict_loader(names_for_batch):
    """A loader of dict batches whose "names" leaf is ``names_for_batch(i)`` for the i-th batch of the fit."""

    def make():
        count = [0]

        def collate(items):
            batch = {
                "x": torch.stack([item[0] for item in items]),
                "y": torch.stack([item[1] for item in items]),
                "names": names_for_batch(count[0]),
            }
            count[0] += 1
            return batch

        return torch.utils.data.DataLoader(regression_data(n=64), batch_size=8, collate_fn=collate)

    return make


def test_dict_batch_with_a_constant_list_of_strings_is_replayed():
    eager, graphed = fit_both(models.DictBatchStep, train_loader=_dict_loader(lambda i: ["single", "a"]))
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)


def test_a_changing_string_leaf_gets_a_graph_per_value():
    # every third batch says "double": the training step branches on it
    names = lambda i: ["double" if i % 3 == 0 else "single", "a"]  # noqa: E731
    eager, graphed = fit_both(models.DictBatchStep, train_loader=_dict_loader(names))
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    assert graphed.callback.stats.most_graphs_held == 2, graphed.callback.stats.summary()


def test_with_one_graph_a_changing_string_leaf_runs_those_batches_eagerly():
    names = lambda i: ["double" if i % 3 == 0 else "single", "a"]  # noqa: E731
    eager, graphed = fit_both(models.DictBatchStep, train_loader=_dict_loader(names), callback_kwargs={"max_graphs": 1})
    assert_same(eager, graphed)
    stats = graphed.callback.stats
    assert stats.replays > 0 and stats.eager_steps > 0, stats.summary()
    assert any("batch['names'][0]" in w for w in graphed.warnings), graphed.warnings


# -- logging and outputs ---------------------------------------------------------------------


def test_logged_values_and_outputs_are_each_steps_own():
    eager, graphed = fit_both(lambda: models.Regressor("adamw", "lambda"))
    assert_same(eager, graphed)
    losses = graphed.recorder.losses
    assert len(set(losses)) == len(losses)  # no frozen values
    logged = [r[1]["train_loss_step"] for r in graphed.logger.records if "train_loss_step" in r[1]]
    assert len(set(logged)) == len(logged) > 10


def test_logging_from_an_in_step_hook_is_replayed():
    eager, graphed = fit_both(lambda: models.LogsGradNorm("adamw", "lambda"))
    assert_same(eager, graphed)
    graphs_used(graphed)
    norms = [r[1]["grad_norm_step"] for r in graphed.logger.records if "grad_norm_step" in r[1]]
    assert len(set(norms)) == len(norms) > 10


def test_validation_and_model_checkpoint_monitor_match_eager(tmp_path):
    def checkpoint():
        return [ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)]

    eager, graphed = fit_both(
        lambda: models.Regressor("adamw", "lambda"),
        val_loader=lambda: loader(regression_data(n=32, seed=1)),
        extra_callbacks=checkpoint,
        enable_checkpointing=True,
        val_check_interval=4,
    )
    assert_same(eager, graphed)
    graphs_used(graphed)
    best_eager = eager.trainer.checkpoint_callback.best_model_score
    best_graphed = graphed.trainer.checkpoint_callback.best_model_score
    torch.testing.assert_close(best_graphed.cpu(), best_eager.cpu(), rtol=1e-6, atol=1e-6)
    saved = torch.load(graphed.trainer.checkpoint_callback.best_model_path, weights_only=False)
    group = saved["optimizer_states"][0]["param_groups"][0]
    assert group["capturable"] is False and isinstance(group["lr"], float)
    steps = [s["step"] for s in saved["optimizer_states"][0]["state"].values()]
    assert all(step.device.type == "cpu" for step in steps)


# -- precision, clipping, randomness, buffers ----------------------------------------------------


def test_bf16_mixed():
    # bf16 rounds activations to 8 bits of mantissa; the 1e-7 optimizer difference can flip
    # a rounding now and then, so agreement is checked at bf16 resolution
    eager, graphed = fit_both(lambda: models.Regressor("adamw", "lambda"), precision="bf16-mixed")
    assert_same(eager, graphed, rtol=2e-2, atol=2e-3)
    graphs_used(graphed)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping(algorithm):
    eager, graphed = fit_both(
        lambda: models.Regressor("adamw", "lambda"), gradient_clip_val=0.05, gradient_clip_algorithm=algorithm
    )
    assert_same(eager, graphed)
    graphs_used(graphed)


def test_dropout_draws_the_same_fresh_masks_as_eager():
    eager, graphed = fit_both(lambda: models.Regressor("adamw", "lambda", dropout=0.3))
    assert_same(eager, graphed)
    graphs_used(graphed)


def test_two_graphed_runs_with_one_seed_are_identical():
    first = fit(lambda: models.Regressor("adamw", "lambda", dropout=0.3), graphed=True)
    second = fit(lambda: models.Regressor("adamw", "lambda", dropout=0.3), graphed=True)
    assert_same(first, second, rtol=0, atol=0)
    graphs_used(second)


class AugmentsItsInputs(models.Regressor):
    """The regression step on inputs its ``augment`` changes first, as augmentation in a
    training step goes."""

    def augment(self, x):
        return x

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(self.augment(x)), y)
        self.log("train_loss", loss)
        return loss


class NoiseFromItsOwnGenerator(AugmentsItsInputs):
    """Input noise drawn from a generator of the module's own, seeded, as users write
    reproducible augmentation."""

    def on_fit_start(self):
        self.noise = torch.Generator(device=self.device).manual_seed(7)

    def augment(self, x):
        return x + 0.1 * torch.randn(x.shape, device=x.device, generator=self.noise)


def test_noise_from_a_generator_of_its_own_is_fresh_every_step_or_trained_eagerly_with_a_warning():
    eager, graphed = fit_both(lambda: NoiseFromItsOwnGenerator("adamw", "lambda"))
    assert_same(eager, graphed)
    if graphed.callback.stats.replays == 0:
        assert any("generator" in w.lower() for w in graphed.warnings), graphed.warnings


class FlipsOnAHostCoin(AugmentsItsInputs):
    """An augmentation decided as torchvision's random transforms decide it: `torch.rand(1) < p`, a draw
    from PyTorch's CPU generator, which a replay would not draw again."""

    def augment(self, x):
        return -x if torch.rand(1) < 0.5 else x


def test_a_host_coin_from_pytorchs_cpu_generator_trains_eagerly_with_one_warning():
    eager, graphed = fit_both(lambda: FlipsOnAHostCoin("adamw", "lambda"))
    assert_same(eager, graphed)
    assert graphed.callback.stats.replays == 0, graphed.callback.stats.summary()
    (warning,) = [w for w in graphed.warnings if "PyTorch's CPU generator" in w]
    assert "torch.rand(..., device=x.device)" in warning


class ClipsInItsOwnWay(models.Regressor):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
        self.clip_gradients(optimizer, gradient_clip_val=0.01, gradient_clip_algorithm="value")


def test_a_configure_gradient_clipping_override_is_replayed():
    eager, graphed = fit_both(lambda: ClipsInItsOwnWay("adamw", "lambda"))
    assert_same(eager, graphed)
    graphs_used(graphed)


class ReloadsStateAtEpoch1(Callback):
    """Mid-training loads of model and optimizer state, as a user restoring a snapshot would."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.model = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.optimizer = __import__("copy").deepcopy(trainer.optimizers[0].state_dict())

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            pl_module.load_state_dict(self.model)
            trainer.optimizers[0].load_state_dict(self.optimizer)


def test_loading_model_and_optimizer_state_mid_training_recaptures():
    eager, graphed = fit_both(lambda: models.Regressor("adamw", None), max_epochs=3,
                          extra_callbacks=lambda: [ReloadsStateAtEpoch1()])
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert graphed.callback.stats.captures >= 3, graphed.callback.stats.summary()  # again after the load


def test_batchnorm_running_statistics_match():
    eager, graphed = fit_both(lambda: models.Regressor("sgd", None, batchnorm=True))
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert graphed.state["net.1.num_batches_tracked"].item() == eager.state["net.1.num_batches_tracked"].item()


# -- what a graph cannot replay: detected, warned once, trained eagerly ---------------------------


def test_item_in_training_step_falls_back_naming_the_line():
    # dropout too: random ops must keep working (and match eager) after the failed capture
    eager, graphed = fit_both(lambda: models.ItemInStep(dropout=0.2))
    assert_same(eager, graphed)
    stats = graphed.callback.stats
    assert stats.replays == 0 and stats.disabled_reason is not None
    (warning,) = [w for w in graphed.warnings if "Could not capture" in w]
    assert "models.py" in warning and "loss.item()" in warning and "`.item()`" in warning


def test_item_in_training_step_raises_when_strict():
    with pytest.raises(GraphCaptureError, match="item"):
        fit(models.ItemInStep, graphed=True, callback_kwargs={"strict": True})


@pytest.mark.parametrize(
    "module, needle",
    [
        (models.CollectsOutputs, "self.step_losses"),
        (models.BranchesOnBatchIdx, "batch_idx"),
        (models.ReadsEpoch, "current_epoch"),
        (models.LogsPythonNumber, "Python number"),
        (models.ManualWarmupInOptimizerStep, "reads `self.trainer.global_step`"),
    ],
)
def test_python_side_effects_are_detected_and_trained_eagerly(module, needle):
    eager, graphed = fit_both(lambda: module("adamw", "lambda"))
    assert_same(eager, graphed)
    assert graphed.callback.stats.replays == 0, graphed.callback.stats.summary()
    assert any(needle in w for w in graphed.warnings), graphed.warnings
    if module is models.CollectsOutputs:
        assert graphed.module.epoch_means == pytest.approx(eager.module.epoch_means, rel=1e-6)


@pytest.mark.parametrize("value", list(models.FIT_VALUES))
def test_a_step_reading_a_value_the_fit_changes_between_steps_trains_eagerly_with_one_warning(value):
    read, named = models.FIT_VALUES[value]
    eager, graphed = fit_both(lambda: models.RampedBy(read), max_epochs=3, val_loader=lambda: loader(batch_size=16))
    assert_eager_with_one_warning(eager, graphed, named, "updates in place")


def test_anomaly_detection_trains_eagerly_with_one_warning_naming_it():
    eager, graphed = fit_both(lambda: models.Regressor("adamw", "lambda"), detect_anomaly=True)
    assert_eager_with_one_warning(eager, graphed, "detect_anomaly=True")
    assert graphed.callback.stats is None or graphed.callback.stats.captures == 0  # refused before capturing


def test_a_step_that_prints_stays_graphed_and_says_once_where_its_messages_go():
    eager, graphed = fit_both(lambda: models.PrintsEachStep("adamw", "lambda"))
    assert_same(eager, graphed)
    graphs_used(graphed)
    (warning,) = graphed.warnings
    assert "prints from inside the step" in warning and "on_train_batch_end" in warning, warning


def test_a_learning_rate_returned_by_the_step_stays_a_python_number_with_one_warning():
    eager, graphed = fit_both(lambda: models.ReturnsItsLearningRate("adamw", "lambda"),
                          extra_callbacks=lambda: [models.KeepsReturnedNumbers()])
    assert_eager_with_one_warning(eager, graphed, "returns `outputs['lr']` as a Python number")
    assert models.returned_numbers(graphed) == models.returned_numbers(eager)


# -- torchmetrics updated inside the step -----------------------------------------------------


def assert_same_metric_states(eager, graphed):
    """Every torchmetrics metric of the module ends with eager's states and update count."""
    import torchmetrics

    metrics = {name: m for name, m in eager.module.named_modules() if isinstance(m, torchmetrics.Metric)}
    assert metrics
    for name, metric in graphed.module.named_modules():
        if isinstance(metric, torchmetrics.Metric):
            want = metrics[name]
            assert metric._update_count == want._update_count, name
            for state in want._defaults:
                torch.testing.assert_close(getattr(metric, state), getattr(want, state), rtol=1e-6, atol=1e-6,
                                           msg=lambda m: f"{name}.{state}: {m}")


@pytest.mark.parametrize("module, epoch_values", [
    (models.UpdatesMetric, ["train_mse_epoch"]),
    (models.LogsMetricValues, ["train_mae_epoch", "epoch_pearson", "epoch_mean_loss"]),
    (models.UpdatesAccuracy, ["train_acc"]),
])
def test_torchmetrics_updated_in_the_step_are_replayed_with_every_value_right(module, epoch_values):
    # three epochs with the ragged last batch graphed too: the states pass between two
    # graphs, and the resets at every epoch end rebind them
    eager, graphed = fit_both(lambda: module("adamw", "lambda", epochs=3), max_epochs=3)
    assert_same(eager, graphed)  # per-step values and the final epoch values among them
    graphs_used(graphed, eager_steps=0)
    assert not graphed.warnings, graphed.warnings
    assert_same_metric_states(eager, graphed)
    assert set(epoch_values) <= set(graphed.final_metrics), graphed.final_metrics


def test_a_capture_failing_after_a_metric_ran_leaves_the_metric_as_eager():
    # the capture ran the metric's Python (its count, its new state tensors) but none of
    # its GPU work: the eager step that follows must start from the metric as it was
    eager, graphed = fit_both(lambda: models.ForwardsPearson("adamw", "lambda"))
    assert_same(eager, graphed)
    assert graphed.callback.stats.replays == 0 and graphed.callback.stats.captures == 0
    assert len(graphed.warnings) == 1 and "Could not capture" in graphed.warnings[0], graphed.warnings
    assert_same_metric_states(eager, graphed)


@pytest.mark.parametrize("module, needle", [
    (models.UpdatesListMetric, "list states (`preds`, `target`)"),
    (lambda *a: models.UpdatesAccuracy(*a, validate_args=True), "validate_args=False"),
])
def test_torchmetrics_that_cannot_be_replayed_train_eagerly_naming_the_metric(module, needle):
    eager, graphed = fit_both(lambda: module("adamw", "lambda"))
    assert_same(eager, graphed)
    assert graphed.callback.stats.replays == 0
    assert len(graphed.warnings) == 1 and needle in graphed.warnings[0], graphed.warnings


class ScaleTrace(Callback):
    """Per step: the GradScaler's scale and the first parameter's optimizer step count
    (read on the host after the step; a skipped step leaves the count unchanged)."""

    def __init__(self):
        self.scales, self.counts = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales.append(trainer.precision_plugin.scaler.get_scale())
        optimizer = trainer.optimizers[0]
        state = optimizer.state.get(optimizer.param_groups[0]["params"][0], {})
        count = state.get("step", state.get("momentum_buffer"))
        self.counts.append(float(count) if isinstance(count, torch.Tensor) and count.dim() == 0 else None)


def overflowing_data():
    """8 batches an epoch; at positions 4 and 6 the targets are so large that fp16
    gradients overflow at the scales the scaler tries, epoch after epoch."""
    x, y = regression_data(n=64).tensors
    y = y.clone()
    y[32:40] *= 1e2
    y[48:56] *= 1e4
    return loader(torch.utils.data.TensorDataset(x, y))


def scale_traces(make_module, max_epochs=4, **kwargs):
    runs, traces = [], []
    for graphed in (False, True):
        trace = ScaleTrace()
        runs.append(fit(make_module, graphed=graphed, train_loader=overflowing_data, extra_callbacks=lambda: [trace],
                        precision="16-mixed", max_epochs=max_epochs, **kwargs))
        traces.append(trace)
    return runs, traces


@pytest.mark.parametrize("optimizer, clip", [("adamw", None), ("sgd", 1.0), ("adam_two_groups", None)])
def test_16_mixed_skips_the_same_overflowing_steps_as_eager(optimizer, clip):
    (eager, graphed), (eager_trace, graphed_trace) = scale_traces(
        lambda: models.Regressor(optimizer, "lambda"), gradient_clip_val=clip
    )
    # the scaler backed off during replays: skipped steps were decided on the device
    backoffs = [i for i in range(1, len(eager_trace.scales)) if eager_trace.scales[i] < eager_trace.scales[i - 1]]
    assert any(i > 8 for i in backoffs), eager_trace.scales
    assert graphed_trace.scales == eager_trace.scales
    assert graphed_trace.counts == eager_trace.counts
    assert_same(eager, graphed, rtol=1e-3, atol=1e-3)  # fp16 activations round an ulp-level optimizer difference
    graphs_used(graphed, eager_steps=0)
    assert not graphed.warnings, graphed.warnings


def test_16_mixed_with_an_optimizer_that_cannot_skip_on_the_device_trains_eagerly():
    eager, graphed = fit_both(lambda: models.Regressor("rmsprop", None), precision="16-mixed")
    assert_same(eager, graphed, rtol=0, atol=0)  # untouched: bitwise equal
    assert graphed.callback.stats.replays == 0
    assert len([w for w in graphed.warnings if "RMSprop" in w and "fp16" in w]) == 1, graphed.warnings


def test_16_mixed_with_a_scaler_that_grows_and_backs_off():
    from lightning.pytorch.plugins import MixedPrecision

    def plugins():
        return [MixedPrecision("16-mixed", "cuda", scaler=torch.amp.GradScaler("cuda", growth_interval=2))]

    runs, traces = [], []
    for graphed in (False, True):
        trace = ScaleTrace()
        runs.append(fit(lambda: models.Regressor("adamw", "lambda"), graphed=graphed, train_loader=overflowing_data,
                        extra_callbacks=lambda: [trace], plugins=plugins(), max_epochs=4))
        traces.append(trace)
    (eager, graphed), (eager_trace, graphed_trace) = runs, traces
    scales = eager_trace.scales
    assert any(b > a for a, b in zip(scales, scales[1:])) and any(b < a for a, b in zip(scales, scales[1:])), scales
    assert graphed_trace.scales == scales
    assert graphed_trace.counts == eager_trace.counts
    assert_same(eager, graphed, rtol=1e-3, atol=1e-3)
    graphs_used(graphed, eager_steps=0)


def test_graphed_step_with_a_grad_scaler_in_a_plain_loop():
    from lightning_graphs import GraphedStep

    def train(graphed):
        torch.manual_seed(0)
        model = models.mlp().cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cuda", growth_interval=3)
        batches = [(x.cuda(), y.cuda()) for x, y in overflowing_data()] * 4

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return loss.detach()

        runner = GraphedStep(step, optimizers=[opt], modules=[model], grad_scaler=scaler) if graphed else step
        losses, scales = [], []
        for x, y in batches:
            losses.append(runner(x, y))
            scales.append(scaler.get_scale())
        if graphed:
            assert runner.stats.replays == len(batches) - 4, runner.stats.summary()
            runner.close()
        return torch.stack(losses).cpu(), scales, {k: v.cpu() for k, v in model.state_dict().items()}

    eager_losses, eager_scales, eager_state = train(False)
    graphed_losses, graphed_scales, graphed_state = train(True)
    assert graphed_scales == eager_scales
    assert any(b < a for a, b in zip(eager_scales[4:], eager_scales[5:])), eager_scales
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-3, atol=1e-3)
    for name in eager_state:
        torch.testing.assert_close(graphed_state[name], eager_state[name], rtol=1e-3, atol=1e-3)


# -- gradient accumulation: one graph per kind of micro-step -----------------------------------


@pytest.mark.parametrize("every, ragged", [(2, 3), (3, 3), (4, 0), (3, 1)])
def test_gradient_accumulation(every, ragged):
    # 8 full batches (+ a ragged one) an epoch: cycles end mid-epoch and at the epoch's last batch
    data = lambda: loader(regression_data(n=64 + ragged))  # noqa: E731
    eager, graphed = fit_both(lambda: models.Regressor("adamw", "lambda"), train_loader=data, max_epochs=3,
                          accumulate_grad_batches=every)
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    assert graphed.trainer.global_step == eager.trainer.global_step
    assert graphed.callback.stats.most_graphs_held >= 2, graphed.callback.stats.summary()


def test_gradient_accumulation_with_clipping_and_sgd_steplr():
    eager, graphed = fit_both(lambda: models.Regressor("sgd", "step_epoch", epochs=3), max_epochs=3,
                          accumulate_grad_batches=3, gradient_clip_val=0.5)
    assert_same(eager, graphed)
    graphs_used(graphed)


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "adamw"])
def test_accumulation_set_by_a_scheduler_from_the_start(optimizer):
    # the factor is 1 when training starts and 4 from the first epoch on: the stepping micro-step
    # must not be captured before the optimizer has stepped once (its state would be created in the graph)
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    eager, graphed = fit_both(lambda: models.Regressor(optimizer, None), max_epochs=3,
                          extra_callbacks=lambda: [GradientAccumulationScheduler({0: 4})])
    assert_same(eager, graphed)
    graphs_used(graphed)


def test_backbone_finetuning_with_accumulation():
    from lightning.pytorch.callbacks import BackboneFinetuning

    eager, graphed = fit_both(
        lambda: models.WithBackbone("adamw", None), max_epochs=3, accumulate_grad_batches=2,
        extra_callbacks=lambda: [BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False)],
    )
    assert_same(eager, graphed)
    graphs_used(graphed)


def test_a_changing_accumulation_schedule_gets_new_graphs():
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    eager, graphed = fit_both(lambda: models.Regressor("adamw", "lambda"), max_epochs=3,
                          extra_callbacks=lambda: [GradientAccumulationScheduler({0: 1, 1: 2, 2: 4})])
    assert_same(eager, graphed)
    graphs_used(graphed)


# -- invalidation, clean exit, second fit ----------------------------------------------------


class FreezeFirstLayerAtEpoch1(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            for p in pl_module.net[0].parameters():
                p.requires_grad_(False)


def test_freezing_a_layer_between_epochs_recaptures():
    eager, graphed = fit_both(lambda: models.Regressor("sgd", None), extra_callbacks=lambda: [FreezeFirstLayerAtEpoch1()])
    assert_same(eager, graphed)
    # epoch 1: the full batches' graph; epoch 2: captured again after the freeze, and the ragged batch's
    assert graphed.callback.stats.captures == 3, graphed.callback.stats.summary()


def test_backbone_unfrozen_before_the_first_capture_is_stepped_eagerly_first():
    # 3 batches an epoch: warm-up fills epoch 0, the unfreeze comes before any capture
    from lightning.pytorch.callbacks import BackboneFinetuning

    eager, graphed = fit_both(
        lambda: models.WithBackbone("adamw", None), max_epochs=3,
        train_loader=lambda: loader(regression_data(n=24)),
        extra_callbacks=lambda: [BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False)],
    )
    assert_same(eager, graphed)
    graphs_used(graphed)


def test_backbone_finetuning_adding_a_param_group_recaptures():
    from lightning.pytorch.callbacks import BackboneFinetuning

    eager, graphed = fit_both(
        lambda: models.WithBackbone("adamw", None),
        extra_callbacks=lambda: [BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False)],
    )
    assert_same(eager, graphed)
    # epoch 1: the full batches' graph; epoch 2: captured again for the new group, and the ragged batch's
    assert graphed.callback.stats.captures == 3, graphed.callback.stats.summary()
    assert len(graphed.trainer.optimizers[0].param_groups) == 2


def test_teardown_restores_optimizer_and_loop_and_a_second_fit_works():
    graphed = fit(lambda: models.Regressor("adamw", None), graphed=True)
    trainer, module = graphed.trainer, graphed.module
    loop = trainer.fit_loop.epoch_loop.automatic_optimization
    assert "run" not in loop.__dict__
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["capturable"] is False
    assert isinstance(optimizer.param_groups[0]["lr"], float)
    assert all(s["step"].device.type == "cpu" for s in optimizer.state.values())
    # fit again on the same trainer, two more epochs
    trainer.fit_loop.max_epochs = 4
    trainer.fit(module, train_dataloaders=loader())
    assert trainer.global_step == 4 * 9
    assert graphed.callback.stats.replays > 0


class FailAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("stop here")


def test_a_failed_fit_cleans_up():
    import lightning.pytorch as pl

    callback = CUDAGraphCallback()
    module = models.Regressor("adamw", None)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[FailAt(6), callback])
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.fit(module, train_dataloaders=loader())
    assert callback.stats.replays > 0
    assert "run" not in trainer.fit_loop.epoch_loop.automatic_optimization.__dict__
    assert trainer.optimizers[0].param_groups[0]["capturable"] is False


def test_resuming_from_a_checkpoint_saved_while_graphed(tmp_path):
    make = lambda: models.Regressor("adamw", "lambda", epochs=4)  # noqa: E731
    straight = fit(make, graphed=True, max_epochs=4)
    first = fit(make, graphed=True, max_epochs=2)
    path = tmp_path / "mid.ckpt"
    first.trainer.save_checkpoint(path)
    resumed = fit(make, graphed=True, max_epochs=4, ckpt_path=str(path))
    for name in straight.state:
        torch.testing.assert_close(resumed.state[name], straight.state[name], rtol=1e-6, atol=1e-6)
    assert resumed.global_step == straight.global_step


# -- the framework-free core in a plain PyTorch loop ----------------------------------------------


def test_graphed_step_in_a_plain_loop_matches_eager():
    from lightning_graphs import GraphedStep

    def train(graphed):
        torch.manual_seed(0)
        model = models.mlp(dropout=0.1).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=40)
        data = regression_data(n=8 * 40 + 5)
        batches = [(x.cuda(), y.cuda()) for x, y in loader(data)]

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        runner = GraphedStep(step, optimizers=[opt], modules=[model]) if graphed else step
        losses = []
        for x, y in batches[:40]:
            losses.append(runner(x, y))
            sched.step()
        if graphed:
            assert runner.stats.replays == 40 - 4, runner.stats.summary()
            runner.close()
        return torch.stack(losses).cpu(), {k: v.cpu() for k, v in model.state_dict().items()}

    eager_losses, eager_state = train(False)
    graphed_losses, graphed_state = train(True)
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-6, atol=1e-6)
    for name in eager_state:
        torch.testing.assert_close(graphed_state[name], eager_state[name], rtol=1e-6, atol=1e-6)


# -- physics-informed training: input derivatives and a double backward inside the graph ----------


class HeatPINN(pl.LightningModule):
    """The PDE residual needs derivatives with respect to the batch, made to require
    grad inside ``training_step`` as users write it."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                                       torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        from benchmarks.workloads import heat_residual_loss

        loss = heat_residual_loss(self.net, batch)
        self.log("residual_loss", loss, on_epoch=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=3e-3)
        return [optimizer], [torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99)]


def _collocation_batches():
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(64, 2, generator=generator), torch.rand(16, 1, generator=generator),
             torch.rand(16, 1, generator=generator)) for _ in range(10)]


def test_pinn_with_input_gradients_and_double_backward():
    eager, graphed = fit_both(HeatPINN, train_loader=lambda: torch.utils.data.DataLoader(_collocation_batches(), batch_size=None),
                          max_epochs=3)
    assert_same(eager, graphed, rtol=1e-5, atol=1e-6)
    graphs_used(graphed)


def test_graphed_step_holds_a_graph_per_shape_and_evicts_the_least_recent():
    from lightning_graphs import GraphedStep

    def train(graphed, max_graphs=2):
        torch.manual_seed(0)
        model = models.mlp().cuda()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        sizes = [8, 8, 8, 5, 8, 8, 5, 8, 3, 8, 5, 3, 8, 5] * 3
        batches = [(torch.randn(n, 8, generator=generator).cuda(), torch.randn(n, 1, generator=generator).cuda())
                   for n in sizes]

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        runner = GraphedStep(step, optimizers=[opt], modules=[model], max_graphs=max_graphs) if graphed else step
        losses = torch.stack([runner(x, y) for x, y in batches]).cpu()
        stats = runner.stats if graphed else None
        if graphed:
            runner.close()
        return losses, {k: v.cpu() for k, v in model.state_dict().items()}, stats

    eager_losses, eager_state, _ = train(False)
    for max_graphs in (1, 2, 3):
        losses, state, stats = train(True, max_graphs)
        torch.testing.assert_close(losses, eager_losses, rtol=1e-6, atol=1e-6)
        for name in eager_state:
            torch.testing.assert_close(state[name], eager_state[name], rtol=1e-6, atol=1e-6)
        assert stats.most_graphs_held == max_graphs, stats.summary()
        assert (stats.evictions > 0) == (max_graphs == 2), stats.summary()


# -- introspection --------------------------------------------------------------------------------


def test_stats_reach_the_logger_when_asked_and_nvtx_ranges_do_not_change_training():
    eager = fit(lambda: models.Regressor("adamw", "lambda"), graphed=False)
    graphed = fit(lambda: models.Regressor("adamw", "lambda"), graphed=True,
                  callback_kwargs={"log_stats": True, "nvtx": True})
    stats = graphed.callback.stats
    final = graphed.logger.records[-1][1]
    assert final["cuda_graphs/replays"] == stats.replays > 0
    assert final["cuda_graphs/captures"] == stats.captures
    assert final["cuda_graphs/graph_memory_mib"] > 0
    # everything before the stats record is what eager training logged
    graphed.logger.records.pop()
    assert_same(eager, graphed)
