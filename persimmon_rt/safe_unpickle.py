"""Load torch checkpoints (zip and legacy formats) without running any code they contain.

A checkpoint pickle may name any Python global and ask for it to be called. This unpickler never imports
a module on a checkpoint's behalf and calls nothing but a short allow-list: the tensor rebuild functions
(reimplemented here), a few containers, ``argparse.Namespace``, ``torch.Size``/dtypes and the numpy
reconstructors that RNG states need. Every other global becomes an inert `GlobalRef`:

- used as a class (NEWOBJ, or REDUCE of a CamelCase name such as a pickled Enum) it yields a `Placeholder`
  that records the module, name, arguments and state and never executes anything;
- called (REDUCE) when its name is not class-like, it is refused with `UnsafeCheckpointError`, since a
  function cannot be told apart from a class without importing it;
- any standard-library global that is not on the allow-list (``os.system``, ``builtins.eval``,
  ``subprocess.Popen``, ``importlib.import_module``, ...) is refused as soon as the pickle names it.

Storages are memory-mapped copy-on-write from the checkpoint file, so tensors are views that page in on
first touch and a multi-GB checkpoint is never held twice.

Whatever the bytes, loading ends in a clean load or a `CheckpointError`, in time and memory linear in the
file's size: declared lengths are checked against the bytes that exist before anything is allocated,
calls that copy a container draw on a budget proportional to the pickle's size, dict keys and set
members must hash in bounded time, and error messages show bounded representations.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import mmap
import os
import pickle
import re
import reprlib
import struct
import sys
import zipfile
import zlib
from typing import Any, Callable

import numpy as np
import torch

from .weights import CheckpointError

__all__ = ["UnsafeCheckpointError", "GlobalRef", "Placeholder", "RestrictedUnpickler", "load", "loads"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint asks for something that could run code; nothing of it was executed."""


class GlobalRef:
    """A global the pickle names but that was not imported (inert: calling it is refused)."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    @property
    def class_like(self) -> bool:
        return self.name.rpartition(".")[2][:1].isupper()

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


class Placeholder:
    """Stands in for an instance of a class that was not imported; records how it was built."""

    def __init__(self, ref: GlobalRef, args: tuple = (), kwargs: dict | None = None):
        self.module, self.name = ref.module, ref.name
        self.args, self.kwargs = tuple(args), dict(kwargs or {})
        self.state: Any = None
        self.listitems: list = []
        self.dictitems: dict = {}

    def __repr__(self) -> str:
        return f"<unpickled {self.module}.{self.name} args={_short(self.args)} state={_short(self.state)}>"


class _ShortRepr(reprlib.Repr):
    """repr with bounded depth and width: objects from a pickle may share structure, so a plain repr of
    one can be exponentially long, or recurse past the C stack."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, 60, 60

    def repr_int(self, x, level):
        return repr(x) if x.bit_length() <= 128 else f"<int of {x.bit_length()} bits>"

    def repr_instance(self, x, level):
        if x is None or isinstance(x, (bool, float, complex, bytes, bytearray, GlobalRef, torch.dtype, torch.device,
                                       np.dtype)):
            return super().repr_instance(x, level)
        return f"<{type(x).__name__}>"


_short = _ShortRepr().repr


class _StorageType:
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


class _Storage:
    """The bytes of one pickled storage (a uint8 tensor, normally a view of the mapped file) and its dtype."""

    def __init__(self, data: torch.Tensor, dtype: torch.dtype):
        self.data, self.dtype = data, dtype

    def tensor(self, offset, size, stride, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if not (_ints(size) and _ints(stride) and isinstance(offset, int) and len(size) == len(stride)):
            raise CheckpointError(f"malformed tensor record: size={_short(size)} stride={_short(stride)} "
                                  f"offset={_short(offset)}")
        try:
            flat = self.data.view(dtype)
            return flat.as_strided(tuple(size), tuple(stride), offset)
        except RuntimeError as exc:
            raise CheckpointError(f"tensor record does not fit its storage: {exc}") from exc


def _ints(seq) -> bool:
    return isinstance(seq, (tuple, list, torch.Size)) and all(type(v) is int for v in seq)


# ------------------------------------------------------------------------------------ the callable allow-list
def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor / _rebuild_tensor_v2 (requires_grad, hooks and metadata are dropped)."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor record refers to a {type(storage).__name__}, not a storage")
    return storage.tensor(storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *_ignored):
    if not isinstance(storage, _Storage) or not isinstance(dtype, torch.dtype):
        raise CheckpointError("malformed _rebuild_tensor_v3 record")
    return storage.tensor(storage_offset, size, stride, dtype)


