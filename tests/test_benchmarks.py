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

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
       "--official_dir", str(tmp_path / "absent"), "--rounds", "1", "--steps", "1", "--warmup", "1",
       "--sample_batch", "8", "--sample_rounds", "1", "--sample_steps", "3",
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
  # The floor: each size's convolutions timed alone (op_profile), and its probability-weighted mix.
  assert all(r["ours_convolutions_alone_ms"] > 0 for r in result["rows"])
  [sampler] = result["sampler"]  # ours alone, 3 Heun steps = 5 evaluations at batch 8
  assert sampler["side"] == "ours" and sampler["batch"] == 8 and 0 < sampler["convolutions_alone_s"]
  assert "| sampler (3 Heun steps) |" in proc.stdout
  assert result["mixed"]["ours_convolutions_alone_ms"] == pytest.approx(
      sum(r["probability"] * r["ours_convolutions_alone_ms"] for r in result["rows"]))
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


def _op_profile():
  _common()  # puts benchmarks/ on sys.path
  import op_profile  # pylint: disable=g-import-not-at-top
  return op_profile


@pytest.mark.parametrize("strides,padding,lhs_dilation,dims", [
    ((1, 1), ((1, 1), (1, 1)), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 2), ((0, 1), (2, 0)), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((1, 1), ((1, 1), (1, 1)), (2, 2), ("NCHW", "OIHW", "NCHW")),
])
def test_op_profile_rebuilds_each_convolution_of_a_compiled_program(strides, padding, lhs_dilation, dims):
  """The convolution floor is only as good as the parse: every top-level convolution is rebuilt from the
  compiled HLO text with its shapes, window and dimension numbers, and the rebuilt one computes the same."""
  op_profile = _op_profile()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 9, 7, 5) if dims[0] == "NHWC" else (2, 5, 9, 7), np.float32)
  w = rng.standard_normal((3, 3, 5, 4) if dims[1] == "HWIO" else (4, 5, 3, 3), np.float32)

  def fn(x, w):  # a fusion around the convolution, so the parse has to pick the convolution out
    return jnp.tanh(jax.lax.conv_general_dilated(jnp.sin(x), w, strides, padding, lhs_dilation, None, dims))

  text = jax.jit(fn).lower(x, w).compile().as_text()
  instructions = op_profile.hlo_instructions(text)
  convs = op_profile.convolutions(text, instructions)
  assert len(convs) == 1, [c["instruction"] for c in convs]
  c = convs[0]
  # XLA:CPU may run the convolution in another dimension order (NCHW becomes NHWC): feed the rebuilt one the
  # same operands in the order it names, and read its output back in ours.
  lhs_spec, rhs_spec, out_spec = c["dimension_numbers"]
  lhs = jnp.transpose(jnp.sin(x), [dims[0].index(ch) for ch in lhs_spec])
  rhs = jnp.transpose(w, [dims[1].index(ch) for ch in rhs_spec])
  assert [list(lhs.shape), list(rhs.shape)] == [c["lhs_shape"], c["rhs_shape"]]
  rebuilt = jax.lax.conv_general_dilated(lhs, rhs, c["window_strides"], c["padding"], c["lhs_dilation"],
                                         c["rhs_dilation"], c["dimension_numbers"], c["feature_group_count"])
  reference = jax.lax.conv_general_dilated(jnp.sin(x), w, strides, padding, lhs_dilation, None, dims)
  out = np.transpose(np.asarray(rebuilt), [out_spec.index(ch) for ch in dims[2]])
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
  assert c["flops"] == 2.0 * reference.size * 9 * 5
  op_profile.time_convolutions(convs, repeats=2)
  assert c["isolated_ms"] > 0


