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
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import mmap
import os
import pickle
import sys
import zipfile
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
        return f"<unpickled {self.module}.{self.name} args={self.args!r} state={self.state!r}>"


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
            raise CheckpointError(f"malformed tensor record: size={size!r} stride={stride!r} offset={offset!r}")
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
        raise UnsafeCheckpointError(f"refusing tensor subclass record that calls {func!r}")
    return func(*args)


def _reconstructor(cls, base, state):
    """copyreg._reconstructor (protocol 0/1 objects): only for placeholders and plain containers."""
    if isinstance(cls, GlobalRef):
        return Placeholder(cls, () if state is None else (state,))
    if base is object and state is None and any(cls is t for t in _NEWOBJ_TYPES):
        return cls.__new__(cls)
    raise UnsafeCheckpointError(f"refusing copyreg._reconstructor({cls!r}, {base!r}, ...)")


def _bytes_like(kind):
    def build(*args):
        if args and isinstance(args[0], int):
            raise UnsafeCheckpointError(f"refusing {kind.__name__}({args[0]}) (allocation by size)")
        if len(args) == 2 and isinstance(args[0], str):  # (latin-1 text, encoding): the protocol-2 spelling
            return kind(_codecs_encode(*args))
        return kind(*args)
    return build


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


_DEFAULT_FACTORIES = (None, list, dict, set, int, float, str, collections.OrderedDict)


def _defaultdict(factory=None, *items):
    if not any(factory is f for f in _DEFAULT_FACTORIES):
        raise UnsafeCheckpointError(f"refusing collections.defaultdict with factory {factory!r}")
    return collections.defaultdict(factory, *items)


def _torch_size(dims=()):
    if not _ints(dims):
        raise CheckpointError(f"torch.Size of non-integers: {dims!r}")
    return torch.Size(dims)


def _torch_device(*args):
    if not all(isinstance(a, (str, int)) for a in args):
        raise CheckpointError(f"malformed torch.device{args!r}")
    return torch.device(*args)


_multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray


def _np_reconstruct(subtype, shape, typecode):
    if subtype is not np.ndarray:
        raise UnsafeCheckpointError(f"refusing numpy array of type {subtype!r}")
    return _multiarray._reconstruct(np.ndarray, shape, typecode)


def _np_scalar(dtype, *data):
    if not isinstance(dtype, np.dtype):
        raise CheckpointError(f"numpy scalar record with dtype {dtype!r}")
    return _multiarray.scalar(dtype, *data)


def _np_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise UnsafeCheckpointError(f"refusing numpy.dtype({spec!r})")
    return np.dtype(spec, align, True)  # always a fresh dtype: BUILD must never mutate numpy's shared ones


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
              "int", "int16", "short", "int8", "uint8", "bool", "complex64", "complex128"):
    _allow("torch", _name, getattr(torch, _name))
_allow("collections", "OrderedDict", collections.OrderedDict, collections.OrderedDict)
_allow("collections", "defaultdict", collections.defaultdict, _defaultdict)
_allow("argparse", "Namespace", argparse.Namespace, argparse.Namespace)
_allow("copyreg", "_reconstructor", _reconstructor, _reconstructor)
_allow("_codecs", "encode", _codecs_encode, _codecs_encode)
for _type in (set, frozenset, list, dict, tuple, complex, slice, range):
    _allow("builtins", _type.__name__, _type, _type)
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

    `storage(key, dtype, numel, view)` resolves torch persistent ids; None means the pickle may hold none.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, storage: Callable | None = None):
        super().__init__(file, encoding="utf-8")
        self._storage = storage
        self._storages: dict[str, _Storage] = {}

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
            raise CheckpointError(f"unsupported persistent id {pid!r:.100}")
        _, stype, key, _location, numel = pid[:5]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(stype, _StorageType) or type(numel) is not int or numel < 0:
            raise CheckpointError(f"malformed storage record {pid!r:.100}")
        if self._storage is None:
            raise CheckpointError("the pickle refers to tensor storages but none are available")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._storage(key, stype.dtype, numel)
        storage = self._storages[key]
        if view is not None:  # legacy storage views: (view_key, offset, size) in elements
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
            raise UnsafeCheckpointError(f"refusing to call {func!r}: not a known-safe callable")
        if not isinstance(args, tuple):
            raise CheckpointError(f"malformed call of {func!r}: arguments are a {type(args).__name__}")
        try:
            return entry[1](*args)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot rebuild {getattr(func, '__name__', func)!s}{args!r:.120}: {exc}") from exc

    def _new(self, cls, args, kwargs):
        if isinstance(cls, GlobalRef):
            return Placeholder(cls, args, kwargs)
        if any(cls is t for t in _NEWOBJ_TYPES):
            return cls.__new__(cls, *args, **kwargs)
        raise UnsafeCheckpointError(f"refusing to create an object of type {cls!r}")

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
            inst.__setstate__(state)
        elif type(inst) is np.ndarray:
            if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)
                    and (isinstance(state[4], list) or not state[2].hasobject)):
                raise UnsafeCheckpointError("malformed numpy array state")
            inst.__setstate__(state)
        elif type(inst) in (argparse.Namespace, collections.OrderedDict):
            parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
            for part in parts:
                if part is None:
                    continue
                if not (isinstance(part, dict) and all(isinstance(k, str) and not k.startswith("__") for k in part)):
                    raise UnsafeCheckpointError(f"refusing state {part!r:.80} for a {type(inst).__name__}")
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
            target[items[i]] = items[i + 1]

    def load_additems(self):
        items = self.pop_mark()
        if type(self.stack[-1]) is not set:
            raise UnsafeCheckpointError(f"refusing to add items to a {type(self.stack[-1]).__name__}")
        self.stack[-1].update(items)

    def load_ext(self):
        raise UnsafeCheckpointError("refusing pickle extension-registry opcodes (EXT1/EXT2/EXT4)")

    for _opcode, _method in ((pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj),
                             (pickle.NEWOBJ_EX, load_newobj_ex), (pickle.BUILD, load_build),
                             (pickle.APPEND, load_append), (pickle.APPENDS, load_appends),
                             (pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems),
                             (pickle.ADDITEMS, load_additems), (pickle.EXT1, load_ext),
                             (pickle.EXT2, load_ext), (pickle.EXT4, load_ext)):
        dispatch[_opcode[0]] = _method
    del _opcode, _method


