"""Crash-safety harness: kills training at random moments, restarts it, and proves nothing is lost.

  python benchmarks/crash_harness.py --kills=12 --seed=0 --workdir=/tmp/crash [--json=report.json]

Runs the tiny test config (one patch size, a checkpoint after every step, so a kill often lands in the
middle of an asynchronous checkpoint write) as ``python -m patch_diffusion.main`` subprocesses:

1. an uninterrupted reference run of ``steps`` steps;
2. the same run, SIGKILLed ``kills`` times at seeded random moments (mostly a random number of steps into
   the run plus a random fraction of a step, every fourth during start-up/restore) and restarted each time;
   every restart must resume from the newest checkpoint that was complete on disk when it was killed;
3. one SIGTERM (preemption): the process must save a checkpoint and exit 0; the time from the signal to
   the exit is measured;
4. a final restart that completes the run: its parameters and whole TrainState must be bitwise equal to
   the reference's, and every step must have consumed the same examples as the reference's step;
5. optionally a NaN run: the finished run resumed with ``train.lr=1e30`` must stop with a non-zero exit
   code and a message naming the step, leaving the last checkpoint complete and the older ones untouched.

Runs go through ``tests/step_record.py`` (``patch_diffusion.main`` plus a test hook that writes per-step
patch sizes, example indices and final state digests to ``sizes_process_0.jsonl``); checkpoints are inspected as files (committed folders are named by their
step, Orbax's in-flight ones end in ``.orbax-checkpoint-tmp``). The test tests/test_crash_safety.py runs
a shortened version of this harness.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from patch_diffusion import checkpointing
from patch_diffusion.tools import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
STEP_RECORD = REPO / "tests" / "step_record.py"
#: Images per step of the harness config (tiny_test batch, one patch size: multiplier 1).
BATCH = 16
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def config_args(steps: int, extra: dict[str, Any] | None = None) -> list[str]:
  """Flags for a ``steps``-step run of configs/tiny_test.py shrunk to one level, one patch size."""
  flags = {
      "patch.real_p": 1.0,                 # one compiled step: compilation dominates the cost
      "model.channel_mult": "(1,)",
      "model.attn_resolutions": "()",
      "train.checkpoint_every_steps": 1,   # a save per step: kills often land during an async write
      "train.keep_checkpoints": 3,
      "train.log_every_steps": 1,
      "train.total_kimg": (steps - 0.5) * BATCH / 1000,
  }
  flags.update(extra or {})
  return [f"--config={REPO / 'configs' / 'tiny_test.py'}"] + [f"--config.{k}={v}" for k, v in flags.items()]


def subprocess_env(devices: int) -> dict[str, str]:
  """The caller's environment (the compilation cache dir included) with ``devices`` fake CPU devices."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                           "patch_diffusion_test_jax_cache"))
  env["PYTHONUNBUFFERED"] = "1"
  return env


# ---- what is on disk ------------------------------------------------------------------------------

def committed_steps(workdir: pathlib.Path) -> list[int]:
  """Steps of complete checkpoints (Orbax renames a finished checkpoint to its step number)."""
  ckpt = workdir / "checkpoints"
  if not ckpt.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and p.is_dir())


def tmp_checkpoints(workdir: pathlib.Path) -> list[str]:
  ckpt = workdir / "checkpoints"
  return sorted(p.name for p in ckpt.iterdir() if p.name.endswith(TMP_SUFFIX)) if ckpt.is_dir() else []


def verify_committed(workdir: pathlib.Path) -> dict[int, str]:
  """Manifest verdict of every committed checkpoint (``'verified'`` is the only good answer)."""
  return {s: checkpointing.verify(workdir / "checkpoints" / str(s)).status for s in committed_steps(workdir)}


