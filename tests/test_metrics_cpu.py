"""torchmetrics metrics updated inside a graphed step (lightning_graphs.metrics), on CPU.

Which metrics can be graphed and why not, the states bound to the tensors a graph
reads (after a forward, an eager step or a reset), the host's bookkeeping after a
replay, and the callback's decisions with CUDA's graph API stood in for; and,
with a stand-in graph that replays what it captured (``replaying_graph.py``),
every logged value, state and count against eager training. The GPU tests
(``test_callback_gpu.py``, ``test_eval_graphs_gpu.py``) do the same with real
CUDA graphs.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from torchmetrics.classification import BinaryAccuracy, BinaryPrecision

import models
from lightning_graphs import CUDAGraphCallback, GraphWarning
from lightning_graphs.metrics import InStepMetrics, why_not_graphed
from test_eval_graphs_cpu import cuda_on_cpu, same_batches  # noqa: F401  (a fixture)


class MeanReducedInForward(torchmetrics.Metric):
    """A state reduced with "mean" in a single-update forward."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("level", torch.tensor(0.0), dist_reduce_fx="mean")

    def update(self, x):
        self.level += x.mean()

    def compute(self):
        return self.level


@pytest.mark.parametrize("metric, needle", [
    (torchmetrics.MeanSquaredError(), None),
    (torchmetrics.PearsonCorrCoef(), None),  # full_state_update: two updates per forward
    (torchmetrics.MeanMetric(nan_strategy="disable"), None),
    (BinaryAccuracy(validate_args=False), None),
    (torchmetrics.SpearmanCorrCoef(), "list states (`preds`, `target`)"),
    (torchmetrics.MeanMetric(), 'pass `nan_strategy="disable"`'),
    (BinaryAccuracy(), "pass `validate_args=False`"),
    (torchmetrics.MeanSquaredError(dist_sync_on_step=True), "dist_sync_on_step=True"),
    (torchmetrics.MeanSquaredError(compute_on_cpu=True), "compute_on_cpu=True"),
    (MeanReducedInForward(), "reduces state `level` with `dim_zero_mean`"),
])
def test_which_metrics_can_be_graphed(metric, needle):
    reason = why_not_graphed(metric)
    assert (reason is None) if needle is None else (needle in reason), reason


class Holder(torch.nn.Module):
    def __init__(self, metric):
        super().__init__()
        self.metric = metric


def test_metrics_the_step_does_not_touch_are_left_alone():
    touched, untouched = torchmetrics.MeanSquaredError(), torchmetrics.MeanAbsoluteError()
    metrics = InStepMetrics([Holder(touched), Holder(untouched)])
    before = metrics.before_capture()
    touched(torch.ones(2), torch.zeros(2))
    metrics.end_of_step(before)
    updates, _ = metrics.after_capture(before)
    assert [u.metric for u in updates] == [touched]
    untouched.reset()  # rebinds its states: not the graph's business
    kept = untouched.total
    metrics.bring_home()
    assert untouched.total is kept


def test_states_go_back_where_the_graph_reads_them():
    metric = torchmetrics.MeanSquaredError()
    metrics = InStepMetrics([Holder(metric)])
    pred, target = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    metric(pred, target)  # an eager step first
    before = metrics.before_capture()
    home = metric.sum_squared_error
    batch_value = metric(pred, target)  # forward rebinds the states to new tensors
    assert metric.sum_squared_error is not home
    assert metrics.end_of_step(before) is None
    assert metric.sum_squared_error is home and float(home) == 10.0  # copied in (by the graph, on a GPU)
    updates, problem = metrics.after_capture(before)
    assert problem is None and [u.count for u in updates] == [1]
    assert metric._update_count == 2  # the capture ran the step's Python once: not counted again
    assert torch.equal(metric._forward_cache, batch_value) and metric._forward_cache is not batch_value

    metric.reset()  # as Lightning does at the end of an epoch: new tensors, zero count
    assert metric.sum_squared_error is not home
    assert metrics.stale_reason() is None
    metrics.bring_home()  # before the next replay
    assert metric.sum_squared_error is home and float(home) == 0.0
    metric.compute()  # cached until the next update
    assert metric._computed is not None
    InStepMetrics.after_replay(updates)
    assert metric._update_count == 1 and metric._computed is None
    assert torch.equal(metric._forward_cache, batch_value)


