"""Train-step benchmark: per patch size compile time, median step time, patches/s, model FLOPs (XLA cost
analysis) and their utilisation of a measured matmul peak, plus the mixed-schedule cost per step relative
to a full-image step (measured, and the theoretical Σ p_k (s_k/R)² mul_k).

  python benchmarks/train_step.py --config configs/digits.py
  python benchmarks/train_step.py --config configs/celeba64.py --set train.batch_size=8 --steps 10

For a multi-stage config (arch 'ddpmpp-multistage') every (patch size, stage) executable is timed — the
trainer compiles one per stage — and the mixed-schedule cost weights each by its size and stage
probabilities; ``--traced_stage`` times the alternative design instead (one executable per patch size, the
stage a traced argument selecting the decoder with ``lax.switch``):

  python benchmarks/train_step.py --config configs/digits_multistage.py
  python benchmarks/train_step.py --config configs/digits_multistage.py --traced_stage

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
from patch_diffusion import steps as steps_lib  # noqa: E402
from patch_diffusion.data import augment as augment_lib  # noqa: E402
from patch_diffusion.tools import cli  # noqa: E402


def _traced_stage_step(exp, state, key, n, size):
  """One executable for every stage of a multi-stage network (the stage a traced int32 argument, the
  decoder chosen with lax.switch): the design the trainer does not use, for comparison."""
  cfg = exp.config
  step_fn = steps_lib.make_train_step(
      exp.model.apply, exp.tx, exp.precond, exp.noise_dist,
      steps_lib.StepConfig(patch_size=size, resolution=exp.resolution, num_classes=exp.num_classes,
                           label_dropout=cfg.edm.label_dropout, compute_dtype=exp.dtype,
                           augment=augment_lib.from_config(cfg.data), grad_accum_steps=cfg.train.grad_accum_steps,
                           stage_boundaries=exp.stage_boundaries, stage=None))
  rep, data = parallel.replicated(exp.mesh), parallel.data_sharding(exp.mesh)
  shard = jax.tree.map(lambda _: rep, state)
  r, c = exp.resolution, exp.channels
  batch = {"image": jax.ShapeDtypeStruct((n, r, r, c), np.uint8, sharding=data),
           "label": jax.ShapeDtypeStruct((n,), np.int32, sharding=data)}
  scalar = jax.ShapeDtypeStruct((), np.float32, sharding=rep)
  stage = jax.ShapeDtypeStruct((), np.int32, sharding=rep)
  jitted = jax.jit(step_fn, in_shardings=(shard, data, rep, rep, rep, rep), out_shardings=(shard, rep),
                   donate_argnums=(0,))
  return jitted.lower(state, batch, scalar, scalar, key, stage)


def _cases(exp, traced_stage: bool):
  """(variant key, patch size, batch mul, probability of the size, stage, probability of the stage)."""
  sched = exp.schedule
  for size, mul, prob in zip(sched.sizes, sched.batch_muls, sched.probabilities):
    if exp.stages is None:
      yield (size, mul), size, mul, prob, None, 1.0
      continue
    for k, p_k in enumerate(exp.stages.probabilities):
      yield ((size, mul, "traced") if traced_stage else (size, mul, k)), size, mul, prob, k, p_k


def run(config, steps: int, traced_stage: bool = False) -> dict:
  jax.config.update("jax_threefry_partitionable", True)
  exp = experiment.build_experiment(config, check_data=False)
  state = jax.device_put(state_lib.create_train_state(exp.init_variables(jax.random.key(0)), exp.tx),
                         parallel.replicated(exp.mesh))
  sched = exp.schedule
  key = jax.random.key(1)
  peak = common.matmul_peak()
  rows, executables = [], {}
  local_batch = config.train.batch_size // jax.process_count()
  for variant, size, mul, prob, stage, p_stage in _cases(exp, traced_stage):
    n = local_batch * mul
    t0 = time.perf_counter()
    if variant not in executables:
      if traced_stage and stage is not None:
        executables[variant] = _traced_stage_step(exp, state, key, n * jax.process_count(), size).compile()
      else:
        executables[variant] = train.compile_steps(exp, state, key, local_batch, variants=[variant])[variant]
    compile_s = time.perf_counter() - t0
    one = executables[variant]
    rng = np.random.default_rng(0)
    batch = parallel.global_batch({
        "image": rng.integers(0, 256, (n, exp.resolution, exp.resolution, exp.channels), dtype=np.uint8),
        "label": rng.integers(0, max(exp.num_classes, 1), (n,)).astype(np.int32)}, exp.mesh)
    lr, beta = np.float32(config.train.lr), np.float32(0.999)
    extra = (np.int32(stage),) if traced_stage and stage is not None else ()
    holder = {"state": state}

    def step():
      holder["state"], m = one(holder["state"], batch, lr, beta, key, *extra)
      jax.block_until_ready(m)

    med, times = common.median_time(step, steps)
    faults = common.minor_faults_per_call(step)
    state = holder["state"]
    # FLOPs of the lowered (pre-optimisation) HLO: backend independent. The compiled executable's count
    # misses convolutions that GPUs run as cuDNN custom calls.
    if traced_stage and stage is not None:
      lowered = _traced_stage_step(exp, state, key, n * jax.process_count(), size)
    else:
      lowered = train.compile_steps(exp, state, key, local_batch, lower_only=True, variants=[variant])[variant]
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    rows.append({"patch": size, "batch_mul": mul, "probability": prob, "stage": stage, "stage_probability": p_stage,
                 "global_batch": n * jax.process_count(), "compile_s": compile_s, "step_ms": med * 1e3,
                 "step_ms_min": min(times) * 1e3, "minor_page_faults_per_step": faults, "patches_per_s": n * jax.process_count() / med,
                 "gflop_per_step": flops / 1e9, "tflops": flops / med / 1e12, "mfu": flops / med / peak if peak else None})
  return _summary(config, sched, rows, peak)


def _summary(config, sched, rows, peak) -> dict:
  """Expected step cost of the mixed schedule: Σ_size p_size Σ_stage p_stage step_ms(size, stage)."""
  full_size = max(r["patch"] for r in rows)
  full = sum(r["stage_probability"] * r["step_ms"] for r in rows if r["patch"] == full_size)
  mean_step_ms = sum(r["probability"] * r["stage_probability"] * r["step_ms"] for r in rows)
  images_per_step = config.train.batch_size * sched.average_batch_mul
  return {"machine": common.machine(), "matmul_peak_tflops": peak / 1e12, "rows": rows,
          "expected_step_cost_theory": sched.expected_step_cost,
          "expected_step_cost_measured": mean_step_ms / full,
          "mean_step_ms": mean_step_ms,
          "counted_kimg_per_s_mixed": images_per_step / mean_step_ms,
          "counted_kimg_per_s_full_only": config.train.batch_size / full,
          "speedup_per_counted_image_vs_full": (images_per_step / mean_step_ms) / (config.train.batch_size / full)}


def _main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python benchmarks/train_step.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, type=cli.existing_file)
  parser.add_argument("--set", action="append", default=[], help="config override a.b=value (repeatable)")
  parser.add_argument("--steps", type=cli.positive_int, default=10, help="timed steps per patch size (median)")
  parser.add_argument("--traced_stage", action="store_true",
                      help="multi-stage configs: time one executable per patch size with the stage a traced "
                           "argument (lax.switch) instead of the trainer's one executable per stage")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  config = common.load_config(str(args.config), args.set)
  cpu = common.cpu_runtime()  # before the backend starts: as patch_diffusion.main runs
  result = run(config, args.steps, args.traced_stage)
  result.update(cpu_runtime=cpu, config=str(args.config), overrides=args.set, steps=args.steps, batch_size=config.train.batch_size,
                traced_stage=args.traced_stage)
  name = os.path.splitext(os.path.basename(str(args.config)))[0] + ("_traced_stage" if args.traced_stage else "")
  out = args.out or os.path.join(common.ROOT, "benchmarks", "results", f"train_step_{name}.json")
  print(f"# train step: {args.config} {' '.join(args.set)} on {result['machine']['num_devices']}x "
        f"{result['machine']['device_kind']}; matmul peak {result['matmul_peak_tflops'] * 1e3:.1f} GFLOP/s")
  stage_cols = [("stage", "stage", "d"), ("stage_probability", "p stage", ".4f")] if any(
      r["stage"] is not None for r in result["rows"]) else []
  common.print_table(result["rows"], [
      ("patch", "patch", "d"), *stage_cols, ("global_batch", "global batch", "d"), ("probability", "p", ".2f"),
      ("compile_s", "compile s", ".1f"), ("step_ms", "median step ms", ".1f"),
      ("minor_page_faults_per_step", "page faults/step", ".0f"),
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
