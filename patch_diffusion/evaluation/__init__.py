"""Sample-quality evaluation: TF-FID Inception-v3 features, FID / KID / precision-recall, reference stats.

Typical use (see docs/EVALUATION.md)::

  params = load_inception_params()                       # <user cache>/inception_fid.npz
  feature_fn = make_feature_fn(params, mesh)             # uint8 NHWC -> [N, 2048] float32
  real = load_or_compute_reference_stats(
      reference_stats_path(data_dir, dataset=name, resolution=R),
      lambda: create_eval_iterator(...), feature_fn, dataset=name, resolution=R)
  fake = FeatureStats(capture_features=True, max_items=50_000)
  for images, mask in samples: fake.append(feature_fn(images), mask)
  fake = fake.all_gather_merge()
  fid_from_feature_stats(real, fake); kid(real.features, fake.features); precision_recall(...)

or, for a generator, ``Evaluator`` (what ``--mode=eval`` and the in-training eval use). The public names
are re-exported lazily (PEP 562): importing one submodule does not import the others.
"""
from __future__ import annotations

from patch_diffusion import lazy

_EXPORTS = {
    **dict.fromkeys(["FEATURE_DIM", "FEATURE_NET_ID", "InceptionV3", "host_local_rows", "make_feature_fn",
                     "preprocess", "resize_bilinear_nv"], "inception"),
    **dict.fromkeys(["FETCH_COMMAND", "InceptionWeightsNotFoundError", "default_cache_path",
                     "load_inception_params", "read_source", "save_npz"], "inception_weights"),
    **dict.fromkeys(["FeatureStats", "fid_from_feature_stats", "fid_from_stats", "kid", "knn_radii",
                     "precision_recall"], "fid"),
    **dict.fromkeys(["Evaluator", "ReferenceData"], "evaluator"),
    **dict.fromkeys(["compute_reference_stats", "load_or_compute_reference_stats", "reference_stats_path"],
                    "reference"),
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy.exports(__name__, _EXPORTS, globals())
