"""DDPM++ and NCSN++ (EDM's ``SongUNet``, Song et al. 2021) in Flax Linen, NHWC.

Parameter names follow the PyTorch module names with the ``enc``/``dec`` dictionaries flattened
(``enc.16x16_block0`` -> ``enc_16x16_block0``), so ``torch_mapping`` converts checkpoints by renaming
and transposing only.

Attention is placed by **level**: level ``l`` has nominal resolution ``img_resolution >> l`` and gets
attention iff that number is in ``attn_resolutions`` — independent of the size of the input actually
fed, so one set of weights runs on every patch size ``img_resolution / 2^k`` (Patch Diffusion).

The mapping network, the encoder and the decoder are module-level helpers (``song_mapping``,
``song_encoder``, ``song_decoder``) that create their submodules in the *calling* module's scope, so the
multi-decoder ``MultistageUNet`` (``multistage_unet.py``) shares them without changing a parameter name
here. ``SongDecoder`` wraps the decoder as a submodule of its own (one per stage there).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from patch_diffusion.models.layers import (Conv2d, FourierEmbedding, GroupNorm, Init, Linear,
                                           PositionalEmbedding, UNetBlock)

Array = jax.Array

# SongUNet's initialisation recipes (EDM: init, init_zero, init_attn).
INIT = Init("xavier_uniform")
INIT_ZERO = Init("xavier_uniform", weight=1e-5)
INIT_ATTN = Init("xavier_uniform", weight=math.sqrt(0.2))
#: EDM's GroupNorm group count (``min(32, C // 4)``). The multi-stage authors' copy of the layers uses 16;
#: a module with a ``norm_groups`` field (``SongDecoder``, ``MultistageUNet``) overrides it.
EDM_NORM_GROUPS = 32


def norm_groups(net: nn.Module) -> int:
  """GroupNorm group count of ``net``'s blocks: its ``norm_groups`` field, else EDM's 32."""
  return int(getattr(net, "norm_groups", EDM_NORM_GROUPS))


def check_song_fields(net: nn.Module) -> None:
  """Raises ValueError naming the field if ``net``'s embedding/encoder/decoder type is unknown."""
  if getattr(net, "embedding_type", "positional") not in ("fourier", "positional"):
    raise ValueError(f"embedding_type must be 'fourier' or 'positional', got {net.embedding_type!r}")
  if getattr(net, "encoder_type", "standard") not in ("standard", "skip", "residual"):
    raise ValueError(f"encoder_type must be standard|skip|residual, got {net.encoder_type!r}")
  if net.decoder_type not in ("standard", "skip"):
    raise ValueError(f"decoder_type must be standard|skip, got {net.decoder_type!r}")


def song_block_kwargs(net: nn.Module) -> dict:
  """``UNetBlock`` keyword arguments of every SongUNet block (EDM's ``block_kwargs``) for ``net``'s
  ``dropout``, ``resample_filter`` and ``norm_groups``."""
  return dict(
      num_heads=1, dropout=net.dropout, skip_scale=math.sqrt(0.5), eps=1e-6, num_groups=norm_groups(net),
      resample_filter=tuple(net.resample_filter), resample_proj=True, adaptive_scale=False,
      init=INIT, init_zero=INIT_ZERO, init_attn=INIT_ATTN)


def song_mapping(net: nn.Module, noise_labels: Array, class_labels: Optional[Array],
                 augment_labels: Optional[Array]) -> Array:
  """SongUNet's noise/label mapping; creates ``map_noise``, ``map_label``, ``map_augment``,
  ``map_layer0/1`` in the scope of ``net`` (call it from ``net``'s compact method).

  Reads ``net.embedding_type, model_channels, channel_mult_noise, channel_mult_emb, label_dim,
  augment_dim``.

  Args:
    noise_labels: [N] float (EDM's c_noise).
    class_labels: [N, label_dim] float one-hot, or None (= the all-zero, unconditional label).
    augment_labels: [N, augment_dim] or None.

  Returns:
    The embedding [N, model_channels * channel_mult_emb] float32 (EDM: the mapping runs in the noise
    labels' dtype, float32).
  """
  emb_channels = net.model_channels * net.channel_mult_emb
  noise_channels = net.model_channels * net.channel_mult_noise
  n = noise_labels.shape[0]
  if net.embedding_type == "positional":
    emb = PositionalEmbedding(noise_channels, endpoint=True, name="map_noise")(noise_labels)
  else:
    emb = FourierEmbedding(noise_channels, name="map_noise")(noise_labels)
  emb = emb.reshape(n, 2, -1)[:, ::-1].reshape(n, -1)  # swap sin/cos
  if net.label_dim:
    labels = (jnp.zeros((n, net.label_dim), jnp.float32) if class_labels is None
              else jnp.broadcast_to(class_labels.astype(jnp.float32), (n, net.label_dim)))
    emb = emb + Linear(noise_channels, init=INIT, name="map_label")(labels * math.sqrt(net.label_dim))
  if net.augment_dim and augment_labels is not None:
    emb = emb + Linear(noise_channels, use_bias=False, init=INIT, name="map_augment")(
        augment_labels.astype(jnp.float32))
  emb = nn.silu(Linear(emb_channels, init=INIT, name="map_layer0")(emb))
  emb = nn.silu(Linear(emb_channels, init=INIT, name="map_layer1")(emb))
  return emb