def wait_for_tmp_checkpoint(run: "Run", workdir: pathlib.Path, first_step: int, timeout: float) -> bool:
  """Polls (every ~1 ms) until an uncommitted checkpoint of a step >= ``first_step`` exists; False if the
  process exited first. Used to SIGKILL exactly while an asynchronous checkpoint write is in flight."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(int(t.split(".")[0]) >= first_step for t in tmp_checkpoints(workdir)):
      return True
    if run.proc.poll() is not None:
      return False
    time.sleep(0.001)
  raise TimeoutError(f"no checkpoint write seen in {timeout} s; log {run.log}")


def read_meta(workdir: pathlib.Path, step: int) -> dict:
  with open(workdir / "checkpoints" / str(step) / "meta" / "metadata") as f:
    return json.load(f)


def tree_digest(path: pathlib.Path) -> str:
  """SHA-256 over the relative names and bytes of every file under ``path``."""
  h = hashlib.sha256()
  for p in sorted(path.rglob("*")):
    if p.is_file():
      h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
  return h.hexdigest()


def debug_records(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "sizes_process_0.jsonl"
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      pass  # a line cut by SIGKILL
  return out


def _count_lines(path: pathlib.Path) -> int:
  try:
    with open(path, "rb") as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


# ---- one process ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """One trainer process and its log file."""
  proc: subprocess.Popen
  log: pathlib.Path
  started: float

  def text(self) -> str:
    return self.log.read_text(errors="replace")


def start(workdir: pathlib.Path, steps: int, devices: int, extra: dict | None = None,
          tag: str = "run") -> Run:
  logs = workdir.parent / f"{workdir.name}_logs"
  logs.mkdir(parents=True, exist_ok=True)
  log = logs / f"{tag}.log"
  # tests/step_record.py = patch_diffusion.main plus a hook recording each step's examples and the final
  # state digests (test instrumentation, not part of the trainer).
  cmd = [sys.executable, str(STEP_RECORD), f"--workdir={workdir}"] + config_args(steps, extra)
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(devices), stdout=f, stderr=subprocess.STDOUT)
  return Run(proc, log, time.time())


def wait_for_steps(run: Run, workdir: pathlib.Path, base_lines: int, n: int,
                   timeout: float) -> tuple[bool, float]:
  """Waits until the run has started ``n`` steps (debug lines past ``base_lines``).

  Returns (reached, seconds of the last step seen, or 0.3 if only one was seen); reached is False if the
  process exited first.
  """
  path = workdir / "sizes_process_0.jsonl"
  deadline = time.time() + timeout
  seen, stamps = 0, []
  while time.time() < deadline:
    if run.proc.poll() is not None:
      return False, 0.0
    count = _count_lines(path) - base_lines
    if count > seen:
      seen = count
      stamps.append(time.time())
    if seen >= n:
      return True, (stamps[-1] - stamps[-2]) if len(stamps) > 1 else 0.3
    time.sleep(0.005)
  raise TimeoutError(f"run did not reach {n} steps in {timeout} s; log {run.log}")


#: Log lines of the start-up, in order (main.py, train.py, input_pipeline.py).
STARTUP_MARKERS = ("JAX process", "network ", "train input:")


def wait_for_log(run: Run, marker: str, timeout: float) -> bool:
  """Waits until ``marker`` appears in the run's log; False if the process exited first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if marker in run.text():
      return True
    if run.proc.poll() is not None:
      return False
    time.sleep(0.005)
  raise TimeoutError(f"{marker!r} did not appear in {timeout} s; log {run.log}")


def finish(run: Run, timeout: float) -> int:
  try:
    return run.proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    run.proc.kill()
    run.proc.wait()
    raise


_RESUMED = re.compile(r"resumed from checkpoint (\d+)")


def resumed_step(text: str) -> int | None:
  m = _RESUMED.search(text)
  return int(m.group(1)) if m else None


def loop_started(text: str) -> bool:
  return "training to " in text


# ---- the harness ------------------------------------------------------------------------------------

class HarnessError(AssertionError):
  pass


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise HarnessError(msg)


