"""What the training loop does besides stepping, as objects it calls: metrics, checkpoints, preemption,
sample grids, evaluation, final samples.

The loop (``train._loop``) updates a :class:`Run` and calls, for every hook in order, ``after_step(run)``
after each step and ``on_end(run)`` once when the loop ends (by reaching the training length, or because
a hook set ``run.stop_reason``). Hooks never sync with the device unless they act on that step: device
metrics are fetched only on log and checkpoint steps, so the host runs ahead of the device otherwise.

Order matters and is fixed by ``train.default_hooks``: metrics first (a non-finite loss stops the run
before anything is saved), then preemption, checkpoints, grids, evaluation, final samples. Tests add
their own hooks (e.g. recording the examples of every step) through ``train_and_evaluate(extra_hooks=)``.
"""
from __future__ import annotations

import collections
import dataclasses
import signal
import threading
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from patch_diffusion import checkpointing
from patch_diffusion import image_grid
from patch_diffusion import parallel
from patch_diffusion import progress
from patch_diffusion import sampling
from patch_diffusion import state as state_lib
from patch_diffusion import writers


@dataclasses.dataclass
class Run:
  """A training run's mutable state: what hooks read (and, for ``stop_reason``, write).

  Attributes:
    exp: the experiment (``experiment.Experiment``).
    workdir: run directory (local path or ``gs://``).
    writer: process-0 metric writer.
    ckpt: the checkpointer of ``<workdir>/checkpoints``.
    train_iter: this process's input iterator (its position is saved in every checkpoint).
    state: the TrainState (device arrays; replaced every step).
    step: steps taken; nimg: counted images so far (host float64); total_nimg: the training length.
    resumed_from: checkpoint step the run resumed from (None for a fresh run).
    step_key: the run's base PRNG key for steps.
    plan, size, stage, local, metrics: of the step just taken: its ``patches.StepPlan``, patch size, σ
      stage (multi-stage networks; None otherwise), this host's batch (host arrays, incl. 'index' when a
      hook asked for example indices), device metrics (not fetched).
    host_seconds: host time of the step outside compiled code: input, host-to-device, dispatch.
    stop_reason: set by a hook to end the loop after this step (e.g. 'SIGTERM').
    last_metrics: the last logged scalars.
  """
  exp: Any
  workdir: str
  writer: writers.MetricWriter
  ckpt: checkpointing.Checkpointer
  train_iter: Any
  state: Any
  step: int
  nimg: float
  total_nimg: float
  resumed_from: Optional[int]
  step_key: jax.Array
  plan: Any = None
  size: int = 0
  stage: Optional[int] = None
  local: Optional[dict] = None
  metrics: Optional[dict] = None
  host_seconds: dict = dataclasses.field(default_factory=dict)
  stop_reason: str = ""
  last_metrics: dict = dataclasses.field(default_factory=dict)

  @property
  def config(self):
    return self.exp.config

  @property
  def done(self) -> bool:
    """The training length is reached (this step was the last)."""
    return self.nimg >= self.total_nimg

  def every(self, period: int) -> bool:
    """This step is a multiple of ``period`` (0 = never), not the last one (the end handles that) and the
    run is not stopping (a preemption just saved this step)."""
    return bool(period) and self.step % period == 0 and not self.done and not self.stop_reason


class Hook:
  """Base class: override what you need. ``needs_example_indices`` asks the input pipeline for the
  record indices of every example (``run.local['index']``)."""
  needs_example_indices = False

  def after_step(self, run: Run) -> None:
    pass

  def on_end(self, run: Run) -> None:
    pass


