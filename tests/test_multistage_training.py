"""Multi-stage training, sampling and tooling (Zhang et al. CVPR 2024 on Patch Diffusion): the per-step
stage draw, the truncated σ distribution, Adam that skips unused decoders, the trainer end to end
(checkpoint, bit-exact resume, sampling), the sampler's decoder per step, the stage-boundaries tool and
the conversion of the authors' checkpoints."""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from patch_diffusion import evaluate
from patch_diffusion import experiment
from patch_diffusion import generate
from patch_diffusion import checkpointing
from patch_diffusion import parallel
from patch_diffusion import state as state_lib
from patch_diffusion import steps as steps_lib
from patch_diffusion import train
from patch_diffusion.config_validation import ConfigError
from patch_diffusion.edm import loss as loss_lib
from patch_diffusion.edm import precond as precond_lib
from patch_diffusion.edm import sampler as sampler_lib
from patch_diffusion.edm import stages as stages_lib
from patch_diffusion.models import create_model, init_params, stage_of_sigma
from helpers import ONE_LEVEL, read_jsonl, restore_checkpoint, steps_to_kimg, tiny

DEFAULT_BOUNDARIES = (2.5103, 7.6577)
#: Boundaries for the tiny runs: stages of probability 0.50 / 0.34 / 0.16 under EDM's log-normal, so a
#: few steps visit every stage.
TINY_BOUNDARIES = (0.3, 1.0)
R = 16


def tiny_multistage(**overrides):
  """The tiny test config as a one-level 3-stage network (encoder 16, decoders 16/16/8), one patch size:
  three decoders make every executable three times the size, and these tests check which decoder trains
  and samples, not the depth (the two-level network is checked against the authors' in test_multistage)."""
  return tiny(**{**ONE_LEVEL, "model.arch": "ddpmpp-multistage", "model.decoder_channels": (16, 16, 8),
                 "model.stage_boundaries": TINY_BOUNDARIES, "patch.real_p": 1.0, **overrides})


# ---- the stage draw ----------------------------------------------------------------------------------


def test_stage_probabilities_of_the_authors_boundaries():
  p = stages_lib.stage_probabilities(DEFAULT_BOUNDARIES)
  np.testing.assert_allclose(p, (0.9614, 0.0351, 0.0035), atol=5e-5)
  assert sum(p) == pytest.approx(1.0, abs=1e-12)
  assert stages_lib.stage_bounds(DEFAULT_BOUNDARIES) == ((0.0, 2.5103), (2.5103, 7.6577), (7.6577, math.inf))


def test_stage_draw_is_a_pure_function_of_seed_and_step_and_follows_the_probabilities():
  sched = stages_lib.StageSchedule(TINY_BOUNDARIES, seed=3)
  steps = np.arange(40_000)
  stages = np.array([sched.stage(int(i)) for i in steps])
  # Pure: a second schedule object, asked in another order, agrees step by step; the seed matters.
  again = stages_lib.StageSchedule(TINY_BOUNDARIES, seed=3)
  assert [again.stage(int(i)) for i in steps[::-1][:500]] == list(stages[::-1][:500])
  other = np.array([stages_lib.StageSchedule(TINY_BOUNDARIES, seed=4).stage(int(i)) for i in steps[:500]])
  assert (other != stages[:500]).mean() > 0.3
  # The stage is that of the step's σ (lower bound exclusive) ...
  for i in range(200):
    assert sched.stage(i) == sum(sched.sigma(i) > b for b in TINY_BOUNDARIES)
  # ... and the stage frequencies follow the truncated-log-normal masses (5 binomial sigmas).
  p = np.array(sched.probabilities)
  freq = np.bincount(stages, minlength=3) / len(stages)
  np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / len(stages)))
  # Independent of the patch-size draw (another stream constant): no correlation with its uniforms.
  u_patch = np.array([np.random.default_rng([3, 0x5EED, int(i)]).random() for i in steps[:5000]])
  assert abs(np.corrcoef(u_patch, stages[:5000])[0, 1]) < 0.05


def test_stage_schedule_from_config():
  assert stages_lib.StageSchedule.from_config(tiny()) is None
  sched = stages_lib.StageSchedule.from_config(tiny_multistage(**{"seed": 5}))
  assert sched.boundaries == TINY_BOUNDARIES and sched.seed == 5 and sched.num_stages == 3


# ---- the truncated σ distribution ----------------------------------------------------------------------


