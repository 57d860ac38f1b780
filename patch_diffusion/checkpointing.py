"""Checkpoints with Orbax — the only module of the project that imports orbax.

A training checkpoint at step N holds two items:
  * ``state``: the :class:`~patch_diffusion.state.TrainState` pytree (params, EMA, Adam moments, step);
  * ``meta``: JSON — image counter, data-iterator position, config, wall time.
Orbax writes each checkpoint into a temporary folder and renames it when complete, so a crash during a
(possibly asynchronous) save leaves the previous checkpoints intact; old ones are deleted only after a
newer one is committed (keep-K policy).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written or does not match the run restoring it."""


def ensure_writable(directory: str) -> None:
  """Creates ``directory`` and proves it is writable (fails before any training happens).

  Remote paths (``gs://...``) are left to Orbax, which creates and checks them itself.
  """
  if _is_url(directory):
    return
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(
        f"cannot write to {directory!r} ({e.strerror or e}); choose a writable --workdir "
        f"(and check the disk is not full: df -h {os.path.dirname(os.path.abspath(directory))})") from e


def _is_url(path: str) -> bool:
  return "://" in str(path)


def _absolute(path: str) -> str:
  # os.path.abspath would turn 'gs://bucket/run' into '<cwd>/gs:/bucket/run'.
  return str(path) if _is_url(path) else os.path.abspath(path)


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing ``tree``: the target of a sharded restore."""
  def to_abstract(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(to_abstract, tree)


class Checkpointer:
  """Async Orbax checkpoints of the training state plus JSON metadata, keep-last-K."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = _absolute(directory)
    if jax.process_index() == 0:
      ensure_writable(self.directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> bool:
    """Starts saving (asynchronously); returns True if a save was started."""
    meta = dict(meta, saved_at=time.time())
    try:
      return self._manager.save(
          int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)), force=True)
    except OSError as e:
      raise CheckpointError(f"saving checkpoint {step} to {self.directory} failed: {e}. Earlier "
                            f"checkpoints are untouched; free disk space and resume") from e

  def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores ``(state, meta)`` at ``step`` (default latest) into ``target_state``'s structure/shardings.

    Raises:
      CheckpointError: no checkpoint, or one whose arrays do not match the current model.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    abstract = abstract_like(target_state)
    try:
      restored = self._manager.restore(
          int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                             meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} does not match the configured model "
          f"(different architecture or sizes?) or is incomplete: {e}. Use another --workdir, or the "
          f"config the checkpoint was trained with (saved in its meta/config).") from e
    except Exception as e:  # pylint: disable=broad-except
      # TensorStore / file-system errors (truncated or deleted files) otherwise surface as a bare
      # Exception or FileNotFoundError with a page of TensorStore spec; say what it means and the fix.
      older = [s for s in self.all_steps() if s < int(step)]
      fix = (f"delete {os.path.join(self.directory, str(step))} to resume from checkpoint {older[-1]}"
             if older else "restore its files or start in a fresh --workdir")
      detail = str(e).split("\n", 1)[0].split(" See full TensorStore details")[0][:300]
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} cannot be read: its files are damaged or incomplete "
          f"({type(e).__name__}: {detail}); {fix}") from e
    _check_shapes(abstract, restored["state"], step, self.directory)
    return restored["state"], dict(restored["meta"])

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def wait(self) -> None:
    """Blocks until any in-flight asynchronous save is committed.

    Raises:
      CheckpointError: the background write failed (e.g. the disk filled up); earlier checkpoints are
        intact, the failed one stays an uncommitted ``<step>.orbax-checkpoint-tmp`` folder.
    """
    try:
      self._manager.wait_until_finished()
    except OSError as e:
      # An asynchronous save reports its I/O error only here; name the fix like a synchronous one.
      raise CheckpointError(f"writing a checkpoint to {self.directory} failed: {e}. Earlier checkpoints "
                            f"are untouched (latest complete: {self.latest_step()}); free disk space "
                            f"and resume") from e

  def close(self) -> None:
    self.wait()
    self._manager.close()


def _check_shapes(abstract, restored, step, directory) -> None:
  bad = []
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(restored)):
    if tuple(want.shape) != tuple(got.shape):
      bad.append(f"{jax.tree_util.keystr(path)}: checkpoint {tuple(got.shape)} vs model {tuple(want.shape)}")
  if bad:
    raise CheckpointError(f"checkpoint {step} in {directory} does not match the configured model:\n  "
                          + "\n  ".join(bad[:20]))


# ---- pretrained (converted) networks ------------------------------------------------------------------

def save_pretrained(directory: str, variables: dict, config: ml_collections.ConfigDict) -> None:
  """Writes network variables (Orbax) and the matching full config (``config.json``) to ``directory``.

  ``--mode=sample`` and fine-tuning load this with :func:`load_pretrained`.
  """
  directory = os.path.abspath(directory)
  ensure_writable(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "variables"), variables, force=True)
    ckptr.wait_until_finished()
  with open(os.path.join(directory, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def load_pretrained(directory: str) -> tuple[dict, ml_collections.ConfigDict]:
  """Reads ``(variables, config)`` written by :func:`save_pretrained` (variables as host arrays)."""
  directory = os.path.abspath(directory)
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{directory} is not a converted network (no config.json); create one with "
                          f"python -m patch_diffusion.tools.convert_torch SRC {directory}")
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(os.path.join(directory, "variables"))
  logging.info("loaded pretrained network from %s", directory)
  return variables, config
