"""Latent datasets: VAE posterior moments of an image dataset, stored once as ArrayRecord, read like images.

The official code encodes every minibatch with the Stable Diffusion VAE on every step
(``latent_dist.sample() * 0.18215``). Encoding once and drawing ``mean + std * eps`` per step gives the
same distribution for a fraction of the cost (docs/METHOD.md, "Latent space"): this module stores, per image, the
posterior mean and standard deviation at R/f (f = the VAE's downsampling factor, 8 for SD) and serves
them through the same grain pipeline as images; the train step draws the posterior sample
(``steps.py``) and everything downstream (patch crop, coordinates, batch multiplier) is one code path.

**Storage.** ``<folder>/part-p<process>-c<chunk>.array_record`` files, one record per image:
``int32 label`` then ``float16 mean [h, w, c]`` then ``float16 std [h, w, c]`` (little endian), and
``metadata.json`` (shape, count, VAE fingerprint and scaling factor, source dataset, x-flip) written last,
which marks the folder complete. float16 keeps 11 significant bits: a relative error of 5e-4 on values
of order 1-10 (SD latents have std ≈ 5 before scaling), far below the posterior noise the training
samples on top (std ≈ 0.05-0.5), at half the size of float32 (ImageNet-256: 2 × 32·32·4 values → 16 KiB
per image, 20 GiB for 1.28 M images, twice that with x-flip copies).

**Encoding** (:func:`encode_dataset`, ``python -m patch_diffusion.tools.encode_latents``) is sharded over
every device and host: each process encodes its contiguous shard in chunks; a chunk file is written
atomically, so an interrupted encoding resumes at its first missing chunk. With ``xflip`` every image is
also encoded mirrored, as a second record (latent-diffusion codebases flip at encoding time; flipping a
latent is not the latent of the flipped image).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from patch_diffusion import fileio
from patch_diffusion import parallel
from patch_diffusion import progress
from patch_diffusion.data import datasets
from patch_diffusion.data import input_pipeline

FORMAT_VERSION = 1
METADATA = "metadata.json"
_PART = re.compile(r"^part-p(\d+)-c(\d+)\.array_record$")


class LatentDatasetError(ValueError):
  """A latent dataset is missing, incomplete or does not match the run (VAE, shape, source)."""


def vae_fingerprint(vae_config, variables) -> str:
  """A short hash of a VAE's architecture and weights: latents are only valid for the VAE that made them."""
  h = hashlib.sha1(json.dumps(dataclasses.asdict(vae_config), sort_keys=True).encode())
  for leaf in jax.tree.leaves(variables):
    arr = np.asarray(leaf)
    h.update(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr.reshape(-1)[:4096]).tobytes())  # a sample of each array is enough
  return h.hexdigest()[:12]


def default_dir(pixel_data_config, fingerprint: str, xflip: bool) -> str:
  """``<derived data dir>/latents/<dataset id>-<split>-<R>px-vae<fingerprint>[-xflip]``."""
  d = pixel_data_config
  name = (f"{datasets.dataset_id(d)}-{d['split']}-{int(d['resolution'])}px-vae{fingerprint}"
          f"{'-xflip' if xflip else ''}")
  name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)
  return os.path.join(datasets.derived_data_dir(d), "latents", name)


# ---- record layout -------------------------------------------------------------------------------------


def encode_record(label: int, mean: np.ndarray, std: np.ndarray) -> bytes:
  return (np.int32(label).tobytes() + np.ascontiguousarray(mean, "<f2").tobytes()
          + np.ascontiguousarray(std, "<f2").tobytes())


def decode_record(blob: bytes, shape: tuple[int, int, int]) -> dict[str, Any]:
  n = int(np.prod(shape))
  values = np.frombuffer(blob, dtype="<f2", offset=4)
  if values.size != 2 * n:
    raise LatentDatasetError(f"a latent record holds {values.size} values, expected {2 * n} for shape {shape}; "
                             "the dataset was written for another shape: encode it again")
  return {"label": int(np.frombuffer(blob[:4], "<i4")[0]), "mean": values[:n].reshape(shape),
          "std": values[n:].reshape(shape)}


