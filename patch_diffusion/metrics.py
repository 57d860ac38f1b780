"""Process-0 metrics: TensorBoard event files (no TensorFlow), a JSON-lines log and a console line.

TensorBoard reads *event files*: a sequence of TFRecords, each holding one serialized ``Event``
protocol buffer. Both layers are small and stable, so they are written here by hand instead of
pulling in TensorFlow (1.3 GB) or the ``tensorboard`` package at run time (DESIGN.md decisions 9, 11):

* TFRecord framing: ``uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data |
  uint32 masked_crc32c(data)``, where ``masked(c) = ((c >> 15) | (c << 17)) + 0xA282EAD8 (mod 2^32)``
  and crc32c is the Castagnoli CRC (reflected polynomial 0x82F63B78).
* ``Event`` (tensorflow/core/util/event.proto): ``wall_time`` double = 1, ``step`` int64 = 2,
  ``file_version`` string = 3 (only in the first record, ``"brain.Event:2"``), ``summary`` = 5.
* ``Summary`` (tensorflow/core/framework/summary.proto): ``repeated Value value = 1``; ``Value``:
  ``tag`` = 1, ``simple_value`` float = 2, ``image`` = 4, ``tensor`` = 8, ``metadata`` = 9;
  ``Image``: ``height`` = 1, ``width`` = 2, ``colorspace`` = 3, ``encoded_image_string`` = 4.

Everything is written only on JAX process 0: ``MetricWriter`` on any other process is inert, so the
trainer can call it unconditionally.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Any, Mapping, Optional, Union

import numpy as np

from patch_diffusion import image_grid

PathLike = Union[str, os.PathLike]

# ------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), pure Python + numpy.
# ------------------------------------------------------------------------------------------------

_CRC32C_POLY = 0x82F63B78  # bit-reversed 0x1EDC6F41


def _make_table() -> np.ndarray:
  table = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC32C_POLY), table >> 1).astype(np.uint32)
  return table


_TABLE_NP = _make_table()
_TABLE = [int(v) for v in _TABLE_NP]  # Python ints: fastest for the scalar loop

# Below this many bytes the plain table loop wins; above it the lane-parallel numpy version does
# (measured on one CPU core: ~75 ns/byte for the loop; numpy ~0.5 ms fixed + ~6 ns/byte).
_NUMPY_MIN_BYTES = 8192
# Bytes per lane in the lane-parallel version: one vectorized numpy step per byte of a lane, so this
# bounds the Python-level iterations while the number of lanes grows with the data.
_LANE_BYTES = 256


def _crc_update_py(reg: int, data: bytes) -> int:
  """Raw (un-inverted) reflected CRC register after feeding ``data``; the classic table loop."""
  table = _TABLE
  for b in data:
    reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
  return reg


def _byte_tables(columns: np.ndarray) -> np.ndarray:
  """Lookup tables [4, 256] for the GF(2)-linear map on uint32 whose images of bit i are ``columns[i]``.

  ``map(x) = T[0][x & 255] ^ T[1][(x >> 8) & 255] ^ T[2][(x >> 16) & 255] ^ T[3][x >> 24]``.
  """
  tables = np.zeros((4, 256), dtype=np.uint32)
  for k in range(4):
    t = np.zeros(1, dtype=np.uint32)
    for i in range(8):  # doubling: entries with bit i set = entries without it ^ image of bit i
      t = np.concatenate([t, t ^ columns[8 * k + i]])
    tables[k] = t
  return tables


def _apply(tables: np.ndarray, x: np.ndarray) -> np.ndarray:
  return (tables[0][x & 0xFF] ^ tables[1][(x >> 8) & 0xFF] ^ tables[2][(x >> 16) & 0xFF]
          ^ tables[3][x >> 24])


_ZERO_SHIFT_CACHE: dict[int, np.ndarray] = {}


def _zero_shift_tables(n: int) -> np.ndarray:
  """Byte tables of the linear map "feed n zero bytes to the raw register" (cached per n).

  Only ``_LANE_BYTES * 2^k`` is ever asked for, so the cache holds at most a few dozen [4, 256] tables.
  """
  if n in _ZERO_SHIFT_CACHE:
    return _ZERO_SHIFT_CACHE[n]
  basis = np.uint32(1) << np.arange(32, dtype=np.uint32)
  # One zero byte: reg -> T[reg & 255] ^ (reg >> 8); then square-and-multiply on the 32 columns.
  one = _TABLE_NP[basis & 0xFF] ^ (basis >> 8)
  result_cols = basis.copy()  # identity
  power = _byte_tables(one)
  m = n
  while m:
    if m & 1:
      result_cols = _apply(power, result_cols)
    m >>= 1
    if m:
      power = _byte_tables(_apply(power, _columns_of(power)))
  tables = _byte_tables(result_cols)
  _ZERO_SHIFT_CACHE[n] = tables
  return tables


def _columns_of(tables: np.ndarray) -> np.ndarray:
  basis = np.uint32(1) << np.arange(32, dtype=np.uint32)
  return _apply(tables, basis)


def _crc_raw_numpy(data: bytes) -> int:
  """Raw register (initial value 0) after ``data``, computed over many lanes at once.

  The raw CRC register is GF(2)-linear in the message, and zero bytes fed to a zero register leave it
  zero. So: left-pad with zeros to whole lanes of ``_LANE_BYTES``, run the table recurrence on all
  lanes in parallel (one numpy step per byte column), then fold neighbouring lanes pairwise with
  ``reg(A || B) = shift_{len(B)}(reg(A)) ^ reg(B)`` (an odd count gets a zero lane in front, which is
  more leading zeros). Lane lengths are always ``_LANE_BYTES * 2^k``, so the shift tables are reused.
  """
  n = len(data)
  lanes = -(-n // _LANE_BYTES)
  buf = np.zeros(lanes * _LANE_BYTES, dtype=np.uint8)
  buf[lanes * _LANE_BYTES - n:] = np.frombuffer(data, dtype=np.uint8)
  cols = np.ascontiguousarray(buf.reshape(lanes, _LANE_BYTES).T).astype(np.uint32)
  reg = np.zeros(lanes, dtype=np.uint32)
  table = _TABLE_NP
  for j in range(_LANE_BYTES):
    reg = table[(reg ^ cols[j]) & 0xFF] ^ (reg >> 8)
  length = _LANE_BYTES
  while reg.shape[0] > 1:
    if reg.shape[0] % 2:
      reg = np.concatenate([np.zeros(1, dtype=np.uint32), reg])
    reg = _apply(_zero_shift_tables(length), reg[0::2]) ^ reg[1::2]
    length *= 2
  return int(reg[0])


def crc32c(data: Union[bytes, bytearray, memoryview]) -> int:
  """CRC-32C (Castagnoli) of ``data`` as an unsigned 32-bit int; ``crc32c(b"123456789") == 0xE3069283``."""
  data = bytes(data)
  if len(data) < _NUMPY_MIN_BYTES:
    return _crc_update_py(0xFFFFFFFF, data) ^ 0xFFFFFFFF
  # Starting the register at 0xFFFFFFFF equals starting at 0 with the first 4 bytes inverted
  # (the register's low byte is xored into each input byte), which keeps the numpy path at init 0.
  head = bytes(b ^ 0xFF for b in data[:4])
  return _crc_raw_numpy(head + data[4:]) ^ 0xFFFFFFFF


def masked_crc32c(data: Union[bytes, bytearray, memoryview]) -> int:
  """TFRecord's masked CRC-32C: ``((c >> 15) | (c << 17)) + 0xA282EAD8`` modulo 2^32."""
  c = crc32c(data)
  return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
  """One TFRecord: length (uint64 LE), masked CRC of the length, data, masked CRC of the data."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


# ------------------------------------------------------------------------------------------------
# Protocol-buffer encoding (only the fields TensorBoard needs).
# ------------------------------------------------------------------------------------------------

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
  if value < 0:  # int64 negatives are encoded as their 64-bit two's complement
    value += 1 << 64
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
  return _key(field, _BYTES) + _varint(len(payload)) + payload


def _varint_field(field: int, value: int) -> bytes:
  return _key(field, _VARINT) + _varint(int(value))


def scalar_value(tag: str, value: float) -> bytes:
  """``Summary.Value`` with ``simple_value`` (float32 on disk, as TensorBoard stores scalars)."""
  return _bytes_field(1, tag.encode()) + _key(2, _FIXED32) + struct.pack("<f", float(value))


def image_value(tag: str, png: bytes, height: int, width: int, channels: int) -> bytes:
  """``Summary.Value`` with an ``Image`` (colorspace = channels: 1 gray, 3 RGB, 4 RGBA)."""
  image = (_varint_field(1, height) + _varint_field(2, width) + _varint_field(3, channels)
           + _bytes_field(4, png))
  return _bytes_field(1, tag.encode()) + _bytes_field(4, image)


def text_value(tag: str, text: str) -> bytes:
  """``Summary.Value`` with a scalar string ``TensorProto`` tagged for TensorBoard's text plugin."""
  # TensorProto: dtype = 1 (DT_STRING = 7), tensor_shape = 2 (empty = scalar), string_val = 8.
  tensor = _varint_field(1, 7) + _bytes_field(2, b"") + _bytes_field(8, text.encode())
  # SummaryMetadata: plugin_data = 1 -> PluginData { plugin_name = 1 }.
  metadata = _bytes_field(1, _bytes_field(1, b"text"))
  return _bytes_field(1, tag.encode()) + _bytes_field(8, tensor) + _bytes_field(9, metadata)


