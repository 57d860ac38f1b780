"""Records what each bad-input / damage case printed, for docs/RELIABILITY.md.

Tests call :func:`record` with the case, what the project promises and what the run observed (the error
text or the handling). With ``$PATCH_DIFFUSION_RELIABILITY_ROWS`` set to a folder, every row is appended to
``<folder>/<xdist worker>.jsonl``; ``tests/reliability_doc.py`` assembles the rows of a whole run into
the document (``--write``) or checks the committed one (``--check``, what ``.ci/run`` does). The observed
text is normalised (temporary paths, hashes, pids, host names, times) so that two runs give the same
document. A case whose test cannot run here records a "not run: <why>" row instead of vanishing.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys

ENV_VAR = "PATCH_DIFFUSION_RELIABILITY_ROWS"
_SEQ: dict[str, int] = {}

_NORMALISE = [
    # pytest's tmp_path: <basetemp>/[popen-gwN/]<test name, cut, + a per-worker counter>/
    (re.compile(r"/\S*?/pytest-of-[^/]+/pytest-\d+/(popen-gw\d+/)?[^/\s]+/"), "<tmp>/"),
    (re.compile(r"/tmp/tmp\w+/"), "<tmp>/"),
    (re.compile(r"-[0-9a-f]{16}\b"), "-<hash>"),                           # cache folder names
    (re.compile(r"\b[0-9a-f]{12}…"), "<hash>…"),                           # abbreviated digests
    (re.compile(r"\bpid \d+"), "pid <pid>"),
    (re.compile(r"process \d{3,}\b"), "process <pid>"),
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"), "<time>"),
    (re.compile(r"\d{8}-\d{6}"), "<time>"),
    (re.compile(r"\b\d+(\.\d+)? s ago"), "<n> s ago"),
    (re.compile(r"\bin \d+\.\d+ s\b"), "in <t> s"),
    (re.compile(r"stopped at step \d+; checkpoint \d+"), "stopped at step <n>; checkpoint <n>"),  # signal timing
    # Orbax/OCDBT lays out a checkpoint differently from run to run: how many data files, their random
    # names and their sizes vary, so which file a case damaged and its byte counts are not part of the doc.
    (re.compile(r"/d/[0-9a-f]{32}\b"), "/d/<file>"),
    (re.compile(r"\b\d+ bytes, the manifest says \d+"), "<n> bytes, the manifest says <m>"),
    (re.compile(r"<tmp>/t\d+/"), "<tmp>/t<i>/"),
    # where a cut manifest stops parsing depends on its length (and so on the layout above)
    (re.compile(r"JSONDecodeError: [^()]*line \d+ column \d+ \(char \d+\)"), "JSONDecodeError: <where the cut fell>"),
]


def normalise(text: str) -> str:
  text = " ".join(str(text).split())
  host = socket.gethostname()
  if host:
    text = text.replace(f"host {host}", "host <host>")
  for pattern, repl in _NORMALISE:
    text = pattern.sub(repl, text)
  return text[:400] + (" …" if len(text) > 400 else "")


def record(group: str, case: str, expected: str, observed: str) -> None:
  """Records one row; the order in the document follows the test's position in its file."""
  folder = os.environ.get(ENV_VAR)
  if not folder:
    return
  caller = sys._getframe(1)  # pylint: disable=protected-access
  while caller.f_code.co_name.startswith("_") or caller.f_code.co_name in ("record", "fresh_copy"):
    caller = caller.f_back
  test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
  module = os.path.basename(caller.f_code.co_filename)
  key = f"{module}:{test}"
  _SEQ[key] = _SEQ.get(key, 0) + 1
  row = {"group": group, "case": case, "expected": expected, "observed": normalise(observed),
         "order": [module, caller.f_code.co_firstlineno, test, _SEQ[key]]}
  os.makedirs(folder, exist_ok=True)
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  with open(os.path.join(folder, f"{worker}.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps(row) + "\n")


def message(exc: BaseException) -> str:
  return f"{type(exc).__name__}: {exc}"
