"""Stage boundaries for a multi-stage network by timestep clustering with the ideal denoiser (Zhang et al.,
CVPR 2024; the authors' analysis code: LucasYFL/Multistage_Diffusion ``dpm-solver/interval_split/
interval_split_old.py`` and ``analysis/vis_results.ipynb``).

**The ideal denoiser.** For a finite data set {y_i} and x = y + σ z, the minimiser of EDM's denoising loss
is the posterior mean D*(x; σ) = Σ_i w_i y_i with w = softmax_i(−‖x − y_i‖² / (2σ²)) (EDM, Karras et al.
2022, eq. 57). Written in ε-prediction, ε*(x; σ) = (x − D*(x; σ)) / σ.

**The criterion.** For a training image y and noise z drawn once and reused at every σ (as the authors do),
the ideal ε-prediction is compared with its two limits:

* σ → 0, where the posterior collapses on y and ε* is the true noise: ε*_0 = z;
* σ → ∞, where the posterior is the prior and D* is the data mean ȳ: ε*_∞ = (x − ȳ) / σ;

and the *similarity* is the fraction of pixels within a tolerance δ:

  S_0(σ) = E_{y,z} mean_j 1{|ε*(x; σ) − z|_j < δ} = E mean_j 1{|D* − y|_j < δσ}
  S_1(σ) = E_{y,z} mean_j 1{|ε*(x; σ) − ε*_∞|_j < δ} = E mean_j 1{|D* − ȳ|_j < δσ}

(the authors' ``ds0``/``ds1``, plotted as ``dis_x0.png`` / ``dis_x1.png``). Three stages follow: the low-σ
stage where the ideal denoiser still returns the training image (S_0 ≥ η), the high-σ stage where it
already returns the data mean (S_1 ≥ η), and the stage between. The boundaries are

  b_1 = the σ where S_0 first falls below η (going up from σ_min),
  b_2 = the σ where S_1 last rises above η (going down from σ_max),

each interpolated linearly in ln σ between the two grid points around the crossing.

**Thresholds.** δ = 2/255 (default): the authors' ``distance = pixel_space_d * 2 / 255`` with
``pixel_space_d = 1`` (``vis_results.ipynb``; their graph-partition variant ``graph_vis.py`` uses the
same ``2 p / 256`` with p = 1). Differences in ε units do not depend on the data's scale if σ scales with
it, so δ carries over from their [0, 1] data to our [−1, 1] data (whose σ is twice theirs at the same
signal-to-noise ratio). η = 0.9 (default) is **our** choice: the paper's value could not be checked here
(its text was not available; the authors' code plots the curves but hard-codes no η). The authors' EDM
boundaries 2.5103 / 7.6577 are exactly EDM's VP σ(t) (β_d = 19.9, β_min = 0.1) at t = 0.442 / 0.636, i.e.
they were found in VP time on CIFAR-10 and mapped to σ; :func:`vp_time` gives that mapping back.

The second criterion in the authors' repository (``interval_split.py`` + ``graph_vis.py``: a pairwise
similarity matrix over 21 VP times partitioned into contiguous intervals by a Gurobi integer program) is
not implemented.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

#: Default tolerance δ in ε units (the authors' analysis code, module docstring).
DEFAULT_DELTA = 2 / 255
#: Default similarity threshold η (our choice, module docstring).
DEFAULT_ETA = 0.9


def ideal_denoiser(x: np.ndarray, sigma: float, data: np.ndarray) -> np.ndarray:
  """D*(x; σ) = Σ_i softmax_i(−‖x − y_i‖² / 2σ²) y_i over the rows of ``data`` (float64).

  Args:
    x: [n, d] noisy points.
    sigma: the noise level (> 0).
    data: [M, d] the data set {y_i}.

  Returns:
    [n, d] float64.
  """
  x = np.asarray(x, np.float64)
  data = np.asarray(data, np.float64)
  d2 = (x * x).sum(1)[:, None] - 2 * x @ data.T + (data * data).sum(1)[None, :]
  logits = -d2 / (2 * sigma**2)
  w = np.exp(logits - logits.max(1, keepdims=True))
  return (w / w.sum(1, keepdims=True)) @ data


def similarity_curves(data: np.ndarray, sample_idx: np.ndarray, noise: np.ndarray, sigmas: np.ndarray,
                      delta: float = DEFAULT_DELTA) -> tuple[np.ndarray, np.ndarray]:
  """S_0(σ) and S_1(σ) of the module docstring on a σ grid.

  The squared distances ‖y_n + σ z_n − y_i‖² = ‖y_n − y_i‖² + 2σ z_n·(y_n − y_i) + σ²‖z_n‖² are expanded once
  (the last term is the same for every i and cancels in the softmax), so each σ costs one softmax and one
  [N, M] x [M, d] product.

  Args:
    data: [M, d] float data set (the reference set of the ideal denoiser), e.g. images in [−1, 1].
    sample_idx: [N] rows of ``data`` to noise (the samples y_n; they belong to the reference set, as in the
      authors' code).
    noise: [N, d] standard normal z_n, one per sample, reused at every σ.
    sigmas: [G] increasing noise levels.
    delta: tolerance δ in ε units.

  Returns:
    (S_0 [G], S_1 [G]) float64 in [0, 1].
  """
  data = np.asarray(data, np.float64)
  y = data[np.asarray(sample_idx)]
  z = np.asarray(noise, np.float64)
  mean = data.mean(0)
  sq = (data * data).sum(1)
  a = (y * y).sum(1)[:, None] - 2 * y @ data.T + sq[None, :]         # ‖y_n − y_i‖²      [N, M]
  b = (z * y).sum(1)[:, None] - z @ data.T                           # z_n · (y_n − y_i)  [N, M]
  s0, s1 = [], []
  for sigma in np.asarray(sigmas, np.float64):
    logits = -a / (2 * sigma**2) - b / sigma
    w = np.exp(logits - logits.max(1, keepdims=True))
    den = (w / w.sum(1, keepdims=True)) @ data                       # D*(y_n + σ z_n; σ)  [N, d]
    tol = delta * sigma
    s0.append(np.mean(np.abs(den - y) < tol))
    s1.append(np.mean(np.abs(den - mean) < tol))
  return np.asarray(s0), np.asarray(s1)


def _crossing(sigmas: np.ndarray, s: np.ndarray, lo: int, eta: float) -> float:
  """σ between grid points lo and lo + 1 where the curve s crosses η, linear in ln σ."""
  l0, l1 = math.log(sigmas[lo]), math.log(sigmas[lo + 1])
  f = (s[lo] - eta) / (s[lo] - s[lo + 1]) if s[lo] != s[lo + 1] else 0.5
  return float(math.exp(l0 + f * (l1 - l0)))


def pick_boundaries(sigmas: np.ndarray, s0: np.ndarray, s1: np.ndarray, eta: float = DEFAULT_ETA
                    ) -> tuple[float, float]:
  """(b_1, b_2): where S_0 first falls below η and where S_1 last rises above η (module docstring).

  Raises:
    ValueError: a curve never crosses η on the grid (widen the σ range or change η), or b_1 >= b_2 (the
      low and high stages overlap: raise η).
  """
  sigmas, s0, s1 = (np.asarray(v, np.float64) for v in (sigmas, s0, s1))
  below0 = np.nonzero(s0 < eta)[0]
  if not len(below0) or below0[0] == 0:
    raise ValueError(f"S_0 (similarity to the true noise) is {'never' if not len(below0) else 'already'} below "
                     f"eta={eta} on [{sigmas[0]:g}, {sigmas[-1]:g}] (range {s0.min():.3f}..{s0.max():.3f}); widen "
                     f"the σ range or change --eta")
  below1 = np.nonzero(s1 < eta)[0]
  if not len(below1) or below1[-1] == len(sigmas) - 1:
    raise ValueError(f"S_1 (similarity to the data mean) is {'never' if not len(below1) else 'still'} below "
                     f"eta={eta} at the top of [{sigmas[0]:g}, {sigmas[-1]:g}] (range {s1.min():.3f}.."
                     f"{s1.max():.3f}); widen the σ range or change --eta")
  b1 = _crossing(sigmas, s0, int(below0[0]) - 1, eta)
  b2 = _crossing(sigmas, s1, int(below1[-1]), eta)
  if not b1 < b2:
    raise ValueError(f"the stage boundaries overlap (b_1 = {b1:.4g} >= b_2 = {b2:.4g}) at eta={eta}: raise --eta")
  return b1, b2


def vp_time(sigma: float, beta_d: float = 19.9, beta_min: float = 0.1) -> float:
  """EDM's VP time t with σ_VP(t) = σ (σ_VP(t) = sqrt(exp(β_d t²/2 + β_min t) − 1)): 2.5103 -> 0.442."""
  return (math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(sigma**2)) - beta_min) / beta_d


