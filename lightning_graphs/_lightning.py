"""Every touch of Lightning's private loop internals, in one place.

A Lightning upgrade should mean reading this file and nothing else. What it relies
on (Lightning 2.4 to 2.6):

* ``trainer.fit_loop.epoch_loop.automatic_optimization.run(optimizer, batch_idx,
  kwargs)`` runs exactly one training step (training_step, zero_grad, backward,
  clipping, optimizer step) and returns ``{"loss": ..., **extra}``; ``kwargs`` holds
  ``batch`` and, if the step takes it, ``batch_idx``.
* that loop's ``optim_progress`` counts zero_grad and optimizer-step calls; the
  trainer's ``global_step`` is derived from it.
* with ``automatic_optimization = False``,
  ``trainer.fit_loop.epoch_loop.manual_optimization.run(kwargs)`` runs one training
  step instead (the user's ``training_step``, which calls ``manual_backward``,
  ``optimizer.step()`` and ``zero_grad()`` itself) and returns ``{"loss": ...,
  **extra}``, or ``{}`` for a step returning ``None``. Each ``step()`` of the
  ``LightningOptimizer`` wrappers in ``trainer.strategy._lightning_optimizers``
  advances that loop's ``optim_step_progress`` (ready before the step, completed
  after it), from which ``global_step`` is derived; nothing counts ``zero_grad``.
  Lightning steps no scheduler itself in manual optimization: the step does.
* ``LightningModule.log`` reads ``_current_fx_name`` to know which hook logs.
* under ``DDPStrategy`` (``strategy="ddp"``, ``"ddp_spawn"``, ...) the strategy's
  ``model`` is the ``DistributedDataParallel`` wrapper by ``on_train_start``
  (built under a side stream, as capture asks), ``_ddp_comm_hook`` and
  ``_model_averager`` hold a communication hook and post-local-SGD averaging, and
  ``trainer.num_training_batches`` is the same on every rank.
* with several ranks, ``trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor()``
  runs at the start of every training batch: rank zero's "received SIGTERM" flag
  is broadcast over NCCL and read on the host, and if set every rank passes a
  barrier and raises ``SIGTERMException``.
* the evaluation and prediction loops run each step through
  ``getattr(trainer.strategy, "validation_step")(*step_args)`` (likewise
  ``test_step`` and ``predict_step``), with ``step_args`` of ``(batch[, batch_idx]
  [, dataloader_idx])``: ``batch_idx`` when the step's signature takes it,
  ``dataloader_idx`` with several dataloaders. An instance attribute on the
  strategy therefore stands in for one stage's step.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import sys
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loops import _FitLoop, _TrainingEpochLoop
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch.nn.parallel import DistributedDataParallel

from lightning_graphs.batches import clone_tensors, flatten, unflatten
from lightning_graphs.graphed_step import ignore_torch_attribute
from lightning_graphs.metrics import is_metric, why_not_graphed
from lightning_graphs.python_state import WatchedInt, framework_module

# hooks that run inside one training step (automatic or manual optimization); their Python runs at capture only
IN_STEP_CALLBACK_HOOKS = ("on_before_zero_grad", "on_before_backward", "on_after_backward", "on_before_optimizer_step")
# the module's: those, and the step and the hooks it overrides for the optimizer loop
_MODULE_STEP_HOOKS = ("training_step", *IN_STEP_CALLBACK_HOOKS, "backward", "configure_gradient_clipping",
                      "optimizer_step", "optimizer_zero_grad")

_LIGHTNING_MODULE_ATTRIBUTES = frozenset(pl.LightningModule().__dict__)

_MISSING = object()


def ignore_framework_attribute(obj: Any, name: str) -> bool:
    """Attributes Lightning and PyTorch manage themselves (not side effects of a user's step)."""
    if isinstance(obj, pl.LightningModule):
        return name in _LIGHTNING_MODULE_ATTRIBUTES
    return ignore_torch_attribute(obj, name)


def automatic_optimization_loop(trainer: pl.Trainer) -> Any:
    return trainer.fit_loop.epoch_loop.automatic_optimization


def manual_optimization_loop(trainer: pl.Trainer) -> Any:
    return trainer.fit_loop.epoch_loop.manual_optimization


def patch_step_runner(trainer: pl.Trainer, runner: Callable[..., Any]) -> Callable[..., Any]:
    """Route every training step through ``runner``; returns the original ``run``.

    The loop is the one the module's ``automatic_optimization`` selects: the
    automatic loop's ``run(optimizer, batch_idx, kwargs)`` or the manual loop's
    ``run(kwargs)``."""
    manual = not trainer.lightning_module.automatic_optimization
    loop = manual_optimization_loop(trainer) if manual else automatic_optimization_loop(trainer)
    original = loop.run
    loop.run = runner
    return original


def patch_sigterm_broadcast(trainer: pl.Trainer, rank_zero_flag: Callable[[bool], bool]) -> None:
    """Under several ranks, decide Lightning's per-batch "did rank zero receive
    SIGTERM" with ``rank_zero_flag`` (the callback: an all-reduce over Gloo, on the
    host) instead of an NCCL broadcast read back on the host, which waits for every
    step the GPU has queued: the host could never run ahead of the GPU. Every rank
    stops as Lightning's own check stops it."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def broadcast_sigterm() -> None:
        if rank_zero_flag(bool(getattr(trainer, "received_sigterm", False))):
            with contextlib.suppress(Exception):
                torch.distributed.barrier()  # as Lightning does: every rank gets here before any exits
            raise SIGTERMException()

    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = broadcast_sigterm


def unpatch_sigterm_broadcast(trainer: pl.Trainer) -> None:
    """Give the epoch loop its own SIGTERM broadcast back. Safe to call twice."""
    trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)


def unpatch_step_runner(trainer: pl.Trainer) -> None:
    """Give both loops their own ``run`` back. Safe to call twice."""
    for loop in (automatic_optimization_loop(trainer), manual_optimization_loop(trainer)):
        loop.__dict__.pop("run", None)


def progress_state(trainer: pl.Trainer) -> dict:
    """The step counters of both optimization loops, for :func:`restore_progress`."""
    return {
        "automatic": automatic_optimization_loop(trainer).optim_progress.state_dict(),
        "manual": manual_optimization_loop(trainer).optim_step_progress.state_dict(),
    }


def restore_progress(trainer: pl.Trainer, state: dict) -> None:
    automatic_optimization_loop(trainer).optim_progress.load_state_dict(state["automatic"])
    manual_optimization_loop(trainer).optim_step_progress.load_state_dict(state["manual"])


def manual_step_counts(trainer: pl.Trainer) -> tuple[int, int]:
    """How many manual optimizer steps were started (ready) and completed in this fit."""
    total = manual_optimization_loop(trainer).optim_step_progress.total
    return total.ready, total.completed


def count_replayed_manual_step(trainer: pl.Trainer, ready: int, completed: int) -> None:
    """Advance the manual loop's counters as one eager ``run`` whose optimizers
    stepped that often would (``LightningOptimizer.step`` increments them)."""
    loop = manual_optimization_loop(trainer)
    progress = loop.optim_step_progress
    for _ in range(ready):
        progress.increment_ready()
    for _ in range(completed):
        progress.increment_completed()
    loop._restarting = False


def lightning_optimizers(trainer: pl.Trainer) -> list[Any]:
    """The ``LightningOptimizer`` wrappers ``self.optimizers()`` hands the step."""
    return list(trainer.strategy._lightning_optimizers)


@contextmanager
def watching_manual_calls(
    trainer: pl.Trainer,
    on_optimizer_call: Callable[[str, int], None],
    on_scheduler_step: Callable[[int, Callable[..., Any], tuple, dict], Any],
) -> Iterator[None]:
    """Within the block, tell ``on_optimizer_call(name, index)`` of each ``step()``
    and ``zero_grad()`` of a ``LightningOptimizer`` (by its index in
    ``trainer.optimizers``, before the call runs), and hand every ``step()`` of a
    scheduler from ``configure_optimizers`` (by its index in
    ``trainer.lr_scheduler_configs``) to ``on_scheduler_step(index, original, args,
    kwargs)``, which decides whether and when ``original`` runs.

    Instance attributes stand in for the methods; whatever was there before is put
    back on exit, also on errors."""
    patched: list[tuple[Any, str, Any]] = []  # (object, method name, its own instance attribute or _MISSING)

    def install(obj: Any, name: str, stand_in: Callable[..., Any]) -> None:
        patched.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, stand_in)

    def optimizer_stand_in(name: str, index: int, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            on_optimizer_call(name, index)
            return original(*args, **kwargs)

        return call

    def scheduler_stand_in(index: int, original: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args, **kwargs: on_scheduler_step(index, original, args, kwargs)

    try:
        for index, optimizer in enumerate(lightning_optimizers(trainer)):
            install(optimizer, "step", optimizer_stand_in("step", index, optimizer.step))
            zero_grad = optimizer.__dict__.get("zero_grad")
            if zero_grad is None:
                # the wrapper's class method would zero the gradients itself; the wrapped
                # optimizer's own `zero_grad` is the one a capture watches
                zero_grad = optimizer.optimizer.zero_grad
            install(optimizer, "zero_grad", optimizer_stand_in("zero_grad", index, zero_grad))
        for index, config in enumerate(trainer.lr_scheduler_configs):
            install(config.scheduler, "step", scheduler_stand_in(index, config.scheduler.step))
        yield
    finally:
        for obj, name, own in reversed(patched):
            if own is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, own)


def end_unfinished_manual_step(trainer: pl.Trainer) -> None:
    """After a capture that failed inside a ``LightningOptimizer.step()``: the manual
    loop started its ``optimizer_step`` profiler action and never stopped it, and the
    eager re-run would start it again (an error with ``profiler="simple"``)."""
    progress = manual_optimization_loop(trainer).optim_step_progress.total
    if progress.ready > progress.completed:
        try:
            trainer.profiler.stop("optimizer_step")
        except Exception:  # a profiler that was not timing it
            pass


def replaced_optimizers(engine: Any, optimizers: Sequence[Any]) -> str | None:
    """Why ``engine``'s graphs cannot step ``optimizers`` (the ones a step is run with now),
    if one of them is not among those it was prepared for."""
    replaced = [optimizer for optimizer in optimizers if not engine.prepared_for(optimizer)]
    if not replaced:
        return None
    return (
        f"the Trainer's optimizers were replaced during the fit (now a {type(replaced[0]).__name__}), after the "
        "graphs were prepared for the ones `configure_optimizers` returned"
    )


def count_replayed_step(trainer: pl.Trainer, batch_idx: int) -> None:
    """Advance the progress counters exactly as one eager ``run`` would."""
    loop = automatic_optimization_loop(trainer)
    progress = loop.optim_progress.optimizer
    if not loop._skip_backward and batch_idx % trainer.accumulate_grad_batches == 0:
        progress.zero_grad.increment_ready()
        progress.zero_grad.increment_started()
        progress.zero_grad.increment_completed()
    if not trainer.fit_loop._should_accumulate():
        progress.step.increment_ready()
        progress.step.increment_completed()


def step_variant(trainer: pl.Trainer, batch_idx: int) -> tuple:
    """What tells apart the programs ``run`` executes for batches of one signature.

    The Trainer's clipping settings ``(gradient_clip_val, gradient_clip_algorithm)``,
    which Lightning reads inside the step and a callback may change between steps.
    With gradient accumulation, before them: a micro-step zeroes the gradients (the
    first of a cycle) or not, steps the optimizer (the last of a cycle, or the
    epoch's last batch) or not, and divides the loss by the cycle length (which a
    ``GradientAccumulationScheduler`` changes): ``(every, skip_backward, zeroes,
    steps)``."""
    loop = automatic_optimization_loop(trainer)
    every = trainer.accumulate_grad_batches
    clipping = (trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
    if every == 1 and not loop._skip_backward:
        return clipping
    return (every, loop._skip_backward, batch_idx % every == 0, not trainer.fit_loop._should_accumulate()) + clipping


# DDP samples runtime statistics (timed with CUDA events, read on the host) in its
# first 10 iterations and then every this many; the reducer's default
_DDP_STATS_SAMPLE_RATE = 100


def ddp_model(trainer: pl.Trainer) -> DistributedDataParallel | None:
    """The ``DistributedDataParallel`` module the strategy trains through, if any."""
    model = trainer.strategy.model
    return model if isinstance(model, DistributedDataParallel) else None


def strategy_unsupported(trainer: pl.Trainer) -> str | None:
    """Why the Trainer's strategy cannot be graphed, if so: one device and DDP can."""
    strategy = trainer.strategy
    name = type(strategy).__name__
    if isinstance(strategy, SingleDeviceStrategy) and trainer.world_size == 1:
        return None
    ddp = ddp_model(trainer)
    if not isinstance(strategy, DDPStrategy) or ddp is None:
        return (
            f"the {name} strategy is not graphed yet (graphs need one CUDA device, or DDP: "
            "`strategy=\"ddp\"`)"
        )
    if strategy.root_device.type != "cuda":
        return f"{name} trains on {strategy.root_device}; CUDA graphs need CUDA devices"
    if ddp.find_unused_parameters and not ddp.static_graph:
        return (
            "DDP with `find_unused_parameters=True` reads which parameters were used on the host at every step, "
            "which a graph cannot repeat; pass `DDPStrategy(static_graph=True)` if the same parameters are used "
            "at every step, or leave `find_unused_parameters` off"
        )
    if getattr(strategy, "_ddp_comm_hook", None) is not None or getattr(strategy, "_model_averager", None) is not None:
        return "a DDP communication hook or model averaging (post-local SGD) is not graphed yet"
    if getattr(ddp, "_use_python_reducer", False):
        return "DDP's Python reducer (compiled DDP) is not graphed yet"
    return None


def quiet_ddp_statistics(ddp: DistributedDataParallel) -> None:
    """Stop DDP sampling runtime statistics after its first 10 iterations: a sampled
    iteration records CUDA events and the next one reads them on the host, which
    must not happen while a step is being captured (warm-up covers the first 10)."""
    ddp._set_ddp_runtime_logging_sample_rate(2**31 - 1)


def restore_ddp_statistics(ddp: DistributedDataParallel) -> None:
    ddp._set_ddp_runtime_logging_sample_rate(_DDP_STATS_SAMPLE_RATE)


def reducer_unfinished(ddp: DistributedDataParallel) -> bool:
    """Whether DDP's reducer was left inside a backward pass (a capture that failed
    there), in which state the next iteration raises."""
    try:
        ddp._check_reducer_finalized()
    except RuntimeError:
        return True
    return False


def reset_reducer(ddp: DistributedDataParallel) -> None:
    """Let the next iteration start afresh after an unfinished backward. Its buckets
    are rebuilt after the next iteration, with a collective: every rank must reset."""
    ddp.reducer._reset_state()


def with_batch(kwargs: OrderedDict, batch: Any, batch_idx: Any) -> OrderedDict:
    """``kwargs`` for ``training_step`` with another batch and batch index, in the same order."""
    replaced = OrderedDict(kwargs)
    replaced["batch"] = batch
    if "batch_idx" in replaced:
        replaced["batch_idx"] = batch_idx
    return replaced


def takes_dataloader_iter(module: pl.LightningModule, hook: str = "training_step") -> bool:
    try:
        parameters = inspect.signature(getattr(module, hook)).parameters
    except (TypeError, ValueError):
        return False
    return "dataloader_iter" in parameters


def in_step_callbacks(trainer: pl.Trainer, exclude: Any) -> list[pl.Callback]:
    """Callbacks overriding a hook that runs inside the step (their Python runs at capture only)."""
    return [
        callback for callback in trainer.callbacks
        if callback is not exclude and any(_own_hook(callback, pl.Callback, hook) for hook in IN_STEP_CALLBACK_HOOKS)
    ]


def in_step_functions(trainer: pl.Trainer, module: pl.LightningModule, exclude: Any) -> list[tuple[Callable, Any]]:
    """``(function, owner)`` for the user's code that runs inside one training step:
    ``training_step`` and the module's other hooks that run within the step, and the
    in-step hooks of its callbacks. Their Python runs at capture only, so what they
    change each time (a history list, a counter) must be found in warm-up."""
    found = [_own_hook(module, pl.LightningModule, hook) for hook in _MODULE_STEP_HOOKS]
    for callback in in_step_callbacks(trainer, exclude):
        found += [_own_hook(callback, pl.Callback, hook) for hook in IN_STEP_CALLBACK_HOOKS]
    return [pair for pair in found if pair is not None]


def _own_hook(obj: Any, base: type, hook: str) -> tuple[Callable, Any] | None:
    """``(function, owner)`` for ``obj``'s own ``hook``: a function set on the instance
    (as ``LambdaCallback`` holds them; owner ``None``) or a method its class overrides;
    ``None`` where ``base``'s runs."""
    own = getattr(obj, "__dict__", {}).get(hook)
    if callable(own):
        return own, None
    method = getattr(type(obj), hook, None)
    return (method, type(obj)) if method is not None and method is not getattr(base, hook, None) else None



class StrategyStepPatch:
    """``trainer.strategy.<hook>`` (``"validation_step"``, ``"test_step"``,
    ``"predict_step"``) routed through ``stand_in`` until :meth:`remove`.

    ``original`` is the strategy's own step (precision context, forward redirection),
    which the stand-in calls to run the user's step."""

    def __init__(self, trainer: pl.Trainer, hook: str, stand_in: Callable[..., Any]) -> None:
        self.strategy = trainer.strategy
        self.hook = hook
        self.original = getattr(self.strategy, hook)
        self._shadowed = self.strategy.__dict__.get(hook, _MISSING)  # an instance attribute set before ours
        setattr(self.strategy, hook, stand_in)

    def remove(self) -> None:
        """Give the strategy its step back. Safe to call twice."""
        if self.strategy is None:
            return
        if self._shadowed is _MISSING:
            self.strategy.__dict__.pop(self.hook, None)
        else:
            setattr(self.strategy, self.hook, self._shadowed)
        self.strategy = None


@dataclass
class EvaluationCall:
    """The arguments of one ``validation_step``/``test_step``/``predict_step`` call,
    told apart: the batch, the batch index (if the step takes it) and the dataloader
    index (with several dataloaders)."""

    args: tuple
    batch_idx_at: int | None  # position of ``batch_idx`` in ``args``
    dataloader_idx: int | None

    @property
    def batch(self) -> Any:
        return self.args[0]

    @property
    def batch_idx(self) -> int | None:
        return None if self.batch_idx_at is None else self.args[self.batch_idx_at]

    def with_batch(self, batch: Any, batch_idx: Any) -> tuple:
        """The positional arguments with another batch and batch index."""
        args = list(self.args)
        args[0] = batch
        if self.batch_idx_at is not None:
            args[self.batch_idx_at] = batch_idx
        return tuple(args)


def evaluation_call(module: pl.LightningModule, hook: str, args: tuple, kwargs: dict) -> EvaluationCall | None:
    """Which argument is which, as the loops built them; ``None`` for a call they do not make."""
    if not args or kwargs or len(args) > 3:
        return None
    takes_batch_idx = is_param_in_hook_signature(getattr(module, hook), "batch_idx", min_args=2)
    batch_idx_at = 1 if takes_batch_idx and len(args) >= 2 else None
    extra = len(args) - 1 - (batch_idx_at is not None)
    dataloader_idx = args[-1] if extra == 1 else None
    if extra > 1 or (dataloader_idx is not None and not isinstance(dataloader_idx, int)):
        return None
    return EvaluationCall(args, batch_idx_at, dataloader_idx)


@dataclass
class LogCall:
    """One ``self.log`` call made while the step was captured."""

    fx: str | None  # the hook that logged (``_current_fx_name``)
    name: str
    value: Any  # a tensor in graph memory, refreshed by every replay
    kwargs: dict[str, Any] = field(default_factory=dict)


def _frameworks_frame(frame: Any) -> bool:
    """Whether ``frame`` runs PyTorch's, Lightning's, torchmetrics' or this library's code."""
    return framework_module(frame.f_globals.get("__name__"))


_BUFFER_ADVICE = (
    "give the step what it needs from it in a tensor of the module's own that a hook updates in place "
    "(`self.weight.fill_(value)` in `on_train_batch_start`): a replay reads the tensor's new value"
)


class StepProbe:
    """Watches one eager or captured step (training, validation, test or predict)
    for what a replay cannot repeat.

    While active it stands in for ``LightningModule.log`` (recording calls during
    capture, forwarding them during warm-up), hands ``training_step`` a
    :class:`WatchedInt` as ``batch_idx``, and notes reads of ``self.global_step``,
    ``self.current_epoch``, the trainer's counterparts,
    ``self.trainer.is_last_batch`` and the schedulers' ``get_last_lr()`` from inside
    the step.
    ``problem`` is the first finding, as a sentence; ``what`` names the step in it
    and ``batch_end_hook`` is the hook it suggests instead.
    """

    # (``is_last_batch`` exists on the Trainer only: a step that steps a scheduler at the epoch's end reads it)
    _WATCHED_PROPERTIES = ("global_step", "current_epoch", "is_last_batch")
    # values the fit changes between steps that user code may read from the Trainer or its
    # loops (only reads from the user's own code count: Lightning's are its business)
    _WATCHED_TRAINER_VALUES = (
        (pl.Trainer, "self.trainer", ("callback_metrics", "logged_metrics", "progress_bar_metrics")),
        (_FitLoop, "self.trainer.fit_loop", ("total_batch_idx", "batch_idx")),
        (_TrainingEpochLoop, "self.trainer.fit_loop.epoch_loop", ("total_batch_idx", "batch_idx")),
    )
    # hooks in which user code runs and Lightning itself reads no epoch or step counter
    _USER_HOOKS = frozenset(
        {"training_step", "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
         "backward", "configure_gradient_clipping", "validation_step", "test_step", "predict_step"}
    )
    # hooks in which user code runs and so does Lightning's, which reads the epoch counter there
    # to call the next hook: in these, reads from code outside the frameworks count
    _SHARED_HOOKS = frozenset({"optimizer_step", "optimizer_zero_grad"})

    def __init__(
        self,
        module: pl.LightningModule,
        capturing: bool,
        what: str = "the training step",
        batch_end_hook: str = "on_train_batch_end",
    ) -> None:
        self.module = module
        self.capturing = capturing
        self.what = what
        self.batch_end_hook = batch_end_hook
        self.calls: list[LogCall] = []
        self.problem: str | None = None
        self._log = module.log
        self._log_signature = inspect.signature(self._log)

    def note(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem

    def watched_index(self, batch_idx: int) -> WatchedInt:
        return WatchedInt(
            batch_idx,
            lambda: self.note(
                f"{self.what} reads `batch_idx` (to branch, count or log). A CUDA graph would replay the path "
                f"of the captured batch for every batch. Do what depends on it in `{self.batch_end_hook}`, which "
                "gets `batch_idx` at every step" + (" (and accumulate gradients with "
                                                    "`Trainer(accumulate_grad_batches=N)`)"
                                                    if self.batch_end_hook == "on_train_batch_end" else "")
            ),
        )

    def _logged(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        bound = self._log_signature.bind(name, value, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("name"), arguments.pop("value")
        arguments.update(arguments.pop("kwargs", {}))
        self._check_logged_value(name, value)
        if not self.capturing:
            self._log(name, value, **arguments)
            return
        value = clone_tensors(value, lambda t: t.detach().clone())  # a graph output the replays refresh
        self.calls.append(LogCall(self.module._current_fx_name, name, value, arguments))

    def _check_logged_value(self, name: str, value: Any) -> None:
        leaves, _ = flatten(value)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                continue
            if is_metric(leaf):
                reason = why_not_graphed(leaf)
                if reason is not None:
                    self.note(
                        f"`self.log({name!r}, ...)` logs the torchmetrics {type(leaf).__name__} from inside the step, "
                        f"and {reason}. Or update and log the metric in `{self.batch_end_hook}`"
                    )
            elif isinstance(leaf, numbers.Number):
                self.note(
                    f"`self.log({name!r}, {leaf!r})` logs a Python number from inside the step; a replay cannot "
                    f"recompute it. Log a tensor, or log the number from `{self.batch_end_hook}`"
                )

    def _user_code(self, caller: Any) -> bool:
        """Whether the frame ``caller`` runs the user's code inside the step (which a replay would not run
        again), rather than Lightning's."""
        hook = self.module._current_fx_name
        return hook in self._USER_HOOKS or (hook in self._SHARED_HOOKS and not _frameworks_frame(caller))

    def _watch_property(self, owner: type, name: str, module_level: bool,
                        where: str | None = None) -> tuple[type, str, Any] | None:
        """``owner.name`` notes a read from the step (with ``where``, the user's name for
        the owner: only reads from code outside the frameworks count)."""
        original = owner.__dict__.get(name)
        if not isinstance(original, property):
            return None
        probe = self

        def read(instance: Any) -> Any:
            caller = sys._getframe(1)
            if where is not None and _frameworks_frame(caller):
                return original.fget(instance)
            if module_level or probe._user_code(caller):
                owner_name = where or ("self" if module_level else "self.trainer")
                probe.note(
                    f"{probe.what} reads `{owner_name}.{name}`; a CUDA graph would replay the captured step's "
                    f"Python decisions at every step. Do what depends on it in `{probe.batch_end_hook}` or at the "
                    "epoch's end" + (" (a scheduler stepped per epoch: `interval: \"epoch\"`, or in "
                                     "`on_train_epoch_end`)" if probe.batch_end_hook == "on_train_batch_end" else "")
                    + f", or {_BUFFER_ADVICE}"
                )
            return original.fget(instance)

        setattr(owner, name, property(read))
        return owner, name, original

    def _watch_scheduler_reads(self, patched: list[tuple[type, str, Any]]) -> None:
        """The classes of the fit's learning-rate schedulers get a ``get_last_lr`` and a
        ``last_epoch`` that note a call or read on one of them from inside the step
        (``(class, name, own attribute)`` added to ``patched``): the scheduler changes
        those host values between steps, and a replay would keep the captured ones.
        (On the class, not the instance: a scheduler's ``state_dict`` holds its
        instance attributes.)"""
        trainer = getattr(self.module, "_trainer", None)
        configs = getattr(trainer, "lr_scheduler_configs", None) or []
        watched = {id(config.scheduler) for config in configs}
        probe = self
        for cls in dict.fromkeys(type(config.scheduler) for config in configs):
            original = getattr(cls, "get_last_lr", None)
            if not callable(original):
                continue

            def get_last_lr(scheduler: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                if id(scheduler) in watched and probe._user_code(sys._getframe(1)):
                    probe.note(
                        f"{probe.what} reads `get_last_lr()` of its {type(scheduler).__name__} scheduler, a host "
                        "value the scheduler changes outside the step; a CUDA graph would keep the captured value "
                        "at every replay. Log the learning rate with Lightning's `LearningRateMonitor` or from "
                        f"`{probe.batch_end_hook}`"
                    )
                return _original(scheduler, *args, **kwargs)

            own = cls.__dict__.get("get_last_lr", _MISSING)
            try:
                cls.get_last_lr = get_last_lr
            except Exception:  # a class that takes no new attributes: its reads go unnoticed
                continue
            patched.append((cls, "get_last_lr", own))  # (at once: an interruption leaves nothing patched unnoted)
            if not any("last_epoch" in klass.__dict__ for klass in cls.__mro__):  # (an attribute of the instance)
                cls.last_epoch = self._watched_step_count(watched)
                patched.append((cls, "last_epoch", _MISSING))

    def _watched_step_count(self, watched: set[int]) -> property:
        """A scheduler's ``last_epoch`` (the count of its steps, kept in the instance as
        ever) that notes a read from the step on one of the fit's schedulers."""
        probe = self

        def read(scheduler: Any) -> Any:
            caller = sys._getframe(1)
            # (a scheduler stepped in the step reads its own count: PyTorch's code, or its own method)
            own = caller.f_locals.get("self") is scheduler or _frameworks_frame(caller)
            if id(scheduler) in watched and not own and probe._user_code(caller):
                probe.note(
                    f"{probe.what} reads `last_epoch` of its {type(scheduler).__name__} scheduler, a count the "
                    "scheduler changes outside the step; a CUDA graph would keep the captured value at every "
                    f"replay. Instead, {_BUFFER_ADVICE}"
                )
            try:
                return scheduler.__dict__["last_epoch"]
            except KeyError:
                raise AttributeError("last_epoch") from None

        def write(scheduler: Any, value: Any) -> None:
            scheduler.__dict__["last_epoch"] = value

        return property(read, write)

    def _watch_counter_arguments(self, hook: str) -> bool:
        """A user's ``optimizer_step`` or ``optimizer_zero_grad`` gets its ``epoch`` and
        ``batch_idx`` as :class:`WatchedInt`: one that skips or delays steps by them
        takes a path a replay cannot follow."""
        if getattr(type(self.module), hook) is getattr(pl.LightningModule, hook):
            return False  # Lightning's own passes them along unread
        original = getattr(self.module, hook)
        probe = self

        def watched(epoch: Any, batch_idx: Any, *args: Any, **kwargs: Any) -> Any:
            def reads(argument: str) -> Callable[[], None]:
                return lambda: probe.note(
                    f"`{hook}` reads its `{argument}` argument (to branch, count or log). A CUDA graph would "
                    "replay the captured step's decisions at every step. To step every N batches, use "
                    "`Trainer(accumulate_grad_batches=N)`"
                )

            return original(WatchedInt(epoch, reads("epoch")), WatchedInt(batch_idx, reads("batch_idx")), *args,
                            **kwargs)

        self.module.__dict__[hook] = watched
        return True

    @contextmanager
    def active(self) -> Iterator[StepProbe]:
        """Install the stand-ins; everything is restored on exit, also on errors."""
        saved_fx = self.module._current_fx_name
        patched, wrapped, schedulers = [], [], []
        self.module.log = self._logged
        try:
            self._watch_scheduler_reads(schedulers)
            for name in self._WATCHED_PROPERTIES:
                patched.append(self._watch_property(pl.LightningModule, name, module_level=True))
                patched.append(self._watch_property(pl.Trainer, name, module_level=False))
            for owner, where, names in self._WATCHED_TRAINER_VALUES:
                for name in names:
                    patched.append(self._watch_property(owner, name, module_level=False, where=where))
            for hook in ("optimizer_step", "optimizer_zero_grad"):
                own = self.module.__dict__.get(hook, _MISSING)  # a user's own instance attribute, kept
                if self._watch_counter_arguments(hook):
                    wrapped.append((hook, own))
            yield self
        finally:
            for owner, name, original in (p for p in reversed(patched) if p is not None):
                setattr(owner, name, original)
            for cls, name, own in reversed(schedulers):
                if own is _MISSING:
                    delattr(cls, name)
                else:
                    setattr(cls, name, own)
            self.module.__dict__.pop("log", None)
            for hook, own in wrapped:
                if own is _MISSING:
                    self.module.__dict__.pop(hook, None)
                else:
                    self.module.__dict__[hook] = own
            self.module._current_fx_name = saved_fx


def replay_logs(module: pl.LightningModule, calls: list[LogCall]) -> None:
    """Log what the captured step logged, with the values of the latest replay,
    through ``LightningModule.log`` (its checks, its slot registration)."""
    saved = module._current_fx_name
    try:
        for call in calls:
            module._current_fx_name = call.fx
            module.log(call.name, call.value, **call.kwargs)
    finally:
        module._current_fx_name = saved


class LogReplayer:
    """Feeds the captured step's ``self.log`` calls to Lightning after every replay.

    The first time (and whenever Lightning's result collection is another one or
    lacks a slot) every call goes through ``LightningModule.log``, which validates
    it and registers its result slot. Later replays put each value (a tensor or a
    torchmetrics object) straight into its slot doing what ``log`` does for a value
    already registered with these arguments (reset at a new epoch, batch size,
    accumulate) and skipping what cannot change between replays (argument
    checks, moving the slot to the value's device), which costs more host time
    per value than a small model's whole replay. The values and reductions users see are the same.
    """

    def __init__(self, module: pl.LightningModule, calls: list[LogCall]) -> None:
        self.module = module
        self.calls = calls
        self._direct = all(isinstance(call.value, torch.Tensor) or is_metric(call.value) for call in calls)
        self._results: Any = None  # the result collection whose slots were registered
        self._keys = [f"{call.fx}.{call.name}" for call in self.calls]

    def __call__(self) -> None:
        if not self.calls:  # nothing logged (a predict step: its loop keeps no results)
            return
        trainer = self.module.trainer
        results = trainer._results
        if (
            not self._direct
            or results is not self._results
            or results.dataloader_idx is not None
            or any(key not in results for key in self._keys)
        ):
            replay_logs(self.module, self.calls)
            self._results = results
        else:
            connector = trainer._logger_connector
            for call, key in zip(self.calls, self._keys):
                if connector.should_reset_tensors(call.fx):
                    results.reset(metrics=False, fx=call.fx)  # the first batch of an epoch
                slot = results[key]
                batch_size = results._extract_batch_size(slot, call.kwargs.get("batch_size"), slot.meta)
                # for a tensor, ``update`` stores results of its own arithmetic, never the value
                # itself; a torchmetrics object is kept as it is (its batch value read from it)
                value = call.value.squeeze() if isinstance(call.value, torch.Tensor) else call.value
                results.update_metrics(key, value, batch_size)
                connector._current_fx = call.fx


def replayed_outputs(outputs: Any, batch_idx: Any) -> Any:
    """A replayed step's outputs as a value of their own: tensors cloned (the next
    replay overwrites graph memory), containers new (callbacks may write into the
    ``outputs`` they are given), and this batch's index where the captured step
    returned its own (``{"loss": loss, "idx": batch_idx}``), which a graph cannot
    replay."""
    leaves, tree = flatten(outputs)
    return unflatten(tree, [
        batch_idx if isinstance(leaf, WatchedInt) else leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf
        for leaf in leaves
    ])


def finish_capture(engine: Any, plan: Any, probe: StepProbe, outputs: Any) -> Any:
    """After a step (training or evaluation) was captured and run once from its graph:
    feed what it logged to Lightning, after this and every later replay of the graph,
    and give up graphs if the probe found something a replay cannot repeat (this
    step itself ran correctly). Returns the step's outputs, cloned."""
    replay_logs = LogReplayer(probe.module, probe.calls)
    plan.graph.notes["logs"] = replay_logs
    if probe.problem is not None:
        engine.disable(probe.problem)
    replay_logs()
    return clone_tensors(outputs)

