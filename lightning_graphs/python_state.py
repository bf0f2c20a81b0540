"""Finding Python side effects in a step, which a graph replay would not repeat.

A replay re-runs the GPU work of the captured step and none of its Python. A step
that appends to a list, counts in an attribute, rebinds a tensor attribute or
branches on the batch index would silently diverge from eager training. These
helpers look for such effects while the step still runs eagerly (warm-up) and
while it is captured, so that the caller can fall back to eager execution and say
why.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import functools
import hashlib
import math
import random
import sys
import types
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "StateFingerprint", "StepReads", "WatchedInt", "what_fn_reads", "globals_fn_reads", "host_random_state",
    "host_random_draws", "framework_module", "functions_read", "contents_key", "users_code",
]

_PLAIN = (bool, int, complex, str, bytes, type(None))
_SIZED = (list, dict, set, frozenset, tuple, bytearray)


_DIGEST_DEPTH, _DIGEST_ITEMS = 4, 256
_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ())) | {"builtins"}
_STDLIB_SETTINGS = (types.SimpleNamespace, argparse.Namespace)  # Python's own classes that hold settings
_CONTAINERS = ("container", "settings")  # kinds of value keys compared by their contents
_UNCOMPARABLE = object()  # a container too big to compare at every check
_ABSENT = object()  # an attribute an object does not have
_UNTRACKED_PACKAGES = (
    "torch.", "torchmetrics.", "lightning.", "lightning_fabric.", "pytorch_lightning.", "lightning_graphs.",
)
_NOT_SETTINGS = (
    torch.Tensor, torch.nn.Module, torch.optim.Optimizer, type, types.ModuleType, types.FunctionType,
    types.MethodType, types.BuiltinFunctionType, types.BuiltinMethodType, functools.partial,
)


def framework_module(name: str | None) -> bool:
    """Whether the module named ``name`` belongs to PyTorch, Lightning, torchmetrics or this library."""
    name = name or ""
    return name.startswith(_UNTRACKED_PACKAGES) or f"{name}." in _UNTRACKED_PACKAGES


def _framework_class(cls: type) -> bool:
    """A class of PyTorch, Lightning, torchmetrics or this library: their objects'
    attributes are theirs to manage, never a step's settings."""
    return framework_module(cls.__module__)


def _settings_view(value: Any) -> dict | None:
    """The attributes of a settings object as a dict, else ``None``.

    A settings object holds values a step may read: a dataclass or namespace of
    options (``self.cfg.noise``), an object of the user's own class (a loss helper
    with a margin, an EMA helper with its decay), a mapping that is not a dict (a
    config library's). Modules, tensors, functions, classes and objects of PyTorch,
    Lightning and torchmetrics are not: they are watched, compared or managed apart;
    nor are Python's own objects but namespaces (a logger, a path), nor one with more
    attributes than a check can afford (all compared by identity).
    """
    cls = type(value)
    if isinstance(value, _NOT_SETTINGS) or _framework_class(cls):
        return None
    try:
        if (cls.__module__ or "").partition(".")[0] in _STDLIB and cls not in _STDLIB_SETTINGS:
            # numbers, strings and containers are compared as themselves; other objects of Python's own
            # library (a logger, a path, a lock) hold no settings of the step, and may cache as they are read
            return None
        if isinstance(value, collections.abc.Mapping):
            return dict(value.items()) if len(value) <= _DIGEST_ITEMS else None
        attributes = getattr(value, "__dict__", None)
        view = dict(attributes) if isinstance(attributes, dict) else {}
        for name in _slot_names(cls):
            slot = getattr(value, name, _ABSENT)
            if slot is not _ABSENT:
                view[name] = slot
        if not view and not isinstance(attributes, dict):
            return None
        return view if len(view) <= _DIGEST_ITEMS else None
    except Exception:  # a mapping that cannot list its items, an object refusing the look-up
        return None


@functools.lru_cache(maxsize=256)
def _slot_names(cls: type) -> tuple[str, ...]:
    """The ``__slots__`` of a class and its bases (a dataclass with ``slots=True``, a lean helper)."""
    names: list[str] = []
    for klass in cls.__mro__[:-1]:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and name not in names:
                names.append(name)
    return tuple(names)


_ARRAY_BYTES = 1 << 16  # NumPy arrays up to this size are compared by their values


def _array_key(value: Any) -> tuple | None:
    """A NumPy array's values as a key (``None`` for anything else): its bytes up to
    64 KiB, a digest of them beyond."""
    numpy = sys.modules.get("numpy")
    if numpy is None or not isinstance(value, numpy.ndarray):
        return None
    data = value.tobytes()
    if len(data) > _ARRAY_BYTES:
        data = hashlib.blake2b(data, digest_size=16).digest()
    return ("array", value.shape, str(value.dtype), data)


def contents_key(value: Any) -> Any:
    """What about a value passed to a step must stay the same for its graph to be
    replayed: :func:`_value_key` with the contents of settings objects, containers and
    NumPy arrays (larger ones by a digest), tensors by identity; ``None`` for an
    object of PyTorch, Lightning or torchmetrics (its own bookkeeping changes as it
    runs) or one that errs when looked at."""
    try:
        if _framework_class(type(value)):
            return None
        return _array_key(value) or _value_key(value, arrays_by_value=True)
    except Exception:
        return None


