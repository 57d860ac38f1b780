"""The EDM Heun sampler with the fixture networks reproduces the official `edm_sampler` output."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from patch_diffusion import models
from patch_diffusion.edm import precond as precond_lib
from patch_diffusion.edm import sampler as sampler_lib
from patch_diffusion.interop import torch_mapping

FIXTURES = ("ddpmpp_uncond", "ddpmpp_cond", "ncsnpp_uncond", "adm_cond")


def load_fixture_network(directory, name):
  """Builds the Flax network described by ``<name>.json`` and loads ``<name>.npz``'s parameters."""
  meta = json.loads((directory / f"{name}.json").read_text())
  ref = np.load(directory / f"{name}.npz")
  arch = "adm" if meta["model_type"] == "DhariwalUNet" else "ddpmpp"
  model_cfg = ml_collections.ConfigDict(dict(arch=arch, arch_presets=False, **meta["model_kwargs"]))
  model = models.create_model(model_cfg, img_resolution=meta["img_resolution"],
                              img_channels=meta["img_channels"], label_dim=meta["label_dim"])
  state_dict = {k[len("param/"):]: ref[k] for k in ref.files if k.startswith("param/")}
  variables = torch_mapping.torch_state_dict_to_variables(state_dict, model)
  return meta, ref, model, variables


@pytest.mark.parametrize("name", FIXTURES)
def test_heun_sampler_matches_official(fixtures_dir, name):
  meta, ref, model, variables = load_fixture_network(fixtures_dir / "edm_torch", name)
  s = meta["sampler"]
  settings = sampler_lib.SamplerSettings(num_steps=s["num_steps"], sigma_min=s["sigma_min"],
                                         sigma_max=s["sigma_max"], rho=s["rho"], S_churn=s["S_churn"])
  latents = jnp.asarray(ref["sampler/latents"].transpose(0, 2, 3, 1))
  x_pos = jnp.asarray(ref["sampler/x_pos"].transpose(0, 2, 3, 1))
  labels = jnp.asarray(ref["sampler/class_labels"]) if "sampler/class_labels" in ref.files else None
  precond = precond_lib.EDMPrecond(sigma_data=meta["sigma_data"])

  @jax.jit
  def run(variables, latents, x_pos, labels):
    def denoise_fn(x, sigma, pos, lab):
      net_fn = lambda x_in, c_noise, l: model.apply(variables, x_in, c_noise, l)
      return precond_lib.denoise(precond, net_fn, x, sigma, pos, lab)
    return sampler_lib.edm_sample(denoise_fn, latents, x_pos, None, labels, settings)

  out = np.asarray(run(variables, latents, x_pos, labels)).transpose(0, 3, 1, 2)
  expected = ref["sampler/out"]
  rel = np.abs(out - expected).max() / np.abs(expected).max()
  print(f"{name}: sampler max relative error {rel:.2e}")
  assert rel <= 1e-4, rel


def test_churn_and_guidance_match_official_with_injected_noise(fixtures_dir):
  """Stochastic churn + classifier-free guidance against the official edm_sampler, fed the official
  run's own per-step noise draws (sampler_churn_cfg_ddpmpp_cond.npz): the trajectory must match."""
  directory = fixtures_dir / "edm_torch"
  meta, _, model, variables = load_fixture_network(directory, "ddpmpp_cond")
  spec = json.loads((directory / "sampler_churn_cfg_ddpmpp_cond.json").read_text())
  ref = np.load(directory / "sampler_churn_cfg_ddpmpp_cond.npz")
  s = spec["settings"]
  settings = sampler_lib.SamplerSettings(num_steps=s["num_steps"], sigma_min=s["sigma_min"],
                                         sigma_max=s["sigma_max"], rho=s["rho"], S_churn=s["S_churn"],
                                         S_min=s["S_min"], S_max=s["S_max"], S_noise=s["S_noise"],
                                         guidance=spec["guidance"])
  latents = jnp.asarray(ref["latents"].transpose(0, 2, 3, 1), jnp.float32)
  x_pos = jnp.asarray(ref["x_pos"].transpose(0, 2, 3, 1), jnp.float32)
  labels = jnp.asarray(ref["class_labels"], jnp.float32)
  noise = jnp.asarray(ref["noise"].transpose(0, 1, 3, 4, 2), jnp.float32)
  precond = precond_lib.EDMPrecond(sigma_data=meta["sigma_data"])

  @jax.jit
  def run(variables, latents, x_pos, labels, noise):
    def denoise_fn(x, sigma, pos, lab):
      net_fn = lambda x_in, c_noise, l: model.apply(variables, x_in, c_noise, l)
      return precond_lib.denoise(precond, net_fn, x, sigma, pos, lab)
    return sampler_lib.edm_sample(denoise_fn, latents, x_pos, None, labels, settings, step_noise=noise)

  with jax.default_matmul_precision("highest"):
    out = np.asarray(run(variables, latents, x_pos, labels, noise)).transpose(0, 3, 1, 2)
  expected = ref["out"]
  rel = np.abs(out - expected).max() / np.abs(expected).max()
  print(f"churn + guidance {spec['guidance']}: sampler max relative error {rel:.2e}")
  assert rel <= 1e-4, rel
  # The injected noise is really used: other draws give another trajectory.
  other = np.asarray(run(variables, latents, x_pos, labels, noise[:, ::-1])).transpose(0, 3, 1, 2)
  assert np.abs(other - expected).max() / np.abs(expected).max() > 1e-2