def _rebuild_parameter(data, *_ignored):
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"parameter record holds a {type(data).__name__}, not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter) or not isinstance(args, tuple):
        raise UnsafeCheckpointError(f"refusing tensor subclass record that calls {_short(func)}")
    return func(*args)


def _reconstructor(cls, base, state):
    """copyreg._reconstructor (protocol 0/1 objects): only for placeholders and plain containers."""
    if isinstance(cls, GlobalRef):
        return Placeholder(cls, () if state is None else (state,))
    if base is object and state is None and any(cls is t for t in _NEWOBJ_TYPES):
        return cls.__new__(cls)
    raise UnsafeCheckpointError(f"refusing copyreg._reconstructor({_short(cls)}, {_short(base)}, ...)")


def _bytes_like(kind):
    def build(*args):
        if args and isinstance(args[0], int):
            raise UnsafeCheckpointError(f"refusing {kind.__name__}({_short(args[0])}) (allocation by size)")
        if args and not isinstance(args[0], _COPYABLE):
            raise UnsafeCheckpointError(f"refusing {kind.__name__} of a {type(args[0]).__name__}")
        if len(args) == 2 and isinstance(args[0], str):  # (latin-1 text, encoding): the protocol-2 spelling
            return kind(_codecs_encode(*args))
        return kind(*args)
    return build


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode({type(text).__name__}, {_short(encoding)})")
    return text.encode("latin1")


_DEFAULT_FACTORIES = (None, list, dict, set, int, float, str, collections.OrderedDict)


def _defaultdict(factory=None, *items):
    if not any(factory is f for f in _DEFAULT_FACTORIES):
        raise UnsafeCheckpointError(f"refusing collections.defaultdict with factory {_short(factory)}")
    return collections.defaultdict(factory, *map(_pairs, items))


def _torch_size(dims=()):
    if not _ints(dims):
        raise CheckpointError(f"torch.Size of non-integers: {_short(dims)}")
    return torch.Size(dims)


def _torch_device(*args):
    if not all(isinstance(a, (str, int)) for a in args):
        raise CheckpointError(f"malformed torch.device{_short(args)}")
    return torch.device(*args)


_multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray


def _np_reconstruct(subtype, shape, typecode):
    if subtype is not np.ndarray:
        raise UnsafeCheckpointError(f"refusing numpy array of type {_short(subtype)}")
    if shape != (0,) or typecode != b"b":  # numpy pickles an empty array, then BUILD sets shape and data
        raise CheckpointError(f"numpy array record of shape {_short(shape)}, not (0,)")
    return _multiarray._reconstruct(np.ndarray, shape, typecode)


def _np_scalar(dtype, *data):
    if not isinstance(dtype, np.dtype):
        raise CheckpointError(f"numpy scalar record with dtype {_short(dtype)}")
    return _multiarray.scalar(dtype, *data)


_DTYPE_SPEC = re.compile(r"[<>|=]?[A-Za-z][A-Za-z0-9]{0,15}")


