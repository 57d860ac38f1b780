"""Multi-stage multi-decoder U-Net (Zhang et al., CVPR 2024, "Improving Training Efficiency of Diffusion
Models via Multi-Stage Framework and Tailored Multi-Decoder Architectures"; ``MultistageUNet`` in the
authors' EDM code, LucasYFL/Multistage_Diffusion ``edm/training/networks.py``) in Flax Linen, NHWC.

The σ range is cut into stages at ``stage_boundaries`` b_1 < ... < b_{K-1}; stage k covers
``b_k < σ <= b_{k+1}`` (b_0 = 0, b_K = inf). All stages share the DDPM++/NCSN++ noise/label mapping and
encoder of ``SongUNet`` (width ``model_channels``); each stage has its own decoder, whose block widths
are ``decoder_channels[k] * channel_mult[level]`` (the blocks before the first skip concatenation keep
the encoder's width, as in the authors' code).

Parameter names: the shared part is named exactly as in ``SongUNet`` (``map_layer0``, ``enc_16x16_conv``,
...); decoder k is the submodule ``decs_<k>`` with the bare block names (``decs_0/4x4_in0/conv0/kernel``
is PyTorch ``decs.0.4x4_in0.conv0.weight``). Attention is placed by level (nominal resolution
``img_resolution >> level``), so one set of weights runs on every patch size, as ``SongUNet``.

Stage convention (the authors' ``forward``): the stage of a batch is the stage of its *first* sample,
``#{k : b_k < σ_0}`` with ``σ_0 = exp(4 * noise_labels[0])`` — lower bound exclusive, upper inclusive, so
a σ exactly on a boundary belongs to the lower stage. The authors' loop tests ``σ > lower`` but
``noise_labels = ln(σ)/4 <= upper``; since ``ln(b)/4 < b`` for every b > 0, the stage that contains σ
always passes its own test and no later stage passes the lower-bound test, so their choice equals the
pure σ rule above for every σ > 0 (``stage_of_sigma``).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from patch_diffusion.models.song_unet import SongDecoder, check_song_fields, song_encoder, song_mapping

Array = jax.Array

#: The authors' stage boundaries in σ (EDM ``train.py --arch=ddpmpp-multistage``: ``stage_interval``
#: [[0, 2.5103]], [[2.5103, 7.6577]], [[7.6577, inf]]), found by their timestep clustering for CIFAR-10.
DEFAULT_STAGE_BOUNDARIES = (2.5103, 7.6577)
#: The authors' per-stage decoder base widths (``de_model_channels``), stage 0 = lowest σ.
DEFAULT_DECODER_CHANNELS = (192, 128, 16)


def check_stage_boundaries(boundaries: Sequence[float], num_stages: Optional[int] = None) -> tuple:
  """Validates concrete stage boundaries (finite, > 0, strictly increasing) and returns them as floats.

  Raises:
    ValueError: naming the offending values, or the count when ``num_stages`` is given and
      ``len(boundaries) != num_stages - 1``.
  """
  if np.ndim(boundaries) != 1:
    raise ValueError(f"stage boundaries must be a flat sequence of σ values, got {boundaries!r}")
  b = tuple(float(v) for v in np.asarray(boundaries, np.float64).reshape(-1))
  if any(not math.isfinite(v) or v <= 0 for v in b) or any(lo >= hi for lo, hi in zip(b, b[1:])):
    raise ValueError(f"stage boundaries must be finite, positive and strictly increasing, got {b}")
  if num_stages is not None and len(b) != num_stages - 1:
    raise ValueError(f"{num_stages} stages need {num_stages - 1} stage boundaries, got {len(b)} ({b}); "
                     "give one decoder width per stage and one boundary between consecutive stages")
  return b


def stage_of_sigma(sigma: Union[Array, np.ndarray, float],
                   boundaries: Union[Sequence[float], Array]) -> Array:
  """Stage index of each σ: ``#{k : boundaries[k] < σ}`` as int32 (pure, jittable, elementwise).

  Stage k covers ``boundaries[k-1] < σ <= boundaries[k]`` (lower bound exclusive, upper inclusive), the
  authors' convention; σ on a boundary belongs to the lower stage. The comparison runs in σ's floating
  dtype (float32 for non-float input), with the boundaries rounded to it, as PyTorch compares a float32
  tensor with a Python float. σ <= 0 or NaN gives stage 0 (the authors' loop selects no stage there and
  fails).

  Args:
    sigma: any shape, float.
    boundaries: [K-1] increasing positive σ values (a Python sequence is validated; an array is taken as
      is, e.g. a traced one).

  Returns:
    int32 array of ``sigma``'s shape with values in [0, K-1].
  """
  if not isinstance(boundaries, jax.Array):
    boundaries = check_stage_boundaries(boundaries)
  sigma = jnp.asarray(sigma)
  if not jnp.issubdtype(sigma.dtype, jnp.floating):
    sigma = sigma.astype(jnp.float32)
  b = jnp.asarray(boundaries, sigma.dtype).reshape(-1)
  return jnp.sum(sigma[..., None] > b, axis=-1, dtype=jnp.int32)


def boundaries_from_stage_interval(stage_interval) -> tuple[float, ...]:
  """The authors' ``stage_interval`` (``[[[0, b1]], [[b1, b2]], ..., [[b_{K-1}, inf]]]``, one interval
  per stage) as ``stage_boundaries`` ``(b1, ..., b_{K-1})``.

  Raises:
    ValueError: for a stage made of several intervals or intervals that do not tile (0, inf) in order;
      this port supports contiguous stages only (as every configuration the authors released).
  """
  flat = []
  for k, intervals in enumerate(stage_interval):
    if len(intervals) != 1:
      raise ValueError(f"stage {k} has {len(intervals)} σ intervals {intervals!r}; only one contiguous "
                       "interval per stage is supported: split it into separate stages")
    lo, hi = (float(v) for v in intervals[0])  # float('inf') also parses the string 'inf'
    flat.append((lo, hi))
  if not flat or flat[0][0] != 0 or flat[-1][1] != math.inf or any(
      a[1] != b[0] for a, b in zip(flat, flat[1:])):
    raise ValueError(f"stage intervals must tile (0, inf) in order, got {flat}")
  return check_stage_boundaries([hi for _, hi in flat[:-1]], len(flat))


class MultistageUNet(nn.Module):
  """Shared DDPM++/NCSN++ mapping and encoder, one ``SongDecoder`` per σ stage (see module docstring).

  Attributes:
    img_resolution: nominal (full-image) resolution R; level l has nominal resolution R >> l.
    in_channels: input channels (image channels + 2 coordinate channels for Patch Diffusion).
    out_channels: output channels.
    label_dim: number of classes (0 = unconditional).
    augment_dim: augmentation-label dimension (0 = none).
    model_channels: the encoder's base width (the authors' ``en_model_channels``); the embedding width
      is ``model_channels * channel_mult_emb``.
    decoder_channels: base width of each stage's decoder (``de_model_channels``); K = its length.
    stage_boundaries: K - 1 increasing σ values between the stages (``stage_interval``'s inner bounds).
    channel_mult, channel_mult_emb, num_blocks, attn_resolutions, dropout, embedding_type,
    channel_mult_noise, encoder_type, decoder_type, resample_filter, dtype: as in ``SongUNet``.
    norm_groups: GroupNorm group cap, ``min(norm_groups, C // 4)`` groups. 16: the authors' copy of
      EDM's layers defaults ``GroupNorm(num_groups=16)`` (EDM itself: 32), so their checkpoints need it.
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS
  stage_boundaries: Sequence[float] = DEFAULT_STAGE_BOUNDARIES
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
  norm_groups: int = 16
  dtype: Any = jnp.float32

  @property
  def num_stages(self) -> int:
    """K, the number of stages (= decoders)."""
    return len(self.decoder_channels)

  def setup(self):
    check_song_fields(self)
    if not self.decoder_channels:
      raise ValueError("MultistageUNet needs decoder_channels: one decoder base width per stage, "
                       f"e.g. {DEFAULT_DECODER_CHANNELS}")
    check_stage_boundaries(self.stage_boundaries, self.num_stages)
    # A list attribute: Flax names the decoders decs_0, decs_1, ... (PyTorch ModuleList decs.0, ...).
    self.decs = [
        SongDecoder(img_resolution=self.img_resolution, out_channels=self.out_channels,
                    model_channels=int(width), channel_mult=tuple(self.channel_mult),
                    num_blocks=self.num_blocks, attn_resolutions=tuple(self.attn_resolutions),
                    dropout=self.dropout, decoder_type=self.decoder_type,
                    resample_filter=tuple(self.resample_filter), norm_groups=self.norm_groups)
        for width in self.decoder_channels]

  def select_stage(self, noise_labels: Array) -> Array:
    """The stage of a batch: that of its first sample, σ_0 = exp(4 * noise_labels[0]) (int32 scalar)."""
    # As the authors: (noise_labels[0] * 4).exp() in the labels' float dtype, so the rounding near a
    # boundary is theirs.
    nl0 = jnp.asarray(noise_labels).reshape(-1)[0]
    if not jnp.issubdtype(nl0.dtype, jnp.floating):
      nl0 = nl0.astype(jnp.float32)
    return stage_of_sigma(jnp.exp(nl0 * 4), tuple(self.stage_boundaries))

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array] = None,
               augment_labels: Optional[Array] = None, train: bool = False,
               stage: Union[None, int, Array] = None) -> Array:
    """Raw network output F of the stage's decoder.

    Args:
      x: [N, H, W, in_channels] float; H and W divisible by ``2 ** (len(channel_mult) - 1)``.
      noise_labels: [N] float (EDM's c_noise = ln(σ)/4).
      class_labels: [N, label_dim] float one-hot, or None (= the all-zero, unconditional label).
      augment_labels: [N, augment_dim] or None.
      train: enables dropout (needs ``rngs={'dropout': key}``).
      stage: which decoder runs. A Python int is static: only that decoder is traced, compiled and
        differentiated (the others get exactly zero gradients). None: the stage of σ_0 =
        exp(4 * noise_labels[0]) (``select_stage``; the whole batch uses it, as the authors' code), chosen
        at run time with a lifted ``lax.switch``, so a traced σ works inside ``jit``. An int32 array
        scalar: that stage, chosen at run time the same way.

    Returns:
      [N, H, W, out_channels] in the compute dtype.

    Initialisation (``init``) always creates every decoder's parameters, whatever ``stage``.
    """
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"expected {self.in_channels} input channels, got x of shape {x.shape}")
    static = isinstance(stage, (int, np.integer)) and not isinstance(stage, bool)
    if static and not 0 <= int(stage) < self.num_stages:
      raise ValueError(f"stage={stage} out of range: this network has {self.num_stages} stages (0.."
                       f"{self.num_stages - 1})")
    if stage is not None and not static:
      stage = jnp.asarray(stage)
      if stage.shape != () or not jnp.issubdtype(stage.dtype, jnp.integer):
        raise ValueError(f"stage must be None, a Python int or an integer scalar array, got {stage!r}")
    emb = song_mapping(self, noise_labels, class_labels, augment_labels)
    h, skips = song_encoder(self, x.astype(self.dtype), emb, train)

    if self.is_initializing():
      # Every decoder must create its parameters (and record its init recipes) whatever stage is
      # asked for; lax.switch could not create branch-specific variables anyway.
      outs = [dec(h, skips, emb, train) for dec in self.decs]
      index = int(stage) if static else (self.select_stage(noise_labels) if stage is None else stage)
      return outs[index] if static else jnp.stack(outs)[jnp.clip(index, 0, self.num_stages - 1)]
    if static:
      return self.decs[int(stage)](h, skips, emb, train)
    index = self.select_stage(noise_labels) if stage is None else stage.astype(jnp.int32)
    # lax.switch clamps an out-of-range index to the first/last branch.
    branches = [lambda mdl, h, skips, emb, k=k: mdl.decs[k](h, skips, emb, train)
                for k in range(self.num_stages)]
    # Only parameters enter the branches: the 'intermediates' sown by resampling convolutions would
    # differ in structure between branches.
    return nn.switch(index, branches, self, h, skips, emb, variables="params")
