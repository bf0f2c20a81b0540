"""Recurrent, attention, convolutional and embedding layers, trained eagerly and graphed
on a CUDA GPU, in float32 and under bf16-mixed precision.

Covered: LSTM and GRU (batch_first, one or two layers, dropout between layers, an
explicit initial state); ``nn.TransformerEncoderLayer`` and a two-layer pre-norm
``nn.TransformerEncoder``, with and without a padding mask, and ``nn.MultiheadAttention``
called directly; Conv2d + BatchNorm2d + MaxPool2d + Dropout2d, contiguous and
channels_last; ``nn.Embedding`` with ``padding_idx`` and with ``max_norm``, an embedding
tied to a decoder, a frozen submodule. Every graphed fit replays without a warning
(``max_norm`` may instead give graphs up with one) and matches the eager fit.

Tolerances: float32 rtol = atol = 1e-6, as in test_callback_gpu.py. bf16 rounds
activations to 8 bits of mantissa, so a last-bit optimizer difference can flip a
rounding: bf16-mixed compares at bf16 resolution (rtol = 2e-2, atol = 2e-3), as
test_callback_gpu.py::test_bf16_mixed does.

A parameter whose gradient is zero but for rounding turns last-bit differences into
full-size Adam steps (README, "Parity"): convolutions before batch norm have
``bias=False``, as usually written, and the AdamW transformers build their attention
with ``bias=False``; the SGD ones keep the biases, since SGD does not amplify noise.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from parity import assert_same, fit_both, graphs_used, loader

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("deterministic")]

VOCAB, PAD, LENGTH, WIDTH = 20, 0, 7, 16
BF16 = dict(rtol=2e-2, atol=2e-3)


def replayed_quietly(run) -> None:
    """The graphed run replayed its graphs to the end and warned about nothing."""
    graphs_used(run)
    assert not run.warnings, run.warnings


# -- data ------------------------------------------------------------------------------------------


def sequences(n: int = 67, steps: int = 6, features: int = 4, seed: int = 0) -> TensorDataset:
    """``(x, target, label)``: sequences with a regression target and one of 3 classes."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, steps, features, generator=generator)
    target = torch.tanh(x.sum(dim=(1, 2))).unsqueeze(1)
    labels = (x[:, :, 0].mean(1) * 3).round().clamp(-1, 1).long() + 1
    return TensorDataset(x, target, labels)


