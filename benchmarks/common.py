"""Shared helpers of the benchmarks: config loading, a matmul peak, timing and result files."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def load_config(path: str, overrides: list[str]):
  """Loads ``configs/<x>.py``'s get_config() and applies ``a.b=value`` overrides (Python literals)."""
  from patch_diffusion import configs_io  # pylint: disable=g-import-not-at-top
  return configs_io.load_config(path, **dict(item.split("=", 1) for item in overrides))


def cpu_runtime() -> dict:
  """``runtime.apply_cpu_defaults`` as ``patch_diffusion.main`` runs it (call before the JAX backend
  starts); ``PATCH_DIFFUSION_CPU_DEVICES=n`` splits the CPU into n devices (default 1, as ``main``)."""
  from patch_diffusion import runtime  # pylint: disable=g-import-not-at-top
  return runtime.apply_cpu_defaults(int(os.environ.get("PATCH_DIFFUSION_CPU_DEVICES") or 1))


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> tuple[float, list[float]]:
  """Median wall time of ``fn`` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def minor_faults_per_call(fn: Callable[[], object], calls: int = 3) -> float:
  """Mean minor page faults of this process per call of ``fn`` (after the caller's warm-up): memory the
  kernel had to map in again, e.g. a step's temporaries that the allocator gave back to the system."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    fn()
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
  """Measured dense matmul throughput (FLOP/s) of the default backend, summed over its local devices."""
  devices = jax.local_devices()
  mats = [jax.device_put(jnp.ones((n, n), dtype), d) for d in devices]
  f = jax.jit(lambda a: a @ a)
  def run():
    jax.block_until_ready([f(m) for m in mats])
  t, _ = median_time(run, repeats)
  return 2 * n**3 * len(devices) / t


#: x86 vector extensions, widest first: which one the host has decides how fast XLA's and PyTorch's CPU
#: kernels are relative to each other (README "Side by side": the demo step is at parity with PyTorch on
#: an AVX2 EPYC and 1.5x slower on an AVX-512 Xeon), so every result records it.
_VECTOR_ISAS = ("avx512f", "avx2", "avx", "sse4_2")


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> dict:
  """The host CPU as ``/proc/cpuinfo`` names it: ``processor`` (model name), ``vector_isa`` (widest of
  :data:`_VECTOR_ISAS` the flags list, or None) and ``amx`` (AMX tile instructions present). Empty values
  where the file is missing (not Linux)."""
  model, flags = "", set()
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  return {"processor": model, "vector_isa": next((isa for isa in _VECTOR_ISAS if isa in flags), None),
          "amx": "amx_tile" in flags}


def machine() -> dict:
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind, "num_devices": jax.device_count(),
          "cpu_count": os.cpu_count(), **cpu_description(), "python": platform.python_version(),
          "jax": jax.__version__, "host": platform.node()}


def write_json(path: str, payload: dict) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
  return path


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
  """Prints rows as a Markdown table; columns = [(key, header, format)]."""
  print("| " + " | ".join(h for _, h, _ in columns) + " |")
  print("|" + "|".join("---" for _ in columns) + "|")
  for r in rows:
    print("| " + " | ".join(format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns) + " |")
