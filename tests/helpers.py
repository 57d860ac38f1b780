"""Helpers shared by the trainer-level tests (configs, run lengths, logs, checkpoint digests)."""
import hashlib
import json
import pathlib

import ml_collections

from configs import tiny_test
from patch_diffusion.data import patches


def tiny(**overrides) -> ml_collections.ConfigDict:
  """configs/tiny_test.py with dotted overrides, e.g. ``tiny(**{"patch.real_p": 1.0})``."""
  c = tiny_test.get_config()
  for dotted, value in overrides.items():
    node = c
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


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