def truncated_lognormal_cdf(sigma, lo, hi, P_mean=-1.2, P_std=1.2):
  """CDF of ln σ ~ N(P_mean, P_std²) conditioned on lo < σ <= hi (float64, scipy)."""
  def phi(s):
    if s <= 0:
      return 0.0
    return 1.0 if s == math.inf else stats.norm.cdf((math.log(s) - P_mean) / P_std)
  a, b = phi(lo), phi(hi)
  return (stats.norm.cdf((np.log(sigma) - P_mean) / P_std) - a) / (b - a)


@pytest.mark.parametrize("boundaries", [DEFAULT_BOUNDARIES, (40.0, 41.0), (1e-4, 2e-4)])
def test_truncated_sigma_lies_in_its_stage_and_follows_the_truncated_log_normal(boundaries):
  """Kolmogorov-Smirnov against the exact truncated CDF, for the authors' stages and for narrow stages far
  in either tail (where a naive Φ(b) − Φ(a) in float32 loses every digit)."""
  base = loss_lib.EDMNoise()
  for k, (lo, hi) in enumerate(stages_lib.stage_bounds(boundaries)):
    static = loss_lib.stage_noise(base, boundaries, k)
    sigma, weight = jax.jit(lambda key, d=static: d.sample(key, 20_000))(jax.random.key(k))
    traced, _ = jax.jit(lambda key, s: loss_lib.stage_noise(base, boundaries, s).sample(key, 20_000))(
        jax.random.key(k), jnp.int32(k))
    sigma, traced = np.asarray(sigma), np.asarray(traced)
    # A traced stage draws what a static one does (up to XLA's constant folding of the bounds).
    np.testing.assert_allclose(sigma, traced, rtol=1e-5)
    # Every σ belongs to the stage by the network's own float32 rule.
    assert (np.asarray(stage_of_sigma(sigma, boundaries)) == k).all(), (k, sigma.min(), sigma.max())
    ks = stats.kstest(sigma.astype(np.float64), lambda s, lo=lo, hi=hi: truncated_lognormal_cdf(s, lo, hi))
    assert ks.pvalue > 1e-3, (boundaries, k, ks)
    np.testing.assert_allclose(weight, (sigma**2 + 0.25) / (sigma * 0.5)**2, rtol=1e-6)


def test_truncated_sigma_moments_match_rejection_sampling():
  """The authors' rejection sampler (log-normal draws kept when they fall in the stage), in numpy: the
  closed-form draw has its mean and std of ln σ."""
  rng = np.random.default_rng(0)
  ln = rng.standard_normal(4_000_000) * 1.2 - 1.2
  for k, (lo, hi) in enumerate(stages_lib.stage_bounds(DEFAULT_BOUNDARIES)):
    kept = ln[(ln > math.log(lo) if lo > 0 else True) & (ln <= math.log(hi))]
    ours = np.log(np.asarray(loss_lib.stage_noise(loss_lib.EDMNoise(), DEFAULT_BOUNDARIES, k).sample(
        jax.random.key(10 + k), 200_000)[0], np.float64))
    tol = 4 * kept.std() / math.sqrt(min(len(kept), len(ours)))
    assert abs(ours.mean() - kept.mean()) < tol, (k, ours.mean(), kept.mean())
    assert abs(ours.std() - kept.std()) < 0.02 * kept.std() + tol


def test_stage_noise_needs_edm():
  with pytest.raises(ValueError, match="edm.precond='edm'"):
    loss_lib.stage_noise(loss_lib.VPNoise(), DEFAULT_BOUNDARIES, 0)


# ---- Adam that skips unused decoders ---------------------------------------------------------------


