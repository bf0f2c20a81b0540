"""Static batch buffers.

A captured CUDA graph reads its inputs from fixed addresses. This module turns an
arbitrary batch (tensors nested in tuples, lists, dicts, namedtuples and
dataclasses, with non-tensor leaves allowed) into

* a :class:`BatchSignature`: the structure, each tensor's shape, dtype, device and
  ``requires_grad``, and the value of every non-tensor leaf. Two batches with equal
  signatures can share one graph; anything else must run eagerly.
* a :class:`StaticBatch`: graph-owned copies of the tensors, rebuilt into the
  batch's own structure, that later batches of the same signature are copied into.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch

from lightning_graphs.python_state import contents_key

__all__ = ["BatchSignature", "StaticBatch", "flatten", "signature_of", "describe_mismatch", "clone_tensors"]


class _Node:
    """One container in a flattened batch: its kind, type and child count (or keys).

    ``template`` keeps the original container so that the structure can be rebuilt
    (a ``defaultdict`` keeps its factory, a dataclass its non-field attributes); it
    takes no part in equality.
    """

    __slots__ = ("kind", "type", "keys", "children", "template")

    def __init__(self, kind: str, type_: type, keys: tuple, children: tuple, template: Any) -> None:
        self.kind = kind
        self.type = type_
        self.keys = keys
        self.children = children
        self.template = template

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Node)
            and self.kind == other.kind
            and self.type is other.type
            and self.keys == other.keys
            and self.children == other.children
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.type, self.keys, self.children))


_LEAF = None  # marks a leaf position in the tree


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def flatten(batch: Any) -> tuple[list[Any], Any]:
    """Split ``batch`` into its leaves (depth first) and a tree describing the containers."""
    leaves: list[Any] = []
    tree = _flatten_into(batch, leaves)
    return leaves, tree


def _flatten_into(value: Any, leaves: list[Any]) -> Any:
    if isinstance(value, torch.Tensor) or isinstance(value, (str, bytes)):
        leaves.append(value)
        return _LEAF
    if isinstance(value, Mapping):
        keys = tuple(value.keys())
        children = tuple(_flatten_into(value[k], leaves) for k in keys)
        return _Node("map", type(value), keys, children, value)
    if _is_namedtuple(value):
        children = tuple(_flatten_into(v, leaves) for v in value)
        return _Node("namedtuple", type(value), (), children, value)
    if isinstance(value, (tuple, list)):
        children = tuple(_flatten_into(v, leaves) for v in value)
        return _Node("seq", type(value), (), children, value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = tuple(f.name for f in dataclasses.fields(value))
        children = tuple(_flatten_into(getattr(value, n), leaves) for n in names)
        return _Node("dataclass", type(value), names, children, value)
    leaves.append(value)
    return _LEAF


def unflatten(tree: Any, leaves: list[Any]) -> Any:
    """Rebuild a batch of the structure ``tree`` around new ``leaves``."""
    it = iter(leaves)
    return _rebuild(tree, it)


def _rebuild(tree: Any, leaves: Iterator[Any]) -> Any:
    if tree is _LEAF:
        return next(leaves)
    values = [_rebuild(child, leaves) for child in tree.children]
    if tree.kind == "map":
        items = list(zip(tree.keys, values))
        template = tree.template
        if type(template) is dict:
            return dict(items)
        if hasattr(template, "default_factory"):  # defaultdict and its subclasses
            return type(template)(template.default_factory, items)
        try:
            return type(template)(items)
        except TypeError:
            return dict(items)
    if tree.kind == "namedtuple":
        return tree.type(*values)
    if tree.kind == "seq":
        return tree.type(values)
    # dataclass: a shallow copy keeps attributes outside the fields; frozen ones too
    rebuilt = copy.copy(tree.template)
    for name, value in zip(tree.keys, values):
        object.__setattr__(rebuilt, name, value)
    return rebuilt


_NOT_TAKEN = object()  # contents not taken yet


class _Value:
    """A non-tensor leaf compared by value; objects whose ``==`` is not a plain bool
    (NumPy arrays, for instance) are compared by identity. What an in-place change to
    the object would change (:func:`~lightning_graphs.python_state.contents_key`) is compared too: the same object
    changed since compares unequal, and the step is not replayed with what it read
    before. It is taken when first needed (comparing the same object), or when the
    signature is kept (:meth:`BatchSignature.keep_contents`), so that a batch of new
    objects costs nothing."""

    __slots__ = ("value", "_contents")

    def __init__(self, value: Any) -> None:
        self.value = value
        self._contents: Any = _NOT_TAKEN

    @property
    def contents(self) -> Any:
        if self._contents is _NOT_TAKEN:
            self._contents = contents_key(self.value)
        return self._contents

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Value):
            return False
        a, b = self.value, other.value
        if a is b:
            return self.contents == other.contents
        if type(a) is not type(b):
            return False
        if isinstance(a, float) and math.isnan(a) and math.isnan(b):
            return True
        try:
            equal = a == b
        except Exception:
            return False
        return equal if isinstance(equal, bool) else False

    def __hash__(self) -> int:  # only equality is used; keep the object hashable
        return hash(type(self.value))

    def __repr__(self) -> str:
        return repr(self.value)


_PLAIN_TYPES = (bool, int, float, complex, str, bytes, type(None))


def _leaf_spec(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        # strides and inference-ness too: a compiled step's guards check them, and the
        # static copy is made like the batch's own tensor
        return (tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad, leaf.layout,
                leaf.stride() if leaf.layout is torch.strided else None, leaf.is_inference())
    if type(leaf) in _PLAIN_TYPES and not (type(leaf) is float and math.isnan(leaf)):
        return (type(leaf), leaf)
    return _Value(leaf)


class BatchSignature:
    """What a graph captured for one batch must match: structure, tensor metadata and
    non-tensor values."""

    __slots__ = ("tree", "specs", "leaves")

    def __init__(self, tree: Any, specs: tuple, leaves: list[Any]) -> None:
        self.tree = tree
        self.specs = specs
        self.leaves = leaves  # the batch's own leaves, for copying in; not compared

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BatchSignature) and self.specs == other.specs and self.tree == other.tree

    __hash__ = None  # compared, never hashed: non-tensor leaves may be unhashable

    def keep_contents(self) -> None:
        """Take what can change in place in the non-tensor leaves now, before a step
        runs with them: a signature kept to compare later calls with must hold it as
        it was then."""
        for spec in self.specs:
            if isinstance(spec, _Value):
                spec.contents  # noqa: B018  (taken on first access)

    @property
    def tensor_positions(self) -> list[int]:
        return [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, torch.Tensor)]

    def unsupported_reason(self) -> str | None:
        """Why batches of this signature can never be copied into static buffers, if so."""
        for index, leaf in enumerate(self.leaves):
            if isinstance(leaf, torch.Tensor) and (leaf.layout is not torch.strided or leaf.is_nested):
                path = leaf_paths(self.tree)[index]  # only named when needed: building paths costs
                kind = "nested" if leaf.is_nested else str(leaf.layout)
                return f"{path} is a {kind} tensor; only dense (strided) tensors can be copied into a graph"
        return None


def signature_of(batch: Any) -> BatchSignature:
    leaves, tree = flatten(batch)
    return BatchSignature(tree, tuple(_leaf_spec(leaf) for leaf in leaves), leaves)


def leaf_paths(tree: Any, root: str = "batch") -> list[str]:
    """Readable paths of every leaf, in flattening order: ``batch['x']``, ``batch[1]``, ``batch.y``."""
    paths: list[str] = []

    def walk(node: Any, path: str) -> None:
        if node is _LEAF:
            paths.append(path)
        elif node.kind == "map":
            for key, child in zip(node.keys, node.children):
                walk(child, f"{path}[{key!r}]")
        elif node.kind == "dataclass":
            for name, child in zip(node.keys, node.children):
                walk(child, f"{path}.{name}")
        else:
            for index, child in enumerate(node.children):
                walk(child, f"{path}[{index}]")

    walk(tree, root)
    return paths


def _is_tensor_spec(spec: Any) -> bool:
    return isinstance(spec, tuple) and len(spec) == 7  # (see _leaf_spec)


def _describe_leaf(spec: Any, other: Any = None) -> str:
    if _is_tensor_spec(spec):
        shape, dtype, device, requires_grad, _, stride, inference = spec
        grad = ", requires_grad" if requires_grad else ""
        text = f"shape {tuple(shape)}, {str(dtype).replace('torch.', '')} on {device}{grad}"
        if _is_tensor_spec(other) and other[:5] == spec[:5]:
            if stride != other[5]:
                text += f", strides {stride}"
            if inference != other[6]:
                text += ", an inference tensor" if inference else ", not an inference tensor"
        return text
    if isinstance(spec, tuple):
        return f"value {spec[1]!r}"
    return f"value {spec!r}"


def differs_in_a_tensor(expected: BatchSignature, got: BatchSignature) -> bool:
    """Whether the first difference between two signatures is one of a tensor (its
    shape, say: a ragged last batch), not of a value that is not a tensor."""
    if expected.tree != got.tree:
        return False
    first = next(((a, b) for a, b in zip(expected.specs, got.specs) if a != b), None)
    return first is not None and _is_tensor_spec(first[0]) and _is_tensor_spec(first[1])


def describe_mismatch(expected: BatchSignature, got: BatchSignature, root: str = "batch",
                      expected_by: str = "the captured graph expects") -> str:
    """One sentence naming the first difference between two signatures (``expected_by``:
    who holds ``expected``)."""
    if expected.tree != got.tree:
        return f"{root} has a different structure than the captured one"
    for path, a, b in zip(leaf_paths(expected.tree, root), expected.specs, got.specs):
        if a != b:
            text = f"{path} has {_describe_leaf(b, a)}; {expected_by} {_describe_leaf(a, b)}"
            if not _is_tensor_spec(a) and not _is_tensor_spec(b):
                text += (
                    " (values that are not tensors are part of a batch's signature, as a graph replays the "
                    "captured ones: pass what changes from batch to batch as tensors)"
                )
            return text
    return f"{root} differs from the captured one"


class StaticBatch:
    """Graph-owned copies of a batch's tensors, in the batch's own structure.

    ``value`` is what the captured step is called with. :meth:`copy_from` writes the
    tensors of a later batch with the same signature into those copies in one
    launch, without allocating.
    """

    def __init__(self, signature: BatchSignature) -> None:
        self.signature = signature
        self._positions = signature.tensor_positions
        leaves = list(signature.leaves)
        with torch.no_grad():
            for i in self._positions:
                leaves[i] = _static_copy(leaves[i])
        # the tensors the graph reads; kept apart from `value` so that user code
        # rebinding fields of the batch object cannot detach them
        self.tensors: list[torch.Tensor] = [leaves[i] for i in self._positions]
        self._inference = any(t.is_inference() for t in self.tensors)
        self.value = unflatten(signature.tree, leaves)
        self.written: list[int] = []  # positions in `tensors` the captured step writes in place

    def copy_from(self, signature: BatchSignature) -> None:
        sources = [signature.leaves[i] for i in self._positions]
        if not sources:
            return
        # inference tensors are written in inference mode, wherever the call comes from
        with torch.inference_mode() if self._inference else torch.no_grad():
            torch._foreach_copy_(self.tensors, sources)

    def versions(self) -> list[int | None]:
        """The tensors' version counters (``None`` for inference tensors, which keep none)."""
        return [None if t.is_inference() else t._version for t in self.tensors]

    def note_written(self, before: list[int | None]) -> None:
        """Remember which tensors a step wrote in place since ``before`` (:meth:`versions`)."""
        self.written = [i for i, (t, version) in enumerate(zip(self.tensors, before))
                        if version is not None and t._version != version]

    def note_changed_contents(self) -> None:
        """After the captured step ran (its first replay): count as written the inference
        tensors whose values now differ from the batch's (their writes leave no version
        count to compare; a write that happens to leave this batch's values as they were
        goes unseen)."""
        sources = [self.signature.leaves[i] for i in self._positions]
        changed = [i for i, (t, source) in enumerate(zip(self.tensors, sources))
                   if t.is_inference() and i not in self.written and not torch.equal(t, source)]
        self.written = sorted(self.written + changed)

    def write_back_problem(self, root: str = "batch") -> str | None:
        """Why copying back what the step wrote could not leave the batch as eager
        training would, if so: the written tensor shares memory with another tensor
        of the batch (``(x, x)``), whose own copy the write would not reach, or
        within itself (an expanded view, which a write in place cannot change)."""
        sources = [self.signature.leaves[i] for i in self._positions]
        every_path = leaf_paths(self.signature.tree, root)
        paths = [every_path[i] for i in self._positions]
        # an inference tensor keeps no count of writes: it may have been written
        unknown = [i for i, t in enumerate(self.tensors) if t.is_inference() and i not in self.written]
        for i in self.written + unknown:
            written = "written in place" if i in self.written else \
                "which the step may write in place (an inference tensor keeps no count of its writes)"
            # (a write into an expanded tensor fails in the eager warm-up already, unless there is none)
            if i in self.written and torch._debug_has_internal_overlap(sources[i]) == 1:  # its elements share memory
                return f"{paths[i]}, {written}, is a view whose elements share memory (an expanded tensor)"
            for j, other in enumerate(sources):
                if j != i and _overlap(sources[i], other):
                    return f"{paths[i]}, {written}, shares memory with {paths[j]}"
        return None

    def copy_back(self, signature: BatchSignature) -> None:
        """Write what the step wrote into its inputs (``x.sub_(mean)``) back into the
        batch of ``signature``, as an eager step would have left it: hooks after the
        step see it, and a batch the loader hands out again (data kept on the GPU)
        stays what eager training would have made of it."""
        if not self.written:
            return
        with torch.inference_mode() if self._inference else torch.no_grad():
            torch._foreach_copy_([signature.leaves[self._positions[i]] for i in self.written],
                                 [self.tensors[i] for i in self.written])


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors use an element of memory in common (views of one tensor
    side by side, ``d[:, :8]`` and ``d[:, 8:]``, do not). Exact up to 4M elements,
    taken to overlap beyond, or where their element sizes differ."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.element_size() != b.element_size() or a.numel() + b.numel() > 1 << 22:
        return True
    return bool(torch.isin(_element_offsets(a), _element_offsets(b)).any())