class LatentSource:
  """Random-access source over a complete latent dataset folder (grain-compatible, picklable).

  ``source[i]`` -> {'mean': float16 [h, w, c], 'std': float16 [h, w, c], 'label': int32 scalar}. Records
  are final (no preprocessing); ``is_latent`` tells the input pipeline so.
  """
  is_latent = True
  in_memory = False

  def __init__(self, folder: str, *, use_labels: bool = False):
    self.folder = str(folder)
    self.meta = read_metadata(folder)
    self.shape = tuple(self.meta["shape"])
    self._use_labels = use_labels
    files = [str(pathlib.Path(folder) / f) for f in self.meta["files"]]
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self._records = array_record_data_source.ArrayRecordDataSource(files)
    if len(self._records) != self.meta["num_records"]:
      raise LatentDatasetError(f"{folder}: {len(self._records)} records but metadata.json says "
                               f"{self.meta['num_records']}; encode the dataset again")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    rec = decode_record(self._records[index], self.shape)
    return {"mean": rec["mean"], "std": rec["std"],
            "label": np.int32(rec["label"] if self._use_labels else 0)}

  def __repr__(self) -> str:
    return f"LatentSource({pathlib.Path(self.folder).name!r}, num_records={len(self)})"


def read_metadata(folder: str) -> dict:
  path = pathlib.Path(folder) / METADATA
  if not path.is_file():
    raise LatentDatasetError(f"no complete latent dataset in {folder} (no {METADATA})")
  meta = json.loads(path.read_text())
  if meta.get("format_version") != FORMAT_VERSION:
    raise LatentDatasetError(f"{folder}: latent format {meta.get('format_version')} is not "
                             f"{FORMAT_VERSION}; encode the dataset again")
  return meta


# ---- encoding ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncodeSpec:
  """What to encode and with which VAE."""
  pixel_data_config: Any            # config.data at the VAE's image resolution and channel count
  vae_module: Any
  vae_variables: Any
  fingerprint: str
  scaling_factor: float
  xflip: bool = False
  batch_size: int = 64              # global images per encode call
  chunk_batches: int = 50           # batches per chunk file (the unit of resume)


def make_encode_fn(spec: EncodeSpec, mesh, dtype=jnp.float16) -> Callable:
  """Jitted ``uint8 [B, H, W, C] (sharded) -> (mean, std) [B, h, w, c]`` in ``dtype`` over ``mesh``
  (float16: what the latent dataset stores; float32 for encoding on the fly)."""
  from patch_diffusion.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  data = parallel.data_sharding(mesh)
  variables = jax.device_put(spec.vae_variables, parallel.replicated(mesh))

  def encode(images):
    mean, logvar = vae_lib.encode_moments(spec.vae_module, variables, images.astype(jnp.float32) / 127.5 - 1)
    return mean.astype(dtype), vae_lib.posterior_std(logvar).astype(dtype)

  return jax.jit(encode, out_shardings=(data, data))


def encode_dataset(spec: EncodeSpec, folder: str, mesh, *, num_threads: int = 8) -> dict:
  """Encodes the dataset into ``folder`` (resuming at the first missing chunk); returns its metadata.

  Every process must call it (encoding is sharded over all devices). Process 0 writes ``metadata.json``
  once every process's chunks exist.
  """
  folder = str(folder)
  meta_path = pathlib.Path(folder) / METADATA
  if meta_path.is_file():
    meta = read_metadata(folder)
    if meta["vae"] != spec.fingerprint:
      raise LatentDatasetError(f"{folder} holds latents of VAE {meta['vae']}, not of this VAE "
                               f"({spec.fingerprint}); delete it or choose another data.latent_dir")
    return meta
  source, info = datasets.get_data_source(spec.pixel_data_config)
  pre = input_pipeline.PreprocessedSource(source, info.resolution, info.num_channels, info.num_classes > 0)
  n_proc, proc = jax.process_count(), jax.process_index()
  local_batch = parallel.round_up(spec.batch_size, parallel.data_parallel_size(mesh)) // n_proc
  start, end = input_pipeline.eval_shard_bounds(len(pre), proc, n_proc)
  per_proc = math.ceil(len(pre) / n_proc)  # every process runs the same number of (collective) batches
  num_batches = math.ceil(per_proc / local_batch)
  num_chunks = math.ceil(num_batches / spec.chunk_batches)
  fileio.makedirs(folder)
  encode = make_encode_fn(spec, mesh)
  count = progress.CountProgress("encode latents", num_batches * local_batch * n_proc)
  shape = None
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for chunk in range(num_chunks):
      path = pathlib.Path(folder) / f"part-p{proc:03d}-c{chunk:05d}.array_record"
      batches = range(chunk * spec.chunk_batches, min((chunk + 1) * spec.chunk_batches, num_batches))
      if path.is_file():  # written by an earlier, interrupted run
        count.update(batches.stop * local_batch * n_proc)
        continue
      records = []
      for b in batches:
        idx = list(range(start + b * local_batch, min(start + (b + 1) * local_batch, end)))
        items = list(pool.map(pre.__getitem__, idx))
        shape, recs = _encode_batch(encode, mesh, items, local_batch, info, spec.xflip)
        records += recs
        count.update((b + 1) * local_batch * n_proc)
      _write_chunk(path, records)
  count.finish()
  parallel.barrier("latents_encoded")
  if shape is None:  # every chunk existed: read the shape back
    shape = _shape_of(spec, info)
  meta = _finish(folder, spec, info, shape)
  parallel.barrier("latents_metadata")
  return meta


