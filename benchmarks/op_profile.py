"""Where a compiled train step (or one full-image network evaluation, the sampler's unit of work) spends its
time, per XLA instruction and per network layer, from a ``jax.profiler`` trace.

  python benchmarks/op_profile.py --config configs/digits.py --patch 16
  python benchmarks/op_profile.py --config configs/digits.py --forward --batch 100   # the sampler's work

It compiles the step for one patch size (the trainer's executable, batch multiplier included) or the
EMA denoiser at full resolution, times ``--steps`` calls, then traces as many more with
``jax.profiler.trace(create_perfetto_trace=True)`` and sums the trace's kernel events per HLO instruction
of that executable. Each instruction is labelled from the compiled HLO: its kind (an XLA loop/input fusion,
a YNNPACK fusion, a dot, a convolution, ...), its output shape, the layer it comes from (the ``op_name``
metadata, e.g. ``dec_16x16_up/conv0``) and whether it belongs to the backward pass.

**What the trace cannot see.** On XLA:CPU a convolution runs as an Eigen kernel on the intra-op thread pool
after its thunk has returned, so the trace records only its launch (microseconds). The convolutions' time
is what is left of the step's thread time (wall × XLA threads) after the traced kernels: reported as
"untraced (convolution kernels, idle)". Each top-level convolution of the executable is also rebuilt from
the HLO and timed alone (random operands, the same shapes and dimension numbers): their sum is what the
step would cost if everything but its convolutions were free.

Writes ``benchmarks/results/op_profile_<config>_<what>.json`` and prints Markdown tables: per category, the
top instructions, the top layers.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

from patch_diffusion.tools import cli  # noqa: E402  pylint: disable=wrong-import-position

# One instruction of an HLO text: `%name = f32[64,16,16,64]{3,2,1,0} opcode(...), ..., metadata={op_name="..."}`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+?)(?:\{[^}]*\})? ([\w\-]+)\(")
#: Instructions whose trace events enclose other instructions' kernels: summing them would count twice.
_CONTAINERS = ("while", "call", "conditional")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FUSION_KIND = re.compile(r"kind=(k\w+)")
#: The layer of instructions outside the network's modules.
OUTSIDE = "(outside the network)"
_JAX_TRANSFORMS = re.compile(r"^(?:jit\([^)]*\)/)+|(?:transpose|jvp|jit)\(|\)")


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
  """Instruction name -> {"opcode", "shape", "kind", "op_name"} for every instruction of the module's
  computations (``Compiled.as_text()``); ``kind`` refines fusions: "ynn fusion", "loop fusion", ...."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, opcode = m.groups()
    kind = opcode
    if opcode == "fusion":
      fk = _FUSION_KIND.search(line)
      kind = ("ynn fusion" if "__ynn_fusion" in line else
              f"{(fk.group(1)[1:].lower() if fk else 'custom')} fusion")
    op = _OP_NAME.search(line)
    out[name] = {"opcode": opcode, "shape": shape, "kind": kind, "op_name": op.group(1) if op else ""}
  return out


def layer_of(op_name: str) -> tuple[str, bool]:
  """(layer path, backward?) from an ``op_name`` such as
  ``jit(step)/transpose(jvp(SongUNet))/dec_16x16_up/conv0/reduce_sum``: ("dec_16x16_up/conv0", True).
  The last component (the primitive) is dropped; a name with no module path (the loss, the optimiser,
  the preconditioning) gives :data:`OUTSIDE`."""
  backward = "transpose(" in op_name
  parts = [p for p in _JAX_TRANSFORMS.sub("", op_name).split("/") if p]
  # The first component names the network's class (SongUNet, ...) for module ops; the last is the primitive.
  path = [p for p in parts[:-1] if not p[:1].isupper()]
  return ("/".join(path[:2]) if path else OUTSIDE), backward


_CONV = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ convolution\(%?([\w.\-]+), %?([\w.\-]+)\)(.*)$")


def _dims(attr: str, key: str, n: int, default: int) -> list[int]:
  m = re.search(key + r"=([\dx]+)", attr)
  return [int(v) for v in m.group(1).split("x")] if m else [default] * n


