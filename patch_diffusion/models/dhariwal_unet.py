"""ADM (EDM's ``DhariwalUNet``, Dhariwal & Nichol 2021) in Flax Linen, NHWC.

Adaptive scale/shift blocks, multi-head attention with 64 channels per head, a bias-free label
embedding added after the second mapping layer, and augment labels. Parameter names follow the
PyTorch module names with ``enc``/``dec`` flattened (``enc.16x16_block0`` -> ``enc_16x16_block0``).
Attention is placed by level (nominal resolution ``img_resolution >> level``), so one set of weights runs
on every patch size.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from patch_diffusion.models.layers import Conv2d, GroupNorm, Init, Linear, PositionalEmbedding, UNetBlock

Array = jax.Array


class DhariwalUNet(nn.Module):
  """EDM's ``DhariwalUNet`` (ADM).

  Attributes:
    img_resolution: nominal (full-image) resolution R; level l has nominal resolution R >> l.
    in_channels: input channels (image channels + 2 coordinate channels for Patch Diffusion).
    out_channels: output channels.
    label_dim: number of classes (0 = unconditional).
    augment_dim: augmentation-label dimension (0 = none).
    model_channels, channel_mult, channel_mult_emb, num_blocks, attn_resolutions, dropout: as in EDM
      (defaults 192, (1,2,3,4), 4, 3, (32,16,8), 0.10).
    dtype: compute dtype of the convolutional path (parameters and the embedding MLP stay float32).
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)
  dropout: float = 0.10
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
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"expected {self.in_channels} input channels, got x of shape {x.shape}")
    emb_channels = self.model_channels * self.channel_mult_emb
    init = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
    init_zero = Init("kaiming_uniform", weight=0.0, bias=0.0)
    block_kwargs = dict(channels_per_head=64, dropout=self.dropout, init=init, init_zero=init_zero)

    # Mapping (float32).
    n = x.shape[0]
    emb = PositionalEmbedding(self.model_channels, name="map_noise")(noise_labels)
    if self.augment_dim and augment_labels is not None:
      emb = emb + Linear(self.model_channels, use_bias=False, init=init_zero, name="map_augment")(
          augment_labels.astype(jnp.float32))
    emb = nn.silu(Linear(emb_channels, init=init, name="map_layer0")(emb))
    emb = Linear(emb_channels, init=init, name="map_layer1")(emb)
    if self.label_dim:
      labels = (jnp.zeros((n, self.label_dim), jnp.float32) if class_labels is None
                else jnp.broadcast_to(class_labels.astype(jnp.float32), (n, self.label_dim)))
      emb = emb + Linear(emb_channels, use_bias=False,
                         init=Init("kaiming_normal", weight=math.sqrt(self.label_dim)),
                         name="map_label")(labels)
    emb = nn.silu(emb)

    # Encoder.
    x = x.astype(self.dtype)
    skips = []
    cout = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      tag = f"enc_{res}x{res}"
      if level == 0:
        cout = self.model_channels * mult
        x = Conv2d(cout, 3, init=init, name=f"{tag}_conv")(x)
      else:
        x = UNetBlock(cout, down=True, **block_kwargs, name=f"{tag}_down")(x, emb, train)
      skips.append(x)
      for idx in range(self.num_blocks):
        cout = self.model_channels * mult
        x = UNetBlock(cout, attention=res in self.attn_resolutions, **block_kwargs,
                      name=f"{tag}_block{idx}")(x, emb, train)
        skips.append(x)

    # Decoder.
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
        x = UNetBlock(cout, attention=res in self.attn_resolutions, **block_kwargs,
                      name=f"{tag}_block{idx}")(x, emb, train)
    x = GroupNorm(name="out_norm")(x)
    return Conv2d(self.out_channels, 3, init=init_zero, name="out_conv")(nn.silu(x))
