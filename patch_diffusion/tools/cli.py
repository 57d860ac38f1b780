"""Shared pieces of the command-line tools (``tools/*`` and ``benchmarks/*``).

A wrong input must end in one line that names the problem and the fix, not a traceback:

* argument types that reject bad values while parsing (:func:`positive_int`, :func:`existing_file`, ...),
  so argparse prints ``usage`` plus ``error: argument --steps: ...`` and exits 2;
* :func:`run`, which calls a tool's ``main`` and turns the errors a user can cause (a file that is not
  what it should be, a missing file, a bad value, a dataset or checkpoint problem) into
  ``<prog>: error: <message>`` and exit code 1. ``PATCH_DIFFUSION_TRACEBACK=1`` re-raises instead, for
  debugging.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import sys
import zipfile
from typing import Callable, Optional, Sequence

#: Errors caused by the input rather than by a bug: reported in one line.
USER_ERRORS = (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError,
               zipfile.BadZipFile)


def _int_at_least(text: str, low: int) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
  if value < low:
    raise argparse.ArgumentTypeError(f"must be {'> 0' if low == 1 else f'>= {low}'}, got {value}")
  return value


def positive_int(text: str) -> int:
  """argparse type: an integer > 0."""
  return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
  """argparse type: an integer >= 0."""
  return _int_at_least(text, 0)


def positive_float(text: str) -> float:
  """argparse type: a finite number > 0."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
  if not value > 0 or value == float("inf"):
    raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
  return value


def _existing(text: str, files_only: bool) -> pathlib.Path:
  path = pathlib.Path(text).expanduser()
  if not path.exists():
    raise argparse.ArgumentTypeError(f"no such file{'' if files_only else ' or directory'}: {path}")
  if files_only and not path.is_file():
    raise argparse.ArgumentTypeError(f"{path} is not a regular file")
  return path


def existing_file(text: str) -> pathlib.Path:
  """argparse type: a path to an existing regular file (``~`` expanded)."""
  return _existing(text, files_only=True)


def existing_path(text: str) -> pathlib.Path:
  """argparse type: an existing file or directory (``~`` expanded)."""
  return _existing(text, files_only=False)


def run(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
        prog: Optional[str] = None) -> int:
  """Calls ``main(argv)``; returns its exit code, or 1 after a one-line message for a user error."""
  prog = prog or os.path.basename(sys.argv[0])
  try:
    return int(main(argv) or 0)
  except USER_ERRORS as e:
    if os.environ.get("PATCH_DIFFUSION_TRACEBACK") == "1":
      raise
    text = str(e).strip() or type(e).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 1
