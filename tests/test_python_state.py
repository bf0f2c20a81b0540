import collections.abc
import dataclasses
import types

import numpy as np
import pytest
import torch

from lightning_graphs.graphed_step import ignore_torch_attribute
from lightning_graphs.python_state import StateFingerprint, WatchedInt, framework_module


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)
        self.outputs = []
        self.count = 0
        self.last = None
        self.register_buffer("running", torch.zeros(2))


def _fp(net):
    return StateFingerprint([("self", net)], ignore_torch_attribute)


def test_a_step_without_side_effects_shows_no_change():
    net = Net()
    before = _fp(net)
    net.layer(torch.randn(3, 2)).sum().backward()
    net.running.add_(1)  # in-place tensor updates are replayed by the graph: fine
    net.train()
    assert before.changes(_fp(net)) == []


def test_appending_to_a_list_is_named():
    net = Net()
    before = _fp(net)
    net.outputs.append(1)
    (change,) = before.changes(_fp(net))
    assert "self.outputs" in change and "0 -> 1" in change


def test_counting_and_rebinding_are_named():
    net = Net()
    before = _fp(net)
    net.count += 1
    net.last = torch.ones(1)
    changes = before.changes(_fp(net))
    assert any("self.count" in c and "0 to 1" in c for c in changes)
    assert any("self.last" in c for c in changes)


def test_rebinding_a_buffer_is_named_but_updating_it_in_place_is_not():
    net = Net()
    before = _fp(net)
    net.running = net.running * 0.9
    (change,) = before.changes(_fp(net))
    assert "self.running" in change


def test_attributes_of_submodules_are_watched():
    net = Net()
    before = _fp(net)
    net.layer.cache = torch.ones(1)
    (change,) = before.changes(_fp(net))
    assert "self.layer.cache" in change


def test_watched_int_reports_reads_but_not_being_passed_along():
    reads = []
    index = WatchedInt(7, lambda: reads.append(1))
    holder = [index]
    assert holder[0] is index and reads == []
    assert index % 2 == 1
    assert len(reads) == 1
    assert f"{index}" == "7"
    assert index == 7 and index + 1 == 8 and not index < 3
    assert len(reads) == 5


def test_watched_int_behaves_as_an_int():
    index = WatchedInt(3, lambda: None)
    assert isinstance(index, int)
    assert [0, 1, 2, 3][index] == 3
    assert {3: "x"}[index] == "x"
    assert str(index) == "3" and repr(index) == "3"


# -- between steps: what code outside the step changed that a graph baked in -------------------------------------


class Settings(Net):
    def __init__(self):
        super().__init__()
        self.weights = {"mse": 1.0, "l2": [0.1, 0.2]}
        self.coefficients = [1.0, 2.0]
        self.tensors = [torch.zeros(1)]
        self._hparams = {"beta": 0.5}  # as Lightning keeps `hparams`

    @property
    def hparams(self):
        return self._hparams


def _outside(net, change):
    before = _fp(net)
    change(net)
    return before.changes(_fp(net), read_by_step_only=True)


def test_settings_changed_in_place_or_rebound_with_new_values_are_named():
    (change,) = _outside(Settings(), lambda net: net.weights["l2"].__setitem__(1, 0.3))
    assert "changes a value in `self.weights`" in change
    (change,) = _outside(Settings(), lambda net: setattr(net, "coefficients", [1.0, 3.0]))
    assert "rebinds `self.coefficients`" in change
    (change,) = _outside(Settings(), lambda net: net.hparams.__setitem__("beta", 0.75))
    assert "`self.hparams`" in change  # named as users write it
    (change,) = _outside(Settings(), lambda net: net.tensors.__setitem__(0, torch.ones(1)))  # a graph read the old one
    assert "changes a value in `self.tensors`" in change
    assert _outside(Settings(), lambda net: net.tensors[0].add_(1)) == []  # updated in place: the graph reads it