def _digest(value: Any, arrays_by_value: bool = False) -> tuple[Any, Any] | object:
    """A container's contents as ``(values, sizes)``: ``values`` nests its plain
    values (a setting in ``self.hparams``, a loss weight in a dict), the identities
    of its tensors (a graph reads the tensor it was captured with) and of other
    objects; ``sizes`` nests the lengths of it and its inner containers, so that a
    list growing inside a dict tells apart from a value changing; containers nested
    deeper than a few levels, and inner ones past the budget of items (an EMA
    helper's shadow weights beside its decay), by identity and length.
    ``_UNCOMPARABLE`` for a container itself too big to compare cheaply. NumPy arrays
    count by identity, or with ``arrays_by_value`` by their values (once per call, for
    what is passed to a step: too slow before every replay)."""
    budget = [_DIGEST_ITEMS]

    def walk(item: Any, depth: int) -> tuple[Any, Any]:
        if isinstance(item, float) and math.isnan(item):
            return ("nan",), None
        if isinstance(item, (float, *_PLAIN)):
            return item, None
        if isinstance(item, torch.Tensor):
            return ("tensor", id(item)), None
        array = _array_key(item) if arrays_by_value else None
        if array is not None:
            return array, None
        if not isinstance(item, _SIZED) or isinstance(item, bytearray):
            view = _settings_view(item)
            if view is None:
                return ("object", id(item)), None
            if depth >= _DIGEST_DEPTH:
                return ("nested", id(item)), None
            if depth > 0 and budget[0] < len(view):
                return ("big", id(item)), len(view)
            values, sizes = walk(view, depth)  # its attributes, as a dict at its own level
            return (type(item), id(item), values[1]), sizes
        if depth >= _DIGEST_DEPTH:
            return ("nested", id(item)), None  # deeper than settings go: by identity
        if budget[0] < len(item):
            if depth == 0:
                raise OverflowError
            return ("big", id(item)), len(item)  # an inner container past the budget: by identity and length
        budget[0] -= len(item)
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


def _value_key(value: Any, arrays_by_value: bool = False) -> tuple:
    """What about an attribute value must stay the same across a step (for NumPy
    arrays inside it, see :func:`_digest`)."""
    if isinstance(value, float):
        return ("number", "nan" if math.isnan(value) else value, float)
    if isinstance(value, _PLAIN):
        return ("number", value, type(value))  # (1 and 1.0 and True are equal, yet a graph bakes in the type)
    if isinstance(value, _SIZED):
        return ("container", id(value), len(value), _digest(value, arrays_by_value))  # contents: (values, sizes)
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    view = _settings_view(value)
    if view is not None:
        digest = _digest(value, arrays_by_value)
        if digest is not _UNCOMPARABLE:  # (one too big to compare: by identity, as any other object)
            # a mapping (a config library's) is compared as a container also at the broad checks; other settings
            # objects there only for the step's own side effects: before every replay, what the step read of
            # them is followed, and a helper's counter a hook keeps must not look like a changed setting
            kind = "container" if isinstance(value, collections.abc.Mapping) else "settings"
            return (kind, id(value), len(view), digest)
    # tensors included: in-place updates are replayed by the graph, rebinding is not
    return ("object", id(value))


def _describe(name: str, before: tuple, after: tuple | None, value: Any) -> str:
    if after is None:
        return f"deletes `{name}`"
    if before is None:
        return f"sets a new attribute `{name}`"
    if before[0] in _CONTAINERS and after[0] in _CONTAINERS and before[2] != after[2] and before[1] == after[1]:
        verb = "grows" if after[2] > before[2] else "shrinks"
        return f"{verb} `{name}` (a {type(value).__name__}: {before[2]} -> {after[2]} items)"
    if before[0] in _CONTAINERS and after[0] in _CONTAINERS and _UNCOMPARABLE not in (before[3], after[3]):
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
    """Each object, and for modules every submodule under a dotted label; for other
    objects (a callback, a closure's variables) also the modules of the user's own
    classes they hold (an EMA helper counting its updates), with their submodules."""
    seen: set[int] = set()

    def modules(label: str, root: torch.nn.Module) -> Iterable[tuple[str, Any]]:
        for name, module in root.named_modules():
            if id(module) not in seen:
                seen.add(id(module))
                yield (f"{label}.{name}" if name else label), module

    for label, obj in objects:
        if isinstance(obj, torch.nn.Module):
            yield from modules(label, obj)
            continue
        yield label, obj
        for name, value in _attributes(obj).items():
            if isinstance(value, torch.nn.Module) and not _framework_class(type(value)):
                yield from modules(f"{label}.{name}", value)


def _attributes(obj: Any) -> dict[str, Any]:
    """A copy of ``obj``'s instance attributes, or ``{}`` where it has none (or its ``__dict__`` raises)."""
    try:
        return dict(vars(obj))
    except Exception:  # no __dict__, or one that raises
        return {}


def _instance_values(obj: Any) -> dict[str, Any]:
    """An object's instance attributes, in its ``__dict__`` and its ``__slots__``."""
    values = _attributes(obj)
    if not isinstance(obj, _VariablesView):
        for name in _slot_names(type(obj)):
            value = getattr(obj, name, _ABSENT)
            if value is not _ABSENT:
                values[name] = value
    return values


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
            for name, value in _instance_values(obj).items():
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
            value = (obj._values().get(name) if isinstance(obj, _VariablesView)
                     else getattr(obj, name, None) if obj is not None else None)
            if value is None and isinstance(obj, torch.nn.Module):
                value = obj._parameters.get(name, obj._buffers.get(name))
            if _behind_property(obj, name) and {before_key[0] if before_key else None,
                                                after_key[0] if after_key else None} & set(_CONTAINERS):
                name = name.lstrip("_")
            if isinstance(obj, _VariablesView):
                shown = f"{obj._view_label} {name}"
            else:
                shown = f"{label}.{name}" if label else name
            found.append(_describe(shown, before_key, after_key, value))
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
            and before[3][1] == after[3][1] and _by_identity(before[3][0]) != _by_identity(after[3][0])
        )
    return not name.startswith("_") and kinds <= {"number", "tensor"}


