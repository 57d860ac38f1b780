"""Pure training-step factory: crop + coordinates + augmentation + EDM patch loss + Adam + EMA, no I/O.

One step function is built (and compiled) per (patch size, batch multiplier): the size is static, so
every executable has fixed shapes. All randomness comes from ``fold_in(base_key, state.step)``; with
partitionable threefry the draws do not depend on how the batch is sharded, so an 8-device step equals a
1-device step.

**Gradient accumulation** (``StepConfig.grad_accum_steps`` = k, the official ``--batch-gpu``): the step's
randomness — crop offsets, σ, ε, label dropout, augmentation parameters — is drawn for the whole batch of
N images exactly as without accumulation; then the batch is split into k interleaved micro-batches
(micro-batch j holds samples j, j+k, j+2k, ..., so a batch sharded in contiguous blocks over D devices
splits into micro-batches of N/(kD) samples per device without moving data when k divides N/D), and a
``lax.scan`` runs forward and backward on one micro-batch at a time, accumulating Σ_j ∇(Σ_{n∈j} loss_n)/N
— the gradient of the mean over all N samples. Only one micro-batch's activations are alive at a time;
the update equals the single large step up to float summation order (dropout draws its mask per
micro-batch from ``fold_in(dropout_key, j)``, so with dropout > 0 the masks differ from k = 1). On
XLA:CPU the loop relies on ``models/layers._conv`` writing its gradient convolutions in NHWC/HWIO order:
XLA:CPU only rewrites top-level convolutions into its fast kernels, and autodiff's weight gradients in a
loop body otherwise ran 33× slower (demo, patch 16, k = 2).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from patch_diffusion.data import augment as augment_lib
from patch_diffusion.data import patches as patches_lib
from patch_diffusion.edm import loss as loss_lib
from patch_diffusion.edm.precond import make_denoiser
from patch_diffusion.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of a training step.

  Attributes:
    patch_size: s (static: one executable per size).
    resolution: R of the full images in the batch.
    num_classes: 0 = unconditional.
    label_dropout: CFG: probability of the zero label.
    compute_dtype: the network's input/compute dtype.
    augment: EDM's augmentation pipe (``augment.from_config(config.data)``) or None.
    augment_before_crop: False (official): augment the cropped patch, coordinates untouched; True: augment
      the full image, then crop (coordinates describe the augmented image).
    grad_accum_steps: k micro-batches per step (module docstring); must divide the step's batch.
    stage_boundaries: multi-stage networks (``MultistageUNet``): the K − 1 σ boundaries between stages;
      () for single-decoder networks.
    stage: multi-stage networks: the stage this step trains, static (one executable per stage); None =
      the step takes it as a traced int32 argument (one executable for every stage, the decoder chosen
      with ``lax.switch``). Either way the batch's σ come from EDM's log-normal truncated to the stage,
      only that decoder (and the shared encoder) gets gradients and an Adam update
      (``state.stagewise_adam``), and the EMA moves every parameter, as the authors' loop.
    latent_scale: latent runs: the VAE's scaling factor (0.18215 for SD) applied to the posterior sample.
  """
  patch_size: int
  resolution: int
  num_classes: int = 0         # 0 = unconditional
  label_dropout: float = 0.0   # CFG: probability of the zero label
  compute_dtype: Any = jnp.float32
  augment: Optional[augment_lib.AugmentPipe] = None
  augment_before_crop: bool = False
  grad_accum_steps: int = 1
  stage_boundaries: tuple = ()
  stage: Optional[int] = None
  latent_scale: float = 1.0


#: ``fold_in`` stream of the latent posterior draw (separate from the crop/σ/ε/label/dropout keys).
LATENT_STREAM = 0x1A7E


