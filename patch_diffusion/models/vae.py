"""Stable-Diffusion VAE (diffusers ``AutoencoderKL``, the ``sd-vae-ft-ema`` architecture) in Flax Linen, NHWC.

Latent Patch Diffusion trains on the posterior means of this autoencoder; this module encodes images to
latents and decodes sampled latents back to images. Its arithmetic follows diffusers' PyTorch modules
(``Encoder``, ``Decoder``, ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``, the mid-block
``Attention`` and ``DiagonalGaussianDistribution``) so diffusers weights load one-to-one
(``patch_diffusion.interop.diffusers_vae``):

* encoder: ``conv_in`` 3×3 -> per level ``layers_per_block`` ResNet blocks and, on every level but the
  last, ``Downsample2D`` (pad right/bottom by one, 3×3 conv with stride 2) -> mid block (ResNet, single
  head self-attention, ResNet) -> GroupNorm, SiLU, ``conv_out`` 3×3 to ``2 * latent_channels`` ->
  ``quant_conv`` 1×1 -> (mean, logvar), logvar clipped to [-30, 20].
* decoder: ``post_quant_conv`` 1×1 -> ``conv_in`` 3×3 -> mid block -> per level (channels reversed)
  ``layers_per_block + 1`` ResNet blocks and, on every level but the last, ``Upsample2D`` (nearest 2×, then
  3×3 conv) -> GroupNorm, SiLU, ``conv_out`` 3×3.
* every GroupNorm has ``norm_num_groups`` groups and eps 1e-6; every ResNet block is
  ``x' + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with ``x'`` a 1×1 ``conv_shortcut`` when the channel
  count changes.

Flax module names are the diffusers names with ``.<index>`` written ``_<index>``
(``encoder.down_blocks.1.resnets.0.conv1`` -> ``encoder/down_blocks_1/resnets_0/conv1``).

Precision: parameters are float32 whatever ``dtype`` (the compute dtype) is. With ``dtype=bfloat16`` the
convolutions and attention matmuls run in bfloat16, while GroupNorm statistics, attention logits and
softmax stay float32; ``encode``/``decode`` always return float32. On GPUs JAX's default float32
matmul/conv precision is TF32; wrap float32 work in ``jax.default_matmul_precision('highest')`` when
full float32 accuracy matters (parity checks).

The latent scaling factor (``VAEConfig.scaling_factor``, 0.18215 for SD 1.x/2.x) is *not* applied here:
diffusion models see ``latents * scaling_factor`` and decode ``z / scaling_factor``; that is the caller's.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from patch_diffusion.models.layers import GroupNorm

Array = jax.Array

#: diffusers clips the posterior log-variance to this range before exponentiating it.
LOGVAR_RANGE = (-30.0, 20.0)
#: GroupNorm epsilon of every normalisation layer of the diffusers VAE (EDM's layers use 1e-5).
NORM_EPS = 1e-6

# PyTorch's default Conv2d/Linear init draws weights from U(±1/sqrt(fan_in)); the same here, so a VAE
# trained from scratch starts like diffusers'. Biases start at zero.
_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# ------------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an ``AutoencoderKL``; the defaults are the Stable Diffusion VAE (83.65 M parameters).

  Attributes:
    in_channels: image channels read by the encoder.
    out_channels: image channels written by the decoder.
    block_out_channels: channels of each encoder level (the decoder uses them reversed); the spatial
      downsampling factor is ``2 ** (len(block_out_channels) - 1)``.
    layers_per_block: ResNet blocks per encoder level (the decoder has one more per level).
    latent_channels: channels of the latent (the encoder's moments have twice as many).
    norm_num_groups: GroupNorm groups; must divide every channel count.
    scaling_factor: the factor diffusion models multiply latents by (not applied by the module).
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"VAEConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
    if not self.block_out_channels:
      raise ValueError("VAEConfig.block_out_channels must list at least one level")
    bad = [c for c in self.block_out_channels if c < 1 or c % self.norm_num_groups]
    if bad:
      raise ValueError(f"VAEConfig: channel counts {bad} are not positive multiples of norm_num_groups="
                       f"{self.norm_num_groups}; pick block_out_channels divisible by it")

  @property
  def downsample_factor(self) -> int:
    """Spatial factor between images and latents (8 for the SD VAE)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any]) -> "VAEConfig":
    """Builds the config from a diffusers ``AutoencoderKL`` ``config.json`` dict.

    Accepts only what this module implements: ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks,
    SiLU, quant/post-quant convolutions and mid-block attention present. Keys that only steer diffusers'
    runtime (``sample_size``, ``force_upcast``, keys starting with ``_``) are ignored.

    Raises:
      ValueError: naming every unsupported or unknown setting at once.
    """
    c = dict(config)
    problems = []
    class_name = c.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
      problems.append(f"_class_name {class_name!r}: only 'AutoencoderKL' is implemented")
    levels = len(c.get("block_out_channels", cls.block_out_channels))
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      types = list(c.get(key, [kind] * levels))
      if types != [kind] * levels:
        problems.append(f"{key} {types}: only {levels} x {kind!r} (one per block_out_channels entry) "
                        "is implemented")
    if c.get("act_fn", "silu") != "silu":
      problems.append(f"act_fn {c['act_fn']!r}: only 'silu' is implemented")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
      if not c.get(key, True):
        problems.append(f"{key}=False: only the SD layout (quant convs and mid-block attention present) is "
                        "implemented")
    for key in ("shift_factor", "latents_mean", "latents_std"):
      if c.get(key) is not None:
        problems.append(f"{key}={c[key]!r}: latent normalisation other than scaling_factor is not "
                        "implemented (set it to null if you apply it yourself)")
    implemented = {"in_channels", "out_channels", "block_out_channels", "layers_per_block",
                   "latent_channels", "norm_num_groups", "scaling_factor"}
    checked = {"down_block_types", "up_block_types", "act_fn", "use_quant_conv", "use_post_quant_conv",
               "mid_block_add_attention", "shift_factor", "latents_mean", "latents_std"}
    ignored = {"sample_size", "force_upcast"}
    unknown = sorted(k for k in c if not k.startswith("_") and k not in implemented | checked | ignored)
    if unknown:
      problems.append(f"unknown keys {unknown}: this loader does not know what they change")
    if problems:
      raise ValueError("diffusers VAE config not supported by patch_diffusion.models.vae:\n  "
                       + "\n  ".join(problems))
    kwargs = {k: c[k] for k in implemented if k in c and c[k] is not None}
    return cls(**kwargs)

  def to_diffusers_config(self) -> dict:
    """The equivalent diffusers ``AutoencoderKL`` config dict (JSON-serialisable)."""
    n = len(self.block_out_channels)
    return {
        "_class_name": "AutoencoderKL", "in_channels": self.in_channels, "out_channels": self.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
        "act_fn": "silu", "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
        "scaling_factor": self.scaling_factor,
    }


