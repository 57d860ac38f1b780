"""Reference statistics: masking, budgets, the data-directory cache, and a run with the real Inception."""
from __future__ import annotations

import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patch_diffusion.evaluation import inception, inception_weights as iw, reference

_PROJ = np.random.default_rng(0).normal(size=(48, 16)).astype(np.float32)


@jax.jit
def _pooled_features(images):
  """A small fixed feature map (4×4 mean-pooled pixels through a fixed projection): [B,16,16,3] -> [B,16]."""
  x = images.astype(jnp.float32).reshape(images.shape[0], 4, 4, 4, 4, 3).mean(axis=(2, 4))
  return jnp.tanh(x.reshape(images.shape[0], -1) @ _PROJ / 255.0)


def _batches(images: np.ndarray, batch: int):
  """The eval iterator's shape: fixed-size batches, the last one padded (white images, mask False)."""
  for lo in range(0, len(images), batch):
    chunk = images[lo:lo + batch]
    pad = batch - len(chunk)
    yield {"image": np.concatenate([chunk, np.full((pad,) + chunk.shape[1:], 255, np.uint8)]),
           "mask": np.arange(batch) < len(chunk)}


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(1).integers(0, 200, (37, 16, 16, 3), dtype=np.uint8)


def test_compute_reference_stats_masks_padding(images):
  stats = reference.compute_reference_stats(_batches(images, 8), _pooled_features, meta={"dataset": "toy"},
                                            dim=16)
  want = np.asarray(_pooled_features(images)).astype(np.float64)
  mu, sigma = stats.mean_cov()
  assert stats.num_items == 37 and stats.meta == {"dataset": "toy", "num_items": 37}
  np.testing.assert_allclose(mu, want.mean(0), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(sigma, np.cov(want, rowvar=False), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(stats.features, want, rtol=1e-6, atol=1e-7)


def test_compute_reference_stats_budget(images):
  consumed = []

  def batches():
    for b in _batches(images, 8):
      consumed.append(1)
      yield b

  stats = reference.compute_reference_stats(batches(), _pooled_features, max_items=20, max_features=5, dim=16)
  assert stats.num_items == 20 and len(consumed) == 3  # stops once the budget is met
  want = np.asarray(_pooled_features(images[:20])).astype(np.float64)
  np.testing.assert_allclose(stats.mean_cov()[0], want.mean(0), rtol=1e-6, atol=1e-7)
  assert stats.features.shape == (5, 16)


def test_reference_cache_roundtrip_and_invalidation(tmp_path, images):
  calls = []

  def batches_fn():
    calls.append(1)
    return _batches(images, 8)

  kw = dict(dataset="toy/ds", resolution=16, split="train")
  path = reference.reference_stats_path(tmp_path, **kw)
  assert path.parent == tmp_path / "fid_refs"
  assert path.name == f"toy_ds-train-16x16-full-{inception.FEATURE_NET_ID}.npz"
  capped_path = reference.reference_stats_path(tmp_path, num_images=20, **kw)
  assert capped_path.name.startswith("toy_ds-train-16x16-n20-")

  run = functools.partial(reference.load_or_compute_reference_stats, path, batches_fn, _pooled_features,
                          dim=16)
  first = run(**kw)
  assert path.exists() and len(calls) == 1
  second = run(**kw)
  assert len(calls) == 1  # served from the cache
  assert second.num_items == 37
  assert second.meta == {"dataset": "toy/ds", "split": "train", "resolution": 16, "num_items": 37,
                         "feature_net": inception.FEATURE_NET_ID, "requested_images": None}
  for a, b in zip(first.mean_cov(), second.mean_cov()):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  np.testing.assert_array_equal(first.features, second.features)

  # A file made for another resolution, or for a capped count, at this path is not trusted.
  run(**dict(kw, resolution=32))
  assert len(calls) == 2
  capped = run(num_images=20, **kw)
  assert len(calls) == 3 and capped.num_items == 20 and capped.meta["requested_images"] == 20
  run(num_images=20, **kw)
  assert len(calls) == 3


@pytest.fixture(scope="module")
def inception_params(inception_source):
  return iw.read_source(inception_source)[0]


def test_reference_stats_with_real_inception_on_grayscale(inception_params):
  """uint8 grayscale 16×16 images through resize + Inception on 8 devices; padding rows never count."""
  gray = np.random.default_rng(2).integers(0, 256, (13, 16, 16, 1), dtype=np.uint8)
  fn = inception.make_feature_fn(inception_params)
  seen = []

  def spy(images):
    out = fn(images)
    seen.append(out)
    return out

  stats = reference.compute_reference_stats(_batches(gray, 8), spy, meta={"dataset": "gray"})
  assert stats.num_items == 13 and len(seen) == 2
  valid = np.concatenate([seen[0], seen[1][:5]])
  assert valid.shape == (13, 2048) and np.all(np.isfinite(valid)) and valid.min() >= 0.0  # post-ReLU mean
  np.testing.assert_array_equal(stats.features, valid)
  np.testing.assert_allclose(stats.mean_cov()[0], valid.astype(np.float64).mean(0), rtol=1e-6, atol=1e-9)
  # Distinct images give distinct features; the padded white rows differ from every valid one.
  assert np.min(np.abs(valid[:, None] - valid[None]).sum(-1) + np.eye(13) * 1e9) > 1e-3
  assert not np.any(np.all(np.isclose(valid, seen[1][5]), axis=1))
