"""The GradScaler's skip decision handed to the optimizer step as a device flag
(on CPU, with a real scaler and optimizers)."""

from __future__ import annotations

import pytest
import torch

from lightning_graphs.amp import graph_safe_grad_scalers, scaler_of


def scaled_step(scaler, optimizer, model, scale_input=1.0):
    optimizer.zero_grad()
    loss = model(torch.full((1, 2), scale_input)).sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def step_parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handed = []  # (optimizer, found_inf) per skip_step call

    def skip_step(opt, found_inf, args, kwargs):
        handed.append((opt, found_inf.clone()))
        return opt.step(*args, **kwargs)

    return model, optimizer, skip_step, handed


def test_the_step_gets_found_inf_on_the_device_and_no_host_decision():
    model, optimizer, skip_step, handed = step_parts()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    with graph_safe_grad_scalers([scaler], skip_step):
        scaled_step(scaler, optimizer, model)
        scaled_step(scaler, optimizer, model, scale_input=float("inf"))
    assert [opt for opt, _ in handed] == [optimizer, optimizer]
    assert [float(found) for _, found in handed] == [0.0, 1.0]
    assert scaler.get_scale() == 2.0, "update() still backs off"


def test_outside_the_block_the_scaler_decides_on_the_host_again():
    model, optimizer, skip_step, handed = step_parts()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    with graph_safe_grad_scalers([scaler, scaler], skip_step):
        pass
    assert "_maybe_opt_step" not in scaler.__dict__
    before = [p.clone() for p in model.parameters()]
    scaled_step(scaler, optimizer, model, scale_input=float("inf"))
    assert handed == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "skipped on the host, as PyTorch does"


def test_the_patch_is_removed_when_the_step_raises():
    model, optimizer, skip_step, handed = step_parts()
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(RuntimeError, match="capture failed"):
        with graph_safe_grad_scalers([scaler], skip_step):
            raise RuntimeError("capture failed")
    assert "_maybe_opt_step" not in scaler.__dict__


def test_sgd_hands_found_inf_to_its_fused_kernel_and_rmsprop_is_refused():
    from lightning_graphs.optimizers import GraphSafeOptimizer

    params = [torch.nn.Parameter(torch.ones(3))]
    assert GraphSafeOptimizer(torch.optim.AdamW(params, lr=1e-3)).skip_on_device_unsupported() is None
    assert GraphSafeOptimizer(torch.optim.Adam(params, lr=1e-3, fused=True)).skip_on_device_unsupported() is None
    reason = GraphSafeOptimizer(torch.optim.RMSprop(params, lr=1e-3)).skip_on_device_unsupported()
    assert reason is not None and "RMSprop" in reason

    sgd = torch.optim.SGD(params, lr=0.1)
    seen = []
    sgd.step = lambda *args, **kwargs: seen.append(getattr(sgd, "found_inf", None))
    flag = torch.tensor(1.0)
    GraphSafeOptimizer(sgd).step_unless_found_inf(flag, (), {})
    assert seen == [flag] and not hasattr(sgd, "found_inf")


def test_the_scaler_behind_a_fabric_optimizer_is_found():
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    model, optimizer = fabric.setup(torch.nn.Linear(2, 1), torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1))
    assert scaler_of(optimizer) is None  # bf16 needs no scaler
    assert scaler_of(torch.optim.SGD(model.parameters(), lr=0.1)) is None

    class Precision:
        scaler = torch.amp.GradScaler("cpu")

    class Strategy:
        precision = Precision()

    class Wrapped:
        _strategy = Strategy()

    assert scaler_of(Wrapped()) is Precision.scaler


def test_after_a_failure_in_the_block_the_step_can_run_again():
    model, optimizer, skip_step, handed = step_parts()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    with pytest.raises(RuntimeError, match="capture failed"):
        with graph_safe_grad_scalers([scaler], skip_step):
            optimizer.zero_grad()
            scaler.scale(model(torch.ones(1, 2)).sum()).backward()
            scaler.unscale_(optimizer)  # as Lightning does before clipping
            raise RuntimeError("capture failed")
    scaled_step(scaler, optimizer, model)  # would raise "unscale_() has already been called"
