"""Dataset registry: embedded digits, TFDS datasets on disk, image folders, fail-fast errors, no TF.

TFDS data: ``prepare_dataset.write_synthetic_tfds_dataset`` writes a REAL TFDS dataset (ArrayRecord
files + dataset_info.json, the registered builder's features and version) with random content into a
temporary data dir, without TensorFlow; the code under test reads it exactly as it reads the real
one. One test also checks that ``tfds.testing.mock_data`` (used by trainer tests) passes through.
"""
from __future__ import annotations

import pathlib
import sys

import ml_collections
import numpy as np
import PIL.Image
import pytest

from configs import default
from patch_diffusion.config_validation import ConfigError
from patch_diffusion.data import datasets
from patch_diffusion.tools import prepare_dataset


def _cfg(**overrides) -> ml_collections.ConfigDict:
  c = default.get_config().data
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
  d = tmp_path_factory.mktemp("tfds")
  prepare_dataset.write_synthetic_tfds_dataset("celeb_a", str(d), {"train": 10, "test": 3})
  prepare_dataset.write_synthetic_tfds_dataset("cifar10", str(d), {"train": 6})
  return str(d)


def test_digits_offline_1797_examples():
  source, info = datasets.get_data_source(_cfg(name="digits", resolution=16, num_channels=3, use_labels=True))
  assert len(source) == info.num_examples == 1797
  assert (info.resolution, info.num_channels, info.num_classes) == (16, 3, 10)
  images = np.stack([source[i]["image"] for i in range(0, 1797, 50)])
  assert images.shape == (36, 16, 16, 3) and images.dtype == np.uint8
  assert images.min() == 0 and images.max() >= 250  # white strokes on black
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # gray replicated
  assert sorted({source[i]["label"] for i in range(1797)}) == list(range(10))
  # Unlabelled by default: the trainer sees 0 classes.
  _, info = datasets.get_data_source(_cfg(name="digits", resolution=32))
  assert info.num_classes == 0 and info.label_names == ()


def test_digits_values_follow_sklearn():
  from sklearn import datasets as sk  # pylint: disable=g-import-not-at-top

  reference = sk.load_digits()
  images, labels = datasets.load_sklearn_digits()  # read from scikit-learn's file without importing it
  np.testing.assert_array_equal(images, reference.images)
  np.testing.assert_array_equal(labels, reference.target)
  source, _ = datasets.get_data_source(_cfg(name="digits", resolution=8, num_channels=1))
  np.testing.assert_array_equal(source[7]["image"][..., 0], np.round(reference.images[7] * 255 / 16).astype(np.uint8))
  assert [source[i]["label"] for i in range(5)] == list(reference.target[:5])


def test_digits_load_without_importing_sklearn():
  # scikit-learn's import costs ≈2 s of every demo start; the embedded data is a CSV inside it.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  code = ("import sys\nfrom patch_diffusion.data import datasets\n"
          "images, labels = datasets.load_sklearn_digits()\n"
          "print(images.shape, labels.shape, 'sklearn' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
  assert out.stdout.split() == ["(1797,", "8,", "8)", "(1797,)", "False"]


def test_tfds_celeb_a_on_disk(tfds_dir):
  source, info = datasets.get_data_source(_cfg(name="celeb_a", data_dir=tfds_dir, resolution=16))
  assert info.num_examples == len(source) == 10 and info.num_classes == 0
  rec = source[3]
  assert rec["image"].shape == (218, 178, 3) and rec["image"].dtype == np.uint8  # raw, not yet cropped
  assert "celeb_a" in info.description and info.split == "train"
  _, test_info = datasets.get_data_source(_cfg(name="celeb_a", data_dir=tfds_dir, split="test", resolution=16))
  assert test_info.num_examples == 3


def test_tfds_labels(tfds_dir):
  source, info = datasets.get_data_source(_cfg(name="cifar10", data_dir=tfds_dir, resolution=32, use_labels=True))
  assert info.num_classes == 10
  assert all(0 <= source[i]["label"] < 10 for i in range(len(source)))
  with pytest.raises(datasets.DatasetError, match="no ClassLabel 'label'"):
    datasets.get_data_source(_cfg(name="celeb_a", data_dir=tfds_dir, use_labels=True))


def test_max_examples_takes_first_n(tfds_dir):
  full, _ = datasets.get_data_source(_cfg(name="celeb_a", data_dir=tfds_dir))
  sub, info = datasets.get_data_source(_cfg(name="celeb_a", data_dir=tfds_dir, max_examples=4))
  assert len(sub) == info.num_examples == 4
  for i in range(4):
    np.testing.assert_array_equal(sub[i]["image"], full[i]["image"])
  with pytest.raises(IndexError):
    sub[4]  # pylint: disable=pointless-statement
  with pytest.raises(datasets.DatasetError, match="exceeds the 10 images"):
    datasets.get_data_source(_cfg(name="celeb_a", data_dir=tfds_dir, max_examples=11))


def test_unknown_dataset_lists_known_names():
  with pytest.raises(datasets.UnknownDatasetError) as e:
    datasets.get_data_source(_cfg(name="celebaa"))
  msg = str(e.value)
  for name in ("digits", "folder", "celeb_a", "cifar10"):
    assert name in msg
  assert "Did you mean: celeb_a" in msg


