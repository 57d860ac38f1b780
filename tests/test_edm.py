"""EDM preconditioning, losses and sampler (patch_diffusion/edm/)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patch_diffusion.data import patches
from patch_diffusion.edm import loss as loss_lib
from patch_diffusion.edm import precond as precond_lib
from patch_diffusion.edm import sampler as sampler_lib

SIGMAS = jnp.array([0.002, 0.1, 0.5, 1.0, 10.0, 80.0])


def test_edm_coefficients_closed_form_and_identities():
  pc = precond_lib.EDMPrecond(sigma_data=0.5)
  c = pc.coefficients(SIGMAS)
  s = np.asarray(SIGMAS).reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(c.c_skip, 0.25 / (s**2 + 0.25), rtol=1e-6)
  np.testing.assert_allclose(c.c_out, s * 0.5 / np.sqrt(s**2 + 0.25), rtol=1e-6)
  np.testing.assert_allclose(c.c_in, 1 / np.sqrt(s**2 + 0.25), rtol=1e-6)
  np.testing.assert_allclose(c.c_noise, np.log(SIGMAS) / 4, rtol=1e-6)
  # Unit-variance network input and target: c_in²(σ²+σd²) = 1 and c_skip + c_out²/σd² = 1.
  np.testing.assert_allclose(c.c_in**2 * (s**2 + 0.25), 1, rtol=1e-5)
  np.testing.assert_allclose(c.c_skip + c.c_out**2 / 0.25, 1, rtol=1e-5)
  # λ(σ)·c_out² = 1: EDM's loss weight equalises the effective target weighting.
  _, w = loss_lib.EDMNoise().sample(jax.random.key(0), 1000)
  sig, _ = loss_lib.EDMNoise().sample(jax.random.key(0), 1000)
  c2 = pc.coefficients(sig)
  np.testing.assert_allclose(w * c2.c_out.reshape(-1)**2, 1, rtol=1e-4)


def test_vp_ve_coefficients():
  vp = precond_lib.VPPrecond()
  t = jnp.linspace(1e-2, 1, 7)
  np.testing.assert_allclose(vp.sigma_inv(vp.sigma(t)), t, rtol=1e-4)
  c = vp.coefficients(SIGMAS)
  np.testing.assert_allclose(c.c_out.reshape(-1), -SIGMAS, rtol=1e-6)
  np.testing.assert_allclose(c.c_noise, 999 * vp.sigma_inv(SIGMAS), rtol=1e-5)
  assert vp.sigma_min == pytest.approx(float(vp.sigma(1e-5))) and vp.sigma_max > 40
  ve = precond_lib.VEPrecond()
  c = ve.coefficients(SIGMAS)
  np.testing.assert_allclose(c.c_noise, np.log(0.5 * SIGMAS), rtol=1e-6)
  np.testing.assert_allclose(c.c_in, 1.0)
  with pytest.raises(ValueError, match="unknown preconditioning"):
    precond_lib.get_precond("ddpm")


def test_denoise_concatenates_unscaled_coordinates():
  seen = {}

  def net_fn(x_in, c_noise, labels):
    seen["x_in"], seen["c_noise"], seen["labels"] = x_in, c_noise, labels
    return jnp.zeros(x_in.shape[:-1] + (3,))

  pc = precond_lib.EDMPrecond()
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  pos = patches.full_grid(4, batch=2)
  sigma = jnp.array([1.0, 3.0])
  d = precond_lib.denoise(pc, net_fn, x, sigma, pos, None)
  c = pc.coefficients(sigma)
  assert seen["x_in"].shape == (2, 4, 4, 5)
  np.testing.assert_allclose(seen["x_in"][..., :3], c.c_in * x, rtol=1e-6)  # image first, scaled
  np.testing.assert_array_equal(seen["x_in"][..., 3:], pos)  # then x, y — not scaled by c_in
  np.testing.assert_allclose(d, c.c_skip * x, rtol=1e-6)  # F = 0 leaves the skip path
  # A scalar σ broadcasts over the batch.
  precond_lib.denoise(pc, net_fn, x, 2.0, pos)
  np.testing.assert_allclose(seen["c_noise"], np.log([2.0, 2.0]) / 4, rtol=1e-6)


def _zero_denoiser(x, sigma, x_pos, labels):
  return jnp.zeros_like(x)


def test_loss_weighting_and_reduction():
  key = jax.random.key(4)
  y = jax.random.uniform(jax.random.key(1), (5, 4, 4, 3), minval=-1, maxval=1)
  pos = patches.full_grid(4, batch=5)
  dist = loss_lib.EDMNoise()
  per_sample = loss_lib.patch_loss(_zero_denoiser, key, y, pos, None, dist)
  sigma, weight = dist.sample(jax.random.split(key)[0], 5)
  # With D = 0 the loss is λ(σ)·Σ y² per sample: checks both λ and the per-sample sum.
  np.testing.assert_allclose(per_sample, weight * jnp.sum(y**2, axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(weight, (sigma**2 + 0.25) / (sigma * 0.5)**2, rtol=1e-6)
  # log σ ~ N(−1.2, 1.2²).
  s, _ = dist.sample(jax.random.key(9), 200_000)
  assert float(jnp.mean(jnp.log(s))) == pytest.approx(-1.2, abs=0.01)
  assert float(jnp.std(jnp.log(s))) == pytest.approx(1.2, abs=0.01)


def test_loss_noise_is_what_the_denoiser_sees():
  key = jax.random.key(2)
  y = jax.random.uniform(jax.random.key(5), (3, 4, 4, 1), minval=-1, maxval=1)
  pos = patches.full_grid(4, batch=3)
  seen = {}

  def identity(x, sigma, x_pos, labels):
    seen["x"], seen["sigma"] = x, sigma
    return x

  out = loss_lib.patch_loss(identity, key, y, pos, None, loss_lib.EDMNoise())
  # The drawn ε (the loss splits its key into (σ, ε) keys) and σ: the denoiser sees exactly y + σ·ε (bit
  # for bit: x_noisy − y = σ·ε up to the rounding of that one addition), so a noise-scale or noise-draw
  # bug of any size fails here.
  k_sigma, k_noise = jax.random.split(key)
  sigma, weight = loss_lib.EDMNoise().sample(k_sigma, 3)
  eps = jax.random.normal(k_noise, y.shape, jnp.float32)
  np.testing.assert_array_equal(seen["sigma"], sigma)
  np.testing.assert_array_equal(seen["x"], y + sigma[:, None, None, None] * eps)
  np.testing.assert_allclose(seen["x"] - y, sigma[:, None, None, None] * eps, rtol=1e-6, atol=1e-6)
  # Identity denoiser: loss = λ Σ (σε)².
  np.testing.assert_allclose(out, weight * jnp.sum((sigma[:, None, None, None] * eps)**2, axis=(1, 2, 3)),
                             rtol=1e-5)


def test_loss_is_deterministic_for_a_key_and_varies_across_keys():
  y = jax.random.uniform(jax.random.key(1), (4, 4, 4, 3), minval=-1, maxval=1)
  pos = patches.full_grid(4, batch=4)
  f = jax.jit(lambda k: loss_lib.patch_loss(lambda x, s, p, l: 0.5 * x, k, y, pos, None, loss_lib.EDMNoise()))
  a, b, c = f(jax.random.key(3)), f(jax.random.key(3)), f(jax.random.key(4))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_vp_ve_noise_ranges():
  s, w = loss_lib.VENoise().sample(jax.random.key(0), 10_000)
  assert float(s.min()) >= 0.02 and float(s.max()) <= 100
  np.testing.assert_allclose(w, 1 / s**2, rtol=1e-6)
  vp = loss_lib.VPNoise()
  s, _ = vp.sample(jax.random.key(0), 10_000)
  assert float(s.min()) >= vp.precond.sigma_min * 0.999 and float(s.max()) <= vp.precond.sigma_max * 1.001


def test_drop_labels():
  labels = jax.nn.one_hot(jnp.arange(20_000) % 10, 10)
  dropped = loss_lib.drop_labels(jax.random.key(0), labels, 0.1)
  zero_rows = np.asarray(jnp.all(dropped == 0, axis=1))
  assert zero_rows.mean() == pytest.approx(0.1, abs=0.01)
  np.testing.assert_array_equal(dropped[~zero_rows], labels[~zero_rows])
  assert loss_lib.drop_labels(jax.random.key(0), labels, 0.0) is labels


def test_sigma_steps_closed_form():
  t = sampler_lib.sigma_steps(18)
  i = np.arange(18)
  expected = (80**(1 / 7) + i / 17 * (0.002**(1 / 7) - 80**(1 / 7)))**7
  np.testing.assert_allclose(t[:-1], expected, rtol=1e-12)
  assert t[0] == pytest.approx(80) and t[-2] == pytest.approx(0.002) and t[-1] == 0
  assert np.all(np.diff(t) < 0)


def _gaussian_denoiser(sd):
  # Exact denoiser for data ~ N(0, sd²): D(x; σ) = x·sd²/(σ²+sd²).
  return lambda x, sigma, x_pos, labels: x * (sd**2 / (sigma**2 + sd**2)).reshape(-1, 1, 1, 1)


def test_heun_integrates_gaussian_ode_with_second_order_accuracy():
  # For Gaussian data the probability-flow ODE is linear: x(σ) = x(σ_T)·sqrt(σ²+sd²)/sqrt(σ_T²+sd²).
  sd = 0.5
  latents = jax.random.normal(jax.random.key(0), (4, 4, 4, 1))
  pos = patches.full_grid(4)
  errors = {}
  for n in (8, 16, 32):
    settings = sampler_lib.SamplerSettings(num_steps=n)
    out = sampler_lib.edm_sample(_gaussian_denoiser(sd), latents, pos, settings=settings)
    exact = latents * 80 * sd / np.sqrt(80**2 + sd**2)
    errors[n] = float(jnp.max(jnp.abs(out - exact)))
  assert errors[32] < 0.03  # measured 0.017 (64 steps: 0.004, 128: 0.001)
  assert errors[8] / errors[16] > 3 and errors[16] / errors[32] > 3  # ~4.5x per doubling: 2nd order
  euler = sampler_lib.edm_sample(_gaussian_denoiser(sd), latents, pos,
                                 settings=sampler_lib.SamplerSettings(num_steps=32, solver="euler"))
  assert float(jnp.max(jnp.abs(euler - latents * 80 * sd / np.sqrt(80**2 + sd**2)))) > errors[32]


def test_nfe_and_last_step_is_euler():
  # Evaluations are counted with a host callback: Heun makes 2N−1 (no correction on the step to σ=0).
  count = []

  def counting(x, sigma, x_pos, labels):
    jax.debug.callback(lambda: count.append(1))
    return x * 0.5

  latents = jnp.ones((1, 2, 2, 1))
  for solver, n in (("heun", 5), ("euler", 5), ("heun", 1)):
    count.clear()
    settings = sampler_lib.SamplerSettings(num_steps=n, solver=solver)
    jax.block_until_ready(sampler_lib.edm_sample(counting, latents, patches.full_grid(2), settings=settings))
    jax.effects_barrier()
    assert len(count) == settings.nfe == (2 * n - 1 if solver == "heun" else n)
  assert sampler_lib.SamplerSettings(num_steps=5, guidance=1.3).nfe == 18


def test_churn_is_keyed_and_changes_the_sample():
  latents = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  pos = patches.full_grid(4)
  den = _gaussian_denoiser(0.5)
  churned = sampler_lib.SamplerSettings(num_steps=10, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
  a = sampler_lib.edm_sample(den, latents, pos, jax.random.key(1), settings=churned)
  b = sampler_lib.edm_sample(den, latents, pos, jax.random.key(1), settings=churned)
  c = sampler_lib.edm_sample(den, latents, pos, jax.random.key(2), settings=churned)
  d = sampler_lib.edm_sample(den, latents, pos, settings=sampler_lib.SamplerSettings(num_steps=10))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, d)
  with pytest.raises(ValueError, match="PRNG key"):
    sampler_lib.edm_sample(den, latents, pos, None, settings=churned)


def test_classifier_free_guidance_combination():
  def den(x, sigma, x_pos, labels):
    return x * 0 + labels[:, :1, None, None] * 2.0 + 1.0  # D_u = 1, D_c = 3 for label 0

  labels = jax.nn.one_hot(jnp.array([0, 0]), 3)
  guided = sampler_lib.guided(den, 1.3)
  x = jnp.zeros((2, 2, 2, 1))
  out = guided(x, jnp.ones(2), patches.full_grid(2, batch=2), labels)
  np.testing.assert_allclose(out, 1 + 1.3 * (3 - 1))
  with pytest.raises(ValueError, match="class labels"):
    guided(x, jnp.ones(2), patches.full_grid(2, batch=2), None)


def test_sampler_settings_validation():
  with pytest.raises(ValueError, match="num_steps"):
    sampler_lib.SamplerSettings(num_steps=0)
  with pytest.raises(ValueError, match="solver"):
    sampler_lib.SamplerSettings(solver="dpm")
