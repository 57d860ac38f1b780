"""What a run is made of, shared by every mode: the :class:`Experiment` (validated config, device mesh,
dataset, network, preconditioning, noise distribution, patch schedule, optimiser) and the loaders the
modes need — the initial network of a training run, the EMA network of a checkpoint or of a converted
network, and the evaluator (FID against the training data).

``build_experiment`` validates the config first (``config_validation``), so every mode fails on a bad
value before anything is compiled or written. Design and data flow: docs/DESIGN.md.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import ml_collections
from absl import logging

from patch_diffusion import checkpointing
from patch_diffusion import models
from patch_diffusion import parallel
from patch_diffusion import sampling
from patch_diffusion import state as state_lib
from patch_diffusion.config_validation import validate_config
from patch_diffusion.data import datasets
from patch_diffusion.data import input_pipeline
from patch_diffusion.data import patches as patches_lib
from patch_diffusion.edm import loss as loss_lib
from patch_diffusion.edm import precond as precond_lib
from patch_diffusion.edm import sampler as sampler_lib
from patch_diffusion.edm import stages as stages_lib
from patch_diffusion.evaluation import evaluator as evaluator_lib
from patch_diffusion.evaluation import inception_weights
from patch_diffusion.evaluation import reference
from patch_diffusion.models import registry


@dataclasses.dataclass
class Experiment:
  """The pieces a run is built from (no state): what `train`, `sample` and `eval` share."""
  config: ml_collections.ConfigDict
  mesh: Any
  info: datasets.DatasetInfo
  model: Any                   # flax module
  precond: Any
  noise_dist: Any
  schedule: patches_lib.PatchSchedule
  tx: Any
  dtype: Any
  source: Any = None           # the opened data source (None when no data is read)
  stages: Optional[stages_lib.StageSchedule] = None  # multi-stage networks: the stage of every step

  @property
  def resolution(self) -> int:
    return self.config.data.resolution

  @property
  def channels(self) -> int:
    return self.config.data.num_channels

  @property
  def num_classes(self) -> int:
    return self.info.num_classes

  @property
  def stage_boundaries(self) -> tuple:
    """The σ boundaries between the decoders of a multi-stage network; () for a single decoder."""
    return () if self.stages is None else self.stages.boundaries

  def init_variables(self, key: jax.Array) -> dict:
    """Fresh network variables (float32), replicated on the mesh."""
    return jax.device_put(models.init_params(self.model, key), parallel.replicated(self.mesh))

  def generate_fn(self, batch_size: int, settings: Optional[sampler_lib.SamplerSettings] = None):
    """``sampling.make_generate_fn`` for this network: ``fn(variables, key, batch_index)``."""
    settings = settings or sampler_lib.SamplerSettings.from_config(self.config.sample)
    return sampling.make_generate_fn(
        self.model.apply, self.precond, settings, resolution=self.resolution, channels=self.channels,
        num_classes=self.num_classes, batch_size=batch_size, mesh=self.mesh, dtype=self.dtype,
        quantize=not self.config.patch.latent,  # latents are not images: keep them float
        stage_boundaries=self.stage_boundaries)


def build_experiment(config: ml_collections.ConfigDict, *, check_data: bool = True) -> Experiment:
  """Validates the config and builds mesh, dataset info, network and losses. Fails before compiling."""
  validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  # Process-wide, like the threefry setting: every executable of the run traces with this precision.
  precision = config.model.matmul_precision
  jax.config.update("jax_default_matmul_precision", None if precision == "default" else precision)
  mesh = parallel.create_mesh(config.mesh.shape, config.mesh.axes)
  source = None
  if check_data:
    source, info = datasets.get_data_source(config.data)
  else:
    info = datasets.DatasetInfo(name=config.data.name, num_examples=0, resolution=config.data.resolution,
                                num_channels=config.data.num_channels,
                                num_classes=config.data.num_classes if config.data.use_labels else 0,
                                description="(not loaded)")
  model = models.create_model(config.model, img_resolution=config.data.resolution,
                              img_channels=config.data.num_channels, label_dim=info.num_classes)
  schedule = patches_lib.PatchSchedule.from_config(config)
  precond = precond_lib.get_precond(config.edm.precond, config.edm.sigma_data)
  noise = loss_lib.get_noise_distribution(config.edm.precond, P_mean=config.edm.P_mean,
                                          P_std=config.edm.P_std, sigma_data=config.edm.sigma_data)
  stages = stages_lib.StageSchedule.from_config(config)
  return Experiment(config=config, mesh=mesh, info=info, model=model, precond=precond, noise_dist=noise,
                    schedule=schedule, dtype=registry.DTYPES[config.model.dtype], source=source,
                    tx=state_lib.make_optimizer(config.train, 0 if stages is None else stages.num_stages),
                    stages=stages)


# ---- networks ------------------------------------------------------------------------------------------


def initial_variables(exp: Experiment, key: jax.Array) -> dict:
  """The network a training run starts from: freshly initialised, or ``train.init_from`` (converted)."""
  variables = exp.init_variables(key)
  path = exp.config.train.init_from
  if not path:
    return variables
  loaded, _ = checkpointing.load_pretrained(path)
  want = jax.tree.map(lambda x: x.shape, variables)
  got = jax.tree.map(lambda x: x.shape, loaded)
  if want != got:
    raise checkpointing.CheckpointError(f"train.init_from={path} holds a network of another shape than "
                                        f"the configured model; use its config.json")
  logging.info("initialised from pretrained network %s", path)
  return jax.device_put(loaded, parallel.replicated(exp.mesh))


def abstract_train_state(exp: Experiment) -> Any:
  """ShapeDtypeStructs (replicated on the mesh) of the run's TrainState: a restore target, no compute."""
  shapes = jax.eval_shape(lambda: state_lib.create_train_state(
      models.init_params(exp.model, jax.random.key(0)), exp.tx))
  rep = parallel.replicated(exp.mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), shapes)