@dataclasses.dataclass(frozen=True)
class BoundaryResult:
  """What :func:`find_boundaries` returns: the boundaries, the curves and the settings."""
  boundaries: tuple[float, float]
  sigmas: np.ndarray
  s0: np.ndarray
  s1: np.ndarray
  delta: float
  eta: float
  num_samples: int
  num_reference: int


def find_boundaries(data: np.ndarray, *, num_samples: int = 256, num_sigmas: int = 101,
                    sigma_min: float = 0.002, sigma_max: float = 80.0, delta: float = DEFAULT_DELTA,
                    eta: float = DEFAULT_ETA, seed: int = 0,
                    rng: Optional[np.random.Generator] = None) -> BoundaryResult:
  """Curves and boundaries for a data set (module docstring).

  Args:
    data: [M, ...] images as floats in [−1, 1] (flattened inside): the reference set of the ideal denoiser.
    num_samples: N images drawn from ``data`` (without replacement when N <= M) to noise.
    num_sigmas: G grid points, log-spaced on [sigma_min, sigma_max] (EDM's sampling range by default).
    delta, eta: the tolerance δ and threshold η.
    seed: seeds the sample choice and the noise (``np.random.default_rng(seed)``) unless ``rng`` is given.
  """
  data = np.asarray(data, np.float64).reshape(len(data), -1)
  if len(data) < 2 or num_samples < 1 or num_sigmas < 3 or not 0 < sigma_min < sigma_max:
    raise ValueError(f"need >= 2 data points (got {len(data)}), num_samples >= 1, num_sigmas >= 3 and "
                     f"0 < sigma_min < sigma_max")
  if not (0 < eta < 1 and delta > 0):
    raise ValueError(f"need 0 < eta < 1 and delta > 0, got eta={eta}, delta={delta}")
  rng = rng or np.random.default_rng(seed)
  idx = rng.choice(len(data), size=num_samples, replace=num_samples > len(data))
  noise = rng.standard_normal((num_samples, data.shape[1]))
  sigmas = np.geomspace(sigma_min, sigma_max, num_sigmas)
  s0, s1 = similarity_curves(data, idx, noise, sigmas, delta)
  return BoundaryResult(pick_boundaries(sigmas, s0, s1, eta), sigmas, s0, s1, delta, eta, num_samples,
                        len(data))