# ------------------------------------------------------------------------------------------------
# Blocks (NHWC; activations in ``dtype``, parameters float32).


def _conv(features: int, kernel: int, dtype, name: str, *, stride: int = 1, padding=None) -> nn.Conv:
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=pad if isinstance(pad, (tuple, list)) else ((pad, pad), (pad, pad)),
                 dtype=dtype, param_dtype=jnp.float32, kernel_init=_KERNEL_INIT, name=name)


def group_norm(groups: int, name: str | None = None) -> GroupNorm:
  """The VAE's GroupNorm: exactly ``groups`` groups, eps 1e-6, float32 statistics, output in input dtype."""
  # min_channels_per_group=1 turns EDM's min(32, C // 4) rule into a plain `groups` (the config checks
  # that every channel count is a multiple of it).
  return GroupNorm(num_groups=groups, min_channels_per_group=1, eps=NORM_EPS, name=name)


class ResnetBlock(nn.Module):
  """diffusers ``ResnetBlock2D`` without time embedding.

  ``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``, ``shortcut`` a 1×1 conv when channels change.
  """
  out_channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps ``x`` [N,H,W,C] to [N,H,W,out_channels] in ``dtype``."""
    h = _conv(self.out_channels, 3, self.dtype, "conv1")(nn.silu(group_norm(self.groups, "norm1")(x)))
    h = _conv(self.out_channels, 3, self.dtype, "conv2")(nn.silu(group_norm(self.groups, "norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """The VAE mid-block self-attention: one head over all H·W positions, GroupNorm'd input, residual.

  ``x + to_out(softmax(q kᵀ / sqrt(C)) v)`` with ``q, k, v = to_q/to_k/to_v(norm(x))``; logits and softmax
  in float32 (diffusers upcasts the softmax too).
  """
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps ``x`` [N,H,W,C] to [N,H,W,C] in ``dtype``."""
    n, h, w, c = x.shape
    tokens = group_norm(self.groups, "group_norm")(x).reshape(n, h * w, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32,  # noqa: E731
                                  kernel_init=_KERNEL_INIT, name=name)
    q, k, v = dense("to_q")(tokens), dense("to_k")(tokens), dense("to_v")(tokens)
    logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("nqk,nkc->nqc", weights, v)
    return x + dense("to_out_0")(out).reshape(n, h, w, c)


