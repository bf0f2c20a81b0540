"""Forward-only CUDA graphs for ``validation_step``, ``test_step`` and ``predict_step``.

:class:`EvaluationGraphs` stands in for one stage's step on the Trainer's strategy
while that stage's loop runs (``CUDAGraphCallback(graph_evaluation=True)`` installs
it). Calls are planned like training steps: eager warm-up calls (two before the
first capture, one for each later batch signature), then a capture, then replays;
what a replay cannot repeat (``.item()``, reads of ``batch_idx``, appending outputs
to a list) makes the stage run eagerly, with one warning. Values logged with
``self.log`` inside the step are fed to Lightning after every replay, and outputs
are cloned, so that every prediction is a tensor of its own.

Each dataloader gets its own :class:`~lightning_graphs.GraphedStep`: a step that
branches on ``dataloader_idx`` takes another path per dataloader, and each path
warms up eagerly before it is captured.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable

import lightning.pytorch as pl

from lightning_graphs import _lightning as internals
from lightning_graphs.graphed_step import Action, CaptureDeferred, CaptureFailed, GraphedStep, GraphStats, StepPlan

__all__ = ["EvaluationGraphs", "STAGE_HOOKS"]

# the evaluation stages and the LightningModule step each one runs
STAGE_HOOKS = {"validation": "validation_step", "test": "test_step", "predict": "predict_step"}

_FALLBACK_ADVICE = " A larger `max_graphs` graphs such batches too."


class EvaluationGraphs:
    """The graphed step of one evaluation stage (``"validation"``, ``"test"`` or
    ``"predict"``), one :class:`GraphedStep` per dataloader.

    Args:
        stage: the stage, a key of :data:`STAGE_HOOKS`.
        make_engine: builds the graphed step for a dataloader index (``None`` with
            a single dataloader); called the first time that dataloader comes.
    """

    def __init__(self, stage: str, make_engine: Callable[[int | None], GraphedStep]) -> None:
        if stage not in STAGE_HOOKS:
            raise ValueError(f"`stage` must be one of {sorted(STAGE_HOOKS)}, got {stage!r}")
        self.stage = stage
        self.hook = STAGE_HOOKS[stage]
        self._make_engine = make_engine
        self._engines: dict[int | None, GraphedStep] = {}  # by dataloader index; graphs outlive one loop run
        self._patch: internals.StrategyStepPatch | None = None  # installed while the stage's loop runs
        self._trainer: pl.Trainer | None = None

    @property
    def engines(self) -> dict[int | None, GraphedStep]:
        """The graphed steps by dataloader index."""
        return dict(self._engines)

    @property
    def stats(self) -> GraphStats:
        """Captures, replays and eager calls of this stage so far, over all its dataloaders (a copy)."""
        return _combined([engine.stats for engine in self._engines.values()])

    # -- life cycle ----------------------------------------------------------------

    def install(self, trainer: pl.Trainer) -> None:
        """Route the stage's step through :meth:`step` until :meth:`remove`."""
        self.remove()
        self._trainer = trainer
        for engine in self._engines.values():
            engine.request_structure_check()  # weights may have been swapped or reloaded since the last run
        self._patch = internals.StrategyStepPatch(trainer, self.hook, self.step)

    def remove(self) -> None:
        """Give the strategy its own step back; the graphs are kept for the next run. Safe to call twice."""
        if self._patch is not None:
            self._patch.remove()
            self._patch = None

    def retire_graphs(self) -> None:
        """Capture every graph anew at its next call (see ``CUDAGraphCallback._retire_evaluation_graphs``)."""
        for engine in self._engines.values():
            engine.retire_graphs()

    def close(self) -> None:
        """Remove the stand-in and free every graph."""
        self.remove()
        for engine in self._engines.values():
            engine.close()
        self._engines = {}
        self._trainer = None

    # -- the step ------------------------------------------------------------------------

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """Stands in for ``trainer.strategy.<stage>_step``: one evaluation step."""
        run, trainer = self._patch.original, self._trainer
        module = trainer.lightning_module
        call = internals.evaluation_call(module, self.hook, args, kwargs)
        if call is None:  # not called the way the loops call it: leave it alone
            return run(*args, **kwargs)
        engine = self._engines.get(call.dataloader_idx)
        if engine is None:
            engine = self._engines[call.dataloader_idx] = self._make_engine(call.dataloader_idx)
        plan = engine.plan(call.batch)
        if plan.action is Action.REPLAY:
            outputs = engine.replay(plan)
            plan.graph.notes["logs"]()
            return internals.replayed_outputs(outputs, call.batch_idx)
        # the sanity check only warms up: graphs captured before the training step's
        # first capture would be retired by it (see the callback's shared memory pool)
        if plan.action is Action.WARMUP or (plan.action is Action.CAPTURE and trainer.sanity_checking):
            return self._warmup(engine, plan, call, run, module)
        if plan.action is Action.CAPTURE:
            return self._capture(engine, plan, call, run, module)
        engine.warn_fallback(plan, _FALLBACK_ADVICE if plan.other_signature else "")
        return engine.eager(lambda: run(*args), plan.reason)

    def _warmup(self, engine: GraphedStep, plan: StepPlan, call: internals.EvaluationCall, run: Callable[..., Any],
                module: pl.LightningModule) -> Any:
        probe = self._probe(engine, module, capturing=False)
        with probe.active():
            watched = call.with_batch(call.batch, _watched_index(probe, call))
            outputs = engine.warmup(lambda: run(*watched), plan)
        if probe.problem is not None:
            engine.disable(probe.problem)
        return outputs

    def _capture(self, engine: GraphedStep, plan: StepPlan, call: internals.EvaluationCall, run: Callable[..., Any],
                 module: pl.LightningModule) -> Any:
        probe = self._probe(engine, module, capturing=True)
        try:
            with probe.active():
                index = _watched_index(probe, call)
                outputs = engine.capture(plan, lambda static_batch: run(*call.with_batch(static_batch, index)))
        except CaptureDeferred:  # torch.compile had to compile for this batch: an eager call first
            return self._warmup(engine, plan, call, run, module)
        except CaptureFailed as failure:
            engine.disable(failure.explanation, cause=failure)
            return engine.eager(lambda: run(*call.args), "capture failed")
        return internals.finish_capture(engine, plan, probe, outputs)

    @staticmethod
    def _probe(engine: GraphedStep, module: pl.LightningModule, capturing: bool) -> internals.StepProbe:
        return internals.StepProbe(module, capturing=capturing, what=engine.what, batch_end_hook=engine.batch_end_hook)


def _watched_index(probe: internals.StepProbe, call: internals.EvaluationCall) -> Any:
    return probe.watched_index(call.batch_idx) if call.batch_idx is not None else None


def _combined(parts: list[GraphStats]) -> GraphStats:
    """One stage's stats over its dataloaders: counts added, reasons merged."""
    total = GraphStats()
    for part in parts:
        for spec in fields(GraphStats):
            value = getattr(part, spec.name)
            if isinstance(value, dict):
                merged = getattr(total, spec.name)
                for key, count in value.items():
                    merged[key] = merged.get(key, 0) + count
            elif spec.name == "disabled_reason":
                total.disabled_reason = total.disabled_reason or value
            else:
                setattr(total, spec.name, getattr(total, spec.name) + value)
    return total
