"""``GraphedStep`` in training loops as users write them, eager against graphed on
the CPU (``replaying_graph.ReplayingGraph`` replays only what was captured, none of
the step's Python, as a CUDA graph does)."""

from __future__ import annotations

import dataclasses
import functools
import gc
import types
import warnings

import numpy as np
import pytest
import torch

from lightning_graphs import GraphedStep, GraphWarning, optimizers
from replaying_graph import ReplayingGraph


@pytest.fixture
def replaying(graph_api_on_cpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)


def _weight():
    weight = torch.nn.Parameter(torch.ones(3))
    module = torch.nn.Module()
    module.weight = weight
    return weight, module


def _training_one_weight(make_optimizer, graphed, returned=lambda optimizer: None, **options):
    """A step training one weight with ``make_optimizer``'s optimizer and returning
    ``returned(optimizer)``: what runs it (graphed with ``options``, or as written), the
    weight, the optimizer."""
    weight, module = _weight()
    optimizer = make_optimizer([weight])

    def step(x):
        optimizer.zero_grad()
        (weight * x).sum().backward()
        optimizer.step()
        return returned(optimizer)

    run = GraphedStep(step, optimizers=[optimizer], modules=[module], device="cuda", **options) if graphed else step
    return run, weight, optimizer


def test_a_step_that_zeroes_the_gradients_after_stepping_adds_to_those_held_before(replaying):
    """Accumulation decided by an argument: each call adds to the gradients; every
    second one also steps and zeroes them at its end, so its graph reads the gradients
    the call before left, which another graph wrote."""

    def train(graphed):
        weight, module = _weight()
        optimizer = torch.optim.SGD([weight], lr=0.1)

        def step(x, take_step):
            (weight * x).sum().backward()
            if take_step:
                optimizer.step()
                optimizer.zero_grad()

        run = GraphedStep(step, optimizers=[optimizer], modules=[module], device="cuda") if graphed else step
        trace = []
        for index in range(12):
            run(torch.full((3,), float(index + 1)), index % 2 == 1)
            trace.append(weight.detach().clone())
        return trace, run

    eager, _ = train(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphWarning)
        graphed, run = train(True)
    for got, want in zip(graphed, eager):
        torch.testing.assert_close(got, want)
    assert run.stats.replays > 0, run.stats.summary()


@pytest.mark.parametrize("warmup_steps", [1, 3])
def test_an_optimizer_not_given_is_noticed_whatever_the_warm_up(replaying, warmup_steps):
    def train(graphed):
        weight, module = _weight()
        optimizer = torch.optim.SGD([weight], lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.1)

        def step(x):
            optimizer.zero_grad()
            (weight * x).sum().backward()
            optimizer.step()

        run = GraphedStep(step, modules=[module], warmup_steps=warmup_steps, device="cuda") if graphed else step
        trace = []
        for _ in range(9):
            run(torch.ones(3))
            scheduler.step()
            trace.append(float(weight.detach()[0]))
        return trace

    eager = train(False)
    with pytest.warns(GraphWarning, match="steps a SGD optimizer it was not given"):
        graphed = train(True)
    assert graphed == pytest.approx(eager, abs=1e-7)


@pytest.mark.parametrize("make_optimizer", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                            lambda p: torch.optim.AdamW(p, lr=0.1)], ids=["sgd-momentum", "adamw"])
def test_an_optimizer_state_cleared_between_calls_starts_afresh(replaying, make_optimizer):
    def train(graphed):
        run, weight, optimizer = _training_one_weight(make_optimizer, graphed)
        trace = []
        for index in range(12):
            if index == 7:
                optimizer.state.clear()  # a warm restart
            run(torch.full((3,), float(index % 4 + 1)))
            trace.append(float(weight.detach()[0]))
        return trace, run

    eager, _ = train(False)
    graphed, run = train(True)
    assert graphed == pytest.approx(eager, rel=1e-6, abs=1e-7)
    assert run.stats.replays > 0, run.stats.summary()


