"""PyTorch (EDM / Patch Diffusion) state-dict names and layouts <-> Flax variables of our networks.

Names: an optional leading ``model.`` (the precond wrapper) is dropped; ``enc.<res>_<name>`` and
``dec.<res>_<name>`` become the flat module names ``enc_<res>_<name>`` / ``dec_<res>_<name>``;
``MultistageUNet``'s per-stage decoders ``decs.<k>.<res>_<name>`` (a PyTorch ModuleList) become the
submodule ``decs_<k>`` holding ``<res>_<name>`` (Flax's name for element k of a list attribute); the other
dots are module nesting. Leaves: Linear/Conv ``weight`` -> ``kernel``, GroupNorm ``weight`` -> ``scale``,
``bias`` -> ``bias``; ``map_noise.freqs`` (NCSN++ Fourier frequencies) -> the ``buffers`` collection.
Layouts: conv ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``; linear ``[out, in]`` -> ``[in, out]``.

The ``resample_filter`` buffers of EDM's up/down-sampling convolutions are constants of the Flax
modules; they are checked against the filter the model implies and never loaded.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import flax.linen as nn
import numpy as np
from flax import traverse_util

from patch_diffusion.models import layers, registry

_TOP_SPLIT = re.compile(r"^(enc|dec)\.([^.]+)\.(.*)$")
# MultistageUNet's decoder list: decs.<k>.<rest>.
_STAGE_SPLIT = re.compile(r"^decs\.(\d+)\.(.*)$")
_STAGE_HEAD = re.compile(r"^decs_(\d+)$")
# Convolutions that read the raw network input (image + coordinate channels).
_INPUT_CONV = re.compile(r"^enc\.\d+x\d+_(conv|aux_skip|aux_residual)\.weight$")


class StateDictMismatchError(ValueError):
  """A state dict does not fit the network: lists every unknown, missing and mis-shaped key at once."""


def _strip(name: str) -> str:
  return name[len("model."):] if name.startswith("model.") else name


def flax_path(torch_name: str) -> tuple[str, ...]:
  """Module path + PyTorch leaf name for a (prefix-free) PyTorch name, e.g.
  ``enc.16x16_block0.conv0.weight`` -> ``('enc_16x16_block0', 'conv0', 'weight')``,
  ``decs.1.4x4_in0.conv0.weight`` -> ``('decs_1', '4x4_in0', 'conv0', 'weight')``."""
  m = _TOP_SPLIT.match(torch_name)
  if m:
    return (f"{m.group(1)}_{m.group(2)}",) + tuple(m.group(3).split("."))
  m = _STAGE_SPLIT.match(torch_name)
  if m:
    return (f"decs_{m.group(1)}",) + tuple(m.group(2).split("."))
  return tuple(torch_name.split("."))


def torch_name(path: tuple[str, ...]) -> str:
  """Inverse of ``flax_path`` for module paths: ``('enc_16x16_conv', 'weight')`` -> ``enc.16x16_conv.weight``,
  ``('decs_1', '4x4_in0', 'conv0', 'weight')`` -> ``decs.1.4x4_in0.conv0.weight``."""
  head = path[0]
  m = _STAGE_HEAD.match(head)
  if m:
    head = f"decs.{m.group(1)}"
  for top in ("enc_", "dec_"):
    if head.startswith(top):
      head = top[:-1] + "." + head[len(top):]
      break
  return ".".join((head,) + tuple(path[1:]))


def _leaf_candidates(leaf: str) -> tuple[str, ...]:
  return {"weight": ("kernel", "scale"), "bias": ("bias",)}.get(leaf, ())


def _to_flax(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:
    return np.transpose(array, (1, 0))
  return array


def _to_torch(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return np.transpose(array, (3, 2, 0, 1))
  if array.ndim == 2:
    return np.transpose(array, (1, 0))
  return array


def model_resample_filter(model: nn.Module) -> tuple[float, ...]:
  """The 1-D resampling taps every up/down convolution of ``model`` uses."""
  return tuple(getattr(model, "resample_filter", (1, 1)))


def _layout(model: nn.Module):
  abstract = registry.abstract_variables(model)
  params = traverse_util.flatten_dict(abstract.get("params", {}))
  buffers = traverse_util.flatten_dict(abstract.get("buffers", {}))
  resample = {path[:-1] for path in traverse_util.flatten_dict(abstract.get("intermediates", {}))
              if path[-1] == "resample_filter"}
  return params, buffers, resample


def torch_state_dict_to_variables(state_dict: Mapping[str, np.ndarray], model: nn.Module, *,
                                  pad_input_channels: int = 0) -> dict:
  """Converts a PyTorch EDM/Patch Diffusion network state dict into Flax variables for ``model``.

  Args:
    state_dict: name -> array in PyTorch layout (``model.`` prefix optional), parameters and buffers.
    model: a ``SongUNet`` / ``DhariwalUNet`` / ``MultistageUNet`` built with the checkpoint's
      architecture (a MultistageUNet's stage boundaries are constructor arguments, not tensors: build it
      with the checkpoint's ``stage_interval``, see ``multistage_unet.boundaries_from_stage_interval``).
    pad_input_channels: append this many zero input channels to the convolutions that read the raw
      input (``enc.<R>x<R>_conv``, ``*_aux_skip``, ``*_aux_residual``). Use 2 for plain EDM networks, which
      have no coordinate channels: zero weights make the converted network ignore the coordinates, so it
      computes exactly what the original does.

  Returns:
    ``{'params': nested dict of float32 numpy arrays[, 'buffers': ...]}``, ready for ``model.apply``.

  Raises:
    StateDictMismatchError: listing all unknown, missing and mis-shaped keys and any resample filter
      that differs from the model's.
  """
  exp_params, exp_buffers, exp_resample = _layout(model)
  f_expected = layers.resample_filter_2d(model_resample_filter(model))[None, None]
  params, buffers = {}, {}
  seen = set()  # targets present in the state dict, even if mis-shaped
  unknown, shape_errors, filter_errors = [], [], []
  for raw_name in state_dict:
    name = _strip(raw_name)
    path = flax_path(name)
    value = np.asarray(state_dict[raw_name])
    if path[-1] == "resample_filter" and path[:-1] in exp_resample:
      if value.shape != f_expected.shape or not np.allclose(value, f_expected, rtol=0, atol=1e-6):
        filter_errors.append(f"{raw_name}: {value.reshape(-1)[:16].tolist()} != expected "
                             f"{f_expected.reshape(-1).tolist()}")
      continue
    if path in exp_buffers:
      target, expected, store = path, exp_buffers[path], buffers
    else:
      target = next((path[:-1] + (c,) for c in _leaf_candidates(path[-1]) if path[:-1] + (c,) in exp_params),
                    None)
      if target is None:
        unknown.append(raw_name)
        continue
      expected, store = exp_params[target], params
    seen.add(target)
    converted = _to_flax(value).astype(np.float32)
    if (pad_input_channels and _INPUT_CONV.match(name) and converted.ndim == 4
        and converted.shape[2] + pad_input_channels == expected.shape[2]):
      pad = np.zeros(converted.shape[:2] + (pad_input_channels, converted.shape[3]), np.float32)
      converted = np.concatenate([converted, pad], axis=2)
    if converted.shape != tuple(expected.shape):
      shape_errors.append(f"{raw_name}: got {tuple(value.shape)} (PyTorch layout), expected "
                          f"{tuple(_to_torch(np.empty(expected.shape, np.uint8)).shape)}")
      continue
    store[target] = converted
  prefix = "model." if any(k.startswith("model.") for k in state_dict) else ""
  missing = sorted([prefix + torch_name(p) for p in exp_buffers if p not in seen]
                   + [prefix + _torch_param_name(p) for p in exp_params if p not in seen])
  if unknown or missing or shape_errors or filter_errors:
    lines = [f"PyTorch state dict does not match {type(model).__name__}:"]
    for title, items in (("unknown keys", sorted(unknown)), ("missing keys", missing),
                         ("shape mismatches", shape_errors), ("resample filter mismatches", filter_errors)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines.extend(f"    {item}" for item in items)
    raise StateDictMismatchError("\n".join(lines))
  variables = {"params": traverse_util.unflatten_dict(params)}
  if buffers:
    variables["buffers"] = traverse_util.unflatten_dict(buffers)
  return variables


def _torch_param_name(path: tuple[str, ...]) -> str:
  leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
  return torch_name(path[:-1] + (leaf,))


def variables_to_torch_state_dict(variables: Mapping, model: nn.Module,
                                  prefix: Optional[str] = "model.") -> dict[str, np.ndarray]:
  """Inverse of ``torch_state_dict_to_variables``: PyTorch names and layouts, incl. resample buffers.

  Args:
    variables: ``{'params': ..., ['buffers': ...]}`` of ``model``.
    model: the network the variables belong to.
    prefix: prepended to every name (``'model.'`` as in EDM's precond wrappers; '' or None for none).

  Returns:
    name -> float32 numpy array, in the order of ``traverse_util.flatten_dict``.
  """
  prefix = prefix or ""
  out = {}
  for path, value in traverse_util.flatten_dict(dict(variables.get("params", {}))).items():
    out[prefix + _torch_param_name(path)] = _to_torch(np.asarray(value, np.float32))
  for path, value in traverse_util.flatten_dict(dict(variables.get("buffers", {}))).items():
    out[prefix + torch_name(path)] = np.asarray(value, np.float32)
  _, _, resample = _layout(model)
  f = layers.resample_filter_2d(model_resample_filter(model))[None, None].astype(np.float32)
  for path in sorted(resample):
    out[prefix + torch_name(path + ("resample_filter",))] = f.copy()
  return out
