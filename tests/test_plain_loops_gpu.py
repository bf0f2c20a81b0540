"""``GraphedStep`` in plain PyTorch loops on the GPU: graphed against the same loop
run eagerly, step by step."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import models
from lightning_graphs import GraphedStep
from test_plain_loops_cpu import SIMULATIONS, simulate

pytestmark = pytest.mark.cuda


def _data(count=4):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=generator).cuda(), torch.randn(16, 1, generator=generator).cuda())
            for _ in range(count)]


def _accumulate_by_argument(graphed, calls=24):
    """Gradients accumulated over two calls, the second stepping and then zeroing them
    (at the end of the step), decided by an argument; the loss scaled by a setting
    that changes in place halfway."""
    torch.manual_seed(0)
    model = models.mlp().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    settings = types.SimpleNamespace(scale=0.5)

    def step(x, y, take_step, settings):
        loss = settings.scale * F.mse_loss(model(x), y)
        loss.backward()
        if take_step:
            optimizer.step()
            optimizer.zero_grad()
        return loss.detach()

    runner = GraphedStep(step, optimizers=[optimizer], modules=[model]) if graphed else step
    data, losses = _data(), []
    for index in range(calls):
        if index == calls // 2:
            settings.scale = 1.0
        x, y = data[index % len(data)]
        losses.append(runner(x, y, index % 2 == 1, settings=settings))
    return torch.stack(losses).cpu(), {k: v.cpu() for k, v in model.state_dict().items()}, runner


def test_accumulation_decided_by_an_argument_and_a_setting_changed_in_place(deterministic):
    eager_losses, eager_state, _ = _accumulate_by_argument(False)
    losses, state, runner = _accumulate_by_argument(True)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for key, value in eager_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
    stats = runner.stats
    assert stats.captures == 4 and stats.replays >= 10 and stats.disabled_reason is None, stats.summary()
    runner.close()


@pytest.mark.parametrize("setup", list(SIMULATIONS))
def test_a_simulation_setting_changed_between_calls_is_never_replayed_stale(setup):
    with torch.device("cuda"):  # the simulation's tensors on the GPU
        eager, _ = simulate(setup, graphed=False)
        graphed, run = simulate(setup, graphed=True)
    assert graphed[0].is_cuda
    for got, want in zip(graphed, eager):
        torch.testing.assert_close(got, want)
    assert run.stats.replays >= 4, run.stats.summary()