def convolutions(hlo_text: str, instructions: dict[str, dict]) -> list[dict]:
  """The top-level convolutions of an HLO text, each as the arguments of ``lax.conv_general_dilated``
  (shapes from ``instructions``) plus its name and FLOPs (2 × output elements × window × input features per
  group). Convolutions inside fusions (YNNPACK's) are part of their fusion's traced time and left out."""
  fused = set(re.findall(r" fusion\(.*calls=%?([\w.\-]+)", hlo_text))
  convs, inside_fusion = [], False
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(", line)
    if header:  # a computation starts: skip the bodies of fusions
      inside_fusion = header.group(1) in fused
    m = _CONV.match(line)
    if not m or inside_fusion:
      continue
    name, lhs, rhs, attr = m.groups()
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attr)
    if not labels or lhs not in instructions or rhs not in instructions:
      continue
    to_lax = str.maketrans({"b": "N", "f": "C", "i": "I", "o": "O", "0": "H", "1": "W", "2": "D"})
    lhs_spec, rhs_spec, out_spec = (g.translate(to_lax) for g in labels.groups())
    spatial = len(lhs_spec) - 2
    pad = re.search(r"pad=([\d_x\-]+)", attr)
    padding = ([tuple(int(v) for v in p.split("_")) for p in pad.group(1).split("x")] if pad else [(0, 0)] * spatial)
    shape = lambda s: [int(v) for v in re.findall(r"\d+", s.split("[", 1)[1])] if "[" in s else []
    lhs_shape, rhs_shape, out_shape = shape(instructions[lhs]["shape"]), shape(instructions[rhs]["shape"]), shape(
        instructions[name]["shape"])
    groups = int(re.search(r"feature_group_count=(\d+)", attr).group(1)) if "feature_group_count" in attr else 1
    window = 1
    for axis, ch in enumerate(rhs_spec):
      if ch not in "IO":
        window *= rhs_shape[axis]
    out_elems = 1
    for v in out_shape:
      out_elems *= v
    convs.append({
        "instruction": name, "lhs_shape": lhs_shape, "rhs_shape": rhs_shape, "out_shape": out_shape,
        "dimension_numbers": (lhs_spec, rhs_spec, out_spec), "window_strides": _dims(attr, "stride", spatial, 1),
        "padding": padding, "lhs_dilation": _dims(attr, "lhs_dilate", spatial, 1),
        "rhs_dilation": _dims(attr, "rhs_dilate", spatial, 1), "feature_group_count": groups,
        "flops": 2.0 * out_elems * window * lhs_shape[lhs_spec.index("C")] / groups})
  return convs


def time_convolutions(convs: list[dict], repeats: int = 5) -> None:
  """Adds ``isolated_ms`` (median of ``repeats`` calls of the convolution alone, random float32 operands)
  to each entry of :func:`convolutions`; identical convolutions are timed once."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  seen = {}
  rng = np.random.default_rng(0)
  for c in convs:
    key = json.dumps({k: v for k, v in c.items() if k not in ("instruction", "flops")})
    if key not in seen:
      lhs = jax.device_put(rng.standard_normal(c["lhs_shape"], np.float32))
      rhs = jax.device_put(rng.standard_normal(c["rhs_shape"], np.float32))
      fn = jax.jit(lambda a, b, c=c: jax.lax.conv_general_dilated(
          a, b, c["window_strides"], c["padding"], c["lhs_dilation"], c["rhs_dilation"],
          c["dimension_numbers"], c["feature_group_count"]))
      seen[key] = common.median_time(lambda: jax.block_until_ready(fn(lhs, rhs)), repeats)[0] * 1e3
    c["isolated_ms"] = seen[key]


def kernel_time_per_instruction(trace_dir: str, names: set[str]) -> dict[str, float]:
  """Seconds of traced kernel time per instruction name (summed over threads and calls) from the perfetto
  trace ``jax.profiler.trace(..., create_perfetto_trace=True)`` wrote under ``trace_dir``."""
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise RuntimeError(f"no perfetto trace under {trace_dir}: jax.profiler wrote none")
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in names:
      totals[e["name"]] += e.get("dur", 0) * 1e-6  # perfetto durations are microseconds
  return dict(totals)


def summarize(instructions: dict[str, dict], seconds: dict[str, float], calls: int, wall_s: float,
              threads: int, top: int) -> dict:
  """Per-call milliseconds per instruction, per category and per layer, and the untraced remainder of
  the calls' thread time (wall × threads)."""
  rows = []
  for name, s in seconds.items():
    info = instructions[name]
    if info["opcode"] in _CONTAINERS:
      continue
    layer, backward = layer_of(info["op_name"])
    rows.append({"instruction": name, "ms": s / calls * 1e3, "kind": info["kind"], "shape": info["shape"],
                 "layer": layer, "pass": "" if layer == OUTSIDE else "backward" if backward else "forward"})
  rows.sort(key=lambda r: -r["ms"])
  thread_ms = wall_s / calls * 1e3 * threads
  traced_ms = sum(r["ms"] for r in rows)
  by_kind, by_layer = collections.Counter(), collections.Counter()
  for r in rows:
    by_kind[r["kind"]] += r["ms"]
    by_layer[(r["layer"], r["pass"])] += r["ms"]
  categories = [{"category": k, "ms": v, "share": v / thread_ms} for k, v in by_kind.most_common()]
  untraced = max(thread_ms - traced_ms, 0.0)
  categories.append({"category": "untraced (convolution kernels, idle)", "ms": untraced, "share": untraced / thread_ms})
  layers = [{"layer": k[0], "pass": k[1], "ms": v, "share": v / thread_ms} for k, v in by_layer.most_common(top)]
  for r in rows:
    r["share"] = r["ms"] / thread_ms
  return {"wall_ms": wall_s / calls * 1e3, "threads": threads, "thread_ms": thread_ms, "traced_ms": traced_ms,
          "categories": categories, "instructions": rows[:top], "layers": layers}


