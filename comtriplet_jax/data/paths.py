"""Where datasets live on disk.

The real HAM10000 copy used for development and CI sits outside the project (its
licence is non-commercial and the project ships no third-party data). It is found
through the environment variable ``COMTRIPLET_HAM10000_DIR`` or, when that is not
set, at ``../shared/data/ham10000`` beside the checkout. A variable that is set
but names no HAM10000 folder is an error, never a fallback to the other place.
"""

from __future__ import annotations

import os
import pathlib

HAM10000_ENV = "COMTRIPLET_HAM10000_DIR"
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_SHARED_HAM10000 = _REPO_ROOT.parent / "shared" / "data" / "ham10000"


def _problem(folder: pathlib.Path) -> str:
  """What a HAM10000 folder lacks ('' when it has images/ and the metadata CSV)."""
  missing = [name for name, ok in (
      ("HAM10000_metadata.csv", (folder / "HAM10000_metadata.csv").is_file()),
      ("images/", (folder / "images").is_dir())) if not ok]
  if not folder.is_dir():
    return "no such folder"
  return f"it has no {' and no '.join(missing)}" if missing else ""


def ham10000_dir() -> pathlib.Path | None:
  """The HAM10000 folder (images/ + HAM10000_metadata.csv), or None if absent.

  Raises:
    FileNotFoundError: ``COMTRIPLET_HAM10000_DIR`` is set to a folder that is
      not a HAM10000 folder (naming what it lacks).
  """
  value = os.environ.get(HAM10000_ENV)
  if value:
    folder = pathlib.Path(value).expanduser()
    problem = _problem(folder)
    if problem:
      raise FileNotFoundError(
          f"{HAM10000_ENV}={value!r} is not a HAM10000 folder: {problem}. Point it "
          "at the folder holding HAM10000_metadata.csv and images/, or unset it to "
          f"use {_SHARED_HAM10000}.")
    return folder
  return None if _problem(_SHARED_HAM10000) else _SHARED_HAM10000
