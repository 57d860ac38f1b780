"""Time to quality: FID against training wall time, patch schedule vs full-image training, same budget.

  python benchmarks/time_to_quality.py --config configs/digits.py --budget_min 12 --evals 4 --samples 500
  python benchmarks/time_to_quality.py --config configs/digits.py --variant full:patch.real_p=1.0 \\
      --variant patch:patch.real_p=0.5 --variant progressive:patch.schedule=progressive --budget_min 20
  python benchmarks/time_to_quality.py --config configs/digits.py --variant patch: \\
      --variant multistage:config=configs/digits_multistage.py --budget_min 8

A variant is ``NAME:overrides``: overrides separated by ``,`` (or by ``;`` when a value holds a comma,
e.g. ``ms:model.decoder_channels=(48,32,8);model.arch=ddpmpp-multistage``); ``config=PATH`` swaps the
variant's config file (``--set`` still applies to every variant).

Each variant trains the same network from the same seed with the trainer itself
(``train.train_and_evaluate``) plus a hook that, at ``--evals`` evenly spaced points of the training
wall-clock budget, pauses the clock, computes the project's Inception FID of the EMA network
(``--samples`` samples against the training set's cached reference statistics) and resumes; the run
stops when the budget is spent. Training time counts from the first step (compilation is reported
separately: a laptop pays it once per run, a long run not at all). Writes
``benchmarks/results/time_to_quality_<config>.json`` and ``.png`` (FID vs training minutes per variant),
prints a table and, for each variant, the training time it needed to reach the first variant's final
FID (linear interpolation between evaluations; "not reached" when it does not get there).

Needs the Inception weights (``python -m patch_diffusion.tools.fetch_inception``) and matplotlib.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

from absl import logging  # noqa: E402

from patch_diffusion import experiment  # noqa: E402
from patch_diffusion import hooks  # noqa: E402
from patch_diffusion import train  # noqa: E402
from patch_diffusion.tools import cli  # noqa: E402


class WallClockEval(hooks.Hook):
  """Evaluates FID at fixed points of training wall time (eval time excluded); stops at the budget."""

  def __init__(self, evaluator, budget_s: float, evals: int, samples: int, seed: int):
    self.evaluator, self.samples, self.seed = evaluator, samples, seed
    self.points = [budget_s * (i + 1) / evals for i in range(evals)]
    self.train_s = 0.0
    self._last = None
    self.records: list[dict] = []

  def after_step(self, run: hooks.Run) -> None:
    now = time.time()
    if self._last is None:  # the first step: its dispatch and compile warm-up start the clock
      self._last = now
      return
    self.train_s += now - self._last
    if self.points and self.train_s >= self.points[0]:
      self.points.pop(0)
      t0 = time.time()
      fid = self.evaluator(run.state.variables(ema=True), num_samples=self.samples, seed=self.seed)["fid"]
      self.records.append({"train_s": round(self.train_s, 1), "step": run.step, "kimg": run.nimg / 1000,
                           "fid": fid, "eval_s": round(time.time() - t0, 1)})
      logging.info("time-to-quality: %.1f min of training, %.1f kimg, FID %.3f", self.train_s / 60,
                   run.nimg / 1000, fid)
      if not self.points:
        run.stop_reason = "budget"
    self._last = time.time()  # the evaluation is not training time


def run_variant(config, name: str, budget_s: float, evals: int, samples: int, workdir: str) -> dict:
  config.train.total_kimg = 1e9  # the budget ends the run
  config.train.sample_every_steps = 0
  config.train.final_num_samples = 0
  config.train.checkpoint_every_steps = 10**9
  config.eval.every_kimg = 0.0
  exp = experiment.build_experiment(config)
  hook = WallClockEval(experiment.make_evaluator(exp), budget_s, evals, samples, config.seed + 2)
  t0 = time.time()
  train.train_and_evaluate(config, workdir, extra_hooks=[hook])
  return {"name": name, "records": hook.records, "wall_s": time.time() - t0,
          "schedule": exp.schedule.describe(config.train.batch_size)}


def time_to_reach(records: list[dict], target: float):
  """Training seconds at which FID first reaches ``target`` (linear interpolation), None if never."""
  prev = None
  for r in records:
    if r["fid"] <= target:
      if prev is None:
        return r["train_s"]
      f0, f1, t0, t1 = prev["fid"], r["fid"], prev["train_s"], r["train_s"]
      return t0 + (t1 - t0) * (f0 - target) / max(f0 - f1, 1e-12)
    prev = r
  return None


def plot(results: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in results:
    ax.plot([x["train_s"] / 60 for x in r["records"]], [x["fid"] for x in r["records"]], "o-", label=r["name"])
  ax.set_xlabel("training wall time (min, evaluation excluded)")
  ax.set_ylabel("FID (Inception, lower is better)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def parse_variant(spec: str, default_config: str) -> tuple[str, str, list[str]]:
  """``NAME:o1,o2`` (or ``NAME:o1;o2``) -> (name, config file, overrides); ``config=PATH`` picks the file."""
  name, _, rest = spec.partition(":")
  if not name:
    raise ValueError(f"--variant {spec!r}: give it a name, NAME:overrides")
  parts = [o.strip() for o in rest.split(";" if ";" in rest else ",") if o.strip()]
  config_path = default_config
  overrides = []
  for o in parts:
    if o.startswith("config="):
      config_path = cli.existing_file(o[len("config="):])
    else:
      overrides.append(o)
  return name, str(config_path), overrides


def _main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python benchmarks/time_to_quality.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, type=cli.existing_file)
  p.add_argument("--set", action="append", default=[], help="override for every variant, a.b=value")
  p.add_argument("--variant", action="append", default=[], metavar="NAME:a.b=v[,c.d=w]",
                 help="default: full:patch.real_p=1.0 and patch:patch.real_p=0.5")
  p.add_argument("--budget_min", type=cli.positive_float, default=12.0, help="training minutes per variant")
  p.add_argument("--evals", type=cli.positive_int, default=4)
  p.add_argument("--samples", type=cli.positive_int, default=500)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  variants = args.variant or ["full:patch.real_p=1.0", "patch:patch.real_p=0.5"]
  results = []
  for spec in variants:
    name, config_path, overrides = parse_variant(spec, str(args.config))
    config = common.load_config(config_path, args.set + overrides)
    with tempfile.TemporaryDirectory() as tmp:
      results.append(run_variant(config, name, args.budget_min * 60, args.evals, args.samples, tmp))
  target = results[0]["records"][-1]["fid"]
  for r in results:
    reach = time_to_reach(r["records"], target)
    r["minutes_to_first_variant_final_fid"] = None if reach is None else round(reach / 60, 2)
  base = os.path.splitext(os.path.basename(str(args.config)))[0]
  out = args.out or os.path.join(common.ROOT, "benchmarks", "results", f"time_to_quality_{base}")
  payload = {"machine": common.machine(), "config": str(args.config), "overrides": args.set, "variants": variants,
             "budget_min": args.budget_min, "samples": args.samples, "target_fid": target, "results": results}
  common.write_json(out + ".json", payload)
  plot(results, out + ".png", f"{base}: FID ({args.samples} samples) vs training time")
  print(f"# time to quality: {args.config} {' '.join(args.set)}, budget {args.budget_min} min per variant")
  print("| variant | " + " | ".join(f"FID @ {x['train_s'] / 60:.1f} min" for x in results[0]["records"]) +
        f" | min to reach FID {target:.2f} |")
  print("|---" * (len(results[0]["records"]) + 2) + "|")
  for r in results:
    cells = " | ".join(f"{x['fid']:.2f} ({x['kimg']:.0f} kimg)" for x in r["records"])
    reach = r["minutes_to_first_variant_final_fid"]
    print(f"| {r['name']} | {cells} | {'not reached' if reach is None else reach} |")
  print(f"wrote {out}.json and {out}.png")
  return 0


def main(argv=None) -> int:
  return cli.run(_main, argv, prog="time_to_quality.py")


if __name__ == "__main__":
  sys.exit(main())
