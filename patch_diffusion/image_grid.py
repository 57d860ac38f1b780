"""Image grids for sample previews: float or uint8 NHWC batches -> one uint8 HWC image -> PNG.

Pixel convention follows EDM: images live in [-1, 1] and are quantised with
``(x * 127.5 + 128).clip(0, 255)`` truncated to uint8, exactly as the official ``generate.py``
writes its PNGs, so grids from this code and from the PyTorch code are byte-comparable.
"""
from __future__ import annotations

import io
import math
import os
from typing import Optional, Union

import numpy as np
from PIL import Image

from patch_diffusion import fileio

PathLike = Union[str, os.PathLike]


def to_uint8(images, xp=np):
  """Quantises images in [-1, 1] to uint8 (EDM convention): the one conversion the project uses.

  Args:
    images: array of any shape (typically NHWC), float in [-1, 1]; a uint8 array is returned
      unchanged. With ``xp=np`` JAX arrays are fetched to host.
    xp: ``numpy`` (host) or ``jax.numpy`` (inside jitted code, e.g. the sampler's output).

  Returns:
    uint8 array of the same shape: ``(x * 127.5 + 128).clip(0, 255)`` truncated toward zero,
    so -1 -> 0, 0 -> 128 and 1 -> 255. NaN maps to 0.
  """
  x = xp.asarray(images)
  if x.dtype == xp.uint8:
    return x
  if not (xp.issubdtype(x.dtype, xp.floating) or xp.issubdtype(x.dtype, xp.integer)):
    raise TypeError(f"to_uint8 expects float images in [-1, 1] or uint8, got dtype {x.dtype}")
  # float32 is enough for 256 levels; NaN would become an undefined integer, so pin it to 0.
  y = xp.nan_to_num(x.astype(xp.float32) * 127.5 + 128.0, nan=0.0)
  return xp.clip(y, 0, 255).astype(xp.uint8)


def make_grid(images, ncols: Optional[int] = None, padding: int = 0, pad_value: int = 0,
              to_rgb: bool = False) -> np.ndarray:
  """Tiles a batch of images row-major into one image.

  Args:
    images: ``[N, H, W, C]`` (or ``[N, H, W]`` grayscale), float in [-1, 1] or uint8.
    ncols: tiles per row; default ``ceil(sqrt(N))`` (a square-ish grid, rows = ``ceil(N / ncols)``).
    padding: pixels of ``pad_value`` between neighbouring tiles (none around the border).
    pad_value: uint8 value of padding and of empty cells in the last row.
    to_rgb: replicate a single channel to 3 (some viewers dislike grayscale PNGs).

  Returns:
    uint8 ``[rows * H + (rows - 1) * padding, ncols * W + (ncols - 1) * padding, C]``
    (C = 3 when ``to_rgb`` and the input has one channel).
  """
  x = to_uint8(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"make_grid expects [N, H, W, C] or [N, H, W] images, got shape {x.shape}")
  n, h, w, c = x.shape
  if n == 0:
    raise ValueError("make_grid got an empty batch")
  if padding < 0:
    raise ValueError(f"padding must be >= 0, got {padding}")
  if ncols is None:
    ncols = math.ceil(math.sqrt(n))
  if ncols < 1:
    raise ValueError(f"ncols must be >= 1, got {ncols}")
  ncols = min(ncols, n)
  nrows = math.ceil(n / ncols)
  if to_rgb and c == 1:
    x = np.repeat(x, 3, axis=-1)
    c = 3
  out = np.full((nrows * h + (nrows - 1) * padding, ncols * w + (ncols - 1) * padding, c),
                pad_value, dtype=np.uint8)
  for i in range(n):
    r, q = divmod(i, ncols)
    y0, x0 = r * (h + padding), q * (w + padding)
    out[y0:y0 + h, x0:x0 + w] = x[i]
  return out


def _as_pil(grid) -> Image.Image:
  """uint8 ``[H, W]`` or ``[H, W, C]`` with C in {1, 3, 4} -> PIL image (L / RGB / RGBA)."""
  g = np.asarray(grid)
  if g.dtype != np.uint8:
    raise TypeError(f"PNG writing expects uint8 pixels, got {g.dtype}; use to_uint8/make_grid first")
  if g.ndim == 3 and g.shape[-1] == 1:
    g = g[..., 0]
  if g.ndim == 2:
    return Image.fromarray(g, mode="L")
  if g.ndim == 3 and g.shape[-1] in (3, 4):
    return Image.fromarray(np.ascontiguousarray(g), mode="RGB" if g.shape[-1] == 3 else "RGBA")
  raise ValueError(f"cannot write an image of shape {g.shape} as PNG (need HW or HWC, C in 1/3/4)")


def encode_png(grid, compress_level: int = 6) -> bytes:
  """Encodes a uint8 ``[H, W]`` / ``[H, W, C]`` (C in 1, 3, 4) image as PNG bytes."""
  buf = io.BytesIO()
  _as_pil(grid).save(buf, format="PNG", compress_level=compress_level)
  return buf.getvalue()


def save_png(path: PathLike, grid) -> str:
  """Writes a uint8 ``[H, W]`` / ``[H, W, C]`` image as a PNG file, atomically (``fileio``: local or
  ``gs://``; parent folders created), so a reader or a preempted run never sees a half-written PNG.

  Returns:
    ``path`` as a string.
  """
  fileio.write_bytes(path, encode_png(grid))
  return str(path)