def test_a_capture_given_up_leaves_the_metric_as_before_it():
    metric = torchmetrics.MeanSquaredError()
    metrics = InStepMetrics([Holder(metric)])
    metric(torch.tensor([1.0]), torch.tensor([0.0]))
    states, count, cache = metric.sum_squared_error, metric._update_count, metric._forward_cache
    before = metrics.before_capture()
    metric(torch.tensor([3.0]), torch.tensor([0.0]))  # on a GPU: recorded, not run; then the step fails
    metrics.abandon(before)
    assert metric.sum_squared_error is states and float(states) == 1.0
    assert metric._update_count == count and metric._forward_cache is cache
    assert metrics.bring_home() is None and metric.sum_squared_error is states  # no home kept
    # failing after the step (the capture's end): the same, also for the metric it touched
    before = metrics.before_capture()
    metric(torch.tensor([3.0]), torch.tensor([0.0]))
    metrics.end_of_step(before)
    metrics.abandon(before)
    assert metric.sum_squared_error is states and metric._update_count == count
    metric(torch.tensor([3.0]), torch.tensor([0.0]))  # eagerly
    assert metrics.bring_home() is None and metric.sum_squared_error is not states


def test_homes_made_under_inference_mode_take_states_outside_it():
    metric = torchmetrics.MeanSquaredError()
    metrics = InStepMetrics([Holder(metric)])
    with torch.inference_mode():  # an evaluation loop
        metric.reset()
        before = metrics.before_capture()
        metric(torch.tensor([2.0]), torch.tensor([0.0]))
        metrics.end_of_step(before)
    metric.reset()  # outside inference mode
    metrics.bring_home()
    assert metric.sum_squared_error.is_inference() and float(metric.sum_squared_error) == 0.0


def test_a_state_of_another_shape_makes_the_graphs_stale():
    metric = torchmetrics.MeanSquaredError()
    metrics = InStepMetrics([Holder(metric)])
    before = metrics.before_capture()
    metric(torch.ones(2), torch.zeros(2))
    metrics.end_of_step(before)
    metric.total = torch.zeros(3, dtype=torch.long)
    assert "state `total` of the torchmetrics MeanSquaredError changed its shape" in metrics.stale_reason()


def test_a_step_resetting_its_metric_is_not_replayed():
    metric = torchmetrics.MeanSquaredError()
    metrics = InStepMetrics([Holder(metric)])
    metric(torch.ones(2), torch.zeros(2))
    before = metrics.before_capture()
    metric.reset()
    metrics.end_of_step(before)
    _, problem = metrics.after_capture(before)
    assert "resets the torchmetrics MeanSquaredError" in problem


def test_metrics_sharing_states_in_a_collection_are_named():
    collection = torchmetrics.MetricCollection(
        [BinaryAccuracy(validate_args=False), BinaryPrecision(validate_args=False)]
    )
    metrics = InStepMetrics([collection])
    counts = metrics.counts()
    collection.update(torch.tensor([0.2, 0.9]), torch.tensor([0, 1]))
    problem = metrics.unsupported_update(counts, "the training step", "on_train_batch_end")
    assert "MetricCollection (compute groups)" in problem and "compute_groups=False" in problem
    separate = torchmetrics.MetricCollection(
        [BinaryAccuracy(validate_args=False), BinaryPrecision(validate_args=False)], compute_groups=False
    )
    metrics = InStepMetrics([separate])
    counts = metrics.counts()
    separate.update(torch.tensor([0.2, 0.9]), torch.tensor([0, 1]))
    assert metrics.unsupported_update(counts, "the training step", "on_train_batch_end") is None



