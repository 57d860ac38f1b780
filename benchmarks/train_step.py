"""Train-step benchmark: per patch size compile time, median step time, patches/s, model FLOPs (XLA cost
analysis) and their utilisation of a measured matmul peak, plus the mixed-schedule cost per step relative
to a full-image step (measured, and the theoretical Σ p_k (s_k/R)² mul_k).

  python benchmarks/train_step.py --config configs/digits.py
  python benchmarks/train_step.py --config configs/celeba64.py --set train.batch_size=8 --steps 10

Writes benchmarks/results/train_step_<name>.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

import jax  # noqa: E402
import numpy as np  # noqa: E402

from patch_diffusion import parallel  # noqa: E402
from patch_diffusion import state as state_lib  # noqa: E402
from patch_diffusion import experiment  # noqa: E402
from patch_diffusion import train  # noqa: E402
from patch_diffusion.tools import cli  # noqa: E402


def run(config, steps: int) -> dict:
  jax.config.update("jax_threefry_partitionable", True)
  exp = experiment.build_experiment(config, check_data=False)
  state = jax.device_put(state_lib.create_train_state(exp.init_variables(jax.random.key(0)), exp.tx),
                         parallel.replicated(exp.mesh))
  sched = exp.schedule
  key = jax.random.key(1)
  peak = common.matmul_peak()
  rows = []
  local_batch = config.train.batch_size // jax.process_count()
  for size, mul, prob in zip(sched.sizes, sched.batch_muls, sched.probabilities):
    n = local_batch * mul
    t0 = time.perf_counter()
    one = train.compile_steps(exp, state, key, local_batch, variants=[(size, mul)])[(size, mul)]
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    batch = parallel.global_batch({
        "image": rng.integers(0, 256, (n, exp.resolution, exp.resolution, exp.channels), dtype=np.uint8),
        "label": rng.integers(0, max(exp.num_classes, 1), (n,)).astype(np.int32)}, exp.mesh)
    lr, beta = np.float32(config.train.lr), np.float32(0.999)
    holder = {"state": state}

    def step():
      holder["state"], m = one(holder["state"], batch, lr, beta, key)
      jax.block_until_ready(m)

    med, times = common.median_time(step, steps)
    state = holder["state"]
    # FLOPs of the lowered (pre-optimisation) HLO: backend independent. The compiled executable's count
    # misses convolutions that GPUs run as cuDNN custom calls.
    lowered = train.compile_steps(exp, state, key, local_batch, lower_only=True,
                                  variants=[(size, mul)])[(size, mul)]
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    rows.append({"patch": size, "batch_mul": mul, "probability": prob, "global_batch": n * jax.process_count(),
                 "compile_s": compile_s, "step_ms": med * 1e3, "step_ms_min": min(times) * 1e3,
                 "patches_per_s": n * jax.process_count() / med, "gflop_per_step": flops / 1e9,
                 "tflops": flops / med / 1e12, "mfu": flops / med / peak if peak else None})
  full = rows[-1]["step_ms"]
  measured_mix = sum(r["probability"] * r["step_ms"] for r in rows) / full
  images_per_step = config.train.batch_size * sched.average_batch_mul
  mean_step_ms = sum(r["probability"] * r["step_ms"] for r in rows)
  return {"machine": common.machine(), "matmul_peak_tflops": peak / 1e12, "rows": rows,
          "expected_step_cost_theory": sched.expected_step_cost,
          "expected_step_cost_measured": measured_mix,
          "counted_kimg_per_s_mixed": images_per_step / mean_step_ms,
          "counted_kimg_per_s_full_only": config.train.batch_size / full,
          "speedup_per_counted_image_vs_full": (images_per_step / mean_step_ms) / (config.train.batch_size / full)}


def _main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python benchmarks/train_step.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, type=cli.existing_file)
  parser.add_argument("--set", action="append", default=[], help="config override a.b=value (repeatable)")
  parser.add_argument("--steps", type=cli.positive_int, default=10, help="timed steps per patch size (median)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  config = common.load_config(str(args.config), args.set)
  result = run(config, args.steps)
  result.update(config=str(args.config), overrides=args.set, steps=args.steps, batch_size=config.train.batch_size)
  name = os.path.splitext(os.path.basename(str(args.config)))[0]
  out = args.out or os.path.join(common.ROOT, "benchmarks", "results", f"train_step_{name}.json")
  print(f"# train step: {args.config} {' '.join(args.set)} on {result['machine']['num_devices']}x "
        f"{result['machine']['device_kind']}; matmul peak {result['matmul_peak_tflops'] * 1e3:.1f} GFLOP/s")
  common.print_table(result["rows"], [
      ("patch", "patch", "d"), ("global_batch", "global batch", "d"), ("probability", "p", ".2f"),
      ("compile_s", "compile s", ".1f"), ("step_ms", "median step ms", ".1f"),
      ("patches_per_s", "patches/s", ".0f"), ("gflop_per_step", "GFLOP/step", ".2f"),
      ("mfu", "utilisation of matmul peak", ".1%")])
  print(f"mixed-schedule step cost / full step: measured {result['expected_step_cost_measured']:.2f}, "
        f"theory {result['expected_step_cost_theory']:.2f}; counted images/s vs full-only training: "
        f"{result['speedup_per_counted_image_vs_full']:.2f}x")
  print(f"wrote {common.write_json(out, result)}")
  return 0


def main(argv=None) -> int:
  """A bad input ends in one line naming the problem (exit 1), not a traceback."""
  return cli.run(_main, argv, prog="train_step.py")


if __name__ == "__main__":
  sys.exit(main())