def torch_adam_reference(params, grads_per_step, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
  """PyTorch Adam semantics on a flat dict of numpy arrays: a parameter whose gradient is None in a step
  is skipped (no update, no moment decay, its step counter does not advance)."""
  state = {k: {"step": 0, "m": np.zeros_like(v), "v": np.zeros_like(v)} for k, v in params.items()}
  params = {k: v.astype(np.float64).copy() for k, v in params.items()}
  for grads in grads_per_step:
    for k, g in grads.items():
      if g is None:
        continue
      s = state[k]
      s["step"] += 1
      s["m"] = b1 * s["m"] + (1 - b1) * g
      s["v"] = b2 * s["v"] + (1 - b2) * g * g
      m_hat = s["m"] / (1 - b1**s["step"])
      v_hat = s["v"] / (1 - b2**s["step"])
      params[k] = params[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
  return params, state


def test_stagewise_adam_matches_pytorch_adam_with_skipped_decoders():
  """A run of stages 0, 2, 0, 0, 1, 2, 0: every decoder's bias correction counts its own steps."""
  rng = np.random.default_rng(0)
  params = {"enc": rng.standard_normal(5), "decs_0": rng.standard_normal(3), "decs_1": rng.standard_normal(4),
            "decs_2": rng.standard_normal(2)}
  schedule = [0, 2, 0, 0, 1, 2, 0]
  grads = []
  for stage in schedule:
    grads.append({k: (rng.standard_normal(v.shape) if k == "enc" or k == f"decs_{stage}" else None)
                  for k, v in params.items()})
  want, torch_state = torch_adam_reference(params, grads)
  tx = state_lib.stagewise_adam(3)
  p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  opt = tx.init(p)
  for stage, g in zip(schedule, grads):
    # What the step computes: exact zeros for the decoders the stage does not run.
    g = {k: jnp.zeros(params[k].shape, jnp.float32) if v is None else jnp.asarray(v, jnp.float32)
         for k, v in g.items()}
    u, opt = tx.update(g, opt, p, stage=stage)
    p = jax.tree.map(lambda x, d: x - 1e-3 * d, p, u)
  for k in params:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert int(opt.shared.count) == len(schedule)
  assert [int(s.count) for s in opt.decoders] == [torch_state[f"decs_{k}"]["step"] for k in range(3)] == [4, 1, 2]
  # Plain Adam (one global count, moments decayed on every step) would differ.
  plain = optax.scale_by_adam()
  q, s = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, None
  s = plain.init(q)
  for g in grads:
    g = {k: jnp.zeros(params[k].shape) if v is None else jnp.asarray(v, jnp.float32) for k, v in g.items()}
    u, s = plain.update(g, s)
    q = jax.tree.map(lambda x, d: x - 1e-3 * d, q, u)
  assert not np.allclose(q["decs_2"], want["decs_2"], rtol=1e-4)


def test_stagewise_adam_traced_stage_equals_static_and_needs_a_stage():
  rng = np.random.default_rng(1)
  p = {k: jnp.asarray(rng.standard_normal(3), jnp.float32) for k in ("enc", "decs_0", "decs_1")}
  g = {k: jnp.asarray(rng.standard_normal(3), jnp.float32) for k in p}
  tx = state_lib.stagewise_adam(2)
  opt = tx.init(p)
  for stage in (0, 1):
    u_s, o_s = tx.update(g, opt, p, stage=stage)
    u_t, o_t = jax.jit(lambda g, o, k: tx.update(g, o, p, stage=k))(g, opt, jnp.int32(stage))
    for a, b in zip(jax.tree.leaves((u_s, o_s)), jax.tree.leaves((u_t, o_t))):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="stage"):
    tx.update(g, opt, p)
  with pytest.raises(ValueError, match="decs_2"):
    state_lib.stagewise_adam(3).init(p)


def _multistage_setup():
  c = tiny_multistage()
  model = create_model(c.model, img_resolution=R, img_channels=1, label_dim=0)
  variables = init_params(model, jax.random.key(0))
  # EDM zero-initialises the output layers: perturb every parameter so every decoder has gradients.
  leaves, treedef = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  tx = state_lib.make_optimizer(c.train, 3)
  state = state_lib.create_train_state(dict(variables, params=params), tx)
  # A distinct EMA, so that the EMA update of the untouched decoders is visible.
  state = state.replace(ema_params=jax.tree.map(lambda x: x + 1.0, state.params))
  return c, model, tx, state


def _ms_step(model, tx, state, cfg, stage=None, seed=0):
  rng = np.random.default_rng(seed)
  batch = {"image": rng.integers(0, 256, (8, R, R, 1), dtype=np.uint8), "label": np.zeros(8, np.int32)}
  step = steps_lib.make_train_step(model.apply, tx, precond_lib.get_precond("edm"),
                                   loss_lib.get_noise_distribution("edm"), cfg)
  args = (state, batch, np.float32(1e-3), np.float32(0.9), jax.random.key(7))
  return jax.device_get(jax.jit(step)(*args, *(() if stage is None else (jnp.int32(stage),))))


@pytest.mark.parametrize("stage", [0, 2])
def test_step_of_stage_k_leaves_other_decoders_and_their_adam_state_bit_identical(stage):
  c, model, tx, state = _multistage_setup()
  cfg = steps_lib.StepConfig(patch_size=8, resolution=R, stage_boundaries=TINY_BOUNDARIES, stage=stage)
  new, metrics = _ms_step(model, tx, state, cfg)
  assert np.isfinite(metrics["loss"])
  for k in range(3):
    name = f"decs_{k}"
    old_p, new_p = state.params[name], new.params[name]
    old_s, new_s = state.opt_state.decoders[k], new.opt_state.decoders[k]
    same_p = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old_p), jax.tree.leaves(new_p))]
    same_s = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old_s), jax.tree.leaves(new_s))]
    if k == stage:
      assert not any(same_p) and int(new_s.count) == 1  # every tensor of the trained decoder moved
    else:
      assert all(same_p) and all(same_s) and int(new_s.count) == 0, name
    # The EMA lerps every parameter, trained or not (as the authors' loop).
    for e_old, e_new, p_new in zip(jax.tree.leaves(state.ema_params[name]), jax.tree.leaves(new.ema_params[name]),
                                   jax.tree.leaves(new.params[name])):
      np.testing.assert_allclose(e_new, 0.9 * e_old + 0.1 * p_new, rtol=1e-6, atol=1e-6)
  shared_changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params["enc_16x16_conv"]),
                                                             jax.tree.leaves(new.params["enc_16x16_conv"]))]
  assert all(shared_changed) and int(new.opt_state.shared.count) == 1


