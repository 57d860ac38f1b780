"""Denoising score-matching losses of EDM (EDM, VP, VE variants) for patches, and CFG label dropout.

All functions are pure and jittable: randomness comes from the key argument only.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.scipy import special

from patch_diffusion.edm import precond as precond_lib

#: ``denoise_fn(x_noisy [N,s,s,C], sigma [N], x_pos [N,s,s,2], labels [N,L] | None) -> D [N,s,s,C]``;
#: the denoisers of ``precond.make_denoiser`` also take ``augment_labels=[N, augment_dim]``.
DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray]], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class EDMNoise:
  """log σ ~ N(P_mean, P_std²); weight λ(σ) = (σ² + σ_d²) / (σ·σ_d)²."""
  P_mean: float = -1.2
  P_std: float = 1.2
  sigma_data: float = 0.5

  def sample(self, key: jax.Array, n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    sigma = jnp.exp(jax.random.normal(key, (n,)) * self.P_std + self.P_mean)
    weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data)**2
    return sigma, weight


def truncated_standard_normal(u: jnp.ndarray, a, b) -> jnp.ndarray:
  """z ~ N(0, 1) conditioned on a <= z <= b, by the inverse CDF: z = Φ⁻¹(Φ(a) + u (Φ(b) − Φ(a))).

  Computed on the side of 0 where the interval lies (z → −z when a + b > 0), so both CDF values are
  lower-tail probabilities and keep float32's relative precision: Φ(2.7) = 0.9965 has only ~4 correct
  digits left in float32 for the difference of two such values, Φ(−2.7) = 0.0035 has all of them.

  Args:
    u: uniforms in (0, 1), any shape, float32.
    a, b: bounds (scalars, may be traced; −inf/inf allowed).

  Returns:
    z of ``u``'s shape and dtype, in [a, b] up to rounding.
  """
  a = jnp.asarray(a, u.dtype)
  b = jnp.asarray(b, u.dtype)
  flip = (a + b) > 0  # NaN for (−inf, inf): no flip
  lo, hi = jnp.where(flip, -b, a), jnp.where(flip, -a, b)
  p_lo, p_hi = special.ndtr(lo), special.ndtr(hi)
  z = special.ndtri(p_lo + u * (p_hi - p_lo))
  return jnp.where(flip, -z, z)


@dataclasses.dataclass(frozen=True)
class TruncatedEDMNoise:
  """EDM's σ distribution conditioned on one stage of a multi-stage network: ln σ ~ N(P_mean, P_std²)
  truncated to ``lo < σ <= hi``; weight λ(σ) as :class:`EDMNoise`.

  This is the distribution the authors' ``EDMMultistageLoss`` draws by rejection (log-normal σ until one
  falls in the step's stage), drawn here in closed form with the inverse CDF of the normal on
  [(ln lo − P_mean)/P_std, (ln hi − P_mean)/P_std]. The result is clipped to (lo, hi] in float32 (the
  boundaries rounded to float32, as ``stage_of_sigma`` compares them), so every σ belongs to the stage.

  Attributes:
    base: the untruncated :class:`EDMNoise`.
    lo, hi: the stage's σ interval, lower bound exclusive (0 = none), upper inclusive (inf = none);
      Python floats or traced float32 scalars (a traced stage).
  """
  base: EDMNoise
  lo: float | jax.Array = 0.0
  hi: float | jax.Array = float("inf")

  def sample(self, key: jax.Array, n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    b = self.base
    lo = jnp.asarray(self.lo, jnp.float32)
    hi = jnp.asarray(self.hi, jnp.float32)
    # log(0) = −inf and log(inf) = inf give the untruncated tails.
    a_z = (jnp.log(lo) - b.P_mean) / b.P_std
    b_z = (jnp.log(hi) - b.P_mean) / b.P_std
    # Open interval (0, 1): u = 0 would give z = −inf (σ = 0) in the lowest stage.
    u = jax.random.uniform(key, (n,), jnp.float32, minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
    sigma = jnp.exp(truncated_standard_normal(u, a_z, b_z) * b.P_std + b.P_mean)
    sigma = jnp.clip(sigma, jnp.nextafter(lo, jnp.float32(jnp.inf)), hi)
    weight = (sigma**2 + b.sigma_data**2) / (sigma * b.sigma_data)**2
    return sigma, weight


def stage_noise(noise_dist, boundaries, stage) -> TruncatedEDMNoise:
  """``noise_dist`` (an :class:`EDMNoise`) truncated to stage ``stage`` of a multi-stage network.

  Args:
    noise_dist: the run's :class:`EDMNoise` (the authors' multi-stage loss exists for EDM only).
    boundaries: the K − 1 stage boundaries in σ (Python floats).
    stage: a Python int (the interval is a pair of constants) or a traced int32 scalar (looked up in a
      table of the K + 1 interval edges).
  """
  if not isinstance(noise_dist, EDMNoise):
    raise ValueError(f"multi-stage training needs EDM's noise distribution (edm.precond='edm'), got "
                     f"{type(noise_dist).__name__}")
  edges = (0.0,) + tuple(float(b) for b in boundaries) + (float("inf"),)
  if isinstance(stage, int):
    if not 0 <= stage < len(edges) - 1:
      raise ValueError(f"stage {stage} out of range for {len(edges) - 1} stages")
    return TruncatedEDMNoise(noise_dist, edges[stage], edges[stage + 1])
  table = jnp.asarray(edges, jnp.float32)
  stage = jnp.clip(jnp.asarray(stage, jnp.int32), 0, len(edges) - 2)
  return TruncatedEDMNoise(noise_dist, table[stage], table[stage + 1])


@dataclasses.dataclass(frozen=True)
class VPNoise:
  """σ = σ_VP(t), t ~ U(ε_t, 1); weight 1/σ² (EDM's VPLoss)."""
  precond: precond_lib.VPPrecond = precond_lib.VPPrecond()

  def sample(self, key: jax.Array, n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    u = jax.random.uniform(key, (n,))
    sigma = self.precond.sigma(1 + u * (self.precond.epsilon_t - 1))
    return sigma, 1.0 / sigma**2


@dataclasses.dataclass(frozen=True)
class VENoise:
  """log σ ~ U(log σ_min, log σ_max); weight 1/σ² (EDM's VELoss)."""
  sigma_min: float = 0.02
  sigma_max: float = 100.0

  def sample(self, key: jax.Array, n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    u = jax.random.uniform(key, (n,))
    sigma = self.sigma_min * (self.sigma_max / self.sigma_min)**u
    return sigma, 1.0 / sigma**2


def get_noise_distribution(name: str, *, P_mean: float = -1.2, P_std: float = 1.2,
                           sigma_data: float = 0.5):
  """The training σ distribution and weighting matching preconditioning ``name`` (edm | vp | ve)."""
  if name == "edm":
    return EDMNoise(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)
  if name == "vp":
    return VPNoise()
  if name == "ve":
    return VENoise()
  raise ValueError(f"unknown preconditioning {name!r}; expected one of 'edm', 'vp', 've'")


def drop_labels(key: jax.Array, labels: jnp.ndarray, p: float) -> jnp.ndarray:
  """Replaces each sample's label by the zero vector with probability ``p`` (classifier-free guidance).

  Args:
    labels: one-hot (or soft) labels [N, L].
    p: drop probability; 0 returns ``labels`` unchanged.
  """
  if p <= 0.0:
    return labels
  keep = jax.random.uniform(key, (labels.shape[0], 1)) >= p
  return labels * keep.astype(labels.dtype)


def sample_noise(key: jax.Array, noise_dist, shape: tuple[int, ...]):
  """The randomness of the denoising loss for a batch of ``shape`` = [N, s, s, C]: (σ [N], λ(σ) [N],
  ε [N, s, s, C] ~ N(0, I), float32). Drawn once for a whole step so that gradient accumulation can slice
  it per micro-batch; :func:`patch_loss` draws exactly these from the same key."""
  k_sigma, k_noise = jax.random.split(key)
  sigma, weight = noise_dist.sample(k_sigma, shape[0])
  return sigma, weight, jax.random.normal(k_noise, shape, jnp.float32)


def denoising_loss(denoise_fn: DenoiseFn, patches: jnp.ndarray, x_pos: jnp.ndarray,
                   labels: Optional[jnp.ndarray], sigma: jnp.ndarray, weight: jnp.ndarray, eps: jnp.ndarray,
                   augment_labels: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Per-sample loss λ(σ_n) · Σ_{h,w,c} (D(y_n + σ_n ε_n; σ_n) − y_n)² for given σ, λ and ε.

  Args:
    denoise_fn: the preconditioned denoiser; called with ``augment_labels=`` only when they are given.
    patches: clean patches y [N, s, s, C] in [-1, 1].
    x_pos: coordinate channels [N, s, s, 2].
    labels: [N, L] or None.
    sigma, weight: [N] (see :func:`sample_noise`).
    eps: unit Gaussian noise [N, s, s, C].
    augment_labels: [N, augment_dim] of the augmentation applied to ``patches``, or None.

  Returns:
    float32 [N].
  """
  y = patches.astype(jnp.float32)
  noise = eps * sigma[:, None, None, None]
  extra = {} if augment_labels is None else {"augment_labels": augment_labels}
  denoised = denoise_fn(y + noise, sigma, x_pos, labels, **extra).astype(jnp.float32)
  return weight * jnp.sum((denoised - y)**2, axis=(1, 2, 3))


def patch_loss(denoise_fn: DenoiseFn, key: jax.Array, patches: jnp.ndarray, x_pos: jnp.ndarray,
               labels: Optional[jnp.ndarray], noise_dist,
               augment_labels: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Per-sample weighted denoising loss on patches.

  loss_n = λ(σ_n) · Σ_{h,w,c} (D(y_n + σ_n ε; σ_n) − y_n)², with σ_n and ε drawn from ``key``.

  Args:
    denoise_fn: the preconditioned denoiser.
    key: PRNG key for σ and ε.
    patches: clean patches y, NHWC float in [-1, 1].
    x_pos: coordinate channels [N, s, s, 2].
    labels: [N, L] or None.
    noise_dist: one of :class:`EDMNoise`, :class:`VPNoise`, :class:`VENoise`.
    augment_labels: [N, augment_dim] augmentation labels of ``patches`` (EDM's augment pipe), or None.

  Returns:
    float32 [N]: the per-sample losses (sum over pixels and channels). Reduce with a mean.
  """
  sigma, weight, eps = sample_noise(key, noise_dist, patches.shape)
  return denoising_loss(denoise_fn, patches, x_pos, labels, sigma, weight, eps, augment_labels)
