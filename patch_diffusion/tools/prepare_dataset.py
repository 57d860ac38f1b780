"""Prepares datasets for training, once, so that training never needs TensorFlow or the network.

Usage:
  # A TFDS dataset, written in ArrayRecord format (random access) into DIR:
  python -m patch_diffusion.tools.prepare_dataset --name celeb_a --data_dir DIR
  python -m patch_diffusion.tools.prepare_dataset --name cifar10 --data_dir DIR
  # A manual-download TFDS dataset: put its files in DIR/downloads/manual (or --manual_dir) first.

  # An image folder, converted to R x R x C PNG records in an ArrayRecord file (with a report of
  # the files that could not be read); training with name='folder' reuses it:
  python -m patch_diffusion.tools.prepare_dataset --name folder --folder /path/to/images \
      --resolution 64 [--num_channels 3] [--data_dir DIR]

TensorFlow: preparing a TFDS dataset runs TFDS's downloader and builder code, which use TensorFlow
(``tf.io.gfile``, and some builders encode images with TF). Install the optional extra for this
step only: ``pip install -e '.[prepare]'``. Image folders and the embedded 'digits' demo need no
TensorFlow at all, and neither does training.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import PIL.Image

from patch_diffusion.data import datasets
from patch_diffusion.data import image_folder
from patch_diffusion.tools import cli


def prepare_tfds(name: str, data_dir: str = "", manual_dir: str = "") -> Any:
  """Downloads and prepares TFDS dataset ``name`` in ArrayRecord format into ``data_dir``.

  Returns:
    The prepared builder. Raises ModuleNotFoundError (with the install hint) when TensorFlow is
    needed but missing.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = os.path.expanduser(data_dir) or None
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise datasets.UnknownDatasetError(f"{name!r} is not a TFDS dataset (`tfds.list_builders()` lists them)") from e
  if builder.is_prepared():
    print(f"{name}: already prepared at {builder.data_dir}")
    return builder
  config = tfds.download.DownloadConfig(manual_dir=os.path.expanduser(manual_dir) if manual_dir else None)
  try:
    builder.download_and_prepare(download_config=config, file_format="array_record")
  except ModuleNotFoundError as e:
    if "tensorflow" in str(e):
      raise ModuleNotFoundError(
          f"preparing TFDS dataset {name!r} needs TensorFlow (TFDS's downloader/builder use it). Install the "
          f"optional extra and run this command again: pip install -e '.[{datasets.PREPARE_EXTRA}]' "
          "(TensorFlow is needed for this one-off step only, never for training)"
      ) from e
    raise
  return builder


# ---------------------------------------------------------------------------------------------
# Synthetic TFDS datasets: real on-disk TFDS ArrayRecord datasets with random content, written
# without TensorFlow. Used by tests (and handy to smoke-test a launch without downloading).
# ---------------------------------------------------------------------------------------------