def test_collections_and_unchanged_settings_between_steps_are_not():
    assert _outside(Settings(), lambda net: net.outputs.append(0.5)) == []  # a hook collecting values
    assert _outside(Settings(), lambda net: setattr(net, "outputs", [])) == []
    assert _outside(Settings(), lambda net: setattr(net, "coefficients", [1.0, 2.0])) == []  # same values
    assert _outside(Settings(), lambda net: net.weights.__setitem__("new", 1.0)) == []  # no step read it before


def test_a_step_counting_in_a_dict_is_a_side_effect():
    net = Settings()
    before = _fp(net)
    net.weights["mse"] += 1
    (change,) = before.changes(_fp(net))
    assert "changes a value in `self.weights`" in change


def test_settings_are_compared_beside_none_objects_and_deep_nesting():
    net = Settings()
    net.hparams.update({"scheduler": None, "mode": torch.float32, "deep": {"a": {"b": {"c": {"d": [1]}}}}})
    (change,) = _outside(net, lambda n: n.hparams.__setitem__("beta", 0.75))
    assert "`self.hparams`" in change


def test_a_list_growing_inside_a_dict_is_bookkeeping_not_a_setting():
    net = Settings()
    net.history = {"val_loss": []}
    assert _outside(net, lambda n: n.history["val_loss"].append(0.5)) == []
    before = _fp(net)
    net.history["val_loss"].append(0.25)  # inside a step: a side effect all the same
    (change,) = before.changes(_fp(net))
    assert "changes the size of a container inside `self.history`" in change


def test_private_numbers_behind_properties_stay_private():
    class Counted(Net):
        @property
        def update_count(self):
            return self._update_count

    net = Counted()
    net._update_count = 0
    assert _outside(net, lambda n: setattr(n, "_update_count", 5)) == []  # (torchmetrics' counter)


# -- what a captured step read ---------------------------------------------------------------------------------


