"""Dataset registry: names -> random-access sources of raw image records, checked before training.

Three kinds of dataset, all served as grain-compatible random-access sources (``len`` +
``__getitem__``) whose records are ``{'image': uint8 [H, W, c], 'label': int}``:

* ``'digits'``: scikit-learn's 1,797 handwritten 8x8 digits, shipped inside the package (offline),
  upscaled to R x R in memory; 10 classes. The embedded demo.
* ``'folder'``: an image folder (``data.folder``), converted once to ArrayRecord (image_folder.py).
* any other name: a TFDS dataset prepared in ArrayRecord format in ``data.data_dir``, read through
  ``builder.as_data_source`` (no TensorFlow at run time). ``celeb_a`` and ``cifar10`` are the
  documented ones; any TFDS dataset with an image feature works.

:func:`get_data_source` validates the data config and fails fast, before any compilation, with an
error that says what to do (the prepare command for an unprepared TFDS dataset, the known names for
an unknown one).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import os
from typing import Any, Sequence

from absl import logging
import numpy as np
import PIL.Image

from patch_diffusion import config_validation
from patch_diffusion import user_cache
from patch_diffusion.data import image_folder

#: Names served without TFDS.
DIGITS = "digits"
FOLDER = "folder"
#: TFDS datasets this project documents and has configs for (any TFDS image dataset works).
DOCUMENTED_TFDS = ("celeb_a", "cifar10")
#: pip extra that brings TensorFlow for the one-off TFDS preparation step (never needed to train).
PREPARE_EXTRA = "prepare"
PREPARE_MODULE = "patch_diffusion.tools.prepare_dataset"

# Per-dataset notes shown when a TFDS dataset is not prepared.
_PREPARE_NOTES = {
    "celeb_a": (
        "CelebA is downloaded from Google Drive, which often refuses automated downloads (quota). "
        "If the command fails, download img_align_celeba.zip, list_eval_partition.txt, "
        "list_attr_celeba.txt, list_landmarks_align_celeba.txt and identity_CelebA.txt from "
        "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into {data_dir}/downloads/manual/ "
        "and run the command again."
    ),
}


class DatasetError(ValueError):
  """The data config cannot be served (bad value, unknown name, missing split, ...)."""


class UnknownDatasetError(DatasetError):
  """The dataset name is neither built in nor a TFDS dataset."""


class DatasetNotPreparedError(DatasetError):
  """A TFDS dataset exists but is not prepared (in ArrayRecord format) in the data dir."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset.

  Attributes:
    name: dataset name as configured ('digits', 'folder', a TFDS name).
    num_examples: images served (after ``max_examples``).
    resolution: R; images are served as uint8 [R, R, C].
    num_channels: C (1 or 3).
    num_classes: label classes, 0 when unlabelled or ``use_labels`` is False.
    description: one human-readable line (source, split, counts).
    split: the split read.
    label_names: class names when known and labels are used, else ().
  """

  name: str
  num_examples: int
  resolution: int
  num_channels: int
  num_classes: int
  description: str
  split: str = "train"
  label_names: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 handwritten digits: (images float64 [N, 8, 8] in 0..16, labels int32 [N]).

  Reads the CSV that scikit-learn installs (``sklearn/datasets/data/digits.csv.gz``: 64 pixel values and
  the label per row), the file ``sklearn.datasets.load_digits`` parses, without importing scikit-learn:
  its import costs ≈2 s of every run's start-up. Falls back to ``load_digits`` if the file moves.
  """
  spec = importlib.util.find_spec("sklearn")  # locates the package without executing it
  if spec is None:
    raise DatasetError("the embedded 'digits' dataset ships with scikit-learn, which is not installed: "
                       "pip install scikit-learn (a dependency of this package; reinstall it with pip install -e .)")
  for folder in spec.submodule_search_locations or ():
    path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
      table = np.loadtxt(path, delimiter=",")
      return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int32)
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

  digits = sk_datasets.load_digits()
  return digits.images, digits.target.astype(np.int32)


