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
  only (appending to a list, counting in an attribute, rebinding a tensor attribute);
* the optimizer's hyper-parameters are written outside the step (schedulers are).

Debugging a failed capture: the warning names the user line that broke it. To
find host synchronisations in general, run one eager step under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Sequence

import torch

from lightning_graphs.batches import BatchSignature, StaticBatch, clone_tensors, describe_mismatch, signature_of
from lightning_graphs.capture_errors import explain_capture_error
from lightning_graphs.messages import GraphCaptureError, WarnOnce
from lightning_graphs.optimizers import GraphSafeOptimizer
from lightning_graphs.python_state import StateFingerprint

__all__ = ["GraphedStep", "Phase", "Action", "StepPlan", "GraphStats", "CaptureFailed"]

# a graph dropped as stale after fewer replays than this counts as "thrashing"
_SHORT_LIVED_REPLAYS = 4
# this many short-lived graphs in a row and re-capturing costs more than it saves
_MAX_SHORT_LIVED = 3

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


@dataclass
class StepPlan:
    """The decision for one call: its action, the inputs' signature and, for eager
    calls, the reason."""

    action: Action
    signature: BatchSignature | None
    reason: str | None = None


@dataclass
class GraphStats:
    """What a :class:`GraphedStep` did; read it to see whether graphs paid off."""

    warmup_steps: int = 0
    captures: int = 0
    replays: int = 0
    eager_steps: int = 0
    eager_reasons: dict[str, int] = field(default_factory=dict)  # reason -> eager calls
    capture_seconds: float = 0.0  # total time spent capturing
    graph_memory_bytes: int = 0  # device memory reserved by the latest capture
    disabled_reason: str | None = None

    def summary(self) -> str:
        parts = [
            f"{self.captures} capture{'s' if self.captures != 1 else ''} "
            f"({self.capture_seconds * 1e3:.0f} ms, {self.graph_memory_bytes / 2**20:.1f} MiB)",
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


class CaptureFailed(Exception):
    """Capture did not succeed; the optimizer and gradients are as they were before it.

    ``explanation`` is the user-facing message naming the operation and line."""

    def __init__(self, explanation: str) -> None:
        super().__init__(explanation)
        self.explanation = explanation


def ignore_torch_attribute(obj: Any, name: str) -> bool:
    """Attributes PyTorch manages itself (hooks, caches, ``training``; optimizer internals)."""
    if isinstance(obj, torch.nn.Module):
        return name in _MODULE_ATTRIBUTES
    if isinstance(obj, torch.optim.Optimizer):
        return name.startswith("_") or name in ("defaults", "state", "param_groups")
    return False


class GraphedStep:
    """A step function captured as one CUDA graph and replayed, with eager fallback.

    Args:
        fn: the step. Called as ``fn(*inputs)``; may be ``None`` when the caller
            drives :meth:`plan`, :meth:`warmup`, :meth:`capture`, :meth:`replay`
            and :meth:`eager` itself (the Lightning callback does).
        warmup_steps: eager steps before the first capture (at least one when
            ``optimizers`` are given: their state is created lazily by a first step).
        optimizers: optimizers stepped inside ``fn``; prepared for capture (see
            :mod:`lightning_graphs.optimizers`) and restored by :meth:`close`.
        modules: modules used inside ``fn``; a change of their parameters, train/eval
            modes or ``requires_grad`` flags makes the graph stale.
        watch: ``(label, object)`` pairs whose Python attributes the step must not
            change; modules not listed are watched under their class name.
        strict: raise :class:`GraphCaptureError` instead of falling back to eager.
        warn: ``warn(key, message)`` for user-facing warnings (default: once per key).
        ignore_attribute: ``ignore_attribute(obj, name)`` excludes framework-managed
            attributes from the side-effect check.
        what: how messages name the step, e.g. ``"the training step"``.
        input_name: how messages name the inputs, e.g. ``"batch"``.
        device: the CUDA device the step runs on, for a step whose inputs, modules
            and optimizers do not say (a simulation updating tensors it closes over).

    Optimizers wrapped by Lightning or Fabric (``fabric.setup(model, optimizer)``)
    are prepared through the optimizer they wrap.
    """

    def __init__(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        warmup_steps: int = 3,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        modules: Sequence[torch.nn.Module] = (),
        watch: Sequence[tuple[str, Any]] = (),
        strict: bool = False,
        warn: Callable[[str, str], Any] | None = None,
        ignore_attribute: Callable[[Any, str], bool] | None = None,
        what: str = "the step",
        input_name: str = "inputs",
        device: torch.device | str | int | None = None,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}")
        self.fn = fn
        self.warmup_steps = max(warmup_steps, 1) if optimizers else warmup_steps
        self.strict = strict
        self.what = what
        self.input_name = input_name
        self.stats = GraphStats()
        self.phase = Phase.WARMING_UP
        self._warn = warn or WarnOnce()
        self._ignore = ignore_attribute or ignore_torch_attribute
        self._optimizers = [GraphSafeOptimizer(_unwrap_optimizer(o)) for o in optimizers]
        self._modules = list(modules)
        watched = {id(obj) for _, obj in watch}
        self._watch = list(watch) + [(type(m).__name__, m) for m in self._modules if id(m) not in watched]
        self._watch += [(type(o.optimizer).__name__, o.optimizer) for o in self._optimizers]
        self._params = self._optimized_params()
        self._warmups_left = self.warmup_steps
        self._warmup_structure: tuple | None = None  # modules' and optimizers' structure at the last warm-up
        self._device: torch.device | None = torch.device("cuda", device) if isinstance(device, int) else (
            torch.device(device) if device is not None else None
        )
        if self._device is not None and self._device.type != "cuda":
            raise ValueError(f"`device` must be a CUDA device, got {self._device}")
        self._stream: torch.cuda.Stream | None = None  # side stream for warm-up and capture
        self._pool: Any = None  # memory pool shared by every capture of this step
        self._graph: torch.cuda.CUDAGraph | None = None
        # a stale graph is kept (never replayed) until the next capture: while a graph
        # holds the pool, the next capture may share it and reuse its memory
        self._retired_graph: torch.cuda.CUDAGraph | None = None
        self._signature: BatchSignature | None = None  # inputs the graph was captured for
        self._static: StaticBatch | None = None  # static copies of those inputs
        self._static_outputs: Any = None  # what the captured call returned (graph memory)
        self._static_grads: list[torch.Tensor | None] = []  # p.grad as the graph writes them
        self._structure: tuple | None = None  # modules' parameters, modes and flags at capture
        self._structure_check_due = False
        self._replays_of_graph = 0
        self._short_lived = 0
        for optimizer in self._optimizers:
            if optimizer.unsupported:
                self.disable(f"{type(optimizer.optimizer).__name__} cannot be captured: {optimizer.unsupported}")

    # -- decisions ------------------------------------------------------------

    def plan(self, inputs: Any) -> StepPlan:
        """Decide what a call with ``inputs`` does; cheap, and changes nothing but
        drops a graph that has gone stale."""
        if self.phase is Phase.DISABLED:
            return StepPlan(Action.EAGER, None, "graphs disabled")
        signature = signature_of(inputs)
        if self._device is None and not self._find_device(signature):
            self.disable("no CUDA tensors: CUDA graphs need the step to run on a CUDA device")
            return StepPlan(Action.EAGER, signature, "graphs disabled")
        unsupported = signature.unsupported_reason()
        if unsupported is not None:
            return StepPlan(Action.EAGER, signature, unsupported)
        if self._graph is not None:
            if signature != self._signature:
                return StepPlan(
                    Action.EAGER, signature, describe_mismatch(self._signature, signature, self.input_name)
                )
            stale, structural = self._stale_reason()
            if stale is None:
                return StepPlan(Action.REPLAY, signature)
            self._drop_graph(stale)
            if self.phase is Phase.DISABLED:
                return StepPlan(Action.EAGER, signature, "graphs disabled")
            if structural:
                self._warmups_left = max(self._warmups_left, 1)  # new parameters need optimizer state first
        if self._warmups_left > 0 or self._changed_since_warmup():
            return StepPlan(Action.WARMUP, signature)
        return StepPlan(Action.CAPTURE, signature)

    def _changed_since_warmup(self) -> bool:
        """Whether parameters, modes or param groups changed since the last warm-up step
        (a layer unfrozen before the first capture): new parameters need an eager step,
        which creates their optimizer state, before a graph can step them."""
        if not self._optimizers or self._warmup_structure is None:
            return False
        return self._warmup_structure != self._full_structure()

    def _full_structure(self) -> tuple:
        return self._structure_key(), tuple(o.structure_key() for o in self._optimizers)

    def request_structure_check(self) -> None:
        """Check parameters, modes and ``requires_grad`` flags before the next replay
        (call it where they may have changed: epoch start, after validation)."""
        self._structure_check_due = True

    def _stale_reason(self) -> tuple[str | None, bool]:
        """Why the graph no longer matches, if so, and whether the modules themselves
        changed (new trainable parameters need an eager step to create optimizer state)."""
        for optimizer in self._optimizers:
            reason, structural = optimizer.stale_reason()
            if reason is not None:
                return reason, structural
        if self._structure_check_due:
            self._structure_check_due = False
            if self._structure != self._structure_key():
                return "a parameter, a train/eval mode or a requires_grad flag changed", True
        return None, False

    def _structure_key(self) -> tuple:
        modules = [m for root in self._modules for m in root.modules()]
        params = [p for root in self._modules for p in root.parameters()]
        return (
            tuple(m.training for m in modules),
            tuple((id(p), p.data_ptr(), p.requires_grad) for p in params),
        )

    def _find_device(self, signature: BatchSignature) -> bool:
        candidates = [leaf for leaf in signature.leaves if isinstance(leaf, torch.Tensor)]
        candidates += [p for root in self._modules for p in root.parameters()] + self._params
        for tensor in candidates:
            if tensor.is_cuda:
                self._device = tensor.device
                return True
        return False

    # -- the four actions -----------------------------------------------------

    def warmup(self, fn: Callable[[], Any]) -> Any:
        """Run one real step eagerly on the side stream, watching for side effects."""
        check = self.stats.warmup_steps > 0  # the first step may initialise lazily; judge the later ones
        before = self._snapshot() if check else None
        stream = self._side_stream()
        current = torch.cuda.current_stream(self._device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            outputs = fn()
        current.wait_stream(stream)
        self._warmups_left = max(self._warmups_left - 1, 0)
        self.stats.warmup_steps += 1
        if self._optimizers:
            self._warmup_structure = self._full_structure()
        problem = self._side_effects(before) if check else None
        problem = problem or self._host_state()
        if problem is not None:
            self.disable(problem)
        return outputs

    def capture(self, plan: StepPlan, fn: Callable[[Any], Any]) -> Any:
        """Record ``fn(static_inputs)`` into a graph and replay it once, which runs
        this step. Returns the step's outputs in graph memory (clone what must
        outlive the next replay).

        Raises:
            CaptureFailed: capture was impossible; nothing ran and the optimizer
                and gradients are as before.
        """
        signature = plan.signature
        self._params = self._optimized_params()  # param groups may have been added since the last capture
        if self._static is None or self._static.signature != signature:
            self._static = StaticBatch(signature)
        else:
            self._static.copy_from(signature)
        saved_grads = [p.grad for p in self._params]
        stream = self._side_stream()
        before = self._snapshot()
        for optimizer in self._optimizers:
            optimizer.enter_capture()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self._device)
        torch.cuda.empty_cache()  # let the pool take what warm-up left cached
        reserved = torch.cuda.memory_reserved(self._device)
        started = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.device(self._device), torch.cuda.stream(stream):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    outputs = fn(self._static.value)
                except BaseException:
                    _end_capture(graph)
                    raise
                graph.capture_end()  # raises if an operation silently invalidated the capture
        except BaseException as exc:
            for optimizer in self._optimizers:
                optimizer.exit_capture()
            for p, grad in zip(self._params, saved_grads):
                p.grad = grad
            _release_generator_after_failed_capture(self._device)
            self._stream = None  # a failed capture can leave the stream routed to the pool
            self._pool = None
            if not isinstance(exc, Exception):
                raise
            raise CaptureFailed(explain_capture_error(exc, self.what)) from exc
        problems = [optimizer.exit_capture() for optimizer in self._optimizers]
        problems.append(self._side_effects(before, hyperparameters=False))
        self.stats.capture_seconds += time.perf_counter() - started
        self.stats.graph_memory_bytes = max(torch.cuda.memory_reserved(self._device) - reserved, 0)
        self.stats.captures += 1
        self._graph, self._signature, self._static_outputs = graph, signature, outputs
        self._retired_graph = None
        self._static_grads = [p.grad for p in self._params]
        self._structure = self._structure_key()
        self._structure_check_due = False
        self._replays_of_graph = 0
        self.phase = Phase.CAPTURED
        graph.replay()
        problem = next((p for p in problems if p), None)
        if problem is not None:
            # the graph ran this step faithfully; later steps would repeat its Python decisions
            self.disable(problem)
        return outputs

    def replay(self, plan: StepPlan) -> Any:
        """Copy the inputs in and replay the graph. Returns the outputs in graph memory."""
        self._static.copy_from(plan.signature)
        for optimizer in self._optimizers:
            optimizer.sync_live()
        for p, grad in zip(self._params, self._static_grads):
            if p.grad is not grad:
                p.grad = grad  # an eager step or zero_grad rebound it; the graph writes these
        self._graph.replay()
        self._replays_of_graph += 1
        self.stats.replays += 1
        return self._static_outputs

    def eager(self, fn: Callable[[], Any], reason: str | None = None) -> Any:
        """Run one step as written (on the current stream)."""
        outputs = fn()
        self.stats.eager_steps += 1
        if reason is not None:
            key = reason if len(self.stats.eager_reasons) < 16 else "other reasons"
            self.stats.eager_reasons[key] = self.stats.eager_reasons.get(key, 0) + 1
        return outputs

    def __call__(self, *inputs: Any) -> Any:
        """Run the step on ``inputs``: warm-up, capture, replay or eager, as :meth:`plan` decides.

        Outputs of a replay are cloned, so they stay valid after the next call.
        """
        if self.fn is None:
            raise TypeError("GraphedStep was built without `fn`; pass one, or drive plan()/replay()/... yourself")
        plan = self.plan(inputs)
        if plan.action is Action.REPLAY:
            return clone_tensors(self.replay(plan))
        if plan.action is Action.WARMUP:
            return self.warmup(lambda: self.fn(*inputs))
        if plan.action is Action.CAPTURE:
            try:
                return clone_tensors(self.capture(plan, lambda static: self.fn(*static)))
            except CaptureFailed as failure:
                self.disable(failure.explanation, cause=failure)
                return self.eager(lambda: self.fn(*inputs), "capture failed")
        self.warn_fallback(plan)
        return self.eager(lambda: self.fn(*inputs), plan.reason)

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
        self._drop_graph(None)
        for optimizer in self._optimizers:
            optimizer.restore()  # the eager steps from here on are exactly the user's own
        if self.strict:
            raise GraphCaptureError(reason) from cause
        self._warn(
            "disabled",
            f"{reason} Training continues eagerly and correctly, without the CUDA graph speed-up."
            if reason.endswith(".")
            else f"{reason}. Training continues eagerly and correctly, without the CUDA graph speed-up.",
        )

    def close(self) -> None:
        """Free the graph and static buffers; give the optimizers back as the user made them."""
        self._drop_graph(None)
        self._retired_graph = None
        self._static = None
        for optimizer in self._optimizers:
            optimizer.restore()
        self._stream = None
        self._pool = None

    def user_optimizer_state(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        """``state_dict`` of ``optimizer`` as the unprepared optimizer would have saved it."""
        for prepared in self._optimizers:
            if prepared.optimizer is optimizer:
                return prepared.user_state_dict(state_dict)
        return state_dict

    def _drop_graph(self, stale_reason: str | None) -> None:
        if self._graph is None:
            return
        if stale_reason is not None:
            self._short_lived = self._short_lived + 1 if self._replays_of_graph < _SHORT_LIVED_REPLAYS else 0
        torch.cuda.synchronize(self._device)  # the last replay may still be running
        self._retired_graph = self._graph
        self._graph = None
        self._static_outputs = None
        self._static_grads = []
        if self.phase is Phase.CAPTURED:
            self.phase = Phase.WARMING_UP
        if stale_reason is not None and self._short_lived >= _MAX_SHORT_LIVED:
            self.disable(
                f"the captured graph went stale {self._short_lived} times within a few steps each "
                f"(last: {stale_reason}); capturing anew every few steps costs more than it saves"
            )

    # -- helpers ----------------------------------------------------------------

    def _optimized_params(self) -> list[torch.Tensor]:
        return [p for o in self._optimizers for g in o.optimizer.param_groups for p in g["params"]]

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self._device)
        return self._stream

    def _snapshot(self) -> tuple[StateFingerprint, list]:
        return (
            StateFingerprint(self._watch, self._ignore),
            [o.hyperparameters() for o in self._optimizers],
        )

    def _side_effects(self, before: tuple[StateFingerprint, list] | None, hyperparameters: bool = True) -> str | None:
        """A sentence naming the first Python side effect of the step, if any.

        ``hyperparameters=False`` while capturing: the optimizers' own check covers them
        (their settings for capture differ from the user's on purpose)."""
        if before is None:
            return None
        fingerprint, hyper = before
        changes = fingerprint.changes(StateFingerprint(self._watch, self._ignore))
        if changes:
            more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
            return (
                f"{self.what} {changes[0]}{more} each time it runs. A CUDA graph replays only the GPU work, "
                "so this Python side effect would happen once instead of every step. Move it out of the step "
                "(with Lightning, into `on_train_batch_end`, which runs every step and receives `outputs`)"
            )
        for optimizer, old in zip(self._optimizers, hyper if hyperparameters else []):
            change = optimizer.describe_change(old, optimizer.hyperparameters())
            if change is not None:
                return (
                    f"{self.what} changes its optimizer's hyper-parameters while it runs ({change}); "
                    "a graph would keep the captured value. Set them outside the step, e.g. with a learning-rate "
                    "scheduler"
                )
        return None

    def _host_state(self) -> str | None:
        for optimizer in self._optimizers:
            problem = optimizer.host_state()
            if problem is not None:
                return f"{problem}; a graph would freeze it"
        return None


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


def _end_capture(graph: torch.cuda.CUDAGraph) -> None:
    """End a capture that the step's own error interrupted; its error is the one that matters."""
    try:
        graph.capture_end()
    except Exception:
        pass

