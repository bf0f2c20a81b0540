"""Speed harness: steps/s of each training mode on each workload, side by side.

    python benchmarks/bench.py                      # all workloads, all modes
    python benchmarks/bench.py --workloads mlp rollout --modes raw-graph lightning-eager lightning-graphs

Modes:
  raw-eager          a plain PyTorch loop
  raw-graph          a hand-written whole-step torch.cuda.graph loop (the speed reference)
  raw-graph-moved    the same loop fed as Lightning feeds a step: each batch is moved to the
                     GPU first, then copied into the graph's inputs on the GPU
  lightning-eager    Lightning, as users run it
  lightning-compile  Lightning with the model under torch.compile(mode="reduce-overhead")
  lightning-graphs   Lightning with CUDAGraphCallback()
  raw-graph-compiled         the hand-written whole-step graph around torch.compile(model) (default mode)
  lightning-graphs-compiled  Lightning with CUDAGraphCallback() and torch.compile(model) (default mode)
  lightning-eager-ddp        Lightning, strategy="ddp" on --ddp-devices GPUs (default 2)
  lightning-graphs-ddp       the same with CUDAGraphCallback(): the gradient all-reduce inside the graph

The DDP modes train on every rank with the workload's batch size (so the work per
step and rank equals the one-GPU modes'); steps/s counts rank zero's steps.
``--rank-agreement`` sets the callback's ``rank_agreement`` (``"auto"`` agrees at
every step; the workloads' batches have one shape, so ``boundaries`` is safe here).

The two compiled modes run Inductor's fused kernels inside one whole-step graph;
their compile time (the first step) is reported apart from steps/s.

Each (workload, mode) runs in a fresh process: ``--warmup`` steps, then ``--repeats``
timed windows of ``--steps`` steps each (device synchronised at window edges only).
The table reports the median window; ratios compare medians measured in this one run.
``--rounds N`` measures each (workload, mode) in N processes, taking the modes in
turn round after round, and reports the median of their medians: where the host sets
the pace, its speed drifts from process to process, and taking turns spreads the
drift over every mode.
Results go to ``--out`` as JSON and a PNG bar chart (with matplotlib installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MODES = ["raw-eager", "raw-graph", "raw-graph-moved", "lightning-eager", "lightning-compile", "lightning-graphs",
         "raw-graph-compiled", "lightning-graphs-compiled", "lightning-eager-ddp", "lightning-graphs-ddp"]
DDP_MODES = ("lightning-eager-ddp", "lightning-graphs-ddp")
COMPILING_MODES = ("lightning-compile", "raw-graph-compiled", "lightning-graphs-compiled")
WORKLOAD_NAMES = ["mlp", "rollout", "pinn", "big"]


# -- one (workload, mode) measurement, in its own process ------------------------------------------


def _windows(boundaries: list[float], steps: int) -> list[float]:
    return [steps / (b - a) for a, b in zip(boundaries, boundaries[1:])]


def measure_raw(workload, graph: bool, steps: int, warmup: int, repeats: int, device: str,
                compiled: bool = False, moved: bool = False) -> dict:
    """Steps/s of a plain PyTorch loop, eager or one hand-written whole-step graph.

    The graph's inputs are filled straight from pinned host memory, or with
    ``moved``, from a copy of the batch already on the GPU (as a loop that receives
    device batches, such as Lightning's, has to): on an H200 that made the same
    graph replay about 7% slower on ``rollout`` for the rest of the process.
    """
    import torch

    torch.manual_seed(0)
    model = workload.make_model().to(device)
    forward_model = torch.compile(model) if compiled else model
    cuda = device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=workload.lr, capturable=graph)
    batches = workload.batches(pin=cuda)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss = workload.loss(forward_model, batch)
        loss.backward()
        opt.step()
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    total = warmup + steps * repeats
    capture_seconds = first_step_seconds = None
    if graph:
        static = tuple(t.to(device) for t in batches[0])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for index in range(3):
                started = time.perf_counter()
                step(static)
                if index == 0:
                    sync()
                    first_step_seconds = time.perf_counter() - started
        torch.cuda.current_stream().wait_stream(side)
        started = time.perf_counter()
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(g):
            step(static)
        capture_seconds = time.perf_counter() - started

        def run(i):
            with torch.no_grad():  # a static input may require grad (pinn)
                batch = batches[i % len(batches)]
                if moved:
                    batch = tuple(t.to(device, non_blocking=True) for t in batch)
                for s, t in zip(static, batch):
                    s.copy_(t, non_blocking=True)
            g.replay()
    else:

        def run(i):
            step(tuple(t.to(device, non_blocking=True) for t in batches[i % len(batches)]))

    boundaries = []
    for i in range(total):
        if i >= warmup and (i - warmup) % steps == 0:
            sync()
            boundaries.append(time.perf_counter())
        run(i)
    sync()
    boundaries.append(time.perf_counter())
    return {"steps_per_s": _windows(boundaries, steps), "capture_seconds": capture_seconds,
            "first_step_seconds": first_step_seconds if compiled else None}


def measure_lightning(workload, mode: str, steps: int, warmup: int, repeats: int, device: str,
                      prog_bar: bool = False, ddp_devices: int = 2, rank_agreement: str = "auto") -> dict:
    import lightning.pytorch as pl
    import torch

    from benchmarks.workloads import WorkloadModule, loader
    from lightning_graphs import CUDAGraphCallback

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    total = warmup + steps * repeats

    class WindowTimer(pl.Callback):
        def __init__(self):
            self.boundaries = []
            self.first_step_seconds = None
            self.seen = 0  # batches so far (under DDP an epoch is a rank's share of the loader)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.seen == 0:
                self.first_started = time.perf_counter()
            if self.seen >= warmup and (self.seen - warmup) % steps == 0:
                sync()
                self.boundaries.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.seen == 0:
                sync()
                self.first_step_seconds = time.perf_counter() - self.first_started
            self.seen += 1

        def on_train_end(self, trainer, pl_module):
            sync()
            self.boundaries.append(time.perf_counter())

    pl.seed_everything(0, verbose=False)
    compile_mode = {"lightning-compile": "reduce-overhead", "lightning-graphs-compiled": "default"}.get(mode)
    module = WorkloadModule(workload, compile_mode=compile_mode, prog_bar=prog_bar)
    timer = WindowTimer()
    callbacks = [timer]
    ddp = mode in DDP_MODES
    graphs = CUDAGraphCallback(verbose=False, rank_agreement=rank_agreement) if mode.startswith("lightning-graphs") \
        else None
    if graphs:
        callbacks.append(graphs)
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=ddp_devices if ddp else 1, strategy="ddp" if ddp else "auto",
        max_steps=total, max_epochs=-1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=callbacks,
    )
    # under DDP every rank takes its share of the batches: the loader holds enough for each
    trainer.fit(module, train_dataloaders=loader(workload, total * (ddp_devices if ddp else 1), pin=cuda))
    result = {"steps_per_s": _windows(timer.boundaries, steps), "capture_seconds": None,
              "first_step_seconds": timer.first_step_seconds if compile_mode else None, "rank": trainer.global_rank}
    if graphs is not None and graphs.stats is not None:
        stats = graphs.stats
        result.update(capture_seconds=stats.capture_seconds, replays=stats.replays, eager_steps=stats.eager_steps,
                      graphs_disabled=stats.disabled_reason)
        if graphs.agreement_stats is not None:
            result.update(rank_agreement=graphs.agreement_stats)
    return result


def captured_graph(callback):
    """The CUDA graph a running CUDAGraphCallback replays (raises if it holds none)."""
    held = callback._engine.graphs if callback._engine is not None else ()
    graph = held[-1].graph if held else None  # the most recently replayed
    if graph is None:
        stats = callback.stats
        raise RuntimeError(f"nothing was captured: {stats.summary() if stats else 'graphs never started'}")
    return graph


def find_syncs(workload_name: str, steps: int = 200) -> None:
    """Train with CUDAGraphCallback and report every host synchronisation after capture, with its stack."""
    import traceback
    import warnings

    import lightning.pytorch as pl
    import torch

    from benchmarks.workloads import WORKLOADS, WorkloadModule, loader
    from lightning_graphs import CUDAGraphCallback

    workload = WORKLOADS[workload_name]()
    seen: dict[str, int] = {}

    timing: dict[str, float] = {}

    class SyncWatch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 10:
                torch.cuda.set_sync_debug_mode("warn")
            if batch_idx == 20:
                torch.cuda.set_sync_debug_mode("default")
                graph = captured_graph(callback)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(50):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                timing["replay"] = start.elapsed_time(end) / 50
                timing["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == steps - 1:
                torch.cuda.synchronize()
                timing["step"] = (time.perf_counter() - timing["t0"]) * 1e3 / (steps - 21)

        def on_train_end(self, trainer, pl_module):
            torch.cuda.set_sync_debug_mode("default")

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message) or "set_sync_debug_mode" in "".join(traceback.format_stack(limit=4)):
            return
        stack = "".join(traceback.format_stack(limit=14)[:-2])
        seen[stack] = seen.get(stack, 0) + 1

    pl.seed_everything(0, verbose=False)
    callback = CUDAGraphCallback(verbose=False)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[SyncWatch(), callback])
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        trainer.fit(WorkloadModule(workload), train_dataloaders=loader(workload, steps))
    replay_ms, step_ms = timing["replay"], timing["step"]
    print(f"{len(seen)} distinct synchronising call sites after capture:")
    print(f"GPU time of one replay: {replay_ms:.3f} ms; wall time per training step: {step_ms:.3f} ms")
    for stack, count in sorted(seen.items(), key=lambda item: -item[1]):
        print(f"--- {count} times:\n{stack}")


def worker(args: argparse.Namespace) -> None:
    import torch

    from benchmarks.workloads import WORKLOADS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    workload = WORKLOADS[args.workload](tiny=args.tiny)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.mode.startswith("raw"):
        result = measure_raw(workload, args.mode.startswith("raw-graph"), args.steps, args.warmup, args.repeats, device,
                             compiled=args.mode.endswith("-compiled"), moved=args.mode == "raw-graph-moved")
    else:
        result = measure_lightning(workload, args.mode, args.steps, args.warmup, args.repeats, device, args.prog_bar,
                                   args.ddp_devices, args.rank_agreement)
        if result.pop("rank") != 0:
            return  # the other DDP ranks; rank zero reports
    result.update(
        workload=args.workload,
        mode=args.mode,
        median_steps_per_s=statistics.median(result["steps_per_s"]),
        peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    )
    print("RESULT " + json.dumps(result), flush=True)


# -- the driver ---------------------------------------------------------------------------------------


def run_one(workload: str, mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--workload", workload, "--mode", mode,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.tiny:
        command.append("--tiny")
    if args.prog_bar:
        command.append("--prog-bar")
    command += ["--ddp-devices", str(args.ddp_devices), "--rank-agreement", args.rank_agreement]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        return {"workload": workload, "mode": mode, "error": "\n".join(tail)}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_seconds"] = time.perf_counter() - started
    return result


def merge_rounds(rounds: list[dict]) -> dict:
    """One result from the processes that measured one (workload, mode): the median of
    their medians, every window, each process's median (``process_medians``), the
    highest peak memory; the first error if any failed."""
    failed = [r for r in rounds if "median_steps_per_s" not in r]
    if failed or len(rounds) == 1:
        return failed[0] if failed else rounds[0]
    medians = [r["median_steps_per_s"] for r in rounds]
    merged = dict(rounds[0])
    merged.update(
        median_steps_per_s=statistics.median(medians),
        process_medians=medians,
        steps_per_s=[window for r in rounds for window in r["steps_per_s"]],
        wall_seconds=sum(r.get("wall_seconds", 0.0) for r in rounds),
    )
    peaks = [r["peak_memory_mib"] for r in rounds if r.get("peak_memory_mib") is not None]
    merged["peak_memory_mib"] = max(peaks) if peaks else None
    return merged


def ratios(results: list[dict]) -> dict[str, dict[str, float]]:
    """Per workload: the callback's median steps/s (``lightning-graphs``, and
    ``lightning-graphs-compiled`` and ``lightning-graphs-ddp`` as rows of their own,
    ``"mlp (compiled)"``, ``"mlp (ddp)"``) over each other mode's."""
    table: dict[str, dict[str, float]] = {}
    by_key = {(r["workload"], r["mode"]): r for r in results if "median_steps_per_s" in r}
    for (workload, mode), result in by_key.items():
        if not mode.startswith("lightning-graphs"):
            continue
        row = workload if mode == "lightning-graphs" else f"{workload} ({mode.removeprefix('lightning-graphs-')})"
        for other in MODES:
            base = by_key.get((workload, other))
            if base and other != mode:
                table.setdefault(row, {})[f"vs {other}"] = result["median_steps_per_s"] / base["median_steps_per_s"]
    return table


