"""Image folders -> an ArrayRecord cache at the training resolution, served as a random-access source.

A folder of image files is converted ONCE into an ArrayRecord file in a cache directory (PNG records at
the training resolution), with a report of the files that could not be read (named in a warning and in the
cache's ``metadata.json``); :class:`ImageFolderSource` serves that cache. The pixel conversion rules (bit
depths, alpha, colour spaces, EXIF orientation, centre crop + Lanczos resize) are those of
``preprocess.py``, shared with every other source; docs/DATA.md lists them.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import uuid
from typing import Any, Sequence

from absl import logging
import numpy as np
import PIL.Image
import PIL.ImageFile

from patch_diffusion.data import preprocess

#: Bumped whenever the cached record format or the conversion rules change (invalidates caches).
CACHE_FORMAT_VERSION = 1
#: Name of the cache folder made inside the image folder when no data_dir is given.
CACHE_SUBDIR = ".patch_diffusion_cache"
_RECORDS_FILE = "images.array_record"
_METADATA_FILE = "metadata.json"
#: How many skipped files are named in log messages and errors.
_REPORT_FIRST = 5


class ImageFolderError(ValueError):
  """An image folder cannot be used (missing, empty, unreadable, not writable)."""


# ---------------------------------------------------------------------------------------------
# One image.
# ---------------------------------------------------------------------------------------------


def load_image_file(path: str | os.PathLike[str], num_channels: int) -> np.ndarray:
  """Reads one image file fully and converts it to uint8 [H, W, C].

  Raises:
    OSError / ValueError / PIL.UnidentifiedImageError / PIL.Image.DecompressionBombError for
    unreadable, truncated or absurdly large files.
  """
  if PIL.ImageFile.LOAD_TRUNCATED_IMAGES:
    # Some library switched PIL to silently pad truncated files with grey; we report them instead.
    logging.log_first_n(
        logging.WARNING, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated files are not detected", 1
    )
  with PIL.Image.open(path) as image:
    return preprocess.pil_to_array(image, num_channels)


# ---------------------------------------------------------------------------------------------
# Image folder -> ArrayRecord cache.
# ---------------------------------------------------------------------------------------------


def image_extensions() -> frozenset[str]:
  """Lower-case file extensions (with the dot) that PIL can open."""
  PIL.Image.init()
  return frozenset(ext.lower() for ext in PIL.Image.registered_extensions())


@dataclasses.dataclass(frozen=True)
class FolderScan:
  """The image files of a folder, in sorted order, and their class names.

  Attributes:
    root: absolute folder path.
    files: paths relative to root ('/'-separated), sorted.
    labels: class index per file (0 when the folder is unlabelled).
    class_names: sorted top-level sub-folder names when every image lies in a sub-folder and
      there are at least two of them; () otherwise.
    num_ignored: files without an image extension (not converted, counted in the log).
    key: hex digest over (root, files, sizes, mtimes) that names the cache.
  """

  root: str
  files: tuple[str, ...]
  labels: tuple[int, ...]
  class_names: tuple[str, ...]
  num_ignored: int
  key: str


def scan_image_folder(folder: str | os.PathLike[str]) -> FolderScan:
  """Lists the image files of a folder (recursively, skipping hidden entries such as the cache).

  Raises:
    ImageFolderError: the folder is missing, is not a directory, or holds no image file.
  """
  if not str(folder):
    raise ImageFolderError("data.folder is empty: set --config.data.folder=/path/to/images for name='folder'")
  root = pathlib.Path(folder).expanduser().resolve()
  if not root.exists():
    raise ImageFolderError(f"image folder does not exist: {root}")
  if not root.is_dir():
    raise ImageFolderError(f"image folder is not a directory: {root}")
  exts = image_extensions()
  files: list[str] = []
  ignored = 0
  digest = hashlib.sha256(f"v{CACHE_FORMAT_VERSION}\0{root}\0".encode())
  visited: set[str] = set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    # Symlinked folders are followed (datasets are often assembled from links), each real folder
    # once, so a link cycle cannot make the walk endless.
    real = os.path.realpath(dirpath)
    if real in visited:
      dirnames[:] = []
      continue
    visited.add(real)
    # Hidden folders (our own cache among them, .git, ...) are never data.
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in filenames:
      if name.startswith("."):
        continue
      if os.path.splitext(name)[1].lower() not in exts:
        ignored += 1
        continue
      files.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
  files.sort()
  if not files:
    raise ImageFolderError(
        f"image folder {root} contains no image files (looked recursively for {len(exts)} extensions "
        f"such as .png/.jpg/.webp; {ignored} other files ignored)"
    )
  for rel in files:
    st = os.stat(root / rel)
    digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())

  tops = [rel.split("/", 1)[0] if "/" in rel else None for rel in files]
  if None not in tops and len(set(tops)) >= 2:
    class_names = tuple(sorted(set(tops)))
    index = {n: i for i, n in enumerate(class_names)}
    labels = tuple(index[t] for t in tops)
  else:
    class_names = ()
    labels = (0,) * len(files)
  return FolderScan(
      root=str(root), files=tuple(files), labels=labels, class_names=class_names,
      num_ignored=ignored, key=digest.hexdigest(),
  )


@dataclasses.dataclass(frozen=True)
class FolderConversion:
  """Result of :func:`prepare_image_folder`.

  Attributes:
    cache_dir: folder holding images.array_record and metadata.json.
    num_examples: images converted (records in the cache).
    num_files: image files found.
    skipped: (relative path, reason) for each file that could not be read.
    class_names: see FolderScan.
    reused: True when an existing cache was used and nothing was converted.
  """

  cache_dir: str
  num_examples: int
  num_files: int
  skipped: tuple[tuple[str, str], ...]
  class_names: tuple[str, ...]
  reused: bool


def _encode_one(path: str, resolution: int, num_channels: int) -> bytes:
  image = preprocess.center_crop_resize(load_image_file(path, num_channels), resolution)
  buf = io.BytesIO()
  mode = "L" if num_channels == 1 else "RGB"
  PIL.Image.fromarray(image[:, :, 0] if num_channels == 1 else image, mode).save(
      buf, format="PNG", compress_level=1
  )
  return buf.getvalue()


def _skip_reason(err: BaseException) -> str:
  text = str(err).strip() or type(err).__name__
  return f"{type(err).__name__}: {text}"[:200]


def cache_dir_for(scan: FolderScan, resolution: int, num_channels: int, data_dir: str = "") -> pathlib.Path:
  """Where the converted cache of ``scan`` lives: under data_dir if given, else inside the folder."""
  base = pathlib.Path(data_dir).expanduser() / "image_folders" if data_dir else pathlib.Path(scan.root) / CACHE_SUBDIR
  name = f"{pathlib.Path(scan.root).name or 'root'}-{resolution}x{resolution}x{num_channels}-{scan.key[:16]}"
  return base / name


def prepare_image_folder(
    folder: str | os.PathLike[str],
    *,
    resolution: int,
    num_channels: int,
    data_dir: str = "",
    num_threads: int | None = None,
) -> FolderConversion:
  """Converts an image folder once into ``images.array_record`` (PNG records at R x R x C).

  The cache is keyed by the folder's absolute path, its image file names, sizes and mtimes, R and
  C, so adding, removing or touching a file triggers a fresh conversion and an unchanged folder is
  reused. Unreadable files (corrupt, truncated, unsupported) are skipped; their count and the first
  few names are logged and stored in metadata.json. The cache is written to a temporary folder and
  renamed into place, so concurrent converters (several hosts on a shared file system) never see a
  half-written cache.

  Args:
    folder: the image folder (searched recursively; hidden entries skipped).
    resolution: R, the side of the stored square images.
    num_channels: C, 1 or 3.
    data_dir: cache root; '' puts the cache in ``<folder>/.patch_diffusion_cache``.
    num_threads: decode threads (default: CPU count).

  Returns:
    A FolderConversion.

  Raises:
    ImageFolderError: missing/empty folder, no readable image, or an unwritable cache location.
  """
  if resolution <= 0:
    raise ImageFolderError(f"resolution must be positive, got {resolution}")
  if num_channels not in (1, 3):
    raise ImageFolderError(f"num_channels must be 1 or 3, got {num_channels}")
  scan = scan_image_folder(folder)
  cache = cache_dir_for(scan, resolution, num_channels, data_dir)
  if (cache / _METADATA_FILE).is_file():
    return _reuse(scan, cache)
  tmp = _new_tmp_folder(cache)
  logging.info("image folder %s: converting %d files to %dx%dx%d ArrayRecord in %s",
               scan.root, len(scan.files), resolution, resolution, num_channels, cache)
  try:
    files, labels, skipped = _write_records(scan, tmp / _RECORDS_FILE, resolution, num_channels, num_threads)
    meta = {
        "format_version": CACHE_FORMAT_VERSION, "folder": scan.root, "resolution": resolution,
        "num_channels": num_channels, "num_files": len(scan.files), "num_examples": len(files),
        "num_ignored_non_image_files": scan.num_ignored, "class_names": list(scan.class_names),
        "labels": labels, "files": files, "skipped": [{"file": f, "reason": r} for f, r in skipped],
    }
    (tmp / _METADATA_FILE).write_text(json.dumps(meta))
    try:
      os.rename(tmp, cache)
    except OSError:
      if not (cache / _METADATA_FILE).is_file():
        raise
      # Another process finished the same conversion first; its cache is identical.
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  _log_conversion(scan, cache, len(files), skipped)
  return FolderConversion(cache_dir=str(cache), num_examples=len(files), num_files=len(scan.files),
                          skipped=tuple(skipped), class_names=scan.class_names, reused=False)


def _reuse(scan: FolderScan, cache: pathlib.Path) -> FolderConversion:
  meta = json.loads((cache / _METADATA_FILE).read_text())
  conv = FolderConversion(
      cache_dir=str(cache), num_examples=int(meta["num_examples"]), num_files=int(meta["num_files"]),
      skipped=tuple((s["file"], s["reason"]) for s in meta["skipped"]),
      class_names=tuple(meta["class_names"]), reused=True,
  )
  logging.info("image folder %s: reusing converted cache %s (%d images, %d skipped)",
               scan.root, cache, conv.num_examples, len(conv.skipped))
  return conv


def _new_tmp_folder(cache: pathlib.Path) -> pathlib.Path:
  try:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".tmp-{cache.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
  except OSError as e:
    raise ImageFolderError(
        f"cannot create the image-folder cache under {cache.parent} ({e}); set "
        "--config.data.data_dir to a writable directory"
    ) from e
  return tmp


def _write_records(scan: FolderScan, path: pathlib.Path, resolution: int, num_channels: int,
                   num_threads: int | None) -> tuple[list[str], list[int], list[tuple[str, str]]]:
  """Decodes every file in parallel and writes the readable ones in order; (files, labels, skipped).

  Raises:
    ImageFolderError: no file could be read.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  files: list[str] = []
  labels: list[int] = []
  skipped: list[tuple[str, str]] = []
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  threads = num_threads or min(32, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
    # Bounded windows keep memory flat for huge folders while PIL decodes in parallel (it releases the
    # GIL); order is preserved so record i is the i-th readable file.
    window = max(64, 8 * threads)
    for start in range(0, len(scan.files), window):
      rels = scan.files[start : start + window]
      futures = [pool.submit(_encode_one, os.path.join(scan.root, rel), resolution, num_channels)
                 for rel in rels]
      for rel, label, fut in zip(rels, scan.labels[start : start + window], futures):
        try:
          record = fut.result()
        except Exception as e:  # pylint: disable=broad-except
          skipped.append((rel, _skip_reason(e)))
          continue
        writer.write(record)
        files.append(rel)
        labels.append(label)
  writer.close()
  if not files:
    raise ImageFolderError(f"image folder {scan.root}: none of its {len(scan.files)} image files could be read "
                           f"({describe_skipped(skipped)})")
  return files, labels, skipped


def _log_conversion(scan: FolderScan, cache: pathlib.Path, kept: int, skipped: list) -> None:
  if skipped:
    logging.warning(
        "image folder %s: %d of %d image files could not be read and were skipped -- %s "
        "(full list in %s)",
        scan.root, len(skipped), len(scan.files), describe_skipped(skipped), cache / _METADATA_FILE,
    )
  if scan.num_ignored:
    logging.info("image folder %s: ignored %d files without an image extension", scan.root, scan.num_ignored)
  logging.info("image folder %s: converted %d images into %s", scan.root, kept, cache)


class ImageFolderSource:
  """Random-access source over a converted image folder (grain-compatible, picklable).

  ``source[i]`` -> {'image': uint8 [R, R, C], 'label': int}.
  """

  def __init__(self, cache_dir: str | os.PathLike[str]):
    self._cache_dir = str(cache_dir)
    meta = json.loads((pathlib.Path(cache_dir) / _METADATA_FILE).read_text())
    self._num_channels = int(meta["num_channels"])
    self._labels = np.asarray(meta["labels"], dtype=np.int32)
    self._folder_name = pathlib.Path(meta["folder"]).name
    self._key = pathlib.Path(cache_dir).name
    self.class_names: tuple[str, ...] = tuple(meta["class_names"])
    self.resolution = int(meta["resolution"])
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self._records = array_record_data_source.ArrayRecordDataSource([str(pathlib.Path(cache_dir) / _RECORDS_FILE)])
    if len(self._records) != len(self._labels):
      raise ImageFolderError(
          f"corrupt image-folder cache {cache_dir}: {len(self._records)} records but {len(self._labels)} labels; "
          "delete the folder to convert again"
      )

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    with PIL.Image.open(io.BytesIO(self._records[index])) as image:
      arr = np.asarray(image)
    if arr.ndim == 2:
      arr = arr[:, :, None]
    return {"image": arr, "label": int(self._labels[index])}

  def __repr__(self) -> str:
    # Stable across runs and machines (grain compares it when restoring an iterator state).
    return f"ImageFolderSource(cache={self._key!r}, num_examples={len(self)})"


def describe_skipped(skipped: Sequence[tuple[str, str]], first: int = _REPORT_FIRST) -> str:
  """'N skipped: a.png (reason); b.jpg (reason); ...' for reports."""
  if not skipped:
    return "0 skipped"
  names = "; ".join(f"{f} ({r})" for f, r in skipped[:first])
  more = f"; ... {len(skipped) - first} more" if len(skipped) > first else ""
  return f"{len(skipped)} skipped: {names}{more}"