@dataclasses.dataclass
class Settings:
    scale: float = 1.0


def _set_scale(settings, value):
    if isinstance(settings, np.ndarray):
        settings[0] = value
    else:
        settings.scale = value


@pytest.mark.parametrize("make_settings", [lambda: types.SimpleNamespace(scale=1.0), Settings,
                                           lambda: np.array([1.0])], ids=["namespace", "dataclass", "numpy"])
def test_an_argument_object_changed_in_place_is_never_replayed_stale(replaying, make_settings):
    def train(graphed):
        weight, module = _weight()
        optimizer = torch.optim.SGD([weight], lr=0.1)

        def step(x, settings):
            scale = float(settings[0]) if isinstance(settings, np.ndarray) else settings.scale
            optimizer.zero_grad()
            (scale * weight * x).sum().backward()
            optimizer.step()

        run = GraphedStep(step, optimizers=[optimizer], modules=[module], device="cuda") if graphed else step
        settings, trace = make_settings(), []
        for index in range(12):
            if index in (6, 9):
                _set_scale(settings, float(index))
            run(torch.ones(3), settings)
            trace.append(float(weight.detach()[0]))
        return trace, run

    eager, _ = train(False)
    graphed, run = train(True)
    assert graphed == pytest.approx(eager, rel=1e-6)
    assert run.stats.replays >= 4 and run.stats.captures == 3, run.stats.summary()


def test_a_step_called_with_keyword_arguments(replaying):
    def train(graphed):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)

        def step(x, y, weight=1.0):
            optimizer.zero_grad()
            loss = weight * torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            return loss.detach()

        run = GraphedStep(step, optimizers=[optimizer], modules=[model], device="cuda") if graphed else step
        generator = torch.Generator().manual_seed(1)
        losses = [float(run(x=torch.randn(8, 4, generator=generator), y=torch.randn(8, 1, generator=generator),
                            weight=0.5 if index >= 6 else 1.0))
                  for index in range(10)]
        return losses, run

    eager, _ = train(False)
    graphed, run = train(True)
    assert graphed == pytest.approx(eager, rel=1e-6)
    assert run.stats.replays > 0, run.stats.summary()


def test_micro_steps_with_the_gradients_zeroed_between_cycles_name_the_fix(replaying):
    """A backward-only micro-step, the optimizer stepped and the gradients zeroed outside
    every second call: the call after each zeroing runs eagerly, and the warning says how
    to keep it graphed."""

    def train(graphed):
        weight, module = _weight()
        optimizer = torch.optim.SGD([weight], lr=0.1)

        def micro_step(x):
            (weight * x).sum().backward()

        run = GraphedStep(micro_step, modules=[module], device="cuda") if graphed else micro_step
        trace = []
        for index in range(10):
            run(torch.full((3,), float(index + 1)))
            if index % 2 == 1:
                optimizer.step()
                optimizer.zero_grad()
            trace.append(weight.detach().clone())
        return trace

    eager = train(False)
    with pytest.warns(GraphWarning, match="none are held now .zeroed between calls.. To accumulate over several "
                                          "calls, use one `GraphedStep` for the first call of each cycle"):
        graphed = train(True)
    for got, want in zip(graphed, eager):
        torch.testing.assert_close(got, want)


def test_gradients_one_optimizer_zeroes_and_another_accumulates_are_kept_apart(replaying):
    """Two optimizers: the step zeroes only the first one's gradients before its
    backward; the second one's build up over two calls and are zeroed outside. The
    graph must add to the second one's gradients as they are at each call."""

    def train(graphed):
        first, second = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        module = torch.nn.Module()
        module.first, module.second = first, second
        opt_first, opt_second = torch.optim.SGD([first], lr=0.1), torch.optim.SGD([second], lr=0.1)

        def step(x):
            opt_first.zero_grad()
            ((first * x).sum() + (second * x).sum() ** 2).backward()
            opt_first.step()
            opt_second.step()

        run = GraphedStep(step, optimizers=[opt_first, opt_second], modules=[module], device="cuda") \
            if graphed else step
        trace = []
        for index in range(16):
            run(torch.full((3,), 0.1 * (index % 3 + 1)))
            if index % 2 == 1:
                opt_second.zero_grad()
            trace.append(torch.cat([first.detach(), second.detach()]))
        return trace, run

    eager, _ = train(False)
    with pytest.warns(GraphWarning, match="none are held now"):
        graphed, run = train(True)
    for got, want in zip(graphed, eager):
        torch.testing.assert_close(got, want)
    assert run.stats.replays > 0, run.stats.summary()


