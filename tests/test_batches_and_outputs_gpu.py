"""Batches as users' DataLoaders produce them, and what the step logs and returns, graphed
on a CUDA GPU.

Batches: namedtuples and dataclasses, dicts with int64 labels and file names, Python
floats per batch or per sample, batch_size=1, variable-length sequences padded per batch
(with and without a packed RNN). Logging and outputs: every kind of ``self.log`` call,
a ``batch_size`` read from a tensor, tensors and Python numbers returned beside the loss
and collected by a callback.

Every test trains the same seeded module eagerly and with the callback (TF32 off,
deterministic kernels) and compares them with ``parity.assert_same``: fp32 values within
rtol = atol = 1e-6, learning rates, global_step and progress counters exactly. Tensors a
callback collects compare within the same tolerance; Python values (file names, learning
rates, epochs, steps) must be equal, and of eager's types.
"""

from __future__ import annotations

import itertools
from collections import namedtuple
from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence
from torch.utils.data import DataLoader

import models
from parity import assert_eager_with_one_warning, assert_same, fit_both, graphs_used, loader, regression_data

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("deterministic")]


def graphed_or_one_warning(run, *needles: str) -> None:
    """Either every step was replayed or captured without a word, or the user was told once,
    naming one of ``needles``, why some (or all) batches run eagerly."""
    if run.callback.stats.replays > 0 and not run.warnings:
        return
    assert len(run.warnings) == 1, (run.callback.stats.summary(), run.warnings)
    assert any(needle in run.warnings[0] for needle in needles), run.warnings


def one_warning_if_never_replayed(run, needle: str = "") -> None:
    """A run that replayed nothing told the user so once (naming ``needle``)."""
    if run.callback.stats.replays == 0:
        assert len(run.warnings) == 1 and needle in run.warnings[0], run.warnings


def logged(run, key: str) -> list[float]:
    """Every value the logger received for ``key``, step by step."""
    return [metrics[key] for _, metrics in run.logger.records if key in metrics]


def callback_of(run, kind: type[pl.Callback]) -> pl.Callback:
    """The run's callback of type ``kind``, to read what it kept."""
    return next(callback for callback in run.trainer.callbacks if isinstance(callback, kind))


# -- namedtuple and dataclass batches ----------------------------------------------------------------

Pair = namedtuple("Pair", ["x", "y"])


@dataclass
class Sample:
    x: torch.Tensor
    y: torch.Tensor


def structured_loader(batch_type):
    def make():
        def collate(items):
            return batch_type(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))

        return DataLoader(regression_data(), batch_size=8, collate_fn=collate)

    return make


class StructuredStep(models.Regressor):
    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch.x), batch.y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss


class BatchTypes(pl.Callback):
    """The type of every batch the hooks after the step receive."""

    def __init__(self):
        self.names = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.names.add(type(batch).__name__)


@pytest.mark.parametrize("batch_type", [Pair, Sample], ids=["namedtuple", "dataclass"])
def test_namedtuple_and_dataclass_batches(batch_type):
    eager, graphed = fit_both(StructuredStep, train_loader=structured_loader(batch_type), max_epochs=3,
                              extra_callbacks=lambda: [BatchTypes()])
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    assert not graphed.warnings, graphed.warnings
    assert callback_of(graphed, BatchTypes).names == {batch_type.__name__}  # hooks still get the user's type


# -- dict batches with Python values -----------------------------------------------------------------


class DictWithFiles(models.Regressor):
    """Learns a bias per label and returns the batch's file names beside the loss, never reading them."""

    def __init__(self):
        super().__init__()
        self.label_bias = nn.Embedding(3, 1)

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch["x"]) + self.label_bias(batch["label"]), batch["y"])
        self.log("train_loss", loss)
        return {"loss": loss, "files": batch["files"]}


def dict_loader(extra, n: int = 64, batch_size: int = 8):
    """A loader factory of dict batches ``{"x", "y", **extra(draw, indices)}``: ``draw`` counts
    the batches drawn in the fit, ``indices`` are the dataset positions of the batch's samples."""

    def make():
        draws = itertools.count()

        def collate(items):
            indices = [index for index, _ in items]
            x = torch.stack([sample[0] for _, sample in items])
            y = torch.stack([sample[1] for _, sample in items])
            return {"x": x, "y": y, **extra(next(draws), indices)}

        return DataLoader(list(enumerate(regression_data(n=n))), batch_size=batch_size, collate_fn=collate)

    return make


