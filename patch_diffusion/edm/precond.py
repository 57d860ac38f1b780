"""Network preconditioning of EDM (Karras et al. 2022, Table 1) for patch-wise denoisers.

A *network function* ``net_fn(x_in, c_noise, class_labels) -> F`` maps the scaled noisy image concatenated
with the coordinate channels (NHWC, ``C + 2`` channels) and the noise label ``c_noise`` (shape ``[N]``) to
the raw network output ``F`` (NHWC, ``C`` channels). ``denoise`` wraps it into the denoiser
``D(x; σ) = c_skip·x + c_out·F(concat[c_in·x, x_pos], c_noise)``. The coordinates are *not* scaled by
``c_in``: they are a location signal, not part of the noisy signal.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

NetFn = Callable[[jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray]], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class Coefficients:
  """Per-sample preconditioning coefficients, each broadcastable to ``[N, 1, 1, 1]``."""
  c_skip: jnp.ndarray
  c_out: jnp.ndarray
  c_in: jnp.ndarray
  c_noise: jnp.ndarray  # shape [N]


@dataclasses.dataclass(frozen=True)
class EDMPrecond:
  """EDM preconditioning with σ_data (0.5 for images in [-1, 1])."""
  sigma_data: float = 0.5
  sigma_min: float = 0.0
  sigma_max: float = float("inf")

  def coefficients(self, sigma: jnp.ndarray) -> Coefficients:
    sigma = jnp.reshape(sigma, (-1, 1, 1, 1))
    sd2 = self.sigma_data**2
    return Coefficients(
        c_skip=sd2 / (sigma**2 + sd2),
        c_out=sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2),
        c_in=1.0 / jnp.sqrt(sigma**2 + sd2),
        c_noise=jnp.log(sigma).reshape(-1) / 4.0,
    )


@dataclasses.dataclass(frozen=True)
class VPPrecond:
  """Variance-preserving preconditioning (Song et al. 2021) as re-expressed by EDM."""
  beta_d: float = 19.9
  beta_min: float = 0.1
  M: int = 1000
  epsilon_t: float = 1e-5

  def sigma(self, t):
    t = jnp.asarray(t)
    return jnp.sqrt(jnp.exp(0.5 * self.beta_d * t**2 + self.beta_min * t) - 1.0)

  def sigma_inv(self, sigma):
    sigma = jnp.asarray(sigma)
    return (jnp.sqrt(self.beta_min**2 + 2 * self.beta_d * jnp.log1p(sigma**2)) - self.beta_min) / self.beta_d

  @property
  def sigma_min(self) -> float:
    return float(self.sigma(self.epsilon_t))

  @property
  def sigma_max(self) -> float:
    return float(self.sigma(1.0))

  def coefficients(self, sigma: jnp.ndarray) -> Coefficients:
    sigma = jnp.reshape(sigma, (-1, 1, 1, 1))
    return Coefficients(
        c_skip=jnp.ones_like(sigma),
        c_out=-sigma,
        c_in=1.0 / jnp.sqrt(sigma**2 + 1.0),
        c_noise=((self.M - 1) * self.sigma_inv(sigma)).reshape(-1),
    )


@dataclasses.dataclass(frozen=True)
class VEPrecond:
  """Variance-exploding preconditioning (Song et al. 2021) as re-expressed by EDM."""
  sigma_min: float = 0.02
  sigma_max: float = 100.0

  def coefficients(self, sigma: jnp.ndarray) -> Coefficients:
    sigma = jnp.reshape(sigma, (-1, 1, 1, 1))
    return Coefficients(
        c_skip=jnp.ones_like(sigma),
        c_out=sigma,
        c_in=jnp.ones_like(sigma),
        c_noise=jnp.log(0.5 * sigma).reshape(-1),
    )


Precond = EDMPrecond | VPPrecond | VEPrecond


#: Names ``config.edm.precond`` accepts.
PRECONDS = ("edm", "vp", "ve")


def get_precond(name: str, sigma_data: float = 0.5) -> Precond:
  """Returns the preconditioning named ``edm``, ``vp`` or ``ve``."""
  if name == "edm":
    return EDMPrecond(sigma_data=sigma_data)
  if name == "vp":
    return VPPrecond()
  if name == "ve":
    return VEPrecond()
  raise ValueError(f"unknown preconditioning {name!r}; expected one of 'edm', 'vp', 've'")


def denoise(precond: Precond, net_fn: NetFn, x: jnp.ndarray, sigma: jnp.ndarray,
            x_pos: jnp.ndarray, class_labels: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """The preconditioned denoiser D(x; σ).

  Args:
    precond: the preconditioning (EDM, VP or VE).
    net_fn: raw network, ``(x_in [N,H,W,C+2], c_noise [N], class_labels [N,L] | None) -> [N,H,W,C]``.
    x: noisy patches, NHWC float, ``C`` channels.
    sigma: noise levels, shape ``[N]`` or scalar (broadcast to the batch).
    x_pos: coordinate channels ``[N,H,W,2]`` (x = column, y = row, full image spans [-1, 1]).
    class_labels: one-hot labels ``[N, L]`` or None for an unconditional network.

  Returns:
    Denoised patches, same shape and dtype as ``x``.
  """
  sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype).reshape(-1), (x.shape[0],))
  c = precond.coefficients(sigma)
  x_in = jnp.concatenate([c.c_in * x, x_pos.astype(x.dtype)], axis=-1)
  f_x = net_fn(x_in, c.c_noise, class_labels)
  return (c.c_skip * x + c.c_out * f_x.astype(x.dtype)).astype(x.dtype)


def make_denoiser(apply_fn: Callable, variables: dict, precond, *, train: bool = False,
                  dropout_key: jax.Array | None = None, dtype=jnp.float32, stage=None):
  """``denoise_fn(x, sigma, x_pos, labels, augment_labels=None, stage=None)`` for a Flax network with
  ``variables``.

  The network sees its input in ``dtype`` (bf16 compute option); D is returned in float32.
  ``augment_labels`` ([N, augment_dim] float, EDM's augmentation labels) reach the network's
  ``map_augment``; None (sampling, evaluation) means "not augmented" and is exactly the all-zero label
  (``map_augment`` has no bias), so a network trained with augmentation samples with None.

  ``stage`` (multi-stage networks only): the decoder to run, a Python int (static) or a traced int32
  scalar, passed to the network as ``stage=``; a ``stage`` given to ``denoise_fn`` overrides it. None (the
  default) passes nothing, so single-decoder networks are called exactly as before and a multi-stage
  network picks the stage of the first sample's σ.
  """
  rngs = {"dropout": dropout_key} if (train and dropout_key is not None) else {}

  def net_fn(x_in, c_noise, labels, augment_labels=None, stage=None):
    if labels is not None:
      labels = labels.astype(dtype)
    extra = {} if augment_labels is None else {"augment_labels": augment_labels.astype(jnp.float32)}
    if stage is not None:
      extra["stage"] = stage
    out = apply_fn(variables, x_in.astype(dtype), c_noise.astype(jnp.float32), labels, train=train, rngs=rngs,
                   **extra)
    return out.astype(jnp.float32)

  default_stage = stage

  def denoise_fn(x, sigma, x_pos, labels, augment_labels=None, stage=None):
    stage = default_stage if stage is None else stage
    net = functools.partial(net_fn, augment_labels=augment_labels, stage=stage)
    return denoise(precond, net, x, sigma, x_pos, labels)

  return denoise_fn
