"""Triplet and COM-Triplet losses of the COM-Triplet paper (Eq. 2-5, 12-13).

All distances are the cosine distance d of :mod:`comtriplet_jax.losses.distances`,
computed from row sums (three squared norms and three dot products per triplet),
so a loss with its gradient costs about two passes over [M, S] under jit.

Supervised (SDC), for triplets of embeddings (anchor A, positive P of A's class,
negative N of the other class):

* :func:`triplet_loss`, Eq. 2: max(0, d(A,P) - d(A,N) + alpha), fixed alpha.
* :func:`com_triplet_loss`, Eq. 3-5: max(0, Dist_wa + alpha) with
  Dist_wa = d(A,P) - 0.5 (d(A,N) + d(P,N)) and the adaptive alpha = 1 - d(P,N).

Unsupervised (UDC), for a batch of embeddings and the two cluster centres
(mu_min, mu_maj), P and N replaced by the centres:

* :func:`centre_com_triplet_loss`, Eq. 12-13.
* :func:`centre_triplet_loss`, the UDC_Triplet baseline.

Labels follow the paper's Y: 1 = minority (melanoma, mu_min), 0 = majority.
Reductions: 'mean' (the paper's 1/M sum), 'sum', or 'none' (per-triplet values,
the shape of the leading axes).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from comtriplet_jax.losses import distances

REDUCTIONS = ("mean", "sum", "none")


def _reduce(values: jax.Array, reduction: str) -> jax.Array:
  if reduction == "mean":
    return jnp.mean(values)
  if reduction == "sum":
    return jnp.sum(values)
  return values


def _check_reduction(reduction: str) -> None:
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_margin(margin) -> None:
  # A traced margin (a schedule inside jit) cannot be inspected; a Python number can.
  if isinstance(margin, (int, float)) and not (math.isfinite(margin) and margin >= 0):
    raise ValueError(f"margin must be a finite number >= 0, got {margin}")


def _check_triplets(anchor, positive, negative):
  anchor, positive, negative = (jnp.asarray(x) for x in (anchor, positive, negative))
  if not anchor.shape == positive.shape == negative.shape:
    raise ValueError(
        f"anchor, positive and negative must have the same shape [M, S], got "
        f"{anchor.shape}, {positive.shape}, {negative.shape}")
  if anchor.ndim < 1 or anchor.shape[-1] == 0:
    raise ValueError(f"embeddings must be [..., S] with S >= 1, got {anchor.shape}")
  return _at_least_float32(anchor, positive, negative)


def _at_least_float32(*arrays):
  # bf16 embeddings of a mixed-precision model: sums over S need float32.
  dtype = jnp.result_type(*arrays, jnp.float32)
  return tuple(x.astype(dtype) for x in arrays)


def _triplet_distances(anchor, positive, negative, eps):
  """d(A,P), d(A,N), d(P,N) from six row sums (see distances.cosine_distance)."""
  inv_a, inv_p, inv_n = (
      distances.inverse_norm(jnp.sum(x * x, axis=-1), eps=eps)
      for x in (anchor, positive, negative))
  d_ap = 1.0 - jnp.sum(anchor * positive, axis=-1) * inv_a * inv_p
  d_an = 1.0 - jnp.sum(anchor * negative, axis=-1) * inv_a * inv_n
  d_pn = 1.0 - jnp.sum(positive * negative, axis=-1) * inv_p * inv_n
  return d_ap, d_an, d_pn


def triplet_loss(anchor: jax.Array, positive: jax.Array, negative: jax.Array, *,
                 margin: float = 0.2, reduction: str = "mean",
                 eps: float = distances.DEFAULT_EPS) -> jax.Array:
  """Triplet loss with a fixed margin, Eq. 2.

  L = 1/M sum_i max(0, d(A_i, P_i) - d(A_i, N_i) + alpha).

  Args:
    anchor: [M, S] anchor embeddings E_A (any leading axes [..., S] work).
    positive: [M, S] embeddings E_P of the anchors' classes.
    negative: [M, S] embeddings E_N of the other class.
    margin: alpha >= 0; 0.2 in the paper's baselines, 0.2 and 0.6 in its ablation.
    reduction: 'mean' (Eq. 2), 'sum' or 'none' ([M] per-triplet losses).
    eps: zero-vector threshold of the cosine distance.

  Returns:
    A scalar, or [M] for reduction='none'.
  """
  _check_reduction(reduction)
  _check_margin(margin)
  anchor, positive, negative = _check_triplets(anchor, positive, negative)
  d_ap, d_an, _ = _triplet_distances(anchor, positive, negative, eps)
  return _reduce(jax.nn.relu(d_ap - d_an + margin), reduction)


def com_triplet_loss(anchor: jax.Array, positive: jax.Array, negative: jax.Array, *,
                     margin: float | None = None, margin_gradient: bool = True,
                     reduction: str = "mean",
                     eps: float = distances.DEFAULT_EPS) -> jax.Array:
  """Centre-oriented margin-free triplet loss (COM-Triplet), Eq. 3-5.

  L = 1/M sum_i max(0, Dist_wa_i + alpha_i) with
  Dist_wa_i = d(A_i, P_i) - 0.5 (d(A_i, N_i) + d(P_i, N_i))      (Eq. 4)
  alpha_i = 1 - d(P_i, N_i)                                       (Eq. 5)

  What ``margin_gradient`` means for training. With the adaptive margin the
  hinge argument is d(A,P) - 0.5 d(A,N) - 1.5 d(P,N) + 1 when the gradient flows
  through alpha (the default, the equations as written): the loss pushes P away
  from N three times harder than A away from N. With ``margin_gradient=False``
  alpha is a per-triplet constant (``stop_gradient``), the hinge pulls on
  d(A,P) - 0.5 d(A,N) - 0.5 d(P,N) only, and the margin just decides which
  triplets are active. Both give the same loss value.

  Args:
    anchor: [M, S] anchor embeddings E_A (any leading axes [..., S] work).
    positive: [M, S] embeddings E_P of the anchors' classes.
    negative: [M, S] embeddings E_N of the other class.
    margin: None for the adaptive alpha of Eq. 5 (the paper's method), or a
      fixed alpha >= 0 (the paper's margin ablation: 0.2, 0.6).
    margin_gradient: whether the gradient flows through the adaptive margin;
      ignored for a fixed margin.
    reduction: 'mean' (Eq. 3), 'sum' or 'none' ([M] per-triplet losses).
    eps: zero-vector threshold of the cosine distance.

  Returns:
    A scalar, or [M] for reduction='none'.
  """
  _check_reduction(reduction)
  if margin is not None:
    _check_margin(margin)
  anchor, positive, negative = _check_triplets(anchor, positive, negative)
  d_ap, d_an, d_pn = _triplet_distances(anchor, positive, negative, eps)
  dist_wa = d_ap - 0.5 * (d_an + d_pn)
  if margin is None:
    alpha = 1.0 - (d_pn if margin_gradient else jax.lax.stop_gradient(d_pn))
  else:
    alpha = margin
  return _reduce(jax.nn.relu(dist_wa + alpha), reduction)


def _check_centres(embeddings, centre_min, centre_maj):
  embeddings, centre_min, centre_maj = (
      jnp.asarray(x) for x in (embeddings, centre_min, centre_maj))
  if embeddings.ndim != 2 or embeddings.shape[1] == 0:
    raise ValueError(f"embeddings must be [M, S] with S >= 1, got {embeddings.shape}")
  size = embeddings.shape[1]
  if centre_min.shape != (size,) or centre_maj.shape != (size,):
    raise ValueError(f"centres must be [S] = [{size}], got {centre_min.shape} and "
                     f"{centre_maj.shape}")
  return _at_least_float32(embeddings, centre_min, centre_maj)


def _centre_distances(embeddings, centre_min, centre_maj, centre_gradient,
                      assignment, eps):
  """Distances to the own and the other centre, d(mu_min, mu_maj), assignment."""
  if not centre_gradient:
    centre_min = jax.lax.stop_gradient(centre_min)
    centre_maj = jax.lax.stop_gradient(centre_maj)
  centres = jnp.stack([centre_min, centre_maj])
  # [M, 2]: column 0 = d(E, mu_min), column 1 = d(E, mu_maj).
  to_centres = distances.pairwise_cosine_distance(embeddings, centres, eps=eps)
  d_min, d_maj = to_centres[:, 0], to_centres[:, 1]
  d_centres = distances.cosine_distance(centre_min, centre_maj, eps=eps)
  if assignment is None:
    # Eq. 14, the nearer centre; it leaves ties open, and they go to the majority.
    assignment = (jax.lax.stop_gradient(d_min) < jax.lax.stop_gradient(d_maj))
  else:
    assignment = jnp.asarray(assignment)
    if assignment.shape != d_min.shape:
      raise ValueError(f"assignment must be [M] = {d_min.shape}, got "
                       f"{assignment.shape}")
    assignment = assignment.astype(bool)
  own = jnp.where(assignment, d_min, d_maj)
  other = jnp.where(assignment, d_maj, d_min)
  return own, other, d_centres, assignment.astype(jnp.int32)


def assign_to_centres(embeddings: jax.Array, centre_min: jax.Array,
                      centre_maj: jax.Array, *,
                      eps: float = distances.DEFAULT_EPS) -> jax.Array:
  """Nearest-centre labels, Eq. 14: 1 where d(E, mu_min) < d(E, mu_maj), else 0.

  Args:
    embeddings: [M, S].
    centre_min: [S] minority (melanoma) centre mu_min.
    centre_maj: [S] majority centre mu_maj.
    eps: zero-vector threshold of the cosine distance.

  Returns:
    [M] int32 labels, 1 = minority; ties go to the majority.
  """
  embeddings, centre_min, centre_maj = _check_centres(embeddings, centre_min,
                                                      centre_maj)
  return _centre_distances(embeddings, centre_min, centre_maj, False, None, eps)[3]


def centre_com_triplet_loss(embeddings: jax.Array, centre_min: jax.Array,
                            centre_maj: jax.Array, *, margin: float | None = None,
                            centre_gradient: bool = False,
                            assignment: jax.Array | None = None,
                            reduction: str = "mean",
                            eps: float = distances.DEFAULT_EPS
                            ) -> tuple[jax.Array, jax.Array]:
  """Unsupervised COM-Triplet loss to the two cluster centres, Eq. 12-13 (UDC).

  Each anchor E_i goes to its nearer centre (Eq. 14), "own"; the other is "other":
  Dist_wa_i = d(E_i, own) - 0.5 (d(E_i, other) + d(mu_min, mu_maj))   (Eq. 13)
  alpha = 1 - d(mu_min, mu_maj)                                       (Eq. 12)
  L = 1/M sum_i max(0, Dist_wa_i + alpha).

  The centres are constants by default (``centre_gradient=False``, the paper:
  they come from the GMM and the update of Eq. 7, not from back-propagation), so
  the margin is a constant too and only the embeddings receive gradients. With
  ``centre_gradient=True`` gradients also flow into the centres (for centres
  that are parameters or functions of the batch) and through alpha. The
  assignment is piecewise constant and never differentiated.

  Args:
    embeddings: [M, S] anchor embeddings E_A (the 3M batch of UDC).
    centre_min: [S] minority (melanoma) centre mu_min.
    centre_maj: [S] majority centre mu_maj.
    margin: None for the adaptive alpha of Eq. 12, or a fixed alpha >= 0.
    centre_gradient: whether gradients flow into the centres.
    assignment: optional [M] labels (1 = minority, 0 = majority), e.g. GMM
      pseudo-labels, used instead of the nearest centre.
    reduction: 'mean' (Eq. 3), 'sum' or 'none' ([M] per-anchor losses).
    eps: zero-vector threshold of the cosine distance.

  Returns:
    (loss, assignment): the loss (scalar, or [M] for 'none') and the [M] int32
    labels used, 1 = minority.
  """
  _check_reduction(reduction)
  if margin is not None:
    _check_margin(margin)
  embeddings, centre_min, centre_maj = _check_centres(embeddings, centre_min,
                                                      centre_maj)
  own, other, d_centres, labels = _centre_distances(
      embeddings, centre_min, centre_maj, centre_gradient, assignment, eps)
  dist_wa = own - 0.5 * (other + d_centres)
  alpha = 1.0 - d_centres if margin is None else margin
  return _reduce(jax.nn.relu(dist_wa + alpha), reduction), labels


def centre_triplet_loss(embeddings: jax.Array, centre_min: jax.Array,
                        centre_maj: jax.Array, *, margin: float = 0.2,
                        centre_gradient: bool = False,
                        assignment: jax.Array | None = None,
                        reduction: str = "mean",
                        eps: float = distances.DEFAULT_EPS
                        ) -> tuple[jax.Array, jax.Array]:
  """Classic triplet loss to the cluster centres, the UDC_Triplet baseline.

  L = 1/M sum_i max(0, d(E_i, own) - d(E_i, other) + alpha), own = the nearer
  centre (Eq. 14), alpha fixed (0.2 in the paper's baseline).

  Args:
    embeddings: [M, S] anchor embeddings.
    centre_min: [S] minority (melanoma) centre mu_min.
    centre_maj: [S] majority centre mu_maj.
    margin: alpha >= 0.
    centre_gradient: whether gradients flow into the centres (default: constants).
    assignment: optional [M] labels (1 = minority) used instead of the nearest
      centre.
    reduction: 'mean', 'sum' or 'none' ([M] per-anchor losses).
    eps: zero-vector threshold of the cosine distance.

  Returns:
    (loss, assignment) as in :func:`centre_com_triplet_loss`.
  """
  _check_reduction(reduction)
  _check_margin(margin)
  embeddings, centre_min, centre_maj = _check_centres(embeddings, centre_min,
                                                      centre_maj)
  own, other, _, labels = _centre_distances(
      embeddings, centre_min, centre_maj, centre_gradient, assignment, eps)
  return _reduce(jax.nn.relu(own - other + margin), reduction), labels
