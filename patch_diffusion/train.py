"""Training: one ahead-of-time compiled step per patch size, and a short loop that drives hook objects.

``train_and_evaluate(config, workdir)`` is the entry point for the command line and for notebooks. Per
step the host picks the patch size from the schedule (identical on every host), pulls ``batch_mul`` host
batches of full-resolution images, assembles the global batch and calls that size's executable; the hooks
(``hooks.py``) then log, checkpoint, sample, evaluate or stop. Nothing is fetched from the device except
on log and checkpoint steps.
"""
from __future__ import annotations

import concurrent.futures
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from patch_diffusion import checkpointing
from patch_diffusion import experiment as experiment_lib
from patch_diffusion import hooks as hooks_lib
from patch_diffusion import parallel
from patch_diffusion import run_lock
from patch_diffusion import state as state_lib
from patch_diffusion import steps as steps_lib
from patch_diffusion import writers
from patch_diffusion.data import augment as augment_lib
from patch_diffusion.data import input_pipeline


def step_variants(exp: experiment_lib.Experiment) -> tuple[tuple[int, ...], ...]:
  """Every executable the loop can ask for: ``(patch_size, batch_mul)`` per ``PatchSchedule.variants``;
  for a multi-stage network ``(patch_size, batch_mul, stage)`` for every stage (one executable per stage:
  a static stage compiles only that decoder; see docs/MODELS.md for the measured alternative)."""
  base = exp.schedule.variants()
  if exp.stages is None:
    return base
  return tuple(v + (k,) for v in base for k in range(exp.stages.num_stages))


def variant_of(exp: experiment_lib.Experiment, plan, step: int) -> tuple[int, ...]:
  """The executable key of a step (``step_variants``): its plan's size and multiplier, plus its stage
  (``StageSchedule.stage``: a pure function of (seed, step), identical on every host)."""
  key = (plan.patch_size, plan.batch_mul)
  return key if exp.stages is None else key + (exp.stages.stage(step),)


def compile_steps(exp: experiment_lib.Experiment, state: state_lib.TrainState, base_key: jax.Array,
                  local_batch: int, lower_only: bool = False,
                  variants: Optional[Sequence[tuple[int, ...]]] = None) -> dict[tuple[int, ...], Callable]:
  """Ahead-of-time compiles one donated, sharded train step per entry of ``step_variants`` (or of the
  given ``variants``); logs compile times.

  Tracing and lowering run in turn (they hold the GIL); the XLA compilations run in parallel threads.
  ``lower_only`` returns the lowered (not yet compiled) computations, e.g. for backend-independent FLOP
  counts. Keys are ``(patch_size, batch_mul)``, or ``(patch_size, batch_mul, stage)`` for a multi-stage
  network.
  """
  mesh, cfg = exp.mesh, exp.config
  rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  state_sharding = jax.tree.map(lambda _: rep, state)
  augment = augment_lib.from_config(cfg.data)
  lowered = {}
  for variant in (step_variants(exp) if variants is None else variants):
    size, mul, stage = (tuple(variant) + (None,))[:3]
    step_fn = steps_lib.make_train_step(
        exp.model.apply, exp.tx, exp.precond, exp.noise_dist,
        steps_lib.StepConfig(patch_size=size, resolution=exp.resolution, num_classes=exp.num_classes,
                             label_dropout=cfg.edm.label_dropout, compute_dtype=exp.dtype, augment=augment,
                             augment_before_crop=cfg.data.augment_before_crop,
                             grad_accum_steps=cfg.train.grad_accum_steps,
                             stage_boundaries=exp.stage_boundaries, stage=stage,
                             latent_scale=exp.codec.scaling_factor if exp.codec else 1.0))
    n = local_batch * mul * jax.process_count()
    batch = exp.batch_spec(n)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    jitted = jax.jit(step_fn, in_shardings=(state_sharding, data, rep, rep, rep),
                     out_shardings=(state_sharding, rep), donate_argnums=(0,))
    lowered[tuple(variant)] = (n, jitted.lower(state, batch, scalar, scalar, base_key))

  if lower_only:
    return {key: low for key, (_, low) in lowered.items()}

  def compile_one(item):
    key, (n, low) = item
    t0 = time.time()
    exe = low.compile()
    stage = f", stage {key[2]}" if len(key) > 2 else ""
    logging.info("compiled train step for patch %dx%d (global batch %d%s): %.1f s", key[0], key[0], n, stage,
                 time.time() - t0)
    return key, exe

  t0 = time.time()
  with concurrent.futures.ThreadPoolExecutor(max_workers=len(lowered)) as pool:
    compiled = dict(pool.map(compile_one, lowered.items()))
  logging.info("compiled %d train steps in %.1f s", len(compiled), time.time() - t0)
  return compiled


