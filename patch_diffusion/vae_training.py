"""A small KL-regularised autoencoder trained by the project itself: the latent demo's VAE.

The paper's latent runs use Stable Diffusion's VAE (``stabilityai/sd-vae-ft-ema``, 84 M parameters, 8×
downsampling). For a latent demo that runs on a laptop — and for a test of encode → train → sample →
decode on every CI run — the project trains a tiny ``AutoencoderKL`` of the same architecture family on
the embedded digits (about a minute on 2 CPU cores) and saves it as a diffusers model directory, so the
latent path reads it exactly like the SD VAE (``interop.diffusers_vae.load_vae``).

``builtin_vae("digits")`` returns the directory, training it on first use into the user cache
(``<cache>/vae/digits-v1``); it is deterministic (fixed seed and data order), so every machine trains the
same weights. The loss is the VAE objective with a small KL weight (as SD's autoencoders: reconstruction
dominates, the KL keeps the posterior a well-scaled Gaussian): ``mean |x - D(z)|² + β KL(q(z|x) || N(0, I))``
with ``z`` sampled from the posterior. After training, ``scaling_factor = 1 / std(latent means)`` (how SD's
0.18215 was chosen), so the diffusion model sees unit-variance latents.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from patch_diffusion import progress
from patch_diffusion import user_cache
from patch_diffusion.data import datasets
from patch_diffusion.interop import diffusers_vae
from patch_diffusion.models import vae as vae_lib

#: Built-in VAEs: name -> (data config overrides, VAE architecture, training settings). Bump the version
#: in the cache folder name when any of it changes. digits: 16×16×1 -> 8×8×4, 0.1 M parameters, ~65 ms
#: per step on a 2-core CPU (about a minute in all).
BUILTIN = {
    "digits": (dict(name="digits", resolution=16, num_channels=1),
               vae_lib.VAEConfig(in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 layers_per_block=1, latent_channels=4, norm_num_groups=8, scaling_factor=1.0),
               dict(steps=1000, batch_size=32)),
}
BUILTIN_VERSION = "v1"
PREFIX = "builtin:"


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  steps: int = 1500
  batch_size: int = 64
  lr: float = 1e-3
  kl_weight: float = 1e-3
  seed: int = 0


def train_vae(images: np.ndarray, config: vae_lib.VAEConfig, settings: TrainSettings = TrainSettings()):
  """Trains an ``AutoencoderKL`` on uint8 NHWC ``images``; returns (config with scaling factor, variables)."""
  module = vae_lib.AutoencoderKL(config)
  key = jax.random.key(settings.seed)
  params = vae_lib.init_vae_params(module, jax.random.fold_in(key, 0))
  tx = optax.adam(optax.cosine_decay_schedule(settings.lr, settings.steps))
  opt_state = tx.init(params)
  data = jnp.asarray(images, jnp.float32) / 127.5 - 1.0

  def loss_fn(p, x, k):
    mean, logvar = module.apply(p, x, method=vae_lib.AutoencoderKL.encode)
    z = vae_lib.posterior_sample(mean, logvar, jax.random.normal(k, mean.shape))
    recon = module.apply(p, z, method=vae_lib.AutoencoderKL.decode)
    kl = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1 - logvar, axis=(1, 2, 3)))
    return jnp.mean((recon - x)**2) + settings.kl_weight * kl / x[0].size

  @jax.jit
  def step(p, o, i):
    k = jax.random.fold_in(key, i)
    idx = jax.random.choice(jax.random.fold_in(k, 1), data.shape[0], (settings.batch_size,), replace=False)
    loss, g = jax.value_and_grad(loss_fn)(p, data[idx], k)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  count = progress.CountProgress("train VAE", settings.steps, unit="steps", every_s=15.0)
  loss = None
  for i in range(settings.steps):
    params, opt_state, loss = step(params, opt_state, i)
    count.update(i + 1)
  logging.info("VAE trained: final loss %.5f", float(loss))
  means = jax.jit(lambda p, x: module.apply(p, x, method=vae_lib.AutoencoderKL.encode)[0])(params, data)
  scale = float(1.0 / np.std(np.asarray(means)))
  return dataclasses.replace(config, scaling_factor=scale), jax.device_get(params)


def builtin_vae(name: str) -> pathlib.Path:
  """The diffusers directory of built-in VAE ``name`` (``builtin:digits``), trained on first use."""
  if name not in BUILTIN:
    raise ValueError(f"model.vae = '{PREFIX}{name}': no such built-in VAE; built in: "
                     f"{', '.join(PREFIX + n for n in BUILTIN)} (or give a diffusers VAE directory)")
  folder = user_cache.cache_dir() / "vae" / f"{name}-{BUILTIN_VERSION}"
  if (folder / diffusers_vae.WEIGHTS_NAME).is_file():
    return folder
  data_overrides, config, settings = BUILTIN[name]
  data_config = ml_collections.ConfigDict(dict(split="train", data_dir="", folder="", max_examples=0,
                                               num_workers=0, prefetch=2, xflip=False, use_labels=False,
                                               num_classes=0, **data_overrides))
  source, info = datasets.get_data_source(data_config)
  images = np.stack([source[i]["image"] for i in range(len(source))])
  logging.info("training the built-in VAE %r on %d images (%s), once; cached in %s", name, len(images),
               info.description, folder)
  t0 = time.time()
  trained, variables = train_vae(images, config, TrainSettings(**settings))
  diffusers_vae.save_vae(folder, trained, variables)
  logging.info("built-in VAE %r: scaling factor %.4f, %.0f s", name, trained.scaling_factor, time.time() - t0)
  return folder


def resolve(path: str) -> str:
  """``model.vae`` -> a path ``diffusers_vae.load_vae`` reads (``builtin:<name>`` trained on first use)."""
  return str(builtin_vae(path[len(PREFIX):])) if path.startswith(PREFIX) else path
