"""Restricted unpickling of NVIDIA stylegan2-ada-pytorch / stylegan3 network pickles.

An NVIDIA network pickle is a plain `pickle.dump` of a dict such as
``{"G": ..., "D": ..., "G_ema": ..., "augment_pipe": ..., "training_set_kwargs": {...}}``. Every
network in it was reduced by `torch_utils.persistence` to a call
``_reconstruct_persistent_obj(meta)`` where ``meta = {type: 'class', version, module_src,
class_name, state}``: the original loader *executes* ``module_src`` (Python source embedded in the
file) and then restores ``state`` (the module's ``__dict__``: ``_parameters``, ``_buffers``,
``_modules``, ``_init_kwargs``, other attributes). Loading such a file with `pickle.load` therefore
runs arbitrary code from the file.

`SafeNetworkUnpickler` never imports or calls anything the file names. Its `find_class` maps an
allow-list of globals to our own stand-ins and refuses every other global with
`UnsafeCheckpointError`:

* ``torch_utils.persistence._reconstruct_persistent_obj`` -> returns a `PersistentStub` holding the
  class name and the state; ``module_src`` is kept as an inert string and never executed.
* ``dnnlib.util.EasyDict`` -> a plain dict subclass.
* classes of the network code (``training.*``, ``torch_utils.*``, ``dnnlib.*``, the persistence
  generated modules ``_imported_module_<hex>``, ``torch.nn.modules.*``) -> generated `ModuleStub`
  subclasses that only record their constructor arguments and pickled state. Names must look like
  classes (CamelCase identifiers), so functions such as ``torch_utils.persistence._src_to_module``
  are refused.
* torch tensor reconstruction: ``torch._utils._rebuild_tensor_v2`` & co. are replaced by checked
  wrappers that call torch's own rebuild functions; storages (``torch.storage._load_from_bytes``,
  whose payload is a legacy ``torch.save`` of one storage) are read with
  ``torch.load(..., weights_only=True)``, never with the unrestricted loader.
* numpy scalars/arrays (``numpy[._]core.multiarray._reconstruct``/``scalar``, ``numpy.dtype``),
  ``collections.OrderedDict``, a few inert builtins (set, frozenset, slice, complex, ...), torch
  dtypes, ``torch.device`` and ``torch.Size``.

Everything else -- ``os.system``/``posix.system``, ``builtins.eval``/``exec``/``getattr``,
``subprocess.*``, ``torch.load``, any ``__reduce__`` to an arbitrary callable -- raises
`UnsafeCheckpointError` naming the file and the offending global.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint references code that we refuse to run; the file cannot be loaded safely."""


# ---------------------------------------------------------------------------------------------
# Stand-ins


