"""FID, KID, precision/recall and streaming feature statistics (host-side NumPy)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from patch_diffusion.evaluation import fid
from patch_diffusion.evaluation.fid import FeatureStats


def _gaussian_fid_closed_form(mu1, a, mu2, b):
  """FID of N(μ₁, Q diag(a) Qᵀ) and N(μ₂, Q diag(b) Qᵀ): the covariances commute, so
  tr(Σ₁Σ₂)^½ = Σ √(aᵢbᵢ)."""
  return float(np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b)))


def test_fid_two_gaussians_closed_form():
  rng = np.random.default_rng(0)
  d = 64
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  want = _gaussian_fid_closed_form(mu1, a, mu2, b)
  # Diagonal covariances, then the same spectra in a random rotated basis (full matrices for sqrtm).
  assert fid.fid_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
  q = scipy.stats.ortho_group.rvs(d, random_state=1)
  s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  assert fid.fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
  # Symmetric in its two arguments, and a plain mean shift adds exactly ‖Δμ‖².
  assert fid.fid_from_stats(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-8)
  assert fid.fid_from_stats(mu1, s1, mu1 + 2.0, s1) == pytest.approx(4.0 * d, abs=1e-6)


def test_fid_of_identical_stats_is_zero():
  rng = np.random.default_rng(2)
  feats = rng.gamma(2.0, 0.3, size=(600, 48))  # positive, skewed: like post-ReLU features
  s = FeatureStats(48)
  s.append(feats)
  assert fid.fid_from_feature_stats(s, s) == pytest.approx(0.0, abs=1e-8)
  # Fewer samples than dimensions: Σ is singular, the eps fallback / real part keep it finite and ~0.
  small = FeatureStats(48)
  small.append(feats[:20])
  mu, sigma = small.mean_cov()
  assert np.linalg.matrix_rank(sigma) < 48
  assert abs(fid.fid_from_stats(mu, sigma, mu, sigma)) < 1e-3 * np.trace(sigma)


def test_fid_from_samples_estimates_the_population_value():
  rng = np.random.default_rng(3)
  d, n = 8, 200_000
  mu1, mu2 = np.zeros(d), np.full(d, 0.5)
  a, b = np.linspace(0.5, 2, d), np.linspace(2, 0.5, d)
  x = rng.normal(size=(n, d)) * np.sqrt(a) + mu1
  y = rng.normal(size=(n, d)) * np.sqrt(b) + mu2
  sx, sy = FeatureStats(d), FeatureStats(d)
  sx.append(x)
  sy.append(y)
  want = _gaussian_fid_closed_form(mu1, a, mu2, b)
  assert fid.fid_from_feature_stats(sx, sy) == pytest.approx(want, rel=0.02)


def test_streaming_stats_equal_batch_stats_with_mask_and_merge():
  rng = np.random.default_rng(4)
  x = rng.normal(3.0, 2.0, size=(301, 16)).astype(np.float32)
  ref_mu, ref_cov = x.astype(np.float64).mean(0), np.cov(x.astype(np.float64), rowvar=False)
  # Two "hosts" stream uneven, padded batches; padding rows hold garbage that the mask must drop.
  hosts = [FeatureStats(16, capture_features=True), FeatureStats(16, capture_features=True)]
  splits = [0, 7, 64, 150, 151, 230, 301]
  for i, (lo, hi) in enumerate(zip(splits[:-1], splits[1:])):
    batch = np.concatenate([x[lo:hi], np.full((5, 16), 1e6, np.float32)])
    mask = np.arange(batch.shape[0]) < hi - lo
    hosts[i % 2].append(batch, mask)
  merged = FeatureStats(16, capture_features=True).merge(hosts[0]).merge(hosts[1])
  mu, cov = merged.mean_cov()
  assert merged.num_items == 301
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-12)
  assert np.array_equal(cov, cov.T)
  # Moments round-trip and add like the all-gather does.
  again = FeatureStats.from_moments(hosts[0].moments()).merge(FeatureStats.from_moments(hosts[1].moments()))
  np.testing.assert_allclose(again.mean_cov()[1], ref_cov, rtol=1e-10, atol=1e-12)
  # Captured features are exactly the unmasked rows (host 0's batches first, then host 1's).
  order = np.concatenate([np.arange(lo, hi) for i, (lo, hi) in enumerate(zip(splits[:-1], splits[1:]))
                          if i % 2 == 0] + [np.arange(lo, hi) for i, (lo, hi) in
                                            enumerate(zip(splits[:-1], splits[1:])) if i % 2 == 1])
  np.testing.assert_array_equal(merged.features, x[order])


def test_capture_cap_and_all_gather_single_process():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(50, 4))
  s = FeatureStats(4, capture_features=True, max_items=30)
  for lo in range(0, 50, 8):
    s.append(x[lo:lo + 8])
  assert s.num_items == 50 and s.features.shape == (30, 4)
  np.testing.assert_array_equal(s.features, x[:30].astype(np.float32))
  g = s.all_gather_merge()  # one process: the same statistics
  assert g.num_items == 50
  np.testing.assert_allclose(g.mean_cov()[1], s.mean_cov()[1], rtol=1e-14)
  np.testing.assert_array_equal(g.features, s.features)
  with pytest.raises(ValueError):
    s.append(x[:, :3])
  with pytest.raises(ValueError):
    s.append(np.full((2, 4), np.nan))


def test_stats_save_load_roundtrip(tmp_path):
  rng = np.random.default_rng(6)
  s = FeatureStats(8, capture_features=True)
  s.append(rng.normal(size=(40, 8)))
  meta = {"dataset": "digits", "resolution": 32, "feature_net": "x"}
  s.save(tmp_path / "s.npz", meta)
  t, got_meta = FeatureStats.load(tmp_path / "s.npz")
  assert got_meta == dict(meta, num_items=40) and t.meta == got_meta and t.num_items == 40
  for a, b in zip(t.mean_cov(), s.mean_cov()):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
  np.testing.assert_array_equal(t.features, s.features)
  with np.load(tmp_path / "s.npz") as z:  # EDM-style readers find mu / sigma
    assert z["mu"].shape == (8,) and z["sigma"].shape == (8, 8)


# ---- KID ---------------------------------------------------------------------------------------------


def _mmd2_unbiased_bruteforce(x, y):
  d = x.shape[1]
  k = lambda a, b: (a @ b / d + 1) ** 3
  m = len(x)
  kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return kxx + kyy - 2 * kxy


def test_kid_equals_unbiased_mmd_on_full_sets():
  rng = np.random.default_rng(7)
  real, fake = rng.normal(size=(30, 6)), rng.normal(0.7, 1.3, size=(30, 6))
  # One subset of the full size is a permutation of each set: KID is then the U-statistic itself.
  got = fid.kid(real, fake, num_subsets=1, max_subset_size=1000, seed=0)
  assert got == pytest.approx(_mmd2_unbiased_bruteforce(fake, real), rel=1e-10)


def test_kid_identical_near_zero_different_positive():
  rng = np.random.default_rng(8)
  real = rng.gamma(2.0, 0.3, size=(2000, 64))
  same = rng.gamma(2.0, 0.3, size=(2000, 64))
  other = rng.gamma(2.0, 0.4, size=(2000, 64))
  k_id = fid.kid(real, real, num_subsets=20, max_subset_size=500, seed=1)
  k_same = fid.kid(real, same, num_subsets=20, max_subset_size=500, seed=1)
  k_diff = fid.kid(real, other, num_subsets=20, max_subset_size=500, seed=1)
  assert abs(k_id) < 1e-2 * k_diff and abs(k_same) < 1e-2 * k_diff
  assert k_diff > 0.05
  assert fid.kid(real, other, num_subsets=20, max_subset_size=500, seed=1) == k_diff  # deterministic


# ---- precision / recall -------------------------------------------------------------------------------


def _pr_bruteforce(real, fake, k):
  def radii(x):
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return np.sort(d, axis=1)[:, k]

  def cover(man, r, probes):
    d = np.linalg.norm(probes[:, None] - man[None], axis=-1)
    return np.mean(np.any(d <= r[None], axis=1))

  return cover(real, radii(real), fake), cover(fake, radii(fake), real)


def test_precision_recall_matches_bruteforce_with_small_batches():
  rng = np.random.default_rng(9)
  real = rng.normal(size=(120, 5)).astype(np.float32)
  fake = rng.normal(0.8, 1.5, size=(90, 5)).astype(np.float32)
  p, r = fid.precision_recall(real, fake, k=3, row_batch=7)
  bp, br = _pr_bruteforce(real.astype(np.float64), fake.astype(np.float64), 3)
  assert (p, r) == pytest.approx((bp, br), abs=1.5 / 90)  # at most one borderline point may flip
  assert 0.0 < p < 1.0 and 0.0 < r < 1.0


def test_precision_recall_sanity():
  rng = np.random.default_rng(10)
  real = rng.normal(size=(200, 16)).astype(np.float32)
  assert fid.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
  far = real + 100.0
  assert fid.precision_recall(real, far, k=3) == (0.0, 0.0)
  # Half the fakes copy real points, half are far away: exactly half of them lie on the real manifold.
  fake = np.concatenate([real[:100], far[:100]])
  p, r = fid.precision_recall(real, fake, k=3, row_batch=33)
  assert p == 0.5
  assert 0.0 < r < 1.0
  np.testing.assert_allclose(fid.knn_radii(real, 3, row_batch=17), fid.knn_radii(real, 3), rtol=1e-6)