def _np_dtype(spec, align=False, copy=False):
    # A type code or name ("u4", "<f8", "float32"): numpy parses anything richer ("2i,(3)f") with the
    # Python compiler (ast.literal_eval), which checkpoint text must never reach.
    if not (isinstance(spec, str) and _DTYPE_SPEC.fullmatch(spec)):
        raise UnsafeCheckpointError(f"refusing numpy.dtype({_short(spec)})")
    dtype = np.dtype(spec, align, True)  # always a fresh dtype: BUILD must never mutate numpy's shared ones
    # Plain scalar dtypes only. Object arrays in particular are refused: numpy frees an array's objects
    # recursively, so a chain of arrays nested 60,000 deep crashes the interpreter when it is released.
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize > 1024:
        raise UnsafeCheckpointError(f"refusing numpy.dtype({_short(spec)}): only plain scalar dtypes")
    return dtype


def _slice(*args):
    # Only integer bounds: slices free their members recursively, so deeply nested ones crash on release.
    if not all(a is None or type(a) is int for a in args):
        raise UnsafeCheckpointError("refusing a slice of anything but integers")
    return slice(*args)


_COPYABLE = (list, tuple, set, frozenset, dict, str, bytes, bytearray)


def _copyable(items):
    """Containers are built only from concrete ones (never from a range or another lazy iterable)."""
    if not isinstance(items, _COPYABLE):
        raise UnsafeCheckpointError(f"refusing to build a container from a {type(items).__name__}")
    return items


def _members(items):
    if not isinstance(_copyable(items), (set, frozenset, dict, str, bytes, bytearray)):  # else: hashed already
        for item in items:
            _key(item)
    return items


def _pairs(items):
    if not isinstance(_copyable(items), dict):
        for pair in items:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise CheckpointError("a mapping must be built from (key, value) pairs")
            _key(pair[0])
    return items


def _container(kind, check):
    def build(*args):
        if len(args) > 1:
            raise CheckpointError(f"{kind.__name__}() takes at most one argument")
        return kind(*map(check, args))
    return build


_KEY_TYPES = (str, bytes, float, bool, type(None), frozenset, GlobalRef, Placeholder, torch.dtype)


def _key(key) -> None:
    """Refuse dict keys and set members whose hash is unbounded work: a deeply nested tuple's hash recurses
    past the C stack, and a large tuple or integer is rehashed in full on every insertion."""
    todo, seen = [key], 0
    while todo:
        k = todo.pop()
        seen += 1
        if seen > 64:
            raise UnsafeCheckpointError("refusing a dict key or set member of more than 64 parts")
        if type(k) is int:
            if k.bit_length() > 60:
                raise UnsafeCheckpointError("refusing a dict key or set member integer of more than 60 bits")
        elif type(k) in (tuple, torch.Size):
            todo.extend(k)
        elif not isinstance(k, _KEY_TYPES):
            raise UnsafeCheckpointError(f"refusing a dict key or set member of type {type(k).__name__}")


_NEWOBJ_TYPES = (argparse.Namespace, collections.OrderedDict, collections.defaultdict, dict, list, set)

# (module, name) -> object handed to the pickle; _CALLS maps the callable ones to what REDUCE actually runs.
_GLOBALS: dict[tuple[str, str], Any] = {}
_CALLS: dict[int, tuple[Any, Callable]] = {}


def _allow(modules, name, obj, call: Callable | None = None):
    for module in (modules,) if isinstance(modules, str) else modules:
        _GLOBALS[(module, name)] = obj
    if call is not None:
        _CALLS[id(obj)] = (obj, call)


for _fn in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter):
    _allow("torch._utils", _fn.__name__, _fn, _fn)
_allow("torch._utils", "_rebuild_tensor_v2", _rebuild_tensor)
_allow("torch._utils", "_rebuild_parameter_with_state", _rebuild_parameter)
_allow("torch._tensor", "_rebuild_from_type_v2", _rebuild_from_type_v2, _rebuild_from_type_v2)
_allow("torch", "Size", torch.Size, _torch_size)
_allow("torch", "device", torch.device, _torch_device)
for _name in ("float16", "half", "bfloat16", "float32", "float", "float64", "double", "int64", "long", "int32",
              "int", "int16", "short", "int8", "uint8", "uint16", "uint32", "uint64", "bool", "complex64",
              "complex128"):
    _allow("torch", _name, getattr(torch, _name))
