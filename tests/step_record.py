"""Test instrumentation (never shipped in the trainer): a hook that records what each step consumed.

Per step it appends ``{"step", "size", "indices"}`` (0-based step, patch size, the record indices of this
process's local batch in order) to ``<workdir>/sizes_process_<i>.jsonl``; after the last step
``{"final_step", "params_sha256", "state_sha256"}``: SHA-256 of the parameters (of the whole TrainState)
per local device id (replicated: all must agree, on every process). Local file systems only.

In-process tests pass ``StepRecorder(workdir)`` to ``train.train_and_evaluate(extra_hooks=...)``;
subprocess tests (multi-host, crash harness) run this file instead of ``python -m patch_diffusion.main``,
with the same flags:

  python tests/step_record.py --config=configs/tiny_test.py --workdir=/tmp/run [--config.x=y ...]
"""
from __future__ import annotations

import collections
import hashlib
import json
import os

import jax
import numpy as np

from patch_diffusion import hooks

RECORD_NAME = "sizes_process_{}.jsonl"


class StepRecorder(hooks.Hook):
  """Appends one JSON line per step and a final digest record (see the module docstring)."""
  needs_example_indices = True

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, RECORD_NAME.format(jax.process_index())), "a")

  def _write(self, record: dict) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def after_step(self, run: hooks.Run) -> None:
    self._write({"step": run.step - 1, "size": int(run.size),
                 "indices": np.asarray(run.local["index"]).tolist()})

  def on_end(self, run: hooks.Run) -> None:
    if not run.stop_reason:
      record = {"final_step": run.step}
      for name, tree in (("params_sha256", run.state.params), ("state_sha256", run.state)):
        digests = collections.defaultdict(hashlib.sha256)  # one per local device
        for leaf in jax.tree.leaves(tree):
          for shard in leaf.addressable_shards:
            digests[shard.device.id].update(np.ascontiguousarray(np.asarray(shard.data)).tobytes())
        record[name] = {str(d): h.hexdigest() for d, h in sorted(digests.items())}
      self._write(record)
    self._file.close()


if __name__ == "__main__":
  from patch_diffusion import main as main_lib  # pylint: disable=g-import-not-at-top
  main_lib.run(extra_hooks_for=lambda workdir: [StepRecorder(workdir)])
