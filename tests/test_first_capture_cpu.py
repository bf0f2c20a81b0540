"""When GraphedStep captures for the first time, with CUDA's graph API stood in for on CPU.

Only the decisions are under test (warm-up, capture, replay): a stand-in graph
replays nothing, so the numbers are the GPU parity tests' business.
"""

import pytest
import torch

from graph_api_stand_ins import drive
from lightning_graphs import GraphedStep


def _drive(step, fn, count):
    """``count`` calls with one batch signature; the actions taken (W, C, R, E)."""
    return drive(step, fn, [((torch.ones(8, 3),), None)] * count)

def _finetuning():
    backbone, head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    backbone.requires_grad_(False)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    model = torch.nn.Sequential(backbone, head)

    def step_fn(x):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()

    return model, backbone, optimizer, step_fn


def test_warm_up_then_capture_then_replay(graph_api_on_cpu):
    model, _, optimizer, step_fn = _finetuning()
    step = GraphedStep(None, warmup_steps=2, optimizers=[optimizer], modules=[model], device="cuda")
    assert _drive(step, step_fn, 4) == "WWCR"


def test_a_layer_unfrozen_before_the_first_capture_gets_an_eager_step_first(graph_api_on_cpu):
    model, backbone, optimizer, step_fn = _finetuning()
    step = GraphedStep(None, warmup_steps=2, optimizers=[optimizer], modules=[model], device="cuda")
    assert _drive(step, step_fn, 2) == "WW"
    backbone.requires_grad_(True)  # as BackboneFinetuning does at an epoch start
    optimizer.add_param_group({"params": list(backbone.parameters())})
    assert _drive(step, step_fn, 3) == "WCR"
    # the eager step created the new parameters' state: the graph steps them from it
    assert optimizer.state[backbone.weight].get("momentum_buffer") is not None


def test_a_value_the_step_may_read_changed_outside_it_gets_a_new_capture(graph_api_on_cpu):
    model, _, optimizer, step_fn = _finetuning()
    model.temperature = 1.0
    step = GraphedStep(None, warmup_steps=1, optimizers=[optimizer], modules=[model], device="cuda")
    assert _drive(step, step_fn, 3) == "WCR"
    # bookkeeping outside the step: a private counter, a list of outputs; not baked into the graph
    model._seen = 3
    model.outputs = [1, 2]
    step.request_structure_check()
    assert _drive(step, step_fn, 1) == "R"
    model.temperature = 0.5  # as a callback annealing it at an epoch start would
    assert _drive(step, step_fn, 2) == "RR", "checked only where asked"
    step.request_structure_check()
    assert _drive(step, step_fn, 3) == "WCR"
    assert any("temperature" in reason for reason in step.stats.recaptures), step.stats.recaptures


def test_a_failed_capture_makes_every_step_sharing_the_pool_move_to_a_fresh_one(graph_api_on_cpu, monkeypatch):
    from lightning_graphs import graphed_step
    from lightning_graphs.graphed_step import SharedPool

    # the CUDA generator a real failed capture releases does not exist here
    monkeypatch.setattr(graphed_step, "_release_generator_after_failed_capture", lambda device: None)
    pool = SharedPool()
    model, _, optimizer, step_fn = _finetuning()
    training = GraphedStep(None, warmup_steps=1, optimizers=[optimizer], modules=[model], device="cuda", pool=pool)
    assert _drive(training, step_fn, 3) == "WCR"
    first = pool.handle()

    def fails_when_captured(x):
        raise RuntimeError("operation not permitted when stream is capturing")

    evaluation = GraphedStep(None, warmup_steps=1, modules=[model], device="cuda", pool=pool)
    plan = evaluation.plan((torch.ones(8, 3),))
    evaluation.warmup(lambda: None, plan)
    plan = evaluation.plan((torch.ones(8, 3),))
    with pytest.raises(graphed_step.CaptureFailed):
        evaluation.capture(plan, lambda static: fails_when_captured(*static))
    assert pool.generation == 1
    # the training step's graph lived in the abandoned pool: captured again, in the fresh one
    assert _drive(training, step_fn, 2) == "CR"
    assert training.stats.captures == 2