class MetricsHook(Hook):
  """Fetches device metrics on log steps (the only device sync), stops on a non-finite loss, logs
  TensorBoard scalars, ``metrics.jsonl`` and the console line with ETA."""

  def __init__(self, run: Run):
    self.every_steps = run.config.train.log_every_steps
    self.progress = progress.ProgressLogger(run.config.train.total_kimg)
    self._pending: list[tuple[int, dict]] = []   # (patch size, device metrics) not yet fetched
    self._fetched: list[tuple[int, dict]] = []   # (patch size, host metrics) not yet logged
    self._stages: list[Optional[int]] = []        # σ stage of each pending/fetched step (multi-stage)
    self._last = {"time": time.time(), "nimg": run.nimg}
    self._patches = 0
    self._host = collections.Counter()

  def after_step(self, run: Run) -> None:
    self._pending.append((run.size, run.metrics))
    self._stages.append(run.stage)
    self._patches += len(run.local["label"]) * jax.process_count()
    self._host.update(run.host_seconds)
    if run.step % self.every_steps == 0 or run.done:
      self.flush(run, log=True)

  def on_end(self, run: Run) -> None:
    if not run.stop_reason:
      self.flush(run, log=True)

  def flush(self, run: Run, log: bool) -> None:
    """Fetches pending metrics; raises FloatingPointError on a non-finite loss; logs if ``log``.

    Called on log steps and before checkpoints (so a state whose loss went non-finite is never saved).
    """
    if self._pending:
      values = jax.device_get([m for _, m in self._pending])
      for i, ((size, _), m) in enumerate(zip(self._pending, values)):
        if not np.isfinite(float(m["loss"])):
          self._stop_non_finite(run, run.step - len(self._pending) + i + 1, size)
      self._fetched += [(size, m) for (size, _), m in zip(self._pending, values)]
      self._pending = []
    if log and self._fetched:
      self._log(run)

  def _stop_non_finite(self, run: Run, bad_step: int, size: int) -> None:
    # Let an in-flight async save commit first: exiting with it pending abandons it half-written, and
    # latest_step() would name a checkpoint that never completes. Steps are 1-based like the logs.
    run.ckpt.wait()
    last = run.ckpt.latest_step()
    kept = (f"The last checkpoint ({last}) was written before it and is intact" if last is not None
            else "No checkpoint had been written yet")
    raise FloatingPointError(f"non-finite loss at step {bad_step} (patch size {size}); training stopped. "
                             f"{kept}; lower train.lr or check the data, then resume.")

  def _log(self, run: Run) -> None:
    now = time.time()
    dt = max(now - self._last["time"], 1e-9)
    dk = (run.nimg - self._last["nimg"]) / 1000
    n = len(self._fetched)
    by_size = collections.defaultdict(list)
    for size, m in self._fetched:
      by_size[size].append(float(m["loss"]))
    losses = [float(m["loss"]) for _, m in self._fetched]
    scalars = {"loss": float(np.mean(losses)), "kimg": run.nimg / 1000,
               "lr": state_lib.learning_rate(run.nimg, run.config.train, run.plan.lr_scale),
               "grad_norm": float(np.mean([float(m["grad_norm"]) for _, m in self._fetched])),
               "nonfinite_grads": float(sum(float(m["nonfinite_grads"]) for _, m in self._fetched)),
               "images_per_s": dk * 1000 / dt, "patches_per_s": self._patches / dt,
               "sec_per_kimg": dt / max(dk, 1e-9), "wall_ms_per_step": 1e3 * dt / n}
    # Host time per step spent outside compiled computation (input, host-to-device, dispatch), in ms.
    scalars.update({f"host_ms_{k}": 1e3 * self._host[k] / n for k in ("input", "h2d", "dispatch")})
    scalars.update({f"loss_{s}": float(np.mean(v)) for s, v in by_size.items()})
    scalars.update({f"frac_steps_{s}": len(v) / n for s, v in by_size.items()})
    scalars.update(_stage_scalars(self._stages[:n], losses))
    self._stages = self._stages[n:]
    run.writer.write_scalars(run.step, scalars)
    logging.info(self.progress.line(run.step, run.nimg / 1000, scalars["loss"],
                                    {s: float(np.mean(v)) for s, v in sorted(by_size.items())},
                                    scalars["images_per_s"], scalars["sec_per_kimg"],
                                    {s: len(v) for s, v in sorted(by_size.items())}))
    run.last_metrics = scalars
    self._last = {"time": now, "nimg": run.nimg}
    self._patches = 0
    self._host = collections.Counter()
    self._fetched = []


def _stage_scalars(stages: list, losses: list) -> dict:
  """``loss_stage_<k>`` and ``frac_steps_stage_<k>`` over logged steps of a multi-stage network."""
  by_stage = collections.defaultdict(list)
  for stage, loss in zip(stages, losses):
    if stage is not None:
      by_stage[stage].append(loss)
  out = {f"loss_stage_{k}": float(np.mean(v)) for k, v in by_stage.items()}
  out.update({f"frac_steps_stage_{k}": len(v) / len(losses) for k, v in by_stage.items()})
  return out


class CheckpointHook(Hook):
  """Saves (async) every ``train.checkpoint_every_steps`` and at the end, with every process's data
  position; metrics are flushed first so a state whose loss went non-finite is never saved."""

  def __init__(self, run: Run, metrics: MetricsHook):
    self.every_steps = run.config.train.checkpoint_every_steps
    self.metrics = metrics

  def save(self, run: Run, reason: str) -> None:
    self.metrics.flush(run, log=False)
    data_state = run.train_iter.get_state()
    data_state = data_state.decode() if isinstance(data_state, bytes) else data_state
    meta = {"step": run.step, "nimg": run.nimg, "data_state": parallel.allgather_json(data_state),
            "config": run.config.to_dict(), "reason": reason}
    run.ckpt.save(run.step, run.state, meta)
    logging.info("checkpoint %d (%s, %.1f kimg) saving to %s", run.step, reason, run.nimg / 1000,
                 run.ckpt.directory)

  def after_step(self, run: Run) -> None:
    if run.every(self.every_steps):
      self.save(run, "interval")

  def on_end(self, run: Run) -> None:
    if not run.stop_reason:
      self.save(run, "final")


