"""Cosine distance, triplet and COM-Triplet losses against NumPy float64 references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util

from comtriplet_jax import losses


# ------------------------------------------------------------ NumPy references
def np_cos_dist(u, v):
  u = np.asarray(u, np.float64)
  v = np.asarray(v, np.float64)
  return 1.0 - np.sum(u * v, -1) / (np.linalg.norm(u, axis=-1) *
                                    np.linalg.norm(v, axis=-1))


def np_triplet(a, p, n, margin):
  return np.maximum(0.0, np_cos_dist(a, p) - np_cos_dist(a, n) + margin)


def np_com_triplet(a, p, n, margin=None, alpha_from=None):
  """Eq. 3-5; `alpha_from` = (p, n) to take the adaptive margin from other inputs."""
  d_ap, d_an, d_pn = np_cos_dist(a, p), np_cos_dist(a, n), np_cos_dist(p, n)
  if margin is None:
    ap, an = alpha_from if alpha_from is not None else (p, n)
    alpha = 1.0 - np_cos_dist(ap, an)
  else:
    alpha = margin
  return np.maximum(0.0, d_ap - 0.5 * (d_an + d_pn) + alpha)


def np_assign(e, mu_min, mu_maj):
  return (np_cos_dist(e, mu_min[None]) < np_cos_dist(e, mu_maj[None])).astype(int)


def np_centre_com(e, mu_min, mu_maj, margin=None, labels=None):
  """Eq. 12-13 written case by case, as in the paper."""
  labels = np_assign(e, mu_min, mu_maj) if labels is None else labels
  d_c = np_cos_dist(mu_min, mu_maj)
  d_min, d_maj = np_cos_dist(e, mu_min[None]), np_cos_dist(e, mu_maj[None])
  dist_wa = np.where(labels == 1, d_min - 0.5 * (d_maj + d_c),
                     d_maj - 0.5 * (d_min + d_c))
  alpha = 1.0 - d_c if margin is None else margin
  return np.maximum(0.0, dist_wa + alpha)


def np_centre_triplet(e, mu_min, mu_maj, margin):
  labels = np_assign(e, mu_min, mu_maj)
  d_min, d_maj = np_cos_dist(e, mu_min[None]), np_cos_dist(e, mu_maj[None])
  return np.maximum(0.0, np.where(labels == 1, d_min - d_maj, d_maj - d_min) + margin)


def numeric_grad(f, x, h=1e-6):
  """Central finite differences of a float64 NumPy scalar function."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[idx] = h
    grad[idx] = (f(x + step) - f(x - step)) / (2 * h)
  return grad


def random_triplets(seed, m=32, s=16, dtype=np.float32):
  """A and P around one class centre, N around another, noisy enough that some
  triplets are inside the margin and some are not."""
  rng = np.random.default_rng(seed)
  c1, c2 = rng.normal(size=(2, s))
  return tuple((c + 1.5 * rng.normal(size=(m, s))).astype(dtype)
               for c in (c1, c1, c2))


# ----------------------------------------------------------------- distances
def test_cosine_distance_matches_numpy_with_broadcasting():
  rng = np.random.default_rng(0)
  u = rng.normal(size=(5, 1, 7))
  v = rng.normal(size=(3, 7))
  got = jax.jit(losses.cosine_distance)(u.astype(np.float32), v.astype(np.float32))
  assert got.shape == (5, 3)
  np.testing.assert_allclose(got, np_cos_dist(u, v[None]), rtol=1e-5, atol=1e-6)


def test_cosine_distance_hand_worked_values():
  e0, e1 = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
  assert losses.cosine_distance(e0, 3.0 * e0) == pytest.approx(0.0, abs=1e-7)
  assert losses.cosine_distance(e0, e1) == pytest.approx(1.0)
  assert losses.cosine_distance(e0, -2.0 * e0) == pytest.approx(2.0)
  assert losses.cosine_distance(e0, e0 + e1) == pytest.approx(1 - 1 / np.sqrt(2))


def test_cosine_distance_at_zero_vector_is_one_with_zero_gradient():
  v = jnp.array([0.3, -1.0, 2.0])
  zero = jnp.zeros(3)
  assert losses.cosine_distance(zero, v) == 1.0
  assert losses.cosine_distance(zero, zero) == 1.0
  grad_u, grad_v = jax.grad(losses.cosine_distance, argnums=(0, 1))(zero, v)
  np.testing.assert_array_equal(grad_u, np.zeros(3))
  np.testing.assert_array_equal(grad_v, np.zeros(3))
  # Below eps counts as zero; just above it the exact cosine is used.
  tiny = jnp.array([1e-9, 0.0, 0.0])
  assert losses.cosine_distance(tiny, v) == 1.0
  just_above = jnp.array([1e-7, 0.0, 0.0])
  np.testing.assert_allclose(losses.cosine_distance(just_above, v),
                             np_cos_dist([1.0, 0, 0], v), rtol=1e-6)


