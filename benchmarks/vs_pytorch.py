"""Side by side with the official PyTorch code: train step per patch size, mixed schedule, sampler.

One run times both sides, alternating: two worker processes (this project's JAX step; the official
``Patch_EDMPrecond`` + ``SongUNet`` + ``Patch_EDMLoss`` step, driven as in ``training/training_loop.py``)
built for the same network, image size, batch and patch sizes (batch multiplier included: R/4 runs 4×
the batch, R/2 2×, R 1×), then asked in turn for a few timed steps, round after round, so that load from
other work on the machine falls on both. Also the two samplers: 18 deterministic Heun steps (the
official ``edm_sampler`` loop without churn, float64 state as it has it; ours float32, one jitted
``fori_loop``), same batch. Reports medians, ours/theirs ratios per patch size and for the mixed schedule
(Σ p_s · median_s with the schedule's p, [0.2, 0.3, 0.5] at real_p 0.5), writes
``benchmarks/results/vs_pytorch_<config>.json`` and prints Markdown tables.

  python benchmarks/vs_pytorch.py --config configs/digits.py --official_dir /path/to/Patch-Diffusion
  python benchmarks/vs_pytorch.py --config configs/celeba64.py --set train.batch_size=8 --rounds 3 \\
      --steps 1 --no_sample

The PyTorch side needs ``torch`` (a CPU build: pip install 'torch==2.13.0+cpu' --index-url
https://download.pytorch.org/whl/cpu), the official code's imports (requests psutil click) and a checkout
of github.com/Zhendong-Wang/Patch-Diffusion (``--official_dir``, default ``$PD_OFFICIAL_DIR``). torch is a
benchmark aid only, never a dependency of the package or its tests; without it (or the checkout) the
benchmark says so in one line and measures this project's side alone.

Both workers use every core (torch.set_num_threads(os.cpu_count()); XLA's default pool). Our worker
applies this project's CPU runtime defaults, as ``patch_diffusion.main`` does (``benchmarks/common.py``
``cpu_runtime``: the host allocator setting, synchronous dispatch, one CPU device —
``PATCH_DIFFUSION_CPU_DEVICES=n`` splits it into n); the official worker runs with the allocator it has
by default.

**Ceiling.** Both workers also time a dense 2048×2048 float32 matmul (``jnp.dot`` / ``torch.mm``, all cores)
in the same window: the machine's practical float32 peak. The step's and the sampler's floating-point work
is XLA's count of our compiled programs (``cost_analysis``; the same network's arithmetic as the official
code's), so each side's GFLOP/s and its fraction of that peak are printed, with the rate a target ratio
(``--target_ratio``, default 0.67) would need from us: above the peak, no schedule of the same float32
arithmetic reaches it on this machine.

**Convolution floor.** Our worker also rebuilds every top-level convolution of each compiled step and of
one sampler evaluation from the HLO and times each alone (``op_profile.py``): the sum is what our program
would cost if everything but its convolutions were free, with XLA's convolution kernels. The tables print
it next to the time the target ratio allows.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROTOCOL_PREFIX = "@@"
PEAK_N = 2048  # the dense matmul that measures the machine's float32 rate

# ------------------------------------------------------------------------------------------------
# Workers: each reads one JSON command per line on stdin and answers one line on the original stdout.


def _serve(handlers: dict) -> None:
  """Command loop of a worker; library prints go to stderr so stdout carries the protocol only."""
  proto = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "quit":
      break
    try:
      reply = handlers[cmd["cmd"]](**{k: v for k, v in cmd.items() if k != "cmd"})
    except Exception as e:  # pylint: disable=broad-except
      reply = {"error": f"{type(e).__name__}: {e}"}
    proto.write(PROTOCOL_PREFIX + json.dumps(reply) + "\n")


def _timed(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def _xla_flops(compiled) -> float:
  """Floating-point operations of one call of a compiled JAX program (XLA's cost analysis)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _convolutions_alone_ms(compiled) -> float:
  """Milliseconds of a compiled program's top-level convolutions, each timed alone (``op_profile``): the
  program's cost if everything but its convolutions were free, with XLA's convolution kernels."""
  import op_profile  # pylint: disable=g-import-not-at-top
  text = compiled.as_text()
  convs = op_profile.convolutions(text, op_profile.hlo_instructions(text))
  op_profile.time_convolutions(convs)
  return sum(c["isolated_ms"] for c in convs)


def jax_worker(args) -> None:
  """This project's compiled train steps (one per patch size) and sampler."""
  sys.path.insert(0, ROOT)
  sys.path.insert(0, HERE)
  import common  # pylint: disable=g-import-not-at-top
  config = common.load_config(args.config, args.set)
  cpu = common.cpu_runtime()  # before the backend starts: as patch_diffusion.main runs
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from patch_diffusion import experiment, parallel, train  # pylint: disable=g-import-not-at-top
  from patch_diffusion import state as state_lib  # pylint: disable=g-import-not-at-top
  from patch_diffusion.edm import sampler as sampler_lib  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_threefry_partitionable", True)
  exp = experiment.build_experiment(config, check_data=False)
  holder = {}
  key = jax.random.key(1)

  def setup():
    t0 = time.perf_counter()
    state = jax.device_put(state_lib.create_train_state(exp.init_variables(jax.random.key(0)), exp.tx),
                           parallel.replicated(exp.mesh))
    if exp.stages is not None:
      raise SystemExit("vs_pytorch compares single-decoder networks only (the official code has no stages)")
    # One executable per (patch size, batch multiplier); the schedule has one multiplier per size.
    compiled = {variant[0]: exe for variant, exe in
                train.compile_steps(exp, state, key, config.train.batch_size).items()}
    rng = np.random.default_rng(0)
    sched = exp.schedule
    batches = {}
    for size, mul in zip(sched.sizes, sched.batch_muls):
      n = config.train.batch_size * mul
      batches[size] = parallel.global_batch({
          "image": rng.integers(0, 256, (n, exp.resolution, exp.resolution, exp.channels), dtype=np.uint8),
          "label": rng.integers(0, max(exp.num_classes, 1), (n,)).astype(np.int32)}, exp.mesh)
    holder.update(state=state, compiled=compiled, batches=batches, generate={})
    return {"params": state_lib.param_count(state.params), "setup_s": time.perf_counter() - t0,
            "sizes": list(compiled), "host_allocator_retained": cpu["host_allocator_retained"],
            "cpu_devices": jax.device_count(), "xla_flags_added": cpu["xla_flags_added"],
            "sync_dispatch": cpu["sync_dispatch"],
            # Per-device program x devices: the data-parallel step's whole floating-point work.
            "step_flops": {str(s): _xla_flops(exe) * jax.device_count() for s, exe in compiled.items()},
            "step_convolutions_alone_ms": {str(s): _convolutions_alone_ms(exe) for s, exe in compiled.items()},
            "forward_flops_per_image": _xla_flops(compiled_forward(8)) / 8,
            "jax": jax.__version__, "device": jax.devices()[0].device_kind}

  def compiled_forward(n):
    """One full-image evaluation of the EMA denoiser at batch n (the sampler's unit of work), compiled."""
    import op_profile  # pylint: disable=g-import-not-at-top
    return op_profile.compiled_denoiser_forward(exp, jax.device_get(holder["state"].variables(ema=True)), n)[0]

  def peak(n, reps):
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), jax.devices()[0])
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, a))
    return {"times": _timed(lambda: jax.block_until_ready(dot(a, a)), reps)}

  def train_steps(size, steps):
    exe, batch = holder["compiled"][int(size)], holder["batches"][int(size)]
    lr, beta = np.float32(config.train.lr), np.float32(0.999)

    def one():
      holder["state"], metrics = exe(holder["state"], batch, lr, beta, key)
      jax.block_until_ready(metrics)

    return {"times": _timed(one, steps)}

  def sample(batch, reps, warmup=1):
    batch = int(batch)
    if batch not in holder["generate"]:
      settings = sampler_lib.SamplerSettings(num_steps=args.sample_steps)
      fn = exp.generate_fn(batch, settings)
      t0 = time.perf_counter()
      jax.block_until_ready(fn(holder["state"].variables(ema=True), key, 0))
      first_s = time.perf_counter() - t0
      # The sampler's convolutions alone: one evaluation's at this batch, × evaluations (once per batch).
      conv_s = _convolutions_alone_ms(compiled_forward(batch)) * (2 * args.sample_steps - 1) / 1e3
      holder["generate"][batch] = (fn, first_s, conv_s)
    fn, first_s, conv_s = holder["generate"][batch]
    variables = holder["state"].variables(ema=True)
    for _ in range(warmup - 1):
      jax.block_until_ready(fn(variables, key, 0))
    return {"times": _timed(lambda: jax.block_until_ready(fn(variables, key, 0)), reps),
            "first_call_s": first_s, "convolutions_alone_s": conv_s}

  _serve({"setup": setup, "train": train_steps, "sample": sample, "peak": peak})