def _by_identity(values: Any) -> Any:
    """A digest's values with the settings objects in it (other than mappings) reduced
    to their identity: what the step reads of those is followed before every replay,
    and a counter a hook keeps in a helper held in a list is not a changed setting."""
    if isinstance(values, tuple):
        if len(values) == 3 and isinstance(values[0], type):
            if not issubclass(values[0], collections.abc.Mapping):
                return ("settings", values[1])
        return tuple(_by_identity(v) for v in values)
    return values


def host_random_state(objects: Iterable[tuple[str, Any]] = ()) -> tuple:
    """The state of the host random generators a step might draw from: Python's
    ``random`` module, NumPy's global generator (when NumPy is loaded), PyTorch's CPU
    generator (``torch.rand(1)`` without a CUDA device), and the generator objects the
    ``objects`` (and their submodules) hold as attributes (a ``np.random.default_rng()``,
    a ``random.Random``, a CPU ``torch.Generator``)."""
    numpy = sys.modules.get("numpy")
    numpy_state = None
    if numpy is not None:
        try:
            name, keys, position, has_gauss, gauss = numpy.random.get_state(legacy=True)
            numpy_state = (name, keys.tobytes(), position, has_gauss, gauss)
        except Exception:  # a NumPy whose global generator cannot report its state
            numpy_state = None
    generators = []
    for label, obj in _with_submodules(objects):
        if _framework_class(type(obj)) and not isinstance(obj, _VariablesView):
            continue  # (PyTorch's and Lightning's own modules hold none of the user's generators)
        try:
            attributes = dict(obj.__dict__)
        except Exception:  # an object without attributes to look at
            continue
        for name, value in attributes.items():
            state = _generator_state(value, numpy)
            if state is not None:
                views = isinstance(obj, _VariablesView)
                generators.append((f"{obj._view_label} {name}" if views else f"{label}.{name}", state))
    return random.getstate(), numpy_state, tuple(generators), _torch_cpu_state(torch.default_generator)


def _torch_cpu_state(generator: torch.Generator) -> bytes:
    """A CPU ``torch.Generator``'s state, comparable with ``==``."""
    state = generator.get_state()
    try:
        return state.numpy().tobytes()
    except (RuntimeError, TypeError):  # PyTorch without NumPy
        return bytes(state.tolist())


def _generator_state(value: Any, numpy: Any) -> Any:
    """A host random generator's state, comparable with ``==``; ``None`` for anything else."""
    if isinstance(value, random.Random):
        return value.getstate()
    if isinstance(value, torch.Generator) and value.device.type == "cpu":
        return _torch_cpu_state(value)
    if numpy is None:
        return None
    try:
        if isinstance(value, numpy.random.Generator):
            return _frozen(value.bit_generator.state, numpy)
        if isinstance(value, numpy.random.RandomState):
            return _frozen(value.get_state(legacy=True), numpy)
    except Exception:  # a generator that cannot report its state
        return None
    return None


def _frozen(state: Any, numpy: Any) -> Any:
    if isinstance(state, dict):
        return tuple((key, _frozen(item, numpy)) for key, item in state.items())
    if isinstance(state, (list, tuple)):
        return tuple(_frozen(item, numpy) for item in state)
    if isinstance(state, numpy.ndarray):
        return state.tobytes()
    return state


def host_random_draws(before: tuple, after: tuple) -> str | None:
    """Which host generator a step drew from between two :func:`host_random_state`, if any."""
    if before[0] != after[0]:
        return "Python's `random` module"
    if before[1] != after[1]:
        return "NumPy's global generator (`np.random`)"
    if before[3] != after[3]:
        return "PyTorch's CPU generator (`torch.rand` and the like without a CUDA `device=`)"
    drawn = dict(after[2])
    for label, state in before[2]:
        if drawn.get(label, state) != state:
            return f"the generator `{label}`"
    return None


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


class _VariablesView:
    """Variables a function reads, as the attributes of an object (what
    :class:`StateFingerprint` and :class:`StepReads` compare); a copy is a view of
    the same variables."""

    _view_label = "variable"

    def __init__(self, source: Any) -> None:
        self._source = source

    def _values(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override]
        return self._values()

    def __copy__(self) -> _VariablesView:
        return type(self)(self._source)

    def __deepcopy__(self, memo: dict) -> _VariablesView:
        return self.__copy__()

    def __getattr__(self, name: str) -> Any:
        values = self._values() if not name.startswith("_") else {}
        if name in values:
            return values[name]
        raise AttributeError(name)


class _ClosureVariables(_VariablesView):
    """The variables a function closes over."""

    _view_label = "closure variable"

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> _ClosureVariables:
        return cls(dict(zip(fn.__code__.co_freevars, fn.__closure__ or ())))

    def _values(self) -> dict[str, Any]:
        values = {}
        for name, cell in self._source.items():
            try:
                values[name] = cell.cell_contents
            except ValueError:  # a variable not bound yet
                continue
        return values