class DigitsSource:
  """scikit-learn's handwritten digits, upscaled once to uint8 [R, R, C] (white on black).

  The 8x8 images hold integers 0..16; they are mapped to 0..255 (v * 255 / 16, rounded) and
  upscaled with PIL bicubic resampling, which gives smooth strokes without Lanczos' ringing.
  """

  NUM_EXAMPLES = 1797
  NUM_CLASSES = 10
  #: Records are final and in memory: readers need no threads.
  in_memory = True

  def __init__(self, resolution: int, num_channels: int):
    values, labels = load_sklearn_digits()
    small = np.round(values * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [N, 8, 8]
    images = np.empty((len(small), resolution, resolution, num_channels), np.uint8)
    for i, img in enumerate(small):
      up = np.asarray(PIL.Image.fromarray(img, "L").resize((resolution, resolution), PIL.Image.Resampling.BICUBIC))
      images[i] = up[:, :, None]
    self._images = images
    self._labels = labels
    self._resolution = resolution

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self._images[index], "label": int(self._labels[index])}

  def __repr__(self) -> str:
    return f"DigitsSource(resolution={self._resolution}, num_channels={self._images.shape[-1]})"


class TfdsImageSource:
  """Keeps the image and label of a TFDS data source's examples: {'image', 'label'}."""

  def __init__(self, source: Sequence[Any], *, name: str, split: str, image_key: str, label_key: str | None):
    self._source = source
    self._name = name
    self._split = split
    self._image_key = image_key
    self._label_key = label_key
    self._len = len(source)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._source[index]
    label = int(ex[self._label_key]) if self._label_key else 0
    return {"image": np.asarray(ex[self._image_key]), "label": label}

  def __repr__(self) -> str:
    # Names the data, not where it lives, so a moved data_dir still restores an iterator state.
    return f"TfdsImageSource({self._name!r}, split={self._split!r}, num_examples={self._len})"


class SubsetSource:
  """The first ``n`` records of a source (the data-efficiency setting ``max_examples``)."""

  def __init__(self, source: Sequence[Any], n: int):
    if not 0 < n <= len(source):
      raise ValueError(f"subset size {n} outside [1, {len(source)}]")
    self._source = source
    self._n = n

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < self._n:
      raise IndexError(f"index {index} outside [0, {self._n})")
    return self._source[index]

  @property
  def in_memory(self) -> bool:
    return bool(getattr(self._source, "in_memory", False))

  def __repr__(self) -> str:
    return f"{self._source!r}[:{self._n}]"


# ---------------------------------------------------------------------------------------------
# Validation and messages.
# ---------------------------------------------------------------------------------------------


def validate_data_config(data_config: Any) -> None:
  """Checks the values of ``config.data`` that need no I/O (``config_validation.validate_data``).

  Raises:
    config_validation.ConfigError: naming the field and the fix.
  """
  config_validation.validate_data(data_config)


def known_datasets() -> list[str]:
  """Names documented by this project (any other TFDS image dataset works too)."""
  return [DIGITS, FOLDER, *DOCUMENTED_TFDS]


def prepare_command(name: str, data_dir: str) -> str:
  """The exact shell command that prepares TFDS dataset ``name`` into ``data_dir``."""
  return f"python -m {PREPARE_MODULE} --name {name} --data_dir {data_dir}"


def dataset_id(data_config: Any) -> str:
  """A stable name for the configured data at its channel count (what derived files are keyed by).

  TFDS and built-in datasets use their name; an image folder ``folder_<basename>_<sha1 of its absolute
  path>``; ``_gray`` is appended for 1-channel data (its grayscale version of the images).
  """
  name = data_config["name"]
  if name == FOLDER:
    folder = os.path.abspath(os.path.expanduser(data_config["folder"]))
    digest = hashlib.sha1(folder.encode()).hexdigest()[:8]
    name = f"folder_{os.path.basename(folder.rstrip(os.sep))}_{digest}"
  return name + ("_gray" if int(data_config["num_channels"]) == 1 else "")


def derived_data_dir(data_config: Any) -> str:
  """Where files derived from the data (FID reference statistics, latent datasets) are cached.

  ``data.data_dir`` if set; else the TFDS default data dir, the image folder's own cache folder, or the
  user cache folder for the embedded digits.
  """
  given = os.path.expanduser(data_config["data_dir"] or "")
  if given:
    return given
  if data_config["name"] == DIGITS:
    return str(user_cache.cache_dir())
  if data_config["name"] == FOLDER:
    return os.path.join(os.path.abspath(os.path.expanduser(data_config["folder"])), image_folder.CACHE_SUBDIR)
  return default_tfds_data_dir()