def test_a_collection_called_only_as_forward_shares_nothing_until_an_update_groups_it():
    collection = torchmetrics.MetricCollection(
        [BinaryAccuracy(validate_args=False), BinaryPrecision(validate_args=False)]  # default compute groups
    )
    metrics = InStepMetrics([collection])
    metrics.refresh()
    counts = metrics.counts()
    collection(torch.tensor([0.2, 0.9]), torch.tensor([0, 1]))  # forward forms no groups
    assert metrics.unsupported_update(counts, "the training step", "on_train_batch_end") is None
    assert metrics.stale_reason() is None
    collection.update(torch.tensor([0.2, 0.9]), torch.tensor([0, 1]))  # the first update() groups the two
    assert "formed compute groups" in metrics.stale_reason()


# -- through the callback, CUDA's graph API stood in for --------------------------------------------------


class MetricCounts(Callback):
    """Each metric's update count, the identity of its state tensors and what was
    logged, after every training batch."""

    def __init__(self):
        self.counts, self.logged_keys, self.state_ids, self.values = [], [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, torchmetrics.Metric)]
        self.counts.append({name: m._update_count for name, m in metrics})
        self.state_ids.append({(name, state): id(getattr(m, state)) for name, m in metrics for state in m._defaults})
        self.logged_keys.append(sorted(trainer.callback_metrics))
        self.values.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _fit(make_module, graphed):
    counts = MetricCounts()
    callback = CUDAGraphCallback() if graphed else None
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[counts] + ([callback] if callback else []))
    pl.seed_everything(0, verbose=False)
    module = make_module()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GraphWarning)
        trainer.fit(module, same_batches(ragged=3))
    return callback, counts, module, [str(w.message) for w in caught if issubclass(w.category, GraphWarning)]


@pytest.mark.parametrize("make_module", [
    lambda: models.UpdatesMetric("adamw", "lambda"),
    lambda: models.LogsMetricValues("adamw", "lambda"),
    lambda: models.UpdatesAccuracy("adamw", "lambda"),
])
def test_graphable_metrics_are_replayed_and_counted_as_eagerly(cuda_on_cpu, make_module):
    _, eager, _, _ = _fit(make_module, graphed=False)
    callback, graphed, module, warned = _fit(make_module, graphed=True)
    assert not warned, warned
    assert callback.stats.replays > 0 and callback.stats.disabled_reason is None, callback.stats.summary()
    assert graphed.counts == eager.counts  # update counts after every step, through resets at epoch ends
    assert graphed.logged_keys == eager.logged_keys
    # 9 batches an epoch; the ragged ninth warms up eagerly in the first epoch and is captured in the second.
    # From the second epoch on every step is replayed or captured, and every state stays in the tensor
    # the graphs update, also after the resets at each epoch's end (eagerly, forward rebinds them each step)
    assert all(ids == graphed.state_ids[9] for ids in graphed.state_ids[9:]), "states left the graphs' tensors"
    assert graphed.state_ids[4] == graphed.state_ids[9]  # the first epoch's replays: the same tensors


class FailsCaptureAfterItsMetric(models.UpdatesMetric):
    capturing = False

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")  # as a host read does
        return loss


def test_a_capture_failing_after_a_metric_ran_leaves_the_metric_as_eager(cuda_on_cpu, monkeypatch):
    from graph_api_stand_ins import StandInGraph

    from lightning_graphs import graphed_step

    monkeypatch.setattr(StandInGraph, "capture_begin", lambda self, pool=None, capture_error_mode=None: setattr(
        FailsCaptureAfterItsMetric, "capturing", True))
    monkeypatch.setattr(graphed_step, "_end_capture", lambda graph: setattr(
        FailsCaptureAfterItsMetric, "capturing", False))
    monkeypatch.setattr(graphed_step, "_release_generator_after_failed_capture", lambda device: None)
    _, eager, eager_module, _ = _fit(lambda: FailsCaptureAfterItsMetric("adamw", "lambda"), graphed=False)
    callback, graphed, module, warned = _fit(lambda: FailsCaptureAfterItsMetric("adamw", "lambda"), graphed=True)
    assert callback.stats.captures == 0 and len(warned) == 1, warned
    assert graphed.counts == eager.counts
    assert graphed.values == eager.values  # every step eager after the failed capture: exactly eager's


