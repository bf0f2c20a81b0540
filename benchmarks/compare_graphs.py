"""Kernel by kernel: the step CUDAGraphCallback captures against a hand-written
whole-step graph of the same workload.

    python benchmarks/compare_graphs.py --workload rollout [--dump DIR]

Each graph is replayed under the PyTorch profiler; the table lists, per kernel
name, how many times it runs in one replay and its GPU time, for both graphs,
largest differences first. It answers where the callback's replay spends GPU time
that the hand-written one does not (or the other way round). ``--dump DIR`` also
writes both graphs' topology (CUDA's DOT dump) and counts their nodes by kind
(kernels, copies, memsets, events, host calls) and their edges: idle time between
kernels with the same kernels on both sides comes from there. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
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


# node kinds as CUDA's graph DOT dump names them
_NODE_KINDS = ("KERNEL", "MEMCPY", "MEMSET", "HOST", "EVENT_RECORD", "WAIT_EVENT", "EMPTY", "MEM_ALLOC", "MEM_FREE",
               "GRAPH", "CONDITIONAL", "BATCH_MEM_OP", "EXT_SEMAS")


def graph_shape(dot: str) -> Counter:
    """Nodes by kind, and edges, of a graph dumped by ``CUDAGraph.debug_dump`` (a
    node's attributes may span several lines)."""
    shape: Counter = Counter()
    node: list[str] | None = None
    for line in dot.splitlines():
        if node is None and re.match(r'\s*"[^"]+"\s*->', line):
            shape["edges"] += 1
        elif node is None and re.match(r'\s*"[^"]+"\s*\[', line):
            node = [line]
        elif node is not None:
            node.append(line)
        if node is not None and node[-1].rstrip().endswith("];"):
            words = set(re.findall(r"[A-Z_]+", " ".join(node)))
            shape[next((k for k in _NODE_KINDS if k in words), "other")] += 1
            node = None
    return shape


def _debug_graphs():
    """Have every CUDAGraph made from now on keep its topology for ``debug_dump``."""
    import torch

    class DebugGraph(torch.cuda.CUDAGraph):
        # keep_graph=True: otherwise the end of capture frees the topology once the
        # graph is instantiated, and debug_dump has nothing left to write
        def __init__(self, keep_graph: bool = False):
            super().__init__(True)
            self.enable_debug_mode()

    torch.cuda.CUDAGraph = DebugGraph


def hand_written_profile(workload, replays: int, keep: list | None = None) -> tuple[Profile, float]:
    """A whole-step graph as users write it by hand (AdamW with capturable=True)."""
    from benchmarks.workloads import hand_written_graph

    graph, *held = hand_written_graph(workload, tuple(t.cuda() for t in workload.batches(pin=False)[0]))
    if keep is not None:
        keep.extend([graph, *held])
    return profile_replays(graph, replays), replay_wall_us(graph)


def callback_profile(workload, replays: int, at_step: int = 10, keep: list | None = None) -> tuple[Profile, float]:
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
                if keep is not None:
                    keep.append(graph)

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
    parser.add_argument("--dump", type=Path, help="write both graphs' DOT topology here and count their nodes")
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.workload]()
    if args.dump:
        _debug_graphs()
    kept_theirs, kept_ours = [], []
    theirs, theirs_wall = hand_written_profile(workload, args.replays, kept_theirs)
    ours, ours_wall = callback_profile(workload, args.replays, keep=kept_ours)
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        shapes = {}
        for name, graph in (("callback", kept_ours[0]), ("hand_written", kept_theirs[0])):
            path = args.dump / f"{args.workload}_{name}.dot"
            graph.debug_dump(str(path))
            if not path.exists():
                print(f"this torch build wrote no DOT dump for the {name} graph ({path}); no topology to compare")
                return 1
            shapes[name] = graph_shape(path.read_text())
        kinds = sorted(set(shapes["callback"]) | set(shapes["hand_written"]))
        print("graph topology (nodes by kind, edges): " + ", ".join(
            f"{k} {shapes['callback'][k]} | {shapes['hand_written'][k]}" for k in kinds) + "  (callback | hand-written)")
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
