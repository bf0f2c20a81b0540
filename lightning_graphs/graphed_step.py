"""Capture a whole step once as a CUDA graph and replay it for every later input
of the same signature; run everything else eagerly.

This is the framework-free core. :class:`GraphedStep` takes a step function
(forward, loss, backward, optimizer step; or a pure simulation update) and the
optimizers and modules it touches, and decides per call:

* **warm-up**: the first calls run eagerly on a side stream, as PyTorch's capture
  recipe asks, so that lazy initialisation (optimizer state, cuBLAS workspaces)
  happens outside the graph. They are real steps.
* **capture**: the next call is recorded into a graph reading static copies of its
  inputs, then replayed once, which executes that step.
* **replay**: later calls whose inputs have the captured signature are copied into
  the static inputs and replayed, with live hyper-parameters refreshed first.
* **eager**: anything else (another shape, a stale graph that cannot be recaptured,
  a step that cannot be graphed) runs as written.

Example::

    model = Net().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=1000)

    def train_step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    step = GraphedStep(train_step, optimizers=[opt], modules=[model])
    for x, y in loader:
        loss = step(x, y)  # a tensor of its own: it survives the next replay
        sched.step()  # float learning rates reach the graph before the next replay
    step.close()  # optimizer settings back as the user made them

Requirements of the step (each is checked where it can be; a step that breaks one
runs eagerly with one warning saying why):

* no host synchronisation: no ``.item()``, ``print(tensor)``, ``if tensor:``,
  ``torch.tensor(number, device="cuda")``; data-dependent output shapes neither;
* no Python side effects that must happen every step: the replay repeats GPU work
  only (appending to a list, counting in an attribute, rebinding a tensor attribute,
  drawing from Python's ``random`` or ``np.random``: draw with torch on the device);
* the optimizer's hyper-parameters are written outside the step (schedulers are);
* Python values the step reads (an attribute holding a temperature or a flag) are
  baked in at capture: after changing one, call :meth:`request_structure_check`.

Debugging a failed capture: the warning names the user line that broke it. To
find host synchronisations in general, run one eager step under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import gc
import numbers
import operator
import threading
import time
import weakref
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch

from lightning_graphs.amp import graph_safe_grad_scalers, scaler_of
from lightning_graphs.batches import (
    BatchSignature,
    StaticBatch,
    clone_tensors,
    describe_mismatch,
    differs_in_a_tensor,
    flatten,
    leaf_paths,
    signature_of,
    unflatten,
)
from lightning_graphs.capture_errors import explain_capture_error
from lightning_graphs.compiled import is_recompile_refusal, no_compilation
from lightning_graphs.messages import GraphCaptureError, WarnOnce
from lightning_graphs.metrics import InStepMetrics, MetricUpdate
from lightning_graphs.module_structure import STRUCTURE_CHANGED, ModuleStructure, parameters_key
from lightning_graphs.optimizers import GraphSafeOptimizer
from lightning_graphs.output import output_noticed
from lightning_graphs.python_state import (
    StateFingerprint,
    StepReads,
    functions_read,
    globals_loaded,
    host_random_draws,
    host_random_state,
    what_fn_reads,
)
from lightning_graphs.step_reach import (
    iterator_held,
    optimizer_hooks,
    optimizers_stepped,
    scaler_not_given,
    schedulers_stepped,
)

__all__ = [
    "GraphedStep", "Phase", "Action", "StepPlan", "GraphStats", "CapturedGraph", "CaptureFailed", "CaptureDeferred",
    "SharedPool", "CaptureOutcome",
]

# a graph dropped as stale after fewer replays than this counts as "thrashing"
_SHORT_LIVED_REPLAYS = 4
# this many short-lived graphs in a row and re-capturing costs more than it saves
_MAX_SHORT_LIVED = 3
# graphs held per signature at most (the kinds of accumulation micro-step), times max_graphs
_VARIANTS_PER_SIGNATURE = 4
# warm-up calls waiting for an optimizer step before concluding the step takes none
_MAX_UNREADY_WARMUPS = 64
# captures in a row put off because torch.compile still had to compile, before giving up
_MAX_DEFERRED_CAPTURES = 3
# warm-up steps in a row, no graph held, whose inputs' signature had not been seen: past this, none recurs
_MAX_UNREPEATED = 64

_MODULE_ATTRIBUTES = frozenset(torch.nn.Module().__dict__)


class Phase(Enum):
    """Where a :class:`GraphedStep` stands."""

    WARMING_UP = "warming up"  # eager steps on the side stream until capture
    CAPTURED = "captured"  # a graph is ready for inputs of its signature
    DISABLED = "disabled"  # graphs were given up; every call runs eagerly


class Action(Enum):
    """What one call does."""

    WARMUP = "warm-up"
    CAPTURE = "capture"
    REPLAY = "replay"
    EAGER = "eager"


class CaptureOutcome(IntEnum):
    """How a capture ended; where several processes capture together (DDP), the
    lowest over them is what all of them do."""

    FAILED = 0
    DEFERRED = 1  # torch.compile had to compile first: warm up once more, then capture
    CAPTURED = 2


@dataclass(eq=False)
class CapturedGraph:
    """One captured graph: the inputs it was captured for, the static copies it reads,
    and what it writes (outputs, gradients) in graph memory."""

    signature: BatchSignature
    graph: torch.cuda.CUDAGraph
    static: StaticBatch
    outputs: Any
    grads: list[torch.Tensor | None]  # p.grad of `params` as this graph writes them
    memory_bytes: int  # device memory the pool grew by when it was captured
    variant: Any = None  # see GraphedStep.plan
    params: list[torch.Tensor] = field(default_factory=list)  # the parameters whose gradients it writes
    grads_before: tuple[bool, ...] = ()  # which parameters had gradients when it was captured
    # which parameters' gradients the step zeroes (their optimizer's zero_grad) before it
    # touches them, as Lightning's steps do: it reads none of those it finds
    grads_zeroed: tuple[bool, ...] = ()
    # whether the step reads none of the gradients it finds (it zeroes them first, or
    # there were none) rather than adding to some (a micro-step of gradient accumulation)
    replaces_grads: bool = True
    # the gradient tensors it reads, per parameter (p.grad when captured; out-of-place
    # accumulation writes others), None for those it does not read; empty if it reads none
    grads_in: list[torch.Tensor | None] = field(default_factory=list)
    replays: int = 0
    notes: dict[str, Any] = field(default_factory=dict)  # an adapter's per-graph data (the callback's log calls)
    # torchmetrics calls the captured step made, which the host follows up after each replay
    metric_updates: list[MetricUpdate] = field(default_factory=list)


@dataclass
class StepPlan:
    """The decision for one call: its action, the inputs' signature, the graph to
    replay and, for eager calls, the reason."""

    action: Action
    signature: BatchSignature | None
    reason: str | None = None
    graph: CapturedGraph | None = None
    variant: Any = None
    # eager because a tensor of the inputs differs from those the graphs held were captured for (a ragged batch)
    other_signature: bool = False


@dataclass
class GraphStats:
    """What a :class:`GraphedStep` did; read it to see whether graphs paid off."""

    warmup_steps: int = 0
    captures: int = 0
    replays: int = 0
    eager_steps: int = 0
    eager_reasons: dict[str, int] = field(default_factory=dict)  # reason -> eager calls
    capture_seconds: float = 0.0  # total time spent capturing
    # the most the memory pool grew by for the graphs held at once (a capture reusing
    # memory an evicted graph left in the pool adds little)
    graph_memory_bytes: int = 0
    graphs_held: int = 0  # graphs ready to replay now (per input signature and variant)
    most_graphs_held: int = 0
    evictions: int = 0  # signatures whose graphs were dropped to make room for another
    deferred_captures: int = 0  # captures put off because torch.compile had to compile first
    recaptures: dict[str, int] = field(default_factory=dict)  # why graphs were dropped and captured again
    disabled_reason: str | None = None

    def as_metrics(self, prefix: str = "cuda_graphs/") -> dict[str, float]:
        """The counts as numbers, for a logger."""
        return {
            f"{prefix}{name}": float(value)
            for name, value in (
                ("captures", self.captures), ("replays", self.replays), ("warmup_steps", self.warmup_steps),
                ("eager_steps", self.eager_steps), ("capture_seconds", self.capture_seconds),
                ("graph_memory_mib", self.graph_memory_bytes / 2**20), ("most_graphs_held", self.most_graphs_held),
                ("evictions", self.evictions), ("disabled", self.disabled_reason is not None),
            )
        }

    def summary(self) -> str:
        held = f", {self.most_graphs_held} graphs held at once" if self.most_graphs_held > 1 else ""
        evicted = f", {self.evictions} evicted" if self.evictions else ""
        evicted += f", {self.deferred_captures} put off for torch.compile" if self.deferred_captures else ""
        parts = [
            f"{self.captures} capture{'s' if self.captures != 1 else ''} "
            f"({self.capture_seconds * 1e3:.0f} ms, {self.graph_memory_bytes / 2**20:.1f} MiB{held}{evicted})",
            f"{self.replays} replays",
            f"{self.warmup_steps} warm-up steps",
            f"{self.eager_steps} eager steps",
        ]
        text = ", ".join(parts)
        if self.eager_reasons:
            reasons = "; ".join(f"{n} x {reason}" for reason, n in self.eager_reasons.items())
            text += f" (eager because: {reasons})"
        if self.disabled_reason:
            text += f". Graphs disabled: {self.disabled_reason}"
        return text


class _InputsShareMemory(Exception):
    """Why a capture was given up: the step writes an input whose memory another input shares."""


class CaptureFailed(Exception):
    """Capture did not succeed; the optimizer and gradients are as they were before it.

    ``explanation`` is the user-facing message naming the operation and line."""

    def __init__(self, explanation: str) -> None:
        super().__init__(explanation)
        self.explanation = explanation


class SharedPool:
    """One memory pool that several graphed steps (:class:`GraphedStep`) capture into.

    A capture that fails midway can leave the pool's bookkeeping in the caching
    allocator broken, so that the next capture into it fails too and memory of
    graphs captured earlier might be handed out again. After a failed capture the
    pool is therefore abandoned by every step sharing it: each retires the graphs
    it captured there (the next call of a signature already warmed up captures it
    again) and captures into a fresh pool from then on."""

    def __init__(self) -> None:
        self._handle: Any = None
        self.generation = 0  # how many pools were abandoned

    def handle(self) -> Any:
        if self._handle is None:
            self._handle = torch.cuda.graph_pool_handle()
        return self._handle

    def abandon(self) -> None:
        self._handle = None
        self.generation += 1


class CaptureDeferred(Exception):
    """Capture was put off: a compiled function still had to compile for these
    inputs. Nothing ran; the step runs as an eager warm-up step instead (plan again)."""


def ignore_torch_attribute(obj: Any, name: str) -> bool:
    """Attributes PyTorch manages itself (hooks, caches, ``training``; optimizer internals)."""
    if isinstance(obj, torch.nn.Module):
        return name in _MODULE_ATTRIBUTES
    if isinstance(obj, torch.optim.Optimizer):
        return name.startswith("_") or name in ("defaults", "state", "param_groups")
    return False


def check_count(name: str, value: Any, minimum: int) -> int:
    """A whole number of at least ``minimum`` (NumPy's included), or a clear error naming the argument."""
    try:
        if isinstance(value, bool):
            raise TypeError
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be a whole number, got {type(value).__name__} {value!r}") from None
    if count < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return count


def check_flag(name: str, value: Any) -> bool:
    """True or False (NumPy's included), or a clear error naming the argument."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise TypeError(f"`{name}` must be True or False, got {type(value).__name__} {value!r}")


def _as_list(name: str, value: Any) -> list:
    """``optimizers`` and ``modules`` as lists; one optimizer or module alone is taken as a list of it."""
    if isinstance(value, (torch.optim.Optimizer, torch.nn.Module)) or hasattr(value, "optimizer"):
        return [value]  # (Lightning and Fabric wrap optimizers: they have `.optimizer`)
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"`{name}` must be a list, got {type(value).__name__}: pass [{name[:-1]}]") from None
    wanted, label = (torch.optim.Optimizer, "torch.optim.Optimizer") if name == "optimizers" \
        else (torch.nn.Module, "torch.nn.Module")
    for item in items:
        # (Lightning and Fabric wrap optimizers; an optimizer of one's own may only look like one)
        looks_like_one = name == "optimizers" and (hasattr(item, "optimizer") or hasattr(item, "param_groups"))
        if not isinstance(item, wanted) and not looks_like_one:
            raise TypeError(
                f"`{name}` takes {label} objects, got a {type(item).__name__}: "
                f"pass `{name}=[{name[:-1]}]`" + (" (the optimizer, not the parameters it updates)"
                                                  if isinstance(item, torch.Tensor) else "")
            )
    return items


class _KeywordCall(NamedTuple):
    """The inputs of a call with keyword arguments."""

    args: tuple
    kwargs: dict


class GraphedStep:
    """A step function captured as one CUDA graph and replayed, with eager fallback.

    Args:
        fn: the step. Called as ``fn(*inputs, **keyword_inputs)``, with what the
            ``GraphedStep`` is called with; may be ``None`` when the caller
            drives :meth:`plan`, :meth:`warmup`, :meth:`capture`, :meth:`replay`
            and :meth:`eager` itself (the Lightning callback does).
        warmup_steps: eager steps before the first capture (at least one when
            ``optimizers`` are given: their state is created lazily by a first step).
        max_graphs: graphs held at once, one per recurring input signature (the
            ragged last batch of an epoch, bucketed sequence lengths), all in one
            memory pool. A new signature runs one eager warm-up step, is captured the
            next time it comes, and evicts the least recently replayed graph when
            the limit is reached. Each graph holds its own gradients and outputs;
            ``max_graphs=1`` keeps only the first signature's graph.
        optimizers: optimizers stepped inside ``fn``; prepared for capture (see
            :mod:`lightning_graphs.optimizers`) and restored by :meth:`close`.
        modules: modules used inside ``fn``; a change of their parameters,
            train/eval modes or ``requires_grad`` flags makes the graph stale (checked
            before every replay; see :mod:`lightning_graphs.module_structure`).
        watch: ``(label, object)`` pairs whose Python attributes the step must not
            change (and which code outside the step may change, see
            :meth:`request_structure_check`); modules not listed are watched under
            their class name, and so are the object ``fn`` is a bound method of and
            the variables ``fn`` closes over and the module-level data it reads.
        follow: ``(label, object)`` pairs whose attributes the step may read but
            which hold bookkeeping of their own (a LightningDataModule): what the
            captured step read of them is compared before every replay, nothing else.
        strict: raise :class:`GraphCaptureError` instead of falling back to eager.
        warn: ``warn(key, message)`` for user-facing warnings (default: once per key).
        ignore_attribute: ``ignore_attribute(obj, name)`` excludes framework-managed
            attributes from the side-effect check.
        what: how messages name the step, e.g. ``"the training step"``.
        input_name: how messages name the inputs, e.g. ``"batch"``.
        device: the CUDA device the step runs on, for a step whose inputs, modules
            and optimizers do not say (a simulation updating tensors it closes over).
        nvtx: mark warm-up, capture, replay and eager calls as NVTX ranges, which
            Nsight Systems shows on its timeline.
        grad_scaler: the ``torch.amp.GradScaler`` that ``fn`` steps its optimizers
            through (fp16 mixed precision). Its skip of steps with inf/NaN gradients
            is then decided on the device at every replay (see
            :mod:`lightning_graphs.amp`); without it, ``scaler.step`` reads
            ``found_inf`` on the host and the capture fails. Adam, AdamW, SGD and
            fused optimizers can skip on the device; with others the step runs
            eagerly, with a warning.
        pool: a :class:`SharedPool` to capture into, shared with the graphs of
            other steps (a plain ``torch.cuda.graph_pool_handle()`` works too, but is
            not abandoned together after a failed capture); by default this step's
            graphs share a pool of their own. A later capture may place its tensors
            in memory an earlier capture of the pool used only for temporaries, which
            that earlier graph's replays overwrite: share a pool only between steps
            whose graphs leave nothing in it that must outlive another's replay, or
            retire (:meth:`retire_graphs`) the graphs captured before such a step.
        batch_end_hook: the Lightning hook that messages suggest for Python that
            must run at every call (``"on_validation_batch_end"`` for a validation step).
        activity: how messages name what goes on eagerly once graphs are given up
            (``"Training"``, ``"Validation"``).
        agree_capture: for a step run by several processes together (DDP ranks,
            whose collectives must match): called after every capture with its
            local outcome and explanation, returns the outcome all of them act on
            and its explanation. A capture that succeeded here is given up when
            another process failed (or put its capture off); see
            :mod:`lightning_graphs.distributed`.

    Optimizers wrapped by Lightning or Fabric (``fabric.setup(model, optimizer)``)
    are prepared through the optimizer they wrap, and the GradScaler of Fabric's
    ``precision="16-mixed"`` is found through them.
    """

    def __init__(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        warmup_steps: int = 3,
        max_graphs: int = 2,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        modules: Sequence[torch.nn.Module] = (),
        watch: Sequence[tuple[str, Any]] = (),
        follow: Sequence[tuple[str, Any]] = (),
        strict: bool = False,
        warn: Callable[[str, str], Any] | None = None,
        ignore_attribute: Callable[[Any, str], bool] | None = None,
        what: str = "the step",
        input_name: str = "inputs",
        device: torch.device | str | int | None = None,
        nvtx: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
        pool: Any = None,
        batch_end_hook: str = "on_train_batch_end",
        activity: str = "Training",
        agree_capture: Callable[[CaptureOutcome, str | None], tuple[CaptureOutcome, str | None]] | None = None,
    ) -> None:
        warmup_steps = check_count("warmup_steps", warmup_steps, 0)
        max_graphs = check_count("max_graphs", max_graphs, 1)
        if fn is not None and not callable(fn):
            raise TypeError(f"`fn` must be the step function (or None), got {type(fn).__name__} {fn!r}")
        optimizers, modules = _as_list("optimizers", optimizers), _as_list("modules", modules)
        self.fn = fn
        self.max_graphs = max_graphs
        self.nvtx = nvtx
        self.warmup_steps = max(warmup_steps, 1) if optimizers else warmup_steps
        self.strict = strict
        self.what = what
        self.input_name = input_name
        self.batch_end_hook = batch_end_hook
        self.activity = activity
        self._agree_capture = agree_capture  # makes processes capturing together (DDP) end a capture alike
        self.stats = GraphStats()
        self.phase = Phase.WARMING_UP
        self._warn = warn or WarnOnce()
        self._modules = list(modules)
        # torchmetrics metrics updated in the step: their states and bookkeeping (see metrics.py)
        self._metrics = InStepMetrics(self._modules)
        framework_ignores = ignore_attribute or ignore_torch_attribute
        self._ignore = lambda obj, name: framework_ignores(obj, name) or self._metrics.ignores(obj, name)
        self._optimizers = [GraphSafeOptimizer(_unwrap_optimizer(o)) for o in optimizers]
        scalers = [grad_scaler] if grad_scaler is not None and grad_scaler.is_enabled() else []
        for found in map(scaler_of, optimizers):
            if found is not None and all(found is not s for s in scalers):
                scalers.append(found)
        self._grad_scalers = scalers
        watch, follow = _labelled("watch", watch), _labelled("follow", follow)
        self._reach = what_fn_reads(fn)  # what the step function holds: for objects it uses unprepared
        watch = watch + [pair for pair in self._reach if all(pair[1] is not obj for _, obj in watch)]
        watched = {id(obj) for _, obj in watch}
        self._watch = watch + [(type(m).__name__, m) for m in self._modules if id(m) not in watched]
        self._watch += [(type(o.optimizer).__name__, o.optimizer) for o in self._optimizers]
        self._hooks_watched: list[Callable[..., Any]] = []
        self._watch_step_hooks()
        self._follow = [pair for pair in follow if all(pair[1] is not obj for _, obj in self._watch)]
        self._params = self._gradient_params()
        # what the captured steps read, checked before every replay (not the optimizers and scalers, which
        # the step manages itself: their attributes are stood in for while capturing)
        managed = {id(o.optimizer) for o in self._optimizers} | {id(s) for s in self._grad_scalers}
        self._reads = StepReads(lambda obj, name: id(obj) in managed or self._ignore(obj, name))
        self._warmups_left = self.warmup_steps
        try:
            self._device: torch.device | None = torch.device("cuda", device) if isinstance(device, int) else (
                torch.device(device) if device is not None else None
            )
        except (RuntimeError, TypeError) as error:
            raise ValueError(f'`device` must name a CUDA device ("cuda", "cuda:1" or 1), got {device!r}') from error
        if self._device is not None and self._device.type != "cuda":
            raise ValueError(f'`device` must name a CUDA device ("cuda", "cuda:1" or 1), got {device!r}')
        self._stream: torch.cuda.Stream | None = None  # side stream for warm-up and capture
        self._pool: Any = None  # memory pool shared by every capture of this step
        self._given_pool: Any = pool  # a pool shared with other steps' graphs, if the caller gave one
        self._graphs: list[CapturedGraph] = []  # least recently replayed first
        # graphs dropped as stale or evicted are kept (never replayed) until the next
        # capture: while a graph holds the pool, the next capture may share it
        self._retired: list[CapturedGraph] = []
        # signatures that ran a warm-up step, newest last, each with the Python numbers among that
        # step's outputs, by path; and those of the last warm-up run without a signature
        self._warmed: list[tuple[BatchSignature, dict[str, type]]] = []
        self._numbers_unplanned: dict[str, type] = {}
        self._structure: ModuleStructure | None = None  # modules' parameters, modes and flags at capture
        self._structure_check_due = False
        self._stepped: set[int] = set()  # optimizers that took an eager step since the last structural change
        # optimizers not given that stepped in the last eager step, and in the one before it too (one made
        # inside the step, stepping once, is the step's own business); schedulers that stepped in it
        self._stepped_not_given: list[torch.optim.Optimizer] = []
        self._not_given_before: weakref.WeakSet = weakref.WeakSet()
        self._stepped_schedulers: list[Any] = []
        self._unrepeated = 0  # see _MAX_UNREPEATED
        self._stepped_structure: tuple | None = None  # modules' and optimizers' structure at that step
        self._unready_warmups = 0
        self._short_lived = 0  # graphs dropped as stale after a few replays, in a row
        self._short_evictions = 0  # graphs evicted after a few replays, in a row
        self._deferred_captures = 0  # captures put off for torch.compile to compile first, in a row
        self._captured_state: StateFingerprint | None = None  # watched objects as the first graph held saw them
        self._pool_generation = 0  # of the shared pool the graphs held were captured into
        for optimizer in self._optimizers:
            if optimizer.unsupported:
                self.disable(f"{type(optimizer.optimizer).__name__} cannot be captured: {optimizer.unsupported}")
            elif optimizer.plan.rounding is not None:
                self._warn(f"rounding:{type(optimizer.optimizer).__name__}", optimizer.plan.rounding + ".")
        for optimizer in self._optimizers if scalers else ():
            reason = optimizer.skip_on_device_unsupported()
            if reason is not None:
                self.disable(f"with a GradScaler (fp16 mixed precision), {reason}")
                break

    # -- decisions ------------------------------------------------------------

    def plan(self, inputs: Any, variant: Any = None) -> StepPlan:
        """Decide what a call with ``inputs`` does; cheap, and changes nothing but
        drops a graph that has gone stale.

        ``variant`` tells apart calls whose inputs look alike but whose step takes
        another path (with gradient accumulation: the micro-step that zeroes the
        gradients, the ones that accumulate, the one that steps the optimizer).
        Each (signature, variant) pair gets its own graph; ``max_graphs`` counts
        signatures."""
        if self.phase is Phase.DISABLED:
            return StepPlan(Action.EAGER, None, "graphs disabled")
        signature = signature_of(inputs)
        if self._device is None and not self._find_device(signature):
            self.disable("no CUDA tensors: CUDA graphs need the step to run on a CUDA device")
            return StepPlan(Action.EAGER, signature, "graphs disabled")
        unsupported = signature.unsupported_reason()
        if unsupported is not None:
            return StepPlan(Action.EAGER, signature, unsupported)
        known_signature = False
        shared = self._given_pool if isinstance(self._given_pool, SharedPool) else None
        if self._graphs and shared is not None and self._pool_generation != shared.generation:
            self._drop_graphs(None)  # their pool was abandoned after another step's failed capture
        if self._graphs:
            # checked before every call, not only replays: a capture for another
            # signature would otherwise take the changed settings as its baseline
            stale, structural = self._stale_reason()
            if stale is not None:
                self._drop_graphs(stale)
                if self.phase is Phase.DISABLED:
                    return StepPlan(Action.EAGER, signature, "graphs disabled")
                if structural:
                    self._warmups_left = max(self._warmups_left, 1)  # new parameters need optimizer state first
                    self._stepped.clear()
            else:
                for captured in self._graphs:
                    if captured.signature == signature:
                        if captured.variant == variant:
                            reason = self._cannot_continue(captured)
                            if reason is not None:
                                return StepPlan(Action.EAGER, signature, reason)
                            return StepPlan(Action.REPLAY, signature, graph=captured, variant=variant)
                        known_signature = True
        if self._warmups_left > 0 or not self._optimizers_ready():
            return StepPlan(Action.WARMUP, signature, variant=variant)
        # (warm-ups run without a plan name no signature: then any is taken as warmed)
        warmed = self.warmup_steps == 0 or not self._warmed or any(seen == signature for seen, _ in self._warmed)
        if not self._graphs:
            # a signature not seen in warm-up (a ragged batch at capture time) runs one more warm-up step
            if warmed:
                return StepPlan(Action.CAPTURE, signature, variant=variant)
            self._unrepeated += 1
            if self._unrepeated >= _MAX_UNREPEATED:
                self.disable(
                    f"no {self.input_name} signature recurred in {self._unrepeated} calls in a row, so nothing was "
                    f"captured: {describe_mismatch(self._warmed[-1][0], signature, self.input_name, 'one before had')}"
                )
                return StepPlan(Action.EAGER, signature, "graphs disabled")
            return StepPlan(Action.WARMUP, signature, variant=variant)
        if not known_signature:  # another signature while graphs are held
            newest = self._graphs[-1].signature
            if self.max_graphs == 1:
                return StepPlan(
                    Action.EAGER, signature, describe_mismatch(newest, signature, self.input_name),
                    other_signature=differs_in_a_tensor(newest, signature),
                )
            if self._short_evictions >= _MAX_SHORT_LIVED:
                return StepPlan(
                    Action.EAGER, signature,
                    f"{describe_mismatch(newest, signature, self.input_name)}; more {self.input_name} signatures "
                    f"recur than max_graphs={self.max_graphs} holds",
                    other_signature=differs_in_a_tensor(newest, signature),
                )
            if not warmed:
                return StepPlan(Action.WARMUP, signature, variant=variant)  # one eager step of it before capturing
        if self._structure is not None and self._structure.differs():
            self._drop_graphs(STRUCTURE_CHANGED)  # graphs held share the structure they were captured with
            if self.phase is Phase.DISABLED:
                return StepPlan(Action.EAGER, signature, "graphs disabled")
            self._warmups_left = max(self._warmups_left, 1)
            self._stepped.clear()
            return StepPlan(Action.WARMUP, signature, variant=variant)
        return StepPlan(Action.CAPTURE, signature, variant=variant)

    def prepared_for(self, optimizer: Any) -> bool:
        """Whether ``optimizer`` (or the optimizer a Lightning or Fabric wrapper holds) is one this step was given."""
        inner = _unwrap_optimizer(optimizer)
        return any(prepared.optimizer is inner for prepared in self._optimizers)

    def _optimizers_ready(self) -> bool:
        """Whether every optimizer took an eager step since the modules and optimizers
        last changed: its state (moments, momentum buffers) must exist before capture,
        or the graph would create it afresh at every replay."""
        if len(self._stepped) == len(self._optimizers):
            if not self._optimizers or self._stepped_structure == self._full_structure():
                self._unready_warmups = 0
                return True
            self._stepped.clear()  # parameters came or went since; they need a step first
        self._unready_warmups += 1
        if self._unready_warmups > _MAX_UNREADY_WARMUPS:
            # no optimizer step seen in all these calls: the step does not take one (it
            # is taken outside), so there is no state to wait for
            self._stepped = set(range(len(self._optimizers)))
            self._stepped_structure = self._full_structure()
            return True
        return False

    def _full_structure(self) -> tuple:
        return parameters_key(self._modules), tuple(o.structure_key() for o in self._optimizers)

    def _cannot_continue(self, captured: CapturedGraph) -> str | None:
        """Why a graph cannot take over the gradients held now, if so: those it does not
        zero first must be held where they were held when it was captured (it adds to
        them, or, where there were none, writes them anew)."""
        zeroed = captured.grads_zeroed or (False,) * len(captured.params)
        pairs = [(p.grad is not None, before)
                 for p, before, first_zeroed in zip(captured.params, captured.grads_before, zeroed) if not first_zeroed]
        if all(now == before for now, before in pairs):
            return None
        held = tuple(now for now, _ in pairs)
        if not any(before for _, before in pairs):
            return (
                "gradients from earlier calls are held, to which this step adds its own, but it was captured "
                "without any (to accumulate over several calls, use one `GraphedStep` for the first call of "
                "each cycle and another for the rest; otherwise zero them with `zero_grad(set_to_none=True)`, "
                "inside the step or before each call)"
            )
        if not any(held):
            return (
                f"{self.what} adds to the gradients, was captured adding to gradients held then, and none are "
                "held now (zeroed between calls). To accumulate over several calls, use one `GraphedStep` for "
                "the first call of each cycle and another for the rest"
            )
        return (
            "the parameters holding gradients differ from those when this accumulating step was captured "
            "(a parameter some batches do not use)"
        )

    @property
    def graphs(self) -> tuple[CapturedGraph, ...]:
        """The graphs held now, least recently replayed first."""
        return tuple(self._graphs)

    def request_structure_check(self) -> None:
        """Before the next replay, check parameters, modes, ``requires_grad`` flags and
        the plain values (numbers, flags, strings) of the watched objects against the
        capture; graphs that baked in an older value are captured again. Call it
        where code outside the step may have changed them (the Lightning callback
        does at every epoch start and after validation)."""
        self._structure_check_due = True

    def _stale_reason(self) -> tuple[str | None, bool]:
        """Why the graph no longer matches, if so, and whether the modules themselves
        changed (new trainable parameters need an eager step to create optimizer state)."""
        for optimizer in self._optimizers:
            reason, structural = optimizer.stale_reason()
            if reason is not None:
                return reason, structural
        reason = self._metrics.stale_reason()
        if reason is not None:
            return reason, False
        changed = self._reads.changed()
        if changed is not None:  # a value the step read, changed by a hook or a callback since
            advice = " (update a buffer in place, `buf.copy_(value)`, to keep replaying)" \
                if "to the buffer `" in changed else ""
            return f"code outside {self.what} {changed} since the capture{advice}", True
        change = self._structure.change() if self._structure is not None else None
        if change is not None:
            return change, True
        if self._structure_check_due:
            self._structure_check_due = False
            if self._structure is not None and self._structure.differs():
                return STRUCTURE_CHANGED, True
            if self._captured_state is not None:
                changes = self._captured_state.changes(self._fingerprint(), True)
                if changes:
                    # a value the step may read (and torch.compile may have specialised on) is
                    # baked into the graphs: warm up with the new value, then capture again
                    return (
                        f"code outside {self.what} {changes[0]} since the capture (public values are compared "
                        "in case the step reads them where that cannot be seen, as compiled code does; keep "
                        "bookkeeping the step does not read in a private attribute, such as `self._count`)"
                    ), True
        return None, False

    def _find_device(self, signature: BatchSignature) -> bool:
        candidates = [leaf for leaf in signature.leaves if isinstance(leaf, torch.Tensor)]
        candidates += [p for root in self._modules for p in root.parameters()] + self._params
        for tensor in candidates:
            if tensor.is_cuda:
                self._device = tensor.device
                return True
        return False

    # -- the four actions -----------------------------------------------------

    def warmup(self, fn: Callable[[], Any], plan: StepPlan | None = None, check_hyperparameters: bool = True) -> Any:
        """Run one real step eagerly on the side stream, watching for side effects.

        ``plan`` (from :meth:`plan`) names the signature warmed up: it is captured
        the next time it comes. ``check_hyperparameters=False`` for a step whose
        changes to its optimizers' hyper-parameters the caller accounts for itself
        (schedulers a manual-optimization step steps, which are stepped again after
        every replay); a capture still checks that the captured step wrote none."""
        with self._range("warm-up"):
            return self._warmup(fn, plan, check_hyperparameters)

    def _warmup(self, fn: Callable[[], Any], plan: StepPlan | None, check_hyperparameters: bool = True) -> Any:
        self._watch_step_hooks()
        if plan is not None and plan.signature is not None:
            plan.signature.keep_contents()  # kept among the warmed signatures
        check = self.stats.warmup_steps > 0  # the first step may initialise lazily; judge the later ones
        before = self._snapshot() if check else None
        stream = self._side_stream()
        current = torch.cuda.current_stream(self._device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            outputs = self._watching_steps(fn)
        current.wait_stream(stream)
        self._warmups_left = max(self._warmups_left - 1, 0)
        self.stats.warmup_steps += 1
        numbers = _python_numbers(outputs)
        if plan is not None and plan.signature is not None:
            self._warmed = [(seen, kept) for seen, kept in self._warmed if seen != plan.signature][-31:] + \
                [(plan.signature, numbers)]
        else:
            self._numbers_unplanned = numbers
        problem = self._side_effects(before, hyperparameters=check_hyperparameters) if check else None
        problem = problem or self._host_state() or self._not_given()
        if problem is not None:
            self.disable(problem)
        return outputs

    def capture(self, plan: StepPlan, fn: Callable[[Any], Any]) -> Any:
        """Record ``fn(static_inputs)`` into a graph and replay it once, which runs
        this step. Returns the step's outputs in graph memory (clone what must
        outlive the next replay); ``plan.graph`` is the new graph.

        Raises:
            CaptureFailed: capture was impossible; nothing ran and the optimizer
                and gradients are as before.
            CaptureDeferred: a compiled function would have compiled during the
                capture; nothing ran, and the next :meth:`plan` is a warm-up.
        """
        with self._range("capture"):
            return self._capture(plan, fn)

    def _capture(self, plan: StepPlan, fn: Callable[[Any], Any]) -> Any:
        self._watch_step_hooks()
        signature = plan.signature
        signature.keep_contents()
        self._params = self._gradient_params()  # param groups may have been added since the last capture
        held = self._signatures_held()
        if not any(seen == signature for seen in held) and len(held) >= self.max_graphs:
            self._evict(held[0])
        while len(self._graphs) >= _VARIANTS_PER_SIGNATURE * self.max_graphs:
            self._retire(self._graphs[0])  # variants no longer in use (an accumulation factor changed)
        static = StaticBatch(signature)
        saved_grads = [p.grad for p in self._params]
        grad_versions = [g._version if g is not None else None for g in saved_grads]
        # flags the step may flip and flip back (toggling optimizers): put back if it fails midway
        saved_flags = [(p, p.requires_grad) for module in self._modules for p in module.parameters()]
        stream = self._side_stream()
        metrics_before = self._metrics.before_capture()  # binds metric states to the tensors the graph reads
        before = self._snapshot()
        metric_problem = None
        for optimizer in self._optimizers:
            optimizer.enter_capture()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self._device)
        torch.cuda.empty_cache()  # let the pool take what warm-up left cached
        reserved = torch.cuda.memory_reserved(self._device)
        started = time.perf_counter()
        if isinstance(self._given_pool, SharedPool):
            self._pool = self._given_pool.handle()
            self._pool_generation = self._given_pool.generation
        elif self._pool is None:
            self._pool = self._given_pool if self._given_pool is not None else torch.cuda.graph_pool_handle()
        failure: Exception | None = None
        ended_cleanly = False  # whether the capture, given up or not, was ended without a CUDA error
        stepped: list[torch.optim.Optimizer] = []
        printed: list[str] = []
        try:
            with torch.cuda.device(self._device), torch.cuda.stream(stream), _garbage_collection_paused():
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    with no_compilation(), graph_safe_grad_scalers(self._grad_scalers, self._step_unless_found_inf), \
                            self._reads.recording(self._watch + self._follow), optimizers_stepped(stepped), \
                            output_noticed(printed):
                        versions = static.versions()
                        outputs = fn(static.value)
                        static.note_written(versions)
                        metric_problem = self._metrics.end_of_step(metrics_before)
                except BaseException:
                    ended_cleanly = _end_capture(graph)
                    raise
                graph.capture_end()  # raises if an operation silently invalidated the capture
        except BaseException as exc:
            refused = is_recompile_refusal(exc)  # raised in Python before the compiler ran: no CUDA error
            self._abandon_capture(saved_grads, saved_flags, metrics_before, failed=True, pool_broken=not refused,
                                  generator_stuck=not ended_cleanly)
            if not isinstance(exc, Exception):
                raise
            failure = exc
        unreplayable = static.write_back_problem(self.input_name) if failure is None else None
        if unreplayable is not None:
            self._abandon_capture(saved_grads, saved_flags, metrics_before, failed=False, pool_broken=False)
            failure = _InputsShareMemory(
                f"{self.what} {'writes' if static.written else 'may write'} its {self.input_name} in place, and "
                f"{unreplayable}. A CUDA graph copies each "
                f"tensor of the {self.input_name} into memory of its own, so the {self.input_name} could not be "
                "left as an eager step leaves it. Write into a copy (`x = x.clone()` first) or give each tensor "
                "memory of its own"
            )
        outcome, explanation = self._capture_outcome(failure)
        if self._agree_capture is not None:
            try:
                agreed, elsewhere = self._agree_capture(outcome, explanation)
            except BaseException:  # no agreement (another rank failed or is stuck): nothing of this capture stays
                if outcome is CaptureOutcome.CAPTURED:
                    self._abandon_capture(saved_grads, saved_flags, metrics_before, failed=False, pool_broken=False)
                raise
            agreed = CaptureOutcome(agreed)
            if agreed < outcome:
                if outcome is CaptureOutcome.CAPTURED:  # fine here, given up because of another rank
                    self._abandon_capture(saved_grads, saved_flags, metrics_before, failed=False, pool_broken=False)
                outcome, explanation = agreed, elsewhere if agreed is CaptureOutcome.FAILED else explanation
        if outcome is CaptureOutcome.DEFERRED:
            # compiling belongs in an eager step: warm up once more, capture after it
            self._deferred_captures += 1
            self._warmups_left = max(self._warmups_left, 1)
            self.stats.deferred_captures += 1
            raise CaptureDeferred(str(failure) if failure is not None else "deferred on another rank") from failure
        if outcome is CaptureOutcome.FAILED:
            raise CaptureFailed(explanation or "the capture failed") from failure
        self._deferred_captures = 0
        stood_in = {key: value for optimizer in self._optimizers for key, value in optimizer.stood_in_values().items()}
        problems = [optimizer.exit_capture() for optimizer in self._optimizers]
        problems.append(self._side_effects(before, hyperparameters=False))
        problems.append(self._not_given_in_capture(stepped))
        if printed:
            self._warn("output", (
                f"{self.what} {'prints' if printed[0] == 'print' else 'logs with `logging`'} from inside the step. "
                "A replay runs none of the step's Python, so its messages appear only on the steps that run "
                f"eagerly (the warm-up, each capture). To see them at every step, print from `{self.batch_end_hook}` "
                "(with Lightning), or after each call; training itself is graphed as usual"
            ))
        self.stats.capture_seconds += time.perf_counter() - started
        zeroed_first = {id(p) for optimizer in self._optimizers if optimizer.zeroed_in_capture
                        for group in optimizer.optimizer.param_groups for p in group["params"]}
        # the gradients this graph writes: the optimizers' parameters', and those of the modules' other
        # parameters whose gradients the step made or added to (a backward-only micro-step; not an
        # evaluation step, which leaves them as they are)
        optimized = len(self._optimized_params())
        written = [
            i for i, (p, grad, version) in enumerate(zip(self._params, saved_grads, grad_versions))
            if i < optimized or p.grad is not grad or (grad is not None and grad._version != version)
        ]
        params, held = [self._params[i] for i in written], [saved_grads[i] for i in written]
        zeroed = tuple(id(p) in zeroed_first for p in params)
        reads = [None if first_zeroed else grad for grad, first_zeroed in zip(held, zeroed)]
        replaces = all(grad is None for grad in reads)
        captured = CapturedGraph(
            signature, graph, static, outputs, [p.grad for p in params],
            memory_bytes=max(torch.cuda.memory_reserved(self._device) - reserved, 0), variant=plan.variant,
            params=params,
            grads_before=tuple(g is not None for g in held),
            grads_zeroed=zeroed,
            replaces_grads=replaces,
            grads_in=[] if replaces else reads,
        )
        self._graphs.append(captured)
        plan.graph = captured
        self._retired = []
        self.stats.captures += 1
        self._unrepeated = 0
        self._count_graphs()
        if len(self._graphs) == 1:
            self._forget_structure()
            self._structure = ModuleStructure(self._modules)
            self._captured_state = self._fingerprint()
            self._structure_check_due = False
        self.phase = Phase.CAPTURED
        graph.replay()
        static.note_changed_contents()
        static.copy_back(signature)
        outputs, number_problem = self._numbers_as_returned(outputs, signature, stood_in)
        problems.append(number_problem)
        captured.metric_updates, reset_problem = self._metrics.after_capture(metrics_before)
        problems += [metric_problem, reset_problem]
        problem = next((p for p in problems if p), None)
        if problem is not None:
            # the graph ran this step faithfully; later steps would repeat its Python decisions
            self.disable(problem)
        return outputs

    def _numbers_as_returned(self, outputs: Any, signature: BatchSignature,
                             stood_in: dict[int, Any]) -> tuple[Any, str | None]:
        """The captured step's outputs with Python numbers where the warm-up of this
        signature returned them and the capture a one-element tensor: a value of its
        optimizers' ``param_groups`` (a device tensor while capturing; ``stood_in`` maps
        each to the user's value) or one computed from it. Also what replays would get
        wrong, if anything."""
        numbers = next((kept for seen, kept in reversed(self._warmed) if seen == signature), self._numbers_unplanned)
        if not numbers:
            return outputs, None
        leaves, tree = flatten(outputs)
        became = []
        for index, path in enumerate(leaf_paths(tree, "outputs")):
            leaf = leaves[index]
            if path not in numbers or not isinstance(leaf, torch.Tensor) or leaf.numel() != 1:
                continue
            became.append(path)
            if id(leaf) in stood_in:
                leaves[index] = stood_in[id(leaf)]
                continue
            try:
                leaves[index] = numbers[path](leaf.item())  # (read once, after the capture)
            except (TypeError, ValueError, OverflowError):  # (a NaN where an int was): kept a tensor
                pass
        if not became:
            return outputs, None
        return unflatten(tree, leaves), (
            f"{self.what} returns `{became[0]}` as a Python number when it runs eagerly, but as a tensor when "
            "captured: a value read or computed from an optimizer's `param_groups`, whose hyper-parameters are "
            "tensors while a graph is captured. Replays would return a tensor in its place. With Lightning, log "
            f"it with `self.log` (replayed step by step) or read it in `{self.batch_end_hook}`; in a loop of your "
            "own, read it after each call"
        )

    def _capture_outcome(self, failure: Exception | None) -> tuple[CaptureOutcome, str | None]:
        """How this capture ended here, with the user-facing explanation of a failure."""
        if failure is None:
            return CaptureOutcome.CAPTURED, None
        if isinstance(failure, _InputsShareMemory):
            return CaptureOutcome.FAILED, str(failure)
        refused = is_recompile_refusal(failure)
        if refused and self._deferred_captures < _MAX_DEFERRED_CAPTURES:
            return CaptureOutcome.DEFERRED, None
        if refused:
            return CaptureOutcome.FAILED, (
                f"torch.compile compiled again for {self._deferred_captures + 1} captures in a row, although "
                "each ran an eager step first (a guard that fails at every call, such as one on a value that "
                f"changes every step): {failure}"
            )
        return CaptureOutcome.FAILED, explain_capture_error(failure, self.what, self.batch_end_hook)

    def _abandon_capture(self, saved_grads: list, saved_flags: list, metrics_before: dict, failed: bool,
                         pool_broken: bool, generator_stuck: bool = False) -> None:
        """Undo what a capture that will not be replayed left: optimizers in capture
        mode, gradients the graph allocated, ``requires_grad`` flags the step flipped
        (toggled optimizers), torchmetrics states and counts the step's Python moved
        on, a generator still capturing (``generator_stuck``: the capture could not
        be ended) and, after a CUDA error, a stream and memory pool that may be
        unusable."""
        self._metrics.abandon(metrics_before)
        for optimizer in self._optimizers:
            optimizer.exit_capture()
        for p, grad in zip(self._params, saved_grads):
            p.grad = grad
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        if failed and generator_stuck:
            # graphs held keep the generator state they were captured with, which the fresh one
            # replaces: drop them, or their replays and later steps would draw the same numbers
            _release_generator_after_failed_capture(self._device)
            if self._graphs:
                self._drop_graphs(None)
        if pool_broken:
            self._stream = None  # a failed capture can leave the stream routed to the pool
            self._pool = None
            if isinstance(self._given_pool, SharedPool):
                self._given_pool.abandon()  # every step sharing it moves on (see SharedPool)
            else:
                self._given_pool = None  # later captures, if any, keep to a pool of their own

    def _step_unless_found_inf(self, optimizer: torch.optim.Optimizer, found_inf: torch.Tensor, args: tuple,
                               kwargs: dict) -> Any:
        for prepared in self._optimizers:
            if prepared.optimizer is optimizer:
                return prepared.step_unless_found_inf(found_inf, args, kwargs)
        raise RuntimeError(
            f"a GradScaler stepped {type(optimizer).__name__}, which was not among the optimizers given; its skip "
            "of overflowing steps cannot be captured"
        )

    def replay(self, plan: StepPlan) -> Any:
        """Copy the inputs in and replay the plan's graph. Returns its outputs in graph memory."""
        with self._range("replay"):
            return self._replay(plan.graph, plan.signature)

    def _replay(self, captured: CapturedGraph, signature: BatchSignature) -> Any:
        captured.static.copy_from(signature)
        for optimizer in self._optimizers:
            optimizer.sync_live()
        for p, read in zip(captured.params, captured.grads_in):
            # a step that adds to the gradients continues from the current ones (left by an
            # eager step or another graph); `_cannot_continue` checked that they exist
            if read is not None and p.grad is not read:
                read.copy_(p.grad)
        for p, grad in zip(captured.params, captured.grads):
            if p.grad is not grad:
                p.grad = grad  # what this graph writes
        self._metrics.bring_home()  # metric states rebound since (eager steps, resets) go where the graph reads
        captured.graph.replay()
        captured.static.copy_back(signature)
        InStepMetrics.after_replay(captured.metric_updates)
        captured.replays += 1
        self.stats.replays += 1
        if self._graphs[-1] is not captured:
            self._graphs.remove(captured)
            self._graphs.append(captured)
        return captured.outputs

    def eager(self, fn: Callable[[], Any], reason: str | None = None) -> Any:
        """Run one step as written (on the current stream)."""
        with self._range("eager"):
            outputs = self._watching_steps(fn) if self.phase is not Phase.DISABLED else fn()
        self.stats.eager_steps += 1
        if reason is not None:
            key = reason if len(self.stats.eager_reasons) < 16 else "other reasons"
            self.stats.eager_reasons[key] = self.stats.eager_reasons.get(key, 0) + 1
        return outputs

    def __call__(self, *inputs: Any, **keyword_inputs: Any) -> Any:
        """Run the step on ``inputs`` (positional and keyword): warm-up, capture, replay
        or eager, as :meth:`plan` decides.

        Outputs of a replay are cloned, so they stay valid after the next call.
        """
        if self.fn is None:
            raise TypeError("GraphedStep was built without `fn`; pass one, or drive plan()/replay()/... yourself")
        if keyword_inputs:  # (a structure of its own: never the signature of a call by position)
            value: Any = _KeywordCall(inputs, keyword_inputs)
            call = lambda given: self.fn(*given.args, **given.kwargs)  # noqa: E731
        else:
            value, call = inputs, lambda given: self.fn(*given)  # noqa: E731
        plan = self.plan(value)
        if plan.action is Action.REPLAY:
            return clone_tensors(self.replay(plan))
        if plan.action is Action.WARMUP:
            return self.warmup(lambda: call(value), plan)
        if plan.action is Action.CAPTURE:
            try:
                return clone_tensors(self.capture(plan, call))
            except CaptureDeferred:
                return self(*inputs, **keyword_inputs)  # planned again: an eager warm-up step
            except CaptureFailed as failure:
                self.disable(failure.explanation, cause=failure)
                return self.eager(lambda: call(value), "capture failed")
        self.warn_fallback(plan)
        return self.eager(lambda: call(value), plan.reason)

    def warn_fallback(self, plan: StepPlan, advice: str = "") -> None:
        """Tell once per differing input why calls like this one run eagerly."""
        if plan.reason is None or self.phase is Phase.DISABLED:
            return
        key = "eager:" + plan.reason.split(" has ")[0]
        self._warn(key, f"{plan.reason}: running it eagerly (correct, without the graph speed-up).{advice}")

    # -- giving up, cleaning up -------------------------------------------------

    def disable(self, reason: str, cause: BaseException | None = None) -> None:
        """Stop graphing: every later call runs eagerly. Warns once (raises if strict)."""
        if self.phase is Phase.DISABLED:
            return
        self.phase = Phase.DISABLED
        self.stats.disabled_reason = reason
        self._drop_graphs(None)
        self._forget_structure()
        self._retired = []  # no capture follows: nothing needs the pool kept alive
        self._pool = None
        for optimizer in self._optimizers:
            optimizer.restore()  # the eager steps from here on are exactly the user's own
        if self.strict:
            raise GraphCaptureError(reason) from cause
        self._warn(
            "disabled",
            f"{reason} {self.activity} continues eagerly and correctly, without the CUDA graph speed-up."
            if reason.endswith(".")
            else f"{reason}. {self.activity} continues eagerly and correctly, without the CUDA graph speed-up.",
        )

    def close(self) -> None:
        """Free the graph and static buffers; give the optimizers back as the user made them."""
        self._drop_graphs(None)
        self._retired = []
        self._warmed = []
        self._numbers_unplanned = {}
        for optimizer in self._optimizers:
            optimizer.restore()
        self._forget_structure()
        self._stream = None
        self._pool = None

    def retire_graphs(self) -> None:
        """Stop replaying the graphs held, without giving graphs up: the next call of
        a signature already warmed up captures it again. For a caller sharing the
        memory pool, after another step's capture may have taken memory these graphs
        write to (see ``pool``)."""
        self._drop_graphs(None)

    def user_optimizer_state(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        """``state_dict`` of ``optimizer`` as the unprepared optimizer would have saved it."""
        for prepared in self._optimizers:
            if prepared.optimizer is optimizer:
                return prepared.user_state_dict(state_dict)
        return state_dict

    def _drop_graphs(self, stale_reason: str | None) -> None:
        """Stop replaying every graph (they went stale together: they share the
        optimizers and modules)."""
        if not self._graphs:
            return
        if stale_reason is not None:
            self.stats.recaptures[stale_reason] = self.stats.recaptures.get(stale_reason, 0) + 1
            most = max(captured.replays for captured in self._graphs)
            self._short_lived = self._short_lived + 1 if most < _SHORT_LIVED_REPLAYS else 0
        torch.cuda.synchronize(self._device)  # the last replay may still be running
        self._retired.extend(self._graphs)
        self._graphs = []
        self._forget_structure()
        self._reads.clear()
        self._short_evictions = 0
        self._count_graphs()
        for optimizer in self._optimizers:
            optimizer.forget_graphs()
        if self.phase is Phase.CAPTURED:
            self.phase = Phase.WARMING_UP
        if stale_reason is not None and self._short_lived >= _MAX_SHORT_LIVED:
            self.disable(
                f"the captured graph went stale {self._short_lived} times within a few steps each "
                f"(last: {stale_reason}); capturing anew every few steps costs more than it saves"
            )

    def _forget_structure(self) -> None:
        """Stop watching the modules' structure (its hooks are global; it holds the parameters)."""
        if self._structure is not None:
            self._structure.close()
            self._structure = None

    def _signatures_held(self) -> list[BatchSignature]:
        """Distinct signatures of the graphs held, least recently replayed first."""
        held: list[BatchSignature] = []
        for captured in reversed(self._graphs):
            if not any(seen == captured.signature for seen in held):
                held.append(captured.signature)
        return held[::-1]

    def _evict(self, signature: BatchSignature) -> None:
        """Make room for another signature: drop every graph of ``signature``."""
        evicted = [captured for captured in self._graphs if captured.signature == signature]
        most = max(captured.replays for captured in evicted)
        self._short_evictions = self._short_evictions + 1 if most < _SHORT_LIVED_REPLAYS else 0
        for captured in evicted:
            self._retire(captured)
        self.stats.evictions += 1

    def _retire(self, captured: CapturedGraph) -> None:
        torch.cuda.synchronize(self._device)  # its last replay may still be running
        self._graphs.remove(captured)
        self._retired.append(captured)
        self._count_graphs()

    def _count_graphs(self) -> None:
        stats = self.stats
        stats.graphs_held = len(self._graphs)
        stats.most_graphs_held = max(stats.most_graphs_held, stats.graphs_held)
        held_bytes = sum(captured.memory_bytes for captured in self._graphs)
        stats.graph_memory_bytes = max(stats.graph_memory_bytes, held_bytes)

    # -- helpers ----------------------------------------------------------------

    def _optimized_params(self) -> list[torch.Tensor]:
        return [p for o in self._optimizers for g in o.optimizer.param_groups for p in g["params"]]

    def _gradient_params(self) -> list[torch.Tensor]:
        """The parameters whose gradients a step may write: the optimizers' (first) and
        the modules' that require them (a micro-step whose optimizer is stepped outside)."""
        params = self._optimized_params()
        held = {id(p) for p in params}
        for root in self._modules:
            for p in root.parameters():
                if p.requires_grad and id(p) not in held:
                    held.add(id(p))
                    params.append(p)
        return params

    def _watching_steps(self, fn: Callable[[], Any]) -> Any:
        """Run an eager step, noting which optimizers stepped (those it was given, and
        any other, see :meth:`_not_given`) and whether that breaks what the graphs held assume."""
        stepped: list[torch.optim.Optimizer] = []
        schedulers: list[Any] = []
        with contextlib.ExitStack() as stack:
            taken = [stack.enter_context(optimizer.watching_steps()) for optimizer in self._optimizers]
            stack.enter_context(optimizers_stepped(stepped))
            if self.fn is not None:  # (Lightning steps its schedulers outside the step, or after every replay)
                stack.enter_context(schedulers_stepped(schedulers))
            outputs = fn()
        not_given = [optimizer for optimizer in stepped if not self.prepared_for(optimizer)]
        self._stepped_not_given = [optimizer for optimizer in not_given if optimizer in self._not_given_before]
        self._not_given_before = weakref.WeakSet(not_given)
        self._stepped_schedulers = schedulers
        for index, (optimizer, steps) in enumerate(zip(self._optimizers, taken)):
            if steps or steps is None:  # None: no hooks to tell; rely on the warm-up count
                self._stepped.add(index)
                self._stepped_structure = self._full_structure()
                self._unready_warmups = 0
            reason = optimizer.diverging_update(steps) if self._graphs else None
            if reason is not None:
                self._drop_graphs(reason)
        return outputs

    def _range(self, name: str) -> Any:
        return torch.cuda.nvtx.range(f"{self.what}: {name}") if self.nvtx else contextlib.nullcontext()

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self._device)
        return self._stream

    def _fingerprint(self) -> StateFingerprint:
        self._metrics.refresh()  # which metrics' states and counts are the graphs' business
        return StateFingerprint(self._watch, self._ignore)

    def _snapshot(self) -> tuple[StateFingerprint, list, dict, tuple]:
        return (
            self._fingerprint(),
            [o.hyperparameters() for o in self._optimizers],
            self._metrics.counts(),
            host_random_state(self._watch + self._follow),
        )

    def _watch_step_hooks(self) -> None:
        """Optimizer step hooks run inside the step: what those registered since the last
        look hold (a counter in a closure, the object a hook is bound to) is watched too."""
        new = [(hook, owner) for hook, owner in optimizer_hooks([o.optimizer for o in self._optimizers])
               if all(hook is not seen for seen in self._hooks_watched)]
        if new:
            self._hooks_watched += [hook for hook, _ in new]
            self._watch += [pair for pair in functions_read(new) if all(pair[1] is not obj for _, obj in self._watch)]

    def _not_given(self) -> str | None:
        """Names what the last eager step used that a graph would replay as captured: a
        scheduler it stepped, an optimizer it stepped (in the step before too) or a
        GradScaler it holds that it was not given, an iterator it takes its data from."""
        if self._stepped_schedulers:
            scheduler = self._stepped_schedulers[0]
            return (
                f"{self.what} steps a {type(scheduler).__name__} learning-rate scheduler each time it runs. A CUDA "
                "graph replays only the GPU work, so a replay would not step it and the learning rate would stay "
                f"as captured. Step the scheduler outside {self.what}, after each call"
            )
        if self._stepped_not_given:
            return self._not_given_message(self._stepped_not_given[0])
        loaded = globals_loaded(self.fn) if self.fn is not None else []
        return scaler_not_given(self._reach, loaded, self._grad_scalers) or iterator_held(self._reach, loaded)

    def _not_given_in_capture(self, stepped: list[torch.optim.Optimizer]) -> str | None:
        """Names an optimizer not given that the captured step stepped, as the eager step
        before it did (one made inside the step for an inner loop is the step's own)."""
        kept = [o for o in stepped if not self.prepared_for(o) and o in self._not_given_before]
        return self._not_given_message(kept[0]) if kept else None

    def _not_given_message(self, optimizer: torch.optim.Optimizer) -> str:
        return (
            f"{self.what} steps a {type(optimizer).__name__} optimizer it was not given: a graph would keep that "
            "optimizer's learning rate and settings as captured. Give it with the others (return it from "
            "`configure_optimizers`; `GraphedStep(..., optimizers=[opt])` outside Lightning) to graph the step"
        )

    def _side_effects(self, before: tuple[StateFingerprint, list, dict, tuple] | None,
                      hyperparameters: bool = True) -> str | None:
        """A sentence naming the first Python side effect of the step, if any.

        ``hyperparameters=False`` while capturing: the optimizers' own check covers them
        (their settings for capture differ from the user's on purpose)."""
        if before is None:
            return None
        fingerprint, hyper, metric_counts, random_state = before
        source = host_random_draws(random_state, host_random_state(self._watch + self._follow))
        if source is not None:
            # (the global generators are shared by the process's threads: another one may have drawn)
            own = "`torch.Generator()`, passed as `generator=`" if source.startswith("PyTorch") \
                else "`np.random.default_rng()`, `random.Random()`"
            others = (
                f". If it draws none, another thread drew from {source} while it ran: give that thread a generator "
                f"of its own ({own})"
            ) if threading.active_count() > 1 and not source.startswith("the generator") else ""
            return (
                f"{self.what} draws random numbers from {source} each time it runs. A CUDA graph replays only the "
                "GPU work, so every replay would reuse the numbers drawn while capturing. Draw them with torch on "
                "the device instead (`torch.rand(..., device=x.device)`, `torch.randn`, `torch.randint`), which "
                f"a replay draws afresh{others}"
            )
        problem = self._metrics.unsupported_update(metric_counts, self.what, self.batch_end_hook)
        if problem is not None:
            return problem
        changes = fingerprint.changes(self._fingerprint())
        if changes:
            more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
            legacy = _legacy_reparametrization(self._modules, changes[0])
            if legacy is not None:
                return (
                    f"{self.what} {changes[0]}{more} each time it runs: PyTorch's `{legacy}` assigns a new weight "
                    "before every forward, Python a replay would not run. Use "
                    f"`torch.nn.utils.parametrizations.{legacy.rsplit('.', 1)[-1]}` instead, which computes the "
                    "weight inside the step, where a graph replays it"
                )
            return (
                f"{self.what} {changes[0]}{more} each time it runs. A CUDA graph replays only the GPU work, "
                "so this Python side effect would happen once instead of every step. Move it out of the step "
                f"(with Lightning, into `{self.batch_end_hook}`, which runs every step and receives `outputs`)"
            )
        for optimizer, old in zip(self._optimizers, hyper if hyperparameters else []):
            change = optimizer.describe_change(old, optimizer.hyperparameters())
            if change is not None:
                return (
                    f"{self.what} changes its optimizer's hyper-parameters while it runs ({change}); "
                    "a graph would keep the captured value. Set them outside the step (a learning-rate scheduler "
                    "stepped after each call, not inside it)"
                )
        return None

    def _host_state(self) -> str | None:
        for optimizer in self._optimizers:
            problem = optimizer.host_state()
            if problem is not None:
                return f"{problem}; a graph would freeze it"
        return None


