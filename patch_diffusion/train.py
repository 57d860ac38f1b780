"""Training orchestration: mesh, state, data, one compiled step per patch size, the loop and its hooks.

``train_and_evaluate(config, workdir)`` is the entry point for the command line and for notebooks. Per
step the host picks the patch size from the schedule (identical on every host), pulls ``batch_mul`` host
batches of full-resolution images, assembles the global batch and calls that size's executable. Nothing
is fetched from the device except on log/checkpoint steps.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from patch_diffusion import checkpointing
from patch_diffusion import image_grid
from patch_diffusion import metrics as metrics_lib
from patch_diffusion import parallel
from patch_diffusion import run_lock
from patch_diffusion import sampling
from patch_diffusion import state as state_lib
from patch_diffusion import steps as steps_lib
from patch_diffusion.config_validation import validate_config
from patch_diffusion.data import datasets
from patch_diffusion.data import input_pipeline
from patch_diffusion.data import patches as patches_lib
from patch_diffusion.edm import loss as loss_lib
from patch_diffusion.edm import precond as precond_lib
from patch_diffusion.edm import sampler as sampler_lib
from patch_diffusion import models

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Experiment:
  """The pieces a run is built from (no state): what `train`, `sample` and `eval` share."""
  config: ml_collections.ConfigDict
  mesh: Any
  info: Any                    # datasets.DatasetInfo
  model: Any                   # flax module
  precond: Any
  noise_dist: Any
  schedule: patches_lib.PatchSchedule
  tx: Any
  dtype: Any
  source: Any = None           # the opened data source (None when no data is read)

  @property
  def resolution(self) -> int:
    return self.config.data.resolution

  @property
  def channels(self) -> int:
    return self.config.data.num_channels

  @property
  def num_classes(self) -> int:
    return self.info.num_classes

  def init_variables(self, key: jax.Array) -> dict:
    """Fresh network variables (float32), replicated on the mesh."""
    return jax.device_put(models.init_params(self.model, key), parallel.replicated(self.mesh))

  def generate_fn(self, batch_size: int, settings: sampler_lib.SamplerSettings | None = None):
    settings = settings or sampler_lib.SamplerSettings.from_config(self.config.sample)
    return sampling.make_generate_fn(
        self.model.apply, self.precond, settings, resolution=self.resolution, channels=self.channels,
        num_classes=self.num_classes, batch_size=batch_size, mesh=self.mesh, dtype=self.dtype,
        quantize=not self.config.patch.latent)  # latents are not images: keep them float


def build_experiment(config: ml_collections.ConfigDict, *, check_data: bool = True) -> Experiment:
  """Validates the config and builds mesh, dataset info, network and losses. Fails before compiling."""
  validate_config(config)
  # Process-wide, like the threefry setting: every executable of the run traces with this precision.
  precision = config.model.get("matmul_precision", "default")
  jax.config.update("jax_default_matmul_precision", None if precision == "default" else precision)
  mesh = parallel.create_mesh(config.mesh.shape, config.mesh.axes)
  n_data = parallel.data_parallel_size(mesh)
  if config.train.batch_size % n_data:
    raise ValueError(f"train.batch_size = {config.train.batch_size} is not divisible by the {n_data} "
                     f"data-parallel devices; use a multiple of {n_data}")
  if config.train.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size = {config.train.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  source = None
  if check_data:
    source, info = datasets.get_data_source(config.data)
  else:
    info = datasets.DatasetInfo(name=config.data.name, num_examples=0, resolution=config.data.resolution,
                                num_channels=config.data.num_channels,
                                num_classes=config.data.get("num_classes", 0) if config.data.use_labels else 0,
                                description="(not loaded)")
  dtype = DTYPES[config.model.dtype]
  model = models.create_model(config.model, img_resolution=config.data.resolution,
                              img_channels=config.data.num_channels, label_dim=info.num_classes)
  schedule = patches_lib.PatchSchedule(config.data.resolution, config.patch.schedule, config.patch.real_p,
                                       config.patch.latent, config.seed)
  precond = precond_lib.get_precond(config.edm.precond, config.edm.sigma_data)
  noise = loss_lib.get_noise_distribution(config.edm.precond, P_mean=config.edm.P_mean,
                                          P_std=config.edm.P_std, sigma_data=config.edm.sigma_data)
  return Experiment(config=config, mesh=mesh, info=info, model=model, precond=precond, noise_dist=noise,
                    schedule=schedule, tx=state_lib.make_optimizer(config.train), dtype=dtype,
                    source=source)


def compile_steps(exp: Experiment, state: state_lib.TrainState, base_key: jax.Array,
                  local_batch: int, lower_only: bool = False) -> dict[int, Callable]:
  """Ahead-of-time compiles one donated, sharded train step per patch size; logs compile times.

  Tracing and lowering run in turn (they hold the GIL); the XLA compilations run in parallel threads.
  Sizes the schedule never draws (e.g. real_p = 1) are skipped. ``lower_only`` returns the lowered (not
  yet compiled) computations, e.g. for backend-independent FLOP counts.
  """
  mesh = exp.mesh
  rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  state_sharding = jax.tree.map(lambda _: rep, state)
  r, c = exp.resolution, exp.channels
  lowered = {}
  for size, mul, prob in zip(exp.schedule.sizes, exp.schedule.batch_muls, exp.schedule.probabilities):
    if prob == 0:
      continue
    step_fn = steps_lib.make_train_step(
        exp.model.apply, exp.tx, exp.precond, exp.noise_dist,
        steps_lib.StepConfig(patch_size=size, resolution=r, num_classes=exp.num_classes,
                             label_dropout=exp.config.edm.label_dropout, compute_dtype=exp.dtype))
    n = local_batch * mul * jax.process_count()
    batch = {"image": jax.ShapeDtypeStruct((n, r, r, c), jnp.uint8, sharding=data),
             "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=data)}
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    jitted = jax.jit(step_fn, in_shardings=(state_sharding, data, rep, rep, rep),
                     out_shardings=(state_sharding, rep), donate_argnums=(0,))
    lowered[size] = (n, jitted.lower(state, batch, scalar, scalar, base_key))

  if lower_only:
    return {size: low for size, (_, low) in lowered.items()}

  def compile_one(item):
    size, (n, low) = item
    t0 = time.time()
    exe = low.compile()
    logging.info("compiled train step for patch %dx%d (global batch %d): %.1f s", size, size, n,
                 time.time() - t0)
    return size, exe

  t0 = time.time()
  with concurrent.futures.ThreadPoolExecutor(max_workers=len(lowered)) as pool:
    compiled = dict(pool.map(compile_one, lowered.items()))
  logging.info("compiled %d train steps in %.1f s", len(compiled), time.time() - t0)
  return compiled


class _Preemption:
  """Turns SIGTERM (preemption, ``kill``) and SIGINT (Ctrl-C) into a flag the loop polls: it saves a
  checkpoint and exits cleanly. A second Ctrl-C while that happens interrupts at once (the checkpoints
  already committed stay intact)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name = ""
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt(f"second {name}: stopping without the final checkpoint")
    logging.warning("%s received: saving a checkpoint and exiting (press Ctrl-C again to stop at once)",
                    name)
    self.requested = True
    self.signal_name = self.signal_name or name

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}


