"""Encode a dataset into VAE latents once (posterior mean and std, float16 ArrayRecord) for latent training.

  python -m patch_diffusion.tools.encode_latents --config=configs/imagenet256_latent.py \\
      [--set data.data_dir=/data/tensorflow_datasets] [--set model.vae=/models/sd-vae-ft-ema] [--batch 256]

Reads the images behind the config (``data.name`` at ``data.resolution`` × the VAE's downsampling factor,
``data.max_examples``, ``data.split``), encodes them with ``model.vae`` on every local device (run the same
command on every host of a pod: each encodes its shard), and writes ``data.latent_dir`` (default
``<data dir>/latents/<dataset>-<split>-<px>-vae<id>[-xflip]``). ``data.xflip=True`` also stores each image's
mirror as a second record. Interrupted? Run it again: it resumes at the first missing chunk. Training with
the same config then reads these latents (``data.latents = 'precomputed'``). Format and choices:
``patch_diffusion/data/latents.py``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from patch_diffusion.tools import cli


def _main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m patch_diffusion.tools.encode_latents",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, type=cli.existing_file, help="the latent run's config file")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. data.data_dir=/data/tfds (repeatable)")
  p.add_argument("--batch", type=cli.positive_int, default=0, help="global images per encode call "
                 "(default: eval.batch_size)")
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from patch_diffusion import configs_io, experiment, parallel  # pylint: disable=g-import-not-at-top
  from patch_diffusion.data import latents  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  config = configs_io.load_config(str(args.config), **dict(item.split("=", 1) for item in args.set))
  if not config.patch.latent:
    raise ValueError(f"{args.config} is not a latent-space config (patch.latent=False): nothing to encode")
  jax.config.update("jax_threefry_partitionable", True)
  mesh = parallel.create_mesh(config.mesh.shape, config.mesh.axes)
  codec = experiment.load_codec(config, mesh)
  spec = experiment.encode_spec(config, codec)
  if args.batch:
    import dataclasses  # pylint: disable=g-import-not-at-top
    spec = dataclasses.replace(spec, batch_size=args.batch)
  folder = experiment.latent_dir(config, codec)
  meta = latents.encode_dataset(spec, folder, mesh)
  print(f"latents of {meta['dataset']} ({meta['num_images']} images{', x-flipped copies' if meta['xflip'] else ''})"
        f" -> {folder}: {meta['num_records']} records of shape {tuple(meta['shape'])}, VAE {meta['vae']}")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """A bad input ends in one line naming the problem (exit 1), not a traceback."""
  return cli.run(_main, argv, prog="encode_latents")


if __name__ == "__main__":
  sys.exit(main())
