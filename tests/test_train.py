"""The trainer end to end on 8 fake CPU devices (patch_diffusion/train.py, steps.py, state.py)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from patch_diffusion import experiment
from patch_diffusion import generate
from patch_diffusion import checkpointing
from patch_diffusion import parallel
from patch_diffusion import state as state_lib
from patch_diffusion import steps as steps_lib
from patch_diffusion import train
from patch_diffusion.edm import precond as precond_lib
from patch_diffusion.data import datasets
from helpers import ONE_LEVEL, read_jsonl, restore_checkpoint, steps_to_kimg, tiny


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """6 steps of the tiny digits config (one level) with a log line per step."""
  c = tiny(**ONE_LEVEL, **{"train.log_every_steps": 1})
  c.train.total_kimg = steps_to_kimg(c, 6)
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = train.train_and_evaluate(c, workdir)
  return c, workdir, result


def test_run_writes_logs_checkpoints_and_follows_schedule(uninterrupted):
  c, workdir, result = uninterrupted
  assert result["step"] == 6 and np.isfinite(result["loss"])
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  exp = experiment.build_experiment(c)
  for r in records:
    # One step per log line: exactly one size appears, and it is the schedule's size for that step.
    used = [int(k.split("_")[-1]) for k in r if k.startswith("frac_steps_")]
    assert used == [exp.schedule.patch_size(r["step"] - 1)], r
    assert r["kimg"] == pytest.approx(r["step"] * c.train.batch_size * 1.9 / 1000)
  assert len({int(k.split("_")[-1]) for r in records for k in r if k.startswith("frac_steps_")}) >= 2
  ckpts = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpts.all_steps() == [3, 6]
  ckpts.close()
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))


def test_interrupted_and_resumed_run_matches_uninterrupted(uninterrupted, tmp_path):
  c, workdir, _ = uninterrupted
  resumed_dir = str(tmp_path)
  first = tiny(**ONE_LEVEL, **{"train.log_every_steps": 1})
  first.train.total_kimg = steps_to_kimg(first, 3)
  first_result = train.train_and_evaluate(first, resumed_dir)  # stops after step 3 (final checkpoint)
  assert first_result["step"] == 3 and first_result["resumed_from"] is None
  result = train.train_and_evaluate(c, resumed_dir)  # resumes at step 3, data position included
  # It really restored checkpoint 3 (retraining from step 0 would give the same parameters) and ran
  # steps 4-6 only: every step is logged exactly once over the two runs.
  assert result["step"] == 6 and result["resumed_from"] == 3
  assert [r["step"] for r in read_jsonl(os.path.join(resumed_dir, "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]
  a, meta_a = restore_checkpoint(workdir, c)
  b, meta_b = restore_checkpoint(resumed_dir, c)
  assert meta_a["nimg"] == pytest.approx(meta_b["nimg"]) and meta_a["data_state"] == meta_b["data_state"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_sample_mode_writes_npz_and_grid(uninterrupted):
  c, workdir, _ = uninterrupted
  path = generate.sample(c, workdir)
  with np.load(path) as f:
    images = f["images"]
    assert "labels" not in f.files
  assert images.shape == (16, 16, 16, 1) and images.dtype == np.uint8
  assert os.path.exists(os.path.join(workdir, "samples.png"))
  assert images.std() > 0


def _one_step(config, devices, batch, state_host):
  mesh = parallel.create_mesh((-1,), ("data",), devices=devices)
  exp = experiment.build_experiment(config)
  exp.mesh = mesh
  state = jax.device_put(state_host, parallel.replicated(mesh))
  step = steps_lib.make_train_step(exp.model.apply, exp.tx, exp.precond, exp.noise_dist,
                                   steps_lib.StepConfig(patch_size=8, resolution=16))
  rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  fn = jax.jit(step, in_shardings=(rep, data, rep, rep, rep), out_shardings=(rep, rep))
  new_state, metrics = fn(state, jax.device_put(batch, data), np.float32(1e-3), np.float32(0.9),
                          jax.random.key(7))
  return jax.device_get(new_state), jax.device_get(metrics)


def test_sharded_step_equals_single_device_step():
  c = tiny(**ONE_LEVEL)
  exp = experiment.build_experiment(c)
  state = jax.device_get(state_lib.create_train_state(exp.init_variables(jax.random.key(0)), exp.tx))
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (32, 16, 16, 1), dtype=np.uint8),
           "label": np.zeros(32, np.int32)}
  s1, m1 = _one_step(c, jax.devices()[:1], batch, state)
  s8, m8 = _one_step(c, jax.devices(), batch, state)
  assert len(jax.devices()) == 8
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert int(s8.step) == 1


def test_mock_celeb_a_trains_on_8_devices(tmp_path):
  c = tiny(**ONE_LEVEL, **{"data.name": "celeb_a", "data.num_channels": 3,
                           "data.data_dir": str(tmp_path / "nodata"), "patch.real_p": 1.0})
  c.train.total_kimg = steps_to_kimg(c, 2)
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert result["step"] == 2 and np.isfinite(result["loss"])


def test_learning_rate_and_ema_follow_counted_images():
  t = tiny().train
  assert state_lib.learning_rate(0, t) == 0
  assert state_lib.learning_rate(50, t) == pytest.approx(t.lr * 50 / 100)
  assert state_lib.learning_rate(10_000, t) == pytest.approx(t.lr)
  # Half-life ramps with min(h, 0.05 nimg); β = 0.5^(images/h).
  assert state_lib.ema_beta(0, 30.4, t) == 0.0
  assert state_lib.ema_beta(400, 30.4, t) == pytest.approx(0.5**(30.4 / 20))
  assert state_lib.ema_beta(1e6, 30.4, t) == pytest.approx(0.5**(30.4 / 50))


def test_sanitize_grads():
  g = {"a": jnp.array([jnp.nan, jnp.inf, -jnp.inf, 2.0])}
  np.testing.assert_array_equal(steps_lib.sanitize_grads(g)["a"], [0, 1e5, -1e5, 2])


@pytest.mark.parametrize("overrides,match", [
    ({"data.name": "no_such_dataset"}, "no_such_dataset"),
    ({"train.batch_size": 12}, "divisible by the 8"),
    ({"data.resolution": 18}, "divisible by 4"),
    ({"patch.real_p": 1.5}, "real_p"),
    ({"patch.real_p": -0.5}, "real_p"),
    ({"model.arch": "unet"}, "model.arch"),
    ({"train.lr": 0.0}, "train.lr"),
])
def test_bad_config_fails_before_compiling(overrides, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(tiny(**overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_unprepared_dataset_names_the_prepare_command(tmp_path):
  c = tiny(**{"data.name": "celeb_a", "data.data_dir": str(tmp_path / "empty")})
  with pytest.raises(datasets.DatasetError, match="prepare_dataset --name celeb_a"):
    train.train_and_evaluate(c, str(tmp_path / "run"))


def test_bf16_compute_loss_close_to_fp32():
  """bf16 activations with fp32 params/loss/norm statistics/softmax stay close to the fp32 loss."""
  from patch_diffusion.data import patches  # pylint: disable=g-import-not-at-top
  from patch_diffusion.edm import loss as loss_lib  # pylint: disable=g-import-not-at-top
  c32, c16 = tiny(), tiny(**{"model.dtype": "bfloat16"})
  e32, e16 = experiment.build_experiment(c32), experiment.build_experiment(c16)
  variables = e32.init_variables(jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (64, 16, 16, 1), minval=-1, maxval=1)
  p, pos = patches.random_patches(jax.random.key(2), images, 8)

  def loss(exp):
    den = precond_lib.make_denoiser(exp.model.apply, variables, exp.precond, dtype=exp.dtype)
    return jnp.mean(loss_lib.patch_loss(den, jax.random.key(3), p, pos, None, exp.noise_dist))

  l32, l16 = float(jax.jit(lambda: loss(e32))()), float(jax.jit(lambda: loss(e16))())
  assert e16.model.dtype == jnp.bfloat16
  assert l16 != l32  # bf16 really changed the arithmetic
  assert abs(l16 - l32) / l32 < 0.02, (l16, l32)
  # Parameters stay float32 under bf16 compute.
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_converted_fixture_network_samples_through_sample_mode(fixtures_dir, tmp_path):
  """The PyTorch fixture network, converted without torch, samples through --mode=sample's code path."""
  from patch_diffusion.tools import convert_torch  # pylint: disable=g-import-not-at-top
  dst = tmp_path / "converted"
  convert_torch.main([str(fixtures_dir / "edm_torch" / "ddpmpp_uncond_state_dict.pt"), str(dst)])
  c = tiny(**{"sample.pretrained": str(dst), "sample.num_samples": 8, "sample.batch_size": 8,
              "sample.num_steps": 4})
  path = generate.sample(c, str(tmp_path / "fresh_workdir"))  # the workdir does not exist yet
  with np.load(path) as f:
    images = f["images"]
  assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8  # the converted net's 16×16×3
  assert images.std() > 0


def test_grids_and_final_samples_share_one_sampler_executable():
  """Experiment.generate_fn returns the same jitted function for the same arguments, so a run's sample
  grids and its final samples (same batch) compile the sampler once."""
  from patch_diffusion.edm import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  exp = experiment.build_experiment(tiny(), check_data=False)
  fn = exp.generate_fn(8)
  assert exp.generate_fn(8) is fn
  assert exp.generate_fn(8, sampler_lib.SamplerSettings.from_config(exp.config.sample)) is fn
  assert exp.generate_fn(16) is not fn
  other = sampler_lib.SamplerSettings(num_steps=exp.config.sample.num_steps + 1)
  assert exp.generate_fn(8, other) is not fn
