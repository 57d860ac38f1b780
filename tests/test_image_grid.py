"""Tests for patch_diffusion/image_grid.py: EDM quantisation, grid layout, atomic PNG writing."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from patch_diffusion import image_grid


def test_to_uint8_follows_edm_convention():
  x = np.array([-1.0, -0.5, 0.0, 0.5, 0.999, 1.0, -3.0, 7.0, np.nan], dtype=np.float32)
  # (x * 127.5 + 128) clipped to [0, 255] and truncated: -0.5 -> 64.25 -> 64, 0.5 -> 191.75 -> 191.
  np.testing.assert_array_equal(image_grid.to_uint8(x), [0, 64, 128, 191, 255, 255, 0, 255, 0])
  assert image_grid.to_uint8(x).dtype == np.uint8


def test_to_uint8_passes_uint8_through_and_accepts_jax():
  import jax.numpy as jnp
  u = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
  assert image_grid.to_uint8(u) is u
  np.testing.assert_array_equal(image_grid.to_uint8(jnp.zeros((2, 2))), np.full((2, 2), 128))
  with pytest.raises(TypeError):
    image_grid.to_uint8(np.array(["a"]))


def _tiles(n, h, w, c):
  """Distinct constant tiles: tile i is filled with 10 * (i + 1) so placement is checkable."""
  return np.stack([np.full((h, w, c), 10 * (i + 1), np.uint8) for i in range(n)])


def test_make_grid_layout_square_ish_row_major():
  imgs = _tiles(5, 4, 3, 3)
  grid = image_grid.make_grid(imgs)
  assert grid.shape == (2 * 4, 3 * 3, 3) and grid.dtype == np.uint8  # ncols = ceil(sqrt(5)) = 3
  for i in range(5):
    r, q = divmod(i, 3)
    np.testing.assert_array_equal(grid[r * 4:(r + 1) * 4, q * 3:(q + 1) * 3], imgs[i])
  np.testing.assert_array_equal(grid[4:, 6:], 0)  # the empty sixth cell holds pad_value


def test_make_grid_padding_and_ncols():
  imgs = _tiles(6, 2, 2, 3)
  grid = image_grid.make_grid(imgs, ncols=2, padding=1, pad_value=255)
  assert grid.shape == (3 * 2 + 2, 2 * 2 + 1, 3)
  np.testing.assert_array_equal(grid[2, :], 255)  # separator rows/column
  np.testing.assert_array_equal(grid[5, :], 255)
  np.testing.assert_array_equal(grid[:, 2], 255)
  np.testing.assert_array_equal(grid[3:5, 3:5], imgs[3])  # row 1, column 1
  assert image_grid.make_grid(imgs, ncols=100).shape == (2, 12, 3)  # ncols clipped to N
  assert image_grid.make_grid(imgs, ncols=1).shape == (12, 2, 3)


def test_make_grid_float_grayscale_and_rgb():
  x = np.linspace(-1, 1, 4 * 3 * 3).reshape(4, 3, 3).astype(np.float32)  # [N, H, W] grayscale
  grid = image_grid.make_grid(x)
  assert grid.shape == (6, 6, 1)
  np.testing.assert_array_equal(grid[3:, 3:, 0], image_grid.to_uint8(x[3]))
  rgb = image_grid.make_grid(x[..., None], to_rgb=True)
  assert rgb.shape == (6, 6, 3)
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
  np.testing.assert_array_equal(rgb[..., :1], grid)


def test_make_grid_rejects_bad_input():
  with pytest.raises(ValueError):
    image_grid.make_grid(np.zeros((0, 2, 2, 3), np.uint8))
  with pytest.raises(ValueError):
    image_grid.make_grid(np.zeros((2, 2), np.uint8))
  with pytest.raises(ValueError):
    image_grid.make_grid(np.zeros((2, 2, 2, 3), np.uint8), ncols=0)


@pytest.mark.parametrize("channels,mode", [(3, "RGB"), (1, "L"), (4, "RGBA")])
def test_save_png_roundtrip_atomic(tmp_path, channels, mode):
  rng = np.random.default_rng(channels)
  grid = rng.integers(0, 256, size=(7, 9, channels), dtype=np.uint8)
  path = tmp_path / "sub" / "grid.png"
  assert image_grid.save_png(path, grid) == str(path)
  image_grid.save_png(path, grid[::-1].copy())  # overwrite in place
  with Image.open(path) as im:
    assert im.mode == mode
    back = np.asarray(im)
  np.testing.assert_array_equal(back.reshape(grid.shape), grid[::-1])
  assert sorted(os.listdir(path.parent)) == ["grid.png"]  # no temporary left behind


def test_save_png_rejects_float_and_keeps_old_file(tmp_path):
  path = tmp_path / "g.png"
  image_grid.save_png(path, np.zeros((2, 2, 3), np.uint8))
  with pytest.raises(TypeError):
    image_grid.save_png(path, np.zeros((2, 2, 3), np.float32))
  with pytest.raises(ValueError):
    image_grid.save_png(path, np.zeros((2, 2, 2), np.uint8))
  with Image.open(path) as im:
    assert im.size == (2, 2)
  assert sorted(os.listdir(tmp_path)) == ["g.png"]
