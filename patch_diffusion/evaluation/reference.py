"""Reference (real-data) feature statistics: computed once per dataset and resolution, then cached.

The batches come from the data side's evaluation iterator (``patch_diffusion.data``:
``create_eval_iterator(data_config, batch_size=...)``), which yields this process's share of the data as
dicts ``{'image': uint8 [B, R, R, C], 'mask': bool [B]}``; ``mask`` marks the padding rows of the last
batch. Any iterable of such dicts works.

The cache lives in the data directory, named and tagged with the dataset, split, resolution, number of
images and feature network, e.g. ``<data_dir>/fid_refs/celeb_a-train-64x64-full-tf_inception_v3_...npz``.
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import numpy as np

from patch_diffusion.evaluation import inception
from patch_diffusion.evaluation.fid import FeatureStats

PathLike = Union[str, os.PathLike]
FeatureFn = Callable[[np.ndarray], Any]

#: Keys that must agree between a cached file and the request for the cache to be used.
_MATCH_KEYS = ("dataset", "split", "resolution", "feature_net")


def compute_reference_stats(batches: Iterable[Mapping[str, Any]], feature_fn: FeatureFn, *,
                            meta: Optional[dict] = None, max_items: Optional[int] = None,
                            capture_features: bool = True, max_features: Optional[int] = 50_000,
                            dim: int = inception.FEATURE_DIM) -> FeatureStats:
  """Feature statistics of every image the iterator yields, combined over all JAX processes.

  Args:
    batches: iterable of {'image': [B, H, W, C] uint8 NHWC (this process's rows), 'mask': optional bool
      [B], False for padding}. Every process must yield the same number of equally sized batches.
    feature_fn: host-local images -> [B, D] features, e.g. :func:`inception.make_feature_fn`'s result
      (a collective in multi-host runs, hence the equal batch counts).
    meta: recorded as :attr:`FeatureStats.meta` (dataset, split, resolution, ...).
    max_items: stop after this many valid images over all processes (None = all). Counting uses the
      local count times the process count, so it is exact when every process holds the same number.
    capture_features: keep raw features for KID / precision-recall.
    max_features: cap on the captured features (float32, 8 KiB each).
    dim: feature dimension.
  Returns:
    :class:`FeatureStats` with the combined moments (identical on every process) and ``meta`` attached.
  """
  import jax  # local: only for the process count

  stats = FeatureStats(dim, capture_features=capture_features, max_items=max_features)
  n_proc = jax.process_count()
  for batch in batches:
    images = np.asarray(batch["image"])
    mask = batch.get("mask")
    mask = np.ones([images.shape[0]], bool) if mask is None else np.asarray(mask, bool).copy()
    if max_items is not None:
      # Drop rows past the budget (counted per process as a share of the global one).
      budget = max(0, -(-max_items // n_proc) - stats.num_items)
      valid = np.flatnonzero(mask)
      mask[valid[budget:]] = False
    stats.append(np.asarray(feature_fn(images)), mask)
    if max_items is not None and stats.num_items * n_proc >= max_items:
      break
  stats = stats.all_gather_merge()
  stats.meta = dict(meta or {}, num_items=stats.num_items)
  return stats


def _slug(s: Any) -> str:
  return re.sub(r"[^A-Za-z0-9_.]+", "_", str(s)).strip("_")


def reference_stats_path(data_dir: PathLike, *, dataset: str, resolution: int, split: str = "train",
                         num_images: Optional[int] = None,
                         feature_net: str = inception.FEATURE_NET_ID) -> pathlib.Path:
  """``<data_dir>/fid_refs/<dataset>-<split>-<R>x<R>-<n<N>|full>-<feature_net>.npz``."""
  count = "full" if num_images is None else f"n{int(num_images)}"
  res = f"{int(resolution)}x{int(resolution)}"
  name = f"{_slug(dataset)}-{_slug(split)}-{res}-{count}-{_slug(feature_net)}.npz"
  return pathlib.Path(data_dir).expanduser() / "fid_refs" / name


def load_or_compute_reference_stats(
    cache_path: PathLike, batches_fn: Callable[[], Iterable[Mapping[str, Any]]], feature_fn: FeatureFn, *,
    dataset: str, resolution: int, split: str = "train", num_images: Optional[int] = None,
    capture_features: bool = True, max_features: Optional[int] = 50_000,
    feature_net: str = inception.FEATURE_NET_ID, dim: int = inception.FEATURE_DIM) -> FeatureStats:
  """Loads cached reference statistics, or computes and caches them.

  A cached file is used only if its metadata matches (dataset, split, resolution, feature network, and
  ``num_images`` when given) and, when features are wanted, it holds them. Otherwise the statistics are
  computed with :func:`compute_reference_stats` (all processes) and written by process 0. The decision
  is taken on process 0 and broadcast, so processes never disagree about computing (which is a
  collective); the cache is assumed to be on a file system every process sees.

  Args:
    cache_path: the ``.npz`` path, usually :func:`reference_stats_path` under the data directory.
    batches_fn: returns a fresh iterable of batches (see :func:`compute_reference_stats`); called only
      when computing.
    feature_fn: see :func:`compute_reference_stats`.
    dataset, resolution, split: recorded in and checked against the file.
    num_images: use the first N images (over all processes); None = the whole split.
    capture_features, max_features: see :func:`compute_reference_stats`.
    feature_net: feature network id recorded in the file.
    dim: feature dimension.
  Returns:
    :class:`FeatureStats` with ``meta`` (dataset, split, resolution, num_items, feature_net).
  """
  import jax
  from jax.experimental import multihost_utils

  cache_path = pathlib.Path(cache_path).expanduser()
  want = {"dataset": dataset, "split": split, "resolution": int(resolution), "feature_net": feature_net}

  def usable() -> bool:
    if not cache_path.exists():
      return False
    try:
      stats, meta = FeatureStats.load(cache_path)
    except (OSError, ValueError, KeyError) as e:
      logging.warning("reference stats %s unreadable (%s); recomputing", cache_path, e)
      return False
    if any(meta.get(k) != v for k, v in want.items()):
      logging.warning("reference stats %s were made for %s, not %s; recomputing", cache_path,
                      {k: meta.get(k) for k in want}, want)
      return False
    if num_images is not None and meta.get("requested_images") != int(num_images):
      return False
    if num_images is None and meta.get("requested_images") is not None:
      return False
    if capture_features and not stats.capture_features:
      return False
    if stats.dim != dim:
      return False
    return True

  use_cache = usable() if jax.process_index() == 0 else False
  if jax.process_count() > 1:
    use_cache = bool(multihost_utils.broadcast_one_to_all(np.asarray(use_cache)))
  if use_cache:
    stats, _ = FeatureStats.load(cache_path)
    logging.info("reference stats: loaded %s (%d images)", cache_path, stats.num_items)
    return stats

  meta = dict(want, requested_images=None if num_images is None else int(num_images))
  stats = compute_reference_stats(batches_fn(), feature_fn, meta=meta, max_items=num_images,
                                  capture_features=capture_features, max_features=max_features, dim=dim)
  if num_images is not None and stats.num_items < num_images:
    logging.warning("reference stats: asked for %d images, the split has %d", num_images, stats.num_items)
  if jax.process_index() == 0:
    stats.save(cache_path)
    logging.info("reference stats: wrote %s (%d images)", cache_path, stats.num_items)
  return stats