class _GlobalVariables(_VariablesView):
    """The module-level variables a function reads that hold data (numbers, strings,
    tensors, containers, settings objects; not modules, functions or classes): a
    global config dict a callback changes is a value the step read. Followed into
    the functions of the user's own modules it calls, its own methods it calls on
    ``self``, and attributes of the user's own modules it reads (``config.NOISE``)."""

    _view_label = "global"

    @classmethod
    def of(cls, functions: Iterable[tuple[Callable[..., Any], type | None]]) -> _GlobalVariables:
        """What the ``(function, owner)`` pairs read, the first ones first when there is too much to look at."""
        found: dict[str, tuple[dict, str]] = {}
        seen: set = set()
        for fn, owner in functions:
            _scan_globals(fn, owner, found, seen, depth=0)
        return cls(tuple((shown, namespace, name) for shown, (namespace, name) in sorted(found.items())))

    def _values(self) -> dict[str, Any]:
        return {shown: namespace[name] for shown, namespace, name in self._source if name in namespace}


_SCAN_DEPTH, _SCAN_FUNCTIONS = 3, 32  # how far into the functions a step calls its globals are looked for


def _scan_globals(fn: Any, owner: type | None, found: dict, seen: set, depth: int) -> None:
    """Add to ``found`` (shown name -> (namespace, name)) the module-level data ``fn``
    reads, and recurse into the user's own functions and methods it calls."""
    import dis

    fn = _unwrapped(fn)
    code, namespace = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
    if not isinstance(code, types.CodeType) or not isinstance(namespace, dict) or code in seen:
        return
    if len(seen) >= _SCAN_FUNCTIONS:
        return
    seen.add(code)
    self_name = code.co_varnames[0] if code.co_argcount and owner is not None else None
    for each in _code_objects(code):
        instructions = list(dis.get_instructions(each))
        for index, instruction in enumerate(instructions):
            following = instructions[index + 1] if index + 1 < len(instructions) else None
            attribute = following.argval if following is not None and following.opname in (
                "LOAD_ATTR", "LOAD_METHOD") and isinstance(following.argval, str) else None
            if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(instruction.argval, str):
                name = instruction.argval
                value = namespace.get(name, _ABSENT)
                if _holds_data(value):
                    found.setdefault(name, (namespace, name))
                elif isinstance(value, types.ModuleType) and attribute is not None and _users_module(value):
                    inner = value.__dict__.get(attribute, _ABSENT)
                    if _holds_data(inner):
                        found.setdefault(f"{value.__name__}.{attribute}", (value.__dict__, attribute))
                    elif depth < _SCAN_DEPTH and _users_function(inner):
                        _scan_globals(inner, None, found, seen, depth + 1)
                elif depth < _SCAN_DEPTH and _users_function(value):
                    _scan_globals(value, None, found, seen, depth + 1)
            elif (instruction.opname == "LOAD_FAST" and instruction.argval == self_name and attribute is not None
                  and depth < _SCAN_DEPTH):
                method = _class_function(owner, attribute)
                if method is not None:
                    _scan_globals(method, owner, found, seen, depth + 1)


def _code_objects(code: types.CodeType) -> list[types.CodeType]:
    """A code object and the functions and comprehensions inside it."""
    found = [code]
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            found += _code_objects(constant)
    return found


def _unwrapped(fn: Any) -> Any:
    """The function under decorators, ``functools.partial`` and ``torch.compile``."""
    for _ in range(8):
        inner = (getattr(fn, "__wrapped__", None) or getattr(fn, "_torchdynamo_orig_callable", None)
                 or (fn.func if isinstance(fn, functools.partial) else None) or getattr(fn, "__func__", None))
        if inner is None or inner is fn:
            break
        fn = inner
    return fn


def _library_module_name(name: str) -> bool:
    root = name.partition(".")[0]
    return root in _STDLIB or f"{root}." in _UNTRACKED_PACKAGES or root in ("numpy", "typing_extensions")


def _users_module(module: types.ModuleType) -> bool:
    """A module of the user's own code: not Python's, not an installed package's."""
    path = str(getattr(module, "__file__", None) or "")
    return bool(path) and not _library_module_name(module.__name__) and "-packages" not in path


def users_code(module_name: str | None) -> bool:
    """Whether the module named ``module_name`` is the user's own code (``__main__``
    included; not Python's, nor an installed package's)."""
    module = sys.modules.get(module_name or "")
    return module is not None and (module.__name__ == "__main__" or _users_module(module))


def _users_function(value: Any) -> bool:
    return isinstance(value, types.FunctionType) and users_code(value.__module__)


def _class_function(owner: type, name: str) -> Any:
    """The function a class defines (or inherits from the user's classes) under ``name``, else ``None``."""
    for klass in owner.__mro__:
        if _framework_class(klass) or klass is object:
            return None
        member = klass.__dict__.get(name, _ABSENT)
        if member is not _ABSENT:
            member = getattr(member, "__func__", member)  # (a static or class method)
            return member if isinstance(member, types.FunctionType) else None
    return None


def _holds_data(value: Any) -> bool:
    if value is _ABSENT:
        return False
    if isinstance(value, (float, *_PLAIN, torch.Tensor, *_SIZED)):
        return True
    return _settings_view(value) is not None or _generator_state(value, sys.modules.get("numpy")) is not None


