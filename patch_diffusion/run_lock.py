"""One training process per workdir: a lock file naming its owner, with a heartbeat.

Two training runs writing the same workdir race on checkpoints (both save step N, keep-K deletes the
other's files) and interleave their logs. ``train`` therefore takes ``<workdir>/train.lock`` before it
writes anything and releases it on every exit path. The file holds the owner's host, pid, start time
and a heartbeat refreshed by a daemon thread every ``HEARTBEAT_S`` seconds.

A lock is **stale** (and taken over, with a warning) when its owner is gone:
* same host: the pid no longer exists, or it is another process now (its start time differs);
* another host: the heartbeat is older than ``STALE_AFTER_S`` (a crashed machine stops refreshing it).
Otherwise the second run is refused with :class:`WorkdirLockedError`, naming the owner and the fix.

Creation uses ``O_CREAT | O_EXCL`` on local file systems (atomic). Object stores (``gs://``) have no
exclusive create: there the check is best effort (read, then write), which still catches the common
mistake of launching the same command twice.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Optional

import jax

from absl import logging
from etils import epath

from patch_diffusion import fileio
from patch_diffusion import parallel

LOCK_NAME = "train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class WorkdirLockedError(RuntimeError):
  """Another live training process owns the workdir."""


def _proc_start_ticks(pid: int) -> Optional[int]:
  """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), None where unavailable."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 of proc(5); fields[0] is field 3 (state)
  except (OSError, IndexError, ValueError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True


def _is_url(path: str) -> bool:
  return "://" in str(path)


def stale_reason(owner: dict, now: Optional[float] = None) -> Optional[str]:
  """Why the lock ``owner`` record is stale, or None if its owner may still be running."""
  now = time.time() if now is None else now
  if owner.get("host") == socket.gethostname():
    pid = int(owner.get("pid", -1))
    if pid <= 0 or not _pid_alive(pid):
      return f"process {pid} on this host no longer exists"
    start = owner.get("start_ticks")
    if start is not None and _proc_start_ticks(pid) not in (None, start):
      return f"pid {pid} now belongs to another process"
    return None
  age = now - float(owner.get("heartbeat", 0.0))
  if age > STALE_AFTER_S:
    return f"its heartbeat is {age:.0f} s old (> {STALE_AFTER_S:.0f} s): its host stopped refreshing it"
  return None


def describe(owner: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("started", 0))))
  age = time.time() - float(owner.get("heartbeat", 0.0))
  return (f"host {owner.get('host')}, pid {owner.get('pid')}, started {started}, last heartbeat "
          f"{age:.0f} s ago")


class WorkdirLock:
  """Owns ``<workdir>/train.lock`` from :meth:`acquire` until :meth:`release` (a context manager)."""

  def __init__(self, workdir: str):
    self.workdir = str(workdir)
    self.path = epath.Path(workdir) / LOCK_NAME
    self._record: Optional[dict] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _new_record(self) -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _proc_start_ticks(os.getpid()),
            "started": now, "heartbeat": now}

  def _write_exclusive(self, record: dict) -> bool:
    """Creates the lock file holding ``record``; False if it already exists."""
    blob = json.dumps(record)
    if _is_url(self.workdir):
      if self.path.exists():
        return False
      self.path.write_text(blob)
      return True
    try:
      fd = os.open(os.fspath(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(blob)
    return True

  def _read(self) -> Optional[dict]:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return {}  # unreadable (half-written by a killed process): no heartbeat, hence stale

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises :class:`WorkdirLockedError`; takes over a stale lock with a warning."""
    epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
    record = self._new_record()
    for _ in range(3):  # a stale lock removed under us by a concurrent starter: try again
      if self._write_exclusive(record):
        break
      owner = self._read()
      if owner is None:
        continue
      reason = stale_reason(owner) if owner else "the lock file is unreadable"
      if reason is None:
        raise WorkdirLockedError(
            f"workdir {self.workdir} is in use by another training process ({describe(owner)}); two "
            f"writers would race on its checkpoints. Wait for it to finish or stop it (SIGTERM or Ctrl-C "
            f"saves a checkpoint), or train in another --workdir. If that process is gone for good, delete "
            f"{self.path}.")
      logging.warning("taking over the stale lock %s (%s)", self.path, reason)
      self.path.unlink(missing_ok=True)
    else:
      raise WorkdirLockedError(f"could not take {self.path}: another process keeps creating it")
    self._record = record
    self._stop.clear()
    self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()
    return self

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self._record["heartbeat"] = time.time()
        fileio.write_text(self.path, json.dumps(self._record))
      except OSError as e:  # a full disk must not kill training; the lock just ages
        logging.warning("could not refresh %s: %s", self.path, e)

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if this process still owns it."""
    if self._record is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    owner = self._read()
    if owner and owner.get("pid") == self._record["pid"] and owner.get("host") == self._record["host"]:
      self.path.unlink(missing_ok=True)
    self._record = None

  def __enter__(self) -> "WorkdirLock":
    if self._record is None and jax.process_index() == 0:
      self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def acquire_for_run(workdir: str) -> WorkdirLock:
  """Takes the workdir's lock on process 0; every process raises the same error if it is refused.

  Returns the held lock (a no-op holder on processes other than 0); use it as a context manager.
  """
  lock, error = WorkdirLock(workdir), None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except WorkdirLockedError as e:
      error = str(e)
  if jax.process_count() > 1:
    error = parallel.allgather_json(error)[0]
  if error:
    lock.release()
    raise WorkdirLockedError(error)
  return lock