class PreemptionHook(Hook):
  """SIGTERM (preemption, ``kill``) and SIGINT (Ctrl-C) save a checkpoint of the current step and end the
  run cleanly (exit 0). A second Ctrl-C while that happens interrupts at once (committed checkpoints stay
  intact). Multi-host: agreeing on the flag is a collective, so it happens only every
  ``train.preemption_check_every_steps`` steps; one process needs no agreement. Install with ``with``."""
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, run: Run, checkpoint: CheckpointHook):
    self.check_every = run.config.train.preemption_check_every_steps
    self.checkpoint = checkpoint
    self.requested = ""
    self._previous: dict = {}

  def __enter__(self) -> "PreemptionHook":
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt(f"second {name}: stopping without the final checkpoint")
    logging.warning("%s received: saving a checkpoint and exiting (press Ctrl-C again to stop at once)",
                    name)
    self.requested = self.requested or name

  def after_step(self, run: Run) -> None:
    if jax.process_count() > 1 and run.step % self.check_every:
      return
    if parallel.any_host(bool(self.requested)):
      self.checkpoint.save(run, "preemption")
      run.stop_reason = self.requested or "preemption"  # another host was signalled


class SampleGridHook(Hook):
  """A PNG grid (and TensorBoard image) of EMA samples every ``train.sample_every_steps`` and at the end;
  the same seed every time, so successive grids show the same noise."""

  def __init__(self, run: Run):
    tcfg = run.config.train
    self.every_steps = tcfg.sample_every_steps
    self.num = tcfg.grid_size
    self.batch = parallel.round_up(self.num, parallel.data_parallel_size(run.exp.mesh))
    self.seed = run.config.seed + 3
    self._generate = run.exp.generate_fn(self.batch)

  def write(self, run: Run) -> None:
    imgs, _ = sampling.generate_images(self._generate, run.state.variables(ema=True), num_images=self.num,
                                       batch_size=self.batch, seed=self.seed, log_every_s=1e9)
    grid = image_grid.make_grid(imgs, padding=1)
    if jax.process_index() == 0:
      path = image_grid.save_png(f"{run.workdir}/samples/grid_{run.step:08d}.png", grid)
      logging.info("wrote sample grid %s", path)
    run.writer.write_images(run.step, {"samples": grid})

  def after_step(self, run: Run) -> None:
    if run.every(self.every_steps):
      self.write(run)

  def on_end(self, run: Run) -> None:
    if not run.stop_reason:
      self.write(run)


class EvalHook(Hook):
  """FID/KID/precision-recall of the EMA network every ``eval.every_kimg`` counted kimg and at the end,
  with ``eval.train_num_samples`` images (an evaluator built once, see ``evaluation.Evaluator``)."""

  def __init__(self, run: Run, evaluator, metrics: MetricsHook):
    v = run.config.eval
    self.evaluator, self.metrics = evaluator, metrics
    self.every = v.every_kimg * 1000
    self.num_samples = v.train_num_samples
    self.seed = run.config.seed + 2
    self.next = (np.floor(run.nimg / self.every) + 1) * self.every

  def evaluate(self, run: Run) -> None:
    self.metrics.flush(run, log=False)
    t0 = time.time()
    results = self.evaluator(run.state.variables(ema=True), num_samples=self.num_samples, seed=self.seed)
    run.writer.write_scalars(run.step, {f"eval/{k}": v for k, v in results.items()} | {"kimg": run.nimg / 1000})
    logging.info("eval at %.1f kimg (%.0f s): %s", run.nimg / 1000, time.time() - t0,
                 ", ".join(f"{k} {v:.4g}" for k, v in results.items()))

  def after_step(self, run: Run) -> None:
    if run.nimg >= self.next and not run.done and not run.stop_reason:
      self.evaluate(run)
      self.next += self.every

  def on_end(self, run: Run) -> None:
    if not run.stop_reason:
      self.evaluate(run)


class FinalSamplesHook(Hook):
  """``samples.npz`` + ``samples.png`` of ``train.final_num_samples`` EMA samples after training."""

  def __init__(self, run: Run):
    self.num = run.config.train.final_num_samples
    self.seed = run.config.seed + 1

  def on_end(self, run: Run) -> None:
    if not run.stop_reason:
      exp = run.exp
      sampling.write_samples(exp.generate_fn, run.state.variables(ema=True), run.workdir, num_images=self.num,
                             seed=self.seed, batch_size=run.config.sample.batch_size, mesh=exp.mesh,
                             with_labels=exp.num_classes > 0)
