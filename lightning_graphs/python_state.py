"""Finding Python side effects in a step, which a graph replay would not repeat.

A replay re-runs the GPU work of the captured step and none of its Python. A step
that appends to a list, counts in an attribute, rebinds a tensor attribute or
branches on the batch index would silently diverge from eager training. These
helpers look for such effects while the step still runs eagerly (warm-up) and
while it is captured, so that the caller can fall back to eager execution and say
why.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

__all__ = ["StateFingerprint", "StepReads", "WatchedInt", "what_fn_reads"]

_PLAIN = (bool, int, complex, str, bytes, type(None))
_SIZED = (list, dict, set, frozenset, tuple, bytearray)


_DIGEST_DEPTH, _DIGEST_ITEMS = 4, 256
_UNCOMPARABLE = object()  # a container too big to compare at every check
_ABSENT = object()  # an attribute an object does not have


def _digest(value: Any) -> tuple[Any, Any] | object:
    """A container's contents as ``(values, sizes)``: ``values`` nests its plain
    values (a setting in ``self.hparams``, a loss weight in a dict), the identities
    of its tensors (a graph reads the tensor it was captured with) and of other
    objects; ``sizes`` nests the lengths of it and its inner containers, so that a
    list growing inside a dict tells apart from a value changing; containers nested
    deeper than a few levels by identity. ``_UNCOMPARABLE`` for a container too big
    to compare cheaply."""
    budget = [_DIGEST_ITEMS]

    def walk(item: Any, depth: int) -> tuple[Any, Any]:
        if isinstance(item, float) and math.isnan(item):
            return ("nan",), None
        if isinstance(item, (float, *_PLAIN)):
            return item, None
        if isinstance(item, torch.Tensor):
            return ("tensor", id(item)), None
        if not isinstance(item, _SIZED) or isinstance(item, bytearray):
            return ("object", id(item)), None
        if depth >= _DIGEST_DEPTH:
            return ("nested", id(item)), None  # deeper than settings go: by identity
        budget[0] -= len(item)
        if budget[0] < 0:
            raise OverflowError
        if isinstance(item, dict):
            pairs = [(walk(k, depth + 1), walk(v, depth + 1)) for k, v in item.items()]
            values = tuple((k[0], v[0]) for k, v in pairs)
            sizes = (len(item), tuple(v[1] for _, v in pairs))
        else:
            walked = [walk(v, depth + 1) for v in item]
            values = tuple(v for v, _ in walked)
            sizes = (len(item), tuple(size for _, size in walked))
        if isinstance(item, (set, frozenset)):
            return (type(item).__name__, frozenset(values)), len(item)
        return (type(item).__name__, values), sizes

    try:
        return walk(value, 0)
    except (OverflowError, TypeError):  # (TypeError: an unhashable value in a set's digest)
        return _UNCOMPARABLE


def _value_key(value: Any) -> tuple:
    """What about an attribute value must stay the same across a step."""
    if isinstance(value, float):
        return ("number", "nan" if math.isnan(value) else value, float)
    if isinstance(value, _PLAIN):
        return ("number", value, type(value))  # (1 and 1.0 and True are equal, yet a graph bakes in the type)
    if isinstance(value, _SIZED):
        return ("container", id(value), len(value), _digest(value))  # contents: (values, sizes)
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    # tensors included: in-place updates are replayed by the graph, rebinding is not
    return ("object", id(value))


def _describe(name: str, before: tuple, after: tuple | None, value: Any) -> str:
    if after is None:
        return f"deletes `{name}`"
    if before is None:
        return f"sets a new attribute `{name}`"
    if before[0] == "container" and after[0] == "container" and before[2] != after[2] and before[1] == after[1]:
        verb = "grows" if after[2] > before[2] else "shrinks"
        return f"{verb} `{name}` (a {type(value).__name__}: {before[2]} -> {after[2]} items)"
    if before[0] == "container" and after[0] == "container" and _UNCOMPARABLE not in (before[3], after[3]):
        if before[3][1] != after[3][1]:
            return f"changes the size of a container inside `{name}` (a {type(value).__name__})"
        how = "changes a value in" if before[1] == after[1] else "rebinds"
        return f"{how} `{name}` (a {type(value).__name__})"
    if before[0] == "number" and after[0] == "number":
        return f"changes `{name}` from {before[1]!r} to {after[1]!r}"
    if isinstance(value, torch.Tensor):
        return f"rebinds `{name}` to a new tensor"
    return f"rebinds `{name}`"


def _with_submodules(objects: Iterable[tuple[str, Any]]) -> Iterable[tuple[str, Any]]:
    """Each object, and for modules every submodule under a dotted label."""
    for label, obj in objects:
        if isinstance(obj, torch.nn.Module):
            for name, module in obj.named_modules():
                yield (f"{label}.{name}" if name else label), module
        else:
            yield label, obj


class StateFingerprint:
    """The Python-visible state of some objects (modules with all their submodules):
    each attribute's value (numbers), length (containers) or identity (everything
    else, tensors included), plus the identity of every parameter and buffer.

    ``ignore`` names attributes the framework itself manages (hooks, caches,
    ``training``), which are not the step's side effects.
    """

    def __init__(self, objects: Iterable[tuple[str, Any]], ignore: Callable[[Any, str], bool]) -> None:
        self._entries: dict[tuple[str, str], tuple] = {}
        self._objects: dict[str, Any] = {}
        for label, obj in _with_submodules(objects):
            self._objects[label] = obj
            attributes = getattr(obj, "__dict__", {})
            for name, value in list(attributes.items()):
                if ignore(obj, name):
                    continue
                self._entries[(label, name)] = _value_key(value)
            if isinstance(obj, torch.nn.Module):
                for kind in ("_parameters", "_buffers"):
                    for name, value in obj.__dict__.get(kind, {}).items():
                        self._entries[(label, name)] = ("slot", id(value))

    def changes(self, after: StateFingerprint, read_by_step_only: bool = False) -> list[str]:
        """Readable descriptions of what changed between this fingerprint and ``after``.

        ``read_by_step_only`` compares only what a captured step bakes in and code
        outside the step may change between steps: public attributes holding plain
        values (a temperature, a flag, a mode string) or tensors (a graph reads the
        tensor it was captured with, not one assigned later), containers of plain
        values and tensors whose values change at the same length
        (``self.hparams.beta`` annealed, a dict of loss weights, a state tensor in a
        dict replaced), and which tensors are registered as parameters and buffers.
        A private attribute behind a public property counts as public (Lightning's
        ``_hparams`` behind ``hparams``). Containers that grow or shrink or hold
        other objects, other private attributes and other objects are left out:
        outside the step they are bookkeeping (outputs collected in a
        hook) that a step seldom reads."""
        found = []
        for key in list(self._entries) + [k for k in after._entries if k not in self._entries]:
            before_key, after_key = self._entries.get(key), after._entries.get(key)
            if before_key == after_key:
                continue
            label, name = key
            obj = after._objects.get(label, self._objects.get(label))
            if read_by_step_only and not _read_by_step(obj, name, before_key, after_key):
                continue
            value = getattr(obj, name, None) if obj is not None else None
            if value is None and isinstance(obj, torch.nn.Module):
                value = obj._parameters.get(name, obj._buffers.get(name))
            if _behind_property(obj, name) and "container" in {before_key[0] if before_key else None,
                                                               after_key[0] if after_key else None}:
                name = name.lstrip("_")
            found.append(_describe(f"{label}.{name}" if label else name, before_key, after_key, value))
        return found


def _behind_property(obj: Any, name: str) -> bool:
    """A private attribute that a public property of the same name reads (``_hparams``)."""
    return name.startswith("_") and isinstance(getattr(type(obj), name.lstrip("_"), None), property)


def _read_by_step(obj: Any, name: str, before: tuple | None, after: tuple | None) -> bool:
    kinds = {entry[0] for entry in (before, after) if entry is not None}
    if "slot" in kinds:
        return True
    if kinds == {"container"} and before is not None and after is not None:
        if name.startswith("_") and not _behind_property(obj, name):
            return False
        # settings changed in place or rebound with new values; not a collection growing
        return (
            before[2] == after[2] and _UNCOMPARABLE not in (before[3], after[3])
            and before[3][1] == after[3][1] and before[3][0] != after[3][0]
        )
    return not name.startswith("_") and kinds <= {"number", "tensor"}


_INT_OPERATIONS = (
    "__eq__ __ne__ __lt__ __le__ __gt__ __ge__ __hash__ __bool__ __add__ __radd__ __sub__ __rsub__ __mul__ "
    "__rmul__ __mod__ __rmod__ __floordiv__ __rfloordiv__ __truediv__ __rtruediv__ __pow__ __rpow__ __divmod__ "
    "__rdivmod__ __and__ __rand__ __or__ __ror__ __xor__ __rxor__ __lshift__ __rlshift__ __rshift__ __rrshift__ "
    "__neg__ __pos__ __abs__ __invert__ __index__ __int__ __float__ __round__ __trunc__ __floor__ __ceil__ "
    "__str__ __repr__ __format__"
).split()


class WatchedInt(int):
    """An ``int`` that reports when the step reads it (compares, formats, does
    arithmetic with it). Passing it along untouched reports nothing.

    Used for ``batch_idx``: a step that branches on it, or logs it, takes a
    different path on every batch, which one captured graph cannot follow.
    """

    def __new__(cls, value: int, on_read: Callable[[], None]) -> WatchedInt:
        obj = super().__new__(cls, value)
        obj._on_read = on_read
        return obj

    def __reduce__(self) -> tuple:
        return (int, (int(self),))


def _watching(name: str) -> Callable:
    plain = getattr(int, name)

    def method(self: WatchedInt, *args: Any) -> Any:
        self._on_read()
        return plain(int.__int__(self), *args) if name != "__hash__" else plain(self)

    method.__name__ = name
    return method


for _name in _INT_OPERATIONS:
    setattr(WatchedInt, _name, _watching(_name))
del _name


class _ClosureVariables:
    """The variables a function closes over, as the attributes of an object (what
    :class:`~lightning_graphs.python_state.StateFingerprint` compares)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))

    @property
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override]
        values = {}
        for name, cell in self._cells.items():
            try:
                values[name] = cell.cell_contents
            except ValueError:  # a variable not bound yet
                continue
        return values

    def __copy__(self) -> _ClosureVariables:
        copy = object.__new__(_ClosureVariables)
        copy._cells = self._cells
        return copy

    def __deepcopy__(self, memo: dict) -> _ClosureVariables:
        return self.__copy__()  # a view of the same function's variables

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__ if not name.startswith("_") else {}
        if name in values:
            return values[name]
        raise AttributeError(name)


