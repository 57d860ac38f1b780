"""--mode=eval (evaluate.py) and in-training eval (hooks.EvalHook) through evaluation.Evaluator, end to end
on 8 fake CPU devices.

One module-scoped run trains the tiny digits network for 2 steps with an end-of-training eval; the tests
then evaluate its checkpoint. The Inception network on CPU costs ~0.2 s per image, so the counts are
small: 20 samples (3 batches of 8, the last with 4 padding rows) against 32 reference images.
"""
import json
import math
import os
import pathlib

import numpy as np
import pytest

from patch_diffusion import experiment
from patch_diffusion import sampling
from patch_diffusion import train
from patch_diffusion.data import patches
from patch_diffusion.evaluation import inception_weights
from patch_diffusion import evaluate
from patch_diffusion.evaluation import fid as fid_metrics
from helpers import ONE_LEVEL, read_jsonl, tiny

NUM_SAMPLES = 20
BATCH = 8
REF_IMAGES = 32


def eval_config(data_dir, **eval_overrides):
  """Tiny digits at one level, full-size steps only (one train executable), 2 steps, end-of-training
  eval."""
  c = tiny(**ONE_LEVEL)  # the evaluator does not care how deep
  c.patch.real_p = 1.0
  sched = patches.PatchSchedule(c.data.resolution, c.patch.schedule, c.patch.real_p, c.patch.latent)
  c.train.total_kimg = 1.5 * c.train.batch_size * sched.average_batch_mul / 1000  # exactly 2 steps
  c.train.checkpoint_every_steps = 100
  c.data.data_dir = str(data_dir)  # the digits' reference cache goes here, not to ~/.cache
  c.eval.every_kimg = 1000.0       # > 0: eval at the end of training only
  c.eval.train_num_samples = NUM_SAMPLES
  c.eval.num_samples = NUM_SAMPLES
  c.eval.batch_size = BATCH
  c.eval.ref_num_images = REF_IMAGES
  for k, v in eval_overrides.items():
    c.eval[k] = v
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory, inception_weights_path):  # pylint: disable=unused-argument
  root = tmp_path_factory.mktemp("run_eval")
  c = eval_config(root / "data")
  workdir = str(root / "work")
  train.train_and_evaluate(c, workdir)
  ref_path = experiment.reference_data(experiment.build_experiment(c)).path
  assert ref_path.exists(), "the in-training eval did not write the reference statistics"
  mtime = os.stat(ref_path).st_mtime_ns
  record = evaluate.evaluate(c, workdir)  # --mode=eval on the final checkpoint
  return c, workdir, ref_path, mtime, record


def test_in_training_eval_logs_metrics_with_kimg(trained):
  c, workdir, ref_path, _, _ = trained
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  evals = [i for i, r in enumerate(records) if "eval/fid" in r]
  # The end-of-training eval after the last training line, then the fixture's --mode=eval.
  assert len(evals) == 2 and evals[0] > max(i for i, r in enumerate(records) if "loss" in r)
  r = records[evals[0]]
  assert r["step"] == 2 and r["kimg"] == pytest.approx(2 * c.train.batch_size / 1000)
  assert r["eval/num_samples"] == NUM_SAMPLES
  assert math.isfinite(r["eval/fid"]) and r["eval/fid"] > 0
  assert 0 <= r["eval/precision"] <= 1 and 0 <= r["eval/recall"] <= 1 and math.isfinite(r["eval/kid"])
  stats, meta = fid_metrics.FeatureStats.load(ref_path)
  assert ref_path.parent == pathlib.Path(c.data.data_dir) / "fid_refs"
  assert meta["dataset"] == "digits_gray" and meta["resolution"] == 16
  assert stats.num_items == REF_IMAGES and stats.features.shape == (REF_IMAGES, 2048)


