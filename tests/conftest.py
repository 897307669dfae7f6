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

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import pytest  # noqa: E402

from comtriplet_jax.data import paths  # noqa: E402

# The classes of the generated HAM10000-like folder (``fake_ham``).
FAKE_HAM_DX = ["nv"] * 30 + ["mel"] * 14 + ["bkl"] * 4


@pytest.fixture(scope="session")
def ham10000_dir() -> pathlib.Path:
  """The real HAM10000 folder (../shared/data/ham10000), or skip the test."""
  folder = paths.ham10000_dir()
  if folder is None:
    pytest.skip(
        "real HAM10000 data not found: set COMTRIPLET_HAM10000_DIR or place "
        "the folder at ../shared/data/ham10000 beside the checkout")
  return folder


@pytest.fixture(scope="session")
def fake_ham(tmp_path_factory) -> pathlib.Path:
  """A HAM10000-like folder: 48 images of 40 lesions, the first 12 in lesions of 6.

  Nevi are dark noisy blobs and melanomas bright ones, so a few training steps
  separate them. Tests only read it; the TFDS data they prepare goes elsewhere.
  """
  root = tmp_path_factory.mktemp("ham")
  (root / "images").mkdir()
  rng = np.random.default_rng(0)
  rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
  for i, dx in enumerate(FAKE_HAM_DX):
    image_id = f"ISIC_{i:07d}"
    lesion = f"HAM_{i // 6 * 6 if i < 12 else i:07d}"
    base = 60 if dx == "nv" else 190
    pixels = rng.normal(base, 25, size=(30, 40, 3)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "images" / f"{image_id}.jpg", quality=95)
    rows.append(f"{lesion},{image_id},{dx},histo,50.0,male,back")
  (root / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
  return root