def what_fn_reads(fn: Callable[..., Any] | None) -> list[tuple[str, Any]]:
    """``(label, object)`` pairs for the object a bound-method step belongs to and for
    the variables a closure step closes over: Python state a replay bakes in."""
    found: list[tuple[str, Any]] = []
    owner = getattr(fn, "__self__", None)
    if owner is not None and not isinstance(owner, type) and hasattr(owner, "__dict__"):
        found.append(("self", owner))
    function = getattr(fn, "__func__", fn)
    if getattr(function, "__closure__", None):
        found.append((getattr(function, "__name__", "step"), _ClosureVariables(function)))
    return found


_UNTRACKED_PACKAGES = ("torch.", "torchmetrics.", "lightning.", "pytorch_lightning.", "lightning_graphs.")


class StepReads:
    """The attributes a captured step read (on the watched objects and their
    submodules, of classes outside PyTorch, Lightning and torchmetrics), with their
    values then; before every replay :meth:`changed` says whether code outside the
    step (a hook, a callback) has changed any of them since. A graph bakes in what
    the step read: a replay after such a change would use the old value.

    Reads are recorded only while capturing, by standing in for the classes'
    ``__getattribute__`` (put back at once); checking costs a dictionary lookup per
    attribute read."""

    def __init__(self, ignore: Callable[[Any, str], bool]) -> None:
        self._ignore = ignore
        self._read: dict[tuple[int, str], tuple[Any, str, tuple, Any]] = {}  # -> (obj, name, key, copy)

    def clear(self) -> None:
        self._read.clear()

    def recording(self, objects: Iterable[tuple[str, Any]]) -> Any:
        return _Recording(self, [obj for _, obj in _with_submodules(objects)])

    def _keep(self, obj: Any, name: str) -> None:
        value = obj.__dict__.get(name, _ABSENT) if isinstance(getattr(obj, "__dict__", None), dict) else _ABSENT
        if value is _ABSENT or self._ignore(obj, name):
            return
        key = _value_key(value)
        if key[0] not in ("number", "tensor", "container"):
            return
        # a container of plain values only (settings) is compared with a copy, at C speed
        copy = _plain_copy(value) if key[0] == "container" else _UNCOMPARABLE
        self._read[(id(obj), name)] = (obj, name, key, copy)

    def changed(self) -> str | None:
        """The first attribute the step read that holds another value now, described."""
        compared: set[int] = set()  # containers several modules read (a shared dict of settings): once each
        for obj, name, key, copy in self._read.values():
            value = obj.__dict__.get(name, _ABSENT)
            if copy is not _UNCOMPARABLE and id(value) == key[1]:
                if key[1] in compared:
                    continue
                if type(value) is type(copy) and value == copy:
                    compared.add(key[1])
                    continue
            now = _value_key(value) if value is not _ABSENT else None
            if now != key:
                shown = name.lstrip("_") if _behind_property(obj, name) else name
                return _describe(f"{type(obj).__name__}.{shown}", key, now, value)
        return None