class ReplacesItsMetric(models.UpdatesMetric):
    def training_step(self, batch, batch_idx):
        # its value logged, not the object: Lightning finds a logged metric object by the attribute it had
        x, y = batch
        self.log("train_mse", self.train_mse(self(x), y))
        return torch.nn.functional.mse_loss(self(x), y)

    def on_train_epoch_start(self):
        self.train_mse = torchmetrics.MeanSquaredError().to(self.device)  # instead of reset()


def test_a_metric_replaced_between_epochs_is_captured_anew(cuda_on_cpu):
    _, eager, _, _ = _fit(lambda: ReplacesItsMetric("adamw", "lambda"), graphed=False)
    callback, graphed, _, warned = _fit(lambda: ReplacesItsMetric("adamw", "lambda"), graphed=True)
    recaptures = callback.stats.recaptures
    assert sum(recaptures.values()) == 2 and "torchmetrics metric `" in str(recaptures), recaptures
    assert graphed.counts == eager.counts


@pytest.mark.parametrize("make_module, needle", [
    (lambda: models.UpdatesListMetric("adamw", "lambda"), "updates the torchmetrics SpearmanCorrCoef `train_spearman`"),
    (lambda: models.UpdatesAccuracy("adamw", "lambda", validate_args=True), "pass `validate_args=False`"),
])
def test_a_metric_that_cannot_be_graphed_trains_eagerly_naming_it(cuda_on_cpu, make_module, needle):
    _, eager, eager_module, _ = _fit(make_module, graphed=False)
    callback, graphed, module, warned = _fit(make_module, graphed=True)
    assert callback.stats.replays == 0
    assert len(warned) == 1 and needle in warned[0], warned
    assert graphed.counts == eager.counts
    for (name, p), q in zip(module.named_parameters(), eager_module.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)  # fell back before any capture: eager exactly


# -- values, with a stand-in graph that replays what it captured ----------------------------------------------


@pytest.fixture
def replaying_cuda_on_cpu(cuda_on_cpu, monkeypatch):
    from replaying_graph import ReplayingGraph

    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)


def _metric_states(module):
    return {(name, state): getattr(m, state).clone() for name, m in module.named_modules()
            if isinstance(m, torchmetrics.Metric) for state in m._defaults}


@pytest.mark.parametrize("make_module", [
    lambda: models.UpdatesMetric("adamw", "lambda"),
    lambda: models.LogsMetricValues("adamw", "lambda"),
    # (not the classification metric: on the CPU torchmetrics decides on the host whether scores need a sigmoid)
])
def test_replayed_metrics_log_and_accumulate_as_eagerly(replaying_cuda_on_cpu, make_module):
    _, eager, eager_module, _ = _fit(make_module, graphed=False)
    callback, graphed, module, warned = _fit(make_module, graphed=True)
    assert not warned and callback.stats.replays > 0, (warned, callback.stats.summary())
    assert graphed.counts == eager.counts
    assert [sorted(v) for v in graphed.values] == [sorted(v) for v in eager.values]
    for step, (got, want) in enumerate(zip(graphed.values, eager.values)):
        for key in want:  # each step's logged values, epoch values included
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (step, key)
    states, eager_states = _metric_states(module), _metric_states(eager_module)
    for key, value in eager_states.items():
        torch.testing.assert_close(states[key], value, rtol=1e-5, atol=1e-6, msg=str(key))


