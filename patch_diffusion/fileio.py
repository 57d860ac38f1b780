"""File output through one path abstraction (``etils.epath``), so a workdir may be local or ``gs://``.

Every artifact the project writes — metrics lines, PNG grids, ``samples.npz``, eval JSON, configs, caches
— goes through these helpers:

* :func:`write_bytes` / :func:`write_text` / :func:`write_json` replace a file atomically: locally a
  sibling temporary file is renamed over the target (a reader, or a process killed mid-write, never sees a
  half-written file; the rename keeps the umask's permissions); object stores (``gs://``) publish an
  object only when its upload completes, so the object is written directly.
* :func:`append_lines` appends text lines: a real append locally; object stores cannot append, so the
  object is rewritten with its previous content (fine for the few thousand lines of a run's log).
* :func:`config_json` is the one conversion of a config (``ConfigDict`` or nested mapping) to JSON.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Union

from etils import epath
import numpy as np

PathLike = Union[str, os.PathLike, epath.Path]


def is_url(path: PathLike) -> bool:
  """True for object-store paths such as ``gs://bucket/run``."""
  return "://" in str(path)


def as_path(path: PathLike) -> epath.Path:
  """``epath.Path`` of ``path`` (``~`` expanded for local paths)."""
  if isinstance(path, epath.Path):
    return path
  text = os.fspath(path)
  return epath.Path(text if is_url(text) else os.path.expanduser(text))


def makedirs(path: PathLike) -> epath.Path:
  """Creates the folder ``path`` (and its parents) if missing; returns it."""
  p = as_path(path)
  p.mkdir(parents=True, exist_ok=True)
  return p


def write_bytes(path: PathLike, data: bytes) -> epath.Path:
  """Writes ``data`` to ``path`` atomically (parents created); returns the path."""
  p = as_path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_url(p):
    p.write_bytes(data)
    return p
  tmp = p.parent / f".{p.name}.{os.getpid()}.tmp"
  try:
    tmp.write_bytes(data)
    tmp.replace(p)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return p


def write_text(path: PathLike, text: str) -> epath.Path:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, indent: int = 2) -> epath.Path:
  """Writes ``obj`` as JSON (``jsonable`` applied) atomically, with a trailing newline."""
  return write_text(path, json.dumps(jsonable(obj), indent=indent) + "\n")


def append_lines(path: PathLike, lines: Iterable[str]) -> None:
  """Appends ``lines`` (each without its newline) to a text file, creating it if missing."""
  lines = [line + "\n" for line in lines]
  if not lines:
    return
  p = as_path(path)
  if is_url(p):
    previous = p.read_text() if p.exists() else ""
    p.parent.mkdir(parents=True, exist_ok=True)  # object stores have no folders: a no-op there
    p.write_text(previous + "".join(lines))
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  with open(os.fspath(p), "a", encoding="utf-8") as f:
    f.writelines(lines)


def jsonable(obj: Any) -> Any:
  """ConfigDict / mapping / sequence / numpy trees -> plain JSON-compatible Python.

  Tuples become lists, numpy scalars and 0-d arrays Python numbers; non-finite floats stay floats (Python's
  json writes ``NaN`` / ``Infinity``); anything else is written with ``str``.
  """
  if hasattr(obj, "to_dict") and callable(obj.to_dict):
    obj = obj.to_dict()
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, (str, bool, int, float)) or obj is None:
    return obj
  if isinstance(obj, np.generic) or (hasattr(obj, "shape") and np.shape(obj) == ()):
    return np.asarray(obj).item()
  return str(obj)


def config_json(config: Any, indent: int = 2) -> str:
  """The config as indented JSON text (what ``config.json`` files hold)."""
  return json.dumps(jsonable(config), indent=indent)