def _next_batch(train_iter, mul: int) -> dict:
  """``mul`` host batches, concatenated (the batch multiplier of the step's patch size)."""
  batches = [next(train_iter) for _ in range(mul)]
  return batches[0] if mul == 1 else {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _loop(run: hooks_lib.Run, compiled: dict[tuple[int, ...], Callable],
          hooks: Sequence[hooks_lib.Hook]) -> None:
  """Steps until the training length is reached or a hook sets ``run.stop_reason``."""
  sched, tcfg = run.exp.schedule, run.config.train
  while run.nimg < run.total_nimg and not run.stop_reason:
    plan = sched.plan(run.step, run.nimg, run.total_nimg, tcfg.batch_size)  # identical on every host
    t0 = time.perf_counter()
    local = _next_batch(run.train_iter, plan.batch_mul)
    t1 = time.perf_counter()
    batch = run.exp.device_batch(local)
    lr = np.float32(state_lib.learning_rate(run.nimg, tcfg, plan.lr_scale))
    beta = np.float32(state_lib.ema_beta(run.nimg, plan.counted_images, tcfg))
    t2 = time.perf_counter()
    variant = variant_of(run.exp, plan, run.step)  # (size, mul[, stage]): identical on every host
    run.state, run.metrics = compiled[variant](run.state, batch, lr, beta, run.step_key)  # async dispatch
    run.host_seconds = {"input": t1 - t0, "h2d": t2 - t1, "dispatch": time.perf_counter() - t2}
    run.plan, run.size, run.local = plan, plan.patch_size, local
    run.stage = variant[2] if len(variant) > 2 else None
    run.step += 1
    run.nimg += plan.counted_images
    for hook in hooks:
      hook.after_step(run)
  for hook in hooks:
    hook.on_end(run)


def _start(exp: experiment_lib.Experiment, workdir: str, with_index: bool) -> hooks_lib.Run:
  """Writer, checkpointer, initial or restored state, positioned input iterator: the Run before step 1."""
  config, tcfg = exp.config, exp.config.train
  writer = writers.MetricWriter(workdir)
  ckpt = checkpointing.Checkpointer(experiment_lib.checkpoint_dir(config, workdir),
                                    max_to_keep=tcfg.keep_checkpoints)
  logging.info("dataset %s: %d images, %dx%dx%d, %d classes", exp.info.name, exp.info.num_examples,
               exp.resolution, exp.resolution, exp.channels, exp.num_classes)
  k_init, k_train = jax.random.split(jax.random.key(config.seed), 2)
  state = jax.device_put(state_lib.create_train_state(experiment_lib.initial_variables(exp, k_init), exp.tx),
                         parallel.replicated(exp.mesh))
  logging.info("network %s: %.2f M parameters", config.model.arch, state_lib.param_count(state.params) / 1e6)
  if exp.stages is not None:
    shared, decoders = state_lib.stage_param_counts(state.params, exp.stages.num_stages)
    logging.info("%s", exp.stages.describe(decoders, shared))
  nimg, step, data_state, resumed_from = 0.0, 0, None, None
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state, skip_damaged=tcfg.skip_damaged_checkpoints)
    nimg, step, data_state = float(meta["nimg"]), int(meta["step"]), meta["data_state"]
    resumed_from = step
    logging.info("resumed from checkpoint %d (%.1f kimg)", step, nimg / 1000)
  else:
    writer.write_hparams(config)
  train_iter = input_pipeline.create_train_iterator(
      config.data, batch_size=tcfg.batch_size // jax.process_count(), seed=config.seed,
      data=(exp.source, exp.info), with_index=with_index)
  if data_state is not None:
    if len(data_state) != jax.process_count():
      raise checkpointing.CheckpointError(
          f"the checkpoint holds data positions of {len(data_state)} processes but this run has "
          f"{jax.process_count()}; resume with the same number of processes")
    train_iter.set_state(data_state[jax.process_index()])
  return hooks_lib.Run(exp=exp, workdir=workdir, writer=writer, ckpt=ckpt, train_iter=train_iter, state=state,
                       step=step, nimg=nimg, total_nimg=tcfg.total_kimg * 1000, resumed_from=resumed_from,
                       step_key=k_train)


