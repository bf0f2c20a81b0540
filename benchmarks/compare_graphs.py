"""Kernel by kernel: the step CUDAGraphCallback captures against a hand-written
whole-step graph of the same workload.

    python benchmarks/compare_graphs.py --workload rollout

Each graph is replayed under the PyTorch profiler; the table lists, per kernel
name, how many times it runs in one replay and its GPU time, for both graphs,
largest differences first. It answers where the callback's replay spends GPU time
that the hand-written one does not (or the other way round). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# kernel name -> (launches per replay, microseconds per replay)
Profile = dict[str, tuple[float, float]]


def profile_replays(graph, replays: int = 20) -> Profile:
    """Per kernel name: launches and GPU microseconds per replay of ``graph``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels: Profile = {}
    for event in prof.key_averages():
        microseconds = getattr(event, "device_time_total", None)
        if microseconds is None:
            microseconds = getattr(event, "cuda_time_total", 0.0)
        if microseconds <= 0:
            continue
        kernels[event.key] = (event.count / replays, microseconds / replays)
    return kernels


def replay_wall_us(graph, replays: int = 50) -> float:
    """Wall time of one replay (kernel time plus the gaps between kernels), back to back on the GPU."""
    import torch

    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def hand_written_profile(workload, replays: int) -> tuple[Profile, float]:
    """A whole-step graph as users write it by hand (AdamW with capturable=True)."""
    import torch

    torch.manual_seed(0)
    model = workload.make_model().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=workload.lr, capturable=True)
    static = tuple(t.cuda() for t in workload.batches(pin=False)[0])

    def step():
        optimizer.zero_grad(set_to_none=True)
        workload.loss(model, static).backward()
        optimizer.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()
    return profile_replays(graph, replays), replay_wall_us(graph)


def callback_profile(workload, replays: int, at_step: int = 10) -> tuple[Profile, float]:
    """The graph CUDAGraphCallback captured for the workload's LightningModule."""
    import lightning.pytorch as pl

    from benchmarks.bench import captured_graph
    from benchmarks.workloads import WorkloadModule, loader
    from lightning_graphs import CUDAGraphCallback

    found: dict[str, Profile] = {}

    class ProfileCapturedGraph(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == at_step:
                graph = captured_graph(graphs)
                found["kernels"], found["wall"] = profile_replays(graph, replays), replay_wall_us(graph)

    pl.seed_everything(0, verbose=False)
    graphs = CUDAGraphCallback(verbose=False)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=at_step + 1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[ProfileCapturedGraph(), graphs])
    trainer.fit(WorkloadModule(workload), train_dataloaders=loader(workload, at_step + 1))
    return found["kernels"], found["wall"]


def compare(ours: Profile, theirs: Profile) -> list[tuple[str, float, float, float, float]]:
    """Rows ``(kernel, launches ours, launches theirs, us ours, us theirs)``, largest time difference first."""
    names = set(ours) | set(theirs)
    rows = [(name, *_pair(ours.get(name), theirs.get(name))) for name in names]
    return sorted(rows, key=lambda row: -abs(row[3] - row[4]))


def _pair(a: tuple[float, float] | None, b: tuple[float, float] | None) -> tuple[float, float, float, float]:
    a, b = a or (0.0, 0.0), b or (0.0, 0.0)
    return a[0], b[0], a[1], b[1]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.workloads import WORKLOADS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="rollout", choices=sorted(WORKLOADS))
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.workload]()
    theirs, theirs_wall = hand_written_profile(workload, args.replays)
    ours, ours_wall = callback_profile(workload, args.replays)
    print(f"wall time per replay, back to back: CUDAGraphCallback {ours_wall:.0f} us, "
          f"hand-written {theirs_wall:.0f} us")
    print(f"GPU time per replay: CUDAGraphCallback {sum(v[1] for v in ours.values()):.0f} us, "
          f"hand-written {sum(v[1] for v in theirs.values()):.0f} us; kernels per replay "
          f"{sum(v[0] for v in ours.values()):.0f} against {sum(v[0] for v in theirs.values()):.0f}")
    print(f"{'launches':>17} {'us per replay':>17}  kernel (callback | hand-written)")
    for name, launches_ours, launches_theirs, us_ours, us_theirs in compare(ours, theirs)[: args.rows]:
        print(f"{launches_ours:>8.0f} {launches_theirs:>8.0f} {us_ours:>8.1f} {us_theirs:>8.1f}  {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