def tokens(n: int = 67, seed: int = 0) -> TensorDataset:
    """``(ids, label)``: token ids in [1, VOCAB) padded with PAD at the end (each row keeps at least 2 tokens)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=generator)
    lengths = torch.randint(2, LENGTH + 1, (n,), generator=generator)
    ids[torch.arange(LENGTH).unsqueeze(0) >= lengths.unsqueeze(1)] = PAD
    return TensorDataset(ids, (ids.sum(1) % 3).long())


def images(n: int = 67, seed: int = 0) -> TensorDataset:
    """``(image, label)``: 1x16x16 images in 4 classes (which half is brighter, left half's sign)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=generator)
    top_brighter = x[:, 0, :8].mean((1, 2)) > x[:, 0, 8:].mean((1, 2))
    left_positive = x[:, 0, :, :8].mean((1, 2)) > 0
    return TensorDataset(x, top_brighter.long() + 2 * left_positive.long())


def sequence_loader():
    return loader(sequences())


def token_loader():
    return loader(tokens())


def image_loader():
    return loader(images())


def masked_mean(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The mean of ``h`` over the positions of real tokens."""
    keep = (ids != PAD).unsqueeze(-1).float()
    return (h * keep).sum(1) / keep.sum(1)


class Classifier(pl.LightningModule):
    """Cross-entropy of ``self(inputs)`` on a batch ``(inputs, ..., labels)``; loss and accuracy logged."""

    def training_step(self, batch, batch_idx):
        inputs, labels = batch[0], batch[-1]
        logits = self(inputs)
        self.log("train_acc", (logits.argmax(-1) == labels).float().mean(), on_epoch=True)
        return self.logged(F.cross_entropy(logits, labels))

    def logged(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, logged per step and per epoch."""
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss


# -- LSTM and GRU ----------------------------------------------------------------------------------


class Recurrent(Classifier):
    """An LSTM or GRU read at its last step, as a classifier or (``task="regress"``) a regressor."""

    def __init__(self, cell: str = "lstm", num_layers: int = 2, dropout: float = 0.0, task: str = "regress"):
        super().__init__()
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(input_size=4, hidden_size=16, num_layers=num_layers, batch_first=True,
                       dropout=dropout if num_layers > 1 else 0.0)
        self.task = task
        self.head = nn.Linear(16, 1 if task == "regress" else 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def training_step(self, batch, batch_idx):
        if self.task == "classify":
            return super().training_step(batch, batch_idx)
        x, target, _ = batch
        return self.logged(F.mse_loss(self(x), target))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.05 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("num_layers, dropout", [(1, 0.0), (2, 0.0), (2, 0.25)])
@pytest.mark.parametrize("task", ["regress", "classify"])
def test_recurrent_sequence_model(cell, num_layers, dropout, task):
    eager, graphed = fit_both(lambda: Recurrent(cell, num_layers, dropout, task), train_loader=sequence_loader)
    assert_same(eager, graphed)
    replayed_quietly(graphed)


class LSTMWithState(Recurrent):
    """An initial (h, c) made in the step on the batch's device; the final (h, c) feed the head."""

    def training_step(self, batch, batch_idx):
        x, target, _ = batch
        h0 = torch.zeros(self.rnn.num_layers, x.shape[0], 16, device=x.device)
        _, (h, c) = self.rnn(x, (h0, torch.zeros_like(h0)))
        loss = F.mse_loss(self.head(h[-1] + c[-1]), target)
        self.log("train_loss", loss)
        return loss


def test_lstm_with_explicit_initial_state():
    eager, graphed = fit_both(lambda: LSTMWithState("lstm", 2, 0.0), train_loader=sequence_loader)
    assert_same(eager, graphed)
    replayed_quietly(graphed)


# -- transformer and attention ---------------------------------------------------------------------


class Encoder(Classifier):
    """Embeddings and learned positions, a transformer encoder (``layers=0``: one bare encoder
    layer), the mean over real tokens; AdamW with OneCycleLR, or SGD with a per-epoch StepLR."""

    def __init__(self, layers: int = 1, masked: bool = True, dropout: float = 0.1, optimizer: str = "adamw",
                 norm_first: bool = False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(1, LENGTH, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, nhead=2, dim_feedforward=32, dropout=dropout, batch_first=True,
                                           norm_first=norm_first, bias=optimizer != "adamw")
        self.encoder = layer if layers == 0 else nn.TransformerEncoder(layer, num_layers=layers,
                                                                      enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, 3)
        self.masked = masked
        self.optimizer = optimizer

    def forward(self, ids):
        h = self.emb(ids) + self.pos
        h = self.encoder(h, src_key_padding_mask=ids == PAD) if self.masked else self.encoder(h)
        return self.head(masked_mean(h, ids))

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=18)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_mask"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_transformer_encoder_layer(masked, dropout, optimizer):
    eager, graphed = fit_both(lambda: Encoder(0, masked, dropout, optimizer), train_loader=token_loader)
    assert_same(eager, graphed)
    replayed_quietly(graphed)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_mask"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_transformer_encoder_of_two_pre_norm_layers(masked, dropout):
    eager, graphed = fit_both(lambda: Encoder(2, masked, dropout, "adamw", norm_first=True),
                              train_loader=token_loader)
    assert_same(eager, graphed)
    replayed_quietly(graphed)


class Attention(Classifier):
    """``nn.MultiheadAttention`` called directly: self-attention with a key padding mask, the
    entropy of the returned weights logged."""

    def __init__(self, dropout: float = 0.1, need_weights: bool = True):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH, padding_idx=PAD)
        self.attn = nn.MultiheadAttention(WIDTH, num_heads=2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(WIDTH, 3)
        self.need_weights = need_weights

    def forward(self, ids):
        h = self.emb(ids)
        out, weights = self.attn(h, h, h, key_padding_mask=ids == PAD, need_weights=self.need_weights)
        if weights is not None:
            self.log("attn_entropy", -(weights.clamp_min(1e-9).log() * weights).sum(-1).mean())
        return self.head(out[:, 0])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        return [opt], [torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_called_directly(dropout, need_weights):
    eager, graphed = fit_both(lambda: Attention(dropout, need_weights), train_loader=token_loader, max_epochs=3)
    assert_same(eager, graphed)
    replayed_quietly(graphed)


# -- convolutions ----------------------------------------------------------------------------------


class SmallCNN(Classifier):
    """Two Conv2d + BatchNorm2d + ReLU + MaxPool2d blocks with Dropout2d between them; with
    ``channels_last`` the module and each batch use that memory format."""

    def __init__(self, dropout: float = 0.1, channels_last: bool = False, optimizer: str = "adamw"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout2d(dropout),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 4 * 4, 4)
        self.channels_last = channels_last
        self.optimizer = optimizer
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x):
        if self.channels_last:
            x = x.to(memory_format=torch.channels_last)
        return self.head(self.features(x).flatten(1))

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=2e-3)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_small_cnn(dropout, channels_last, optimizer):
    eager, graphed = fit_both(lambda: SmallCNN(dropout, channels_last, optimizer), train_loader=image_loader)
    assert_same(eager, graphed)  # BatchNorm's running statistics and num_batches_tracked are in the state
    replayed_quietly(graphed)
    if channels_last:
        assert graphed.module.features[0].weight.is_contiguous(memory_format=torch.channels_last)


# -- embeddings ------------------------------------------------------------------------------------


class BagOfEmbeddings(Classifier):
    """The mean embedding of the real tokens through a two-layer head; the largest row norm logged."""

    def __init__(self, max_norm: float | None = None, optimizer: str = "adamw"):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, padding_idx=PAD, max_norm=max_norm)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.optimizer = optimizer

    def forward(self, ids):
        pooled = masked_mean(self.emb(ids), ids)
        self.log("emb_norm", self.emb.weight.norm(dim=1).max())
        return self.head(pooled)

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_embedding_with_padding_idx(optimizer):
    eager, graphed = fit_both(lambda: BagOfEmbeddings(None, optimizer), train_loader=token_loader)
    assert_same(eager, graphed)
    replayed_quietly(graphed)
    assert torch.count_nonzero(graphed.state["emb.weight"][PAD]) == 0  # the padding row never trains


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_embedding_with_max_norm_renormalises_rows_in_place(optimizer):
    # max_norm makes the forward rewrite the looked-up rows of the weight in place (a no_grad renorm), then
    # the optimizer changes them again: a replay must do both on every step, as eager does
    eager, graphed = fit_both(lambda: BagOfEmbeddings(1.0, optimizer), train_loader=token_loader, max_epochs=3)
    assert_same(eager, graphed)
    stats = graphed.callback.stats
    if stats.replays == 0 or stats.disabled_reason is not None:
        # only with one warning that says why (the CUDA renorm kernel may read a count on the host)
        assert len(graphed.warnings) == 1, (graphed.warnings, stats.summary())
    else:
        assert not graphed.warnings, graphed.warnings


class TiedLanguageModel(pl.LightningModule):
    """Next-token prediction: embedding, GRU, and a decoder whose weight is the embedding's."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16, padding_idx=PAD)
        self.rnn = nn.GRU(16, 16, batch_first=True)
        self.decoder = nn.Linear(16, VOCAB)
        self.decoder.weight = self.emb.weight

    def training_step(self, batch, batch_idx):
        ids, _ = batch
        out, _ = self.rnn(self.emb(ids[:, :-1]))
        logits = self.decoder(out)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), ignore_index=PAD)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=18)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_tied_embedding_and_decoder_weights():
    eager, graphed = fit_both(TiedLanguageModel, train_loader=token_loader)
    assert_same(eager, graphed)
    replayed_quietly(graphed)
    module = graphed.module
    assert module.decoder.weight is module.emb.weight  # still tied after a graphed fit
    assert len(list(module.parameters())) == len({id(p) for p in module.parameters()})


class FrozenEmbeddingClassifier(BagOfEmbeddings):
    """A pretrained-style embedding and first layer frozen in ``__init__``; every parameter goes to AdamW."""

    def __init__(self):
        super().__init__(None, "adamw")
        self.emb.requires_grad_(False)
        self.head[0].requires_grad_(False)


def test_frozen_submodule_with_all_parameters_in_the_optimizer():
    eager, graphed = fit_both(FrozenEmbeddingClassifier, train_loader=token_loader)
    assert_same(eager, graphed)
    replayed_quietly(graphed)
    pl.seed_everything(0, verbose=False)
    initial = FrozenEmbeddingClassifier().state_dict()
    for name in ("emb.weight", "head.0.weight", "head.0.bias"):
        assert torch.equal(graphed.state[name], initial[name]), name  # frozen: unchanged
    assert not torch.equal(graphed.state["head.2.weight"], initial["head.2.weight"])  # the rest trained


# -- bf16-mixed ------------------------------------------------------------------------------------


BF16_CASES = {
    "lstm": (lambda: Recurrent("lstm", 2, 0.0, "classify"), sequence_loader),
    "gru_dropout": (lambda: Recurrent("gru", 2, 0.25, "regress"), sequence_loader),
    "transformer": (lambda: Encoder(1, True, 0.1, "adamw"), token_loader),
    "cnn_channels_last": (lambda: SmallCNN(0.1, True, "adamw"), image_loader),
}


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_bf16_mixed(case):
    make, data = BF16_CASES[case]
    eager, graphed = fit_both(make, train_loader=data, precision="bf16-mixed")
    assert_same(eager, graphed, **BF16)
    replayed_quietly(graphed)
    assert graphed.trainer.precision == "bf16-mixed"
