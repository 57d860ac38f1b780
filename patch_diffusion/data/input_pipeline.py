"""Per-host input pipeline: grain over a random-access source -> uint8 NHWC full-resolution batches.

Each JAX process reads its own contiguous shard of the split (grain ``ShardOptions``), shuffles it
with the seed (a fresh permutation each epoch), repeats forever, applies EDM's preprocessing (center
crop, Lanczos resize to R, conversion to C channels) and an optional x-flip, and batches. Patch
cropping happens later, on device, inside the compiled step.

The training iterator's position is a small JSON-serialisable dict (``get_state``/``set_state``),
so a resumed run continues with exactly the batches an uninterrupted run would have seen. Each
process saves its own state (the states of different processes differ).
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Iterator

from absl import logging
import grain
import numpy as np

from patch_diffusion.data import datasets
from patch_diffusion.data import preprocess

#: Version of the iterator-state layout; a state from another version is refused.
_STATE_VERSION = 1


class PreprocessedSource:
  """Applies EDM preprocessing to each record of a raw source, inside grain's reader threads.

  ``source[i]`` -> {'image': uint8 [R, R, C], 'label': int32 scalar} (+ 'index': int32 when
  ``with_index``). Doing the work here (not in a grain map) lets the read threads decode and resize
  in parallel; PIL releases the GIL for both.
  """

  def __init__(self, source: Any, resolution: int, num_channels: int, use_labels: bool, with_index: bool = False):
    self._source = source
    self._resolution = resolution
    self._num_channels = num_channels
    self._use_labels = use_labels
    self._with_index = with_index

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self._source[index]
    image = preprocess.to_uint8_channels(record["image"], self._num_channels)
    image = preprocess.center_crop_resize(image, self._resolution)
    label = int(record.get("label", 0)) if self._use_labels else 0
    out = {"image": image, "label": np.int32(label)}
    if self._with_index:
      out["index"] = np.int32(index)
    return out

  def __repr__(self) -> str:
    return (f"PreprocessedSource({self._source!r}, R={self._resolution}, C={self._num_channels}, "
            f"labels={self._use_labels}, index={self._with_index})")


class IndexedSource:
  """A source of final records (latent datasets: no preprocessing), plus 'index' when ``with_index``."""

  def __init__(self, source: Any, with_index: bool = False):
    self._source = source
    self._with_index = with_index

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    out = dict(self._source[index])
    if self._with_index:
      out["index"] = np.int32(index)
    return out

  def __repr__(self) -> str:
    return f"IndexedSource({self._source!r}, index={self._with_index})"


def training_records(source: Any, info: datasets.DatasetInfo, with_index: bool) -> Any:
  """What the train pipeline reads: preprocessed images, or a latent dataset's records as they are."""
  if getattr(source, "is_latent", False):
    return IndexedSource(source, with_index)
  return PreprocessedSource(source, info.resolution, info.num_channels, info.num_classes > 0, with_index)


class RandomXFlip(grain.transforms.RandomMap):
  """Mirrors the image left-right with probability 1/2.

  grain gives each record its own generator, seeded from (seed, position in the sampled stream),
  so flips are deterministic given the seed and independent of worker count and timing.
  """

  def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    if rng.random() < 0.5:
      element = dict(element)
      element["image"] = np.ascontiguousarray(element["image"][:, ::-1])
    return element


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count), got {process_index} of {process_count}")
  return int(process_index), int(process_count)


