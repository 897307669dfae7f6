"""Test set-up: four fake CPU devices and the location of the real HAM10000 folder."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Many tests train the same tiny programs again (a resumed run, pmap against
# shard_map, the reference of a multi-process run): a compilation cache for this
# session, shared with the subprocesses the tests start, compiles each once.
# It starts empty and is removed at exit, so no test depends on an earlier run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="comtriplet_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import pytest  # noqa: E402

from comtriplet_jax.data import paths  # noqa: E402


@pytest.fixture(scope="session")
def ham10000_dir() -> pathlib.Path:
  """The real HAM10000 folder (../shared/data/ham10000), or skip the test."""
  folder = paths.ham10000_dir()
  if folder is None:
    pytest.skip(
        "real HAM10000 data not found: set COMTRIPLET_HAM10000_DIR or place "
        "the folder at ../shared/data/ham10000 beside the checkout")
  return folder
