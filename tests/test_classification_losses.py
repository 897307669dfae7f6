"""Weighted cross-entropy and class weights against NumPy float64 references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from comtriplet_jax import losses


# ------------------------------------------------------------ NumPy references
def np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_balanced_weights(counts):
  counts = np.asarray(counts, np.float64)
  present = counts > 0
  weights = np.zeros_like(counts)
  weights[present] = counts.sum() / (present.sum() * counts[present])
  return weights


def np_wce(logits, labels, weights=None, mask=None, batch_weighting=False):
  """1/Z sum over valid examples of -w_y log softmax(logits)_y, example by example."""
  log_probs = np_log_softmax(logits)
  num_classes = log_probs.shape[1]
  valid = np.ones(len(labels), bool) if mask is None else np.asarray(mask, bool)
  if batch_weighting:
    weights = np_balanced_weights(np.bincount(labels[valid], minlength=num_classes))
  elif weights is None:
    weights = np.ones(num_classes)
  terms = [-weights[y] * log_probs[i, y] for i, y in enumerate(labels) if valid[i]]
  return np.sum(terms) / max(len(terms), 1)


def np_eq1(logit, y, w_min, w_maj):
  """Eq. 1 of the COM-Triplet paper literally, Y' = sigmoid(logit)."""
  prob = 1.0 / (1.0 + np.exp(-np.asarray(logit, np.float64)))
  return np.mean(-(w_min * y * np.log(prob) + w_maj * (1 - y) * np.log(1 - prob)))


def random_batch(seed, batch=24, num_classes=4):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, num_classes)).astype(np.float32) * 2.0
  # Imbalanced labels, like the data: class 0 dominates.
  labels = rng.choice(num_classes, size=batch,
                      p=np.array([0.6, 0.25, 0.1, 0.05])[:num_classes] /
                      np.array([0.6, 0.25, 0.1, 0.05])[:num_classes].sum())
  return logits, labels.astype(np.int32)


# ------------------------------------------------------------- class weights
def test_class_weights_from_counts_hand_worked():
  np.testing.assert_allclose(losses.class_weights_from_counts([90, 10]),
                             [100 / 180, 100 / 20], rtol=1e-6)
  # An absent class gets weight 0 and does not count in C'.
  np.testing.assert_allclose(losses.class_weights_from_counts(np.array([0, 30, 10])),
                             [0.0, 40 / 60, 40 / 20], rtol=1e-6)


def test_class_weights_average_to_one_over_the_data():
  counts = np.array([6705, 1113, 514, 327, 142, 115, 1099])  # HAM10000's 7 classes
  weights = np.asarray(losses.class_weights_from_counts(counts), np.float64)
  assert np.sum(counts * weights) / counts.sum() == pytest.approx(1.0, rel=1e-6)
  # Every class carries the same total weight.
  np.testing.assert_allclose(counts * weights, counts.sum() / 7, rtol=1e-5)
  assert jax.jit(losses.class_weights_from_counts)(counts).shape == (7,)


@pytest.mark.parametrize("counts, message", [
    ([[1, 2]], "vector"), ([3, -1], ">= 0"), ([0, 0], "all zero"),
    ([1.0, np.nan], "finite")])
def test_class_weights_errors(counts, message):
  with pytest.raises(ValueError, match=message):
    losses.class_weights_from_counts(counts)


# ---------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("weighting", ["none", "given", "batch"])
def test_weighted_cross_entropy_matches_numpy(weighting):
  logits, labels = random_batch(0)
  weights = np.array([0.4, 1.3, 2.5, 4.0]) if weighting == "given" else None
  fn = jax.jit(functools.partial(losses.weighted_cross_entropy, weighting=weighting))
  got = fn(logits, labels, class_weights=weights)
  expected = np_wce(logits, labels, weights, batch_weighting=weighting == "batch")
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert got.dtype == jnp.float32


def test_weighting_is_inferred_from_class_weights():
  logits, labels = random_batch(1)
  weights = np.array([0.4, 1.3, 2.5, 4.0])
  np.testing.assert_allclose(
      losses.weighted_cross_entropy(logits, labels, class_weights=weights),
      np_wce(logits, labels, weights), rtol=1e-5)
  np.testing.assert_allclose(losses.weighted_cross_entropy(logits, labels),
                             np_wce(logits, labels), rtol=1e-5)