def merge_pretrained(config: ml_collections.ConfigDict,
                     pre_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The pretrained network's model/data/edm settings with this run's sampler and mesh settings."""
  merged = ml_collections.ConfigDict(config.to_dict())
  for section in ("model", "edm"):
    for k, v in pre_cfg[section].items():
      merged[section][k] = v
  for k in ("resolution", "num_channels", "use_labels", "num_classes"):
    if k in pre_cfg.data:
      merged.data[k] = pre_cfg.data[k]
  return merged


def load_ema_variables(config: ml_collections.ConfigDict, workdir: str, *, step: int = -1,
                       pretrained: str = "", need_data: bool = False) -> tuple[Experiment, dict, dict]:
  """Builds the experiment and loads the EMA network that ``--mode=sample`` and ``--mode=eval`` use.

  Args:
    config: the run's config.
    workdir: run directory holding ``checkpoints/`` (unused when ``pretrained`` is given).
    step: checkpoint step; -1 = the latest.
    pretrained: directory of a converted network (``config.json`` + ``variables``); when set, its
      model/edm/data-shape settings replace the config's and no checkpoint is read.
    need_data: open the dataset for a pretrained network too (checkpoint runs always open it).
  Returns:
    (experiment, EMA variables replicated on its mesh, source info) where the info holds ``step`` and
    ``nimg`` of the checkpoint (None for a pretrained network) and ``source`` (checkpoint or network
    directory).
  Raises:
    checkpointing.CheckpointError: no checkpoint in ``workdir`` (and no ``pretrained``), or a damaged one.
  """
  if pretrained:
    variables, pre_cfg = checkpointing.load_pretrained(pretrained)
    exp = build_experiment(merge_pretrained(config, pre_cfg), check_data=need_data)
    variables = jax.device_put(variables, parallel.replicated(exp.mesh))
    return exp, variables, {"step": None, "nimg": None, "source": os.path.abspath(pretrained)}
  exp = build_experiment(config, check_data=True)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  if ckpt.latest_step() is None:
    raise checkpointing.CheckpointError(
        f"no checkpoint in {ckpt.directory}; train first (--mode=train) or pass "
        f"--config.sample.pretrained=DIR of a converted network")
  state, meta = ckpt.restore(abstract_train_state(exp), None if step < 0 else step)
  ckpt.close()
  logging.info("loaded the EMA network of checkpoint %d (%.1f kimg)", meta["step"], meta["nimg"] / 1000)
  return exp, state.variables(ema=True), {"step": int(meta["step"]), "nimg": float(meta["nimg"]),
                                          "source": ckpt.directory}


# ---- evaluation ----------------------------------------------------------------------------------------


def check_evaluable(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for runs whose samples are not images (latent-space models)."""
  if config.patch.latent:
    raise ValueError(
        "FID/KID/precision-recall need pixel images, but patch.latent=True makes the network generate "
        "VAE latents and this codebase has no VAE decoder wired to sampling yet; write latents with "
        "--mode=sample and decode them outside, or set eval.every_kimg=0 for this run")


def reference_data(exp: Experiment) -> evaluator_lib.ReferenceData:
  """The training data as FID reference: the whole split (``data.max_examples`` ignored, so runs on
  data subsets are compared with the full distribution) or its first ``eval.ref_num_images`` images, at
  ``data.resolution`` and ``data.num_channels``, cached in ``datasets.derived_data_dir``."""
  data_config = exp.config.data
  data = (exp.source, exp.info) if exp.source is not None else None
  if data_config.max_examples > 0 or data is None:
    data_config = ml_collections.ConfigDict(data_config.to_dict())
    data_config.max_examples = 0
    data = datasets.get_data_source(data_config)
  n = exp.config.eval.ref_num_images
  num_images = n if n > 0 else None
  dataset = datasets.dataset_id(data_config)
  local_batch = max(1, exp.config.eval.batch_size // jax.process_count())
  path = reference.reference_stats_path(datasets.derived_data_dir(data_config), dataset=dataset,
                                        resolution=data_config.resolution, split=data_config.split,
                                        num_images=num_images)
  iterator = lambda: input_pipeline.create_eval_iterator(data_config, batch_size=local_batch, data=data)  # pylint: disable=unnecessary-lambda-assignment
  return evaluator_lib.ReferenceData(path=path, dataset=dataset, split=data_config.split,
                                     resolution=data_config.resolution, num_images=num_images,
                                     batches=iterator, num_batches=len(iterator()))


def make_evaluator(exp: Experiment) -> evaluator_lib.Evaluator:
  """The FID/KID/precision-recall evaluator of ``exp`` (``config.eval`` settings).

  Raises:
    inception_weights.InceptionWeightsNotFoundError: the Inception weights are missing.
    ValueError: a latent-space run (its samples are not images).
  """
  check_evaluable(exp.config)
  v = exp.config.eval
  return evaluator_lib.Evaluator(mesh=exp.mesh, make_generate=exp.generate_fn, reference=reference_data(exp),
                                 inception_path=inception_weights.resolve_path(v.inception_path),
                                 batch_size=v.batch_size, kid=v.kid, precision_recall=v.precision_recall)
