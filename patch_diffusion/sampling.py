"""Sharded, batched image generation with the EDM sampler (used by --mode=sample, grids and FID).

Latents and labels are drawn inside the compiled function from ``fold_in(key, batch_index)`` and sharded
over the mesh's ``'data'`` axis; with partitionable threefry the images do not depend on the device
count. Memory is bounded by the per-call batch size, not by the number of images requested.
"""
from __future__ import annotations

import io
import math
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from patch_diffusion import fileio
from patch_diffusion import image_grid
from patch_diffusion import parallel
from patch_diffusion import progress
from patch_diffusion.data import patches as patches_lib
from patch_diffusion.edm import sampler as sampler_lib
from patch_diffusion.edm.precond import make_denoiser


def make_generate_fn(apply_fn: Callable, precond, settings: sampler_lib.SamplerSettings, *,
                     resolution: int, channels: int, num_classes: int, batch_size: int, mesh: Mesh,
                     dtype=jnp.float32, x_pos: Optional[jnp.ndarray] = None,
                     quantize: bool = True, decode: Optional[Callable] = None, class_label: int = -1,
                     keep_latents: bool = False, stage_boundaries=()) -> Callable:
  """Compiles ``fn(variables, key, batch_index) -> (images uint8 [B,R,R,C], labels int32 [B])``.

  Args:
    apply_fn: the Flax module's ``apply``.
    precond: preconditioning used in training.
    settings: sampler settings.
    resolution, channels: output image size R and channels C.
    num_classes: 0 for unconditional networks, else labels are drawn uniformly.
    batch_size: global images per call; must be divisible by the mesh's data axis.
    x_pos: coordinate grid [R', R', 2] (default: the full R×R grid); other grids give crop/extrapolation
      samples of size R'.
    quantize: return uint8 images (EDM's rounding of [-1, 1]); False returns the float32 sample (latents).
    decode: latent models: ``latents [B,R,R,C] -> images float32 [B,fR,fR,c] in [-1, 1]`` (the VAE decoder,
      scaling factor included), run inside the same executable; the output is then the decoded images.
    class_label: class-conditional networks: -1 draws labels uniformly, else every sample gets this class.
    keep_latents: with ``decode``, also return the sampled latents: ``(images, labels, latents)``.
    stage_boundaries: a multi-stage network's σ boundaries: every evaluation runs the decoder of its σ's
      stage, chosen statically per segment of sampler steps (``sampler.edm_sample``); () otherwise.
  """
  n_data = parallel.data_parallel_size(mesh)
  if batch_size % n_data:
    raise ValueError(f"sample.batch_size = {batch_size} must be divisible by the {n_data} data-parallel "
                     f"devices")
  grid = patches_lib.full_grid(resolution) if x_pos is None else x_pos
  out_hw = grid.shape[:2]
  sharded = parallel.data_sharding(mesh)

  def generate(variables, key, batch_index):
    key = jax.random.fold_in(key, batch_index)
    k_lat, k_lab, k_churn = jax.random.split(key, 3)
    latents = jax.random.normal(k_lat, (batch_size,) + tuple(out_hw) + (channels,), jnp.float32)
    latents = jax.lax.with_sharding_constraint(latents, sharded)
    labels = jax.random.randint(k_lab, (batch_size,), 0, max(num_classes, 1))
    if class_label >= 0:
      labels = jnp.full((batch_size,), class_label, labels.dtype)
    onehot = jax.nn.one_hot(labels, num_classes) if num_classes else None
    denoise_fn = make_denoiser(apply_fn, variables, precond, dtype=dtype)
    x = sampler_lib.edm_sample(denoise_fn, latents, grid, k_churn, onehot, settings,
                               stage_boundaries=tuple(stage_boundaries))
    out = x
    if decode is not None:
      out = jax.lax.with_sharding_constraint(decode(x), sharded)
    out = image_grid.to_uint8(out, jnp) if (quantize or decode is not None) else out
    if keep_latents and decode is not None:
      return out, labels.astype(jnp.int32), x
    return out, labels.astype(jnp.int32)

  n_out = 3 if (keep_latents and decode is not None) else 2
  return jax.jit(generate, out_shardings=(sharded,) * n_out)


def generate_images(generate_fn: Callable, variables, *, num_images: int, batch_size: int, seed: int,
                    log_every_s: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
  """Runs ``generate_fn`` until ``num_images`` exist; returns host arrays on every process.

  Returns:
    What ``generate_fn`` returns, concatenated over batches: images uint8 [num_images, R, R, C] (or float
    latents) and labels int32 [num_images] (and the latents when the generator keeps them).
  """
  key = jax.random.key(seed)
  num_batches = math.ceil(num_images / batch_size)
  outputs = []
  count = progress.CountProgress("sampling", num_images, every_s=log_every_s)
  for b in range(num_batches):
    outputs.append([_to_host(x) for x in generate_fn(variables, key, b)])
    count.update(min((b + 1) * batch_size, num_images))
  return tuple(np.concatenate(parts)[:num_images] for parts in zip(*outputs))


def write_samples(make_generate: Callable[[int], Callable], variables, workdir: str, *, num_images: int,
                  seed: int, batch_size: int, mesh: Mesh, with_labels: bool = False) -> str:
  """Generates ``num_images`` and writes ``<workdir>/samples.npz`` (+ ``samples.png``) on process 0.

  Args:
    make_generate: ``batch_size -> generate_fn`` (e.g. ``Experiment.generate_fn``).
    variables: the (EMA) network variables, replicated on ``mesh``.
    workdir: output folder (local or ``gs://``).
    num_images, seed: how many samples, from which seed (``fold_in(key(seed), batch)``).
    batch_size: global images per call, rounded up to the data-parallel size and capped by num_images.
    with_labels: also save the sampled class labels (``labels``).
  Returns:
    The path of ``samples.npz``.
  """
  n_data = parallel.data_parallel_size(mesh)
  batch_size = min(parallel.round_up(batch_size, n_data), parallel.round_up(num_images, n_data))
  t0 = time.time()
  outputs = generate_images(make_generate(batch_size), variables, num_images=num_images,
                            batch_size=batch_size, seed=seed)
  images, labels = outputs[:2]
  path = f"{workdir}/samples.npz"
  if jax.process_index() == 0:
    arrays = {"images": images}
    if len(outputs) == 3:  # decoded images plus the latents they came from
      arrays["latents"] = outputs[2]
    if with_labels:
      arrays["labels"] = labels
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fileio.write_bytes(path, buf.getvalue())
    image_grid.save_png(f"{workdir}/samples.png", image_grid.make_grid(images[:min(len(images), 256)], padding=1))
    logging.info("wrote %d samples to %s in %.1f s", num_images, path, time.time() - t0)
  return path


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
