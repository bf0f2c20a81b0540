import dataclasses

import pytest
import torch

from lightning_graphs import GraphedStep
from lightning_graphs.optimizers import GraphSafeOptimizer, plan_for


def _params(n=2):
    return [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]


def _step(opt):
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()


def test_adam_and_adamw_get_live_lr_and_betas_through_their_own_step():
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        plan = plan_for(cls(_params(), lr=1e-3))
        assert plan.unsupported is None
        assert plan.live_keys == ("lr", "betas") and plan.live_dtype == torch.float64
        assert plan.own_adam_step and plan.scalar_state_on_device
        assert plan.while_capturing == {}  # eager steps keep the user's settings


def test_an_adam_subclass_uses_pytorchs_capturable_path():
    class MyAdam(torch.optim.Adam):
        pass

    plan = plan_for(MyAdam(_params(), lr=1e-3))
    assert not plan.own_adam_step and plan.live_keys == ("lr",)
    assert plan.while_capturing == {"capturable": True}


def test_sgd_is_captured_through_the_fused_kernel_only_on_cuda():
    plan = plan_for(torch.optim.SGD(_params(), lr=0.1, momentum=0.9))
    # CPU parameters: the fused kernel does not apply; hyper-parameters stay baked
    assert plan.while_capturing == {} and plan.live_keys == ()


def test_lbfgs_is_unsupported_with_a_reason():
    plan = plan_for(torch.optim.LBFGS(_params()))
    assert plan.unsupported is not None and "closure" in plan.unsupported


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.AdamW(params, lr=torch.tensor(1e-2), weight_decay=0.5),
    lambda params: torch.optim.Adam(params, lr=torch.tensor(1e-3)),
    lambda params: torch.optim.SGD(params, lr=torch.tensor(0.1), momentum=0.9),
])
def test_a_tensor_learning_rate_is_unsupported_naming_it_and_the_fix(make):
    plan = plan_for(make(_params()))
    assert plan.unsupported is not None
    assert "param_groups[0]['lr'] is a tensor" in plan.unsupported and "`lr=1e-3`" in plan.unsupported


def test_enter_capture_swaps_floats_for_tensors_and_exit_restores_them():
    opt = torch.optim.AdamW(_params(), lr=1e-3, betas=(0.9, 0.99))
    _step(opt)
    own_step = opt.__dict__.get("step")
    prepared = GraphSafeOptimizer(opt)
    prepared.enter_capture()
    group = opt.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].dtype == torch.float64
    assert group["lr"].item() == 1e-3  # float64: the scheduler's value exactly
    assert [b.item() for b in group["betas"]] == [0.9, 0.99]
    assert opt.__dict__.get("step") is not own_step  # our step stands in while capturing
    assert prepared.exit_capture() is None
    assert group["lr"] == 1e-3 and isinstance(group["lr"], float)
    assert group["betas"] == (0.9, 0.99)
    assert group["capturable"] is False
    assert opt.__dict__.get("step") is own_step
    prepared.restore()


def test_sgd_settings_change_only_while_capturing():
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    _step(opt)
    prepared = GraphSafeOptimizer(opt)
    # the plan SGD gets for CUDA parameters (this machine may have none)
    prepared.plan = dataclasses.replace(prepared.plan, live_keys=("lr",), while_capturing={"fused": True, "foreach": False})
    prepared.enter_capture()
    assert opt.param_groups[0]["fused"] is True
    prepared.exit_capture()
    assert opt.param_groups[0]["fused"] is None and opt.param_groups[0]["foreach"] is None


