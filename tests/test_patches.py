"""Patch schedule, crop and coordinate channels (patch_diffusion/data/patches.py)."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from patch_diffusion.data import patches


def test_sizes_and_multipliers():
  assert patches.patch_sizes(64) == (16, 32, 64)
  assert patches.patch_sizes(32, latent=True) == (16, 32)
  assert patches.batch_multipliers(64) == (4, 2, 1)
  assert patches.batch_multipliers(32, latent=True) == (2, 1)
  # The explicit table holds at every resolution, incl. 32 px where the official dict has no entry for 8.
  assert dict(zip(patches.patch_sizes(32), patches.batch_multipliers(32))) == {8: 4, 16: 2, 32: 1}


@pytest.mark.parametrize("real_p,latent,expected", [
    (0.5, False, (0.2, 0.3, 0.5)), (0.0, False, (0.4, 0.6, 0.0)), (1.0, False, (0.0, 0.0, 1.0)),
    (0.5, True, (0.5, 0.5)), (0.25, True, (0.75, 0.25))])
def test_probabilities(real_p, latent, expected):
  np.testing.assert_allclose(patches.size_probabilities(real_p, latent), expected, atol=1e-12)


def test_average_multiplier_and_cost():
  pixel = patches.PatchSchedule(64, real_p=0.5)
  latent = patches.PatchSchedule(32, real_p=0.5, latent=True)
  assert pixel.average_batch_mul == pytest.approx(1.9)
  assert latent.average_batch_mul == pytest.approx(1.5)
  assert pixel.expected_step_cost == pytest.approx(0.70)
  assert patches.PatchSchedule(64, schedule="full").average_batch_mul == 1.0


@pytest.mark.parametrize("real_p,latent", [(0.5, False), (0.1, False), (0.75, True)])
def test_stochastic_frequencies_chi2(real_p, latent):
  sched = patches.PatchSchedule(64, real_p=real_p, latent=latent, seed=3)
  n = 20_000
  counts = np.bincount([sched.size_index(step) for step in range(n)], minlength=len(sched.sizes))
  expected = np.asarray(sched.probabilities) * n
  chi2 = stats.chisquare(counts, expected)
  assert chi2.pvalue > 1e-3, (counts, expected)


def test_stochastic_detects_wrong_distribution():
  # The χ² check above has power: the same draws against swapped probabilities are rejected.
  sched = patches.PatchSchedule(64, real_p=0.5, seed=3)
  counts = np.bincount([sched.size_index(s) for s in range(20_000)], minlength=3)
  assert stats.chisquare(counts, np.array([0.3, 0.2, 0.5]) * 20_000).pvalue < 1e-6


def test_schedule_is_pure_function_of_seed_and_step():
  a = patches.PatchSchedule(64, seed=7)
  b = patches.PatchSchedule(64, seed=7)
  c = patches.PatchSchedule(64, seed=8)
  steps = list(range(500))
  assert [a.size_index(s) for s in steps] == [b.size_index(s) for s in reversed(steps)][::-1]
  assert [a.size_index(s) for s in steps] != [c.size_index(s) for s in steps]


def test_same_sizes_in_separate_processes():
  """Two independent interpreters (stand-ins for two hosts) draw the same size at every step."""
  code = ("from patch_diffusion.data.patches import PatchSchedule;"
          "s=PatchSchedule(64, seed=11);print(','.join(str(s.patch_size(i)) for i in range(300)))")
  outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
          for _ in range(2)]
  local = ",".join(str(patches.PatchSchedule(64, seed=11).patch_size(i)) for i in range(300))
  assert outs[0].strip() == outs[1].strip() == local


def test_progressive_and_full():
  # The official boundary rule: a phase includes its right end (progress <= c_k), c = (1-p)·0.4, (1-p).
  sched = patches.PatchSchedule(64, schedule="progressive")
  assert [sched.patch_size(0, p) for p in (0.0, 0.19, 0.2, 0.21, 0.49, 0.5, 0.51, 1.0)] == [
      16, 16, 16, 32, 32, 32, 64, 64]
  quarter = patches.PatchSchedule(64, schedule="progressive", real_p=0.25)  # c = 0.3, 0.75
  assert [quarter.patch_size(0, p) for p in (0.3, 0.31, 0.75, 0.76)] == [16, 32, 32, 64]
  lat = patches.PatchSchedule(32, schedule="progressive", latent=True)
  assert [lat.patch_size(0, p) for p in (0.0, 0.5, 0.51)] == [16, 16, 32]
  full = patches.PatchSchedule(64, schedule="full")
  assert {full.patch_size(s) for s in range(100)} == {64}


@pytest.mark.parametrize("kwargs,match", [
    (dict(resolution=64, real_p=1.5), "real_p"), (dict(resolution=64, real_p=-0.1), "real_p"),
    (dict(resolution=30), "multiple of 4"), (dict(resolution=31, latent=True), "multiple of 2"),
    (dict(resolution=64, schedule="cosine"), "schedule")])
def test_schedule_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    patches.PatchSchedule(**kwargs)


def test_crop_matches_official_pachify(fixtures_dir):
  ref = np.load(fixtures_dir / "edm_torch" / "pachify.npz")
  images = jnp.asarray(ref["images"].transpose(0, 2, 3, 1))
  crop = jax.jit(patches.crop_patches, static_argnums=3)
  for s in (4, 8, 16):
    p, pos = crop(images, jnp.asarray(ref[f"s{s}/row_offset"]), jnp.asarray(ref[f"s{s}/col_offset"]), s)
    np.testing.assert_array_equal(np.asarray(p).transpose(0, 3, 1, 2), ref[f"s{s}/patches"])
    np.testing.assert_array_equal(np.asarray(pos).transpose(0, 3, 1, 2), ref[f"s{s}/x_pos"])


def test_crop_hand_computed_corners():
  r = 8
  images = jnp.arange(2 * r * r, dtype=jnp.float32).reshape(2, r, r, 1)
  p, pos = patches.crop_patches(images, jnp.array([0, 6]), jnp.array([6, 0]), 2)
  # Sample 0: top-right corner; sample 1: bottom-left corner.
  np.testing.assert_array_equal(p[0, ..., 0], [[6, 7], [14, 15]])
  np.testing.assert_array_equal(p[1, ..., 0], [[64 + 48, 64 + 49], [64 + 56, 64 + 57]])
  step = 2 / 7
  np.testing.assert_allclose(pos[0, 0, 0], [1 - step, -1], atol=1e-6)  # x (column) first, then y (row)
  np.testing.assert_allclose(pos[0, 1, 1], [1, -1 + step], atol=1e-6)
  np.testing.assert_allclose(pos[1, 0, 0], [-1, 1 - step], atol=1e-6)
  np.testing.assert_allclose(pos[1, 1, 1], [-1 + step, 1], atol=1e-6)


def test_full_size_crop_is_identity_with_full_grid():
  images = jax.random.normal(jax.random.key(0), (3, 8, 8, 2))
  p, pos = patches.random_patches(jax.random.key(1), images, 8)
  np.testing.assert_array_equal(p, images)
  np.testing.assert_array_equal(pos, patches.full_grid(8, batch=3))
  grid = patches.full_grid(8)
  assert grid.shape == (8, 8, 2)
  np.testing.assert_array_equal(grid[0, 0], [-1, -1])
  np.testing.assert_array_equal(grid[-1, -1], [1, 1])
  np.testing.assert_array_equal(grid[0, -1], [1, -1])  # top-right: x = 1, y = -1


def test_offsets_cover_inclusive_range_per_sample():
  row, col = patches.random_offsets(jax.random.key(0), 4000, 16, 4)
  row, col = np.asarray(row), np.asarray(col)
  assert row.min() == 0 and row.max() == 12 and col.min() == 0 and col.max() == 12
  assert len(np.unique(row)) == 13 and np.corrcoef(row, col)[0, 1] < 0.05  # independent axes
  assert stats.chisquare(np.bincount(row, minlength=13)).pvalue > 1e-3


def test_random_patches_content_matches_offsets():
  key = jax.random.key(5)
  images = jax.random.normal(jax.random.key(2), (6, 16, 16, 3))
  p, pos = jax.jit(patches.random_patches, static_argnums=2)(key, images, 4)
  row, col = patches.random_offsets(key, 6, 16, 4)
  for n in range(6):
    i, j = int(row[n]), int(col[n])
    np.testing.assert_array_equal(p[n], images[n, i:i + 4, j:j + 4])
    np.testing.assert_allclose(pos[n, 0, 0], [j / 15 * 2 - 1, i / 15 * 2 - 1], atol=1e-6)


def test_extrapolation_grid_beyond_unit_square():
  grid = patches.coordinate_grid(-4, 12, 8, 8, 16)  # window sticking out above and to the right
  assert float(grid[0, 0, 1]) == pytest.approx(-4 / 15 * 2 - 1)
  assert float(grid[0, -1, 0]) == pytest.approx(19 / 15 * 2 - 1)
  assert float(grid[..., 0].max()) > 1 and float(grid[..., 1].min()) < -1
  # Fractional (super-resolved) grids use the same formula.
  frac = patches.coordinate_grid(0.0, 0.5, 2, 2, 16)
  np.testing.assert_allclose(frac[0, :, 0], [0.5 / 15 * 2 - 1, 1.5 / 15 * 2 - 1], atol=1e-6)