_allow("collections", "OrderedDict", collections.OrderedDict, _container(collections.OrderedDict, _pairs))
_allow("collections", "defaultdict", collections.defaultdict, _defaultdict)
_allow("argparse", "Namespace", argparse.Namespace, argparse.Namespace)
_allow("copyreg", "_reconstructor", _reconstructor, _reconstructor)
_allow("_codecs", "encode", _codecs_encode, _codecs_encode)
for _type, _check in ((set, _members), (frozenset, _members), (list, _copyable), (tuple, _copyable), (dict, _pairs)):
    _allow("builtins", _type.__name__, _type, _container(_type, _check))
for _type in (complex, range):
    _allow("builtins", _type.__name__, _type, _type)
_allow("builtins", "slice", slice, _slice)
for _type in (bytes, bytearray):
    _allow("builtins", _type.__name__, _type, _bytes_like(_type))
for _type in (object, int, float, str, bool):
    _allow("builtins", _type.__name__, _type)
_NUMPY_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")
_allow(_NUMPY_MULTIARRAY, "_reconstruct", _multiarray._reconstruct, _np_reconstruct)
_allow(_NUMPY_MULTIARRAY, "scalar", _multiarray.scalar, _np_scalar)
_allow("numpy", "ndarray", np.ndarray)
_allow("numpy", "dtype", np.dtype, _np_dtype)

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16, "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}