def test_traced_stage_step_equals_static_stage_step():
  """The two executable designs (a switch on a traced stage, or one executable per stage) train the
  same thing."""
  _, model, tx, state = _multistage_setup()
  stage = 1
  static = steps_lib.StepConfig(patch_size=8, resolution=R, stage_boundaries=TINY_BOUNDARIES, stage=stage)
  traced = steps_lib.StepConfig(patch_size=8, resolution=R, stage_boundaries=TINY_BOUNDARIES)
  a, ma = _ms_step(model, tx, state, static)
  b, mb = _ms_step(model, tx, state, traced, stage=stage)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
  np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-4)
  # Adam's first step is ±lr wherever the gradient is not ~0, so compare the gradients it saw (the first
  # moments, 0.1 g) rather than the parameters; the untouched decoders are exactly equal either way.
  for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state)):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4 * float(np.max(np.abs(x))))
  for k in (0, 2):
    for x, y in zip(jax.tree.leaves(a.params[f"decs_{k}"]), jax.tree.leaves(b.params[f"decs_{k}"])):
      np.testing.assert_array_equal(x, y)


def test_single_decoder_step_refuses_a_stage():
  with pytest.raises(ValueError, match="single-decoder"):
    steps_lib._step_stage(steps_lib.StepConfig(patch_size=8, resolution=R), 1)  # pylint: disable=protected-access


@pytest.mark.parametrize("overrides,field", [
    ({"edm.precond": "vp"}, "edm.precond"),
    ({"model.stage_boundaries": (1.0, 0.5)}, "model.stage_boundaries"),
    ({"model.stage_boundaries": (1.0,)}, "model"),
])
def test_bad_multistage_config_names_the_field(overrides, field):
  with pytest.raises(ConfigError) as e:
    experiment.build_experiment(tiny_multistage(**overrides), check_data=False)
  assert e.value.field == field


# ---- the trainer end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def multistage_run(tmp_path_factory):
  """4 steps of the tiny 3-stage config (8 fake devices), a log line per step."""
  c = tiny_multistage(**{"train.log_every_steps": 1})
  c.train.total_kimg = steps_to_kimg(c, 4)
  workdir = str(tmp_path_factory.mktemp("multistage"))
  return c, workdir, train.train_and_evaluate(c, workdir)


def test_multistage_run_trains_the_scheduled_stage_of_every_step(multistage_run):
  c, workdir, result = multistage_run
  assert result["step"] == 4 and np.isfinite(result["loss"])
  sched = stages_lib.StageSchedule.from_config(c)
  want = [sched.stage(i) for i in range(4)]
  assert len(set(want)) >= 2  # the test visits several stages
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  got = [[int(k.split("_")[-1]) for k in r if k.startswith("frac_steps_stage_")] for r in records]
  assert got == [[s] for s in want]
  # Each decoder's Adam count is the number of steps that trained it; the shared part counts them all.
  state, _ = restore_checkpoint(workdir, c)
  assert [int(s.count) for s in state.opt_state.decoders] == [want.count(k) for k in range(3)]
  assert int(state.opt_state.shared.count) == 4
  # A stage never trained keeps its initial parameters exactly.
  exp = experiment.build_experiment(c)
  init = jax.device_get(experiment.initial_variables(exp, jax.random.split(jax.random.key(c.seed), 2)[0]))
  for k in range(3):
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init["params"][f"decs_{k}"]),
                                                     jax.tree.leaves(state.params[f"decs_{k}"])))
    assert same == (k not in want), k