def _labelled(name: str, pairs: Any) -> list[tuple[str, Any]]:
    """``pairs`` as a list of ``(label, object)`` tuples, or a TypeError naming the fix."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise TypeError(f"`{name}` takes (label, object) pairs, e.g. `{name}=[(\"sim\", sim)]`; got {pairs!r}")
    found = list(pairs)
    for pair in found:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise TypeError(f"`{name}` takes (label, object) pairs, e.g. `{name}=[(\"sim\", sim)]`; got {pair!r}")
    return [tuple(pair) for pair in found]


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Lightning's and Fabric's optimizer wrappers."""
    seen = {id(optimizer)}
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer) and id(inner) not in seen:
        optimizer, seen = inner, seen | {id(inner)}
        inner = getattr(optimizer, "optimizer", None)
    return optimizer


def _release_generator_after_failed_capture(device: torch.device) -> None:
    """A capture that fails before its end leaves the CUDA generator believing it is
    still being captured, and every later random op (dropout) raises. A fresh copy
    of its state, with the same seed and offset, is not captured."""
    generator = torch.cuda.default_generators[device.index if device.index is not None else 0]
    if hasattr(generator, "graphsafe_set_state") and hasattr(generator, "clone_state"):
        generator.graphsafe_set_state(generator.clone_state())


