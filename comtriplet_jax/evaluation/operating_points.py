"""Operating points of binary detectors and calibration of class probabilities.

Binary detectors in this project output one score per image, larger meaning
more likely the positive class (label 1, melanoma / the minority class): a
probability (the classifier's softmax of class 1) or the prototype score
d_maj - d_min of deep clustering (any real number). A score becomes a decision
through a threshold; throughout this module an image is predicted positive when

    score >= threshold.

Threshold rules (:func:`choose_threshold`)
------------------------------------------
* ``"paper"``: the decision each paper defines for its method, given by the
  caller as ``paper_threshold``: 0.5 for the argmax of a 2-class softmax, 0.0
  for the prototype rule of Eq. 14 (melanoma when d_maj - d_min > 0). Both rules
  are strict: argmax sends the tie p_1 = 0.5 to class 0 (the first index), and a
  prototype tie goes to the majority class. So the threshold returned is the
  next float above ``paper_threshold``, with which ``score >= threshold`` is
  exactly ``score > paper_threshold``, ties included.
* ``"youden"``: the threshold maximising Youden's J = sensitivity +
  specificity - 1 on the given (validation) scores. Among thresholds with the
  same J, the highest is taken.
* ``"sensitivity=S"``, 0 < S <= 1 (e.g. ``"sensitivity=0.90"``): the HIGHEST
  threshold whose sensitivity on the given labels is at least S, i.e. the best
  specificity that keeps that sensitivity (the way a screening tool is tuned).

The data-driven thresholds are always one of the given scores, like the
thresholds of ``sklearn.metrics.roc_curve``: every cut point of the ROC curve
lies at a distinct score value, and applying the threshold to the same scores
reproduces the chosen (sensitivity, specificity) exactly. Tied scores are one
cut point: all images with that score fall on the same side.

Why on validation only
----------------------
A threshold tuned on the test set is a parameter fitted to the test labels: the
test sensitivity at the Youden point or at "sensitivity=0.90" would then be an
optimistically biased estimate (reaching the target by construction), not what
the detector does on unseen images. :func:`operating_point_metrics` therefore
chooses every threshold on the validation split and only then applies it to
the test split; the test data cannot influence the threshold. The sensitivity
reached on test at a "sensitivity=0.90" threshold may fall short of 0.90: that
shortfall is the honest estimate.

Calibration
-----------
For multi-class probabilities (BIIGMA-Net, 7 classes, or any classifier):

* :func:`expected_calibration_error`: top-label ECE of Guo et al. (2017), "On
  Calibration of Modern Neural Networks": the confidence max_c p_c of each
  image is put into ``num_bins`` equal-width bins (lower, upper] of [0, 1], and
  ECE = sum_b (|B_b| / n) |accuracy(B_b) - mean confidence(B_b)|.
* :func:`fit_temperature` / :func:`apply_temperature`: temperature scaling, the
  single T > 0 minimising the validation negative log-likelihood of
  softmax(z / T). The input z may be logits or log-probabilities: log p differs
  from the logits only by a per-image constant, which softmax ignores, so
  softmax(log p / T) is exactly temperature scaling of the underlying logits.
  This is the usual way to temperature-scale a model that exposes only its
  probabilities (pass ``np.log(np.clip(p, 1e-12, 1))``; zeros give -inf, which
  is refused).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Sequence

import numpy as np
from scipy import optimize
from scipy import special

from comtriplet_jax.evaluation import metrics as metrics_lib

RULE_FORMS = ('"paper"', '"youden"', '"sensitivity=S" with 0 < S <= 1 '
              '(e.g. "sensitivity=0.90")')

_SENSITIVITY_RULE = re.compile(r"^sensitivity=(.+)$")


def parse_rule(rule: str) -> tuple[str, float | None]:
  """Splits a rule string into its kind and, for a sensitivity rule, its target.

  Args:
    rule: ``"paper"``, ``"youden"`` or ``"sensitivity=S"``, 0 < S <= 1.

  Returns:
    ``("paper", None)``, ``("youden", None)`` or ``("sensitivity", S)``.

  Raises:
    ValueError: the rule is none of these forms, or S is out of range.
  """
  if not isinstance(rule, str):
    raise ValueError(f"threshold rule must be a string, got {rule!r}; accepted "
                     f"forms: {', '.join(RULE_FORMS)}")
  text = rule.strip()
  if text in ("paper", "youden"):
    return text, None
  match = _SENSITIVITY_RULE.match(text)
  if match is None:
    raise ValueError(f"unknown threshold rule {rule!r}; accepted forms: "
                     f"{', '.join(RULE_FORMS)}")
  try:
    target = float(match.group(1))
  except ValueError:
    raise ValueError(f"threshold rule {rule!r}: {match.group(1)!r} is not a number; "
                     f"accepted forms: {', '.join(RULE_FORMS)}") from None
  if not 0.0 < target <= 1.0:  # Also refuses NaN.
    raise ValueError(f"threshold rule {rule!r}: target sensitivity must lie in "
                     f"(0, 1], got {target}")
  return "sensitivity", target


def _check_binary(labels, scores, *, name: str = "",
                  need_both_classes: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Validated [n] int64 labels in {0, 1} and [n] float64 finite scores."""
  prefix = f"{name} " if name else ""
  labels = np.asarray(labels)
  scores = np.asarray(scores)
  if labels.ndim != 1:
    raise ValueError(f"{prefix}labels must be 1-D [n], got shape {labels.shape}")
  if scores.ndim != 1:
    hint = (" (for [n, 2] class probabilities pass the column of class 1)"
            if scores.ndim == 2 and scores.shape[-1] == 2 else "")
    raise ValueError(f"{prefix}scores must be 1-D [n], got shape {scores.shape}{hint}")
  if labels.shape != scores.shape:
    raise ValueError(f"{prefix}labels {labels.shape} and scores {scores.shape} "
                     "differ in length")
  if labels.size == 0:
    raise ValueError(f"{prefix}labels and scores are empty")
  if not np.all(np.isin(labels, (0, 1))):
    raise ValueError(f"{prefix}labels must be 0 or 1 (binary task), got values "
                     f"{np.unique(labels).tolist()[:10]}")
  labels = labels.astype(np.int64)
  scores = scores.astype(np.float64)
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"{prefix}scores contain {int(np.sum(~np.isfinite(scores)))} "
                     "NaN or infinite values")
  if need_both_classes:
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
      present = 1 if positives else 0
      raise ValueError(f"{prefix}labels contain only class {present} "
                       f"({labels.size} examples); choosing a threshold needs both "
                       "classes 0 and 1")
  return labels, scores


