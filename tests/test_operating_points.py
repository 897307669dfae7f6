"""Operating points and calibration against references written here.

Thresholds are checked against ``sklearn.metrics.roc_curve`` (its cut points,
with ``drop_intermediate=False`` so that every distinct score is one), ECE
against a direct loop over the bins, temperature scaling against the NLL on a
fine grid of temperatures.
"""

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from comtriplet_jax.evaluation import operating_points as op


# --- references -------------------------------------------------------------


def _roc(labels, scores):
  """sklearn's cut points without the leading +inf (which predicts nothing)."""
  fpr, tpr, thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
  assert np.isinf(thresholds[0])
  return fpr[1:], tpr[1:], thresholds[1:]  # thresholds descending


def _reference_youden(labels, scores):
  """Highest threshold among those of maximal tpr - fpr (rounding-tolerant)."""
  fpr, tpr, thresholds = _roc(labels, scores)
  j = tpr - fpr
  tied = np.flatnonzero(j >= j.max() - 1e-12)
  return thresholds[tied].max()


def _reference_sensitivity(labels, scores, target):
  """Highest threshold with tpr >= target (first in roc_curve's order)."""
  _, tpr, thresholds = _roc(labels, scores)
  return thresholds[np.flatnonzero(tpr >= target)[0]]


def _sens_spec(labels, predictions):
  labels = np.asarray(labels)
  return (np.mean(predictions[labels == 1] == 1),
          np.mean(predictions[labels == 0] == 0))


def _random_binary(rng, n, ties):
  labels = rng.integers(0, 2, size=n)
  labels[:2] = (0, 1)
  scores = rng.normal(size=n) + labels * rng.uniform(0.0, 2.0)
  if ties == "some":
    scores = np.round(scores, 1)
  elif ties == "many":
    scores = np.round(scores)
  return labels, scores


# --- thresholds ---------------------------------------------------------------


def test_rules_match_roc_curve_on_random_scores_with_and_without_ties():
  rng = np.random.default_rng(0)
  for trial in range(36):
    n = int(rng.integers(4, 150))
    labels, scores = _random_binary(rng, n, ("none", "some", "many")[trial % 3])
    fpr, tpr, thresholds = _roc(labels, scores)

    t = op.choose_threshold(labels, scores, "youden")
    assert t == _reference_youden(labels, scores)
    # An achievable cut point: applying it gives exactly its ROC point.
    i = int(np.flatnonzero(thresholds == t)[0])
    sens, spec = _sens_spec(labels, op.apply_threshold(scores, t))
    assert (sens, spec) == pytest.approx((tpr[i], 1 - fpr[i]), abs=1e-12)

    num_pos = int(labels.sum())
    targets = [0.05, 0.5, 0.9, 0.95, 1.0, 1 / num_pos, 7 / num_pos if num_pos >= 7
               else 1.0]
    for target in targets:
      t = op.choose_threshold(labels, scores, f"sensitivity={target!r}")
      assert t == _reference_sensitivity(labels, scores, target), (trial, target)
      sens, spec = _sens_spec(labels, op.apply_threshold(scores, t))
      assert sens >= target
      i = int(np.flatnonzero(thresholds == t)[0])
      assert (sens, spec) == pytest.approx((tpr[i], 1 - fpr[i]), abs=1e-12)
      # Highest: the next cut point up misses the target.
      if i > 0:
        assert tpr[i - 1] < target


def test_sensitivity_target_hit_exactly():
  # 25 positives with scores 1..25, negatives among them. Sensitivity 0.28 needs
  # the 7 positives 19..25: threshold 19 (the negative at 19.5 is a cut point
  # with sensitivity 6/25). 0.28 * 25 is 7.000000000000001 in floating point, so
  # a rule comparing TP >= target * P would wrongly go down to 18.
  pos = np.arange(1.0, 26.0)
  neg = np.array([0.5, 10.5, 18.5, 19.5, 22.5, 30.0])
  scores = np.concatenate([pos, neg])
  labels = np.concatenate([np.ones(25, int), np.zeros(6, int)])
  assert 0.28 * 25 > 7
  t = op.choose_threshold(labels, scores, "sensitivity=0.28")
  assert t == 19.0 == _reference_sensitivity(labels, scores, 0.28)
  sens, spec = _sens_spec(labels, op.apply_threshold(scores, t))
  assert (sens, spec) == (0.28, 3 / 6)
  assert op.choose_threshold(labels, scores, "sensitivity=0.29") == 18.0
  assert op.choose_threshold(labels, scores, "sensitivity=1") == 1.0
  assert op.choose_threshold(labels, scores, "sensitivity=0.04") == 25.0
  # A 0.70 target: 14 of 20 positives (the negative at 7.5 gives 13).
  labels20 = np.concatenate([np.ones(20, int), np.zeros(3, int)])
  scores20 = np.concatenate([np.arange(1.0, 21.0), [2.5, 6.5, 7.5]])
  assert op.choose_threshold(labels20, scores20, "sensitivity=0.70") == 7.0


