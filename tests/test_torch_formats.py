"""The torch-free reader of PyTorch files (``interop/torch_formats.py``): ``torch.save`` zip and legacy
streams, TorchScript archives, restricted unpickling.

Inputs are written here byte-for-byte in the structure PyTorch writes (same GLOBAL names, persistent ids,
storage records) by a small pickler that emits globals by name, so no torch is needed. The EDM snapshot
and Inception tests build their files with the same helpers.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from patch_diffusion.interop import torch_formats

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# ------------------------------------------------------------------------------------------------
# A pickler that writes PyTorch structures without importing torch.


class G:
  """A global ``module.name``, written as GLOBAL (protocol < 4) or STACK_GLOBAL."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle only checks callability of REDUCE functions
    raise AssertionError("never called")


class Reduce:
  """Pickles as ``func(*args)`` [+ BUILD state] [+ SETITEMS items]."""

  def __init__(self, func, args, state=None, items=None):
    self.func, self.args, self.state, self.items = func, args, state, items

  def __reduce__(self):
    return (self.func, self.args, self.state, None, iter(self.items.items()) if self.items else None)


class NewObj:
  """Pickles like ``copyreg.__newobj__``: GLOBAL cls, EMPTY_TUPLE, NEWOBJ, state, BUILD."""

  def __init__(self, cls, state):
    self.cls, self.state = cls, state


class PersId:
  """A persistent id written as given."""

  def __init__(self, pid):
    self.pid = pid


STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
           np.dtype(np.int64): "LongStorage"}


class StorageRef:
  """A storage with its data: pickles as the persistent id ``torch.save`` writes (zip or legacy form)."""

  def __init__(self, key, array):
    self.key, self.array = str(key), np.ascontiguousarray(array).reshape(-1)


class TorchLikePickler(pickle._Pickler):
  dispatch = pickle._Pickler.dispatch.copy()

  def __init__(self, file, protocol, legacy=False):
    super().__init__(file, protocol=protocol)
    self.legacy = legacy
    self.storages: dict[str, np.ndarray] = {}  # the StorageRefs met, in order

  def save_global_ref(self, obj):
    if self.proto >= 4:
      self.save(obj.module)
      self.save(obj.name)
      self.write(pickle.STACK_GLOBAL)
    else:
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

  def save_newobj(self, obj):
    self.save(obj.cls)
    self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
    self.save(obj.state)
    self.write(pickle.BUILD)

  dispatch[G] = save_global_ref
  dispatch[NewObj] = save_newobj

  def persistent_id(self, obj):
    if isinstance(obj, StorageRef):
      self.storages[obj.key] = obj.array
      pid = ("storage", G("torch", STORAGE[obj.array.dtype]), obj.key, "cpu", obj.array.size)
      return pid + (None,) if self.legacy else pid  # legacy ids end with the view (none here)
    return obj.pid if isinstance(obj, PersId) else None


def dumps(obj, protocol):
  buf = io.BytesIO()
  TorchLikePickler(buf, protocol=protocol).dump(obj)
  return buf.getvalue()


def ordered_dict(items):
  return Reduce(G("collections", "OrderedDict"), (), items=dict(items))


def tensor(storage, shape, stride=None, offset=0):
  shape = tuple(shape)
  if stride is None:
    stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
  return Reduce(G("torch._utils", "_rebuild_tensor_v2"),
                (storage, offset, shape, tuple(stride), False, ordered_dict({})))


def array_tensor(key, array):
  """A contiguous tensor holding ``array`` in its own storage ``key``."""
  return tensor(StorageRef(key, array), np.shape(array))


def torch_save_bytes(obj, legacy=False):
  """What ``torch.save(obj)`` writes (``legacy``: ``_use_new_zipfile_serialization=False``)."""
  buf = io.BytesIO()
  pickler = TorchLikePickler(buf, protocol=2, legacy=legacy)
  pickler.dump(obj)
  le = {k: a.astype(a.dtype.newbyteorder("<")).tobytes() for k, a in pickler.storages.items()}
  if not legacy:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
      z.writestr("archive/data.pkl", buf.getvalue())
      z.writestr("archive/byteorder", "little")
      for key, raw in le.items():
        z.writestr(f"archive/data/{key}", raw)
    return out.getvalue()
  out = io.BytesIO()
  for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                      "type_sizes": {"short": 2, "int": 4, "long": 8}}):
    pickle.dump(header, out, protocol=2)
  out.write(buf.getvalue())
  pickle.dump(sorted(le), out, protocol=2)
  for key in sorted(le):
    out.write(struct.pack("<q", pickler.storages[key].size) + le[key])
  return out.getvalue()