def _allow_grain_workers_outside_absl_app() -> None:
  """grain's worker processes read grain's absl flags; outside ``absl.app.run`` (tests, notebooks)
  nothing has parsed them, so mark them parsed and let them keep their defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def data_seed(seed: int) -> int:
  """The 31-bit grain seed derived from the config seed (grain wants a non-negative 32-bit int).

  Hashing keeps the data order decorrelated from the other streams that start from the same seed.
  """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  return int(np.random.SeedSequence([int(seed), 0x0DA7A]).generate_state(1, np.uint32)[0] >> 1)


def _read_options(data_config: Any, batch_size: int, in_memory: bool) -> grain.ReadOptions:
  """Reader threads (decode + crop + resize run in them) and read-ahead of ``prefetch`` batches."""
  prefetch = max(1, int(data_config["prefetch"]))
  buffer = prefetch * batch_size
  # In-memory records (digits) are final already: threads would only contend for the GIL. More
  # threads than buffered records cannot run in parallel (grain warns about it).
  threads = 0 if in_memory else min(16, buffer)
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)


class TrainIterator:
  """Endless iterator of training batches with exact resume.

  ``next(it)`` -> {'image': uint8 [B, R, R, C], 'label': int32 [B]} (+ 'index': int32 [B], the
  record indices, when created with ``with_index=True``).

  Attributes:
    info: the DatasetInfo.
    process_index, process_count, batch_size: this iterator's shard and per-process batch.
  """

  def __init__(self, loader: grain.DataLoader, info: datasets.DatasetInfo, fingerprint: dict[str, Any],
               process_index: int, process_count: int, batch_size: int):
    self._loader = loader
    self._it = iter(loader)
    self._fingerprint = fingerprint
    self.info = info
    self.process_index = process_index
    self.process_count = process_count
    self.batch_size = batch_size

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def close(self) -> None:
    """Stops grain's reader threads / worker processes now instead of at garbage collection."""
    inner = getattr(self._it, "_iterator", None)  # grain's dataset iterator behind DataLoaderIterator
    if inner is not None and hasattr(inner, "close"):
      inner.close()

  def __enter__(self) -> TrainIterator:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def get_state(self) -> dict[str, Any]:
    """The position as a JSON-serialisable dict (per process; save one per process)."""
    return {
        "version": _STATE_VERSION,
        "pipeline": dict(self._fingerprint),
        "grain": json.loads(self._it.get_state().decode()),
    }

  def set_state(self, state: dict[str, Any] | bytes | str) -> None:
    """Restores a position from :meth:`get_state` (a dict, or its JSON text/bytes).

    Raises:
      ValueError: the state comes from a pipeline with another dataset, seed, batch size, shard or
        worker count (it would not reproduce the same batches).
    """
    if isinstance(state, (bytes, bytearray)):
      state = state.decode()
    if isinstance(state, str):
      state = json.loads(state)
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION or "grain" not in state:
      raise ValueError("not an input-pipeline state from this version of patch_diffusion (missing 'grain'/'version')")
    saved = state.get("pipeline", {})
    diff = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
    if diff:
      details = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
      raise ValueError(f"input-pipeline state does not match this pipeline ({details})")
    self._it.set_state(json.dumps(state["grain"]).encode())


def _check_batch_size(batch_size: int) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  return int(batch_size)


def create_train_iterator(
    data_config: Any,
    *,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    with_index: bool = False,
    data: tuple[Any, datasets.DatasetInfo] | None = None,
) -> TrainIterator:
  """Creates this process's endless, shuffled, resumable training iterator.

  Args:
    data_config: ``config.data``.
    batch_size: B, images per batch on THIS process (the per-process share of the global batch).
    seed: config seed (>= 0); the same seed gives the same order and flips.
    process_index, process_count: this process's shard; default ``jax.process_index()`` /
      ``jax.process_count()``. Shards are contiguous, disjoint, and together cover the split.
    with_index: also yield 'index' (record indices into the source), for tests and debugging.
    data: an already opened ``get_data_source(data_config)`` result, to avoid opening twice.

  Returns:
    A TrainIterator yielding {'image': uint8 [B, R, R, C], 'label': int32 [B]}.

  Raises:
    DatasetError / ValueError: see ``datasets.get_data_source``; bad batch size, seed or shard.
  """
  batch_size = _check_batch_size(batch_size)
  process_index, process_count = _resolve_processes(process_index, process_count)
  source, info = data if data is not None else datasets.get_data_source(data_config)
  if len(source) < process_count:
    raise datasets.DatasetError(
        f"{len(source)} images cannot be split over {process_count} processes (each needs at least one)"
    )
  pre = training_records(source, info, with_index)
  latent = bool(getattr(source, "is_latent", False))
  shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=False)
  gseed = data_seed(seed)
  sampler = grain.samplers.IndexSampler(
      num_records=len(pre), shard_options=shard, shuffle=True, num_epochs=None, seed=gseed
  )
  operations: list[Any] = []
  if bool(data_config["xflip"]) and not latent:  # latent datasets hold their flipped copies already
    operations.append(RandomXFlip())
  operations.append(grain.transforms.Batch(batch_size=batch_size, drop_remainder=True))
  workers = int(data_config["num_workers"])
  if workers:
    _allow_grain_workers_outside_absl_app()
  in_memory = bool(getattr(source, "in_memory", False))
  loader = grain.DataLoader(
      data_source=pre,
      sampler=sampler,
      operations=operations,
      worker_count=workers,
      worker_buffer_size=max(1, int(data_config["prefetch"])),
      shard_options=shard,
      read_options=_read_options(data_config, batch_size, in_memory),
  )
  fingerprint = {
      "source": repr(pre), "num_examples": info.num_examples, "batch_size": batch_size, "seed": int(seed),
      "xflip": bool(data_config["xflip"]) and not latent, "process_index": process_index,
      "process_count": process_count, "num_workers": workers,
  }
  logging.info("train input: %s, process %d/%d shard of %d images, batch %d, xflip=%s, %d workers",
               info.name, process_index, process_count, info.num_examples, batch_size,
               fingerprint["xflip"], workers)
  return TrainIterator(loader, info, fingerprint, process_index, process_count, batch_size)


