"""Convert a PyTorch EDM / Patch Diffusion network into a Flax network directory (without torch).

    python -m patch_diffusion.tools.convert_torch SRC DST [--arch ddpmpp|ncsnpp|adm|ddpmpp-multistage]
        [--img_resolution R] [--img_channels C] [--label_dim L] [--key ema]
        [--model_channels N --channel_mult 1,2,2,2 ... (any config.model field)]
        [--decoder_channels 192,128,16 --stage_boundaries 2.5103,7.6577 (multi-stage networks)]
        [--set section.field=value ...]

SRC is an EDM / Patch Diffusion ``network-snapshot-*.pkl`` (the ``ema`` network by default, ``--key``
picks another entry), a ``torch.save`` checkpoint (``.pt``/``.pth``: a state dict, or a dict holding a
module or a state dict) or an ``.npz`` of named arrays. DST receives the Orbax checkpoint of the
variables plus ``config.json`` (a full ``configs/default.py`` config with the network, data and
preconditioning fields filled) through ``checkpointing.save_pretrained``; sample from it with
``--config.sample.pretrained=DST`` or fine-tune with ``--config.train.init_from=DST``.

Where the settings come from, lowest to highest priority: the tensor names and shapes of the state
dict (architecture, channels, levels, blocks, attention resolutions, labels, filter), the constructor
kwargs EDM's persistence recorded in a ``.pkl``, then the command-line flags. ``dropout`` is not visible
in a state dict; it only matters for fine-tuning (``--dropout``).

Plain EDM networks (``EDMPrecond`` / ``VPPrecond`` / ``VEPrecond``, no coordinate channels) are converted
with zero weights for the two coordinate input channels, so they compute exactly what the original
does; they can then be sampled, or fine-tuned with Patch Diffusion.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from patch_diffusion.interop.edm_checkpoint import parse_value, convert, load_base_config
from patch_diffusion.models import registry
from patch_diffusion.tools import cli


def _int_list(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.replace("(", "").replace(")", "").split(",") if v.strip())


def _float_list(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.replace("(", "").replace(")", "").split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m patch_diffusion.tools.convert_torch",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("src", type=cli.existing_path, help="network-snapshot-*.pkl, .pt/.pth or .npz; or a diffusers "
                 "VAE (directory with config.json + diffusion_pytorch_model.safetensors, or .safetensors)")
  p.add_argument("dst", help="output directory (Orbax variables + config.json)")
  p.add_argument("--key", default="ema", help="snapshot entry holding the network (default: ema)")
  p.add_argument("--arch", choices=registry.archs())
  p.add_argument("--img_resolution", type=cli.positive_int)
  p.add_argument("--img_channels", type=cli.positive_int,
                 help="image channels C (without the 2 coordinate channels)")
  p.add_argument("--label_dim", type=cli.nonnegative_int)
  p.add_argument("--base_config", help="config file to fill (default: configs/default.py)")
  for name, default in registry.DEFAULTS.items():
    kind = _int_list if isinstance(default, tuple) else type(default)
    p.add_argument(f"--{name}", type=kind)
  p.add_argument("--decoder_channels", type=_int_list,
                 help="multi-stage networks: decoder base widths (read off the tensors by default)")
  p.add_argument("--stage_boundaries", type=_float_list,
                 help="multi-stage networks: the K-1 σ values between stages; a bare state dict does not "
                      "record them (default: the authors' 2.5103,7.6577 for 3 decoders)")
  p.add_argument("--dtype", choices=sorted(registry.DTYPES))
  p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                 help="any other config value, e.g. --set data.name=celeb_a (repeatable)")
  return p.parse_args(argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  overrides: dict[str, Any] = {}
  for name in ("arch", "img_resolution", "img_channels", "label_dim", "dtype", *registry.DEFAULTS,
               *registry.MULTISTAGE_DEFAULTS):
    value = getattr(args, name)
    if value is not None:
      overrides[name] = value
  for item in args.set:
    path, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--set expects SECTION.FIELD=VALUE, got {item!r}")
    overrides[path.strip()] = parse_value(value.strip())
  if _is_diffusers_vae(args.src):
    return _convert_vae(args.src, args.dst)
  base = load_base_config(args.base_config) if args.base_config else None
  variables, config = convert(args.src, overrides, key=args.key, base_config=base)
  from patch_diffusion import checkpointing  # Orbax lives there only.
  checkpointing.save_pretrained(args.dst, variables, config)
  m = config.model
  n_params = sum(int(np.size(v)) for v in _leaves(variables.get("params", {})))
  print(f"converted {args.src} -> {args.dst}: {m.arch} ({n_params / 1e6:.2f} M parameters), "
        f"{config.data.resolution}x{config.data.resolution}x{config.data.num_channels}, "
        f"labels={config.data.use_labels}, precond={config.edm.precond}")
  if m.decoder_channels:
    print(f"  multi-stage: decoders {tuple(m.decoder_channels)}, stage boundaries {tuple(m.stage_boundaries)} "
          f"(a bare state dict does not record them: check they are the checkpoint's, else pass "
          f"--stage_boundaries)")
  return 0


def _is_diffusers_vae(src) -> bool:
  """A diffusers VAE directory, or a .safetensors file (the networks this tool reads are pickles/zips)."""
  import pathlib  # pylint: disable=g-import-not-at-top
  from patch_diffusion.interop import diffusers_vae  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(src)
  return path.suffix == ".safetensors" or (path.is_dir() and (
      (path / diffusers_vae.WEIGHTS_NAME).is_file() or (path / "vae" / diffusers_vae.WEIGHTS_NAME).is_file()))


def _convert_vae(src, dst) -> int:
  """A diffusers VAE (either attention naming, any float dtype) -> a float32 diffusers directory with the
  current names, read without torch; latent runs use it as ``--config.model.vae=DST``."""
  from patch_diffusion.interop import diffusers_vae  # pylint: disable=g-import-not-at-top
  module, variables = diffusers_vae.load_vae(src)
  diffusers_vae.save_vae(dst, module.config, variables)
  cfg = module.config
  n_params = sum(int(np.size(v)) for v in _leaves(variables["params"]))
  print(f"converted VAE {src} -> {dst}: AutoencoderKL ({n_params / 1e6:.2f} M parameters), "
        f"{cfg.downsample_factor}x downsampling, {cfg.latent_channels} latent channels, scaling factor "
        f"{cfg.scaling_factor}; use it with --config.model.vae={dst}")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the converter; a bad input ends in one line naming the problem (exit 1), not a traceback."""
  return cli.run(_main, argv, prog="convert_torch")


def _leaves(tree):
  if isinstance(tree, Mapping):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


if __name__ == "__main__":
  sys.exit(main())
