r"""Scores your own images with a trained run.

::

  python -m comtriplet_jax.predict --workdir=/tmp/run images/ more/*.jpg list.csv \
      --out=predictions.csv [--operating_point=sensitivity=0.90] [--heatmaps=DIR]

IMAGES are files, folders (searched recursively), glob patterns, or CSV files
with a ``path`` column (relative paths are read from the CSV's folder), in
JPEG, PNG or BMP, of any size. Each image is prepared exactly as the run's
evaluation prepared its images (centre square crop, antialiased bilinear resize
to the run's image size, the method's own normalisation) and scored by the
method's ``predict`` in jitted batches.

The output CSV has one row per image that could be read:

* ``path``;
* binary tasks: ``score`` (the run's score: the positive class' probability,
  or d_maj - d_min for the prototype methods, whose rows also give ``d_min``
  and ``d_maj``, the cosine distances to the minority and majority
  prototypes), and ``prediction``, the class at the operating point
  (``--operating_point``, default the run's ``config.operating_point``; every
  threshold is chosen on the run's validation split: the three of
  ``results.json`` when the run ended, any other target from the validation
  scores in its ``predictions.csv``);
* multi-class tasks: ``p_<class>`` per class (``--calibrated``: with the
  temperature fitted on validation) and ``prediction``, the argmax.

An image that cannot be read or decoded is named on stderr and skipped; the
others are still scored and the exit status is 1. ``--strict`` stops at the
first such image instead. ``--heatmaps=DIR`` writes a Grad-CAM overlay per image, of the evidence for its
predicted class (see :mod:`comtriplet_jax.evaluation.gradcam`).
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import pathlib
import sys
import time
from typing import Iterable, Iterator, Sequence

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
PATH_COLUMNS = ("path", "image_path", "file")


class InputError(ValueError):
  """An IMAGES argument that names nothing usable."""


def _csv_paths(path: pathlib.Path) -> list[pathlib.Path]:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    column = next((c for c in PATH_COLUMNS if c in (reader.fieldnames or ())), None)
    if column is None:
      raise InputError(f"{path}: a CSV of images needs a column named one of "
                       f"{PATH_COLUMNS}; it has {reader.fieldnames}")
    out = []
    for row in reader:
      value = (row[column] or "").strip()
      if not value:
        raise InputError(f"{path}, line {reader.line_num}: empty {column!r}")
      p = pathlib.Path(value).expanduser()
      out.append(p if p.is_absolute() else path.parent / p)
  return out


def expand_inputs(items: Sequence[str]) -> list[pathlib.Path]:
  """Files, folders, globs and CSV lists -> image paths, in order, each once.

  Raises:
    InputError: an item that is none of these, or matches no image.
  """
  out: list[pathlib.Path] = []
  for item in items:
    path = pathlib.Path(item).expanduser()
    if path.is_dir():
      found = sorted(p for p in path.rglob("*")
                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
      if not found:
        raise InputError(f"{item}: a folder without {'/'.join(IMAGE_SUFFIXES)} images")
      out.extend(found)
    elif path.is_file() and path.suffix.lower() == ".csv":
      out.extend(_csv_paths(path))
    elif path.is_file():
      out.append(path)
    elif glob.has_magic(item):
      found = sorted(pathlib.Path(p) for p in glob.glob(os.path.expanduser(item),
                                                        recursive=True)
                     if pathlib.Path(p).is_file())
      if not found:
        raise InputError(f"{item}: the pattern matches no file")
      out.extend(found)
    else:
      raise InputError(f"{item}: no such file or folder")
  return list(dict.fromkeys(out))


def read_images(paths: Iterable[pathlib.Path], image_size: int, *, strict: bool,
                failures: list[tuple[pathlib.Path, str]]
                ) -> Iterator[tuple[pathlib.Path, np.ndarray]]:
  """(path, [S, S, 3] uint8) per readable image; the others go to ``failures``."""
  from comtriplet_jax import runs  # pylint: disable=g-import-not-at-top
  for path in paths:
    try:
      image = runs.prepare_image(path.read_bytes(), image_size)
    except Exception as e:  # pylint: disable=broad-except
      # tf raises InvalidArgumentError for undecodable bytes; OSError for files.
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      if strict:
        raise InputError(f"{path}: cannot be read as an image ({reason})") from e
      print(f"predict: skipped {path}: cannot be read as an image ({reason})",
            file=sys.stderr)
      failures.append((path, reason))
      continue
    yield path, image


class _Heatmaps:
  """Writes ``<stem>_gradcam.png`` per image (BIIGMA-Net: also ``_attention``).

  Grad-CAM explains each image's predicted class at the operating point.
  """

  def __init__(self, model, folder: str):
    import functools  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from comtriplet_jax.evaluation import gradcam  # pylint: disable=g-import-not-at-top
    self.model, self.gradcam = model, gradcam
    self.folder = pathlib.Path(folder)
    self.folder.mkdir(parents=True, exist_ok=True)
    self.cam = jax.jit(functools.partial(gradcam.method_grad_cam, model.method))
    self.attention = (jax.jit(model.method.spatial_attention)
                      if hasattr(model.method, "spatial_attention") else None)
    self.written: set[str] = set()

  def _name(self, path: pathlib.Path, kind: str) -> pathlib.Path:
    # Images of one name in different folders get a counter.
    stem, k = path.stem, 1
    while f"{stem}_{kind}" in self.written:
      k += 1
      stem = f"{path.stem}_{k}"
    self.written.add(f"{stem}_{kind}")
    return self.folder / f"{stem}_{kind}.png"

  def write(self, names: Sequence[pathlib.Path], images: np.ndarray,
            classes: np.ndarray) -> None:
    """Overlays for ``names``; ``images`` may be padded; ``classes``: the decisions."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    m = self.model
    explained = np.zeros(images.shape[0], np.int32)
    explained[:len(classes)] = classes
    maps = {"gradcam": np.asarray(self.cam(m.variables, m.method_state, images,
                                           class_index=explained).heatmap)}
    if self.attention is not None:
      try:
        maps["attention"] = np.asarray(self.attention(m.variables, images))
      except ValueError as e:   # an ablation without trained attention
        print(f"predict: no attention overlays: {e}", file=sys.stderr)
        self.attention = None
    for kind, heat in maps.items():
      for i, path in enumerate(names):
        Image.fromarray(self.gradcam.overlay(images[i], heat[i])).save(
            self._name(path, kind))


