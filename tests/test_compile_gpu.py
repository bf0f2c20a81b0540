"""torch.compile inside the whole-step graph, on a CUDA GPU: a model compiled in the
default mode trains graphed exactly as the same compiled model trains eagerly,
compilation never happens inside a capture, values the compiled code specialised
on are followed, and ``mode="reduce-overhead"`` is explained, not broken."""

from __future__ import annotations

import pytest
import torch

from lightning.pytorch.callbacks import Callback

import models
from lightning_graphs.compiled import compiled_parts
from parity import assert_same, fit

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("deterministic")]

# Inductor's kernels are the same in both runs; the optimizer steps differ in the last
# place now and then (see test_callback_gpu.py), which compiled code may round differently
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def both(make_module, **kwargs):
    torch._dynamo.reset()
    eager = fit(make_module, graphed=False, **kwargs)
    torch._dynamo.reset()
    return eager, fit(make_module, graphed=True, **kwargs)


def graphs_used(run):
    stats = run.callback.stats
    assert stats.captures >= 1 and stats.replays > 0 and stats.disabled_reason is None, stats.summary()


def compiled_regressor(dropout=0.0, mode="default"):
    module = models.Regressor("adamw", "lambda", dropout=dropout)
    module.net.forward = torch.compile(module.net.forward, mode=mode)  # keeps the state_dict keys of the eager model
    return module


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_compiled_model_trains_graphed_as_it_trains_eagerly(dropout):
    # 67 samples: 8 full batches and a ragged one of 3 an epoch, which compiles again (in an eager step)
    eager, graphed = both(lambda: compiled_regressor(dropout), max_epochs=3)
    assert_same(eager, graphed, **TOLERANCE)
    graphs_used(graphed)
    stats = graphed.callback.stats
    assert stats.captures == 2 and stats.eager_steps == 0, stats.summary()
    assert not graphed.warnings, graphed.warnings


class Scaled(torch.nn.Module):
    """Reads a Python float in forward: torch.compile specialises on it (a guard), and a
    graph bakes it in."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.factor = 1.0

    def forward(self, x):
        return self.inner(x) * self.factor


class AnnealsAFactor(models.Regressor):
    def __init__(self, compiled: bool):
        super().__init__("adamw", "lambda")
        self.net = Scaled(self.net)
        if compiled:
            self.net.forward = torch.compile(self.net.forward)

    def on_train_epoch_start(self):
        self.net.factor = 1.0 / (1 + self.current_epoch)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_value_changed_outside_the_step_is_followed(compiled):
    eager, graphed = both(lambda: AnnealsAFactor(compiled), max_epochs=3)
    assert_same(eager, graphed, **TOLERANCE)
    graphs_used(graphed)
    recaptures = graphed.callback.stats.recaptures
    assert any("factor" in reason for reason in recaptures), graphed.callback.stats.summary()


class CompiledParts(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen = [name for name, _ in compiled_parts(pl_module)]


def test_compile_true_compiles_the_children_for_the_fit_and_puts_them_back():
    torch._dynamo.reset()
    eager = fit(lambda: compiled_regressor(), graphed=False, max_epochs=2)
    torch._dynamo.reset()
    parts = CompiledParts()
    graphed = fit(lambda: models.Regressor("adamw", "lambda"), graphed=True, max_epochs=2,
                  callback_kwargs={"compile": True}, extra_callbacks=lambda: [parts])
    assert parts.seen == ["net.forward"]
    assert_same(eager, graphed, **TOLERANCE)
    graphs_used(graphed)
    assert "forward" not in graphed.module.net.__dict__


def test_reduce_overhead_trains_unchanged_with_one_message():
    eager, graphed = both(lambda: compiled_regressor(mode="reduce-overhead"), max_epochs=2)
    assert_same(eager, graphed, rtol=0, atol=0)  # the callback stood aside: the same run
    assert graphed.callback.stats is None or graphed.callback.stats.replays == 0
    messages = [w for w in graphed.warnings if "reduce-overhead" in w]
    assert len(messages) == 1 and "default mode" in messages[0], graphed.warnings