def torch_worker(args) -> None:
  """The official code: ``Patch_EDMPrecond(SongUNet)`` + ``Patch_EDMLoss`` + Adam, float64 Heun sampler."""
  sys.path.insert(0, args.official_dir)
  sys.path.insert(0, HERE)
  import common  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from training.networks import Patch_EDMPrecond  # pylint: disable=g-import-not-at-top
  from training.patch_loss import Patch_EDMLoss  # pylint: disable=g-import-not-at-top

  config = common.load_config(args.config, args.set)
  sched = _schedule(config)
  torch.set_num_threads(args.threads or os.cpu_count())
  torch.manual_seed(0)
  m = config.model
  if m.arch != "ddpmpp" or m.encoder_type != "standard" or m.decoder_type != "standard":
    raise SystemExit("vs_pytorch drives the official SongUNet with the DDPM++ settings only")
  R, C = config.data.resolution, config.data.num_channels
  net = Patch_EDMPrecond(
      img_resolution=R, img_channels=C + 2, out_channels=C, model_type="SongUNet",
      embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
      resample_filter=[1, 1], model_channels=m.model_channels, channel_mult=list(m.channel_mult),
      num_blocks=m.num_blocks, attn_resolutions=list(m.attn_resolutions), dropout=m.dropout).train()
  opt = torch.optim.Adam(net.parameters(), lr=config.train.lr, betas=(0.9, 0.999), eps=1e-8)
  loss_fn = Patch_EDMLoss()
  B = config.train.batch_size
  images = {s: torch.rand(B * mul, C, R, R) * 2 - 1 for s, mul in zip(sched["sizes"], sched["batch_muls"])}

  def setup():
    return {"params": sum(p.numel() for p in net.parameters()), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "sizes": sched["sizes"]}

  def train_steps(size, steps):
    size = int(size)
    x = images[size]
    n = x.shape[0]

    def one():  # training_loop.py, one round of accumulation
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(net=net, images=x, patch_size=size, resolution=R)
      loss.sum().mul(1 / n).backward()
      for p in net.parameters():
        if p.grad is not None:
          torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
      opt.step()

    net.train().requires_grad_(True)
    return {"times": _timed(one, steps)}

  def sample(batch, reps, warmup=1):
    batch = int(batch)
    net.eval().requires_grad_(False)
    num_steps, sigma_min, sigma_max, rho = args.sample_steps, 0.002, 80.0, 7.0
    idx = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + idx / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    xs = torch.arange(R, dtype=torch.float64)
    pos = (torch.stack([xs.view(1, -1).repeat(R, 1), xs.view(-1, 1).repeat(1, R)]) / (R - 1) - 0.5) * 2
    pos = pos.unsqueeze(0).repeat(batch, 1, 1, 1)

    def one():  # generate.py edm_sampler, S_churn = 0
      with torch.no_grad():
        x_next = torch.randn(batch, C, R, R, dtype=torch.float64) * t_steps[0]
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
          x_hat, t_hat = x_next, t_cur
          d_cur = (x_hat - net(x_hat, t_hat, pos).to(torch.float64)) / t_hat
          x_next = x_hat + (t_next - t_hat) * d_cur
          if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, pos).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

    for _ in range(warmup):
      one()
    return {"times": _timed(one, reps)}

  def peak(n, reps):
    a = torch.randn(int(n), int(n), dtype=torch.float32)
    torch.mm(a, a)
    return {"times": _timed(lambda: torch.mm(a, a), reps)}

  _serve({"setup": setup, "train": train_steps, "sample": sample, "peak": peak})


