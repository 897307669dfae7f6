"""``splits.csv``: the examples of every split of a run, written and read back.

A run writes one row per example it trains or evaluates on (``train.py``):

  image_id,group_id,label,split
  ISIC_0024306,HAM_0000550,nevus,train

``group_id`` is the lesion (HAM10000) or patient (ISIC 2019/2020) id, or the
image id where a dataset has none; ``label`` is the task's class name; ``split``
is 'train', 'validation' or 'test'. The training rows are those left after
imbalance control (``train_class_counts``), so the file is exactly what the run
saw, in index order per split.

``config.split_file`` takes such a file back: its ``split`` column replaces the
seeded split (scheme, seed and ``split_by`` are then not used), so another run,
another method or another machine trains and evaluates on the same examples.
Every listed image must exist in the dataset with the listed label; examples
the file does not list are left out. Imbalance control still applies to the
file's training rows when ``train_class_counts`` is set.
"""

from __future__ import annotations

import csv
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from comtriplet_jax.data import splits

COLUMNS = ("image_id", "group_id", "label", "split")
SPLIT_NAMES = (splits.TRAIN, splits.VALIDATION, splits.TEST)


def write(path: str | os.PathLike[str],
          listing: Mapping[str, Mapping[str, np.ndarray]],
          class_names: Sequence[str]) -> pathlib.Path:
  """Writes ``splits.csv`` (atomically: a temporary file, then a rename).

  Args:
    path: the file.
    listing: split name -> ``{'image_id', 'group_id', 'label'}`` arrays in index
      order (``pipeline.Datasets.listing``), ``label`` the task label.
    class_names: the task's class names.

  Returns:
    The path written.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(COLUMNS)
    for split in SPLIT_NAMES:
      if split not in listing:
        continue
      columns = listing[split]
      for image_id, group_id, label in zip(columns["image_id"], columns["group_id"],
                                           columns["label"]):
        writer.writerow((image_id, group_id, class_names[int(label)], split))
  os.replace(tmp, path)
  return path


def read(path: str | os.PathLike[str], image_ids: np.ndarray,
         task_labels: np.ndarray, class_names: Sequence[str]
         ) -> tuple[np.ndarray, tuple[str, ...]]:
  """The split of every example from a ``splits.csv``.

  Args:
    path: the file.
    image_ids: [N] the dataset's image ids.
    task_labels: [N] each example's task label (-1: the task drops it).
    class_names: the task's class names.

  Returns:
    split_of_example: [N] int64 index into ``split_names``; -1 for examples
      the file does not list.
    split_names: the splits the file uses, in ('train', 'validation', 'test')
      order.

  Raises:
    FileNotFoundError: no such file.
    ValueError: naming the file and line of a missing column, an unknown split
      or class, an image id listed twice or absent from the dataset, or a label
      that differs from the dataset's; or a file without training or test rows.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"config.split_file={str(path)!r}: no such file")
  position = {image_id: i for i, image_id in enumerate(image_ids.tolist())}
  split_of = np.full(image_ids.size, -1, np.int64)
  seen: dict[str, int] = {}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in ("image_id", "split") if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}, line 1: missing column(s) {missing}; a split file "
                       f"has the columns {', '.join(COLUMNS)} (label and group_id "
                       "optional)")
    for row in reader:
      where = f"{path}, line {reader.line_num}"
      image_id, split = (row["image_id"] or "").strip(), (row["split"] or "").strip()
      if split not in SPLIT_NAMES:
        raise ValueError(f"{where}: split must be one of {SPLIT_NAMES}, got {split!r}")
      if image_id not in position:
        raise ValueError(f"{where}: image {image_id!r} is not in the dataset")
      if image_id in seen:
        raise ValueError(f"{where}: image {image_id!r} is listed twice (first on "
                         f"line {seen[image_id]})")
      seen[image_id] = reader.line_num
      i = position[image_id]
      label = (row.get("label") or "").strip()
      if task_labels[i] < 0:
        raise ValueError(f"{where}: image {image_id!r} belongs to no class of this "
                         f"task ({', '.join(class_names)})")
      if label and label != class_names[task_labels[i]]:
        raise ValueError(f"{where}: image {image_id!r} is labelled {label!r} in the "
                         f"file but {class_names[task_labels[i]]!r} in the dataset")
      split_of[i] = SPLIT_NAMES.index(split)
  used = [name for k, name in enumerate(SPLIT_NAMES) if np.any(split_of == k)]
  for needed in (splits.TRAIN, splits.TEST):
    if needed not in used:
      raise ValueError(f"{path}: no {needed!r} rows; a split file needs training and "
                       "test examples")
  # Indices into the splits the file uses.
  remap = np.full(len(SPLIT_NAMES) + 1, -1, np.int64)
  for k, name in enumerate(SPLIT_NAMES):
    if name in used:
      remap[k] = used.index(name)
  return np.where(split_of >= 0, remap[split_of], -1), tuple(used)