def compiled_denoiser_forward(exp, variables, n: int):
  """One full-image evaluation of the denoiser (the sampler's unit of work: coordinate channels of the
  whole grid, zero labels) at batch ``n``, compiled, and example arguments (variables, x [n,R,R,C] float32,
  sigma [n])."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from patch_diffusion.data import patches as patches_lib  # pylint: disable=g-import-not-at-top
  from patch_diffusion.edm.precond import make_denoiser  # pylint: disable=g-import-not-at-top
  r = exp.resolution
  grid = jnp.broadcast_to(patches_lib.full_grid(r), (n, r, r, 2))
  labels = jnp.zeros((n, exp.num_classes), jnp.float32) if exp.num_classes else None

  def fwd(variables, x, sigma):
    return make_denoiser(exp.model.apply, variables, exp.precond, dtype=exp.dtype)(x, sigma, grid, labels)

  args = (variables, jnp.zeros((n, r, r, exp.channels)), jnp.ones((n,)))
  return jax.jit(fwd).lower(*args).compile(), args


def _executable(config, patch: int | None, forward: bool, batch: int | None):
  """(compiled executable, a function calling it once and blocking, description)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from patch_diffusion import experiment, parallel, train  # pylint: disable=g-import-not-at-top
  from patch_diffusion import state as state_lib  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_threefry_partitionable", True)
  exp = experiment.build_experiment(config, check_data=False)
  state = jax.device_put(state_lib.create_train_state(exp.init_variables(jax.random.key(0)), exp.tx),
                         parallel.replicated(exp.mesh))
  key = jax.random.key(1)
  r, c = exp.resolution, exp.channels
  if forward:
    n = batch or config.sample.batch_size
    exe, args = compiled_denoiser_forward(exp, state.variables(ema=True), n)
    return exe, lambda: jax.block_until_ready(exe(*args)), f"denoiser forward, batch {n}, {r}x{r}"
  sched = exp.schedule
  if patch is None:
    patch = max(sched.sizes)
  if patch not in sched.sizes:
    raise ValueError(f"--patch {patch} is not in the config's patch schedule {list(sched.sizes)}")
  mul = sched.batch_muls[list(sched.sizes).index(patch)]
  exe = train.compile_steps(exp, state, key, config.train.batch_size, variants=[(patch, mul)])[(patch, mul)]
  n = config.train.batch_size * mul
  rng = np.random.default_rng(0)
  data = parallel.global_batch({"image": rng.integers(0, 256, (n, r, r, c), dtype=np.uint8),
                                "label": rng.integers(0, max(exp.num_classes, 1), (n,)).astype(np.int32)}, exp.mesh)
  lr, beta = np.float32(config.train.lr), np.float32(0.999)
  holder = {"state": state}

  def call():
    holder["state"], metrics = exe(holder["state"], data, lr, beta, key)
    jax.block_until_ready(metrics)

  return exe, call, f"train step, patch {patch}, batch {n}"