def test_pairwise_cosine_distance_matches_elementwise():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(6, 5)), rng.normal(size=(4, 5))
  got = losses.pairwise_cosine_distance(x.astype(np.float32), y.astype(np.float32))
  np.testing.assert_allclose(got, np_cos_dist(x[:, None], y[None]), rtol=1e-5,
                             atol=1e-6)


def test_distance_shape_errors():
  with pytest.raises(ValueError, match="equal length"):
    losses.cosine_distance(jnp.ones((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"\[n, S\]"):
    losses.pairwise_cosine_distance(jnp.ones((2, 3)), jnp.ones((3,)))


# ----------------------------------------------------------- supervised losses
@pytest.mark.parametrize("margin", [0.2, 0.6])
def test_triplet_loss_matches_numpy(margin):
  a, p, n = random_triplets(0)
  fn = jax.jit(lambda a, p, n: losses.triplet_loss(a, p, n, margin=margin))
  expected = np_triplet(a, p, n, margin)
  assert 0 < np.mean(expected > 0) < 1  # both hinge branches are exercised
  np.testing.assert_allclose(fn(a, p, n), expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(
      losses.triplet_loss(a, p, n, margin=margin, reduction="none"), expected,
      rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("margin", [None, 0.2, 0.6])
def test_com_triplet_loss_matches_numpy(margin):
  a, p, n = random_triplets(1)
  expected = np_com_triplet(a, p, n, margin)
  assert 0 < np.mean(expected > 0) < 1
  for margin_gradient in (True, False):  # the value does not depend on it
    fn = jax.jit(lambda a, p, n: losses.com_triplet_loss(
        a, p, n, margin=margin, margin_gradient=margin_gradient, reduction="none"))
    np.testing.assert_allclose(fn(a, p, n), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.com_triplet_loss(a, p, n, margin=margin),
                             expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(
      losses.com_triplet_loss(a, p, n, margin=margin, reduction="sum"),
      expected.sum(), rtol=1e-5)


def test_hand_worked_identical_orthogonal_and_opposite_triplets():
  e = jnp.array([[1.0, 2.0, 3.0]])
  # A = P = N: every distance 0. Triplet = alpha; COM: Dist_wa = 0, alpha = 1.
  assert losses.triplet_loss(e, e, e, margin=0.2) == pytest.approx(0.2, abs=1e-6)
  assert losses.com_triplet_loss(e, e, e) == pytest.approx(1.0, abs=1e-6)
  assert losses.com_triplet_loss(e, e, e, margin=0.6) == pytest.approx(0.6, abs=1e-6)
  # Mutually orthogonal A, P, N: every distance 1. Triplet = alpha;
  # COM: Dist_wa = 1 - 0.5 (1 + 1) = 0 and alpha = 1 - 1 = 0.
  a, p, n = jnp.eye(3)[None, 0], jnp.eye(3)[None, 1], jnp.eye(3)[None, 2]
  assert losses.triplet_loss(a, p, n, margin=0.2) == pytest.approx(0.2, abs=1e-6)
  assert losses.com_triplet_loss(a, p, n) == pytest.approx(0.0, abs=1e-6)
  # P = A, N = -A: d(A,P) = 0, d(A,N) = d(P,N) = 2: Dist_wa = -2, alpha = -1.
  assert losses.triplet_loss(e, e, -e) == 0.0
  assert losses.com_triplet_loss(e, e, -e) == 0.0
  assert losses.com_triplet_loss(e, e, -e, margin=2.5) == pytest.approx(0.5, abs=1e-6)


def test_losses_finite_with_zero_embeddings():
  a, p, n = random_triplets(2, m=4, s=5)
  a[0] = 0.0
  n[1] = 0.0
  for fn in (losses.triplet_loss, losses.com_triplet_loss):
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(a, p, n)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(grads[0][0], np.zeros(5))


def _away_from_kinks(pre_hinge):
  # Finite differences and check_grads are only valid away from the hinge's kink.
  assert np.min(np.abs(pre_hinge)) > 1e-3


def test_triplet_and_com_triplet_gradients_check_grads():
  a, p, n = random_triplets(3, m=6, s=4, dtype=np.float64)
  _away_from_kinks(np_cos_dist(a, p) - np_cos_dist(a, n) + 0.2)
  _away_from_kinks(np_cos_dist(a, p) - 0.5 * (np_cos_dist(a, n) + np_cos_dist(p, n))
                   + 1 - np_cos_dist(p, n))
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(x) for x in (a, p, n))
    test_util.check_grads(jax.jit(functools.partial(losses.triplet_loss, margin=0.2)),
                          args,
                          order=1, modes=("fwd", "rev"))
    # margin_gradient=False is not a gradient of the value (stop_gradient), so it
    # is checked against finite differences at a fixed margin below instead.
    test_util.check_grads(jax.jit(losses.com_triplet_loss), args, order=1,
                          modes=("fwd", "rev"))


def test_margin_gradient_option_matches_numpy_finite_differences():
  a, p, n = random_triplets(4, m=5, s=4, dtype=np.float64)
  with jax.enable_x64(True):
    flowing = jax.jit(jax.grad(losses.com_triplet_loss, argnums=(1, 2)))(a, p, n)
    stopped = jax.jit(jax.grad(
        lambda *t: losses.com_triplet_loss(*t, margin_gradient=False),
        argnums=(1, 2)))(a, p, n)
  # Flowing: the margin moves with P and N. Stopped: alpha from the fixed p0, n0.
  exp_flow_p = numeric_grad(lambda x: np_com_triplet(a, x, n).mean(), p)
  exp_flow_n = numeric_grad(lambda x: np_com_triplet(a, p, x).mean(), n)
  exp_stop_p = numeric_grad(
      lambda x: np_com_triplet(a, x, n, alpha_from=(p, n)).mean(), p)
  exp_stop_n = numeric_grad(
      lambda x: np_com_triplet(a, p, x, alpha_from=(p, n)).mean(), n)
  np.testing.assert_allclose(flowing[0], exp_flow_p, atol=1e-7)
  np.testing.assert_allclose(flowing[1], exp_flow_n, atol=1e-7)
  np.testing.assert_allclose(stopped[0], exp_stop_p, atol=1e-7)
  np.testing.assert_allclose(stopped[1], exp_stop_n, atol=1e-7)
  assert np.max(np.abs(flowing[0] - stopped[0])) > 1e-3


def test_jit_and_vmap_agree_with_eager():
  batches = np.stack([np.stack(random_triplets(10 + i, m=8, s=6)) for i in range(3)])
  for fn in (losses.triplet_loss, losses.com_triplet_loss):
    eager = np.array([fn(*b) for b in batches])
    np.testing.assert_allclose(jax.jit(jax.vmap(lambda b: fn(*b)))(batches), eager,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose([jax.jit(fn)(*b) for b in batches], eager, rtol=1e-6,
                               atol=1e-7)


def test_bfloat16_embeddings_are_summed_in_float32():
  a, p, n = (jnp.asarray(x, jnp.bfloat16) for x in random_triplets(6, m=8, s=256))
  got = jax.jit(losses.com_triplet_loss)(a, p, n)
  assert got.dtype == jnp.float32
  exact = np_com_triplet(*(np.asarray(x, np.float64) for x in (a, p, n)))
  np.testing.assert_allclose(got, exact.mean(), rtol=1e-5)


def test_triplet_errors_name_the_problem():
  a, p, n = random_triplets(5, m=4, s=3)
  with pytest.raises(ValueError, match="same shape"):
    losses.triplet_loss(a, p, n[:3])
  with pytest.raises(ValueError, match="reduction"):
    losses.com_triplet_loss(a, p, n, reduction="avg")
  with pytest.raises(ValueError, match="margin"):
    losses.triplet_loss(a, p, n, margin=-0.1)
  with pytest.raises(ValueError, match="margin"):
    losses.com_triplet_loss(a, p, n, margin=float("nan"))


# -------------------------------------------------------- to cluster centres
def random_centre_problem(seed, m=40, s=8, dtype=np.float32):
  """Two nearby centres (so that the adaptive margin is not negligible) and
  embeddings scattered around them."""
  rng = np.random.default_rng(seed)
  mu_min = rng.normal(size=s)
  mu_maj = mu_min + rng.normal(size=s)
  labels = rng.integers(0, 2, m)
  e = np.where(labels[:, None] == 1, mu_min, mu_maj) + rng.normal(size=(m, s))
  return e.astype(dtype), mu_min.astype(dtype), mu_maj.astype(dtype)


@pytest.mark.parametrize("margin", [None, 0.6])
def test_centre_com_triplet_matches_numpy(margin):
  e, mu_min, mu_maj = random_centre_problem(0)
  fn = jax.jit(lambda e, a, b: losses.centre_com_triplet_loss(
      e, a, b, margin=margin, reduction="none"))
  values, labels = fn(e, mu_min, mu_maj)
  expected = np_centre_com(e, mu_min, mu_maj, margin)
  assert 0 < np.mean(expected > 0) < 1
  np.testing.assert_array_equal(labels, np_assign(e, mu_min, mu_maj))
  assert 0 < labels.sum() < len(labels)
  np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
  mean, _ = losses.centre_com_triplet_loss(e, mu_min, mu_maj, margin=margin)
  np.testing.assert_allclose(mean, expected.mean(), rtol=1e-5)


def test_centre_triplet_matches_numpy_and_assign_to_centres():
  e, mu_min, mu_maj = random_centre_problem(1)
  value, labels = jax.jit(losses.centre_triplet_loss)(e, mu_min, mu_maj)
  np.testing.assert_allclose(value, np_centre_triplet(e, mu_min, mu_maj, 0.2).mean(),
                             rtol=1e-5)
  np.testing.assert_array_equal(losses.assign_to_centres(e, mu_min, mu_maj), labels)


def test_centre_losses_with_given_assignment():
  e, mu_min, mu_maj = random_centre_problem(2)
  given = 1 - np_assign(e, mu_min, mu_maj)  # every anchor to the farther centre
  values, labels = losses.centre_com_triplet_loss(e, mu_min, mu_maj, assignment=given,
                                                  reduction="none")
  np.testing.assert_array_equal(labels, given)
  np.testing.assert_allclose(values, np_centre_com(e, mu_min, mu_maj, labels=given),
                             rtol=1e-5, atol=1e-6)


def test_centre_losses_hand_worked():
  mu_min, mu_maj = jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 1.0, 0.0])
  # Orthogonal centres: d(mu_min, mu_maj) = 1, alpha = 0.
  on_min = jnp.array([[2.0, 0.0, 0.0]])       # own 0, other 1: -1 + 0 -> 0
  off_both = jnp.array([[0.0, 0.0, 1.0]])     # tie, own = other = 1: 0 + 0 -> 0
  loss, labels = losses.centre_com_triplet_loss(on_min, mu_min, mu_maj)
  assert loss == 0.0 and labels[0] == 1
  loss, labels = losses.centre_com_triplet_loss(off_both, mu_min, mu_maj)
  assert loss == pytest.approx(0.0, abs=1e-6) and labels[0] == 0  # tie -> majority
  loss, _ = losses.centre_triplet_loss(off_both, mu_min, mu_maj, margin=0.2)
  assert loss == pytest.approx(0.2, abs=1e-6)
  # Collapsed centres: d = 0, alpha = 1, an anchor on them: Dist_wa = 0 -> 1.
  loss, _ = losses.centre_com_triplet_loss(on_min, mu_min, mu_min)
  assert loss == pytest.approx(1.0, abs=1e-6)


def test_centre_gradient_option():
  e, mu_min, mu_maj = random_centre_problem(3, m=6, s=4, dtype=np.float64)
  with jax.enable_x64(True):
    def loss(e, a, b, centre_gradient):
      return losses.centre_com_triplet_loss(e, a, b,
                                            centre_gradient=centre_gradient)[0]
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    constant = grad(e, mu_min, mu_maj, False)
    flowing = grad(e, mu_min, mu_maj, True)
    test_util.check_grads(jax.jit(lambda *t: loss(*t, True)), (e, mu_min, mu_maj),
                          order=1,
                          modes=("rev",))
  np.testing.assert_array_equal(constant[1], 0.0)
  np.testing.assert_array_equal(constant[2], 0.0)
  labels = np_assign(e, mu_min, mu_maj)
  exp_e = numeric_grad(
      lambda x: np_centre_com(x, mu_min, mu_maj, labels=labels).mean(), e)
  exp_min = numeric_grad(
      lambda x: np_centre_com(e, x, mu_maj, labels=labels).mean(), mu_min)
  np.testing.assert_allclose(constant[0], exp_e, atol=1e-7)
  np.testing.assert_allclose(flowing[0], exp_e, atol=1e-7)
  np.testing.assert_allclose(flowing[1], exp_min, atol=1e-7)
  assert np.max(np.abs(flowing[1])) > 1e-3


def test_centre_losses_vmap_and_errors():
  problems = [random_centre_problem(20 + i, m=10, s=5) for i in range(3)]
  stacked = [np.stack(x) for x in zip(*problems)]
  batched, batched_labels = jax.jit(jax.vmap(losses.centre_com_triplet_loss))(
      *stacked)
  single = jax.jit(losses.centre_com_triplet_loss)
  for i, prob in enumerate(problems):
    value, labels = single(*prob)
    np.testing.assert_allclose(batched[i], value, rtol=1e-6)
    np.testing.assert_array_equal(batched_labels[i], labels)
  e, mu_min, mu_maj = problems[0]
  with pytest.raises(ValueError, match="centres"):
    losses.centre_com_triplet_loss(e, mu_min[:3], mu_maj)
  with pytest.raises(ValueError, match="embeddings"):
    losses.centre_triplet_loss(e[0], mu_min, mu_maj)
  with pytest.raises(ValueError, match="assignment"):
    losses.centre_com_triplet_loss(e, mu_min, mu_maj, assignment=np.ones(3, int))