def song_encoder(net: nn.Module, x: Array, emb: Array, train: bool) -> tuple[Array, list[Array]]:
  """SongUNet's encoder; creates the ``enc_<res>x<res>_*`` submodules in the scope of ``net``.

  Reads ``net.img_resolution, in_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
  encoder_type, resample_filter, dropout`` and ``norm_groups`` if present.

  Args:
    x: [N, H, W, in_channels] in the compute dtype.
    emb: [N, E] float32 embedding from ``song_mapping``.
    train: enables dropout.

  Returns:
    ``(x, skips)``: the deepest features [N, H/2^L, W/2^L, model_channels * channel_mult[-1]] and the
    list of skip activations in creation order (the decoder pops from the end).
  """
  block_kwargs = song_block_kwargs(net)
  filt = tuple(net.resample_filter)
  skips = []
  aux = x
  cout = net.in_channels
  caux = net.in_channels
  for level, mult in enumerate(net.channel_mult):
    res = net.img_resolution >> level
    tag = f"enc_{res}x{res}"
    if level == 0:
      cout = net.model_channels
      x = Conv2d(cout, 3, init=INIT, name=f"{tag}_conv")(x)
      skips.append(x)
    else:
      x = UNetBlock(cout, down=True, **block_kwargs, name=f"{tag}_down")(x, emb, train)
      skips.append(x)
      if net.encoder_type == "skip":
        aux = Conv2d(caux, 0, down=True, resample_filter=filt, name=f"{tag}_aux_down")(aux)
        x = skips[-1] = x + Conv2d(cout, 1, init=INIT, name=f"{tag}_aux_skip")(aux)
      elif net.encoder_type == "residual":
        r = Conv2d(cout, 3, down=True, resample_filter=filt, fused_resample=True, init=INIT,
                   name=f"{tag}_aux_residual")(aux)
        x = skips[-1] = aux = (x + r) / math.sqrt(2)
        caux = cout
    for idx in range(net.num_blocks):
      cout = net.model_channels * mult
      x = UNetBlock(cout, attention=res in net.attn_resolutions, **block_kwargs,
                    name=f"{tag}_block{idx}")(x, emb, train)
      skips.append(x)
  return x, skips


def song_decoder(net: nn.Module, x: Array, skips: Sequence[Array], emb: Array, train: bool,
                 prefix: str = "dec_") -> Array:
  """SongUNet's decoder; creates ``<prefix><res>x<res>_*`` submodules in the scope of ``net``.

  Reads ``net.img_resolution, out_channels, model_channels (the decoder's base width), channel_mult,
  num_blocks, attn_resolutions, decoder_type, resample_filter, dropout`` and ``norm_groups`` if present.
  The blocks before the first skip concatenation (``in0``/``in1``) keep the width of ``x``, as in EDM.

  Args:
    x: the encoder's deepest features [N, h, w, C].
    skips: the encoder's skip activations (not modified).
    emb: [N, E] float32 embedding.
    train: enables dropout.
    prefix: name prefix: ``'dec_'`` flattens EDM's ``dec.<res>_*`` into SongUNet's scope; ``''`` gives
      the bare ``<res>_*`` names of a ``SongDecoder`` (MultistageUNet's ``decs.<k>.<res>_*``).

  Returns:
    [N, H, W, out_channels] in the dtype of ``x``.
  """
  block_kwargs = song_block_kwargs(net)
  skips = list(skips)
  cout = x.shape[-1]
  aux = None
  last = len(net.channel_mult) - 1
  for level, mult in reversed(list(enumerate(net.channel_mult))):
    res = net.img_resolution >> level
    tag = f"{prefix}{res}x{res}"
    if level == last:
      x = UNetBlock(cout, attention=True, **block_kwargs, name=f"{tag}_in0")(x, emb, train)
      x = UNetBlock(cout, **block_kwargs, name=f"{tag}_in1")(x, emb, train)
    else:
      x = UNetBlock(cout, up=True, **block_kwargs, name=f"{tag}_up")(x, emb, train)
    for idx in range(net.num_blocks + 1):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      cout = net.model_channels * mult
      attn = idx == net.num_blocks and res in net.attn_resolutions
      x = UNetBlock(cout, attention=attn, **block_kwargs, name=f"{tag}_block{idx}")(x, emb, train)
    if net.decoder_type == "skip" or level == 0:
      if net.decoder_type == "skip" and level < last:
        aux = Conv2d(net.out_channels, 0, up=True, resample_filter=tuple(net.resample_filter),
                     name=f"{tag}_aux_up")(aux)
      tmp = GroupNorm(norm_groups(net), eps=1e-6, name=f"{tag}_aux_norm")(x)
      tmp = Conv2d(net.out_channels, 3, init=INIT_ZERO, name=f"{tag}_aux_conv")(nn.silu(tmp))
      aux = tmp if aux is None else tmp + aux
  return aux