class Downsample(nn.Module):
  """diffusers ``Downsample2D(padding=0)``: zero-pad right and bottom by one, 3×3 conv with stride 2."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps ``x`` [N,H,W,C] to [N,H/2,W/2,channels] (H, W even)."""
    return _conv(self.channels, 3, self.dtype, "conv", stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  """diffusers ``Upsample2D``: nearest-neighbour 2× upsampling, then a 3×3 conv."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps ``x`` [N,H,W,C] to [N,2H,2W,channels]."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(self.channels, 3, self.dtype, "conv")(x)


class MidBlock(nn.Module):
  """diffusers ``UNetMidBlock2D`` of the VAE: ResNet, attention, ResNet at constant width."""
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps ``x`` [N,H,W,C] to [N,H,W,C]."""
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    x = Attention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class EncoderLevel(nn.Module):
  """diffusers ``DownEncoderBlock2D``: ``num_layers`` ResNet blocks, then an optional ``Downsample2D``."""
  out_channels: int
  num_layers: int
  downsample: bool
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps ``x`` [N,H,W,C] to [N,H',W',out_channels] (H' = H/2 when downsampling)."""
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.downsample:
      x = Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
    return x


class DecoderLevel(nn.Module):
  """diffusers ``UpDecoderBlock2D``: ``num_layers`` ResNet blocks, then an optional ``Upsample2D``."""
  out_channels: int
  num_layers: int
  upsample: bool
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps ``x`` [N,H,W,C] to [N,H',W',out_channels] (H' = 2H when upsampling)."""
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.upsample:
      x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Image [N,H,W,in_channels] -> encoder features [N,H/f,W/f,2*latent_channels] (before ``quant_conv``)."""
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    channels = cfg.block_out_channels
    x = _conv(channels[0], 3, self.dtype, "conv_in")(x)
    for i, c in enumerate(channels):
      x = EncoderLevel(c, cfg.layers_per_block, i < len(channels) - 1, cfg.norm_num_groups, self.dtype,
                       name=f"down_blocks_{i}")(x)
    x = MidBlock(cfg.norm_num_groups, self.dtype, name="mid_block")(x)
    x = nn.silu(group_norm(cfg.norm_num_groups, "conv_norm_out")(x))
    return _conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
  """Latent [N,h,w,latent_channels] (after ``post_quant_conv``) -> image [N,h*f,w*f,out_channels]."""
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg = self.config
    channels = tuple(reversed(cfg.block_out_channels))
    x = _conv(channels[0], 3, self.dtype, "conv_in")(z)
    x = MidBlock(cfg.norm_num_groups, self.dtype, name="mid_block")(x)
    for i, c in enumerate(channels):
      x = DecoderLevel(c, cfg.layers_per_block + 1, i < len(channels) - 1, cfg.norm_num_groups,
                       self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(group_norm(cfg.norm_num_groups, "conv_norm_out")(x))
    return _conv(cfg.out_channels, 3, self.dtype, "conv_out")(x)


# ------------------------------------------------------------------------------------------------
# The autoencoder.


class AutoencoderKL(nn.Module):
  """diffusers ``AutoencoderKL`` (KL-regularised VAE of Stable Diffusion), NHWC.

  Attributes:
    config: the architecture.
    dtype: compute dtype (float32 or bfloat16); parameters are float32 either way.

  ``init``/``apply`` without a method run ``__call__`` (encode, then decode the posterior mean), which
  creates every parameter. Use ``encode_moments`` / ``decode_latents`` for the two halves.
  """
  config: VAEConfig = VAEConfig()
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.quant_conv = _conv(2 * cfg.latent_channels, 1, self.dtype, "quant_conv")
    self.post_quant_conv = _conv(cfg.latent_channels, 1, self.dtype, "post_quant_conv")
    self.decoder = Decoder(cfg, self.dtype)

  def _check(self, x: Array, channels: int, what: str) -> None:
    f = 1 if what == "latents" else self.config.downsample_factor
    if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"AutoencoderKL expects {what} as NHWC [N,H,W,{channels}] with H and W multiples "
                       f"of {f}, got shape {tuple(x.shape)} (transpose NCHW arrays with "
                       "x.transpose(0, 2, 3, 1); crop or pad the image size)")

  def encode(self, images: Array) -> tuple[Array, Array]:
    """Posterior moments of ``images``.

    Args:
      images: [N,H,W,in_channels], any float dtype, values in [-1, 1]; H, W multiples of the
        ``downsample_factor`` (8 for the SD VAE).

    Returns:
      ``(mean, logvar)``, each float32 [N,H/f,W/f,latent_channels]; logvar clipped to [-30, 20]. Unscaled:
      multiply by ``config.scaling_factor`` for a diffusion model's latent space.
    """
    self._check(images, self.config.in_channels, "images")
    moments = self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: Array) -> Array:
    """Images [N,h*f,w*f,out_channels] float32 (nominally in [-1, 1], not clipped) from unscaled latents
    ``z`` [N,h,w,latent_channels] (divide a diffusion model's latents by ``config.scaling_factor`` first)."""
    self._check(z, self.config.latent_channels, "latents")
    return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

  def __call__(self, images: Array) -> Array:
    """Reconstruction ``decode(mean)`` of ``images`` [N,H,W,in_channels] -> float32 [N,H,W,out_channels]."""
    mean, _ = self.encode(images)
    return self.decode(mean)


def encode_moments(module: AutoencoderKL, variables: Mapping, images: Array) -> tuple[Array, Array]:
  """``(mean, logvar)`` float32 [N,H/f,W/f,latent] of ``images`` [N,H,W,C] in [-1, 1]; pure, jit-able
  (``jax.jit(functools.partial(encode_moments, module))``)."""
  return module.apply(variables, images, method=AutoencoderKL.encode)


def decode_latents(module: AutoencoderKL, variables: Mapping, z: Array) -> Array:
  """Images float32 [N,h*f,w*f,C] from unscaled latents ``z`` [N,h,w,latent]; pure, jit-able."""
  return module.apply(variables, z, method=AutoencoderKL.decode)


def posterior_std(logvar: Array) -> Array:
  """Standard deviation ``exp(logvar / 2)`` of the diagonal Gaussian posterior (same shape/dtype)."""
  return jnp.exp(0.5 * logvar)


def posterior_sample(mean: Array, logvar: Array, eps: Array) -> Array:
  """Reparameterised posterior draw ``mean + exp(logvar / 2) * eps``; ``eps`` ~ N(0, 1) of ``mean``'s shape
  (e.g. ``jax.random.normal(key, mean.shape)``)."""
  return mean + posterior_std(logvar) * eps


def init_vae_params(module: AutoencoderKL, key: Array) -> dict:
  """Random ``{'params': ...}`` (float32, PyTorch-default-like init) for ``module``; uses the smallest
  valid image (side ``downsample_factor``), since parameter shapes do not depend on the image size."""
  s = module.config.downsample_factor
  return module.init(key, jnp.zeros((1, s, s, module.config.in_channels), jnp.float32))


def abstract_vae_params(module: AutoencoderKL) -> dict:
  """``jax.ShapeDtypeStruct`` tree of ``init_vae_params(module, key)`` (no compute, any size)."""
  return jax.eval_shape(lambda: init_vae_params(module, jax.random.key(0)))
