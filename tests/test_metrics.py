"""Tests for patch_diffusion/metrics.py.

The event files are read back with a reader written here from the format descriptions (TFRecord
framing with a bit-by-bit CRC-32C, protobuf wire format), independent of the writer's code, and,
when the ``tensorboard`` package is installed, with TensorBoard's own loader as well.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import socket
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from patch_diffusion import image_grid
from patch_diffusion import metrics

# ------------------------------------------------------------------------------------------------
# Independent reader.
# ------------------------------------------------------------------------------------------------


def _crc32c_bitwise(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc ^= b
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _read_records(path) -> list[bytes]:
  with open(path, "rb") as f:
    buf = f.read()
  records, pos = [], 0
  while pos < len(buf):
    header = buf[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (hcrc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
    assert hcrc == _masked(_crc32c_bitwise(header)), "bad length CRC"
    data = buf[pos + 12:pos + 12 + length]
    assert len(data) == length, "truncated record"
    (dcrc,) = struct.unpack("<I", buf[pos + 12 + length:pos + 16 + length])
    assert dcrc == _masked(_crc32c_bitwise(data)), "bad data CRC"
    records.append(data)
    pos += 16 + length
  return records


def _decode(buf: bytes) -> dict[int, list]:
  """Protobuf wire format -> {field number: [values]}: varint -> int, fixed -> raw bytes, len -> bytes."""
  out: dict[int, list] = {}
  pos = 0

  def varint():
    nonlocal pos
    value, shift = 0, 0
    while True:
      b = buf[pos]
      pos += 1
      value |= (b & 0x7F) << shift
      shift += 7
      if not b & 0x80:
        return value

  while pos < len(buf):
    key = varint()
    field, wire = key >> 3, key & 7
    if wire == 0:
      val = varint()
    elif wire == 1:
      val, pos = buf[pos:pos + 8], pos + 8
    elif wire == 2:
      n = varint()
      val, pos = buf[pos:pos + n], pos + n
    elif wire == 5:
      val, pos = buf[pos:pos + 4], pos + 4
    else:
      raise AssertionError(f"unexpected wire type {wire}")
    out.setdefault(field, []).append(val)
  assert pos == len(buf)
  return out


def _events(path) -> list[dict]:
  """Each event as {'wall_time', 'step', 'file_version', 'values': [(tag, kind, payload)]}."""
  result = []
  for rec in _read_records(path):
    ev = _decode(rec)
    item = {"wall_time": struct.unpack("<d", ev[1][0])[0], "step": ev.get(2, [0])[0],
            "file_version": ev[3][0].decode() if 3 in ev else None, "values": []}
    for summary in ev.get(5, []):
      for raw in _decode(summary).get(1, []):
        v = _decode(raw)
        tag = v[1][0].decode()
        if 2 in v:
          item["values"].append((tag, "scalar", struct.unpack("<f", v[2][0])[0]))
        elif 4 in v:
          img = _decode(v[4][0])
          item["values"].append((tag, "image", (img[1][0], img[2][0], img[3][0], img[4][0])))
        elif 8 in v:
          tensor = _decode(v[8][0])
          plugin = _decode(_decode(v[9][0])[1][0])[1][0].decode()
          item["values"].append((tag, "tensor", (plugin, tensor[1][0], tensor[8][0].decode())))
    result.append(item)
  return result


def _png_pixels(png: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(png)) as im:
    return np.asarray(im)


# ------------------------------------------------------------------------------------------------
# CRC and framing.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data,expected", [
    (b"123456789", 0xE3069283),
    (b"", 0x00000000),
    (b"a", 0xC1D04330),
    (bytes(32), 0x8A9136AA),               # RFC 3720 B.4 test vectors
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_known_vectors(data, expected):
  assert metrics.crc32c(data) == expected
  assert _crc32c_bitwise(data) == expected  # the test's own reader agrees too


def test_crc32c_large_inputs_match_bitwise_reference():
  # Lengths around the switch to the lane-parallel numpy path and odd lane counts.
  rng = np.random.default_rng(0)
  n_switch, lane = metrics._NUMPY_MIN_BYTES, metrics._LANE_BYTES
  for n in (n_switch - 1, n_switch, n_switch + 1, 37 * lane + 5, 64 * lane, 50_003):
    data = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
    assert metrics.crc32c(data) == _crc32c_bitwise(data), n
  assert metrics.crc32c(bytearray(b"123456789")) == 0xE3069283
  assert metrics.crc32c(memoryview(b"123456789")) == 0xE3069283


def test_masked_crc_and_frame_layout():
  data = b"hello event"
  assert metrics.masked_crc32c(data) == _masked(_crc32c_bitwise(data))
  frame = metrics.tfrecord_frame(data)
  assert len(frame) == 8 + 4 + len(data) + 4
  assert struct.unpack("<Q", frame[:8])[0] == len(data)
  assert frame[12:12 + len(data)] == data


# ------------------------------------------------------------------------------------------------
# Event files.
# ------------------------------------------------------------------------------------------------


def _write_run(workdir):
  img_hwc = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
  batch = np.linspace(-1, 1, 4 * 3 * 2 * 1, dtype=np.float32).reshape(4, 3, 2, 1)
  with metrics.MetricWriter(workdir, process_index=0) as w:
    w.write_scalars(0, {"loss": 1.5, "lr": np.float32(2e-4)})
    w.write_scalars(np.int64(100), {"loss": jnp.asarray(0.25), "kimg": jnp.float32(12.8)})
    w.write_images(100, {"sample": img_hwc, "grid": batch})
    w.write_texts(100, {"note": "hello **world**"})
    path = w.event_path
  return path, img_hwc, batch


def test_event_file_roundtrip_with_independent_reader(tmp_path):
  path, img_hwc, batch = _write_run(tmp_path)
  assert os.path.dirname(path) == str(tmp_path / "tb")
  assert re.fullmatch(r"events\.out\.tfevents\.\d+\." + re.escape(socket.gethostname()),
                      os.path.basename(path))
  events = _events(path)
  assert events[0]["file_version"] == "brain.Event:2" and events[0]["values"] == []
  assert all(e["file_version"] is None for e in events[1:])
  assert [e["step"] for e in events] == [0, 0, 100, 100, 100]
  assert all(abs(e["wall_time"] - events[0]["wall_time"]) < 600 for e in events)
  s0, s1 = events[1]["values"], events[2]["values"]
  assert [(t, k) for t, k, _ in s0] == [("loss", "scalar"), ("lr", "scalar")]
  assert s0[0][2] == 1.5 and s0[1][2] == pytest.approx(2e-4, rel=1e-6)
  assert dict((t, v) for t, _, v in s1) == {"loss": 0.25, "kimg": pytest.approx(12.8, rel=1e-6)}

  (tag_a, kind_a, (h, w, c, png)), (tag_b, _, (gh, gw, gc, gpng)) = events[3]["values"]
  assert (tag_a, kind_a, h, w, c) == ("sample", "image", 5, 7, 3)
  np.testing.assert_array_equal(_png_pixels(png), img_hwc)
  # The NHWC float batch is tiled 2 x 2 and quantised like EDM; grayscale stays one channel.
  assert (tag_b, gh, gw, gc) == ("grid", 6, 4, 1)
  np.testing.assert_array_equal(_png_pixels(gpng), image_grid.make_grid(batch)[..., 0])

  ((tag_t, kind_t, (plugin, dtype, text)),) = events[4]["values"]
  assert (tag_t, kind_t, plugin, dtype, text) == ("note", "tensor", "text", 7, "hello **world**")


def test_flush_makes_records_visible_and_same_second_writers_do_not_clobber(tmp_path):
  w1 = metrics.MetricWriter(tmp_path, process_index=0)
  w2 = metrics.MetricWriter(tmp_path, process_index=0)
  assert w1.event_path != w2.event_path
  w1.write_scalars(3, {"a": 1.0})
  w1.flush()
  assert [e["values"] for e in _events(w1.event_path)][1] == [("a", "scalar", 1.0)]
  with open(tmp_path / "metrics.jsonl") as f:
    assert json.loads(f.readline())["a"] == 1.0
  w1.close()
  w1.close()  # idempotent
  w2.close()
  assert len(_events(w2.event_path)) == 1
  with pytest.raises((RuntimeError, ValueError)):
    w1.write_scalars(4, {"a": 2.0})


def test_jsonl_lines_and_append_across_restarts(tmp_path):
  with metrics.MetricWriter(tmp_path, process_index=0, tensorboard=False) as w:
    w.write_scalars(1, {"loss": jnp.float32(0.5), "n": np.int32(3)})
    w.write_scalars(2, {"loss": float("nan")})
    w.write_images(2, {"x": np.zeros((2, 2, 3), np.uint8)})  # no TensorBoard: ignored
    assert w.event_path is None
  with metrics.MetricWriter(tmp_path, process_index=0, tensorboard=False) as w:
    w.write_scalars(3, {"loss": 0.125})
  assert not (tmp_path / "tb").exists()
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert list(rows[0]) == ["step", "time", "loss", "n"]
  assert rows[0]["loss"] == 0.5 and rows[0]["n"] == 3.0
  assert math.isnan(rows[1]["loss"]) and rows[2]["loss"] == 0.125
  assert all(abs(r["time"] - rows[0]["time"]) < 600 for r in rows)


def test_write_hparams(tmp_path):
  config = ml_collections.ConfigDict({"train": {"lr": 2e-4, "sizes": (16, 32)},
                                      "sample": {"S_max": float("inf")}, "name": "digits"})
  with metrics.MetricWriter(tmp_path, process_index=0) as w:
    w.write_hparams(config)
    path = w.event_path
  with open(tmp_path / "config.json") as f:
    back = json.load(f)
  assert back == {"train": {"lr": 2e-4, "sizes": [16, 32]}, "sample": {"S_max": float("inf")},
                  "name": "digits"}
  ((tag, kind, (plugin, _, text)),) = _events(path)[1]["values"]
  assert (tag, kind, plugin) == ("config", "tensor", "text")
  assert json.loads(text) == back  # indented JSON (a Markdown code block) still parses


def test_non_zero_process_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  w = metrics.MetricWriter(workdir, process_index=1)
  assert not w.active and w.event_path is None
  w.write_scalars(1, {"loss": 1.0})
  w.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
  w.write_texts(1, {"t": "x"})
  w.write_hparams({"a": 1})
  w.flush()
  w.close()
  assert not workdir.exists()


def test_default_process_index_comes_from_jax(tmp_path):
  with metrics.MetricWriter(tmp_path) as w:  # single process here: index 0
    assert w.process_index == 0 and w.active
  assert (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_reads_our_event_files(tmp_path):
  pytest.importorskip(
      "tensorboard",
      reason="tensorboard is not installed; it is only a test dependency (pip install tensorboard)")
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

  path, img_hwc, batch = _write_run(tmp_path)
  raw = list(event_file_loader.LegacyEventFileLoader(path).Load())
  assert raw[0].file_version == "brain.Event:2"
  assert [e.step for e in raw] == [0, 0, 100, 100, 100]

  acc = event_accumulator.EventAccumulator(
      str(tmp_path / "tb"), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
                                           event_accumulator.TENSORS: 0})
  acc.Reload()
  assert [(s.step, s.value) for s in acc.Scalars("loss")] == [(0, 1.5), (100, 0.25)]
  assert acc.Scalars("kimg")[0].value == pytest.approx(12.8, rel=1e-6)
  (sample,) = acc.Images("sample")
  assert (sample.step, sample.height, sample.width) == (100, 5, 7)
  np.testing.assert_array_equal(_png_pixels(sample.encoded_image_string), img_hwc)
  (grid,) = acc.Images("grid")
  np.testing.assert_array_equal(_png_pixels(grid.encoded_image_string),
                                image_grid.make_grid(batch)[..., 0])
  assert acc.PluginTagToContent("text") == {"note": b""}
  (note,) = acc.Tensors("note")
  assert tensor_util.make_ndarray(note.tensor_proto).item() == b"hello **world**"


# ------------------------------------------------------------------------------------------------
# Console line.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds,text", [
    (0, "0:00:00"), (59.4, "0:00:59"), (59.6, "0:01:00"), (3600, "1:00:00"), (3661.6, "1:01:02"),
    (100 * 3600 + 5, "100:00:05"), (-3, "0:00:00"), (None, "--:--:--"), (float("nan"), "--:--:--"),
    (float("inf"), "--:--:--"),
])
def test_format_eta(seconds, text):
  assert metrics.format_eta(seconds) == text


def test_progress_line_and_smoothed_eta():
  p = metrics.ProgressLogger(total_kimg=10, smoothing=0.5)
  line = p.line(step=10, kimg=1.5, loss=jnp.float32(0.5), loss_by_size={16: 0.4, 8: 0.6},
                images_per_s=500.0, sec_per_kimg=2.0, size_histogram={16: 1, 8: 3})
  assert line == ("step 10 | kimg 1.5/10.0 (15.0%) | loss 0.5000 [8: 0.6000 16: 0.4000] | "
                  "500.0 img/s | 2.000 s/kimg | sizes 8:3 16:1 | ETA 0:00:17")  # 8.5 kimg * 2 s
  line = p.line(20, 2.0, 0.25, {}, 250.0, 4.0, {})
  assert p.smoothed_sec_per_kimg == 3.0  # 0.5 * 2 + 0.5 * 4
  assert line.endswith("ETA 0:00:24") and "sizes" not in line and "[" not in line
  line = p.line(30, 2.0, float("nan"), {}, 0.0, float("inf"), {})  # a stalled interval keeps the rate
  assert p.smoothed_sec_per_kimg == 3.0 and "loss nan" in line and line.endswith("ETA 0:00:24")
  assert metrics.ProgressLogger(5).line(0, 0.0, 1.0, {}, 0.0, float("nan"), {}).endswith(
      "ETA --:--:--")
  assert metrics.ProgressLogger(5).line(1, 7.0, 1.0, {}, 1.0, 1.0, {}).endswith("ETA 0:00:00")
  with pytest.raises(ValueError):
    metrics.ProgressLogger(5, smoothing=1.0)
