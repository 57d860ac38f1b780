"""Lazy re-exports for package ``__init__`` files (PEP 562): importing a package pulls nothing in until a
name is used, so ``import patch_diffusion`` or ``patch_diffusion.data.patches`` stay cheap."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def exports(package: str, names: Mapping[str, str], namespace: dict) -> tuple[Callable[[str], Any],
                                                                              Callable[[], list[str]]]:
  """``(__getattr__, __dir__)`` for ``package`` re-exporting ``names``: exported name -> module path
  (absolute, or relative to ``package`` when it does not start with ``patch_diffusion``)."""

  def __getattr__(name: str) -> Any:  # pylint: disable=invalid-name
    module = names.get(name)
    if module is None:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    path = module if module.startswith("patch_diffusion") else f"{package}.{module}"
    return getattr(importlib.import_module(path), name)

  def __dir__() -> list[str]:  # pylint: disable=invalid-name
    return sorted([*namespace, *names])

  return __getattr__, __dir__
