"""DDPM++ and NCSN++ (EDM's ``SongUNet``, Song et al. 2021) in Flax Linen, NHWC.

Parameter names follow the PyTorch module names with the ``enc``/``dec`` dictionaries flattened
(``enc.16x16_block0`` -> ``enc_16x16_block0``), so ``torch_mapping`` converts checkpoints by renaming
and transposing only.

Attention is placed by **level**: level ``l`` has nominal resolution ``img_resolution >> l`` and gets
attention iff that number is in ``attn_resolutions`` — independent of the size of the input actually
fed, so one set of weights runs on every patch size ``img_resolution / 2^k`` (Patch Diffusion).
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
    if self.embedding_type not in ("fourier", "positional"):
      raise ValueError(f"embedding_type must be 'fourier' or 'positional', got {self.embedding_type!r}")
    if self.encoder_type not in ("standard", "skip", "residual"):
      raise ValueError(f"encoder_type must be standard|skip|residual, got {self.encoder_type!r}")
    if self.decoder_type not in ("standard", "skip"):
      raise ValueError(f"decoder_type must be standard|skip, got {self.decoder_type!r}")
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"expected {self.in_channels} input channels, got x of shape {x.shape}")

    emb_channels = self.model_channels * self.channel_mult_emb
    noise_channels = self.model_channels * self.channel_mult_noise
    init = Init("xavier_uniform")
    init_zero = Init("xavier_uniform", weight=1e-5)
    init_attn = Init("xavier_uniform", weight=math.sqrt(0.2))
    block_kwargs = dict(
        num_heads=1, dropout=self.dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
        resample_filter=tuple(self.resample_filter), resample_proj=True, adaptive_scale=False,
        init=init, init_zero=init_zero, init_attn=init_attn)

    # Mapping (float32, as EDM: its Linear layers run in the noise labels' dtype).
    n = x.shape[0]
    if self.embedding_type == "positional":
      emb = PositionalEmbedding(noise_channels, endpoint=True, name="map_noise")(noise_labels)
    else:
      emb = FourierEmbedding(noise_channels, name="map_noise")(noise_labels)
    emb = emb.reshape(n, 2, -1)[:, ::-1].reshape(n, -1)  # swap sin/cos
    if self.label_dim:
      labels = (jnp.zeros((n, self.label_dim), jnp.float32) if class_labels is None
                else jnp.broadcast_to(class_labels.astype(jnp.float32), (n, self.label_dim)))
      emb = emb + Linear(noise_channels, init=init, name="map_label")(labels * math.sqrt(self.label_dim))
    if self.augment_dim and augment_labels is not None:
      emb = emb + Linear(noise_channels, use_bias=False, init=init, name="map_augment")(
          augment_labels.astype(jnp.float32))
    emb = nn.silu(Linear(emb_channels, init=init, name="map_layer0")(emb))
    emb = nn.silu(Linear(emb_channels, init=init, name="map_layer1")(emb))

    # Encoder.
    x = x.astype(self.dtype)
    skips = []
    aux = x
    cout = self.in_channels
    caux = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      tag = f"enc_{res}x{res}"
      if level == 0:
        cout = self.model_channels
        x = Conv2d(cout, 3, init=init, name=f"{tag}_conv")(x)
        skips.append(x)
      else:
        x = UNetBlock(cout, down=True, **block_kwargs, name=f"{tag}_down")(x, emb, train)
        skips.append(x)
        if self.encoder_type == "skip":
          aux = Conv2d(caux, 0, down=True, resample_filter=tuple(self.resample_filter),
                       name=f"{tag}_aux_down")(aux)
          x = skips[-1] = x + Conv2d(cout, 1, init=init, name=f"{tag}_aux_skip")(aux)
        elif self.encoder_type == "residual":
          r = Conv2d(cout, 3, down=True, resample_filter=tuple(self.resample_filter),
                     fused_resample=True, init=init, name=f"{tag}_aux_residual")(aux)
          x = skips[-1] = aux = (x + r) / math.sqrt(2)
          caux = cout
      for idx in range(self.num_blocks):
        cout = self.model_channels * mult
        x = UNetBlock(cout, attention=res in self.attn_resolutions, **block_kwargs,
                      name=f"{tag}_block{idx}")(x, emb, train)
        skips.append(x)

    # Decoder.
    aux = None
    last = len(self.channel_mult) - 1
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      tag = f"dec_{res}x{res}"
      if level == last:
        x = UNetBlock(cout, attention=True, **block_kwargs, name=f"{tag}_in0")(x, emb, train)
        x = UNetBlock(cout, **block_kwargs, name=f"{tag}_in1")(x, emb, train)
      else:
        x = UNetBlock(cout, up=True, **block_kwargs, name=f"{tag}_up")(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        cout = self.model_channels * mult
        attn = idx == self.num_blocks and res in self.attn_resolutions
        x = UNetBlock(cout, attention=attn, **block_kwargs, name=f"{tag}_block{idx}")(x, emb, train)
      if self.decoder_type == "skip" or level == 0:
        if self.decoder_type == "skip" and level < last:
          aux = Conv2d(self.out_channels, 0, up=True, resample_filter=tuple(self.resample_filter),
                       name=f"{tag}_aux_up")(aux)
        tmp = GroupNorm(eps=1e-6, name=f"{tag}_aux_norm")(x)
        tmp = Conv2d(self.out_channels, 3, init=init_zero, name=f"{tag}_aux_conv")(nn.silu(tmp))
        aux = tmp if aux is None else tmp + aux
    return aux
