"""One Lightning fit on several GPUs, eager or with CUDAGraphCallback, for tests/test_ddp_gpu.py.

    python tests/ddp_run.py --out DIR [--graphed] [--strategy ddp] [--devices 2] ...

Lightning's DDP launcher starts the other ranks by running this script again. Each
rank writes ``DIR/rank<r>.pt``: its per-step losses and callback metrics, rank
zero's logged records, the final parameters, the callback's stats and the
warnings it gave. Seeded, TF32 off and deterministic kernels, so that an eager
and a graphed run can be compared number by number.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import models  # noqa: E402
from lightning_graphs import CUDAGraphCallback, GraphWarning  # noqa: E402
from parity import MemoryLogger, Recorder, regression_data  # noqa: E402


class DistributedRegressor(models.Regressor):
    """Logs with ``sync_dist=True`` a loss and a value that differs between ranks (their
    batches' mean), so that a reduction that went wrong shows."""

    def __init__(self, fail_capture_on_rank: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_capture_on_rank = fail_capture_on_rank

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = F.mse_loss(pred, y)
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if self.fail_capture_on_rank == self.global_rank and capturing:
            loss = loss * (loss > 0).float().sum().item()  # a host read: this rank's capture fails
        self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=True)
        self.log("batch_mean", x.mean(), on_step=True, on_epoch=True, sync_dist=True, reduce_fx="mean")
        self.log("pred_max", pred.max(), on_step=True, on_epoch=False, sync_dist=True, reduce_fx="max")
        return loss


class SigtermOnRankZero(pl.Callback):
    """Rank zero notes a SIGTERM (as Lightning's signal handler does) as an epoch
    starts: the per-batch check at that epoch's first batch must stop every rank.
    (Noted after a batch, Lightning's own end-of-batch check would stop rank zero
    alone, eagerly too.)"""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.global_rank == 0 and trainer.current_epoch == self.epoch:
            trainer._signal_connector.received_sigterm = True


def per_rank_loader(rank: int, changed_at: int | None, batch_size: int = 8) -> DataLoader:
    """Each rank's own batches (no DistributedSampler); on rank 1 the batch at
    ``changed_at`` has 6 samples instead of 8."""
    data = regression_data(n=64, seed=rank)
    sizes = [batch_size] * (len(data) // batch_size)
    if changed_at is not None and rank == 1:
        sizes[changed_at] = 6
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    batches = [list(range(start, start + size)) for start, size in zip(starts, sizes)]
    return DataLoader(data, batch_sampler=batches)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--graphed", action="store_true")
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--accelerator", default="gpu", help="cpu: checks this script's plumbing (nothing is graphed)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--samples", type=int, default=134, help="dataset size: 67 samples a rank, a ragged last batch of 3")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--fail-capture-on-rank", type=int)
    parser.add_argument("--shape-change-at", type=int, help="rank 1's batch at this index has another shape")
    parser.add_argument("--rank-agreement", default="auto")
    parser.add_argument("--batchnorm", action="store_true", help="BatchNorm: DDP broadcasts its buffers in the step")
    parser.add_argument("--sigterm-at-epoch", type=int, help="rank zero receives SIGTERM as this epoch starts")
    parser.add_argument("--stack-dump-after", type=float, help="seconds: print every thread's stack and exit")
    args = parser.parse_args()
    if args.stack_dump_after:
        faulthandler.dump_traceback_later(args.stack_dump_after, exit=True)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True)
    pl.seed_everything(0, verbose=False)
    module = DistributedRegressor(args.fail_capture_on_rank, optimizer=args.optimizer, scheduler="lambda",
                                  dropout=0.1, epochs=args.epochs, batchnorm=args.batchnorm)
    recorder, logger = Recorder(), MemoryLogger()
    # short bounded waits: a test that hangs fails with a message, well before it is killed
    callback = CUDAGraphCallback(rank_agreement=args.rank_agreement, agreement_timeout=60) if args.graphed else None
    strategy = DDPStrategy(timeout=timedelta(seconds=90)) if args.strategy == "ddp" else args.strategy
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=strategy, max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=args.shape_change_at is None,
        callbacks=[recorder] + ([callback] if callback else [])
        + ([SigtermOnRankZero(args.sigterm_at_epoch)] if args.sigterm_at_epoch is not None else []),
    )
    if args.shape_change_at is None:
        loader = DataLoader(regression_data(n=args.samples), batch_size=8, shuffle=True)
    else:
        loader = per_rank_loader(int(os.environ.get("LOCAL_RANK", 0)), args.shape_change_at)
    stopped = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GraphWarning)
        try:
            trainer.fit(module, train_dataloaders=loader)
        except SIGTERMException:
            stopped = True  # every rank stops at the next batch's SIGTERM check
    stats = callback.stats if callback is not None else None
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "losses": recorder.losses,
            "global_steps": recorder.global_steps,
            "callback_metrics": recorder.callback_metrics,
            "logged": logger.records,
            "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "state": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
            "parameters": [name for name, _ in module.named_parameters()],
            "stats": None if stats is None else {
                "captures": stats.captures, "replays": stats.replays, "eager_steps": stats.eager_steps,
                "eager_reasons": dict(stats.eager_reasons), "disabled_reason": stats.disabled_reason,
                "summary": stats.summary(),
            },
            "agreement_stats": callback.agreement_stats if callback is not None else None,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, GraphWarning)],
            "stopped_by_sigterm": stopped,
        },
        args.out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
