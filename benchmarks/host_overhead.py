"""Host overhead of the training loop and input-pipeline headroom.

Runs the real trainer (``train.train_and_evaluate``) for a few steps and reads the per-step host time it
logs outside compiled computation — input (grain batches + concatenation), host-to-device (global array
assembly), dispatch (the compiled call returns before the device finishes) — against the wall time per
step. Separately measures the input pipeline alone (images/s) and compares it with what the steps consume
(full-resolution images per step / step time): the headroom must be ≥ 10×.

  python benchmarks/host_overhead.py --config configs/digits.py --steps 60
  python benchmarks/host_overhead.py --config configs/celeba64.py --synthetic 512 --set train.batch_size=16

``--synthetic N`` writes a real TFDS ArrayRecord copy of the config's dataset with N random images (e.g.
celeb_a's 218×178 JPEG-encoded RGB) into a temporary data dir, for datasets not prepared on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

import jax  # noqa: E402
import numpy as np  # noqa: E402

from patch_diffusion import train  # noqa: E402
from patch_diffusion.tools import cli  # noqa: E402
from patch_diffusion.data import datasets  # noqa: E402
from patch_diffusion.data import input_pipeline  # noqa: E402


def run(config, steps: int, synthetic: int, workdir: str) -> dict:
  if synthetic:
    from patch_diffusion.tools import prepare_dataset  # pylint: disable=g-import-not-at-top
    data_dir = os.path.join(workdir, "tfds")
    prepare_dataset.write_synthetic_tfds_dataset(config.data.name, data_dir, {config.data.split: synthetic})
    config.data.data_dir = data_dir
  # Input pipeline alone, at the trainer's per-process batch.
  source, info = datasets.get_data_source(config.data)
  local_batch = config.train.batch_size // jax.process_count()
  it = input_pipeline.create_train_iterator(config.data, batch_size=local_batch, seed=1, data=(source, info))
  pipeline_ips = input_pipeline.measure_throughput(it, max(20, steps // 2), warmup_batches=3)
  # The real loop: per-step host timers are logged every log step.
  from patch_diffusion.data import patches  # pylint: disable=g-import-not-at-top
  sched = patches.PatchSchedule(config.data.resolution, config.patch.schedule, config.patch.real_p,
                                config.patch.latent)
  config.train.total_kimg = (steps - 0.5) * config.train.batch_size * sched.average_batch_mul / 1000
  config.train.log_every_steps = max(steps // 3, 1)
  config.train.checkpoint_every_steps = 10 * steps
  config.train.sample_every_steps = 0
  config.train.final_num_samples = 0
  run_dir = os.path.join(workdir, "run")
  train.train_and_evaluate(config, run_dir)
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f][1:]  # the first interval holds the first-call warm-up
  keys = ("host_ms_input", "host_ms_h2d", "host_ms_dispatch", "wall_ms_per_step")
  med = {k: float(np.median([r[k] for r in records])) for k in keys}
  host_ms = med["host_ms_input"] + med["host_ms_h2d"] + med["host_ms_dispatch"]
  images_per_step = config.train.batch_size * sched.average_batch_mul  # full-res images read per step
  consumed_ips = images_per_step / (med["wall_ms_per_step"] / 1e3)
  return {"machine": common.machine(), "pipeline_images_per_s": pipeline_ips,
          "consumed_images_per_s": consumed_ips, "headroom": pipeline_ips / consumed_ips,
          "host_ms_per_step": host_ms, "host_fraction": host_ms / med["wall_ms_per_step"], **med,
          "intervals": len(records), "images_per_step": images_per_step}


def _main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python benchmarks/host_overhead.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, type=cli.existing_file)
  parser.add_argument("--set", action="append", default=[])
  parser.add_argument("--steps", type=cli.positive_int, default=60)
  parser.add_argument("--synthetic", type=cli.nonnegative_int, default=0)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  config = common.load_config(str(args.config), args.set)
  with tempfile.TemporaryDirectory() as tmp:
    result = run(config, args.steps, args.synthetic, tmp)
  result.update(config=str(args.config), overrides=args.set, steps=args.steps, synthetic=args.synthetic)
  name = os.path.splitext(os.path.basename(str(args.config)))[0]
  out = args.out or os.path.join(common.ROOT, "benchmarks", "results", f"host_overhead_{name}.json")
  print(f"# host overhead: {args.config} {' '.join(args.set)}")
  common.print_table([result], [
      ("wall_ms_per_step", "wall ms/step", ".1f"), ("host_ms_input", "input ms", ".2f"),
      ("host_ms_h2d", "host→device ms", ".2f"), ("host_ms_dispatch", "dispatch ms", ".2f"),
      ("host_fraction", "host share", ".1%"), ("pipeline_images_per_s", "pipeline img/s", ".0f"),
      ("consumed_images_per_s", "consumed img/s", ".0f"), ("headroom", "headroom", ".1f")])
  print(f"wrote {common.write_json(out, result)}")
  return 0


def main(argv=None) -> int:
  """A bad input ends in one line naming the problem (exit 1), not a traceback."""
  return cli.run(_main, argv, prog="host_overhead.py")


if __name__ == "__main__":
  sys.exit(main())
