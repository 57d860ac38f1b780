"""Checkpoints: Orbax training checkpoints and converted networks, each with an integrity manifest.

* :class:`Checkpointer` — async keep-K Orbax checkpoints of the training state plus JSON metadata;
  every committed checkpoint carries ``manifest.json`` (sizes + xxh3-128 of every file) and is verified
  before it is restored (``manifest.py``).
* :func:`save_pretrained` / :func:`load_pretrained` — a network directory (variables + ``config.json``).
* :func:`ensure_writable` — fail before training on an unusable workdir.

``orbax_io.py`` is the only module of the project that imports Orbax.
"""
from patch_diffusion.checkpointing.errors import CheckpointDamagedError, CheckpointError
from patch_diffusion.checkpointing.manifest import MANIFEST_NAME, Verdict, verify, write_manifest
from patch_diffusion.checkpointing.orbax_io import (Checkpointer, abstract_like, ensure_writable,
                                                    load_pretrained, save_pretrained)

__all__ = ["CheckpointDamagedError", "CheckpointError", "Checkpointer", "MANIFEST_NAME", "Verdict",
           "abstract_like", "ensure_writable", "load_pretrained", "save_pretrained", "verify",
           "write_manifest"]
