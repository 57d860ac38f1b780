"""``--mode=eval``: FID / KID / precision-recall of the EMA network of a checkpoint (or a converted one).

Writes ``<workdir>/eval/eval_<step:08d>_n<N>.json`` (``eval_pretrained_n<N>.json`` for a converted
network) and ``eval/<metric>`` scalars at the checkpoint step (TensorBoard and ``metrics.jsonl``), on
process 0, through ``fileio`` (local or ``gs://``). The metrics themselves are ``evaluation.Evaluator``'s.
"""
from __future__ import annotations

import time

import jax
import ml_collections
from absl import logging

from patch_diffusion import experiment as experiment_lib
from patch_diffusion import fileio
from patch_diffusion import writers
from patch_diffusion.evaluation import inception_weights


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """FID/KID/precision/recall of the EMA network with ``eval.num_samples`` images.

  The network is ``sample.pretrained`` if set, else the ``eval.checkpoint_step`` checkpoint (-1 = latest)
  of ``workdir``.

  Returns:
    The JSON record: the metrics plus ``step``, ``kimg``, ``num_samples``, ``wall_time_s``,
    ``reference_stats`` (path) and timings.
  Raises:
    inception_weights.InceptionWeightsNotFoundError: before loading or generating anything.
    ValueError: an invalid config value.
    checkpointing.CheckpointError: no checkpoint and no ``sample.pretrained``, or a damaged one.
  """
  jax.config.update("jax_threefry_partitionable", True)
  t0 = time.time()
  inception_path = inception_weights.resolve_path(config.eval.inception_path)
  pretrained = config.sample.pretrained
  exp, variables, source = experiment_lib.load_ema_variables(
      config, workdir, step=config.eval.checkpoint_step, pretrained=pretrained, need_data=True)
  num_samples = config.eval.num_samples
  logging.info("eval: %d samples from %s (%s), sampler %s with %d steps", num_samples,
               "pretrained network" if pretrained else f"checkpoint {source['step']}", source["source"],
               config.sample.solver, config.sample.num_steps)
  evaluator = experiment_lib.make_evaluator(exp)
  results, details = evaluator.evaluate(variables, num_samples=num_samples, seed=config.seed + 2)
  step = source["step"]
  record = dict(results)
  record.update(
      step=step, kimg=None if source["nimg"] is None else source["nimg"] / 1000,
      num_samples=num_samples, network=source["source"], inception=str(inception_path),
      sampler={"solver": config.sample.solver, "num_steps": config.sample.num_steps,
               "guidance": config.sample.guidance},
      wall_time_s=round(time.time() - t0, 3), **details)
  if jax.process_index() == 0:
    # The sample count is part of the name: re-evaluating a checkpoint with another N keeps both files.
    stem = "eval_pretrained" if step is None else f"eval_{step:08d}"
    path = fileio.write_json(f"{workdir}/eval/{stem}_n{num_samples}.json", record)
    logging.info("eval: wrote %s", path)
  with writers.MetricWriter(workdir) as writer:
    scalars = {f"eval/{k}": v for k, v in results.items()}
    if record["kimg"] is not None:
      scalars["kimg"] = record["kimg"]
    writer.write_scalars(step or 0, scalars)
  logging.info("eval (%.0f s): %s", record["wall_time_s"], ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
  return record
