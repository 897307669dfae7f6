"""K-Means in JAX against scikit-learn's KMeans, degenerate inputs, jit and vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import cluster
from sklearn import datasets
from sklearn import metrics
import threadpoolctl

from comtriplet_jax.clustering import kmeans as kmeans_lib


@pytest.fixture(autouse=True)
def _single_threaded_blas():
  # Multithreaded OpenBLAS slows down by 10-50x on an oversubscribed CPU.
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    yield


# Most tests share one shape and static configuration (one XLA compilation).
_N, _S, _K = 300, 4, 6


def _blobs(cluster_std=1.0, seed=0, n=_N, centers=_K, n_features=_S):
  x, y = datasets.make_blobs(n_samples=n, centers=centers, n_features=n_features,
                             cluster_std=cluster_std, random_state=seed)
  return x.astype(np.float32), y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inertia_no_worse_than_sklearn_with_same_n_init(seed):
  # Overlapping blobs, so that seeding and restarts matter.
  x, _ = _blobs(cluster_std=2.5, seed=seed)
  ours = kmeans_lib.kmeans(jax.random.PRNGKey(seed), x, _K, n_init=10)
  ref = cluster.KMeans(_K, n_init=10, random_state=seed).fit(x.astype(np.float64))
  assert float(ours.inertia) <= ref.inertia_ * (1 + 1e-3)
  # Our inertia is the one of our labels and centres.
  centres = np.asarray(ours.centres, np.float64)
  recomputed = np.sum((x - centres[np.asarray(ours.labels)]) ** 2)
  np.testing.assert_allclose(float(ours.inertia), recomputed, rtol=1e-4)


def test_labels_equal_up_to_permutation_on_separated_blobs():
  x, y = _blobs(cluster_std=0.3, seed=3)
  ours = kmeans_lib.kmeans(jax.random.PRNGKey(0), x, _K, n_init=10)
  ref = cluster.KMeans(_K, n_init=10, random_state=0).fit(x)
  assert metrics.adjusted_rand_score(ref.labels_, np.asarray(ours.labels)) == 1.0
  assert metrics.adjusted_rand_score(y, np.asarray(ours.labels)) == 1.0
  assert bool(ours.converged)
  # Each centre is the mean of its points.
  for k in range(_K):
    np.testing.assert_allclose(np.asarray(ours.centres[k]),
                               x[np.asarray(ours.labels) == k].mean(0), atol=1e-5)


def test_tolerance_is_relative_to_the_mean_variance():
  x, _ = _blobs(cluster_std=3.0, seed=4)
  # The first update moves the centres by much less than 1e6 x mean variance:
  # scikit-learn's criterion declares convergence after one iteration.
  loose = kmeans_lib.kmeans(jax.random.PRNGKey(0), x, _K, n_init=1, tol=1e6)
  assert int(loose.n_iter) == 1 and bool(loose.converged)
  # The same data scaled by 1000 needs the same number of iterations: the
  # tolerance scales with the data.
  tight = kmeans_lib.kmeans(jax.random.PRNGKey(0), x, _K, n_init=1, tol=1e-2)
  scaled = kmeans_lib.kmeans(jax.random.PRNGKey(0), x * 1000, _K, n_init=1, tol=1e-2)
  assert int(tight.n_iter) > 1
  assert int(tight.n_iter) == int(scaled.n_iter)
  capped = kmeans_lib.kmeans(jax.random.PRNGKey(0), x, _K, n_init=1, max_iter=1, tol=0.0)
  assert int(capped.n_iter) == 1


def test_coinciding_points_and_empty_clusters_stay_finite():
  # All points identical: every seed coincides, clusters empty out.
  same = np.full((_N, _S), 2.5, np.float32)
  out = kmeans_lib.kmeans(jax.random.PRNGKey(0), same, _K, n_init=10)
  assert np.all(np.isfinite(np.asarray(out.centres)))
  assert float(out.inertia) == pytest.approx(0.0, abs=1e-6)
  np.testing.assert_allclose(np.asarray(out.centres), 2.5, atol=1e-6)
  # Two distinct locations and six clusters: four clusters must be empty or
  # duplicates; the two locations are still found exactly.
  two = np.concatenate([np.zeros((200, _S)), np.ones((100, _S)) * 4]).astype(np.float32)
  out = kmeans_lib.kmeans(jax.random.PRNGKey(1), two, _K, n_init=10)
  assert np.all(np.isfinite(np.asarray(out.centres)))
  assert float(out.inertia) == pytest.approx(0.0, abs=1e-4)
  labels = np.asarray(out.labels)
  assert len(set(labels[:200])) == 1 and len(set(labels[200:])) == 1
  assert labels[0] != labels[-1]


def test_empty_cluster_is_relocated_to_the_farthest_point():
  x = jnp.asarray([[0.0], [0.1], [0.2], [10.0]], jnp.float32)
  labels, min_d2 = kmeans_lib._assign(x, jnp.sum(x * x, -1),
                                      jnp.asarray([[0.1], [0.1]], jnp.float32))
  # Both centres coincide: argmin sends every point to cluster 0, cluster 1 is
  # empty and must take the point farthest from its centre, 10.0.
  assert np.all(np.asarray(labels) == 0)
  centres = kmeans_lib._update_centres(x, labels, min_d2, 2)
  np.testing.assert_allclose(np.asarray(centres), [[2.575], [10.0]], rtol=1e-6)


def test_plusplus_seeds_are_distinct_data_points():
  x, y = _blobs(n=100, centers=4, n_features=3, cluster_std=0.3, seed=5)
  centres, indices = kmeans_lib.kmeans_plusplus_init(jax.random.PRNGKey(0), x, 4)
  np.testing.assert_array_equal(np.asarray(centres), x[np.asarray(indices)])
  # Well-separated blobs: D^2 sampling puts one seed in each blob.
  assert len(set(y[np.asarray(indices)].tolist())) == 4


def test_jit_and_vmap_over_keys_match_single_calls():
  x, _ = _blobs(cluster_std=1.5, seed=6)
  keys = jax.random.split(jax.random.PRNGKey(7), 3)
  fn = jax.jit(lambda k, data: kmeans_lib.kmeans(k, data, _K, n_init=1))
  batched = jax.vmap(fn, in_axes=(0, None))(keys, x)
  for i in range(3):
    single = kmeans_lib.kmeans(keys[i], x, _K, n_init=1)
    np.testing.assert_array_equal(np.asarray(batched.labels[i]), np.asarray(single.labels))
    np.testing.assert_allclose(np.asarray(batched.inertia[i]), float(single.inertia),
                               rtol=1e-5)


def test_bad_inputs_raise():
  x = np.zeros((5, 2), np.float32)
  with pytest.raises(ValueError, match="\\[n, S\\]"):
    kmeans_lib.kmeans(jax.random.PRNGKey(0), x[0], 2)
  with pytest.raises(ValueError, match="at least n_clusters"):
    kmeans_lib.kmeans(jax.random.PRNGKey(0), x, 6)
  with pytest.raises(ValueError, match="n_init"):
    kmeans_lib.kmeans(jax.random.PRNGKey(0), x, 2, n_init=0)
  with pytest.raises(ValueError, match="floating"):
    kmeans_lib.kmeans(jax.random.PRNGKey(0), x.astype(np.int32), 2)
