"""Ranks agreeing on each step's path (lightning_graphs.distributed), two processes on Gloo.

Each test spawns two ranks on this CPU, drives a GraphedStep with CUDA's graph API
stood in for (as the planning tests do) through the same agreement the callback
uses, and checks that both ranks took the same action at every step. Every wait
is bounded: the ranks' own agreement timeout is a few seconds, and a rank that
does not finish within ``_JOIN_SECONDS`` is killed and fails the test.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from graph_api_stand_ins import stand_in_graph_api
from lightning_graphs import GraphedStep
from lightning_graphs import graphed_step as graphed_step_module
from lightning_graphs.distributed import (
    AgreementSchedule, RankAgreement, RankAgreementError, agree_on_plan, agreed_action,
    signature_digest,
)
from lightning_graphs.batches import signature_of
from lightning_graphs.graphed_step import Action, CaptureFailed, CaptureOutcome

_JOIN_SECONDS = 60
_AGREEMENT_SECONDS = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, port, scenario, args, results):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=20))
        with pytest.MonkeyPatch.context() as patch:
            stand_in_graph_api(patch)
            # the CUDA generator a real failed capture releases does not exist here
            patch.setattr(graphed_step_module, "_release_generator_after_failed_capture", lambda device: None)
            results.put((rank, scenario(rank, *args)))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error: " + traceback.format_exc()))


def run_ranks(scenario, *args):
    """``scenario(rank, *args)`` on two Gloo ranks; their results, by rank."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_rank_main, args=(r, port, scenario, args, results)) for r in range(2)]
    for process in processes:
        process.start()
    found = {}
    deadline = time.monotonic() + _JOIN_SECONDS
    try:
        while len(found) < 2 and time.monotonic() < deadline:
            try:
                rank, value = results.get(timeout=1)
            except Exception:
                continue
            found[rank] = value
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    assert len(found) == 2, f"ranks {sorted(set(range(2)) - set(found))} did not finish within {_JOIN_SECONDS} s"
    for rank, value in found.items():
        assert not (isinstance(value, str) and value.startswith("error: ")), f"rank {rank}: {value}"
    return [found[0], found[1]]


def _drive(rank, sizes, batches_in_epoch, every_step, fail_capture_on=None, warmup_steps=2):
    """Each rank's batches (``sizes[rank]``), planned, agreed and run as the callback does.

    Returns the actions taken (W, C, R, E; F for a capture given up), the number of
    agreements made and the warnings a failure gave."""
    ranks = RankAgreement(_AGREEMENT_SECONDS)
    schedule = AgreementSchedule(every_step)
    agree = lambda outcome, explanation: ranks.capture(outcome, explanation)[:2]  # noqa: E731
    step = GraphedStep(None, warmup_steps=warmup_steps, device="cuda", agree_capture=agree,
                       warn=lambda key, message: None)
    capturing = []

    def fn(x):
        if capturing and rank == fail_capture_on:
            raise RuntimeError("operation not permitted when stream is capturing")
        return x * 2

    actions, explanations = [], []
    for index, n in enumerate(sizes[rank]):
        inputs = (torch.ones(n, 3),)
        plan = agree_on_plan(ranks, schedule, step.plan(inputs), index % batches_in_epoch, batches_in_epoch)
        if plan.action is Action.WARMUP:
            step.warmup(lambda: fn(*inputs), plan)
        elif plan.action is Action.CAPTURE:
            capturing.append(True)
            try:
                step.capture(plan, lambda static: fn(*static))
            except CaptureFailed as failure:
                capturing.clear()
                explanations.append(failure.explanation)
                step.disable(failure.explanation)
                step.eager(lambda: fn(*inputs), "capture failed")
                actions.append("F")
                continue
            capturing.clear()
        elif plan.action is Action.REPLAY:
            step.replay(plan)
        else:
            step.eager(lambda: fn(*inputs), plan.reason)
        actions.append(plan.action.name[0])
    agreements = ranks.agreements
    ranks.close()
    return "".join(actions), agreements, explanations, schedule.every_step


def _capture_outcomes(rank, outcomes, unfinished):
    ranks = RankAgreement(_AGREEMENT_SECONDS)
    explanation = f"rank {rank} could not" if outcomes[rank] is CaptureOutcome.FAILED else None
    result = ranks.capture(outcomes[rank], explanation, unfinished[rank])
    ranks.close()
    return result