def run_reference(root: pathlib.Path, steps: int, devices: int, timeout: float) -> dict:
  """The uninterrupted run; returns its final digests and per-step indices."""
  workdir = root / "reference"
  shutil.rmtree(workdir, ignore_errors=True)
  t0 = time.time()
  run = start(workdir, steps, devices, tag="reference")
  rc = finish(run, timeout)
  _check(rc == 0, f"reference run failed ({rc}); log {run.log}:\n{run.text()[-3000:]}")
  records = debug_records(workdir)
  final = [r for r in records if "final_step" in r]
  _check(len(final) == 1 and final[0]["final_step"] == steps, f"reference final record: {final}")
  return {"workdir": workdir, "final": final[0], "indices": _indices_by_step(records),
          "seconds": time.time() - t0}


def _indices_by_step(records: list[dict]) -> dict[int, list[int]]:
  """Example indices of each step; a step run again after a crash overwrites the lost attempt."""
  out = {}
  for r in records:
    if "step" in r:
      out[r["step"]] = r["indices"]
  return out


def run_with_kills(root: pathlib.Path, steps: int, kills: int, seed: int, devices: int, reference: dict,
                   timeout: float, startup_every: int = 4, log=print) -> dict:
  """SIGKILLs/restarts ``kills`` times, then one SIGTERM, then completes; checks every resume.

  Kill number 3, 7, 11, ... (every ``startup_every``-th, starting with the third) aims at the start-up
  (shortly after a random start-up milestone: before the restore, before or during compilation); the
  others land a random 1-3 steps into training plus a random fraction of a step, except the first, which
  waits for an uncommitted checkpoint folder to appear and kills at once (so at least one kill always
  lands while an asynchronous checkpoint write is in flight). Each kill is counted as a start-up kill when
  the training loop had not started yet. After every kill, every committed checkpoint must verify against
  its manifest.

  Returns a report: kills, kills that left a half-written checkpoint, resume steps, SIGTERM save time.
  """
  rng = random.Random(seed)
  workdir = root / "crashed"
  shutil.rmtree(workdir, ignore_errors=True)
  debug_path = workdir / "sizes_process_0.jsonl"
  report = {"kills": 0, "kills_during_startup": 0, "kills_with_checkpoint_in_flight": 0, "resumes": [],
            "restarts": 0, "sigterm_seconds": None, "sigterm_step": None}
  expected_resume: int | None = None
  last_resume = -1
  attempt = 0

  def check_resume(run: Run) -> None:
    nonlocal last_resume
    text = run.text()
    got = resumed_step(text)
    if got is None and not loop_started(text):
      return  # killed before it got as far as restoring: nothing to check
    _check(got == expected_resume,
           f"attempt {attempt}: resumed from {got}, but the newest complete checkpoint was "
           f"{expected_resume}; log {run.log}")
    if got is not None:
      _check(got >= last_resume, f"resume steps went backwards: {last_resume} -> {got}")
      last_resume = got
      report["resumes"].append(got)

  while report["kills"] < kills:
    base = _count_lines(debug_path)
    run = start(workdir, steps, devices, tag=f"attempt_{attempt:02d}")
    report["restarts"] += attempt > 0
    done_steps = max(committed_steps(workdir), default=0)
    if report["kills"] == 0:
      # Kill the moment a checkpoint write of this attempt is seen in flight.
      _check(wait_for_tmp_checkpoint(run, workdir, done_steps + 1, timeout),
             f"attempt {attempt} exited before writing a checkpoint; log {run.log}")
    elif report["kills"] % startup_every == 2:
      # Shortly after a random start-up milestone: JAX initialised, network built (restore next),
      # input pipeline positioned (compilation next).
      marker = rng.choice(STARTUP_MARKERS)
      _check(wait_for_log(run, marker, timeout), f"attempt {attempt} exited before {marker!r}; log {run.log}")
      time.sleep(rng.uniform(0.0, 0.3))
    else:
      target = rng.randint(1, 3)
      if done_steps + target + 4 >= steps:
        raise HarnessError(f"run too short for {kills} kills: {steps} steps; raise --steps")
      reached, step_seconds = wait_for_steps(run, workdir, base, target, timeout)
      _check(reached, f"attempt {attempt} exited before step {target}: rc {run.proc.returncode}; "
                      f"log {run.log}")
      # Somewhere in the next step or two: the step itself, the metrics fetch, the async save.
      time.sleep(rng.uniform(0.0, 1.5 * min(step_seconds, 2.0)))
    _check(run.proc.poll() is None, f"attempt {attempt} finished before its kill; raise --steps")
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait()
    mode = "training" if loop_started(run.text()) else "startup"
    # Half-written checkpoints of steps this attempt was saving (a killed save leaves its
    # '<step>.orbax-checkpoint-tmp' folder, which a later run removes: see the SIGTERM check below).
    first_new = (resumed_step(run.text()) or 0) + 1
    in_flight = [t for t in tmp_checkpoints(workdir) if mode == "training" and
                 int(t.split(".")[0]) >= first_new and
                 (workdir / "checkpoints" / t).stat().st_mtime >= run.started]
    report["kills"] += 1
    report["kills_during_startup"] += mode == "startup"
    report["kills_with_checkpoint_in_flight"] += bool(in_flight)
    check_resume(run)
    verdicts = verify_committed(workdir)
    _check(all(v == "verified" for v in verdicts.values()),
           f"kill {report['kills']}: committed checkpoints that fail their manifest: {verdicts}")
    report["verified_checkpoints"] = report.get("verified_checkpoints", 0) + len(verdicts)
    expected_resume = max(committed_steps(workdir), default=None)
    log(f"kill {report['kills']:2d} ({mode}): complete checkpoints {committed_steps(workdir)}, "
        f"in flight {in_flight}")
    attempt += 1

  # Preemption: SIGTERM mid-training -> a checkpoint of the current step and exit code 0.
  base = _count_lines(debug_path)
  run = start(workdir, steps, devices, tag=f"attempt_{attempt:02d}_sigterm")
  report["restarts"] += 1
  _check(wait_for_steps(run, workdir, base, 2, timeout)[0], f"SIGTERM run exited early; log {run.log}")
  t0 = time.time()
  run.proc.send_signal(signal.SIGTERM)
  rc = finish(run, timeout)
  report["sigterm_seconds"] = time.time() - t0
  text = run.text()
  _check(rc == 0, f"SIGTERM: exit code {rc}, expected 0; log {run.log}")
  check_resume(run)
  m = re.search(r"SIGTERM: stopped at step (\d+); checkpoint \1 committed", text)
  _check(m is not None, f"SIGTERM: no 'SIGTERM: stopped at step N; checkpoint N committed' in the log {run.log}")
  report["sigterm_step"] = int(m.group(1))
  _check(max(committed_steps(workdir)) == report["sigterm_step"],
         f"SIGTERM: newest checkpoint {committed_steps(workdir)} is not the preemption step "
         f"{report['sigterm_step']}")
  _check(read_meta(workdir, report["sigterm_step"])["reason"] == "preemption", "SIGTERM: meta reason")
  _check(not tmp_checkpoints(workdir), f"SIGTERM left {tmp_checkpoints(workdir)}")
  expected_resume = report["sigterm_step"]
  attempt += 1

  # Complete the run.
  run = start(workdir, steps, devices, tag=f"attempt_{attempt:02d}_final")
  report["restarts"] += 1
  rc = finish(run, timeout)
  _check(rc == 0, f"final run failed ({rc}); log {run.log}:\n{run.text()[-3000:]}")
  check_resume(run)
  records = debug_records(workdir)
  final = [r for r in records if "final_step" in r]
  _check(len(final) == 1 and final[0]["final_step"] == steps, f"final records {final}")
  for key in ("params_sha256", "state_sha256"):
    _check(final[0][key] == reference["final"][key],
           f"{key} after {report['kills']} kills differs from the uninterrupted run: {final[0][key]} vs "
           f"{reference['final'][key]}")
  indices = _indices_by_step(records)
  _check(indices == reference["indices"], "the examples consumed per step differ from the reference")
  verdicts = verify_committed(workdir)
  _check(verdicts and all(v == "verified" for v in verdicts.values()), f"final checkpoints: {verdicts}")
  report["workdir"] = str(workdir)
  report["final_params_sha256"] = next(iter(final[0]["params_sha256"].values()))
  return report


