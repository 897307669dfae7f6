"""Gaussian mixture EM against scikit-learn, and float32 robustness for n < S."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics
from sklearn import mixture
import threadpoolctl

from comtriplet_jax.clustering import gmm
from comtriplet_jax.clustering import serial_linalg


@pytest.fixture(autouse=True)
def _single_threaded_blas():
  # Multithreaded OpenBLAS (numpy's for scikit-learn, scipy's for jaxlib's LAPACK
  # calls) slows down by 10-50x when the CPU is oversubscribed; one thread each
  # keeps this file's run time predictable on a shared machine.
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    yield


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _sklearn(x, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ConvergenceWarning for tol=0 runs
    return mixture.GaussianMixture(2, **kwargs).fit(x)


def _rel(actual, expected):
  actual = np.asarray(actual, np.float64)
  return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


def _all_finite(result):
  return all(bool(jnp.all(jnp.isfinite(leaf)))
             for leaf in jax.tree_util.tree_leaves(result)
             if jnp.issubdtype(leaf.dtype, jnp.floating))


def _two_clusters(n_major, n_minor, dim, seed, spread=0.3, dtype=np.float64):
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((2, dim))
  x = np.concatenate([centres[0] + spread * rng.standard_normal((n_major, dim)),
                      centres[1] + spread * rng.standard_normal((n_minor, dim))])
  labels = np.r_[np.zeros(n_major, int), np.ones(n_minor, int)]
  return x.astype(dtype), labels


def _given_start(x, covariance_type, seed):
  rng = np.random.default_rng(seed)
  n, s = x.shape
  weights = np.array([0.35, 0.65])
  means = x[rng.choice(n, 2, replace=False)] + 0.1
  if covariance_type == "full":
    base = np.cov(x.T) + 0.5 * np.eye(s)
    precisions = np.stack([np.linalg.inv(base), np.linalg.inv(2.0 * base)])
  else:
    precisions = np.stack([1.0 / np.var(x, 0), 0.5 / np.var(x, 0)])
  return weights, means, precisions


def _assert_fit_equals_sklearn(ours, ref, x, max_iter):
  """Parameters, lower bound and responsibilities after ``max_iter`` iterations."""
  assert int(ours.n_iter) == ref.n_iter_ == max_iter
  assert _rel(ours.weights, ref.weights_) < 1e-6
  assert _rel(ours.means, ref.means_) < 1e-6
  assert _rel(ours.covariances, ref.covariances_) < 1e-6
  cov = np.asarray(ours.covariances)
  if cov.ndim == 3:  # symmetric to round-off (whole products on the subspace path)
    np.testing.assert_allclose(cov, np.swapaxes(cov, -1, -2), rtol=1e-13, atol=0)
  assert _rel(ours.precisions_cholesky, ref.precisions_cholesky_) < 1e-6
  assert float(ours.lower_bound) == pytest.approx(ref.lower_bound_, rel=1e-6)
  np.testing.assert_allclose(np.asarray(ours.responsibilities), ref.predict_proba(x),
                             atol=1e-6)


# n > S (scikit-learn's normal equations), 2n <= S (subspace), n <= S < 2n (float64
# takes the checked normal equations there).
@pytest.mark.parametrize("n,s,covariance_type", [
    (150, 4, "full"), (150, 4, "diag"), (24, 60, "full"), (40, 50, "full")])
def test_first_iterations_equal_sklearn_in_float64(x64, n, s, covariance_type):
  x, _ = _two_clusters(n - n // 3, n // 3, s, seed=n + s, spread=0.8)
  weights, means, precisions = _given_start(x, covariance_type, seed=s)
  for max_iter in (1, 2, 3):
    ref = _sklearn(x, covariance_type=covariance_type, tol=0.0, max_iter=max_iter,
                   weights_init=weights, means_init=means, precisions_init=precisions)
    ours = gmm.fit_gmm(jnp.asarray(x), 2, covariance_type=covariance_type, tol=0.0,
                       max_iter=max_iter, init="given", weights_init=weights,
                       means_init=means, precisions_init=precisions)
    assert ours.means.dtype == jnp.float64
    _assert_fit_equals_sklearn(ours, ref, x, max_iter)


def test_fixed_point_reuse_equals_sklearn_in_float64(x64):
  # Clusters 0.01 wide and ~1 apart: from iteration 2 on the responsibilities are
  # exactly 0 and 1, so later iterations reuse the M-step (point 9 of the module
  # docstring), and the parameters are still scikit-learn's after each one.
  x, labels = _two_clusters(40, 20, 5, seed=3, spread=0.01)
  weights = np.array([0.5, 0.5])
  means = np.stack([x[labels == k].mean(0) for k in (0, 1)]) + 0.003
  precisions = np.stack([np.eye(5) / 0.02**2] * 2)
  reused = []
  for max_iter in (1, 2, 3, 4, 5):
    ref = _sklearn(x, tol=0.0, max_iter=max_iter, weights_init=weights,
                   means_init=means, precisions_init=precisions)
    ours = gmm.fit_gmm(jnp.asarray(x), 2, tol=0.0, max_iter=max_iter, init="given",
                       weights_init=weights, means_init=means,
                       precisions_init=precisions)
    _assert_fit_equals_sklearn(ours, ref, x, max_iter)
    # Saturated responsibilities leave nothing to round: tighter than the helper.
    assert float(ours.lower_bound) == pytest.approx(ref.lower_bound_, rel=1e-9)
    np.testing.assert_allclose(np.asarray(ours.responsibilities), ref.predict_proba(x),
                               atol=1e-12)
    reused.append(int(ours.n_reused))
  # Iteration 1 starts from the given parameters (nothing to reuse); every later
  # one sees the responsibilities of iteration 1 again.
  assert reused == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n,s", [(600, 64), (600, 256), (300, 400)])
def test_float32_fixed_point_parameters_belong_to_the_responsibilities(n, s):
  # Separated clusters (the benchmark's data): at S >= 256 the responsibilities of
  # the k-means labels are already EM's fixed point in float32 (both iterations
  # reuse the M-step); at S = 64 they are not saturated. n <= S < 2n takes the
  # square-root factor, whose R^T R gives the covariances. Either way the returned
  # parameters are the M-step of the returned responsibilities, computed here in
  # float64.
  rng = np.random.default_rng(s)
  labels = (np.arange(n) < n // 3).astype(np.int64)
  x = (rng.standard_normal((n, s)) + labels[:, None] + 0.5).astype(np.float32)
  ours = gmm.fit_gmm(x, 2, key=jax.random.PRNGKey(0))
  assert bool(ours.converged) and int(ours.n_iter) == 2
  if s >= 256:
    assert int(ours.n_reused) == 2
  resp = np.asarray(ours.responsibilities, np.float64)
  assert metrics.adjusted_rand_score(labels, resp.argmax(1)) == 1.0
  xd = x.astype(np.float64)
  nk = resp.sum(0)
  np.testing.assert_allclose(np.asarray(ours.weights), nk / nk.sum(), rtol=1e-5)
  for k in range(2):
    mean = resp[:, k] @ xd / nk[k]
    cov = (resp[:, k] * (xd - mean).T) @ (xd - mean) / nk[k] + 1e-6 * np.eye(s)
    np.testing.assert_allclose(np.asarray(ours.means[k]), mean, atol=1e-5)
    assert _rel(ours.covariances[k], cov) < 1e-5


def test_square_root_factor_is_the_cholesky_factor_in_float64(x64):
  # The float32 paths factor by QR instead of Cholesky; in float64 both must give
  # scikit-learn's covariance factor.
  x, labels = _two_clusters(20, 10, 50, seed=1, spread=0.5)
  resp = jnp.asarray(np.eye(2)[labels] * 0.9 + 0.05)
  xc = jnp.asarray(x - x.mean(0))
  reg = jnp.asarray(1e-6)
  _, (means, upper, *_) = gmm._FullDirect(xc, reg, square_root=True).m_step(resp)
  nk = np.asarray(resp).sum(0) + 10 * np.finfo(np.float64).eps
  for k in range(2):
    diff = np.asarray(xc) - np.asarray(means[k])
    cov = (np.asarray(resp[:, k]) * diff.T) @ diff / nk[k] + 1e-6 * np.eye(50)
    np.testing.assert_allclose(np.asarray(upper[k]), np.linalg.cholesky(cov).T,
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("m,d", [(20, 200), (45, 64 * 3), (100, 120), (200, 300)])
def test_square_root_factor_in_float64(x64, m, d):
  # 3 m <= d: the panel-by-panel QR that skips the identity's zeros (uneven
  # last panel for d = 200); (100, 120): the dense QR of the stacked matrix;
  # (200, 300): panels by Householder reflectors on CPU (uneven last panel).
  rows = np.random.default_rng(m).normal(size=(2, m, d)) * 0.1
  cols = jnp.asarray(np.swapaxes(rows, -1, -2))
  upper = np.asarray(jax.jit(gmm._sqrt_factor)(cols, jnp.asarray(1e-6)))
  for k in range(2):
    expected = np.linalg.cholesky(rows[k].T @ rows[k] + 1e-6 * np.eye(d)).T
    np.testing.assert_allclose(upper[k], expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("m", [45, 200])
def test_square_root_factor_by_panels_keeps_small_pivots_in_float32(m):
  # The diagonal entries near sqrt(reg) = 1e-3 are what the square-root
  # factorisation is for: the panels (m = 45: complete Q; m = 200: Householder
  # reflectors on CPU) keep them to float32 accuracy, like the dense QR of the
  # whole stacked matrix (float32 gets ~2e-5 of the largest entries at m = 200).
  d = 256
  rows = np.random.default_rng(0).normal(size=(m, d)) * 0.1
  rows[:, d - 40:] = 0.5 * rows[:, :40]   # dependent columns: pivots near sqrt(reg)
  rows = rows.astype(np.float32)
  expected = np.diag(np.linalg.cholesky(rows.T.astype(np.float64) @ rows + 1e-6 * np.eye(d)))
  reg = jnp.asarray(1e-6, jnp.float32)
  panels = np.diagonal(np.asarray(jax.jit(gmm._sqrt_factor)(jnp.asarray(rows.T), reg)))
  stacked = jnp.concatenate([jnp.asarray(rows), jnp.sqrt(reg) * jnp.eye(d)])
  dense = np.diagonal(np.asarray(serial_linalg.qr_r(stacked)))
  error = np.max(np.abs(np.abs(panels) / expected - 1))
  assert error <= max(1e-5, 1.5 * np.max(np.abs(np.abs(dense) / expected - 1)))
  small = expected < 1.2e-3   # the test does reach the small pivots ...
  assert np.count_nonzero(small) >= 10
  assert np.max(np.abs(np.abs(panels[small]) / expected[small] - 1)) < 1e-5   # ... and keeps them


def test_blocked_first_iterations_equal_sklearn_in_float64(x64):
  # S >= 128 splits the triangular products into column blocks (and n >= 2S takes
  # the E-step through U = R^{-1}): the same numbers as scikit-learn.
  x, _ = _two_clusters(200, 100, 130, seed=11, spread=0.8)
  weights, means, precisions = _given_start(x, "full", seed=3)
  for max_iter in (1, 2):
    ref = _sklearn(x, tol=0.0, max_iter=max_iter, weights_init=weights, means_init=means,
                   precisions_init=precisions)
    ours = gmm.fit_gmm(jnp.asarray(x), 2, tol=0.0, max_iter=max_iter, init="given",
                       weights_init=weights, means_init=means, precisions_init=precisions)
    _assert_fit_equals_sklearn(ours, ref, x, max_iter)


def test_block_triangular_helpers_in_float64(x64):
  d = 200  # three column blocks
  bounds = gmm._blocks(d)
  assert len(bounds) == 4
  rng = np.random.default_rng(d)
  w = rng.standard_normal((2 * d, d))
  upper = np.linalg.cholesky(w.T @ w / (2 * d) + 0.1 * np.eye(d)).T
  diff = rng.standard_normal((7, d))

  @jax.jit
  def helpers(w, upper, diff):
    gram = gmm._gram_lower(w.T, bounds)
    gram_rows = gmm._gram_lower_rows(w, bounds)
    factor_gram = gmm._factor_gram_lower(upper, bounds)
    inverse = gmm._upper_inverse(upper)
    chol = gmm._cholesky_inverse_2d(upper.T @ upper)
    return chol, (gram, gram_rows, factor_gram, gmm._symmetrize_lower(gram, bounds),
                  inverse, gmm._maha_solve(diff, upper, bounds),
                  gmm._maha_inverse(diff, inverse, bounds))

  chol, outputs = helpers(w, upper, diff)
  gram, gram_rows, factor_gram, symmetric, inverse, maha_solve, maha_inverse = map(
      np.asarray, outputs)
  # Factor and inverse together (d = 200 splits at 128, whose two column blocks
  # the products with the triangular U_11 skip).
  np.testing.assert_allclose(np.asarray(chol[0]), upper, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(np.asarray(chol[1]), np.linalg.inv(upper), rtol=1e-10,
                             atol=1e-12)
  np.testing.assert_allclose(np.tril(gram), np.tril(w.T @ w), rtol=1e-12, atol=1e-10)
  np.testing.assert_allclose(np.tril(gram_rows), np.tril(w.T @ w), rtol=1e-12, atol=1e-10)
  np.testing.assert_allclose(np.tril(factor_gram), np.tril(upper.T @ upper), rtol=1e-12,
                             atol=1e-12)
  np.testing.assert_allclose(symmetric, w.T @ w, rtol=1e-12, atol=1e-10)
  # Whatever lies above the diagonal, only the lower triangle is read.
  noise = rng.standard_normal((3, d, d))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(gmm._symmetrize_lower, static_argnums=1)(noise, bounds)),
      np.tril(noise) + np.swapaxes(np.tril(noise, -1), -1, -2))
  np.testing.assert_allclose(inverse, np.linalg.inv(upper), rtol=1e-10, atol=1e-12)
  expected = np.sum((diff @ np.linalg.inv(upper)) ** 2, axis=1)
  np.testing.assert_allclose(maha_solve, expected, rtol=1e-10)
  np.testing.assert_allclose(maha_inverse, expected, rtol=1e-10)


@pytest.mark.parametrize("d", [50, 200, 333])
def test_recursive_cholesky_and_inverse_in_float64(x64, d):
  # 50 is one LAPACK leaf; 200 and 333 split into products, unevenly.
  rng = np.random.default_rng(d)
  w = rng.standard_normal((2 * d, d))
  a = w.T @ w / (2 * d) + 0.1 * np.eye(d)
  # Only the lower triangle may be read.
  garbage_above = np.tril(a) + np.triu(rng.standard_normal((d, d)), 1)
  upper, inverse = jax.jit(gmm._cholesky_inverse_2d)(garbage_above)
  expected = np.linalg.cholesky(a).T
  np.testing.assert_allclose(upper, expected, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(inverse, np.linalg.inv(expected), rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(jax.jit(gmm._upper_inverse)(expected[None]),
                             np.linalg.inv(expected)[None], rtol=1e-9, atol=1e-11)


def test_recursive_cholesky_of_an_indefinite_matrix_is_not_finite():
  # `_FullDirect.m_step` relies on this to fall back to QR.
  d = 150
  a = np.eye(d, dtype=np.float32)
  a[140, 140] = -1.0   # the last leaf fails
  upper, _ = jax.jit(gmm._cholesky_inverse_2d)(a)
  assert not np.all(np.isfinite(upper))


def _derived_and_direct(x, resp, reg=1e-6):
  """(checked, from-total, direct) covariances of `_FullDirect`, lower triangles."""
  xc = jnp.asarray(x - x.mean(0))
  resp = jnp.asarray(resp, xc.dtype)

  @jax.jit
  def covariances(xc, resp):
    model = gmm._FullDirect(xc, jnp.asarray(reg, xc.dtype), square_root=False)
    nk, means = gmm._gaussian_statistics(xc, resp, float(jnp.finfo(xc.dtype).eps))
    return (model._covariances_checked(resp, nk, means),
            model._covariances_from_total(resp, nk, means),
            model._covariances_lower(resp, nk, means))

  return [np.tril(np.asarray(c)) for c in covariances(xc, resp)]


def test_heaviest_scatter_from_the_total_in_float64(x64):
  # Three components: two direct scatters are subtracted (K = 2 is covered by
  # the comparisons with scikit-learn).
  rng = np.random.default_rng(3)
  x = rng.standard_normal((300, 20))
  _, derived, direct = _derived_and_direct(x, rng.dirichlet(np.ones(3), size=300))
  np.testing.assert_allclose(derived, direct, rtol=1e-10, atol=1e-12)


def test_heaviest_scatter_is_direct_when_cancellation_would_cost_float32_digits():
  # Far apart clusters: total minus the light scatter would cancel ~1e3-fold, so
  # float32 must take the direct scatters (bit-identical to them).
  x, labels = _two_clusters(200, 100, 16, seed=4, spread=0.05, dtype=np.float32)
  checked, _, direct = _derived_and_direct(x, np.eye(2)[labels])
  np.testing.assert_array_equal(checked, direct)
  # Overlapping ones keep ~6 digits through the subtraction.
  x, labels = _two_clusters(200, 100, 16, seed=4, spread=1.0, dtype=np.float32)
  checked, _, direct = _derived_and_direct(x, np.eye(2)[labels])
  assert not np.array_equal(checked, direct)  # it did take the subtraction
  assert np.max(np.abs(checked - direct)) < 1e-5 * np.max(np.abs(direct))


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_kmeans_start_matches_sklearn_on_separated_data(x64, covariance_type):
  x, labels = _two_clusters(70, 30, 3, seed=5, spread=0.15)
  ref = _sklearn(x, covariance_type=covariance_type, random_state=0)
  ours = gmm.fit_gmm(jnp.asarray(x), 2, key=jax.random.PRNGKey(0),
                     covariance_type=covariance_type)
  ours_labels = np.asarray(jnp.argmax(ours.responsibilities, axis=1))
  assert metrics.adjusted_rand_score(ref.predict(x), ours_labels) == 1.0
  assert metrics.adjusted_rand_score(labels, ours_labels) == 1.0
  assert abs(float(ours.lower_bound) - ref.lower_bound_) < 1e-3
  assert bool(ours.converged)


@pytest.mark.parametrize("s", [128, 256, 1024])
def test_float32_fewer_points_than_dimensions(s):
  # UDC's setting: 3M = 45 embeddings, a 40/5 imbalance, n < S.
  x, labels = _two_clusters(40, 5, s, seed=s, spread=0.3)
  ours = gmm.fit_gmm(x.astype(np.float32), 2, key=jax.random.PRNGKey(0))
  assert ours.means.dtype == jnp.float32
  assert _all_finite(ours)
  ours_labels = np.asarray(jnp.argmax(ours.responsibilities, axis=1))
  assert metrics.adjusted_rand_score(labels, ours_labels) == 1.0
  # The float32 fit is scikit-learn's float64 fit to float32 accuracy: the lower
  # bound ~ 6 S is dominated by log-determinants of singular scatter + 1e-6 I,
  # exactly what a naive float32 factorisation loses (and what makes
  # scikit-learn refuse float32 input here).
  ref = _sklearn(x, random_state=0)
  assert metrics.adjusted_rand_score(ref.predict(x), ours_labels) == 1.0
  assert float(ours.lower_bound) == pytest.approx(ref.lower_bound_, rel=1e-5)
  order = np.argsort(np.asarray(ours.weights))
  np.testing.assert_allclose(np.asarray(ours.means)[order],
                             ref.means_[np.argsort(ref.weights_)], atol=1e-4)
  cov = np.asarray(ours.covariances)
  np.testing.assert_allclose(cov[order], ref.covariances_[np.argsort(ref.weights_)],
                             rtol=0, atol=1e-5 * np.max(np.abs(ref.covariances_)))
  np.testing.assert_allclose(cov, np.swapaxes(cov, -1, -2), rtol=1e-6, atol=0)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_float32_coinciding_points(covariance_type):
  s = 1024
  rng = np.random.default_rng(s)
  identical = np.full((45, s), 0.7, np.float32)
  out = gmm.fit_gmm(identical, 2, key=jax.random.PRNGKey(0),
                    covariance_type=covariance_type)
  assert _all_finite(out)
  np.testing.assert_allclose(np.asarray(jnp.sum(out.responsibilities, 1)), 1.0, rtol=1e-5)
  points = rng.standard_normal((2, s)).astype(np.float32)
  two = np.concatenate([np.repeat(points[:1], 30, 0), np.repeat(points[1:], 15, 0)])
  out = gmm.fit_gmm(two, 2, key=jax.random.PRNGKey(0), covariance_type=covariance_type)
  assert _all_finite(out)
  labels = np.asarray(jnp.argmax(out.responsibilities, 1))
  assert metrics.adjusted_rand_score(np.r_[np.zeros(30), np.ones(15)], labels) == 1.0
  np.testing.assert_allclose(np.sort(np.asarray(out.weights)), [1 / 3, 2 / 3], rtol=1e-5)


# n <= S < 2n (QR in S dimensions) and n > S (checked normal equations).
@pytest.mark.parametrize("n,s", [(45, 64), (200, 8)])
def test_float32_emptying_component(n, s):
  # Start one component far from every point: its responsibilities underflow to
  # exactly 0 in the first E-step and it stays empty.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, s)).astype(np.float32)
  means = np.stack([x.mean(0), x.mean(0) + 1e3]).astype(np.float32)
  precisions = np.stack([np.eye(s), np.eye(s)]).astype(np.float32)
  out = gmm.fit_gmm(x, 2, init="given", weights_init=np.array([0.5, 0.5], np.float32),
                    means_init=means, precisions_init=precisions, max_iter=5)
  assert _all_finite(out)
  assert float(out.weights[1]) < 1e-6
  assert np.all(np.asarray(out.responsibilities[:, 1]) == 0.0)
  assert np.all(np.diagonal(np.asarray(out.covariances[1])) > 0)


def test_float32_rank_deficient_component_when_n_exceeds_s():
  # n > S, but the minority component has fewer points than dimensions: the
  # Cholesky pivots are lost in float32 and that M-step must fall back to QR.
  x, labels = _two_clusters(110, 10, 40, seed=3, spread=0.3)
  out = gmm.fit_gmm(x.astype(np.float32), 2, key=jax.random.PRNGKey(0))
  assert _all_finite(out)
  assert metrics.adjusted_rand_score(
      labels, np.asarray(jnp.argmax(out.responsibilities, 1))) == 1.0
  ref = _sklearn(x, random_state=0)
  assert float(out.lower_bound) == pytest.approx(ref.lower_bound_, rel=1e-4)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_predict_functions_match_sklearn(x64, covariance_type):
  x, _ = _two_clusters(60, 40, 3, seed=8, spread=0.6)
  ref = _sklearn(x, covariance_type=covariance_type, random_state=0)
  result = gmm.GMMResult(
      weights=jnp.asarray(ref.weights_), means=jnp.asarray(ref.means_),
      covariances=jnp.asarray(ref.covariances_),
      precisions_cholesky=jnp.asarray(ref.precisions_cholesky_),
      responsibilities=jnp.zeros((100, 2)), lower_bound=jnp.asarray(0.0),
      n_iter=jnp.asarray(0), converged=jnp.asarray(True), n_reused=jnp.asarray(0))
  new = np.random.default_rng(1).standard_normal((50, 3)) * 2
  np.testing.assert_allclose(np.asarray(gmm.score_samples(result, new)),
                             ref.score_samples(new), rtol=1e-10)
  np.testing.assert_allclose(np.asarray(gmm.predict_proba(result, new)),
                             ref.predict_proba(new), atol=1e-10)
  np.testing.assert_array_equal(np.asarray(gmm.predict(result, new)), ref.predict(new))
  # Our own fit gives the same predictions as scikit-learn's fit.
  ours = gmm.fit_gmm(jnp.asarray(x), 2, key=jax.random.PRNGKey(0),
                     covariance_type=covariance_type)
  ours_labels = np.asarray(gmm.predict(ours, new))
  assert metrics.adjusted_rand_score(ref.predict(new), ours_labels) == 1.0
  np.testing.assert_allclose(np.asarray(gmm.score_samples(ours, new)),
                             ref.score_samples(new), rtol=1e-4)
  # On the training points, predict_proba reproduces the fitted responsibilities.
  np.testing.assert_allclose(np.asarray(gmm.predict_proba(ours, x)),
                             np.asarray(ours.responsibilities), atol=1e-10)


def test_predict_in_float32_for_n_less_than_s():
  x, labels = _two_clusters(40, 5, 256, seed=2, spread=0.3, dtype=np.float32)
  out = gmm.fit_gmm(x, 2, key=jax.random.PRNGKey(0))
  np.testing.assert_allclose(np.asarray(gmm.predict_proba(out, x)),
                             np.asarray(out.responsibilities), atol=1e-4)
  assert np.all(np.isfinite(np.asarray(gmm.score_samples(out, x))))
  assert metrics.adjusted_rand_score(labels, np.asarray(gmm.predict(out, x))) == 1.0


def test_jit_and_vmap_over_three_problems_equal_three_calls():
  xs = np.stack([_two_clusters(30, 15, 8, seed=i, spread=0.4, dtype=np.float32)[0]
                 for i in range(3)])
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  # reg_covar and tol are traced: changing them does not recompile.
  fit = jax.jit(lambda data, key, reg, tol: gmm.fit_gmm(data, 2, key=key, reg_covar=reg,
                                                        tol=tol))
  batched = jax.vmap(fit, in_axes=(0, 0, None, None))(jnp.asarray(xs), keys, 1e-3, 1e-4)
  for i in range(3):
    single = gmm.fit_gmm(xs[i], 2, key=keys[i], reg_covar=1e-3, tol=1e-4)
    for name in ("weights", "means", "covariances", "responsibilities", "lower_bound"):
      np.testing.assert_allclose(np.asarray(getattr(batched, name)[i]),
                                 np.asarray(getattr(single, name)), rtol=1e-4,
                                 atol=1e-5, err_msg=name)
    assert int(batched.n_iter[i]) == int(single.n_iter)
  # A larger regularisation gives a lower likelihood on these data.
  looser = jax.vmap(fit, in_axes=(0, 0, None, None))(jnp.asarray(xs), keys, 1e-1, 1e-4)
  assert np.all(np.asarray(looser.lower_bound) < np.asarray(batched.lower_bound))


def test_vmap_on_the_reflector_path_equals_single_fits():
  # n <= S < 2n, S >= 256: the square-root factor by reflector panels (geqrf and
  # ormqr under vmap run one problem at a time) and the fixed-point reuse, whose
  # lax.cond becomes a select under vmap.
  xs = np.stack([_two_clusters(100, 50, 256, seed=i, spread=0.5, dtype=np.float32)[0]
                 for i in range(2)])
  key = jax.random.PRNGKey(5)
  batched = jax.jit(jax.vmap(lambda data: gmm.fit_gmm(data, 2, key=key)))(jnp.asarray(xs))
  for i in range(2):
    single = gmm.fit_gmm(xs[i], 2, key=key)
    for name in ("weights", "means", "covariances", "precisions_cholesky",
                 "responsibilities", "lower_bound"):
      np.testing.assert_allclose(np.asarray(getattr(batched, name)[i]),
                                 np.asarray(getattr(single, name)), rtol=1e-5,
                                 atol=1e-6, err_msg=name)
    assert int(batched.n_reused[i]) == int(single.n_reused)


def test_bad_inputs_raise():
  x = np.zeros((45, 8), np.float32)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="\\[n, S\\]"):
    gmm.fit_gmm(x[0], 2, key=key)
  with pytest.raises(ValueError, match="covariance_type"):
    gmm.fit_gmm(x, 2, key=key, covariance_type="tied")
  with pytest.raises(ValueError, match="PRNG key"):
    gmm.fit_gmm(x, 2)
  with pytest.raises(ValueError, match="n >= max"):
    gmm.fit_gmm(x[:1], 2, key=key)
  with pytest.raises(ValueError, match="needs weights_init"):
    gmm.fit_gmm(x, 2, init="given", means_init=np.zeros((2, 8)))
  with pytest.raises(ValueError, match="precisions_init must have shape"):
    gmm.fit_gmm(x, 2, init="given", weights_init=np.ones(2) / 2,
                means_init=np.zeros((2, 8)), precisions_init=np.ones((2, 8)))
  with pytest.raises(ValueError, match="max_iter"):
    gmm.fit_gmm(x, 2, key=key, max_iter=0)
  with pytest.raises(ValueError, match="reg_covar"):
    gmm.fit_gmm(x, 2, key=key, reg_covar=0.0)
  result = gmm.fit_gmm(np.random.default_rng(0).standard_normal((45, 8)).astype(np.float32),
                       2, key=key)
  with pytest.raises(ValueError, match="x must be"):
    gmm.predict(result, np.zeros((4, 5), np.float32))
