"""FID / KID / precision-recall of a trained network: ``--mode=eval`` and the trainer's in-training eval.

``evaluate_variables(exp, variables, num_samples=N, seed=s)`` generates N images with the configured
EDM sampler, sharded over every device of the experiment's mesh (and every host), passes each generated
batch through the TF-FID Inception-v3 on the same devices (the images never leave them; only the
[B, 2048] features of this host's rows are fetched), accumulates float64 moments per host, merges them
across hosts and compares them with the reference statistics of the training data at the trained
resolution (computed once, then cached next to the data).

``evaluate(config, workdir)`` is ``--mode=eval``: it restores the EMA network of the latest (or
``eval.checkpoint_step``) checkpoint, or ``sample.pretrained``, evaluates it with ``eval.num_samples``
images and writes ``<workdir>/eval/eval_<step>_n<N>.json`` and ``eval/<metric>`` scalars (TensorBoard and
``metrics.jsonl``).

Samples use ``fold_in(key(seed), batch_index)`` exactly like :func:`sampling.generate_images`, so the
same seed and batch size give the same images as ``--mode=sample``'s generator.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import time
import weakref
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from patch_diffusion import metrics as metrics_lib
from patch_diffusion import parallel
from patch_diffusion import user_cache
from patch_diffusion import train
from patch_diffusion.data import datasets
from patch_diffusion.data import image_folder
from patch_diffusion.data import input_pipeline
from patch_diffusion.evaluation import inception
from patch_diffusion.evaluation import inception_weights
from patch_diffusion.evaluation import metrics as fid_metrics
from patch_diffusion.evaluation import reference

#: Raw features kept per set for KID and precision/recall (as StyleGAN2-ADA's 50k protocols).
MAX_CAPTURED_FEATURES = 50_000
#: Seconds between progress lines while generating.
LOG_EVERY_S = 30.0


# ---- Inception weights and per-experiment caches ------------------------------------------------------


def inception_weights_path(config: ml_collections.ConfigDict) -> pathlib.Path:
  """The Inception weights ``eval.inception_path`` names (else the default cache); checked to exist.

  Raises:
    inception_weights.InceptionWeightsNotFoundError: the file is missing; the message holds the command
      that fetches it.
  """
  given = config.eval.get("inception_path") or ""
  path = pathlib.Path(given).expanduser() if given else inception_weights.default_cache_path()
  if not path.exists():
    raise inception_weights.InceptionWeightsNotFoundError(inception_weights.missing_weights_message(path))
  return path


_CACHES: dict[int, dict] = {}


def _cache(exp: train.Experiment) -> dict:
  """A dict that lives as long as ``exp``: compiled generators, the feature function, reference stats.

  In-training eval calls :func:`evaluate_variables` many times with one experiment; this keeps one
  compilation of each function and one read of the reference file per run.
  """
  key = id(exp)
  entry = _CACHES.get(key)
  if entry is None:
    entry = _CACHES[key] = {}
    weakref.finalize(exp, _CACHES.pop, key, None)
  return entry


def feature_fn_for(exp: train.Experiment) -> Callable[[Any], Any]:
  """The Inception feature function on ``exp.mesh`` (see :func:`inception.make_feature_fn`), cached.

  Raises:
    inception_weights.InceptionWeightsNotFoundError: the weights are missing.
  """
  path = inception_weights_path(exp.config)
  cache = _cache(exp)
  key = ("feature_fn", str(path))
  if key not in cache:
    cache[key] = inception.make_feature_fn(inception_weights.load_inception_params(path), exp.mesh)
  return cache[key]


def eval_batch_size(exp: train.Experiment, num_samples: int) -> int:
  """Global images per generation/feature call: ``eval.batch_size`` rounded up to the data-parallel
  size, capped by ``num_samples`` (rounded likewise)."""
  n_data = parallel.data_parallel_size(exp.mesh)
  batch = _round_up(max(int(exp.config.eval.batch_size), 1), n_data)
  return min(batch, _round_up(num_samples, n_data))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def check_evaluable(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for runs whose samples are not images (latent-space models)."""
  if config.patch.get("latent"):
    raise ValueError(
        "FID/KID/precision-recall need pixel images, but patch.latent=True makes the network generate "
        "VAE latents and this codebase has no VAE decoder; write latents with --mode=sample and decode "
        "them outside, or set eval.every_kimg=0 for this run")