def _default_image(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
  return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _synthetic_value(feature: Any, rng: np.random.Generator, image_fn: Callable[..., np.ndarray],
                     default_hw: tuple[int, int]) -> Any:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if isinstance(feature, tfds.features.FeaturesDict):
    return {k: _synthetic_value(f, rng, image_fn, default_hw) for k, f in feature.items()}
  if isinstance(feature, tfds.features.Image):
    h, w, c = feature.shape
    shape = (h or default_hw[0], w or default_hw[1], c or 3)
    arr = np.asarray(image_fn(rng, shape), np.uint8).reshape(shape)
    # Handing TFDS a PIL image makes it encode with PIL, not TensorFlow.
    return PIL.Image.fromarray(arr[:, :, 0] if shape[2] == 1 else arr)
  if isinstance(feature, tfds.features.ClassLabel):
    return int(rng.integers(0, feature.num_classes))
  if isinstance(feature, tfds.features.Text):
    return "synthetic"
  if isinstance(feature, tfds.features.Tensor):
    shape = tuple(1 if d is None else d for d in feature.shape)
    return np.zeros(shape, feature.np_dtype)
  raise NotImplementedError(f"no synthetic value for feature {type(feature).__name__}")


def write_synthetic_tfds_dataset(
    name: str,
    data_dir: str,
    split_sizes: Mapping[str, int],
    *,
    seed: int = 0,
    image_fn: Callable[[np.random.Generator, tuple[int, int, int]], np.ndarray] | None = None,
    default_hw: tuple[int, int] = (40, 30),
) -> str:
  """Writes a REAL TFDS ArrayRecord dataset named ``name`` (registered features, random content).

  The dataset has exactly the features, version and file layout of the registered TFDS builder
  (e.g. celeb_a's 218x178 RGB images and attributes), so ``tfds.builder(name, data_dir=...)`` and
  ``get_data_source`` read it exactly as they would read the real data. Needs no TensorFlow.

  Args:
    name: registered TFDS name (e.g. 'celeb_a', 'cifar10').
    data_dir: TFDS data dir to write into.
    split_sizes: examples per split, e.g. {'train': 16, 'test': 4}.
    seed: content seed.
    image_fn: (rng, (H, W, C)) -> uint8 [H, W, C] image content (default: uniform noise).
    default_hw: size used for image dimensions the feature leaves unknown.

  Returns:
    The dataset's directory (``data_dir/name/version``).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  base = tfds.builder_cls(name)
  sizes = dict(split_sizes)
  make_image = image_fn or _default_image

  class _Synthetic(base, skip_registration=True):  # type: ignore[misc,valid-type]
    """The registered builder with its downloads replaced by random examples."""

    # No checksums file to look up: nothing is downloaded. (Also sidesteps TFDS's code-path probe,
    # which needs the optional `importlib_resources` package for editable installs.)
    code_path = None

    @classmethod
    def _get_pkg_dir_path(cls):  # metadata (citation, tags) of the real builder
      return base._get_pkg_dir_path()  # pylint: disable=protected-access

    def _split_generators(self, dl_manager):  # pylint: disable=unused-argument
      return {split: self._generate_examples(split=split, n=n) for split, n in sizes.items()}

    def _generate_examples(self, split, n):  # pylint: disable=arguments-differ
      rng = np.random.default_rng([seed, sum(map(ord, split))])
      for i in range(n):
        yield f"{split}-{i}", _synthetic_value(self.info.features, rng, make_image, default_hw)

  _Synthetic.name = base.name
  builder = _Synthetic(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return str(builder.data_dir)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m patch_diffusion.tools.prepare_dataset",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="See docs/DATA.md for datasets, options and the preprocessing rules.",
  )
  p.add_argument("--name", required=True, help="TFDS name (celeb_a, cifar10, ...), 'folder' or 'digits'")
  p.add_argument("--data_dir", default="", help="TFDS data dir / image-folder cache root ('' = TFDS default, "
                 "or <folder>/.patch_diffusion_cache for folders)")
  p.add_argument("--manual_dir", default="", help="TFDS manual-download dir (default DATA_DIR/downloads/manual)")
  p.add_argument("--folder", default="", help="image folder (name=folder)")
  p.add_argument("--resolution", type=cli.nonnegative_int, default=0,
                 help="R for name=folder (images stored R x R)")
  p.add_argument("--num_channels", type=int, choices=(1, 3), default=3, help="C for name=folder: 1 or 3")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status (0 ok, 1 data error, 2 missing TensorFlow)."""
  args = _parser().parse_args(argv)
  try:
    if args.name == datasets.DIGITS:
      print("digits is embedded in scikit-learn: nothing to prepare")
      return 0
    if args.name == datasets.FOLDER:
      if args.resolution <= 0:
        print("error: --resolution R (> 0) is required for --name folder", file=sys.stderr)
        return 1
      conv = image_folder.prepare_image_folder(
          args.folder, resolution=args.resolution, num_channels=args.num_channels, data_dir=args.data_dir
      )
      state = "reused existing cache" if conv.reused else "converted"
      print(f"{state}: {conv.num_examples} of {conv.num_files} image files -> {conv.cache_dir}")
      print(f"skipped: {image_folder.describe_skipped(conv.skipped, first=20)}")
      if conv.class_names:
        print(f"labels from sub-folders: {len(conv.class_names)} classes ({', '.join(conv.class_names[:10])}"
              f"{', ...' if len(conv.class_names) > 10 else ''})")
      return 0
    builder = prepare_tfds(args.name, args.data_dir, args.manual_dir)
    splits = ", ".join(f"{k}: {v.num_examples}" for k, v in builder.info.splits.items())
    print(f"{args.name}: prepared at {builder.data_dir} ({splits})")
    return 0
  except ModuleNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (ValueError, OSError) as e:  # DatasetError, ImageFolderError, unreadable paths
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