# each rank's capture outcome, and the outcome all must act on
_OUTCOMES = [
    ((CaptureOutcome.CAPTURED, CaptureOutcome.CAPTURED), CaptureOutcome.CAPTURED),
    ((CaptureOutcome.CAPTURED, CaptureOutcome.DEFERRED), CaptureOutcome.DEFERRED),
    ((CaptureOutcome.DEFERRED, CaptureOutcome.FAILED), CaptureOutcome.FAILED),
]
_EPOCH = [8, 8, 8, 8, 8, 3]  # a DistributedSampler gives every rank these sizes, the ragged last batch included
_SCENARIOS = {
    "padded": (_drive, ([_EPOCH * 3, _EPOCH * 3], len(_EPOCH), False)),
    "shape change": (_drive, ([[8] * 12, [8] * 7 + [6] + [8] * 4], 6, True)),
    "differs at a boundary": (_drive, ([[8] * 12, [8] * 6 + [7] + [8] * 5], 6, False)),
    "capture fails on rank 1": (_drive, ([[8] * 6, [8] * 6], 6, False, 1)),
    **{f"outcomes {i}": (_capture_outcomes, (outcomes, (False, True))) for i, (outcomes, _) in enumerate(_OUTCOMES)},
}


def _run_scenarios(rank, names):
    return {name: _SCENARIOS[name][0](rank, *_SCENARIOS[name][1]) for name in names}


@pytest.fixture(scope="module")
def ranks_ran():
    """Every scenario, run once in one pair of ranks (spawning costs seconds): name -> (rank 0's, rank 1's)."""
    names = list(_SCENARIOS)
    results = run_ranks(_run_scenarios, names)
    return {name: (results[0][name], results[1][name]) for name in names}


# -- the rules, in one process -------------------------------------------------------------------


def test_the_agreed_action_is_the_planned_one_only_where_every_rank_can_take_it():
    W, C, R, E = Action.WARMUP, Action.CAPTURE, Action.REPLAY, Action.EAGER
    codes = {E: 0, W: 1, C: 2, R: 3}

    def agreed(plans):
        low, high = min(codes[p] for p in plans), max(codes[p] for p in plans)
        return [agreed_action(p, low, high) for p in plans]

    assert agreed([R, R]) == [R, R] and agreed([C, C]) == [C, C]
    assert agreed([W, E]) == [W, E]  # eager either way: the same collectives
    assert agreed([R, E]) == [E, E]
    assert agreed([R, C]) == [E, W]  # the capture waits until every rank can capture
    assert agreed([C, W]) == [W, W]


def test_the_signature_digest_ignores_the_device_and_tells_shapes_apart():
    a = signature_of((torch.ones(8, 3), "train"))
    assert signature_digest(a) == signature_digest(signature_of((torch.zeros(8, 3), "train")))
    assert signature_digest(a) != signature_digest(signature_of((torch.ones(5, 3), "train")))
    assert signature_digest(a) != signature_digest(signature_of((torch.ones(8, 3), "test")))
    assert 0 <= signature_digest(a) < 2**31


def test_the_schedule_skips_only_replays_in_the_middle_of_an_epoch():
    schedule = AgreementSchedule(every_step=False)
    assert schedule.needed(3, 10)  # nothing agreed yet
    schedule.record(Action.REPLAY)
    assert not schedule.needed(3, 10)
    assert schedule.needed(0, 10) and schedule.needed(9, 10)  # first and (ragged) last batch
    schedule.boundary()
    assert schedule.needed(3, 10)
    schedule.record(Action.WARMUP)
    assert schedule.needed(3, 10)
    schedule.record(Action.REPLAY, same_signature=False)  # batches differ between ranks: agree from now on
    assert schedule.needed(3, 10) and schedule.every_step


# -- two ranks -------------------------------------------------------------------------------------


