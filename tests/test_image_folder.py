"""Image folders: conversion rules per file kind, skipped-file report, cache reuse, clear errors."""
from __future__ import annotations

import io
import json
import logging
import os
import pathlib

import numpy as np
import PIL.Image
import pytest

from patch_diffusion.data import image_folder
from patch_diffusion.data import preprocess
from helpers import write_png16_rgb

R = 8


def _encoded(img: PIL.Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _bands(w: int, h: int) -> np.ndarray:
  """RGB image whose centred square is green and whose two leftover bands are red and blue."""
  arr = np.zeros((h, w, 3), np.uint8)
  arr[...] = (0, 255, 0)
  if w > h:
    off = (w - h) // 2
    arr[:, :off] = (255, 0, 0)
    arr[:, off + h :] = (0, 0, 255)
  else:
    off = (h - w) // 2
    arr[:off] = (255, 0, 0)
    arr[off + w :] = (0, 0, 255)
  return arr


@pytest.fixture()
def messy_folder(tmp_path: pathlib.Path) -> pathlib.Path:
  """One file per case of the bad-input list: good, grayscale, CMYK, 16-bit, RGBA, non-square, broken."""
  d = tmp_path / "imgs"
  d.mkdir()
  rng = np.random.default_rng(0)
  PIL.Image.fromarray(np.full((12, 12, 3), (10, 20, 30), np.uint8)).save(d / "a_rgb.png")
  PIL.Image.fromarray(np.full((12, 12), 100, np.uint8), "L").save(d / "b_gray.png")
  PIL.Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(d / "c_cmyk.jpg", quality=95)  # pure red in CMYK
  PIL.Image.fromarray(np.full((12, 12), 30000, np.uint16)).save(d / "d_gray16.png")
  write_png16_rgb(d / "e_rgb16.png", np.full((12, 12, 3), (0xABCD, 0x1234, 0xFFFF), np.uint16))
  rgba = np.zeros((12, 12, 4), np.uint8)
  rgba[..., 2] = 255  # blue...
  rgba[:, :6, 3] = 255  # ...opaque on the left half, fully transparent on the right half
  PIL.Image.fromarray(rgba, "RGBA").save(d / "f_rgba.png")
  PIL.Image.fromarray(_bands(40, 20)).save(d / "g_wide.png")
  PIL.Image.fromarray(_bands(20, 40)).save(d / "h_tall.png")
  noise = PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
  jpg = _encoded(noise, "JPEG", quality=90)
  (d / "x_truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
  png = _encoded(noise, "PNG")
  (d / "y_truncated.png").write_bytes(png[: len(png) // 2])
  (d / "z_corrupt.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
  (d / "z_empty.jpg").write_bytes(b"")
  (d / "notes.txt").write_text("not an image")
  (d / ".DS_Store").write_bytes(b"\0\0")
  return d


def _records(conv: image_folder.FolderConversion) -> dict[str, np.ndarray]:
  meta = json.loads((pathlib.Path(conv.cache_dir) / "metadata.json").read_text())
  src = image_folder.ImageFolderSource(conv.cache_dir)
  return {name: src[i]["image"] for i, name in enumerate(meta["files"])}


def test_conversion_handles_every_kind_and_reports_broken_files(messy_folder, caplog):
  caplog.set_level(logging.WARNING)
  conv = image_folder.prepare_image_folder(messy_folder, resolution=R, num_channels=3)
  assert not conv.reused
  assert conv.num_files == 12  # .txt and hidden files are not image files
  assert conv.num_examples == 8
  assert sorted(f for f, _ in conv.skipped) == ["x_truncated.jpg", "y_truncated.png", "z_corrupt.png", "z_empty.jpg"]
  assert all(reason for _, reason in conv.skipped)
  report = " ".join(r.getMessage() for r in caplog.records)
  assert "4 of 12" in report and "x_truncated.jpg" in report and "z_corrupt.png" in report

  imgs = _records(conv)
  for img in imgs.values():
    assert img.shape == (R, R, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(imgs["a_rgb.png"], np.full((R, R, 3), (10, 20, 30)))
  np.testing.assert_array_equal(imgs["b_gray.png"], np.full((R, R, 3), 100))  # gray replicated
  assert np.abs(imgs["c_cmyk.jpg"].astype(int) - (255, 0, 0)).max() <= 8  # CMYK -> RGB (JPEG is lossy)
  np.testing.assert_array_equal(imgs["d_gray16.png"], np.full((R, R, 3), round(30000 * 255 / 65535)))
  np.testing.assert_array_equal(imgs["e_rgb16.png"], np.full((R, R, 3), (0xAB, 0x12, 0xFF)))
  rgba = imgs["f_rgba.png"]
  np.testing.assert_array_equal(rgba[:, 0], np.full((R, 3), (0, 0, 255)))  # opaque blue stays blue
  np.testing.assert_array_equal(rgba[:, -1], np.full((R, 3), 255))  # transparent -> white background
  # Non-square: the centre square is green, the cropped-away bands are red and blue.
  np.testing.assert_array_equal(imgs["g_wide.png"], np.full((R, R, 3), (0, 255, 0)))
  np.testing.assert_array_equal(imgs["h_tall.png"], np.full((R, R, 3), (0, 255, 0)))

  # The report is kept with the cache.
  meta = json.loads((pathlib.Path(conv.cache_dir) / "metadata.json").read_text())
  assert len(meta["skipped"]) == 4 and meta["num_ignored_non_image_files"] == 1


def test_single_channel_conversion(messy_folder):
  conv = image_folder.prepare_image_folder(messy_folder, resolution=R, num_channels=1)
  imgs = _records(conv)
  assert imgs["b_gray.png"].shape == (R, R, 1)
  np.testing.assert_array_equal(imgs["b_gray.png"], 100)
  # RGB (10, 20, 30) -> ITU-R 601-2 luma, as PIL computes it.
  expected = np.asarray(PIL.Image.new("RGB", (1, 1), (10, 20, 30)).convert("L"))[0, 0]
  np.testing.assert_array_equal(imgs["a_rgb.png"], expected)


def test_cache_is_reused_and_invalidated_by_changes(messy_folder, tmp_path):
  first = image_folder.prepare_image_folder(messy_folder, resolution=R, num_channels=3)
  again = image_folder.prepare_image_folder(messy_folder, resolution=R, num_channels=3)
  assert again.reused and again.cache_dir == first.cache_dir and again.skipped == first.skipped
  assert pathlib.Path(first.cache_dir).parent == messy_folder / image_folder.CACHE_SUBDIR
  other_r = image_folder.prepare_image_folder(messy_folder, resolution=R * 2, num_channels=3)
  assert not other_r.reused and other_r.cache_dir != first.cache_dir
  PIL.Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(messy_folder / "new.png")
  changed = image_folder.prepare_image_folder(messy_folder, resolution=R, num_channels=3)
  assert not changed.reused and changed.num_examples == first.num_examples + 1
  # With a data_dir, the cache goes there and the image folder stays untouched.
  elsewhere = image_folder.prepare_image_folder(messy_folder, resolution=R, num_channels=3,
                                                data_dir=str(tmp_path / "dd"))
  assert pathlib.Path(elsewhere.cache_dir).is_relative_to(tmp_path / "dd")


def test_labels_from_subfolders(tmp_path):
  for cls, value in (("cats", 10), ("dogs", 200)):
    (tmp_path / cls).mkdir()
    for i in range(2):
      PIL.Image.fromarray(np.full((6, 6, 3), value + i, np.uint8)).save(tmp_path / cls / f"{i}.png")
  conv = image_folder.prepare_image_folder(tmp_path, resolution=4, num_channels=3)
  assert conv.class_names == ("cats", "dogs")
  src = image_folder.ImageFolderSource(conv.cache_dir)
  assert [src[i]["label"] for i in range(len(src))] == [0, 0, 1, 1]
  assert [int(src[i]["image"][0, 0, 0]) for i in range(len(src))] == [10, 11, 200, 201]


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "contains no image files"),
])
def test_missing_and_empty_folder(tmp_path, make, match):
  (tmp_path / "readme.txt").write_text("no images here")
  with pytest.raises(image_folder.ImageFolderError, match=match):
    image_folder.prepare_image_folder(make(tmp_path), resolution=R, num_channels=3)


def test_folder_of_only_broken_images(tmp_path):
  (tmp_path / "a.png").write_bytes(b"garbage")
  (tmp_path / "b.jpg").write_bytes(b"")
  with pytest.raises(image_folder.ImageFolderError, match=r"none of its 2 image files could be read.*a\.png"):
    image_folder.prepare_image_folder(tmp_path, resolution=R, num_channels=3)
  assert not list((tmp_path / image_folder.CACHE_SUBDIR).iterdir())  # no half-written cache left behind


def test_path_is_a_file(tmp_path):
  f = tmp_path / "x.png"
  PIL.Image.new("RGB", (2, 2)).save(f)
  with pytest.raises(image_folder.ImageFolderError, match="not a directory"):
    image_folder.prepare_image_folder(f, resolution=R, num_channels=3)


def test_exif_orientation_applied(tmp_path):
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
  PIL.Image.new("RGB", (30, 20), (50, 60, 70)).save(tmp_path / "p.jpg", exif=exif)
  assert image_folder.load_image_file(tmp_path / "p.jpg", 3).shape == (30, 20, 3)


def test_to_uint8_channels_rules():
  f = preprocess.to_uint8_channels
  np.testing.assert_array_equal(f(np.array([[0, 65535, 32768]], np.uint16), 1)[..., 0], [[0, 255, 128]])
  np.testing.assert_array_equal(f(np.array([[0.0, 1.0, 2.0, -1.0]], np.float32), 1)[..., 0], [[0, 255, 255, 0]])
  np.testing.assert_array_equal(f(np.array([[True, False]]), 3)[0, :, 0], [255, 0])
  la = np.array([[[0, 0], [0, 255]]], np.uint8)  # black, transparent then opaque
  np.testing.assert_array_equal(f(la, 1)[0, :, 0], [255, 0])
  with pytest.raises(ValueError):
    f(np.zeros((4, 4, 5), np.uint8), 3)
  with pytest.raises(ValueError):
    f(np.zeros((4, 4, 3), np.uint8), 2)


def test_center_crop_matches_edm_indexing():
  # EDM: crop = min(H, W); rows (H - crop) // 2 : (H + crop) // 2, same for columns.
  rng = np.random.default_rng(1)
  for h, w in ((7, 4), (4, 7), (218, 178), (5, 5)):
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    crop = min(h, w)
    ref = img[(h - crop) // 2 : (h + crop) // 2, (w - crop) // 2 : (w + crop) // 2]
    np.testing.assert_array_equal(preprocess.center_crop_resize(img, crop), ref)
    resized = np.asarray(PIL.Image.fromarray(ref).resize((3, 3), PIL.Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(preprocess.center_crop_resize(img, 3), resized)


def test_cache_files_exist_and_temp_dirs_are_gone(messy_folder):
  conv = image_folder.prepare_image_folder(messy_folder, resolution=R, num_channels=3)
  names = sorted(os.listdir(pathlib.Path(conv.cache_dir).parent))
  assert names == [pathlib.Path(conv.cache_dir).name]
  assert sorted(os.listdir(conv.cache_dir)) == ["images.array_record", "metadata.json"]