def write_torch_file(path, obj, legacy):
  path.write_bytes(torch_save_bytes(obj, legacy))


def legacy_storage_bytes(array, key="140234"):
  """What ``torch.save(storage, f, _use_new_zipfile_serialization=False)`` writes for one storage."""
  return torch_save_bytes(StorageRef(key, array), legacy=True)


# ------------------------------------------------------------------------------------------------
# torch.save files.


def test_generic_reader_matches_real_torch_save(fixtures_dir):
  """A state dict written by real torch.save (zip format) reads back exactly."""
  sd = torch_formats.load_torch_file(fixtures_dir / "edm_torch" / "ddpmpp_uncond_state_dict.pt")
  with np.load(fixtures_dir / "edm_torch" / "ddpmpp_uncond.npz") as z:
    ref = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
  assert set(sd) == set(ref)
  for k, v in ref.items():
    assert sd[k].dtype == v.dtype and sd[k].shape == v.shape
    np.testing.assert_array_equal(sd[k], v, err_msg=k)


@pytest.mark.parametrize("legacy", [False, True])
def test_reader_views_offsets_and_strides(tmp_path, legacy):
  base = np.arange(10, dtype=np.float32)
  st = StorageRef("7", base)
  obj = ordered_dict(dict(
      t=tensor(st, (3, 2), stride=(1, 3)),        # a transposed view of base[:6]
      tail=tensor(st, (4,), offset=6),            # the same storage at an offset
      count=array_tensor("8", np.array(5, np.int64))))  # 0-d int64 (num_batches_tracked)
  write_torch_file(tmp_path / "sd.pth", obj, legacy)
  out = torch_formats.load_torch_file(tmp_path / "sd.pth")
  np.testing.assert_array_equal(out["t"], base[:6].reshape(2, 3).T)
  np.testing.assert_array_equal(out["tail"], base[6:])
  assert out["count"] == 5 and out["count"].dtype == np.int64


@pytest.mark.parametrize("legacy", [False, True])
def test_load_torch_file_takes_path_bytes_or_file(tmp_path, legacy):
  a = np.arange(6, dtype=np.float16).reshape(3, 2)
  path = tmp_path / "t.pt"
  write_torch_file(path, {"a": array_tensor("0", a), "n": 3}, legacy)
  data = path.read_bytes()
  assert (data[:2] == b"PK") != legacy
  for source in (path, str(path), data, bytearray(data), io.BytesIO(data)):
    out = torch_formats.load_torch_file(source)
    assert out["n"] == 3 and out["a"].dtype == np.float16
    np.testing.assert_array_equal(out["a"], a)


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_zip_archive_strides_offsets_dtypes(tmp_path, byteorder):
  base = np.arange(12, dtype=np.float32)
  halfs = np.array([0.5, -2.0, 3.25], np.float16)
  longs = np.array([7, -3], np.int64)
  storage = lambda dtype, key, n: PersId(("storage", G("torch", STORAGE[np.dtype(dtype)]), key, "cpu", n))  # noqa: E731
  s0, s1, s2 = storage(np.float32, "0", 12), storage(np.float16, "1", 3), storage(np.int64, "2", 2)
  obj = ordered_dict({
      "matrix": tensor(s0, (3, 4)),
      "transposed": tensor(s0, (4, 3), stride=(1, 4)),       # a view sharing storage 0
      "tail": tensor(s0, (2, 2), stride=(4, 1), offset=6),  # offset view
      "half": tensor(s1, (3,)),
      "long": tensor(s2, (2,)),
      "scalar": tensor(s0, (), stride=(), offset=5),
  })
  order = "<" if byteorder == "little" else ">"
  path = tmp_path / "weights.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("weights/data.pkl", dumps(obj, 2))
    z.writestr("weights/byteorder", byteorder)
    for key, array in (("0", base), ("1", halfs), ("2", longs)):
      z.writestr(f"weights/data/{key}", array.astype(array.dtype.newbyteorder(order)).tobytes())
  sd = torch_formats.read_network(path).state_dict
  np.testing.assert_array_equal(sd["matrix"], base.reshape(3, 4))
  np.testing.assert_array_equal(sd["transposed"], base.reshape(3, 4).T)
  np.testing.assert_array_equal(sd["tail"], base.reshape(3, 4)[1:3, 2:4])
  np.testing.assert_array_equal(sd["half"], halfs)
  assert sd["half"].dtype == np.float16 and sd["long"].dtype == np.int64
  np.testing.assert_array_equal(sd["long"], longs)
  assert sd["scalar"].shape == () and sd["scalar"] == 5.0