def test_multistage_interrupted_and_resumed_run_matches_uninterrupted(multistage_run, tmp_path):
  c, workdir, _ = multistage_run
  first = tiny_multistage(**{"train.log_every_steps": 1})
  first.train.total_kimg = steps_to_kimg(first, 2)
  assert train.train_and_evaluate(first, str(tmp_path))["step"] == 2
  result = train.train_and_evaluate(c, str(tmp_path))
  assert result["step"] == 4 and result["resumed_from"] == 2
  a, meta_a = restore_checkpoint(workdir, c)
  b, meta_b = restore_checkpoint(str(tmp_path), c)
  assert meta_a["data_state"] == meta_b["data_state"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_multistage_sample_mode(multistage_run):
  c, workdir, _ = multistage_run
  with np.load(generate.sample(c, workdir)) as f:
    images = f["images"]
  assert images.shape == (16, 16, 16, 1) and images.dtype == np.uint8 and images.std() > 0


@pytest.mark.usefixtures("inception_weights_path")
def test_multistage_eval_mode(multistage_run, tmp_path):
  """--mode=eval of the multi-stage run: FID of the EMA network's samples (stages chosen per step)."""
  c, workdir, _ = multistage_run
  c = c.copy_and_resolve_references()
  with c.unlocked():
    c.data.data_dir = str(tmp_path / "refs")
    c.eval.num_samples, c.eval.batch_size, c.eval.ref_num_images = 8, 8, 16
    c.eval.kid, c.eval.precision_recall = False, False
  record = evaluate.evaluate(c, workdir)
  assert record["step"] == 4 and np.isfinite(record["fid"]) and record["fid"] > 0


# ---- the sampler's decoder per step --------------------------------------------------------------------


def _staged_denoiser(calls=None):
  """A denoiser whose output depends on the stage it is asked for (and on σ, x and the label)."""
  scale = jnp.asarray([0.3, 0.6, 0.9], jnp.float64)

  def fn(x, sigma, x_pos, labels, stage=None):
    assert isinstance(stage, int), "the sampler must pass a static stage"
    if calls is not None:
      calls.append((float(np.asarray(sigma)[0]) if not isinstance(sigma, jax.core.Tracer) else None, stage))
    lab = 0.0 if labels is None else labels[:, :1, None, None]
    return (scale[stage] * x / (1 + sigma[:, None, None, None]) + 0.2 * stage + 0.1 * lab
            + 0.01 * x_pos[..., :1])
  return fn


def _manual_sampler(fn, latents, x_pos, labels, settings, noise, boundaries):
  """EDM's Algorithm 2 as a Python loop over float64 numbers, picking each evaluation's decoder from its σ
  (lo < σ <= hi) and doing CFG by hand."""
  t = sampler_lib.sigma_steps(settings.num_steps, settings.sigma_min, settings.sigma_max, settings.rho)
  gamma_max = min(settings.S_churn / settings.num_steps, math.sqrt(2) - 1)

  def den(x, sigma):
    stage = int(sum(sigma > b for b in boundaries))
    s = jnp.full((x.shape[0],), sigma, x.dtype)
    if settings.guidance == 1.0:
      return fn(x, s, x_pos, labels, stage=stage)
    d_u = fn(x, s, x_pos, jnp.zeros_like(labels), stage=stage)
    return d_u + settings.guidance * (fn(x, s, x_pos, labels, stage=stage) - d_u)

  x = latents * t[0]
  for i in range(settings.num_steps):
    gamma = gamma_max if settings.S_min <= t[i] <= settings.S_max and settings.S_churn > 0 else 0.0
    t_hat = t[i] + gamma * t[i]
    if settings.S_churn > 0:
      x = x + math.sqrt(t_hat**2 - t[i]**2) * settings.S_noise * noise[i]
    d = (x - den(x, t_hat)) / t_hat
    x_next = x + (t[i + 1] - t_hat) * d
    if settings.solver == "heun" and i < settings.num_steps - 1:
      d2 = (x_next - den(x_next, t[i + 1])) / t[i + 1]
      x_next = x + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d2)
    x = x_next
  return x


