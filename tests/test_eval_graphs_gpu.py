"""Evaluation graphs (``CUDAGraphCallback(graph_evaluation=True)``) against eager evaluation, on a CUDA GPU.

Each test runs the same seeded module eagerly (no callback) and with graphed training
and evaluation, and compares what users observe: per-step training losses, logged
values (validation metrics in the logger records and ``trainer.callback_metrics``),
``ModelCheckpoint`` scores, step outputs and predictions, final parameters. Every
test also checks that evaluation graphs were replayed, so that agreement is not the
trivial agreement of two eager runs. Tolerances as in ``test_callback_gpu.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import models
from lightning_graphs import CUDAGraphCallback, GraphWarning
from parity import MemoryLogger, assert_same, fit, loader, regression_data

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("deterministic")]

STEP_HOOKS = ("validation_step", "test_step", "predict_step")


class KeepsEvaluation(Callback):
    """Keeps every evaluation step's outputs as returned (to catch aliasing of graph memory)
    and the callback metrics after every validation run (the sanity check excluded)."""

    def __init__(self) -> None:
        self.outputs: list[Any] = []
        self.after_validation: list[dict[str, float]] = []
        self.patched: list[bool] = []  # whether a step hook was stood in for, at each training batch
        self.sanity_stats = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.outputs.append(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.outputs.append(outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.outputs.append(outputs)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.after_validation.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.patched.append(any(hook in trainer.strategy.__dict__ for hook in STEP_HOOKS))

    def on_sanity_check_end(self, trainer, pl_module):
        graphs = [c for c in trainer.callbacks if isinstance(c, CUDAGraphCallback)]
        if graphs:
            self.sanity_stats = graphs[0].evaluation_stats.get("validation")


def keeper(run) -> KeepsEvaluation:
    return next(c for c in run.trainer.callbacks if isinstance(c, KeepsEvaluation))


def both(make_module, callback_kwargs=None, extra_callbacks=None, **kwargs):
    """The same fit eagerly (no callback) and with training and evaluation graphed."""
    extra = extra_callbacks or (lambda: [])
    make_extra = lambda: [KeepsEvaluation()] + extra()  # noqa: E731
    eager = fit(make_module, graphed=False, extra_callbacks=make_extra, **kwargs)
    graphed = fit(
        make_module, graphed=True, extra_callbacks=make_extra,
        callback_kwargs={"graph_evaluation": True, **(callback_kwargs or {})}, **kwargs,
    )
    return eager, graphed


def close(got, want, what, rtol=1e-6, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(got, dtype=torch.float64).cpu(), torch.as_tensor(want, dtype=torch.float64).cpu(),
        rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}",
    )


def _leaves(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _leaves(v)]
    return []


def assert_same_evaluation(eager_keeper: KeepsEvaluation, graphed_keeper: KeepsEvaluation) -> None:
    """Metrics after each validation run and every step output, as kept (not copied) when returned."""
    assert len(graphed_keeper.after_validation) == len(eager_keeper.after_validation)
    for index, (got, want) in enumerate(zip(graphed_keeper.after_validation, eager_keeper.after_validation)):
        assert sorted(got) == sorted(want), f"callback_metrics keys after validation run {index}"
        close([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], f"metrics after validation {index}")
    got, want = [_leaves(o) for o in graphed_keeper.outputs], [_leaves(o) for o in eager_keeper.outputs]
    assert [len(o) for o in got] == [len(o) for o in want], "step outputs"
    for index, (a, b) in enumerate(zip(got, want)):
        for x, y in zip(a, b):
            close(x, y, f"outputs of evaluation step {index}")


def evaluation_used(run, stage: str = "validation"):
    stats = run.callback.evaluation_stats[stage]
    assert stats.captures >= 1 and stats.replays > 0, stats.summary()
    assert stats.disabled_reason is None, stats.summary()
    return stats


def val_loader(n: int = 37, seed: int = 1):
    return lambda: loader(regression_data(n=n, seed=seed))


# -- during fit -------------------------------------------------------------------------------------


def test_validation_metrics_and_checkpoint_monitor_match_eager(tmp_path):
    dirs = iter([tmp_path / "eager", tmp_path / "graphed"])

    def checkpoint():
        return [ModelCheckpoint(dirpath=next(dirs), monitor="val_loss", save_top_k=1)]

    # 9 training batches (ragged 3) and 5 validation batches (ragged 5), validation
    # every 4 training batches: mid-epoch validation, and the ragged training batch's
    # capture in epoch 2 retires the validation graphs, which are captured again
    eager, graphed = both(
        lambda: models.Evaluated("adamw", "lambda", epochs=3),
        val_loader=val_loader(),
        extra_callbacks=checkpoint,
        enable_checkpointing=True,
        val_check_interval=4,
        max_epochs=3,
    )
    assert_same(eager, graphed)
    assert_same_evaluation(keeper(eager), keeper(graphed))
    assert "val_loss" in graphed.final_metrics and "val_max_error" in graphed.final_metrics
    stats = evaluation_used(graphed)
    assert stats.eager_steps == 0 and stats.most_graphs_held == 2, stats.summary()
    assert graphed.callback.stats.replays > 0, graphed.callback.stats.summary()
    best_eager, best_graphed = eager.trainer.checkpoint_callback, graphed.trainer.checkpoint_callback
    close(best_graphed.best_model_score, best_eager.best_model_score, "best_model_score")
    assert Path(best_graphed.best_model_path).name == Path(best_eager.best_model_path).name
    saved_eager = torch.load(best_eager.best_model_path, weights_only=False)["state_dict"]
    saved_graphed = torch.load(best_graphed.best_model_path, weights_only=False)["state_dict"]
    for name in saved_eager:
        close(saved_graphed[name], saved_eager[name], f"best checkpoint {name}")
    # outside validation the strategy's steps are Lightning's own
    assert keeper(graphed).patched and not any(keeper(graphed).patched)
    assert not any(hook in graphed.trainer.strategy.__dict__ for hook in STEP_HOOKS)


def test_mid_epoch_validation_with_sanity_check_batchnorm_and_dropout():
    # eval mode in the graph: dropout off, BatchNorm reading the running statistics that
    # the training graph updates in place
    eager, graphed = both(
        lambda: models.Evaluated("sgd", None, dropout=0.3, batchnorm=True),
        train_loader=lambda: loader(regression_data(n=64)),
        val_loader=val_loader(n=32),
        val_check_interval=3,
        num_sanity_val_steps=2,
    )
    assert_same(eager, graphed)
    assert_same_evaluation(keeper(eager), keeper(graphed))
    evaluation_used(graphed)
    sanity = keeper(graphed).sanity_stats
    assert sanity.captures == 0 and sanity.warmup_steps == 2, sanity.summary()  # the sanity check only warms up


@pytest.mark.parametrize("max_graphs", [2, 1])
def test_the_ragged_last_validation_batch(max_graphs):
    # no ragged training batch: the training step captures once, before the first validation
    eager, graphed = both(
        lambda: models.Evaluated("adamw", "lambda", epochs=3),
        train_loader=lambda: loader(regression_data(n=64)),
        val_loader=val_loader(n=37),
        max_epochs=3,
        callback_kwargs={"max_graphs": max_graphs},
    )
    assert_same(eager, graphed)
    assert_same_evaluation(keeper(eager), keeper(graphed))
    stats = evaluation_used(graphed)
    assert graphed.callback.stats.captures == 1, graphed.callback.stats.summary()
    summary = stats.summary()
    if max_graphs == 2:
        # run 1: W W C R, ragged W; run 2: R R R R, ragged C; run 3: R R R R, ragged R
        assert (stats.warmup_steps, stats.captures, stats.replays, stats.eager_steps) == (3, 2, 10, 0), summary
        assert not any("shape" in w for w in graphed.warnings), graphed.warnings
    else:
        # the ragged batch of each of the 3 runs runs eagerly, with one warning
        assert (stats.warmup_steps, stats.captures, stats.replays, stats.eager_steps) == (2, 1, 9, 3), summary
        assert sum("shape (5, 8)" in w for w in graphed.warnings) == 1, graphed.warnings


def test_two_validation_dataloaders():
    loaders = lambda: [loader(regression_data(n=32, seed=1)), loader(regression_data(n=24, seed=2))]  # noqa: E731
    eager, graphed = both(
        lambda: models.TwoValidationLoaders("adamw", "lambda"),
        train_loader=lambda: loader(regression_data(n=64)),
        val_loader=loaders,
    )
    assert_same(eager, graphed)
    assert_same_evaluation(keeper(eager), keeper(graphed))
    assert {"val_loss/dataloader_idx_0", "val_loss/dataloader_idx_1"} <= set(graphed.final_metrics)
    stats = evaluation_used(graphed)
    # a graphed step per dataloader; run 1: W W C R and W W C; run 2: all replayed
    assert (stats.warmup_steps, stats.captures, stats.replays, stats.eager_steps) == (4, 2, 8, 0), stats.summary()


def test_bf16_mixed_validation():
    eager, graphed = both(lambda: models.Evaluated("adamw", "lambda"), val_loader=val_loader(), precision="bf16-mixed")
    assert_same(eager, graphed, rtol=2e-2, atol=2e-3)
    evaluation_used(graphed)


def test_evaluation_is_eager_by_default():
    graphed = fit(lambda: models.Evaluated("adamw", "lambda"), graphed=True, val_loader=val_loader(),
                  extra_callbacks=lambda: [KeepsEvaluation()])
    assert graphed.callback.evaluation_stats == {}
    assert graphed.callback.stats.replays > 0
    assert not any(hook in graphed.trainer.strategy.__dict__ for hook in STEP_HOOKS)


# -- what a replay cannot repeat: detected, warned once, evaluated eagerly ------------------------------------


def test_a_validation_step_collecting_outputs_falls_back_with_one_warning():
    eager, graphed = both(lambda: models.CollectsValidationOutputs("adamw", "lambda"), val_loader=val_loader(n=32))
    assert_same(eager, graphed)
    assert graphed.module.collected == eager.module.collected == [4, 4]
    warned = [w for w in graphed.warnings if "val_losses" in w]
    assert len(warned) == 1 and "validation step" in warned[0], graphed.warnings
    stats = graphed.callback.evaluation_stats["validation"]
    assert stats.disabled_reason is not None and stats.replays == 0, stats.summary()
    assert graphed.callback.stats.replays > 0  # training graphs are unaffected


def test_item_in_validation_step_falls_back_naming_the_line():
    eager, graphed = both(lambda: models.ItemInValidation("adamw", "lambda"), val_loader=val_loader(n=32))
    assert_same(eager, graphed)
    assert_same_evaluation(keeper(eager), keeper(graphed))
    (warning,) = [w for w in graphed.warnings if "Could not capture" in w]
    assert "the validation step" in warning and "models.py" in warning and "loss.item()" in warning
    assert "on_validation_batch_end" in warning and "Validation continues eagerly" in warning
    assert graphed.callback.evaluation_stats["validation"].replays == 0
    assert graphed.callback.stats.replays > 0


def test_torchmetrics_updated_in_validation_step_are_replayed():
    # the validation metric's states pass between the validation graph and the eager
    # sanity check; the training metric's between the training graph and Lightning's resets
    eager, graphed = both(lambda: models.UpdatesMetricInValidation("adamw", "lambda"), val_loader=val_loader(n=32))
    assert_same(eager, graphed)
    assert_same_evaluation(keeper(eager), keeper(graphed))
    assert not graphed.warnings, graphed.warnings
    assert graphed.callback.evaluation_stats["validation"].replays > 0
    assert graphed.callback.stats.replays > 0
    assert "val_mse" in graphed.final_metrics and "train_mse_epoch" in graphed.final_metrics


def test_reading_batch_idx_in_validation_step_falls_back():
    eager, graphed = both(lambda: models.ReadsBatchIdxInValidation("adamw", "lambda"), val_loader=val_loader(n=32))
    assert_same(eager, graphed)
    assert_same_evaluation(keeper(eager), keeper(graphed))
    assert sum("batch_idx" in w for w in graphed.warnings) == 1, graphed.warnings
    assert graphed.callback.evaluation_stats["validation"].replays == 0


# -- trainer.validate, trainer.test, trainer.predict on their own ----------------------------------------------


@dataclass
class Evaluation:
    result: Any
    logger: MemoryLogger
    keeper: KeepsEvaluation
    callback: CUDAGraphCallback | None
    trainer: pl.Trainer
    warnings: list[str] = field(default_factory=list)
    extra: list = field(default_factory=list)  # the extra callbacks, as the run left them


def evaluate(stage: str, make_module, loaders, graphed: bool, callback_kwargs=None, extra_callbacks=list) -> Evaluation:
    pl.seed_everything(0, verbose=False)
    module = make_module()
    logger, kept, extra = MemoryLogger(), KeepsEvaluation(), extra_callbacks()
    callback = CUDAGraphCallback(graph_evaluation=True, **(callback_kwargs or {})) if graphed else None
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, logger=logger, callbacks=[kept] + extra + ([callback] if callback else []),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GraphWarning)
        result = getattr(trainer, stage)(module, dataloaders=loaders())
    messages = [str(w.message) for w in caught if issubclass(w.category, GraphWarning)]
    return Evaluation(result, logger, kept, callback, trainer, messages, extra)


def both_evaluations(stage, make_module, loaders):
    return evaluate(stage, make_module, loaders, graphed=False), evaluate(stage, make_module, loaders, graphed=True)


def assert_same_records(eager: Evaluation, graphed: Evaluation) -> None:
    assert [r[0] for r in graphed.logger.records] == [r[0] for r in eager.logger.records], "logger steps"
    for (step, got), (_, want) in zip(graphed.logger.records, eager.logger.records):
        assert sorted(got) == sorted(want), f"logged keys at step {step}"
        close([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], f"logged values at step {step}")
    got = {k: float(v) for k, v in graphed.trainer.callback_metrics.items()}
    want = {k: float(v) for k, v in eager.trainer.callback_metrics.items()}
    assert sorted(got) == sorted(want)
    close([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], "callback_metrics")


@pytest.mark.parametrize("stage, name", [("validate", "validation"), ("test", "test")])
def test_validate_and_test_on_their_own(stage, name):
    # 9 full batches and a ragged one of 5
    eager, graphed = both_evaluations(stage, lambda: models.Evaluated("adamw", None), val_loader(n=77))
    assert sorted(graphed.result[0]) == sorted(eager.result[0])
    for key in eager.result[0]:
        close(graphed.result[0][key], eager.result[0][key], key)
    assert_same_records(eager, graphed)
    assert_same_evaluation(eager.keeper, graphed.keeper)
    stats = graphed.callback.evaluation_stats[name]
    assert (stats.warmup_steps, stats.captures, stats.replays, stats.eager_steps) == (3, 1, 6, 0), stats.summary()
    assert graphed.warnings == []
    assert not any(hook in graphed.trainer.strategy.__dict__ for hook in STEP_HOOKS)


def test_predict_on_its_own_gives_each_prediction_its_own_tensor():
    eager, graphed = both_evaluations("predict", lambda: models.Evaluated("adamw", None), val_loader(n=77))
    assert len(graphed.result) == len(eager.result) == 10
    for index, (got, want) in enumerate(zip(graphed.result, eager.result)):
        close(got, want, f"prediction {index}")
    # the step's outputs as returned, on the GPU: each its own memory, each its own values
    kept = graphed.keeper.outputs
    assert all(t.is_cuda for t in kept)
    assert len({t.untyped_storage().data_ptr() for t in kept}) == len(kept)
    assert_same_evaluation(eager.keeper, graphed.keeper)
    stats = graphed.callback.evaluation_stats["predict"]
    assert (stats.warmup_steps, stats.captures, stats.replays, stats.eager_steps) == (3, 1, 6, 0), stats.summary()


def test_validate_after_fit_on_the_same_trainer():
    graphed = fit(lambda: models.Evaluated("adamw", "lambda"), graphed=True, val_loader=val_loader(),
                  callback_kwargs={"graph_evaluation": True})
    eager = fit(lambda: models.Evaluated("adamw", "lambda"), graphed=False, val_loader=val_loader())
    got = graphed.trainer.validate(graphed.module, dataloaders=val_loader()())
    want = eager.trainer.validate(eager.module, dataloaders=val_loader()())
    for key in want[0]:
        close(got[0][key], want[0][key], key)
    evaluation_used(graphed)
    assert not any(hook in graphed.trainer.strategy.__dict__ for hook in STEP_HOOKS)


class FailsInValidation(Callback):
    """Raises once, at the fourth batch of the first validation."""

    def __init__(self) -> None:
        self.failed = False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 3 and not self.failed:
            self.failed = True
            raise RuntimeError("stop here")


def test_a_failed_validation_cleans_up():
    callback = CUDAGraphCallback(graph_evaluation=True)
    trainer = pl.Trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[FailsInValidation(), callback])
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.validate(models.Evaluated("adamw", None), dataloaders=val_loader(n=77)())
    assert callback.evaluation_stats["validation"].replays == 1  # W W C R, then the error
    assert not any(hook in trainer.strategy.__dict__ for hook in STEP_HOOKS)
    result = trainer.validate(models.Evaluated("adamw", None), dataloaders=val_loader(n=77)())
    assert "val_loss" in result[0] and callback.evaluation_stats["validation"].replays == 6


# -- evaluation steps writing their batch in place (batches moved to the device under inference mode) ---


def _rows():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(48.0).reshape(12, 4)), batch_size=2)


@pytest.mark.parametrize("stage", ["validate", "predict"])
def test_an_evaluation_step_writing_its_batch_in_place_leaves_it_written(stage):
    eager, graphed = [evaluate(stage, models.ScalesItsBatch, _rows, graphed=flag,
                               extra_callbacks=lambda: [models.BatchSums()]) for flag in (False, True)]
    assert graphed.extra[0].sums == eager.extra[0].sums
    stats = graphed.callback.evaluation_stats["validation" if stage == "validate" else "predict"]
    assert stats.replays > 0, stats.summary()


def _one_tensor_twice_on_the_gpu():
    with torch.inference_mode():  # (already on the device, the batch keeps them: one tensor, twice)
        table = torch.arange(48.0, device="cuda").reshape(12, 4)
    return torch.utils.data.DataLoader([(table[i:i + 2], table[i:i + 2]) for i in range(0, 12, 2)], batch_size=None)


def test_an_evaluation_batch_holding_one_tensor_twice_and_writing_it_is_not_graphed():
    eager, graphed = [evaluate("validate", models.SameTensorTwice, _one_tensor_twice_on_the_gpu, graphed=flag)
                      for flag in (False, True)]
    assert graphed.result[0]["val_out"] == pytest.approx(eager.result[0]["val_out"])
    (warning,) = graphed.warnings
    assert "shares memory with batch[1]" in warning, warning
