"""Patch-size schedule (host side) and the per-sample random crop with coordinate channels (device side).

Patch Diffusion (METHOD.md §1) trains on random square patches of side ``s`` cut from full-resolution
images of side ``R``, with two extra input channels giving each pixel's location in the full image.
Per step one size is drawn; a step with a smaller patch draws proportionally more images (the batch
multiplier) so that every step costs roughly the same and the image counter advances faster.

The schedule is a pure function of ``(seed, step, progress)``: every host of a multi-host job computes
the same size for the same step without communicating (the official code draws it per GPU, so one of its
steps can mix sizes; we do not copy that).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("stochastic", "progressive", "full")


def patch_sizes(resolution: int, latent: bool = False) -> tuple[int, ...]:
  """The patch sizes used at full resolution ``resolution``, smallest first.

  Pixel space: (R/4, R/2, R). Latent space: (R/2, R).
  """
  divisor = 2 if latent else 4
  if resolution <= 0 or resolution % divisor:
    space = "latent" if latent else "pixel"
    raise ValueError(
        f"resolution {resolution} must be a positive multiple of {divisor} for {space}-space patch "
        f"training (patch sizes R/{divisor} .. R); pick a resolution divisible by {divisor}")
  if latent:
    return (resolution // 2, resolution)
  return (resolution // 4, resolution // 2, resolution)


def batch_multipliers(resolution: int, latent: bool = False) -> tuple[int, ...]:
  """Images drawn per step relative to a full-size step, aligned with :func:`patch_sizes`.

  The explicit table R/4 -> 4, R/2 -> 2, R -> 1 (the official ``batch_mul_dict`` is keyed by absolute
  sizes and is wrong at resolutions other than 64 pixel / 32 latent).
  """
  return (2, 1) if latent else (4, 2, 1)


def size_probabilities(real_p: float, latent: bool = False) -> tuple[float, ...]:
  """Stochastic-schedule probabilities aligned with :func:`patch_sizes`.

  Pixel: [(1-p)*2/5, (1-p)*3/5, p]; latent: [1-p, p].
  """
  if not 0.0 <= real_p <= 1.0:
    raise ValueError(f"patch.real_p = {real_p} must lie in [0, 1] (probability of a full-size step)")
  if latent:
    return (1.0 - real_p, real_p)
  return ((1.0 - real_p) * 2 / 5, (1.0 - real_p) * 3 / 5, real_p)


@dataclasses.dataclass(frozen=True)
class PatchSchedule:
  """Which patch size each training step uses.

  Attributes:
    resolution: full image side R (pixels or latent pixels).
    schedule: 'stochastic' (random per step), 'progressive' (R/4 for the first 20 % of training, R/2 until
      50 %, then R; latent: R/2 until 50 %, then R) or 'full' (always R).
    real_p: probability of a full-size step for the stochastic schedule.
    latent: latent-space size set {R/2, R} instead of {R/4, R/2, R}.
    seed: schedule seed; the size for a step depends only on (seed, step, progress).
  """
  resolution: int
  schedule: str = "stochastic"
  real_p: float = 0.5
  latent: bool = False
  seed: int = 0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"patch.schedule = {self.schedule!r}; expected one of {SCHEDULES}")
    patch_sizes(self.resolution, self.latent)  # validates R
    size_probabilities(self.real_p, self.latent)  # validates p

  @property
  def sizes(self) -> tuple[int, ...]:
    return patch_sizes(self.resolution, self.latent)

  @property
  def batch_muls(self) -> tuple[int, ...]:
    return batch_multipliers(self.resolution, self.latent)

  @property
  def probabilities(self) -> tuple[float, ...]:
    """Long-run fraction of steps at each size (for 'progressive': over the whole run)."""
    n = len(self.sizes)
    if self.schedule == "full":
      return tuple([0.0] * (n - 1) + [1.0])
    if self.schedule == "progressive":
      return (0.2, 0.3, 0.5) if n == 3 else (0.5, 0.5)
    return size_probabilities(self.real_p, self.latent)

  @property
  def average_batch_mul(self) -> float:
    """Expected images per step relative to a full-size step (pixel, p=0.5: 1.9; latent: 1.5).

    This is the factor by which the image counter advances per step, as in the official code.
    """
    return float(sum(p * m for p, m in zip(self.probabilities, self.batch_muls)))

  @property
  def expected_step_cost(self) -> float:
    """Expected compute of a step relative to a full-size step: sum_k p_k (s_k/R)^2 mul_k (p=0.5: 0.70)."""
    return float(sum(p * (s / self.resolution)**2 * m
                     for p, s, m in zip(self.probabilities, self.sizes, self.batch_muls)))

  def size_index(self, step: int, progress: float = 0.0) -> int:
    """Index into :attr:`sizes` for a step; identical on every host.

    Args:
      step: the global training step (0-based).
      progress: fraction of training done in [0, 1] (counted images / total), used by 'progressive'.
    """
    n = len(self.sizes)
    if self.schedule == "full":
      return n - 1
    if self.schedule == "progressive":
      bounds = (0.2, 0.5) if n == 3 else (0.5,)
      return int(np.searchsorted(np.asarray(bounds), progress, side="right"))
    # A fresh generator keyed by (seed, step): stateless, so resume and multi-host agree by construction.
    u = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, 0x5EED, int(step)]).random()
    cdf = np.cumsum(self.probabilities)
    return int(min(np.searchsorted(cdf, u, side="right"), n - 1))

  def patch_size(self, step: int, progress: float = 0.0) -> int:
    return self.sizes[self.size_index(step, progress)]

  def batch_mul(self, step: int, progress: float = 0.0) -> int:
    return self.batch_muls[self.size_index(step, progress)]


def coordinate_grid(row_start, col_start, height: int, width: int, resolution: int | Sequence[int],
                    dtype=jnp.float32) -> jnp.ndarray:
  """Coordinate channels of a window, NHWC-ready.

  Pixel (r, c) of a window whose top-left corner sits at pixel (row_start, col_start) of a full image of
  size ``resolution`` gets x = (col_start + c)/(W_full - 1)·2 - 1 and y = (row_start + r)/(H_full - 1)·2 - 1,
  so the full image spans [-1, 1] with its top-left pixel at (-1, -1). Starts may be negative or put the
  window past the edge (outpainting / extrapolation beyond [-1, 1]); they may be arrays of shape [N].

  Args:
    row_start, col_start: scalars or [N] arrays (pixels, int or float).
    height, width: window size in pixels.
    resolution: full-image side R, or (H_full, W_full) for non-square images.

  Returns:
    [height, width, 2] for scalar starts, [N, height, width, 2] for [N] starts; channel 0 = x (column),
    channel 1 = y (row).
  """
  res_h, res_w = (resolution, resolution) if np.isscalar(resolution) else tuple(resolution)
  row_start = jnp.asarray(row_start)
  col_start = jnp.asarray(col_start)
  rows = row_start[..., None] + jnp.arange(height)  # [..., H]
  cols = col_start[..., None] + jnp.arange(width)  # [..., W]
  y = _normalize(rows, res_h, dtype)
  x = _normalize(cols, res_w, dtype)
  x = jnp.broadcast_to(x[..., None, :], x.shape[:-1] + (height, width))
  y = jnp.broadcast_to(y[..., :, None], y.shape[:-1] + (height, width))
  return jnp.stack([x, y], axis=-1)


def _normalize(index: jnp.ndarray, size: int, dtype) -> jnp.ndarray:
  """Maps pixel indices to [-1, 1] over ``size`` pixels: index/(size-1)·2 - 1.

  Integer indices inside the image are looked up in a table computed on the host in float32, so the
  values are bit-identical to the reference (XLA rewrites division by a constant as a multiplication by
  its reciprocal, which is 1 ulp off for some indices). Other indices (fractional, or outside the image
  for extrapolation) use the formula.
  """
  if jnp.issubdtype(index.dtype, jnp.integer):
    table = (np.arange(size, dtype=np.float32) / np.float32(size - 1) - np.float32(0.5)) * np.float32(2)
    inside = (index >= 0) & (index < size)
    formula = (index.astype(dtype) / (size - 1) - 0.5) * 2
    return jnp.where(inside, jnp.asarray(table, dtype)[jnp.clip(index, 0, size - 1)], formula)
  return ((index.astype(dtype) / (size - 1) - 0.5) * 2).astype(dtype)


def full_grid(resolution: int, batch: int | None = None, dtype=jnp.float32) -> jnp.ndarray:
  """Coordinates of the whole image ([R, R, 2], or [batch, R, R, 2]); what sampling uses."""
  grid = coordinate_grid(0, 0, resolution, resolution, resolution, dtype)
  return grid if batch is None else jnp.broadcast_to(grid, (batch,) + grid.shape)


def crop_patches(images: jnp.ndarray, row_offset: jnp.ndarray, col_offset: jnp.ndarray,
                 patch_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Cuts one patch per image at given offsets; returns (patches, coordinates).

  Args:
    images: [N, R, R, C] full-resolution images (any dtype).
    row_offset, col_offset: int [N], in 0 .. R - patch_size.
    patch_size: static patch side s.

  Returns:
    patches [N, s, s, C] with patch[n, r, c] = images[n, i + r, j + c], and coordinates [N, s, s, 2]
    (float32, see :func:`coordinate_grid`).
  """
  n, res_h, res_w, ch = images.shape
  if patch_size == res_h and patch_size == res_w:
    patches = images  # the crop is the identity; skip the gather
  else:
    # vmap of dynamic_slice lowers to a single batched gather: no Python loop over samples.
    cut = lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (patch_size, patch_size, ch))
    patches = jax.vmap(cut)(images, row_offset.astype(jnp.int32), col_offset.astype(jnp.int32))
  coords = coordinate_grid(row_offset, col_offset, patch_size, patch_size, (res_h, res_w))
  return patches, coords


def random_offsets(key: jax.Array, batch: int, resolution: int, patch_size: int):
  """Independent uniform row/column offsets in 0 .. R - s inclusive, int32 [batch] each."""
  k_row, k_col = jax.random.split(key)
  hi = resolution - patch_size + 1
  return (jax.random.randint(k_row, (batch,), 0, hi, dtype=jnp.int32),
          jax.random.randint(k_col, (batch,), 0, hi, dtype=jnp.int32))


def random_patches(key: jax.Array, images: jnp.ndarray, patch_size: int):
  """Random per-sample crop of ``images`` [N, R, R, C] to [N, s, s, C] plus coordinates [N, s, s, 2]."""
  row, col = random_offsets(key, images.shape[0], images.shape[1], patch_size)
  return crop_patches(images, row, col, patch_size)
