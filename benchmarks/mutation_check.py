"""Mutation check: do the tests behind the five most important claims fail when the code is broken?

  python benchmarks/mutation_check.py            # all five, ~10 min on 2 cores
  python benchmarks/mutation_check.py --only crop,parity

For each claim, a scratch copy of the repository gets ONE deliberate one-line break, and the test that
backs the claim runs there (``PYTHONPATH`` points at the copy, so subprocesses use it too). A claim is
backed only if its test FAILS on the broken code; the script exits 1 if any test still passes. Results:
a printed table and ``benchmarks/results/mutation_check.json``. The working tree is never modified.

| claim | the break | the test |
|---|---|---|
| parity with the official networks | the sin/cos swap of the noise embedding removed | tests/test_models.py (DDPM++ vs fixtures) |
| exact resume | a restart ignores the checkpoint and retrains from step 0 | tests/test_train.py (interrupted + resumed) |
| multi-host equality | every process reads shard 0 of the data | tests/test_multihost.py (2 real processes) |
| crash safety | SIGTERM stops without saving a checkpoint | tests/test_crash_safety.py (SIGKILL/SIGTERM harness) |
| patch crop | row and column offsets swapped in the crop | tests/test_patches.py (vs the official pachify) |
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from patch_diffusion.tools import cli  # noqa: E402  pylint: disable=wrong-import-position


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  claim: str
  path: str       # file to break, relative to the repository
  old: str        # the line's text (must occur exactly once)
  new: str        # its broken replacement
  tests: tuple[str, ...]


MUTATIONS = (
    Mutation("parity", "network parity with the official PyTorch code", "patch_diffusion/models/song_unet.py",
             "emb.reshape(n, 2, -1)[:, ::-1].reshape(n, -1)", "emb.reshape(n, 2, -1).reshape(n, -1)",
             ("tests/test_models.py", "-k", "ddpmpp_uncond")),
    Mutation("resume", "a resumed run equals the uninterrupted one", "patch_diffusion/train.py",
             "if ckpt.latest_step() is not None:", "if False and ckpt.latest_step() is not None:",
             ("tests/test_train.py", "-k", "interrupted")),
    Mutation("multihost", "2 processes train like 1 process on the same global batches",
             "patch_diffusion/data/input_pipeline.py",
             "shard = grain.sharding.ShardOptions(shard_index=process_index,",
             "shard = grain.sharding.ShardOptions(shard_index=0,",
             ("tests/test_multihost.py", "-k", "two_processes")),
    Mutation("crash", "SIGKILL/SIGTERM lose nothing (resume from the newest complete checkpoint)",
             "patch_diffusion/hooks.py", 'self.checkpoint.save(run, "preemption")', "pass",
             ("tests/test_crash_safety.py",)),
    Mutation("crop", "the patch crop and coordinates equal the official pachify", "patch_diffusion/data/patches.py",
             "cut = lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (patch_size, patch_size, ch))",
             "cut = lambda img, i, j: jax.lax.dynamic_slice(img, (j, i, 0), (patch_size, patch_size, ch))",
             ("tests/test_patches.py",)),
)


def scratch_copy(root: pathlib.Path) -> pathlib.Path:
  """The working tree (no .git, caches or results) at ``root/repo``, with ``root/shared`` -> ../shared."""
  dst = root / "repo"
  shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "results",
                                                           ".pytest_cache"))
  shared = REPO.parent / "shared"
  if shared.exists():
    (root / "shared").symlink_to(shared)
  return dst


def apply(repo: pathlib.Path, m: Mutation) -> None:
  path = repo / m.path
  text = path.read_text()
  if text.count(m.old) != 1:
    raise RuntimeError(f"mutation {m.name}: expected exactly one {m.old!r} in {m.path}, found "
                       f"{text.count(m.old)}; update benchmarks/mutation_check.py")
  path.write_text(text.replace(m.old, m.new))


def run_one(m: Mutation, timeout: float) -> dict:
  with tempfile.TemporaryDirectory(prefix=f"mutation_{m.name}_") as tmp:
    repo = scratch_copy(pathlib.Path(tmp))
    apply(repo, m)
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.time() - t0
  last = [l for l in proc.stdout.strip().splitlines() if l.strip()][-1:] or [""]
  return {"name": m.name, "claim": m.claim, "break": f"{m.path}: {m.old!r} -> {m.new!r}",
          "test": " ".join(m.tests), "exit_code": proc.returncode, "caught": proc.returncode == 1,
          "summary": last[0], "seconds": round(seconds, 1)}


def _main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python benchmarks/mutation_check.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--only", default="", help="comma-separated names: " + ",".join(m.name for m in MUTATIONS))
  p.add_argument("--timeout", type=cli.positive_float, default=1800.0, help="seconds per test run")
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mutation_check.json"))
  args = p.parse_args(argv)
  wanted = set(filter(None, args.only.split(",")))
  unknown = wanted - {m.name for m in MUTATIONS}
  if unknown:
    raise ValueError(f"unknown mutation(s) {sorted(unknown)}; choose from {[m.name for m in MUTATIONS]}")
  rows = []
  for m in MUTATIONS:
    if wanted and m.name not in wanted:
      continue
    row = run_one(m, args.timeout)
    rows.append(row)
    print(f"{m.name:10s} {'CAUGHT' if row['caught'] else 'NOT CAUGHT':10s} exit {row['exit_code']} "
          f"{row['seconds']:6.0f} s  {row['summary']}", flush=True)
  print("\n| claim | break | test | result |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['claim']} | `{r['break']}` | `{r['test']}` | {'fails (caught)' if r['caught'] else 'PASSES: too weak'}"
          f" — {r['summary']} |")
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
  print(f"wrote {args.out}")
  return 0 if all(r["caught"] for r in rows) else 1


def main(argv=None) -> int:
  return cli.run(_main, argv, prog="mutation_check.py")


if __name__ == "__main__":
  sys.exit(main())
