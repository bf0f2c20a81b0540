from collections import OrderedDict, defaultdict, namedtuple
from dataclasses import dataclass, field

import pytest
import torch

from lightning_graphs.batches import (
    StaticBatch,
    clone_tensors,
    describe_mismatch,
    differs_in_a_tensor,
    flatten,
    signature_of,
    unflatten,
)

Pair = namedtuple("Pair", ["x", "y"])


@dataclass
class Sample:
    x: torch.Tensor
    names: list
    meta: dict = field(default_factory=dict)


def _batch(n=4, names=("a", "b")):
    return {
        "pair": Pair(torch.randn(n, 3), torch.arange(n)),
        "sample": Sample(torch.ones(n, 2), list(names), {"k": 1}),
        "seq": [torch.zeros(n), (torch.ones(1), None)],
        "flag": True,
    }


def test_flatten_unflatten_round_trip_keeps_every_container_type():
    batch = _batch()
    leaves, tree = flatten(batch)
    rebuilt = unflatten(tree, leaves)
    assert isinstance(rebuilt["pair"], Pair)
    assert isinstance(rebuilt["sample"], Sample)
    assert rebuilt["sample"].names == ["a", "b"]
    assert rebuilt["flag"] is True
    assert isinstance(rebuilt["seq"][1], tuple)
    assert rebuilt["seq"][1][1] is None
    torch.testing.assert_close(rebuilt["pair"].x, batch["pair"].x)


def test_defaultdict_and_ordered_dict_are_rebuilt_as_such():
    dd = defaultdict(list, {"x": torch.ones(2)})
    od = OrderedDict([("b", torch.ones(1)), ("a", torch.zeros(1))])
    leaves, tree = flatten({"dd": dd, "od": od})
    rebuilt = unflatten(tree, leaves)
    assert isinstance(rebuilt["dd"], defaultdict) and rebuilt["dd"].default_factory is list
    assert isinstance(rebuilt["od"], OrderedDict) and list(rebuilt["od"]) == ["b", "a"]


def test_signature_equal_for_same_shapes_and_values():
    assert signature_of(_batch()) == signature_of(_batch())


@pytest.mark.parametrize(
    "other",
    [
        lambda: _batch(n=3),  # ragged batch
        lambda: _batch(names=("a", "c")),  # a changed string leaf
        lambda: {**_batch(), "flag": False},  # a changed bool
        lambda: {**_batch(), "extra": torch.ones(1)},  # another structure
    ],
)
def test_signature_differs_on_shape_value_or_structure(other):
    assert signature_of(_batch()) != signature_of(other())


def test_signature_differs_on_dtype_and_requires_grad():
    x = torch.ones(2, 3)
    assert signature_of((x,)) != signature_of((x.double(),))
    assert signature_of((x,)) != signature_of((x.clone().requires_grad_(),))


def test_list_and_tuple_are_different_structures():
    x = torch.ones(2)
    assert signature_of([x, x]) != signature_of((x, x))


def test_int_and_bool_and_float_leaves_are_told_apart():
    assert signature_of((1,)) != signature_of((True,))
    assert signature_of((1,)) != signature_of((1.0,))
    assert signature_of((float("nan"),)) == signature_of((float("nan"),))


def test_numpy_leaf_compared_by_identity_not_elementwise():
    np = pytest.importorskip("numpy")
    a = np.arange(3)
    assert signature_of((a,)) == signature_of((a,))
    assert signature_of((a,)) != signature_of((a.copy(),))


def test_describe_mismatch_names_the_path_and_both_shapes():
    expected = signature_of({"x": torch.ones(32, 64), "y": torch.ones(32)})
    got = signature_of({"x": torch.ones(17, 64), "y": torch.ones(17)})
    message = describe_mismatch(expected, got)
    assert "batch['x']" in message
    assert "(17, 64)" in message and "(32, 64)" in message
    assert "not tensors" not in message


def test_describe_mismatch_names_a_changed_string_and_what_to_pass_instead():
    message = describe_mismatch(signature_of(_batch()), signature_of(_batch(names=("a", "z"))))
    assert "batch['sample'].names[1]" in message and "'z'" in message
    assert "pass what changes from batch to batch as tensors" in message


def test_static_batch_copies_in_place_without_new_storage():
    first = _batch()
    static = StaticBatch(signature_of(first))
    pointers = [t.data_ptr() for t in static.tensors]
    second = _batch()
    static.copy_from(signature_of(second))
    assert [t.data_ptr() for t in static.tensors] == pointers
    torch.testing.assert_close(static.value["pair"].x, second["pair"].x)
    torch.testing.assert_close(static.value["sample"].x, second["sample"].x)
    assert static.value["sample"].names == ["a", "b"]
    # the static copy is not the caller's tensor
    assert static.value["pair"].x.data_ptr() != second["pair"].x.data_ptr()


def test_static_batch_keeps_requires_grad_of_inputs():
    x = torch.randn(5, 2, requires_grad=True)
    static = StaticBatch(signature_of((x,)))
    assert static.value[0].requires_grad and static.value[0].is_leaf
    y = torch.randn(5, 2, requires_grad=True)
    static.copy_from(signature_of((y,)))
    torch.testing.assert_close(static.value[0].detach(), y.detach())


def test_sparse_tensor_is_reported_unsupported():
    sparse = torch.eye(3).to_sparse()
    reason = signature_of({"a": sparse}).unsupported_reason()
    assert reason is not None and "batch['a']" in reason


def test_clone_tensors_gives_independent_storage():
    value = {"loss": torch.ones(()), "extra": [torch.zeros(2), "text"]}
    cloned = clone_tensors(value)
    value["loss"].add_(1)
    assert cloned["loss"].item() == 1.0
    assert cloned["extra"][1] == "text"


def test_a_strided_view_keeps_its_strides_in_the_static_copy():
    # a compiled step guards on strides: the copy must look like the batch it stands in for
    base = torch.randn(6, 4, 3)
    view = base[:, :, 0]
    static = StaticBatch(signature_of((view,)))
    assert static.value[0].stride() == view.stride()
    torch.testing.assert_close(static.value[0], view)
    later = torch.randn(6, 4, 3)[:, :, 0]
    assert signature_of((later,)) == signature_of((view,))
    static.copy_from(signature_of((later,)))
    torch.testing.assert_close(static.value[0], later)
    assert signature_of((view.contiguous(),)) != signature_of((view,))


def test_an_expanded_batch_gets_a_contiguous_copy():
    expanded = torch.randn(1, 3).expand(4, 3)  # stride 0: one element stands for many
    static = StaticBatch(signature_of((expanded,)))
    torch.testing.assert_close(static.value[0], expanded)
    assert static.value[0].is_contiguous()


def test_a_ragged_batch_differs_in_a_tensor_and_another_id_does_not():
    full = signature_of(({"x": torch.ones(8, 3), "ids": [0, 1]},))
    ragged = signature_of(({"x": torch.ones(5, 3), "ids": [0, 1]},))
    other_ids = signature_of(({"x": torch.ones(8, 3), "ids": [2, 3]},))
    assert differs_in_a_tensor(full, ragged)
    assert not differs_in_a_tensor(full, other_ids)
    assert not differs_in_a_tensor(full, signature_of((torch.ones(8, 3),)))  # another structure