def test_op_profile_layer_names_from_op_name_metadata():
  layer_of = _op_profile().layer_of
  assert layer_of("jit(step)/transpose(jvp(SongUNet))/dec_16x16_up/conv0/reduce_sum") == ("dec_16x16_up/conv0", True)
  assert layer_of("jit(step)/jvp(SongUNet)/enc_8x8_block0/norm0/sub") == ("enc_8x8_block0/norm0", False)
  assert layer_of("jit(fwd)/SongUNet/enc_16x16_conv/conv_general_dilated") == ("enc_16x16_conv", False)
  assert layer_of("jit(step)/mul") == (_op_profile().OUTSIDE, False)
  assert layer_of("") == (_op_profile().OUTSIDE, False)


def test_op_profile_attributes_a_train_step_to_kernels_and_layers(tmp_path):
  out = tmp_path / "op.json"
  proc = subprocess.run(
      [sys.executable, "benchmarks/op_profile.py", "--config", "configs/tiny_test.py", "--set", "train.batch_size=8",
       *[arg for k, v in ONE_LEVEL.items() for arg in ("--set", f"{k}={v}")],
       "--patch", "8", "--steps", "2", "--top", "500", "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["what"] == "train step, patch 8, batch 16"  # the size's batch multiplier (2x) applied
  assert result["wall_ms"] > 0 and result["threads"] >= 1
  # Traced kernels plus the untraced remainder make up the calls' thread time.
  assert sum(c["ms"] for c in result["categories"]) == pytest.approx(max(result["thread_ms"], result["traced_ms"]))
  assert result["categories"][-1]["category"].startswith("untraced")
  rows = result["instructions"]
  assert rows and all(r["ms"] >= 0 for r in rows)
  # Kernels are attributed to the network's layers, forward and backward, and to the loss / optimiser.
  layers = {(r["layer"], r["pass"]) for r in rows}
  assert any(l.startswith("enc_") and p == "backward" for l, p in layers), layers
  assert any(l.startswith("enc_") and p == "forward" for l, p in layers), layers
  convs = result["convolutions"]
  assert convs and all(c["isolated_ms"] > 0 and c["gflops_per_s"] > 0 for c in convs)
  assert {c["pass"] for c in convs} == {"forward", "backward"}
  assert result["convolutions_alone_ms"] == pytest.approx(sum(c["isolated_ms"] for c in convs))
  assert "convolutions timed alone" in proc.stdout
  bad = subprocess.run([sys.executable, "benchmarks/op_profile.py", "--config", "configs/tiny_test.py", "--patch", "5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 1 and "--patch 5 is not in the config's patch schedule [4, 8, 16]" in bad.stdout + bad.stderr


def test_op_profile_parses_tuple_shapes_and_does_not_count_loops_twice():
  op_profile = _op_profile()
  text = "\n".join([
      "ENTRY %main (p: f32[4]) -> f32[4] {",
      '  %while.3 = (s32[], u32[4]{0}, /*index=2*/f32[4]{0}) while(%tuple.1), condition=%c, body=%b, '
      'metadata={op_name="jit(step)/while"}',
      '  %add_fusion.2 = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_computation.2, '
      'metadata={op_name="jit(step)/jvp(SongUNet)/enc_4x4_block0/norm0/add"}',
      "}"])
  instructions = op_profile.hlo_instructions(text)
  assert instructions["while.3"]["opcode"] == "while" and instructions["while.3"]["shape"].startswith("(s32[]")
  assert instructions["add_fusion.2"]["kind"] == "loop fusion"
  # The loop's event spans the kernels inside it: only the kernel is summed.
  result = op_profile.summarize(instructions, {"while.3": 0.5, "add_fusion.2": 0.2}, calls=2, wall_s=1.0, threads=1, top=5)
  assert [r["instruction"] for r in result["instructions"]] == ["add_fusion.2"]
  assert result["traced_ms"] == pytest.approx(100.0) and result["thread_ms"] == pytest.approx(500.0)
  assert result["instructions"][0]["layer"] == "enc_4x4_block0/norm0"
