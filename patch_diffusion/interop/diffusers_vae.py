"""diffusers ``AutoencoderKL`` weights (safetensors) -> Flax params of ``models.vae``, without torch.

Accepted inputs (``load_vae``):

* a diffusers model directory holding ``config.json`` and ``diffusion_pytorch_model.safetensors`` (as
  ``save_pretrained`` writes it, e.g. a download of ``stabilityai/sd-vae-ft-ema``), or a pipeline directory
  whose ``vae/`` subfolder is one;
* a ``.safetensors`` file in diffusers naming, with ``config=`` (a ``config.json`` path, its dict or a
  ``VAEConfig``). Without a config the architecture is read off the tensor shapes (levels, channels, blocks
  per level, latent and image channels); the two settings the weights cannot tell, ``norm_num_groups``
  and ``scaling_factor``, then take the Stable Diffusion 1.x/2.x values 32 and 0.18215. Pass a config for
  any other VAE (SDXL's uses ``scaling_factor`` 0.13025).

Names: diffusers' state-dict names with ``.<index>`` written ``_<index>`` are the Flax module paths
(``encoder.down_blocks.1.resnets.0.conv1.weight`` -> ``encoder/down_blocks_1/resnets_0/conv1/kernel``);
``weight`` is ``scale`` for GroupNorms and ``kernel`` otherwise. Both attention namings load:

* current (diffusers >= 0.15): ``attentions.0.{to_q, to_k, to_v, to_out.0}``;
* legacy (files uploaded before 2023, ``sd-vae-ft-ema`` among them): ``attentions.0.{query, key, value,
  proj_attn}``.

Layouts: conv ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``; linear ``[out, in]`` -> ``[in, out]``; an
attention projection stored as a 1×1 conv ``[out, in, 1, 1]`` is accepted as the linear it is. Every array
becomes float32 (float16 and bfloat16 files included).

Not supported: CompVis / LDM naming (``encoder.down.0.block.0...``, ``first_stage_model.*``, the original
``.ckpt`` files) and PyTorch pickles (``.bin``); convert those with diffusers first.

Any mismatch raises one ``VAEWeightsError`` listing every unknown, duplicate, missing and mis-shaped key.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Mapping, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from patch_diffusion.models.vae import AutoencoderKL, VAEConfig, abstract_vae_params

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

#: Legacy diffusers attention names -> current ones (inside ``...attentions.<i>.``).
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
#: Flax module names of the attention projections (linear layers).
_ATTENTION_PROJECTIONS = frozenset({"to_q", "to_k", "to_v", "to_out_0"})
# Names only CompVis/LDM checkpoints use; they get a hint in the error instead of a silent mismatch.
_COMPVIS = re.compile(r"^first_stage_model\.|\.(down|up)\.\d+\.block\.|nin_shortcut|\.attn_1\.|\.norm_out\.")

ConfigLike = Union[None, str, os.PathLike, Mapping[str, Any], VAEConfig]


class VAEWeightsError(ValueError):
  """A VAE state dict does not fit the module: lists every unknown, duplicate, missing and mis-shaped key."""


# ------------------------------------------------------------------------------------------------
# Names and layouts.


def flax_param_path(name: str) -> tuple[str, ...]:
  """Flax param path of a diffusers state-dict name (either attention naming).

  ``decoder.mid_block.attentions.0.proj_attn.weight`` -> ``('decoder', 'mid_block', 'attentions_0',
  'to_out_0', 'kernel')``. Purely by name: whether the path exists is checked against a module elsewhere.
  """
  *modules, leaf = name.split(".")
  if "attentions" in modules and modules and modules[-1] in LEGACY_ATTENTION_NAMES:
    modules = modules[:-1] + LEGACY_ATTENTION_NAMES[modules[-1]].split(".")
  path: list[str] = []
  for part in modules:
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  if leaf == "weight":
    leaf = "scale" if path and "norm" in path[-1] else "kernel"
  return tuple(path) + (leaf,)


def _layout(path: tuple[str, ...], shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(reshape_to, permutation)`` taking a PyTorch-layout array of ``shape`` to the Flax layout."""
  shape = tuple(int(s) for s in shape)
  if path[-1] != "kernel":
    return shape, tuple(range(len(shape)))
  if len(shape) == 4 and len(path) >= 2 and path[-2] in _ATTENTION_PROJECTIONS and shape[2:] == (1, 1):
    shape = shape[:2]  # a 1x1-conv attention projection is a linear layer
  if len(shape) == 4:
    return shape, (2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
  if len(shape) == 2:
    return shape, (1, 0)  # [out, in] -> [in, out]
  return shape, tuple(range(len(shape)))


def flax_shape(path: tuple[str, ...], torch_shape: Sequence[int]) -> tuple[int, ...]:
  """Shape a PyTorch-layout tensor of ``torch_shape`` has once converted to the Flax param at ``path``."""
  reshape, perm = _layout(path, torch_shape)
  return tuple(reshape[p] for p in perm)


def to_flax_array(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  """Converts one PyTorch-layout tensor to the float32 Flax layout of the param at ``path``."""
  reshape, perm = _layout(path, array.shape)
  return np.ascontiguousarray(np.transpose(np.asarray(array).reshape(reshape), perm)).astype(np.float32)


def _torch_shape(flax_shape_: Sequence[int]) -> tuple[int, ...]:
  s = tuple(flax_shape_)
  if len(s) == 4:
    return (s[3], s[2], s[0], s[1])
  return s[::-1] if len(s) == 2 else s


def _torch_name(path: tuple[str, ...]) -> str:
  """Current diffusers name of a Flax param path (inverse of ``flax_param_path``)."""
  parts = []
  for p in path[:-1]:
    m = re.fullmatch(r"(.+)_(\d+)", p)
    parts.extend([m.group(1), m.group(2)] if m else [p])
  return ".".join(parts + ["weight" if path[-1] in ("kernel", "scale") else path[-1]])


# ------------------------------------------------------------------------------------------------
# Matching a state dict (names + shapes) against a module.


def _plan(shapes: Mapping[str, Sequence[int]], expected: Optional[Mapping[tuple, tuple]]) -> dict:
  """``{name: flax path}`` for every entry of ``shapes``, or ``VAEWeightsError`` listing every problem.

  With ``expected`` (flat ``{path: flax shape}``), names whose path is not expected are unknown, expected
  paths no name reaches are missing and converted shapes must equal the expected ones.
  """
  plan, claimed = {}, {}
  unknown, duplicates, mis_shaped = [], [], []
  for name in sorted(shapes):
    path = flax_param_path(name)
    if path[-1] not in ("kernel", "scale", "bias") or (expected is not None and path not in expected):
      unknown.append(f"{name} {tuple(shapes[name])}")
      continue
    if path in claimed:
      duplicates.append(f"{claimed[path]} and {name} both map to {'/'.join(path)}")
      continue
    claimed[path] = name
    got = flax_shape(path, shapes[name])
    if expected is not None and got != tuple(expected[path]):
      mis_shaped.append(f"{name}: got {tuple(shapes[name])} (PyTorch layout), expected "
                        f"{_torch_shape(expected[path])}")
      continue
    plan[name] = path
  missing = sorted(_torch_name(p) for p in (expected or {}) if p not in claimed)
  if unknown or duplicates or missing or mis_shaped:
    lines = ["diffusers VAE state dict does not match the AutoencoderKL config:"]
    for title, items in (("unknown keys", unknown), ("duplicate keys", duplicates),
                         ("missing keys", missing), ("shape mismatches", mis_shaped)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines.extend(f"    {item}" for item in items)
    if any(_COMPVIS.search(n) for n in shapes):
      lines.append("  hint: these look like CompVis/LDM names, which this loader does not read; convert the "
                   "file with diffusers (AutoencoderKL.from_single_file(path).save_pretrained(dir)) and "
                   "load the directory")
    elif mis_shaped or missing:
      lines.append("  hint: pass the config.json that belongs to these weights (config=...)")
    raise VAEWeightsError("\n".join(lines))
  return plan


def _expected(config: VAEConfig) -> dict:
  abstract = abstract_vae_params(AutoencoderKL(config))["params"]
  return {path: tuple(v.shape) for path, v in traverse_util.flatten_dict(abstract).items()}


def map_state_dict_shapes(shapes: Mapping[str, Sequence[int]],
                          config: Optional[VAEConfig] = None) -> dict:
  """Maps state-dict names + PyTorch-layout shapes to the nested Flax param tree of shapes, without data.

  Args:
    shapes: ``{diffusers name: shape}`` (either attention naming), e.g. ``real_config_shapes.json``.
    config: when given, the result is also checked against ``AutoencoderKL(config)``: every entry must
      reach an existing param with the right shape and every param must be reached.

  Returns:
    Nested dict ``{'encoder': {'conv_in': {'kernel': (3, 3, 3, 128), ...}}, ...}`` of Flax-layout shape
    tuples (the structure of ``params``), one leaf per entry.

  Raises:
    VAEWeightsError: names that map to the same param (both namings present), leaves other than
      ``weight``/``bias``, and with ``config`` every unknown, missing and mis-shaped key.
  """
  plan = _plan(shapes, None if config is None else _expected(config))
  return traverse_util.unflatten_dict({path: flax_shape(path, shapes[name]) for name, path in plan.items()})


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: VAEConfig) -> dict:
  """diffusers ``AutoencoderKL`` state dict (PyTorch layouts) -> ``{'params': ...}`` of ``AutoencoderKL``.

  Args:
    state_dict: name -> array (numpy, any float dtype), either attention naming.
    config: the architecture the weights belong to.

  Returns:
    ``{'params': nested dict of float32 numpy arrays}`` in Flax layouts.

  Raises:
    VAEWeightsError: listing every unknown, duplicate, missing and mis-shaped key at once.
  """
  plan = _plan({k: np.shape(v) for k, v in state_dict.items()}, _expected(config))
  return {"params": traverse_util.unflatten_dict(
      {path: to_flax_array(path, np.asarray(state_dict[name])) for name, path in plan.items()})}


def infer_config(shapes: Mapping[str, Sequence[int]], *, norm_num_groups: int = 32,
                 scaling_factor: float = 0.18215) -> VAEConfig:
  """The architecture a diffusers-named state dict implies (``norm_num_groups`` and ``scaling_factor``
  cannot be read off the shapes and are taken from the arguments).

  Raises:
    VAEWeightsError: when the names needed are absent (not a diffusers AutoencoderKL state dict).
  """
  levels = sorted({int(m.group(1)) for n in shapes
                   if (m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.0\.conv1\.weight$", n))})
  layers = {int(m.group(1)) for n in shapes
            if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.conv1\.weight$", n))}
  needed = ["encoder.conv_in.weight", "decoder.conv_out.weight", "post_quant_conv.weight"]
  absent = [n for n in needed if n not in shapes]
  if absent or not levels or levels != list(range(len(levels))) or not layers:
    hint = (" (these look like CompVis/LDM names: convert the file with diffusers first)"
            if any(_COMPVIS.search(n) for n in shapes) else "")
    raise VAEWeightsError(
        f"cannot read a diffusers AutoencoderKL architecture off these {len(shapes)} tensors "
        f"(absent: {absent or 'encoder.down_blocks.<i>.resnets.<j>.conv1.weight'}){hint}; "
        "pass config= (the config.json that belongs to the weights)")
  try:
    return VAEConfig(
        in_channels=int(shapes["encoder.conv_in.weight"][1]),
        out_channels=int(shapes["decoder.conv_out.weight"][0]),
        block_out_channels=tuple(int(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0])
                                 for i in levels),
        layers_per_block=len(layers),
        latent_channels=int(shapes["post_quant_conv.weight"][0]),
        norm_num_groups=norm_num_groups,
        scaling_factor=scaling_factor)
  except ValueError as e:
    raise VAEWeightsError(f"the tensor shapes imply an invalid architecture ({e}); pass config=") from e


# ------------------------------------------------------------------------------------------------
# Files.


def read_safetensors(path: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
  """All tensors of a ``.safetensors`` file as numpy arrays (original dtypes, PyTorch layouts)."""
  from safetensors.numpy import load_file  # only the loader needs safetensors
  return load_file(os.fspath(path))


def _resolve_config(config: ConfigLike) -> Optional[VAEConfig]:
  if config is None or isinstance(config, VAEConfig):
    return config
  if isinstance(config, Mapping):
    return VAEConfig.from_diffusers_config(config)
  p = pathlib.Path(config)
  if p.is_dir():
    p = p / CONFIG_NAME
  return VAEConfig.from_diffusers_config(json.loads(p.read_text()))


def _resolve_files(path: pathlib.Path) -> tuple[pathlib.Path, Optional[pathlib.Path]]:
  """(weights file, config.json or None) for a directory or a file."""
  if path.is_dir():
    if not (path / CONFIG_NAME).is_file() and (path / "vae" / CONFIG_NAME).is_file():
      path = path / "vae"  # a pipeline directory
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
      found = sorted(p.name for p in path.iterdir())
      raise FileNotFoundError(
          f"{weights} not found (directory holds {found}); pass the .safetensors file itself, with "
          f"config={path / CONFIG_NAME}, or convert .bin weights to safetensors first")
    config = path / CONFIG_NAME
    if not config.is_file():
      raise FileNotFoundError(f"{config} not found; pass config= (a diffusers config.json or VAEConfig)")
    return weights, config
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist")
  if path.suffix != ".safetensors":
    raise ValueError(f"{path}: only .safetensors files (or diffusers model directories) are read; "
                     "PyTorch pickles (.bin, .ckpt) need converting to safetensors first")
  return path, None


def load_vae(path: Union[str, os.PathLike], config: ConfigLike = None, *,
             dtype: Any = jnp.float32) -> tuple[AutoencoderKL, dict]:
  """Loads a diffusers ``AutoencoderKL`` without torch.

  Args:
    path: a diffusers model directory (``config.json`` + ``diffusion_pytorch_model.safetensors``; a
      pipeline directory with a ``vae/`` subfolder works too) or a ``.safetensors`` file.
    config: overrides the directory's ``config.json``; for a bare file, without it the architecture is
      inferred from the tensor shapes (``infer_config``: 32 groups, scaling factor 0.18215). A
      ``config.json`` path (or its directory), its dict, or a ``VAEConfig``.
    dtype: compute dtype of the returned module (parameters are float32 regardless).

  Returns:
    ``(module, variables)``: ``AutoencoderKL(config, dtype)`` and ``{'params': float32 numpy arrays}``,
    ready for ``encode_moments(module, variables, images)`` / ``decode_latents(module, variables, z)``.

  Raises:
    VAEWeightsError: the tensors do not fit the config (every problem listed).
    ValueError: an unsupported config (``VAEConfig.from_diffusers_config``) or file type.
    FileNotFoundError: missing weights or config in a directory.
  """
  weights, dir_config = _resolve_files(pathlib.Path(path))
  state_dict = read_safetensors(weights)
  cfg = _resolve_config(config if config is not None else dir_config)
  if cfg is None:
    cfg = infer_config({k: v.shape for k, v in state_dict.items()})
  return AutoencoderKL(cfg, dtype=dtype), convert_state_dict(state_dict, cfg)


def to_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
  """Flax VAE params -> a diffusers state dict (current attention names, PyTorch layouts, float32)."""
  out = {}
  for path, value in traverse_util.flatten_dict(dict(variables["params"])).items():
    arr = np.asarray(value, np.float32)
    if path[-1] == "kernel" and arr.ndim == 4:
      arr = np.transpose(arr, (3, 2, 0, 1))  # [kh, kw, in, out] -> [out, in, kh, kw]
    elif path[-1] == "kernel" and arr.ndim == 2:
      arr = arr.T  # [in, out] -> [out, in]
    out[_torch_name(path)] = np.ascontiguousarray(arr)
  return out


def save_vae(directory: Union[str, os.PathLike], config: VAEConfig, variables: Mapping) -> pathlib.Path:
  """Writes a diffusers model directory (``config.json`` + ``diffusion_pytorch_model.safetensors``) that
  diffusers and :func:`load_vae` both read; returns the directory."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tmp = directory / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
  save_file(to_state_dict(variables), str(tmp))
  os.replace(tmp, directory / WEIGHTS_NAME)
  (directory / CONFIG_NAME).write_text(json.dumps(config.to_diffusers_config(), indent=2) + "\n")
  return directory
