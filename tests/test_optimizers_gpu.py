"""Graph-safe optimizer steps against the user's optimizer, on a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from lightning_graphs.adam_step import AdamHostScalars, adam_step_on_device, uniform_step_groups
from lightning_graphs.optimizers import GraphSafeOptimizer

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("deterministic")]


def _params(seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(64, 32), (32,), (1, 32), (1,)]
    return [torch.nn.Parameter(torch.randn(s, device="cuda", generator=generator)) for s in shapes]


def _grads(params, step):
    generator = torch.Generator(device="cuda").manual_seed(1000 + step)
    return [torch.randn(p.shape, device="cuda", generator=generator) for p in params]


@pytest.mark.parametrize("cls, kwargs", [
    (torch.optim.AdamW, {"weight_decay": 0.01}),
    (torch.optim.Adam, {"weight_decay": 1e-3, "amsgrad": True}),
    (torch.optim.Adam, {"maximize": True}),
])
def test_device_hyperparameter_adam_step_matches_the_users_optimizer(cls, kwargs):
    ours, theirs = _params(), _params()
    opt_ours = cls(ours, lr=1e-2, betas=(0.9, 0.999), **kwargs)
    opt_theirs = cls(theirs, lr=1e-2, betas=(0.9, 0.999), **kwargs)
    for step in range(40):
        beta1 = 0.85 + 0.1 * step / 40  # cycled, as OneCycleLR does
        for opt in (opt_ours, opt_theirs):
            opt.param_groups[0]["betas"] = (beta1, 0.999)
            opt.param_groups[0]["lr"] = 1e-2 * (1 - step / 50)
        for params in (ours, theirs):
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
        opt_theirs.step()
        if step == 0:
            opt_ours.step()  # lazily creates the state, as a warm-up step does
            for state in opt_ours.state.values():
                state["step"] = state["step"].cuda()
            continue
        group = opt_ours.param_groups[0]
        host = AdamHostScalars(torch.device("cuda")).write(group)
        lr, betas = group["lr"], group["betas"]
        group["lr"] = torch.tensor(lr, dtype=torch.float64, device="cuda")
        group["betas"] = tuple(torch.tensor(b, dtype=torch.float64, device="cuda") for b in betas)
        adam_step_on_device(opt_ours, uniform_step_groups(opt_ours), [host], [])
        group["lr"], group["betas"] = lr, betas
    # float32 rounding of two fused operations is all that may differ
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _capture_step(opt, params, prepared):
    """Capture one optimizer step (with fixed gradients) and return the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    prepared.enter_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        opt.step()
    assert prepared.exit_capture() is None
    return graph


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_captured_step_follows_a_scheduler_like_the_eager_optimizer(name):
    def build(params):
        if name == "adamw":
            return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    graphed_params, eager_params = _params(), _params()
    graphed_opt, eager_opt = build(graphed_params), build(eager_params)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + 0.3 * s)) for o in (graphed_opt, eager_opt)]
    grads = _grads(graphed_params, 0)
    for params, opt in ((graphed_params, graphed_opt), (eager_params, eager_opt)):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()  # warm-up: lazily created state
    for sched in schedules:
        sched.step()
    prepared = GraphSafeOptimizer(graphed_opt)
    graph = _capture_step(graphed_opt, graphed_params, prepared)
    for step in range(12):
        prepared.sync_live()
        assert prepared.stale_reason() == (None, False)
        graph.replay()
        for p, g in zip(eager_params, grads):
            p.grad = g.clone()
        eager_opt.step()
        for sched in schedules:
            sched.step()
    assert isinstance(graphed_opt.param_groups[0]["lr"], float)
    for a, b in zip(graphed_params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    prepared.restore()
