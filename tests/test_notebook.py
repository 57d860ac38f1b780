"""notebooks/quickstart.ipynb, executed headless (nbclient) on 8 fake CPU devices, outputs checked."""
from __future__ import annotations

import json
import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _has_png(cell) -> bool:
  return any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


@pytest.mark.slow  # ~2 min: 150 training steps, 64 samples, a converted network
def test_quickstart_notebook_runs_and_shows_what_it_says(tmp_path, fixtures_dir, monkeypatch):
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("QUICKSTART_STEPS", "150")
  monkeypatch.setenv("PATCH_DIFFUSION_FIXTURES", str(fixtures_dir))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not any(o.get("output_type") == "error" for o in c.outputs) for c in code)
  # Training: 150 steps, logged.
  trained = json.loads(_text(code[2]).strip().splitlines()[-1])
  assert trained["step"] == 150 and trained["resumed_from"] is None
  # The loss curve is drawn and the loss went down.
  assert _has_png(code[3])
  m = re.search(r"loss: first logged ([\d.]+), last ([\d.]+)", _text(code[3]))
  assert m and float(m.group(2)) < float(m.group(1))
  # Samples from the checkpoint, shown as a grid.
  assert "samples (64, 16, 16, 1) uint8" in _text(code[4]) and _has_png(code[4])
  # The converted fixture network sampled.
  assert "converted ddpmpp 16 -> (16, 16, 16, 3)" in _text(code[5])
  assert (tmp_path / "run" / "converted" / "manifest.json").is_file()