class Physics(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dt = 0.1
        self.unread = 1.0
        self.weights = {"a": 1.0}

    def forward(self, x):
        return x * self.dt * self.weights["a"]


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.physics = Physics()
        self.scale = 2.0

    def forward(self, x):
        return self.physics(x) * self.scale


def test_the_attributes_a_step_read_are_followed_and_no_others():
    from lightning_graphs.python_state import StepReads

    model = Wrapper()
    reads = StepReads(ignore_torch_attribute)
    with reads.recording([("model", model)]):
        model(torch.ones(2))
    assert reads.changed() is None
    model.physics.unread = 5.0  # never read by the step
    assert reads.changed() is None
    model.physics.weights["a"] = 3.0
    assert "Physics.weights" in reads.changed()
    model.physics.weights["a"] = 1.0
    model.scale = 4.0
    assert "changes `Wrapper.scale` from 2.0 to 4.0" in reads.changed()


def test_recording_puts_every_class_back_also_when_the_step_raises():
    from lightning_graphs.python_state import StepReads

    class OwnLookup(torch.nn.Module):
        def __getattribute__(self, name):
            return super().__getattribute__(name)

    model, own = Wrapper(), OwnLookup()
    reads = StepReads(ignore_torch_attribute)
    original = OwnLookup.__dict__["__getattribute__"]
    with pytest.raises(RuntimeError):
        with reads.recording([("model", model), ("own", own)]):
            raise RuntimeError("boom")
    assert "__getattribute__" not in Wrapper.__dict__ and "__getattribute__" not in Physics.__dict__
    assert OwnLookup.__dict__["__getattribute__"] is original


def test_a_setting_behind_a_property_is_followed():
    from lightning_graphs.python_state import StepReads

    class Annealed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self._weight = 0.5

        @property
        def weight(self):
            return self._weight

        def forward(self, x):
            return x * self.weight

    model = Annealed()
    reads = StepReads(ignore_torch_attribute)
    with reads.recording([("model", model)]):
        model(torch.ones(1))
    model._weight = 0.75
    assert "changes `Annealed.weight` from 0.5 to 0.75" in reads.changed()


def test_a_class_that_refuses_the_stand_in_leaves_no_other_class_patched():
    from lightning_graphs.python_state import StepReads

    class Refusing(type(torch.nn.Module)):
        def __setattr__(cls, name, value):
            if name == "__getattribute__":
                raise AttributeError("no")
            super().__setattr__(name, value)

    class Locked(torch.nn.Module, metaclass=Refusing):
        pass

    first, locked = Wrapper(), Locked()
    reads = StepReads(ignore_torch_attribute)
    with reads.recording([("first", first), ("locked", locked)]):
        first(torch.ones(2))  # recorded; the locked class is left as it is
    assert "__getattribute__" not in Wrapper.__dict__ and "__getattribute__" not in Locked.__dict__
    assert reads.changed() is None


# -- settings objects: dataclasses, namespaces, objects of the user's classes ------------------------------------------


@dataclasses.dataclass
class Options:
    noise: float = 0.1
    terms: dict = dataclasses.field(default_factory=lambda: {"l2": 0.5})
    steps: int = 0  # bookkeeping, never read by the step


class Configured(torch.nn.Module):
    def __init__(self, options):
        super().__init__()
        self.options = options
        self.extra = torch.ones(2)

    def forward(self, x):
        return x * self.options.noise + self.options.terms["l2"]


@pytest.mark.parametrize("change", ["field", "nested dict", "rebound", "tensor field rebound"])
def test_a_settings_object_the_step_read_is_followed_field_by_field(change):
    from lightning_graphs.python_state import StepReads

    options = Options()
    model = Configured(options)
    options.tensor = torch.zeros(1)
    reads = StepReads(ignore_torch_attribute)
    with reads.recording([("model", model)]):
        model(torch.ones(2)) + options.tensor
    assert "__getattribute__" not in Options.__dict__  # put back
    options.steps += 1  # a field the step never read
    assert reads.changed() is None
    if change == "field":
        options.noise = 0.2
        assert "changes `Options.noise` from 0.1 to 0.2" in reads.changed()
    elif change == "nested dict":
        options.terms["l2"] = 0.25
        assert "Options.terms" in reads.changed()
    elif change == "rebound":
        model.options = Options()
        assert "rebinds `Configured.options`" in reads.changed()
    else:
        options.tensor = torch.zeros(1)
        assert "Options.tensor" in reads.changed()


def test_a_namespace_whose_reads_cannot_be_recorded_is_compared_whole():
    from lightning_graphs.python_state import StepReads

    model = Configured(types.SimpleNamespace(noise=0.1, terms={"l2": 0.5}, steps=0))
    reads = StepReads(ignore_torch_attribute)
    with reads.recording([("model", model)]):
        model(torch.ones(2))
    assert reads.changed() is None
    model.options.noise = 0.3
    assert "changes a value in `Configured.options` (a SimpleNamespace)" in reads.changed()


def test_settings_objects_inside_containers_are_followed_too():
    from lightning_graphs.python_state import StepReads

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.settings = {"options": Options(), "array": np.ones(2), "fn": len}

        def forward(self, x):
            return x * self.settings["options"].noise

    model = Holder()
    reads = StepReads(ignore_torch_attribute)
    with reads.recording([("model", model)]):
        model(torch.ones(2))
    assert reads.changed() is None  # (a NumPy array and a function compared by identity)
    model.settings["options"].steps += 1  # never read by the step
    assert reads.changed() is None
    model.settings["options"].noise = 0.4
    assert "changes `Options.noise` from 0.1 to 0.4" in reads.changed()
    model.settings["options"].noise = 0.1
    model.settings["array"] = np.ones(2)
    assert "Holder.settings" in reads.changed()


def test_a_step_changing_a_settings_object_is_a_side_effect():
    class Ema:
        def __init__(self):
            self.updates = 0

    net = Net()
    net.ema = Ema()
    before = _fp(net)
    net.ema.updates += 1  # what a step counting in a helper object does
    assert any("`self.ema`" in change for change in before.changes(_fp(net)))


def _recorded(model, step):
    from lightning_graphs.python_state import StepReads

    reads = StepReads(ignore_torch_attribute)
    with reads.recording([("model", model)]):
        step()
    assert reads.changed() is None
    return reads


class Scaled(torch.nn.Module):
    temperature = 2.0  # a class attribute read through the object

    def forward(self, x):
        return x / self.temperature


@pytest.mark.parametrize("where", ["on the object", "on the class"])
def test_a_class_attribute_the_step_read_is_followed(where):
    model = Scaled()
    reads = _recorded(model, lambda: model(torch.ones(2)))
    try:
        if where == "on the object":
            model.temperature = 0.5
            assert "sets `Scaled.temperature`, which the step read from its class" in reads.changed()
        else:
            Scaled.temperature = 0.5
            assert "changes the class attribute `Scaled.temperature`" in reads.changed()
    finally:
        Scaled.temperature = 2.0


class Ema:
    def __init__(self, count):
        self.decay = 0.99
        self.shadow = {f"w{i}": torch.zeros(1) for i in range(count)}
        self.updates = 0


class HoldsHelpers(torch.nn.Module):
    def __init__(self, helper):
        super().__init__()
        self.helper = helper
        self.helpers = [helper]

    def forward(self, x):
        return x * self.helper.decay + x * self.helpers[0].decay


@pytest.mark.parametrize("shadow", [3, 1000])
def test_a_helper_is_followed_whatever_else_it_holds(shadow):
    model = HoldsHelpers(Ema(shadow))
    reads = _recorded(model, lambda: model(torch.ones(2)))
    model.helper.updates += 1  # bookkeeping the step never read, also through the list
    assert reads.changed() is None
    model.helper.decay = 0.999
    assert "changes `Ema.decay` from 0.99 to 0.999" in reads.changed()


def test_a_helper_with_a_thousand_weights_counting_in_the_step_is_a_side_effect():
    net = Net()
    net.ema = Ema(1000)
    before = _fp(net)
    net.ema.updates += 1
    assert any("`self.ema`" in change for change in before.changes(_fp(net)))


@dataclasses.dataclass(slots=True)
class SlotOptions:
    noise: float = 0.1


class Lean:
    __slots__ = ("margin",)

    def __init__(self):
        self.margin = 1.0


class ConfigMapping(collections.abc.Mapping):  # a config library's mapping
    def __init__(self, **values):
        self._values = values

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)