def _plain_copy(value: Any, depth: int = 0) -> Any:
    """A deep copy of a container holding only plain values (a few levels deep), else ``_UNCOMPARABLE``."""
    if isinstance(value, (float, *_PLAIN)):
        return value
    if depth >= _DIGEST_DEPTH or not isinstance(value, (list, tuple, dict)) or len(value) > _DIGEST_ITEMS:
        return _UNCOMPARABLE
    if isinstance(value, dict):
        if not all(isinstance(k, (float, *_PLAIN)) for k in value):
            return _UNCOMPARABLE
        copy = {k: _plain_copy(v, depth + 1) for k, v in value.items()}
        parts = copy.values()
    else:
        copy = [_plain_copy(v, depth + 1) for v in value]
        parts = copy
    if any(part is _UNCOMPARABLE for part in parts):
        return _UNCOMPARABLE
    if type(value) in (list, dict):
        return copy
    try:
        return type(value)(copy)  # a tuple, or a subclass (Lightning's AttributeDict)
    except Exception:  # a container type that cannot be rebuilt from a plain one
        return _UNCOMPARABLE


def _not_traced(fn: Callable) -> Callable:
    """``fn`` as a function torch.compile leaves alone (compiled code may look up attributes through it)."""
    disable = getattr(getattr(torch, "_dynamo", None), "disable", None)
    return disable(fn) if disable is not None else fn


