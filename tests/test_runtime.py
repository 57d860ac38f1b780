"""patch_diffusion/runtime.py: the glibc allocator settings, synchronous dispatch, the CPU device split and the
XLA:CPU flags.

Each case runs in a fresh interpreter: the settings only apply before the JAX backend starts, and the
test process has started it long ago.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Appended to each probe: minor page faults of ``f(x)`` in the quietest of four windows of three calls
#: (the heap settles after a few calls).
_FAULT_WINDOWS = """
import resource
windows = []
for _ in range(4):
  f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(3):
    f(x).block_until_ready()
  windows.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""

_PROBE = """
import sys
from patch_diffusion import runtime
applied = runtime.retain_host_memory() if sys.argv[1] == "before" else None
import jax, jax.numpy as jnp
x = jnp.ones((3072, 4096))      # 48 MB: above glibc's largest mmap threshold (32 MB)
f = jax.jit(lambda a: jnp.sort(a * 2.0, axis=0)[::7].sum(axis=0))  # a 48 MB temporary per call
f(x).block_until_ready()
if sys.argv[1] == "after":
  applied = runtime.retain_host_memory()
""" + _FAULT_WINDOWS + """
print(applied, min(windows))
"""


def _run_probe(script: str, *argv: str, **env) -> list[str]:
  """``script`` in a fresh CPU-only interpreter with no XLA_FLAGS; its printed words."""
  return subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **env), timeout=300,
                        check=True).stdout.split()


def _probe(when: str, **env) -> tuple[str, int]:
  applied, faults = _run_probe(_PROBE, when, **env)
  return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_heap_stops_per_step_page_faults():
  applied, faults = _probe("before")
  default_applied, default_faults = _probe("before", PATCH_DIFFUSION_MALLOC="default")
  assert applied == "True" and default_applied == "False"
  # glibc's default returns each step's 64 MB temporary to the kernel and faults it in again.
  assert default_faults > 3 * 10_000, default_faults
  # With a few arenas (not one: one lock made XLA's threads queue) a thread's secondary heap can still be
  # released now and then: seen 0 and 14,045 of 42,137 faults. At least half of the faults must go.
  assert faults < default_faults / 2, (faults, default_faults)


def test_too_late_once_the_backend_runs():
  applied, _ = _probe("after")
  assert applied == "False"


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cuda", False), ("tpu,cpu", False)])
def test_cpu_only_host_follows_jax_platforms(monkeypatch, platforms, expected):
  from patch_diffusion import runtime  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert runtime.cpu_only_host() is expected


def test_use_cpu_devices_rejects_a_count_below_one():
  from patch_diffusion import runtime  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="must be >= 1"):
    runtime.use_cpu_devices(0)


_DISPATCH_PROBE = """
from patch_diffusion import runtime
print(runtime.apply_cpu_defaults(1)["sync_dispatch"])
import jax, jax.numpy as jnp
print(jax.config.values["jax_cpu_enable_async_dispatch"])
x = jnp.ones((6144, 4096))      # 96 MB: above the 64 MB heaps of a thread's own malloc arena
f = jax.jit(lambda a: jnp.exp(a * 2.0) @ a[0])  # the exp(..) operand of the matmul: a 96 MB temporary
f(x).block_until_ready()
""" + _FAULT_WINDOWS + """
print(min(windows))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_synchronous_dispatch_keeps_big_temporaries_in_the_retained_heap():
  applied, async_on, faults = _run_probe(_DISPATCH_PROBE)
  kept, async_kept, async_faults = _run_probe(_DISPATCH_PROBE, PATCH_DIFFUSION_CPU_ASYNC_DISPATCH="1")
  faults = int(faults)
  assert (applied, async_on) == ("True", "False") and (kept, async_kept) == ("False", "True")
  # Asynchronously, a client thread that has an arena of its own allocates the 96 MB block: glibc takes it
  # from mmap and unmaps it again, one whole block (24,576 pages) faulted in again per window of three
  # calls (seen: 24,581 in 3 of 4 runs; 0 when the thread happened to share the main arena, which depends
  # on thread start-up order, so not asserted). Synchronously the main thread allocates it from the main
  # arena, which keeps it: 0 in every run seen.
  assert faults < 3 * 1_000, (faults, async_faults)


_DEVICES = """
import sys
from patch_diffusion import runtime
print(runtime.use_cpu_devices(int(sys.argv[1])))
import jax
print(jax.device_count())
"""


@pytest.mark.parametrize("env, expected", [
    ({"XLA_FLAGS": ""}, ["2", "2"]),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, ["-1", "3"]),  # an explicit choice stays
    ({"XLA_FLAGS": "", "JAX_NUM_CPU_DEVICES": "1"}, ["-1", "1"])])
def test_use_cpu_devices_splits_the_cpu_unless_the_caller_chose(env, expected):
  base = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
  out = subprocess.run([sys.executable, "-c", _DEVICES, "2"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(base, JAX_PLATFORMS="cpu", **env), timeout=300, check=True).stdout
  assert out.split() == expected


_XLA_FLAGS_PROBE = """
import re
from patch_diffusion import runtime
print(" ".join(runtime.use_cpu_xla_flags()) or "-")
import jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
# Big enough for XLA to hand it to YNNPACK by default (a 2x6x6x8 one stays with XLA either way).
wgrad = jax.jit(lambda x, dy: jax.vjp(lambda w: conv(x, w), jnp.ones((3, 3, 32, 32)))[1](dy)[0])
hlo = wgrad.lower(jnp.ones((8, 16, 16, 32)), jnp.ones((8, 16, 16, 32))).compile().as_text()
# A convolution either stands alone in the optimised HLO or sits in a fused computation; report which
# kind of fusion calls the computation holding it.
holder = {}
for block in hlo.split("\\n\\n"):
  head = block.lstrip().split(" ", 1)[0].lstrip("%")
  if " convolution(" in block:
    holder[head] = True
kinds = set()
for line in hlo.splitlines():
  m = re.search(r"calls=%([\\w.\\-]+)", line)
  if m and m.group(1) in holder:
    kinds.add("ynn" if "__ynn_fusion" in line else "other")
print(",".join(sorted(kinds)) or "xla")
"""


@pytest.mark.parametrize("flags, added, conv_in", [
    ("", "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", "xla"),
    ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution", "-", "ynn")])  # the caller's choice stays
def test_cpu_xla_flags_give_convolutions_to_xla_unless_the_caller_chose(flags, added, conv_in):
  out = subprocess.run([sys.executable, "-c", _XLA_FLAGS_PROBE], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags), timeout=300, check=True).stdout
  assert out.split() == [added, conv_in]


def test_cpu_xla_flags_append_to_the_callers_flags(monkeypatch):
  from patch_diffusion import runtime  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runtime, "_backend_started", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert runtime.use_cpu_xla_flags() == list(runtime.CPU_XLA_FLAGS)
  assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", *runtime.CPU_XLA_FLAGS]
  assert runtime.use_cpu_xla_flags() == []   # idempotent
  monkeypatch.setattr(runtime, "_backend_started", lambda: True)
  monkeypatch.setenv("XLA_FLAGS", "")
  assert runtime.use_cpu_xla_flags() == []   # too late once the backend runs: nothing changes
  assert os.environ["XLA_FLAGS"] == ""
