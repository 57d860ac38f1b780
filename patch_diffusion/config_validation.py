"""One validation pass over a config, before anything is built: every mode (train, sample, eval) calls
:func:`validate_config` first (through ``experiment.build_experiment``).

Unknown keys and wrong Python types are rejected earlier by ``ml_collections`` (configs are locked and
typed). Here every value is checked against what the code accepts; the lists of valid names come from the
registries that use them (networks, preconditionings, solvers, schedules, dtypes), so a new entry there is
accepted here without an edit. Every problem raises :class:`ConfigError` naming the field, its value and
the fix. Checks that need I/O (does the dataset exist, is the workdir writable) happen where the I/O is.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from patch_diffusion.data import augment as augment_lib
from patch_diffusion.data import patches
from patch_diffusion.edm import precond as precond_lib
from patch_diffusion.edm import sampler as sampler_lib
from patch_diffusion.models import registry
from patch_diffusion.models.multistage_unet import check_stage_boundaries

MATMUL_PRECISIONS = ("default", "high", "highest")
LATENT_SOURCES = ("precomputed", "on_the_fly")


class ConfigError(ValueError):
  """A config value the code cannot use; the message names the field and the fix."""

  def __init__(self, field: str, value: Any, problem: str):
    self.field, self.value = field, value
    super().__init__(f"{field} = {value!r}: {problem}")


def _get(config, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _number(config, field: str, *, low: float = 0.0, allow_low: bool = False, high: Optional[float] = None,
            allow_high: bool = False, integer: bool = False) -> None:
  """Checks ``low < value`` (``<=`` if ``allow_low``) and ``value < high`` (``<=`` if ``allow_high``).

  Comparisons are written so that NaN (for which every comparison is False) is rejected too.
  """
  value = _get(config, field)
  if integer and not _is_int(value):
    raise ConfigError(field, value, "must be an integer")
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(field, value, "must be a number")
  ok = (value >= low) if allow_low else (value > low)
  if high is not None:
    ok = ok and ((value <= high) if allow_high else (value < high))
  if not ok:
    lo = f"{'>=' if allow_low else '>'} {low:g}"
    hi = ("" if high is None else " and finite" if high == math.inf else
          f" and {'<=' if allow_high else '<'} {high:g}")
    raise ConfigError(field, value, f"must be {lo}{hi}")


def _choice(config, field: str, choices) -> None:
  value = _get(config, field)
  if value not in tuple(choices):
    raise ConfigError(field, value, f"expected one of {tuple(sorted(choices))}")


def validate_data(data, latent: bool = False) -> None:
  """The ``config.data`` checks (also what ``datasets.get_data_source`` runs on a plain dict). ``latent``:
  resolution and channels are the latent ones (any channel count the VAE gives)."""
  wrap = {"data": data}
  name = data["name"]
  if not isinstance(name, str) or not name.strip():
    raise ConfigError("data.name", name, "must be a non-empty string: 'digits', 'folder' or a TFDS name")
  _number(wrap, "data.resolution", integer=True)
  if latent:
    _number(wrap, "data.num_channels", integer=True)
  elif data["num_channels"] not in (1, 3) or isinstance(data["num_channels"], bool):
    raise ConfigError("data.num_channels", data["num_channels"], "must be 1 or 3 (image channels; latent runs "
                      "with patch.latent=True use the VAE's latent channels)")
  for field in ("max_examples", "num_workers", "prefetch"):
    _number(wrap, f"data.{field}", allow_low=True, integer=True)
  split = data["split"]
  if not isinstance(split, str) or not split:
    raise ConfigError("data.split", split, "must be a non-empty string such as 'train'")
  for field in ("xflip", "use_labels"):
    if not isinstance(data[field], bool):
      raise ConfigError(f"data.{field}", data[field], "must be True or False")


def _validate_model(config) -> None:
  m = config.model
  _choice(config, "model.arch", registry.archs())
  _choice(config, "model.dtype", registry.COMPUTE_DTYPES)
  _choice(config, "model.matmul_precision", MATMUL_PRECISIONS)
  _number(config, "model.dropout", allow_low=True, high=1.0)
  _number(config, "model.model_channels", integer=True)
  _number(config, "model.num_blocks", integer=True)
  try:
    registry.resolve_model_kwargs(m)
  except ValueError as e:
    raise ConfigError("model", m.arch, str(e)) from e
  p, d = config.patch, config.data
  levels = len(registry.resolve_model_kwargs(m)[1]["channel_mult"])
  if p.schedule != "multigrid":  # multigrid picks its own sizes among those that fit (checked below)
    divisor = 2 if p.latent else 4
    if d.resolution % divisor:
      raise ConfigError("data.resolution", d.resolution, f"the patch sizes R/{divisor} and R/2 must divide R "
                        f"exactly; use a resolution divisible by {divisor}")
    smallest = d.resolution // divisor if p.schedule != "full" else d.resolution
    if smallest % (2 ** (levels - 1)):
      raise ConfigError("model.channel_mult", tuple(m.channel_mult),
                        f"the smallest patch ({smallest} px) must be divisible by 2^(levels-1) = "
                        f"{2 ** (levels - 1)} for the U-Net's downsampling; use fewer levels or a larger R")
  _number(config, "model.augment_dim", allow_low=True, integer=True)


def _validate_multistage(config) -> None:
  """``ddpmpp-multistage``: decoder widths, stage boundaries, and EDM's loss (the stage draw and the
  truncated σ distribution are defined for EDM's log-normal only, as in the authors' code)."""
  class_name, kwargs = registry.resolve_model_kwargs(config.model)
  if class_name != "MultistageUNet":
    return
  widths = kwargs["decoder_channels"]
  if any(w <= 0 for w in widths):
    raise ConfigError("model.decoder_channels", tuple(config.model.decoder_channels),
                      "every decoder base width must be a positive integer, e.g. (192, 128, 16)")
  try:
    check_stage_boundaries(kwargs["stage_boundaries"], len(widths))
  except ValueError as e:
    raise ConfigError("model.stage_boundaries", tuple(config.model.stage_boundaries), str(e)) from e
  if config.edm.precond != "edm":
    raise ConfigError("edm.precond", config.edm.precond, "multi-stage training draws each step's stage and "
                      "its σ from EDM's log-normal (the authors' EDMMultistageLoss): use edm.precond='edm'")


def _validate_latent(config) -> None:
  """Latent-space runs need a VAE and a way to get latents."""
  d, m = config.data, config.model
  _choice(config, "data.latents", LATENT_SOURCES)
  _choice(config, "model.vae_dtype", registry.COMPUTE_DTYPES)
  if config.patch.latent and not m.vae:
    raise ConfigError("model.vae", m.vae, "patch.latent=True trains on VAE latents: set model.vae to a "
                      "diffusers VAE directory (e.g. a download of stabilityai/sd-vae-ft-ema), a "
                      ".safetensors file, or builtin:digits")
  if not config.patch.latent and m.vae:
    raise ConfigError("model.vae", m.vae, "a VAE is only used with patch.latent=True; clear model.vae or set "
                      "patch.latent=True (and data.resolution/num_channels to the latent size)")
  if not isinstance(d.prepare_latents, bool):
    raise ConfigError("data.prepare_latents", d.prepare_latents, "must be True or False")


def _validate_schedule(config) -> None:
  """The multigrid fields, and every schedule's sizes against the U-Net depth (``PatchSchedule``)."""
  p = config.patch
  cycle = p.multigrid_long_cycle
  if not isinstance(cycle, (tuple, list)) or not cycle or not all(
      isinstance(f, (int, float)) and 0 < f <= 1 for f in cycle):
    raise ConfigError("patch.multigrid_long_cycle", cycle, "must be a tuple of spatial factors in (0, 1], "
                      "e.g. (0.25, 0.5, 1.0)")
  _number(config, "patch.multigrid_final_fraction", allow_low=True, high=1.0)
  _choice(config, "patch.multigrid_lr_scaling", patches.MULTIGRID_LR_SCALINGS)
  try:
    patches.PatchSchedule.from_config(config)
  except ValueError as e:
    raise ConfigError("patch.schedule", p.schedule, str(e)) from e


