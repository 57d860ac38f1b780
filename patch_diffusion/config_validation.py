"""Checks a config's values before anything is built, with messages that name the fix.

Unknown keys and wrong types are rejected earlier by ``ml_collections`` (configs are locked and typed).
"""
from __future__ import annotations

import ml_collections

ARCHS = ("ddpmpp", "ncsnpp", "adm")
PRECONDS = ("edm", "vp", "ve")
DTYPES = ("float32", "bfloat16")


def _positive(value, name: str, allow_zero: bool = False) -> None:
  # Written as `not (value > 0)` so that NaN (for which every comparison is False) is rejected too.
  if value is None or not (value >= 0 if allow_zero else value > 0):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} = {value!r} must be {bound}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the offending field for any invalid value."""
  d, m, t, p, s, e = config.data, config.model, config.train, config.patch, config.sample, config.edm
  _positive(d.resolution, "data.resolution")
  _positive(d.num_channels, "data.num_channels")
  _positive(d.max_examples, "data.max_examples", allow_zero=True)
  if not 0.0 <= p.real_p <= 1.0:
    raise ValueError(f"patch.real_p = {p.real_p} must lie in [0, 1] (probability of a full-size step)")
  levels = len(m.channel_mult)
  if p.schedule != "multigrid":  # multigrid picks its own sizes among those that fit (checked below)
    divisor = 2 if p.latent else 4
    if d.resolution % divisor:
      raise ValueError(f"data.resolution = {d.resolution}: the patch sizes R/{divisor}, R/2 must divide R "
                       f"exactly; use a resolution divisible by {divisor}")
    smallest = d.resolution // divisor if p.schedule != "full" else d.resolution
    if smallest % (2 ** (levels - 1)):
      raise ValueError(f"the smallest patch ({smallest} px) must be divisible by 2^(len(model.channel_mult)-1)"
                       f" = {2 ** (levels - 1)} for the U-Net's downsampling; use fewer levels or a larger R")
  _validate_schedule(config)
  _validate_augment(config)
  accum = t.get("grad_accum_steps", 1)
  if not (isinstance(accum, int) and accum >= 1):
    raise ValueError(f"train.grad_accum_steps = {accum!r} must be an integer >= 1 (1 = no accumulation)")
  if isinstance(t.batch_size, int) and t.batch_size > 0 and t.batch_size % accum:
    raise ValueError(f"train.grad_accum_steps = {accum} must divide train.batch_size = {t.batch_size} (every "
                     f"step's batch, batch_size x the patch size's multiplier, is split into equal "
                     f"micro-batches); pick a divisor of {t.batch_size}")
  if m.arch not in ARCHS:
    raise ValueError(f"model.arch = {m.arch!r}; expected one of {ARCHS}")
  if m.dtype not in DTYPES:
    raise ValueError(f"model.dtype = {m.dtype!r}; expected one of {DTYPES}")
  if m.get("matmul_precision", "default") not in ("default", "high", "highest"):
    raise ValueError(f"model.matmul_precision = {m.matmul_precision!r}; expected default | high | highest")
  if not 0.0 <= m.dropout < 1.0:
    raise ValueError(f"model.dropout = {m.dropout} must lie in [0, 1)")
  _positive(m.model_channels, "model.model_channels")
  _positive(m.num_blocks, "model.num_blocks")
  if e.precond not in PRECONDS:
    raise ValueError(f"edm.precond = {e.precond!r}; expected one of {PRECONDS}")
  if not 0.0 <= e.label_dropout < 1.0:
    raise ValueError(f"edm.label_dropout = {e.label_dropout} must lie in [0, 1)")
  _positive(e.sigma_data, "edm.sigma_data")
  _positive(t.batch_size, "train.batch_size")
  _positive(t.total_kimg, "train.total_kimg")
  _positive(t.lr, "train.lr")
  _positive(t.lr_rampup_kimg, "train.lr_rampup_kimg", allow_zero=True)
  _positive(t.ema_halflife_kimg, "train.ema_halflife_kimg", allow_zero=True)
  _positive(t.log_every_steps, "train.log_every_steps")
  _positive(t.checkpoint_every_steps, "train.checkpoint_every_steps")
  _positive(t.keep_checkpoints, "train.keep_checkpoints")
  _positive(t.preemption_check_every_steps, "train.preemption_check_every_steps")
  _positive(t.sample_every_steps, "train.sample_every_steps", allow_zero=True)
  _positive(s.num_steps, "sample.num_steps")
  _positive(s.num_samples, "sample.num_samples")
  _positive(s.batch_size, "sample.batch_size")
  if not 0 < s.sigma_min < s.sigma_max:
    raise ValueError(f"need 0 < sample.sigma_min < sample.sigma_max, got {s.sigma_min}, {s.sigma_max}")
  v = config.eval
  if not v.num_samples >= 2:
    raise ValueError(f"eval.num_samples = {v.num_samples!r}: FID needs at least 2 generated images "
                     f"(the paper's protocol uses 50000)")
  _positive(v.batch_size, "eval.batch_size")
  _positive(v.every_kimg, "eval.every_kimg", allow_zero=True)
  _positive(v.ref_num_images, "eval.ref_num_images", allow_zero=True)
  if v.every_kimg > 0 and not v.train_num_samples >= 2:
    raise ValueError(f"eval.train_num_samples = {v.train_num_samples!r}: in-training FID needs at least 2 "
                     f"images (or set eval.every_kimg=0)")


def _validate_schedule(config: ml_collections.ConfigDict) -> None:
  """The multigrid fields, and every schedule's sizes against the U-Net depth (``PatchSchedule``)."""
  # Imported here: config validation stays importable without JAX (patches imports jax for the crop).
  from patch_diffusion.data import patches  # pylint: disable=g-import-not-at-top
  p = config.patch
  cycle = p.get("multigrid_long_cycle", (0.25, 0.5, 1.0))
  if not isinstance(cycle, (tuple, list)) or not all(isinstance(f, (int, float)) for f in cycle):
    raise ValueError(f"patch.multigrid_long_cycle = {cycle!r} must be a tuple of spatial factors in (0, 1], "
                     f"e.g. (0.25, 0.5, 1.0)")
  fraction = p.get("multigrid_final_fraction", 0.2)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"patch.multigrid_final_fraction = {fraction!r} must lie in [0, 1) (share of the counted "
                     f"images in the final full-size phase)")
  scaling = p.get("multigrid_lr_scaling", "linear")
  if scaling not in patches.MULTIGRID_LR_SCALINGS:
    raise ValueError(f"patch.multigrid_lr_scaling = {scaling!r}; expected one of {patches.MULTIGRID_LR_SCALINGS}")
  patches.PatchSchedule.from_config(config)  # raises with the field to change


def _validate_augment(config: ml_collections.ConfigDict) -> None:
  """``data.augment_p`` / ``augment_before_crop`` against the network's augmentation-label input."""
  d, m = config.data, config.model
  aug = d.get("augment_p", 0.0)
  if aug is None or not 0.0 <= aug <= 1.0:
    raise ValueError(f"data.augment_p = {aug!r} must lie in [0, 1] (EDM's --augment probability; 0 = off)")
  if aug > 0:
    from patch_diffusion.data import augment  # pylint: disable=g-import-not-at-top
    dim = augment.edm_augment_pipe(aug).label_dim
    if m.augment_dim != dim:
      raise ValueError(f"data.augment_p = {aug} conditions the network on {dim} augmentation labels: set "
                       f"model.augment_dim = {dim} (it is {m.augment_dim}), or data.augment_p = 0")
  if m.augment_dim < 0:
    raise ValueError(f"model.augment_dim = {m.augment_dim} must be >= 0")
