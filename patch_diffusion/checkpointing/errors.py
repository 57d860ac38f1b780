"""Exceptions of the checkpoint layer (kept apart so that modules without Orbax can raise them)."""


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written, or does not match the run restoring it."""


class CheckpointDamagedError(CheckpointError):
  """A checkpoint's files differ from its manifest: it is never restored (see ``manifest.py``)."""