def images_to_float(images: jnp.ndarray) -> jnp.ndarray:
  """uint8 [0, 255] → float32 [−1, 1] (EDM: x / 127.5 − 1)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def batch_images(batch: dict, key: jax.Array, latent_scale: float = 1.0) -> jnp.ndarray:
  """The training images of a batch, float32 [N, R, R, C].

  Pixel batches {'image': uint8} map to [-1, 1]. Latent batches {'mean', 'std'} (VAE posterior moments,
  ``data/latents.py``) draw the posterior sample ``(mean + std * eps) * latent_scale`` from ``key`` — the
  official ``latent_dist.sample() * 0.18215``, without running the encoder every step.
  """
  if "image" in batch:
    return images_to_float(batch["image"])
  eps = jax.random.normal(key, batch["mean"].shape, jnp.float32)
  return (batch["mean"].astype(jnp.float32) + batch["std"].astype(jnp.float32) * eps) * latent_scale


def sanitize_grads(grads):
  """NaN → 0, ±inf → ±1e5, as the official trainer does (no clipping otherwise)."""
  return jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)


def split_micro_batches(tree, k: int):
  """[N, ...] leaves → [k, N/k, ...]: micro-batch j holds samples j, j+k, j+2k, ... (interleaved)."""
  def split(x):
    n = x.shape[0]
    return jnp.swapaxes(x.reshape((n // k, k) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, tree)


def draw_step_inputs(cfg: StepConfig, noise_dist, batch: dict, key: jax.Array) -> dict:
  """All of a step's randomness for its N samples, with the batch: the per-sample inputs of the loss.

  Args:
    cfg: the step's settings.
    noise_dist: the σ distribution (``loss.get_noise_distribution``).
    batch: {'image': uint8 [N, R, R, C], 'label': int32 [N]}, or a latent batch {'mean', 'std', 'label'}
      (see :func:`batch_images`).
    key: the step key ``fold_in(base_key, step)``.

  Returns:
    {'image', 'row', 'col' (int32 [N] crop offsets), 'sigma', 'weight' ([N]), 'eps' ([N, s, s, C]),
    'labels' ([N, num_classes], if conditional), 'augment' (the pipe's parameters, if augmenting)}; every
    leaf has leading dim N, so micro-batches are slices of it. ``split(key, 4)`` gives the crop, loss,
    label-dropout and dropout keys as before augmentation and accumulation existed; the augmentation draws
    come from ``fold_in(key, AUGMENT_STREAM)``.
  """
  s = cfg.patch_size
  k_crop, k_loss, k_label, _ = jax.random.split(key, 4)
  images = batch_images(batch, jax.random.fold_in(key, LATENT_STREAM), cfg.latent_scale)
  n, res, _, ch = images.shape
  row, col = patches_lib.random_offsets(k_crop, n, res, s)
  sigma, weight, eps = loss_lib.sample_noise(k_loss, noise_dist, (n, s, s, ch))
  inputs = {"image": images, "row": row, "col": col, "sigma": sigma, "weight": weight, "eps": eps}
  if cfg.num_classes:
    labels = jax.nn.one_hot(batch["label"], cfg.num_classes, dtype=jnp.float32)
    inputs["labels"] = loss_lib.drop_labels(k_label, labels, cfg.label_dropout)
  if cfg.augment is not None:
    inputs["augment"] = cfg.augment.sample(jax.random.fold_in(key, augment_lib.AUGMENT_STREAM), n)
  return inputs


def model_inputs(cfg: StepConfig, mb: dict):
  """Clean patches, coordinates and augmentation labels of a (micro-)batch ``mb`` of step inputs.

  Returns:
    (patches float32 [n, s, s, C] in [-1, 1], x_pos float32 [n, s, s, 2], augment_labels [n, augment_dim]
    or None). Default: crop, then augment the patch — x_pos is the crop's location in the un-augmented
    image (the official order). ``augment_before_crop``: augment the full image, then crop — x_pos is the
    crop's location in the augmented image.
  """
  images = mb["image"]  # float32 [-1, 1] (pixels) or scaled latents: batch_images
  augment_labels = None
  if cfg.augment is not None and cfg.augment_before_crop:
    images, augment_labels = cfg.augment.apply(images, mb["augment"])
  patches, x_pos = patches_lib.crop_patches(images, mb["row"], mb["col"], cfg.patch_size)
  if cfg.augment is not None and not cfg.augment_before_crop:
    patches, augment_labels = cfg.augment.apply(patches, mb["augment"])
  return patches, x_pos, augment_labels


def _step_stage(cfg: StepConfig, stage):
  """The stage a step trains: None (single decoder), cfg.stage (static) or the traced argument."""
  if not cfg.stage_boundaries:
    if stage is not None or cfg.stage is not None:
      raise ValueError("a stage was given to the train step of a single-decoder network")
    return None
  if cfg.stage is not None:
    return int(cfg.stage)
  if stage is None:
    raise ValueError("this multi-stage train step takes the stage as an argument: "
                     "step(state, batch, lr, ema_beta, base_key, stage)")
  return jnp.asarray(stage, jnp.int32)


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation, precond, noise_dist,
                    cfg: StepConfig) -> Callable:
  """Returns ``step(state, batch, lr, ema_beta, base_key[, stage]) -> (state, metrics)``.

  Args of the returned function:
    state: :class:`TrainState` (donated).
    batch: {'image': uint8 [N, R, R, C], 'label': int32 [N]} — full-resolution images; N already includes
      the batch multiplier of this patch size (``StepPlan.batch_mul``) — or a latent batch {'mean', 'std':
      float16/float32 [N, R, R, C], 'label'} (VAE posterior moments; :func:`batch_images`).
    lr: float32 scalar learning rate for this step (the schedule's ``lr_scale`` already applied).
    ema_beta: float32 scalar EMA decay for this step.
    base_key: the run's typed PRNG key.
    stage: int32 scalar, only for a multi-stage step built with ``cfg.stage = None`` (see
      :class:`StepConfig`).

  Metrics (device scalars, fetched only on log steps): 'loss' (mean over samples of the per-sample sum),
  'grad_norm', 'nonfinite_grads' (count of NaN/inf gradient entries replaced).
  """
  k_accum = int(cfg.grad_accum_steps)
  if k_accum < 1:
    raise ValueError(f"train.grad_accum_steps = {k_accum} must be >= 1")

  def step(state: TrainState, batch: dict, lr: jax.Array, ema_beta: jax.Array, base_key: jax.Array,
           stage: Optional[jax.Array] = None):
    stage = _step_stage(cfg, stage)
    # Multi-stage: the batch's σ from the log-normal truncated to the stage (the authors' loss).
    noise = noise_dist if stage is None else loss_lib.stage_noise(noise_dist, cfg.stage_boundaries, stage)
    key = jax.random.fold_in(base_key, state.step)
    k_dropout = jax.random.split(key, 4)[3]
    n = batch["label"].shape[0]
    if n % k_accum:
      raise ValueError(f"train.grad_accum_steps = {k_accum} does not divide this step's batch of {n} images "
                       f"(train.batch_size x the patch size's multiplier); pick a divisor of train.batch_size")
    # The whole step's randomness, drawn for all N samples (the same draws for every k).
    inputs = draw_step_inputs(cfg, noise, batch, key)

    def per_sample_loss(params, mb: dict, dropout_key: jax.Array) -> jnp.ndarray:
      """Per-sample losses [n_mb] of one (micro-)batch ``mb`` (slices of ``inputs``)."""
      patches, x_pos, augment_labels = model_inputs(cfg, mb)
      denoise_fn = make_denoiser(apply_fn, {"params": params, **state.buffers}, precond, train=True,
                                 dropout_key=dropout_key, dtype=cfg.compute_dtype, stage=stage)
      return loss_lib.denoising_loss(denoise_fn, patches, x_pos, mb.get("labels"), mb["sigma"], mb["weight"],
                                     mb["eps"], augment_labels)

    if k_accum == 1:
      loss, grads = jax.value_and_grad(lambda p: jnp.mean(per_sample_loss(p, inputs, k_dropout)))(state.params)
    else:
      def micro_step(carry, xs):
        grads_acc, loss_acc = carry
        j, mb = xs
        # Sum over the micro-batch / N: the k gradients add up to the gradient of the mean over N.
        loss_j, grads_j = jax.value_and_grad(
            lambda p: jnp.sum(per_sample_loss(p, mb, jax.random.fold_in(k_dropout, j))) / n)(state.params)
        return (jax.tree.map(jnp.add, grads_acc, grads_j), loss_acc + loss_j), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss), _ = jax.lax.scan(
          micro_step, (zeros, jnp.zeros((), jnp.float32)),
          (jnp.arange(k_accum), split_micro_batches(inputs, k_accum)))
    nonfinite = sum(jnp.sum(~jnp.isfinite(g)) for g in jax.tree.leaves(grads))
    grads = sanitize_grads(grads)
    # Multi-stage: Adam skips the decoders this step does not train (state.stagewise_adam).
    extra = {} if stage is None else {"stage": stage}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_beta * e + (1 - ema_beta) * p, state.ema_params, params)
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "nonfinite_grads": nonfinite}
    return new_state, metrics

  return step
