"""Loading experiment configs (``configs/*.py``) outside the command line, e.g. in a notebook.

``main.py`` reads ``--config=configs/x.py`` through ml_collections' flags; :func:`load_config` does the same
from Python: it imports the file (with its repository on ``sys.path``, since experiment files do
``from configs import default``), calls ``get_config()``, applies dotted overrides and locks the result.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Any

import ml_collections


def load_config(path: str, **overrides: Any) -> ml_collections.ConfigDict:
  """``get_config()`` of the config file ``path`` with dotted overrides, locked (typos raise).

  Example: ``load_config("configs/digits.py", **{"train.total_kimg": 5.0})``.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file {path}")
  root = os.path.dirname(os.path.dirname(path))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.lock()
  return apply_overrides(config, overrides)


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted fields in place (``{"train.lr": 1e-3}``); a string value for a non-string field is read
  as a Python literal (``"(1, 2)"``, ``"1e-3"``), as on the command line. Returns ``config``."""
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    if isinstance(value, str) and not isinstance(node[leaf], str):
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass
    node[leaf] = value
  return config
