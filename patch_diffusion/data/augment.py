"""EDM's non-leaking augmentation pipe in pure JAX: on device, jittable, deterministic under the key.

EDM (Karras et al. 2022, ``training/augment.py``, after StyleGAN2-ADA) augments training images with
geometric transforms and tells the network which were applied through *augmentation labels* (the
``augment_labels`` input of SongUNet/DhariwalUNet, added to the noise embedding by ``map_augment``).
Sampling passes zero labels ("no augmentation"), so the transforms do not leak into the samples.

**The preset** (:func:`edm_augment_pipe`, what EDM's and Patch Diffusion's ``train.py --augment=P`` build):
``AugmentPipe(p=P, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)`` with
``augment_dim = 9``. Each transform fires per sample with probability ``multiplier · p``; ``xflip = 1e8``
makes the x-flip's gate always open, so every image is x-flipped with probability ½ whatever p is.
EDM used p = 0.15 for FFHQ-64 and AFHQv2-64 (README table), 0.12 is its train.py default (CIFAR-10); every
Patch Diffusion command sets 0.

**Transforms** (per sample, in this order; NHWC images of side H × W; pixel coordinates x = column
rightwards, y = row downwards; multipliers 0 = off):

* ``xflip``: w ∈ {0, 1}; w = 1 mirrors columns. Label [w].
* ``yflip``: w ∈ {0, 1}; w = 1 mirrors rows. Label [w].
* ``rotate_int``: w ∈ {0, 1, 2, 3} quarter turns counter-clockwise as displayed (``np.rot90(img, w)``);
  square images only. Labels [w ∈ {1, 2}, w ∈ {2, 3}].
* ``translate_int``: (u, v) ~ U(-1, 1)², tx = round(u·W·max), ty = round(v·H·max) (max =
  ``translate_int_max`` = 0.125); output pixel (y, x) reads input (y + ty, x − tx) with mirror
  reflection at the borders (content moves right by tx and *up* by ty, as in EDM). Labels
  [tx/(W·max), ty/(H·max)].
* ``scale``: w ~ N(0, 1), isotropic scale 2^(w·0.2). Label [w].
* ``rotate_frac``: w ~ U(-π, π) (× ``rotate_frac_max``), rotation by w. Labels [cos w − 1, sin w].
* ``aniso``: w ~ N(0, 1), scale 2^(w·0.2) along an axis at angle r and 2^(−w·0.2) across it; r ~ U(-π, π)
  with probability ``aniso_rotate_prob`` = ½, else 0 (that gate ignores p, as in EDM). Labels
  [w·cos r, w·sin r].
* ``translate_frac``: (u, v) ~ N(0, 1)², translation by (u·W, v·H)·0.125 (content moves right/down).
  Labels [u, v].

A transform that does not fire has w = 0 (labels 0). The label vector concatenates the labels of the
enabled transforms in the order above: for the preset, 9 values
``[xflip, yflip, scale, cos(rot)−1, sin(rot), aniso·cos r, aniso·sin r, translate_x, translate_y]``.
EDM's colour transforms (brightness, contrast, luma flip, hue, saturation) are not part of any preset the
papers used and are not implemented.

**Execution of the geometric part** (scale, rotate_frac, aniso, translate_frac) follows EDM's arithmetic:
the inverse transform G⁻¹ (3×3, centred pixel coordinates) is composed per sample; the image is
reflect-padded, upsampled 2× with the Symlet-6 low-pass filter, resampled bilinearly at G⁻¹ of the output
pixel grid (zeros outside), then low-pass filtered and decimated 2× and cropped back to H × W. Every image
of a batch goes through the resampling when the geometric part is enabled (those whose transforms did not
fire get G⁻¹ = I, which is the identity up to filter rounding in the interior). EDM pads by the margin the
whole batch's transformed corners need (a data-dependent shape); we always pad by its upper bound
(W − 1, H − 1), which gives the same pixels except where EDM's margin would have cut off part of a
sample's footprint (zeros in EDM, reflected content here; border pixels only, rare).

**Where it runs in Patch Diffusion** (``patch_diffusion.steps``): by default (``data.augment_before_crop
= False``), as the official ``Patch_EDMLoss`` does it: crop the patch first, then augment the *patch*; the
coordinate channels are left untouched, so they still give the patch's location in the un-augmented image
(an x-flipped patch keeps x increasing to the right), and every size-dependent transform parameter
(translations) is relative to the patch side. With ``data.augment_before_crop = True`` the *full image* is
augmented, then cropped: the coordinates then describe the augmented image, and translations are relative
to R. Either way the labels are those of the transform applied to what the network sees.

Randomness: :meth:`AugmentPipe.sample` draws every parameter for a batch from one key (each transform from
its own ``fold_in`` of it, so enabling one transform does not change another's draws); :meth:`apply` is
deterministic. The train step draws them from ``fold_in(fold_in(base_key, step), AUGMENT_STREAM)``, for the
whole step's batch, and slices them per micro-batch under gradient accumulation.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Symlet-6 orthonormal low-pass (scaling) filter, 12 taps (sum √2; Σ_k h[k] h[k+2n] = δ[n]): the
#: anti-aliasing filter of EDM's geometric augmentation (its ``wavelets['sym6']``).
SYM6 = np.asarray([
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148],
    dtype=np.float64)

#: ``fold_in`` constant that separates the augmentation draws from the step's other randomness.
AUGMENT_STREAM = 0xA46

# fold_in constants of the individual transforms' draws.
_STREAMS = {name: i for i, name in enumerate(
    ("xflip", "yflip", "rotate_int", "translate_int", "scale", "rotate_frac", "aniso", "translate_frac"))}

Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class AugmentPipe:
  """EDM's augmentation pipe (pixel blitting + geometric). Multipliers 0 disable a transform.

  Attributes:
    p: overall probability multiplier (EDM ``--augment``).
    xflip, yflip, rotate_int, translate_int, scale, rotate_frac, aniso, translate_frac: per-transform
      probability multipliers (a transform fires with probability ``multiplier · p``, capped at 1).
    translate_int_max: integer translation range, relative to the image side.
    scale_std: log2 standard deviation of the isotropic scale.
    rotate_frac_max: rotation range, 1 = full circle (±π).
    aniso_std: log2 standard deviation of the anisotropic scale.
    aniso_rotate_prob: probability that the anisotropic scale's axis is rotated (independent of p).
    translate_frac_std: standard deviation of the fractional translation, relative to the image side.
  """
  p: float = 1.0
  xflip: float = 0.0
  yflip: float = 0.0
  rotate_int: float = 0.0
  translate_int: float = 0.0
  translate_int_max: float = 0.125
  scale: float = 0.0
  rotate_frac: float = 0.0
  aniso: float = 0.0
  translate_frac: float = 0.0
  scale_std: float = 0.2
  rotate_frac_max: float = 1.0
  aniso_std: float = 0.2
  aniso_rotate_prob: float = 0.5
  translate_frac_std: float = 0.125

  @property
  def label_dim(self) -> int:
    """Length of the augmentation-label vector (the network's ``augment_dim``)."""
    sizes = dict(xflip=1, yflip=1, rotate_int=2, translate_int=2, scale=1, rotate_frac=2, aniso=2,
                 translate_frac=2)
    return sum(n for name, n in sizes.items() if getattr(self, name) > 0)

  @property
  def geometric(self) -> bool:
    """Whether the resampling (geometric) part runs."""
    return any(getattr(self, k) > 0 for k in ("scale", "rotate_frac", "aniso", "translate_frac"))

  # ---- parameters ---------------------------------------------------------------------------------

  def sample(self, key: jax.Array, n: int) -> Params:
    """Draws every transform's parameters for ``n`` images: a dict of arrays with leading dim ``n``.

    Keys (enabled transforms only): 'xflip', 'yflip', 'rotate_int' (int32 [n]); 'translate_int' (float32
    [n, 2], u and v in [-1, 1]); 'scale', 'rotate_frac' (float32 [n]); 'aniso' (float32 [n, 2], w and r);
    'translate_frac' (float32 [n, 2]). A transform that does not fire gets 0.
    """
    out: Params = {}

    def keys(name: str, count: int):
      return jax.random.split(jax.random.fold_in(key, _STREAMS[name]), count)

    def gate(k, multiplier, shape=(n,)):
      return jax.random.uniform(k, shape) < multiplier * self.p

    for name in ("xflip", "yflip"):
      if getattr(self, name) > 0:
        k_w, k_g = keys(name, 2)
        w = jax.random.randint(k_w, (n,), 0, 2, dtype=jnp.int32)
        out[name] = jnp.where(gate(k_g, getattr(self, name)), w, 0)
    if self.rotate_int > 0:
      k_w, k_g = keys("rotate_int", 2)
      w = jax.random.randint(k_w, (n,), 0, 4, dtype=jnp.int32)
      out["rotate_int"] = jnp.where(gate(k_g, self.rotate_int), w, 0)
    if self.translate_int > 0:
      k_w, k_g = keys("translate_int", 2)
      w = jax.random.uniform(k_w, (n, 2)) * 2 - 1
      out["translate_int"] = jnp.where(gate(k_g, self.translate_int)[:, None], w, 0.0)
    if self.scale > 0:
      k_w, k_g = keys("scale", 2)
      out["scale"] = jnp.where(gate(k_g, self.scale), jax.random.normal(k_w, (n,)), 0.0)
    if self.rotate_frac > 0:
      k_w, k_g = keys("rotate_frac", 2)
      w = (jax.random.uniform(k_w, (n,)) * 2 - 1) * (np.pi * self.rotate_frac_max)
      out["rotate_frac"] = jnp.where(gate(k_g, self.rotate_frac), w, 0.0)
    if self.aniso > 0:
      k_w, k_r, k_g, k_gr = keys("aniso", 4)
      w = jnp.where(gate(k_g, self.aniso), jax.random.normal(k_w, (n,)), 0.0)
      r = (jax.random.uniform(k_r, (n,)) * 2 - 1) * np.pi
      r = jnp.where(jax.random.uniform(k_gr, (n,)) < self.aniso_rotate_prob, r, 0.0)
      out["aniso"] = jnp.stack([w, r], axis=-1)
    if self.translate_frac > 0:
      k_w, k_g = keys("translate_frac", 2)
      w = jax.random.normal(k_w, (n, 2))
      out["translate_frac"] = jnp.where(gate(k_g, self.translate_frac)[:, None], w, 0.0)
    return out

  def labels(self, params: Params, height: int, width: int) -> jnp.ndarray:
    """The augmentation labels [n, label_dim] float32 of ``params`` for images of size height × width."""
    parts = []
    if "xflip" in params:
      parts.append(params["xflip"][:, None])
    if "yflip" in params:
      parts.append(params["yflip"][:, None])
    if "rotate_int" in params:
      w = params["rotate_int"]
      parts.append(jnp.stack([(w == 1) | (w == 2), (w == 2) | (w == 3)], axis=-1))
    if "translate_int" in params:
      tx, ty = self._integer_shift(params["translate_int"], height, width)
      parts.append(jnp.stack([tx / (width * self.translate_int_max), ty / (height * self.translate_int_max)],
                             axis=-1))
    if "scale" in params:
      parts.append(params["scale"][:, None])
    if "rotate_frac" in params:
      w = params["rotate_frac"]
      parts.append(jnp.stack([jnp.cos(w) - 1, jnp.sin(w)], axis=-1))
    if "aniso" in params:
      w, r = params["aniso"][:, 0], params["aniso"][:, 1]
      parts.append(jnp.stack([w * jnp.cos(r), w * jnp.sin(r)], axis=-1))
    if "translate_frac" in params:
      parts.append(params["translate_frac"])
    n = next(iter(params.values())).shape[0] if params else 0
    if not parts:
      return jnp.zeros((n, 0), jnp.float32)
    return jnp.concatenate([x.astype(jnp.float32).reshape(x.shape[0], -1) for x in parts], axis=1)

  # ---- images -------------------------------------------------------------------------------------

  def apply(self, images: jnp.ndarray, params: Params) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Augments ``images`` with ``params`` (from :meth:`sample`).

    Args:
      images: float [n, H, W, C] (any channel count; values unconstrained, e.g. [-1, 1]).
      params: per-image parameters with leading dim n.

    Returns:
      (augmented images [n, H, W, C] in the input dtype, labels [n, label_dim] float32).
    """
    n, h, w, _ = images.shape
    dtype = images.dtype
    x = images.astype(jnp.float32)
    if "xflip" in params:
      x = jnp.where(params["xflip"][:, None, None, None] == 1, x[:, :, ::-1], x)
    if "yflip" in params:
      x = jnp.where(params["yflip"][:, None, None, None] == 1, x[:, ::-1], x)
    if "rotate_int" in params:
      if h != w:
        raise ValueError(f"rotate_int needs square images, got {h}x{w}")
      r = params["rotate_int"][:, None, None, None]
      x = jnp.where((r == 1) | (r == 2), x[:, :, ::-1], x)
      x = jnp.where((r == 2) | (r == 3), x[:, ::-1], x)
      x = jnp.where((r == 1) | (r == 3), jnp.swapaxes(x, 1, 2), x)
    if "translate_int" in params:
      tx, ty = self._integer_shift(params["translate_int"], h, w)
      cols = _mirror(jnp.arange(w)[None, :] - tx[:, None], w)  # [n, W]
      rows = _mirror(jnp.arange(h)[None, :] + ty[:, None], h)  # [n, H]
      x = jnp.take_along_axis(x, rows[:, :, None, None], axis=1)
      x = jnp.take_along_axis(x, cols[:, None, :, None], axis=2)
    if self.geometric:
      x = _resample(x, self._inverse_transform(params, n, h, w))
    return x.astype(dtype), self.labels(params, h, w)

  def __call__(self, key: jax.Array, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``apply(images, sample(key, n))``."""
    return self.apply(images, self.sample(key, images.shape[0]))

  def _integer_shift(self, uv: jnp.ndarray, height: int, width: int):
    # Round half to even, as torch.round.
    tx = jnp.round(uv[:, 0] * (width * self.translate_int_max)).astype(jnp.int32)
    ty = jnp.round(uv[:, 1] * (height * self.translate_int_max)).astype(jnp.int32)
    return tx, ty

  def _inverse_transform(self, params: Params, n: int, h: int, w: int) -> jnp.ndarray:
    """G⁻¹ [n, 3, 3] in centred pixel coordinates: maps an output pixel to where it reads the input."""
    g = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (n, 3, 3))
    if "scale" in params:
      s = jnp.exp2(params["scale"] * self.scale_std)
      g = g @ _scale(1 / s, 1 / s)
    if "rotate_frac" in params:
      g = g @ _rotate(params["rotate_frac"])
    if "aniso" in params:
      a, r = params["aniso"][:, 0], params["aniso"][:, 1]
      s = jnp.exp2(a * self.aniso_std)
      g = g @ _rotate(-r) @ _scale(1 / s, s) @ _rotate(r)
    if "translate_frac" in params:
      t = params["translate_frac"]
      g = g @ _translate(-t[:, 0] * (w * self.translate_frac_std), -t[:, 1] * (h * self.translate_frac_std))
    return g