@pytest.mark.parametrize("settings", [
    sampler_lib.SamplerSettings(num_steps=12),
    sampler_lib.SamplerSettings(num_steps=9, solver="euler"),
    # Churn pushes t_hat of the step at σ = 1.92 over the boundary 2.51: that evaluation uses stage 1.
    sampler_lib.SamplerSettings(num_steps=18, S_churn=40, S_min=0.05, S_max=50, guidance=2.0),
])
def test_sampler_runs_the_decoder_of_each_evaluations_sigma(settings):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((2, 4, 4, 1)))
    x_pos = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 2)))
    labels = jnp.asarray(np.eye(3)[[0, 2]])
    noise = jnp.asarray(rng.standard_normal((settings.num_steps, 2, 4, 4, 1)))
    fn = _staged_denoiser()
    got = sampler_lib.edm_sample(fn, latents, x_pos, None, labels, settings, step_noise=noise,
                                 stage_boundaries=DEFAULT_BOUNDARIES)
    want = _manual_sampler(fn, latents, x_pos, labels, settings, noise, DEFAULT_BOUNDARIES)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-10)
    # Every stage ran, and a decoder-blind sampler (all stage 0) differs by far more than the 1e-10 above
    # (the ODE forgets much of its early steps, so not by much in absolute terms).
    plan = sampler_lib.stage_plan(settings, DEFAULT_BOUNDARIES, np.float64)
    assert {p[2] for p in plan} == {0, 1, 2}
    blind = _manual_sampler(fn, latents, x_pos, labels, settings, noise, (1e9, 2e9))
    assert np.abs(np.asarray(blind) - np.asarray(want)).max() > 1e-6


def test_stage_plan_segments_cover_every_step_once():
  settings = sampler_lib.SamplerSettings(num_steps=18, S_churn=40, S_min=0.05, S_max=50)
  plan = sampler_lib.stage_plan(settings, DEFAULT_BOUNDARIES)
  assert [p[:2] for p in plan] == [(0, 6), (6, 7), (7, 8), (8, 10), (10, 17), (17, 18)]
  assert [p[2:] for p in plan] == [(2, 2), (2, 1), (1, 1), (1, 0), (0, 0), (0, None)]
  t_hat, t_next = sampler_lib.evaluation_sigmas(settings)
  for start, stop, first, second in plan:
    for i in range(start, stop):
      assert int(stage_of_sigma(t_hat[i], DEFAULT_BOUNDARIES)) == first
      assert (second is None) == np.isnan(t_next[i])


