"""The Lightning adapter: ``Trainer(callbacks=[CUDAGraphCallback()])``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_graphs import _lightning as internals
from lightning_graphs.compiled import compile_children, compiled_parts, own_graphs, own_graphs_requested
from lightning_graphs.distributed import AgreementSchedule, RankAgreement, agree_on_plan
from lightning_graphs.evaluation import STAGE_HOOKS, EvaluationGraphs
from lightning_graphs.graphed_step import (
    Action, CaptureDeferred, CaptureFailed, CaptureOutcome, GraphedStep, GraphStats, SharedPool, check_count,
    check_flag,
)
from lightning_graphs.manual import ManualSteps
from lightning_graphs.messages import GraphCaptureError, GraphWarning, WarnOnce
from lightning_graphs.python_state import functions_read, globals_fn_reads

__all__ = ["CUDAGraphCallback"]

_SUPPORTED_PRECISION = ("32-true", "32", "bf16-mixed", "16-mixed")
_RAGGED_ADVICE = " If this is an epoch's smaller last batch, a DataLoader with drop_last=True avoids it."
_RANK_AGREEMENT = ("auto", "every_step", "boundaries")
# eager DDP iterations before a capture: DDP times its first 10 iterations with CUDA
# events that the following iteration reads on the host, which a capture cannot hold
_DDP_WARMUP_ITERATIONS = 11


class CUDAGraphCallback(pl.Callback):
    """Captures the whole training step (forward, backward, gradient clipping,
    optimizer step) as one CUDA graph and replays it, one launch per step.

    Nothing else changes: parameters, losses, ``self.log`` values, learning-rate
    traces and ``global_step`` are those of eager training, with the
    LightningModule, optimizers and schedulers exactly as written. Batches of the
    captured signature (structure, shapes, dtypes, non-tensor values) are copied
    into static tensors and replayed; any other batch (the ragged last one, say)
    runs eagerly and correctly. What cannot be graphed is reported once, with the
    reason, and runs eagerly.

    Args:
        warmup_steps: eager steps (real training steps, on a side stream) before
            the capture; at least 1, since optimizers create their state lazily.
        max_graphs: graphs held at once, one per recurring batch signature (the
            ragged last batch of each epoch, bucketed shapes), sharing one memory
            pool; least recently used eviction beyond it. A new signature runs one
            eager step first and is captured when it comes again. Each graph holds
            its own gradients: ``max_graphs=1`` saves that memory and runs other
            signatures eagerly.
        strict: raise :class:`~lightning_graphs.GraphCaptureError` where the step
            cannot be graphed, instead of warning and training eagerly.
        verbose: print a one-line summary (captures, replays, eager steps and why)
            at the end of training.
        log_stats: at the end of training, log the training step's
            :meth:`GraphStats.as_metrics` (``cuda_graphs/captures``, ``/replays``,
            ...) through the Trainer's loggers. Off by default, so that the metrics
            logged are exactly those of eager training.
        nvtx: mark warm-up, capture, replay and eager steps as NVTX ranges for
            Nsight Systems.
        compile: compile the forward of each child module holding parameters with
            ``torch.compile`` (default mode) for the fit, so that the whole-step graph
            runs fused kernels; a dict is passed to ``torch.compile`` as keyword
            arguments. Undone at the end of the fit. Modules the user compiled
            (default mode) are graphed as they are, either way.
        graph_evaluation: also graph ``validation_step``, ``test_step`` and
            ``predict_step`` (forward only), during ``fit`` and in
            ``trainer.validate``/``test``/``predict``. Off by default: evaluation
            then runs exactly as without the callback. Each stage and dataloader
            gets up to ``max_graphs`` graphs, one per batch signature, captured
            after two eager calls (one for each later signature; the sanity check
            only warms up); they share the training graphs' memory pool. The
            rules of training apply: ``self.log`` values are fed to Lightning
            after every replay (epoch means, ``callback_metrics`` and
            ``ModelCheckpoint`` monitors equal eager), outputs and predictions
            are cloned, torchmetrics metrics updated in the step are followed
            (see :mod:`lightning_graphs.metrics`), and a step a replay cannot
            repeat (``.item()``, reads of ``batch_idx``, appending outputs to a
            list) runs eagerly with one warning. See
            :attr:`evaluation_stats`.
        rank_agreement: under DDP, when the ranks agree on each step's path (graph
            or eager; a rank replaying while another runs eagerly would hang the
            job). ``"every_step"`` and ``"auto"`` (default) agree before every step
            (a small all-reduce over Gloo, on the host). ``"boundaries"`` only
            before steps that follow a non-replayed step and at the first and last
            batch of an epoch, which saves that all-reduce between replays: use it
            only when every rank's batch has the same shapes at every position
            (fixed-size samples, a fixed ``batch_size``). A rank whose batch then
            cannot be replayed at a step taken without agreement raises
            :class:`~lightning_graphs.distributed.RankAgreementError` naming it;
            batches found to differ at an agreement switch to agreeing every step.
        agreement_timeout: seconds a rank waits for the others at an agreement
            before raising :class:`~lightning_graphs.distributed.RankAgreementError`
            (another rank failed or is stuck). It bounds the longest stretch
            between two agreements on another rank: a first ``torch.compile``
            counts, and so does anything one rank does alone between two batches
            (a checkpoint rank zero saves), since Lightning's per-batch SIGTERM
            check is asked over the same group.

    Raises:
        ValueError: for a negative ``warmup_steps``, or a ``compile`` dict asking
            for a mode that captures CUDA graphs of its own, an unknown
            ``rank_agreement`` or a ``agreement_timeout`` that is not positive.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[CUDAGraphCallback()])
        trainer.fit(model, datamodule)
        print(trainer.callbacks[0].stats.summary())

        # validation, test and prediction graphed too
        callback = CUDAGraphCallback(graph_evaluation=True)
        trainer = Trainer(max_epochs=10, callbacks=[callback])
        trainer.fit(model, datamodule)
        predictions = trainer.predict(model, datamodule)
        print(callback.evaluation_stats["validation"].summary())

    Requirements of the training step (each is checked; one that is broken makes
    training run eagerly with a warning naming it):

    * no host synchronisation inside ``training_step`` and the in-step hooks: no
      ``.item()``, ``print(tensor)``, ``if tensor:``, ``torch.tensor(x, device=...)``.
      Log tensors with ``self.log``: their values are fed to Lightning after every
      replay, so ``on_step``/``on_epoch``/``prog_bar`` logging stays exact.
    * no Python side effects that must happen every step (host random numbers from
      ``random`` or ``np.random`` included: draw them with torch on the device), and no
      decisions on ``batch_idx``, ``self.global_step`` or ``self.current_epoch``: a
      replay repeats GPU work only. Append outputs in ``on_train_batch_end`` instead, which runs every
      step and receives ``outputs["loss"]``. torchmetrics metrics may be called,
      updated and logged in the step: their states and update counts follow every
      replay (see :mod:`lightning_graphs.metrics` for the few that cannot).
    * learning rates and other hyper-parameters are set by schedulers (or any code
      outside the step), not inside ``training_step`` or ``optimizer_step``. In manual
      optimization a scheduler from ``configure_optimizers`` may be stepped by hand
      inside ``training_step`` after ``opt.step()`` (not before it, and without
      arguments): it is stepped on the host after every replay, in the same order.
    * in manual optimization, the same optimizer and scheduler calls at every step,
      decided without ``batch_idx``, ``self.global_step`` or
      ``self.trainer.is_last_batch``: step a scheduler every N batches or at the end
      of an epoch in ``on_train_batch_end`` or ``on_train_epoch_end`` instead.

    Supported today: one CUDA device or DDP on CUDA devices (the gradient
    all-reduce inside the graph; ``Trainer(strategy="ddp", devices=N)``, on one
    node or many), automatic optimization (with gradient
    accumulation: each micro-step kind gets its own graph), manual optimization
    (``automatic_optimization = False``: the whole ``training_step`` with its
    ``manual_backward``, ``zero_grad``, ``clip_gradients`` and ``step`` calls of one or
    several optimizers is one graph; ``global_step`` counts as eagerly; see
    :mod:`lightning_graphs.manual`), ``precision`` of
    ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"`` (the GradScaler skips
    overflowing steps on the device; see :mod:`lightning_graphs.amp`). Other setups
    train eagerly, with one warning saying so. ``validation_step``, ``test_step``
    and ``predict_step`` run eagerly unless ``graph_evaluation=True``.

    Debugging a failed capture: the warning names the operation and your line of
    code. For host synchronisations in general, run one eager step under
    ``torch.cuda.set_sync_debug_mode("error")``, which raises at the first one.
    """

    def __init__(
        self,
        warmup_steps: int = 3,
        max_graphs: int = 2,
        strict: bool = False,
        verbose: bool = True,
        log_stats: bool = False,
        nvtx: bool = False,
        compile: bool | dict[str, Any] = False,
        graph_evaluation: bool = False,
        rank_agreement: str = "auto",
        agreement_timeout: float = 900.0,
    ) -> None:
        warmup_steps = check_count("warmup_steps", warmup_steps, 0)
        max_graphs = check_count("max_graphs", max_graphs, 1)
        strict, verbose, log_stats, nvtx, graph_evaluation = (
            check_flag(name, flag) for name, flag in (("strict", strict), ("verbose", verbose),
                                                      ("log_stats", log_stats), ("nvtx", nvtx),
                                                      ("graph_evaluation", graph_evaluation))
        )
        if isinstance(compile, Mapping):
            compile = dict(compile)  # (an OmegaConf DictConfig from a config file, say)
        elif not isinstance(compile, bool):
            raise TypeError(
                f"`compile` takes True (torch.compile's default mode) or a dict of torch.compile arguments, such as "
                f'{{"mode": "max-autotune-no-cudagraphs"}}; got {type(compile).__name__} {compile!r}'
            )
        if isinstance(compile, dict) and own_graphs_requested(compile):
            raise ValueError(
                f"`compile={compile!r}` asks torch.compile for CUDA graphs of its own, which cannot run inside the "
                "whole-step graph this callback captures; leave out the mode (the default mode fuses kernels; the "
                "callback graphs the whole step) or use mode=\"max-autotune-no-cudagraphs\""
            )
        if rank_agreement not in _RANK_AGREEMENT:
            raise ValueError(f"`rank_agreement` must be one of {_RANK_AGREEMENT}, got {rank_agreement!r}")
        if not agreement_timeout > 0:
            raise ValueError(f"`agreement_timeout` must be positive, got {agreement_timeout}")
        self.warmup_steps = warmup_steps
        self.max_graphs = max_graphs
        self.strict = strict
        self.verbose = verbose
        self.log_stats = log_stats
        self.nvtx = nvtx
        self.compile = compile
        self._uncompile: Any = None  # undoes `compile`, while it is in effect
        self.graph_evaluation = graph_evaluation
        self.rank_agreement = rank_agreement
        self.agreement_timeout = agreement_timeout
        self._ranks: RankAgreement | None = None  # under DDP: the agreements between ranks on each step
        self._schedule: AgreementSchedule | None = None  # under DDP: which steps need one
        self._agreement_stats: dict[str, Any] | None = None  # agreement_stats of the last fit under DDP
        self._ddp: Any = None  # under DDP: the DistributedDataParallel module of the running fit
        self._warn_once = WarnOnce(self._emit)
        self._engine: GraphedStep | None = None  # the graphed step of the running fit
        self._trainer: pl.Trainer | None = None
        self._original_run: Any = None  # Lightning's own step runner, while patched
        self._manual: ManualSteps | None = None  # stands in for the manual loop's runner, in manual optimization
        self._last_stats: GraphStats | None = None
        # with graph_evaluation: the graphed step of each evaluation stage, created at its first run
        self._evaluation: dict[str, EvaluationGraphs] = {}
        self._last_evaluation_stats: dict[str, GraphStats] = {}
        # one memory pool for the training and evaluation graphs (see _retire_evaluation_graphs)
        self._pool: SharedPool | None = None

    @property
    def stats(self) -> GraphStats | None:
        """Captures, replays, eager steps and their reasons for the current (or last) fit."""
        return self._engine.stats if self._engine is not None else self._last_stats

    @property
    def agreement_stats(self) -> dict[str, Any] | None:
        """Under DDP, for the current (or last) fit: the agreements between ranks made
        (``"agreements"``), the steps taken without one (``"skipped"``) and whether
        every step was agreed (``"every_step"``); ``None`` without DDP."""
        if self._ranks is not None:
            return {"agreements": self._ranks.agreements, "skipped": self._schedule.skipped,
                    "every_step": self._schedule.every_step}
        return self._agreement_stats

    @property
    def evaluation_stats(self) -> dict[str, GraphStats]:
        """With ``graph_evaluation=True``: the stats of each evaluation stage graphed in the
        current (or last) ``fit``, ``validate``, ``test`` or ``predict`` run, by stage
        (``"validation"``, ``"test"``, ``"predict"``), summed over its dataloaders."""
        current = {stage: evaluation.stats for stage, evaluation in self._evaluation.items()}
        return {**self._last_evaluation_stats, **current}

    # -- set-up -------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._teardown(trainer)  # whatever a run that ended without teardown left
        self._warn_once.reset()
        self._last_evaluation_stats = {}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._teardown_training(trainer)
        if not self._on_cuda(pl_module):
            self._off_cuda(pl_module, "Training")
            return
        reason = self._unsupported(trainer, pl_module) or self._graphed_by_the_compiler(pl_module)
        if reason is not None:
            self._refuse("unsupported", reason, "Training")
            return
        self._trainer = trainer
        if self.compile:
            self._uncompile = compile_children(pl_module, self.compile if isinstance(self.compile, dict) else {})
        # with accumulation, warm-up covers a whole cycle: the optimizer state exists
        # before the micro-step that steps it is captured
        every = trainer.accumulate_grad_batches
        warmup = max(self.warmup_steps, every) if every > 1 else self.warmup_steps
        ddp = internals.ddp_model(trainer)
        if ddp is not None:
            self._ddp = ddp
            # DDP iterations are the steps that synchronise gradients: the last micro-step of a cycle
            warmup = max(warmup, _DDP_WARMUP_ITERATIONS * every)
            internals.quiet_ddp_statistics(ddp)
            self._start_agreement(trainer)
        self._engine = GraphedStep(
            None,
            warmup_steps=warmup,
            max_graphs=self.max_graphs,
            optimizers=trainer.optimizers,
            modules=[pl_module],
            watch=_each_once(
                [("self", pl_module)]
                + [(f"callback {type(c).__name__}", c) for c in internals.in_step_callbacks(trainer, exclude=self)]
                + functions_read(internals.in_step_functions(trainer, pl_module, exclude=self))
            ),
            follow=_datamodule(trainer),
            strict=self.strict,
            warn=self._warn_once,
            ignore_attribute=internals.ignore_framework_attribute,
            what="the training step",
            input_name="batch",
            nvtx=self.nvtx,
            grad_scaler=getattr(trainer.precision_plugin, "scaler", None),
            pool=self._shared_pool() if self.graph_evaluation else None,
            agree_capture=self._agree_on_capture if self._ranks is not None else None,
        )
        if pl_module.automatic_optimization:
            self._original_run = internals.patch_step_runner(trainer, self._run_step)
        else:
            self._manual = ManualSteps(
                trainer, self._engine, lambda kwargs: self._original_run(kwargs),
                after_capture=self._retire_evaluation_graphs, advice=_RAGGED_ADVICE,
            )
            self._original_run = internals.patch_step_runner(trainer, self._manual.run)

    @staticmethod
    def _on_cuda(pl_module: pl.LightningModule) -> bool:
        return torch.cuda.is_available() and pl_module.device.type == "cuda"

    def _off_cuda(self, pl_module: pl.LightningModule, activity: str) -> None:
        self._warn_once(
            "no-cuda",
            f"CUDAGraphCallback: the model is on {pl_module.device} and CUDA graphs need a CUDA device. "
            f"{activity} runs eagerly, unchanged.",
        )

    def _refuse(self, key: str, reason: str, activity: str) -> None:
        """What cannot be graphed at all: raise with ``strict``, else warn once."""
        if self.strict:
            raise GraphCaptureError(f"CUDAGraphCallback: {reason}.")
        self._warn_once(
            key, f"CUDAGraphCallback: {reason}. {activity} runs eagerly, unchanged (without the CUDA graph speed-up)."
        )

    def _unsupported(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        """Why this fit cannot be graphed at all, if so."""
        reason = self._unsupported_setup(trainer) or self._takes_dataloader_iter(pl_module, "training_step")
        if reason is None and not pl_module.automatic_optimization and (
            trainer.world_size > 1 or internals.ddp_model(trainer) is not None
        ):
            # the ranks would have to agree on each manual step's path, which is not built yet
            reason = f"manual optimization is not graphed under the {type(trainer.strategy).__name__} strategy yet"
        return reason

    @staticmethod
    def _unsupported_setup(trainer: pl.Trainer, training: bool = True) -> str | None:
        """Why no step of this Trainer (no training step, or with ``training=False`` no
        evaluation step) can be graphed, if so."""
        reason = internals.strategy_unsupported(trainer)
        if reason is None and not training and trainer.world_size > 1:
            reason = f"evaluation steps are not graphed under the {type(trainer.strategy).__name__} strategy yet"
        if reason is not None:
            return reason
        if str(trainer.precision) not in _SUPPORTED_PRECISION:
            supported = ", ".join(f'"{p}"' for p in _SUPPORTED_PRECISION if p != "32")
            return f'precision="{trainer.precision}" is not graphed yet (supported: {supported})'
        if training and (getattr(trainer, "_detect_anomaly", False) or torch.is_anomaly_enabled()):
            return (
                "autograd's anomaly detection (`Trainer(detect_anomaly=True)` or `torch.autograd.set_detect_anomaly`) "
                "reads every gradient on the host during the backward pass to look for NaNs, which a CUDA graph "
                "cannot hold; train without it to get the graph speed-up"
            )
        return None

    @staticmethod
    def _graphed_by_the_compiler(pl_module: pl.LightningModule) -> str | None:
        """Names a part compiled to capture CUDA graphs of its own, which cannot be
        nested in the whole-step graph."""
        for name, compiled in compiled_parts(pl_module):
            if own_graphs(compiled):
                return (
                    f"`{name}` is compiled with CUDA graphs of its own (torch.compile mode \"reduce-overhead\" or "
                    "\"max-autotune\"), which cannot run inside the whole-step graph. CUDAGraphCallback already "
                    "graphs the whole step (forward, backward and optimizer): compile in the default mode "
                    "(`torch.compile(module)`, or mode=\"max-autotune-no-cudagraphs\") to get fused kernels inside "
                    "one whole-step graph"
                )
        return None

    @staticmethod
    def _takes_dataloader_iter(pl_module: pl.LightningModule, hook: str) -> str | None:
        if internals.takes_dataloader_iter(pl_module, hook):
            return f"`{hook}(self, dataloader_iter)` fetches its own batches, which a graph cannot replay"
        return None

    def _shared_pool(self) -> SharedPool:
        if self._pool is None:
            self._pool = SharedPool()
        return self._pool

    def _emit(self, message: str) -> None:
        rank_zero_warn(message, category=GraphWarning)

    # -- several ranks (DDP) -----------------------------------------------------------

    def _start_agreement(self, trainer: pl.Trainer) -> None:
        # "auto" agrees at every step: equal batch counts on every rank (which Lightning's
        # DistributedSampler guarantees) do not make equal batch shapes (variable-size
        # samples with batch_size=1, sizes drawn per rank), and ranks taking different
        # paths would hang in NCCL without a bound
        self._schedule = AgreementSchedule(self.rank_agreement != "boundaries")
        self._ranks = RankAgreement(self.agreement_timeout)
        self._agreement_stats = None
        # Lightning's own per-batch SIGTERM check reads an NCCL broadcast on the host, which
        # waits for the GPU at every step: asked over the agreement's Gloo group instead
        internals.patch_sigterm_broadcast(trainer, self._ranks.rank_zero_flag)

    def _agree_on_capture(self, outcome: CaptureOutcome, explanation: str | None) -> tuple[CaptureOutcome, str | None]:
        """After a capture on every rank: the outcome all act on. A capture that left
        DDP's reducer inside a backward pass on any rank gives graphs up on all of
        them, after resetting every reducer (its buckets are then rebuilt, which
        graphs captured before cannot follow)."""
        unfinished = internals.reducer_unfinished(self._ddp)
        agreed, explanation, any_unfinished = self._ranks.capture(outcome, explanation, unfinished)
        if any_unfinished:
            internals.reset_reducer(self._ddp)
            agreed = CaptureOutcome.FAILED
            explanation = explanation or "a capture failed inside DDP's backward pass on another rank"
        return agreed, explanation

    def _stop_agreement(self) -> None:
        if self._ranks is not None:
            self._agreement_stats = self.agreement_stats
            self._ranks.close()
            self._ranks = None
        self._schedule = None
        if self._ddp is not None:
            internals.restore_ddp_statistics(self._ddp)
            self._ddp = None

    # -- the step -------------------------------------------------------------------

    def _run_step(self, optimizer: torch.optim.Optimizer, batch_idx: int, kwargs: OrderedDict) -> dict:
        """Stands in for Lightning's automatic-optimization ``run``: one training step.
        (In manual optimization :class:`~lightning_graphs.manual.ManualSteps` does.)"""
        engine, trainer, run = self._engine, self._trainer, self._original_run
        replaced = internals.replaced_optimizers(engine, [optimizer])
        if replaced is not None:
            engine.disable(replaced)
        plan = engine.plan(kwargs["batch"], internals.step_variant(trainer, batch_idx))
        if self._ranks is not None:
            plan = agree_on_plan(self._ranks, self._schedule, plan, batch_idx, trainer.num_training_batches)
        if plan.action is Action.REPLAY:
            outputs = engine.replay(plan)
            internals.count_replayed_step(trainer, batch_idx)
            plan.graph.notes["logs"]()
            return internals.replayed_outputs(outputs, batch_idx)
        if plan.action is Action.WARMUP:
            probe = internals.StepProbe(trainer.lightning_module, capturing=False)
            with probe.active():
                watched = internals.with_batch(kwargs, kwargs["batch"], probe.watched_index(batch_idx))
                outputs = engine.warmup(lambda: run(optimizer, batch_idx, watched), plan)
            if probe.problem is not None:
                engine.disable(probe.problem)
            return outputs
        if plan.action is Action.CAPTURE:
            return self._capture_step(plan, optimizer, batch_idx, kwargs)
        engine.warn_fallback(plan, _RAGGED_ADVICE if plan.other_signature else "")
        return engine.eager(lambda: run(optimizer, batch_idx, kwargs), plan.reason)

    def _capture_step(self, plan: Any, optimizer: torch.optim.Optimizer, batch_idx: int, kwargs: OrderedDict) -> dict:
        engine, trainer, run = self._engine, self._trainer, self._original_run
        module = trainer.lightning_module
        progress = internals.progress_state(trainer)
        probe = internals.StepProbe(module, capturing=True)
        try:
            with probe.active():
                index = probe.watched_index(batch_idx)
                outputs = engine.capture(
                    plan,
                    lambda static_batch: run(optimizer, batch_idx, internals.with_batch(kwargs, static_batch, index)),
                )
        except CaptureDeferred:
            internals.restore_progress(trainer, progress)
            return self._run_step(optimizer, batch_idx, kwargs)  # planned again: an eager warm-up step
        except CaptureFailed as failure:
            internals.restore_progress(trainer, progress)
            engine.disable(failure.explanation, cause=failure)
            return engine.eager(lambda: run(optimizer, batch_idx, kwargs), "capture failed")
        self._retire_evaluation_graphs()
        return internals.finish_capture(engine, plan, probe, outputs)

    # -- evaluation (graph_evaluation=True) ------------------------------------------

    def _retire_evaluation_graphs(self) -> None:
        """After a training capture: evaluation graphs captured before it are captured anew.

        Training and evaluation graphs share one memory pool, so an evaluation graph
        costs little more than its static inputs. Sharing is safe when nothing one
        graph leaves in the pool must outlive a replay of another. Evaluation graphs
        leave nothing: their outputs are cloned and their logged values fed to
        Lightning right after each replay, before any other graph runs, and their
        static inputs are allocated outside the pool. Training graphs leave their
        gradients (``p.grad`` between steps, which accumulating graphs read). A
        capture only takes memory free at that time, so an evaluation graph captured
        after a training graph never writes over that graph's gradients; but a
        training graph captured after an evaluation graph may place its gradients in
        memory that evaluation graph uses for temporaries. Hence this: every training
        capture retires the evaluation graphs held, whose next call (its signature
        already warmed up) captures again.
        """
        for evaluation in self._evaluation.values():
            evaluation.retire_graphs()

    def _start_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.graph_evaluation:
            return
        evaluation = self._evaluation.get(stage)
        if evaluation is None:
            if not self._on_cuda(pl_module):
                self._off_cuda(pl_module, stage.capitalize())
                return
            reason = (
                self._unsupported_setup(trainer, training=False)
                or self._takes_dataloader_iter(pl_module, STAGE_HOOKS[stage])
                or self._graphed_by_the_compiler(pl_module)
            )
            if reason is not None:
                self._refuse(f"{stage}:unsupported", reason, stage.capitalize())
                return
            evaluation = self._evaluation[stage] = EvaluationGraphs(
                stage, lambda dataloader_idx: self._evaluation_engine(stage, pl_module)
            )
        evaluation.install(trainer)

    def _evaluation_engine(self, stage: str, pl_module: pl.LightningModule) -> GraphedStep:
        return GraphedStep(
            None,
            # two eager calls before the first capture (one for each later signature): the first
            # initialises lazily (cuBLAS, cuDNN), the second is checked for Python side effects, so
            # that a step collecting its outputs in a list is found before graph memory reaches it
            warmup_steps=2,
            max_graphs=self.max_graphs,
            modules=[pl_module],
            watch=[("self", pl_module)]
            + globals_fn_reads(getattr(type(pl_module), f"{stage}_step", None), type(pl_module)),
            follow=_datamodule(pl_module._trainer),
            strict=self.strict,
            # its own warning keys: a stage given up must not silence the training step's warning
            warn=lambda key, message: self._warn_once(f"{stage}:{key}", message),
            ignore_attribute=internals.ignore_framework_attribute,
            what=f"the {stage} step",
            input_name="batch",
            nvtx=self.nvtx,
            pool=self._shared_pool(),
            batch_end_hook=f"on_{stage}_batch_end",
            activity=stage.capitalize(),
        )

    def _end_evaluation(self, stage: str) -> None:
        evaluation = self._evaluation.get(stage)
        if evaluation is not None:
            evaluation.remove()  # its graphs stay for the next run of the stage (the next epoch's validation)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, pl_module, "validation")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, pl_module, "test")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_evaluation("test")

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, pl_module, "predict")

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_evaluation("predict")

    # -- keeping the graph honest ------------------------------------------------------

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is not None:
            self._engine.request_structure_check()
        if self._schedule is not None:
            self._schedule.boundary()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_evaluation("validation")
        if self._engine is not None:
            self._engine.request_structure_check()
        if self._schedule is not None:
            self._schedule.boundary()

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Save optimizer state as the user's unprepared optimizer would have."""
        if self._engine is None or "optimizer_states" not in checkpoint:
            return
        states = checkpoint["optimizer_states"]
        for index, optimizer in enumerate(trainer.optimizers[: len(states)]):
            states[index] = self._engine.user_optimizer_state(optimizer, states[index])

    # -- clean exit ------------------------------------------------------------------------

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stats = self.stats
        if stats is not None and self.verbose:
            rank_zero_info(f"CUDAGraphCallback: {stats.summary()}")
        self._report_evaluation()
        self._teardown(trainer)
        if stats is None:
            return
        if self.log_stats and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(stats.as_metrics(), step=trainer.global_step)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._teardown(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._report_evaluation()
        self._teardown(trainer)

    def _report_evaluation(self) -> None:
        if self.verbose:
            for stage, evaluation in self._evaluation.items():
                rank_zero_info(f"CUDAGraphCallback ({stage}): {evaluation.stats.summary()}")

    def _teardown(self, trainer: pl.Trainer) -> None:
        """Remove every patch, free the graphs, restore the optimizers. Safe to call twice."""
        self._teardown_training(trainer)
        for stage, evaluation in self._evaluation.items():
            self._last_evaluation_stats[stage] = evaluation.stats
            evaluation.close()
        self._evaluation = {}
        self._pool = None

    def _teardown_training(self, trainer: pl.Trainer) -> None:
        if self._original_run is not None:
            internals.unpatch_step_runner(self._trainer or trainer)
            self._original_run = None
        internals.unpatch_sigterm_broadcast(self._trainer or trainer)
        self._manual = None
        if self._engine is not None:
            self._last_stats = self._engine.stats
            self._engine.close()
            self._engine = None
        if self._uncompile is not None:
            self._uncompile()
            self._uncompile = None
        self._stop_agreement()
        self._trainer = None


def _each_once(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``(label, object)`` pairs without the later ones of an object already listed."""
    seen: set[int] = set()
    kept = []
    for label, obj in pairs:
        if id(obj) not in seen:
            seen.add(id(obj))
            kept.append((label, obj))
    return kept


def _datamodule(trainer: pl.Trainer | None) -> list[tuple[str, Any]]:
    """The fit's LightningDataModule, if any, to watch beside the module: a step may
    read a setting on it (``self.trainer.datamodule.noise``) that a hook changes."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    return [("self.trainer.datamodule", datamodule)] if datamodule is not None else []