def _element_offsets(t: torch.Tensor) -> torch.Tensor:
    """The storage offsets of ``t``'s elements (on the CPU)."""
    offsets = torch.tensor(t.storage_offset())
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size) * stride
    return offsets.reshape(-1)


def _static_copy(source: torch.Tensor) -> torch.Tensor:
    """A tensor of its own that looks to the step like ``source``: same strides (a
    strided view stays one) and an inference tensor exactly when ``source`` is one
    (evaluation loops run under ``torch.inference_mode()``), so that a compiled
    step's guards hold for both. The signature includes both properties, so later
    batches copied in are alike (and inference copies are only written in inference
    mode)."""
    requires_grad = source.requires_grad
    with torch.inference_mode(source.is_inference()), torch.no_grad():
        source = source.detach() if not source.is_inference() else source
        if source.layout is torch.strided and all(s > 0 or n <= 1 for s, n in zip(source.stride(), source.shape)):
            copy = torch.empty_strided(source.shape, source.stride(), dtype=source.dtype, device=source.device)
            try:
                copy.copy_(source)
            except RuntimeError:  # strides that overlap: a contiguous copy then
                copy = source.clone()
        else:
            copy = source.clone()
    return copy.requires_grad_(requires_grad)


def clone_tensors(value: Any, clone: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """A copy of ``value`` with every tensor replaced by a detached clone, so that it
    survives the next replay overwriting graph memory."""
    leaves, tree = flatten(value)
    if not any(isinstance(leaf, torch.Tensor) for leaf in leaves):
        return value
    clone = clone or (lambda t: t.detach().clone())
    return unflatten(tree, [clone(leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves])
