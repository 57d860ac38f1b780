"""Crash safety: a shortened run of benchmarks/crash_harness.py (SIGKILL x3, SIGTERM, NaN).

The harness trains the tiny config in subprocesses (1 fake CPU device, one patch size, a checkpoint after
every step), SIGKILLs it at seeded random moments and restarts it; each restart must resume from the
newest checkpoint that was complete on disk, and the finished run must match an uninterrupted one
bit for bit (parameters and the whole TrainState) and have fed every step the same examples. A SIGTERM
must save and exit 0; a NaN loss must stop the run with a non-zero exit naming the step and leave the
last checkpoint complete. The full harness (12 kills) is ``python benchmarks/crash_harness.py``; set
PATCH_DIFFUSION_CRASH_KILLS to run more kills here.

Everything runs in one test function: the subprocesses compile once (the persistent compilation cache of
tests/conftest.py is inherited through the environment) and xdist never runs the harness twice.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_harness():
  spec = importlib.util.spec_from_file_location("crash_harness", REPO / "benchmarks" / "crash_harness.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_kill_restart_sigterm_and_nan(tmp_path):
  harness = load_harness()
  kills = int(os.environ.get("PATCH_DIFFUSION_CRASH_KILLS", "3"))
  steps = 5 * kills + 10
  ref = harness.run_reference(tmp_path, steps, devices=1, timeout=600)
  assert harness.committed_steps(ref["workdir"]) == [steps - 2, steps - 1, steps]  # keep 3
  report = harness.run_with_kills(tmp_path, steps, kills, seed=0, devices=1, reference=ref, timeout=600)
  assert report["kills"] == kills
  # The first kill waits for an uncommitted checkpoint folder: a write was in flight when it landed.
  assert report["kills_with_checkpoint_in_flight"] >= 1
  # After every kill the harness verified every committed checkpoint against its manifest (it raises on
  # any other verdict); at least some existed to check.
  assert report["verified_checkpoints"] >= 1
  assert report["restarts"] == kills + 1  # after each kill, after the SIGTERM
  assert report["resumes"] == sorted(report["resumes"]) and report["resumes"][-1] == report["sigterm_step"]
  assert report["sigterm_seconds"] < 60
  nan = harness.run_nan(tmp_path, pathlib.Path(report["workdir"]), steps, devices=1, timeout=600)
  assert nan["exit_code"] != 0 and nan["last_checkpoint"] == nan["nan_step"] - 1
  print(f"\ncrash harness: {report['kills']} kills ({report['kills_with_checkpoint_in_flight']} with a "
        f"checkpoint write in flight, {report['kills_during_startup']} during start-up), resumes "
        f"{report['resumes']}, SIGTERM -> checkpoint {report['sigterm_step']} and exit 0 in "
        f"{report['sigterm_seconds']:.2f} s; NaN at step {nan['nan_step']}, checkpoint "
        f"{nan['last_checkpoint']} intact")
