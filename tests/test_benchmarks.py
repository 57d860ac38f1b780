"""benchmarks/: the side-by-side benchmark still drives this project's trainer API (it broke silently once
when ``build_experiment`` moved). Runs the JAX side alone — no official checkout given, so the PyTorch side is
skipped with its one-line reason — on the tiny test network (same patch schedule as the demo: three step
executables) and a small batch, one round. The demo network itself is what the benchmark runs by hand;
compiling it here cost 80-170 s of the suite for the same plumbing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from patch_diffusion import experiment
from patch_diffusion import state as state_lib
from helpers import ONE_LEVEL, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vs_pytorch_times_every_patch_size_without_the_official_code(tmp_path):
  # The one-level tiny network (the same three patch sizes): a third of the two-level one's compile time,
  # which made this the suite's slowest test.
  out = tmp_path / "vs.json"
  proc = subprocess.run(
      [sys.executable, "benchmarks/vs_pytorch.py", "--config", "configs/tiny_test.py", "--set", "train.batch_size=8",
       *[arg for k, v in ONE_LEVEL.items() for arg in ("--set", f"{k}={v}")],
       "--official_dir", str(tmp_path / "absent"), "--rounds", "1", "--steps", "1", "--warmup", "1", "--no_sample",
       "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900,
      env={k: v for k, v in os.environ.items() if k != "PD_OFFICIAL_DIR"})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "PyTorch side skipped" in proc.stdout + proc.stderr
  result = json.loads(out.read_text())
  assert [r["patch"] for r in result["rows"]] == [4, 8, 16]
  assert all(r["ours_ms"] > 0 and r.get("theirs_ms") is None for r in result["rows"])
  # The benchmark's network is the config's: its parameter count, from shapes alone.
  assert result["setup"]["ours"]["params"] == _param_count(tiny(**ONE_LEVEL)) > 0
  # The ceiling: XLA's FLOP count grows with the patch size (4x the pixels per image, batch / 2 each step
  # up: ~2x per size), and a same-window matmul peak is measured.
  gflop = [r["gflop"] for r in result["rows"]]
  assert 1.5 < gflop[1] / gflop[0] < 2.5 and 1.5 < gflop[2] / gflop[1] < 2.5, gflop
  assert all(r["ours_gflops_per_s"] > 0 for r in result["rows"])
  assert result["matmul_peak_gflops_per_s"]["ours"] > 1
  assert result["mixed"]["gflop"] > 0 and "ratio" not in result["mixed"]
  assert "dense float32 matmul 2048x2048" in proc.stdout
  # The CPU is recorded with its vector extensions (they decide the ratio to PyTorch: README).
  assert set(result["machine"]) >= {"processor", "vector_isa", "amx"}
  assert result["machine"]["vector_isa"] == _common().cpu_description()["vector_isa"]


def _common():
  """benchmarks/common.py (benchmarks/ is not a package: imported from its folder, as the scripts do)."""
  if os.path.join(ROOT, "benchmarks") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import common  # pylint: disable=g-import-not-at-top
  return common


def test_cpu_description_reads_model_and_widest_vector_isa(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  core = ("processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
          "flags\t\t: fpu sse4_2 avx avx2 avx512f avx512bw amx_bf16 amx_tile\n\n")
  cpuinfo.write_text(core.format(n=0) + core.format(n=1))
  assert _common().cpu_description(str(cpuinfo)) == {
      "processor": "Intel(R) Xeon(R) Processor", "vector_isa": "avx512f", "amx": True}
  cpuinfo.write_text("model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2 fma\n")
  assert _common().cpu_description(str(cpuinfo)) == {"processor": "AMD EPYC 7B13", "vector_isa": "avx2", "amx": False}
  # Not Linux: nothing to read, nothing invented.
  assert _common().cpu_description(str(tmp_path / "absent")) == {"processor": "", "vector_isa": None, "amx": False}


def _param_count(config) -> int:
  exp = experiment.build_experiment(config, check_data=False)
  return state_lib.param_count(experiment.abstract_train_state(exp).params)


def test_demo_network_has_the_official_networks_parameter_count():
  """What ``vs_pytorch.py --config configs/digits.py`` compares: the official DDPM++ of the same settings
  has 1,259,969 parameters (counted by the torch side of the benchmark, results/vs_pytorch_digits.json)."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  assert _param_count(digits.get_config()) == 1259969