def edm_augment_pipe(p: float) -> AugmentPipe:
  """The pipe of EDM's and Patch Diffusion's ``train.py --augment=p`` (9 labels; module docstring)."""
  return AugmentPipe(p=p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def from_config(data_config: Any) -> AugmentPipe | None:
  """The pipe for ``config.data`` (``augment_p``), or None when augmentation is off."""
  p = float(data_config["augment_p"])
  return edm_augment_pipe(p) if p > 0 else None


# ---- helpers --------------------------------------------------------------------------------------


def _mirror(index: jnp.ndarray, size: int) -> jnp.ndarray:
  """Mirror-reflects integer indices into 0 .. size-1 (period 2·size − 2, edge pixels not repeated)."""
  period = 2 * size - 2
  return size - 1 - jnp.abs(size - 1 - jnp.mod(index, period))


def _mat(rows) -> jnp.ndarray:
  """Stacks per-sample matrix entries (scalars or [n] arrays) into [n, 3, 3]."""
  n = max(jnp.shape(v)[0] for row in rows for v in row if jnp.ndim(v))
  return jnp.stack([jnp.stack([jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,)) for v in row], -1)
                    for row in rows], -2)


def _scale(sx, sy) -> jnp.ndarray:
  return _mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])


def _rotate(theta) -> jnp.ndarray:
  c, s = jnp.cos(theta), jnp.sin(theta)
  return _mat([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _translate(tx, ty) -> jnp.ndarray:
  return _mat([[1, 0, tx], [0, 1, ty], [0, 0, 1]])


def _const(m) -> jnp.ndarray:
  return jnp.asarray(np.asarray(m, np.float32))


def _filter_axis(x: jnp.ndarray, taps: np.ndarray, axis: int, *, upsample: bool) -> jnp.ndarray:
  """Depthwise 1-D filtering of NHWC ``x`` along ``axis`` (1 = H, 2 = W).

  upsample: zero-stuff to 2L − 1 samples, correlate with ``taps`` padded by 6 → 2L samples.
  otherwise: correlate with ``taps`` padded by 5, stride 2 → (L + 10 − 12)//2 + 1 samples.
  """
  c = x.shape[-1]
  kernel = jnp.asarray(taps, jnp.float32)
  shape = (len(taps), 1, 1, c) if axis == 1 else (1, len(taps), 1, c)
  kernel = jnp.broadcast_to(kernel.reshape(shape[:2] + (1, 1)), shape)
  one = (1, 1)
  if upsample:
    pad = (len(taps) + 1) // 2
    padding = ((pad, pad), (0, 0)) if axis == 1 else ((0, 0), (pad, pad))
    dilation = (2, 1) if axis == 1 else (1, 2)
    strides = one
  else:
    pad = (len(taps) - 1) // 2
    padding = ((pad, pad), (0, 0)) if axis == 1 else ((0, 0), (pad, pad))
    dilation = one
    strides = (2, 1) if axis == 1 else (1, 2)
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding, lhs_dilation=dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
      precision=jax.lax.Precision.HIGHEST)


def _resample(x: jnp.ndarray, g_inv: jnp.ndarray) -> jnp.ndarray:
  """EDM's geometric execution: pad, upsample 2×, bilinear resample at G⁻¹, downsample 2×, crop.

  Args:
    x: float32 [n, H, W, C].
    g_inv: [n, 3, 3], centred pixel coordinates of the H × W image.
  """
  n, h, w, _ = x.shape
  hz_pad = len(SYM6) // 4
  # Reflect-pad by the largest margin EDM's data-dependent rule can choose (symmetric: no origin shift).
  mx, my = w - 1, h - 1
  x = jnp.pad(x, ((0, 0), (my, my), (mx, mx), (0, 0)), mode="reflect")
  # Upsample 2× (W, then H) with the Symlet-6 filter (reversed: a true convolution, as EDM's flipped
  # weight in a correlation).
  x = _filter_axis(x, SYM6[::-1], axis=2, upsample=True)
  x = _filter_axis(x, SYM6[::-1], axis=1, upsample=True)
  g = _const([[2, 0, 0], [0, 2, 0], [0, 0, 1]]) @ g_inv @ _const([[0.5, 0, 0], [0, 0.5, 0], [0, 0, 1]])
  g = _const([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]]) @ g @ _const([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
  # Output grid: the H × W image plus hz_pad on each side, at twice the resolution.
  h_out, w_out = (h + 2 * hz_pad) * 2, (w + 2 * hz_pad) * 2
  h_up, w_up = x.shape[1], x.shape[2]
  g = (_const([[2 / w_up, 0, 0], [0, 2 / h_up, 0], [0, 0, 1]]) @ g
       @ _const([[w_out / 2, 0, 0], [0, h_out / 2, 0], [0, 0, 1]]))
  # Normalised output pixel centres (affine_grid, align_corners=False), mapped by G⁻¹ to input
  # normalised coordinates, then to input pixel indices (grid_sample, align_corners=False).
  xs = (2 * jnp.arange(w_out, dtype=jnp.float32) + 1) / w_out - 1
  ys = (2 * jnp.arange(h_out, dtype=jnp.float32) + 1) / h_out - 1
  gx = g[:, 0, 0, None, None] * xs[None, None, :] + g[:, 0, 1, None, None] * ys[None, :, None] + g[:, 0, 2, None, None]
  gy = g[:, 1, 0, None, None] * xs[None, None, :] + g[:, 1, 1, None, None] * ys[None, :, None] + g[:, 1, 2, None, None]
  ix = ((gx + 1) * w_up - 1) / 2  # [n, h_out, w_out]
  iy = ((gy + 1) * h_up - 1) / 2
  x = jax.vmap(_bilinear_zeros)(x, iy, ix)
  # Low-pass and decimate 2× (W, then H), then crop the hz_pad border.
  x = _filter_axis(x, SYM6, axis=2, upsample=False)[:, :, hz_pad:-hz_pad]
  x = _filter_axis(x, SYM6, axis=1, upsample=False)[:, hz_pad:-hz_pad]
  return x


def _bilinear_zeros(img: jnp.ndarray, iy: jnp.ndarray, ix: jnp.ndarray) -> jnp.ndarray:
  """Bilinear sample of ``img`` [H, W, C] at float pixel indices iy, ix [h, w]; taps outside are 0."""
  h, w, c = img.shape
  x0, y0 = jnp.floor(ix), jnp.floor(iy)
  wx1, wy1 = ix - x0, iy - y0
  flat = img.reshape(h * w, c)
  out = 0.0
  for dy, wy in ((0, 1 - wy1), (1, wy1)):
    for dx, wx in ((0, 1 - wx1), (1, wx1)):
      yy, xx = (y0 + dy).astype(jnp.int32), (x0 + dx).astype(jnp.int32)
      inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
      idx = jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
      out = out + jnp.where(inside, wy * wx, 0.0)[..., None] * flat[idx]
  return out


def num_labels(pipe: AugmentPipe | None) -> int:
  """0 without a pipe, else its label dimension."""
  return 0 if pipe is None else pipe.label_dim