def _unpickle(file, storage: Callable | None = None):
    try:
        return RestrictedUnpickler(file, storage).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError) as exc:
        raise CheckpointError(f"malformed pickle: {type(exc).__name__}: {exc}") from exc


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
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head[:1] == pickle.PROTO and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return _load_legacy(path)
    raise CheckpointError(f"{path} is not a torch checkpoint: neither the zip format nor the legacy pickle format")


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
    with zipfile.ZipFile(path) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        pickles = [n for n in infos if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if len(pickles) != 1:
            raise CheckpointError(f"{path} is a zip file but not a torch checkpoint (no single */data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in infos else "little"
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r}")
        data_pkl = zf.read(pickles[0])
        buf = _map(path)

        def storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise CheckpointError(f"{path}: storage {key!r} named by the pickle is missing from the archive")
            nbytes = numel * dtype.itemsize
            if info.file_size < nbytes:
                raise CheckpointError(f"{path}: storage {key!r} holds {info.file_size} bytes, expected {nbytes}")
            swap = byteorder != sys.byteorder
            if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; read (copy) if someone did
                raw = bytearray(zf.read(info)[:nbytes])
                return _Storage(_view(raw, 0, nbytes, dtype.itemsize, swap), dtype)
            header = buf[info.header_offset:info.header_offset + 30]
            if header[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{path}: corrupt zip entry for storage {key!r}")
            offset = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
                int.from_bytes(header[28:30], "little")
            return _Storage(_view(buf, offset, nbytes, dtype.itemsize, swap), dtype)

        return _unpickle(io.BytesIO(data_pkl), storage)


def _load_legacy(path: str):
    """The pre-1.6 format: magic, protocol, sys_info, the object pickle, the storage keys, then each storage
    as an int64 element count followed by its little-endian bytes."""
    with open(path, "rb") as fh:
        if _unpickle(fh) != LEGACY_MAGIC:
            raise CheckpointError(f"{path} is a pickle but not a torch checkpoint (no torch magic number)")
        if _unpickle(fh) != LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: unsupported legacy torch protocol version")
        _unpickle(fh)  # sys_info
        start = fh.tell()
        layout: dict[str, tuple[torch.dtype, int]] = {}

        def probe(key, dtype, numel):  # first pass: learn each storage's dtype and size, read no data
            layout[key] = (dtype, numel)
            return _Storage(torch.empty(numel * dtype.itemsize, dtype=torch.uint8, device="meta"), dtype)

        _unpickle(fh, probe)
        keys = _unpickle(fh)
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise CheckpointError(f"{path}: malformed storage key list")
        offsets, pos = {}, fh.tell()
        for key in keys:
            fh.seek(pos)
            count = int.from_bytes(fh.read(8), "little")
            if key not in layout or count != layout[key][1]:
                raise CheckpointError(f"{path}: storage {key!r} does not match the object pickle")
            offsets[key] = pos + 8
            pos += 8 + count * layout[key][0].itemsize
        buf = _map(path)

        def storage(key, dtype, numel):
            return _Storage(_view(buf, offsets[key], numel * dtype.itemsize, dtype.itemsize), dtype)

        fh.seek(start)
        return _unpickle(fh, storage)

