"""GraphedStep in a Lightning Fabric loop trains exactly like the same loop run eagerly."""

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric

import models
from lightning_graphs import GraphedStep

pytestmark = pytest.mark.cuda


def _train(graphed, steps=30):
    fabric = Fabric(accelerator="cuda", devices=1, precision="32-true")
    fabric.seed_everything(0, verbose=False)
    model = models.mlp(dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 8, generator=generator), torch.randn(16, 1, generator=generator)) for _ in range(4)]

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
    if graphed:
        assert runner.stats.captures == 1 and runner.stats.replays == steps - 4, runner.stats.summary()
        runner.close()
    return torch.stack(losses).cpu(), {k: v.cpu() for k, v in model.state_dict().items()}


def test_fabric_loop_graphed_matches_eager(deterministic):
    eager_losses, eager_state = _train(False)
    graphed_losses, graphed_state = _train(True)
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-6, atol=1e-6)
    for name in eager_state:
        torch.testing.assert_close(graphed_state[name], eager_state[name], rtol=1e-6, atol=1e-6)