def labels_and_files(names_recur: bool):
    """int64 labels and a file name per sample: the same every epoch (``names_recur``, an
    unshuffled dataset) or new at every draw (augmented copies)."""

    def extra(draw, indices):
        files = [f"img_{j:04d}.png" if names_recur else f"img_{j:04d}_aug{draw}.png" for j in indices]
        return {"label": torch.tensor([j % 3 for j in indices], dtype=torch.int64), "files": files}

    return extra


class FilesSeen(pl.Callback):
    """Per step: the batch's file names and those the step returned."""

    def __init__(self):
        self.files = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.files.append((list(batch["files"]), outputs.get("files")))


@pytest.mark.parametrize("names_recur", [True, False], ids=["names_per_epoch", "names_never_recur"])
def test_dict_batch_with_file_names_that_change_every_batch(names_recur):
    # names_never_recur: 3 epochs of 32 batches, past the 64 steps after which signatures
    # that never recur are given up on
    size = dict(n=64, batch_size=8) if names_recur else dict(n=128, batch_size=4)
    eager, graphed = fit_both(DictWithFiles, train_loader=dict_loader(labels_and_files(names_recur), **size),
                              max_epochs=3, extra_callbacks=lambda: [FilesSeen()])
    assert_same(eager, graphed)
    seen = callback_of(graphed, FilesSeen).files
    assert all(returned == batch_files for batch_files, returned in seen)  # each step returns its own names
    assert [files for files, _ in seen] == [files for files, _ in callback_of(eager, FilesSeen).files]
    # the step never reads the names: either the graph ignores them or the user is told once why not
    graphed_or_one_warning(graphed, "files")


class WeightedLoss(models.Regressor):
    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch["x"]), batch["y"]) * batch["weight"]
        self.log("train_loss", loss)
        return loss


def weight_per_batch(weights):
    """A Python float loss weight per batch, ``weights(draw)``."""
    return lambda draw, indices: {"weight": float(weights(draw))}


two_alternating_values = lambda draw: 1.0 if draw % 2 else 0.25  # noqa: E731


@pytest.mark.parametrize("weights", [
    pytest.param(two_alternating_values, id="two_alternating_values"),
    pytest.param(lambda draw: 0.5 + 0.01 * draw, id="new_value_every_batch"),
    pytest.param(lambda draw: [1.0, 0.5, 2.0][draw % 3], id="three_cycling_values"),
])
def test_a_per_batch_python_float_is_never_replayed_stale(weights):
    # 3 epochs of 32 batches: past the 64 steps after which signatures that never recur are given up on
    data = dict_loader(weight_per_batch(weights), n=128, batch_size=4)
    eager, graphed = fit_both(WeightedLoss, train_loader=data, max_epochs=3)
    assert_same(eager, graphed)  # the per-step losses include the weight: a stale one shows there
    losses = graphed.recorder.losses
    assert len(set(losses)) == len(losses)
    one_warning_if_never_replayed(graphed, "weight")


def test_two_alternating_weights_are_graphed():
    eager, graphed = fit_both(WeightedLoss, train_loader=dict_loader(weight_per_batch(two_alternating_values)),
                              max_epochs=3)
    assert_same(eager, graphed)
    graphs_used(graphed)


class PerSampleWeights(models.Regressor):
    """Per-sample Python floats from the collate, made into a tensor inside the step."""

    def training_step(self, batch, batch_idx):
        w = torch.tensor(batch["w"], device=self.device).unsqueeze(1)
        loss = (w * (self(batch["x"]) - batch["y"]) ** 2).mean()
        self.log("train_loss", loss)
        return loss


def test_per_sample_python_floats_made_into_a_tensor_in_the_step():
    weights = lambda draw, indices: {"w": [1.0 + 0.1 * ((draw + k) % 5) for k in range(len(indices))]}  # noqa: E731
    eager, graphed = fit_both(PerSampleWeights, train_loader=dict_loader(weights), max_epochs=3)
    assert_same(eager, graphed)
    one_warning_if_never_replayed(graphed)