def test_binary_logits_are_eq1():
  rng = np.random.default_rng(2)
  logit = rng.normal(size=16).astype(np.float32) * 3
  y = (rng.random(16) < 0.3).astype(np.int32)
  w_maj, w_min = 0.6, 3.0
  got = losses.weighted_cross_entropy(logit, y, class_weights=np.array([w_maj, w_min]))
  np.testing.assert_allclose(got, np_eq1(logit, y, w_min, w_maj), rtol=1e-5)
  # Same as a two-class softmax with logits (0, x).
  two = np.stack([np.zeros_like(logit), logit], axis=1)
  np.testing.assert_allclose(
      got, losses.weighted_cross_entropy(two, y,
                                         class_weights=np.array([w_maj, w_min])),
      rtol=1e-5)
  # Stable where sigmoid saturates: a confident correct prediction costs ~0.
  big = losses.weighted_cross_entropy(jnp.array([100.0, -100.0]), jnp.array([1, 0]))
  assert np.isfinite(big) and big < 1e-30


def test_hand_worked_uniform_logits_and_class_balance():
  labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])
  # Uniform logits: every term is log C, and 'batch' weights average to 1.
  for weighting in ("none", "batch"):
    got = losses.weighted_cross_entropy(np.zeros((9, 3)), labels, weighting=weighting)
    assert got == pytest.approx(np.log(3.0), rel=1e-6)
  # 'batch' = mean over present classes of each class's mean cross-entropy.
  logits, _ = random_batch(3, batch=9, num_classes=3)
  terms = -np_log_softmax(logits)[np.arange(9), labels]
  balanced = np.mean([terms[labels == c].mean() for c in range(3)])
  np.testing.assert_allclose(
      losses.weighted_cross_entropy(logits, labels, weighting="batch"), balanced,
      rtol=1e-5)


@pytest.mark.parametrize("weighting", ["none", "batch"])
def test_mask_drops_padded_examples(weighting):
  logits, labels = random_batch(4)
  mask = np.ones(24, bool)
  mask[[3, 7, 20, 21, 22, 23]] = False
  padded_logits = logits.copy()
  padded_labels = labels.copy()
  padded_logits[~mask] = np.inf  # garbage in the padding must not leak
  padded_labels[~mask] = -1
  fn = jax.jit(functools.partial(losses.weighted_cross_entropy, weighting=weighting))
  got = fn(padded_logits, padded_labels, mask=mask)
  expected = np_wce(logits[mask], labels[mask], batch_weighting=weighting == "batch")
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(
      got, np_wce(logits, labels, mask=mask, batch_weighting=weighting == "batch"),
      rtol=1e-5)
  per_example = losses.weighted_cross_entropy(padded_logits, padded_labels, mask=mask,
                                              weighting=weighting, reduction="none")
  assert per_example.shape == (24,)
  np.testing.assert_array_equal(per_example[~mask], 0.0)
  np.testing.assert_allclose(np.sum(per_example), got * mask.sum(), rtol=1e-5)
  # Everything masked: a zero loss, not NaN.
  assert fn(logits, labels, mask=np.zeros(24, bool)) == 0.0


def test_gradients_check_grads():
  logits, labels = random_batch(5, batch=8)
  with jax.enable_x64(True):
    logits64 = jnp.asarray(logits, jnp.float64)
    for weighting in ("none", "batch"):
      fn = jax.jit(lambda x, w=weighting: losses.weighted_cross_entropy(
          x, labels, weighting=w))
      test_util.check_grads(fn, (logits64,), order=1, modes=("fwd", "rev"))
    binary = jax.jit(lambda x: losses.weighted_cross_entropy(
        x, labels % 2, class_weights=jnp.array([0.7, 2.0])))
    test_util.check_grads(binary, (logits64[:, 0],), order=1, modes=("rev",))
    # The softmax gradient in closed form: w_y (softmax - onehot) / Z.
    grad = jax.grad(lambda x: losses.weighted_cross_entropy(
        x, labels, weighting="batch"))(logits64)
  weights = np_balanced_weights(np.bincount(labels, minlength=4))
  probs = np.exp(np_log_softmax(logits))
  expected = weights[labels][:, None] * (probs - np.eye(4)[labels]) / len(labels)
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-12)


def test_jit_and_vmap_agree():
  batches = [random_batch(10 + i, batch=12) for i in range(3)]
  logits = np.stack([b[0] for b in batches])
  labels = np.stack([b[1] for b in batches])
  fn = functools.partial(losses.weighted_cross_entropy, weighting="batch")
  separate = [np_wce(lg, lb, batch_weighting=True) for lg, lb in batches]
  np.testing.assert_allclose(jax.jit(jax.vmap(fn))(logits, labels), separate,
                             rtol=1e-5)