def _encode_batch(encode, mesh, items: list[dict], local_batch: int, info, xflip: bool):
  """Encodes one padded batch (and its mirror when ``xflip``); returns (latent shape, records)."""
  r, c = info.resolution, info.num_channels
  images = np.zeros((local_batch, r, r, c), np.uint8)
  labels = [int(it["label"]) for it in items]
  for i, it in enumerate(items):
    images[i] = it["image"]
  variants = [images] + ([images[:, :, ::-1]] if xflip else [])
  records = []
  shape = None
  for imgs in variants:
    mean, std = encode(parallel.global_batch({"x": np.ascontiguousarray(imgs)}, mesh)["x"])
    mean, std = parallel.host_local_rows(mean), parallel.host_local_rows(std)
    shape = tuple(mean.shape[1:])
    records += [encode_record(labels[i], mean[i], std[i]) for i in range(len(items))]
  return shape, records


def _write_chunk(path: pathlib.Path, records: list[bytes]) -> None:
  """Writes one chunk file atomically (a temporary name, then a rename)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
  for rec in records:
    writer.write(rec)
  writer.close()
  os.replace(tmp, path)


def _shape_of(spec: EncodeSpec, info) -> tuple[int, int, int]:
  f = spec.vae_module.config.downsample_factor
  return (info.resolution // f, info.resolution // f, spec.vae_module.config.latent_channels)


def _finish(folder: str, spec: EncodeSpec, info, shape) -> dict:
  """Process 0 lists the chunk files (all processes') and writes metadata.json: the folder is complete."""
  files = sorted(p.name for p in pathlib.Path(folder).iterdir() if _PART.match(p.name))
  meta = {"format_version": FORMAT_VERSION, "shape": list(shape), "vae": spec.fingerprint,
          "scaling_factor": spec.scaling_factor, "xflip": spec.xflip, "source": info.description,
          "dataset": datasets.dataset_id(spec.pixel_data_config), "num_images": info.num_examples,
          "num_classes": info.num_classes, "files": files}
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
  meta["num_records"] = len(array_record_data_source.ArrayRecordDataSource(
      [str(pathlib.Path(folder) / f) for f in files]))
  if jax.process_index() == 0:
    fileio.write_json(pathlib.Path(folder) / METADATA, meta)
    logging.info("latent dataset %s: %d records of %s", folder, meta["num_records"], tuple(shape))
  return meta


def open_latent_source(folder: str, *, fingerprint: str, shape: tuple[int, int, int], use_labels: bool,
                       encode_command: str) -> tuple[LatentSource, datasets.DatasetInfo]:
  """Opens a complete latent dataset made by this VAE for latents of ``shape``.

  Raises:
    LatentDatasetError: missing or incomplete (naming ``encode_command``), made by another VAE, or of
      another shape.
  """
  if not (pathlib.Path(folder) / METADATA).is_file():
    raise LatentDatasetError(f"no latent dataset at {folder}. Encode it once with:\n  {encode_command}\n"
                             f"or set --config.data.latents=on_the_fly to encode every step (small runs)")
  source = LatentSource(folder, use_labels=use_labels)
  meta = source.meta
  if meta["vae"] != fingerprint:
    raise LatentDatasetError(f"{folder} holds latents of another VAE ({meta['vae']}, this one is "
                             f"{fingerprint}); encode again with this VAE:\n  {encode_command}")
  if tuple(meta["shape"]) != tuple(shape):
    raise LatentDatasetError(f"{folder} holds latents of shape {tuple(meta['shape'])}, the run needs "
                             f"{tuple(shape)} (data.resolution x data.resolution x data.num_channels)")
  info = datasets.DatasetInfo(name=f"latents:{meta['dataset']}", num_examples=len(source),
                              resolution=shape[0], num_channels=shape[2],
                              num_classes=int(meta["num_classes"]) if use_labels else 0,
                              description=f"{len(source)} latent records of {meta['source']} in {folder}")
  return source, info
