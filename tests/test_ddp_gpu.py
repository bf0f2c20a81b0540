"""DDP on two GPUs: eager DDP against DDP with CUDAGraphCallback, rank by rank.

Run them all with ``python -m pytest -m ddp`` on a host with two CUDA GPUs (skipped
with fewer). Each fit runs ``tests/ddp_run.py`` in a process of its own, whose
Lightning launcher starts the second rank; every rank saves what it observed
(per-step losses, callback metrics, values logged with ``sync_dist=True``, final
parameters, the callback's stats and warnings), and the tests compare the saved
files. A fit that hangs prints both ranks' stacks and is killed, with its whole
process group, after ``_FIT_SECONDS`` (``DDP_FIT_SECONDS`` in the environment,
default 150).

Tolerance: rtol = atol = 1e-5, ten times the single-GPU tests': besides the
optimizer's rounding (see test_callback_gpu.py), NCCL may reduce a captured
all-reduce with another algorithm than the eager one, which can round differently.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_graphs.distributed import DISAGREEMENT

pytestmark = pytest.mark.ddp

_SCRIPT = Path(__file__).resolve().parent / "ddp_run.py"
_FIT_SECONDS = int(os.environ.get("DDP_FIT_SECONDS", "150"))
_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def ddp_fit(out: Path, *options: str, devices: int = 2) -> list[dict]:
    """Train with ``tests/ddp_run.py`` and these options on ``devices`` GPUs; what each rank saved."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    command = [sys.executable, str(_SCRIPT), "--out", str(out), "--devices", str(devices),
               "--stack-dump-after", str(max(_FIT_SECONDS - 20, 10)), *options]
    # a process group of its own: on a timeout every rank goes, not only the one started here
    fit = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)
    try:
        stdout, stderr = fit.communicate(timeout=_FIT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(fit.pid, signal.SIGKILL)
        stdout, stderr = fit.communicate()
        pytest.fail(f"{' '.join(options)} did not finish in {_FIT_SECONDS} s:\n{stdout[-4000:]}\n{stderr[-8000:]}")
    assert fit.returncode == 0, f"{' '.join(options)} failed:\n{stdout[-4000:]}\n{stderr[-8000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(devices)]


def both(tmp_path: Path, *options: str) -> tuple[list[dict], list[dict]]:
    return ddp_fit(tmp_path / "eager", *options), ddp_fit(tmp_path / "graphed", "--graphed", *options)


def close(got, want, what: str) -> None:
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               msg=lambda m: f"{what}: {m}", **_TOLERANCE)


