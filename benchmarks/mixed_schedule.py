"""Mixed-schedule throughput measured by the training loop itself: patch schedule vs full-image training.

  python benchmarks/mixed_schedule.py --config configs/digits.py --steps 90
  python benchmarks/mixed_schedule.py --config configs/celeba64.py --set train.batch_size=8 --steps 24 --synthetic 64

Runs the real trainer (``train.train_and_evaluate``: input pipeline, schedule switching between the
compiled executables, host overhead, everything) for ``--steps`` steps with the stochastic patch schedule
(``patch.real_p`` = 0.5 unless overridden) and again with ``patch.real_p = 1.0`` (full images only), and
reads the loop's own logged wall time and counted images per second (``metrics.jsonl``; the first log
interval, which holds the first calls' warm-up, is dropped). Reports the measured mixed step cost relative
to a full step and the counted-images/s speed-up, next to the theoretical step cost Σ p·(s/R)²·mul
(``PatchSchedule.expected_step_cost``). Writes ``benchmarks/results/mixed_schedule_<config>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

import numpy as np  # noqa: E402

from patch_diffusion import experiment  # noqa: E402
from patch_diffusion import train  # noqa: E402
from patch_diffusion.tools import cli  # noqa: E402


def measure(config, steps: int, workdir: str) -> dict:
  """Trains ``steps`` steps; returns the median wall ms/step and counted images/s of the log intervals."""
  exp = experiment.build_experiment(config, check_data=False)
  sched = exp.schedule
  config.train.total_kimg = (steps - 0.5) * config.train.batch_size * sched.average_batch_mul / 1000
  config.train.log_every_steps = max(steps // 6, 1)
  config.train.checkpoint_every_steps = 10 * steps
  config.train.sample_every_steps = 0
  config.train.final_num_samples = 0
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if "loss" in line][1:]
  return {"real_p": config.patch.real_p, "steps": steps, "intervals": len(records),
          "wall_ms_per_step": float(np.median([r["wall_ms_per_step"] for r in records])),
          "counted_images_per_s": float(np.median([r["images_per_s"] for r in records])),
          "theoretical_step_cost": sched.expected_step_cost, "average_batch_mul": sched.average_batch_mul}


def _main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python benchmarks/mixed_schedule.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, type=cli.existing_file)
  p.add_argument("--set", action="append", default=[], help="config override a.b=value (repeatable)")
  p.add_argument("--steps", type=cli.positive_int, default=90)
  p.add_argument("--synthetic", type=cli.nonnegative_int, default=0,
                 help="write a real TFDS copy of the config's dataset with N random images first")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    extra = []
    if args.synthetic:
      from patch_diffusion.tools import prepare_dataset  # pylint: disable=g-import-not-at-top
      cfg = common.load_config(str(args.config), args.set)
      prepare_dataset.write_synthetic_tfds_dataset(cfg.data.name, os.path.join(tmp, "tfds"),
                                                   {cfg.data.split: args.synthetic})
      extra = [f"data.data_dir={os.path.join(tmp, 'tfds')}"]
    for real_p in (None, 1.0):
      overrides = args.set + extra + ([] if real_p is None else [f"patch.real_p={real_p}"])
      rows.append(measure(common.load_config(str(args.config), overrides), args.steps,
                          os.path.join(tmp, f"run_{len(rows)}")))
  mixed, full = rows
  result = {"machine": common.machine(), "config": str(args.config), "overrides": args.set, "rows": rows,
            "measured_step_cost": mixed["wall_ms_per_step"] / full["wall_ms_per_step"],
            "theoretical_step_cost": mixed["theoretical_step_cost"],
            "counted_images_per_s_speedup": mixed["counted_images_per_s"] / full["counted_images_per_s"]}
  name = os.path.splitext(os.path.basename(str(args.config)))[0]
  out = args.out or os.path.join(common.ROOT, "benchmarks", "results", f"mixed_schedule_{name}.json")
  print(f"# mixed schedule vs full-image training, measured by the loop: {args.config} {' '.join(args.set)}")
  common.print_table(rows, [("real_p", "real_p", ".2f"), ("wall_ms_per_step", "wall ms/step", ".1f"),
                            ("counted_images_per_s", "counted img/s", ".1f"),
                            ("theoretical_step_cost", "theory step cost", ".2f")])
  print(f"measured mixed step cost {result['measured_step_cost']:.2f} of a full step (theory "
        f"{result['theoretical_step_cost']:.2f}); counted images/s {result['counted_images_per_s_speedup']:.2f}x "
        f"full-image training")
  print(f"wrote {common.write_json(out, result)}")
  return 0


def main(argv=None) -> int:
  return cli.run(_main, argv, prog="mixed_schedule.py")


if __name__ == "__main__":
  sys.exit(main())
