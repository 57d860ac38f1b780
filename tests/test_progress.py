"""Progress lines and ETAs (patch_diffusion/progress.py): the one formatter every long loop uses."""
from __future__ import annotations

import jax.numpy as jnp
import pytest

from patch_diffusion import progress


@pytest.mark.parametrize("seconds,text", [
    (0, "0:00:00"), (59.4, "0:00:59"), (59.6, "0:01:00"), (3600, "1:00:00"), (3661.6, "1:01:02"),
    (100 * 3600 + 5, "100:00:05"), (-3, "0:00:00"), (None, "--:--:--"), (float("nan"), "--:--:--"),
    (float("inf"), "--:--:--"),
])
def test_format_eta(seconds, text):
  assert progress.format_eta(seconds) == text


def test_progress_line_and_smoothed_eta():
  p = progress.ProgressLogger(total_kimg=10, smoothing=0.5)
  line = p.line(step=10, kimg=1.5, loss=jnp.float32(0.5), loss_by_size={16: 0.4, 8: 0.6},
                images_per_s=500.0, sec_per_kimg=2.0, size_histogram={16: 1, 8: 3})
  assert line == ("step 10 | kimg 1.5/10.0 (15.0%) | loss 0.5000 [8: 0.6000 16: 0.4000] | "
                  "500.0 img/s | 2.000 s/kimg | sizes 8:3 16:1 | ETA 0:00:17")  # 8.5 kimg * 2 s
  line = p.line(20, 2.0, 0.25, {}, 250.0, 4.0, {})
  assert p.smoothed_sec_per_kimg == 3.0  # 0.5 * 2 + 0.5 * 4
  assert line.endswith("ETA 0:00:24") and "sizes" not in line and "[" not in line
  line = p.line(30, 2.0, float("nan"), {}, 0.0, float("inf"), {})  # a stalled interval keeps the rate
  assert p.smoothed_sec_per_kimg == 3.0 and "loss nan" in line and line.endswith("ETA 0:00:24")
  assert progress.ProgressLogger(5).line(0, 0.0, 1.0, {}, 0.0, float("nan"), {}).endswith("ETA --:--:--")
  assert progress.ProgressLogger(5).line(1, 7.0, 1.0, {}, 1.0, 1.0, {}).endswith("ETA 0:00:00")
  with pytest.raises(ValueError):
    progress.ProgressLogger(5, smoothing=1.0)


def test_count_progress_logs_rate_eta_and_the_last_update(monkeypatch):
  lines = []
  # Calls: start; update(10); update(40) + its rate; update(100) + its rate; finish.
  clock = iter([100.0, 105.0, 110.0, 110.0, 111.0, 111.0, 112.0])
  monkeypatch.setattr(progress.time, "time", lambda: next(clock))
  count = progress.CountProgress("sampling", 100, every_s=10.0, log=lambda fmt, *a: lines.append(fmt % a))
  count.update(10)   # t = 105: 5 s since the start, under every_s: silent
  count.update(40)   # t = 110: logs; 40 in 10 s = 4 img/s, 60 left -> 15 s
  count.update(100)  # t = 111: complete: always logs
  assert lines == ["sampling: 40/100 (4.0 img/s, ETA 0:00:15)", "sampling: 100/100 (9.1 img/s, ETA 0:00:00)"]
  assert count.finish() == pytest.approx(12.0)