def _roc_counts(labels: np.ndarray, scores: np.ndarray):
  """Distinct score values, descending, and the TP and FP counts at each.

  At threshold t (predict positive when score >= t), TP(t) is the number of
  positives with score >= t, FP(t) that of negatives. Only the distinct score
  values are cut points: between two of them, nothing changes.
  """
  thresholds = np.unique(scores)[::-1]
  positive_scores = np.sort(scores[labels == 1])
  negative_scores = np.sort(scores[labels == 0])
  tp = positive_scores.size - np.searchsorted(positive_scores, thresholds, "left")
  fp = negative_scores.size - np.searchsorted(negative_scores, thresholds, "left")
  return thresholds, tp.astype(np.int64), fp.astype(np.int64)


def choose_threshold(labels: Sequence[int] | np.ndarray,
                     scores: Sequence[float] | np.ndarray,
                     rule: str,
                     *,
                     paper_threshold: float | None = None) -> float:
  """The decision threshold of one rule, chosen on these (validation) data.

  Args:
    labels: [n] true labels in {0, 1}; both classes must be present.
    scores: [n] scores, larger = more likely class 1.
    rule: ``"paper"``, ``"youden"`` or ``"sensitivity=S"`` (0 < S <= 1); see the
      module docstring.
    paper_threshold: the paper's own cut (0.5 for a 2-class softmax argmax, 0.0
      for the prototype sign rule); required by ``"paper"``, ignored otherwise.

  Returns:
    The threshold t; predict class 1 when ``score >= t``. For ``"youden"`` and
    sensitivity rules t is one of ``scores``; for ``"paper"`` it is the next
    float above ``paper_threshold`` (so the rule is the papers' strict
    ``score > paper_threshold``).

  Raises:
    ValueError: unknown rule, missing paper threshold, bad shapes or labels,
      non-finite scores, or a single class in ``labels``.
  """
  kind, target = parse_rule(rule)
  labels, scores = _check_binary(labels, scores)
  if kind == "paper":
    if paper_threshold is None:
      raise ValueError('rule "paper" needs paper_threshold (0.5 for a 2-class '
                       "softmax argmax, 0.0 for the prototype rule d_maj - d_min > 0)")
    paper_threshold = float(paper_threshold)
    if not math.isfinite(paper_threshold):
      raise ValueError(f"paper_threshold must be finite, got {paper_threshold}")
    return float(np.nextafter(paper_threshold, math.inf))
  thresholds, tp, fp = _roc_counts(labels, scores)
  num_pos = int(labels.sum())
  num_neg = labels.size - num_pos
  if kind == "youden":
    # J * P * N = TP * N - FP * P: exact integers, so equal J ties exactly and
    # argmax (first maximum, thresholds descending) takes the highest threshold.
    j_scaled = tp * num_neg - fp * num_pos
    return float(thresholds[int(np.argmax(j_scaled))])
  # Sensitivity TP / P is non-decreasing as t decreases and reaches 1 at the
  # lowest score, so some cut point qualifies. TP / P is compared as a float
  # division, not TP >= S * P: 0.7 * 10 is 7.000000000000001 in floating point,
  # while 7 / 10 rounds to the same double as the literal 0.7, so a target hit
  # exactly counts as hit.
  reaches = tp / num_pos >= target
  return float(thresholds[int(np.argmax(reaches))])


