"""Input pipeline: shapes and preprocessing, per-process shards, seeded order and flips, exact resume.

TFDS data comes from ``prepare_dataset.write_synthetic_tfds_dataset``: a real on-disk celeb_a-format
TFDS dataset (218x178 RGB, ArrayRecord) with random content, written and read without TensorFlow.
"""
from __future__ import annotations

import json
import math
import sys

import ml_collections
import numpy as np
import PIL.Image
import pytest

from configs import default
from patch_diffusion.data import datasets
from patch_diffusion.data import input_pipeline
from patch_diffusion.tools import prepare_dataset


def _cfg(**overrides) -> ml_collections.ConfigDict:
  c = default.get_config().data
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _blocks(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
  """Random 7x6 colour blocks blown up to the image size: survives downscaling with full contrast."""
  h, w, c = shape
  small = rng.integers(0, 256, (7, 6, c), dtype=np.uint8)
  return np.repeat(np.repeat(small, -(-h // 7), axis=0), -(-w // 6), axis=1)[:h, :w]


@pytest.fixture(scope="module")
def celeb_dir(tmp_path_factory) -> str:
  d = tmp_path_factory.mktemp("tfds")
  prepare_dataset.write_synthetic_tfds_dataset("celeb_a", str(d), {"train": 12}, image_fn=_blocks)
  return str(d)


def test_celeb_a_batches_are_center_cropped_and_resized(celeb_dir):
  cfg = _cfg(name="celeb_a", data_dir=celeb_dir, resolution=16, num_channels=3)
  raw, _ = datasets.get_data_source(cfg)
  it = input_pipeline.create_train_iterator(cfg, batch_size=5, seed=3, process_index=0, process_count=1,
                                            with_index=True)
  for batch in _take(it, 3):  # crosses an epoch boundary (12 images, 15 drawn)
    assert batch["image"].shape == (5, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32
    assert batch["image"].max() > 200 and batch["image"].min() < 50  # full uint8 range, not normalised
    for img, idx in zip(batch["image"], batch["index"]):
      # Independent reference: PIL's own crop box for the centred 178x178 square of a 178x218 image.
      ref = PIL.Image.fromarray(raw[int(idx)]["image"]).crop((0, 20, 178, 198))
      np.testing.assert_array_equal(img, np.asarray(ref.resize((16, 16), PIL.Image.Resampling.LANCZOS)))
  it.close()


def test_grayscale_output_channels(celeb_dir):
  cfg = _cfg(name="celeb_a", data_dir=celeb_dir, resolution=8, num_channels=1)
  batch = next(input_pipeline.create_train_iterator(cfg, batch_size=4, seed=0, process_index=0, process_count=1))
  assert batch["image"].shape == (4, 8, 8, 1)


def test_two_processes_get_disjoint_shards_that_cover_the_data():
  cfg = _cfg(name="digits", resolution=8, max_examples=64)
  seen = []
  for p in range(2):
    it = input_pipeline.create_train_iterator(cfg, batch_size=8, seed=0, process_index=p, process_count=2,
                                              with_index=True)
    epoch1 = np.concatenate([b["index"] for b in _take(it, 4)])  # 32 = one epoch of the shard
    epoch2 = np.concatenate([b["index"] for b in _take(it, 4)])
    assert len(set(epoch1)) == 32 and set(epoch1) == set(epoch2)  # each epoch: the shard once
    assert not np.array_equal(epoch1, epoch2)  # reshuffled every epoch
    seen.append(set(epoch1))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(64))


def test_uneven_shards_still_cover_everything():
  cfg = _cfg(name="digits", resolution=8, max_examples=7)
  union = set()
  for p in range(3):
    it = input_pipeline.create_train_iterator(cfg, batch_size=1, seed=0, process_index=p, process_count=3,
                                              with_index=True)
    union |= {int(b["index"][0]) for b in _take(it, 3)}
  assert union == set(range(7))


def test_same_seed_same_batches_other_seed_other_order():
  cfg = _cfg(name="digits", resolution=8, xflip=True)
  kw = dict(batch_size=16, process_index=0, process_count=1, with_index=True)
  a = _take(input_pipeline.create_train_iterator(cfg, seed=7, **kw), 3)
  b = _take(input_pipeline.create_train_iterator(cfg, seed=7, **kw), 3)
  c = _take(input_pipeline.create_train_iterator(cfg, seed=8, **kw), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(a[0]["index"], c[0]["index"])


def test_xflip_mirrors_about_half_the_images_deterministically():
  kw = dict(batch_size=64, seed=5, process_index=0, process_count=1, with_index=True)
  plain = next(input_pipeline.create_train_iterator(_cfg(name="digits", resolution=8), **kw))
  flipped = next(input_pipeline.create_train_iterator(_cfg(name="digits", resolution=8, xflip=True), **kw))
  np.testing.assert_array_equal(plain["index"], flipped["index"])
  mirrored = 0
  for p, f in zip(plain["image"], flipped["image"]):
    if not np.array_equal(p, f):
      np.testing.assert_array_equal(p[:, ::-1], f)
      mirrored += 1
  assert 16 <= mirrored <= 48


@pytest.mark.parametrize("xflip", [False, True])
def test_resume_gives_identical_following_batches(xflip):
  cfg = _cfg(name="digits", resolution=8, max_examples=20, xflip=xflip)  # epochs of 2.5 batches
  kw = dict(batch_size=8, seed=1, process_index=1, process_count=2, with_index=True)
  run = input_pipeline.create_train_iterator(cfg, **kw)
  _take(run, 3)
  state = json.loads(json.dumps(run.get_state()))  # what a checkpoint stores
  expected = _take(run, 5)
  resumed = input_pipeline.create_train_iterator(cfg, **kw)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 5)):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])
  # The JSON text itself is accepted too.
  again = input_pipeline.create_train_iterator(cfg, **kw)
  again.set_state(json.dumps(state).encode())
  np.testing.assert_array_equal(next(again)["index"], expected[0]["index"])


def test_resume_on_tfds_data(celeb_dir):
  cfg = _cfg(name="celeb_a", data_dir=celeb_dir, resolution=8, xflip=True)
  kw = dict(batch_size=5, seed=2, process_index=0, process_count=1)
  run = input_pipeline.create_train_iterator(cfg, **kw)
  _take(run, 2)
  state = run.get_state()
  expected = _take(run, 3)
  resumed = input_pipeline.create_train_iterator(cfg, **kw)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 3)):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_state_from_another_pipeline_is_refused():
  cfg = _cfg(name="digits", resolution=8)
  state = input_pipeline.create_train_iterator(cfg, batch_size=8, seed=0, process_index=0, process_count=1).get_state()
  other = input_pipeline.create_train_iterator(cfg, batch_size=4, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="batch_size: saved 8 vs now 4"):
    other.set_state(state)
  with pytest.raises(ValueError, match="not an input-pipeline state"):
    other.set_state({"foo": 1})


