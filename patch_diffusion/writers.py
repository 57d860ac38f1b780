"""Process-0 run outputs: TensorBoard event files (tensorboardX), ``metrics.jsonl``, ``config.json``.

TensorBoard files are written by tensorboardX (no TensorFlow). Every file goes through ``etils.epath``
(``fileio.py``), so the workdir may be ``gs://...``: tensorboardX is given an epath-backed record writer
for object-store URLs (an object becomes visible when its writer closes: on object stores the event file
appears at the end of the run or on ``close()``, the JSON lines at every flush).

Only JAX process 0 writes: a :class:`MetricWriter` on any other process is inert, so the trainer calls it
unconditionally.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Mapping, Optional

import numpy as np

from patch_diffusion import fileio
from patch_diffusion import image_grid

# tensorboardX's writer module tries `import torch` at import time (only to accept torch tensors, which this
# project never logs): with torch installed that import costs 2.5-3.5 s of every run's start-up on a 2-core
# CPU. It is hidden for the duration of tensorboardX's import (a None entry in sys.modules makes the import
# raise ImportError, which tensorboardX handles) unless torch is already loaded; later `import torch`
# statements, e.g. in a notebook, load it as usual.
_HIDE_TORCH = "torch" not in sys.modules
if _HIDE_TORCH:
  sys.modules["torch"] = None  # type: ignore[assignment]
try:
  import tensorboardX  # pylint: disable=g-import-not-at-top
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
finally:
  if _HIDE_TORCH and sys.modules.get("torch", 0) is None:
    del sys.modules["torch"]


class _EpathRecordFiles:
  """tensorboardX writer factory for object-store URLs: event files opened through ``etils.epath``."""

  def open(self, path: str):
    return fileio.as_path(path).open("wb")

  def directory_check(self, path: str) -> None:
    fileio.makedirs(path)


for _scheme in ("gs", "s3"):
  record_writer.register_writer_factory(_scheme, _EpathRecordFiles())


class MetricWriter:
  """TensorBoard scalars/images/text + ``metrics.jsonl`` + ``config.json``, written by process 0 only.

  Files (process 0): ``<workdir>/tb/events.out.tfevents.*`` (or ``tb_dir``), ``<workdir>/metrics.jsonl``
  (one ``{"step", "time", **scalars}`` object per ``write_scalars`` call, appended across restarts;
  non-finite values appear as ``NaN`` / ``Infinity`` as Python's json writes them) and, from
  ``write_hparams``, ``<workdir>/config.json``.
  """

  def __init__(self, workdir: fileio.PathLike, *, tb_dir: Optional[fileio.PathLike] = None,
               process_index: Optional[int] = None, tensorboard: bool = True,
               jsonl_name: str = "metrics.jsonl"):
    """Opens the files on process 0.

    Args:
      workdir: run directory (local or ``gs://``).
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
    self.workdir = fileio.as_path(workdir)
    self.tb_dir = fileio.as_path(tb_dir) if tb_dir is not None else self.workdir / "tb"
    self.jsonl_path = self.workdir / jsonl_name
    self._tb: Optional[tensorboardX.SummaryWriter] = None
    self._pending: list[str] = []  # JSON lines not yet written (flushed at every write_scalars call)
    self._closed = False
    if not self.active:
      return
    fileio.makedirs(self.workdir)
    if tensorboard:
      # flush_secs: tensorboardX also flushes in a background thread; flush() forces it.
      self._tb = tensorboardX.SummaryWriter(logdir=str(self.tb_dir), flush_secs=30, max_queue=100)

  @property
  def event_path(self) -> Optional[str]:
    """Path of the event file (None on processes other than 0 or without TensorBoard)."""
    if self._tb is None:
      return None
    return self._tb.file_writer.event_writer._ev_writer._file_name  # pylint: disable=protected-access

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError(f"MetricWriter for {self.workdir} is closed")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs scalars at ``step`` to TensorBoard and as one JSON line.

    Args:
      step: training step (int or a 0-d array).
      scalars: tag -> value; Python, numpy or (already fetched or not) 0-d JAX values, converted with
        ``float()`` here, so callers fetch from device only on log steps.
    """
    if not self.active:
      return
    self._check_open()
    step = int(step)
    values = {str(k): float(v) for k, v in scalars.items()}
    now = time.time()
    if self._tb is not None:
      for tag, value in values.items():
        self._tb.add_scalar(tag, value, global_step=step, walltime=now)
    self._pending.append(json.dumps({"step": step, "time": round(now, 3), **values}))
    fileio.append_lines(self.jsonl_path, self._pending)
    self._pending = []

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Logs images at ``step`` to TensorBoard as PNGs (no-op without TensorBoard).

    Args:
      step: training step.
      images: tag -> ``[H, W, C]`` image, or ``[N, H, W, C]`` batch tiled with ``make_grid``;
        uint8, or float in [-1, 1] (quantised as EDM does). C in {1, 3, 4}.
    """
    if not self.active or self._tb is None:
      return
    self._check_open()
    for tag, img in images.items():
      arr = np.asarray(img)
      if arr.ndim == 4:
        arr = image_grid.make_grid(arr)
      arr = image_grid.to_uint8(arr)
      if arr.ndim == 2:
        arr = arr[..., None]
      self._tb.add_image(str(tag), arr, global_step=int(step), dataformats="HWC")

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Logs strings at ``step`` to TensorBoard's Text tab (rendered as Markdown)."""
    if not self.active or self._tb is None:
      return
    self._check_open()
    for tag, text in texts.items():
      self._tb.add_text(str(tag), str(text), global_step=int(step))

  def write_hparams(self, config: Any, step: int = 0) -> None:
    """Records the run configuration: ``<workdir>/config.json`` and a ``config`` text summary."""
    if not self.active:
      return
    text = fileio.config_json(config)
    fileio.write_text(self.workdir / "config.json", text + "\n")
    # Four-space indentation makes Markdown render the JSON as a code block in the Text tab.
    self.write_texts(step, {"config": "\n".join("    " + line for line in text.splitlines())})

  def flush(self) -> None:
    """Pushes buffered TensorBoard records to the file (JSON lines are written on every call)."""
    if self.active and self._tb is not None and not self._closed:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes; later writes raise on process 0. Safe to call twice."""
    if not self.active or self._closed:
      return
    if self._tb is not None:
      self._tb.close()
    self._closed = True

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