def encode_event(wall_time: float, step: int, *, file_version: Optional[str] = None,
                 values: Optional[list[bytes]] = None) -> bytes:
  """Serialized ``Event``; ``values`` are encoded ``Summary.Value`` messages (empty = no summary)."""
  out = _key(1, _FIXED64) + struct.pack("<d", float(wall_time)) + _varint_field(2, int(step))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if values:
    out += _bytes_field(5, b"".join(_bytes_field(1, v) for v in values))
  return out


class EventFileWriter:
  """Appends ``Event`` records to a new ``events.out.tfevents.<time>.<host>`` file in ``logdir``.

  The first record carries ``file_version = "brain.Event:2"`` as TensorBoard expects. Records are
  buffered; ``flush()`` pushes them to the OS, ``close()`` flushes and closes.
  """

  def __init__(self, logdir: PathLike):
    self.logdir = os.fspath(logdir)
    os.makedirs(self.logdir, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
    path = os.path.join(self.logdir, name)
    # Two writers started in the same second (a quick restart) must not clobber each other's file.
    suffix = 0
    while os.path.exists(path):
      suffix += 1
      path = os.path.join(self.logdir, f"{name}.{os.getpid()}.{suffix}")
    self.path = path
    self._file = open(path, "xb")
    self._write(encode_event(now, 0, file_version="brain.Event:2"))
    self.flush()

  def _write(self, event: bytes) -> None:
    self._file.write(tfrecord_frame(event))

  def add_values(self, step: int, values: list[bytes], wall_time: Optional[float] = None) -> None:
    """Writes one ``Event`` at ``step`` holding a ``Summary`` with the encoded ``values``."""
    if self._file is None:
      raise RuntimeError(f"event file {self.path} is closed")
    self._write(encode_event(time.time() if wall_time is None else wall_time, step, values=values))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.flush()
      self._file.close()
      self._file = None

  @property
  def closed(self) -> bool:
    return self._file is None


# ------------------------------------------------------------------------------------------------
# The writer the trainer uses.
# ------------------------------------------------------------------------------------------------


def _to_jsonable(config: Any) -> Any:
  """ConfigDict / Mapping / tuple trees -> plain JSON-compatible Python (unknown leaves via str)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if isinstance(config, Mapping):
    return {str(k): _to_jsonable(v) for k, v in config.items()}
  if isinstance(config, (list, tuple)):
    return [_to_jsonable(v) for v in config]
  if isinstance(config, (str, bool, int, float)) or config is None:
    return config
  if isinstance(config, np.generic) or (hasattr(config, "shape") and np.shape(config) == ()):
    return np.asarray(config).item()
  return str(config)


class MetricWriter:
  """TensorBoard scalars/images/text + ``metrics.jsonl`` + ``config.json``, written by process 0 only.

  On every other process all methods return immediately and nothing is created on disk, so callers
  need no ``if jax.process_index() == 0`` of their own.

  Files (process 0): ``<workdir>/tb/events.out.tfevents.*`` (or ``tb_dir``), ``<workdir>/metrics.jsonl``
  (one ``{"step", "time", **scalars}`` object per ``write_scalars`` call, appended across restarts;
  non-finite values appear as ``NaN`` / ``Infinity`` as Python's json writes them) and, from
  ``write_hparams``, ``<workdir>/config.json``.
  """

  def __init__(self, workdir: PathLike, *, tb_dir: Optional[PathLike] = None,
               process_index: Optional[int] = None, tensorboard: bool = True,
               jsonl_name: str = "metrics.jsonl"):
    """Opens the files on process 0.

    Args:
      workdir: run directory.
      tb_dir: directory of the event file; default ``<workdir>/tb``.
      process_index: this process's index; default ``jax.process_index()``.
      tensorboard: False writes only the JSON-lines log.
      jsonl_name: file name of the JSON-lines log inside ``workdir``.
    """
    if process_index is None:
      import jax  # pylint: disable=g-import-not-at-top  (keeps this module importable without JAX)
      process_index = jax.process_index()
    self.process_index = int(process_index)
    self.active = self.process_index == 0
    self.workdir = os.fspath(workdir)
    self.tb_dir = os.fspath(tb_dir) if tb_dir is not None else os.path.join(self.workdir, "tb")
    self.jsonl_path = os.path.join(self.workdir, jsonl_name)
    self._events: Optional[EventFileWriter] = None
    self._jsonl = None
    if not self.active:
      return
    os.makedirs(self.workdir, exist_ok=True)
    if tensorboard:
      self._events = EventFileWriter(self.tb_dir)
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")

  @property
  def event_path(self) -> Optional[str]:
    """Path of the event file (None on processes other than 0 or without TensorBoard)."""
    return self._events.path if self._events is not None else None

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs scalars at ``step`` to TensorBoard and as one JSON line.

    Args:
      step: training step (int or a 0-d array).
      scalars: tag -> value; Python, numpy or (already fetched or not) 0-d JAX values, converted with
        ``float()`` here, so callers fetch from device only on log steps.
    """
    if not self.active:
      return
    step = int(step)
    values = {str(k): float(v) for k, v in scalars.items()}
    if self._events is not None and values:
      self._events.add_values(step, [scalar_value(k, v) for k, v in values.items()])
    self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Logs images at ``step`` to TensorBoard as PNGs (no-op without TensorBoard).

    Args:
      step: training step.
      images: tag -> ``[H, W, C]`` image, or ``[N, H, W, C]`` batch tiled with ``make_grid``;
        uint8, or float in [-1, 1] (quantised as EDM does). C in {1, 3, 4}.
    """
    if not self.active or self._events is None:
      return
    values = []
    for tag, img in images.items():
      arr = np.asarray(img)
      if arr.ndim == 4:
        arr = image_grid.make_grid(arr)
      arr = image_grid.to_uint8(arr)
      if arr.ndim == 2:
        arr = arr[..., None]
      h, w, c = arr.shape
      values.append(image_value(str(tag), image_grid.encode_png(arr), h, w, c))
    if values:
      self._events.add_values(int(step), values)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Logs strings at ``step`` to TensorBoard's Text tab (rendered as Markdown)."""
    if not self.active or self._events is None:
      return
    values = [text_value(str(tag), str(text)) for tag, text in texts.items()]
    if values:
      self._events.add_values(int(step), values)

  def write_hparams(self, config: Any, step: int = 0) -> None:
    """Records the run configuration: ``<workdir>/config.json`` and a ``config`` text summary.

    Args:
      config: ``ml_collections.ConfigDict`` or nested mapping; leaves that JSON cannot hold are
        written with ``str``.
      step: step to attach the text summary to.
    """
    if not self.active:
      return
    text = json.dumps(_to_jsonable(config), indent=2)
    tmp = os.path.join(self.workdir, f".config.json.{os.getpid()}.tmp")  # atomic replace below
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text + "\n")
    os.replace(tmp, os.path.join(self.workdir, "config.json"))
    # Four-space indentation makes Markdown render the JSON as a code block in the Text tab.
    self.write_texts(step, {"config": "\n".join("    " + line for line in text.splitlines())})

  def flush(self) -> None:
    """Pushes buffered records to the OS (both files)."""
    if not self.active:
      return
    if self._events is not None:
      self._events.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    """Flushes and closes; later writes raise on process 0. Safe to call twice."""
    if not self.active:
      return
    if self._events is not None:
      self._events.close()
    if self._jsonl is not None and not self._jsonl.closed:
      self._jsonl.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------------------------------------
# Console progress line.
# ------------------------------------------------------------------------------------------------


def format_eta(seconds: Optional[float]) -> str:
  """Seconds -> ``h:mm:ss`` (hours unbounded, rounded to the nearest second); ``--:--:--`` if unknown."""
  if seconds is None or not math.isfinite(seconds):
    return "--:--:--"
  s = int(round(max(0.0, seconds)))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _fmt_loss(x: Any) -> str:
  return "nan" if x is None else f"{float(x):.4f}"


class ProgressLogger:
  """Formats one console line per log step; the ETA uses an exponentially smoothed s/kimg.

  Example line::

    step 1200 | kimg 153.6/200000.0 (0.1%) | loss 0.4123 [16: 0.4301 32: 0.4012 64: 0.3950] |
    1234.5 img/s | 0.810 s/kimg | sizes 16:45 32:30 64:25 | ETA 44:58:32

  (one line in practice). The trainer passes it to ``absl.logging.info``.
  """

  def __init__(self, total_kimg: float, smoothing: float = 0.9):
    """Starts with no rate; the first finite ``sec_per_kimg`` seeds the average.

    Args:
      total_kimg: training length in counted kimg.
      smoothing: EMA factor for s/kimg (0 = use the latest interval only).
    """
    if not 0.0 <= smoothing < 1.0:
      raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    self.total_kimg = float(total_kimg)
    self.smoothing = float(smoothing)
    self._sec_per_kimg: Optional[float] = None

  @property
  def smoothed_sec_per_kimg(self) -> Optional[float]:
    return self._sec_per_kimg

  def eta_seconds(self, kimg: float) -> Optional[float]:
    """Remaining seconds at ``kimg`` from the smoothed rate (None before any finite rate)."""
    if self._sec_per_kimg is None:
      return None
    return max(0.0, self.total_kimg - float(kimg)) * self._sec_per_kimg

  def line(self, step: int, kimg: float, loss: Any, loss_by_size: Mapping[int, Any],
           images_per_s: float, sec_per_kimg: float, size_histogram: Mapping[int, int]) -> str:
    """Updates the smoothed rate with ``sec_per_kimg`` and returns the progress line.

    Args:
      step: training step.
      kimg: counted images so far, in thousands.
      loss: mean loss over the log interval (float or 0-d array).
      loss_by_size: patch size (px) -> mean loss of the steps at that size in the interval.
      images_per_s: counted images per second over the interval.
      sec_per_kimg: seconds per thousand counted images over the interval.
      size_histogram: patch size (px) -> number of steps at that size (in the interval).
    """
    rate = float(sec_per_kimg)
    if math.isfinite(rate) and rate > 0:
      if self._sec_per_kimg is None:
        self._sec_per_kimg = rate
      else:
        self._sec_per_kimg = self.smoothing * self._sec_per_kimg + (1 - self.smoothing) * rate
    kimg = float(kimg)
    pct = 100.0 * kimg / self.total_kimg if self.total_kimg > 0 else 0.0
    parts = [f"step {int(step)}", f"kimg {kimg:.1f}/{self.total_kimg:.1f} ({pct:.1f}%)"]
    loss_part = f"loss {_fmt_loss(loss)}"
    if loss_by_size:
      loss_part += " [" + " ".join(f"{int(s)}: {_fmt_loss(loss_by_size[s])}"
                                   for s in sorted(loss_by_size)) + "]"
    parts.append(loss_part)
    parts.append(f"{float(images_per_s):.1f} img/s")
    parts.append(f"{rate:.3f} s/kimg")
    if size_histogram:
      parts.append("sizes " + " ".join(f"{int(s)}:{int(size_histogram[s])}"
                                       for s in sorted(size_histogram)))
    parts.append(f"ETA {format_eta(self.eta_seconds(kimg))}")
    return " | ".join(parts)