# ---- reference statistics ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReferenceSpec:
  """Which real data the generated images are compared with, and where its statistics are cached."""
  path: pathlib.Path
  dataset: str          # dataset id recorded in the file (name; folder hash; '_gray' for 1 channel)
  split: str
  resolution: int
  num_images: Optional[int]  # None = the whole split


def reference_spec(config: ml_collections.ConfigDict) -> ReferenceSpec:
  """Reference set of a run: the whole training split (``data.max_examples`` ignored, so runs on data
  subsets are compared with the full distribution) or its first ``eval.ref_num_images`` images, at
  ``data.resolution`` and ``data.num_channels``.

  Cache directory: ``data.data_dir`` if set; else the TFDS default data dir, the image folder's own
  cache folder, or the user cache folder (``user_cache.cache_dir()``) for the embedded digits.
  """
  d = config.data
  name = d.name
  data_dir = os.path.expanduser(d.get("data_dir") or "")
  if name == datasets.DIGITS:
    dataset, base = name, data_dir or str(user_cache.cache_dir())
  elif name == datasets.FOLDER:
    folder = os.path.abspath(os.path.expanduser(d.folder))
    digest = hashlib.sha1(folder.encode()).hexdigest()[:8]
    dataset = f"folder_{os.path.basename(folder.rstrip(os.sep))}_{digest}"
    base = data_dir or os.path.join(folder, image_folder.CACHE_SUBDIR)
  else:
    dataset, base = name, data_dir or datasets.default_tfds_data_dir()
  if int(d.num_channels) == 1:
    dataset += "_gray"  # grayscale training data: compare with the grayscale version of the split
  split = d.get("split") or "train"
  n = int(config.eval.get("ref_num_images") or 0)
  num_images = n if n > 0 else None
  path = reference.reference_stats_path(base, dataset=dataset, resolution=int(d.resolution), split=split,
                                        num_images=num_images)
  return ReferenceSpec(path=path, dataset=dataset, split=split, resolution=int(d.resolution),
                       num_images=num_images)


