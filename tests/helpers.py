"""Helpers shared by the trainer-level tests (configs, run lengths, logs, checkpoint digests)."""
import hashlib
import json
import pathlib
import struct
import zlib

import jax
import ml_collections
import numpy as np

from configs import tiny_test
from patch_diffusion import checkpointing
from patch_diffusion import configs_io
from patch_diffusion import experiment
from patch_diffusion.data import patches


#: Overrides that shrink the tiny config to one level without attention: for tests of the trainer, the
#: checkpoints or the step's bookkeeping, which do not depend on the network's depth; it compiles in about
#: half the time.
ONE_LEVEL = {"model.channel_mult": (1,), "model.attn_resolutions": ()}


def tiny(**overrides) -> ml_collections.ConfigDict:
  """configs/tiny_test.py with dotted overrides, e.g. ``tiny(**{"patch.real_p": 1.0})``."""
  return configs_io.apply_overrides(tiny_test.get_config(), overrides)


def steps_to_kimg(c: ml_collections.ConfigDict, n: int) -> float:
  """``train.total_kimg`` that makes the run exactly ``n`` steps long."""
  sched = patches.PatchSchedule(c.data.resolution, c.patch.schedule, c.patch.real_p, c.patch.latent)
  return (n - 0.5) * c.train.batch_size * sched.average_batch_mul / 1000


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def tree_digest(path: pathlib.Path) -> str:
  """SHA-256 over the relative names and bytes of every file under ``path``."""
  h = hashlib.sha256()
  for p in sorted(pathlib.Path(path).rglob("*")):
    if p.is_file():
      h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
  return h.hexdigest()


def write_png16_rgb(path: pathlib.Path, arr: np.ndarray) -> None:
  """Writes ``arr`` (uint16 [H, W, 3]) as a 16-bit-per-channel RGB PNG by hand (PIL cannot write one)."""
  h, w, _ = arr.shape
  raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  body = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw))
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b""))


def restore_checkpoint(workdir: str, config: ml_collections.ConfigDict, step: int | None = None):
  """(TrainState on the host, metadata) of ``<workdir>/checkpoints`` at ``step`` (None: the newest)."""
  exp = experiment.build_experiment(config)
  ckpt = checkpointing.Checkpointer(f"{workdir}/checkpoints")
  try:
    state, meta = ckpt.restore(experiment.abstract_train_state(exp), step)
  finally:
    ckpt.close()
  return jax.device_get(state), meta