def assert_same_on_every_rank(eager: list[dict], graphed: list[dict]) -> None:
    """Per-step losses, callback metrics (values logged with sync_dist=True) and final
    parameters of each rank, and what rank zero's logger received."""
    for rank, (e, g) in enumerate(zip(eager, graphed)):
        assert g["global_steps"] == e["global_steps"], f"rank {rank}: global_step"
        close(g["losses"], e["losses"], f"rank {rank}: per-step loss")
        for index, (got, want) in enumerate(zip(g["callback_metrics"], e["callback_metrics"])):
            assert sorted(got) == sorted(want), f"rank {rank}: callback_metrics keys at batch {index}"
            close([got[k] for k in sorted(got)], [want[k] for k in sorted(want)],
                  f"rank {rank}: callback_metrics at batch {index}")
        assert sorted(g["final_metrics"]) == sorted(e["final_metrics"])
        close([g["final_metrics"][k] for k in sorted(e["final_metrics"])],
              [e["final_metrics"][k] for k in sorted(e["final_metrics"])], f"rank {rank}: final callback_metrics")
        for name, value in e["state"].items():
            torch.testing.assert_close(g["state"][name].double(), value.double(), **_TOLERANCE,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")
    records_g, records_e = graphed[0]["logged"], eager[0]["logged"]
    assert [step for step, _ in records_g] == [step for step, _ in records_e], "logger steps"
    for (step, got), (_, want) in zip(records_g, records_e):
        assert sorted(got) == sorted(want), f"logged keys at step {step}"
        close([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], f"logged values at step {step}")
    # the ranks' parameters agree (DDP keeps the replicas equal); buffers such as BatchNorm's
    # running statistics do not: DDP broadcasts rank 0's at the start of each forward, and
    # each rank then updates its own copy, so after the last step they differ, eagerly too
    for name in graphed[0]["parameters"]:
        value = graphed[0]["state"][name]
        torch.testing.assert_close(graphed[1]["state"][name], value, msg=lambda m: f"ranks differ in {name}: {m}")


def graphs_used(run: list[dict]) -> None:
    for rank, saved in enumerate(run):
        stats = saved["stats"]
        assert stats["captures"] >= 1 and stats["replays"] > 0, f"rank {rank}: {stats['summary']}"
        assert stats["disabled_reason"] is None, f"rank {rank}: {stats['summary']}"


@pytest.mark.parametrize("options", [("--optimizer", "adamw"), ("--optimizer", "sgd", "--batchnorm")],
                         ids=["adamw", "sgd-batchnorm"])
def test_graphed_ddp_equals_eager_ddp_with_a_ragged_last_batch(tmp_path, options):
    # with BatchNorm, DDP broadcasts rank 0's buffers inside the captured step
    eager, graphed = both(tmp_path, *options)
    assert_same_on_every_rank(eager, graphed)
    graphs_used(graphed)
    for saved in graphed:
        # the DistributedSampler gives both ranks the ragged batch of 3: graphed too, no eager step
        assert saved["stats"]["captures"] == 2 and saved["stats"]["eager_steps"] == 0, saved["stats"]["summary"]
        agreement = saved["agreement_stats"]
        assert agreement["every_step"] and agreement["skipped"] == 0, agreement  # the default agrees every step
    assert graphed[0]["agreement_stats"] == graphed[1]["agreement_stats"]
    assert not graphed[0]["warnings"], graphed[0]["warnings"]


def test_agreeing_only_at_boundaries_trains_the_same(tmp_path):
    eager, graphed = both(tmp_path, "--rank-agreement", "boundaries")
    assert_same_on_every_rank(eager, graphed)
    graphs_used(graphed)
    for saved in graphed:
        agreement = saved["agreement_stats"]
        assert not agreement["every_step"] and agreement["skipped"] > 0, agreement
    assert graphed[0]["agreement_stats"] == graphed[1]["agreement_stats"]


def test_gradient_accumulation_under_ddp(tmp_path):
    # accumulating micro-steps run under DDP's no_sync: graphs without the all-reduce
    eager, graphed = both(tmp_path, "--accumulate", "2")
    assert_same_on_every_rank(eager, graphed)
    graphs_used(graphed)


def test_a_capture_failing_on_one_rank_falls_back_on_every_rank(tmp_path):
    eager, graphed = both(tmp_path, "--fail-capture-on-rank", "1", "--epochs", "3")
    assert_same_on_every_rank(eager, graphed)
    for saved in graphed:
        stats = saved["stats"]
        assert stats["replays"] == 0 and stats["disabled_reason"] is not None, stats["summary"]
    warned = [w for w in graphed[0]["warnings"] if "capture failed on rank 1" in w]
    assert len(warned) == 1, graphed[0]["warnings"]
    assert not graphed[1]["warnings"]  # warnings come from rank zero only


def test_a_shape_change_on_one_rank_runs_that_step_eagerly_on_every_rank(tmp_path):
    # no DistributedSampler: each rank its own batches; rank 1's sixth batch of every epoch has 6 samples
    eager, graphed = both(tmp_path, "--shape-change-at", "5", "--epochs", "3")
    assert_same_on_every_rank(eager, graphed)
    graphs_used(graphed)
    assert graphed[0]["agreement_stats"]["every_step"]  # batches may differ between ranks: agreed at every step
    assert graphed[0]["stats"]["eager_reasons"].get(DISAGREEMENT, 0) >= 1, graphed[0]["stats"]["summary"]
    assert graphed[0]["stats"]["replays"] == graphed[1]["stats"]["replays"]


def test_sigterm_on_rank_zero_stops_every_rank_after_the_same_step_as_eager(tmp_path):
    # Lightning's per-batch SIGTERM check is asked over the callback's Gloo group, not read from
    # an NCCL broadcast: every rank must still stop before the same batch as eagerly
    # 9 batches an epoch on each rank; graphs replay from step 12 on; rank zero is signalled as epoch 2 starts
    eager, graphed = both(tmp_path, "--sigterm-at-epoch", "2", "--epochs", "4")
    graphs_used(graphed)
    for rank, (e, g) in enumerate(zip(eager, graphed)):
        assert e["stopped_by_sigterm"] and g["stopped_by_sigterm"], f"rank {rank}"
        assert g["global_steps"] == e["global_steps"] and e["global_steps"][-1] == 18, f"rank {rank}"
        close(g["losses"], e["losses"], f"rank {rank}: per-step loss")


@pytest.mark.parametrize("strategy, named", [("fsdp", "FSDPStrategy"),
                                             ("ddp_find_unused_parameters_true", "find_unused_parameters")])
def test_strategies_that_cannot_be_graphed_train_eagerly_with_one_warning(tmp_path, strategy, named):
    eager, graphed = both(tmp_path, "--strategy", strategy, "--epochs", "2")
    for rank, (e, g) in enumerate(zip(eager, graphed)):
        assert g["stats"] is None, f"rank {rank}: graphed anyway"
        close(g["losses"], e["losses"], f"rank {rank}: per-step loss")
    warned = [w for w in graphed[0]["warnings"] if named in w]
    assert len(warned) == 1 and len(graphed[0]["warnings"]) == 1, graphed[0]["warnings"]
    assert not graphed[1]["warnings"]