def test_cross_entropy_errors_name_the_problem():
  logits, labels = random_batch(6, batch=4)
  with pytest.raises(ValueError, match="weighting must be"):
    losses.weighted_cross_entropy(logits, labels, weighting="dataset")
  with pytest.raises(ValueError, match="exactly when weighting='given'"):
    losses.weighted_cross_entropy(logits, labels, weighting="given")
  with pytest.raises(ValueError, match="exactly when weighting='given'"):
    losses.weighted_cross_entropy(logits, labels, class_weights=np.ones(4),
                                  weighting="batch")
  with pytest.raises(ValueError, match=r"class_weights must be \[C\]"):
    losses.weighted_cross_entropy(logits, labels, class_weights=np.ones(3))
  with pytest.raises(ValueError, match="logits must be"):
    losses.weighted_cross_entropy(logits[:3], labels)
  with pytest.raises(ValueError, match="integer"):
    losses.weighted_cross_entropy(logits, labels.astype(np.float32))
  with pytest.raises(ValueError, match="mask"):
    losses.weighted_cross_entropy(logits, labels, mask=np.ones(5, bool))
  with pytest.raises(ValueError, match="reduction"):
    losses.weighted_cross_entropy(logits, labels, reduction="batchmean")


# ------------------------------------------------------------ data parallel
def _sharded_problem(seed=7, devices=4, per_device=6, features=5):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(devices, per_device, features)).astype(np.float32)
  w = rng.normal(size=(features, 3)).astype(np.float32)
  labels = rng.choice(3, size=(devices, per_device), p=[0.7, 0.2, 0.1])
  labels = labels.astype(np.int32)
  labels[0] = 0  # one device sees only the majority class
  mask = np.ones((devices, per_device), bool)
  mask[1, -2:] = False
  mask[3, -1] = False
  return x, w, labels, mask


def _global_loss(w, x, labels, mask):
  return losses.weighted_cross_entropy(x @ w, labels, mask=mask, weighting="batch")


def _device_step(w, x, labels, mask):
  def loss_fn(w):
    return losses.weighted_cross_entropy(x @ w, labels, mask=mask, weighting="batch",
                                         axis_name="data")
  value, grad = jax.value_and_grad(loss_fn)(w)
  # What the training loop does with the gradients.
  return value, jax.lax.pmean(grad, "data")


def test_batch_weighting_under_pmap_equals_the_global_batch():
  assert jax.local_device_count() == 4
  x, w, labels, mask = _sharded_problem()
  flat = (x.reshape(24, -1), labels.reshape(24), mask.reshape(24))
  expected_value, expected_grad = jax.value_and_grad(_global_loss)(w, *flat)
  np.testing.assert_allclose(expected_value,
                             np_wce(flat[0] @ w, flat[1], mask=flat[2],
                                    batch_weighting=True), rtol=1e-5)
  values, grads = jax.pmap(_device_step, axis_name="data",
                           in_axes=(None, 0, 0, 0))(w, x, labels, mask)
  np.testing.assert_allclose(values, np.full(4, expected_value), rtol=1e-5)
  for grad in grads:
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)
  # Without the psum, each device would weight by its own counts: different.
  local = [np_wce(x[d] @ w, labels[d], mask=mask[d], batch_weighting=True)
           for d in range(4)]
  assert abs(np.mean(local) - expected_value) > 1e-3


@pytest.mark.parametrize("check_vma", [True, False])
def test_batch_weighting_under_shard_map_equals_the_global_batch(check_vma):
  # check_vma=False is what comtriplet_jax.parallel uses (pmap's autodiff).
  x, w, labels, mask = _sharded_problem()
  mesh = jax.make_mesh((4,), ("data",))
  sharded = NamedSharding(mesh, P("data"))
  flat = [jax.device_put(a.reshape((24,) + a.shape[2:]), sharded)
          for a in (x, labels, mask)]
  step = jax.jit(jax.shard_map(_device_step, mesh=mesh,
                               in_specs=(P(), P("data"), P("data"), P("data")),
                               out_specs=(P(), P()), check_vma=check_vma))
  value, grad = step(w, *flat)
  host = [np.asarray(a) for a in flat]
  expected_value, expected_grad = jax.value_and_grad(_global_loss)(w, *host)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)