class KeyedSettings:
    """Settings read as attributes from a dict it holds (a missing one raises KeyError)."""

    def __init__(self, **settings):
        self._settings = dict(settings)

    def __getattr__(self, name):
        return self._settings[name]


class LenientSettings:
    """Settings whose missing names read as None."""

    def __init__(self, **settings):
        self.__dict__.update(settings)

    def __getattr__(self, name):
        return None


def _nothing(settings, index):
    pass


def _at_six(change):
    def changed(settings, index):
        if index == 6:
            change(settings)
    return changed


_ARGUMENT_OBJECTS = {
    # name: (make, change before each call, what the step reads)
    "keyed settings": (lambda: KeyedSettings(scale=1.0), _nothing, lambda s: s.scale),
    "lenient settings": (lambda: LenientSettings(scale=1.0), _nothing, lambda s: s.scale),
    "a set changed": (lambda: {1.0}, _at_six(lambda s: s.add(2.0)), lambda s: sum(s)),
    "nested settings changed": (lambda: types.SimpleNamespace(loss=types.SimpleNamespace(scale=1.0)),
                                _at_six(lambda s: setattr(s.loss, "scale", 3.0)), lambda s: s.loss.scale),
    "a list attribute changed": (lambda: types.SimpleNamespace(scales=[1.0]),
                                 _at_six(lambda s: s.scales.__setitem__(0, 3.0)), lambda s: s.scales[0]),
    "an array attribute changed": (lambda: types.SimpleNamespace(scales=np.array([1.0])),
                                   _at_six(lambda s: s.scales.__setitem__(0, 3.0)), lambda s: float(s.scales[0])),
    "a large array": (lambda: np.ones(20000), _nothing, lambda s: float(s[0])),
    "a large array changed": (lambda: np.ones(20000), _at_six(lambda s: s.__setitem__(0, 3.0)),
                              lambda s: float(s[0])),
    "a large array attribute changed": (lambda: types.SimpleNamespace(scales=np.ones(20000)),
                                        _at_six(lambda s: s.scales.__setitem__(0, 3.0)), lambda s: float(s.scales[0])),
    "a NaN setting set again": (lambda: types.SimpleNamespace(scale=1.0, clip=float("nan")),
                                lambda s, i: setattr(s, "clip", float("nan")), lambda s: s.scale),
}


@pytest.mark.parametrize("case", list(_ARGUMENT_OBJECTS))
def test_argument_objects_of_many_kinds_are_replayed_while_unchanged_only(replaying, case):
    make, change, read = _ARGUMENT_OBJECTS[case]

    def train(graphed):
        weight, module = _weight()
        optimizer = torch.optim.SGD([weight], lr=0.1)

        def step(x, settings):
            optimizer.zero_grad()
            (float(read(settings)) * weight * x).sum().backward()
            optimizer.step()

        run = GraphedStep(step, optimizers=[optimizer], modules=[module], device="cuda") if graphed else step
        settings, trace = make(), []
        for index in range(12):
            change(settings, index)
            run(torch.ones(3), settings)
            trace.append(float(weight.detach()[0]))
        return trace, run

    eager, _ = train(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphWarning)
        graphed, run = train(True)
    assert graphed == pytest.approx(eager, rel=1e-6)
    assert run.stats.replays >= 4, run.stats.summary()


