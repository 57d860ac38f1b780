"""Patch Diffusion on EDM in JAX/Flax.

What a notebook needs, importable from the package (loaded on first use, so ``import patch_diffusion`` is
cheap)::

  import patch_diffusion as pd
  config = pd.load_config("configs/digits.py")            # or build one from configs.default
  pd.train_and_evaluate(config, "/tmp/run")                 # train / resume
  pd.sample(config, "/tmp/run")                             # samples.npz + samples.png
  pd.evaluate(config, "/tmp/run")                           # FID / KID / precision-recall
  exp = pd.build_experiment(config)                         # mesh, data, network, schedule, ...

The pure pieces live in ``patch_diffusion.data.patches``, ``patch_diffusion.edm``, ``patch_diffusion.models``.
docs/DESIGN.md describes the layout and docs/METHOD.md the method as implemented.
"""
from __future__ import annotations

from patch_diffusion import lazy

__version__ = "0.1.0"

_EXPORTS = {
    "train_and_evaluate": "patch_diffusion.train",
    "sample": "patch_diffusion.generate",
    "evaluate": "patch_diffusion.evaluate",
    "build_experiment": "patch_diffusion.experiment",
    "load_ema_variables": "patch_diffusion.experiment",
    "load_config": "patch_diffusion.configs_io",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy.exports(__name__, _EXPORTS, globals())
