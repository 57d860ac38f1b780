"""Device mesh, shardings and host-local → global arrays (data parallelism over a named mesh).

Every process runs the same program on a global view of the arrays (``jax.jit`` + ``NamedSharding``);
the compiler inserts the gradient all-reduce. Each process contributes only its own slice of a batch,
turned into one global array by :func:`global_batch`.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(shape: Sequence[int] = (-1,), axes: Sequence[str] = (DATA_AXIS,),
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over ``devices`` (default: all global devices) with named ``axes``.

  ``shape`` may contain one -1, filled with the remaining device count. The data-parallel axis must be
  named ``'data'``.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(axes):
    raise ValueError(f"mesh.shape {tuple(shape)} and mesh.axes {tuple(axes)} must have the same length")
  if DATA_AXIS not in axes:
    raise ValueError(f"mesh.axes {tuple(axes)} must contain the data-parallel axis {DATA_AXIS!r}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape {tuple(shape)} may contain at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh.shape {tuple(shape)} does not divide the {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh.shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"but {len(devices)} are available; set mesh.shape=(-1,) to use all")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``'data'``; other axes replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return int(mesh.shape[DATA_AXIS])


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= ``n`` (batch sizes that shard evenly)."""
  return -(-int(n) // int(multiple)) * int(multiple)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of a batch into global arrays sharded over ``'data'``.

  Args:
    local: host-local arrays, each ``[B_local, ...]``; every process passes the same shapes.

  Returns:
    Global arrays ``[B_local * process_count, ...]`` with the batch axis sharded over the mesh.
  """
  sharding = data_sharding(mesh)
  out = {}
  for name, value in local.items():
    global_shape = (value.shape[0] * jax.process_count(),) + tuple(value.shape[1:])
    out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def host_local_rows(x: jax.Array) -> np.ndarray:
  """Rows of a global array [N, ...] sharded on axis 0 that live on this process, in global order.

  In a single process this is ``np.asarray(x)``; on several hosts it is this host's slice of the batch,
  without any cross-host transfer (replicated shards are taken once).
  """
  if x.is_fully_addressable:
    return np.asarray(x)
  pieces = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    if start not in pieces:
      pieces[start] = np.asarray(shard.data)
  return np.concatenate([pieces[k] for k in sorted(pieces)], axis=0)


def is_main_process() -> bool:
  return jax.process_index() == 0


def fingerprint(obj: Any) -> str:
  """A short stable hash of a JSON-serialisable object (used to check that hosts agree)."""
  blob = json.dumps(obj, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def assert_same_on_all_hosts(obj: Any, what: str) -> None:
  """Raises on every process if ``obj`` differs between processes (e.g. configs edited on one host)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  digest = np.frombuffer(bytes.fromhex(fingerprint(obj)), dtype=np.uint8).astype(np.int32)
  everyone = np.asarray(multihost_utils.process_allgather(digest))
  differing = [i for i in range(everyone.shape[0]) if not np.array_equal(everyone[i], everyone[0])]
  if differing:
    raise ValueError(f"{what} differs between processes (process 0 vs {differing}); launch every "
                     f"process with the same config and flags")


def any_host(flag: bool) -> bool:
  """True on every process if ``flag`` is True on at least one (a host-level OR; cheap, no device sync
  of training arrays)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def allgather_json(obj: Any) -> list:
  """Every process's JSON-serialisable ``obj``, indexed by process (a host-level all-gather).

  Used for per-process state such as each host's data-iterator position, which must be saved for every
  process, not only process 0.
  """
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  blob = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
  length = int(np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).max())
  padded = np.zeros(length, np.uint8)
  padded[:blob.size] = blob
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in rows]


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Waits until every process reaches ``name`` (a coordination-service barrier, not a device collective).

  Used before the first training step: processes finish compiling at different times (a persistent-cache
  hit on one, a cold compile on another), and the first gradient all-reduce would otherwise wait for the
  slowest inside the CPU collectives' (gloo) short connect timeout.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None:
    return
  client.wait_at_barrier(f"patch_diffusion_{name}", int(timeout_s * 1000))