# ------------------------------------------------------------------------------------------------ unpickler
class RestrictedUnpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler with every opcode that imports, calls or mutates routed through checks.

    `storage(key, dtype, numel)` resolves torch persistent ids; None means the pickle may hold none.
    `size` is the number of bytes the pickle may span: calls that copy containers may copy at most a few
    times that many elements in all (a pickle can name one large object many times through its memo).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, storage: Callable | None = None, size: int = 0):
        super().__init__(file, encoding="utf-8")
        self._storage = storage
        self._storages: dict[str, _Storage] = {}
        self._budget = 4 * size + 4096

    def _charge(self, n: int) -> None:
        self._budget -= n
        if self._budget < 0:
            raise UnsafeCheckpointError("refusing to load: the pickle copies far more data than it holds "
                                        "(the same object named over and over)")

    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 spellings (protocol-2 pickles use them)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module.partition(".")[0] in sys.stdlib_module_names:
            raise UnsafeCheckpointError(
                f"refusing to load: the checkpoint references {module}.{name}, which is not among the globals "
                "a checkpoint may use (it could run code); nothing from the file was executed")
        return GlobalRef(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
            raise CheckpointError(f"unsupported persistent id {_short(pid)}")
        _, stype, key, _location, numel = pid[:5]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(stype, _StorageType) or type(numel) is not int or numel < 0:
            raise CheckpointError(f"malformed storage record {_short(pid)}")
        if self._storage is None:
            raise CheckpointError("the pickle refers to tensor storages but none are available")
        if not isinstance(key, (str, int)):
            raise CheckpointError(f"malformed storage key {_short(key)}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._storage(key, stype.dtype, numel)
        storage = self._storages[key]
        if view is not None:  # legacy storage views: (view_key, offset, size) in elements
            if not (isinstance(view, tuple) and len(view) == 3 and type(view[1]) is int and type(view[2]) is int
                    and 0 <= view[1] and 0 <= view[2] and view[1] + view[2] <= numel):
                raise CheckpointError(f"malformed storage view {_short(view)}")
            _vkey, offset, size = view
            esize = storage.dtype.itemsize
            return _Storage(storage.data[offset * esize:(offset + size) * esize], storage.dtype)
        return storage

    # -------------------------------------------------------------------------------- opcode overrides
    def _call(self, func, args):
        if isinstance(func, GlobalRef):
            if func.class_like:
                return Placeholder(func, args)
            raise UnsafeCheckpointError(
                f"refusing to call {func!r}: not a known-safe function (the checkpoint may contain code); "
                "nothing from the file was executed")
        entry = _CALLS.get(id(func))
        if entry is None or entry[0] is not func:
            raise UnsafeCheckpointError(f"refusing to call {_short(func)}: not a known-safe callable")
        if not isinstance(args, tuple):
            raise CheckpointError(f"malformed call of {_short(func)}: arguments are a {type(args).__name__}")
        self._charge(sum(len(a) for a in args if isinstance(a, _COPYABLE)))
        try:
            return entry[1](*args)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot rebuild {getattr(func, '__name__', '?')}{_short(args)}: "
                                  f"{type(exc).__name__}: {str(exc)[:200]}") from exc

    def _new(self, cls, args, kwargs):
        if isinstance(cls, GlobalRef):
            return Placeholder(cls, args, kwargs)
        if any(cls is t for t in _NEWOBJ_TYPES):
            return cls.__new__(cls, *args, **kwargs)
        raise UnsafeCheckpointError(f"refusing to create an object of type {_short(cls)}")

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self):
        args = self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args, {})

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args, kwargs)

    def _instantiate(self, klass, args):  # INST / OBJ (protocols 0 and 1)
        self.append(self._call(klass, tuple(args)))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Placeholder):
            inst.state = state
        elif isinstance(inst, np.dtype):
            # Only the byte order may change: numpy trusts the rest of a dtype's state (field offsets,
            # sizes) when it later reads array memory.
            own = inst.__reduce__()[2]
            if not (type(state) is tuple and len(state) == len(own) and state[1] in ("<", ">", "|", "=")
                    and all(type(a) is type(b) and a == b for a, b in zip(state[2:], own[2:]))):
                raise UnsafeCheckpointError(f"refusing numpy dtype state {_short(state)}")
            inst.__setstate__(state)
        elif type(inst) is np.ndarray:
            if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)
                    and isinstance(state[4], (list, bytes, bytearray))
                    and (isinstance(state[4], list) or not state[2].hasobject)):
                raise UnsafeCheckpointError("malformed numpy array state")
            self._charge(len(state[4]))
            try:
                inst.__setstate__(state)
            except (ValueError, TypeError, OverflowError) as exc:
                raise CheckpointError(f"malformed numpy array state: {exc}") from exc
        elif type(inst) in (argparse.Namespace, collections.OrderedDict):
            parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
            for part in parts:
                if part is None:
                    continue
                if not (isinstance(part, dict) and all(isinstance(k, str) and not k.startswith("__") for k in part)):
                    raise UnsafeCheckpointError(f"refusing state {_short(part)} for a {type(inst).__name__}")
                self._charge(len(part))
                vars(inst).update(part)
        else:
            raise UnsafeCheckpointError(f"refusing to set the state of a {type(inst).__name__}")

    def load_append(self):
        value = self.stack.pop()
        self._extend(self.stack[-1], [value])

    def load_appends(self):
        items = self.pop_mark()
        self._extend(self.stack[-1], items)

    @staticmethod
    def _extend(target, items):
        if type(target) is list:
            target.extend(items)
        elif isinstance(target, Placeholder):
            target.listitems.extend(items)
        else:
            raise UnsafeCheckpointError(f"refusing to append to a {type(target).__name__}")

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._update(self.stack[-1], [key, value])

    def load_setitems(self):
        items = self.pop_mark()
        self._update(self.stack[-1], items)

    @staticmethod
    def _update(target, items):
        if type(target) in (dict, collections.OrderedDict, collections.defaultdict):
            pass
        elif isinstance(target, Placeholder):
            target = target.dictitems
        else:
            raise UnsafeCheckpointError(f"refusing to set items of a {type(target).__name__}")
        for i in range(0, len(items), 2):
            _key(items[i])
            target[items[i]] = items[i + 1]

    def load_dict(self):
        items = self.pop_mark()
        self.append({})
        self._update(self.stack[-1], items)

    def load_additems(self):
        items = self.pop_mark()
        if type(self.stack[-1]) is not set:
            raise UnsafeCheckpointError(f"refusing to add items to a {type(self.stack[-1]).__name__}")
        self.stack[-1].update(_members(items))

    def load_frozenset(self):
        items = self.pop_mark()  # before `self.append` is looked up: pop_mark rebinds it
        self.append(frozenset(_members(items)))

    def load_bytearray8(self):  # pickle's own allocates the declared length before reading anything
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)
        if len(data) != n:
            raise CheckpointError("pickle data was truncated (BYTEARRAY8)")
        self.append(bytearray(data))

    def load_ext(self):
        raise UnsafeCheckpointError("refusing pickle extension-registry opcodes (EXT1/EXT2/EXT4)")

    for _opcode, _method in ((pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj),
                             (pickle.NEWOBJ_EX, load_newobj_ex), (pickle.BUILD, load_build),
                             (pickle.APPEND, load_append), (pickle.APPENDS, load_appends),
                             (pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems),
                             (pickle.ADDITEMS, load_additems), (pickle.DICT, load_dict),
                             (pickle.FROZENSET, load_frozenset), (pickle.BYTEARRAY8, load_bytearray8),
                             (pickle.EXT1, load_ext),
                             (pickle.EXT2, load_ext), (pickle.EXT4, load_ext)):
        dispatch[_opcode[0]] = _method
    del _opcode, _method