class _Recording:
    """Stands in for ``__getattribute__`` of the objects' classes while a step is captured."""

    def __init__(self, reads: StepReads, objects: list[Any]) -> None:
        self._reads = reads
        self._objects = {id(obj): obj for obj in objects}
        self._classes = []
        for obj in objects:
            cls = type(obj)
            if cls.__module__.startswith(_UNTRACKED_PACKAGES) or cls in self._classes:
                continue
            self._classes.append(cls)
        self._saved: list[tuple[type, Any]] = []

    def __enter__(self) -> _Recording:
        try:
            return self._install()
        except BaseException:
            self.__exit__()
            raise

    def _install(self) -> _Recording:
        objects, reads = self._objects, self._reads
        keeping = [False]  # while a read is kept: the reads that takes itself (a metric's `_defaults`) are not
        for cls in self._classes:
            own = cls.__dict__.get("__getattribute__", _ABSENT)
            inherited = cls.__getattribute__

            def recorded(obj: Any, name: str, _get: Any = inherited) -> Any:
                value = _get(obj, name)
                if not keeping[0] and id(obj) in objects and not name.startswith("__"):
                    keeping[0] = True
                    try:
                        reads._keep(obj, name)
                    finally:
                        keeping[0] = False
                return value

            try:
                cls.__getattribute__ = _not_traced(recorded)
            except Exception:  # a class that takes no new attributes: its reads go unrecorded
                continue
            self._saved.append((cls, own))
        # closure variables (no attribute access to watch): all of them are read
        for obj in self._objects.values():
            if isinstance(obj, _ClosureVariables):
                for name in obj.__dict__:
                    reads._keep(obj, name)
        return self

    def __exit__(self, *exc: Any) -> None:
        for cls, own in reversed(self._saved):
            if own is _ABSENT:
                del cls.__getattribute__
            else:
                cls.__getattribute__ = own
        self._saved = []
