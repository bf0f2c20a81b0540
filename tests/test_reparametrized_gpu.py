"""Layers that compute their weights or activations anew each step, trained eagerly and
graphed on a CUDA GPU: activation checkpointing, weight reparametrizations, GroupNorm
and LayerNorm.

Covered: ``torch.utils.checkpoint`` around a block with dropout (``use_reentrant``
False and True; also under bf16-mixed); ``torch.nn.utils.parametrizations`` weight_norm,
spectral_norm (whose power iteration updates buffers in the training forward) and
orthogonal, and ``parametrize.cached()``; the legacy hook-based
``torch.nn.utils.weight_norm`` and ``spectral_norm``; GroupNorm and LayerNorm in an MLP,
GroupNorm in a CNN.

Two of them cannot be graphed, and train eagerly with one warning: the orthogonal
parametrization's ``torch.matrix_exp`` copies host data while it is captured, and the
legacy hooks assign the weight in Python before every forward (the warning names the
``torch.nn.utils.parametrizations`` replacement).

Tolerances: float32 rtol = atol = 1e-6, as in test_callback_gpu.py; bf16-mixed
compares at bf16 resolution (rtol = 2e-2, atol = 2e-3), since a last-bit optimizer
difference can flip a bf16 rounding, as test_callback_gpu.py::test_bf16_mixed does.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.utils.checkpoint import checkpoint

from parity import assert_eager_with_one_warning, assert_same, fit_both, graphs_used

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("deterministic")]

BF16 = dict(rtol=2e-2, atol=2e-3)


def replayed_quietly(run) -> None:
    """The graphed run replayed its graphs to the end and warned about nothing."""
    graphs_used(run)
    assert not run.warnings, run.warnings


class Regression(pl.LightningModule):
    """MSE of ``self(x)`` on the default regression batches; AdamW with a per-step LambdaLR."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# -- activation checkpointing ----------------------------------------------------------------------


class Checkpointed(Regression):
    """A residual block with dropout whose activations are recomputed in backward."""

    def __init__(self, use_reentrant: bool, dropout: float):
        super().__init__()
        self.stem = nn.Linear(8, 32)
        self.block = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 32), nn.GELU())
        self.head = nn.Linear(32, 1)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        h = self.stem(x)
        h = h + checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        return self.head(h)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant, dropout):
    # the recomputation in backward must see the forward's dropout mask (checkpoint saves and restores
    # the RNG state for that): eager and graphed alike
    eager, graphed = fit_both(lambda: Checkpointed(use_reentrant, dropout))
    assert_same(eager, graphed)
    stats = graphed.callback.stats
    if stats.replays == 0 or stats.disabled_reason is not None:
        # only as a clear fallback: one warning naming the cause
        (warning,) = graphed.warnings
        assert "checkpoint" in warning.lower() or "rng" in warning.lower(), (warning, stats.summary())
    else:
        assert not graphed.warnings, graphed.warnings


def test_activation_checkpointing_under_bf16_mixed():
    eager, graphed = fit_both(lambda: Checkpointed(False, 0.0), precision="bf16-mixed")
    assert_same(eager, graphed, **BF16)
    replayed_quietly(graphed)
    assert graphed.trainer.precision == "bf16-mixed"


# -- weight reparametrizations ---------------------------------------------------------------------


class Reparametrized(Regression):
    """A three-layer tanh MLP with some of its weights reparametrized as ``kind`` says."""

    def __init__(self, kind: str):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 1)
        if kind == "weight_norm":
            parametrizations.weight_norm(self.inp)
            parametrizations.weight_norm(self.out)
        elif kind == "spectral_norm":
            parametrizations.spectral_norm(self.inp)
            parametrizations.spectral_norm(self.mid, n_power_iterations=2)
        elif kind == "orthogonal":
            parametrizations.orthogonal(self.mid)  # square: the matrix_exp map
        elif kind == "legacy_weight_norm":
            torch.nn.utils.weight_norm(self.inp)
        elif kind == "legacy_spectral_norm":
            torch.nn.utils.spectral_norm(self.mid)
        else:
            raise ValueError(kind)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_parametrizations(kind):
    eager, graphed = fit_both(lambda: Reparametrized(kind))
    assert_same(eager, graphed)  # spectral_norm's _u and _v buffers are in the state: power iteration replayed
    replayed_quietly(graphed)
    if kind == "spectral_norm":
        pl.seed_everything(0, verbose=False)
        initial = Reparametrized(kind).state_dict()
        key = "mid.parametrizations.weight.0._u"
        assert not torch.equal(graphed.state[key], initial[key])  # the power iteration ran


def test_orthogonal_parametrization_trains_eagerly_naming_matrix_exp():
    # torch.matrix_exp copies host data during capture, which a graph cannot hold
    eager, graphed = fit_both(lambda: Reparametrized("orthogonal"))
    assert_eager_with_one_warning(eager, graphed, "matrix_exp")
    weight = graphed.module.mid.weight
    torch.testing.assert_close(weight @ weight.T, torch.eye(16, device=weight.device), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, layer", [("legacy_weight_norm", "inp"), ("legacy_spectral_norm", "mid")])
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_legacy_hook_based_reparametrizations_train_eagerly_naming_their_replacement(kind, layer):
    # torch.nn.utils.weight_norm / spectral_norm: forward pre-hooks that assign `module.weight` anew each call
    eager, graphed = fit_both(lambda: Reparametrized(kind))
    assert_eager_with_one_warning(eager, graphed, f"torch.nn.utils.parametrizations.{kind.removeprefix('legacy_')}")
    # what users read afterwards: the plain `weight` attribute the hook set at the last forward
    got, want = getattr(graphed.module, layer).weight, getattr(eager.module, layer).weight
    torch.testing.assert_close(got.detach().cpu(), want.detach().cpu(), rtol=1e-6, atol=1e-6)


class CachedWeightNorm(Reparametrized):
    """Uses each parametrized weight twice per forward, computed once under ``parametrize.cached()``."""

    def __init__(self):
        super().__init__("weight_norm")

    def forward(self, x):
        with parametrize.cached():
            return super().forward(x) + 0.1 * super().forward(-x)


def test_parametrization_cached_forward():
    eager, graphed = fit_both(CachedWeightNorm)
    assert_same(eager, graphed)
    replayed_quietly(graphed)


# -- GroupNorm and LayerNorm -----------------------------------------------------------------------


class Normalised(Regression):
    """An MLP with a GroupNorm or LayerNorm after each hidden layer."""

    def __init__(self, kind: str):
        super().__init__()
        norm = (lambda: nn.GroupNorm(4, 32)) if kind == "group" else (lambda: nn.LayerNorm(32))
        self.net = nn.Sequential(nn.Linear(8, 32), norm(), nn.SiLU(), nn.Linear(32, 32), norm(), nn.SiLU(),
                                 nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_group_and_layer_norm(kind):
    eager, graphed = fit_both(lambda: Normalised(kind), max_epochs=3)
    assert_same(eager, graphed)
    replayed_quietly(graphed)


class GroupNormCNN(Regression):
    """Each 8-feature row seen as a 1x4x2 image, through two convolutions with GroupNorm; plain Adam."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x.view(-1, 1, 4, 2))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_group_norm_on_images():
    eager, graphed = fit_both(GroupNormCNN)
    assert_same(eager, graphed)
    replayed_quietly(graphed)
