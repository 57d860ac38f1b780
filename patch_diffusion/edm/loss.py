"""Denoising score-matching losses of EDM (EDM, VP, VE variants) for patches, and CFG label dropout.

All functions are pure and jittable: randomness comes from the key argument only.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

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
