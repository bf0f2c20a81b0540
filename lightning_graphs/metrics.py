"""torchmetrics metrics updated inside a graphed step.

A metric's ``update`` (and its ``forward``: update, plus the value of the batch
alone) does GPU work on the metric's state tensors and Python bookkeeping around
it. A replay repeats the GPU work on the tensors the capture saw, and none of the
Python. What keeps a metric exact under replays:

* **States stay where the graph reads them.** torchmetrics rebinds a state to a new
  tensor in ``reset`` (Lightning resets logged metrics at the end of every epoch),
  in ``forward`` and in updates written as ``self.total = self.total + n``. Each
  state gets a home: the tensor it held when first captured. The captured step ends
  by copying the state it produced into its home, inside the graph, and binding the
  attribute to the home again; before a replay or a capture, a state rebound in the
  meantime (an eager step, a reset) is first copied into its home.
* **The host's bookkeeping after a replay**: the update count grows as in the
  captured step, a cached ``compute`` result is dropped, and the batch value that
  ``forward`` returned (what ``self.log(name, metric)`` logs on step) is a copy of
  the graph's, each step's own.
* **What cannot be replayed is named**: list states (appended to at every update),
  reading the input on the host (the aggregators' NaN check, the classification
  metrics' ``validate_args``), synchronising across processes at every step,
  ``compute_on_cpu``, a ``forward`` that reduces with ``"mean"`` (it weighs by the
  host's update count) or by stacking, compute groups of a ``MetricCollection``
  (they share state tensors between metrics; torchmetrics forms them at the
  collection's first ``update()``, so a collection only called as ``forward`` has
  none, and one that forms them later makes the graphs stale), and torchmetrics
  older than 1.6. A step updating such a metric trains eagerly, with the reason.
* **A capture given up** (a host read later in the step, say) ran the metric's
  Python but none of its GPU work: the metric gets back the states and counts it
  had, so that the eager step that follows counts once.

Not followed: a step that reads a metric's state tensors without calling or
updating the metric (a later reset rebinds them where the graph does not look),
and the update count of a step that resets its own metric before updating it
(the values are right; the count after a replay is not the eager one).

Framework-free: nothing here imports Lightning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from lightning_graphs.batches import clone_tensors

try:  # a dependency; guarded so that the core imports without it
    import torchmetrics
    from torchmetrics import Metric, MetricCollection
    from torchmetrics.utilities.data import dim_zero_max, dim_zero_min, dim_zero_sum
except ImportError:  # pragma: no cover
    torchmetrics = Metric = MetricCollection = None  # type: ignore[assignment,misc]

# torchmetrics before 1.6 reads inputs on the host in common updates (deciding
# whether classification scores need a sigmoid) and lacks nan_strategy="disable"
_OLDEST_GRAPHED = (1, 6)

__all__ = ["InStepMetrics", "why_not_graphed", "is_metric"]

# what torchmetrics keeps on a metric besides its states: set by an update or a
# forward and restored, redone by the host after a replay, or (device, dtype) set
# again when Lightning moves a logged metric to the module's device
_BOOKKEEPING = frozenset({
    "_update_count", "_forward_cache", "_computed", "_to_sync", "_should_unsync", "_is_synced", "_enable_grad",
    "_cache", "compute_on_cpu", "_device", "_dtype",
})


def is_metric(value: Any) -> bool:
    return Metric is not None and isinstance(value, Metric)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def why_not_graphed(metric: Any, in_compute_group: bool = False) -> str | None:
    """Why updates of this metric cannot be replayed, if so."""
    if _version(torchmetrics.__version__) < _OLDEST_GRAPHED:
        return (
            f"torchmetrics {torchmetrics.__version__} reads metric inputs on the host; metrics are graphed with "
            "torchmetrics 1.6 or newer"
        )
    lists = [name for name, default in metric._defaults.items() if not isinstance(default, torch.Tensor)]
    if lists:
        return (
            f"it keeps list states ({', '.join(f'`{n}`' for n in lists)}), which grow at every update; a metric "
            "with tensor states only can be graphed (for instance a fixed `thresholds=` for curve metrics)"
        )
    if getattr(metric, "nan_strategy", "disable") != "disable":  # the aggregators: MeanMetric, SumMetric, ...
        return (
            f"it looks for NaN in its input on the host at every update (`nan_strategy={metric.nan_strategy!r}`); "
            "pass `nan_strategy=\"disable\"`"
        )
    if getattr(metric, "validate_args", False) and type(metric).__module__.startswith("torchmetrics.classification"):
        return "it checks its input's values on the host at every update; pass `validate_args=False`"
    if metric.dist_sync_on_step:
        return "it synchronises across processes at every step (`dist_sync_on_step=True`)"
    if metric.compute_on_cpu:
        return "it moves its states to the CPU (`compute_on_cpu=True`)"
    if metric.full_state_update is False:  # its forward reduces the batch's states into the global ones
        for name, reduction in metric._reductions.items():
            if reduction not in (dim_zero_sum, dim_zero_max, dim_zero_min):
                how = getattr(reduction, "__name__", repr(reduction))
                return (
                    f"its forward reduces state `{name}` with `{how}`, which reads the host's update count or "
                    "changes the state's shape"
                )
    if in_compute_group:
        return (
            "it shares state tensors with other metrics of a MetricCollection (compute groups); create the "
            "collection with `compute_groups=False`"
        )
    return None


def _collections(modules: Iterable[torch.nn.Module]) -> list[Any]:
    """The MetricCollections under ``modules`` that may form compute groups."""
    if MetricCollection is None:
        return []
    return [
        module for root in modules for module in root.modules()
        if isinstance(module, MetricCollection) and module._enable_compute_groups
    ]


def _shares_states(collection: Any) -> bool:
    """Whether a collection's metrics share state tensors: torchmetrics forms compute
    groups at the collection's first ``update()`` (or takes them as given); called
    as ``forward`` only, every metric keeps states of its own."""
    groups = getattr(collection, "_groups", {}) or {}
    return bool(getattr(collection, "_groups_checked", False)) and any(len(g) > 1 for g in groups.values())


def _in_compute_groups(modules: Iterable[torch.nn.Module]) -> set[int]:
    """ids of the metrics whose collection shares states between them."""
    return {id(m) for c in _collections(modules) if _shares_states(c) for m in c.values(copy_state=False)}


@dataclass(eq=False)
class MetricUpdate:
    """What one captured step did to one metric, which the host repeats after each replay."""

    metric: Any
    count: int  # updates the step makes
    batch_value: Any  # the graph's output ``forward`` cached (None if the step only updated)


class InStepMetrics:
    """The torchmetrics metrics under ``modules`` that a graphed step updates (or
    computes): their states kept where the graphs read them, and the host's
    bookkeeping after each replay. See the module docstring."""

    def __init__(self, modules: Iterable[torch.nn.Module]) -> None:
        self._modules = list(modules)
        # (id(metric), state name) -> the tensor the graphs read; the metrics themselves are
        # held in _managed, so their ids stay theirs
        self._homes: dict[tuple[int, str], torch.Tensor] = {}
        self._managed: dict[int, Any] = {}  # id -> metric: those a captured step touched, homes assigned
        self._candidates: list[Any] = []  # graphable metrics during a capture
        self._graphable: set[int] = set()  # ids of the graphable metrics, as of the last refresh()
        self._all: set[int] = set()  # ids of all metrics, as of the last refresh()
        self._ungrouped: list[Any] = []  # collections that may yet form compute groups, as of the last refresh()

    def _labelled(self) -> list[tuple[str, Any]]:
        if Metric is None:
            return []
        return [(name, m) for root in self._modules for name, m in root.named_modules() if isinstance(m, Metric)]

    def refresh(self) -> None:
        """Find the graphable metrics again (before judging side effects with :meth:`ignores`)."""
        grouped = _in_compute_groups(self._modules)
        labelled = self._labelled()
        self._graphable = {id(m) for _, m in labelled if why_not_graphed(m, id(m) in grouped) is None}
        self._all = {id(m) for _, m in labelled}
        self._ungrouped = [c for c in _collections(self._modules) if not _shares_states(c)]

    def ignores(self, obj: Any, name: str) -> bool:
        """Whether ``obj.name`` is a metric's state or bookkeeping, as of the last
        :meth:`refresh`: not a side effect of the step (a graphable metric's are kept
        right by the capture and the replays; a step updating another metric is
        named by :meth:`unsupported_update` first), nor a value the step bakes in (a
        validation metric updated between training steps)."""
        return id(obj) in self._all and (name in _BOOKKEEPING or name in obj._defaults)

    def counts(self) -> dict[int, int]:
        return {id(m): m._update_count for _, m in self._labelled()}

    def unsupported_update(self, counts_before: dict[int, int], what: str, batch_end_hook: str) -> str | None:
        """A sentence naming a metric the step updated that cannot be graphed, if any."""
        grouped = _in_compute_groups(self._modules)
        for label, metric in self._labelled():
            if metric._update_count == counts_before.get(id(metric), metric._update_count):
                continue
            reason = why_not_graphed(metric, id(metric) in grouped)
            if reason is not None:
                return (
                    f"{what} updates the torchmetrics {type(metric).__name__} `{label or 'self'}`, and {reason}. "
                    f"Or update it in `{batch_end_hook}` (it receives the step's `outputs`)"
                )
        return None

    # -- around a capture ------------------------------------------------------

    def before_capture(self) -> dict[int, tuple]:
        """Bring the states of the metrics earlier graphs hold home, and note what the
        step may change of every graphable metric: its update count, cached values
        and state tensors (which the graph will read). Pass the result to
        :meth:`end_of_step`, :meth:`after_capture` or, if the capture is given up,
        :meth:`abandon`."""
        self.refresh()
        self._candidates = [m for _, m in self._labelled() if id(m) in self._graphable]
        if self.bring_home() is not None:  # a state changed shape or device: the graphs were dropped as stale
            self._homes.clear()
            self._managed.clear()
        return {
            id(m): (m._update_count, m._forward_cache, m._computed, {n: getattr(m, n) for n in m._defaults},
                    {n: m.__dict__[n] for n in _BOOKKEEPING if n in m.__dict__}, id(m) in self._managed)
            for m in self._candidates
        }

    def abandon(self, before: dict[int, tuple]) -> None:
        """A capture that will not be replayed ran the step's Python but none of its
        GPU work: every metric gets back the states and bookkeeping it had before
        (the tensors it held then were not written), so that the eager step that
        follows counts and accumulates once."""
        for metric in self._candidates:
            _, _, _, states, bookkeeping, managed = before[id(metric)]
            for name, tensor in states.items():
                setattr(metric, name, tensor)
            metric.__dict__.update(bookkeeping)
            if not managed:
                self._managed.pop(id(metric), None)
                for name in states:
                    self._homes.pop((id(metric), name), None)
        self._candidates = []

    def end_of_step(self, before: dict[int, tuple]) -> str | None:
        """Inside the capture, after the step: each metric the step touched copies its
        states into their homes (recorded in the graph) and is bound to them again.
        A problem if a state changed shape."""
        for metric in self._candidates:
            count, cache, computed, states, _, _ = before[id(metric)]
            touched = (
                metric._update_count != count or metric._forward_cache is not cache or metric._computed is not computed
                or any(getattr(metric, n) is not t for n, t in states.items())
            )
            if not touched:
                continue
            self._managed[id(metric)] = metric
            for name, read in states.items():
                home = self._homes.setdefault((id(metric), name), read)  # the tensor the graph read
                state = getattr(metric, name)
                if state is home:
                    continue
                if not _fits(state, home):
                    return (
                        f"the step changes the shape, dtype or device of the state `{name}` of the torchmetrics "
                        f"{type(metric).__name__}, which a graph cannot repeat"
                    )
                with _inference_mode_for(home):
                    home.copy_(state)
                setattr(metric, name, home)
        return None

    def after_capture(self, before: dict[int, tuple]) -> tuple[list[MetricUpdate], str | None]:
        """After the capture and its first replay: what the captured step did to each
        metric (its Python ran once, for this step), and a problem if a replay could
        not repeat it."""
        updates = []
        for metric in self._candidates:
            if id(metric) not in self._managed:
                continue
            count, cache, _, _, _, _ = before[id(metric)]
            if metric._update_count < count:
                return [], f"the step resets the torchmetrics {type(metric).__name__}, which a graph cannot repeat"
            batch_value = metric._forward_cache if metric._forward_cache is not cache else None
            updates.append(MetricUpdate(metric, metric._update_count - count, batch_value))
        self._candidates = []
        self.after_replay(updates, counted=True)
        return updates, None

    # -- around a replay -------------------------------------------------------

    def stale_reason(self) -> str | None:
        """Why the homes the graphs read can no longer take the metrics' states, if so."""
        for collection in self._ungrouped:
            if _shares_states(collection):  # its update() was called since: some metrics now share states
                return f"the MetricCollection {type(collection).__name__} formed compute groups"
        for metric in self._managed.values():
            for name in metric._defaults:
                state, home = getattr(metric, name), self._homes.get((id(metric), name))
                if home is not None and state is not home and not _fits(state, home):
                    return (
                        f"the state `{name}` of the torchmetrics {type(metric).__name__} changed its shape, dtype or "
                        "device"
                    )
        return None

    def bring_home(self) -> str | None:
        """Before a replay or a capture: states rebound since (an eager step, a reset)
        are copied into their homes, which they are bound to again."""
        for metric in self._managed.values():
            for name in metric._defaults:
                state, home = getattr(metric, name), self._homes.get((id(metric), name))
                if home is None or state is home:
                    continue
                if not _fits(state, home):
                    return (
                        f"the state `{name}` of the torchmetrics {type(metric).__name__} changed its shape, dtype or "
                        "device"
                    )
                with _inference_mode_for(home):
                    home.copy_(state)
                setattr(metric, name, home)
        return None

    @staticmethod
    def after_replay(updates: list[MetricUpdate], counted: bool = False) -> None:
        """The Python of the captured step's metric calls, for the step just replayed."""
        for update in updates:
            attributes = update.metric.__dict__  # plain attributes: nn.Module.__setattr__ is slow, and not needed
            if not counted:
                attributes["_update_count"] += update.count
            attributes["_computed"] = None
            if update.batch_value is not None:
                attributes["_forward_cache"] = clone_tensors(update.batch_value)


def _inference_mode_for(home: torch.Tensor) -> Any:
    """Where a home was made under inference mode (an evaluation loop), it is written
    under inference mode too."""
    return torch.inference_mode() if home.is_inference() else contextlib.nullcontext()


def _fits(state: Any, home: torch.Tensor) -> bool:
    return (
        isinstance(state, torch.Tensor) and state.shape == home.shape and state.dtype == home.dtype
        and state.device == home.device
    )
