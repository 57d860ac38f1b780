"""Input data: dataset registry (datasets), per-host grain pipeline (input_pipeline), image folders.

The public names below are re-exported lazily (PEP 562), so importing ``patch_diffusion.data.patches``
does not pay for importing grain (about a second).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DatasetError": "datasets",
    "DatasetInfo": "datasets",
    "DatasetNotPreparedError": "datasets",
    "UnknownDatasetError": "datasets",
    "get_data_source": "datasets",
    "known_datasets": "datasets",
    "prepare_command": "datasets",
    "validate_data_config": "datasets",
    "ImageFolderError": "image_folder",
    "prepare_image_folder": "image_folder",
    "EvalIterator": "input_pipeline",
    "TrainIterator": "input_pipeline",
    "create_eval_iterator": "input_pipeline",
    "create_train_iterator": "input_pipeline",
    "measure_throughput": "input_pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
  return sorted([*globals(), *_EXPORTS])