def test_tied_scores_by_hand():
  # Three images tie at 0.5 (two positives, one negative): one cut point.
  labels = np.array([0, 1, 1, 0, 1, 0])
  scores = np.array([0.2, 0.5, 0.5, 0.5, 0.9, 0.1])
  # Cut points 0.9, 0.5, 0.2, 0.1: sensitivity 1/3, 1, 1, 1; specificity 1, 2/3,
  # 1/3, 0; J = 1/3, 2/3, 1/3, 0.
  assert op.choose_threshold(labels, scores, "youden") == 0.5
  assert op.choose_threshold(labels, scores, "sensitivity=0.5") == 0.5
  assert op.choose_threshold(labels, scores, "sensitivity=0.3") == 0.9
  predictions = op.apply_threshold(scores, 0.5)
  np.testing.assert_array_equal(predictions, [0, 1, 1, 1, 1, 0])
  assert _sens_spec(labels, predictions) == (1.0, 2 / 3)


def test_youden_tie_takes_the_highest_threshold():
  labels = np.array([1, 0, 1, 0])
  scores = np.array([4.0, 3.0, 2.0, 1.0])
  # J at 4, 3, 2, 1: 1/2, 0, 1/2, 0.
  assert op.choose_threshold(labels, scores, "youden") == 4.0


def test_apply_threshold_predicts_positive_at_equality():
  np.testing.assert_array_equal(
      op.apply_threshold(np.array([0.49, 0.5, 0.51]), 0.5), [0, 1, 1])
  np.testing.assert_array_equal(
      op.apply_threshold(np.array([-1.0, 0.0, 2.0], np.float32), 0.0), [0, 1, 1])


def test_paper_rule_reproduces_softmax_argmax_and_prototype_sign():
  rng = np.random.default_rng(1)
  labels = np.tile([0, 1], 100)
  logits = rng.normal(size=(200, 2))
  logits[:20, 1] = logits[:20, 0]  # p = (0.5, 0.5) exactly: argmax says 0
  exp = np.exp(logits)
  probs = exp / exp.sum(axis=1, keepdims=True)
  assert np.sum(probs[:, 1] == 0.5) == 20
  t = op.choose_threshold(labels, probs[:, 1], "paper", paper_threshold=0.5)
  np.testing.assert_array_equal(op.apply_threshold(probs[:, 1], t),
                                probs.argmax(axis=1))
  probs32 = probs.astype(np.float32)
  np.testing.assert_array_equal(op.apply_threshold(probs32[:, 1], t),
                                probs32.argmax(axis=1))

  # Prototype rule: melanoma when d_maj - d_min > 0; a tie goes to the majority.
  d_maj = rng.uniform(size=200)
  d_min = rng.uniform(size=200)
  d_min[:15] = d_maj[:15]
  scores = d_maj - d_min
  assert np.sum(scores == 0) == 15
  t = op.choose_threshold(labels, scores, "paper", paper_threshold=0.0)
  np.testing.assert_array_equal(op.apply_threshold(scores, t),
                                (d_maj > d_min).astype(int))


def test_threshold_is_chosen_on_validation_only():
  rng = np.random.default_rng(2)
  val_labels, val_scores = _random_binary(rng, 80, "some")
  test_a = _random_binary(rng, 60, "none")
  test_b = _random_binary(rng, 45, "many")
  rules = ("paper", "youden", "sensitivity=0.9")
  out_a = op.operating_point_metrics(val_labels, val_scores, *test_a, rules, 0.0)
  out_b = op.operating_point_metrics(val_labels, val_scores, *test_b, rules, 0.0)
  assert set(out_a) == set(rules)
  for rule in rules:
    expected = op.choose_threshold(val_labels, val_scores, rule, paper_threshold=0.0)
    assert out_a[rule]["threshold"] == out_b[rule]["threshold"] == expected
    assert out_a[rule]["validation"] == out_b[rule]["validation"]
    # The test sets would have given other thresholds: the check has teeth.
    if rule != "paper":
      assert op.choose_threshold(*test_a, rule) != expected
      assert op.choose_threshold(*test_b, rule) != expected


