"""Workdirs behind ``etils.epath`` (patch_diffusion/fileio.py): a ``gs://`` workdir gets every artifact.

No GCS here, so ``gs://`` is routed to a local folder by an fsspec filesystem registered for the ``gs``/``gcs``
protocols — the same route ``etils.epath`` takes to the real bucket (its fsspec backend; gcsfs in
production). The run writes metrics, TensorBoard events, the config, PNG grids, samples and the eval JSON
through that route (checkpoints go to a local ``train.checkpoint_dir``: Orbax writes ``gs://`` itself,
through TensorStore), and the artifacts equal those of the same run with a local workdir.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import sys

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from patch_diffusion import evaluate
from patch_diffusion import fileio
from patch_diffusion import generate
from patch_diffusion import train
from helpers import steps_to_kimg, tiny


class _FakeGCS(LocalFileSystem):
  """``gs://<path>`` -> ``<root>/<path>``; ``root`` is set per test by the fixture.

  One class for the whole module, the root a class attribute: etils.epath caches one filesystem instance
  per protocol for the life of the process (``functools.lru_cache``), so an instance made in an earlier
  test of the same worker must follow the current test's root.
  """
  protocol = ("gs", "gcs")
  root_marker = ""
  root: pathlib.Path | None = None

  def __init__(self, *args, finalize_on_close=False, **kwargs):  # pylint: disable=unused-argument
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        assert cls.root is not None, "gs:// used outside the fake_gcs fixture"
        return str(cls.root / path[len(prefix):])
    return super()._strip_protocol(path)


@pytest.fixture()
def fake_gcs(tmp_path):
  """``gs://<path>`` -> ``<tmp>/gcs/<path>`` for etils.epath (and everything that goes through it)."""
  root = tmp_path / "gcs"
  root.mkdir()
  _FakeGCS.root = root
  fsspec_registry = sys.modules["fsspec.registry"]  # fsspec.registry the attribute is a read-only view
  previous = {p: fsspec_registry._registry.get(p) for p in ("gs", "gcs")}  # pylint: disable=protected-access
  for proto in previous:
    fsspec.register_implementation(proto, _FakeGCS, clobber=True)
  yield root
  for proto, cls in previous.items():
    fsspec_registry._registry.pop(proto, None)  # pylint: disable=protected-access
    if cls is not None:
      fsspec.register_implementation(proto, cls, clobber=True)
  _FakeGCS.root = None


def _files(folder: pathlib.Path) -> set[str]:
  """Relative names of every file (TensorBoard's event-file names carry the creation time: masked)."""
  return {re.sub(r"tfevents\.\d+\.", "tfevents.<time>.", p.relative_to(folder).as_posix())
          for p in folder.rglob("*") if p.is_file()}


@pytest.mark.usefixtures("inception_weights_path")
def test_gs_workdir_gets_every_artifact_like_a_local_one(fake_gcs, tmp_path):
  outputs = {}
  for kind, workdir in (("gs", "gs://bucket/run"), ("local", str(tmp_path / "local_run"))):
    c = tiny(**{"patch.real_p": 1.0, "model.channel_mult": (1,), "model.attn_resolutions": (),
                "train.checkpoint_dir": str(tmp_path / f"ckpt_{kind}"), "train.sample_every_steps": 1,
                "train.final_num_samples": 8, "data.data_dir": str(tmp_path / "refs"),
                "eval.num_samples": 8, "eval.batch_size": 8, "eval.ref_num_images": 16,
                "eval.kid": False, "eval.precision_recall": False})
    c.train.total_kimg = steps_to_kimg(c, 2)
    train.train_and_evaluate(c, workdir)
    generate.sample(c, workdir)
    record = evaluate.evaluate(c, workdir)
    outputs[kind] = (workdir, record)
  gs_root, local_root = fake_gcs / "bucket" / "run", tmp_path / "local_run"
  names = _files(gs_root)
  assert names == _files(local_root)
  for expected in ("metrics.jsonl", "config.json", "samples.npz", "samples.png", "eval/eval_00000002_n8.json",
                   "samples/grid_00000001.png", "samples/grid_00000002.png"):
    assert expected in names, sorted(names)
  assert any(n.startswith("tb/events.out.tfevents") for n in names)
  assert "train.lock" not in names  # released
  assert not any(n.endswith(".tmp") for n in names)
  # Same run, same bytes: samples and metrics agree (wall times aside).
  with np.load(gs_root / "samples.npz") as a, np.load(local_root / "samples.npz") as b:
    np.testing.assert_array_equal(a["images"], b["images"])
  gs_rows = [json.loads(l) for l in (gs_root / "metrics.jsonl").read_text().splitlines()]
  local_rows = [json.loads(l) for l in (local_root / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in gs_rows] == [r["step"] for r in local_rows]
  assert [r.get("loss") for r in gs_rows] == [r.get("loss") for r in local_rows]
  assert outputs["gs"][1]["fid"] == pytest.approx(outputs["local"][1]["fid"])


def test_object_store_appends_rewrite_the_object(fake_gcs):
  fileio.append_lines("gs://bucket/log.jsonl", ["a", "b"])
  fileio.append_lines("gs://bucket/log.jsonl", ["c"])
  assert (fake_gcs / "bucket" / "log.jsonl").read_text() == "a\nb\nc\n"
  path = fileio.write_json("gs://bucket/x/y.json", {"k": 1})
  assert str(path) == "gs://bucket/x/y.json" and json.loads((fake_gcs / "bucket/x/y.json").read_text()) == {"k": 1}
  assert not os.path.exists("gs:")  # nothing leaked into a local folder named 'gs:'
