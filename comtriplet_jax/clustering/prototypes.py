"""Cluster centres and prototype inference of the COM-Triplet paper (Eq. 6, 7, 14).

Deep clustering (SDC and UDC) keeps two cluster centres in the embedding space,
the minority (melanoma, label 1) centre Cl_min and the majority centre Cl_maj:

* :func:`class_centres`, Eq. 6 in its general per-class form. Eq. 6 as printed,
  Cl_maj = 1/(2M) sum_i (E_A^i + E_P^i) and Cl_min = 1/M sum_i E_N^i, assumes that
  every anchor is of the majority class. With anchors of either class, what it
  computes is the mean of all the batch's embeddings of each class:

      Cl_c = sum_j [y_j = c] E_j / sum_j [y_j = c],   c in {min, maj},

  over the 3M embeddings of A, P and N, where y is the anchor's class for A and
  P and the other class for N. With all anchors of the majority class this is
  exactly the printed Eq. 6. Optional per-embedding weights give the
  responsibility-weighted means of a mixture model, i.e. the GMM means of UDC.
* :func:`update_centres`, Eq. 7: the stored pair (Cl*_min, Cl*_maj) is replaced
  by the batch's pair only when the batch's pair is strictly further apart in
  cosine distance, so the stored separation never decreases. A batch in which a
  class has no embedding gives no centre for it and never replaces the pair.
* :func:`prototype_scores`, Eq. 14: d_min = d(E, Cl*_min), d_maj = d(E, Cl*_maj);
  the label is the nearer prototype's (a tie goes to the majority, as
  ``losses.assign_to_centres``); the malignancy score for ROC AUC is
  d_maj - d_min (higher = more likely melanoma).
* :func:`feature_mask`, the paper's feature selection on the prototypes (Sec. IV,
  "To improve detection sensitivity during inference ..."): features whose
  absolute prototype difference |Cl*_min,j - Cl*_maj,j| is below a threshold are
  dropped from the distances of Eq. 14.

The feature-selection threshold, our reading
--------------------------------------------
The paper: "The threshold was taken as the difference between maximum and minimum
feature weight averaged across prototypes." We read this literally as the range
of each prototype's feature weights, averaged over the two prototypes:

    tau = 0.5 * [(max_j Cl_min,j - min_j Cl_min,j) + (max_j Cl_maj,j - min_j Cl_maj,j)]

(``rule='range'``). That threshold is of the order of the whole spread of the
feature weights, so on most embeddings it keeps only a handful of features;
hence it is multiplied by a configurable ``scale`` (threshold = scale * tau). A second rule is offered,
``rule='mean_difference'``: tau = mean_j |Cl_min,j - Cl_maj,j|, keeping the
features whose prototype difference is above average. Whatever the rule, the
feature with the largest difference is always kept, so the distances of Eq. 14
stay defined.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from comtriplet_jax.losses import distances

FEATURE_SELECTION_RULES = ("range", "mean_difference")
DISTANCES = ("cosine", "euclidean")

# Below any cosine distance (which is >= 0 up to a few ulps of rounding), so the
# first batch with both classes always replaces the initial, empty pair.
_NO_SEPARATION = -1.0


class Centres(NamedTuple):
  """The stored prototype pair of Eq. 7 (a pytree; lives in the method state).

  Attributes:
    centre_min: [S] minority (melanoma, label 1) centre Cl*_min.
    centre_maj: [S] majority centre Cl*_maj.
    separation: [] d(Cl*_min, Cl*_maj), -1 before the first update.
    num_updates: [] int32, how many batches replaced the pair.
  """
  centre_min: jax.Array
  centre_maj: jax.Array
  separation: jax.Array
  num_updates: jax.Array


def initial_centres(embedding_size: int) -> Centres:
  """An empty pair: zero centres, separation -1, no update yet."""
  if embedding_size < 1:
    raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
  zeros = jnp.zeros((embedding_size,), jnp.float32)
  return Centres(zeros, zeros, jnp.asarray(_NO_SEPARATION, jnp.float32),
                 jnp.zeros((), jnp.int32))


def class_centres(embeddings: jax.Array, labels: jax.Array,
                  weights: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-class mean embeddings, the general form of Eq. 6.

  Args:
    embeddings: [n, S] embeddings (for SDC the 3M embeddings of A, P and N).
    labels: [n] int class of each embedding, 1 = minority, 0 = majority.
    weights: optional [n] non-negative weights (0 drops an embedding); the
      centre of class c is then sum_j w_j [y_j = c] E_j / sum_j w_j [y_j = c].

  Returns:
    (centre_min [S], centre_maj [S], valid []): ``valid`` is True when both
    classes have positive total weight; a class without any gives a zero centre.

  Raises:
    ValueError: on shapes that do not match.
  """
  embeddings = jnp.asarray(embeddings)
  labels = jnp.asarray(labels)
  if embeddings.ndim != 2 or embeddings.shape[1] == 0:
    raise ValueError(f"embeddings must be [n, S] with S >= 1, got {embeddings.shape}")
  if labels.shape != embeddings.shape[:1]:
    raise ValueError(f"labels must be [n] = [{embeddings.shape[0]}], got {labels.shape}")
  if weights is None:
    weights = jnp.ones(labels.shape, embeddings.dtype)
  else:
    weights = jnp.asarray(weights, embeddings.dtype)
    if weights.shape != labels.shape:
      raise ValueError(f"weights must be [n] = [{labels.shape[0]}], got {weights.shape}")
  # [n, 2]: column 0 = minority membership, column 1 = majority membership.
  membership = jnp.stack([labels == 1, labels == 0], axis=1).astype(embeddings.dtype)
  membership = membership * weights[:, None]
  totals = jnp.sum(membership, axis=0)                               # [2]
  sums = jnp.einsum("nk,ns->ks", membership, embeddings,
                    precision=jax.lax.Precision.HIGHEST)             # [2, S]
  centres = sums / jnp.where(totals > 0, totals, 1.0)[:, None]
  return centres[0], centres[1], jnp.all(totals > 0)


