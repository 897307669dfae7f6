r"""Evaluates a trained run on every labelled image of another dataset.

::

  python -m comtriplet_jax.evaluate --workdir=/tmp/run --dataset=ph2 \
      --manual_dir=/data/PH2Dataset [--operating_point=youden]

The other dataset's classes are mapped through the run's task, by their
canonical diagnosis (``data/splits.py``): for melanoma vs nevus on PH2, common
and atypical nevi are nevi and melanomas melanomas; ISIC 2017/2019/2020 alike.
Classes a binary task drops (e.g. seborrheic keratoses for melanoma vs nevus)
are left out, and counted in the output. For the 7-class task ('all') each
class maps to the run's class of the same diagnosis; a class of known diagnosis
that the model never saw is an error naming it.

Every image is prepared as in evaluation and scored by the run's selected
model. ``<workdir>/eval_<dataset>.json`` gets the run's metric set
(``evaluation/metrics.py``), the ROC curve (binary), the confusion matrix,
the class counts, and for binary tasks the metrics at the operating point
(``--operating_point``, default the run's; its threshold was chosen on the
run's own validation split, never on this dataset).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any, Sequence

import numpy as np


def map_labels(run_task: str, run_classes: Sequence[str], run_dataset: str,
               labels: np.ndarray, class_names: Sequence[str], diagnoses,
               dataset: str) -> tuple[np.ndarray, dict[str, Any]]:
  """The other dataset's labels as the run's task labels (-1: left out).

  Raises:
    ValueError: a class the run never saw (task 'all'), or task classes that
      differ from the run's.
  """
  from comtriplet_jax.data import builders  # pylint: disable=g-import-not-at-top
  from comtriplet_jax.data import splits  # pylint: disable=g-import-not-at-top
  if run_task == "all":
    run_diagnoses = builders.DATASETS[run_dataset].DIAGNOSES
    target = {run_diagnoses[name]: i for i, name in enumerate(run_classes)}
    table = np.full(len(class_names), -1, np.int64)
    for j, name in enumerate(class_names):
      diagnosis = diagnoses[name]
      if diagnosis == "unknown":
        continue
      if diagnosis not in target:
        raise ValueError(
            f"{dataset}'s class {name!r} (diagnosis {diagnosis!r}) is not one the "
            f"model was trained on: it knows {list(run_classes)} of {run_dataset}")
      table[j] = target[diagnosis]
    mapped = table[labels]
    names = list(run_classes)
  else:
    mapped, keep, names = splits.map_task_labels(run_task, labels, class_names,
                                                 diagnoses, dataset=dataset)
    mapped = np.where(keep, mapped, -1)
    if list(names) != list(run_classes):
      raise ValueError(f"task {run_task!r} on {dataset} gives classes {names}; the "
                       f"run's are {list(run_classes)}")
  counts = {"kept": {n: int(np.sum(mapped == i)) for i, n in enumerate(names)},
            "left_out": {name: int(np.sum((labels == j) & (mapped < 0)))
                         for j, name in enumerate(class_names)
                         if np.any((labels == j) & (mapped < 0))}}
  return mapped, counts


def evaluate_run(workdir: str, dataset: str, *, manual_dir: str | None = None,
                 data_dir: str | None = None, operating_point: str | None = None,
                 batch_size: int = 64, out: str | None = None,
                 progress=sys.stderr) -> dict[str, Any]:
  """Scores every image of ``dataset`` kept by the run's task; writes the JSON."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from comtriplet_jax import configlib  # pylint: disable=g-import-not-at-top
  from comtriplet_jax import runs  # pylint: disable=g-import-not-at-top
  from comtriplet_jax.data import builders  # pylint: disable=g-import-not-at-top
  from comtriplet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from comtriplet_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  if operating_point is not None:
    configlib.check_operating_point(operating_point, "--operating_point")
  model = runs.load_run(workdir)
  binary = len(model.class_names) == 2
  threshold = model.threshold(operating_point) if binary else None
  builder = builders.get_builder(dataset, data_dir=data_dir, manual_dir=manual_dir)
  builders.prepare(builder)
  source = pipeline.source_from_builder(builder)
  metadata = pipeline.read_metadata(source)
  labels, counts = map_labels(
      model.card["task"], model.class_names, model.card["dataset"], metadata.labels,
      source.class_names, source.diagnoses, dataset)
  keep = labels >= 0
  if not np.any(keep):
    raise ValueError(f"no image of {dataset} belongs to the run's classes "
                     f"{model.class_names}")
  wanted = set(metadata.image_ids[keep].tolist())
  size = model.image_size
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          tf.constant(sorted(wanted)), tf.ones(len(wanted), tf.int64)), default_value=0)
  stream = (source.examples
            .filter(lambda ex: table.lookup(ex["image_id"]) > 0)
            .map(lambda ex: {"image": pipeline.decode_and_resize(ex["image"], size),
                             "image_id": ex["image_id"]},
                 num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size))
  position = {image_id: i for i, image_id in enumerate(metadata.image_ids.tolist())}
  total = int(keep.sum())
  scores, rows = [], []
  start = time.perf_counter()
  for batch in tfds.as_numpy(stream):
    n = batch["image"].shape[0]
    padded = np.concatenate([batch["image"], np.zeros(
        (batch_size - n,) + batch["image"].shape[1:], np.uint8)])
    scores.append(model.score(padded)["scores"][:n])
    rows.extend(position[i.decode()] for i in batch["image_id"])
    done = len(rows)
    rate = done / max(time.perf_counter() - start, 1e-9)
    print(f"evaluate: {done}/{total} images, {rate:.1f} images/s, about "
          f"{(total - done) / max(rate, 1e-9):.0f} s left", file=progress)
  scores = np.concatenate(scores)
  y = labels[np.asarray(rows)]
  predictions = model.decide(scores, operating_point)
  result: dict[str, Any] = {
      "run": str(model.workdir), "dataset": dataset, "task": model.card["task"],
      "class_names": model.class_names, "counts": counts,
      "num_examples": int(y.size),
      "metrics": metrics.classification_metrics(
          y, np.asarray(model.decide(scores, "paper") if binary else predictions),
          scores, num_classes=len(model.class_names)),
  }
  if binary:
    from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
    rule = operating_point or model.card["operating_point"]
    result["operating_point"] = {
        "rule": rule, "threshold": threshold, "chosen_on": "the run's validation split",
        "metrics": metrics.classification_metrics(y, predictions, num_classes=2)}
    if np.unique(y).size == 2:
      fpr, tpr, thresholds = skm.roc_curve(y, scores)
      result["roc_curve"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                             "thresholds": np.where(np.isfinite(thresholds), thresholds,
                                                    None).tolist()}
  path = pathlib.Path(out) if out else model.workdir / f"eval_{dataset}.json"
  path.write_text(json.dumps(result, indent=2, default=float))
  result["out"] = str(path)
  return result


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m comtriplet_jax.evaluate",
      description="Evaluates a trained run on another dataset (see the module "
                  "docstring).")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--dataset", required=True,
                      help="ham10000, ph2, isic2017, isic2019 or isic2020")
  parser.add_argument("--manual_dir", default=None,
                      help="the dataset's folder as distributed")
  parser.add_argument("--data_dir", default=None, help="TFDS data dir")
  parser.add_argument("--operating_point", default=None)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--out", default=None,
                      help="default: <workdir>/eval_<dataset>.json")
  args = parser.parse_args(argv)
  try:
    result = evaluate_run(args.workdir, args.dataset, manual_dir=args.manual_dir,
                          data_dir=args.data_dir, operating_point=args.operating_point,
                          batch_size=args.batch_size, out=args.out)
  except (FileNotFoundError, ValueError) as e:
    print(f"evaluate: error: {e}", file=sys.stderr)
    return 2
  m = result["metrics"]
  print(f"evaluate: {result['num_examples']} images of {args.dataset}: "
        + ", ".join(f"{k} {m[k]:.4f}" for k in ("auc", "balanced_accuracy", "f1_macro")
                    if isinstance(m.get(k), float))
        + f"; written to {result['out']}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
