"""Keeping every rank of a data-parallel job on the same path through the step.

Under DDP the gradient all-reduce is part of the step, and with it of the captured
graph. A rank that replays its graph while another runs the step eagerly starts
its collectives in another order (``self.log(..., sync_dist=True)`` reduces inside
an eager step, after a replay), and the job hangs. So before a step whose path
could differ between ranks, the ranks agree:

* on the **action** (:meth:`RankAgreement.plan`): each rank plans locally; when the
  plans differ and one of them is a capture or a replay, every rank runs the step
  eagerly instead (:func:`agreed_action`).
* on the **outcome of a capture** (:meth:`RankAgreement.capture`): a capture that
  failed, or was put off, on one rank is given up on every rank, and the failing
  rank's explanation is shared so that rank zero can report it.

The agreement is a tiny all-reduce over a Gloo group of its own: host memory
only, so it waits for no GPU work and cannot collide with NCCL collectives in a
graph, and every wait is bounded by the group's timeout, after which
:class:`RankAgreementError` names the step and the likely cause.

Agreeing costs a round trip per step. :class:`AgreementSchedule` skips it where
every rank is known to take the same path: after a replay, in the middle of an
epoch, when the batches of all ranks have the same signature at every position
(a ``DistributedSampler`` pads every rank to the same length, so even the ragged
last batch has one size everywhere). Epoch boundaries and every step after a
non-replay are still agreed, and a signature that differs between ranks at any
agreed step turns the agreement on for every later step.

Framework-free: nothing here imports Lightning.
"""

from __future__ import annotations

import zlib
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lightning_graphs.batches import BatchSignature
from lightning_graphs.graphed_step import Action, CaptureOutcome, StepPlan

__all__ = [
    "RankAgreement", "RankAgreementError", "AgreementSchedule", "CaptureOutcome", "agreed_action", "agree_on_plan",
    "signature_digest", "DISAGREEMENT",
]

# why a step runs eagerly after an agreement found the ranks' plans apart
DISAGREEMENT = (
    "the ranks planned this step differently (a batch of another signature on some rank, or graphs given up there)"
)

# actions as numbers, ordered so that the range over ranks says whether they differ
_ACTION_CODES = {Action.EAGER: 0, Action.WARMUP: 1, Action.CAPTURE: 2, Action.REPLAY: 3}


class RankAgreementError(RuntimeError):
    """The ranks did not reach an agreement in time: another rank failed or is stuck."""


def agreed_action(local: Action, lowest: int, highest: int) -> Action:
    """What this rank does, given the range of action codes planned over the ranks.

    The same action everywhere is taken as planned, and so are eager steps
    (warm-up and eager runs make the same collectives). Where one rank would
    capture or replay and another not, nobody does: a planned capture becomes a
    warm-up step (the signature is captured the next time all agree), a planned
    replay an eager step.
    """
    if lowest == highest or highest <= _ACTION_CODES[Action.WARMUP]:
        return local
    return Action.WARMUP if local in (Action.WARMUP, Action.CAPTURE) else Action.EAGER


def signature_digest(signature: BatchSignature | None) -> int:
    """A number equal on two ranks when their batches have equal signatures.

    Built from the structure and each leaf's shape, dtype, strides, flags and
    plain value, but not the device (each rank has its own). A non-tensor leaf
    of another type counts by its type alone. 31 bits, for an int64 all-reduce
    of the digest and its negation.
    """
    if signature is None:
        return 0
    parts = [_tree_text(signature.tree)]
    for spec in signature.specs:
        if isinstance(spec, tuple) and len(spec) == 7:  # a tensor: drop the device
            shape, dtype, _device, *rest = spec
            parts.append(repr((shape, dtype, *rest)))
        elif isinstance(spec, tuple):
            parts.append(repr(spec))
        else:
            parts.append(type(getattr(spec, "value", spec)).__qualname__)
    return zlib.crc32("|".join(parts).encode()) & 0x7FFFFFFF


def _tree_text(tree: Any) -> str:
    if tree is None:
        return "."
    children = ",".join(_tree_text(child) for child in tree.children)
    return f"{tree.kind}:{tree.type.__qualname__}:{tree.keys!r}({children})"