def apply_threshold(scores: Sequence[float] | np.ndarray,
                    threshold: float) -> np.ndarray:
  """[n] int64 predictions: 1 where ``score >= threshold``, else 0.

  Raises:
    ValueError: scores not 1-D or not finite, or a NaN threshold.
  """
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 1:
    raise ValueError(f"scores must be 1-D [n], got shape {scores.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or infinite values")
  threshold = float(threshold)
  if math.isnan(threshold):
    raise ValueError("threshold is NaN")
  return (scores >= threshold).astype(np.int64)


def operating_point_metrics(val_labels: Sequence[int] | np.ndarray,
                            val_scores: Sequence[float] | np.ndarray,
                            test_labels: Sequence[int] | np.ndarray,
                            test_scores: Sequence[float] | np.ndarray,
                            rules: Sequence[str] = ("paper", "youden",
                                                    "sensitivity=0.90"),
                            paper_threshold: float | None = None) -> dict[str, Any]:
  """Test metrics at thresholds chosen on validation, one entry per rule.

  Args:
    val_labels: [n_val] validation labels in {0, 1}, both classes present.
    val_scores: [n_val] validation scores, larger = more likely class 1.
    test_labels: [n_test] test labels in {0, 1}.
    test_scores: [n_test] test scores, same scale as ``val_scores``.
    rules: threshold rules (see :func:`choose_threshold`).
    paper_threshold: the paper's cut, needed when ``rules`` has ``"paper"``.

  Returns:
    ``{rule: entry}``, JSON-serialisable, each entry with:
    ``threshold`` (float, chosen on validation only), ``validation``
    (``sensitivity``, ``specificity``, ``num_examples`` at that threshold) and
    ``test``: :func:`metrics.classification_metrics` of the test predictions at
    that threshold (``sensitivity``, ``specificity``, ``precision``, ``f1``,
    ``balanced_accuracy``, ``accuracy``, ``confusion_matrix`` [[TN, FP],
    [FN, TP]], and the macro and class-weighted averages).

  Raises:
    ValueError: as :func:`choose_threshold`, for a test split that is not binary
      or not aligned, or an empty ``rules``.
  """
  if isinstance(rules, str):
    rules = (rules,)
  if len(rules) == 0:
    raise ValueError("rules is empty; give at least one of "
                     f"{', '.join(RULE_FORMS)}")
  for rule in rules:  # Fail on a bad rule before computing anything.
    parse_rule(rule)
  val_labels, val_scores = _check_binary(val_labels, val_scores, name="validation")
  test_labels, test_scores = _check_binary(test_labels, test_scores, name="test",
                                           need_both_classes=False)
  out: dict[str, Any] = {}
  for rule in rules:
    # Only validation data reach choose_threshold.
    threshold = choose_threshold(val_labels, val_scores, rule,
                                 paper_threshold=paper_threshold)
    val_metrics = metrics_lib.classification_metrics(
        val_labels, apply_threshold(val_scores, threshold), num_classes=2)
    test_metrics = metrics_lib.classification_metrics(
        test_labels, apply_threshold(test_scores, threshold), num_classes=2)
    out[rule] = {
        "threshold": float(threshold),
        "validation": {
            "sensitivity": float(val_metrics["sensitivity"]),
            "specificity": float(val_metrics["specificity"]),
            "num_examples": int(val_metrics["num_examples"]),
        },
        "test": test_metrics,
    }
  return out