def eval_shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, end) of this process's contiguous eval shard (sizes differ by at most one)."""
  return (num_examples * process_index // process_count, num_examples * (process_index + 1) // process_count)


class EvalIterator:
  """One ordered pass over this process's shard, in padded batches with a validity mask.

  ``next(it)`` -> {'image': uint8 [B, R, R, C], 'label': int32 [B], 'mask': bool [B]} (+ 'index').
  Padding rows are zeros with mask False. Every process yields the same number of batches,
  ``len(it)``, so multi-process evaluation stays in lockstep even when shard sizes differ.
  """

  def __init__(self, dataset: Any, num_batches: int, batch_size: int, info: datasets.DatasetInfo, with_index: bool):
    self._dataset = dataset
    self._num_batches = num_batches
    self._batch_size = batch_size
    self._with_index = with_index
    self.info = info

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    b = self._batch_size
    r, c = self.info.resolution, self.info.num_channels
    produced = 0
    for batch in self._dataset:
      n = len(batch["label"])
      yield self._pad(batch, n, b)
      produced += 1
    while produced < self._num_batches:
      empty = {"image": np.zeros((0, r, r, c), np.uint8), "label": np.zeros((0,), np.int32)}
      if self._with_index:
        empty["index"] = np.zeros((0,), np.int32)
      yield self._pad(empty, 0, b)
      produced += 1

  @staticmethod
  def _pad(batch: dict[str, np.ndarray], n: int, b: int) -> dict[str, np.ndarray]:
    out = {}
    for key, value in batch.items():
      value = np.asarray(value)
      if n < b:
        value = np.concatenate([value, np.zeros((b - n, *value.shape[1:]), value.dtype)])
      out[key] = value
    out["mask"] = np.arange(b) < n
    return out


def create_eval_iterator(
    data_config: Any,
    *,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    with_index: bool = False,
    data: tuple[Any, datasets.DatasetInfo] | None = None,
) -> EvalIterator:
  """One pass over the split, in order, no flip (e.g. reference FID statistics).

  Args:
    data_config: ``config.data`` (``xflip`` is ignored).
    batch_size: B per process.
    process_index, process_count: default from jax; shards are contiguous and disjoint.
    with_index: also yield 'index' (record indices; padding rows have index 0 and mask False).
    data: an already opened ``get_data_source(data_config)`` result.

  Returns:
    An EvalIterator (re-iterable) of {'image': uint8 [B, R, R, C], 'label': int32 [B], 'mask': bool [B]}.
  """
  batch_size = _check_batch_size(batch_size)
  process_index, process_count = _resolve_processes(process_index, process_count)
  source, info = data if data is not None else datasets.get_data_source(data_config)
  pre = PreprocessedSource(source, info.resolution, info.num_channels, info.num_classes > 0, with_index)
  start, end = eval_shard_bounds(len(pre), process_index, process_count)
  num_batches = math.ceil(math.ceil(len(pre) / process_count) / batch_size)
  in_memory = bool(getattr(source, "in_memory", False))
  ds = grain.MapDataset.source(pre)[start:end]
  ds = ds.to_iter_dataset(_read_options(data_config, batch_size, in_memory))
  ds = ds.batch(batch_size, drop_remainder=False)
  return EvalIterator(ds, num_batches, batch_size, info, with_index)


def measure_throughput(iterator: Iterator[dict[str, np.ndarray]], n_batches: int, *, warmup_batches: int = 1) -> float:
  """Images per second the iterator delivers on this host (after ``warmup_batches`` untimed batches).

  Consumes ``warmup_batches + n_batches`` batches from the iterator.
  """
  if n_batches <= 0:
    raise ValueError(f"n_batches must be positive, got {n_batches}")
  for _ in range(warmup_batches):
    next(iterator)
  images = 0
  start = time.perf_counter()
  for _ in range(n_batches):
    images += len(next(iterator)["image"])
  return images / max(time.perf_counter() - start, 1e-9)