def test_unprepared_dataset_names_the_prepare_command(tmp_path):
  with pytest.raises(datasets.DatasetNotPreparedError) as e:
    datasets.get_data_source(_cfg(name="celeb_a", data_dir=str(tmp_path)))
  msg = str(e.value)
  assert "'celeb_a'" in msg and str(tmp_path) in msg
  assert f"python -m patch_diffusion.tools.prepare_dataset --name celeb_a --data_dir {tmp_path}" in msg
  assert "pip install -e '.[prepare]'" in msg  # the optional extra that brings TensorFlow
  assert f"{tmp_path}/downloads/manual" in msg  # CelebA's Google Drive fallback


def test_unprepared_manual_download_dataset_shows_instructions(tmp_path):
  with pytest.raises(datasets.DatasetNotPreparedError, match=r"(?s)--name imagenet2012 .*ILSVRC2012_img_train\.tar"):
    datasets.get_data_source(_cfg(name="imagenet2012", data_dir=str(tmp_path), resolution=64))


def test_missing_split(tfds_dir):
  with pytest.raises(datasets.DatasetError, match=r"no split 'valid'; available: train, test"):
    datasets.get_data_source(_cfg(name="celeb_a", data_dir=tfds_dir, split="valid"))


@pytest.mark.parametrize("overrides, error, match", [
    (dict(max_examples=-1), ConfigError, r"data.max_examples = -1: must be >= 0"),
    (dict(resolution=0), ConfigError, r"data.resolution = 0: must be > 0"),
    (dict(resolution=-8), ConfigError, r"data.resolution = -8: must be > 0"),
    (dict(resolution=32.0), ConfigError, r"data.resolution = 32.0: must be an integer"),
    (dict(num_channels=2), ConfigError, r"data.num_channels = 2: must be 1 or 3"),
    (dict(name=""), ConfigError, r"data.name = '': must be a non-empty string"),
    (dict(num_workers=-1), ConfigError, r"data.num_workers = -1: must be >= 0"),
    (dict(xflip="yes"), ConfigError, r"data.xflip = 'yes': must be True or False"),
    (dict(split="test"), datasets.DatasetError, "single split 'train'"),
    (dict(max_examples=1798), datasets.DatasetError, "exceeds the 1797 images"),
])
def test_bad_config_values(overrides, error, match):
  # A plain dict, so that wrongly typed values get past ConfigDict's own type check.
  with pytest.raises(error, match=match):
    datasets.get_data_source({**_cfg().to_dict(), **overrides})


def test_folder_dataset_errors_and_labels(tmp_path):
  with pytest.raises(datasets.DatasetError, match="data.folder is empty"):
    datasets.get_data_source(_cfg(name="folder", folder=""))
  with pytest.raises(datasets.DatasetError, match="does not exist"):
    datasets.get_data_source(_cfg(name="folder", folder=str(tmp_path / "nope")))
  (tmp_path / "empty").mkdir()
  with pytest.raises(datasets.DatasetError, match="contains no image files"):
    datasets.get_data_source(_cfg(name="folder", folder=str(tmp_path / "empty")))
  for cls in ("a", "b", "c"):
    (tmp_path / "lab" / cls).mkdir(parents=True)
    PIL.Image.new("RGB", (9, 7), (1, 2, 3)).save(tmp_path / "lab" / cls / "x.png")
  source, info = datasets.get_data_source(
      _cfg(name="folder", folder=str(tmp_path / "lab"), resolution=4, use_labels=True, data_dir=str(tmp_path / "dd"))
  )
  assert (info.num_examples, info.num_classes, info.label_names) == (3, 3, ("a", "b", "c"))
  assert source[2]["image"].shape == (4, 4, 3) and source[2]["label"] == 2
  PIL.Image.new("RGB", (9, 7)).save(tmp_path / "flat.png")
  (tmp_path / "flatdir").mkdir()
  (tmp_path / "flat.png").rename(tmp_path / "flatdir" / "flat.png")
  with pytest.raises(datasets.DatasetError, match="has no labels"):
    datasets.get_data_source(_cfg(name="folder", folder=str(tmp_path / "flatdir"), resolution=4, use_labels=True))


def test_tfds_mock_data_passes_through():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    source, info = datasets.get_data_source(_cfg(name="celeb_a", data_dir="/nonexistent", resolution=16))
    assert info.num_examples == 5 and source[0]["image"].shape == (218, 178, 3)


def test_prepare_cli(tmp_path, capsys):
  assert prepare_dataset.main(["--name", "digits"]) == 0
  PIL.Image.new("L", (10, 6), 7).save(tmp_path / "one.png")
  (tmp_path / "bad.jpg").write_bytes(b"xx")
  assert prepare_dataset.main(["--name", "folder", "--folder", str(tmp_path), "--resolution", "4"]) == 0
  out = capsys.readouterr().out
  assert "converted: 1 of 2 image files" in out and "1 skipped: bad.jpg" in out
  assert prepare_dataset.main(["--name", "folder", "--folder", str(tmp_path), "--resolution", "4"]) == 0
  assert "reused existing cache" in capsys.readouterr().out
  assert prepare_dataset.main(["--name", "folder", "--folder", str(tmp_path / "nope"), "--resolution", "4"]) == 1
  assert "does not exist" in capsys.readouterr().err
  assert prepare_dataset.main(["--name", "no_such_dataset_xyz"]) == 1


def test_no_tensorflow_imported():
  # Runs after the TFDS tests of this module: reading TFDS data never imported TensorFlow.
  assert "tensorflow" not in sys.modules


def test_synthetic_dataset_layout(tfds_dir):
  files = sorted(p.name for p in (pathlib.Path(tfds_dir) / "celeb_a" / "2.1.0").iterdir())
  assert "dataset_info.json" in files and any(".array_record-" in f for f in files)