def test_worker_processes_give_the_same_batches():
  cfg = _cfg(name="digits", resolution=8, xflip=True)
  kw = dict(batch_size=8, seed=4, process_index=0, process_count=1, with_index=True)
  inline = _take(input_pipeline.create_train_iterator(cfg, **kw), 2)
  cfg.num_workers = 1
  with input_pipeline.create_train_iterator(cfg, **kw) as workers:
    for x, y in zip(inline, _take(workers, 2)):
      np.testing.assert_array_equal(x["index"], y["index"])
      np.testing.assert_array_equal(x["image"], y["image"])


def test_default_process_index_comes_from_jax():
  it = input_pipeline.create_train_iterator(_cfg(name="digits", resolution=8), batch_size=4, seed=0)
  assert (it.process_index, it.process_count) == (0, 1)


def test_labels_in_batches():
  batch = next(input_pipeline.create_train_iterator(
      _cfg(name="digits", resolution=8, use_labels=True), batch_size=64, seed=0, process_index=0, process_count=1))
  assert batch["label"].min() >= 0 and batch["label"].max() <= 9 and len(set(batch["label"].tolist())) > 3
  unlabelled = next(input_pipeline.create_train_iterator(
      _cfg(name="digits", resolution=8), batch_size=64, seed=0, process_index=0, process_count=1))
  assert not unlabelled["label"].any()


def test_eval_iterator_covers_split_once_in_order_with_mask():
  cfg = _cfg(name="digits", resolution=8, max_examples=30, xflip=True)
  source, _ = datasets.get_data_source(cfg)
  got = []
  for p in range(2):
    ev = input_pipeline.create_eval_iterator(cfg, batch_size=7, process_index=p, process_count=2, with_index=True)
    batches = list(ev)
    assert len(batches) == len(ev) == math.ceil(15 / 7)  # same count on every process
    for b in batches:
      assert b["image"].shape == (7, 8, 8, 3) and b["mask"].dtype == np.bool_
      assert not b["image"][~b["mask"]].any()  # padding rows are zeros
      for img, idx in zip(b["image"][b["mask"]], b["index"][b["mask"]]):
        np.testing.assert_array_equal(img, source[int(idx)]["image"])  # no flip
      got.extend(b["index"][b["mask"]].tolist())
  assert got == list(range(30))


def test_eval_iterator_pads_empty_shards():
  ev = input_pipeline.create_eval_iterator(_cfg(name="digits", resolution=8, max_examples=3), batch_size=2,
                                           process_index=3, process_count=4)
  batches = list(ev)
  assert len(batches) == 1 and batches[0]["mask"].sum() == (3 * 4 // 4 - 3 * 3 // 4)


def test_bad_arguments():
  cfg = _cfg(name="digits", resolution=8)
  with pytest.raises(ValueError, match="batch_size must be a positive integer"):
    input_pipeline.create_train_iterator(cfg, batch_size=0, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="process_index must be in"):
    input_pipeline.create_train_iterator(cfg, batch_size=4, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="seed must be a non-negative integer"):
    input_pipeline.create_train_iterator(cfg, batch_size=4, seed=-1, process_index=0, process_count=1)
  with pytest.raises(datasets.DatasetError, match="cannot be split over 4 processes"):
    input_pipeline.create_train_iterator(_cfg(name="digits", resolution=8, max_examples=3), batch_size=1, seed=0,
                                         process_index=0, process_count=4)


def test_measure_throughput_counts_images():
  it = input_pipeline.create_train_iterator(_cfg(name="digits", resolution=8), batch_size=32, seed=0,
                                            process_index=0, process_count=1)
  rate = input_pipeline.measure_throughput(it, 5)
  assert rate > 100  # images/s; in-memory digits go far faster than any step consumes them


def test_no_tensorflow_imported():
  assert "tensorflow" not in sys.modules
