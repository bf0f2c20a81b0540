"""GraphedStep in a Lightning Fabric loop trains exactly like the same loop run eagerly."""

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric

import models
from lightning_graphs import GraphedStep

pytestmark = pytest.mark.cuda


def _train(graphed, steps=30, precision="32-true"):
    fabric = Fabric(accelerator="cuda", devices=1, precision=precision)
    fabric.seed_everything(0, verbose=False)
    model = models.mlp(dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 8, generator=generator), torch.randn(16, 1, generator=generator)) for _ in range(4)]
    if precision == "16-mixed":
        data[2] = (data[2][0], data[2][1] * 1e4)  # fp16 gradients overflow on this batch at the scales tried
    scales = []

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        return loss.detach()

    runner = GraphedStep(step, optimizers=[optimizer], modules=[model]) if graphed else step
    losses = []
    for index in range(steps):
        losses.append(runner(*fabric.to_device(data[index % 4])))
        scheduler.step()
        if precision == "16-mixed":
            scales.append(fabric._precision.scaler.get_scale())
    if graphed:
        assert runner.stats.captures == 1 and runner.stats.replays == steps - 4, runner.stats.summary()
        runner.close()
    return torch.stack(losses).cpu(), {k: v.cpu() for k, v in model.state_dict().items()}, scales


@pytest.mark.parametrize("precision, tolerance", [("32-true", 1e-6), ("16-mixed", 1e-3)])
def test_fabric_loop_graphed_matches_eager(deterministic, precision, tolerance):
    eager_losses, eager_state, eager_scales = _train(False, precision=precision)
    graphed_losses, graphed_state, graphed_scales = _train(True, precision=precision)
    assert graphed_scales == eager_scales  # the same steps skipped (16-mixed), found by the scaler behind Fabric
    if precision == "16-mixed":
        assert any(b < a for a, b in zip(eager_scales[4:], eager_scales[5:])), eager_scales
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=tolerance, atol=tolerance)
    for name in eager_state:
        torch.testing.assert_close(graphed_state[name], eager_state[name], rtol=tolerance, atol=tolerance)
