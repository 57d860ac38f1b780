"""Checkpoints with Orbax — the only module of the project that imports orbax.

A training checkpoint at step N is the folder ``<directory>/<N>`` holding two items:
  * ``state``: the :class:`~patch_diffusion.state.TrainState` pytree (params, EMA, Adam moments, step);
  * ``meta``: JSON — image counter, data-iterator position, config, wall time;
plus ``manifest.json`` (every file's size and xxh3-128 hash, see ``manifest.py``). Orbax writes each
checkpoint into a temporary folder and renames it when complete; the manifest is written into the
temporary folder by Orbax's post-finalization callback (background thread, primary process, after every
process has written), so the rename commits data and manifest together. A crash during a (possibly
asynchronous) save leaves the previous checkpoints intact; old ones are deleted only after a newer one is
committed (keep-K policy). Every restore verifies the manifest first and never restores a damaged
checkpoint.
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Optional

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from patch_diffusion import fileio
from patch_diffusion import parallel
from patch_diffusion.checkpointing import manifest as manifest_lib
from patch_diffusion.checkpointing.errors import CheckpointDamagedError, CheckpointError

#: Suffix of Orbax's uncommitted checkpoint folders (``<step>.orbax-checkpoint-tmp``).
TMP_SUFFIX = ".orbax-checkpoint-tmp"
#: Where ``skip_damaged=True`` moves damaged checkpoints: ``<directory>/../<name>/<step>-<time>``.
DAMAGED_DIRNAME = "checkpoints_damaged"


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


def _shared_verdict(folder: epath.Path) -> manifest_lib.Verdict:
  """Process 0 verifies ``folder``; every process returns its verdict (they must agree on restoring)."""
  verdict = manifest_lib.verify(folder) if jax.process_index() == 0 else None
  if jax.process_count() == 1:
    return verdict
  shared = parallel.allgather_json(verdict.to_json() if verdict is not None else None)[0]
  return manifest_lib.Verdict.from_json(shared)


def _write_replicated_arrays_from_one_process() -> None:
  """Single-process runs: Orbax writes each replicated array whole instead of replica-parallel.

  Replica-parallel saving splits every replicated array into one slice per replica so that several
  *hosts* can write it together; Orbax turns it on by default except on GPUs. With one process there is no
  other host to share the writing, and the slicing compiles a small XLA program per array shape and device
  count, in every new process: on 8 CPU devices the first save of the quickstart's TrainState (tiny
  network, 570 arrays) blocked training for 11.2 s, against 0.6 s without (570 arrays of distinct shapes:
  98 s against 0.6 s). Multi-process runs keep Orbax's default.
  The handler is registered process-wide (Orbax keeps one registry). The format is unchanged (the data is
  stored in fewer chunks); checkpoints written either way restore either way.
  """
  if jax.process_count() != 1:
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  if type(default) is ocp.type_handlers.ArrayHandler and getattr(default, "_use_replica_parallel", False):
    single = copy.copy(default)  # keeps the default's array-metadata store and other settings
    single._use_replica_parallel = False  # pylint: disable=protected-access
    ocp.type_handlers.register_type_handler(jax.Array, single, override=True)


class Checkpointer:
  """Async Orbax checkpoints of the training state plus JSON metadata and a manifest, keep-last-K."""

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    self.directory = _absolute(directory)
    if jax.process_index() == 0:
      ensure_writable(self.directory)
    _write_replicated_arrays_from_one_process()
    self._saving: Optional[int] = None  # the step whose async save is in flight
    self._last_seal_seconds = 0.0
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal))
    # Handlers named up front: item metadata (shapes, for the structure check) can be read before any
    # save or restore of this process.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(int(step))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  # ---- saving ------------------------------------------------------------------------------------

  def _seal(self) -> None:
    """Orbax's post-finalization callback: hash the uncommitted folder and write its manifest.

    Runs in Orbax's background thread on the primary process, after every process's files are written
    and before the folder is renamed into place. An exception here leaves the checkpoint uncommitted
    (and surfaces from :meth:`wait`), so no committed checkpoint of this version lacks a manifest.
    """
    step = self._saving
    root = epath.Path(self.directory)
    pending = sorted(root.glob(f"{step}{TMP_SUFFIX}*"))
    # Object stores commit in place (a commit marker written after this callback): no temporary folder.
    folder = pending[-1] if pending else root / str(step)
    t0 = time.perf_counter()
    manifest_lib.write_manifest(folder, step=step)
    self._last_seal_seconds = time.perf_counter() - t0

  def save(self, step: int, state: Any, meta: dict) -> bool:
    """Starts saving (asynchronously); returns True if a save was started."""
    meta = dict(meta, saved_at=time.time())
    # The manifest callback reads self._saving: the previous save must have committed before it changes
    # (Orbax would wait for it inside save() anyway).
    self.wait()
    self._saving = int(step)
    try:
      return self._manager.save(
          int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)), force=True)
    except OSError as e:
      raise CheckpointError(f"saving checkpoint {step} to {self.directory} failed: {e}. Earlier "
                            f"checkpoints are untouched; free disk space and resume") from e

  # ---- verification and restoring ------------------------------------------------------------------

  def verify(self, step: int) -> manifest_lib.Verdict:
    """Checks checkpoint ``step`` against its manifest (on process 0; every process gets the verdict)."""
    return _shared_verdict(self.step_dir(step))

  def _damaged_error(self, step: int, verdict: manifest_lib.Verdict) -> CheckpointDamagedError:
    older = [s for s in self.all_steps() if s < int(step)]
    shown = "; ".join(verdict.problems[:3]) + (f" (+{len(verdict.problems) - 3} more)"
                                                if len(verdict.problems) > 3 else "")
    fix = (f"To resume from an older checkpoint (the newest is {older[-1]}), rerun with "
           f"--config.train.skip_damaged_checkpoints=True (it moves damaged checkpoints to "
           f"{self._damaged_root()}/), or move {self.step_dir(step)} away yourself."
           if older else "No older checkpoint exists: restore its files from a backup or start in a fresh "
           "--workdir.")
    return CheckpointDamagedError(
        f"checkpoint {step} in {self.directory} is damaged and was not restored: {shown}. Nothing on disk "
        f"was changed. {fix}")

  def _damaged_root(self) -> epath.Path:
    return epath.Path(self.directory).parent / DAMAGED_DIRNAME

  def _quarantine(self, step: int) -> None:
    """Moves a damaged checkpoint out of Orbax's folder (kept for inspection, never deleted)."""
    if jax.process_index() == 0:
      dst = self._damaged_root() / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
      dst.parent.mkdir(parents=True, exist_ok=True)
      self.step_dir(step).rename(dst)
      logging.warning("moved damaged checkpoint %d to %s", step, dst)
    if jax.process_count() > 1:
      parallel.allgather_json(None)  # a barrier: nobody lists the folder before the move
    self._manager.reload()

  def restore(self, target_state: Any, step: int | None = None, *,
              skip_damaged: bool = False) -> tuple[Any, dict]:
    """Verifies, then restores ``(state, meta)`` at ``step`` (default latest) into ``target_state``'s
    structure and shardings.

    Args:
      target_state: a pytree like the saved state (arrays or ShapeDtypeStructs with shardings).
      step: the checkpoint step; None = the newest.
      skip_damaged: with ``step=None``, move damaged checkpoints aside (to ``checkpoints_damaged/``) and
        restore the newest intact one instead of raising.
    Raises:
      CheckpointDamagedError: the checkpoint's files differ from its manifest (nothing is restored or
        changed on disk).
      CheckpointError: no checkpoint, or one whose arrays do not match the current model.
    """
    while True:
      chosen = self.latest_step() if step is None else int(step)
      if chosen is None:
        raise CheckpointError(f"no checkpoint found in {self.directory}")
      verdict = self.verify(chosen)
      if verdict.status != "damaged":
        break
      if not (skip_damaged and step is None):
        raise self._damaged_error(chosen, verdict)
      logging.warning("checkpoint %d is damaged (%s); skipping it", chosen, "; ".join(verdict.problems[:3]))
      self._quarantine(chosen)
    if verdict.status == "no_manifest":
      logging.warning("checkpoint %d in %s has no %s (written by a version without integrity manifests): "
                      "restoring it unverified", chosen, self.directory, manifest_lib.MANIFEST_NAME)
    else:
      logging.info("checkpoint %d verified: %d files, %.1f MB hashed in %.2f s", chosen, verdict.num_files,
                   verdict.num_bytes / 1e6, verdict.seconds)
    t0 = time.perf_counter()
    restored = self._restore_verified(target_state, chosen)
    logging.info("checkpoint %d restored in %.2f s", chosen, time.perf_counter() - t0)
    return restored

  def _restore_verified(self, target_state: Any, step: int) -> tuple[Any, dict]:
    abstract = abstract_like(target_state)
    _check_structure(abstract, self._saved_tree(step), step, self.directory)
    try:
      restored = self._manager.restore(
          int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                             meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} does not match the configured model: {e}. Use another "
          f"--workdir, or the config the checkpoint was trained with (saved in its meta/config).") from e
    except Exception as e:  # pylint: disable=broad-except
      # TensorStore / file-system errors of a checkpoint without a manifest (unverifiable) otherwise
      # surface as a bare Exception with a page of TensorStore spec; say what it means and the fix.
      detail = str(e).split("\n", 1)[0].split(" See full TensorStore details")[0][:300]
      raise self._damaged_error(step, manifest_lib.Verdict(
          "damaged", (f"Orbax could not read it ({type(e).__name__}: {detail})",))) from e
    return restored["state"], dict(restored["meta"])

  def _saved_tree(self, step: int) -> Optional[Any]:
    """The saved state's tree of array metadata (shapes), None if Orbax cannot tell."""
    try:
      meta = self._manager.item_metadata(int(step))
      tree = meta["state"] if meta is not None else None
      return getattr(tree, "tree", tree)
    except Exception:  # pylint: disable=broad-except
      return None

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def wait(self) -> None:
    """Blocks until any in-flight asynchronous save is committed (with its manifest).

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


def _key_name(entry) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``'params/enc_16x16_conv/kernel' -> shape`` for every leaf with a shape (containers normalised)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, (dict, list, tuple)))
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat
          if hasattr(leaf, "shape")}


def _check_structure(abstract: Any, saved: Optional[Any], step: int, directory: str) -> None:
  """Names every array that the model and the checkpoint disagree on (missing, extra, other shape).

  Raises:
    CheckpointError: listing up to 20 mismatching arrays (the first ones in sorted order).
  """
  if saved is None:
    return
  want, got = _flat_shapes(abstract), _flat_shapes(saved)
  if not got:
    return  # Orbax gave no shapes: leave the check to the restore itself
  # The network's own arrays first: EMA and Adam moments mirror them.
  order = lambda k: (not k.startswith("params/"), k)  # pylint: disable=unnecessary-lambda-assignment
  bad = [f"{k}: model {want[k]}, checkpoint has no such array" for k in sorted(set(want) - set(got), key=order)]
  bad += [f"{k}: checkpoint {got[k]}, the model has no such array"
          for k in sorted(set(got) - set(want), key=order)]
  bad += [f"{k}: checkpoint {got[k]} vs model {want[k]}" for k in sorted(set(want) & set(got), key=order)
          if tuple(want[k]) != tuple(got[k])]
  if bad:
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    raise CheckpointError(
        f"checkpoint {step} in {directory} does not match the configured model ({len(bad)} arrays "
        f"differ):\n  " + "\n  ".join(bad[:20]) + more + "\nUse the config the checkpoint was trained with "
        f"(saved in its meta/config), or another --workdir.")


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
  fileio.write_text(os.path.join(directory, "config.json"), fileio.config_json(config) + "\n")
  manifest_lib.write_manifest(directory, kind="pretrained")


def load_pretrained(directory: str) -> tuple[dict, ml_collections.ConfigDict]:
  """Reads ``(variables, config)`` written by :func:`save_pretrained` (variables as host arrays)."""
  directory = os.path.abspath(directory)
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{directory} is not a converted network (no config.json); create one with "
                          f"python -m patch_diffusion.tools.convert_torch SRC {directory}")
  verdict = manifest_lib.verify(directory)
  if verdict.status == "damaged":
    raise CheckpointDamagedError(f"the network in {directory} is damaged and was not loaded: "
                                 f"{'; '.join(verdict.problems[:3])}. Convert or copy it again.")
  if verdict.status == "no_manifest":
    logging.warning("%s has no %s (converted by a version without manifests): loading it unverified",
                    directory, manifest_lib.MANIFEST_NAME)
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(os.path.join(directory, "variables"))
  logging.info("loaded pretrained network from %s", directory)
  return variables, config
