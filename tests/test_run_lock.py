"""One training process per workdir (run_lock.py), and Ctrl-C behaving like a preemption.

The end-to-end test starts a real training process, starts a second one on the same workdir (refused,
naming the owner), then presses Ctrl-C (SIGINT) in the first: it must save a checkpoint of the current
step, say how to resume, release the lock and exit 0. The other tests exercise stale-lock detection
without subprocesses.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from patch_diffusion import checkpointing
from patch_diffusion import run_lock
from reliability import message, record

REPO = pathlib.Path(__file__).resolve().parents[1]
GROUP = "Interrupts and concurrent runs"


def _train_cmd(workdir: pathlib.Path, steps: int) -> list[str]:
  flags = {"patch.real_p": 1.0, "model.channel_mult": "(1,)", "model.attn_resolutions": "()",
           "train.log_every_steps": 1, "train.checkpoint_every_steps": 1000,
           "train.total_kimg": (steps - 0.5) * 16 / 1000}
  return ([sys.executable, "-m", "patch_diffusion.main", f"--config={REPO / 'configs' / 'tiny_test.py'}",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()])


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split()
                               if "device_count" not in f] + ["--xla_force_host_platform_device_count=1"])
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _wait_for(path: pathlib.Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> re.Match:
  deadline = time.time() + timeout
  while time.time() < deadline:
    m = re.search(pattern, path.read_text(errors="replace")) if path.exists() else None
    if m:
      return m
    if proc.poll() is not None:
      raise AssertionError(f"process exited ({proc.returncode}) before {pattern!r}:\n{path.read_text()[-3000:]}")
    time.sleep(0.05)
  raise AssertionError(f"{pattern!r} not seen in {timeout} s")


def test_second_run_refused_and_ctrl_c_saves_and_exits(tmp_path):
  workdir = tmp_path / "run"
  log_a = tmp_path / "a.log"
  with open(log_a, "w") as f:
    first = subprocess.Popen(_train_cmd(workdir, 400), cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT)
  try:
    _wait_for(log_a, r"step 3 \|", first)  # training is under way (and holds the lock)
    owner = json.loads((workdir / run_lock.LOCK_NAME).read_text())
    assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()

    second = subprocess.run(_train_cmd(workdir, 400), cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 1
    assert "Traceback" not in second.stderr
    fatal = next(l for l in second.stderr.splitlines() if l.startswith("FATAL WorkdirLockedError"))
    assert f"pid {first.pid}" in fatal and "train in another --workdir" in fatal
    assert not (workdir / "checkpoints" / "1").exists()  # the second run wrote nothing
    record(GROUP, "a second training process started on a workdir that a running one owns",
           "refused at start with the owner's host and pid and the fix; exit code 1; nothing written",
           f"exit {second.returncode}: {fatal}")

    first.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
    rc = first.wait(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
  text = log_a.read_text()
  assert rc == 0, text[-3000:]
  assert "Traceback" not in text and "KeyboardInterrupt" not in text
  m = re.search(r"SIGINT: stopped at step (\d+); checkpoint \1 committed to (\S+)\. Resume with the same "
                r"command\.", text)
  assert m, text[-3000:]
  step = int(m.group(1))
  assert step >= 3 and (workdir / "checkpoints" / str(step)).is_dir()
  assert checkpointing.verify(workdir / "checkpoints" / str(step)).status == "verified"
  assert not (workdir / run_lock.LOCK_NAME).exists()  # released
  line = text[text.index("SIGINT: stopped"):].splitlines()[0]
  record(GROUP, "Ctrl-C (SIGINT) during training", "like SIGTERM: a checkpoint of the current step, a message "
         "saying how to resume, the lock released, exit code 0", f"exit {rc}: {line}")


def _fake_owner(workdir: pathlib.Path, **fields) -> None:
  now = time.time()
  record_ = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": None, "started": now,
             "heartbeat": now}
  record_.update(fields)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / run_lock.LOCK_NAME).write_text(json.dumps(record_))


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


@pytest.mark.parametrize("case", ["dead pid on this host", "old heartbeat from another host",
                                  "unreadable lock file"])
def test_stale_lock_is_taken_over(tmp_path, caplog, case):
  workdir = tmp_path / "run"
  if case == "dead pid on this host":
    _fake_owner(workdir, pid=_dead_pid())
  elif case == "old heartbeat from another host":
    _fake_owner(workdir, host="another-host", heartbeat=time.time() - 2 * run_lock.STALE_AFTER_S)
  else:
    workdir.mkdir(parents=True)
    (workdir / run_lock.LOCK_NAME).write_text('{"host": "x", "pi')  # cut by a SIGKILL mid-write
  caplog.set_level(logging.WARNING)
  lock = run_lock.WorkdirLock(str(workdir)).acquire()
  try:
    owner = json.loads((workdir / run_lock.LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid()
  finally:
    lock.release()
  assert not (workdir / run_lock.LOCK_NAME).exists()
  warning = next(r.getMessage() for r in caplog.records if "taking over the stale lock" in r.getMessage())
  record(GROUP, f"stale lock ({case})", "taken over with a warning saying why it is stale",
         f"WARNING: {warning}")


@pytest.mark.parametrize("case", ["live process on this host", "fresh heartbeat from another host"])
def test_live_lock_is_refused(tmp_path, case):
  workdir = tmp_path / "run"
  if case == "live process on this host":
    _fake_owner(workdir)  # this very process: alive
  else:
    _fake_owner(workdir, host="another-host")
  before = (workdir / run_lock.LOCK_NAME).read_text()
  with pytest.raises(run_lock.WorkdirLockedError, match="is in use by another training process") as e:
    run_lock.WorkdirLock(str(workdir)).acquire()
  assert (workdir / run_lock.LOCK_NAME).read_text() == before  # the owner's lock untouched
  if case != "live process on this host":
    record(GROUP, "workdir locked by a live run on another host (heartbeat fresh)",
           "WorkdirLockedError naming the owner and the fix; the lock untouched", message(e.value))