def update_centres(stored: Centres, centre_min: jax.Array, centre_maj: jax.Array,
                   valid: jax.Array | bool = True) -> Centres:
  """The monotone update of Eq. 7.

  (Cl*_min, Cl*_maj) = argmax {d(Cl^n_min, Cl^n_maj), d(Cl*_min, Cl*_maj)}: the new
  pair replaces the stored one only if it is valid and strictly further apart.

  Args:
    stored: the current pair.
    centre_min: [S] this iteration's minority centre Cl^n_min.
    centre_maj: [S] this iteration's majority centre Cl^n_maj.
    valid: [] whether the new pair exists (both classes present).

  Returns:
    The updated pair.
  """
  centre_min = jnp.asarray(centre_min, stored.centre_min.dtype)
  centre_maj = jnp.asarray(centre_maj, stored.centre_maj.dtype)
  if centre_min.shape != stored.centre_min.shape or (
      centre_maj.shape != stored.centre_maj.shape):
    raise ValueError(f"new centres must be [S] = {stored.centre_min.shape}, got "
                     f"{centre_min.shape} and {centre_maj.shape}")
  separation = distances.cosine_distance(centre_min, centre_maj)
  accept = jnp.asarray(valid) & (separation > stored.separation)
  pick = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
  return Centres(
      centre_min=pick(centre_min, stored.centre_min),
      centre_maj=pick(centre_maj, stored.centre_maj),
      separation=pick(separation.astype(stored.separation.dtype), stored.separation),
      num_updates=stored.num_updates + accept.astype(jnp.int32))


def replace_centres(stored: Centres, centre_min: jax.Array, centre_maj: jax.Array,
                    valid: jax.Array | bool = True) -> Centres:
  """The non-monotone alternative to Eq. 7: always take a valid new pair.

  Offered as an ablation (``centre_update='last'``): with Eq. 7 the prototypes
  are those of the best-separated batch, which may come from an early network.
  """
  centre_min = jnp.asarray(centre_min, stored.centre_min.dtype)
  centre_maj = jnp.asarray(centre_maj, stored.centre_maj.dtype)
  accept = jnp.asarray(valid)
  pick = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
  separation = distances.cosine_distance(centre_min, centre_maj)
  return Centres(
      centre_min=pick(centre_min, stored.centre_min),
      centre_maj=pick(centre_maj, stored.centre_maj),
      separation=pick(separation.astype(stored.separation.dtype), stored.separation),
      num_updates=stored.num_updates + accept.astype(jnp.int32))