def _concat_batches(batches: list[dict]) -> dict:
  if len(batches) == 1:
    return batches[0]
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


class _DebugLog:
  """``train.debug_log_sizes``: what this process fed each step, for tests of multi-process runs.

  Appends JSON lines to ``<workdir>/sizes_process_<i>.jsonl`` (process-local, local file system only):
  ``{"step", "size", "indices"}`` per step (0-based step index, patch size, the record indices of this
  process's local batch in order) and, after the last step, ``{"final_step", "params_sha256",
  "state_sha256"}``: SHA-256 of the parameters (of the whole TrainState) per local device id (replicated:
  all must agree, on every process).
  """

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._file = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(os.path.join(workdir, f"sizes_process_{jax.process_index()}.jsonl"), "a")

  def _write(self, record: dict) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def step(self, step: int, size: int, local: dict) -> None:
    if self.enabled:
      self._write({"step": step, "size": int(size), "indices": np.asarray(local["index"]).tolist()})

  def final(self, step: int, state: Any) -> None:
    if not self.enabled:
      return
    record = {"final_step": step}
    for name, tree in (("params_sha256", state.params), ("state_sha256", state)):
      digests = collections.defaultdict(hashlib.sha256)  # one per local device
      for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
          digests[shard.device.id].update(np.ascontiguousarray(np.asarray(shard.data)).tobytes())
      record[name] = {str(d): h.hexdigest() for d, h in sorted(digests.items())}
    self._write(record)
    self._file.close()
    self.enabled = False


