"""Sample-quality evaluation: TF-FID Inception-v3 features, FID / KID / precision-recall, reference stats.

Typical use (see docs/EVALUATION.md)::

  params = load_inception_params()                       # ~/.cache/patch_diffusion/inception_fid.npz
  feature_fn = make_feature_fn(params, mesh)             # uint8 NHWC -> [N, 2048] float32
  real = load_or_compute_reference_stats(
      reference_stats_path(data_dir, dataset=name, resolution=R),
      lambda: create_eval_iterator(...), feature_fn, dataset=name, resolution=R)
  fake = FeatureStats(capture_features=True, max_items=50_000)
  for images, mask in samples: fake.append(feature_fn(images), mask)
  fake = fake.all_gather_merge()
  fid_from_feature_stats(real, fake); kid(real.features, fake.features); precision_recall(...)
"""
from __future__ import annotations

from patch_diffusion.evaluation.inception import (FEATURE_DIM, FEATURE_NET_ID, InceptionV3, host_local_rows,
                                                  make_feature_fn, preprocess, resize_bilinear_nv)
from patch_diffusion.evaluation.inception_weights import (FETCH_COMMAND, InceptionWeightsNotFoundError,
                                                          default_cache_path, load_inception_params,
                                                          read_source, save_npz)
from patch_diffusion.evaluation.metrics import (FeatureStats, fid_from_feature_stats, fid_from_stats, kid,
                                                knn_radii, precision_recall)
from patch_diffusion.evaluation.reference import (compute_reference_stats, load_or_compute_reference_stats,
                                                  reference_stats_path)

__all__ = [
    "FEATURE_DIM", "FEATURE_NET_ID", "FETCH_COMMAND", "FeatureStats", "InceptionV3",
    "InceptionWeightsNotFoundError", "compute_reference_stats", "default_cache_path",
    "fid_from_feature_stats", "fid_from_stats", "host_local_rows", "kid", "knn_radii",
    "load_inception_params", "load_or_compute_reference_stats", "make_feature_fn", "precision_recall",
    "preprocess", "read_source", "reference_stats_path", "resize_bilinear_nv", "save_npz",
]