def test_padded_batches_with_a_ragged_last_one_take_one_path_and_skip_most_agreements(ranks_ran):
    (actions0, agreements0, _, _), (actions1, agreements1, _, _) = ranks_ran["padded"]
    assert actions0 == actions1
    assert actions0 == "WWCRRW" + "RRRRRC" + "RRRRRR"  # the ragged shape: warmed up, captured, replayed
    # agreed: the steps after a non-replay, each epoch's first and last; and the two captures' outcomes
    assert agreements0 == agreements1 == (5 + 2 + 2) + 2


def test_a_shape_change_on_one_rank_runs_that_step_eagerly_on_both(ranks_ran):
    (actions0, agreements0, _, _), (actions1, _, _, _) = ranks_ran["shape change"]
    # rank 1 would warm its new shape up while rank 0 replays: both run it eagerly
    assert actions0 == "WWCRRR" + "R" + "E" + "RRRR"
    assert actions1 == "WWCRRR" + "R" + "W" + "RRRR"
    assert agreements0 == 12 + 1  # every step, and the capture


def test_a_signature_difference_found_at_an_agreed_step_turns_agreement_on_for_every_step(ranks_ran):
    # the batches differ at the first batch of the second epoch, which is agreed
    (actions0, agreements0, _, every0), (actions1, _, _, every1) = ranks_ran["differs at a boundary"]
    assert actions0 == "WWCRRR" + "E" + "RRRRR" and actions1 == "WWCRRR" + "W" + "RRRRR"
    assert every0 and every1
    assert agreements0 == 5 + 6 + 1  # epoch 1: all but one mid-epoch replay; epoch 2: every step; the capture


def test_a_capture_failing_on_one_rank_is_given_up_on_every_rank_with_its_reason(ranks_ran):
    (actions0, _, explanations0, _), (actions1, _, explanations1, _) = ranks_ran["capture fails on rank 1"]
    assert actions0 == actions1 == "WWF" + "EEE"
    assert explanations0[0] == f"the capture failed on rank 1: {explanations1[0]}"  # rank zero reports rank 1's


def _agree_then_leave(rank):
    ranks = RankAgreement(timeout=2.0)
    if rank == 1:
        time.sleep(4)  # never comes to the agreement
        return "left"
    started = time.monotonic()
    try:
        ranks.plan(Action.REPLAY)
    except RankAgreementError as error:
        return f"{time.monotonic() - started:.1f} {error}"
    return "agreed"


def test_a_rank_that_never_comes_gives_a_clear_error_within_the_timeout():
    found, _ = run_ranks(_agree_then_leave)
    seconds, message = found.split(" ", 1)
    assert float(seconds) < 10
    assert "rank 0 waited up to 2 s for the other ranks" in message and "another rank failed or is stuck" in message


@pytest.mark.parametrize("index", range(len(_OUTCOMES)))
def test_capture_outcomes_agree_on_the_lowest(ranks_ran, index):
    agreed = _OUTCOMES[index][1]
    results = ranks_ran[f"outcomes {index}"]
    assert [r[0] for r in results] == [agreed, agreed]
    assert [r[2] for r in results] == [True, True]  # one rank's unfinished reducer is every rank's business
    if agreed is CaptureOutcome.FAILED:
        assert results[0][1] == "the capture failed on rank 1: rank 1 could not"


def test_a_step_taken_without_agreement_that_cannot_replay_raises_instead_of_hanging():
    from lightning_graphs.distributed import AgreementSchedule, RankAgreementError, agree_on_plan
    from lightning_graphs.graphed_step import Action, StepPlan

    schedule = AgreementSchedule(every_step=False)  # rank_agreement="boundaries"
    schedule.record(Action.REPLAY)  # every rank replayed the step before, mid-epoch
    replay = StepPlan(Action.REPLAY, None)
    assert agree_on_plan(None, schedule, replay, batch_idx=5, batches_in_epoch=10) is replay
    with pytest.raises(RankAgreementError, match="every_step"):
        agree_on_plan(None, schedule, StepPlan(Action.WARMUP, None), batch_idx=6, batches_in_epoch=10)


def _rank_zero_flags(rank):
    ranks = RankAgreement(timeout=10.0)
    return [ranks.rank_zero_flag(flag) for flag in ((rank == 0), (rank == 1), False)]


def test_every_rank_learns_rank_zeros_flag_and_only_its():
    assert run_ranks(_rank_zero_flags) == [[True, False, False], [True, False, False]]