def reference_stats(exp: train.Experiment, *, capture_features: bool = True) -> tuple[
    fid_metrics.FeatureStats, ReferenceSpec]:
  """Loads (or computes once and caches) the reference statistics of ``exp``'s training data.

  Every process must call it (computing is a collective). Returns the statistics (identical on every
  process) and where they live.
  """
  spec = reference_spec(exp.config)
  cache = _cache(exp)
  key = ("reference", str(spec.path), capture_features)
  if key in cache:
    return cache[key], spec
  feature_fn = feature_fn_for(exp)
  data_config = exp.config.data
  data = (exp.source, exp.info) if exp.source is not None else None
  if int(data_config.get("max_examples") or 0) > 0 or data is None:
    data_config = ml_collections.ConfigDict(data_config.to_dict())
    data_config.max_examples = 0
    data = datasets.get_data_source(data_config)
  local_batch = max(1, int(exp.config.eval.batch_size) // jax.process_count())

  def batches():
    it = input_pipeline.create_eval_iterator(data_config, batch_size=local_batch, data=data)
    return _logged(it, len(it), "reference stats: batch")

  t0 = time.time()
  stats = reference.load_or_compute_reference_stats(
      spec.path, batches, feature_fn, dataset=spec.dataset, resolution=spec.resolution, split=spec.split,
      num_images=spec.num_images, capture_features=capture_features, max_features=MAX_CAPTURED_FEATURES)
  logging.info("reference stats %s: %d images (%.1f s)", spec.path, stats.num_items, time.time() - t0)
  cache[key] = stats
  return stats, spec


def _logged(iterable, total: int, what: str):
  """Yields from ``iterable``, logging ``what i/total`` with rate and ETA every LOG_EVERY_S seconds."""
  t0 = last = time.time()
  for i, item in enumerate(iterable):
    now = time.time()
    if i and now - last >= LOG_EVERY_S:
      rate = i / (now - t0)
      logging.info("%s %d/%d (%.2f/s, ETA %s)", what, i, total, rate,
                   metrics_lib.format_eta((total - i) / rate))
      last = now
    yield item


# ---- generated-image statistics ----------------------------------------------------------------------


def _local_row_indices(x: jax.Array) -> np.ndarray:
  """Global row indices of :func:`inception.host_local_rows`' rows (same order): int64 [n_local]."""
  if x.is_fully_addressable:
    return np.arange(x.shape[0])
  bounds = {}
  for shard in x.addressable_shards:
    rows = shard.index[0]
    start = rows.start or 0
    bounds[start] = x.shape[0] if rows.stop is None else rows.stop
  return np.concatenate([np.arange(s, bounds[s]) for s in sorted(bounds)])


def generated_stats(exp: train.Experiment, variables: dict, *, num_samples: int, seed: int,
                    capture_features: bool = True) -> fid_metrics.FeatureStats:
  """Inception statistics of ``num_samples`` images from the EMA network, generated and embedded on device.

  Batches of :func:`eval_batch_size` images are generated with ``exp.generate_fn`` (latents from
  ``fold_in(key(seed), batch)``), quantised to uint8 [B, R, R, C] there and fed, still sharded, to the
  Inception network; each host fetches only its rows' float32 [rows, 2048] features, and the rows past
  ``num_samples`` in the last batch are masked out. The next batch is dispatched before the previous
  one's features are fetched, so the host work overlaps device work.

  Returns:
    :class:`FeatureStats` over all processes (``num_items == num_samples``), with features captured
    (up to 50,000) when ``capture_features``.
  """
  if num_samples < 2:
    raise ValueError(f"evaluation needs at least 2 samples, got {num_samples}")
  feature_fn = feature_fn_for(exp)
  batch = eval_batch_size(exp, num_samples)
  cache = _cache(exp)
  if ("generate", batch) not in cache:
    cache[("generate", batch)] = exp.generate_fn(batch)
  generate = cache[("generate", batch)]
  stats = fid_metrics.FeatureStats(inception.FEATURE_DIM, capture_features=capture_features,
                                   max_items=min(num_samples, MAX_CAPTURED_FEATURES))
  key = jax.random.key(seed)
  num_batches = math.ceil(num_samples / batch)
  logging.info("eval: generating and embedding %d images in %d batches of %d on %d devices", num_samples,
               num_batches, batch, exp.mesh.size)
  t0 = last_log = time.time()

  def consume(b: int, features: jax.Array) -> None:
    mask = (_local_row_indices(features) + b * batch) < num_samples
    stats.append(inception.host_local_rows(features), mask)

  pending = None
  for b in range(num_batches):
    images, _ = generate(variables, key, b)
    features = feature_fn(images)  # global [batch, 2048], sharded like the images
    if pending is not None:
      consume(*pending)
    pending = (b, features)
    now = time.time()
    if now - last_log >= LOG_EVERY_S:
      done = b * batch  # batches fetched so far (the current one is still in flight)
      rate = done / max(now - t0, 1e-9)
      logging.info("eval: %d/%d images generated and embedded (%.1f img/s, ETA %s)", done, num_samples,
                   rate, metrics_lib.format_eta((num_samples - done) / rate if rate > 0 else None))
      last_log = now
  consume(*pending)
  elapsed = time.time() - t0
  logging.info("eval: %d images generated and embedded in %.1f s (%.1f img/s)", num_samples, elapsed,
               num_samples / max(elapsed, 1e-9))
  stats = stats.all_gather_merge()
  if stats.num_items != num_samples:  # a masking/sharding bug would silently bias every metric
    raise RuntimeError(f"embedded {stats.num_items} generated images, expected {num_samples}")
  return stats


# ---- metrics -----------------------------------------------------------------------------------------


def _evaluate(exp: train.Experiment, variables: dict, *, num_samples: int,
              seed: int) -> tuple[dict[str, float], dict[str, Any]]:
  """:func:`evaluate_variables` plus details (reference file and count, timings) for the JSON record."""
  ecfg = exp.config.eval
  want_features = bool(ecfg.kid or ecfg.precision_recall)
  t0 = time.time()
  check_evaluable(exp.config)
  feature_fn_for(exp)  # fails on missing weights before anything is generated or computed
  real, spec = reference_stats(exp, capture_features=want_features)
  t_ref = time.time()
  fake = generated_stats(exp, variables, num_samples=num_samples, seed=seed, capture_features=want_features)
  t_gen = time.time()
  results = {"fid": fid_metrics.fid_from_feature_stats(real, fake)}
  if ecfg.kid:
    results["kid"] = fid_metrics.kid(real.features, fake.features)
  if ecfg.precision_recall:
    results["precision"], results["recall"] = fid_metrics.precision_recall(real.features, fake.features)
  results["num_samples"] = float(fake.num_items)
  results = {k: float(v) for k, v in results.items()}
  t_end = time.time()
  details = {"reference_stats": str(spec.path), "reference_num_images": int(real.num_items),
             "batch_size": eval_batch_size(exp, num_samples), "seed": int(seed),
             "time_reference_s": round(t_ref - t0, 3), "time_generate_and_embed_s": round(t_gen - t_ref, 3),
             "time_metrics_s": round(t_end - t_gen, 3)}
  return results, details


def evaluate_variables(exp: train.Experiment, variables: dict, *, num_samples: int,
                       seed: int) -> dict[str, float]:
  """FID (and KID, precision/recall if ``eval.kid`` / ``eval.precision_recall``) of a network.

  Every process must call it; all get the same result.

  Args:
    exp: the experiment (mesh, sampler settings, data config).
    variables: the network's (EMA) variables, replicated on ``exp.mesh``.
    num_samples: images to generate.
    seed: sampling seed.
  Returns:
    {'fid', 'kid', 'precision', 'recall', 'num_samples'} as floats (the optional ones only when
    enabled); FID and KID in the usual units (KID not ×10³).
  Raises:
    inception_weights.InceptionWeightsNotFoundError: before any generation, if the weights are missing.
    ValueError: a latent-space run (``patch.latent``), whose samples are not images.
  """
  return _evaluate(exp, variables, num_samples=num_samples, seed=seed)[0]


# ---- --mode=eval -------------------------------------------------------------------------------------


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """``--mode=eval``: FID/KID/precision/recall of the EMA network with ``eval.num_samples`` images.

  The network is ``sample.pretrained`` if set, else the ``eval.checkpoint_step`` checkpoint (-1 =
  latest) of ``workdir``. Writes ``<workdir>/eval/eval_<step:08d>_n<N>.json`` (``eval_pretrained_n<N>.json``) and
  ``eval/<metric>`` scalars at the checkpoint step (TensorBoard and ``metrics.jsonl``), on process 0.

  Returns:
    The JSON record: the metrics plus ``step``, ``kimg``, ``num_samples``, ``wall_time_s``,
    ``reference_stats`` (path) and timings.
  Raises:
    inception_weights.InceptionWeightsNotFoundError: before loading or generating anything.
    ValueError: a latent-space run (``patch.latent``).
    checkpointing.CheckpointError: no checkpoint and no ``sample.pretrained``.
  """
  jax.config.update("jax_threefry_partitionable", True)
  t0 = time.time()
  check_evaluable(config)
  inception_path = inception_weights_path(config)
  pretrained = config.sample.get("pretrained") or ""
  exp, variables, source = train.load_ema_variables(
      config, workdir, step=int(config.eval.checkpoint_step), pretrained=pretrained, need_data=True)
  num_samples = int(config.eval.num_samples)
  logging.info("eval: %d samples from %s (%s), sampler %s with %d steps", num_samples,
               "pretrained network" if pretrained else f"checkpoint {source['step']}", source["source"],
               config.sample.solver, config.sample.num_steps)
  results, details = _evaluate(exp, variables, num_samples=num_samples, seed=config.seed + 2)
  step = source["step"]
  record = dict(results)
  record.update(
      step=step, kimg=None if source["nimg"] is None else source["nimg"] / 1000,
      num_samples=num_samples, network=source["source"], inception=str(inception_path),
      sampler={"solver": config.sample.solver, "num_steps": int(config.sample.num_steps),
               "guidance": float(config.sample.guidance)},
      wall_time_s=round(time.time() - t0, 3), **details)
  if jax.process_index() == 0:
    out_dir = pathlib.Path(workdir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    # The sample count is part of the name: re-evaluating a checkpoint with another N keeps both files.
    stem = "eval_pretrained" if step is None else f"eval_{step:08d}"
    path = out_dir / f"{stem}_n{num_samples}.json"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    logging.info("eval: wrote %s", path)
  with metrics_lib.MetricWriter(workdir) as writer:
    scalars = {f"eval/{k}": v for k, v in results.items()}
    if record["kimg"] is not None:
      scalars["kimg"] = record["kimg"]
    writer.write_scalars(step or 0, scalars)
  logging.info("eval (%.0f s): %s", record["wall_time_s"], ", ".join(f"{k} {v:.4g}" for k, v in
                                                                      results.items()))
  return record
