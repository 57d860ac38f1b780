"""Checkpoint integrity (patch_diffusion/checkpointing): manifests written with the commit, verified before
every restore; damaged checkpoints are never restored and never changed on disk.

Damage cases, each on a fresh copy of the same two committed checkpoints: truncating any one file, one
flipped bit in the array data, a deleted file, a foreign file, a damaged manifest (edited or cut). Each
must raise CheckpointDamagedError naming the file, leave every byte of every checkpoint as it was (a
digest of the whole folder before and after) and hand back nothing. The end-to-end case trains, damages
the newest checkpoint and resumes through ``train_and_evaluate`` (refused by default; with
``train.skip_damaged_checkpoints`` it resumes from the newest intact one).
"""
from __future__ import annotations

import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from patch_diffusion import checkpointing
from patch_diffusion import state as state_lib
from patch_diffusion import train
from patch_diffusion.checkpointing import manifest as manifest_lib
from helpers import tiny, tree_digest
from reliability import message, record

GROUP = "Checkpoint integrity"


def _state(seed: int) -> state_lib.TrainState:
  rng = np.random.default_rng(seed)
  params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 64, 128)), jnp.float32)},  # 295 kB
            "dense": {"bias": jnp.asarray(rng.normal(size=(128,)), jnp.float32)}}
  return state_lib.create_train_state({"params": params}, optax.scale_by_adam())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[pathlib.Path, state_lib.TrainState, state_lib.TrainState]:
  """Two committed checkpoints (steps 1 and 2, different values) in a module-wide folder (read-only)."""
  folder = tmp_path_factory.mktemp("saved") / "checkpoints"
  first, second = _state(1), _state(2)
  ckpt = checkpointing.Checkpointer(str(folder))
  ckpt.save(1, first, {"step": 1})
  ckpt.save(2, second, {"step": 2})
  ckpt.close()
  return folder, first, second


