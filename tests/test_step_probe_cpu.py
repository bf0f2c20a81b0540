"""The Lightning step probe, without a GPU: what it records and that it cleans up."""

import lightning.pytorch as pl
import torch

import models
from lightning_graphs import _lightning as internals
from parity import assert_same_metric_snapshots


def _module_in_a_step():
    module = models.Regressor("adamw", None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    module.trainer = trainer
    module._current_fx_name = "training_step"
    return module


def test_capturing_records_log_calls_instead_of_logging():
    module = _module_in_a_step()
    probe = internals.StepProbe(module, capturing=True)
    value = torch.tensor(2.0)
    with probe.active():
        module.log("loss", value, prog_bar=True)
        module.log_dict({"a": value * 2})
    assert [c.name for c in probe.calls] == ["loss", "a"]
    assert probe.calls[0].kwargs == {"prog_bar": True}
    assert probe.calls[0].fx == "training_step"
    assert probe.calls[0].value is not value and float(probe.calls[0].value) == 2.0
    assert probe.problem is None
    assert "log" not in module.__dict__  # the stand-in is gone


def test_python_numbers_and_batch_idx_reads_are_problems():
    module = _module_in_a_step()
    probe = internals.StepProbe(module, capturing=True)
    with probe.active():
        module.log("lr", 0.1)
    assert "Python number" in probe.problem
    probe = internals.StepProbe(module, capturing=True)
    with probe.active():
        index = probe.watched_index(4)
        _ = index % 2
    assert "batch_idx" in probe.problem and "accumulate_grad_batches" in probe.problem  # with the fix


def test_reading_current_epoch_inside_the_step_is_a_problem_and_properties_are_restored():
    module = _module_in_a_step()
    original = pl.LightningModule.__dict__["current_epoch"]
    probe = internals.StepProbe(module, capturing=False)
    with probe.active():
        _ = module.current_epoch
    assert "current_epoch" in probe.problem
    assert "Do what depends on it in `on_train_batch_end` or at the epoch's end" in probe.problem  # the fix
    assert pl.LightningModule.__dict__["current_epoch"] is original
    assert pl.Trainer.__dict__["global_step"].fget.__qualname__.startswith("Trainer")


def test_stand_ins_are_removed_when_the_step_raises():
    module = _module_in_a_step()
    probe = internals.StepProbe(module, capturing=True)
    try:
        with probe.active():
            module._current_fx_name = "on_after_backward"
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert "log" not in module.__dict__
    assert module._current_fx_name == "training_step"


def test_replayed_logs_reach_lightning_with_their_hook_name():
    module = _module_in_a_step()
    module._current_fx_name = None
    trainer = module.trainer
    trainer.training = True
    trainer._logger_connector.on_batch_start(torch.ones(2))
    calls = [internals.LogCall("training_step", "loss", torch.tensor(3.0), {"on_step": True})]
    internals.replay_logs(module, calls)
    assert float(trainer._results["training_step.loss"].value) == 3.0
    assert module._current_fx_name is None


def _log_epochs(replay, epochs=2, steps=3):
    """Feed captured-step log calls to Lightning over a few epochs; what the results hold after each step."""
    module = _module_in_a_step()
    module._current_fx_name = None
    trainer = module.trainer
    trainer.training = True
    connector = trainer._logger_connector
    value = torch.zeros(())
    calls = [
        internals.LogCall("training_step", "loss", value, {}),
        internals.LogCall("training_step", "mean", value, {"on_step": True, "on_epoch": True, "batch_size": 4}),
        internals.LogCall("training_step", "top", value, {"on_epoch": True, "reduce_fx": "max", "prog_bar": True}),
        internals.LogCall("on_after_backward", "grad", value, {"on_epoch": True, "reduce_fx": "sum"}),
    ]
    feed = replay(module, calls)
    seen = []
    for epoch in range(epochs):
        for step in range(steps):
            connector.on_batch_start(torch.ones(3, 2))
            value.fill_(epoch * 10 + step + 0.5)  # the replay refreshed the graph's output
            feed()
            connector.update_train_step_metrics()
            connector.on_batch_end()
            seen.append({k: v.clone() for k, v in connector.callback_metrics.items()})
        connector.epoch_end_reached()
        connector.on_epoch_end()
        connector.update_train_epoch_metrics()
        seen.append({k: v.clone() for k, v in connector.callback_metrics.items()})
    return seen


def test_direct_log_replay_equals_logging_each_call():
    through_log = _log_epochs(lambda module, calls: lambda: internals.replay_logs(module, calls))
    direct = _log_epochs(internals.LogReplayer)
    assert_same_metric_snapshots(direct, through_log)
    assert float(direct[-1]["mean_epoch"]) == sum(10 + s + 0.5 for s in range(3)) / 3
