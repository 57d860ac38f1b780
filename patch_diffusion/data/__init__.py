"""Input data: dataset registry (datasets), per-host grain pipeline (input_pipeline), image folders.

The public names below are re-exported lazily (PEP 562), so importing ``patch_diffusion.data.patches``
does not pay for importing grain (about a second).
"""
from __future__ import annotations

from patch_diffusion import lazy

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


__getattr__, __dir__ = lazy.exports(__name__, _EXPORTS, globals())
