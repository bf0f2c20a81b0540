import sys, time, torch
sys.path.insert(0, ".")
import lightning.pytorch as pl
from torch.profiler import profile, ProfilerActivity
from benchmarks.workloads import WORKLOADS, WorkloadModule, loader
from lightning_graphs import CUDAGraphCallback

name = sys.argv[1] if len(sys.argv) > 1 else "rollout"
w = WORKLOADS[name]()
class Prof(pl.Callback):
    def on_train_batch_start(self, trainer, m, batch, i):
        if i == 60:
            torch.cuda.synchronize(); self.p = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]); self.p.__enter__(); self.t = time.perf_counter()
        if i == 100:
            torch.cuda.synchronize(); dt = time.perf_counter() - self.t; self.p.__exit__(None, None, None)
            ev = self.p.key_averages()
            gpu = sum(e.self_device_time_total for e in ev if e.device_type.name == "CUDA")
            print(f"{name}: 40 steps wall {dt*1e3:.1f} ms, GPU kernel time {gpu/1e3:.1f} ms")
            rows = sorted(ev, key=lambda e: -e.cpu_time_total)
            for e in rows:
                if e.key.startswith("cuda") or "Memcpy" in e.key or "Sync" in e.key:
                    print(f"  {e.key[:60]:60s} n={e.count:5d} cpu_total={e.cpu_time_total/1e3:8.2f} ms")
            kern = sorted([e for e in ev if e.device_type.name == "CUDA"], key=lambda e: -e.self_device_time_total)[:12]
            for e in kern:
                print(f"  GPU {e.key[:70]:70s} n={e.count:5d} {e.self_device_time_total/1e3:8.2f} ms")
            evs = self.p.events()
            kern = sorted([(e.time_range.start, e.time_range.end, e.name) for e in evs if e.device_type.name == "CUDA"])
            cpu = [(e.time_range.start, e.time_range.end, e.name) for e in evs if e.device_type.name == "CPU"]
            gaps = []
            for (s0, e0, n0), (s1, e1, n1) in zip(kern, kern[1:]):
                if s1 - e0 > 3:
                    gaps.append((s1 - e0, e0, s1, n0[:40], n1[:40]))
            print(f"  gaps>3us: {len(gaps)}, total {sum(g[0] for g in gaps)/1e3:.2f} ms over the 40 steps")
            for g in sorted(gaps, reverse=True)[:12]:
                busy = sorted({c[2][:45] for c in cpu if c[0] <= g[2] <= c[1]})
                print(f"  gap {g[0]:7.1f} us after {g[3]!r} before {g[4]!r}; host in: {busy[:8]}")
pl.seed_everything(0)
mod = WorkloadModule(w)
t = pl.Trainer(accelerator="gpu", devices=1, max_steps=110, logger=False, enable_progress_bar=False,
               enable_checkpointing=False, enable_model_summary=False, callbacks=[Prof(), CUDAGraphCallback(verbose=False)])
t.fit(mod, train_dataloaders=loader(w, 110))