def default_tfds_data_dir() -> str:
  """$TFDS_DATA_DIR or ~/tensorflow_datasets, as TFDS resolves it."""
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top

  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or constants.DATA_DIR)


def _unknown_name_error(name: str) -> UnknownDatasetError:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # Community datasets are left out: listing them reaches for GCS and TensorFlow.
  candidates = [*known_datasets(), *tfds.list_builders(with_community_datasets=False)]
  close = list(dict.fromkeys(difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)))
  hint = f" Did you mean: {', '.join(close)}?" if close else ""
  return UnknownDatasetError(
      f"unknown dataset {name!r}. Known: {', '.join(known_datasets())} (built in: '{DIGITS}' embedded demo, "
      f"'{FOLDER}' for an image folder), or any TFDS dataset with an image feature "
      f"(`tfds.list_builders()`).{hint}"
  )


def _not_prepared_error(builder: Any, name: str, data_dir: str, reason: str) -> DatasetNotPreparedError:
  lines = [
      f"TFDS dataset {name!r} is not prepared in data dir {data_dir} ({reason}).",
      "Prepare it once (ArrayRecord format, random access) with:",
      f"  {prepare_command(name, data_dir)}",
      f"That one-off step runs TFDS's downloader and builder, which need TensorFlow: install the optional "
      f"extra first with `pip install -e '.[{PREPARE_EXTRA}]'` (training itself never imports TensorFlow).",
  ]
  manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if manual:
    lines.append(
        f"This dataset must be downloaded by hand first; put the files in {data_dir}/downloads/manual "
        f"(or pass --manual_dir). TFDS's instructions:\n  " + " ".join(str(manual).split())
    )
  note = _PREPARE_NOTES.get(name.split(":")[0].split("/")[0])
  if note:
    lines.append(note.format(data_dir=data_dir))
  return DatasetNotPreparedError("\n".join(lines))


def _find_image_key(features: Any, name: str) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  items = dict(features.items()) if hasattr(features, "items") else {}
  if isinstance(items.get("image"), tfds.features.Image):
    return "image"
  for key, feature in items.items():
    if isinstance(feature, tfds.features.Image):
      return key
  raise DatasetError(
      f"TFDS dataset {name!r} has no top-level image feature (features: {', '.join(items) or 'none'}); "
      "only image datasets can be trained on"
  )


def _tfds_source(data_config: Any) -> tuple[Any, DatasetInfo]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = data_config["name"]
  split = data_config["split"]
  data_dir = os.path.expanduser(data_config["data_dir"] or "") or None
  shown_dir = data_dir or default_tfds_data_dir()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise _unknown_name_error(name) from e

  prepared = builder.is_prepared()
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except
    if not prepared:
      raise _not_prepared_error(builder, name, shown_dir, f"nothing found at {builder.data_dir}") from e
    if isinstance(e, NotImplementedError):
      raise _not_prepared_error(
          builder, name, shown_dir,
          f"it is prepared at {builder.data_dir} in {builder.info.file_format} format, which has no random "
          "access; prepare it into another data dir, or delete that copy first",
      ) from e
    if "split" in str(e).lower():
      raise DatasetError(
          f"TFDS dataset {name!r} has no split {split!r}; available: {', '.join(builder.info.splits)} "
          "(TFDS slicing such as 'train[:1000]' also works)"
      ) from e
    raise

  features = builder.info.features
  image_key = _find_image_key(features, name)
  label_key = None
  label_names: tuple[str, ...] = ()
  num_classes = 0
  if data_config["use_labels"]:
    label = dict(features.items()).get("label")
    if not isinstance(label, tfds.features.ClassLabel):
      raise DatasetError(
          f"data.use_labels=True but TFDS dataset {name!r} has no ClassLabel 'label' feature; "
          "set --config.data.use_labels=False"
      )
    label_key = "label"
    num_classes = int(label.num_classes)
    label_names = tuple(label.names) if label.names else ()
  wrapped = TfdsImageSource(source, name=name, split=split, image_key=image_key, label_key=label_key)
  desc = f"TFDS {builder.info.full_name} split {split!r} from {shown_dir}"
  return wrapped, _info(data_config, len(wrapped), num_classes, desc, label_names)


