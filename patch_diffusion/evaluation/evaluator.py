"""FID / KID / precision-recall of a generator: an :class:`Evaluator` built once, called many times.

``Evaluator(...)(variables, num_samples=N, seed=s)`` generates N images with the given generator, sharded
over every device of the mesh (and every host), passes each generated batch through the TF-FID
Inception-v3 on the same devices (the images never leave them; only the [B, 2048] features of this host's
rows are fetched), accumulates float64 moments per host, merges them across hosts and compares them with
the reference statistics of the real data (computed once, then cached next to the data).

The evaluator knows nothing about training: it is handed a generator factory (``batch_size ->
generate(variables, key, batch_index) -> (uint8 images [B, R, R, C], labels)``) and a
:class:`ReferenceData` (what the real images are and where their statistics are cached). The trainer
hands one to its evaluation hook; ``--mode=eval`` builds one too (``experiment.make_evaluator``). It keeps
one compilation of each function and one read of the reference file for its whole life.

Samples use ``fold_in(key(seed), batch_index)`` exactly like :func:`sampling.generate_images`, so the same
seed and batch size give the same images as ``--mode=sample``'s generator.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np
from absl import logging

from patch_diffusion import parallel
from patch_diffusion import progress
from patch_diffusion.evaluation import fid as fid_lib
from patch_diffusion.evaluation import inception
from patch_diffusion.evaluation import inception_weights
from patch_diffusion.evaluation import reference

#: Raw features kept per set for KID and precision/recall (as StyleGAN2-ADA's 50k protocols).
MAX_CAPTURED_FEATURES = 50_000
#: Seconds between progress lines.
LOG_EVERY_S = 30.0

GenerateFn = Callable[[Any, jax.Array, int], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class ReferenceData:
  """The real images generated ones are compared with, and where their statistics are cached.

  Attributes:
    path: the statistics file (``reference.reference_stats_path``).
    dataset: dataset id recorded in the file (e.g. ``celeb_a``, ``folder_x_1a2b3c4d``, ``digits_gray``).
    split: the split read.
    resolution: R of the images.
    num_images: the first N images of the split; None = all of it.
    batches: returns a fresh iterable of this process's batches {'image': uint8 [B, R, R, C], 'mask'}
      (every process the same number of batches); called only when the file must be computed.
    num_batches: how many batches ``batches()`` yields (for the progress line).
  """
  path: pathlib.Path
  dataset: str
  split: str
  resolution: int
  num_images: Optional[int]
  batches: Callable[[], Iterable[Mapping[str, Any]]]
  num_batches: int


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


class Evaluator:
  """FID (and KID, precision/recall) of generated images against cached reference statistics.

  Args:
    mesh: the device mesh (a ``'data'`` axis); generation and features are sharded over it.
    make_generate: ``batch_size -> GenerateFn`` (compiled once per batch size and kept).
    reference: the real data (:class:`ReferenceData`).
    inception_path: converted Inception weights (``.npz``) or any source ``inception_weights`` reads.
    batch_size: global images per generation / feature call (rounded up to the data-parallel size).
    kid, precision_recall: also compute these (they keep up to 50,000 raw features per set).
  Raises:
    inception_weights.InceptionWeightsNotFoundError: at construction, if the weights are missing.
  """

  def __init__(self, *, mesh, make_generate: Callable[[int], GenerateFn], reference: ReferenceData,
               inception_path: pathlib.Path, batch_size: int, kid: bool = True,
               precision_recall: bool = True):
    self.mesh = mesh
    self.reference = reference
    self.inception_path = pathlib.Path(inception_path)
    self.batch_size = int(batch_size)
    self.kid, self.precision_recall = bool(kid), bool(precision_recall)
    self._make_generate = make_generate
    self._generators: dict[int, GenerateFn] = {}
    self.feature_fn = inception.make_feature_fn(inception_weights.load_inception_params(self.inception_path),
                                                 mesh)
    self._reference_stats: Optional[fid_lib.FeatureStats] = None

  @property
  def capture_features(self) -> bool:
    return self.kid or self.precision_recall

  def batch_for(self, num_samples: int) -> int:
    """``batch_size`` rounded up to the data-parallel size, capped by ``num_samples`` (rounded likewise)."""
    n_data = parallel.data_parallel_size(self.mesh)
    return min(parallel.round_up(max(self.batch_size, 1), n_data), parallel.round_up(num_samples, n_data))

  def reference_stats(self) -> fid_lib.FeatureStats:
    """Loads (or computes once and caches) the reference statistics; every process must call it."""
    if self._reference_stats is None:
      ref = self.reference
      count = progress.CountProgress("reference stats", ref.num_batches, unit="batches", every_s=LOG_EVERY_S)

      def batches():
        for i, batch in enumerate(ref.batches()):
          count.update(i)
          yield batch

      t0 = time.time()
      self._reference_stats = reference.load_or_compute_reference_stats(
          ref.path, batches, self.feature_fn, dataset=ref.dataset, resolution=ref.resolution,
          split=ref.split, num_images=ref.num_images, capture_features=self.capture_features,
          max_features=MAX_CAPTURED_FEATURES)
      logging.info("reference stats %s: %d images (%.1f s)", ref.path, self._reference_stats.num_items,
                   time.time() - t0)
    return self._reference_stats

  def generated_stats(self, variables, *, num_samples: int, seed: int) -> fid_lib.FeatureStats:
    """Inception statistics of ``num_samples`` generated images (over all processes).

    Batches are generated and quantised to uint8 on device and fed, still sharded, to the Inception
    network; each host fetches only its rows' features; rows past ``num_samples`` in the last batch are
    masked out. The next batch is dispatched before the previous one's features are fetched.
    """
    if num_samples < 2:
      raise ValueError(f"evaluation needs at least 2 samples, got {num_samples}")
    batch = self.batch_for(num_samples)
    if batch not in self._generators:
      self._generators[batch] = self._make_generate(batch)
    generate = self._generators[batch]
    stats = fid_lib.FeatureStats(inception.FEATURE_DIM, capture_features=self.capture_features,
                                 max_items=min(num_samples, MAX_CAPTURED_FEATURES))
    key = jax.random.key(seed)
    num_batches = math.ceil(num_samples / batch)
    logging.info("eval: generating and embedding %d images in %d batches of %d on %d devices", num_samples,
                 num_batches, batch, self.mesh.size)
    count = progress.CountProgress("eval: generated and embedded", num_samples, every_s=LOG_EVERY_S)

    def consume(b: int, features: jax.Array) -> None:
      mask = (_local_row_indices(features) + b * batch) < num_samples
      stats.append(inception.host_local_rows(features), mask)
      count.update(min((b + 1) * batch, num_samples))

    pending = None
    for b in range(num_batches):
      images, _ = generate(variables, key, b)
      features = self.feature_fn(images)  # global [batch, 2048], sharded like the images
      if pending is not None:
        consume(*pending)
      pending = (b, features)
    consume(*pending)
    count.finish()
    stats = stats.all_gather_merge()
    if stats.num_items != num_samples:  # a masking/sharding bug would silently bias every metric
      raise RuntimeError(f"embedded {stats.num_items} generated images, expected {num_samples}")
    return stats

  def evaluate(self, variables, *, num_samples: int, seed: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics and details (reference file and count, timings) of the network ``variables``.

    Every process must call it; all get the same result.

    Returns:
      ({'fid', 'kid', 'precision', 'recall', 'num_samples'} as floats (the optional ones only when
      enabled; KID not ×10³), details for the JSON record).
    """
    t0 = time.time()
    real = self.reference_stats()
    t_ref = time.time()
    fake = self.generated_stats(variables, num_samples=num_samples, seed=seed)
    t_gen = time.time()
    results = {"fid": fid_lib.fid_from_feature_stats(real, fake)}
    if self.kid:
      results["kid"] = fid_lib.kid(real.features, fake.features)
    if self.precision_recall:
      results["precision"], results["recall"] = fid_lib.precision_recall(real.features, fake.features)
    results["num_samples"] = float(fake.num_items)
    results = {k: float(v) for k, v in results.items()}
    details = {"reference_stats": str(self.reference.path), "reference_num_images": int(real.num_items),
               "batch_size": self.batch_for(num_samples), "seed": int(seed),
               "time_reference_s": round(t_ref - t0, 3), "time_generate_and_embed_s": round(t_gen - t_ref, 3),
               "time_metrics_s": round(time.time() - t_gen, 3)}
    return results, details

  def __call__(self, variables, *, num_samples: int, seed: int) -> dict[str, float]:
    """The metrics only (see :meth:`evaluate`)."""
    return self.evaluate(variables, num_samples=num_samples, seed=seed)[0]
