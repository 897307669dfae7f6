"""Cluster centres (Eq. 6), the monotone update (Eq. 7), prototype inference (Eq. 14)
and the feature selection, against NumPy written out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comtriplet_jax.clustering import prototypes


def _cos(u, v):
  u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
  return 1.0 - np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))


def test_printed_eq6_when_every_anchor_is_majority():
  rng = np.random.default_rng(0)
  m, s = 5, 7
  a, p, n = (rng.normal(size=(m, s)).astype(np.float32) for _ in range(3))
  labels = np.concatenate([np.zeros(m), np.zeros(m), np.ones(m)]).astype(np.int32)
  cmin, cmaj, valid = jax.jit(prototypes.class_centres)(
      np.concatenate([a, p, n]), labels)
  np.testing.assert_allclose(cmaj, (a + p).sum(0) / (2 * m), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cmin, n.sum(0) / m, rtol=1e-5, atol=1e-6)
  assert bool(valid)


def test_general_per_class_centres_with_mixed_anchors():
  e = np.array([[1., 0.], [3., 2.], [0., 4.], [2., 2.], [5., 1.], [1., 1.]], np.float32)
  # Anchor classes (0, 1): A and P take them, N the opposite ones.
  anchor = np.array([0, 1])
  labels = np.concatenate([anchor, anchor, 1 - anchor])
  cmin, cmaj, valid = prototypes.class_centres(e, labels)
  minority = e[labels == 1]
  majority = e[labels == 0]
  np.testing.assert_allclose(cmin, minority.mean(0), rtol=1e-6)
  np.testing.assert_allclose(cmaj, majority.mean(0), rtol=1e-6)
  assert bool(valid)


def test_weighted_centres_and_missing_class():
  e = np.array([[2., 0.], [0., 2.], [4., 4.]], np.float32)
  labels = np.array([0, 0, 1])
  w = np.array([3., 1., 0.5], np.float32)
  cmin, cmaj, valid = prototypes.class_centres(e, labels, w)
  np.testing.assert_allclose(cmaj, (3 * e[0] + e[1]) / 4, rtol=1e-6)
  np.testing.assert_allclose(cmin, e[2], rtol=1e-6)
  assert bool(valid)
  cmin, cmaj, valid = prototypes.class_centres(e, np.zeros(3, np.int32))
  assert not bool(valid)
  np.testing.assert_array_equal(cmin, np.zeros(2))
  np.testing.assert_allclose(cmaj, e.mean(0), rtol=1e-6)


def test_eq7_keeps_the_stored_pair_unless_the_new_one_is_further_apart():
  update = jax.jit(prototypes.update_centres)
  state = prototypes.initial_centres(2)
  assert int(state.num_updates) == 0
  # First valid pair is always taken: d = 1 - cos(45 deg).
  state = update(state, jnp.array([1., 0.]), jnp.array([1., 1.]), True)
  np.testing.assert_allclose(state.separation, _cos([1, 0], [1, 1]), rtol=1e-6)
  assert int(state.num_updates) == 1
  # Closer pair (d smaller): rejected.
  closer = update(state, jnp.array([1., 0.]), jnp.array([1., 0.1]), True)
  np.testing.assert_array_equal(closer.centre_maj, [1., 1.])
  assert int(closer.num_updates) == 1
  # Equally far (same angle, other vectors): rejected, "further apart" is strict.
  equal = update(state, jnp.array([0., 2.]), jnp.array([-3., 3.]), True)
  np.testing.assert_array_equal(equal.centre_min, [1., 0.])
  # Further apart but invalid (a class missing): rejected.
  invalid = update(state, jnp.array([1., 0.]), jnp.array([-1., 0.]), False)
  np.testing.assert_array_equal(invalid.centre_maj, [1., 1.])
  # Further apart and valid: taken.
  further = update(state, jnp.array([1., 0.]), jnp.array([0., 1.]), True)
  np.testing.assert_array_equal(further.centre_maj, [0., 1.])
  np.testing.assert_allclose(further.separation, 1.0, rtol=1e-6)
  assert int(further.num_updates) == 2


def test_replace_centres_takes_every_valid_pair():
  state = prototypes.update_centres(prototypes.initial_centres(2), jnp.array([1., 0.]),
                                    jnp.array([-1., 0.]))
  closer = prototypes.replace_centres(state, jnp.array([1., 0.]), jnp.array([1., 1.]))
  np.testing.assert_array_equal(closer.centre_maj, [1., 1.])
  np.testing.assert_allclose(closer.separation, _cos([1, 0], [1, 1]), rtol=1e-6)
  kept = prototypes.replace_centres(state, jnp.array([1., 0.]), jnp.array([1., 1.]),
                                    False)
  np.testing.assert_array_equal(kept.centre_maj, [-1., 0.])


def test_eq14_labels_and_malignancy_score():
  cmin = np.array([1., 0., 0.], np.float32)
  cmaj = np.array([0., 1., 0.], np.float32)
  e = np.array([[2., 0.1, 0.], [0.1, 3., 1.], [1., 1., 5.], [0.5, 0.2, -1.]], np.float32)
  out = jax.jit(prototypes.prototype_scores)(e, cmin, cmaj)
  d_min = np.array([_cos(x, cmin) for x in e])
  d_maj = np.array([_cos(x, cmaj) for x in e])
  np.testing.assert_allclose(out["d_min"], d_min, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["d_maj"], d_maj, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["scores"], d_maj - d_min, rtol=1e-5, atol=1e-6)
  # Row 2 is equidistant: a tie goes to the majority.
  np.testing.assert_array_equal(out["predictions"], [1, 0, 0, 1])


def test_range_threshold_reads_the_paper_literally():
  cmin = np.array([0.9, 0.1, -0.5, 0.3], np.float32)
  cmaj = np.array([0.2, 0.0, 0.6, 0.35], np.float32)
  tau = 0.5 * ((0.9 - -0.5) + (0.6 - 0.0))
  np.testing.assert_allclose(prototypes.feature_threshold(cmin, cmaj), tau, rtol=1e-6)
  np.testing.assert_allclose(
      prototypes.feature_threshold(cmin, cmaj, rule="range", scale=0.5), tau / 2,
      rtol=1e-6)
  diff = np.abs(cmin - cmaj)                 # [0.7, 0.1, 1.1, 0.05]
  np.testing.assert_allclose(
      prototypes.feature_threshold(cmin, cmaj, rule="mean_difference"), diff.mean(),
      rtol=1e-6)
  # tau = 1.0: only feature 2 (|diff| 1.1) survives; tau/2 = 0.5 keeps 0 and 2.
  np.testing.assert_array_equal(prototypes.feature_mask(cmin, cmaj),
                                [False, False, True, False])
  np.testing.assert_array_equal(prototypes.feature_mask(cmin, cmaj, scale=0.5),
                                [True, False, True, False])
  # mean |diff| = 0.4875 keeps the same two.
  np.testing.assert_array_equal(
      prototypes.feature_mask(cmin, cmaj, rule="mean_difference"),
      [True, False, True, False])
  # A threshold above every difference still keeps the largest one.
  np.testing.assert_array_equal(prototypes.feature_mask(cmin, cmaj, scale=10.0),
                                [False, False, True, False])


def test_masked_distances_use_only_the_kept_features():
  rng = np.random.default_rng(3)
  e = rng.normal(size=(6, 5)).astype(np.float32)
  cmin, cmaj = rng.normal(size=(2, 5)).astype(np.float32)
  mask = np.array([True, False, True, True, False])
  d_min, d_maj = prototypes.prototype_distances(e, cmin, cmaj, mask)
  np.testing.assert_allclose(d_min, [_cos(x[mask], cmin[mask]) for x in e],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d_maj, [_cos(x[mask], cmaj[mask]) for x in e],
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda: prototypes.class_centres(np.zeros((3, 2)), np.zeros(4)), "labels"),
    (lambda: prototypes.class_centres(np.zeros(3), np.zeros(3)), "embeddings"),
    (lambda: prototypes.prototype_scores(np.zeros((3, 2)), np.zeros(3), np.zeros(2)),
     "prototypes"),
    (lambda: prototypes.feature_mask(np.ones(3), np.zeros(3), rule="median"), "rule"),
    (lambda: prototypes.feature_mask(np.ones(3), np.zeros(3), scale=-1.0), "scale"),
    (lambda: prototypes.update_centres(prototypes.initial_centres(3), np.zeros(2),
                                       np.zeros(2)), "new centres"),
    (lambda: prototypes.initial_centres(0), "embedding_size"),
])
def test_bad_inputs_are_named(call, message):
  with pytest.raises(ValueError, match=message):
    call()
