"""Where datasets live on disk.

The real HAM10000 copy used for development and CI sits outside the project (its
licence is non-commercial and the project ships no third-party data). It is found
through the environment variable ``COMTRIPLET_HAM10000_DIR`` or, failing that, at
``../shared/data/ham10000`` beside the checkout.
"""

from __future__ import annotations

import os
import pathlib

HAM10000_ENV = "COMTRIPLET_HAM10000_DIR"
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_SHARED_HAM10000 = _REPO_ROOT.parent / "shared" / "data" / "ham10000"


def ham10000_dir() -> pathlib.Path | None:
  """The HAM10000 folder (images/ + HAM10000_metadata.csv), or None if absent."""
  candidates = []
  if os.environ.get(HAM10000_ENV):
    candidates.append(pathlib.Path(os.environ[HAM10000_ENV]).expanduser())
  candidates.append(_SHARED_HAM10000)
  for folder in candidates:
    if (folder / "HAM10000_metadata.csv").is_file() and (folder / "images").is_dir():
      return folder
  return None
