"""How GPU work outside graphs changes the speed of a whole-step graph.

    python benchmarks/between_replays.py [--workload rollout] [--variants ...] [--gaps]

Each variant runs in a fresh process. The ``between`` variants capture the
workload's hand-written whole-step graph (AdamW, capturable), time back-to-back
replays, then run 300 steps (``--between-steps``) that do something between
replays, and time back-to-back replays again. The ``once`` variants do their work a
single time, at a chosen point, and time the graph after it. ``--gaps`` also
profiles 20 replays before and after (where the variant has a before): the GPU
time of the graph's kernels, and the gaps between them.

On an H200, a rollout graph that replayed 555 steps/s replays about 7% slower
(515 to 520) once the process has launched some 30 to 40 kernels, memsets or
device-to-device copies outside a graph after its first capture: between replays
or all at once, before the graph's first replay, after the graph was reset and
captured again, after a one-kernel graph that was never replayed. It stays slow
for the rest of the process (a graph captured afterwards, replays on another
stream and idle seconds are as slow), at the same clocks. The kernels themselves
take as long as before; the gaps between them grow (``--gaps``). Three such launches,
copies from pinned host memory, eager warm-up steps before the first capture, and
work captured in graphs of its own leave it at 555. A training process loses the
faster speed at its first few dozen launches outside graphs after a capture (a
validation pass, an epoch-end metric, Lightning's copy of each logged value), so
515 is what the same graph replays at in any such process. Needs a CUDA GPU.
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

# what each variant does once, and when; the graph is timed afterwards
ONCE = {
    "3-kernels": "3 tiny kernels in a row, after the graph's replays were timed",
    "40-kernels": "40 tiny kernels in a row, after the graph's replays were timed",
    "40-memsets": "40 one-element memsets in a row, after the graph's replays were timed",
    "5-eager-steps": "5 eager steps of the workload's own model, after the graph's replays were timed",
    "40-kernels-before-first-replay": "40 tiny kernels between the capture and the first replay",
    "40-kernels-then-capture-again": "the graph captured, replayed and reset; 40 tiny kernels; the graph captured again",
    "tiny-graph-then-40-kernels": "a one-kernel graph captured and never replayed, 40 tiny kernels, then the graph captured",
    "lightning-fit": "a 100-step Lightning fit of the workload with CUDAGraphCallback, after the graph's replays were timed",
}


def measure(workload_name: str, variant: str, between_steps: int = 300,
            gaps: list[str] | None = None) -> tuple[list[float], list[float]]:
    """Steps/s of three windows of back-to-back replays, before and after the
    variant's loop. With ``gaps`` (a list), what :func:`kernel_gaps` finds before and
    after is appended to it."""
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

    before = [_window(graph) for _ in range(3)]
    profiled_before = kernel_gaps(graph) if gaps is not None else None
    with torch.no_grad():
        for index in range(between_steps):
            between(index)
            graph.replay()
    torch.cuda.synchronize()
    after = [_window(graph) for _ in range(3)]
    if gaps is not None:
        gaps += [f"before: {profiled_before}", f"after: {kernel_gaps(graph)}"]
    return before, after


def measure_once(workload_name: str, variant: str, gaps: list[str] | None = None) -> tuple[list[float], list[float]]:
    """Steps/s of back-to-back replays before (where the variant allows) and after
    its one-off work; ``gaps`` as in :func:`measure`."""
    import torch

    from benchmarks.workloads import WORKLOADS, hand_written_graph

    workload = WORKLOADS[workload_name]()
    static = tuple(t.cuda() for t in workload.batches(pin=True)[0])
    tiny = torch.zeros(1, device="cuda")

    def kernels(count: int) -> None:
        for _ in range(count):
            tiny.add_(1)

    before: list[float] = []
    if variant == "tiny-graph-then-40-kernels":
        small = torch.cuda.CUDAGraph()
        with torch.cuda.graph(small):
            tiny.mul_(1)
        kernels(40)
    graph, *held = hand_written_graph(workload, static)  # (held: the model and optimizer the graph uses)
    if variant == "40-kernels-before-first-replay":
        kernels(40)
    elif variant == "40-kernels-then-capture-again":
        graph.replay()
        torch.cuda.synchronize()
        graph.reset()
        del graph, held
        torch.cuda.empty_cache()
        kernels(40)
        graph, *held = hand_written_graph(workload, static)
    elif variant in ("3-kernels", "40-kernels", "40-memsets", "5-eager-steps", "lightning-fit"):
        before = [_window(graph) for _ in range(3)]
        if gaps is not None:
            gaps.append(f"before: {kernel_gaps(graph)}")
        if variant == "lightning-fit":
            _fit_with_callback(workload, steps=100)
        elif variant == "40-memsets":
            for _ in range(40):
                tiny.zero_()
        elif variant == "5-eager-steps":
            model = workload.make_model().cuda()
            optimizer = torch.optim.AdamW(model.parameters(), lr=workload.lr)
            for _ in range(5):
                optimizer.zero_grad()
                workload.loss(model, static).backward()
                optimizer.step()
        else:
            kernels(int(variant.split("-")[0]))
    after = [_window(graph) for _ in range(3)]
    if gaps is not None:
        gaps.append(f"after: {kernel_gaps(graph)}")
    return before, after


def kernel_gaps(graph, replays: int = 20) -> str:
    """Per replay of ``graph`` under the PyTorch profiler: the GPU time of its
    kernels, the time from the first kernel's start to the last one's end, and the
    median and 90th percentile of the idle gaps between consecutive kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiled:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in profiled.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    if not spans:
        return "no kernels recorded"
    busy = sum(end - start for start, end in spans) / replays
    wall = (spans[-1][1] - spans[0][0]) / replays
    idle = sorted(max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:]))
    return (f"{len(spans) / replays:.0f} kernels, {busy:.0f} us of kernel time, {wall:.0f} us first to last, "
            f"gaps median {idle[len(idle) // 2]:.2f} us, 90th percentile {idle[int(len(idle) * 0.9)]:.2f} us")