class PersistentStub:
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` becomes: inert data.

    ``module_src`` is the Python source the original loader would exec; here it is only a string.
    """

    def __init__(self, meta: dict):
        if not isinstance(meta, dict):
            raise pickle.UnpicklingError("persistent object metadata is not a dict")
        self.type = meta.get("type")
        self.version = meta.get("version")
        self.class_name = str(meta.get("class_name"))
        src = meta.get("module_src")
        self.module_src: str = src if isinstance(src, str) else ""
        state = meta.get("state")
        self.state: dict = dict(state) if isinstance(state, dict) else {}

    @property
    def init_args(self) -> tuple:
        args = self.state.get("_init_args", ())
        return tuple(args) if isinstance(args, (tuple, list)) else ()

    @property
    def init_kwargs(self) -> dict:
        kw = self.state.get("_init_kwargs", {})
        return plain(kw) if isinstance(kw, dict) else {}

    def __repr__(self) -> str:
        return f"PersistentStub({self.class_name!r})"


class ModuleStub:
    """Generic stand-in for a class of the pickled network code; records what pickle gives it."""

    _stub_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, {}, []
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE/INST call the class: keep the arguments only
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = dict(state) if isinstance(state, dict) else {"__state__": state}

    # list/dict subclasses receive their items through these
    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items) -> None:
        self.items.extend(items)

    def __setitem__(self, key, value) -> None:
        self.items.append((key, value))

    @property
    def class_name(self) -> str:
        return self._stub_name

    def __repr__(self) -> str:
        return f"ModuleStub({self._stub_name!r})"


class _EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access; we only need the dict)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update(state)


class _TypeMarker:
    """Stands for torch.Tensor / torch.nn.Parameter / numpy.ndarray: usable as a type tag in the
    rebuild calls, but calling it (which would allocate an arbitrary tensor) is refused."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError(f"direct construction of {self.name} is not allowed")


_TENSOR, _PARAMETER, _NDARRAY = _TypeMarker("torch.Tensor"), _TypeMarker("torch.nn.Parameter"), _TypeMarker("numpy.ndarray")

_stub_classes: dict[str, type] = {}


def _stub_class(module: str, name: str) -> type:
    key = f"{module}.{name}"
    cls = _stub_classes.get(key)
    if cls is None:
        cls = type(name, (ModuleStub,), {"_stub_name": key, "__module__": __name__})
        _stub_classes[key] = cls
    return cls


# ---------------------------------------------------------------------------------------------
# Checked replacements of torch / numpy / copyreg reconstruction functions


def _check_storage(storage: Any) -> None:
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"tensor rebuild got {type(storage).__name__}, expected a storage")


def _check_geometry(offset: Any, size: Any, stride: Any) -> None:
    ok = isinstance(offset, int) and all(isinstance(v, int) for v in (*tuple(size), *tuple(stride)))
    if not ok:
        raise pickle.UnpicklingError("malformed tensor geometry in pickle")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    _check_storage(storage)
    _check_geometry(storage_offset, size, stride)
    meta = metadata if isinstance(metadata, dict) else None
    # Hooks are never restored (they would be callables); requires_grad is irrelevant for inference.
    hooks = collections.OrderedDict()
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride), False, hooks, meta)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _check_storage(storage)
    _check_geometry(storage_offset, size, stride)
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("malformed tensor dtype in pickle")
    meta = metadata if isinstance(metadata, dict) else None
    hooks = collections.OrderedDict()
    return torch._utils._rebuild_tensor_v3(storage, storage_offset, tuple(size), tuple(stride), False, hooks, dtype, meta)


def _rebuild_tensor(storage, storage_offset, size, stride):
    _check_storage(storage)
    _check_geometry(storage_offset, size, stride)
    return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter rebuild got a non-tensor")
    return torch.nn.Parameter(data, requires_grad=False)


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILD_FUNCS or new_type not in (_TENSOR, _PARAMETER) or not isinstance(args, tuple):
        raise pickle.UnpicklingError("unsupported tensor subclass rebuild in pickle")
    t = func(*args)
    return torch.nn.Parameter(t, requires_grad=False) if new_type is _PARAMETER else t


_REBUILD_FUNCS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_tensor, _rebuild_parameter)


class _StorageLoader:
    """`torch.storage._load_from_bytes` with the unrestricted `torch.load` swapped for weights_only."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, blob: Any):
        if not isinstance(blob, (bytes, bytearray)):
            raise pickle.UnpicklingError("storage payload is not bytes")
        try:
            storage = torch.load(io.BytesIO(bytes(blob)), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{self.source}: an embedded tensor storage references code that torch's weights_only "
                f"loader refuses ({_first_line(e)}); this file cannot be loaded safely."
            ) from e
        _check_storage(storage)
        return storage


def _np_reconstruct(subtype, shape, dtype):
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("numpy array reconstruction of a non-ndarray type")
    if not (isinstance(shape, tuple) and all(isinstance(s, int) and 0 <= s <= 1 for s in shape)):
        raise pickle.UnpicklingError("unexpected numpy array placeholder shape")
    # The real data arrives through ndarray.__setstate__ (BUILD), sized by the file's own bytes.
    return np.ndarray.__new__(np.ndarray, shape, np.uint8)


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("numpy scalar without a dtype")
    if dtype.hasobject:
        return data
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("numpy scalar payload is not bytes")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _np_dtype(obj, align=False, copy=False):
    if not isinstance(obj, (str, bytes)):
        raise pickle.UnpicklingError("numpy dtype from a non-string spec")
    return np.dtype(obj.decode("ascii") if isinstance(obj, bytes) else obj, align=bool(align), copy=bool(copy))


def _np_frombuffer(buf, dtype, shape, order="C"):
    if not isinstance(buf, (bytes, bytearray, memoryview)) or not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("unexpected numpy _frombuffer call")
    if order not in ("C", "F") or not all(isinstance(s, int) for s in shape):
        raise pickle.UnpicklingError("unexpected numpy _frombuffer layout")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _codecs_encode(obj, encoding="utf-8"):
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return obj.encode(encoding)


def _copyreg_reconstructor(cls, base, state):
    if not (isinstance(cls, type) and issubclass(cls, (ModuleStub, _EasyDict))) or base not in (object, dict):
        raise pickle.UnpicklingError("copyreg._reconstructor of a non-stub class")
    obj = cls.__new__(cls)
    if base is dict and isinstance(obj, dict) and isinstance(state, dict):  # protocol 0/1 dict subclasses
        obj.update(state)
    return obj


def _reconstruct_persistent_obj(meta):
    return PersistentStub(meta)


def _first_line(e: BaseException) -> str:
    """The reason torch's weights_only loader gives, without its advice to load unrestricted."""
    text = str(e).strip()
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"unsupported global {m.group(1)}"
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if m:
        text = m.group(1).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[0][:200] if lines else type(e).__name__


_BUILTINS = {
    "set": set, "frozenset": frozenset, "slice": slice, "complex": complex, "bytearray": bytearray,
    "range": range, "object": object, "dict": dict, "list": list, "tuple": tuple,
}

_EXACT: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._utils", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TENSOR,
    ("torch._tensor", "Tensor"): _TENSOR,
    ("torch.nn.parameter", "Parameter"): _PARAMETER,
    ("torch", "device"): torch.device,
    ("torch", "Size"): torch.Size,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
}

_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_STUB_ROOTS = ("training", "torch_utils", "dnnlib", "networks", "torch.nn.modules")
_CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9_]*$")


def _stubbable(module: str, name: str) -> bool:
    if not _CLASS_NAME.match(name):
        return False
    if re.fullmatch(r"_imported_module_[0-9a-f]+", module):
        return True
    return any(module == r or module.startswith(r + ".") for r in _STUB_ROOTS)


class SafeNetworkUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only allow-listed globals to inert stand-ins."""

    def __init__(self, file, source: str = "<stream>"):
        super().__init__(file)
        self.source = source
        self._storage_loader = _StorageLoader(source)

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return self._storage_loader
        if (module, name) in _EXACT:
            return _EXACT[(module, name)]
        if module == "builtins" and name in _BUILTINS:
            return _BUILTINS[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if _stubbable(module, name):
            return _stub_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to unpickle global '{module}.{name}': it is not on the allow-list "
            "of an NVIDIA network pickle and could run arbitrary code; this file cannot be loaded safely."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(
            f"{self.source}: uses torch.save persistent storage ids, which NVIDIA network pickles never "
            "contain; if it is a torch.save checkpoint, give it a .pt extension"
        )


def load_network_pickle(path: str | os.PathLike) -> Any:
    """Unpickle an NVIDIA network pickle into plain containers, tensors and stubs; runs no file code."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return SafeNetworkUnpickler(f, source=str(path)).load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError, RuntimeError) as e:
            raise ValueError(f"{path}: not a readable NVIDIA network pickle ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------
# Walking the recovered module tree


def plain(obj: Any, _depth: int = 0) -> Any:
    """EasyDicts/OrderedDicts -> dicts, recursively (leaves other values alone)."""
    if _depth > 50:
        return obj
    if isinstance(obj, dict):
        return {k: plain(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v, _depth + 1) for v in obj]
    return obj


def stub_state(obj: Any) -> dict:
    """The pickled `__dict__` of a network module (persistent or plain)."""
    if isinstance(obj, (PersistentStub, ModuleStub)):
        return obj.state
    raise TypeError(f"expected a pickled network module, got {type(obj).__name__}")


def is_module(obj: Any) -> bool:
    return isinstance(obj, (PersistentStub, ModuleStub)) and isinstance(obj.state.get("_modules", {}), dict)


def children(obj: Any) -> dict[str, Any]:
    mods = stub_state(obj).get("_modules") or {}
    return {k: v for k, v in mods.items() if v is not None}


def module_state_dict(obj: Any, prefix: str = "", _depth: int = 0) -> dict[str, torch.Tensor]:
    """Flatten `_parameters`/`_buffers`/`_modules` like `nn.Module.state_dict()` would."""
    if _depth > 32:
        raise ValueError("network module tree is nested too deeply")
    st = stub_state(obj)
    skip = st.get("_non_persistent_buffers_set") or set()
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers", "_modules"):
        if not isinstance(st.get(group) or {}, dict):
            raise ValueError(f"{prefix or 'network'}: malformed {group} in the pickled module state")
    for group in ("_parameters", "_buffers"):
        for k, v in (st.get(group) or {}).items():
            if v is None or (group == "_buffers" and k in skip):
                continue
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{prefix}{k}: expected a tensor, got {type(v).__name__}")
            out[prefix + k] = v.detach()
    for k, child in children(obj).items():
        if not isinstance(child, (PersistentStub, ModuleStub)):
            raise ValueError(f"{prefix}{k}: unexpected submodule type {type(child).__name__}")
        out.update(module_state_dict(child, f"{prefix}{k}.", _depth + 1))
    return out