def print_table(results: list[dict], modes: list[str]) -> None:
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    by_key = {(r["workload"], r["mode"]): r for r in results}
    width = max(len(m) for m in modes) + 2
    print("\nsteps/s (median of windows)".ljust(24) + "".join(m.rjust(width) for m in modes))
    for workload in workloads:
        row = workload.ljust(24)
        for mode in modes:
            r = by_key.get((workload, mode))
            cell = "-" if r is None else f"{r['median_steps_per_s']:.0f}" if "median_steps_per_s" in r else "error"
            row += cell.rjust(width)
        print(row)
    print("\npeak memory MiB".ljust(24) + "".join(m.rjust(width) for m in modes))
    for workload in workloads:
        row = workload.ljust(24)
        for mode in modes:
            r = by_key.get((workload, mode), {})
            value = r.get("peak_memory_mib")
            row += (f"{value:.0f}" if value is not None else "-").rjust(width)
        print(row)
    for workload, row in ratios(results).items():
        cells = ", ".join(f"{name} {value:.2f}x" for name, value in row.items())
        base, _, variant = workload.partition(" (")
        name = f"lightning-graphs-{variant[:-1]}" if variant else "lightning-graphs"
        print(f"{name} on {base}: {cells}")
    for r in results:
        if r.get("capture_seconds") is not None:
            print(f"capture time {r['workload']}/{r['mode']}: {r['capture_seconds'] * 1e3:.0f} ms")
        if r.get("first_step_seconds") is not None:
            print(f"compile time (first step) {r['workload']}/{r['mode']}: {r['first_step_seconds']:.1f} s")
        if "error" in r:
            print(f"ERROR {r['workload']}/{r['mode']}:\n{r['error']}")