def _fit_with_callback(workload, steps: int) -> None:
    import lightning.pytorch as pl

    from benchmarks.workloads import WorkloadModule, loader
    from lightning_graphs import CUDAGraphCallback

    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[CUDAGraphCallback(verbose=False)])
    trainer.fit(WorkloadModule(workload), train_dataloaders=loader(workload, steps, pin=True))


def _window(graph, steps: int = 200) -> float:
    """Steps/s of ``steps`` back-to-back replays of ``graph``."""
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - started)


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
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS) + list(ONCE),
                        choices=list(VARIANTS) + list(ONCE))
    parser.add_argument("--between-steps", type=int, default=300, help="steps doing the variant's work (default 300)")
    parser.add_argument("--gaps", action="store_true",
                        help="also profile 20 replays before and after: kernel time and the gaps between kernels "
                             "(profiling may itself move the timed figures a little)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        variant = args.variants[0]
        gaps: list[str] | None = [] if args.gaps else None
        if variant in ONCE:
            before, after = measure_once(args.workload, variant, gaps)
        else:
            before, after = measure(args.workload, variant, args.between_steps, gaps)
        for line in gaps or ():
            print(f"GAPS {line}")
        print(" ".join(f"{v:.0f}" for v in before) or "-", "|", " ".join(f"{v:.0f}" for v in after), flush=True)
        return 0
    print(f"{args.workload}: steps/s of back-to-back replays (three windows of 200), before | after "
          f"{args.between_steps} steps of (between variants) or the work done once")
    for variant in args.variants:
        done = subprocess.run([sys.executable, __file__, "--worker", "--workload", args.workload, "--variants", variant,
                               "--between-steps", str(args.between_steps)] + (["--gaps"] if args.gaps else []),
                              capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        result = lines[-1] if done.returncode == 0 and lines else "failed"
        print(f"  {variant:30s} {result:28s} ({VARIANTS.get(variant) or ONCE[variant]})", flush=True)
        for line in lines:
            if line.startswith("GAPS "):
                print(f"      {line[len('GAPS '):]}")
        if result == "failed":
            print("\n".join(done.stderr.strip().splitlines()[-5:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