def run(config, patch: int | None, forward: bool, batch: int | None, steps: int, top: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  exe, call, what = _executable(config, patch, forward, batch)
  med, _ = common.median_time(call, steps)
  text = exe.as_text()
  instructions = hlo_instructions(text)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(steps):
        call()
      traced_wall = time.perf_counter() - t0
    seconds = kernel_time_per_instruction(trace_dir, set(instructions))
  # XLA:CPU's intra-op pool has one thread per core; elsewhere the "threads" are the device's.
  threads = os.cpu_count() if jax.default_backend() == "cpu" else 1
  result = summarize(instructions, seconds, steps, med * steps, threads, top)
  convs = convolutions(text, instructions)
  time_convolutions(convs)
  for c in convs:
    c["layer"], backward = layer_of(instructions[c["instruction"]]["op_name"])
    c["pass"] = "backward" if backward else "forward"
    c["gflops_per_s"] = c["flops"] / c["isolated_ms"] / 1e6
  convs.sort(key=lambda c: -c["isolated_ms"])
  result.update(convolutions_alone_ms=sum(c["isolated_ms"] for c in convs),
                convolution_gflop=sum(c["flops"] for c in convs) / 1e9, convolutions=convs[:top])
  result.update(what=what, median_ms_untraced_run=med * 1e3, wall_ms_traced_run=traced_wall / steps * 1e3,
                machine=common.machine())
  return result


def print_tables(result: dict) -> None:
  print(f"\n# {result['what']}: median {result['wall_ms']:.1f} ms per call untraced "
        f"({result['wall_ms_traced_run']:.1f} ms while tracing); thread time {result['thread_ms']:.1f} ms "
        f"= wall x {result['threads']} threads, of which traced kernels {result['traced_ms']:.1f} ms")
  common.print_table(result["categories"], [("category", "category", "s"), ("ms", "ms per call", ".2f"),
                                            ("share", "share of thread time", ".1%")])
  print()
  common.print_table(result["instructions"], [
      ("instruction", "instruction", "s"), ("kind", "kind", "s"), ("shape", "output", "s"), ("layer", "layer", "s"),
      ("pass", "pass", "s"), ("ms", "ms per call", ".2f"), ("share", "share", ".1%")])
  print(f"\nconvolutions timed alone, one after the other: {result['convolutions_alone_ms']:.1f} ms "
        f"({result['convolutions_alone_ms'] / result['wall_ms']:.0%} of the call's wall time) for "
        f"{result['convolution_gflop']:.2f} GFLOP")
  common.print_table(result["convolutions"], [
      ("instruction", "convolution", "s"), ("lhs_shape", "input", ""), ("rhs_shape", "kernel", ""),
      ("layer", "layer", "s"), ("pass", "pass", "s"), ("isolated_ms", "ms alone", ".2f"),
      ("gflops_per_s", "GFLOP/s", ".0f")])
  print()
  common.print_table(result["layers"], [("layer", "layer", "s"), ("pass", "pass", "s"), ("ms", "traced ms per call", ".2f"),
                                        ("share", "share", ".1%")])


def _main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python benchmarks/op_profile.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, type=cli.existing_file)
  parser.add_argument("--set", action="append", default=[], help="config override a.b=value (repeatable)")
  parser.add_argument("--patch", type=cli.positive_int, default=None, help="patch size (default: the largest)")
  parser.add_argument("--forward", action="store_true",
                      help="profile one full-image denoiser evaluation (the sampler's unit of work) instead")
  parser.add_argument("--batch", type=cli.positive_int, default=None, help="--forward batch (default sample.batch_size)")
  parser.add_argument("--steps", type=cli.positive_int, default=10, help="timed calls, then as many traced")
  parser.add_argument("--top", type=cli.positive_int, default=25, help="rows of the instruction and layer tables")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  config = common.load_config(str(args.config), args.set)
  cpu = common.cpu_runtime()  # before the backend starts: as patch_diffusion.main runs
  result = run(config, args.patch, args.forward, args.batch, args.steps, args.top)
  result.update(cpu_runtime=cpu, config=str(args.config), overrides=args.set, steps=args.steps)
  print_tables(result)
  name = os.path.splitext(os.path.basename(str(args.config)))[0]
  what = f"forward_b{args.batch or config.sample.batch_size}" if args.forward else f"p{args.patch or 'max'}"
  out = args.out or os.path.join(common.ROOT, "benchmarks", "results", f"op_profile_{name}_{what}.json")
  print(f"wrote {common.write_json(out, result)}")
  return 0


def main(argv=None) -> int:
  """A bad input ends in one line naming the problem (exit 1), not a traceback."""
  return cli.run(_main, argv, prog="op_profile.py")


if __name__ == "__main__":
  sys.exit(main())
