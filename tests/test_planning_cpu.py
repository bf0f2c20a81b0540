"""What GraphedStep decides, call by call, with CUDA's graph API stood in for on CPU.

Only the decisions are under test here (warm-up, capture, replay, eager; which graph;
evictions): a stand-in graph replays nothing, so the numbers are checked by the GPU
parity tests instead.
"""

import pytest
import torch

from lightning_graphs import GraphedStep, GraphWarning
from graph_api_stand_ins import drive as _drive
from lightning_graphs.graphed_step import Action, Phase


def _batches(sizes):
    return [((torch.ones(n, 3),), None) for n in sizes]


def _simulation():
    return lambda x: x * 2


def test_a_recurring_second_shape_is_warmed_up_then_captured(graph_api_on_cpu):
    step = GraphedStep(None, warmup_steps=3, device="cuda")
    actions = _drive(step, _simulation(), _batches([8, 8, 8, 8, 5, 5, 8, 5, 8]))
    assert actions == "WWWCWCRRR"
    assert step.stats.most_graphs_held == 2 and step.stats.captures == 2


def test_with_one_graph_other_shapes_run_eagerly(graph_api_on_cpu):
    step = GraphedStep(None, warmup_steps=3, max_graphs=1, device="cuda")
    actions = _drive(step, _simulation(), _batches([8, 8, 8, 8, 5, 5, 8]))
    assert actions == "WWWCEER"
    assert step.stats.eager_steps == 2


def test_a_ragged_batch_at_capture_time_is_not_the_one_captured(graph_api_on_cpu):
    step = GraphedStep(None, warmup_steps=2, max_graphs=1, device="cuda")
    actions = _drive(step, _simulation(), _batches([8, 8, 3, 8, 8]))
    assert actions == "WWWCR"  # the shape-3 batch was never warmed up: one more warm-up step
    assert step.graphs[0].signature.specs[0][0] == (8, 3)


def test_the_least_recently_replayed_shape_is_evicted_and_thrashing_ends_in_eager(graph_api_on_cpu):
    step = GraphedStep(None, warmup_steps=3, max_graphs=2, device="cuda")
    actions = _drive(step, _simulation(), _batches([8, 6, 4] * 4))
    # warm-ups see all three shapes; then each capture evicts a graph that was never replayed,
    # and after three such evictions new shapes run eagerly
    assert actions == "WWW" + "CCCCC" + "E" + "RRE"
    assert step.stats.evictions == 3 and step.stats.most_graphs_held == 2


def test_each_variant_gets_its_own_graph_and_max_graphs_counts_shapes(graph_api_on_cpu):
    step = GraphedStep(None, warmup_steps=3, max_graphs=1, device="cuda")
    cycle = [((torch.ones(8, 3),), variant) for variant in ("first", "middle", "last")]
    actions = _drive(step, _simulation(), cycle * 3)
    assert actions == "WWW" + "CCC" + "RRR"
    assert step.stats.most_graphs_held == 3 and step.stats.evictions == 0


def test_capture_waits_until_the_optimizer_has_stepped(graph_api_on_cpu):
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    calls = {"n": 0}

    def micro_step(x):  # steps the optimizer every fourth call, as accumulation over 4 does
        calls["n"] += 1
        model(x).sum().backward()
        if calls["n"] % 4 == 0:
            optimizer.step()
            optimizer.zero_grad()

    step = GraphedStep(None, warmup_steps=2, optimizers=[optimizer], modules=[model], device="cuda")
    actions = _drive(step, micro_step, _batches([8] * 6))
    assert actions.startswith("WWWW")  # two warm-ups asked for, more until the optimizer has state
    assert optimizer.state[model.weight].get("momentum_buffer") is not None


def test_an_accumulating_graph_does_not_take_over_a_missing_gradient(graph_api_on_cpu):
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    warm = {"up": True}

    def accumulate(x):  # adds to the gradients held; never zeroes them (steps once, in warm-up)
        model(x).sum().backward()
        if warm.pop("up", False):
            optimizer.step()

    step = GraphedStep(None, warmup_steps=1, optimizers=[optimizer], modules=[model], device="cuda")
    assert _drive(step, accumulate, _batches([8, 8, 8])) == "WCR"
    assert not step.graphs[0].replaces_grads
    model.bias.grad = None  # some batch left this parameter without a gradient
    assert step.plan((torch.ones(8, 3),)).action is Action.EAGER
    assert step.phase is Phase.CAPTURED


def test_parameters_added_before_the_first_capture_get_a_step_first(graph_api_on_cpu):
    backbone, head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    backbone.requires_grad_(False)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)

    def step_fn(x):
        optimizer.zero_grad()
        head(backbone(x)).sum().backward()
        optimizer.step()

    model = torch.nn.Sequential(backbone, head)
    step = GraphedStep(None, warmup_steps=2, optimizers=[optimizer], modules=[model], device="cuda")
    assert _drive(step, step_fn, _batches([8, 8])) == "WW"
    backbone.requires_grad_(True)  # unfrozen after warm-up, before any capture
    optimizer.add_param_group({"params": list(backbone.parameters())})
    assert _drive(step, step_fn, _batches([8, 8, 8])) == "WCR"
    assert optimizer.state[backbone.weight].get("momentum_buffer") is not None  # created eagerly


def test_an_optimizer_without_step_hooks_is_taken_on_trust(graph_api_on_cpu):
    class Plain:  # only looks like an optimizer: no torch hooks
        def __init__(self, params):
            self.param_groups = [{"params": list(params), "lr": 0.1}]
            self.state = {}
            self.defaults = {}

        def step(self, closure=None):
            for p in self.param_groups[0]["params"]:
                p.data -= 0.1 * p.grad

        def zero_grad(self, set_to_none=True):
            for p in self.param_groups[0]["params"]:
                p.grad = None

    model = torch.nn.Linear(3, 1)
    optimizer = Plain(model.parameters())

    def step_fn(x):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()

    step = GraphedStep(None, warmup_steps=2, optimizers=[optimizer], modules=[model], device="cuda")
    assert _drive(step, step_fn, _batches([8, 8, 8, 8])) == "WWCR"


def test_a_step_that_never_steps_its_optimizer_is_captured_in_the_end(graph_api_on_cpu):
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def forward_only(x):
        with torch.no_grad():
            return model(x)

    step = GraphedStep(None, warmup_steps=1, optimizers=[optimizer], modules=[model], device="cuda")
    actions = _drive(step, forward_only, _batches([8] * 70))
    assert "C" in actions and actions.endswith("R")


def test_a_draw_from_a_shared_generator_while_other_threads_run_names_them_too(graph_api_on_cpu):
    import threading

    import numpy as np

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step_fn(x):
        optimizer.zero_grad()
        (model(x).sum() * float(np.random.uniform())).backward()
        optimizer.step()

    release = threading.Event()
    other = threading.Thread(target=release.wait, daemon=True)  # (a logger's writer thread, say)
    other.start()
    try:
        step = GraphedStep(None, warmup_steps=2, optimizers=[optimizer], modules=[model], device="cuda")
        with pytest.warns(GraphWarning, match="another thread"):
            assert _drive(step, step_fn, _batches([8, 8, 8, 8])) == "WWEE"
    finally:
        release.set()
        other.join()
    reason = step.stats.disabled_reason
    assert "draws random numbers from NumPy's global generator" in reason, reason
    assert "another thread drew from NumPy's global generator" in reason, reason
