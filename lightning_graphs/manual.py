"""Graphing manual optimization (``automatic_optimization = False``).

In manual optimization ``training_step`` does everything itself: it calls
``manual_backward``, ``optimizer.step()`` and ``zero_grad()`` of one or several
optimizers (a GAN's generator and discriminator, each between
``toggle_optimizer`` and ``untoggle_optimizer``), clips with
``self.clip_gradients`` and steps its learning-rate schedulers by hand.
:class:`ManualSteps` stands in for Lightning's manual loop and captures that whole
step as one graph. A replay repeats the GPU work only, so three things the step
did on the host are done again after every replay:

* **Lightning's step counters.** Each ``LightningOptimizer.step()`` advances the
  manual loop's ``optim_step_progress``, from which ``trainer.global_step`` is
  derived. The capture notes by how much the step advanced it; every replay
  advances it by as much. (Lightning counts no ``zero_grad`` calls here.)
* **Schedulers stepped by hand.** A scheduler writes Python floats into
  ``param_groups``, which a replay cannot repeat. Its ``step()`` inside the
  step is therefore put off until the step has ended, and after every replay the
  schedulers the captured step stepped are stepped again on the host, in the same
  order; their learning rates reach the graph before the next replay (see
  :mod:`lightning_graphs.optimizers`). That equals eager training when no
  optimizer a scheduler drives steps after that scheduler within the step, which
  is PyTorch's recommended order (``opt.step()`` then ``sched.step()``). A
  scheduler stepped before its optimizer, or with arguments, makes the fit train
  eagerly with a warning; the eager step that finds it runs the put-off steps
  right away, so it is exact too.
* **``self.log``** values, fed to Lightning as in automatic optimization.

A step decided on ``batch_idx``, ``self.global_step``, ``self.current_epoch`` or
``self.trainer.is_last_batch`` (a scheduler stepped every N batches or at the end
of an epoch) is found by :class:`~lightning_graphs._lightning.StepProbe` and
trains eagerly; a step that calls its optimizers and schedulers differently from
one call to the next (for a batch of the same signature) too.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import lightning.pytorch as pl

from lightning_graphs import _lightning as internals
from lightning_graphs.batches import BatchSignature
from lightning_graphs.graphed_step import Action, CaptureDeferred, CaptureFailed, GraphedStep

__all__ = ["ManualSteps", "ManualStepProblem"]

# batch signatures whose optimizer and scheduler calls are kept for comparison
_SIGNATURES_KEPT = 32


class ManualStepProblem(Exception):
    """Raised inside a capture for what a replay of the manual step cannot repeat;
    the capture fails and the fit trains eagerly, with this message."""


@dataclass
class ReplayedCalls:
    """What every replay of one captured manual step does on the host, besides the graph."""

    ready: int  # optimizer steps started in the step (Lightning's ``optim_step_progress``)
    completed: int  # and completed
    schedulers: list[Any] = field(default_factory=list)  # stepped after the graph, in the captured order

    def __call__(self, trainer: pl.Trainer) -> None:
        internals.count_replayed_manual_step(trainer, self.ready, self.completed)
        for scheduler in self.schedulers:
            scheduler.step()


class _StepCalls:
    """The optimizer and scheduler calls of one manual step, watched while it runs.

    ``capturing``: scheduler steps are put off (see the module's docstring) and
    :meth:`finish` runs them; a problem raises :class:`ManualStepProblem` (nothing
    of the capture runs). Otherwise (an eager step) schedulers step in place, as the
    user wrote, so that code reading the learning rate after ``sched.step()`` sees
    eager's value; their order is checked all the same, and ``on_problem`` is told
    at once, before anything else judges the step."""

    def __init__(self, owner: ManualSteps, capturing: bool, on_problem: Callable[[str], None]) -> None:
        self.owner = owner
        self.capturing = capturing
        self.on_problem = on_problem
        self.calls: list[tuple[str, int]] = []  # ("step" | "zero_grad" | "scheduler", index), in order
        self.problem: str | None = None
        self._put_off: list[tuple[int, Callable[..., Any]]] = []  # (scheduler index, its own step)
        self._stepped: list[int] = []  # scheduler indexes stepped (in place, or once put off), in order

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(
                internals.watching_manual_calls(self.owner.trainer, self._optimizer_call, self._scheduler_step)
            )
            if not self.capturing:
                # eager steps also see the torch optimizers' own steps (``use_pl_optimizer=False``)
                for index, optimizer in enumerate(self.owner.trainer.optimizers):
                    handle = optimizer.register_step_pre_hook(lambda *_, i=index: self._before_update(i))
                    stack.callback(handle.remove)
            yield

    def _optimizer_call(self, name: str, index: int) -> None:
        self.calls.append((name, index))
        if name == "step":
            self._before_update(index)

    def _before_update(self, index: int) -> None:
        stepped = [j for j, _ in self._put_off] + (self._stepped if not self.capturing else [])
        late = [j for j in stepped if index in self.owner.drives(j)]
        if not late:
            return
        scheduler = self.owner.scheduler_name(late[0])
        optimizer = self.owner.optimizer_name(index)
        position = self.calls.index(("scheduler", late[0]))
        if ("step", index) in self.calls[:position]:  # the optimizer stepped before the scheduler too
            where = f"between two `step()` calls of the optimizer it drives ({optimizer})"
            fix = "Step the scheduler once, after the optimizer's last `step()` in the training step"
        else:
            where = f"before `step()` of the optimizer it drives ({optimizer})"
            fix = ("Step the scheduler after `optimizer.step()` (PyTorch's recommended order: it then sets the next "
                   "step's learning rate)")
        self._report(
            f"the training step steps the learning-rate scheduler `{scheduler}` {where}; a replayed step can only "
            f"step schedulers after the graph, and that optimizer step would miss its new learning rate. {fix}"
        )

    def _scheduler_step(self, index: int, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        self.calls.append(("scheduler", index))
        if args or kwargs:
            self._report(
                f"the training step calls `{self.owner.scheduler_name(index)}.step(...)` with arguments; a replay "
                "could only repeat the captured ones. Step it without arguments, or outside `training_step` (a "
                "`ReduceLROnPlateau` in `on_validation_epoch_end`, say)"
            )
            return original(*args, **kwargs)
        if not self.capturing:
            self._stepped.append(index)
            return original()
        self._put_off.append((index, original))
        return None

    def _report(self, problem: str) -> None:
        if self.capturing:
            raise ManualStepProblem(problem)
        self._run_put_off()  # in their place: this eager step stays exact
        if self.problem is None:
            self.problem = problem
            self.on_problem(problem)

    def _run_put_off(self) -> None:
        put_off, self._put_off = self._put_off, []
        for index, step in put_off:
            step()
            self._stepped.append(index)

    def finish(self) -> list[int]:
        """Run the scheduler steps still put off; the indexes of the schedulers stepped after
        being put off, in order (what a replay of a captured step steps)."""
        self._run_put_off()
        return self._stepped

    def discard(self) -> None:
        """Forget the put-off steps (of a capture that failed: the step runs again eagerly)."""
        self._put_off = []


class ManualSteps:
    """Stands in for Lightning's manual-optimization loop ``run(kwargs)`` while the
    callback graphs the fit: warm-up, capture, replay or eager, as ``engine`` plans.

    Args:
        trainer: the Trainer of the fit.
        engine: the graphed step, built with the trainer's optimizers.
        run: Lightning's own ``run(kwargs)``, which runs one ``training_step``.
        after_capture: called after every successful capture (the callback retires
            evaluation graphs sharing the memory pool there).
        advice: added to the warning about batches of a signature run eagerly.
    """

    def __init__(
        self,
        trainer: pl.Trainer,
        engine: GraphedStep,
        run: Callable[[OrderedDict], dict],
        after_capture: Callable[[], None] = lambda: None,
        advice: str = "",
    ) -> None:
        self.trainer = trainer
        self.engine = engine
        self._run = run
        self._after_capture = after_capture
        self._advice = advice
        self._schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        # per scheduler, the indexes of the optimizers whose learning rates it writes
        every = frozenset(range(len(trainer.optimizers)))
        self._drives = [self._driven(scheduler, every) for scheduler in self._schedulers]
        # the calls the first watched step of each batch signature made (the latest few
        # signatures), which later steps of that signature must repeat
        self._calls_seen: list[tuple[BatchSignature, tuple]] = []

    def _driven(self, scheduler: Any, every: frozenset[int]) -> frozenset[int]:
        optimizer = getattr(scheduler, "optimizer", None)
        found = frozenset(i for i, o in enumerate(self.trainer.optimizers) if o is optimizer)
        return found or every  # an optimizer not known: it may drive any

    def drives(self, scheduler_index: int) -> frozenset[int]:
        return self._drives[scheduler_index]

    def scheduler_name(self, index: int) -> str:
        return type(self._schedulers[index]).__name__

    def optimizer_name(self, index: int) -> str:
        return f"{type(self.trainer.optimizers[index]).__name__} #{index}"  # its index in ``self.optimizers()``

    # -- one step --------------------------------------------------------------------

    def run(self, kwargs: OrderedDict) -> dict:
        """One manual training step, as Lightning's ``run(kwargs)`` returns it."""
        engine, trainer = self.engine, self.trainer
        replaced = internals.replaced_optimizers(engine, trainer.optimizers)
        if replaced is not None:
            engine.disable(replaced)
        plan = engine.plan(kwargs["batch"])
        batch_idx = kwargs.get("batch_idx", trainer.fit_loop.epoch_loop.batch_idx)
        if plan.action is Action.REPLAY:
            outputs = engine.replay(plan)
            plan.graph.notes["manual"](trainer)
            plan.graph.notes["logs"]()
            return internals.replayed_outputs(outputs, batch_idx)
        if plan.action is Action.WARMUP:
            probe = internals.StepProbe(trainer.lightning_module, capturing=False)
            calls = _StepCalls(self, capturing=False, on_problem=engine.disable)
            with probe.active():
                watched = internals.with_batch(kwargs, kwargs["batch"], probe.watched_index(batch_idx))
                # its schedulers step in place (see _StepCalls): their effect on the learning
                # rates is expected, and replayed after every replay of the graph
                outputs = engine.warmup(lambda: self._watched(calls, watched), plan, check_hyperparameters=False)
            calls.finish()
            problem = probe.problem or self._differing_calls(plan.signature, calls.calls)
            if problem is not None:
                engine.disable(problem)
            return outputs
        if plan.action is Action.CAPTURE:
            return self._capture(plan, kwargs, batch_idx)
        engine.warn_fallback(plan, self._advice if plan.other_signature else "")
        return engine.eager(lambda: self._run(kwargs), plan.reason)

    def _watched(self, calls: _StepCalls, kwargs: OrderedDict) -> dict:
        with calls.watching():
            return self._run(kwargs)

    def _capture(self, plan: Any, kwargs: OrderedDict, batch_idx: int) -> dict:
        engine, trainer = self.engine, self.trainer
        module = trainer.lightning_module
        progress = internals.progress_state(trainer)
        ready, completed = internals.manual_step_counts(trainer)
        probe = internals.StepProbe(module, capturing=True)
        calls = _StepCalls(self, capturing=True, on_problem=engine.disable)
        toggled = dict(module._param_requires_grad_state)  # toggle_optimizer's memory, as before the step
        try:
            with probe.active():
                index = probe.watched_index(batch_idx)
                outputs = engine.capture(
                    plan, lambda static_batch: self._watched(calls, internals.with_batch(kwargs, static_batch, index))
                )
        except CaptureDeferred:
            self._undo_capture(calls, progress, toggled)
            return self.run(kwargs)  # planned again: an eager warm-up step
        except CaptureFailed as failure:
            self._undo_capture(calls, progress, toggled)
            cause = failure.__cause__
            engine.disable(str(cause) if isinstance(cause, ManualStepProblem) else failure.explanation, cause=failure)
            return engine.eager(lambda: self._run(kwargs), "capture failed")
        # the graph ran this step once: its put-off scheduler steps run now, and after every replay
        stepped = calls.finish()
        now_ready, now_completed = internals.manual_step_counts(trainer)
        plan.graph.notes["manual"] = ReplayedCalls(
            now_ready - ready, now_completed - completed, [self._schedulers[i] for i in stepped]
        )
        self._after_capture()
        replay_logs = internals.LogReplayer(module, probe.calls)
        plan.graph.notes["logs"] = replay_logs
        problem = probe.problem or self._differing_calls(plan.signature, calls.calls)
        if problem is not None:
            engine.disable(problem)  # this step ran from the graph correctly; no replays after it
        replay_logs()
        return internals.replayed_outputs(outputs, batch_idx)

    def _undo_capture(self, calls: _StepCalls, progress: dict, toggled: dict) -> None:
        """What a capture that failed midway left behind, undone before the step runs eagerly
        (the graphed step itself puts back gradients and ``requires_grad`` flags)."""
        calls.discard()
        internals.end_unfinished_manual_step(self.trainer)
        internals.restore_progress(self.trainer, progress)
        self.trainer.lightning_module._param_requires_grad_state = toggled

    def _differing_calls(self, signature: BatchSignature | None, calls: list[tuple[str, int]]) -> str | None:
        """Why the step's calls cannot be replayed: they differ from those of an earlier
        step with a batch of the same signature, if so."""
        made = tuple(calls)
        for seen, earlier in self._calls_seen:
            if seen == signature:
                if earlier == made:
                    return None
                return (
                    "the training step called its optimizers and schedulers differently in two steps "
                    f"({self._describe(earlier)}; then {self._describe(made)}). A CUDA graph repeats the calls of "
                    "the step it captured: make the same calls at every step, or decide them outside the step"
                )
        self._calls_seen = self._calls_seen[-(_SIGNATURES_KEPT - 1):] + [(signature, made)]
        return None

    def _describe(self, calls: tuple[tuple[str, int], ...]) -> str:
        if not calls:
            return "no optimizer or scheduler calls"
        named = [
            f"{self.scheduler_name(i)} step" if name == "scheduler" else f"{self.optimizer_name(i)} {name}"
            for name, i in calls
        ]
        return ", ".join(named)
