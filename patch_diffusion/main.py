"""Command-line entry point: parses flags, initialises multi-process JAX, dispatches to the library.

  python -m patch_diffusion.main --config=configs/digits.py --workdir=/tmp/digits
  python -m patch_diffusion.main --config=configs/celeba64.py --workdir=gs://... --config.train.batch_size=512
  python -m patch_diffusion.main --config=configs/digits.py --workdir=/tmp/digits --mode=sample

Only this module reads absl flags; everything else takes the config.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to run.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs (else $PATCH_DIFFUSION_COORDINATOR or "
                    "auto-detected on Cloud TPU / SLURM).")
flags.DEFINE_integer("num_processes", None, "Number of processes (else $PATCH_DIFFUSION_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (else $PATCH_DIFFUSION_PROCESS_ID).")
flags.DEFINE_bool("compilation_cache", True,
                  "Keep compiled executables in a persistent cache ($JAX_COMPILATION_CACHE_DIR, else "
                  "<user cache>/xla): a second run with the same shapes skips XLA compilation. "
                  "--nocompilation_cache turns it off.")
flags.DEFINE_integer("cpu_devices", 1,
                     "CPU-only hosts: split the CPU into this many XLA devices and run data-parallel over them "
                     "(default 1: on a 2-core machine one device is fastest, patch_diffusion/runtime.py; each "
                     "process's share of train.batch_size / train.grad_accum_steps must divide evenly). Ignored "
                     "when XLA_FLAGS sets --xla_force_host_platform_device_count or JAX_NUM_CPU_DEVICES is set.")
flags.mark_flags_as_required(["config", "workdir"])


def _init_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  addr = FLAGS.coordinator_address or os.environ.get("PATCH_DIFFUSION_COORDINATOR")
  nproc = FLAGS.num_processes or _env_int("PATCH_DIFFUSION_NUM_PROCESSES")
  pid = FLAGS.process_id if FLAGS.process_id is not None else _env_int("PATCH_DIFFUSION_PROCESS_ID")
  if addr or (nproc and nproc > 1):
    if not (addr and nproc and pid is not None):
      raise app.UsageError("multi-process runs need --coordinator_address, --num_processes and "
                           "--process_id (or the PATCH_DIFFUSION_* environment variables) together")
    jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid)
  elif _on_cluster():
    jax.distributed.initialize()  # Cloud TPU pod / SLURM: JAX detects the cluster itself
  logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)


def _enable_compilation_cache() -> None:
  """JAX's persistent compilation cache in ``$JAX_COMPILATION_CACHE_DIR`` or ``<user cache>/xla``."""
  import jax  # pylint: disable=g-import-not-at-top
  from patch_diffusion import user_cache  # pylint: disable=g-import-not-at-top
  folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(user_cache.cache_dir() / "xla")
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  logging.info("persistent compilation cache: %s (--nocompilation_cache turns it off)", folder)


def _env_int(name: str):
  value = os.environ.get(name)
  return int(value) if value else None


def _on_cluster() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  # Cloud TPU VMs of a multi-host slice list their workers here.
  return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


class _QuietLibraries:
  """Drops INFO chatter of Orbax/grain/JAX internals from the console; warnings and errors pass."""
  NOISY = ("/orbax/", "/grain/", "/jax/_src/", "/jax/experimental/")

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(s in record.pathname for s in self.NOISY)


#: Errors a user causes (a bad value, a missing or damaged file, a busy workdir, a diverged run): one
#: FATAL line naming the fix, exit code 1, no traceback (PATCH_DIFFUSION_TRACEBACK=1 shows it).
_USER_ERRORS = (ValueError, OSError, RuntimeError, FloatingPointError)


def main(argv, extra_hooks_for=None) -> None:
  """absl main: flags -> distributed init -> the mode. ``extra_hooks_for(workdir)`` (tests) returns
  hooks added to training."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.set_verbosity(logging.INFO)
  try:
    from patch_diffusion import runtime  # pylint: disable=g-import-not-at-top
    # Before JAX starts its backend (see runtime's docstring); a no-op with a GPU or TPU.
    applied = runtime.apply_cpu_defaults(FLAGS.cpu_devices)
    if applied["cpu_devices"] is not None:
      logging.info("CPU runtime: host memory retained %s, synchronous dispatch %s, CPU devices %s (-1: the caller's "
                   "choice), XLA flags added %s", applied["host_allocator_retained"], applied["sync_dispatch"],
                   applied["cpu_devices"], applied["xla_flags_added"] or "none")
    _init_distributed()
    if FLAGS.compilation_cache:
      _enable_compilation_cache()
    _dispatch(FLAGS.config, FLAGS.workdir, FLAGS.mode, extra_hooks_for)
  except _USER_ERRORS as e:
    if os.environ.get("PATCH_DIFFUSION_TRACEBACK") == "1":
      raise
    logging.error("%s: %s", type(e).__name__, e)
    import sys  # pylint: disable=g-import-not-at-top
    sys.stderr.write(f"FATAL {type(e).__name__}: {e}\n(PATCH_DIFFUSION_TRACEBACK=1 shows the traceback)\n")
    sys.exit(1)


def _dispatch(config, workdir: str, mode: str, extra_hooks_for=None) -> None:
  # Imported here: flags are parsed and jax.distributed is initialised before JAX does any work.
  if mode == "train":
    from patch_diffusion import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, workdir, extra_hooks=extra_hooks_for(workdir) if extra_hooks_for else ())
  elif mode == "sample":
    from patch_diffusion import generate  # pylint: disable=g-import-not-at-top
    generate.sample(config, workdir)
  else:
    from patch_diffusion import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(config, workdir)


def _config_package_on_path(argv) -> None:
  """Experiment configs import ``configs.default``: make the config file's repository importable, so the
  command works from any working directory."""
  import sys  # pylint: disable=g-import-not-at-top
  for i, arg in enumerate(argv):
    path = arg.split("=", 1)[1] if arg.startswith("--config=") else (
        argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if path:
      root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(":", 1)[0])))
      if root not in sys.path:
        sys.path.insert(0, root)


def _parse_flags(argv):
  """absl's flag parsing, with an unknown ``--config.<field>`` reported in one line.

  ml_collections rejects a field missing from the (locked) config with a chained KeyError/AttributeError
  traceback; turn it into a flags error naming the argument, its did-you-mean hint and where the fields
  are listed.
  """
  import sys  # pylint: disable=g-import-not-at-top
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    inner = e
    while inner.args and isinstance(inner.args[0], BaseException):
      inner = inner.args[0]
    key, _, hint = str(inner.args[0] if inner.args else inner).partition("\n")
    name = key.strip("'\"")
    culprits = [a for a in argv[1:] if a.startswith("--config.") and
                name in a.split("=", 1)[0].split(".")] or [a for a in argv[1:] if a.startswith("--config.")]
    hint = f" ({hint.strip()})" if hint.strip() else ""
    sys.stderr.write(f"FATAL Flags parsing error: unknown config field '{name}' in {' '.join(culprits)}"
                     f"{hint}; every field and its default is listed in configs/default.py\n")
    sys.exit(1)


def run(extra_hooks_for=None) -> None:
  """Console-script entry point (``patch-diffusion --config=... --workdir=...``).

  Args:
    extra_hooks_for: optional ``workdir -> [hooks.Hook]`` added to training (test instrumentation, e.g.
      tests/step_record.py); the command line never sets it.
  """
  import functools  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  _config_package_on_path(sys.argv)
  app.run(functools.partial(main, extra_hooks_for=extra_hooks_for), flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