def _copy(saved_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  dst = tmp_path / "run" / "checkpoints"
  shutil.copytree(saved_dir, dst)
  return dst


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """Every file of a checkpoint that its manifest hashes (all but Orbax's step JSON and commit marker)."""
  listed = json.loads((step_dir / manifest_lib.MANIFEST_NAME).read_text())["files"]
  return sorted(step_dir / name for name, entry in listed.items() if entry["size"] is not None)


def _assert_refused(folder: pathlib.Path, like, match: str) -> checkpointing.CheckpointDamagedError:
  """Restoring the newest checkpoint raises CheckpointDamagedError and changes nothing on disk."""
  before = tree_digest(folder.parent)
  ckpt = checkpointing.Checkpointer(str(folder))
  returned = None
  with pytest.raises(checkpointing.CheckpointDamagedError, match=match) as e:
    returned = ckpt.restore(like)
  ckpt.close()
  assert returned is None  # nothing handed back
  assert tree_digest(folder.parent) == before
  assert "Nothing on disk was changed" in str(e.value)
  return e.value


def _same(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_every_committed_checkpoint_has_a_manifest_of_all_its_files(saved):
  folder, first, second = saved
  for step in (1, 2):
    step_dir = folder / str(step)
    listed = json.loads((step_dir / manifest_lib.MANIFEST_NAME).read_text())["files"]
    on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()}
    # Orbax writes its commit marker after the manifest (at the rename): not listed, by design.
    assert set(listed) == on_disk - {manifest_lib.MANIFEST_NAME, "commit_success.txt"}
    assert checkpointing.verify(step_dir).status == "verified"
  ckpt = checkpointing.Checkpointer(str(folder))
  restored, meta = ckpt.restore(second)
  ckpt.close()
  assert meta["step"] == 2 and _same(restored, second)


def test_truncating_any_one_file_is_detected(saved, tmp_path):
  folder, _, second = saved
  names = [p.relative_to(folder / "2").as_posix() for p in _data_files(folder / "2")]
  assert len(names) >= 5 and any("ocdbt" in n for n in names)
  for i, name in enumerate(names):
    work = _copy(folder, tmp_path / f"t{i}")
    path = work / "2" / name
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    err = _assert_refused(work, second, rf"checkpoint 2 .* is damaged and was not restored: {name}: "
                                        rf"{len(blob) // 2} bytes, the manifest says {len(blob)}")
  record(GROUP, "any one file of the newest checkpoint truncated to half (every file, one at a time)",
         "CheckpointDamagedError naming the file; nothing restored; every checkpoint unchanged; how to resume "
         "from the previous one", message(err))


def test_one_flipped_bit_is_detected_and_never_restored(saved, tmp_path):
  folder, _, second = saved
  largest = max(_data_files(folder / "2"), key=lambda p: p.stat().st_size)
  name = largest.relative_to(folder / "2").as_posix()

  def flip(work: pathlib.Path) -> None:
    path = work / "2" / name
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    path.write_bytes(bytes(blob))

  work = _copy(folder, tmp_path / "flip")
  flip(work)
  err = _assert_refused(work, second, rf"{name}: content differs from the manifest")
  # Control: the same flip in a checkpoint without a manifest restores silently and hands back other
  # parameters (or fails inside Orbax) — what the manifest prevents.
  control = _copy(folder, tmp_path / "control")
  flip(control)
  (control / "2" / manifest_lib.MANIFEST_NAME).unlink()
  ckpt = checkpointing.Checkpointer(str(control))
  try:
    restored, _ = ckpt.restore(second)
    silently_wrong = not _same(restored, second)
  except checkpointing.CheckpointError:
    silently_wrong = False
  finally:
    ckpt.close()
  assert silently_wrong, "the flipped bit did not change the restored arrays: the test proves nothing"
  record(GROUP, "one bit flipped in the middle of the largest array-data file",
         "CheckpointDamagedError naming the file; never restored (without a manifest the same checkpoint "
         "restores other parameters without an error)", message(err))


def test_deleted_file_is_detected(saved, tmp_path):
  folder, _, second = saved
  work = _copy(folder, tmp_path)
  victim = _data_files(work / "2")[0]
  name = victim.relative_to(work / "2").as_posix()
  victim.unlink()
  err = _assert_refused(work, second, rf"{name}: missing \(listed in the manifest\)")
  record(GROUP, "a file of the newest checkpoint deleted", "CheckpointDamagedError naming the missing file",
         message(err))


def test_foreign_file_is_detected(saved, tmp_path):
  folder, _, second = saved
  work = _copy(folder, tmp_path)
  (work / "2" / "state" / "notes.txt").write_text("copied here by hand")
  err = _assert_refused(work, second, r"state/notes.txt: not part of the checkpoint")
  record(GROUP, "a foreign file inside the newest checkpoint", "CheckpointDamagedError naming the file",
         message(err))


@pytest.mark.parametrize("how", ["edited", "cut"])
def test_damaged_manifest_is_detected(saved, tmp_path, how):
  folder, _, second = saved
  work = _copy(folder, tmp_path)
  path = work / "2" / manifest_lib.MANIFEST_NAME
  if how == "edited":
    manifest = json.loads(path.read_text())
    first = sorted(k for k, v in manifest["files"].items() if v["size"])[0]
    manifest["files"][first]["size"] += 1
    path.write_text(json.dumps(manifest))
    match = "does not match its own digest"
  else:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 3])
    match = "manifest.json is unreadable"
  err = _assert_refused(work, second, match)
  record(GROUP, f"the manifest itself damaged ({'a size edited' if how == 'edited' else 'cut to a third'})",
         "CheckpointDamagedError saying the manifest is damaged", message(err))


def test_skip_damaged_moves_it_aside_and_restores_the_newest_intact(saved, tmp_path, caplog):
  folder, first, second = saved
  work = _copy(folder, tmp_path)
  victim = max(_data_files(work / "2"), key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:-1])
  damaged_digest = tree_digest(work / "2")
  intact_digest = tree_digest(work / "1")
  caplog.set_level(logging.WARNING)
  ckpt = checkpointing.Checkpointer(str(work))
  restored, meta = ckpt.restore(second, skip_damaged=True)
  assert ckpt.all_steps() == [1]
  ckpt.close()
  assert meta["step"] == 1 and _same(restored, first)
  moved = list((work.parent / checkpointing.orbax_io.DAMAGED_DIRNAME).iterdir())
  assert len(moved) == 1 and moved[0].name.startswith("2-") and tree_digest(moved[0]) == damaged_digest
  assert tree_digest(work / "1") == intact_digest
  warning = next(r.getMessage() for r in caplog.records if "moved damaged checkpoint" in r.getMessage())
  record(GROUP, "newest checkpoint damaged, `train.skip_damaged_checkpoints=True`",
         "moved (not deleted) to checkpoints_damaged/; the newest intact checkpoint restored",
         f"restored checkpoint {meta['step']}; WARNING: {warning}")