# -- batch_size=1 --------------------------------------------------------------------------------------


def test_batch_size_one():
    eager, graphed = fit_both(models.Regressor, train_loader=lambda: loader(regression_data(n=12), batch_size=1))
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    assert not graphed.warnings, graphed.warnings


# -- variable-length sequences padded per batch ------------------------------------------------------

VOCAB = 20


def sequence_data(n: int = 48, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token sequences of 3 to 8 tokens (0 is padding), each with its mean token as the target."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=generator))
        tokens = torch.randint(1, VOCAB, (length,), generator=generator)
        samples.append((tokens, tokens.float().mean().reshape(1) / VOCAB))
    return samples


def pad_collate(items):
    tokens = [t for t, _ in items]
    return {
        "tokens": pad_sequence(tokens, batch_first=True, padding_value=0),
        "lengths": torch.tensor([len(t) for t in tokens]),
        "y": torch.stack([y for _, y in items]),
    }


def sequence_loader():
    return DataLoader(sequence_data(), batch_size=4, collate_fn=pad_collate)


class MaskedMeanEncoder(pl.LightningModule):
    """Embeds the tokens and averages them over each sequence's own length."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16, padding_idx=0)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        tokens, lengths = batch["tokens"], batch["lengths"]
        mask = (tokens != 0).unsqueeze(-1).float()
        pooled = (self.embed(tokens) * mask).sum(1) / lengths.unsqueeze(-1).float()
        loss = F.mse_loss(self.head(pooled), batch["y"])
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_variable_length_sequences_padded_per_batch():
    eager, graphed = fit_both(MaskedMeanEncoder, train_loader=sequence_loader, max_epochs=3)
    assert_same(eager, graphed)
    assert len({batch["tokens"].shape for batch in sequence_loader()}) > 1  # the shapes really vary
    graphed_or_one_warning(graphed, "shape", "max_graphs")


class PackedGRU(MaskedMeanEncoder):
    """The usual packed-RNN recipe: pack_padded_sequence wants the lengths on the CPU."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(16, 16, batch_first=True)

    def training_step(self, batch, batch_idx):
        tokens, lengths = batch["tokens"], batch["lengths"]
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, hidden = self.rnn(packed)
        loss = F.mse_loss(self.head(hidden[-1]), batch["y"])
        self.log("train_loss", loss)
        return loss


def test_packed_gru_with_lengths_moved_to_the_cpu_in_the_step():
    # lengths.cpu() copies a device tensor to the host, which a capture cannot; the same
    # padded shape with other lengths must never replay a stale packing
    eager, graphed = fit_both(PackedGRU, train_loader=sequence_loader)
    assert_same(eager, graphed)
    one_warning_if_never_replayed(graphed)


# -- self.log ------------------------------------------------------------------------------------------


class LogsEverything(models.Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        err = pred - y
        loss = F.mse_loss(pred, y)
        self.log("loss_attached", loss)  # Lightning detaches it
        self.log("loss_detached", loss.detach(), on_step=True, on_epoch=True)
        self.log_dict({"mae": err.abs().mean(), "bias": err.mean()}, on_step=True, on_epoch=True)
        self.log("max_abs_err", err.abs().max(), reduce_fx="max", on_step=True, on_epoch=True)
        self.log("min_pred", pred.min(), reduce_fx="min", on_step=False, on_epoch=True)
        self.log("epoch_only_sq", err.pow(2).sum(), on_step=False, on_epoch=True, reduce_fx="sum")
        # an explicit batch_size: the ragged last batch (3 of 67) weighs less in the epoch mean
        self.log("weighted_mae", err.abs().mean(), on_step=False, on_epoch=True, batch_size=x.shape[0])
        self.log("pred_mean_prog", pred.mean(), prog_bar=True)
        return loss


def test_every_kind_of_log_call_matches_eager():
    eager, graphed = fit_both(LogsEverything, max_epochs=3)
    assert_same(eager, graphed)
    graphs_used(graphed, eager_steps=0)
    assert not graphed.warnings, graphed.warnings
    for key in ("loss_attached", "loss_detached_step", "mae_step", "max_abs_err_step"):
        values = logged(graphed, key)
        assert len(values) == len(set(values)) == 27, key  # each step's own value
    for key in ("max_abs_err_epoch", "min_pred", "epoch_only_sq", "weighted_mae", "mae_epoch"):
        assert len(logged(graphed, key)) == 3, key


class BatchSizeFromATensor(models.Regressor):
    """Logs with ``batch_size`` the count of valid targets, read on the host with int(tensor)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        valid = y.squeeze(-1) > -0.5
        err = (self(x) - y).squeeze(-1)
        loss = (err.pow(2) * valid).sum() / valid.sum().clamp(min=1)
        self.log("masked_loss", loss, on_step=False, on_epoch=True, batch_size=int(valid.sum()))
        return loss


def test_batch_size_read_from_a_tensor_trains_eagerly_with_one_warning():
    eager, graphed = fit_both(BatchSizeFromATensor)
    assert_eager_with_one_warning(eager, graphed)


# -- outputs collected by a callback -----------------------------------------------------------------


class ReturnsExtras(models.Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = F.mse_loss(pred, y)
        self.log("train_loss", loss)
        return {"loss": loss, "preds": pred.detach(), "abs_err": (pred - y).abs().mean().detach()}


class CollectsOutputs(pl.Callback):
    """Keeps every step's outputs as given (not cloned), and what a user computes from them per epoch."""

    def __init__(self):
        self.outputs = []
        self.epoch_pred_means = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(dict(outputs))

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_pred_means.append(float(torch.cat([out["preds"] for out in self.outputs[-9:]]).mean()))


@pytest.mark.parametrize("epochs, accumulate", [(3, 1), (2, 2)])
def test_outputs_collected_by_a_callback_are_each_steps_own(epochs, accumulate):
    eager, graphed = fit_both(ReturnsExtras, max_epochs=epochs, accumulate_grad_batches=accumulate,
                              extra_callbacks=lambda: [CollectsOutputs()])
    assert_same(eager, graphed)
    graphs_used(graphed)
    assert not graphed.warnings, graphed.warnings
    got, want = callback_of(graphed, CollectsOutputs), callback_of(eager, CollectsOutputs)
    assert len(got.outputs) == len(want.outputs) == 9 * epochs
    for step, (a, b) in enumerate(zip(got.outputs, want.outputs)):
        for key in ("preds", "abs_err", "loss"):
            torch.testing.assert_close(a[key].detach().cpu(), b[key].detach().cpu(), rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"outputs[{key!r}] of step {step}: {m}")
    assert len({float(out["abs_err"]) for out in got.outputs}) == 9 * epochs  # no buffer shared between steps
    assert got.epoch_pred_means == pytest.approx(want.epoch_pred_means, rel=1e-6, abs=1e-6)


class ReturnsAPythonNumber(models.Regressor):
    """Returns beside the loss a Python number read in the step: its lr, epoch or global step."""

    reads = {
        "lr": lambda module: module.optimizers().param_groups[0]["lr"],
        "epoch": lambda module: module.current_epoch,
        "step": lambda module: module.global_step,
    }

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def training_step(self, batch, batch_idx):
        return {"loss": super().training_step(batch, batch_idx), self.key: self.reads[self.key](self)}


class KeepsReturned(pl.Callback):
    def __init__(self, key: str):
        self.key = key
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(outputs[self.key])


@pytest.mark.parametrize("key", ["lr", "epoch", "step"])
def test_python_numbers_returned_in_outputs_are_each_steps_own(key):
    # a replay runs none of the step's Python: handing on_train_batch_end the captured
    # step's lr, epoch or global_step would be silently wrong
    eager, graphed = fit_both(lambda: ReturnsAPythonNumber(key), max_epochs=3,
                              extra_callbacks=lambda: [KeepsReturned(key)])
    got, want = callback_of(graphed, KeepsReturned).values, callback_of(eager, KeepsReturned).values
    assert got == want and [type(v) for v in got] == [type(v) for v in want]  # the values and eager's types
    if key == "lr":
        # a number read from param_groups is a tensor while captured: graphs are given up
        assert_eager_with_one_warning(eager, graphed, "returns `outputs['lr']` as a Python number")
        assert all(type(v) is float for v in got), got
    else:
        assert_same(eager, graphed)
        one_warning_if_never_replayed(graphed)
