"""Network registry: ``config.model`` -> Flax module, and parameter initialisation.

``config.model.arch`` selects the network the way EDM's ``train.py --arch`` does:

* ``ddpmpp`` — ``SongUNet`` with every field taken verbatim from the config (whose defaults *are* the
  DDPM++ values: positional embedding, standard encoder/decoder, ``channel_mult_noise`` 1, filter [1,1]).
* ``ncsnpp`` — ``SongUNet`` with the NCSN++ preset: Fourier embedding, residual encoder,
  ``channel_mult_noise`` 2, filter [1,3,3,1].
* ``adm`` — ``DhariwalUNet`` with ADM's own defaults: ``model_channels`` 192, ``channel_mult``
  (1,2,3,4), ``num_blocks`` 3, ``attn_resolutions`` (32,16,8).
* ``ddpmpp-multistage`` — ``MultistageUNet`` (Zhang et al. 2024; the authors' ``train.py
  --arch=ddpmpp-multistage``): the DDPM++ fields as for ``ddpmpp`` (``model_channels`` is the shared
  encoder's width), one decoder per σ stage with base widths ``decoder_channels`` (preset: the authors'
  (192, 128, 16)) and the σ ``stage_boundaries`` between stages (default (2.5103, 7.6577)). These two
  fields (``MULTISTAGE_DEFAULTS``) must stay at their defaults for every other arch.

**Override rule.** With ``config.model.arch_presets = True`` (the default) a preset value is used only
for a field the config leaves at its ``configs/default.py`` value (``DEFAULTS`` below); any field set to
something else wins. So ``arch='ncsnpp', encoder_type='skip'`` is NCSN++ with a skip encoder, and
``arch='adm', model_channels=256`` is ADM at 256 channels. A value that *equals* the default cannot be
told apart from "unset"; set ``arch_presets = False`` to take every field verbatim (the converter writes
configs that way). ``adm`` has no ``embedding_type``/``encoder_type``/``decoder_type``/
``channel_mult_noise``/``resample_filter``; setting any of them away from its default is an error.

The network input has ``img_channels + 2`` channels (the patch plus its x/y coordinate channels) and
``img_channels`` output channels.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from patch_diffusion.models import layers
from patch_diffusion.models.dhariwal_unet import DhariwalUNet
from patch_diffusion.models.multistage_unet import MultistageUNet
from patch_diffusion.models.song_unet import SongUNet

#: The network fields of ``configs/default.py`` (the DDPM++ values). Kept in sync by a test.
DEFAULTS: dict[str, Any] = dict(
    model_channels=128,
    channel_mult=(1, 2, 2, 2),
    channel_mult_emb=4,
    channel_mult_noise=1,
    num_blocks=4,
    attn_resolutions=(16,),
    dropout=0.10,
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    resample_filter=(1, 1),
    augment_dim=0,
)

#: Values each ``arch`` puts in place of fields left at ``DEFAULTS``.
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "ddpmpp": {},
    "ncsnpp": dict(embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
                   resample_filter=(1, 3, 3, 1)),
    "adm": dict(model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
                attn_resolutions=(32, 16, 8)),
}

#: The multi-decoder fields of ``configs/default.py`` (kept in sync by a test); used by the multistage
#: archs only. An empty ``decoder_channels`` means "not multistage".
MULTISTAGE_DEFAULTS: dict[str, Any] = dict(
    decoder_channels=(),
    stage_boundaries=(2.5103, 7.6577),
)

#: Multi-decoder archs: (the single-decoder arch whose ``ARCH_PRESETS`` apply to the ``DEFAULTS``
#: fields, values put in place of ``MULTISTAGE_DEFAULTS`` fields left at their defaults).
MULTISTAGE_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpmpp-multistage": ("ddpmpp", dict(decoder_channels=(192, 128, 16))),
}

#: SongUNet-only fields (not constructor arguments of DhariwalUNet).
SONG_ONLY = ("embedding_type", "channel_mult_noise", "encoder_type", "decoder_type", "resample_filter")

_SEQUENCE_FIELDS = ("channel_mult", "attn_resolutions", "resample_filter")

#: ``config.model.dtype`` -> compute dtype (parameters always stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
COMPUTE_DTYPES = tuple(DTYPES)


def archs() -> tuple[str, ...]:
  """Every value ``config.model.arch`` accepts."""
  return tuple(sorted(set(ARCH_PRESETS) | set(MULTISTAGE_ARCHS)))


def _norm(name: str, value: Any) -> Any:
  if name in _SEQUENCE_FIELDS or name == "decoder_channels":
    return tuple(int(v) for v in value)
  if name == "stage_boundaries":
    return tuple(float(v) for v in value)
  return value


def resolve_model_kwargs(model_config) -> tuple[str, dict[str, Any]]:
  """Applies the arch preset and override rule (module docstring) to ``config.model``.

  Args:
    model_config: ``config.model`` (ConfigDict or mapping) with ``arch`` and the fields of ``DEFAULTS``
      (and, optionally, of ``MULTISTAGE_DEFAULTS``).

  Returns:
    ``(class_name, kwargs)`` with class_name ``'SongUNet'``, ``'DhariwalUNet'`` or ``'MultistageUNet'``
    and the constructor kwargs of the architecture (no resolution/channels/labels/dtype).
  """
  get = model_config.get
  arch = get("arch", "ddpmpp")
  if arch not in ARCH_PRESETS and arch not in MULTISTAGE_ARCHS:
    raise ValueError(f"unknown config.model.arch {arch!r}; expected one of "
                     f"{sorted(set(ARCH_PRESETS) | set(MULTISTAGE_ARCHS))}")
  base_arch, stage_presets = MULTISTAGE_ARCHS.get(arch, (arch, {}))
  use_presets = bool(get("arch_presets", True))
  values = {k: _norm(k, get(k, v)) for k, v in DEFAULTS.items()}
  if use_presets:
    for k, v in ARCH_PRESETS[base_arch].items():
      if values[k] == _norm(k, DEFAULTS[k]):
        values[k] = _norm(k, v)
  stages = {k: _norm(k, get(k, v)) for k, v in MULTISTAGE_DEFAULTS.items()}
  if arch in MULTISTAGE_ARCHS:
    if use_presets:
      for k, v in stage_presets.items():
        if stages[k] == _norm(k, MULTISTAGE_DEFAULTS[k]):
          stages[k] = _norm(k, v)
    if not stages["decoder_channels"]:
      raise ValueError(f"config.model.arch={arch!r} needs config.model.decoder_channels (one decoder base "
                       "width per stage, e.g. (192, 128, 16))")
    if len(stages["stage_boundaries"]) != len(stages["decoder_channels"]) - 1:
      raise ValueError(f"config.model.stage_boundaries {stages['stage_boundaries']} must hold "
                       f"len(decoder_channels) - 1 = {len(stages['decoder_channels']) - 1} σ values (the "
                       "boundaries between consecutive stages)")
    return "MultistageUNet", {**values, **stages}
  bad = [k for k, v in stages.items() if v != _norm(k, MULTISTAGE_DEFAULTS[k])]
  if bad:
    raise ValueError(f"config.model.{bad} only apply to arch='ddpmpp-multistage' (got arch={arch!r}); "
                     "set that arch or leave them at their defaults")
  if arch == "adm":
    bad = [k for k in SONG_ONLY if values[k] != _norm(k, DEFAULTS[k])]
    if bad:
      raise ValueError(f"config.model.arch='adm' (DhariwalUNet) has no {bad}; leave them at their defaults")
    return "DhariwalUNet", {k: v for k, v in values.items() if k not in SONG_ONLY}
  return "SongUNet", values


def create_model(model_config, *, img_resolution: int, img_channels: int, label_dim: int) -> nn.Module:
  """Builds the network selected by ``config.model`` (see the module docstring for the rules).

  Args:
    model_config: ``config.model``.
    img_resolution: full-image resolution R (pixels or latent pixels); attention levels are R >> level.
    img_channels: image channels C; the network takes C + 2 channels (coordinates) and returns C.
    label_dim: number of classes, 0 for an unconditional network.

  Returns:
    A ``SongUNet``, ``DhariwalUNet`` or ``MultistageUNet`` called as
    ``apply(variables, x [N,H,W,C+2], noise_labels [N], class_labels [N,L] | None, augment_labels=None,
    train=False, rngs={'dropout': key})`` -> [N,H,W,C] in ``config.model.dtype``; a ``MultistageUNet``
    also takes ``stage=`` (None: from σ of the first sample; a Python int: that decoder only).
  """
  class_name, kwargs = resolve_model_kwargs(model_config)
  dtype_name = model_config.get("dtype", "float32")
  if dtype_name not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
  cls = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet, "MultistageUNet": MultistageUNet}[class_name]
  return cls(img_resolution=int(img_resolution), in_channels=int(img_channels) + 2,
             out_channels=int(img_channels), label_dim=int(label_dim), dtype=DTYPES[dtype_name],
             **kwargs)


def _init_inputs(model: nn.Module, in_channels: int, label_dim: int, augment_dim: int):
  # Parameters do not depend on the spatial size: use the smallest size the U-Net accepts.
  size = 2 ** (len(model.channel_mult) - 1)
  x = jnp.zeros((1, size, size, in_channels), jnp.float32)
  noise = jnp.zeros((1,), jnp.float32)
  labels = jnp.zeros((1, label_dim), jnp.float32) if label_dim else None
  augment = jnp.zeros((1, augment_dim), jnp.float32) if augment_dim else None
  return x, noise, labels, augment


def _check_model_args(model, img_resolution, in_channels, label_dim):
  for name, value in (("img_resolution", img_resolution), ("in_channels", in_channels),
                      ("label_dim", label_dim)):
    if value is not None and int(value) != getattr(model, name):
      raise ValueError(f"{name}={value} does not match the model's {name}={getattr(model, name)}")


def init_with_intermediates(model: nn.Module, key: jax.Array) -> dict:
  """``model.init`` on a minimal input, returning every collection (incl. ``'intermediates'``)."""
  x, noise, labels, augment = _init_inputs(model, model.in_channels, model.label_dim, model.augment_dim)
  return model.init({"params": key}, x, noise, labels, augment, train=False, mutable=True)


def init_params(model: nn.Module, key: jax.Array, img_resolution: Optional[int] = None,
                in_channels: Optional[int] = None, label_dim: Optional[int] = None) -> dict:
  """Initialises the network's variables with EDM's initialisation (float32).

  Every variable is ``scale * U(-1, 1)``, ``scale * N(0, 1)`` or a constant, with EDM's per-layer scale
  (see ``layers.edm_recipe``). The random draws come from one uniform and one normal vector, sliced in
  sorted variable-path order: one threefry draw each instead of one per variable, which keeps the
  compile time of a full DDPM++ init to seconds. Works inside ``jax.jit`` (e.g. with ``out_shardings``).

  Args:
    model: a module from ``create_model``.
    key: PRNG key (typed or raw).
    img_resolution, in_channels, label_dim: optional checks against the module's own fields.

  Returns:
    ``{'params': ..., ['buffers': ...]}`` — ``buffers`` holds the NCSN++ Fourier frequencies.
  """
  _check_model_args(model, img_resolution, in_channels, label_dim)
  with layers.recording_recipes() as recipes:
    abstract = abstract_variables(model)
  flat = {}
  for collection in ("params", "buffers"):
    for path, leaf in traverse_util.flatten_dict(abstract.get(collection, {})).items():
      flat[(collection,) + path] = leaf
  missing = sorted(set(flat) - set(recipes))
  if missing:
    raise ValueError(f"variables without an init recipe: {missing}")
  return _materialize(key, tuple(sorted(flat)), tuple(flat[p].shape for p in sorted(flat)),
                      tuple(recipes[p] for p in sorted(flat)))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _materialize(key, paths, shapes, recipes):
  sizes = [math.prod(s) for s in shapes]
  total = {kind: sum(n for n, r in zip(sizes, recipes) if r.kind == kind) for kind in ("uniform", "normal")}
  key_u, key_n = jax.random.split(key)
  pools = {"uniform": jax.random.uniform(key_u, (total["uniform"],), jnp.float32, -1.0, 1.0),
           "normal": jax.random.normal(key_n, (total["normal"],), jnp.float32)}
  offsets = {"uniform": 0, "normal": 0}
  flat = {}
  for path, shape, size, recipe in zip(paths, shapes, sizes, recipes):
    if recipe.kind == "const":
      flat[path] = jnp.full(shape, recipe.scale, jnp.float32)
      continue
    start = offsets[recipe.kind]
    offsets[recipe.kind] = start + size
    flat[path] = pools[recipe.kind][start:start + size].reshape(shape) * recipe.scale
  return traverse_util.unflatten_dict(flat)


def abstract_variables(model: nn.Module) -> dict:
  """Shapes/dtypes of every variable collection of ``model`` (incl. ``'intermediates'``), no compute."""
  return jax.eval_shape(lambda: init_with_intermediates(model, jax.random.key(0)))