def _check_multiclass(labels, values, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Validated [n] int64 labels in [0, C) and [n, C] float64 finite values."""
  labels = np.asarray(labels)
  values = np.asarray(values, dtype=np.float64)
  if values.ndim != 2 or values.shape[1] < 2:
    raise ValueError(f"{name} must be [n, C] with C >= 2, got shape {values.shape}")
  if labels.ndim != 1 or labels.shape[0] != values.shape[0]:
    raise ValueError(f"labels must be [n] with n = {values.shape[0]} (the rows of "
                     f"{name}), got shape {labels.shape}")
  if labels.size == 0:
    raise ValueError(f"labels and {name} are empty")
  if not np.issubdtype(labels.dtype, np.integer) and not np.all(
      labels == np.round(labels)):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
  labels = labels.astype(np.int64)
  num_classes = values.shape[1]
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  if not np.all(np.isfinite(values)):
    hint = (" (log-probabilities of exactly 0? clip the probabilities before "
            "taking the log)" if name == "logits" else "")
    raise ValueError(f"{name} contain {int(np.sum(~np.isfinite(values)))} NaN or "
                     f"infinite values{hint}")
  return labels, values


def expected_calibration_error(labels: Sequence[int] | np.ndarray,
                               probs: np.ndarray,
                               num_bins: int = 15) -> float:
  """Top-label expected calibration error (Guo et al. 2017).

  Args:
    labels: [n] true class ids in [0, C).
    probs: [n, C] class probabilities (rows summing to 1).
    num_bins: equal-width confidence bins (lower, upper] over [0, 1].

  Returns:
    ECE = sum_b (|B_b| / n) |accuracy(B_b) - mean confidence(B_b)|, where the
    confidence of an image is its largest probability and it is correct when
    that probability's class (the first, on ties) is its label.

  Raises:
    ValueError: bad shapes, labels, probabilities or ``num_bins``.
  """
  if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) \
      or num_bins < 1:
    raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")
  labels, probs = _check_multiclass(labels, probs, "probs")
  if probs.min() < 0 or probs.max() > 1:
    raise ValueError(f"probs must lie in [0, 1], got range [{probs.min()}, "
                     f"{probs.max()}] (logits? apply a softmax first)")
  row_sums = probs.sum(axis=1)
  worst = int(np.argmax(np.abs(row_sums - 1)))
  if abs(row_sums[worst] - 1) > 1e-3:
    raise ValueError(f"probs rows must sum to 1, row {worst} sums to "
                     f"{row_sums[worst]}")
  confidence = probs.max(axis=1)
  correct = (probs.argmax(axis=1) == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  # Bin b holds edges[b] < confidence <= edges[b + 1]; a confidence of exactly 0
  # (impossible for a maximum of probabilities) would go to the first bin.
  bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
  counts = np.bincount(bins, minlength=num_bins)
  sum_correct = np.bincount(bins, weights=correct, minlength=num_bins)
  sum_confidence = np.bincount(bins, weights=confidence, minlength=num_bins)
  # |sum correct - sum confidence| / n = (|B_b| / n) |accuracy - confidence|.
  return float(np.sum(np.abs(sum_correct - sum_confidence)) / labels.size)


def _check_temperature(temperature) -> float:
  temperature = float(temperature)
  if not (math.isfinite(temperature) and temperature > 0):
    raise ValueError(f"temperature must be finite and > 0, got {temperature}")
  return temperature


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
  """softmax(logits / T) over the last axis.

  Args:
    logits: [..., C] logits or log-probabilities (see the module docstring).
    temperature: T > 0; T > 1 softens over-confident probabilities.

  Returns:
    [..., C] float64 probabilities.

  Raises:
    ValueError: T not finite and positive, or non-finite logits.
  """
  temperature = _check_temperature(temperature)
  logits = np.asarray(logits, dtype=np.float64)
  if logits.ndim < 1 or logits.shape[-1] < 2:
    raise ValueError(f"logits must be [..., C] with C >= 2, got shape {logits.shape}")
  if not np.all(np.isfinite(logits)):
    raise ValueError("logits contain NaN or infinite values (log-probabilities of "
                     "exactly 0? clip the probabilities before taking the log)")
  return special.softmax(logits / temperature, axis=-1)


def temperature_nll(labels: Sequence[int] | np.ndarray, logits: np.ndarray,
                    temperature: float) -> float:
  """Mean negative log-likelihood of the labels under softmax(logits / T)."""
  temperature = _check_temperature(temperature)
  labels, logits = _check_multiclass(labels, logits, "logits")
  return _nll(labels, logits, temperature)


def _nll(labels: np.ndarray, logits: np.ndarray, temperature: float) -> float:
  log_probs = special.log_softmax(logits / temperature, axis=1)
  return float(-np.mean(log_probs[np.arange(labels.size), labels]))


def fit_temperature(val_labels: Sequence[int] | np.ndarray,
                    val_logits: np.ndarray,
                    *,
                    bounds: tuple[float, float] = (0.01, 100.0)) -> float:
  """Temperature scaling: the T > 0 minimising validation NLL of softmax(z / T).

  The NLL is convex in 1 / T (a log-sum-exp of a linear function of 1 / T minus
  a linear term), hence unimodal in log T, where a bounded scalar minimisation
  (Brent) finds it.

  Args:
    val_labels: [n] validation class ids in [0, C).
    val_logits: [n, C] validation logits, or log-probabilities of a model that
      exposes only probabilities (softmax(log p / T) is the same scaling).
    bounds: the search interval of T. A warning is raised when the minimum lies
      at a bound (e.g. validation predictions all correct, where the NLL keeps
      falling as T -> 0).

  Returns:
    The fitted temperature T (> 1 when the model is over-confident).

  Raises:
    ValueError: bad shapes, labels, non-finite logits or bounds.
  """
  low, high = (float(b) for b in bounds)
  if not (0 < low < high and math.isfinite(high)):
    raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds}")
  labels, logits = _check_multiclass(val_labels, val_logits, "logits")
  log_low, log_high = math.log(low), math.log(high)
  result = optimize.minimize_scalar(
      lambda log_t: _nll(labels, logits, math.exp(log_t)),
      bounds=(log_low, log_high), method="bounded",
      options={"xatol": 1e-7, "maxiter": 500})
  temperature = math.exp(float(result.x))
  best = _nll(labels, logits, temperature)
  # Brent stops where the NLL goes flat, e.g. once it underflows to 0 on
  # validation data that are all predicted correctly; a bound then does as well.
  for bound in (low, high):
    if _nll(labels, logits, bound) <= best:
      temperature, best = bound, _nll(labels, logits, bound)
  if min(abs(math.log(temperature / low)), abs(math.log(high / temperature))) < 1e-3:
    warnings.warn(f"fitted temperature {temperature:.4g} lies at the bound of "
                  f"{bounds}; the validation NLL has no interior minimum there")
  return temperature