def run_nan(root: pathlib.Path, source: pathlib.Path, steps: int, devices: int, timeout: float) -> dict:
  """Resumes a finished run with lr=1e30 (the loss overflows to NaN/inf within a few steps)."""
  workdir = root / "nan"
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("*.jsonl"))
  before = committed_steps(workdir)
  digests = {s: tree_digest(workdir / "checkpoints" / str(s)) for s in before}
  run = start(workdir, steps + 20, devices, {"train.lr": 1e30, "train.lr_rampup_kimg": 0.0}, tag="nan")
  rc = finish(run, timeout)
  text = run.text()
  _check(rc not in (0, None), f"NaN run exited with {rc}; log {run.log}")
  m = re.search(r"non-finite loss at step (\d+) \(patch size \d+\); training stopped\. The last "
                r"checkpoint \((\d+)\)", text)
  _check(m is not None, f"NaN run: no 'non-finite loss at step' message; log {run.log}:\n{text[-2000:]}")
  bad, named = int(m.group(1)), int(m.group(2))
  after = committed_steps(workdir)
  _check(not tmp_checkpoints(workdir), f"NaN run left half-written checkpoints {tmp_checkpoints(workdir)}")
  _check(after and after[-1] == named, f"the message names checkpoint {named}, on disk {after}")
  _check(named == bad - 1, f"checkpoint {named} is not the one just before the bad step {bad}")
  _check(read_meta(workdir, named)["step"] == named, "meta of the named checkpoint")
  for s, d in digests.items():
    if s in after:
      _check(tree_digest(workdir / "checkpoints" / str(s)) == d, f"checkpoint {s} changed by the NaN run")
  return {"nan_step": bad, "last_checkpoint": named, "exit_code": rc, "checkpoints_before": before,
          "checkpoints_after": after}