def what_fn_reads(fn: Callable[..., Any] | None) -> list[tuple[str, Any]]:
    """``(label, object)`` pairs for the object a bound-method step belongs to, for
    the variables a closure step closes over (and those of the helper functions it
    holds in them, a loss defined next to it) and for the module-level data they read:
    Python state a replay bakes in."""
    found: list[tuple[str, Any]] = []
    if isinstance(fn, functools.partial):  # the arguments it was made with, then the function
        arguments = {str(i): a for i, a in enumerate(fn.args)} | dict(fn.keywords)
        if arguments:
            found.append(("partial", _StepArguments({k: types.CellType(v) for k, v in arguments.items()})))
        return found + what_fn_reads(fn.func)
    owner = getattr(fn, "__self__", None)
    function = getattr(fn, "__func__", fn)
    if owner is None and fn is not None and not isinstance(fn, (types.FunctionType, type)):
        # an object called as the step: its class's `__call__` (a module's `forward`) is the step
        call = _class_function(type(fn), "__call__")
        if call is None and isinstance(fn, torch.nn.Module):
            call = _class_function(type(fn), "forward")
        if call is not None:
            owner, function = fn, call
    if owner is not None and not isinstance(owner, type) and (
        hasattr(owner, "__dict__") or _slot_names(type(owner))
    ):
        found.append(("self", owner))
    helpers = _closure_helpers(function)
    for held in [function] + helpers:
        if getattr(held, "__closure__", None):
            found.append((getattr(held, "__name__", "step"), _ClosureVariables.of(held)))
    if owner is fn:  # (the method its class calls it through)
        return found + globals_fn_reads(function, owner=type(fn), helpers=helpers)
    return found + globals_fn_reads(fn, helpers=helpers)


def globals_loaded(fn: Callable[..., Any] | None) -> list[tuple[str, Any]]:
    """``(name, value)`` of every module-level name ``fn`` (and the helper functions it
    holds in its closure) loads, whatever the value: objects a step uses by name (a
    scheduler, an iterator), which :func:`what_fn_reads` leaves out as not data."""
    import dis

    function = _unwrapped(getattr(fn, "__func__", fn))
    found: dict[str, Any] = {}
    for held in [function] + _closure_helpers(function):
        code, namespace = getattr(held, "__code__", None), getattr(held, "__globals__", None)
        if not isinstance(code, types.CodeType) or not isinstance(namespace, dict):
            continue
        for each in _code_objects(code):
            for instruction in dis.get_instructions(each):
                name = instruction.argval
                if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(name, str) and name in namespace:
                    found.setdefault(name, namespace[name])
    return list(found.items())


def _closure_helpers(function: Any) -> list[types.FunctionType]:
    """The user's own functions ``function`` holds in its closure, and those they hold in
    theirs, up to ``_SCAN_DEPTH`` deep."""
    found: list[types.FunctionType] = []
    layer = [function]
    for _ in range(_SCAN_DEPTH):
        next_layer = []
        for holder in layer:
            for cell in getattr(holder, "__closure__", None) or ():
                try:
                    value = cell.cell_contents
                except ValueError:  # a variable not bound yet
                    continue
                if _users_function(value) and value is not function and all(value is not f for f in found):
                    found.append(value)
                    next_layer.append(value)
        layer = next_layer
    return found[:_SCAN_FUNCTIONS]


def globals_fn_reads(fn: Callable[..., Any] | None, owner: type | None = None,
                     helpers: Sequence[Callable[..., Any]] = ()) -> list[tuple[str, Any]]:
    """``[(label, view)]`` of the module-level data ``fn`` reads (and the user's own
    functions it calls, the methods of ``owner`` it calls on its first argument, and
    the ``helpers`` it holds), or ``[]``."""
    if fn is None:
        return []
    view = _GlobalVariables.of([(fn, _owner(fn, owner))] + [(helper, None) for helper in helpers])
    return [(f"{getattr(_unwrapped(fn), '__name__', 'step')} globals", view)] if view._source else []


def functions_read(functions: Sequence[tuple[Callable[..., Any], type | None]]) -> list[tuple[str, Any]]:
    """``[(label, object)]`` for what several functions that run inside one step read
    besides their arguments: what each holds (see :func:`_held_by`) and, in one view,
    the module-level data they all read (see :func:`globals_fn_reads`)."""
    found: list[tuple[str, Any]] = []
    for fn, owner in functions:
        for label, held in _held_by(fn, owner):
            taken = {taken_label for taken_label, _ in found}
            found.append((label if label not in taken else f"{label} ({len(found)})", held))
    view = _GlobalVariables.of([(fn, _owner(fn, owner)) for fn, owner in functions])
    return found + ([("step globals", view)] if view._source else [])


class _StepArguments(_ClosureVariables):
    """The arguments a step made with ``functools.partial`` is always called with."""

    _view_label = "step argument"


class _HookArguments(_ClosureVariables):
    """The arguments a hook is always called with: a ``functools.partial``'s and its defaults."""

    _view_label = "hook argument"