def _batches(items: Iterator, size: int) -> Iterator[list]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _eta(done: int, total: int, elapsed: float) -> str:
  rate = done / max(elapsed, 1e-9)
  left = (total - done) / max(rate, 1e-9)
  return f"{done}/{total} images, {rate:.1f} images/s, about {left:.0f} s left"


def predict(workdir: str, images: Sequence[str], *, out: str, batch_size: int = 64,
            operating_point: str | None = None, calibrated: bool = False,
            strict: bool = False, heatmaps: str | None = None,
            progress=sys.stderr) -> dict:
  """Scores ``images`` with the run in ``workdir``; see the module docstring.

  Returns:
    ``{'scored': n, 'failed': [(path, reason), ...], 'out': path}``.
  """
  from comtriplet_jax import configlib  # pylint: disable=g-import-not-at-top
  from comtriplet_jax import runs  # pylint: disable=g-import-not-at-top
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size} must be >= 1")
  if operating_point is not None:
    configlib.check_operating_point(operating_point, "--operating_point")
  paths = expand_inputs(images)
  model = runs.load_run(workdir)
  out_path = pathlib.Path(out)
  if out_path.resolve().parent == model.workdir.resolve() and out_path.name in (
      runs.PREDICTIONS_FILE, runs.SPLITS_FILE, runs.RESULTS_FILE, runs.MODEL_FILE,
      runs.CONFIG_FILE):
    raise InputError(f"--out={out}: that is a file of the run itself; write "
                     "elsewhere")
  binary = len(model.class_names) == 2
  if binary:
    model.threshold(operating_point)      # fails now if the run lacks the rule
  elif calibrated:
    model.calibrated(np.full((1, len(model.class_names)), 1.0 / len(model.class_names)))
  heatmap_writer = _Heatmaps(model, heatmaps) if heatmaps else None
  failures: list[tuple[pathlib.Path, str]] = []
  out_path.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_path.with_name(out_path.name + ".tmp")
  try:
    _write_predictions(tmp, model, paths, batch_size=batch_size,
                       operating_point=operating_point, calibrated=calibrated,
                       strict=strict, failures=failures, heatmaps=heatmap_writer,
                       progress=progress)
  except BaseException:
    tmp.unlink(missing_ok=True)     # --strict, Ctrl-C: no partial output
    raise
  tmp.replace(out_path)
  return {"scored": _count_rows(out_path), "failed": failures, "out": str(out_path)}