@pytest.mark.parametrize("make, read, change", [
    (SlotOptions, lambda o: o.noise, lambda o: setattr(o, "noise", 0.5)),
    (Lean, lambda o: o.margin, lambda o: setattr(o, "margin", 2.0)),
], ids=["a dataclass with slots", "a class with __slots__"])
def test_settings_objects_whose_reads_cannot_be_recorded_are_compared_whole(make, read, change):
    model = Configured(make())
    reads = _recorded(model, lambda: read(model.options))
    change(model.options)
    assert "changes a value in `Configured.options`" in reads.changed()


def test_a_settings_object_read_whole_is_compared_whole():
    options = Options()
    model = Configured(options)
    reads = _recorded(model, lambda: dict(vars(model.options)))
    options.steps += 1  # read too: `vars` handed the step every field
    assert "Options.__dict__" in reads.changed()


def test_a_settings_object_replaced_by_another_at_the_same_address_is_still_told_apart():
    model = Configured(Options())
    reads = _recorded(model, lambda: model(torch.ones(2)))
    for _ in range(3):  # the first object may be freed and its address reused: the reads hold it
        model.options = Options()
    assert "rebinds `Configured.options`" in reads.changed()


def test_a_config_mapping_is_compared_at_the_broad_checks_not_before_every_replay():
    # a config library's mapping can take a millisecond to list: only its identity before every replay
    model = Configured(ConfigMapping(noise=0.1))
    reads = _recorded(model, lambda: model.options["noise"])
    before = StateFingerprint([("model", model)], ignore_torch_attribute)
    model.options._values.update(noise=0.5)
    assert reads.changed() is None
    after = StateFingerprint([("model", model)], ignore_torch_attribute)
    assert "changes a value in `model.options` (a ConfigMapping)" in before.changes(after, read_by_step_only=True)
    model.options = ConfigMapping(noise=0.1)
    assert "rebinds `Configured.options`" in reads.changed()


