"""PyTorch EDM / Patch Diffusion networks -> Flax variables and a full config (without torch).

The library behind ``python -m patch_diffusion.tools.convert_torch``: read a ``network-snapshot-*.pkl``,
``torch.save`` checkpoint or ``.npz`` (``torch_formats``), infer the architecture from the tensor names and
shapes (and the constructor kwargs EDM's persistence recorded), and map the state dict onto our networks
(``torch_mapping``). Where the settings come from, lowest to highest priority: the tensor names and shapes
of the state dict, the recorded constructor kwargs, then explicit overrides. ``dropout`` is not visible in
a state dict; it only matters for fine-tuning.

Plain EDM networks (``EDMPrecond`` / ``VPPrecond`` / ``VEPrecond``, no coordinate channels) are converted
with zero weights for the two coordinate input channels, so they compute exactly what the original does.

Multi-stage networks (Zhang et al. 2024, ``MultistageUNet``: decoders ``decs.<k>.``) become
``arch='ddpmpp-multistage'``; their stage boundaries come from the recorded ``stage_interval``, an override,
or (3 decoders, nothing recorded) the authors' defaults.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import pathlib
import re
import sys
from typing import Any, Mapping, Optional, Sequence

import ml_collections
import numpy as np

from patch_diffusion.interop import torch_formats
from patch_diffusion.interop.torch_mapping import torch_state_dict_to_variables
from patch_diffusion.models import registry
from patch_diffusion.models.multistage_unet import (DEFAULT_STAGE_BOUNDARIES, boundaries_from_stage_interval,
                                                   check_stage_boundaries)

MODEL_FIELDS = tuple(registry.DEFAULTS) + tuple(registry.MULTISTAGE_DEFAULTS) + ("arch", "dtype")
#: The authors' MultistageUNet constructor names -> ours.
_MULTISTAGE_KWARGS = {"en_model_channels": "model_channels", "de_model_channels": "decoder_channels"}
_PRECONDS = {"Patch_EDMPrecond": "edm", "EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
# Constructor kwargs of the precond wrappers that are not network fields.
_WRAPPER_KWARGS = ("img_resolution", "img_channels", "out_channels", "label_dim", "use_fp16", "model_type",
                   "sigma_min", "sigma_max", "sigma_data", "beta_d", "beta_min", "M", "epsilon_t",
                   "label_dropout")
# Defaults of our VP/VE preconditioning (patch_diffusion/edm/precond.py), which the config cannot change.
_FIXED_PRECOND = {"vp": dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)}


def default_config_path() -> pathlib.Path:
  return pathlib.Path(__file__).resolve().parents[2] / "configs" / "default.py"


def load_base_config(path: Optional[str] = None) -> ml_collections.ConfigDict:
  """``get_config()`` of ``configs/default.py`` (or of ``path``)."""
  path = pathlib.Path(path) if path else default_config_path()
  if not path.is_file():
    raise FileNotFoundError(f"base config {path} not found; pass --base_config configs/default.py")
  spec = importlib.util.spec_from_file_location("_convert_torch_base_config", path)
  module = importlib.util.module_from_spec(spec)
  if str(path.parent.parent) not in sys.path:  # experiment files do `from configs import default`
    sys.path.insert(0, str(path.parent.parent))
  spec.loader.exec_module(module)
  return module.get_config()


# ------------------------------------------------------------------------------------------------
# Architecture inference from a state dict.


def _taps_from_filter(f2d: np.ndarray) -> tuple[int, ...]:
  row = np.asarray(f2d, np.float64).reshape(f2d.shape[-2:])[0]
  taps = row / row[0]
  rounded = np.round(taps)
  if not np.allclose(taps, rounded, atol=1e-4):
    raise ValueError(f"cannot express resample filter row {row.tolist()} as integer taps")
  return tuple(int(t) for t in rounded)


def _infer_multistage(sd: Mapping[str, np.ndarray]) -> Optional[tuple[str, dict[str, Any]]]:
  """A ``MultistageUNet`` state dict (decoders ``decs.<k>.``): its shared part and decoder 0 read as a
  SongUNet, plus ``decoder_channels``; None for other networks. The stage boundaries are constructor
  arguments, not tensors: they come from recorded kwargs or the caller."""
  stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"decs\.(\d+)\.", k))})
  if not stages:
    return None
  if stages != list(range(len(stages))):
    raise ValueError(f"multi-stage state dict with decoders {stages}; expected decs.0 .. decs.{len(stages) - 1}")
  view = {k: v for k, v in sd.items() if not k.startswith("decs.")}
  view.update({"dec." + k[len("decs.0."):]: v for k, v in sd.items() if k.startswith("decs.0.")})
  _, kwargs = infer_network_kwargs(view)
  res0, mult0 = kwargs["img_resolution"], kwargs["channel_mult"][0]
  widths = []
  for k in stages:
    key = f"decs.{k}.{res0}x{res0}_block0.conv0.weight"
    if key not in sd or sd[key].shape[0] % mult0:
      raise ValueError(f"cannot infer the width of decoder {k} from {key}")
    widths.append(int(sd[key].shape[0]) // mult0)
  kwargs["decoder_channels"] = tuple(widths)
  return "MultistageUNet", kwargs


def infer_network_kwargs(state_dict: Mapping[str, np.ndarray]) -> tuple[str, dict[str, Any]]:
  """Reads the architecture off the tensor names and shapes of an EDM network state dict.

  Returns:
    ``(class_name, kwargs)``: 'SongUNet', 'DhariwalUNet' or 'MultistageUNet' (the authors' multi-stage
    U-Net: decoders ``decs.<k>.``; kwargs then include ``decoder_channels``, never ``stage_boundaries``)
    and EDM constructor kwargs including ``img_resolution``, ``in_channels``, ``out_channels``,
    ``label_dim`` (no ``dropout``).
  """
  sd = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state_dict.items()}
  multistage = _infer_multistage(sd)
  if multistage is not None:
    return multistage
  first = [k for k in sd if re.fullmatch(r"enc\.(\d+)x\1_conv\.weight", k)]
  if len(first) != 1:
    raise ValueError("not an EDM network state dict: expected one 'enc.<R>x<R>_conv.weight', "
                     f"found {first or 'none'}")
  res0 = int(first[0].split(".")[1].split("x")[0])
  w0 = sd[first[0]]
  adm = "out_conv.weight" in sd
  levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"enc\.(\d+)x\1_", k))}, reverse=True)
  if [res0 >> i for i in range(len(levels))] != levels:
    raise ValueError(f"unexpected encoder resolutions {levels}")
  num_blocks = len({m.group(1) for k in sd if (m := re.match(rf"enc\.{res0}x{res0}_block(\d+)\.", k))})
  level_channels = []
  for r in levels:
    key = f"enc.{r}x{r}_block0.conv0.weight"
    if key not in sd:
      raise ValueError(f"cannot infer the channels of level {r}x{r} (no {key})")
    level_channels.append(int(sd[key].shape[0]))
  attn = sorted({int(m.group(1)) for k in sd
                 if (m := re.match(r"(?:enc|dec)\.(\d+)x\1_block\d+\.qkv\.weight", k))}, reverse=True)
  emb_in, emb_out = (int(s) for s in sd["map_layer0.weight"].shape[::-1])
  kwargs: dict[str, Any] = dict(img_resolution=res0, in_channels=int(w0.shape[1]),
                                num_blocks=num_blocks, attn_resolutions=tuple(attn),
                                label_dim=int(sd["map_label.weight"].shape[1]) if "map_label.weight" in sd else 0,
                                augment_dim=int(sd["map_augment.weight"].shape[1])
                                if "map_augment.weight" in sd else 0)
  if adm:
    mc = emb_in
    kwargs.update(out_channels=int(sd["out_conv.weight"].shape[0]), model_channels=mc,
                  channel_mult_emb=emb_out // mc)
  else:
    mc = int(w0.shape[0])
    if f"dec.{res0}x{res0}_aux_conv.weight" not in sd:
      raise ValueError(f"SongUNet state dict without dec.{res0}x{res0}_aux_conv.weight")
    kwargs.update(out_channels=int(sd[f"dec.{res0}x{res0}_aux_conv.weight"].shape[0]), model_channels=mc,
                  channel_mult_emb=emb_out // mc, channel_mult_noise=emb_in // mc,
                  embedding_type="fourier" if "map_noise.freqs" in sd else "positional",
                  encoder_type="residual" if any("_aux_residual." in k for k in sd)
                  else "skip" if any("_aux_skip." in k for k in sd) else "standard",
                  decoder_type="skip" if any(re.match(rf"dec\.(?!{res0}x)\d+x\d+_aux_conv\.", k) for k in sd)
                  else "standard")
    filters = [v for k, v in sd.items() if k.endswith(".resample_filter")]
    if filters:
      kwargs["resample_filter"] = _taps_from_filter(filters[0])
  if any(c % mc for c in level_channels):
    raise ValueError(f"level channels {level_channels} are not multiples of model_channels {mc}")
  kwargs["channel_mult"] = tuple(c // mc for c in level_channels)
  return ("DhariwalUNet" if adm else "SongUNet"), kwargs


# ------------------------------------------------------------------------------------------------
# Conversion.


def _arch_for(class_name: str, kwargs: Mapping[str, Any]) -> str:
  if class_name == "DhariwalUNet":
    return "adm"
  if class_name == "MultistageUNet":
    return "ddpmpp-multistage"  # every field is set verbatim (arch_presets off), Fourier embedding too
  return "ncsnpp" if kwargs.get("embedding_type") == "fourier" else "ddpmpp"


def _wrapper_settings(net: torch_formats.TorchNetwork) -> tuple[Optional[str], dict, dict]:
  """(class name of the network, network kwargs, precond settings) from recorded init kwargs."""
  if net.init_kwargs is None:
    return None, {}, {}
  kw = dict(net.init_kwargs)
  cls = net.class_name or ""
  if kw.get("implicit_mlp"):
    raise ValueError("Patch Diffusion's implicit_mlp coordinate encoder is not supported")
  kw.pop("implicit_mlp", None)
  if cls in ("SongUNet", "DhariwalUNet", "MultistageUNet"):  # a bare network
    return cls, _multistage_kwargs({k: v for k, v in kw.items() if k != "label_dropout"}), {}
  if cls not in _PRECONDS:
    raise ValueError(f"unsupported network class {cls!r}; expected one of {sorted(_PRECONDS)}, "
                     "SongUNet, DhariwalUNet or MultistageUNet (iDDPMPrecond is not supported)")
  precond = _PRECONDS[cls]
  model_type = kw.get("model_type", "SongUNet" if precond in ("vp", "ve") else "DhariwalUNet")
  if model_type not in ("SongUNet", "DhariwalUNet", "MultistageUNet"):
    raise ValueError(f"unsupported model_type {model_type!r}")
  kw = _multistage_kwargs(kw) if model_type == "MultistageUNet" else kw
  for name, value in _FIXED_PRECOND.get(precond, {}).items():
    if name in kw and not math.isclose(float(kw[name]), value):
      raise ValueError(f"{cls} with {name}={kw[name]} is not supported (this project fixes {name}={value})")
  net_kw = {k: v for k, v in kw.items() if k not in _WRAPPER_KWARGS}
  img_channels = int(kw["img_channels"])
  net_kw.update(img_resolution=int(kw["img_resolution"]), in_channels=img_channels,
                out_channels=int(kw.get("out_channels") or img_channels),
                label_dim=int(kw.get("label_dim", 0)))
  settings = {"precond": precond}
  if "sigma_data" in kw:
    settings["sigma_data"] = float(kw["sigma_data"])
  return model_type, net_kw, settings


def _multistage_kwargs(kw: dict) -> dict:
  """The authors' MultistageUNet kwargs (``en_model_channels``, ``de_model_channels``, ``stage_num``,
  ``stage_interval``) in our names (``model_channels``, ``decoder_channels``, ``stage_boundaries``)."""
  kw = {_MULTISTAGE_KWARGS.get(k, k): v for k, v in kw.items()}
  num = kw.pop("stage_num", None)
  if "stage_interval" in kw:
    kw["stage_boundaries"] = boundaries_from_stage_interval(kw.pop("stage_interval"))
  if "decoder_channels" in kw:
    kw["decoder_channels"] = tuple(int(v) for v in kw["decoder_channels"])
    if num is not None and int(num) != len(kw["decoder_channels"]):
      raise ValueError(f"stage_num={num} but {len(kw['decoder_channels'])} de_model_channels")
  return kw


def parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def convert(src: str, overrides: Optional[Mapping[str, Any]] = None, *, key: Optional[str] = "ema",
            base_config: Optional[ml_collections.ConfigDict] = None) -> tuple[dict, ml_collections.ConfigDict]:
  """Reads ``src`` and returns ``(variables, config)`` for ``checkpointing.save_pretrained``.

  Args:
    src: ``.pkl`` snapshot, ``.pt``/``.pth`` checkpoint or ``.npz``.
    overrides: settings that win over everything read from the file: EDM-style keys ``arch``,
      ``img_resolution``, ``img_channels`` (image channels C, without coordinates), ``label_dim`` and any
      ``config.model`` field, plus dotted config paths (``'data.name'``, ``'edm.sigma_data'``).
    key: snapshot entry holding the network (default 'ema').
    base_config: the config to fill (default: ``configs/default.py``).

  Returns:
    ``variables`` ({'params': ..., ['buffers': ...]}, float32 numpy) and the full config.
  """
  overrides = dict(overrides or {})
  net = torch_formats.read_network(src, key=key)
  class_name, kwargs = infer_network_kwargs(net.state_dict)
  wrapped_class, wrapper_kw, precond = _wrapper_settings(net)
  if wrapped_class is not None:
    if wrapped_class != class_name:
      raise ValueError(f"the checkpoint records model_type={wrapped_class} but holds {class_name} tensors")
    kwargs.update(wrapper_kw)
  class_name, c, pad = _apply_network_overrides(class_name, kwargs, overrides)
  config = ml_collections.ConfigDict((base_config if base_config is not None else load_base_config()).to_dict())
  _fill_model(config.model, class_name, kwargs)
  label_dim = _fill_data(config, kwargs, c, net.extra)
  config.edm.precond = precond.get("precond", config.edm.precond)
  if "sigma_data" in precond:
    config.edm.sigma_data = precond["sigma_data"]
  for path, value in overrides.items():  # what is left: dotted paths, e.g. data.name
    section, _, field = path.partition(".")
    if not field or section not in config or field not in config[section]:
      raise ValueError(f"unknown setting {path!r}")
    config[section][field] = value
  model = registry.create_model(config.model, img_resolution=config.data.resolution, img_channels=c,
                                label_dim=label_dim)
  variables = torch_state_dict_to_variables(net.state_dict, model, pad_input_channels=pad)
  return variables, config


def _apply_network_overrides(class_name: str, kwargs: dict, overrides: dict) -> tuple[str, int, int]:
  """Moves the network settings out of ``overrides`` into ``kwargs`` (in place).

  Returns:
    (class name, image channels C, coordinate channels to add: 2 for a plain EDM network, else 0).
  """
  if "arch" in overrides:
    arch = overrides.pop("arch")
    class_name = {"adm": "DhariwalUNet", "ddpmpp-multistage": "MultistageUNet"}.get(arch, "SongUNet")
  img_channels = overrides.pop("img_channels", None)
  for name in ("img_resolution", "label_dim"):
    if name in overrides:
      kwargs[name] = int(overrides.pop(name))
  for name in list(overrides):
    if name in MODEL_FIELDS:
      kwargs[name] = overrides.pop(name)
  c = int(img_channels) if img_channels is not None else int(kwargs["out_channels"])
  in_channels = int(kwargs.get("in_channels", c + 2))
  if in_channels not in (c, c + 2):
    raise ValueError(f"the network reads {in_channels} channels; expected {c} (EDM) or {c + 2} "
                     f"(Patch Diffusion, with coordinates) for img_channels={c}")
  return class_name, c, 2 if in_channels == c else 0


def _fill_model(m: ml_collections.ConfigDict, class_name: str, kwargs: Mapping[str, Any]) -> None:
  """``config.model`` = the network's own values (``arch_presets`` off)."""
  m.arch = _arch_for(class_name, kwargs)
  m.arch_presets = False  # every field below is the network's own value
  allowed = set(registry.DEFAULTS) - (set(registry.SONG_ONLY) if class_name == "DhariwalUNet" else set())
  for name in registry.DEFAULTS:
    if name in kwargs and name in allowed:
      value = kwargs[name]
      m[name] = tuple(int(v) for v in value) if name in ("channel_mult", "attn_resolutions",
                                                         "resample_filter") else value
    elif name in registry.SONG_ONLY and class_name == "DhariwalUNet":
      m[name] = registry.DEFAULTS[name]
  if class_name == "MultistageUNet":
    m.decoder_channels = tuple(int(v) for v in kwargs["decoder_channels"])
    boundaries = kwargs.get("stage_boundaries")
    if boundaries is None:
      # A bare state dict does not record the boundaries (constructor arguments); the authors released
      # only their defaults.
      if len(m.decoder_channels) != len(DEFAULT_STAGE_BOUNDARIES) + 1:
        raise ValueError(f"the multi-stage network has {len(m.decoder_channels)} decoders and the file does not "
                         f"record its stage boundaries; pass --stage_boundaries (K - 1 σ values)")
      boundaries = DEFAULT_STAGE_BOUNDARIES
    m.stage_boundaries = check_stage_boundaries(boundaries, len(m.decoder_channels))
  unknown = sorted(set(kwargs) - set(registry.DEFAULTS) - {"img_resolution", "in_channels", "out_channels",
                                                            "label_dim", "arch", "dtype"}
                   - (set(registry.MULTISTAGE_DEFAULTS) if class_name == "MultistageUNet" else set()))
  if unknown:
    raise ValueError(f"unsupported network kwargs {unknown}")
  if "dtype" in kwargs:
    m.dtype = kwargs["dtype"]


def _fill_data(config: ml_collections.ConfigDict, kwargs: Mapping[str, Any], c: int, extra: Mapping) -> int:
  """``config.data`` (and ``patch.latent``) from the network and the snapshot's dataset kwargs; returns
  the label dimension."""
  d = config.data
  d.resolution = int(kwargs["img_resolution"])
  d.num_channels = c
  label_dim = int(kwargs.get("label_dim", 0))
  d.use_labels = label_dim > 0
  d.num_classes = label_dim
  dataset = extra.get("dataset_kwargs") or {}
  if isinstance(dataset, Mapping):
    if "xflip" in dataset:
      d.xflip = bool(dataset["xflip"])
    if dataset.get("resolution") and int(dataset["resolution"]) == 8 * d.resolution and c == 4:
      config.patch.latent = True  # trained on Stable Diffusion VAE latents (R/8, 4 channels)
  return label_dim
