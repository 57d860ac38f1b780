"""``--mode=sample``: samples from the EMA network of a checkpoint (or a converted network).

Writes ``<workdir>/samples.npz`` (uint8 NHWC ``images`` — for latent-space runs decoded by the VAE —,
float ``latents`` too with ``sample.keep_latents``, ``labels`` for class-conditional networks) and
``samples.png`` (a grid of the first 256), through ``fileio`` (local or ``gs://``).
"""
from __future__ import annotations

import jax
import ml_collections

from patch_diffusion import experiment as experiment_lib
from patch_diffusion import sampling


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Loads the latest (or ``sample.checkpoint_step``) checkpoint's EMA network, or ``sample.pretrained``,
  and writes ``sample.num_samples`` samples; returns the path of ``samples.npz``."""
  jax.config.update("jax_threefry_partitionable", True)
  scfg = config.sample
  exp, variables, _ = experiment_lib.load_ema_variables(config, workdir, step=scfg.checkpoint_step,
                                                        pretrained=scfg.pretrained)
  make = lambda batch: exp.generate_fn(batch, keep_latents=scfg.keep_latents)  # pylint: disable=unnecessary-lambda-assignment
  return sampling.write_samples(make, variables, workdir, num_images=scfg.num_samples, seed=config.seed + 1,
                                batch_size=scfg.batch_size, mesh=exp.mesh, with_labels=exp.num_classes > 0)