def test_a_metric_given_as_an_argument_is_replayed(replaying):
    torchmetrics = pytest.importorskip("torchmetrics")

    def train(graphed):
        weight, module = _weight()
        optimizer = torch.optim.SGD([weight], lr=0.1)
        metric = torchmetrics.MeanSquaredError()

        def step(x, y, metric):
            optimizer.zero_grad()
            loss = ((weight * x).sum() - y) ** 2
            loss.backward()
            optimizer.step()
            return loss.detach()

        run = GraphedStep(step, optimizers=[optimizer], modules=[module], device="cuda") if graphed else step
        return [float(run(torch.ones(3) * 0.1, torch.tensor(1.0), metric)) for _ in range(10)], run

    eager, _ = train(False)
    graphed, run = train(True)
    assert graphed == pytest.approx(eager, rel=1e-6)
    assert run.stats.replays > 0, run.stats.summary()


def test_a_call_by_keyword_never_takes_the_graph_of_a_call_by_position(replaying):
    def step(a, b=None):
        return a[0] * 2 if isinstance(a, tuple) else a + 3 * b

    run = GraphedStep(step, warmup_steps=1, device="cuda")
    x = torch.ones(2)
    for _ in range(3):
        torch.testing.assert_close(run((x,), {"b": x}), 2 * x)  # by position: a tuple and a dict
    for _ in range(3):
        torch.testing.assert_close(run(x, b=x), 4 * x)  # the same leaves, by keyword
    assert run.stats.captures == 2 and run.stats.replays == 2, run.stats.summary()


# -- what a simulation step holds: its settings, however the step is given ---------------------------------------


class Settings_:
    pass


class Drift:
    """A state advanced in place by ``dt`` times a velocity."""

    def __init__(self, settings):
        self.x = torch.zeros(4)
        self.v = torch.linspace(0.5, 2.0, 4)
        self.settings = settings

    def advance(self):
        self.x.add_(float(_dt(self.settings)) * self.v)

    __call__ = advance


class SlottedDrift:
    __slots__ = ("x", "v", "dt")

    def __init__(self):
        self.x, self.v, self.dt = torch.zeros(4), torch.linspace(0.5, 2.0, 4), 0.1

    def advance(self):
        self.x.add_(self.dt * self.v)


