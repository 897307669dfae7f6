"""Classification metrics of both papers, computed with scikit-learn.

The COM-Triplet paper reports sensitivity (recall), specificity, precision, accuracy,
F1 with class-weighted averaging and ROC AUC; BIIGMA-Net reports accuracy and macro
precision, recall and F1. Everything here is a thin, explicit call into
``sklearn.metrics``: no metric is re-derived by hand. Specificity, which scikit-learn
has no function for, is the recall of the negative class (binary) or the recall of
"not class c" one-vs-rest (per class), both through ``recall_score``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
from sklearn import metrics as skm


def _check_inputs(labels, predictions, scores, num_classes):
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  predictions = np.asarray(predictions).astype(np.int64).reshape(-1)
  if labels.shape != predictions.shape:
    raise ValueError(
        f"labels {labels.shape} and predictions {predictions.shape} differ in length")
  if labels.size == 0:
    raise ValueError("no examples to score: labels is empty")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  for name, values in (("labels", labels), ("predictions", predictions)):
    if values.min() < 0 or values.max() >= num_classes:
      raise ValueError(f"{name} must lie in [0, {num_classes}), got range "
                       f"[{values.min()}, {values.max()}]")
  if scores is not None:
    scores = np.asarray(scores, dtype=np.float64)
    if num_classes == 2 and scores.ndim == 2:
      scores = scores[:, 1]
    expected = (labels.size,) if num_classes == 2 else (labels.size, num_classes)
    if scores.shape != expected:
      raise ValueError(f"scores must have shape {expected} for {num_classes} "
                       f"classes, got {scores.shape}")
    if not np.all(np.isfinite(scores)):
      raise ValueError("scores contain NaN or infinite values")
  return labels, predictions, scores


def _roc_auc(labels, scores, num_classes) -> float:
  """ROC AUC (one-vs-rest macro for several classes); NaN when undefined."""
  present = np.unique(labels)
  if present.size < 2:
    warnings.warn("ROC AUC is undefined with a single class present; reporting NaN")
    return math.nan
  if num_classes == 2:
    return float(skm.roc_auc_score(labels, scores))
  if present.size < num_classes:
    # sklearn's OvR AUC needs every class in y_true; average over the present ones.
    aucs = [skm.roc_auc_score(labels == c, scores[:, c]) for c in present]
    return float(np.mean(aucs))
  probs = scores / scores.sum(axis=1, keepdims=True)
  return float(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def classification_metrics(
    labels: Sequence[int] | np.ndarray,
    predictions: Sequence[int] | np.ndarray,
    scores: np.ndarray | None = None,
    *,
    num_classes: int,
    positive_class: int = 1,
) -> dict[str, Any]:
  """The metric set of both papers.

  Args:
    labels: true class ids, [n].
    predictions: predicted class ids, [n].
    scores: for ROC AUC: [n] scores of the positive class (binary; [n, 2] also
      accepted and its column 1 used) or [n, C] class probabilities (C > 2). None
      skips AUC.
    num_classes: C.
    positive_class: the class of interest for the binary sensitivity, specificity,
      precision and F1 (melanoma / malignant, label 1 throughout this project).

  Returns:
    A dict of floats plus ``confusion_matrix`` (nested lists, rows = true class).
    Keys: accuracy, balanced_accuracy, precision_macro, recall_macro, f1_macro,
    precision_weighted, recall_weighted, f1_weighted, specificity_weighted,
    auc (if scores), and for binary tasks sensitivity, specificity, precision, f1
    of ``positive_class``.
  """
  labels, predictions, scores = _check_inputs(labels, predictions, scores, num_classes)
  all_classes = np.arange(num_classes)
  common = dict(labels=all_classes, zero_division=0)
  out: dict[str, Any] = {
      "num_examples": int(labels.size),
      "accuracy": float(skm.accuracy_score(labels, predictions)),
      "balanced_accuracy": float(_balanced_accuracy(labels, predictions)),
  }
  for average in ("macro", "weighted"):
    out[f"precision_{average}"] = float(
        skm.precision_score(labels, predictions, average=average, **common))
    out[f"recall_{average}"] = float(
        skm.recall_score(labels, predictions, average=average, **common))
    out[f"f1_{average}"] = float(
        skm.f1_score(labels, predictions, average=average, **common))
  # Per-class specificity = recall of "not c" one-vs-rest, averaged with the
  # class-support weights the COM-Triplet paper uses for its other metrics.
  support = np.bincount(labels, minlength=num_classes)
  per_class_spec = np.array([
      skm.recall_score(labels != c, predictions != c, pos_label=True, zero_division=0)
      for c in all_classes])
  out["specificity_weighted"] = float(np.average(per_class_spec, weights=support))
  if num_classes == 2:
    pos = positive_class
    neg = 1 - positive_class
    out["sensitivity"] = float(skm.recall_score(
        labels, predictions, pos_label=pos, average="binary", zero_division=0))
    out["specificity"] = float(skm.recall_score(
        labels, predictions, pos_label=neg, average="binary", zero_division=0))
    out["precision"] = float(skm.precision_score(
        labels, predictions, pos_label=pos, average="binary", zero_division=0))
    out["f1"] = float(skm.f1_score(
        labels, predictions, pos_label=pos, average="binary", zero_division=0))
  if scores is not None:
    out["auc"] = _roc_auc(labels, scores, num_classes)
  out["confusion_matrix"] = skm.confusion_matrix(
      labels, predictions, labels=all_classes).tolist()
  return out


def _balanced_accuracy(labels, predictions) -> float:
  with warnings.catch_warnings():
    # Warns when a predicted class never occurs in labels; the value is still right.
    warnings.simplefilter("ignore", UserWarning)
    return skm.balanced_accuracy_score(labels, predictions)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
  """The scalar entries of ``classification_metrics`` (for metric writers)."""
  return {k: float(v) for k, v in metrics.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}
