"""Process-level runtime settings for the XLA:CPU backend.

**Host allocator.** XLA:CPU allocates every executable's temporaries as one block per execution (the
DDPM++ demo step at patch 16, batch 64: ≈96 MB; CelebA-64 at batch 8: ≈1.5 GB) and frees it afterwards.
glibc serves blocks above its mmap threshold (at most 32 MB) with fresh ``mmap`` pages and returns them
on ``free``, so every step page-faults through its whole temporary block again. PyTorch's eager tensors
(a few MB each) stay under the threshold and are reused, so it does not pay this.

:func:`retain_host_memory` makes glibc serve large blocks from its heap and keep freed memory
(``M_MMAP_MAX=0``: no ``mmap`` blocks; ``M_TRIM_THRESHOLD`` −1: never shrink the heap; ``M_ARENA_MAX``
max(4, 2 × cores)). The price: the process keeps its peak heap (for CPU training, the largest step's
temporaries, which it needs again next step). This holds for the main thread's arena only: a thread with
an arena of its own grows it in 64 MB heaps, takes any larger block from ``mmap`` whatever ``M_MMAP_MAX``
says, and unmaps a heap as soon as it is empty. JAX's default asynchronous dispatch runs executables on
the CPU client's own threads, so their big temporaries still faulted in every step: 23,500 minor faults
per demo step at patch 16 (≈14 % of the process's CPU time in the kernel, measured with ``perf``), 375,000
at CelebA-64. One single arena (``M_ARENA_MAX=1``) stops that too but makes XLA's worker threads queue for
one malloc lock (demo patch 4: 89–96 → 115–119 ms on the 2-core AMD EPYC; 1.2–2× slower on a 2-core
Xeon).

**Dispatch.** :func:`use_synchronous_dispatch` turns ``jax_cpu_enable_async_dispatch`` off: the calling
(Python main) thread runs each executable and allocates its temporaries from the main arena, which
keeps them; XLA's worker threads keep their own arenas for their small blocks. Steady-state demo steps
then fault 1 / 7 / 18 times at patch 4 / 8 / 16 instead of 2 / 33 / 46,978 (two asynchronous devices;
``python benchmarks/train_step.py``, column "page faults/step"). The Python thread waits for each step
instead of queueing the next, which costs the CPU nothing (the "device" is the same cores; the input
pipeline has its own threads). ``PATCH_DIFFUSION_CPU_ASYNC_DISPATCH=1`` keeps JAX's default.

**CPU devices.** :func:`use_cpu_devices` can split the host CPU into several XLA devices, so the step runs
data-parallel over them (the batch sharded over the mesh's ``'data'`` axis, the gradient all-reduced,
arithmetic per example unchanged; ``--cpu_devices=N``). The default is one device: every device but the
first runs on a client thread, whose temporaries fault again (above). On the 2-core AMD EPYC, demo steps
at patch 4 / 8 / 16 took 97.5 / 162.0 / 309.0 ms with one device and synchronous dispatch against 89.2 /
178.3 / 387.9 ms with two asynchronous devices (this module's default until 2026-12-03; mixed schedule
223 against 265 ms; two synchronous devices, in a probe: 95 / 180 / 352 ms); same-run ratios to the
official PyTorch step in README "Side by side". On a many-core host more devices may pay: measure with
``PATCH_DIFFUSION_CPU_DEVICES=n python benchmarks/train_step.py``.

**Convolution kernels.** :func:`use_cpu_xla_flags` adds :data:`CPU_XLA_FLAGS` to ``XLA_FLAGS``: XLA:CPU
(jaxlib 0.10) hands single convolutions to YNNPACK by default, whose weight-gradient convolution runs at
5–26 GFLOP/s on a 2-core AMD EPYC (Zen 3) against 52–123 GFLOP/s for XLA's own convolution kernels on
the same shapes (CelebA-64, demo and sampler shapes; forward and data gradient on par or better), and
whose convolutions use one thread at small channel counts. ``-individual_convolution`` keeps YNNPACK for
dots and fused elementwise work and gives convolutions back to XLA. Same-run ratios to the official
PyTorch step (README "Side by side"): demo mixed step 1.21 → 1.12×, CelebA-64 at batch 8 1.53 → 1.16×.
Removing YNNPACK's ``reduce`` fusions as well made the demo's mixed step slower (454 → 557 ms).

All four must run before the JAX backend starts (the first array or device query): arenas, once a thread
has one, stay, and the dispatch mode and device count are fixed when the CPU client starts.
``patch_diffusion.main`` calls them first thing on a CPU-only host (:func:`cpu_only_host`: with a GPU or
TPU the big temporaries live in device memory), and the benchmarks call them; set
``PATCH_DIFFUSION_MALLOC=default`` to keep glibc's defaults, and name the flag in ``XLA_FLAGS`` yourself
(e.g. ``--xla_cpu_experimental_ynn_fusion_type=``) to choose otherwise.
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


def use_synchronous_dispatch() -> bool:
  """Makes the CPU client run each executable on the thread that calls it (``jax_cpu_enable_async_dispatch``
  off; module docstring, "Dispatch"); True when applied. ``PATCH_DIFFUSION_CPU_ASYNC_DISPATCH=1`` keeps
  JAX's asynchronous default. Nothing once the backend has started (logged): the client reads it when it
  starts."""
  if os.environ.get("PATCH_DIFFUSION_CPU_ASYNC_DISPATCH") == "1":
    return False
  if _backend_started():
    logging.warning("use_synchronous_dispatch: the JAX backend has already started; dispatch left as is")
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def apply_cpu_defaults(cpu_devices: int = 1) -> dict:
  """On a CPU-only host, before the backend starts: :func:`retain_host_memory`, :func:`use_cpu_xla_flags`,
  :func:`use_synchronous_dispatch` and :func:`use_cpu_devices` with ``cpu_devices``. What
  ``patch_diffusion.main`` and the benchmarks run; returns what was applied (nothing off CPU-only hosts)."""
  if not cpu_only_host():
    return {"host_allocator_retained": False, "cpu_devices": None, "xla_flags_added": [], "sync_dispatch": False}
  return {"host_allocator_retained": retain_host_memory(), "xla_flags_added": use_cpu_xla_flags(),
          "sync_dispatch": use_synchronous_dispatch(), "cpu_devices": use_cpu_devices(cpu_devices)}
