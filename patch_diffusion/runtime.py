"""Process-level runtime settings for the XLA:CPU backend.

**Host allocator.** XLA:CPU allocates every executable's temporaries as one block per execution (the
DDPM++ demo step at patch 16, batch 64: 182 MB; CelebA-64 at batch 8: ≈1.5 GB) and frees it afterwards.
glibc serves blocks above its mmap threshold (at most 32 MB) with fresh ``mmap`` pages and returns them
on ``free``, so every step page-faults through its whole temporary block again: 66,700 minor faults per
demo step at patch 16, ≈25 % of the step's CPU time on the 2-core development VM. PyTorch's eager
tensors (a few MB each) stay under the threshold and are reused, so it does not pay this.

:func:`retain_host_memory` makes glibc serve large blocks from its heap and keep freed memory
(``M_ARENA_MAX=1``: one arena, because blocks above 64 MB cannot come from a thread's secondary arena;
``M_MMAP_MAX=0``: no ``mmap`` blocks; ``M_TRIM_THRESHOLD`` −1: never shrink the heap). Steady-state
steps then fault 0 times. The price: the process keeps its peak heap (for CPU training, the largest
step's temporaries, which it needs again next step), and all threads share one malloc arena.

It must run before the JAX backend starts (the first array or device query): arenas, once a thread
has one, stay. ``patch_diffusion.main`` calls it first thing on a CPU-only host (:func:`cpu_only_host`:
with a GPU or TPU the big temporaries live in device memory, and one shared malloc arena would only
slow the input pipeline's threads), and the benchmarks call it; set ``PATCH_DIFFUSION_MALLOC=default``
to keep glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

from absl import logging

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_applied = False


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # private API: assume not started rather than fail
    return False


def retain_host_memory() -> bool:
  """Keeps large freed host blocks in the process (see the module docstring); True when applied.

  No-op (False) off glibc, with ``PATCH_DIFFUSION_MALLOC=default``, or once the JAX backend has started
  (too late to move XLA's threads to the main arena; logged). Idempotent.
  """
  global _applied
  if _applied:
    return True
  if os.environ.get("PATCH_DIFFUSION_MALLOC", "retain") == "default" or not sys.platform.startswith("linux"):
    return False
  if _backend_started():
    logging.warning("retain_host_memory: the JAX backend has already started; host allocator left as is")
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only: musl has no mallopt knobs)
    ok = all(libc.mallopt(opt, value) == 1 for opt, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  except (OSError, AttributeError):
    return False
  _applied = ok
  return ok


def cpu_only_host() -> bool:
  """True when JAX will run on the CPU: ``JAX_PLATFORMS`` is ``cpu``, or unset with no GPU or TPU
  device files (``/dev/nvidia[0-9]*``, ``/dev/accel*``, ``/dev/vfio/[0-9]*``). Starts no backend."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] == "cpu"
  return not any(glob.glob(p) for p in ("/dev/nvidia[0-9]*", "/dev/accel*", "/dev/vfio/[0-9]*"))
