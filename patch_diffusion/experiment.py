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
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from patch_diffusion import checkpointing
from patch_diffusion import models
from patch_diffusion import parallel
from patch_diffusion import sampling
from patch_diffusion import state as state_lib
from patch_diffusion import vae_training
from patch_diffusion.config_validation import ConfigError, validate_config
from patch_diffusion.data import datasets
from patch_diffusion.data import input_pipeline
from patch_diffusion.data import latents as latents_lib
from patch_diffusion.data import patches as patches_lib
from patch_diffusion.edm import loss as loss_lib
from patch_diffusion.edm import precond as precond_lib
from patch_diffusion.edm import sampler as sampler_lib
from patch_diffusion.edm import stages as stages_lib
from patch_diffusion.evaluation import evaluator as evaluator_lib
from patch_diffusion.evaluation import inception_weights
from patch_diffusion.evaluation import reference
from patch_diffusion.interop import diffusers_vae
from patch_diffusion.models import registry
from patch_diffusion.models import vae as vae_lib


@dataclasses.dataclass(frozen=True)
class LatentCodec:
  """The VAE of a latent-space run (``patch.latent``): latents = scaling_factor · posterior sample.

  Attributes:
    module, variables: the ``models.vae.AutoencoderKL`` and its parameters (replicated on the mesh).
    fingerprint: short hash of the VAE (latent datasets record which VAE made them).
    path: where it was loaded from.
  """
  module: Any
  variables: Any
  fingerprint: str
  path: str

  @property
  def scaling_factor(self) -> float:
    return float(self.module.config.scaling_factor)

  @property
  def factor(self) -> int:
    """Spatial downsampling factor image -> latent (8 for the SD VAE)."""
    return self.module.config.downsample_factor

  def decode(self, z: jax.Array) -> jax.Array:
    """Scaled latents [N, R, R, C] -> images float32 [N, fR, fR, c] (nominally [-1, 1]); jittable."""
    return vae_lib.decode_latents(self.module, self.variables, z / self.scaling_factor)


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
  codec: Optional[LatentCodec] = None      # latent runs: the VAE
  batch_transform: Optional[Callable] = None  # latents.on_the_fly: pixel batch -> posterior moments
  # generate_fn's jitted functions by (batch, settings, keep_latents): the training grids and the final
  # samples of one run share an executable instead of compiling the same sampler twice.
  _generate_fns: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

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

  def generate_fn(self, batch_size: int, settings: Optional[sampler_lib.SamplerSettings] = None,
                  keep_latents: bool = False):
    """``sampling.make_generate_fn`` for this network: ``fn(variables, key, batch_index)`` -> uint8 images
    (latent runs: decoded by the VAE in the same executable; ``keep_latents`` also returns the latents).
    The same arguments return the same function (one compile per run)."""
    settings = settings or sampler_lib.SamplerSettings.from_config(self.config.sample)
    key = (batch_size, settings, keep_latents)
    if key not in self._generate_fns:
      self._generate_fns[key] = self._make_generate_fn(batch_size, settings, keep_latents)
    return self._generate_fns[key]

  def _make_generate_fn(self, batch_size: int, settings: sampler_lib.SamplerSettings, keep_latents: bool):
    return sampling.make_generate_fn(
        self.model.apply, self.precond, settings, resolution=self.resolution, channels=self.channels,
        num_classes=self.num_classes, batch_size=batch_size, mesh=self.mesh, dtype=self.dtype,
        quantize=not self.config.patch.latent,  # latents are not images: keep them float
        stage_boundaries=self.stage_boundaries,
        decode=self.codec.decode if self.codec else None, class_label=self.config.sample.class_label,
        keep_latents=keep_latents)

  def batch_spec(self, n: int) -> dict:
    """ShapeDtypeStructs (sharded over 'data') of a global training batch of ``n`` examples, as the step
    sees it: uint8 images, or latent posterior moments (float16 stored, float32 encoded on the fly)."""
    data = parallel.data_sharding(self.mesh)
    r, c = self.resolution, self.channels
    if self.codec is None:
      fields = {"image": jax.ShapeDtypeStruct((n, r, r, c), jnp.uint8, sharding=data)}
    else:
      dtype = jnp.float32 if self.batch_transform is not None else jnp.float16
      fields = {k: jax.ShapeDtypeStruct((n, r, r, c), dtype, sharding=data) for k in ("mean", "std")}
    return dict(fields, label=jax.ShapeDtypeStruct((n,), jnp.int32, sharding=data))

  def device_batch(self, local: dict) -> dict:
    """This host's batch (host arrays) -> the global batch the step takes (``batch_spec``)."""
    batch = parallel.global_batch({k: (v.astype(np.int32) if k == "label" else v)
                                   for k, v in local.items() if k != "index"}, self.mesh)
    return self.batch_transform(batch) if self.batch_transform is not None else batch


