"""Process-level runtime settings for the XLA:CPU backend.

**Host allocator.** XLA:CPU allocates every executable's temporaries as one block per execution (the
DDPM++ demo step at patch 16, batch 64: 182 MB; CelebA-64 at batch 8: ≈1.5 GB) and frees it afterwards.
glibc serves blocks above its mmap threshold (at most 32 MB) with fresh ``mmap`` pages and returns them
on ``free``, so every step page-faults through its whole temporary block again: 66,700 minor faults per
demo step at patch 16, ≈25 % of the step's CPU time on the 2-core development VM. PyTorch's eager
tensors (a few MB each) stay under the threshold and are reused, so it does not pay this.

:func:`retain_host_memory` makes glibc serve large blocks from its heap and keep freed memory
(``M_MMAP_MAX=0``: no ``mmap`` blocks; ``M_TRIM_THRESHOLD`` −1: never shrink the heap; ``M_ARENA_MAX``
max(4, 2 × cores): few enough arenas that every thread's big blocks land in a heap that is kept).
Steady-state steps then fault 0 times. The price: the process keeps its peak heap (for CPU training, the
largest step's temporaries, which it needs again next step). One single arena (``M_ARENA_MAX=1``, this
module's setting before 2026-12) also stops the faults but makes XLA's worker threads queue for one malloc
lock: on a 2-core Xeon it made the demo's steps 1.2–2× slower (patch 4: 307 → 153 ms; sampler 1158 →
795 ms per evaluation at batch 500; README.md, "Results and benchmarks").

**CPU devices.** :func:`use_cpu_devices` splits the host CPU into several XLA devices, so the step runs
data-parallel over them (the batch sharded over the mesh's ``'data'`` axis, the gradient all-reduced,
arithmetic per example unchanged). XLA:CPU runs one executable's operations on its thread pool, but the
many small operations of a diffusion U-Net leave the threads idle about 40 % of a step (a profile of the
demo's patch-16 step); two devices, each with its own stream of operations, keep both cores of a laptop
busy. :func:`default_cpu_devices` picks the count ``main`` uses.

**Convolution kernels.** :func:`use_cpu_xla_flags` adds :data:`CPU_XLA_FLAGS` to ``XLA_FLAGS``: XLA:CPU
(jaxlib 0.10) hands single convolutions to YNNPACK by default, whose weight-gradient convolution runs at
5–26 GFLOP/s on a 2-core AMD EPYC (Zen 3) against 52–123 GFLOP/s for XLA's own convolution kernels on
the same shapes (CelebA-64, demo and sampler shapes; forward and data gradient on par or better), and
whose convolutions use one thread at small channel counts. ``-individual_convolution`` keeps YNNPACK for
dots and fused elementwise work and gives convolutions back to XLA. Same-run ratios to the official
PyTorch step (README "Side by side"): demo mixed step 1.21 → 1.12×, CelebA-64 at batch 8 1.53 → 1.16×.
Removing YNNPACK's ``reduce`` fusions as well made the demo's mixed step slower (454 → 557 ms).

All three must run before the JAX backend starts (the first array or device query): arenas, once a thread
has one, stay, and the device count is fixed at start-up. ``patch_diffusion.main`` calls them first thing
on a CPU-only host (:func:`cpu_only_host`: with a GPU or TPU the big temporaries live in device memory),
and the benchmarks call them; set ``PATCH_DIFFUSION_MALLOC=default`` to keep glibc's defaults, and name
the flag in ``XLA_FLAGS`` yourself (e.g. ``--xla_cpu_experimental_ynn_fusion_type=``) to choose otherwise.
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
             ((_M_ARENA_MAX, max(4, 2 * (os.cpu_count() or 1))), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
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


#: Most CPU devices :func:`default_cpu_devices` makes: beyond this, per-device batches get too small for
#: XLA's kernels on a many-core host, and each device holds a copy of the parameters and optimiser state.
MAX_CPU_DEVICES = 8


def default_cpu_devices(batch_size: int, cores: int | None = None) -> int:
  """How many XLA CPU devices to split this host into: the largest count ≤ min(cores, MAX_CPU_DEVICES)
  that divides ``batch_size`` (the per-host training batch, which every device must share evenly)."""
  cores = os.cpu_count() if cores is None else cores
  limit = max(1, min(int(cores or 1), MAX_CPU_DEVICES))
  return max(n for n in range(1, limit + 1) if int(batch_size) % n == 0)


def cpu_devices_for(config, num_processes: int = 1) -> int:
  """:func:`default_cpu_devices` for one process's share of a training micro-batch
  (``train.batch_size / train.grad_accum_steps / num_processes``; 1 if that does not divide)."""
  t = config.train
  share, rest = divmod(int(t.batch_size), max(int(t.get("grad_accum_steps", 1) or 1), 1) * max(num_processes, 1))
  return default_cpu_devices(share) if share and not rest else 1


def use_cpu_devices(count: int) -> int:
  """Makes the CPU backend start with ``count`` devices; returns the count in effect.

  Leaves an explicit choice alone (``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` or
  ``JAX_NUM_CPU_DEVICES``: tests and launch scripts set these) and does nothing once the backend has
  started (logged). ``count`` < 1 is an error.
  """
  if int(count) < 1:
    raise ValueError(f"cpu_devices = {count} must be >= 1")
  import jax  # pylint: disable=g-import-not-at-top
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") or os.environ.get(
      "JAX_NUM_CPU_DEVICES"):
    return -1
  if _backend_started():
    logging.warning("use_cpu_devices: the JAX backend has already started; CPU device count left as is")
    return -1
  jax.config.update("jax_num_cpu_devices", int(count))
  return int(count)


#: XLA:CPU flags :func:`use_cpu_xla_flags` adds (module docstring, "Convolution kernels").
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)


def use_cpu_xla_flags() -> list[str]:
  """Appends each of :data:`CPU_XLA_FLAGS` to ``XLA_FLAGS`` unless ``XLA_FLAGS`` already names that flag
  (the caller's choice wins); returns the flags added. Nothing once the backend has started (logged):
  XLA reads ``XLA_FLAGS`` when its first client starts."""
  current = os.environ.get("XLA_FLAGS", "")
  named = {item.split("=", 1)[0] for item in current.split()}
  added = [flag for flag in CPU_XLA_FLAGS if flag.split("=", 1)[0] not in named]
  if not added:
    return []
  if _backend_started():
    logging.warning("use_cpu_xla_flags: the JAX backend has already started; XLA_FLAGS left as is")
    return []
  os.environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
  return added


def apply_cpu_defaults(config, num_processes: int = 1, cpu_devices: int = 0) -> dict:
  """On a CPU-only host, before the backend starts: :func:`retain_host_memory`, :func:`use_cpu_xla_flags`
  and :func:`use_cpu_devices` with ``cpu_devices`` (0: :func:`cpu_devices_for` ``config``). What
  ``patch_diffusion.main`` and the benchmarks run; returns what was applied (nothing off CPU-only hosts)."""
  if not cpu_only_host():
    return {"host_allocator_retained": False, "cpu_devices": None, "xla_flags_added": []}
  return {"host_allocator_retained": retain_host_memory(), "xla_flags_added": use_cpu_xla_flags(),
          "cpu_devices": use_cpu_devices(cpu_devices or cpu_devices_for(config, num_processes))}
