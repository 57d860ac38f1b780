"""Progress lines with an ETA: the one formatter every long loop of the project uses.

* :class:`ProgressLogger` — the training line (step, kimg, loss per patch size, img/s, s/kimg, size
  histogram, ETA from an exponentially smoothed s/kimg).
* :class:`CountProgress` — any loop over a known number of items (sampling, FID feature passes, reference
  statistics, latent encoding): ``what: done/total (rate unit/s, ETA h:mm:ss)`` at most every
  ``every_s`` seconds, and a closing line with the total time.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging


def format_eta(seconds: Optional[float]) -> str:
  """Seconds -> ``h:mm:ss`` (hours unbounded, rounded to the nearest second); ``--:--:--`` if unknown."""
  if seconds is None or not math.isfinite(seconds):
    return "--:--:--"
  s = int(round(max(0.0, seconds)))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class CountProgress:
  """Logs ``what: done/total (rate/s, ETA)`` for a loop over ``total`` items.

  Args:
    what: label, e.g. ``"sampling"``.
    total: items the loop will produce.
    unit: what an item is, for the rate (``"img"``).
    every_s: at most one line per this many seconds (the last update always logs).
    log: the logging function (``absl.logging.info``).
  """

  def __init__(self, what: str, total: int, unit: str = "img", every_s: float = 30.0,
               log: Callable[..., None] = logging.info):
    self.what, self.total, self.unit, self.every_s, self._log = what, int(total), unit, every_s, log
    self.start = time.time()
    self._last = self.start

  def rate(self, done: int) -> float:
    return done / max(time.time() - self.start, 1e-9)

  def line(self, done: int) -> str:
    rate = self.rate(done)
    eta = (self.total - done) / rate if rate > 0 else None
    return f"{self.what}: {done}/{self.total} ({rate:.1f} {self.unit}/s, ETA {format_eta(eta)})"

  def update(self, done: int) -> None:
    """Reports ``done`` items so far; logs when ``every_s`` has passed or the loop is complete."""
    now = time.time()
    if done >= self.total or now - self._last >= self.every_s:
      self._log("%s", self.line(done))
      self._last = now

  def finish(self) -> float:
    """Logs the total time; returns it in seconds."""
    elapsed = time.time() - self.start
    self._log("%s: %d %s in %.1f s (%.1f %s/s)", self.what, self.total, self.unit, elapsed,
              self.total / max(elapsed, 1e-9), self.unit)
    return elapsed


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