def _validate_augment(config) -> None:
  """``data.augment_p`` / ``augment_before_crop`` against the network's augmentation-label input."""
  d, m = config.data, config.model
  _number(config, "data.augment_p", allow_low=True, high=1.0, allow_high=True)
  if not isinstance(d.augment_before_crop, bool):
    raise ConfigError("data.augment_before_crop", d.augment_before_crop, "must be True or False")
  if d.augment_p > 0:
    dim = augment_lib.edm_augment_pipe(d.augment_p).label_dim
    if m.augment_dim != dim:
      raise ConfigError("model.augment_dim", m.augment_dim, f"data.augment_p = {d.augment_p} conditions the "
                        f"network on {dim} augmentation labels: set model.augment_dim = {dim}, or "
                        f"data.augment_p = 0")


def data_axis_size(mesh_shape, mesh_axes, num_devices: int) -> int:
  """Devices on the ``'data'`` axis of a mesh of this shape over ``num_devices`` devices."""
  shape = list(mesh_shape)
  if -1 in shape:
    shape[shape.index(-1)] = num_devices // max(1, math.prod(s for s in shape if s != -1))
  return int(shape[list(mesh_axes).index("data")])


def _validate_train(config, num_data_devices: Optional[int], num_processes: Optional[int]) -> None:
  t = config.train
  for field in ("batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                "preemption_check_every_steps", "grid_size"):
    _number(config, f"train.{field}", integer=True)
  for field in ("sample_every_steps", "final_num_samples"):
    _number(config, f"train.{field}", allow_low=True, integer=True)
  for field in ("total_kimg", "lr"):
    _number(config, f"train.{field}", high=math.inf)
  for field in ("lr_rampup_kimg", "ema_halflife_kimg"):
    _number(config, f"train.{field}", allow_low=True, high=math.inf)
  if t.ema_rampup_ratio is not None:
    _number(config, "train.ema_rampup_ratio", allow_low=True, high=math.inf)
  _number(config, "train.adam_b1", allow_low=True, high=1.0)
  _number(config, "train.adam_b2", allow_low=True, high=1.0)
  _number(config, "train.adam_eps", high=math.inf)
  _number(config, "train.grad_accum_steps", integer=True)
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError("train.grad_accum_steps", t.grad_accum_steps,
                      f"must divide train.batch_size = {t.batch_size} (every step's batch, batch_size x the "
                      f"patch size's multiplier, is split into equal micro-batches); pick a divisor of "
                      f"{t.batch_size}")
  for count, what in ((num_data_devices, "data-parallel devices"), (num_processes, "processes")):
    if count and t.batch_size % count:
      raise ConfigError("train.batch_size", t.batch_size, f"is not divisible by the {count} {what}; use a "
                        f"multiple of {count}")


def _validate_sampling(config) -> None:
  s = config.sample
  _choice(config, "sample.solver", sampler_lib.SOLVERS)
  for field in ("num_steps", "num_samples", "batch_size"):
    _number(config, f"sample.{field}", integer=True)
  if not 0 < s.sigma_min < s.sigma_max:
    raise ConfigError("sample.sigma_min", s.sigma_min, f"need 0 < sample.sigma_min < sample.sigma_max = "
                      f"{s.sigma_max}")
  _number(config, "sample.rho", high=math.inf)
  _number(config, "sample.S_churn", allow_low=True, high=math.inf)
  _number(config, "sample.S_noise", allow_low=True, high=math.inf)
  _number(config, "sample.guidance", allow_low=True, high=math.inf)
  if not (_is_int(s.class_label) and s.class_label >= -1):
    raise ConfigError("sample.class_label", s.class_label, "must be -1 (classes drawn uniformly) or a class "
                      "index >= 0")
  v = config.eval
  if not (_is_int(v.num_samples) and v.num_samples >= 2):
    raise ConfigError("eval.num_samples", v.num_samples, "FID needs at least 2 generated images (the "
                      "paper's protocol uses 50000)")
  _number(config, "eval.batch_size", integer=True)
  _number(config, "eval.every_kimg", allow_low=True, high=math.inf)
  _number(config, "eval.ref_num_images", allow_low=True, integer=True)
  if v.every_kimg > 0 and not (_is_int(v.train_num_samples) and v.train_num_samples >= 2):
    raise ConfigError("eval.train_num_samples", v.train_num_samples, "in-training FID needs at least 2 "
                      "images (or set eval.every_kimg=0)")


def _validate_mesh(config, num_devices: Optional[int]) -> None:
  shape, axes = tuple(config.mesh.shape), tuple(config.mesh.axes)
  if len(shape) != len(axes):
    raise ConfigError("mesh.shape", shape, f"needs one size per axis of mesh.axes {axes}")
  if "data" not in axes:
    raise ConfigError("mesh.axes", axes, "must contain the data-parallel axis 'data'")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ConfigError("mesh.shape", shape, "sizes must be positive, with at most one -1 (= the rest)")
  if num_devices:
    known = math.prod(s for s in shape if s != -1)
    fits = num_devices % known == 0 if -1 in shape else known == num_devices
    if not fits:
      raise ConfigError("mesh.shape", shape, f"needs {known} devices{' (times the -1 axis)' if -1 in shape else ''}"
                        f", but {num_devices} are available; set mesh.shape=(-1,) to use all")


def validate_config(config, *, num_devices: Optional[int] = None, num_processes: Optional[int] = None) -> None:
  """Raises :class:`ConfigError` (a ValueError) naming the first invalid field and the fix.

  Args:
    config: the full run config (``configs/default.py`` layout).
    num_devices, num_processes: when given, the mesh and the batch size are checked against them
      (devices in all, JAX processes).
  """
  if not (_is_int(config.seed) and config.seed >= 0):
    raise ConfigError("seed", config.seed, "must be a non-negative integer (the run is a pure function of it)")
  validate_data(config.data, latent=config.patch.latent)
  _choice(config, "patch.schedule", patches.SCHEDULES)
  _number(config, "patch.real_p", allow_low=True, high=1.0, allow_high=True)
  _validate_model(config)
  _validate_multistage(config)
  _validate_latent(config)
  _validate_schedule(config)
  _validate_augment(config)
  _choice(config, "edm.precond", precond_lib.PRECONDS)
  _number(config, "edm.label_dropout", allow_low=True, high=1.0)
  _number(config, "edm.sigma_data", high=math.inf)
  _number(config, "edm.P_std", high=math.inf)
  _validate_mesh(config, num_devices)
  n_data = data_axis_size(config.mesh.shape, config.mesh.axes, num_devices) if num_devices else None
  _validate_train(config, n_data, num_processes)
  _validate_sampling(config)