class ModuleDrift(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("x", torch.zeros(4))
        self.v, self.dt = torch.linspace(0.5, 2.0, 4), 0.1

    def forward(self):
        self.x.add_(self.dt * self.v)


def _dt(settings):
    return settings.dt


@dataclasses.dataclass(slots=True)
class SlottedSettings:
    dt: float = 0.1


def _namespace_watched():
    settings = types.SimpleNamespace(dt=0.1)
    sim = Drift(settings)
    return sim, sim.advance, dict(watch=[("settings", settings)]), lambda: setattr(settings, "dt", settings.dt / 2)


def _slotted_settings_watched():
    settings = SlottedSettings()
    sim = Drift(settings)
    return sim, sim.advance, dict(watch=[("settings", settings)]), lambda: setattr(settings, "dt", settings.dt / 2)


def _callable_object():
    sim = Drift(Settings_())
    sim.settings.dt = 0.1
    return sim, sim, {}, lambda: setattr(sim.settings, "dt", sim.settings.dt / 2)


def _partial():
    sim = Drift(Settings_())
    sim.settings.dt = 0.1
    step = functools.partial(lambda s: s.x.add_(s.settings.dt * s.v), sim)
    return sim, step, {}, lambda: setattr(sim.settings, "dt", sim.settings.dt / 2)


def _slotted_method():
    sim = SlottedDrift()
    return sim, sim.advance, {}, lambda: setattr(sim, "dt", sim.dt / 2)


def _module_called():
    sim = ModuleDrift()
    return sim, sim, {}, lambda: setattr(sim, "dt", sim.dt / 2)


SIMULATIONS = {
    "a namespace given to watch": _namespace_watched,
    "slotted settings given to watch": _slotted_settings_watched,
    "an object called as the step": _callable_object,
    "a functools.partial": _partial,
    "a method of a slotted class": _slotted_method,
    "a module called as the step": _module_called,
}


def simulate(setup, graphed, calls=10):
    """The simulation ``setup`` names, run ``calls`` times with its setting halved at calls 4
    and 7: the state after each call, and the runner."""
    sim, step, options, halve_dt = SIMULATIONS[setup]()
    run = GraphedStep(step, warmup_steps=1, device="cuda", **options) if graphed else step
    trace = []
    for index in range(calls):
        if index in (4, 7):
            halve_dt()
        run()
        trace.append(sim.x.clone())
    return trace, run


@pytest.mark.parametrize("setup", list(SIMULATIONS))
def test_a_simulation_setting_changed_between_calls_is_never_replayed_stale(replaying, setup):
    eager, _ = simulate(setup, graphed=False)
    graphed, run = simulate(setup, graphed=True)
    for got, want in zip(graphed, eager):
        torch.testing.assert_close(got, want)
    assert run.stats.replays >= 4, run.stats.summary()


class CountsInCall:
    def __init__(self):
        self.x, self.calls = torch.zeros(2), 0

    def __call__(self):
        self.x.add_(1.0)
        self.calls += 1  # Python a replay would not run


def test_an_object_called_as_the_step_counting_in_itself_runs_eagerly_with_one_warning(replaying):
    counter = CountsInCall()
    run = GraphedStep(counter, warmup_steps=1, device="cuda")
    with pytest.warns(GraphWarning, match="calls"):
        for _ in range(6):
            run()
    assert counter.calls == 6 and float(counter.x[0]) == 6.0


def test_a_step_that_logs_is_graphed_and_says_so_once(replaying):
    import logging

    logger = logging.getLogger("a_simulation_of_ones_own")
    weight, module = _weight()
    optimizer = torch.optim.SGD([weight], lr=0.1)

    def step(x):
        optimizer.zero_grad()
        (weight * x).sum().backward()
        optimizer.step()
        logger.warning("stepped")

    run = GraphedStep(step, optimizers=[optimizer], modules=[module], device="cuda")
    with pytest.warns(GraphWarning, match="logs with `logging` from inside the step") as caught:
        for _ in range(8):
            run(torch.ones(3))
    assert len([w for w in caught if issubclass(w.category, GraphWarning)]) == 1
    assert run.stats.replays == 4, run.stats.summary()


class LooksUpInADict:
    """A simulation whose missing attributes are looked up in a dict (a KeyError for unknown names)."""

    def __init__(self):
        self._fields = {"dt": 0.1}
        self.x = torch.zeros(3)

    def __getattr__(self, name):
        return self.__dict__["_fields"][name]

    def advance(self):
        self.x.add_(self.dt)


def test_a_step_bound_to_an_object_with_an_unusual_getattr_runs(replaying):
    sim = LooksUpInADict()
    run = GraphedStep(sim.advance, warmup_steps=1, device="cuda")
    for _ in range(5):
        run()
    torch.testing.assert_close(sim.x, torch.full((3,), 0.5))


class HoldsItself:
    """A simulation in a reference cycle (it holds itself): only the garbage collector frees it."""

    def __init__(self):
        self.x, self.me = torch.zeros(3), self
        self.run = GraphedStep(self.advance, warmup_steps=1, device="cuda")

    def advance(self):
        self.x.add_(1.0)


def test_a_graph_left_to_the_garbage_collector_is_not_released_inside_another_capture(replaying):
    x = torch.zeros(3)

    def step():
        if gc.isenabled():  # where the collector, when on, may run by itself: here, inside the capture
            gc.collect()
        x.add_(1.0)

    run = GraphedStep(step, warmup_steps=1, device="cuda")
    run()  # warmed up
    old = HoldsItself()
    for _ in range(3):
        old.run()
    assert old.run.stats.replays == 1, old.run.stats.summary()
    del old  # its graph waits for the collector
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphWarning)
        for _ in range(3):
            run()
    assert run.stats.captures == 1 and run.stats.replays == 2, run.stats.summary()
    torch.testing.assert_close(x, torch.full((3,), 4.0))