# ------------------------------------------------------------------------------------------------
# Orchestrator.


def _schedule(config) -> dict:
  """Patch sizes, batch multipliers and probabilities of the config's schedule (no JAX needed)."""
  sys.path.insert(0, ROOT)
  from patch_diffusion.data import patches  # pylint: disable=g-import-not-at-top
  sched = patches.PatchSchedule(config.data.resolution, config.patch.schedule, config.patch.real_p,
                                config.patch.latent, config.seed)
  return {"sizes": list(sched.sizes), "batch_muls": list(sched.batch_muls),
          "probabilities": list(sched.probabilities)}


class Worker:
  """A worker subprocess speaking the line protocol."""

  def __init__(self, kind: str, argv: list[str]):
    self.kind = kind
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", kind] + argv,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

  def call(self, cmd: str, **kw) -> dict:
    self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
    self.proc.stdin.flush()
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f"{self.kind} worker exited (code {self.proc.wait()}); see its messages above")
      if line.startswith(PROTOCOL_PREFIX):
        reply = json.loads(line[len(PROTOCOL_PREFIX):])
        if "error" in reply:
          raise RuntimeError(f"{self.kind} worker: {reply['error']}")
        return reply

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.flush()
    except (BrokenPipeError, OSError):
      pass
    self.proc.wait(timeout=60)