class SongDecoder(nn.Module):
  """SongUNet's decoder as a module of its own, parameters named ``<res>x<res>_*`` (no ``dec_``).

  Attributes: as in ``SongUNet``; ``model_channels`` is the decoder's own base width (the encoder's
  may differ: the channels of ``x`` and the skips are taken from the inputs); ``norm_groups`` is the
  GroupNorm group cap (EDM 32).
  """
  img_resolution: int
  out_channels: int
  model_channels: int
  channel_mult: Sequence[int]
  num_blocks: int
  attn_resolutions: Sequence[int]
  dropout: float = 0.0
  decoder_type: str = "standard"
  resample_filter: Sequence[int] = (1, 1)
  norm_groups: int = EDM_NORM_GROUPS

  @nn.compact
  def __call__(self, x: Array, skips: Sequence[Array], emb: Array, train: bool = False) -> Array:
    """Maps the encoder output ``x`` [N,h,w,C] and ``skips`` (see ``song_decoder``) to
    [N,H,W,out_channels] in the dtype of ``x``."""
    check_song_fields(self)
    return song_decoder(self, x, skips, emb, train, prefix="")


class SongUNet(nn.Module):
  """EDM's ``SongUNet``: DDPM++ (positional embedding, standard encoder, filter [1,1]) and NCSN++
  (Fourier embedding, residual encoder, filter [1,3,3,1]), plus the ``skip`` encoder/decoder variants.

  Attributes:
    img_resolution: nominal (full-image) resolution R; level l has nominal resolution R >> l.
    in_channels: input channels (image channels + 2 coordinate channels for Patch Diffusion).
    out_channels: output channels.
    label_dim: number of classes (0 = unconditional).
    augment_dim: augmentation-label dimension (0 = none).
    model_channels, channel_mult, channel_mult_emb, num_blocks, attn_resolutions, dropout,
    embedding_type ('positional' | 'fourier'), channel_mult_noise, encoder_type
    ('standard' | 'skip' | 'residual'), decoder_type ('standard' | 'skip'), resample_filter:
      as in EDM's constructor.
    dtype: compute dtype of the convolutional path (parameters stay float32; the embedding MLP,
      GroupNorm statistics and softmax run in float32, as in EDM's mixed precision).
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.10
  embedding_type: str = "positional"
  channel_mult_noise: int = 1
  encoder_type: str = "standard"
  decoder_type: str = "standard"
  resample_filter: Sequence[int] = (1, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array] = None,
               augment_labels: Optional[Array] = None, train: bool = False) -> Array:
    """Raw network output F.

    Args:
      x: [N, H, W, in_channels] float; H and W divisible by ``2 ** (len(channel_mult) - 1)``.
      noise_labels: [N] float (EDM's c_noise).
      class_labels: [N, label_dim] float one-hot, or None (= the all-zero, unconditional label).
      augment_labels: [N, augment_dim] or None.
      train: enables dropout (needs ``rngs={'dropout': key}``).

    Returns:
      [N, H, W, out_channels] in the compute dtype.
    """
    check_song_fields(self)
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"expected {self.in_channels} input channels, got x of shape {x.shape}")
    emb = song_mapping(self, noise_labels, class_labels, augment_labels)
    x, skips = song_encoder(self, x.astype(self.dtype), emb, train)
    return song_decoder(self, x, skips, emb, train, prefix="dec_")