def _returning(make_optimizer, returned, graphed, calls=6):
    """Each call's outputs of a step that trains one weight and returns ``returned(optimizer)``."""
    run, _, _ = _training_one_weight(make_optimizer, graphed, returned)
    return [run(torch.ones(3)) for _ in range(calls)]


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.AdamW(params, lr=0.1),
    lambda params: torch.optim.AdamW(params, lr=np.float64(0.1)),  # (a learning rate from np.logspace, say)
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
], ids=["adamw", "a numpy learning rate", "sgd"])
def test_values_of_param_groups_the_step_returns_come_back_as_eager_returns_them(replaying, monkeypatch,
                                                                                 make_optimizer):
    # SGD as on a GPU: its fused kernel, reading the learning rate from a float32 tensor while captured
    monkeypatch.setattr(optimizers, "_is_dense_cuda_float", lambda optimizer: True)

    def returned(optimizer):
        lr = optimizer.param_groups[0]["lr"]
        return {"lr": lr, "more": [(lr / 3, "a string"), None]}

    eager = _returning(make_optimizer, returned, graphed=False)
    with pytest.warns(GraphWarning, match=r"returns `outputs\['lr'\]` as a Python number"):
        graphed = _returning(make_optimizer, returned, graphed=True)
    assert [(o["lr"], type(o["lr"]), o["more"][0][1:], o["more"][1:]) for o in graphed] == \
        [(o["lr"], type(o["lr"]), o["more"][0][1:], o["more"][1:]) for o in eager]
    # a value computed from the learning rate on the device: in its precision (float32 for fused SGD)
    assert [o["more"][0][0] for o in graphed] == pytest.approx([o["more"][0][0] for o in eager], rel=1e-6)


def test_a_number_returned_for_one_signature_leaves_a_tensor_returned_for_another_alone(replaying):
    def step(x, scale):
        return {"scaled": scale * 1 if isinstance(scale, torch.Tensor) else scale, "sum": x.sum()}

    run = GraphedStep(step, warmup_steps=2, device="cuda")
    scales = [torch.tensor([0.5]), 3, torch.tensor([float("nan")]), torch.tensor([0.5]), torch.tensor([0.5])]
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphWarning)
        returned = [run(torch.ones(3), scale)["scaled"] for scale in scales]
    assert [type(r) for r in returned] == [torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor]
    assert run.stats.replays == 2, run.stats.summary()


def test_a_value_computed_from_the_learning_rate_is_returned_as_eager_returns_it_whichever_warmed_up_last(replaying):
    def returned(optimizer):
        lr = optimizer.param_groups[0]["lr"]
        return {"double_lr": lr * 2, "as_tensor": torch.as_tensor(lr)}

    def trace(graphed):
        run, _, _ = _training_one_weight(lambda params: torch.optim.AdamW(params, lr=0.1), graphed, returned,
                                         warmup_steps=2)
        # the capture of the first shape comes right after a warm-up of the second
        return [run(torch.ones(n)) for n in (3, 3, 1, 3, 3, 3)]

    eager = trace(False)
    with pytest.warns(GraphWarning, match=r"returns `outputs\['double_lr'\]` as a Python number"):
        graphed = trace(True)
    assert [(o["double_lr"], type(o["double_lr"])) for o in graphed] == \
        [(o["double_lr"], type(o["double_lr"])) for o in eager]
    # a tensor made of the learning rate is a tensor eagerly too: left one (while captured, made of the
    # learning rate's float64 device tensor rather than of the float)
    assert all(isinstance(o["as_tensor"], torch.Tensor) for o in graphed)
    assert [float(o["as_tensor"]) for o in graphed] == pytest.approx([float(o["as_tensor"]) for o in eager])