def prototype_distances(embeddings: jax.Array, centre_min: jax.Array,
                        centre_maj: jax.Array, mask: jax.Array | None = None, *,
                        distance: str = "cosine") -> tuple[jax.Array, jax.Array]:
  """Distances of embeddings to the two prototypes (Eq. 14's d_min, d_maj).

  Args:
    embeddings: [n, S] test embeddings.
    centre_min: [S] minority prototype Cl*_min.
    centre_maj: [S] majority prototype Cl*_maj.
    mask: optional [S] feature mask (1 keep, 0 drop; see :func:`feature_mask`):
      the distances are computed on the kept features only.
    distance: 'cosine' (the paper's d) or 'euclidean' (an option of the
      shallow baselines and the CAE).

  Returns:
    (d_min [n], d_maj [n]).
  """
  if distance not in DISTANCES:
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
  embeddings = jnp.asarray(embeddings)
  centre_min = jnp.asarray(centre_min, embeddings.dtype)
  centre_maj = jnp.asarray(centre_maj, embeddings.dtype)
  if embeddings.ndim != 2 or embeddings.shape[1] == 0:
    raise ValueError(f"embeddings must be [n, S] with S >= 1, got {embeddings.shape}")
  size = embeddings.shape[1]
  if centre_min.shape != (size,) or centre_maj.shape != (size,):
    raise ValueError(f"prototypes must be [S] = [{size}], got {centre_min.shape} and "
                     f"{centre_maj.shape}")
  prototypes = jnp.stack([centre_min, centre_maj])                   # [2, S]
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != (size,):
      raise ValueError(f"mask must be [S] = [{size}], got {mask.shape}")
    mask = mask.astype(embeddings.dtype)
    embeddings = embeddings * mask
    prototypes = prototypes * mask
  if distance == "cosine":
    d = distances.pairwise_cosine_distance(embeddings, prototypes)  # [n, 2]
  else:
    cross = jnp.einsum("ns,ks->nk", embeddings, prototypes,
                       precision=jax.lax.Precision.HIGHEST)
    squared = (jnp.sum(embeddings ** 2, axis=1)[:, None] - 2.0 * cross
               + jnp.sum(prototypes ** 2, axis=1)[None, :])
    d = jnp.sqrt(jnp.maximum(squared, 0.0))
  return d[:, 0], d[:, 1]


def prototype_scores(embeddings: jax.Array, centre_min: jax.Array,
                     centre_maj: jax.Array, mask: jax.Array | None = None, *,
                     distance: str = "cosine") -> dict[str, jax.Array]:
  """Prototype inference, Eq. 14, and the malignancy score.

  Args:
    embeddings: [n, S] test embeddings.
    centre_min: [S] minority prototype.
    centre_maj: [S] majority prototype.
    mask: optional [S] feature mask.
    distance: 'cosine' (the paper's) or 'euclidean'.

  Returns:
    ``scores`` [n] = d_maj - d_min (higher = nearer the minority prototype),
    ``predictions`` [n] int32 (1 where d_min < d_maj; ties go to the majority),
    ``d_min`` and ``d_maj`` [n].
  """
  d_min, d_maj = prototype_distances(embeddings, centre_min, centre_maj, mask,
                                     distance=distance)
  return {"scores": d_maj - d_min,
          "predictions": (d_min < d_maj).astype(jnp.int32),
          "d_min": d_min, "d_maj": d_maj}


def feature_threshold(centre_min: jax.Array, centre_maj: jax.Array, *,
                      rule: str = "range", scale: float = 1.0) -> jax.Array:
  """The feature-selection threshold (see the module docstring for the reading).

  Args:
    centre_min: [S] minority prototype.
    centre_maj: [S] majority prototype.
    rule: 'range' (the paper's words: the max - min feature weight of each
      prototype, averaged over the two) or 'mean_difference' (the mean absolute
      prototype difference).
    scale: multiplies the threshold, >= 0.

  Returns:
    [] threshold.
  """
  if rule not in FEATURE_SELECTION_RULES:
    raise ValueError(f"feature selection rule must be one of "
                     f"{FEATURE_SELECTION_RULES}, got {rule!r}")
  if not scale >= 0:
    raise ValueError(f"feature selection scale must be >= 0, got {scale}")
  centre_min = jnp.asarray(centre_min)
  centre_maj = jnp.asarray(centre_maj)
  if centre_min.ndim != 1 or centre_min.shape != centre_maj.shape or not centre_min.size:
    raise ValueError(f"prototypes must both be [S] with S >= 1, got {centre_min.shape} "
                     f"and {centre_maj.shape}")
  if rule == "range":
    spread = lambda c: jnp.max(c) - jnp.min(c)  # noqa: E731
    tau = 0.5 * (spread(centre_min) + spread(centre_maj))
  else:
    tau = jnp.mean(jnp.abs(centre_min - centre_maj))
  return scale * tau


def feature_mask(centre_min: jax.Array, centre_maj: jax.Array, *,
                 rule: str = "range", scale: float = 1.0) -> jax.Array:
  """Features to keep: |Cl*_min,j - Cl*_maj,j| >= threshold; [S] bool.

  Features "with similar weights across the prototypes" (absolute difference
  below the threshold) are dropped. The feature with the largest difference is
  always kept, so at least one feature remains.
  """
  threshold = feature_threshold(centre_min, centre_maj, rule=rule, scale=scale)
  difference = jnp.abs(jnp.asarray(centre_min) - jnp.asarray(centre_maj))
  best = jnp.arange(difference.size) == jnp.argmax(difference)
  return (difference >= threshold) | best
