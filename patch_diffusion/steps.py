"""Pure training-step factory: crop + coordinates + EDM patch loss + Adam + EMA, no I/O.

One step function is built (and compiled) per patch size: the size is static, so every executable has
fixed shapes. All randomness comes from ``fold_in(base_key, state.step)``; with partitionable threefry the
draws do not depend on how the batch is sharded, so an 8-device step equals a 1-device step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from patch_diffusion.data import patches as patches_lib
from patch_diffusion.edm import loss as loss_lib
from patch_diffusion.edm.precond import make_denoiser
from patch_diffusion.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of a training step."""
  patch_size: int
  resolution: int
  num_classes: int = 0         # 0 = unconditional
  label_dropout: float = 0.0   # CFG: probability of the zero label
  compute_dtype: Any = jnp.float32


def images_to_float(images: jnp.ndarray) -> jnp.ndarray:
  """uint8 [0, 255] → float32 [−1, 1] (EDM: x / 127.5 − 1)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def sanitize_grads(grads):
  """NaN → 0, ±inf → ±1e5, as the official trainer does (no clipping otherwise)."""
  return jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation, precond, noise_dist,
                    cfg: StepConfig) -> Callable:
  """Returns ``step(state, batch, lr, ema_beta, base_key) -> (state, metrics)``.

  Args of the returned function:
    state: :class:`TrainState` (donated).
    batch: {'image': uint8 [N, R, R, C], 'label': int32 [N]} — full-resolution images; N already includes
      the batch multiplier of this patch size.
    lr: float32 scalar learning rate for this step.
    ema_beta: float32 scalar EMA decay for this step.
    base_key: the run's typed PRNG key.

  Metrics (device scalars, fetched only on log steps): 'loss' (mean over samples of the per-sample sum),
  'grad_norm', 'nonfinite_grads' (count of NaN/inf gradient entries replaced).
  """

  def step(state: TrainState, batch: dict, lr: jax.Array, ema_beta: jax.Array, base_key: jax.Array):
    key = jax.random.fold_in(base_key, state.step)
    k_crop, k_loss, k_label, k_dropout = jax.random.split(key, 4)
    images = images_to_float(batch["image"])
    patches, x_pos = patches_lib.random_patches(k_crop, images, cfg.patch_size)
    labels = None
    if cfg.num_classes:
      labels = jax.nn.one_hot(batch["label"], cfg.num_classes, dtype=jnp.float32)
      labels = loss_lib.drop_labels(k_label, labels, cfg.label_dropout)

    def loss_fn(params):
      denoise_fn = make_denoiser(apply_fn, {"params": params, **state.buffers}, precond, train=True,
                                 dropout_key=k_dropout, dtype=cfg.compute_dtype)
      per_sample = loss_lib.patch_loss(denoise_fn, k_loss, patches, x_pos, labels, noise_dist)
      return jnp.mean(per_sample)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    nonfinite = sum(jnp.sum(~jnp.isfinite(g)) for g in jax.tree.leaves(grads))
    grads = sanitize_grads(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_beta * e + (1 - ema_beta) * p, state.ema_params, params)
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "nonfinite_grads": nonfinite}
    return new_state, metrics

  return step
