"""Metrics against confusion matrices worked out by hand."""

import math

import numpy as np
import pytest

from comtriplet_jax.evaluation import metrics


def test_binary_metrics_from_hand_counted_confusion_matrix():
  # 6 negatives, 4 positives. Confusion matrix (rows true, cols predicted):
  #   [[TN=5, FP=1],
  #    [FN=1, TP=3]]
  labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
  preds = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
  scores = np.array([.1, .2, .3, .35, .4, .8, .9, .7, .6, .45])
  m = metrics.classification_metrics(labels, preds, scores, num_classes=2)
  assert m["confusion_matrix"] == [[5, 1], [1, 3]]
  assert m["accuracy"] == pytest.approx(8 / 10)
  assert m["sensitivity"] == pytest.approx(3 / 4)
  assert m["specificity"] == pytest.approx(5 / 6)
  assert m["precision"] == pytest.approx(3 / 4)
  assert m["f1"] == pytest.approx(3 / 4)
  # Class-weighted (support 6 and 4): recall_w = accuracy; precision_w by hand.
  prec_neg, prec_pos = 5 / 6, 3 / 4
  assert m["recall_weighted"] == pytest.approx(0.8)
  assert m["precision_weighted"] == pytest.approx(0.6 * prec_neg + 0.4 * prec_pos)
  f1_neg = 2 * prec_neg * (5 / 6) / (prec_neg + 5 / 6)
  assert m["f1_weighted"] == pytest.approx(0.6 * f1_neg + 0.4 * 0.75)
  # Specificity of class 0 is the recall of class 1 and vice versa.
  assert m["specificity_weighted"] == pytest.approx(0.6 * (3 / 4) + 0.4 * (5 / 6))
  assert m["balanced_accuracy"] == pytest.approx((5 / 6 + 3 / 4) / 2)
  assert m["recall_macro"] == pytest.approx((5 / 6 + 3 / 4) / 2)
  # AUC by pair counting: positives .9 .7 .6 .45 against negatives.
  neg = scores[labels == 0]
  pos = scores[labels == 1]
  pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
  assert m["auc"] == pytest.approx(np.mean(pairs))


def test_multiclass_metrics_by_hand():
  labels = np.array([0, 0, 1, 1, 2, 2, 2])
  preds = np.array([0, 1, 1, 1, 2, 0, 2])
  m = metrics.classification_metrics(labels, preds, num_classes=3)
  assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
  recalls = np.array([1 / 2, 2 / 2, 2 / 3])
  precisions = np.array([1 / 2, 2 / 3, 2 / 2])
  assert m["recall_macro"] == pytest.approx(recalls.mean())
  assert m["precision_macro"] == pytest.approx(precisions.mean())
  f1 = 2 * recalls * precisions / (recalls + precisions)
  assert m["f1_macro"] == pytest.approx(f1.mean())
  assert m["accuracy"] == pytest.approx(5 / 7)
  assert "auc" not in m and "sensitivity" not in m


def test_multiclass_auc_and_missing_class():
  rng = np.random.default_rng(0)
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
  probs = rng.dirichlet(np.ones(3), size=8)
  m = metrics.classification_metrics(labels, probs.argmax(1), probs, num_classes=3)
  # One-vs-rest macro AUC by hand: for each class, the share of (positive,
  # negative) pairs ranked in the right order, ties counting one half.
  def pairwise_auc(positive, negative):
    diff = positive[:, None] - negative[None, :]
    return (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
  expected = np.mean([pairwise_auc(probs[labels == c, c], probs[labels != c, c])
                      for c in range(3)])
  assert m["auc"] == pytest.approx(expected, abs=1e-12)
  # A class absent from the labels: the mean over the present classes only.
  present = labels != 2
  m = metrics.classification_metrics(labels[present], probs[present].argmax(1),
                                     probs[present], num_classes=3)
  expected = np.mean([pairwise_auc(probs[present & (labels == c), c],
                                   probs[present & (labels != c), c]) for c in (0, 1)])
  assert m["auc"] == pytest.approx(expected, abs=1e-12)
  # A single present class: AUC undefined, reported as NaN with a warning.
  with pytest.warns(UserWarning, match="undefined"):
    m = metrics.classification_metrics([1, 1], [1, 0], [.3, .2], num_classes=2)
  assert math.isnan(m["auc"])


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="predictions"):
    metrics.classification_metrics([0, 1], [0, 2], num_classes=2)
  with pytest.raises(ValueError, match="scores"):
    metrics.classification_metrics([0, 1], [0, 1], [0.1], num_classes=2)
  with pytest.raises(ValueError, match="NaN"):
    metrics.classification_metrics([0, 1], [0, 1], [0.1, np.nan], num_classes=2)