def _main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python benchmarks/crash_harness.py", description=__doc__.split("\n")[0])
  p.add_argument("--kills", type=cli.positive_int, default=12)
  p.add_argument("--steps", type=cli.nonnegative_int, default=0, help="steps of the run (default: 5 per kill + 10)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--devices", type=cli.positive_int, default=1, help="fake CPU devices per process")
  p.add_argument("--workdir", default="/tmp/patch_diffusion_crash_harness")
  p.add_argument("--timeout", type=cli.positive_float, default=600.0, help="seconds per process")
  p.add_argument("--no-nan", action="store_true")
  p.add_argument("--json", default="", help="write the report here")
  args = p.parse_args(argv)
  steps = args.steps or 5 * args.kills + 10
  root = pathlib.Path(args.workdir)
  root.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  ref = run_reference(root, steps, args.devices, args.timeout)
  print(f"reference: {steps} steps in {ref['seconds']:.1f} s")
  report = run_with_kills(root, steps, args.kills, args.seed, args.devices, ref, args.timeout)
  if not args.no_nan:
    report["nan"] = run_nan(root, pathlib.Path(report["workdir"]), steps, args.devices, args.timeout)
  report.update(steps=steps, seed=args.seed, total_seconds=time.time() - t0)
  print(json.dumps(report, indent=2, default=str))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2, default=str))
  return 0


def main(argv=None) -> int:
  """A bad input ends in one line naming the problem (exit 1), not a traceback."""
  return cli.run(_main, argv, prog="crash_harness.py")


if __name__ == "__main__":
  sys.exit(main())
