"""Assembles docs/RELIABILITY.md from the rows a test run recorded (tests/reliability.py), or checks it.

  # regenerate (any test run with the variable set records rows; xdist is fine)
  PATCH_DIFFUSION_RELIABILITY_ROWS=/tmp/rows python -m pytest -q -n 2 --dist loadgroup tests/test_bad_input.py \
      tests/test_checkpointing.py tests/test_run_lock.py tests/test_crash_safety.py
  python tests/reliability_doc.py --rows /tmp/rows --write docs/RELIABILITY.md
  # CI: fail when the committed document is not what this run observed
  python tests/reliability_doc.py --rows /tmp/rows --check docs/RELIABILITY.md
"""
from __future__ import annotations

import argparse
import difflib
import json
import pathlib
import sys

#: Sections in document order (a row of another group is an error: add it here).
GROUPS = ("Configuration", "Image folders", "Command-line tools", "Workdir and disk", "Checkpoints",
          "Checkpoint integrity", "Interrupts and concurrent runs", "Multi-host")

INTRO = """# Reliability: bad input, damaged checkpoints, interrupts

Generated from the rows that the tests record (`tests/reliability.py`); do not edit by hand. `.ci/run`
fails when this file differs from what its own test run observed. Regenerate with:

    PATCH_DIFFUSION_RELIABILITY_ROWS=/tmp/rows python -m pytest -q -n 2 --dist loadgroup tests
    python tests/reliability_doc.py --rows /tmp/rows --write docs/RELIABILITY.md

Each row is one test case: what the input was, what the project promises, and the message or handling
observed in that run (temporary paths, hashes, pids and times normalised). In every case nothing is lost:
the tests also check that no checkpoint is changed or removed (a digest of every file before and after)
and that readable images are kept. A case that cannot run on the machine says "not run" and why.
"""

KNOWN_LIMITS = """## Known limits

* Integrity manifests cover every file of a checkpoint except Orbax's `_CHECKPOINT_METADATA` (its
  bookkeeping JSON, rewritten with the commit time after the manifest is written): that file must exist,
  its content is not hashed. A damaged one fails Orbax's own parsing on restore.
* Checkpoints written before manifests existed (no `manifest.json`) restore with a warning, unverified.
* The manifest detects damage to the files on disk; it cannot tell a checkpoint that was written from an
  already-wrong state (e.g. a bit flip in host memory before the save) from a good one.
* On object stores (`gs://`) the workdir lock is best effort (no exclusive create); the manifest and its
  verification work the same through `etils.epath`.
* A signal during start-up (before the training loop installs its handler: imports, restore,
  compilation) ends the process with the default signal exit code; nothing is lost because no step has
  run since the last checkpoint.
* See also tests/test_multihost.py (a 2-process checkpoint refused by a 1-process training run) and
  benchmarks/crash_harness.py / tests/test_crash_safety.py (SIGKILL at random moments, SIGTERM, NaN; every
  surviving checkpoint's manifest verified).
"""


def load_rows(folder: pathlib.Path) -> list[dict]:
  rows = []
  for path in sorted(folder.glob("*.jsonl")):
    rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  unknown = sorted({r["group"] for r in rows} - set(GROUPS))
  if unknown:
    raise SystemExit(f"rows of unknown groups {unknown}: add them to GROUPS in {__file__}")
  # Same case recorded twice (a test retried) keeps one row.
  unique = {(r["group"], r["case"], tuple(map(str, r["order"]))): r for r in rows}
  return sorted(unique.values(), key=lambda r: (GROUPS.index(r["group"]), [str(x).zfill(8) if isinstance(
      x, int) else str(x) for x in r["order"]]))


def render(rows: list[dict]) -> str:
  def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")

  lines = [INTRO]
  for group in GROUPS:
    mine = [r for r in rows if r["group"] == group]
    if not mine:
      continue
    lines += [f"## {group}", "", "| case | expected | observed |", "|---|---|---|"]
    lines += [f"| {cell(r['case'])} | {cell(r['expected'])} | {cell(r['observed'])} |" for r in mine]
    lines.append("")
  lines.append(KNOWN_LIMITS)
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", required=True, type=pathlib.Path, help="folder of recorded *.jsonl rows")
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument("--write", type=pathlib.Path)
  group.add_argument("--check", type=pathlib.Path)
  args = p.parse_args(argv)
  if not args.rows.is_dir():
    print(f"error: no recorded rows in {args.rows} (run the tests with PATCH_DIFFUSION_RELIABILITY_ROWS set)",
          file=sys.stderr)
    return 1
  text = render(load_rows(args.rows))
  if args.write:
    args.write.write_text(text)
    print(f"wrote {args.write}")
    return 0
  committed = args.check.read_text() if args.check.exists() else ""
  if committed == text:
    print(f"{args.check} matches this run")
    return 0
  sys.stdout.writelines(difflib.unified_diff(committed.splitlines(True), text.splitlines(True),
                                             str(args.check), "observed in this run"))
  print(f"\nerror: {args.check} differs from what this run observed; regenerate it with\n  "
        f"python tests/reliability_doc.py --rows {args.rows} --write {args.check}", file=sys.stderr)
  return 1


if __name__ == "__main__":
  sys.exit(main())