def test_a_tensor_attribute_replaced_outside_the_step_gets_a_new_capture(graph_api_on_cpu):
    model, _, optimizer, step_fn = _finetuning()
    model.scale = torch.ones(())
    step = GraphedStep(None, warmup_steps=1, optimizers=[optimizer], modules=[model], device="cuda")
    assert _drive(step, step_fn, 3) == "WCR"
    model.scale = torch.full((), 0.5)  # the graph would keep reading the old tensor
    step.request_structure_check()
    assert _drive(step, step_fn, 3) == "WCR"
    assert any("scale" in reason for reason in step.stats.recaptures), step.stats.recaptures


def test_a_capture_failing_midway_puts_back_the_requires_grad_flags_the_step_flipped(graph_api_on_cpu, monkeypatch):
    from lightning_graphs import graphed_step

    monkeypatch.setattr(graphed_step, "_release_generator_after_failed_capture", lambda device: None)
    model, backbone, optimizer, step_fn = _finetuning()
    head = model[1]

    def toggles_then_fails(x):
        head.requires_grad_(False)  # as toggle_optimizer does for the other network's parameters
        raise RuntimeError("operation not permitted when stream is capturing")

    step = GraphedStep(None, warmup_steps=1, optimizers=[optimizer], modules=[model], device="cuda")
    assert _drive(step, step_fn, 1) == "W"
    plan = step.plan((torch.ones(8, 3),))
    with pytest.raises(graphed_step.CaptureFailed):
        step.capture(plan, lambda static: toggles_then_fails(*static))
    assert all(p.requires_grad for p in head.parameters())
    assert not any(p.requires_grad for p in backbone.parameters())


def test_a_capture_that_cannot_be_ended_releases_the_generator_and_drops_the_graphs_held(graph_api_on_cpu,
                                                                                         monkeypatch):
    from graph_api_stand_ins import StandInGraph

    from lightning_graphs import graphed_step

    released = []
    monkeypatch.setattr(graphed_step, "_release_generator_after_failed_capture", released.append)
    model, _, optimizer, step_fn = _finetuning()
    step = GraphedStep(None, warmup_steps=1, optimizers=[optimizer], modules=[model], device="cuda")
    assert _drive(step, step_fn, 3) == "WCR"

    def fails_when_captured(x):
        raise RuntimeError("operation not permitted when stream is capturing")

    # a step failing inside a capture that ends cleanly (as a compile refusal does): the generator is fine
    plan = step.plan((torch.ones(5, 3),))
    step.warmup(lambda: step_fn(torch.ones(5, 3)), plan)
    plan = step.plan((torch.ones(5, 3),))
    with pytest.raises(graphed_step.CaptureFailed):
        step.capture(plan, lambda static: fails_when_captured(*static))
    assert released == [] and len(step.graphs) == 1
    # one whose capture cannot be ended (the error invalidated it): the generator may still believe it is
    # captured, and the fresh state it gets is not the one the graph held reads
    monkeypatch.setattr(StandInGraph, "capture_end", lambda self: (_ for _ in ()).throw(RuntimeError("invalidated")))
    plan = step.plan((torch.ones(5, 3),))
    with pytest.raises(graphed_step.CaptureFailed):
        step.capture(plan, lambda static: fails_when_captured(*static))
    assert len(released) == 1 and step.graphs == ()


def test_no_agreement_after_a_capture_leaves_the_optimizer_as_the_user_set_it(graph_api_on_cpu):
    model, _, _, _ = _finetuning()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step_fn(x):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()

    def other_rank_is_gone(outcome, explanation):
        raise TimeoutError("no answer from rank 1")

    step = GraphedStep(None, warmup_steps=1, optimizers=[optimizer], modules=[model], device="cuda",
                       agree_capture=other_rank_is_gone)
    assert _drive(step, step_fn, 1) == "W"
    plan = step.plan((torch.ones(8, 3),))
    with pytest.raises(TimeoutError):
        step.capture(plan, lambda static: step_fn(*static))
    group = optimizer.param_groups[0]
    assert isinstance(group["lr"], float) and isinstance(group["betas"][0], float)
    assert "step" not in optimizer.__dict__ and "zero_grad" not in optimizer.__dict__
