"""How GPU work between replays changes the speed of a whole-step graph.

    python benchmarks/between_replays.py [--workload rollout] [--variants ...]

Each variant runs in a fresh process: it captures the workload's hand-written
whole-step graph (AdamW, capturable), times back-to-back replays, then runs 300
steps (``--between-steps``) that do something between replays, and times
back-to-back replays again.
On an H200, a rollout graph that replayed 555 steps/s before a loop that enqueues
any GPU work between replays outside a graph (a copy on the GPU into the graph's
inputs, a copy elsewhere, one tiny kernel, on the replaying stream or another)
replayed about 7% slower afterwards, at the same clocks. The slowdown is the whole
process's: 30 such steps bring it on (3 do not); a graph captured afterwards, a
replay on another stream and two idle seconds are as slow. Copies from pinned host
memory leave it as fast, and so does the same device copy captured in a graph of its
own. A Lightning step moves its batch to the GPU before the graph's inputs can be
filled, so this is the speed a graphed Lightning step reaches unless every device
operation between replays is itself a graph. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# what each variant does before every replay of its steps in between
VARIANTS = {
    "nothing": "replays only",
    "host-copy": "copy the next batch from pinned host memory into the graph's inputs",
    "moved-then-copied": "move the next batch to the GPU, then copy it into the graph's inputs (as Lightning feeds)",
    "device-copy": "copy a batch already on the GPU into the graph's inputs",
    "copy-elsewhere": "copy a batch already on the GPU into other tensors",
    "tiny-kernel": "add one to a one-element tensor",
    "tiny-kernel-other-stream": "add one to a one-element tensor on another stream",
    "copy-graph": "replay a graph of its own that copies a batch already on the GPU into the graph's inputs",
}


def measure(workload_name: str, variant: str, between_steps: int = 300) -> tuple[list[float], list[float]]:
    """Steps/s of three windows of back-to-back replays, before and after the variant's loop."""
    import torch

    from benchmarks.workloads import WORKLOADS, hand_written_graph

    workload = WORKLOADS[workload_name]()
    batches = workload.batches(pin=True)
    static = tuple(t.cuda() for t in batches[0])
    on_device = tuple(t.cuda() for t in batches[1])
    elsewhere = tuple(torch.empty_like(t) for t in static)
    tiny = torch.zeros(1, device="cuda")
    graph, *held = hand_written_graph(workload, static)  # (held: the model and optimizer the graph uses)
    other_stream = torch.cuda.Stream()
    copy_graph = _copy_graph(static, on_device) if variant == "copy-graph" else None

    def between(index: int) -> None:
        batch = batches[index % len(batches)]
        if variant == "host-copy":
            for s, t in zip(static, batch):
                s.copy_(t, non_blocking=True)
        elif variant == "moved-then-copied":
            for s, t in zip(static, batch):
                s.copy_(t.to("cuda", non_blocking=True))
        elif variant == "device-copy":
            for s, t in zip(static, on_device):
                s.copy_(t)
        elif variant == "copy-elsewhere":
            for s, t in zip(elsewhere, on_device):
                s.copy_(t)
        elif variant == "tiny-kernel":
            tiny.add_(1)
        elif variant == "tiny-kernel-other-stream":
            with torch.cuda.stream(other_stream):
                tiny.add_(1)
        elif variant == "copy-graph":
            copy_graph.replay()

    def window(steps: int = 200) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
        return steps / (time.perf_counter() - started)

    before = [window() for _ in range(3)]
    with torch.no_grad():
        for index in range(between_steps):
            between(index)
            graph.replay()
    torch.cuda.synchronize()
    return before, [window() for _ in range(3)]


def _copy_graph(targets, sources):
    """A graph of its own holding one copy per tensor, ``sources`` into ``targets``."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the copies run once before capture, as any captured work should
        for target, source in zip(targets, sources):
            target.copy_(source)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for target, source in zip(targets, sources):
            target.copy_(source)
    return graph


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="rollout")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--between-steps", type=int, default=300, help="steps doing the variant's work (default 300)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        before, after = measure(args.workload, args.variants[0], args.between_steps)
        print(" ".join(f"{v:.0f}" for v in before), "|", " ".join(f"{v:.0f}" for v in after), flush=True)
        return 0
    print(f"{args.workload}: steps/s of back-to-back replays (three windows of 200), "
          f"before | after {args.between_steps} steps of")
    for variant in args.variants:
        done = subprocess.run([sys.executable, __file__, "--worker", "--workload", args.workload, "--variants", variant,
                               "--between-steps", str(args.between_steps)],
                              capture_output=True, text=True)
        result = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else "failed"
        print(f"  {variant:18s} {result:28s} ({VARIANTS[variant]})", flush=True)
        if result == "failed":
            print("\n".join(done.stderr.strip().splitlines()[-5:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