def test_metrics_in_graphed_training_and_validation_steps(replaying_cuda_on_cpu):
    from parity import assert_same, fit, loader, regression_data

    def run(graphed):
        return fit(lambda: models.UpdatesMetricInValidation("adamw", "lambda", epochs=3), graphed=graphed,
                   accelerator="cpu", max_epochs=3, callback_kwargs={"graph_evaluation": True},
                   val_loader=lambda: loader(regression_data(n=37, seed=1)))

    eager, graphed = run(False), run(True)
    assert_same(eager, graphed)  # per-step and epoch values of both metrics, parameters
    assert not graphed.warnings, graphed.warnings
    assert graphed.callback.stats.replays > 0 and graphed.callback.evaluation_stats["validation"].replays > 0
    assert "val_mse" in graphed.final_metrics and "train_mse_epoch" in graphed.final_metrics
    states, eager_states = _metric_states(graphed.module), _metric_states(eager.module)
    for key, value in eager_states.items():
        torch.testing.assert_close(states[key], value, rtol=1e-5, atol=1e-6, msg=str(key))


class CollectionCalledInTheStep(models.Regressor):
    """A MetricCollection as tutorials write it: default compute groups, called, logged with log_dict."""

    def __init__(self):
        super().__init__("adamw", "lambda")
        self.train_metrics = torchmetrics.MetricCollection(
            [torchmetrics.MeanSquaredError(), torchmetrics.MeanAbsoluteError()], prefix="train_"
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        self.train_metrics(pred, y)
        self.log_dict(self.train_metrics, on_step=True, on_epoch=True)
        return torch.nn.functional.mse_loss(pred, y)


def test_a_collection_called_in_the_step_is_graphed(replaying_cuda_on_cpu):
    from parity import assert_same, fit

    eager, graphed = (fit(CollectionCalledInTheStep, graphed=g, accelerator="cpu") for g in (False, True))
    assert_same(eager, graphed)
    assert not graphed.warnings, graphed.warnings
    assert graphed.callback.stats.replays > 0 and graphed.callback.stats.eager_steps == 0
    assert "train_MeanSquaredError_epoch" in graphed.final_metrics


class MetricUpdatedOutsideTheStep(models.Regressor):
    """A metric the step does not touch (one that could not be graphed), fed in a hook."""

    def __init__(self):
        super().__init__("adamw", None, epochs=4)
        self.accuracy = BinaryAccuracy()  # validate_args: not graphable, and not in the step

    def on_train_batch_end(self, outputs, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            self.accuracy.update(torch.sigmoid(self(x)).squeeze(1), (y.squeeze(1) > 0).long())

    def on_train_epoch_end(self):
        self.log("accuracy", self.accuracy.compute())
        self.accuracy.reset()


def test_a_metric_updated_outside_the_step_does_not_make_the_graphs_stale(replaying_cuda_on_cpu):
    from parity import assert_same, fit

    eager, graphed = (fit(MetricUpdatedOutsideTheStep, graphed=g, accelerator="cpu", max_epochs=4)
                      for g in (False, True))
    assert_same(eager, graphed)
    assert not graphed.warnings, graphed.warnings
    assert graphed.callback.stats.captures == 2, graphed.callback.stats.summary()  # a full and a ragged batch


class SumOfSquares(torchmetrics.Metric):
    """A metric of the user's own: its class is one whose reads the capture records."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")
        self.scale = 1.0

    def update(self, x):
        self.total = self.total + (x ** 2).sum() * self.scale
        self.count = self.count + x.numel()

    def compute(self):
        return self.total / self.count


class UpdatesItsOwnMetric(models.Regressor):
    def __init__(self):
        super().__init__("adamw", "lambda")
        self.squares = SumOfSquares()

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        self.squares(pred - y)
        self.log("squares", self.squares, on_step=True, on_epoch=True)
        return torch.nn.functional.mse_loss(pred, y)


def test_a_metric_of_the_users_own_class_is_graphed(replaying_cuda_on_cpu):
    from parity import assert_same, fit

    eager, graphed = (fit(UpdatesItsOwnMetric, graphed=g, accelerator="cpu", max_epochs=3) for g in (False, True))
    assert_same(eager, graphed)
    assert not graphed.warnings, graphed.warnings
    assert graphed.callback.stats.captures == 2 and graphed.callback.stats.eager_steps == 0, (
        graphed.callback.stats.summary())