def _json_state(data_state):
  return data_state.decode() if isinstance(data_state, bytes) else data_state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the configured model in ``workdir``; returns the last logged metrics.

  Writes ``workdir/checkpoints`` (Orbax), ``workdir/tb`` (TensorBoard), ``workdir/metrics.jsonl``,
  ``workdir/samples/grid_<step>.png`` and, if ``train.final_num_samples`` > 0, ``workdir/samples.npz``.
  """
  jax.config.update("jax_threefry_partitionable", True)
  exp = build_experiment(config)
  if config.eval.every_kimg > 0:
    # In-training eval needs the Inception weights and pixel-space samples: fail now, not after training.
    from patch_diffusion.evaluation import run_eval as eval_lib  # pylint: disable=g-import-not-at-top
    eval_lib.check_evaluable(config)
    eval_lib.inception_weights_path(config)
  parallel.assert_same_on_all_hosts(config.to_dict(), "the config")
  tcfg = config.train
  # An unwritable, read-only or full workdir fails here with the fix in the message, before anything
  # is written (the writer below would fail with a bare OSError). Process 0 writes logs and metadata.
  if jax.process_index() == 0:
    checkpointing.ensure_writable(workdir)
  # One training process per workdir: a second one would race on the checkpoints.
  with run_lock.acquire_for_run(workdir):
    return _train_locked(config, workdir, exp)


def _train_locked(config: ml_collections.ConfigDict, workdir: str, exp: Experiment) -> dict:
  tcfg = config.train
  writer = metrics_lib.MetricWriter(workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tcfg.keep_checkpoints)
  logging.info("dataset %s: %d images, %dx%dx%d, %d classes", exp.info.name, exp.info.num_examples,
               exp.resolution, exp.resolution, exp.channels, exp.num_classes)

  base_key = jax.random.key(config.seed)
  k_init, k_train = jax.random.split(base_key, 2)
  variables = exp.init_variables(k_init)
  if tcfg.get("init_from"):
    variables = _load_init(tcfg.init_from, variables, exp.mesh)
  state = jax.device_put(state_lib.create_train_state(variables, exp.tx), parallel.replicated(exp.mesh))
  logging.info("network %s: %.2f M parameters", config.model.arch,
               state_lib.param_count(state.params) / 1e6)

  nimg, step, data_state, resumed_from = 0.0, 0, None, None
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state, skip_damaged=tcfg.skip_damaged_checkpoints)
    nimg, step, data_state = float(meta["nimg"]), int(meta["step"]), meta.get("data_state")
    resumed_from = step
    logging.info("resumed from checkpoint %d (%.1f kimg)", step, nimg / 1000)
  else:
    writer.write_hparams(config)

  local_batch = tcfg.batch_size // jax.process_count()
  debug = _DebugLog(workdir, bool(tcfg.get("debug_log_sizes", False)))
  train_iter = input_pipeline.create_train_iterator(config.data, batch_size=local_batch, seed=config.seed,
                                                    data=(exp.source, exp.info), with_index=debug.enabled)
  if data_state is not None:
    if len(data_state) != jax.process_count():
      raise checkpointing.CheckpointError(
          f"the checkpoint holds data positions of {len(data_state)} processes but this run has "
          f"{jax.process_count()}; resume with the same number of processes")
    train_iter.set_state(data_state[jax.process_index()])
  compiled = compile_steps(exp, state, k_train, local_batch)

  grid_n = _round_up(max(tcfg.grid_size, 1), parallel.data_parallel_size(exp.mesh))
  grid_fn = exp.generate_fn(grid_n) if (tcfg.sample_every_steps or tcfg.get("final_num_samples")) else None

  sched = exp.schedule
  images_per_step = tcfg.batch_size * sched.average_batch_mul
  total_nimg = tcfg.total_kimg * 1000
  progress = metrics_lib.ProgressLogger(tcfg.total_kimg)
  pending: list[tuple[int, dict]] = []    # (patch size, device metrics) not yet fetched
  fetched: list[tuple[int, dict]] = []    # (patch size, host metrics) not yet logged
  last = {"time": time.time(), "nimg": nimg, "real_images": 0}
  last_metrics: dict = {}
  host_time = {"input": 0.0, "h2d": 0.0, "dispatch": 0.0}

  def flush_metrics(force_log: bool) -> None:
    """Fetches pending device metrics (the only device sync); stops on a non-finite loss; logs if asked.

    Called on log steps and before checkpoints (so a state whose loss went non-finite is never saved);
    on other steps nothing is fetched and the host runs ahead of the device.
    """
    nonlocal pending, fetched, last_metrics
    if pending:
      values = jax.device_get([m for _, m in pending])
      for i, ((size, _), m) in enumerate(zip(pending, values)):
        if not np.isfinite(float(m["loss"])):
          # 1-based like the logs: step N is the N-th step (it starts from checkpoint N-1's state).
          bad = step - len(pending) + i + 1
          # Let an in-flight async save commit first: exiting with it pending abandons it half-written
          # (a '<step>.orbax-checkpoint-tmp' folder), and latest_step() would name a checkpoint that
          # never completes.
          ckpt.wait()
          last_ckpt = ckpt.latest_step()
          kept = (f"The last checkpoint ({last_ckpt}) was written before it and is intact" if last_ckpt is
                  not None else "No checkpoint had been written yet")
          raise FloatingPointError(
              f"non-finite loss at step {bad} (patch size {size}); training stopped. {kept}; lower "
              f"train.lr or check the data, then resume.")
      fetched += [(size, m) for (size, _), m in zip(pending, values)]
      pending = []
    if not (force_log and fetched):
      return
    now = time.time()
    dt = max(now - last["time"], 1e-9)
    dk = (nimg - last["nimg"]) / 1000
    n_steps = len(fetched)
    by_size = collections.defaultdict(list)
    for size, m in fetched:
      by_size[size].append(float(m["loss"]))
    losses = [float(m["loss"]) for _, m in fetched]
    scalars = {"loss": float(np.mean(losses)), "kimg": nimg / 1000, "lr": state_lib.learning_rate(nimg, tcfg),
               "grad_norm": float(np.mean([float(m["grad_norm"]) for _, m in fetched])),
               "nonfinite_grads": float(sum(float(m["nonfinite_grads"]) for _, m in fetched)),
               "images_per_s": dk * 1000 / dt, "patches_per_s": last["real_images"] / dt,
               "sec_per_kimg": dt / max(dk, 1e-9), "wall_ms_per_step": 1e3 * dt / n_steps}
    # Host time per step spent outside compiled computation (input, host-to-device, dispatch), in ms.
    scalars.update({f"host_ms_{k}": 1e3 * v / n_steps for k, v in host_time.items()})
    scalars.update({f"loss_{s}": float(np.mean(v)) for s, v in by_size.items()})
    scalars.update({f"frac_steps_{s}": len(v) / n_steps for s, v in by_size.items()})
    writer.write_scalars(step, scalars)
    logging.info(progress.line(step, nimg / 1000, scalars["loss"],
                               {s: float(np.mean(v)) for s, v in sorted(by_size.items())},
                               scalars["images_per_s"], scalars["sec_per_kimg"],
                               {s: len(v) for s, v in sorted(by_size.items())}))
    last_metrics = scalars
    last.update(time=now, nimg=nimg, real_images=0)
    host_time.update(input=0.0, h2d=0.0, dispatch=0.0)
    fetched = []

  def save(reason: str) -> None:
    flush_metrics(force_log=False)  # never checkpoint a state whose loss went non-finite
    # Each process reads its own shard: keep every process's iterator position.
    data_states = parallel.allgather_json(_json_state(train_iter.get_state()))
    meta = {"step": step, "nimg": nimg, "data_state": data_states,
            "config": config.to_dict(), "reason": reason}
    ckpt.save(step, state, meta)
    logging.info("checkpoint %d (%s, %.1f kimg) saving to %s", step, reason, nimg / 1000, ckpt.directory)

  def write_grid() -> None:
    if grid_fn is None or config.patch.latent:  # latents need the VAE decoder to become pictures
      return
    # Same seed every time: grids at successive steps show the same noise, so progress is comparable.
    imgs, _ = sampling.generate_images(grid_fn, state.variables(ema=True), num_images=tcfg.grid_size,
                                       batch_size=grid_n, seed=config.seed + 3, log_every=10**9)
    grid = image_grid.make_grid(imgs, padding=1)
    if jax.process_index() == 0:
      path = image_grid.save_png(os.path.join(workdir, "samples", f"grid_{step:08d}.png"), grid)
      logging.info("wrote sample grid %s", path)
    writer.write_images(step, {"samples": grid})

  eval_every = config.eval.every_kimg * 1000
  next_eval = (np.floor(nimg / eval_every) + 1) * eval_every if eval_every > 0 else float("inf")

  def run_eval() -> None:
    # Imported lazily: the Inception network is only needed when in-training eval is on.
    from patch_diffusion.evaluation import run_eval as eval_lib  # pylint: disable=g-import-not-at-top
    t0 = time.time()
    results = eval_lib.evaluate_variables(exp, state.variables(ema=True),
                                          num_samples=config.eval.train_num_samples, seed=config.seed + 2)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()} | {"kimg": nimg / 1000})
    logging.info("eval at %.1f kimg (%.0f s): %s", nimg / 1000, time.time() - t0,
                 ", ".join(f"{k} {v:.4g}" for k, v in results.items()))

  t_start = time.time()
  logging.info("training to %.0f kimg: batch %d, patch sizes %s with p=%s, avg multiplier %.2f, "
               "expected step cost %.2f of a full step", tcfg.total_kimg, tcfg.batch_size, sched.sizes,
               tuple(round(p, 3) for p in sched.probabilities), sched.average_batch_mul,
               sched.expected_step_cost)
  with _Preemption() as preempt:
    while nimg < total_nimg:
      k = sched.size_index(step, progress=nimg / total_nimg)
      size, mul = sched.sizes[k], sched.batch_muls[k]
      t0 = time.perf_counter()
      local = _concat_batches([next(train_iter) for _ in range(mul)])
      debug.step(step, size, local)
      t1 = time.perf_counter()
      batch = parallel.global_batch({"image": local["image"], "label": local["label"].astype(np.int32)},
                                    exp.mesh)
      lr = np.float32(state_lib.learning_rate(nimg, tcfg))
      beta = np.float32(state_lib.ema_beta(nimg, images_per_step, tcfg))
      t2 = time.perf_counter()
      state, step_metrics = compiled[size](state, batch, lr, beta, k_train)  # async: returns at dispatch
      host_time["input"] += t1 - t0
      host_time["h2d"] += t2 - t1
      host_time["dispatch"] += time.perf_counter() - t2
      pending.append((size, step_metrics))
      last["real_images"] += local["image"].shape[0] * jax.process_count()
      step += 1
      nimg += images_per_step
      done = nimg >= total_nimg
      if step % tcfg.log_every_steps == 0 or done:
        flush_metrics(force_log=True)
      # Multi-host: agreeing on the SIGTERM flag is a collective (it waits for the device queue), so it
      # is only done every `preemption_check_every_steps`; one process needs no agreement.
      if ((jax.process_count() == 1 or step % tcfg.preemption_check_every_steps == 0)
          and parallel.any_host(preempt.requested)):
        save("preemption")
        ckpt.close()
        writer.close()
        logging.info("%s: stopped at step %d; checkpoint %d committed to %s. Resume with the same command.",
                     preempt.signal_name or "preemption", step, step, ckpt.directory)
        return dict(last_metrics, preempted=True, step=step, resumed_from=resumed_from)
      if step % tcfg.checkpoint_every_steps == 0 and not done:
        save("interval")
      if tcfg.sample_every_steps and step % tcfg.sample_every_steps == 0 and not done:
        write_grid()
      if nimg >= next_eval and not done:
        flush_metrics(force_log=False)
        run_eval()
        next_eval += eval_every
    flush_metrics(force_log=True)
    save("final")
    debug.final(step, state)
    write_grid()
    if eval_every > 0:
      run_eval()
    if tcfg.get("final_num_samples"):
      write_samples(exp, state.variables(ema=True), workdir, tcfg.final_num_samples, config.seed + 1)
  ckpt.close()
  writer.close()
  logging.info("training done: step %d, %.1f kimg in %.1f s", step, nimg / 1000, time.time() - t_start)
  return dict(last_metrics, step=step, nimg=nimg, resumed_from=resumed_from)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _load_init(path: str, variables: dict, mesh) -> dict:
  loaded, _ = checkpointing.load_pretrained(path)
  want = jax.tree.map(lambda x: x.shape, variables)
  got = jax.tree.map(lambda x: x.shape, loaded)
  if want != got:
    raise checkpointing.CheckpointError(f"train.init_from={path} holds a network of another shape than "
                                        f"the configured model; use its config.json")
  logging.info("initialised from pretrained network %s", path)
  return jax.device_put(loaded, parallel.replicated(mesh))


def write_samples(exp: Experiment, variables: dict, workdir: str, num_images: int, seed: int,
                  batch_size: int | None = None) -> str:
  """Generates ``num_images`` with the config's sampler; writes ``samples.npz`` and ``samples.png``."""
  batch_size = _round_up(batch_size or exp.config.sample.batch_size, parallel.data_parallel_size(exp.mesh))
  batch_size = min(batch_size, _round_up(num_images, parallel.data_parallel_size(exp.mesh)))
  gen = exp.generate_fn(batch_size)
  t0 = time.time()
  images, labels = sampling.generate_images(gen, variables, num_images=num_images, batch_size=batch_size,
                                            seed=seed)
  path = os.path.join(workdir, "samples.npz")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    arrays = {"latents" if exp.config.patch.latent else "images": images}
    if exp.num_classes:
      arrays["labels"] = labels
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    if not exp.config.patch.latent:  # latents need the VAE decoder to become pictures
      grid = image_grid.make_grid(images[:min(len(images), 256)], padding=1)
      image_grid.save_png(os.path.join(workdir, "samples.png"), grid)
    logging.info("wrote %d samples to %s in %.1f s (grid: %s)", num_images, path, time.time() - t0,
                 os.path.join(workdir, "samples.png"))
  return path