def test_legacy_torch_save_file(tmp_path):
  # The pre-1.6 torch.save stream of a state dict: header pickles, object pickle, keys, raw storages.
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.array([1.5, 2.5], np.float32)
  buf = io.BytesIO()
  for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
    pickle.dump(header, buf, protocol=2)
  sa = PersId(("storage", G("torch", "FloatStorage"), "94", "cpu", 6, None))
  sb = PersId(("storage", G("torch", "FloatStorage"), "17", "cuda:0", 2, None))
  buf.write(dumps(ordered_dict({"a": tensor(sa, (2, 3)), "b": tensor(sb, (2,)),
                                "a_t": tensor(sa, (3, 2), stride=(1, 3))}), 2))
  pickle.dump(["17", "94"], buf, protocol=2)
  for array in (b, a):
    buf.write(struct.pack("<q", array.size) + array.tobytes())
  path = tmp_path / "legacy.pth"
  path.write_bytes(buf.getvalue())
  sd = torch_formats.read_network(path).state_dict
  np.testing.assert_array_equal(sd["a"], a)
  np.testing.assert_array_equal(sd["b"], b)
  np.testing.assert_array_equal(sd["a_t"], a.T)


def test_reader_refuses_foreign_globals(tmp_path):
  class Evil:

    def __reduce__(self):
      return (os.system, ("touch " + str(tmp_path / "pwned"),))

  with zipfile.ZipFile(tmp_path / "evil.pt", "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    torch_formats.load_torch_file(tmp_path / "evil.pt", allow_script_objects=True)
  assert not (tmp_path / "pwned").exists()


def test_hostile_globals_are_refused(tmp_path):
  marker = tmp_path / "pwned"
  for func in (G("os", "system"), G("builtins", "eval"), G("subprocess", "check_call"),
               G("builtins", "exec")):
    payload = dumps({"ema": Reduce(func, (f"touch {marker}",))}, 4)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
      torch_formats.load_pickle(payload)
  assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# TorchScript archives.


def torchscript_archive(path, marker, weight):
  """A ``torch.jit.save``-shaped archive: module tree of ``__torch__`` classes, TorchScript list builders,
  plus ``code/`` and ``constants.pkl`` members that would touch ``marker`` if anything ran them."""
  conv = NewObj(G("__torch__.net.___torch_mangle_2", "Conv2dLayer"), {
      "training": False, "weight": array_tensor("0", weight), "stride": 2,
      "padding": Reduce(G("torch.jit._pickle", "build_intlist"), ([0, 1],)),
      "names": Reduce(G("torch.jit._pickle", "restore_type_tag"), ({"a": 1}, "Dict[str, int]"))})
  root = NewObj(G("__torch__.wrap_net", "WrapNet"), {"training": False, "conv": conv})
  write_torch_file(path, root, legacy=False)
  with zipfile.ZipFile(path, "a") as z:
    z.writestr("archive/constants.pkl", dumps(Reduce(G("os", "system"), (f"touch {marker}",)), 2))
    z.writestr("archive/code/__torch__/wrap_net.py",
               f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\n")
    z.writestr("archive/version", "3\n")


def test_torchscript_archive_needs_opt_in_and_runs_nothing(tmp_path):
  marker, path = tmp_path / "pwned", tmp_path / "scripted.pt"
  weight = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
  torchscript_archive(path, marker, weight)
  with pytest.raises(pickle.UnpicklingError, match="TorchScript class __torch__.wrap_net.WrapNet"):
    torch_formats.load_torch_file(path)
  root = torch_formats.load_torch_file(path, allow_script_objects=True)
  assert not marker.exists()
  assert isinstance(root, torch_formats.ScriptObject)
  assert (type(root).__module__, type(root).__name__) == ("__torch__.wrap_net", "WrapNet")
  conv = root.conv
  assert type(conv).__name__ == "Conv2dLayer" and conv.training is False and conv.stride == 2
  np.testing.assert_array_equal(conv.weight, weight)
  assert conv.weight.dtype == np.float32
  assert conv.padding == [0, 1] and isinstance(conv.padding, list) and conv.names == {"a": 1}


def test_torchscript_objects_hold_only_attribute_dicts(tmp_path):
  bad_state = NewObj(G("__torch__.m", "Odd"), [1, 2])
  with pytest.raises(pickle.UnpicklingError, match="TorchScript object state"):
    torch_formats.load_torch_file(torch_save_bytes(bad_state), allow_script_objects=True)
  hostile = NewObj(G("__torch__.m", "M"), {"x": Reduce(G("os", "system"), (f"touch {tmp_path / 'pwned'}",))})
  with pytest.raises(pickle.UnpicklingError, match="refusing to load global os.system"):
    torch_formats.load_torch_file(torch_save_bytes(hostile), allow_script_objects=True)
  assert not (tmp_path / "pwned").exists()