def _count_rows(path: pathlib.Path) -> int:
  with open(path, newline="") as f:
    return max(0, sum(1 for _ in csv.reader(f)) - 1)


def _write_predictions(tmp: pathlib.Path, model, paths, *, batch_size: int,
                       operating_point, calibrated: bool, strict: bool,
                       failures: list, heatmaps, progress) -> None:
  binary = len(model.class_names) == 2
  scored = 0
  start = time.perf_counter()
  with open(tmp, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    header = None
    stream = read_images(paths, model.image_size, strict=strict, failures=failures)
    for batch in _batches(stream, batch_size):
      names = [p for p, _ in batch]
      pixels = np.stack([image for _, image in batch])
      # Pad to a whole batch: one compiled shape for every batch.
      padded = np.concatenate([pixels, np.zeros((batch_size - len(batch),) +
                                                pixels.shape[1:], np.uint8)])
      outputs = {k: v[:len(batch)] for k, v in model.score(padded).items()}
      scores = outputs["scores"]
      if binary:
        extra = [k for k in ("d_min", "d_maj") if k in outputs]
        columns = ["score", *extra]
        values = np.stack([scores, *(outputs[k] for k in extra)], axis=1)
      else:
        probs = model.calibrated(scores) if calibrated else scores
        columns = [f"p_{name}" for name in model.class_names]
        values = probs
      labels = model.decide(scores, operating_point)
      if header is None:
        header = ["path", *columns, "prediction"]
        writer.writerow(header)
      for name, row, label in zip(names, values, labels):
        writer.writerow([str(name), *(f"{v:.6g}" for v in row),
                         model.class_names[int(label)]])
      if heatmaps is not None:
        heatmaps.write(names, padded, np.asarray(labels))
      scored += len(batch)
      print(f"predict: {_eta(scored + len(failures), len(paths), time.perf_counter() - start)}",
            file=progress)
    if header is None:
      writer.writerow(["path", "score", "prediction"])


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m comtriplet_jax.predict",
      description="Scores images with a trained run (see the module docstring).")
  parser.add_argument("--workdir", required=True, help="the run's folder")
  parser.add_argument("images", nargs="+",
                      help="image files, folders, glob patterns or CSVs with a path column")
  parser.add_argument("--out", default="predictions.csv")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--operating_point", default=None,
                      help="paper, youden or sensitivity=X (default: the run's)")
  parser.add_argument("--calibrated", action="store_true",
                      help="multi-class: temperature-scaled probabilities")
  parser.add_argument("--strict", action="store_true",
                      help="stop at the first unreadable image")
  parser.add_argument("--heatmaps", default=None, metavar="DIR",
                      help="write a Grad-CAM overlay per image into DIR")
  args = parser.parse_args(argv)
  try:
    result = predict(args.workdir, args.images, out=args.out,
                     batch_size=args.batch_size, operating_point=args.operating_point,
                     calibrated=args.calibrated, strict=args.strict,
                     heatmaps=args.heatmaps)
  except (InputError, FileNotFoundError, ValueError) as e:
    print(f"predict: error: {e}", file=sys.stderr)
    return 2
  print(f"predict: {result['scored']} images scored into {result['out']}"
        + (f"; {len(result['failed'])} could not be read (named above)"
           if result["failed"] else ""), file=sys.stderr)
  return 1 if result["failed"] else 0


if __name__ == "__main__":
  sys.exit(main())
