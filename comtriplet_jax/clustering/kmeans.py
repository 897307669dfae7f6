"""K-Means in JAX: greedy k-means++ seeding and Lloyd iterations.

Used by the UDC method as the initialisation of its Gaussian mixture (COM-Triplet
paper, Sec. "Architectural details": "the k-means algorithm was used to initialize
the GMM") and as the K-Means shallow baseline. It follows scikit-learn's
``KMeans(algorithm="lloyd")``:

* seeding: greedy k-means++ (``sklearn.cluster.kmeans_plusplus``): each new centre
  is the best of ``2 + floor(log K)`` candidates drawn with probability
  proportional to the squared distance to the nearest centre chosen so far;
* Lloyd iterations in one ``lax.while_loop``, stopping when the labels no longer
  change ("strict convergence") or when the summed squared centre shift is at most
  ``tol * mean_j Var(x[:, j])``, scikit-learn's data-relative tolerance;
* a final assignment step, so labels and inertia always belong to the returned
  centres;
* ``n_init`` restarts run in parallel (``vmap`` over keys); the run with the lowest
  inertia is returned.

Empty clusters: after an assignment step, a cluster that received no point is
moved onto one of the points farthest from their current centre (the j-th empty
cluster gets the j-th farthest point), as scikit-learn relocates them. The donor
cluster's centre is not adjusted in that step; the next assignment settles it.
When every point coincides, all squared distances are zero, every later seeding
draw lands on point 0 and the duplicate centres stay put: the result is finite and
the inertia zero.

Distances are computed as |x|^2 - 2 <x, c> + |c|^2 on data centred at its mean
(translation does not change k-means), clamped at zero, with full float32
precision on accelerators.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
  """Result of `kmeans` (a pytree).

  Attributes:
    centres: [K, S] cluster centres.
    labels: [n] int32 index of each point's nearest centre.
    inertia: [] sum over points of the squared distance to their centre.
    n_iter: [] int32 Lloyd iterations run by the returned restart.
    converged: [] bool, whether the returned restart met the tolerance within
      ``max_iter`` iterations.
  """
  centres: jax.Array
  labels: jax.Array
  inertia: jax.Array
  n_iter: jax.Array
  converged: jax.Array


def _check_data(x: jax.Array, n_clusters: int) -> None:
  if x.ndim != 2:
    raise ValueError(f"x must be [n, S], got shape {x.shape}")
  if not isinstance(n_clusters, int) or n_clusters < 1:
    raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
  if x.shape[0] < n_clusters:
    raise ValueError(
        f"need at least n_clusters={n_clusters} points, got {x.shape[0]}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be floating point, got {x.dtype}")


def _squared_distances(x: jax.Array, x_sq: jax.Array, centres: jax.Array) -> jax.Array:
  """[n, K] squared distances from expanded norms, clamped at zero."""
  cross = jnp.einsum("ns,ks->nk", x, centres, precision=_HIGHEST)
  c_sq = jnp.sum(centres * centres, axis=-1)
  return jnp.maximum(x_sq[:, None] - 2.0 * cross + c_sq[None, :], 0.0)


def _plusplus(key: jax.Array, x: jax.Array, x_sq: jax.Array,
              n_clusters: int) -> tuple[jax.Array, jax.Array]:
  """Greedy k-means++ on centred data; returns ([K, S] centres, [K] indices)."""
  n = x.shape[0]
  n_trials = 2 + int(math.log(n_clusters))
  first_key, loop_key = jax.random.split(key)
  first = jax.random.randint(first_key, (), 0, n, dtype=jnp.int32)
  closest = _squared_distances(x, x_sq, x[first][None])[:, 0]
  indices = jnp.zeros((n_clusters,), jnp.int32).at[0].set(first)

  def add_centre(c, carry):
    indices, closest = carry
    potential = jnp.sum(closest)
    # Inverse-CDF sampling proportional to D^2, as scikit-learn does; with a zero
    # potential (all points coincide) every draw lands on point 0.
    draws = jax.random.uniform(jax.random.fold_in(loop_key, c), (n_trials,),
                               dtype=x.dtype) * potential
    candidates = jnp.clip(jnp.searchsorted(jnp.cumsum(closest), draws), 0,
                          n - 1).astype(jnp.int32)
    to_candidates = _squared_distances(x, x_sq, x[candidates])    # [n, trials]
    new_closest = jnp.minimum(closest[:, None], to_candidates)
    best = jnp.argmin(jnp.sum(new_closest, axis=0))
    return indices.at[c].set(candidates[best]), new_closest[:, best]

  indices, _ = lax.fori_loop(1, n_clusters, add_centre, (indices, closest))
  return x[indices], indices


def kmeans_plusplus_init(key: jax.Array, x: jax.Array,
                         n_clusters: int) -> tuple[jax.Array, jax.Array]:
  """Greedy k-means++ seeding (scikit-learn's ``kmeans_plusplus``).

  Args:
    key: PRNG key.
    x: [n, S] data.
    n_clusters: K (static).

  Returns:
    (centres [K, S], indices [K] int32): the chosen centres are rows of ``x``.

  Raises:
    ValueError: if ``x`` is not a 2-D float array with at least K rows.
  """
  x = jnp.asarray(x)
  _check_data(x, n_clusters)
  offset = jnp.mean(x, axis=0)
  xc = x - offset
  x_sq = jnp.sum(xc * xc, axis=-1)
  _, indices = _plusplus(key, xc, x_sq, n_clusters)
  return x[indices], indices


def _assign(xc, x_sq, centres):
  d2 = _squared_distances(xc, x_sq, centres)
  labels = jnp.argmin(d2, axis=1).astype(jnp.int32)
  return labels, jnp.take_along_axis(d2, labels[:, None], axis=1)[:, 0]


def _update_centres(xc, labels, min_d2, n_clusters):
  """Means of the assigned points; empty clusters moved to the farthest points."""
  one_hot = jax.nn.one_hot(labels, n_clusters, dtype=xc.dtype)    # [n, K]
  counts = jnp.sum(one_hot, axis=0)
  sums = jnp.einsum("nk,ns->ks", one_hot, xc, precision=_HIGHEST)
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  empty = counts == 0
  _, farthest = lax.top_k(min_d2, n_clusters)
  rank = jnp.cumsum(empty.astype(jnp.int32)) - 1
  relocated = xc[farthest[jnp.clip(rank, 0, n_clusters - 1)]]
  return jnp.where(empty[:, None], relocated, means)


def _lloyd(xc, x_sq, centres, n_clusters, max_iter, tol_scaled):
  """One k-means run from given centres; returns a KMeansResult (centred)."""
  n = xc.shape[0]

  def cond(state):
    _, _, i, done = state
    return (i < max_iter) & ~done

  def body(state):
    centres, labels_old, i, _ = state
    labels, min_d2 = _assign(xc, x_sq, centres)
    new_centres = _update_centres(xc, labels, min_d2, n_clusters)
    shift = jnp.sum((new_centres - centres) ** 2)
    done = jnp.all(labels == labels_old) | (shift <= tol_scaled)
    return new_centres, labels, i + 1, done

  init = (centres, jnp.full((n,), -1, jnp.int32), jnp.asarray(0, jnp.int32),
          jnp.asarray(False))
  centres, _, n_iter, done = lax.while_loop(cond, body, init)
  labels, min_d2 = _assign(xc, x_sq, centres)
  return KMeansResult(centres, labels, jnp.sum(min_d2), n_iter, done)


def kmeans(key: jax.Array, x: jax.Array, n_clusters: int, *, n_init: int = 10,
           max_iter: int | jax.Array = 300,
           tol: float | jax.Array = 1e-4) -> KMeansResult:
  """K-Means (Lloyd) with greedy k-means++ seeding and ``n_init`` restarts.

  Args:
    key: PRNG key; restart i uses ``jax.random.split(key, n_init)[i]``.
    x: [n, S] data, n >= K.
    n_clusters: K (static).
    n_init: number of restarts (static), run in parallel; the lowest inertia wins.
    max_iter: maximum Lloyd iterations per restart.
    tol: relative tolerance: a run stops when the summed squared shift of the
      centres is <= ``tol * mean_j Var(x[:, j])`` (scikit-learn's definition), or
      when no label changes.

  Returns:
    KMeansResult with centres [K, S], labels [n], inertia, n_iter, converged.

  Raises:
    ValueError: on a non-2-D or non-float ``x``, fewer than K points,
      ``n_init < 1`` or a Python ``max_iter < 1``.
  """
  x = x if isinstance(x, jax.Array) else jnp.asarray(x)   # asarray: ~8 us per call
  _check_data(x, n_clusters)
  if not isinstance(n_init, int) or n_init < 1:
    raise ValueError(f"n_init must be a positive int, got {n_init!r}")
  if isinstance(max_iter, int) and max_iter < 1:
    raise ValueError(f"max_iter must be >= 1, got {max_iter}")
  return _kmeans(key, x, n_clusters, n_init=n_init, max_iter=max_iter, tol=tol)


@functools.partial(jax.jit, static_argnames=("n_clusters", "n_init"))
def _kmeans(key, x, n_clusters, *, n_init, max_iter, tol) -> KMeansResult:
  """The jitted body of `kmeans` (inputs already checked)."""
  offset = jnp.mean(x, axis=0)
  xc = x - offset
  x_sq = jnp.sum(xc * xc, axis=-1)
  tol_scaled = jnp.mean(jnp.mean(xc * xc, axis=0)) * tol

  def single(run_key):
    centres, _ = _plusplus(run_key, xc, x_sq, n_clusters)
    return _lloyd(xc, x_sq, centres, n_clusters, max_iter, tol_scaled)

  runs = jax.vmap(single)(jax.random.split(key, n_init))
  best = jnp.argmin(runs.inertia)
  result = jax.tree_util.tree_map(lambda leaf: leaf[best], runs)
  return result._replace(centres=result.centres + offset)