def _unpickle(file, storage: Callable | None = None):
    """One pickle from `file` (a BytesIO or an mmap: reading past the end returns what exists, where a
    file object would first allocate whatever length the pickle declares)."""
    start = file.tell()
    file.seek(0, os.SEEK_END)
    size = file.tell() - start
    file.seek(start)
    try:
        return RestrictedUnpickler(file, storage, size).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, struct.error, OverflowError) as exc:
        raise CheckpointError(f"malformed pickle: {type(exc).__name__}: {str(exc)[:200]}") from exc


def loads(data: bytes) -> Any:
    """Restricted unpickling of a plain pickle (no tensor storages)."""
    return _unpickle(io.BytesIO(data))


# -------------------------------------------------------------------------------------------------- loading
def load(path: str | os.PathLike) -> Any:
    """Load a torch checkpoint (``torch.save`` zip format, or the legacy pickle format) safely.

    Tensors are copy-on-write views of the memory-mapped file; objects of unknown classes are `Placeholder`s.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK") or _is_zip(path):
        return _load_zip(path)
    if head[:1] == pickle.PROTO and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return _load_legacy(path)
    raise CheckpointError(f"{path} is not a torch checkpoint: neither the zip format nor the legacy pickle format")


# What zipfile and its decompressors raise on a corrupt archive (an encrypted member: RuntimeError).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, OSError,
               ValueError, struct.error, zlib.error, UnicodeDecodeError)
# Bytes a zip checkpoint may inflate or copy (compressed members, unaligned or byte-swapped storages),
# relative to its size: torch writes nothing compressed; a re-zipped checkpoint inflates by far less.
_COPY_RATIO, _COPY_SLACK = 4, 2**20


def _is_zip(path: str) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except _ZIP_ERRORS:
        return False


def _map(path: str) -> mmap.mmap | None:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None


def _view(buf, offset: int, nbytes: int, itemsize: int, swap: bool = False) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if buf is None or offset + nbytes > len(buf):
        raise CheckpointError("storage extends past the end of the checkpoint file (truncated download?)")
    data = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)
    if swap and itemsize > 1:
        return data.view(-1, itemsize).flip(1).reshape(-1)
    return data.clone() if offset % max(itemsize, 1) else data


def _load_zip(path: str):
    try:
        return _load_zip_archive(path)
    except CheckpointError:
        raise
    except _ZIP_ERRORS as exc:
        raise CheckpointError(f"{path}: corrupt zip archive ({type(exc).__name__}: {str(exc)[:200]})") from exc


def _load_zip_archive(path: str):
    copy_budget = [_COPY_RATIO * os.path.getsize(path) + _COPY_SLACK]

    def copied(nbytes: int) -> None:
        copy_budget[0] -= nbytes
        if copy_budget[0] < 0:
            raise CheckpointError(f"{path}: the archive expands to far more data than it holds (overlapping "
                                  "or highly compressed members)")

    def read(info: zipfile.ZipInfo, limit: int) -> bytes:
        """At most `limit` bytes of a member, read in bounded chunks (zipfile would otherwise allocate the
        size the archive declares at once)."""
        out = bytearray()
        with zf.open(info) as member:
            while len(out) < limit:
                chunk = member.read(min(limit - len(out), 2**20))
                if not chunk:
                    break
                copied(len(chunk))
                out += chunk
        return bytes(out)

    with zipfile.ZipFile(path) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        pickles = [n for n in infos if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if len(pickles) != 1:
            raise CheckpointError(f"{path} is a zip file but not a torch checkpoint (no single */data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = read(infos[prefix + "byteorder"], 16).decode("ascii", "replace").strip() \
            if prefix + "byteorder" in infos else "little"
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r}")
        data_pkl = read(infos[pickles[0]], os.path.getsize(path))  # a stored member is no larger than the file
        buf = _map(path)

        def storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise CheckpointError(f"{path}: storage {key[:100]!r} named by the pickle is missing from the archive")
            nbytes = numel * dtype.itemsize
            if info.file_size < nbytes:
                raise CheckpointError(f"{path}: storage {key[:100]!r} holds {info.file_size} bytes, expected {nbytes}")
            swap = byteorder != sys.byteorder
            if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; read (copy) if someone did
                raw = bytearray(read(info, nbytes))
                if len(raw) < nbytes:
                    raise CheckpointError(f"{path}: storage {key[:100]!r} is shorter than its record")
                return _Storage(_view(raw, 0, nbytes, dtype.itemsize, swap), dtype)
            header = buf[info.header_offset:info.header_offset + 30] if buf is not None else b""
            if header[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{path}: corrupt zip entry for storage {key[:100]!r}")
            offset = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
                int.from_bytes(header[28:30], "little")
            if (swap and dtype.itemsize > 1) or offset % max(dtype.itemsize, 1):
                copied(nbytes)
            return _Storage(_view(buf, offset, nbytes, dtype.itemsize, swap), dtype)

        return _unpickle(io.BytesIO(data_pkl), storage)


def _load_legacy(path: str):
    """The pre-1.6 format: magic, protocol, sys_info, the object pickle, the storage keys, then each storage
    as an int64 element count followed by its little-endian bytes."""
    buf = _map(path)  # read through the map: see _unpickle
    if _unpickle(buf) != LEGACY_MAGIC:
        raise CheckpointError(f"{path} is a pickle but not a torch checkpoint (no torch magic number)")
    if _unpickle(buf) != LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: unsupported legacy torch protocol version")
    _unpickle(buf)  # sys_info
    start = buf.tell()
    layout: dict[str, tuple[torch.dtype, int]] = {}

    def probe(key, dtype, numel):  # first pass: learn each storage's dtype and size, read no data
        if numel * dtype.itemsize > len(buf):
            raise CheckpointError(f"{path}: storage {key[:100]!r} is larger than the file")
        layout[key] = (dtype, numel)
        return _Storage(torch.empty(numel * dtype.itemsize, dtype=torch.uint8, device="meta"), dtype)

    _unpickle(buf, probe)
    keys = _unpickle(buf)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise CheckpointError(f"{path}: malformed storage key list")
    offsets, pos = {}, buf.tell()
    for key in keys:
        count = int.from_bytes(buf[pos:pos + 8], "little")
        if key not in layout or count != layout[key][1]:
            raise CheckpointError(f"{path}: storage {key[:100]!r} does not match the object pickle")
        offsets[key] = pos + 8
        pos += 8 + count * layout[key][0].itemsize

    def storage(key, dtype, numel):
        if key not in offsets:
            raise CheckpointError(f"{path}: storage {key[:100]!r} is missing from the storage list")
        return _Storage(_view(buf, offsets[key], numel * dtype.itemsize, dtype.itemsize), dtype)

    buf.seek(start)
    return _unpickle(buf, storage)
