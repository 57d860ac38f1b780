"""Run outputs (patch_diffusion/writers.py): TensorBoard event files via tensorboardX, read back with
TensorBoard's own reader; metrics.jsonl; config.json; process-0 only; paths through fileio."""
from __future__ import annotations

import io
import json
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from patch_diffusion import fileio
from patch_diffusion import image_grid
from patch_diffusion import writers


def _png_pixels(png: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(png)))


def _accumulator(tb_dir) -> event_accumulator.EventAccumulator:
  acc = event_accumulator.EventAccumulator(
      str(tb_dir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
                                  event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def test_tensorboard_reads_scalars_images_and_text(tmp_path):
  img_hwc = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
  batch = np.linspace(-1, 1, 4 * 3 * 2).reshape(4, 3, 2, 1).astype(np.float32)
  with writers.MetricWriter(tmp_path, process_index=0) as w:
    w.write_scalars(0, {"loss": 1.5})
    w.write_scalars(100, {"loss": jnp.float32(0.25), "kimg": np.float64(12.8)})
    w.write_images(100, {"sample": img_hwc, "grid": batch})
    w.write_texts(100, {"note": "hello **world**"})
  acc = _accumulator(tmp_path / "tb")
  assert [(s.step, s.value) for s in acc.Scalars("loss")] == [(0, 1.5), (100, 0.25)]
  assert acc.Scalars("kimg")[0].value == pytest.approx(12.8, rel=1e-6)
  (sample,) = acc.Images("sample")
  assert (sample.step, sample.height, sample.width) == (100, 5, 7)
  np.testing.assert_array_equal(_png_pixels(sample.encoded_image_string), img_hwc)
  (grid,) = acc.Images("grid")
  # The NHWC float batch is tiled 2 x 2 and quantised like EDM; grayscale stays one channel.
  np.testing.assert_array_equal(_png_pixels(grid.encoded_image_string).reshape(grid.height, grid.width, -1)[..., 0],
                                image_grid.make_grid(batch)[..., 0])
  assert "note/text_summary" in acc.Tags()["tensors"]


def test_jsonl_lines_and_append_across_restarts(tmp_path):
  with writers.MetricWriter(tmp_path, process_index=0, tensorboard=False) as w:
    w.write_scalars(1, {"loss": jnp.float32(0.5), "n": np.int32(3)})
    w.write_scalars(2, {"loss": float("nan")})
    w.write_images(2, {"x": np.zeros((2, 2, 3), np.uint8)})  # no TensorBoard: ignored
    assert w.event_path is None
  with writers.MetricWriter(tmp_path, process_index=0, tensorboard=False) as w:
    w.write_scalars(3, {"loss": 0.125})
  assert not (tmp_path / "tb").exists()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert list(rows[0]) == ["step", "time", "loss", "n"]
  assert rows[0]["loss"] == 0.5 and rows[0]["n"] == 3.0
  assert math.isnan(rows[1]["loss"]) and rows[2]["loss"] == 0.125


def test_write_hparams_and_closed_writer(tmp_path):
  config = ml_collections.ConfigDict({"train": {"lr": 2e-4, "sizes": (16, 32)},
                                      "sample": {"S_max": float("inf")}, "name": "digits"})
  w = writers.MetricWriter(tmp_path, process_index=0)
  w.write_hparams(config)
  w.close()
  w.close()  # idempotent
  back = json.loads((tmp_path / "config.json").read_text())
  assert back == {"train": {"lr": 2e-4, "sizes": [16, 32]}, "sample": {"S_max": float("inf")},
                  "name": "digits"}
  assert "config/text_summary" in _accumulator(tmp_path / "tb").Tags()["tensors"]
  with pytest.raises(RuntimeError, match="closed"):
    w.write_scalars(4, {"a": 2.0})


def test_non_zero_process_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  w = writers.MetricWriter(workdir, process_index=1)
  assert not w.active and w.event_path is None
  w.write_scalars(1, {"loss": 1.0})
  w.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
  w.write_texts(1, {"t": "x"})
  w.write_hparams({"a": 1})
  w.flush()
  w.close()
  assert not workdir.exists()


def test_default_process_index_comes_from_jax(tmp_path):
  with writers.MetricWriter(tmp_path) as w:  # single process here: index 0
    assert w.process_index == 0 and w.active
    w.write_scalars(1, {"a": 1.0})
  assert (tmp_path / "metrics.jsonl").exists()


def test_fileio_atomic_writes_leave_no_temporaries(tmp_path):
  target = tmp_path / "a" / "b.json"
  fileio.write_json(target, {"x": (1, 2), "y": np.float32(0.5), "z": float("inf")})
  assert json.loads(target.read_text()) == {"x": [1, 2], "y": 0.5, "z": float("inf")}
  fileio.write_text(target, "replaced")
  assert target.read_text() == "replaced"
  fileio.append_lines(tmp_path / "log.txt", ["one", "two"])
  fileio.append_lines(tmp_path / "log.txt", ["three"])
  assert (tmp_path / "log.txt").read_text() == "one\ntwo\nthree\n"
  assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.json"]  # no .tmp left behind
  assert not fileio.is_url(tmp_path) and fileio.is_url("gs://bucket/run")


def test_importing_the_writers_leaves_torch_unloaded_but_importable():
  # tensorboardX imports torch when it can (2.5-3.5 s of every run's start-up); the writers hide it.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  code = ("import importlib.util, sys\n"
          "from patch_diffusion import writers\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
          "if importlib.util.find_spec('torch') is not None:\n"
          "  import torch\n"
          "  print(float(torch.ones(2).sum()))\n"
          "else:\n"
          "  print(2.0)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
  assert out.stdout.split() == ["[]", "2.0"]