def torch_missing(official_dir: str | None) -> str | None:
  """None when the PyTorch side can run, else the one-line reason and fix."""
  if importlib.util.find_spec("torch") is None:
    return ("torch is not installed — PyTorch side skipped; fix: pip install 'torch==2.13.0+cpu' "
            "requests psutil click --index-url https://download.pytorch.org/whl/cpu")
  if not official_dir or not os.path.isfile(os.path.join(official_dir, "training", "networks.py")):
    return (f"no checkout of the official code at {official_dir!r} — PyTorch side skipped; fix: pass "
            "--official_dir (or set PD_OFFICIAL_DIR) to a checkout of github.com/Zhendong-Wang/Patch-Diffusion")
  missing = [m for m in ("click", "psutil", "requests") if importlib.util.find_spec(m) is None]
  if missing:
    return f"the official code needs {', '.join(missing)} — PyTorch side skipped; fix: pip install {' '.join(missing)}"
  return None


def _median_ms(times: list[float]) -> float:
  return statistics.median(times) * 1e3


def run(args) -> dict:
  sys.path.insert(0, HERE)
  import common  # pylint: disable=g-import-not-at-top
  config = common.load_config(args.config, args.set)
  sched = _schedule(config)
  sizes = [s for s in sched["sizes"] if not args.sizes or str(s) in args.sizes.split(",")]
  prob = dict(zip(sched["sizes"], sched["probabilities"]))
  mul = dict(zip(sched["sizes"], sched["batch_muls"]))
  reason = torch_missing(args.official_dir)
  if reason:
    print(reason, flush=True)
  passthrough = ["--config", args.config, "--sample_steps", str(args.sample_steps)]
  for item in args.set:
    passthrough += ["--set", item]
  if args.threads:
    passthrough += ["--threads", str(args.threads)]
  load_before = os.getloadavg()
  workers = {"ours": Worker("jax", passthrough)}
  if not reason:
    workers["theirs"] = Worker("torch", passthrough + ["--official_dir", args.official_dir])
  try:
    info = {name: w.call("setup") for name, w in workers.items()}
    print(f"# setup: {json.dumps(info)}", flush=True)
    train_times = {name: {s: [] for s in sizes} for name in workers}
    for r in range(args.rounds):
      for s in sizes:
        order = list(workers) if r % 2 == 0 else list(workers)[::-1]
        for name in order:
          if r == 0:
            workers[name].call("train", size=s, steps=args.warmup)  # warm-up (first calls, caches)
          train_times[name][s] += workers[name].call("train", size=s, steps=args.steps)["times"]
          time.sleep(args.pause)  # let the other side's spinning worker threads go idle
      print(f"# round {r + 1}/{args.rounds}: " + "; ".join(
          f"{name} " + " ".join(f"{s}:{_median_ms(t[s]):.0f}ms" for s in sizes)
          for name, t in train_times.items()), flush=True)
    peak_times = {name: [] for name in workers}
    for r in range(3):
      for name in (list(workers) if r % 2 == 0 else list(workers)[::-1]):
        peak_times[name] += workers[name].call("peak", n=PEAK_N, reps=3)["times"]
    sample_rows = []
    if args.sample_batch:
      sample_times = {name: [] for name in workers}
      conv_alone = {}
      for r in range(args.sample_rounds):
        order = list(workers) if r % 2 == 0 else list(workers)[::-1]
        for name in order:
          reply = workers[name].call("sample", batch=args.sample_batch, reps=1, warmup=1 if r == 0 else 0)
          sample_times[name] += reply["times"]
          conv_alone[name] = reply.get("convolutions_alone_s")
          time.sleep(args.pause)
      for name, t in sample_times.items():
        sample_rows.append({"side": name, "batch": args.sample_batch, "median_s": statistics.median(t),
                            "images_per_s": args.sample_batch / statistics.median(t), "times": t,
                            "convolutions_alone_s": conv_alone[name]})
      for b in [int(b) for b in args.our_sample_batches.split(",") if b]:
        if b == args.sample_batch:
          continue
        reply = workers["ours"].call("sample", batch=b, reps=args.sample_rounds)
        t = reply["times"]
        sample_rows.append({"side": "ours", "batch": b, "median_s": statistics.median(t),
                            "images_per_s": b / statistics.median(t), "times": t,
                            "convolutions_alone_s": reply["convolutions_alone_s"]})
  finally:
    for w in workers.values():
      w.close()
  flops = {int(k): v for k, v in info["ours"]["step_flops"].items()}
  conv_ms = {int(k): v for k, v in info["ours"]["step_convolutions_alone_ms"].items()}
  peak = {name: 2 * PEAK_N ** 3 / statistics.median(t) / 1e9 for name, t in peak_times.items()}
  fwd_flops = info["ours"]["forward_flops_per_image"]
  nfe = 2 * args.sample_steps - 1  # Heun: two evaluations per step, Euler on the last
  for row in sample_rows:
    row["gflops_per_s"] = row["images_per_s"] * nfe * fwd_flops / 1e9
  rows = []
  for s in sizes:
    row = {"patch": s, "batch": config.train.batch_size * mul[s], "probability": prob[s],
           "gflop": flops[s] / 1e9, "ours_convolutions_alone_ms": conv_ms[s]}
    for name in workers:
      row[f"{name}_ms"] = _median_ms(train_times[name][s])
      row[f"{name}_times_ms"] = [t * 1e3 for t in train_times[name][s]]
      row[f"{name}_gflops_per_s"] = flops[s] / 1e6 / row[f"{name}_ms"]
    if "theirs" in workers:
      row["ratio"] = row["ours_ms"] / row["theirs_ms"]
    rows.append(row)
  result = {"config": args.config, "overrides": args.set, "machine": _machine(), "setup": info,
            "rounds": args.rounds, "steps_per_round": args.steps, "load_before": load_before,
            "load_after": os.getloadavg(), "torch_skipped": reason, "rows": rows, "sampler": sample_rows,
            "matmul_peak_gflops_per_s": peak, "target_ratio": args.target_ratio,
            "sampler_flops_per_image": nfe * fwd_flops, "sample_steps": args.sample_steps,
            "official_dir": args.official_dir, "official_commit": _git_head(args.official_dir)}
  if set(sizes) == set(sched["sizes"]):
    mixed = {name: sum(prob[s] * r[f"{name}_ms"] for s, r in zip(sizes, rows)) for name in workers}
    mixed_flops = sum(prob[s] * flops[s] for s in sizes)
    result["mixed"] = {f"{name}_ms": v for name, v in mixed.items()} | {
        "gflop": mixed_flops / 1e9, "ours_convolutions_alone_ms": sum(prob[s] * conv_ms[s] for s in sizes)}
    for name, v in mixed.items():
      result["mixed"][f"{name}_gflops_per_s"] = mixed_flops / 1e6 / v
    if "theirs" in mixed:
      result["mixed"]["ratio"] = mixed["ours"] / mixed["theirs"]
      # The rate our step would need for the target ratio, against this window's matmul peak.
      result["mixed"]["target_needs_gflops_per_s"] = mixed_flops / 1e6 / (args.target_ratio * mixed["theirs"])
  return result