def test_network_sampling_with_static_stages_equals_the_networks_own_choice():
  """The real MultistageUNet: static per-segment decoders (our sampler) against the network's run-time
  choice from the first sample's σ (the authors' forward)."""
  c = tiny_multistage()
  model = create_model(c.model, img_resolution=R, img_channels=1, label_dim=0)
  variables = init_params(model, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  variables = dict(variables, params=jax.tree.unflatten(
      treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
  den = precond_lib.make_denoiser(model.apply, variables, precond_lib.get_precond("edm"))
  settings = sampler_lib.SamplerSettings(num_steps=6)
  latents = jax.random.normal(jax.random.key(2), (2, R, R, 1))
  from patch_diffusion.data import patches  # pylint: disable=g-import-not-at-top
  pos = patches.full_grid(R)
  static = jax.jit(lambda lat: sampler_lib.edm_sample(den, lat, pos, settings=settings,
                                                      stage_boundaries=TINY_BOUNDARIES))(latents)
  dynamic = jax.jit(lambda lat: sampler_lib.edm_sample(den, lat, pos, settings=settings))(latents)
  assert {p[2] for p in sampler_lib.stage_plan(settings, TINY_BOUNDARIES)} == {0, 1, 2}
  np.testing.assert_allclose(static, dynamic, rtol=1e-4, atol=1e-4)


# ---- converting the authors' checkpoints -------------------------------------------------------------


@pytest.fixture(scope="module")
def authors_state_dict(fixtures_dir, tmp_path_factory):
  """The fixture's state dict (its ``param/`` keys) as an .npz of PyTorch names, and the fixture."""
  data = np.load(fixtures_dir / "multistage" / "multistage_uncond.npz")
  path = tmp_path_factory.mktemp("authors") / "multistage_state_dict.npz"
  np.savez(path, **{k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")})
  meta = json.loads((fixtures_dir / "multistage" / "multistage_uncond.json").read_text())
  return path, data, meta


def test_convert_torch_reads_the_authors_multistage_state_dict(authors_state_dict, tmp_path):
  from patch_diffusion.interop import edm_checkpoint  # pylint: disable=g-import-not-at-top
  from patch_diffusion.tools import convert_torch  # pylint: disable=g-import-not-at-top
  path, data, meta = authors_state_dict
  class_name, kwargs = edm_checkpoint.infer_network_kwargs(
      {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")})
  ctor = meta["constructor"]
  assert class_name == "MultistageUNet"
  assert kwargs["decoder_channels"] == tuple(ctor["de_model_channels"])
  assert kwargs["model_channels"] == ctor["en_model_channels"]
  assert kwargs["channel_mult"] == tuple(ctor["channel_mult"]) and kwargs["num_blocks"] == ctor["num_blocks"]
  assert kwargs["attn_resolutions"] == tuple(ctor["attn_resolutions"])
  dst = tmp_path / "converted"
  assert convert_torch.main([str(path), str(dst)]) == 0
  variables, config = checkpointing.load_pretrained(str(dst))
  assert config.model.arch == "ddpmpp-multistage"
  assert tuple(config.model.stage_boundaries) == DEFAULT_BOUNDARIES  # the fixture's stage_interval
  assert sum(np.size(x) for x in jax.tree.leaves(variables["params"])) == meta["num_params"]
  # The converted network reproduces the authors' raw output of every stage (from σ, inside jit).
  model = create_model(config.model, img_resolution=16, img_channels=3, label_dim=0)
  for k in range(3):
    g = f"stage{k}_s16/"
    x = np.transpose(data[g + "x_in"], (0, 2, 3, 1))
    out = jax.jit(model.apply)(variables, x, data[g + "noise_labels"], None)
    ref = np.transpose(data[g + "F"], (0, 2, 3, 1))
    assert np.abs(np.asarray(out) - ref).max() / np.abs(ref).max() < 1e-4, k
  # Boundaries a bare state dict cannot record are a flag.
  assert convert_torch.main([str(path), str(tmp_path / "other"), "--stage_boundaries", "1,5"]) == 0
  _, other = checkpointing.load_pretrained(str(tmp_path / "other"))
  assert tuple(other.model.stage_boundaries) == (1.0, 5.0)


def test_recorded_multistage_constructor_kwargs_are_read():
  from patch_diffusion.interop import edm_checkpoint, torch_formats  # pylint: disable=g-import-not-at-top
  net = torch_formats.TorchNetwork({}, class_name="EDMPrecond", init_kwargs=dict(
      img_resolution=32, img_channels=3, label_dim=0, use_fp16=False, sigma_data=0.5, model_type="MultistageUNet",
      en_model_channels=128, de_model_channels=[192, 128, 16], stage_num=3,
      stage_interval=[[[0, 1.5]], [[1.5, 6.0]], [[6.0, float("inf")]]], channel_mult=[2, 2, 2]))
  cls, kw, precond = edm_checkpoint._wrapper_settings(net)  # pylint: disable=protected-access
  assert cls == "MultistageUNet" and precond == {"precond": "edm", "sigma_data": 0.5}
  assert kw["model_channels"] == 128 and kw["decoder_channels"] == (192, 128, 16)
  assert kw["stage_boundaries"] == (1.5, 6.0) and "stage_num" not in kw


def test_converted_multistage_network_samples_through_sample_mode(authors_state_dict, tmp_path):
  from patch_diffusion.tools import convert_torch  # pylint: disable=g-import-not-at-top
  path, _, _ = authors_state_dict
  dst = tmp_path / "converted"
  assert convert_torch.main([str(path), str(dst)]) == 0
  c = tiny(**{"sample.pretrained": str(dst), "sample.num_samples": 8, "sample.batch_size": 8,
              "sample.num_steps": 6})
  exp = experiment.build_experiment(experiment.merge_pretrained(c, checkpointing.load_pretrained(str(dst))[1]),
                                    check_data=False)
  assert exp.stage_boundaries == DEFAULT_BOUNDARIES  # the sampler gets the converted network's stages
  with np.load(generate.sample(c, str(tmp_path / "fresh_workdir"))) as f:
    images = f["images"]
  assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0


# ---- the stage-boundaries tool -----------------------------------------------------------------------


def test_authors_boundaries_are_vp_times_0442_and_0636():
  from patch_diffusion.edm import stage_boundaries as sb  # pylint: disable=g-import-not-at-top
  assert sb.vp_time(2.5103) == pytest.approx(0.442, abs=5e-5)
  assert sb.vp_time(7.6577) == pytest.approx(0.636, abs=5e-5)
  np.testing.assert_allclose(float(precond_lib.VPPrecond().sigma(sb.vp_time(3.0))), 3.0, rtol=1e-5)


def test_ideal_denoiser_and_similarity_curves_against_brute_force():
  from patch_diffusion.edm import stage_boundaries as sb  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  data = rng.uniform(-1, 1, (40, 12))
  x = rng.standard_normal((3, 12))
  for sigma in (0.05, 0.7, 30.0):
    logw = np.array([[-np.sum((xi - yi)**2) / (2 * sigma**2) for yi in data] for xi in x])
    w = np.exp(logw - logw.max(1, keepdims=True))
    want = (w / w.sum(1, keepdims=True)) @ data
    np.testing.assert_allclose(sb.ideal_denoiser(x, sigma, data), want, rtol=1e-12, atol=1e-12)
  idx, z = np.array([0, 5, 7]), rng.standard_normal((3, 12))
  sigmas = np.geomspace(0.01, 50, 9)
  s0, s1 = sb.similarity_curves(data, idx, z, sigmas, delta=0.05)
  for g, sigma in enumerate(sigmas):
    den = sb.ideal_denoiser(data[idx] + sigma * z, sigma, data)
    eps = (data[idx] + sigma * z - den) / sigma
    assert s0[g] == pytest.approx(np.mean(np.abs(eps - z) < 0.05))
    assert s1[g] == pytest.approx(np.mean(np.abs(eps - (data[idx] + sigma * z - data.mean(0)) / sigma) < 0.05))
  assert s0[0] == 1.0 and s1[-1] == 1.0  # the two limits


def test_pick_boundaries_interpolates_the_crossings_and_rejects_bad_curves():
  from patch_diffusion.edm import stage_boundaries as sb  # pylint: disable=g-import-not-at-top
  sigmas = np.array([0.1, 1.0, 10.0, 100.0])
  b1, b2 = sb.pick_boundaries(sigmas, [1.0, 0.8, 0.3, 0.5], [0.0, 0.2, 0.8, 1.0], eta=0.9)
  assert b1 == pytest.approx(math.exp(math.log(0.1) + 0.5 * math.log(10)))   # halfway 1.0 -> 0.8
  assert b2 == pytest.approx(math.exp(math.log(10.0) + 0.5 * math.log(10)))  # halfway 0.8 -> 1.0
  with pytest.raises(ValueError, match="never below"):
    sb.pick_boundaries(sigmas, [1.0] * 4, [0.0, 0.2, 0.8, 1.0], eta=0.9)
  with pytest.raises(ValueError, match="overlap"):
    sb.pick_boundaries(sigmas, [1.0, 1.0, 0.95, 0.5], [0.0, 0.95, 1.0, 1.0], eta=0.9)


def test_stage_boundaries_tool_on_the_embedded_digits(tmp_path, capsys):
  """A tiny sample (300 references, 16 samples, 31 σ): the tool runs and gives increasing boundaries
  inside the σ range, and a bad argument ends in one line."""
  from patch_diffusion.tools import stage_boundaries  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "curves.json"
  args = ["--config", os.path.join(root, "configs", "digits.py"), "--num_samples", "16", "--max_reference", "300",
          "--num_sigmas", "31", "--out", str(out)]
  assert stage_boundaries.main(args) == 0
  printed = capsys.readouterr().out
  assert "stage boundaries:" in printed and "--config.model.stage_boundaries=" in printed
  result = json.loads(out.read_text())
  b1, b2 = result["boundaries"]
  assert 0.002 < b1 < b2 < 80.0
  assert len(result["s0"]) == len(result["s1"]) == 31
  with pytest.raises(SystemExit):  # argparse: usage + one error line, exit 2
    stage_boundaries.main(args[:-2] + ["--eta", "1.5"])
  assert "--eta: must lie in (0, 1)" in capsys.readouterr().err
