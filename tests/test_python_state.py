import pytest
import torch

from lightning_graphs.graphed_step import ignore_torch_attribute
from lightning_graphs.python_state import StateFingerprint, WatchedInt


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