def environment() -> dict:
    import lightning
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def plot(results: list[dict], modes: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install 'lightning-graphs[bench]')")
        return False
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    by_key = {(r["workload"], r["mode"]): r for r in results}
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.8), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        values = [by_key.get((workload, m), {}).get("median_steps_per_s") for m in modes]
        bars = ax.bar(range(len(modes)), [v or 0.0 for v in values],
                      color=["#d9534f" if m == "lightning-graphs" else "#8e3b46" if m.startswith("lightning-graphs-")
                             else "#9aa5b1" for m in modes])
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(modes, rotation=35, ha="right", fontsize=8)
        ax.set_title(workload)
        ax.set_ylabel("steps/s (higher is better)")
        for bar, value in zip(bars, values):
            label = f"{value:.0f}" if value is not None else "n/a"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, value or 0.0), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=WORKLOAD_NAMES, choices=WORKLOAD_NAMES)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--steps", type=int, default=300, help="steps per timed window")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per (workload, mode), the modes taken in turn round after round; "
                             "the median of their medians is reported (for modes the host sets the pace of)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--tiny", action="store_true", help="tiny workloads (for testing the harness)")
    parser.add_argument("--prog-bar", action="store_true",
                        help="log with prog_bar=True, which makes Lightning read the value on the host every step")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--ddp-devices", type=int, default=2, help="GPUs of the DDP modes")
    parser.add_argument("--rank-agreement", default="auto", choices=["auto", "every_step", "boundaries"],
                        help="CUDAGraphCallback(rank_agreement=...) in lightning-graphs-ddp")
    parser.add_argument("--find-syncs", action="store_true",
                        help="instead of timing, list the host synchronisations left in the graphed step (first workload)")
    parser.add_argument("--replot", type=Path, nargs="+", metavar="JSON",
                        help="redraw the table and chart of earlier results.json files into --out, without running; "
                             "several files (runs of different workloads) are merged into --out/results.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.find_syncs:
        find_syncs(args.workloads[0])
        return 0
    if args.replot:
        records = [json.loads(path.read_text()) for path in args.replot]
        results = [r for record in records for r in record["results"]]
        print_table(results, args.modes)
        args.out.mkdir(parents=True, exist_ok=True)
        if len(records) > 1:
            merged = {
                "runs": [{k: record.get(k) for k in ("command", "environment", "settings")} for record in records],
                "results": results,
                "ratios": ratios(results),
            }
            (args.out / "results.json").write_text(json.dumps(merged, indent=2))
        return 0 if plot(results, args.modes, args.out / "results.png") else 1
    if not _has_cuda():
        dropped = [m for m in args.modes if m.startswith("raw-graph") or m in COMPILING_MODES]
        args.modes = [m for m in args.modes if m not in dropped]
        print(f"No CUDA device: skipping {', '.join(dropped) or 'nothing'}; lightning-graphs trains eagerly here, "
              "so its numbers say nothing about graphs.")
    if any(m in DDP_MODES for m in args.modes) and _gpus() < args.ddp_devices:
        print(f"Fewer than {args.ddp_devices} CUDA devices: skipping {', '.join(DDP_MODES)}.")
        args.modes = [m for m in args.modes if m not in DDP_MODES]
    from benchmarks.workloads import WORKLOADS

    runs = [(w, m) for w in args.workloads for m in args.modes
            if m not in COMPILING_MODES or WORKLOADS[w](tiny=True).compilable]
    rounds = max(args.rounds, 1)
    measured: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(rounds):
        for workload, mode in runs:
            done = sum(len(r) for r in measured.values())
            of_rounds = f" (round {round_index + 1}/{rounds})" if rounds > 1 else ""
            print(f"[{done + 1}/{len(runs) * rounds}] {workload} / {mode}{of_rounds} ...", flush=True)
            result = run_one(workload, mode, args)
            measured.setdefault((workload, mode), []).append(result)
            summary = f"{result['median_steps_per_s']:.0f} steps/s" if "median_steps_per_s" in result else "ERROR"
            print(f"    {summary}", flush=True)
    results = [merge_rounds(measured[key]) for key in runs]
    print_table(results, args.modes)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python benchmarks/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(),
        "settings": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "rounds": rounds,
                     "tiny": args.tiny,
                     "prog_bar": args.prog_bar, "ddp_devices": args.ddp_devices, "rank_agreement": args.rank_agreement},
        "results": results,
        "ratios": ratios(results),
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    if plot(results, args.modes, args.out / "results.png"):
        print(f"wrote {args.out / 'results.json'} and {args.out / 'results.png'}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