def default_hooks(run: hooks_lib.Run, evaluator) -> tuple[hooks_lib.Hook, ...]:
  """The trainer's hooks in their order (see ``hooks.py``); the preemption hook is the second."""
  tcfg = run.config.train
  metrics = hooks_lib.MetricsHook(run)
  checkpoint = hooks_lib.CheckpointHook(run, metrics)
  out = [metrics, hooks_lib.PreemptionHook(run, checkpoint), checkpoint]
  if tcfg.sample_every_steps or tcfg.final_num_samples:
    out.append(hooks_lib.SampleGridHook(run))
  if evaluator is not None:
    out.append(hooks_lib.EvalHook(run, evaluator, metrics))
  if tcfg.final_num_samples:
    out.append(hooks_lib.FinalSamplesHook(run))
  return tuple(out)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       extra_hooks: Sequence[hooks_lib.Hook] = ()) -> dict:
  """Trains (or resumes) the configured model in ``workdir``; returns the last logged metrics.

  Writes ``workdir/checkpoints`` (Orbax, with manifests), ``workdir/tb`` (TensorBoard),
  ``workdir/metrics.jsonl``, ``workdir/samples/grid_<step>.png`` and, if ``train.final_num_samples`` > 0,
  ``workdir/samples.npz``. ``extra_hooks`` run after the trainer's own (tests record steps with them).
  The result holds the last logged scalars plus ``step``, ``nimg``, ``resumed_from`` (checkpoint step or
  None) and ``preempted`` (the signal name, '' when training completed).
  """
  jax.config.update("jax_threefry_partitionable", True)
  exp = experiment_lib.build_experiment(config)
  # In-training eval needs the Inception weights and pixel-space samples: fail now, not after training.
  evaluator = experiment_lib.make_evaluator(exp) if config.eval.every_kimg > 0 else None
  parallel.assert_same_on_all_hosts(config.to_dict(), "the config")
  # An unwritable, read-only or full workdir fails here with the fix in the message, before anything
  # is written. Process 0 writes logs and metadata.
  if jax.process_index() == 0:
    checkpointing.ensure_writable(workdir)
  # One training process per workdir: a second one would race on the checkpoints.
  with run_lock.acquire_for_run(workdir):
    run = _start(exp, workdir, with_index=any(h.needs_example_indices for h in extra_hooks))
    try:
      compiled = compile_steps(exp, run.state, run.step_key, config.train.batch_size // jax.process_count())
      parallel.barrier("compiled")  # start the first step together (see parallel.barrier)
      hooks = default_hooks(run, evaluator) + tuple(extra_hooks)
      logging.info("training to %.0f kimg, %s", config.train.total_kimg,
                   exp.schedule.describe(config.train.batch_size, run.total_nimg))
      t_start = time.time()
      with next(h for h in hooks if isinstance(h, hooks_lib.PreemptionHook)):
        _loop(run, compiled, hooks)
    finally:
      run.ckpt.close()
      run.writer.close()
  if run.stop_reason:
    logging.info("%s: stopped at step %d; checkpoint %d committed to %s. Resume with the same command.",
                 run.stop_reason, run.step, run.step, run.ckpt.directory)
  else:
    logging.info("training done: step %d, %.1f kimg in %.1f s", run.step, run.nimg / 1000,
                 time.time() - t_start)
  return dict(run.last_metrics, step=run.step, nimg=run.nimg, resumed_from=run.resumed_from,
              preempted=run.stop_reason)