def test_operating_point_metrics_values_and_json():
  rng = np.random.default_rng(3)
  val_labels, val_scores = _random_binary(rng, 90, "some")
  test_labels, test_scores = _random_binary(rng, 70, "none")
  out = op.operating_point_metrics(val_labels, val_scores, test_labels, test_scores,
                                   ["youden", "sensitivity=0.8", "paper"],
                                   paper_threshold=0.0)
  assert json.loads(json.dumps(out)) == out
  for rule, entry in out.items():
    t = entry["threshold"]
    val_pred = (val_scores >= t).astype(int)
    assert (entry["validation"]["sensitivity"],
            entry["validation"]["specificity"]) == pytest.approx(
                _sens_spec(val_labels, val_pred))
    pred = (test_scores >= t).astype(int)
    tp = int(np.sum((pred == 1) & (test_labels == 1)))
    fp = int(np.sum((pred == 1) & (test_labels == 0)))
    tn = int(np.sum((pred == 0) & (test_labels == 0)))
    fn = int(np.sum((pred == 0) & (test_labels == 1)))
    m = entry["test"]
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]], rule
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["balanced_accuracy"] == pytest.approx(
        (tp / (tp + fn) + tn / (tn + fp)) / 2)
    assert m["accuracy"] == pytest.approx((tp + tn) / test_labels.size)
  assert out["sensitivity=0.8"]["validation"]["sensitivity"] >= 0.8


# --- calibration --------------------------------------------------------------


def _reference_ece(labels, probs, num_bins):
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  confidence = probs.max(axis=1)
  correct = probs.argmax(axis=1) == labels
  ece = 0.0
  for lower, upper in zip(edges[:-1], edges[1:]):
    in_bin = (confidence > lower) & (confidence <= upper)
    if in_bin.any():
      ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
  return ece


def test_ece_against_loop_on_random_probabilities():
  rng = np.random.default_rng(4)
  for trial in range(12):
    n, c = int(rng.integers(1, 300)), int(rng.integers(2, 8))
    probs = rng.dirichlet(np.full(c, rng.uniform(0.1, 3.0)), size=n)
    labels = rng.integers(0, c, size=n)
    for num_bins in (1, 5, 15, 40):
      assert op.expected_calibration_error(labels, probs, num_bins) == pytest.approx(
          _reference_ece(labels, probs, num_bins), abs=1e-12), (trial, num_bins)