def _held_by(fn: Any, owner: type | None) -> list[tuple[str, Any]]:
    """What a hook holds, through each layer of its wrapping: the variables closures
    close over (a ``LambdaCallback`` hook appending to a list, a decorator counting
    calls), the arguments of a ``functools.partial`` and a function's default
    arguments, and the object a method set on an instance is bound to (a
    ``recorder.record`` hook). A method of ``owner`` (the class whose hook it is) is
    watched through its object already."""
    found: list[tuple[str, Any]] = []
    cells: dict[str, Any] = {}
    arguments: dict[str, Any] = {}
    for layer in range(8):
        if isinstance(fn, functools.partial):
            _add_unique(arguments, {str(i): a for i, a in enumerate(fn.args)} | fn.keywords, layer)
            inner = fn.func
        else:
            bound = getattr(fn, "__self__", None)
            if owner is None and bound is not None and not isinstance(bound, (type, types.ModuleType)) \
                    and not _framework_class(type(bound)):
                found.append((type(bound).__name__, bound))
            function = getattr(fn, "__func__", fn)
            code = getattr(function, "__code__", None)
            if isinstance(code, types.CodeType):
                closure = dict(zip(code.co_freevars, getattr(function, "__closure__", None) or ()))
                closure.pop("__class__", None)  # (the cell of a method calling super())
                _add_unique(cells, closure, layer, as_cells=False)
                if owner is None:
                    _add_unique(arguments, _defaults(function, code), layer)
            inner = getattr(function, "__wrapped__", None) or getattr(function, "_torchdynamo_orig_callable", None)
        if inner is None or inner is fn:
            break
        fn = inner
    if cells:
        found.append(("hook closure", _ClosureVariables(cells)))
    if arguments:
        found.append(("hook arguments", _HookArguments(arguments)))
    return found


def _defaults(function: Any, code: types.CodeType) -> dict[str, Any]:
    """A function's default arguments by name."""
    positional = function.__defaults__ or ()
    names = code.co_varnames[code.co_argcount - len(positional):code.co_argcount]
    return dict(zip(names, positional)) | (function.__kwdefaults__ or {})


def _add_unique(into: dict[str, Any], values: dict[str, Any], layer: int, as_cells: bool = True) -> None:
    """Add ``values`` (as cells unless they are cells), naming one already taken by an outer layer apart."""
    for name, value in values.items():
        into[name if name not in into else f"{name} (layer {layer})"] = types.CellType(value) if as_cells else value


def _owner(fn: Callable[..., Any], owner: type | None) -> type | None:
    """``owner``, or the class of the object ``fn`` is bound to."""
    bound = getattr(fn, "__self__", None)
    if owner is None and bound is not None and not isinstance(bound, type):
        return type(bound)
    return owner


class StepReads:
    """The attributes a captured step read (on the watched objects and their
    submodules, of classes outside PyTorch, Lightning and torchmetrics, and on the
    settings objects it reached through them), with their values then; before every
    replay :meth:`changed` says whether code outside the step (a hook, a callback)
    has changed any of them since. A graph bakes in what the step read: a replay
    after such a change would use the old value.

    Reads are recorded only while capturing, by standing in for the classes'
    ``__getattribute__`` (put back at once); checking costs a dictionary lookup per
    attribute read."""

    def __init__(self, ignore: Callable[[Any, str], bool]) -> None:
        self._ignore = ignore
        # (id(obj), name) -> (obj, name, key, copy): ``copy`` is a plain copy of a container or settings
        # object, the object itself for one compared by identity, else ``_UNCOMPARABLE``
        self._read: dict[tuple[int, str], tuple[Any, str, tuple, Any]] = {}

    def clear(self) -> None:
        self._read.clear()

    def recording(self, objects: Iterable[tuple[str, Any]]) -> Any:
        return _Recording(self, [obj for _, obj in _with_submodules(objects)])

    def _keep(self, obj: Any, name: str, follow: Callable[[Any], bool] | None = None) -> None:
        slotted = name in _slot_names(type(obj))
        if not (slotted or isinstance(getattr(obj, "__dict__", None), dict)) or self._keep_buffers(obj, name):
            return
        if self._ignore(obj, name):
            return
        if name == "__dict__":  # a settings object read whole (``vars(cfg)``): compared whole
            if _settings_view(obj) is not None:
                self._read[(id(obj), name)] = (obj, name, _value_key(obj), _plain_copy(obj))
            return
        value = _own_value(obj, name)
        if value is _ABSENT:
            # a class attribute read through the object: a value set on the object later hides it
            inherited = getattr(type(obj), name, _ABSENT)
            key = _value_key(inherited) if inherited is not _ABSENT else ("object",)
            if key[0] in ("number", "tensor", *_CONTAINERS):
                self._read[(id(obj), name)] = (obj, name, ("class", key), _UNCOMPARABLE)
            return
        settings = not isinstance(value, _SIZED) and _settings_view(value) is not None
        if settings and (isinstance(value, collections.abc.Mapping) or (follow is not None and follow(value))):
            # a settings object whose own reads are recorded from now on, or a mapping (too slow to compare
            # before every replay: compared at the broad checks): here, only that it is the same one
            self._read[(id(obj), name)] = (obj, name, ("followed", id(value)), value)
            return
        key = _value_key(value)
        if key[0] == "object":
            if settings or not isinstance(obj, torch.nn.Module):  # (a function or an array on a settings object)
                self._read[(id(obj), name)] = (obj, name, ("followed", id(value)), value)
            return
        if key[0] in _CONTAINERS and key[3] is _UNCOMPARABLE:
            # too big to compare before every replay (a dataset's list): the same one, at the same length
            self._read[(id(obj), name)] = (obj, name, ("sized", id(value), len(value)), value)
            return
        # a container (or a settings object) is compared with a plain copy, at C speed
        copy = _plain_copy(value, follow=follow) if key[0] in _CONTAINERS else _UNCOMPARABLE
        self._read[(id(obj), name)] = (obj, name, key, copy)

    def keep_whole(self, obj: Any) -> None:
        """Keep a settings object whose reads cannot be recorded one by one (of a class
        that takes no stand-in, as ``types.SimpleNamespace``), given to watch or held by
        the step: compared whole before every replay."""
        if _settings_view(obj) is not None:
            self._read[(id(obj), "__dict__")] = (obj, "__dict__", _value_key(obj), _plain_copy(obj))

    def _keep_buffers(self, obj: Any, name: str) -> bool:
        """Keep a read of a module's registered buffer (of all of them where the step
        read ``_buffers``: ``named_buffers()``, ``state_dict()``): a graph reads the
        tensor it was captured with. Whether ``name`` was one."""
        buffers = obj.__dict__.get("_buffers") if isinstance(obj, torch.nn.Module) else None
        if not buffers:
            return False
        if name == "_buffers":
            names = list(buffers)
        elif name in buffers and name not in obj.__dict__:
            names = [name]
        else:
            return False
        for read in names:
            self._read[(id(obj), read)] = (obj, read, ("buffer",), buffers[read])
        return True

    def changed(self) -> str | None:
        """The first attribute the step read that holds another value now, described."""
        compared: set[int] = set()  # containers several modules read (a shared dict of settings): once each
        views: dict[int, dict[str, Any]] = {}  # a view's variables, gathered once per check
        for obj, name, key, copy in self._read.values():
            if name == "__dict__":
                value = obj
            elif isinstance(obj, _VariablesView):
                found = views.get(id(obj))
                if found is None:
                    found = views[id(obj)] = obj.__dict__
                value = found.get(name, _ABSENT)
            else:
                value = _own_value(obj, name)
            kind = key[0]
            if kind == "buffer":
                if obj._buffers.get(name) is copy:
                    continue
                return f"assigns a new tensor to the buffer `{_where(obj, name)}`"
            if kind == "followed":
                if value is copy:
                    continue
                now = ("object", id(value)) if value is not _ABSENT else None
            elif kind == "sized":
                if value is copy and len(value) == key[2]:
                    continue
                verb = "rebinds" if value is not copy else "changes the length of"
                return f"{verb} `{_where(obj, name)}`"
            elif kind == "class":
                if value is not _ABSENT:
                    return f"sets `{_where(obj, name)}`, which the step read from its class"
                inherited = getattr(type(obj), name, _ABSENT)
                if (_value_key(inherited) if inherited is not _ABSENT else None) == key[1]:
                    continue
                return f"changes the class attribute `{_where(obj, name)}`"
            else:
                if copy is not _UNCOMPARABLE and id(value) == key[1]:
                    if key[1] in compared:
                        continue
                    if _equal_to_copy(value, copy):
                        compared.add(key[1])
                        continue
                now = _value_key(value) if value is not _ABSENT else None
            if now != key:
                return _describe(_where(obj, name), key, now, value)
        return None