def test_checkpoint_without_manifest_restores_with_a_warning(saved, tmp_path, caplog):
  folder, _, second = saved
  work = _copy(folder, tmp_path)
  (work / "2" / manifest_lib.MANIFEST_NAME).unlink()
  caplog.set_level(logging.WARNING)
  ckpt = checkpointing.Checkpointer(str(work))
  restored, meta = ckpt.restore(second)
  ckpt.close()
  assert meta["step"] == 2 and _same(restored, second)
  warning = next(r.getMessage() for r in caplog.records if "has no manifest.json" in r.getMessage())
  record(GROUP, "checkpoint written before manifests existed (no manifest.json)",
         "restored, with a warning that it is unverified", f"WARNING: {warning}")


def test_verification_is_logged_with_its_time(saved, caplog):
  folder, _, second = saved
  caplog.set_level(logging.INFO)
  ckpt = checkpointing.Checkpointer(str(folder))
  ckpt.restore(second)
  ckpt.close()
  lines = [r.getMessage() for r in caplog.records]
  assert any("checkpoint 2 verified:" in l and "hashed in" in l for l in lines), lines
  assert any("checkpoint 2 restored in" in l for l in lines), lines


def test_damaged_pretrained_network_is_refused(tmp_path):
  variables = {"params": {"w": np.arange(1000, dtype=np.float32)}}
  net = tmp_path / "net"
  checkpointing.save_pretrained(str(net), variables, ml_collections.ConfigDict({"model": {"arch": "x"}}))
  loaded, _ = checkpointing.load_pretrained(str(net))
  np.testing.assert_array_equal(loaded["params"]["w"], variables["params"]["w"])
  victim = max((p for p in (net / "variables").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:-4])
  with pytest.raises(checkpointing.CheckpointDamagedError, match="is damaged and was not loaded") as e:
    checkpointing.load_pretrained(str(net))
  record(GROUP, "a converted network (--config.sample.pretrained / train.init_from) with a truncated file",
         "CheckpointDamagedError naming the file", message(e.value))


def test_training_refuses_a_damaged_checkpoint_and_can_skip_it(tmp_path):
  def cfg(steps: float, **over):
    return tiny(**{"model.channel_mult": (1,), "model.attn_resolutions": (), "patch.real_p": 1.0,
                   "train.checkpoint_every_steps": 1, "train.log_every_steps": 1,
                   "train.total_kimg": (steps - 0.5) * 16 / 1000, **over})

  workdir = tmp_path / "run"
  assert train.train_and_evaluate(cfg(2), str(workdir))["step"] == 2
  victim = max(_data_files(workdir / "checkpoints" / "2"), key=lambda p: p.stat().st_size)
  blob = bytearray(victim.read_bytes())
  blob[len(blob) // 2] ^= 1
  victim.write_bytes(bytes(blob))
  before = tree_digest(workdir / "checkpoints")
  with pytest.raises(checkpointing.CheckpointDamagedError,
                     match=r"checkpoint 2 .* is damaged and was not restored: .* content differs from the "
                           r"manifest.* --config.train.skip_damaged_checkpoints=True") as e:
    train.train_and_evaluate(cfg(3), str(workdir))
  assert tree_digest(workdir / "checkpoints") == before
  record(GROUP, "training resumed on a checkpoint with a flipped bit (default settings)",
         "CheckpointDamagedError naming the file and the two ways to resume from the previous checkpoint; "
         "nothing trained, nothing changed", message(e.value))
  result = train.train_and_evaluate(cfg(3, **{"train.skip_damaged_checkpoints": True}), str(workdir))
  assert result["resumed_from"] == 1 and result["step"] == 3
  assert checkpointing.verify(workdir / "checkpoints" / "3").status == "verified"


def test_single_process_save_of_replicated_arrays_compiles_nothing(tmp_path):
  # Orbax's default replica-parallel saving slices every replicated array per replica, compiling an XLA
  # program per shape (11 s on the first save of the quickstart's state); one process writes them whole.
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  replicated = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), PartitionSpec())
  assert jax.device_count() == 8 and jax.process_count() == 1
  # Shapes no other test saves: nothing of theirs is in JAX's in-memory compilation cache.
  tree = {f"w{i}": jax.device_put(jnp.full((7 + i, 13), float(i)), replicated) for i in range(6)}
  like = state_lib.create_train_state({"params": tree}, optax.scale_by_adam())
  compiled = []
  listener = lambda event, duration, **kwargs: compiled.append(event) if "backend_compile" in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(1, like, {"step": 1})
    ckpt.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiled == []
  restored, meta = ckpt.restore(like)
  ckpt.close()
  assert meta["step"] == 1 and _same(restored, like)
  assert all(x.sharding.is_equivalent_to(replicated, x.ndim) for x in jax.tree.leaves(restored.params))