def _machine() -> dict:
  import platform  # pylint: disable=g-import-not-at-top
  if HERE not in sys.path:
    sys.path.insert(0, HERE)
  import common  # pylint: disable=g-import-not-at-top
  return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "host": platform.node(),
          **common.cpu_description()}


def _git_head(path: str | None) -> str | None:
  if not path:
    return None
  try:
    return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def print_tables(result: dict) -> None:
  both = not result["torch_skipped"]
  print(f"\n# {result['config']} {' '.join(result['overrides'])}: load average before "
        f"{result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}; "
        f"{result['rounds']} rounds x {result['steps_per_round']} steps per side and size")
  head = "| patch | batch | p | GFLOP | ours median ms | ours GFLOP/s | ours: convolutions alone ms |" + (
      " PyTorch median ms | PyTorch GFLOP/s | ours / PyTorch |" if both else "")
  print(head)
  print("|" + "---|" * (head.count("|") - 1))
  for r in result["rows"]:
    line = (f"| {r['patch']} | {r['batch']} | {r['probability']:.2f} | {r['gflop']:.1f} | {r['ours_ms']:.1f} |"
            f" {r['ours_gflops_per_s']:.1f} | {r['ours_convolutions_alone_ms']:.1f} |")
    if both:
      line += f" {r['theirs_ms']:.1f} | {r['theirs_gflops_per_s']:.1f} | {r['ratio']:.2f} |"
    print(line)
  if "mixed" in result:
    m = result["mixed"]
    line = (f"| mixed (Σ p·median) | | | {m['gflop']:.1f} | {m['ours_ms']:.1f} | {m['ours_gflops_per_s']:.1f} |"
            f" {m['ours_convolutions_alone_ms']:.1f} |")
    if both:
      line += f" {m['theirs_ms']:.1f} | {m['theirs_gflops_per_s']:.1f} | **{m['ratio']:.2f}** |"
    print(line)
  peak = result["matmul_peak_gflops_per_s"]
  print(f"\ndense float32 matmul {PEAK_N}x{PEAK_N}, same window: "
        + ", ".join(f"{'ours (XLA)' if k == 'ours' else 'PyTorch'} {v:.1f} GFLOP/s" for k, v in peak.items()))
  if "mixed" in result:
    m, top = result["mixed"], max(peak.values())
    line = f"mixed step: ours {m['ours_gflops_per_s'] / top:.0%} of the faster matmul"
    if both:
      line += (f", PyTorch {m['theirs_gflops_per_s'] / top:.0%}; ratio {result['target_ratio']} would need ours at "
               f"{m['target_needs_gflops_per_s']:.1f} GFLOP/s = {m['target_needs_gflops_per_s'] / top:.2f}x that peak")
    print(line)
    if both:
      goal = result["target_ratio"] * m["theirs_ms"]
      print(f"floor with XLA's convolution kernels: our step's convolutions, each timed alone, take "
            f"{m['ours_convolutions_alone_ms']:.1f} ms (mixed); ratio {result['target_ratio']} needs the whole step in "
            f"{goal:.1f} ms, {goal / m['ours_convolutions_alone_ms']:.2f}x that")
  if result["sampler"]:
    print(f"\n| sampler ({result['sample_steps']} Heun steps) | batch | median s | images/s | GFLOP/s |")
    print("|---|---|---|---|---|")
    for r in result["sampler"]:
      who = "ours (float32)" if r["side"] == "ours" else "PyTorch (float64 state)"
      print(f"| {who} | {r['batch']} | {r['median_s']:.2f} | {r['images_per_s']:.1f} | {r['gflops_per_s']:.1f} |")
    ours = [r for r in result["sampler"] if r["side"] == "ours"]
    theirs = [r for r in result["sampler"] if r["side"] == "theirs"]
    if ours and theirs:
      same = [r for r in ours if r["batch"] == theirs[0]["batch"]][0]
      best = max(ours, key=lambda r: r["images_per_s"])
      print(f"\nsampler images/s ours / PyTorch at batch {same['batch']}: "
            f"{same['images_per_s'] / theirs[0]['images_per_s']:.2f}x; our best batch {best['batch']}: "
            f"{best['images_per_s'] / theirs[0]['images_per_s']:.2f}x; 2x would need "
            f"{2 * theirs[0]['gflops_per_s']:.1f} GFLOP/s = {2 * theirs[0]['gflops_per_s'] / max(peak.values()):.2f}x "
            f"the matmul peak")
      if same.get("convolutions_alone_s"):
        print(f"floor with XLA's convolution kernels: the sampler's convolutions alone take "
              f"{same['convolutions_alone_s']:.2f} s at batch {same['batch']}; 2x PyTorch's images/s needs the "
              f"whole batch in {theirs[0]['median_s'] / 2:.2f} s")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--set", action="append", default=[], help="config override a.b=value (repeatable)")
  parser.add_argument("--official_dir", default=os.environ.get("PD_OFFICIAL_DIR"),
                      help="checkout of github.com/Zhendong-Wang/Patch-Diffusion (default $PD_OFFICIAL_DIR)")
  parser.add_argument("--sizes", default="", help="comma-separated patch sizes (default: all of the schedule)")
  parser.add_argument("--rounds", type=int, default=5, help="alternation rounds")
  parser.add_argument("--steps", type=int, default=2, help="timed steps per side, size and round")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side and size (first round)")
  parser.add_argument("--pause", type=float, default=0.5, help="seconds between sides")
  parser.add_argument("--sample_batch", type=int, default=None,
                      help="sampler batch, both sides (default config.sample.batch_size; 0 skips the sampler)")
  parser.add_argument("--no_sample", action="store_true")
  parser.add_argument("--sample_rounds", type=int, default=3)
  parser.add_argument("--sample_steps", type=int, default=18)
  parser.add_argument("--our_sample_batches", default="",
                      help="further batch sizes for our sampler alone, e.g. 125,250,1000 (best batch)")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
  parser.add_argument("--target_ratio", type=float, default=0.67,
                      help="ours/PyTorch step-time goal whose required GFLOP/s the ceiling table shows")
  parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.worker == "jax":
    jax_worker(args)
    return 0
  if args.worker == "torch":
    torch_worker(args)
    return 0
  if args.sample_batch is None:
    sys.path.insert(0, HERE)
    import common  # pylint: disable=g-import-not-at-top
    args.sample_batch = int(common.load_config(args.config, args.set).sample.batch_size)
  if args.no_sample:
    args.sample_batch = 0
  result = run(args)
  name = os.path.splitext(os.path.basename(args.config))[0]
  out = args.out or os.path.join(ROOT, "benchmarks", "results", f"vs_pytorch_{name}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print_tables(result)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
