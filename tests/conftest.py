"""Test set-up: four fake CPU devices and the location of the real HAM10000 folder."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

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