def _legacy_reparametrization(modules: Iterable[torch.nn.Module], change: str) -> str | None:
    """``torch.nn.utils.weight_norm`` or ``spectral_norm`` where ``change`` is the
    rebinding of a weight one of them computes: their forward pre-hooks assign it
    anew in Python at every forward."""
    for root in modules:
        for path, module in root.named_modules():
            for hook in module._forward_pre_hooks.values():
                kind = type(hook).__module__
                rebound = f"{'.' + path if path else ''}.{getattr(hook, 'name', None)}` to a new tensor"
                if kind in ("torch.nn.utils.weight_norm", "torch.nn.utils.spectral_norm") and rebound in change:
                    return kind
    return None


def _python_numbers(outputs: Any) -> dict[str, type]:
    """The leaves of a step's ``outputs`` that are Python numbers, by path (``outputs['lr']``)."""
    leaves, tree = flatten(outputs)
    return {path: type(leaf) for path, leaf in zip(leaf_paths(tree, "outputs"), leaves)
            if not isinstance(leaf, torch.Tensor) and (isinstance(leaf, numbers.Real) or _numpy_scalar(leaf))}


def _numpy_scalar(value: Any) -> bool:
    """A NumPy scalar (``np.bool_`` included, which is no ``numbers.Real``)."""
    return type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0


@contextlib.contextmanager
def _garbage_collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block: a collection inside a
    capture could release another CUDA graph, which CUDA does not permit while a
    stream captures; the capture would fail."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _end_capture(graph: torch.cuda.CUDAGraph) -> bool:
    """End a capture that the step's own error interrupted (its error is the one that
    matters); whether it ended cleanly."""
    try:
        graph.capture_end()
    except Exception:
        return False
    return True

