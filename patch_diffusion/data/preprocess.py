"""Pixel conversion shared by every data source: any image -> uint8 NHWC with 1 or 3 channels, and EDM's
``center-crop`` transform (square centre crop, then a PIL Lanczos resize to R x R, as
``dataset_tool.py --transform=center-crop`` does in NVlabs/edm).

Conversion rules (documented in docs/DATA.md):
  * 8-bit grayscale ('L', '1') -> replicated to 3 channels (or kept when C = 1).
  * 16-bit ('I;16*', 'I', uint16 arrays) -> 8-bit by v * 255 / 65535, rounded. PIL itself reads
    16-bit-per-channel RGB PNGs as 8-bit RGB (high byte).
  * float images ('F', float arrays) -> values taken in [0, 1], clipped, times 255.
  * CMYK, YCbCr, LAB, HSV -> RGB through PIL's conversion (no ICC colour management).
  * Alpha (RGBA, LA, palette with transparency) -> alpha-composited onto a WHITE background.
  * RGB -> 1 channel (C = 1) by ITU-R 601-2 luma, the formula of PIL's 'L' conversion.
  * EXIF orientation is applied (photos taken in portrait mode come out upright).
  * Non-square images are center-cropped to a square, then resized with Lanczos.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps


def to_uint8_channels(image: Any, num_channels: int) -> np.ndarray:
  """Converts an image array of any common depth/channel layout to uint8 with C channels.

  Args:
    image: array [H, W] or [H, W, c] with c in {1, 2, 3, 4} (2 = gray+alpha, 4 = RGB+alpha);
      dtype uint8 (0..255), another integer type (16-bit range 0..65535), bool, or float
      (range [0, 1]).
    num_channels: C, 1 or 3.

  Returns:
    uint8 array [H, W, C].

  Raises:
    ValueError: for an unsupported shape or channel count.
  """
  if num_channels not in (1, 3):
    raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = arr[:, :, None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
    raise ValueError(f"expected an image of shape [H, W] or [H, W, 1|2|3|4], got {arr.shape}")

  # Bit depth -> 8 bits.
  if arr.dtype == np.uint8:
    pass
  elif arr.dtype == np.bool_:
    arr = arr.astype(np.uint8) * 255
  elif np.issubdtype(arr.dtype, np.integer):
    # Any wider integer image (uint16 PNG/TIFF, PIL's int32 'I' mode) is read as 16-bit range.
    wide = np.clip(arr.astype(np.int64), 0, 65535)
    arr = ((wide * 255 + 32767) // 65535).astype(np.uint8)
  elif np.issubdtype(arr.dtype, np.floating):
    arr = np.round(np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)
  else:
    raise ValueError(f"unsupported image dtype {arr.dtype}")

  # Alpha -> composite onto white, so transparent pixels do not show whatever colour lies under them.
  c = arr.shape[-1]
  if c in (2, 4):
    color = arr[:, :, : c - 1].astype(np.float32)
    alpha = arr[:, :, c - 1 :].astype(np.float32) / 255.0
    arr = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)

  if arr.shape[-1] == 1 and num_channels == 3:
    arr = np.repeat(arr, 3, axis=-1)
  elif arr.shape[-1] == 3 and num_channels == 1:
    # ITU-R 601-2 luma with integer rounding, the formula PIL uses for RGB -> 'L'.
    rgb = arr.astype(np.uint32)
    luma = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114 + 500) // 1000
    arr = luma.astype(np.uint8)[:, :, None]
  return np.ascontiguousarray(arr)


def pil_to_array(image: PIL.Image.Image, num_channels: int) -> np.ndarray:
  """Decodes a PIL image (any mode) to uint8 [H, W, C] with the rules of the module docstring.

  Forces a full decode, so a truncated file raises ``OSError`` here.
  """
  try:
    image = PIL.ImageOps.exif_transpose(image)
  except Exception:  # pylint: disable=broad-except
    # A malformed EXIF block must not lose an otherwise readable image; keep it as stored.
    pass
  mode = image.mode
  if mode in ("P", "PA"):
    has_alpha = mode == "PA" or "transparency" in image.info
    image = image.convert("RGBA" if has_alpha else "RGB")
  elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
    image = image.convert("RGB")
  elif mode == "1":
    image = image.convert("L")
  elif mode == "RGBa":  # premultiplied alpha
    image = image.convert("RGBA")
  elif mode == "La":
    image = image.convert("LA")
  arr = np.asarray(image)
  if image.mode.startswith("I;16"):
    arr = arr.astype(np.uint16)  # 'I;16B' arrays come back big-endian; make them native
  return to_uint8_channels(arr, num_channels)


def center_crop_resize(image: np.ndarray, resolution: int) -> np.ndarray:
  """EDM's 'center-crop' transform: crop the largest centred square, resize it to R x R.

  Args:
    image: uint8 [H, W, C], C in {1, 3}.
    resolution: R > 0.

  Returns:
    uint8 [R, R, C]. PIL Lanczos resampling (antialiased when shrinking); no resize at all when
    the crop is already R x R, so images prepared at R pass through unchanged.
  """
  h, w, c = image.shape
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  image = image[top : top + s, left : left + s]
  if s != resolution:
    pil = PIL.Image.fromarray(image[:, :, 0] if c == 1 else image, "L" if c == 1 else "RGB")
    pil = pil.resize((resolution, resolution), PIL.Image.Resampling.LANCZOS)
    image = np.asarray(pil).reshape(resolution, resolution, c)
  return np.ascontiguousarray(image)
