"""Evaluation graphs (``graph_evaluation=True``) without a GPU: CUDA's graph API is stood in
for, so that the callback's plumbing runs on CPU.

A stand-in graph replays nothing, so a replayed step returns (and logs) what its
capture computed. The loaders here hold the same batch over and over, which makes
that the value eager evaluation computes too: logged metrics and predictions can
then be compared with eager ones. The numbers of real replays are the GPU tests'
business (``test_eval_graphs_gpu.py``).
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

import models
from lightning_graphs import CUDAGraphCallback, GraphedStep, GraphWarning
from lightning_graphs import _lightning as internals
from lightning_graphs.batches import StaticBatch, signature_of
from lightning_graphs.graphed_step import Action, Phase
from parity import MemoryLogger, assert_same_metric_snapshots, loader, regression_data
from test_first_capture_cpu import _drive

STEPS = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}


@pytest.fixture
def cuda_on_cpu(graph_api_on_cpu, monkeypatch):
    """The callback believes the model is on CUDA; graphed steps take the CPU for a CUDA device."""
    monkeypatch.setattr(CUDAGraphCallback, "_on_cuda", staticmethod(lambda module: True))

    def find_device(self, signature):
        self._device = torch.device("cuda")
        return True

    monkeypatch.setattr(GraphedStep, "_find_device", find_device)


def same_batches(batches: int = 8, batch_size: int = 8, ragged: int = 0) -> DataLoader:
    """A loader whose full batches are all the same batch (and an optional ragged last one)."""
    x, y = regression_data(n=batch_size, seed=3).tensors
    x, y = x.repeat(batches, 1), y.repeat(batches, 1)
    if ragged:
        x, y = torch.cat([x, x[:ragged]]), torch.cat([y, y[:ragged]])
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class Spy(Callback):
    """Notes, inside the loops, whether the strategy's steps were stood in for."""

    def __init__(self) -> None:
        self.patched: dict[str, list[bool]] = {"train": [], "validation": [], "test": [], "predict": []}
        self.sanity_stats = None
        self.outputs: list = []

    def _note(self, stage, trainer):
        self.patched[stage].append(any(hook in trainer.strategy.__dict__ for hook in STEPS.values()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._note("train", trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._note("validation", trainer)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._note("test", trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._note("predict", trainer)
        self.outputs.append(outputs)

    def on_sanity_check_end(self, trainer, pl_module):
        callback = next(c for c in trainer.callbacks if isinstance(c, CUDAGraphCallback))
        self.sanity_stats = callback.evaluation_stats.get("validation")


def _trainer(callbacks, **kwargs):
    options = dict(accelerator="cpu", max_epochs=1, logger=MemoryLogger(), log_every_n_steps=1,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def _run(stage, make_module, loaders, callback=None, **kwargs):
    """``trainer.validate``/``test``/``predict`` on a fresh seeded module; (result, trainer, spy, warnings)."""
    pl.seed_everything(0, verbose=False)
    module = make_module()
    spy = Spy()
    trainer = _trainer([spy] + ([callback] if callback else []), **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GraphWarning)
        result = getattr(trainer, stage)(module, dataloaders=loaders())
    graph_warnings = [str(w.message) for w in caught if issubclass(w.category, GraphWarning)]
    return result, trainer, spy, graph_warnings


def _assert_strategy_restored(trainer):
    assert not any(hook in trainer.strategy.__dict__ for hook in STEPS.values())


# -- opt-in ----------------------------------------------------------------------------------------


def test_evaluation_is_not_graphed_by_default(cuda_on_cpu):
    callback = CUDAGraphCallback()
    assert callback.graph_evaluation is False
    eager, _, _, _ = _run("validate", models.Evaluated, same_batches)
    result, trainer, spy, graph_warnings = _run("validate", models.Evaluated, same_batches, callback)
    assert result == eager
    assert spy.patched["validation"] and not any(spy.patched["validation"])
    assert callback.evaluation_stats == {} and graph_warnings == []
    _assert_strategy_restored(trainer)


def test_on_cpu_evaluation_graphs_warn_once_and_change_nothing():
    callback = CUDAGraphCallback(graph_evaluation=True)
    eager, _, _, _ = _run("validate", models.Evaluated, lambda: loader(regression_data(n=37)))
    result, trainer, spy, graph_warnings = _run(
        "validate", models.Evaluated, lambda: loader(regression_data(n=37)), callback
    )
    assert result == eager
    assert len(graph_warnings) == 1 and "CUDA" in graph_warnings[0] and "Validation" in graph_warnings[0]
    assert not any(spy.patched["validation"]) and callback.evaluation_stats == {}


# -- standalone validate, test, predict --------------------------------------------------------------


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_standalone_evaluation_is_replayed_and_logs_as_eager(cuda_on_cpu, stage):
    eager, _, _, _ = _run(stage, models.Evaluated, same_batches)
    callback = CUDAGraphCallback(graph_evaluation=True)
    result, trainer, spy, graph_warnings = _run(stage, models.Evaluated, same_batches, callback)
    assert graph_warnings == []
    assert result[0].keys() == eager[0].keys()
    for key in eager[0]:
        assert result[0][key] == pytest.approx(eager[0][key], rel=1e-6), key
    assert all(spy.patched["validation" if stage == "validate" else "test"])
    name = "validation" if stage == "validate" else "test"
    stats = callback.evaluation_stats[name]
    # two eager warm-up calls, the capture, then replays
    assert (stats.warmup_steps, stats.captures, stats.replays, stats.eager_steps) == (2, 1, 5, 0), stats.summary()
    _assert_strategy_restored(trainer)


def test_predictions_equal_eager_and_are_each_a_tensor_of_their_own(cuda_on_cpu):
    loaders = lambda: same_batches(ragged=3)  # noqa: E731
    eager, _, _, _ = _run("predict", models.Evaluated, loaders)
    callback = CUDAGraphCallback(graph_evaluation=True)
    predictions, trainer, spy, _ = _run("predict", models.Evaluated, loaders, callback)
    assert len(predictions) == len(eager) == 9
    for got, want in zip(predictions, eager):
        torch.testing.assert_close(got, want)
    kept = spy.outputs  # as the step returned them, before Lightning moves them anywhere
    assert len({t.untyped_storage().data_ptr() for t in kept}) == len(kept)
    stats = callback.evaluation_stats["predict"]
    # the full batches: two warm-ups, the capture, 5 replays; the ragged last one: its own warm-up
    assert (stats.warmup_steps, stats.captures, stats.replays) == (3, 1, 5), stats.summary()
    _assert_strategy_restored(trainer)


def test_two_dataloaders_get_a_graphed_step_each(cuda_on_cpu):
    loaders = lambda: [same_batches(4), same_batches(5)]  # noqa: E731
    eager, _, _, _ = _run("validate", models.TwoValidationLoaders, loaders)
    callback = CUDAGraphCallback(graph_evaluation=True)
    result, _, _, _ = _run("validate", models.TwoValidationLoaders, loaders, callback)
    assert [sorted(r) for r in result] == [sorted(r) for r in eager] == [["val_loss/dataloader_idx_0"],
                                                                       ["val_loss/dataloader_idx_1"]]
    for got, want in zip(result, eager):
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6)
    stats = callback.evaluation_stats["validation"]
    assert (stats.warmup_steps, stats.captures, stats.replays) == (4, 2, 3), stats.summary()


# -- what a replay cannot repeat -------------------------------------------------------------------------


def test_a_validation_step_appending_to_a_list_runs_eagerly_with_one_warning(cuda_on_cpu):
    _, _, _, _ = _run("validate", models.CollectsValidationOutputs, same_batches)
    callback = CUDAGraphCallback(graph_evaluation=True)
    pl.seed_everything(0, verbose=False)
    module = models.CollectsValidationOutputs()
    trainer = _trainer([callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GraphWarning)
        trainer.validate(module, dataloaders=same_batches())
        trainer.validate(module, dataloaders=same_batches())
    graph_warnings = [str(w.message) for w in caught if issubclass(w.category, GraphWarning)]
    assert module.collected == [8, 8]  # every batch's output, in both runs
    assert len(graph_warnings) == 2, graph_warnings  # once per run
    assert "the validation step grows `self.val_losses`" in graph_warnings[0]
    assert "on_validation_batch_end" in graph_warnings[0] and "Validation continues eagerly" in graph_warnings[0]
    stats = callback.evaluation_stats["validation"]
    # found in the second warm-up call, before any capture
    assert stats.disabled_reason is not None and stats.captures == 0, stats.summary()


def test_reading_batch_idx_in_the_validation_step_runs_eagerly(cuda_on_cpu):
    callback = CUDAGraphCallback(graph_evaluation=True)
    _, _, _, graph_warnings = _run("validate", models.ReadsBatchIdxInValidation, same_batches, callback)
    assert len(graph_warnings) == 1 and "the validation step reads `batch_idx`" in graph_warnings[0]
    assert callback.evaluation_stats["validation"].replays == 0


def test_strict_raises_for_a_validation_step_that_cannot_be_graphed(cuda_on_cpu):
    from lightning_graphs import GraphCaptureError

    callback = CUDAGraphCallback(graph_evaluation=True, strict=True)
    module = models.CollectsValidationOutputs()
    trainer = _trainer([callback])
    with pytest.raises(GraphCaptureError, match="val_losses"):
        trainer.validate(module, dataloaders=same_batches())
    _assert_strategy_restored(trainer)


# -- clean exit --------------------------------------------------------------------------------------------


class FailsAtBatch(Callback):
    def __init__(self, batch_idx):
        self.batch_idx = batch_idx

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.batch_idx:
            raise RuntimeError("stop here")


def test_the_strategy_gets_its_steps_back_when_evaluation_raises(cuda_on_cpu):
    callback = CUDAGraphCallback(graph_evaluation=True)
    trainer = _trainer([FailsAtBatch(4), callback])
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.validate(models.Evaluated(), dataloaders=same_batches())
    _assert_strategy_restored(trainer)
    assert callback.evaluation_stats["validation"].replays == 2
    # and the trainer evaluates normally afterwards
    trainer.test(models.Evaluated(), dataloaders=same_batches())
    _assert_strategy_restored(trainer)
    assert callback.evaluation_stats["test"].replays == 5


def test_during_fit_validation_is_patched_only_while_it_runs_and_shares_the_pool(cuda_on_cpu):
    class Pools(Callback):
        def on_validation_end(self, trainer, pl_module):
            graphs = next(c for c in trainer.callbacks if isinstance(c, CUDAGraphCallback))
            if graphs._engine is not None:
                evaluation = graphs._evaluation["validation"].engines[None]
                self.same = graphs._engine._given_pool is evaluation._given_pool is graphs._pool

    callback, pools = CUDAGraphCallback(graph_evaluation=True), Pools()
    spy = Spy()
    trainer = _trainer([spy, pools, callback], max_epochs=1, num_sanity_val_steps=2, val_check_interval=2)
    trainer.fit(models.Evaluated("sgd", None), train_dataloaders=same_batches(8),
                val_dataloaders=same_batches(4))
    assert spy.patched["train"] and not any(spy.patched["train"])
    assert len(spy.patched["validation"]) == 2 + 4 * 4 and all(spy.patched["validation"])
    # the sanity check only warms up
    assert (spy.sanity_stats.warmup_steps, spy.sanity_stats.captures) == (2, 0), spy.sanity_stats.summary()
    assert pools.same
    stats = callback.evaluation_stats["validation"]
    # validation after batch 2 captures; the training step's capture at batch 4 retires that
    # graph (it shares the pool), so the validation after batch 4 captures again
    assert callback.stats.captures == 1, callback.stats.summary()
    assert (stats.captures, stats.replays, stats.eager_steps) == (2, 14, 0), stats.summary()
    _assert_strategy_restored(trainer)


# -- the pieces --------------------------------------------------------------------------------------------


def test_evaluation_call_tells_the_arguments_apart():
    module = models.TwoValidationLoaders()
    call = internals.evaluation_call(module, "validation_step", ("batch", 3, 1), {})
    assert (call.batch, call.batch_idx, call.dataloader_idx) == ("batch", 3, 1)
    assert call.with_batch("static", 7) == ("static", 7, 1)
    call = internals.evaluation_call(module, "validation_step", ("batch", 3), {})
    assert (call.batch_idx, call.dataloader_idx) == (3, None)

    class BatchOnly(models.Regressor):
        def validation_step(self, batch):
            pass

    call = internals.evaluation_call(BatchOnly(), "validation_step", ("batch",), {})
    assert (call.batch, call.batch_idx, call.dataloader_idx) == ("batch", None, None)
    assert call.with_batch("static", None) == ("static",)
    assert internals.evaluation_call(module, "validation_step", (), {"batch": 1}) is None


def test_strategy_step_patch_restores_what_was_there():
    trainer = _trainer([])
    strategy = trainer.strategy
    patch = internals.StrategyStepPatch(trainer, "validation_step", lambda *a: "stand-in")
    assert strategy.validation_step() == "stand-in"
    assert patch.original.__func__ is type(strategy).validation_step
    patch.remove()
    patch.remove()
    assert "validation_step" not in strategy.__dict__
    mine = lambda *a: "someone else's"  # noqa: E731
    strategy.test_step = mine
    patch = internals.StrategyStepPatch(trainer, "test_step", lambda *a: "stand-in")
    patch.remove()
    assert strategy.test_step is mine


def test_graphed_step_captures_into_the_pool_it_is_given(graph_api_on_cpu, monkeypatch):  # noqa: F811
    pools = []

    class RecordsPool:
        def capture_begin(self, pool=None, capture_error_mode=None):
            pools.append(pool)

        def capture_end(self):
            pass

        def replay(self):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", RecordsPool)
    model = torch.nn.Linear(3, 1)
    step = GraphedStep(None, warmup_steps=1, modules=[model], device="cuda", pool=("shared", 7))
    assert _drive(step, lambda x: model(x), 3) == "WCR"
    step.retire_graphs()  # its signature is warmed up: captured again straight away
    assert _drive(step, lambda x: model(x), 2) == "CR"
    assert pools == [("shared", 7), ("shared", 7)]
    assert step.phase is Phase.CAPTURED


def test_static_batches_are_made_like_the_batch_under_inference_mode():
    # inference tensors, as the batch's are: a compiled step's guards check it
    with torch.inference_mode():
        batch = (torch.randn(4, 3), {"y": torch.randn(4)})
        static = StaticBatch(signature_of(batch))
        assert all(t.is_inference() for t in static.tensors)
        later = (torch.randn(4, 3), {"y": torch.randn(4)})
        static.copy_from(signature_of(later))  # inside inference mode
    torch.testing.assert_close(static.value[0], later[0])
    static.copy_from(signature_of(batch))  # and outside it
    torch.testing.assert_close(static.value[1]["y"], batch[1]["y"])
    assert signature_of(batch) != signature_of((torch.randn(4, 3), {"y": torch.randn(4)}))


def test_capture_and_replay_under_inference_mode(graph_api_on_cpu):  # noqa: F811
    model = torch.nn.Linear(3, 1)
    step = GraphedStep(None, warmup_steps=1, modules=[model.eval()], device="cuda")
    with torch.inference_mode():
        actions = _drive(step, lambda x: model(x), 3)
        plan = step.plan((torch.ones(8, 3),))
    assert actions == "WCR" and plan.action is Action.REPLAY


def _validation_runs(replay, runs=2, sizes=(4, 4, 2)):
    """Feed captured validation-step log calls to Lightning over a few validation runs with a
    ragged last batch; the epoch metrics and callback metrics after each run."""
    from lightning.pytorch.trainer.states import TrainerFn

    module = models.Regressor("adamw", None)
    trainer = _trainer([], logger=False)
    module.trainer = trainer
    trainer.state.fn = TrainerFn.VALIDATING
    trainer.validating = True
    module._current_fx_name = None
    connector = trainer._logger_connector
    value = torch.zeros(())
    calls = [
        internals.LogCall("validation_step", "val_loss", value, {"prog_bar": True}),
        internals.LogCall("validation_step", "val_max", value, {"reduce_fx": "max"}),
        internals.LogCall("validation_step", "val_both", value, {"on_step": True, "on_epoch": True}),
    ]
    feed = replay(module, calls)
    seen = []
    for run in range(runs):
        for index, size in enumerate(sizes):
            connector.on_batch_start(torch.ones(size, 2))
            value.fill_(run * 10 + index + 0.5)  # the replay refreshed the graph's output
            feed()
            connector.update_eval_step_metrics(index)
            connector.on_batch_end()
        connector.epoch_end_reached()
        connector.on_epoch_end()
        seen.append(dict(connector.update_eval_epoch_metrics()))
        seen.append({k: v.clone() for k, v in connector.callback_metrics.items()})
        connector.reset_results()
    return seen


def test_direct_log_replay_in_validation_equals_logging_each_call():
    through_log = _validation_runs(lambda module, calls: lambda: internals.replay_logs(module, calls))
    direct = _validation_runs(internals.LogReplayer)
    assert_same_metric_snapshots(direct, through_log)
    # batch-size-weighted mean over the run, the ragged batch weighing less
    assert float(direct[0]["val_loss"]) == pytest.approx((0.5 * 4 + 1.5 * 4 + 2.5 * 2) / 10)
    assert float(direct[2]["val_max"]) == 12.5


class FailsWhenValidationIsCaptured(models.Evaluated):
    """A validation step whose capture fails (as a host read does on a GPU)."""

    capturing = False

    def validation_step(self, batch, batch_idx):
        if FailsWhenValidationIsCaptured.capturing:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return super().validation_step(batch, batch_idx)


def test_a_failed_validation_capture_leaves_training_graphed_in_a_fresh_pool(cuda_on_cpu, monkeypatch):
    from graph_api_stand_ins import StandInGraph

    from lightning_graphs import graphed_step

    def capture_begin(self, pool=None, capture_error_mode=None):
        FailsWhenValidationIsCaptured.capturing = True

    def capture_end(self):
        FailsWhenValidationIsCaptured.capturing = False

    monkeypatch.setattr(StandInGraph, "capture_begin", capture_begin)
    monkeypatch.setattr(StandInGraph, "capture_end", capture_end)
    # the CUDA generator a real failed capture releases does not exist here
    monkeypatch.setattr(graphed_step, "_release_generator_after_failed_capture", lambda device: None)
    callback = CUDAGraphCallback(graph_evaluation=True)
    trainer = _trainer([callback], max_epochs=3, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GraphWarning)
        trainer.fit(FailsWhenValidationIsCaptured("sgd", None), train_dataloaders=same_batches(8),
                    val_dataloaders=same_batches(4))
    failed = [str(w.message) for w in caught if "Could not capture" in str(w.message)]
    assert len(failed) == 1 and "validation step" in failed[0], failed
    stats = callback.stats
    # the training graph lived in the pool the failed capture left behind: captured again in a fresh one
    assert stats.disabled_reason is None and stats.captures == 2, stats.summary()
    assert stats.replays == 3 * 8 - stats.warmup_steps - stats.captures, stats.summary()
    assert callback.evaluation_stats["validation"].disabled_reason is not None
