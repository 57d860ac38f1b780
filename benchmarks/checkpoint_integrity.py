"""Checkpoint integrity cost: manifest hashing at save, verification vs restore time, per state size.

  python benchmarks/checkpoint_integrity.py --config configs/celeba64.py --repeats 3

Builds the TrainState of the config's network (params, EMA, Adam moments; CelebA-64 DDPM++: 61.8 M
parameters, ~1 GB), saves it with the project's Checkpointer (async Orbax + manifest written in Orbax's
background thread before the commit), then times, per repeat: the save until committed, the manifest
hashing inside it, the verification of the committed checkpoint and the restore. Prints a Markdown table
and writes benchmarks/results/checkpoint_integrity_<config>.json. Files are read from the page cache (a
checkpoint just written or just verified), the common case when a run resumes on the machine that wrote it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from patch_diffusion import checkpointing  # noqa: E402
from patch_diffusion import parallel  # noqa: E402
from patch_diffusion import state as state_lib  # noqa: E402
from patch_diffusion import experiment  # noqa: E402
from patch_diffusion import train  # noqa: E402
from patch_diffusion.tools import cli  # noqa: E402


def run(config, repeats: int, folder: str) -> dict:
  exp = experiment.build_experiment(config, check_data=False)
  state = state_lib.create_train_state(exp.init_variables(jax.random.key(0)), exp.tx)
  # A trained state's EMA and Adam moments differ from the parameters and are not zero: fill every float
  # array with noise so the files are as large and incompressible as a real run's.
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 1e-3 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
            for x, k in zip(leaves, keys)]
  state = jax.device_put(jax.tree.unflatten(treedef, leaves), parallel.replicated(exp.mesh))
  jax.block_until_ready(state)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  rows = []
  ckpt = checkpointing.Checkpointer(os.path.join(folder, "checkpoints"), max_to_keep=2)
  for i in range(repeats):
    step = i + 1
    t0 = time.perf_counter()
    ckpt.save(step, state, {"step": step})
    ckpt.wait()
    save_s = time.perf_counter() - t0
    seal_s = ckpt._last_seal_seconds  # pylint: disable=protected-access
    verdict = ckpt.verify(step)
    assert verdict.status == "verified", verdict
    t0 = time.perf_counter()
    restored, _ = ckpt._restore_verified(state, step)  # pylint: disable=protected-access
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - t0
    rows.append({"save_s": save_s, "manifest_s": seal_s, "verify_s": verdict.seconds, "restore_s": restore_s,
                 "files": verdict.num_files, "hashed_bytes": verdict.num_bytes})
    del restored
  ckpt.close()
  med = {k: statistics.median(r[k] for r in rows) for k in ("save_s", "manifest_s", "verify_s", "restore_s")}
  return {"machine": common.machine(), "state_bytes": nbytes, "params": state_lib.param_count(state.params),
          "repeats": rows, **med, "verify_over_restore": med["verify_s"] / med["restore_s"],
          "files": rows[-1]["files"], "hashed_bytes": rows[-1]["hashed_bytes"]}


def _main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python benchmarks/checkpoint_integrity.py",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, type=cli.existing_file)
  parser.add_argument("--set", action="append", default=[], help="config override a.b=value (repeatable)")
  parser.add_argument("--repeats", type=cli.positive_int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  config = common.load_config(str(args.config), args.set)
  with tempfile.TemporaryDirectory() as tmp:
    result = run(config, args.repeats, tmp)
  result.update(config=str(args.config), overrides=args.set)
  name = os.path.splitext(os.path.basename(str(args.config)))[0]
  out = args.out or os.path.join(common.ROOT, "benchmarks", "results", f"checkpoint_integrity_{name}.json")
  print(f"# checkpoint integrity: {args.config} ({result['params'] / 1e6:.1f} M parameters, state "
        f"{result['state_bytes'] / 1e9:.2f} GB, {result['files']} files), median of {args.repeats}")
  common.print_table([result], [
      ("save_s", "save until committed s", ".2f"), ("manifest_s", "manifest hashing s", ".2f"),
      ("verify_s", "verify s", ".2f"), ("restore_s", "restore s", ".2f"),
      ("verify_over_restore", "verify / restore", ".1%")])
  print(f"wrote {common.write_json(out, result)}")
  return 0


def main(argv=None) -> int:
  """A bad input ends in one line naming the problem (exit 1), not a traceback."""
  return cli.run(_main, argv, prog="checkpoint_integrity.py")


if __name__ == "__main__":
  sys.exit(main())