def test_scheduler_changes_reach_the_live_tensor_before_replay():
    opt = torch.optim.AdamW(_params(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    _step(opt)
    prepared = GraphSafeOptimizer(opt)
    prepared.enter_capture()
    live = opt.param_groups[0]["lr"]
    prepared.exit_capture()
    sched.step()
    assert prepared.stale_reason() == (None, False)  # lr is live: no re-capture needed
    prepared.sync_live()
    assert live.item() == pytest.approx(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # the user still sees a float


def test_adams_host_computed_scalars_follow_the_scheduler():
    opt = torch.optim.AdamW(_params(), lr=1.0, betas=(0.9, 0.99), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    _step(opt)
    prepared = GraphSafeOptimizer(opt)
    prepared.enter_capture()
    prepared.exit_capture()
    host = prepared._host_scalars[0]
    assert host.decay.item() == pytest.approx(0.9) and host.one_minus_beta1.item() == pytest.approx(0.1)
    sched.step()
    opt.param_groups[0]["betas"] = (0.8, 0.99)
    prepared.sync_live()
    assert host.decay.item() == pytest.approx(1 - 0.5 * 0.1)
    assert host.one_minus_beta1.item() == pytest.approx(0.2) and host.beta2.item() == pytest.approx(0.99)
    assert host.decay.dtype == torch.float32


def test_a_baked_hyperparameter_change_makes_the_graph_stale():
    opt = torch.optim.AdamW(_params(), lr=1e-3, weight_decay=0.01)
    _step(opt)
    prepared = GraphSafeOptimizer(opt)
    prepared.enter_capture()
    prepared.exit_capture()
    assert prepared.stale_reason() == (None, False)
    opt.param_groups[0]["weight_decay"] = 0.1
    reason, structural = prepared.stale_reason()
    assert "weight_decay" in reason and not structural  # captured again at once


def test_a_cycled_sgd_momentum_names_the_scheduler_option_that_keeps_it_fixed():
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    _step(opt)
    prepared = GraphSafeOptimizer(opt)
    prepared.enter_capture()
    prepared.exit_capture()
    opt.param_groups[0]["momentum"] = 0.85
    reason, structural = prepared.stale_reason()
    assert "'momentum'" in reason and "`cycle_momentum=False`" in reason and not structural


def test_loading_a_state_dict_makes_the_graph_stale():
    opt = torch.optim.Adam(_params(), lr=1e-3)
    _step(opt)
    prepared = GraphSafeOptimizer(opt)
    prepared.enter_capture()
    prepared.exit_capture()
    opt.load_state_dict(opt.state_dict())
    reason, structural = prepared.stale_reason()
    assert "replaced" in reason and structural


def test_adding_a_param_group_is_a_structural_change():
    params = _params(3)
    opt = torch.optim.AdamW(params[:2], lr=1e-3)
    _step(opt)
    prepared = GraphSafeOptimizer(opt)
    prepared.enter_capture()
    prepared.exit_capture()
    opt.add_param_group({"params": [params[2]], "lr": 1e-4})
    reason, structural = prepared.stale_reason()
    assert "extended" in reason and structural  # its new parameters need state from an eager step first


def test_a_step_writing_its_own_learning_rate_is_reported():
    opt = torch.optim.AdamW(_params(), lr=1e-3)
    _step(opt)
    prepared = GraphSafeOptimizer(opt)
    prepared.enter_capture()
    opt.param_groups[0]["lr"] = 5e-4  # what an optimizer_step override with a manual warm-up does
    problem = prepared.exit_capture()
    assert problem is not None and "'lr'" in problem
    assert opt.param_groups[0]["lr"] == 5e-4  # the step's own write is kept, as in eager


def test_a_step_writing_a_baked_hyperparameter_is_reported():
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    _step(opt)
    prepared = GraphSafeOptimizer(opt)
    prepared.enter_capture()
    opt.param_groups[0]["momentum"] = 0.5
    problem = prepared.exit_capture()
    assert problem is not None and "momentum" in problem


def test_steps_stay_put_on_a_cpu_only_machine_and_restore_is_harmless():
    opt = torch.optim.Adam(_params(), lr=1e-3)
    _step(opt)
    state = next(iter(opt.state.values()))
    original = state["step"]
    prepared = GraphSafeOptimizer(opt)
    prepared.enter_capture()
    prepared.exit_capture()
    assert state["step"] is original  # already on the parameters' device
    prepared.restore()
    assert state["step"] is original
    assert prepared.user_state_dict(opt.state_dict())["state"][0]["step"] is original


def test_host_state_of_adagrad_is_named():
    opt = torch.optim.Adagrad(_params(), lr=0.1)
    _step(opt)
    problem = GraphSafeOptimizer(opt).host_state()
    assert problem is not None and "Adagrad" in problem and "'step'" in problem


def test_adam_step_counter_on_cpu_is_not_reported_since_it_is_moved():
    opt = torch.optim.Adam(_params(), lr=1e-3)
    _step(opt)
    assert GraphSafeOptimizer(opt).host_state() is None


class _CountingOptimizer(torch.optim.Optimizer):
    """A user optimizer keeping a Python counter in its state."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["n"] = state.get("n", 0) + 1
                p.add_(p.grad, alpha=-group["lr"] / state["n"])


def test_python_numbers_in_a_custom_optimizers_state_are_named():
    opt = _CountingOptimizer(_params())
    _step(opt)
    problem = GraphSafeOptimizer(opt).host_state()
    assert problem is not None and "'n'" in problem


@pytest.mark.parametrize("with_found_inf", [False, True], ids=["", "with-found_inf"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("cls, kwargs", [
    (torch.optim.AdamW, {"weight_decay": 0.01}),
    (torch.optim.Adam, {"weight_decay": 1e-3, "amsgrad": True}),
    (torch.optim.Adam, {"maximize": True}),
])
def test_device_scalar_adam_step_follows_pytorchs_adam(monkeypatch, cls, kwargs, per_tensor, with_found_inf):
    """The arithmetic of the graph-safe Adam step, on CPU tensors: lr and betas read from
    float64 tensors, betas cycled as OneCycleLR does, both update paths. With a
    GradScaler's ``found_inf``, steps whose gradients overflow change nothing (where
    PyTorch's scaler does not call the step) and the others are those of PyTorch."""
    from lightning_graphs import adam_step

    if per_tensor:
        monkeypatch.setattr(adam_step, "_PER_TENSOR_NUMEL", 100)
    generator = torch.Generator().manual_seed(0)
    shapes = [(40, 30), (30,), (1,)]
    start = [torch.randn(s, generator=generator) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    opt_ours = cls(ours, lr=1e-2, betas=(0.9, 0.999), foreach=True, **kwargs)
    opt_theirs = cls(theirs, lr=1e-2, betas=(0.9, 0.999), foreach=True, **kwargs)
    for step in range(30):
        grads = [torch.randn(s, generator=generator) for s in shapes]
        overflow = with_found_inf and step % 5 == 3
        if overflow:
            grads[step % 3].view(-1)[0] = float("inf") if step % 2 else float("nan")
        for opt in (opt_ours, opt_theirs):
            opt.param_groups[0]["betas"] = (0.85 + 0.1 * step / 30, 0.999)
            opt.param_groups[0]["lr"] = 1e-2 * (1 - step / 40)
        for params in (ours, theirs):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        if not overflow:
            opt_theirs.step()
        if step == 0:
            opt_ours.step()  # creates the state, as a warm-up step does
            continue
        before = [(p.clone(), {k: v.clone() for k, v in opt_ours.state[p].items()}) for p in ours]
        group = opt_ours.param_groups[0]
        host = adam_step.AdamHostScalars(torch.device("cpu")).write(group)
        lr, betas = group["lr"], group["betas"]
        group["lr"] = torch.tensor(lr, dtype=torch.float64)
        group["betas"] = tuple(torch.tensor(b, dtype=torch.float64) for b in betas)
        found_inf = torch.tensor(float(overflow)) if with_found_inf else None
        adam_step.adam_step_on_device(opt_ours, adam_step.uniform_step_groups(opt_ours), [host], [],
                                      found_inf=found_inf)
        group["lr"], group["betas"] = lr, betas
        if overflow:
            for p, (value, state) in zip(ours, before):
                assert torch.equal(p, value)
                for key, tensor in state.items():
                    assert torch.equal(opt_ours.state[p][key], tensor), key
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours, theirs):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_ours.state[a][key], opt_theirs.state[b][key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [torch.optim.RAdam, torch.optim.NAdam])
def test_optimizers_whose_capturable_step_rounds_differently_are_named_once(cls):
    params = [torch.nn.Parameter(torch.randn(3))]
    warned = []
    GraphedStep(lambda: None, optimizers=[cls(params, lr=1e-2)], warn=lambda key, message: warned.append(message))
    (message,) = warned
    assert f"capturable {cls.__name__}" in message and "by rounding" in message


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adamax])
def test_optimizers_graphed_like_their_eager_step_say_nothing(cls):
    warned = []
    GraphedStep(lambda: None, optimizers=[cls([torch.nn.Parameter(torch.randn(3))], lr=1e-2)],
                warn=lambda key, message: warned.append(message))
    assert warned == []