def build_experiment(config: ml_collections.ConfigDict, *, check_data: bool = True) -> Experiment:
  """Validates the config and builds mesh, dataset info, network and losses. Fails before compiling."""
  validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  # Process-wide, like the threefry setting: every executable of the run traces with this precision.
  precision = config.model.matmul_precision
  jax.config.update("jax_default_matmul_precision", None if precision == "default" else precision)
  mesh = parallel.create_mesh(config.mesh.shape, config.mesh.axes)
  codec = load_codec(config, mesh) if config.patch.latent else None
  source, transform = None, None
  if check_data and codec is not None:
    source, info, transform = latent_data(config, codec, mesh)
  elif check_data:
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
                    stages=stages, codec=codec, batch_transform=transform)


# ---- latent space --------------------------------------------------------------------------------------


def load_codec(config: ml_collections.ConfigDict, mesh) -> LatentCodec:
  """Loads ``model.vae`` (``builtin:<name>`` is trained on first use) and checks it fits the config.

  Raises:
    ConfigError: the VAE's latent channels differ from ``data.num_channels``.
    FileNotFoundError / VAEWeightsError: missing or unreadable VAE files.
  """
  path = vae_training.resolve(config.model.vae)
  if not path.startswith(vae_training.PREFIX) and not os.path.exists(os.path.expanduser(path)):
    raise FileNotFoundError(f"model.vae = {config.model.vae!r}: no such file or directory. Download the VAE "
                            f"(e.g. huggingface.co/stabilityai/sd-vae-ft-ema: config.json and "
                            f"diffusion_pytorch_model.safetensors) and point model.vae at its folder")
  module, variables = diffusers_vae.load_vae(os.path.expanduser(path),
                                             dtype=registry.DTYPES[config.model.vae_dtype])
  vc = module.config
  if vc.latent_channels != config.data.num_channels:
    raise ConfigError("data.num_channels", config.data.num_channels,
                      f"the VAE {path} has {vc.latent_channels} latent channels; latent runs set "
                      f"data.num_channels = {vc.latent_channels} (and data.resolution to the latent size)")
  fingerprint = latents_lib.vae_fingerprint(vc, variables)
  logging.info("VAE %s: %s, %dx downsampling, %d latent channels, scaling factor %.5f", path,
               vc.block_out_channels, vc.downsample_factor, vc.latent_channels, vc.scaling_factor)
  return LatentCodec(module=module, variables=jax.device_put(variables, parallel.replicated(mesh)),
                     fingerprint=fingerprint, path=path)


def pixel_data_config(config: ml_collections.ConfigDict, codec: LatentCodec) -> ml_collections.ConfigDict:
  """``config.data`` for the images behind a latent run: resolution R·f, the VAE's image channels."""
  d = ml_collections.ConfigDict(config.data.to_dict())
  d.resolution = config.data.resolution * codec.factor
  d.num_channels = codec.module.config.in_channels
  return d


def encode_spec(config: ml_collections.ConfigDict, codec: LatentCodec) -> latents_lib.EncodeSpec:
  return latents_lib.EncodeSpec(
      pixel_data_config=pixel_data_config(config, codec), vae_module=codec.module, vae_variables=codec.variables,
      fingerprint=codec.fingerprint, scaling_factor=codec.scaling_factor, xflip=config.data.xflip,
      batch_size=config.eval.batch_size)