def _own_value(obj: Any, name: str) -> Any:
    """The value an object holds itself under ``name`` (in its ``__dict__`` or a slot), else ``_ABSENT``."""
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict) and name in attributes:
        return attributes[name]
    if name in _slot_names(type(obj)):
        try:
            return object.__getattribute__(obj, name)
        except AttributeError:
            return _ABSENT
    return _ABSENT


def _where(obj: Any, name: str) -> str:
    """How a message names an attribute the step read (``Model.beta``, ``global CONFIG``)."""
    shown = name.lstrip("_") if _behind_property(obj, name) else name
    return f"{obj._view_label} {shown}" if isinstance(obj, _VariablesView) else f"{type(obj).__name__}.{shown}"


class _Same:
    """Stands in a plain copy for a value compared by identity (a tensor, a function,
    a settings object whose reads are followed): equal to that very object only."""

    __slots__ = ("obj",)
    __hash__ = None  # type: ignore[assignment]
    __array_ufunc__ = None  # NumPy arrays defer to __eq__ below instead of comparing element-wise

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: Any) -> bool:
        return other is self.obj


class _SettingsCopy:
    """A plain copy of a settings object: equal to an object of the same class whose
    attributes equal the copied ones."""

    __slots__ = ("cls", "fields")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, cls: type, fields: dict) -> None:
        self.cls, self.fields = cls, fields

    def __eq__(self, other: Any) -> bool:
        return type(other) is self.cls and self.fields == _settings_view(other)


def _plain_copy(value: Any, depth: int = 0, follow: Callable[[Any], bool] | None = None) -> Any:
    """A deep copy of a container holding plain values (a few levels deep), with
    settings objects copied by their attributes (or, with ``follow`` taking them,
    stood for by their identity: their reads are recorded one by one) and tensors
    and other objects by their identity; ``_UNCOMPARABLE`` for one too deep or too
    big. The copy compares equal to the container (``copy == container``, at C
    speed) while every value in it is the same."""
    if isinstance(value, (float, *_PLAIN)):
        return value
    if depth >= _DIGEST_DEPTH:
        return _UNCOMPARABLE
    if not isinstance(value, (list, tuple, dict)):
        if isinstance(value, _SIZED):
            return _UNCOMPARABLE
        view = _settings_view(value)
        if view is None or isinstance(value, collections.abc.Mapping) or (
            follow is not None and depth > 0 and follow(value)
        ):
            return _Same(value)  # (a mapping: compared at the broad checks, too slow to compare at every replay)
        fields = _plain_copy(view, depth, follow)
        return _UNCOMPARABLE if fields is _UNCOMPARABLE else _SettingsCopy(type(value), fields)
    if len(value) > _DIGEST_ITEMS:
        return _UNCOMPARABLE
    if isinstance(value, dict):
        if not all(isinstance(k, (float, *_PLAIN)) for k in value):
            return _UNCOMPARABLE
        copy = {k: _plain_copy(v, depth + 1, follow) for k, v in value.items()}
        parts = copy.values()
    else:
        copy = [_plain_copy(v, depth + 1, follow) for v in value]
        parts = copy
    if any(part is _UNCOMPARABLE for part in parts):
        return _UNCOMPARABLE
    if type(value) in (list, dict):
        return copy
    try:
        return type(value)(copy)  # a tuple, or a subclass (Lightning's AttributeDict)
    except Exception:  # a container type that cannot be rebuilt from a plain one
        return _UNCOMPARABLE


