"""Train the same LightningModule eagerly and with CUDAGraphCallback, and compare
everything a user can observe: per-step losses, logged values, callback metrics,
learning rates of every param group, global_step, progress counters and the final
parameters and buffers."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from lightning_graphs import CUDAGraphCallback, GraphWarning


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call, as a real logger would receive it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, {k: float(v) for k, v in metrics.items()}))


class Recorder(pl.Callback):
    """Records per step what the user sees: the lr each group used, the loss, global_step, callback metrics."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.losses: list[float] = []
        self.loss_tensors: list[torch.Tensor] = []  # kept as returned, to catch aliasing
        self.global_steps: list[int] = []
        self.callback_metrics: list[dict[str, float]] = []
        self.output_keys: list = []  # what the step returned: the keys of Lightning's outputs dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.global_steps.append(trainer.global_step)
        self.callback_metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.output_keys.append(sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:  # a manual-optimization step may return nothing
            return
        self.loss_tensors.append(loss)
        self.losses.append(float(loss))


@dataclass
class Run:
    recorder: Recorder
    logger: MemoryLogger
    final_metrics: dict[str, float]
    state: dict[str, torch.Tensor]
    progress: dict
    global_step: int
    callback: CUDAGraphCallback | None
    warnings: list[str] = field(default_factory=list)
    module: pl.LightningModule | None = None
    trainer: pl.Trainer | None = None


def regression_data(n: int = 67, features: int = 8, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    w = torch.randn(features, 1, generator=generator)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


def loader(dataset=None, batch_size: int = 8, **kwargs: Any) -> DataLoader:
    return DataLoader(dataset if dataset is not None else regression_data(), batch_size=batch_size, **kwargs)


def fit(
    make_module: Callable[[], pl.LightningModule],
    *,
    graphed: bool,
    train_loader: Callable[[], Any] = loader,
    val_loader: Callable[[], Any] | None = None,
    datamodule: Callable[[], pl.LightningDataModule] | None = None,
    callback_kwargs: dict | None = None,
    extra_callbacks: Callable[[], list] = list,
    seed: int = 0,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> Run:
    pl.seed_everything(seed, verbose=False)
    module = make_module()
    recorder, logger = Recorder(), MemoryLogger()
    callback = CUDAGraphCallback(**(callback_kwargs or {})) if graphed else None
    callbacks = [recorder] + extra_callbacks() + ([callback] if callback else [])
    options = dict(
        accelerator="gpu",
        devices=1,
        max_epochs=2,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GraphWarning)
        if datamodule is not None:
            trainer.fit(module, datamodule=datamodule(), ckpt_path=ckpt_path)
        else:
            trainer.fit(
                module,
                train_dataloaders=train_loader(),
                val_dataloaders=val_loader() if val_loader else None,
                ckpt_path=ckpt_path,
            )
    return Run(
        recorder=recorder,
        logger=logger,
        final_metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
        state={k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        progress=progress_of(trainer),
        global_step=trainer.global_step,
        callback=callback,
        warnings=[str(w.message) for w in caught if issubclass(w.category, GraphWarning)],
        module=module,
        trainer=trainer,
    )


def fit_both(make_module: Callable[[], pl.LightningModule], **kwargs: Any) -> tuple[Run, Run]:
    """The same fit eagerly, then with the callback."""
    return fit(make_module, graphed=False, **kwargs), fit(make_module, graphed=True, **kwargs)


def graphs_used(run: Run, eager_steps: int | None = None) -> None:
    """The graphed run captured and replayed, and kept its graphs to the end."""
    stats = run.callback.stats
    assert stats.captures >= 1 and stats.replays > 0, stats.summary()
    assert stats.disabled_reason is None, stats.summary()
    if eager_steps is not None:
        assert stats.eager_steps == eager_steps, stats.summary()


def progress_of(trainer: pl.Trainer) -> dict:
    """The counters ``global_step`` and the loops derive from: the optimizer steps of
    automatic optimization (and its zero_grad calls), those of manual optimization
    (counted per ``LightningOptimizer.step()``) and the batches."""
    epoch_loop = trainer.fit_loop.epoch_loop
    return {
        "automatic": epoch_loop.automatic_optimization.optim_progress.state_dict(),
        "manual": epoch_loop.manual_optimization.optim_step_progress.state_dict(),
        "batches": epoch_loop.batch_progress.state_dict(),
        "batches_that_stepped": epoch_loop._batches_that_stepped,
    }


def assert_same(eager: Run, graphed: Run, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    """Everything observable agrees: numbers within (rtol, atol), counts and learning rates exactly."""

    def close(a, b, what):
        torch.testing.assert_close(
            torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), rtol=rtol, atol=atol,
            msg=lambda m: f"{what}: {m}",
        )

    assert graphed.recorder.global_steps == eager.recorder.global_steps
    assert graphed.recorder.output_keys == eager.recorder.output_keys
    assert graphed.global_step == eager.global_step
    assert graphed.progress == eager.progress
    # learning rates are the scheduler's own floats in both runs: exactly equal
    assert graphed.recorder.lrs == eager.recorder.lrs
    close(graphed.recorder.losses, eager.recorder.losses, "per-step loss")
    close([float(t) for t in graphed.recorder.loss_tensors], eager.recorder.losses, "outputs['loss'] kept as tensors")
    assert [r[0] for r in graphed.logger.records] == [r[0] for r in eager.logger.records], "logger steps"
    for (step, got), (_, want) in zip(graphed.logger.records, eager.logger.records):
        assert sorted(got) == sorted(want), f"logged keys at step {step}"
        close([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], f"logged values at step {step}")
    for index, (got, want) in enumerate(zip(graphed.recorder.callback_metrics, eager.recorder.callback_metrics)):
        assert sorted(got) == sorted(want), f"callback_metrics keys at batch {index}"
        close([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], f"callback_metrics at batch {index}")
    assert sorted(graphed.final_metrics) == sorted(eager.final_metrics)
    close([graphed.final_metrics[k] for k in sorted(eager.final_metrics)],
          [eager.final_metrics[k] for k in sorted(eager.final_metrics)], "final callback_metrics")
    assert sorted(graphed.state) == sorted(eager.state)
    for name in eager.state:
        torch.testing.assert_close(
            graphed.state[name].double(), eager.state[name].double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}"
        )


def assert_same_metric_snapshots(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]]) -> None:
    """Snapshots of Lightning's metrics (one dict per point of a run) equal, key by key, to the bit."""
    assert [sorted(s) for s in got] == [sorted(s) for s in want]
    for a, b in zip(got, want):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def assert_eager_with_one_warning(eager: Run, graphed: Run, *needles: str) -> None:
    """The graphed run gave graphs up: it matches the eager one, replayed nothing and
    warned once, in words holding each of ``needles``."""
    assert_same(eager, graphed)
    (warning,) = graphed.warnings
    assert all(needle in warning for needle in needles), warning
    stats = graphed.callback.stats  # (None where the callback refused the fit before its first step)
    assert stats is None or stats.replays == 0, stats.summary()