def latent_dir(config: ml_collections.ConfigDict, codec: LatentCodec) -> str:
  """Where the run's precomputed latents live (``data.latent_dir`` or the derived default)."""
  return os.path.expanduser(config.data.latent_dir) or latents_lib.default_dir(
      pixel_data_config(config, codec), codec.fingerprint, config.data.xflip)


def latent_data(config: ml_collections.ConfigDict, codec: LatentCodec, mesh):
  """(source, info, batch transform) of a latent run: precomputed posterior moments (encoded now when
  missing and ``data.prepare_latents``), or pixel images encoded every step (``on_the_fly``)."""
  pixels = pixel_data_config(config, codec)
  if config.data.latents == "on_the_fly":
    source, info = datasets.get_data_source(pixels)
    encode = latents_lib.make_encode_fn(encode_spec(config, codec), mesh, dtype=jnp.float32)
    transform = lambda b: dict(zip(("mean", "std"), encode(b["image"])), label=b["label"])  # pylint: disable=unnecessary-lambda-assignment
    return source, info, transform
  folder = latent_dir(config, codec)
  if config.data.prepare_latents and not os.path.exists(os.path.join(folder, latents_lib.METADATA)):
    logging.info("encoding the dataset's latents once into %s (data.prepare_latents)", folder)
    latents_lib.encode_dataset(encode_spec(config, codec), folder, mesh)
  shape = (config.data.resolution, config.data.resolution, config.data.num_channels)
  source, info = latents_lib.open_latent_source(
      folder, fingerprint=codec.fingerprint, shape=shape, use_labels=config.data.use_labels,
      encode_command=ENCODE_COMMAND)
  return source, info, None


#: How to make a run's latent dataset (quoted in errors).
ENCODE_COMMAND = "python -m patch_diffusion.tools.encode_latents --config=<your config> [--set key=value ...]"


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
  """The pretrained network's model/data/edm settings with this run's sampler and mesh settings (and its
  VAE: a converted latent network records that it is latent, the run says which VAE decodes it)."""
  merged = ml_collections.ConfigDict(config.to_dict())
  for section in ("model", "edm"):
    for k, v in pre_cfg[section].items():
      if k not in ("vae", "vae_dtype"):
        merged[section][k] = v
  if "patch" in pre_cfg and pre_cfg.patch.get("latent"):
    merged.patch.latent = True
  for k in ("resolution", "num_channels", "use_labels", "num_classes"):
    if k in pre_cfg.data:
      merged.data[k] = pre_cfg.data[k]
  return merged


def checkpoint_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``train.checkpoint_dir`` or ``<workdir>/checkpoints`` (local or ``gs://``)."""
  return config.train.checkpoint_dir or f"{str(workdir).rstrip('/')}/checkpoints"


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
    merged = merge_pretrained(config, pre_cfg)
    # Latent runs read the images for FID (reference_data), never their latents, here.
    exp = build_experiment(merged, check_data=need_data and not merged.patch.latent)
    variables = jax.device_put(variables, parallel.replicated(exp.mesh))
    return exp, variables, {"step": None, "nimg": None, "source": os.path.abspath(pretrained)}
  exp = build_experiment(config, check_data=not config.patch.latent)
  ckpt = checkpointing.Checkpointer(checkpoint_dir(config, workdir))
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


def reference_data(exp: Experiment) -> evaluator_lib.ReferenceData:
  """The training data as FID reference: the whole split (``data.max_examples`` ignored, so runs on
  data subsets are compared with the full distribution) or its first ``eval.ref_num_images`` images, at
  ``data.resolution`` and ``data.num_channels``, cached in ``datasets.derived_data_dir``."""
  data_config = exp.config.data
  data = (exp.source, exp.info) if exp.source is not None else None
  if exp.codec is not None:  # latent runs are compared with the images (decoded samples vs real images)
    data_config, data = pixel_data_config(exp.config, exp.codec), None
  elif data_config.max_examples > 0 and data is not None:
    data = None
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
  """
  v = exp.config.eval
  return evaluator_lib.Evaluator(mesh=exp.mesh, make_generate=exp.generate_fn, reference=reference_data(exp),
                                 inception_path=inception_weights.resolve_path(v.inception_path),
                                 batch_size=v.batch_size, kid=v.kid, precision_recall=v.precision_recall)