def load_ema_variables(config: ml_collections.ConfigDict, workdir: str, *, step: int = -1,
                       pretrained: str = "", need_data: bool = False) -> tuple[Experiment, dict, dict]:
  """Builds the experiment and loads the EMA network that ``--mode=sample`` and ``--mode=eval`` use.

  Args:
    config: the run's config.
    workdir: run directory holding ``checkpoints/`` (unused when ``pretrained`` is given).
    step: checkpoint step; -1 = the latest.
    pretrained: directory of a converted network (``config.json`` + ``variables``); when set, its
      model/edm/data-shape settings replace the config's and no checkpoint is read.
    need_data: open the dataset for a pretrained network too (checkpoint runs always open it).
  Returns:
    (experiment, EMA variables replicated on its mesh, source info) where the info holds ``step`` and
    ``nimg`` of the checkpoint (None for a pretrained network) and ``source`` (checkpoint or network
    directory).
  Raises:
    checkpointing.CheckpointError: no checkpoint in ``workdir`` (and no ``pretrained``).
  """
  if pretrained:
    variables, pre_cfg = checkpointing.load_pretrained(pretrained)
    exp = build_experiment(_merge_pretrained(config, pre_cfg), check_data=need_data)
    variables = jax.device_put(variables, parallel.replicated(exp.mesh))
    return exp, variables, {"step": None, "nimg": None, "source": os.path.abspath(pretrained)}
  exp = build_experiment(config, check_data=True)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  if ckpt.latest_step() is None:
    raise checkpointing.CheckpointError(
        f"no checkpoint in {ckpt.directory}; train first (--mode=train) or pass "
        f"--config.sample.pretrained=DIR of a converted network")
  template = jax.device_put(state_lib.create_train_state(exp.init_variables(jax.random.key(0)), exp.tx),
                            parallel.replicated(exp.mesh))
  state, meta = ckpt.restore(template, None if step < 0 else step)
  ckpt.close()
  logging.info("loaded the EMA network of checkpoint %d (%.1f kimg)", meta["step"], meta["nimg"] / 1000)
  return exp, state.variables(ema=True), {"step": int(meta["step"]), "nimg": float(meta["nimg"]),
                                          "source": ckpt.directory}


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=sample: loads the latest (or ``sample.checkpoint_step``) checkpoint and writes samples."""
  jax.config.update("jax_threefry_partitionable", True)
  scfg = config.sample
  exp, variables, _ = load_ema_variables(config, workdir, step=scfg.checkpoint_step,
                                         pretrained=scfg.get("pretrained") or "")
  return write_samples(exp, variables, workdir, scfg.num_samples, config.seed + 1, scfg.batch_size)


def _merge_pretrained(config: ml_collections.ConfigDict, pre_cfg: ml_collections.ConfigDict):
  """The pretrained network's model/data/edm settings with this run's sampler and mesh settings."""
  merged = ml_collections.ConfigDict(config.to_dict())
  for section in ("model", "edm"):
    for k, v in pre_cfg[section].items():
      merged[section][k] = v
  for k in ("resolution", "num_channels", "use_labels", "num_classes"):
    if k in pre_cfg.data:
      merged.data[k] = pre_cfg.data[k]
  return merged
