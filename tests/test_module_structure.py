"""What ModuleStructure notices of modules changed between two replays, and that it leaves no hook behind."""

import pytest
import torch
from torch.nn.modules import module as module_hooks

from lightning_graphs.module_structure import ModuleStructure


def _model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    model.register_buffer("shift", torch.zeros(1))
    return model


class Yours(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.zeros(1))


def _registration_hooks():
    # (PyTorch's registries of global registration hooks: private, but the only way to see that none is left)
    return len(module_hooks._global_parameter_registration_hooks), len(module_hooks._global_module_registration_hooks)


@pytest.mark.parametrize("change", [
    lambda model: model[0].requires_grad_(False),
    lambda model: model[1].eval(),
    lambda model: setattr(model[0], "weight", torch.nn.Parameter(torch.zeros(8, 4))),
    lambda model: setattr(model[0].weight, "data", torch.zeros(8, 4)),
    lambda model: setattr(model, "2", torch.nn.Linear(8, 1)),
    lambda model: model.half(),
    lambda model: setattr(model[1], "running_mean", torch.zeros(8)),
], ids=["requires_grad", "eval mode", "a parameter assigned anew", ".data assigned anew",
        "a submodule assigned anew", "another dtype", "a buffer of PyTorch's own module assigned anew"])
def test_a_change_between_replays_is_noticed(change):
    model = _model()
    structure = ModuleStructure([model])
    assert structure.change() is None
    change(model)
    assert structure.change() is not None
    structure.close()


def test_what_changes_nothing_the_graph_baked_in_is_not_a_change():
    model = _model()
    structure = ModuleStructure([model])
    with torch.no_grad():
        model[0].weight.add_(1)  # values change in place: the graph reads them afresh
        model.shift.fill_(2)
    model.train()  # the mode it already had
    model.shift = model.shift  # the same buffer again
    model[0].weight = model[0].weight  # the same parameter again
    yours = Yours()
    yours_structure = ModuleStructure([yours])
    yours.shift = torch.ones(1)  # a buffer of a module of your own: whether the step read it is for StepReads
    assert yours_structure.change() is None
    yours_structure.close()
    other = _model()
    other.register_buffer("elsewhere", torch.ones(1))  # another model's registrations
    assert structure.change() is None
    structure.close()


def test_closing_removes_the_global_hooks():
    before = _registration_hooks()
    structure = ModuleStructure([_model()])
    assert _registration_hooks() == tuple(n + 1 for n in before)  # (parameters and submodules)
    structure.close()
    assert _registration_hooks() == before


def test_a_graphed_step_removes_its_hooks_when_it_gives_up_graphs(graph_api_on_cpu):
    from lightning_graphs import GraphedStep, GraphWarning

    before = _registration_hooks()
    model = _model()
    step = GraphedStep(lambda x: model(x).sum(), warmup_steps=1, modules=[model], device="cuda")
    for _ in range(3):  # warm-up, capture, replay
        step(torch.ones(4, 4))
    assert step.stats.captures == 1 and _registration_hooks() != before
    with pytest.warns(GraphWarning, match="given up"):
        step.disable("given up")
    assert _registration_hooks() == before


def test_a_submodule_without_parameters_swapped_for_another_is_noticed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    structure = ModuleStructure([model])
    model[1] = torch.nn.Sigmoid()  # no parameters, no mode or attribute of its own that differs
    assert structure.change() == "submodule `1` was replaced or added"
    structure.close()


def test_a_submodule_deleted_then_another_assigned_is_noticed_though_it_may_reuse_the_id():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8))
    model.act = torch.nn.Tanh()
    structure = ModuleStructure([model])
    old = id(model.act)
    del model.act  # freed: a module made now may take its address
    model.act = torch.nn.Sigmoid()
    assert structure.differs(), f"ids {old} and {id(model.act)}"
    structure.close()