def test_a_helper_a_hook_counts_in_is_not_taken_for_a_changed_setting_at_the_broad_checks():
    model = HoldsHelpers(Ema(3))
    before = StateFingerprint([("model", model)], ignore_torch_attribute)
    model.helper.updates += 1
    after = StateFingerprint([("model", model)], ignore_torch_attribute)
    assert before.changes(after, read_by_step_only=True) == []  # (what the step reads of it is followed)
    assert before.changes(after)  # a side effect, had the step done it


DAMPING = 0.5  # module-level data a step reads


def test_module_level_data_a_step_reads_is_followed_and_nothing_else():
    from lightning_graphs.python_state import StepReads, what_fn_reads

    unread = {"a": 1}

    def step():
        return torch.ones(2) * DAMPING + torch.zeros(2)  # (`torch`: a module, not data)

    watched = what_fn_reads(step)
    assert [sorted(vars(view)) for _, view in watched] == [["DAMPING"]]
    reads = StepReads(ignore_torch_attribute)
    with reads.recording(watched):
        step()
    unread["a"] = 2
    assert reads.changed() is None
    global DAMPING
    try:
        DAMPING = 0.25
        assert "changes `global DAMPING` from 0.5 to 0.25" in reads.changed()
    finally:
        DAMPING = 0.5


def test_a_container_too_big_to_compare_is_followed_by_identity_and_length():
    model = Configured(Options())
    model.table = list(range(1000))
    reads = _recorded(model, lambda: model.table[3])
    model.table[3] = -1  # (a change inside: too big to look for at every replay)
    assert reads.changed() is None
    model.table.append(0)
    assert "changes the length of `Configured.table`" in reads.changed()
    model.table = list(range(1000))
    assert "rebinds `Configured.table`" in reads.changed()


@pytest.mark.parametrize("name, theirs", [
    ("torch", True), ("torch.nn.modules.module", True), ("lightning", True), ("lightning.pytorch.loops", True),
    ("lightning_fabric.wrappers", True), ("torchmetrics", True), ("lightning_graphs.callback", True),
    ("torchvision", False), ("my_torch_models", False), ("__main__", False), (None, False),
])
def test_framework_modules_are_told_from_the_users(name, theirs):
    assert framework_module(name) is theirs


def test_draws_from_pytorchs_cpu_generators_are_host_draws():
    from lightning_graphs.python_state import host_random_draws, host_random_state

    class Augmenter:
        def __init__(self):
            self.generator = torch.Generator().manual_seed(0)

    augmenter = Augmenter()
    before = host_random_state([("aug", augmenter)])
    assert host_random_draws(before, host_random_state([("aug", augmenter)])) is None
    torch.rand(1)  # as `if torch.rand(1) < p:` decides an augmentation
    assert "PyTorch's CPU generator" in host_random_draws(before, host_random_state([("aug", augmenter)]))
    before = host_random_state([("aug", augmenter)])
    torch.randn(3, generator=augmenter.generator)
    assert host_random_draws(before, host_random_state([("aug", augmenter)])) == "the generator `aug.generator`"