def _equal_to_copy(value: Any, copy: Any) -> bool:
    """Whether ``value`` still equals its plain copy (False where it cannot tell);
    the copy compares, so that its stand-ins decide."""
    if type(value) is not type(copy) and not isinstance(copy, _SettingsCopy):
        return False
    try:
        return bool(copy == value)
    except Exception:  # a value whose comparison raises: compared the slow way
        return False


def _not_traced(fn: Callable) -> Callable:
    """``fn`` as a function torch.compile leaves alone (compiled code may look up attributes through it)."""
    disable = getattr(getattr(torch, "_dynamo", None), "disable", None)
    return disable(fn) if disable is not None else fn


def _followable(obj: Any) -> bool:
    """Whether a settings object's reads can be recorded one by one: its attributes
    live in its ``__dict__`` and are looked up plainly (not a mapping, no
    ``__getattr__`` or ``__slots__``: those are compared whole)."""
    cls = type(obj)
    return (
        isinstance(getattr(obj, "__dict__", None), dict)
        and not isinstance(obj, collections.abc.Mapping)
        and getattr(cls, "__getattr__", None) is None
        and not _slot_names(cls)
    )


class _Recording:
    """Stands in for ``__getattribute__`` of the objects' classes while a step is captured.

    A settings object the step reaches through an attribute, a closure variable or
    a container it read (``self.cfg``, a simulation object it closes over, a helper
    in a list) is followed: its reads are recorded too, so that only what the step
    reads of it is compared before each replay. One whose reads cannot be recorded
    (``types.SimpleNamespace``, a mapping, a class with ``__getattr__`` or
    ``__slots__``) is compared whole."""

    def __init__(self, reads: StepReads, objects: list[Any]) -> None:
        self._reads = reads
        self._objects = {id(obj): obj for obj in objects}
        self._classes = []
        for obj in objects:
            cls = type(obj)
            if _framework_class(cls) or cls in self._classes:
                continue
            self._classes.append(cls)
        self._saved: list[tuple[type, Any]] = []
        self._keeping = False  # while a read is kept: the reads that takes itself (a metric's `_defaults`) are not

    def __enter__(self) -> _Recording:
        try:
            return self._install()
        except BaseException:
            self.__exit__()
            raise

    def _install(self) -> _Recording:
        objects = list(self._objects.values())
        recorded = [cls for cls in self._classes if self._stand_in(cls)]
        self._keeping = True  # (looking at the objects is not the step's read)
        try:
            for obj in objects:
                if not isinstance(obj, (_VariablesView, torch.nn.Module)) and all(type(obj) is not cls
                                                                                for cls in recorded):
                    # a class whose reads cannot be recorded (Python's own `SimpleNamespace`): compared whole
                    self._reads.keep_whole(obj)
        finally:
            self._keeping = False
        for obj in objects:
            if isinstance(obj, _VariablesView):
                # closure variables and module-level data (no attribute access to watch): all of them are read
                for name in obj.__dict__:
                    self._reads._keep(obj, name, self._follow)
        return self

    def _stand_in(self, cls: type) -> bool:
        """Record the reads of the watched objects of ``cls``; False where the class refuses."""
        if any(patched is cls for patched, _ in self._saved):
            return True
        metaclass = type(cls)
        if metaclass.__setattr__ is not type.__setattr__ or metaclass.__delattr__ is not type.__delattr__:
            return False  # a class guarding its attributes might not take the original back
        objects, reads, recording = self._objects, self._reads, self
        own = cls.__dict__.get("__getattribute__", _ABSENT)
        inherited = cls.__getattribute__

        def recorded(obj: Any, name: str, _get: Any = inherited) -> Any:
            try:
                value = _get(obj, name)
            except AttributeError:  # (a module's parameter, buffer or submodule: `__getattr__` gives it next)
                if not recording._keeping and id(obj) in objects and isinstance(obj, torch.nn.Module):
                    recording._keeping = True
                    try:
                        reads._keep(obj, name, None)
                    finally:
                        recording._keeping = False
                raise
            if not recording._keeping and id(obj) in objects and (name == "__dict__" or not name.startswith("__")):
                recording._keeping = True
                try:
                    reads._keep(obj, name, recording._follow)
                finally:
                    recording._keeping = False
            return value

        try:
            cls.__getattribute__ = _not_traced(recorded)
        except Exception:  # a class that takes no new attributes: its reads go unrecorded
            return False
        self._saved.append((cls, own))
        return True

    def _follow(self, obj: Any) -> bool:
        """Watch a settings object the step reached; False where its reads cannot be recorded."""
        if id(obj) in self._objects:
            return True
        if not _followable(obj) or not self._stand_in(type(obj)):
            return False
        self._objects[id(obj)] = obj
        return True

    def __exit__(self, *exc: Any) -> None:
        saved, self._saved = self._saved, []
        for cls, own in reversed(saved):
            try:
                if own is _ABSENT:
                    del cls.__getattribute__
                else:
                    cls.__getattribute__ = own
            except Exception:  # (a class refusing to take its own back: the others are still put back)
                continue