class RankAgreement:
    """Agreements between the ranks of a process group, over a Gloo group of their own.

    Args:
        timeout: seconds a rank waits for the others at one agreement before
            :class:`RankAgreementError`. Bounds the time other ranks may spend
            between two agreements (an eager step, a capture, a first compile).
        group: the group to agree in (default: a new Gloo group of all ranks, made
            by every rank in the same order; pass one for tests).
        what: how messages name the step.

    Every rank must call the same methods in the same order.
    """

    def __init__(self, timeout: float = 900.0, group: Any = None, what: str = "the training step") -> None:
        if timeout <= 0:
            raise ValueError(f"`timeout` must be positive, got {timeout}")
        self.timeout = timeout
        self.what = what
        self._own_group = group is None
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout)) if group is None else group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size(self.group)
        self.agreements = 0  # collectives made, for tests and stats

    def plan(self, action: Action, signature: BatchSignature | None = None) -> tuple[Action, bool]:
        """The action this rank takes (see :func:`agreed_action`) and whether the
        batches of all ranks had one signature."""
        code, digest = _ACTION_CODES[action], signature_digest(signature)
        low, neg_high, digest_low, neg_digest_high = self._min([code, -code, digest, -digest], "plan")
        return agreed_action(action, low, -neg_high), digest_low == -neg_digest_high

    def capture(self, outcome: CaptureOutcome, explanation: str | None = None,
                unfinished: bool = False) -> tuple[CaptureOutcome, str | None, bool]:
        """The outcome every rank acts on, the explanation of the lowest-ranked rank
        that failed (when the agreed outcome is a failure), and whether any rank
        reported ``unfinished`` work (the callback: a DDP reducer left mid-backward)."""
        low, neg_unfinished = self._min([int(outcome), -int(unfinished)], "capture")
        agreed = CaptureOutcome(low)
        if agreed is CaptureOutcome.FAILED:
            explanations: list[Any] = [None] * self.world_size
            self._collect(explanations, (self.rank, explanation) if outcome is CaptureOutcome.FAILED else None)
            failures = sorted(e for e in explanations if e is not None)
            if failures and outcome is not CaptureOutcome.FAILED:
                rank, text = failures[0]
                explanation = f"the capture failed on rank {rank}: {text}"
        return agreed, explanation, neg_unfinished < 0

    def rank_zero_flag(self, flag: bool) -> bool:
        """Rank zero's ``flag``, on every rank (a flag the other ranks pass is ignored)."""
        (neg_flag,) = self._min([-int(flag and self.rank == 0)], "flag")
        return neg_flag < 0

    def close(self) -> None:
        """Release the Gloo group this agreement made."""
        if self._own_group and self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
        self.group = None

    def _min(self, values: list[int], topic: str) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64)
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        except RuntimeError as error:
            raise self._error(topic) from error
        self.agreements += 1
        return tensor.tolist()

    def _collect(self, gathered: list[Any], value: Any) -> None:
        try:
            dist.all_gather_object(gathered, value, group=self.group)
        except RuntimeError as error:
            raise self._error("capture") from error

    def _error(self, topic: str) -> RankAgreementError:
        what = {"plan": "the path through", "capture": "the outcome of a capture of"}.get(
            topic, "Lightning's per-batch SIGTERM check before"
        )
        return RankAgreementError(
            f"CUDAGraphCallback: rank {self.rank} waited up to {self.timeout:.0f} s for the other ranks to agree on "
            f"{what} {self.what}, and they did not come (or their connection broke): another rank failed or is "
            "stuck; its own log says why. A step slower than that on some rank (a first torch.compile, for "
            "instance) needs a longer `agreement_timeout`."
        )


class AgreementSchedule:
    """Which steps need an agreement; the same answer on every rank.

    ``every_step`` agrees before every step. Otherwise a step is agreed unless the
    step before it was a replay, it is not the first or last of its epoch and no
    boundary (an epoch start, a validation run) came in between: where batches of
    all ranks have one signature at every position, ranks that replayed the same
    way plan the same way again. A step found with signatures that differ
    between ranks turns agreement on for good (:meth:`record`).
    """

    def __init__(self, every_step: bool) -> None:
        self.every_step = every_step
        self._previous: Action | None = None  # the action every rank took in the last step
        self._boundary = True
        self.skipped = 0  # steps taken without an agreement

    def needed(self, batch_idx: int, batches_in_epoch: float) -> bool:
        if self.every_step or self._boundary or self._previous is not Action.REPLAY:
            return True
        return batch_idx == 0 or batch_idx >= batches_in_epoch - 1

    def record(self, action: Action, same_signature: bool = True) -> None:
        """The action every rank took; ``same_signature=False`` when an agreement
        found batches of different signatures on the ranks."""
        self._previous = action
        self._boundary = False
        if not same_signature:
            self.every_step = True

    def skip(self, action: Action) -> None:
        """A step taken without an agreement."""
        self.skipped += 1
        self._previous = action

    def boundary(self) -> None:
        """Agree on the next step (code outside the step ran: an epoch start, validation)."""
        self._boundary = True


def agree_on_plan(
    ranks: RankAgreement, schedule: AgreementSchedule, plan: StepPlan, batch_idx: int, batches_in_epoch: float
) -> StepPlan:
    """The plan every rank follows for one step (the ``batch_idx``-th of an epoch of
    ``batches_in_epoch``): this rank's own, unless the schedule asks for an
    agreement and another rank would not capture or replay it too; then a planned
    capture becomes a warm-up step and a planned replay an eager one."""
    if not schedule.needed(batch_idx, batches_in_epoch):
        if plan.action is not Action.REPLAY:
            # the other ranks replay (they did so at the last step and took no agreement
            # now): going on would leave them waiting in the graph's all-reduce
            raise RankAgreementError(
                f"rank_agreement=\"boundaries\" skipped the agreement before batch {batch_idx}, but this rank's "
                f"batch cannot be replayed here ({plan.reason or plan.action.name.lower()}) while the other ranks "
                "replay. Batches differ between ranks in the middle of an epoch: use rank_agreement=\"every_step\" "
                "(the default)"
            )
        schedule.skip(plan.action)
        return plan
    action, same_signature = ranks.plan(plan.action, plan.signature)
    schedule.record(action, same_signature)
    if action is plan.action:
        return plan
    if action is Action.WARMUP:
        return StepPlan(Action.WARMUP, plan.signature, variant=plan.variant)
    return StepPlan(Action.EAGER, plan.signature, DISAGREEMENT, variant=plan.variant)