def test_ece_by_hand_with_confidences_on_bin_edges():
  # Two bins (0, .5] and (.5, 1]. Confidence .5 belongs to the first.
  probs = np.array([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
  labels = np.array([0, 0, 0, 0])  # correct, correct, correct, wrong
  # Bin 1: accuracy 1, confidence .5 -> 2/4 * .5. Bin 2: accuracy .5,
  # confidence .85 -> 2/4 * .35.
  assert op.expected_calibration_error(labels, probs, 2) == pytest.approx(0.425)
  assert op.expected_calibration_error(labels, probs, 2) == pytest.approx(
      _reference_ece(labels, probs, 2))
  assert op.expected_calibration_error([0, 1], np.eye(2), 15) == 0.0


def _grid_nll(labels, logits, temperatures):
  out = []
  for t in temperatures:
    z = logits / t
    top = z.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    out.append(np.mean(lse - z[np.arange(labels.size), labels]))
  return np.array(out)


def _sample_labels(rng, logits):
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  u = rng.uniform(size=(logits.shape[0], 1))
  return np.minimum((probs.cumsum(axis=1) < u).sum(axis=1), logits.shape[1] - 1)


def test_temperature_recovers_over_and_under_confidence():
  rng = np.random.default_rng(5)
  z = rng.normal(size=(3000, 7)) * 1.5
  labels = _sample_labels(rng, z)  # z is calibrated; 3 z is over-confident
  over = 3.0 * z
  t = op.fit_temperature(labels, over)
  assert 2.6 < t < 3.4
  # The minimum of the NLL, against a fine grid computed here.
  grid = np.geomspace(1.0, 9.0, 801)
  nll = _grid_nll(labels, over, grid)
  assert _grid_nll(labels, over, [t])[0] <= nll.min() + 1e-10
  step = np.log(grid[1] / grid[0])
  assert abs(np.log(t) - np.log(grid[np.argmin(nll)])) <= step
  assert op.temperature_nll(labels, over, t) == pytest.approx(
      _grid_nll(labels, over, [t])[0])
  # Log-probabilities give the same temperature as the logits.
  log_probs = over - np.log(np.exp(over).sum(axis=1, keepdims=True))
  assert op.fit_temperature(labels, log_probs) == pytest.approx(t, rel=1e-5)
  # Scaling improves calibration.
  ece_raw = op.expected_calibration_error(labels, op.apply_temperature(over, 1.0))
  ece_scaled = op.expected_calibration_error(labels, op.apply_temperature(over, t))
  assert ece_scaled < ece_raw / 2
  # Under-confident logits: T < 1.
  assert 0.4 < op.fit_temperature(labels, z / 2.0) < 0.6


def test_apply_temperature_is_softmax_of_scaled_logits():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(5, 4)) * 3
  for t in (0.3, 1.0, 2.5):
    expected = np.exp(logits / t) / np.exp(logits / t).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(op.apply_temperature(logits, t), expected, rtol=1e-12)


def test_temperature_at_the_bound_warns():
  logits = np.array([[5.0, 0.0], [0.0, 5.0]])  # all correct: NLL falls as T -> 0
  with pytest.warns(UserWarning, match="at the bound"):
    t = op.fit_temperature([0, 1], logits)
  assert t == pytest.approx(0.01, rel=1e-3)


# --- bad inputs -----------------------------------------------------------------


@pytest.mark.parametrize("rule, message", [
    ("youdan", r"unknown threshold rule 'youdan'.*accepted forms.*sensitivity=S"),
    ("sensitivity", r"unknown threshold rule"),
    ("sensitivity=1.5", r"must lie in \(0, 1\], got 1.5"),
    ("sensitivity=0", r"must lie in \(0, 1\], got 0.0"),
    ("sensitivity=nan", r"must lie in \(0, 1\]"),
    ("sensitivity=high", r"'high' is not a number"),
    (0.9, r"must be a string, got 0.9"),
])
def test_bad_rule(rule, message):
  with pytest.raises(ValueError, match=message):
    op.choose_threshold([0, 1], [0.1, 0.9], rule)


def test_bad_threshold_inputs():
  with pytest.raises(ValueError, match="only class 1"):
    op.choose_threshold([1, 1, 1], [0.1, 0.2, 0.3], "youden")
  with pytest.raises(ValueError, match="only class 0"):
    op.choose_threshold([0, 0], [0.1, 0.2], "paper", paper_threshold=0.5)
  with pytest.raises(ValueError, match=r"labels \(3,\) and scores \(2,\) differ"):
    op.choose_threshold([0, 1, 1], [0.1, 0.2], "youden")
  with pytest.raises(ValueError, match="needs paper_threshold"):
    op.choose_threshold([0, 1], [0.1, 0.2], "paper")
  with pytest.raises(ValueError, match=r"labels must be 0 or 1.*\[0, 1, 2\]"):
    op.choose_threshold([0, 1, 2], [0.1, 0.2, 0.3], "youden")
  with pytest.raises(ValueError, match="1 NaN or infinite"):
    op.choose_threshold([0, 1], [0.1, np.nan], "youden")
  with pytest.raises(ValueError, match="pass the column of class 1"):
    op.choose_threshold([0, 1], np.eye(2), "youden")
  with pytest.raises(ValueError, match="threshold is NaN"):
    op.apply_threshold([0.1], math.nan)
  with pytest.raises(ValueError, match="validation labels contain only class 0"):
    op.operating_point_metrics([0, 0], [0.1, 0.2], [0, 1], [0.1, 0.2], ["youden"])
  with pytest.raises(ValueError, match=r"test labels \(2,\) and scores \(3,\)"):
    op.operating_point_metrics([0, 1], [0.1, 0.2], [0, 1], [0.1, 0.2, 0.3],
                               ["youden"])
  with pytest.raises(ValueError, match="unknown threshold rule 'best'"):
    op.operating_point_metrics([0, 1], [0.1, 0.2], [0, 1], [0.1, 0.2],
                               ["youden", "best"])


def test_bad_calibration_inputs():
  probs = np.array([[0.7, 0.3], [0.4, 0.6]])
  with pytest.raises(ValueError, match=r"labels must be \[n\] with n = 2"):
    op.expected_calibration_error([0, 1, 1], probs)
  with pytest.raises(ValueError, match=r"must lie in \[0, 2\), got range \[0, 2\]"):
    op.expected_calibration_error([0, 2], probs)
  with pytest.raises(ValueError, match="row 1 sums to 1.5"):
    op.expected_calibration_error([0, 1], [[0.7, 0.3], [0.9, 0.6]])
  with pytest.raises(ValueError, match="num_bins must be an integer >= 1, got 0"):
    op.expected_calibration_error([0, 1], probs, 0)
  with pytest.raises(ValueError, match=r"probs must be \[n, C\] with C >= 2"):
    op.expected_calibration_error([0, 1], [0.7, 0.4])
  with pytest.raises(ValueError, match="clip the probabilities"):
    op.fit_temperature([0, 1], [[0.0, -np.inf], [-0.7, -0.7]])
  with pytest.raises(ValueError, match="temperature must be finite and > 0, got 0.0"):
    op.apply_temperature(probs, 0.0)
  with pytest.raises(ValueError, match="temperature must be finite and > 0, got -1"):
    op.apply_temperature(probs, -1)
  with pytest.raises(ValueError, match="bounds must satisfy"):
    op.fit_temperature([0, 1], probs, bounds=(2.0, 1.0))
