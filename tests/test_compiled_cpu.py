"""torch.compile and graph capture, on CPU: finding compiled parts and their modes,
compiling children for the user, and keeping compilation out of captures (with
CUDA's graph API stood in for, as in test_first_capture_cpu)."""

import pytest
import torch

from lightning_graphs import GraphedStep
from lightning_graphs.graphed_step import Action, CaptureDeferred, SharedPool
from lightning_graphs.compiled import (
    compile_children,
    compiled_parts,
    is_recompile_refusal,
    no_compilation,
    own_graphs,
)
from test_eval_graphs_cpu import cuda_on_cpu  # noqa: F401  (a fixture)
from test_first_capture_cpu import _drive


class Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = torch.nn.Linear(2, 2)
        self.wrapped = torch.compile(torch.nn.Linear(2, 2), mode="reduce-overhead")
        self.in_place = torch.nn.Linear(2, 2)
        self.in_place.compile()
        self.activation = torch.nn.GELU()
        self.helper = torch.compile(lambda x: x * 2)


def test_compiled_modules_and_functions_are_found_with_their_modes():
    found = dict(compiled_parts(Holder()))
    assert set(found) == {"wrapped", "in_place", "helper"}
    assert own_graphs(found["wrapped"])
    assert not own_graphs(found["in_place"]) and not own_graphs(found["helper"])
    for mode, graphs in [("max-autotune", True), ("max-autotune-no-cudagraphs", False), ("default", False)]:
        assert own_graphs(torch.compile(torch.nn.Linear(2, 2), mode=mode)) is graphs, mode
    assert own_graphs(torch.compile(torch.nn.Linear(2, 2), options={"triton.cudagraphs": True}))
    assert not own_graphs(torch.compile(torch.nn.Linear(2, 2), backend="eager"))


def test_children_with_parameters_are_compiled_and_put_back():
    holder = Holder()
    undo = compile_children(holder, {"backend": "eager"})
    assert "forward" in holder.plain.__dict__
    assert "forward" not in holder.activation.__dict__  # no parameters
    assert "forward" not in holder.in_place.__dict__  # compiled by the user already
    assert "plain.forward" in dict(compiled_parts(holder))
    torch.testing.assert_close(holder.plain(torch.ones(1, 2)), torch.nn.functional.linear(
        torch.ones(1, 2), holder.plain.weight, holder.plain.bias))
    undo()
    assert "forward" not in holder.plain.__dict__
    undo()  # twice is harmless


def test_a_guard_failing_inside_no_compilation_is_refused_not_compiled():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    compiled(torch.ones(3))
    with no_compilation():
        torch.testing.assert_close(compiled(torch.ones(3)), torch.full((3,), 2.0))  # guards hold
        with pytest.raises(Exception) as refused:
            compiled(torch.ones(5))
    assert is_recompile_refusal(refused.value)
    assert not is_recompile_refusal(RuntimeError("operation not permitted when stream is capturing"))
    torch.testing.assert_close(compiled(torch.ones(5)), torch.full((5,), 2.0))  # compiling is fine again


def test_capture_is_put_off_when_the_compiler_would_compile(graph_api_on_cpu, monkeypatch):
    from lightning_graphs import graphed_step

    released = []  # a refusal ends its capture cleanly: the generator, which graphs held read, stays
    monkeypatch.setattr(graphed_step, "_release_generator_after_failed_capture", released.append)
    torch._dynamo.reset()
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, backend="eager", dynamic=False)

    def step_fn(x):
        optimizer.zero_grad()
        compiled(x).sum().backward()
        optimizer.step()

    pool = SharedPool()
    step = GraphedStep(None, warmup_steps=1, optimizers=[optimizer], modules=[model], device="cuda", pool=pool)
    assert _drive(step, step_fn, 1) == "W"
    torch._dynamo.reset()  # the compiled code the warm-up made is gone: capturing would compile
    plan = step.plan((torch.ones(8, 3),))
    assert plan.action is Action.CAPTURE
    with pytest.raises(CaptureDeferred):
        step.capture(plan, lambda static: step_fn(*static))
    assert step.stats.deferred_captures == 1 and step.stats.captures == 0
    assert pool.generation == 0 and not released, "nothing reached CUDA: the shared pool and generator are kept"
    assert _drive(step, step_fn, 3) == "WCR"  # the warm-up compiles; the capture finds it compiled



def test_members_of_a_module_list_are_compiled_one_by_one():
    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
            self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 1)})

    model = Blocks()
    undo = compile_children(model, {"backend": "eager"})
    assert sorted(name for name, _ in compiled_parts(model)) == ["blocks.0.forward", "blocks.1.forward",
                                                                 "heads.a.forward"]
    undo()
    assert compiled_parts(model) == []


def test_a_compile_option_asking_for_graphs_of_its_own_is_refused():
    from lightning_graphs import CUDAGraphCallback

    for options in ({"mode": "reduce-overhead"}, {"mode": "max-autotune"}, {"options": {"triton.cudagraphs": True}}):
        with pytest.raises(ValueError, match="CUDA graphs of its own"):
            CUDAGraphCallback(compile=options)
    CUDAGraphCallback(compile={"mode": "max-autotune-no-cudagraphs"})
    CUDAGraphCallback(compile=True)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.out, self.scale = torch.nn.Linear(8, 32), torch.nn.Linear(32, 1), 0.5

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x))) * self.scale


@torch.compile(backend="eager", dynamic=False)
def _predict(model, x):
    return model.net(x) * model.gain


def _compiled_in_place():
    import models

    module = models.Regressor("adamw", None)
    module.net = _Net()
    module.net.compile(backend="eager", dynamic=False)
    return module


def _compiled_submodule():
    import models

    module = models.Regressor("adamw", None)
    module.net = torch.compile(_Net(), backend="eager", dynamic=False)
    return module


def _compiled_function_of_the_module():
    import models

    class Predicted(models.Regressor):
        def forward(self, x):
            return _predict(self, x)

    module = Predicted("adamw", None)
    module.net, module.gain = _Net(), 1.0
    return module


class _Options:
    def __init__(self):
        self.gain = 1.0


@torch.compile(backend="eager", dynamic=False)
def _predict_with_options(model, options, x):
    return model.net(x) * options.gain


def _compiled_function_reading_a_config_object():
    import models

    class Configured(models.Regressor):
        def forward(self, x):
            return _predict_with_options(self, self.options, x)  # (the step's reads of `options` are followed)

    module = Configured("adamw", None)
    module.net, module.options = _Net(), _Options()
    return module


@pytest.mark.parametrize("make_module", [_compiled_in_place, _compiled_submodule, _compiled_function_of_the_module,
                                         _compiled_function_reading_a_config_object])
def test_compiled_code_reading_the_modules_attributes_is_captured_once_compiled(cuda_on_cpu, make_module):
    # the capture records which attributes the step reads: compiled code must not take that for a change
    from parity import fit

    torch._dynamo.reset()
    run = fit(make_module, graphed=True, accelerator="cpu")
    stats = run.callback.stats
    assert stats.captures >= 1 and stats.replays > 0 and stats.disabled_reason is None, stats.summary()
