"""EDM / Patch Diffusion checkpoints read without torch (.pkl snapshots, .pt, .npz) and the converter.

The EDM snapshots are generated here byte-for-byte in the structure EDM's ``torch_utils.persistence``
writes (same GLOBAL names, persistent ids, storage records) with the torch-like pickler of
``test_torch_formats.py``, so no torch is needed. The generic ``torch.save`` reader tests live there.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from patch_diffusion.interop.torch_mapping import torch_state_dict_to_variables
from patch_diffusion.interop import edm_checkpoint
from patch_diffusion.interop import torch_formats
from patch_diffusion.tools import convert_torch
# The torch-like pickler shared by the reader tests (pytest puts tests/ on sys.path).
from test_torch_formats import G, NewObj, Reduce, dumps, legacy_storage_bytes, ordered_dict, tensor

FIXTURES = ("ddpmpp_uncond", "ddpmpp_cond", "ncsnpp_uncond", "adm_cond")


# ------------------------------------------------------------------------------------------------
# EDM structures (``torch_utils.persistence`` classes, torch.nn containers, pickled tensors).


def pickled_tensor(array):
  """A tensor inside a plain ``pickle.dump``: its storage goes through ``_load_from_bytes``."""
  storage = Reduce(G("torch.storage", "_load_from_bytes"), (legacy_storage_bytes(array),))
  return tensor(storage, array.shape)


def parameter(array):
  return Reduce(G("torch._utils", "_rebuild_parameter"), (pickled_tensor(array), True, ordered_dict({})))


def persistent(class_name, state, source):
  meta = dict(type="class", version=6, module_src=source, class_name=class_name, state=state)
  return Reduce(G("torch_utils.persistence", "_reconstruct_persistent_obj"), (meta,))


def module_tree(state_dict, root_class, init_kwargs, source):
  """Nested EDM modules holding ``state_dict`` (names ``a.b.c.weight``); enc/dec are ModuleDicts."""
  tree = {}
  for name, value in state_dict.items():
    *path, leaf = name.split(".")
    node = tree
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value

  def build(name, node, top=False):
    params, buffers, children = {}, {}, {}
    for key, value in node.items():
      if isinstance(value, dict):
        children[key] = build(key, value)
      elif key in ("resample_filter", "freqs"):
        buffers[key] = pickled_tensor(value)
      else:
        params[key] = parameter(value)
    if "weight" in params and "resample_filter" not in buffers:
      buffers["resample_filter"] = None  # EDM registers None buffers for non-resampling convs
    state = {"training": False, "_parameters": ordered_dict(params), "_buffers": ordered_dict(buffers),
             "_non_persistent_buffers_set": set(), "_backward_hooks": ordered_dict({}),
             "_modules": ordered_dict(children), "_init_args": (),
             "_init_kwargs": init_kwargs if top else {}}
    if name in ("enc", "dec"):  # torch.nn.ModuleDict: not a persistent class
      return NewObj(G("torch.nn.modules.container", "ModuleDict"), state)
    return persistent(root_class if top else "UNetBlock", state, source)

  return build("", tree, top=True)


def load_fixture_state(fixtures_dir, name):
  data = np.load(fixtures_dir / "edm_torch" / f"{name}.npz")
  meta = json.loads((fixtures_dir / "edm_torch" / f"{name}.json").read_text())
  return {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}, meta


def evil_source(marker):
  return (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\n"
          "raise SystemExit('embedded module source was executed')\n")


def snapshot_bytes(state, meta, marker, *, class_name="Patch_EDMPrecond", img_channels=None, extra=None):
  init_kwargs = dict(img_resolution=meta["img_resolution"],
                     img_channels=meta["in_channels"] if img_channels is None else img_channels,
                     out_channels=meta["out_channels"], label_dim=meta["label_dim"], use_fp16=False,
                     model_type=meta["model_type"], **meta["model_kwargs"])
  if class_name != "Patch_EDMPrecond":
    del init_kwargs["out_channels"]
  snapshot = {
      "ema": module_tree(state, class_name, init_kwargs, evil_source(marker)),
      "loss_fn": persistent("Patch_EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5},
                            evil_source(marker)),
      "augment_pipe": None,
      "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "data.zip",
                         "use_labels": meta["label_dim"] > 0, "xflip": True, "cache": True,
                         "resolution": meta["img_resolution"], "max_size": 1000},
  }
  snapshot.update(extra or {})
  return dumps(snapshot, 4)


# ------------------------------------------------------------------------------------------------
# Readers.


def test_torch_save_zip_fixture_matches_npz(fixtures_dir):
  net = torch_formats.read_network(fixtures_dir / "edm_torch" / "ddpmpp_uncond_state_dict.pt")
  ref, _ = load_fixture_state(fixtures_dir, "ddpmpp_uncond")
  assert list(net.state_dict) == list(ref) and net.class_name is None
  for key, value in ref.items():
    assert net.state_dict[key].dtype == value.dtype
    np.testing.assert_array_equal(net.state_dict[key], value, err_msg=key)


def test_edm_snapshot_pickle_never_runs_embedded_code(fixtures_dir, tmp_path):
  state, meta = load_fixture_state(fixtures_dir, "ddpmpp_cond")
  marker = tmp_path / "marker.txt"
  path = tmp_path / "network-snapshot-000100.pkl"
  path.write_bytes(snapshot_bytes(state, meta, marker))
  raw = torch_formats.load_pickle(path)
  assert not marker.exists()
  assert isinstance(raw["ema"], torch_formats.PersistentObject) and "write_text" in raw["ema"].module_src

  net = torch_formats.read_network(path)
  assert not marker.exists()
  assert net.class_name == "Patch_EDMPrecond"
  assert net.init_kwargs["model_type"] == "SongUNet" and net.init_kwargs["label_dim"] == 10
  assert net.extra["dataset_kwargs"]["xflip"] is True
  assert sorted(net.state_dict) == sorted(state)  # None buffers are skipped
  for key, value in state.items():
    np.testing.assert_array_equal(net.state_dict[key], value, err_msg=key)
  with pytest.raises(KeyError, match="no entry 'ema_typo'"):
    torch_formats.read_network(path, key="ema_typo")


def test_npz_reader(fixtures_dir, tmp_path):
  net = torch_formats.read_network(fixtures_dir / "edm_torch" / "adm_cond.npz")
  ref, _ = load_fixture_state(fixtures_dir, "adm_cond")
  assert sorted(net.state_dict) == sorted(ref)
  plain = tmp_path / "plain.npz"
  np.savez(plain, **{"model.map_layer0.weight": ref["model.map_layer0.weight"]})
  assert list(torch_formats.read_network(plain).state_dict) == ["model.map_layer0.weight"]


# ------------------------------------------------------------------------------------------------
# Converter.


@pytest.mark.parametrize("name", FIXTURES)
def test_architecture_inferred_from_tensors(fixtures_dir, name):
  state, meta = load_fixture_state(fixtures_dir, name)
  class_name, kwargs = edm_checkpoint.infer_network_kwargs(state)
  assert class_name == meta["model_type"]
  for key, value in meta["model_kwargs"].items():
    if key != "dropout":
      assert kwargs[key] == (tuple(value) if isinstance(value, list) else value), key
  assert (kwargs["in_channels"], kwargs["out_channels"], kwargs["label_dim"], kwargs["img_resolution"]) == (
      meta["in_channels"], meta["out_channels"], meta["label_dim"], meta["img_resolution"])


@pytest.mark.parametrize("name", FIXTURES)
def test_convert_npz_matches_direct_mapping(fixtures_dir, name):
  state, meta = load_fixture_state(fixtures_dir, name)
  variables, config = edm_checkpoint.convert(str(fixtures_dir / "edm_torch" / f"{name}.npz"))
  assert config.data.resolution == meta["img_resolution"]
  assert config.data.num_channels == meta["img_channels"]
  assert config.data.use_labels == (meta["label_dim"] > 0) and config.data.num_classes == meta["label_dim"]
  assert config.model.arch == {"ddpmpp_uncond": "ddpmpp", "ddpmpp_cond": "ddpmpp",
                               "ncsnpp_uncond": "ncsnpp", "adm_cond": "adm"}[name]
  assert config.model.arch_presets is False and config.edm.precond == "edm"
  from patch_diffusion.models import create_model
  model = create_model(config.model, img_resolution=meta["img_resolution"],
                       img_channels=meta["img_channels"], label_dim=meta["label_dim"])
  direct = torch_state_dict_to_variables(state, model)
  flat_a = {k: v for k, v in _flat(variables)}
  flat_b = {k: v for k, v in _flat(direct)}
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key])


def _flat(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def test_convert_snapshot_uses_recorded_kwargs(fixtures_dir, tmp_path):
  state, meta = load_fixture_state(fixtures_dir, "ncsnpp_uncond")
  meta["model_kwargs"]["dropout"] = 0.05
  path = tmp_path / "snap.pkl"
  path.write_bytes(snapshot_bytes(state, meta, tmp_path / "marker"))
  variables, config = edm_checkpoint.convert(str(path), {"data.name": "celeb_a"})
  assert not (tmp_path / "marker").exists()
  assert config.model.dropout == 0.05 and config.model.arch == "ncsnpp"
  assert config.model.resample_filter == (1, 3, 3, 1) and config.data.xflip is True
  assert config.data.name == "celeb_a"
  np.testing.assert_array_equal(variables["buffers"]["map_noise"]["freqs"], state["model.map_noise.freqs"])
  # Flags win over the recorded kwargs.
  _, config = edm_checkpoint.convert(str(path), {"dropout": 0.0})
  assert config.model.dropout == 0.0


def test_convert_plain_edm_network_pads_coordinates(fixtures_dir, tmp_path):
  state, meta = load_fixture_state(fixtures_dir, "ddpmpp_uncond")
  edm_state = dict(state)
  edm_state["model.enc.16x16_conv.weight"] = state["model.enc.16x16_conv.weight"][:, :3]
  path = tmp_path / "edm.pkl"
  path.write_bytes(snapshot_bytes(edm_state, meta, tmp_path / "marker", class_name="EDMPrecond",
                                  img_channels=3))
  variables, config = edm_checkpoint.convert(str(path))
  kernel = variables["params"]["enc_16x16_conv"]["kernel"]
  assert kernel.shape == (3, 3, 5, 32) and not kernel[:, :, 3:].any()
  np.testing.assert_array_equal(kernel[:, :, :3], edm_state["model.enc.16x16_conv.weight"].transpose(2, 3, 1, 0))
  assert config.data.num_channels == 3 and config.edm.precond == "edm"


def test_convert_errors_are_clear(fixtures_dir, tmp_path):
  state, _ = load_fixture_state(fixtures_dir, "ddpmpp_uncond")
  bad = dict(state)
  bad["model.unexpected"] = np.zeros(3, np.float32)
  del bad["model.map_layer1.bias"]
  path = tmp_path / "bad.npz"
  np.savez(path, **bad)
  with pytest.raises(ValueError) as info:
    edm_checkpoint.convert(str(path))
  assert "model.unexpected" in str(info.value) and "map_layer1.bias" in str(info.value)
  with pytest.raises(ValueError, match="img_channels=4"):
    edm_checkpoint.convert(str(fixtures_dir / "edm_torch" / "ddpmpp_uncond.npz"), {"img_channels": 4})


def test_command_line_writes_pretrained_directory(fixtures_dir, tmp_path):
  from patch_diffusion import checkpointing
  dst = tmp_path / "converted"
  convert_torch.main([str(fixtures_dir / "edm_torch" / "ddpmpp_uncond_state_dict.pt"), str(dst),
                      "--dropout", "0.05", "--set", "data.name=celeb_a"])
  variables, config = checkpointing.load_pretrained(str(dst))
  assert config.model.arch == "ddpmpp" and config.model.dropout == 0.05 and config.data.name == "celeb_a"
  assert tuple(config.model.channel_mult) == (1, 2, 2) and config.data.resolution == 16
  ref, _ = load_fixture_state(fixtures_dir, "ddpmpp_uncond")
  np.testing.assert_array_equal(np.asarray(variables["params"]["enc_16x16_conv"]["kernel"]),
                                ref["model.enc.16x16_conv.weight"].transpose(2, 3, 1, 0))