def test_eval_mode_writes_json_and_reuses_reference_stats(trained):
  c, workdir, ref_path, mtime, record = trained
  path = os.path.join(workdir, "eval", f"eval_00000002_n{NUM_SAMPLES}.json")
  with open(path) as f:
    assert json.load(f) == record
  assert record["step"] == 2 and record["kimg"] == pytest.approx(2 * c.train.batch_size / 1000)
  assert record["num_samples"] == NUM_SAMPLES and record["reference_num_images"] == REF_IMAGES
  assert math.isfinite(record["fid"]) and record["fid"] > 0 and math.isfinite(record["kid"])
  assert 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1
  assert record["wall_time_s"] > 0 and record["reference_stats"] == str(ref_path)
  # Loaded, not recomputed: the file is untouched.
  assert os.stat(ref_path).st_mtime_ns == mtime
  # Same EMA network, seed and batch size as the end-of-training eval: the same numbers.
  in_training, last = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval/fid" in r]
  assert record["fid"] == pytest.approx(in_training["eval/fid"], rel=1e-6)
  assert record["precision"] == in_training["eval/precision"]
  # The scalars also go to TensorBoard / metrics.jsonl at the checkpoint step.
  assert last["step"] == 2 and last["eval/fid"] == pytest.approx(record["fid"])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))


def test_on_device_features_equal_host_side_embedding(trained):
  """The sharded generate -> Inception path with its masked tail gives the features of embedding the host
  copies of the same samples (``sampling.generate_images``, the code behind --mode=sample), and the
  recorded KID / precision / recall are those of these features. (FID is not recomputed here: its
  2048x2048 matrix square root costs tens of seconds on this CPU.)"""
  c, workdir, ref_path, _, record = trained
  exp, variables, _ = experiment.load_ema_variables(c, workdir)
  evaluator = experiment.make_evaluator(exp)
  fake = evaluator.generated_stats(variables, num_samples=NUM_SAMPLES, seed=c.seed + 2)
  assert fake.num_items == NUM_SAMPLES
  images, _ = sampling.generate_images(exp.generate_fn(BATCH), variables, num_images=NUM_SAMPLES,
                                       batch_size=BATCH, seed=c.seed + 2)
  feature_fn = evaluator.feature_fn
  host = np.concatenate([feature_fn(images[i:i + BATCH]) for i in range(0, NUM_SAMPLES, BATCH)])
  np.testing.assert_allclose(fake.features, host, rtol=0, atol=1e-4)
  mu, sigma = fake.mean_cov()
  np.testing.assert_allclose(mu, host.astype(np.float64).mean(0), rtol=0, atol=1e-5)
  np.testing.assert_allclose(sigma, np.cov(host.astype(np.float64), rowvar=False), rtol=0, atol=1e-5)
  real, _ = fid_metrics.FeatureStats.load(ref_path)
  assert record["kid"] == pytest.approx(fid_metrics.kid(real.features, host), rel=1e-4, abs=1e-6)
  assert (record["precision"], record["recall"]) == fid_metrics.precision_recall(real.features, host)


def test_missing_inception_weights_fail_before_anything_runs(tmp_path):
  missing = tmp_path / "nowhere" / "inception.npz"
  bad = eval_config(tmp_path / "data", inception_path=str(missing))
  # No checkpoint in this workdir: checking the weights first gives their error, not the checkpoint's.
  with pytest.raises(inception_weights.InceptionWeightsNotFoundError) as e:
    evaluate.evaluate(bad, str(tmp_path / "empty"))
  assert str(missing) in str(e.value) and "fetch_inception" in str(e.value)
  assert not (tmp_path / "empty" / "eval").exists()
  # In-training eval: the evaluator (built before training starts) checks the weights at construction.
  exp = experiment.build_experiment(bad)
  with pytest.raises(inception_weights.InceptionWeightsNotFoundError):
    experiment.make_evaluator(exp)
  with pytest.raises(inception_weights.InceptionWeightsNotFoundError):
    train.train_and_evaluate(bad, str(tmp_path / "never"))
  assert not (tmp_path / "never").exists()