def _folder_source(data_config: Any) -> tuple[Any, DatasetInfo]:
  conv = image_folder.prepare_image_folder(
      data_config["folder"],
      resolution=int(data_config["resolution"]),
      num_channels=int(data_config["num_channels"]),
      data_dir=os.path.expanduser(data_config["data_dir"] or ""),
  )
  split = data_config["split"]
  if split != "train":
    raise DatasetError(f"an image folder has a single split 'train', got data.split={split!r}")
  if conv.skipped and conv.reused:
    # Repeat the report on every run, not only on the run that converted the folder.
    logging.warning("image folder %s: %s (files that could not be read)",
                    data_config["folder"], image_folder.describe_skipped(conv.skipped))
  source = image_folder.ImageFolderSource(conv.cache_dir)
  num_classes = 0
  label_names: tuple[str, ...] = ()
  if data_config["use_labels"]:
    if not conv.class_names:
      raise DatasetError(
          f"data.use_labels=True but image folder {data_config['folder']} has no labels (labels come "
          "from top-level sub-folder names, and every image must lie in one of at least two sub-folders); "
          "set --config.data.use_labels=False"
      )
    num_classes = len(conv.class_names)
    label_names = conv.class_names
  desc = (f"image folder {data_config['folder']} ({conv.num_files} image files, "
          f"{image_folder.describe_skipped(conv.skipped)}; cache {conv.cache_dir})")
  return source, _info(data_config, len(source), num_classes, desc, label_names)


def _digits_source(data_config: Any) -> tuple[Any, DatasetInfo]:
  split = data_config["split"]
  if split != "train":
    raise DatasetError(f"the digits dataset has a single split 'train' (all 1,797 images), got {split!r}")
  source = DigitsSource(int(data_config["resolution"]), int(data_config["num_channels"]))
  use_labels = bool(data_config["use_labels"])
  num_classes = DigitsSource.NUM_CLASSES if use_labels else 0
  names = tuple(str(i) for i in range(10)) if use_labels else ()
  desc = "scikit-learn handwritten digits (8x8, embedded), bicubic-upscaled"
  return source, _info(data_config, len(source), num_classes, desc, names)


def _info(data_config: Any, n: int, num_classes: int, desc: str, label_names: tuple[str, ...]) -> DatasetInfo:
  return DatasetInfo(
      name=data_config["name"], num_examples=n, resolution=int(data_config["resolution"]),
      num_channels=int(data_config["num_channels"]), num_classes=num_classes,
      description=desc, split=data_config["split"], label_names=label_names,
  )


def get_data_source(data_config: Any) -> tuple[Any, DatasetInfo]:
  """Opens the configured dataset as a random-access source of raw records.

  Args:
    data_config: ``config.data`` (name, folder, data_dir, split, resolution, num_channels, xflip,
      max_examples, use_labels, num_workers, prefetch).

  Returns:
    (source, info). ``source[i]`` is {'image': uint8 [H, W, c], 'label': int} -- not yet cropped or
    resized (digits and folder records already are R x R x C); ``len(source) == info.num_examples``.
    Labels are 0 unless ``use_labels``. The source is picklable (grain worker processes).

  Raises:
    DatasetError (a ValueError), with the fix in its message: bad config values, unknown dataset
    (UnknownDatasetError), TFDS dataset not prepared (DatasetNotPreparedError, with the exact
    prepare command), missing split, max_examples larger than the split, unusable image folder.
  """
  validate_data_config(data_config)
  name = data_config["name"]
  try:
    if name == DIGITS:
      source, info = _digits_source(data_config)
    elif name == FOLDER:
      source, info = _folder_source(data_config)
    else:
      source, info = _tfds_source(data_config)
  except image_folder.ImageFolderError as e:
    raise DatasetError(str(e)) from e

  if len(source) == 0:
    raise DatasetError(f"dataset {name!r} split {info.split!r} is empty")
  max_examples = int(data_config["max_examples"])
  if max_examples:
    if max_examples > len(source):
      raise DatasetError(
          f"data.max_examples={max_examples} exceeds the {len(source)} images of {name!r} split "
          f"{info.split!r}; use at most {len(source)} (0 = all)"
      )
    source = SubsetSource(source, max_examples)
    info = dataclasses.replace(
        info, num_examples=max_examples, description=f"{info.description}; first {max_examples} images"
    )
  logging.info("dataset %s: %d images at %dx%dx%d, %d classes -- %s", name, info.num_examples,
               info.resolution, info.resolution, info.num_channels, info.num_classes, info.description)
  return source, info
