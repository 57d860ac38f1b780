"""Stage boundaries for a multi-stage network from a data set, by the authors' timestep clustering with the
ideal denoiser (Zhang et al., CVPR 2024; the criterion and its thresholds: ``patch_diffusion/edm/
stage_boundaries.py``).

    python -m patch_diffusion.tools.stage_boundaries --config configs/digits.py
    python -m patch_diffusion.tools.stage_boundaries --config configs/celeba64.py --max_reference 5000 \\
        [--num_samples 256] [--num_sigmas 101] [--eta 0.9] [--delta 0.00784] [--seed 0] [--out curves.json]

Reads ``--max_reference`` images of the config's training data (a seeded random subset; all when the set is
smaller) at ``data.resolution`` / ``data.num_channels``, in [−1, 1]: the reference set of the ideal denoiser
D*(x; σ) = softmax-weighted mean of the images. Noises ``--num_samples`` of them once per σ on a log grid,
prints the two similarity curves (to the true noise, S_0, and to the data mean, S_1) and the boundaries
where they cross η, and the config line that uses them. Cost: num_sigmas × num_samples × max_reference ×
pixels multiply-adds in float64 (digits: seconds; CelebA-64 with 5,000 references: minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import numpy as np

from patch_diffusion import configs_io
from patch_diffusion.data import datasets
from patch_diffusion.data import input_pipeline
from patch_diffusion.edm import stage_boundaries as sb
from patch_diffusion.tools import cli


def _unit_interval(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
  if not 0 < value < 1:
    raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {value}")
  return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m patch_diffusion.tools.stage_boundaries",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, type=cli.existing_file, help="experiment config (its data section)")
  p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                 help="config override, e.g. --set data.data_dir=/data (repeatable)")
  p.add_argument("--num_samples", type=cli.positive_int, default=256, help="noised images (default 256)")
  p.add_argument("--max_reference", type=cli.positive_int, default=10_000,
                 help="reference images of the ideal denoiser (default 10000; memory: 8 bytes x pixels each)")
  p.add_argument("--num_sigmas", type=cli.positive_int, default=101, help="σ grid points (default 101)")
  p.add_argument("--sigma_min", type=cli.positive_float, default=0.002)
  p.add_argument("--sigma_max", type=cli.positive_float, default=80.0)
  p.add_argument("--eta", type=_unit_interval, default=sb.DEFAULT_ETA, help="similarity threshold η (default 0.9)")
  p.add_argument("--delta", type=cli.positive_float, default=sb.DEFAULT_DELTA,
                 help="tolerance δ in ε units (default 2/255)")
  p.add_argument("--seed", type=cli.nonnegative_int, default=0)
  p.add_argument("--out", help="write the curves and boundaries to this JSON file")
  return p.parse_args(argv)


def load_images(config, max_images: int, seed: int) -> np.ndarray:
  """Up to ``max_images`` preprocessed training images (a seeded random subset), float64 [M, R, R, C] in
  [−1, 1]."""
  source, info = datasets.get_data_source(config.data)
  pre = input_pipeline.PreprocessedSource(source, info.resolution, info.num_channels, False)
  n = len(pre)
  idx = np.arange(n) if max_images >= n else np.sort(np.random.default_rng([seed, 1]).choice(n, max_images,
                                                                                              replace=False))
  return np.stack([pre[int(i)]["image"] for i in idx]).astype(np.float64) / 127.5 - 1.0


def report(result: sb.BoundaryResult, name: str) -> str:
  """The printed summary: curves at every 5th grid point, boundaries (and their VP times), config line."""
  lines = [f"{name}: {result.num_reference} reference images, {result.num_samples} noised samples, "
           f"δ = {result.delta:.5g} (ε units), η = {result.eta:g}",
           "  sigma      S_0 (ideal ε vs true noise)   S_1 (ideal ε vs data-mean ε)"]
  step = max(1, len(result.sigmas) // 20)
  for sigma, a, b in list(zip(result.sigmas, result.s0, result.s1))[::step]:
    lines.append(f"  {sigma:9.4g}  {a:8.4f}                      {b:8.4f}")
  b1, b2 = result.boundaries
  lines.append(f"stage boundaries: {b1:.4f} {b2:.4f}  (EDM VP time {sb.vp_time(b1):.3f} {sb.vp_time(b2):.3f}; "
               f"the authors' CIFAR-10 2.5103 7.6577 are VP time 0.442 0.636)")
  lines.append(f"use: --config.model.stage_boundaries='({b1:.4f}, {b2:.4f})'")
  return "\n".join(lines)


def _main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  bad = [item for item in args.set if "=" not in item]
  if bad:
    raise ValueError(f"--set expects SECTION.FIELD=VALUE, got {bad[0]!r}")
  config = configs_io.load_config(str(args.config), **dict(item.split("=", 1) for item in args.set))
  images = load_images(config, args.max_reference, args.seed)
  result = sb.find_boundaries(images, num_samples=args.num_samples, num_sigmas=args.num_sigmas,
                              sigma_min=args.sigma_min, sigma_max=args.sigma_max, delta=args.delta, eta=args.eta,
                              seed=args.seed)
  print(report(result, f"{config.data.name} {config.data.resolution}x{config.data.resolution}"))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"boundaries": list(result.boundaries), "sigmas": result.sigmas.tolist(), "s0": result.s0.tolist(),
                 "s1": result.s1.tolist(), "delta": result.delta, "eta": result.eta,
                 "num_samples": result.num_samples, "num_reference": result.num_reference}, f, indent=1)
    print(f"wrote {args.out}")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the tool; a bad input ends in one line naming the problem (exit 1), not a traceback."""
  return cli.run(_main, argv, prog="stage_boundaries")


if __name__ == "__main__":
  sys.exit(main())
