"""Gaussian mixture EM in JAX (COM-Triplet paper Eq. 8-11), as careful as scikit-learn.

The unsupervised deep clustering (UDC) of the COM-Triplet paper fits a two-component
mixture (Eq. 8, 9) to the 3M = 45 embeddings of each batch by maximum likelihood
(Eq. 10) and reads pseudo-labels off the responsibilities (Eq. 11), inside the
jitted training step. `fit_gmm` is that fit: one ``lax.while_loop`` of EM, jit-able
with static ``n_components``/``covariance_type`` and vmap-able over independent
problems.

What it computes is scikit-learn's ``GaussianMixture`` (1.9):

* M-step (``_estimate_gaussian_parameters``): N_k = sum_i r_ik + 10 eps,
  mu_k = sum_i r_ik x_i / N_k, Sigma_k = sum_i r_ik (x_i - mu_k)(x_i - mu_k)^T / N_k
  + reg_covar I (diag: the diagonal of that), weights N_k / sum N_k;
* E-step: log N(x | mu_k, Sigma_k) from a Cholesky factor, log r_ik by logsumexp;
* the lower bound is the mean over points of log sum_k pi_k N(x_i | mu_k, Sigma_k)
  of the E-step, and EM stops after iteration t when |lb_t - lb_{t-1}| < tol;
* initialisation: responsibilities one-hot on k-means labels (weights N_k / n), or
  the given weights, means and precisions (Cholesky of the precisions as
  ``_compute_precision_cholesky_from_precisions``);
* a final E-step gives the returned responsibilities, so they belong to the
  returned parameters (``fit_predict``).

In float64 the parameters after every iteration equal scikit-learn's to round-off.

Robustness where float32 breaks
-------------------------------
UDC fits n = 45 points in S = 128..1024 dimensions. With n <= S every component's
scatter matrix is singular and Sigma_k = scatter + 1e-6 I has a condition number of
about (largest variance) / 1e-6. Forming Sigma_k in float32 commits errors of order
eps * (largest variance) ~ 1e-7 * variance, as large as the 1e-6 that is supposed to
make it positive definite, so a Cholesky factorisation of it fails or returns
log-determinants that are noise (scikit-learn raises on such float32 input, a naive
JAX port returns NaN). This implementation never factors that matrix:

1. *Centring.* The data are centred at their mean before anything else (EM is
   translation-equivariant), so no precision is spent on a common offset. The
   one visible difference from scikit-learn: the 10 eps added to N_k shrinks an
   empty component's mean towards the data mean instead of towards the origin.
2. *Square-root factorisation.* The upper Cholesky factor R_k of Sigma_k is taken
   as the R factor of a QR factorisation of the stacked matrix
   [sqrt(r_ik / N_k) (x_i - mu_k)  (n rows); sqrt(reg) I], whose Gram matrix is
   exactly Sigma_k. Orthogonal factorisation perturbs the singular values of that
   matrix by ~eps times the largest, i.e. it works on square roots: the smallest
   one, sqrt(reg) = 1e-3, survives float32 intact where forming the product
   would lose it. Coinciding points are no special case (their rows are zero and
   the factor is sqrt(reg) I there), and neither is an emptied component.
   Mahalanobis distances come from triangular solves with R_k (or products
   with its inverse, point 8), log-determinants
   from its diagonal, ``precisions_cholesky`` = R_k^{-1} (upper triangular, as
   scikit-learn's).
3. *Subspace (2n <= S).* All centred points and all means lie in the span of the
   centred data, an r = n dimensional subspace with orthonormal basis Q from a QR
   factorisation X_c^T = Q T, in which the points have coordinates T^T (a
   rotation: distances and inner products unchanged). In a basis [Q, Q_perp],
   Sigma_k = blockdiag(C_k + reg I_r, reg I_{S-r}), so
   log|Sigma_k| = log|C_k + reg I_r| + (S - r) log reg and the training points'
   Mahalanobis distances only see the r x r block. EM therefore runs on r x r
   factors (point 2 in r dimensions) - exact in exact arithmetic, and O(n^3)
   instead of O(n S^2) per step. The S-dimensional outputs are formed once at
   the end (point 2 in S dimensions).
4. *Which algebra when.* 'full' covariances use point 3 when 2n <= S; point 2 in
   S dimensions when n <= S < 2n in float32 (every component is rank deficient;
   the final outputs reuse the last factor); otherwise scikit-learn's M-step
   (covariance by a matrix product, Cholesky factorisation), whose pivots are
   checked: if any is non-finite or its square is below 1e3 eps times its
   diagonal entry (the pivot has lost its digits, e.g. a component with fewer
   points than dimensions), that M-step is redone by point 2. In float64 the
   check essentially never fires on data scikit-learn can fit, so the result is
   scikit-learn's to round-off.
5. *E-step.* Log-responsibilities are (w_ik - max_k w_ik) - log sum_k exp(.),
   so an emptied component gets responsibility exactly 0, not NaN, and with
   log-densities in the thousands (n < S) no digits are lost to subtracting a
   large logsumexp. N_k >= 10 eps (as scikit-learn) keeps weights and means
   finite.
6. The diagonal model uses the centred form sum_i r_ik (x_ij - mu_kj)^2 / N_k + reg
   (never E[x^2] - mu^2), which is >= reg by construction.
7. *One scatter fewer per M-step* ('full', point 4's matrix-product M-step). As
   sum_k r_ik = 1, the heaviest component's scatter about its mean m is the
   total scatter about m minus the other components' scatters about m; those
   are their own (centred, computed directly) scatters plus rank-one terms, and
   the total is X_c^T X_c (computed once) plus rank-one terms. For K = 2 that is
   one n x S x S matrix product per M-step instead of two. The subtraction
   cancels by kappa = sum_i |x_i - m|^2 / sum_i r_i,heavy |x_i - m|^2, and
   rounding errors grow by that factor, so it is used only when kappa eps <=
   1e-6 (float64: practically always; float32: kappa <= 8, overlapping
   components), else both scatters are computed directly.
8. *Speed on CPU* (the structure, not the arithmetic, of the above). XLA:CPU runs
   a plain 2-D matrix product about twice as fast per FLOP as a triangular
   solve (single thread, float32: ~95 vs ~45 GFLOP/s here), and faster than a
   batched product, so each component gets its own 2-D products;
   symmetric and triangular operands are split into up to four column blocks
   and only the blocks on one side of the diagonal are multiplied (scatters
   fill their lower triangle, read by the Cholesky factorisation and mirrored
   once for the output; Mahalanobis distances from U_k = R_k^{-1} by block
   column, or by a blocked solve with R_k that turns most of its FLOPs into
   products). The E-step multiplies by U_k (scikit-learn's
   ``precisions_cholesky``, needed as output anyway) when n >= 2 S, where the
   inverse is paid back; otherwise it solves with R_k. Factors and inverses
   of more than 64 columns are built by recursive halving (R_k and U_k
   together on the Cholesky path), so LAPACK (~25 GFLOP/s at S = 256) only
   handles the <= 64 leaves and the rest runs as products (factor and inverse
   of two components: 1.27 -> 0.93 ms at S = 256, 58-71 -> 41 ms at S = 1024,
   against LAPACK's Cholesky followed by blocked triangular solves). The
   square-root factor is computed 64 columns at a time, skipping the zeros of
   the sqrt(reg) I block: with few rows (3 n <= S, the subspace path's outputs)
   by `_sqrt_factor_panels` (56 -> 9 ms for two components at n = 45,
   S = 1024), otherwise, for S >= 256, by `_sqrt_factor_reflectors` (one
   component at n = 1000, S = 1024: 50 -> 36 ms). On the square-root path the
   output covariances are R_k^T R_k from the last factor, again by blocks on
   one side of the diagonal, instead of a second pass over the weighted rows.
   The M-step from the k-means labels is the EM loop's first pass rather than
   a step before the loop: inside the loop every M-step reads the loop's copy
   of x^T, made once, where before it XLA fuses the transpose of x into each
   consumer, and XLA:CPU runs a transposing fusion ~7x slower than a copy
   (two 3.5 ms fusions at n = 1000, S = 1024: the fit 170 -> 155 ms; n = 10000,
   S = 256: 168 -> 157 ms).
9. *EM's fixed point.* An M-step whose responsibilities equal, bit for bit, those
   of the previous M-step would return that M-step's N_k, parameters and
   log-densities again (the same function of the same input), so they are
   reused instead of recomputed; ``GMMResult.n_reused`` counts such iterations.
   Every later iteration then repeats too, the lower bound stops changing and
   EM converges at the next check, with scikit-learn's ``n_iter``. This happens
   when responsibilities saturate: in float32 a component 104 nats less likely
   than another gets responsibility exactly 0 and the other exactly 1, as for
   the benchmark's separated clusters in S >= 256 dimensions. There an EM fit
   computes one M-step and one set of log-densities instead of three (k-means
   labels, iterations 1 and 2): the benchmark's n = 1000, S = 1024 fit took
   579 ms before, 247 ms with this alone.

Matrix products use ``Precision.HIGHEST`` so that accelerators do not drop to
TF32/bfloat16 passes in this numerically sensitive code.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from comtriplet_jax.clustering import kmeans as kmeans_lib
from comtriplet_jax.clustering import serial_linalg

_HIGHEST = lax.Precision.HIGHEST
_COVARIANCE_TYPES = ("full", "diag")
_INITS = ("kmeans", "given")
# A Cholesky pivot whose square is below this many eps times its diagonal entry
# has lost (almost) all its digits to round-off: redo that M-step by QR.
_PIVOT_EPS_FACTOR = 1e3
# The heaviest component's scatter is taken as total minus the others' only when
# the cancellation costs less than this relative accuracy (see
# `_FullDirect._covariances_checked`).
_DERIVED_MAX_LOSS = 1e-6
# Triangular factors up to this size are factored or inverted by LAPACK; larger
# ones by recursive halving into matrix products (`_upper_inverse_2d`).
_LEAF = 64
# Column panel width of `_sqrt_factor_panels` and `_sqrt_factor_reflectors`.
_PANEL = 64
# `_sqrt_factor` of more rows than `_sqrt_factor_panels` takes goes panel by
# panel with Householder reflectors from this many columns on (CPU; measured
# 0.81 vs 1.09 ms at m = 200, d = 256; slower at d = 128).
_REFLECTOR_MIN = 256


class GMMResult(NamedTuple):
  """A fitted Gaussian mixture (a pytree; fields batch under vmap).

  Attributes:
    weights: [K] mixture weights h_k of Eq. 8.
    means: [K, S] component means mu_k.
    covariances: [K, S, S] ('full') or [K, S] ('diag') covariances Sigma_k,
      reg_covar included.
    precisions_cholesky: same shape: the upper-triangular U_k with
      U_k U_k^T = Sigma_k^{-1} ('full'), or 1 / sqrt(Sigma_k) ('diag'), as
      scikit-learn's ``precisions_cholesky_``.
    responsibilities: [n, K] r_ik of Eq. 11 for the fitted points under the
      returned parameters.
    lower_bound: [] mean log-likelihood of the last EM iteration (scikit-learn's
      ``lower_bound_``).
    n_iter: [] int32 EM iterations run.
    converged: [] bool, whether |change of lower bound| < tol was reached.
    n_reused: [] int32 iterations whose responsibilities equalled those of the
      previous M-step bit for bit, so that M-step was reused instead of
      recomputed (EM at its fixed point; module docstring, point 9).
  """
  weights: jax.Array
  means: jax.Array
  covariances: jax.Array
  precisions_cholesky: jax.Array
  responsibilities: jax.Array
  lower_bound: jax.Array
  n_iter: jax.Array
  converged: jax.Array
  n_reused: jax.Array


def _eps(dtype) -> float:
  return float(jnp.finfo(dtype).eps)


def _dot(spec: str, *operands: jax.Array) -> jax.Array:
  return jnp.einsum(spec, *operands, precision=_HIGHEST)


def _log_2pi_term(n_features: int) -> float:
  return n_features * math.log(2.0 * math.pi)


def _positive_diagonal(r: jax.Array) -> jax.Array:
  """Flip rows of [..., m, m] upper-triangular R so its diagonal is >= 0."""
  d = jnp.diagonal(r, axis1=-2, axis2=-1)
  sign = jnp.where(d < 0, -1.0, 1.0).astype(r.dtype)
  return r * sign[..., :, None]


def _sqrt_factor(cols: jax.Array, reg_covar: jax.Array) -> jax.Array:
  """Upper-triangular R, R^T R = cols cols^T + reg I, by QR; [..., d, m] -> [..., d, d].

  ``cols`` are the m weighted rows as columns (`_weighted_columns`). The stacked
  matrix [rows; sqrt(reg) I] has that Gram matrix exactly; QR acts on it directly
  (see point 2 of the module docstring). It is assembled as its transpose
  [cols, sqrt(reg) I], which in row-major order is the column-major matrix LAPACK
  factors: no transposing copy (8 MB, ~12 ms at d = 1024, m = 1000). The zeros
  of the identity part are skipped panel by panel: with few rows (3 m <= d) by
  `_sqrt_factor_panels`, otherwise, on CPU and for d >= 256, by
  `_sqrt_factor_reflectors`.
  """
  d, m = cols.shape[-2:]
  by_panels = (_sqrt_factor_panels if _uses_panels(m, d) else
               _sqrt_factor_reflectors if _uses_reflectors(m, d) else None)
  if by_panels is not None:
    flat = cols.reshape((-1, d, m))
    sqrt_reg = jnp.sqrt(reg_covar).astype(cols.dtype)
    r = jnp.stack([by_panels(flat[i], sqrt_reg) for i in range(flat.shape[0])])
    return _positive_diagonal(r.reshape(cols.shape[:-2] + (d, d)))
  eye = jnp.broadcast_to(jnp.sqrt(reg_covar).astype(cols.dtype) * jnp.eye(d, dtype=cols.dtype),
                         cols.shape[:-2] + (d, d))
  stacked = jnp.swapaxes(jnp.concatenate([cols, eye], axis=-1), -1, -2)
  return _positive_diagonal(serial_linalg.qr_r(stacked))


def _uses_reflectors(m: int, d: int) -> bool:
  """Whether `_sqrt_factor` of [m, d] rows runs `_sqrt_factor_reflectors` (measured faster)."""
  return (not _uses_panels(m, d) and d >= _REFLECTOR_MIN
          and serial_linalg.reflectors_available())


def _sqrt_factor_reflectors(cols: jax.Array, sqrt_reg: jax.Array) -> jax.Array:
  """R of [rows; sqrt_reg I] for one [d, m] cols = rows^T, panel by panel; [d, d].

  The panels of `_sqrt_factor_panels` (dense QR of [B_panel; sqrt_reg I_w]), with
  the trailing columns carried by LAPACK's ormqr from the panel's Householder
  reflectors instead of by its complete Q: about 4 (m + w) w (d - hi) FLOPs per
  panel, 2 m d^2 in all, against 2 (m + d) d^2 - 2 d^3 / 3 for the dense QR of
  the stacked matrix (two components at m = 1000, d = 1024: 2 x 50 -> 2 x 36 ms).
  Kept transposed ([columns, rows] in row-major order), every matrix LAPACK
  reads is already column-major.
  """
  d, m = cols.shape
  out, rest_t = [], cols
  for lo in range(0, d, _PANEL):
    w = min(_PANEL, d - lo)
    eye = sqrt_reg * jnp.eye(w, dtype=cols.dtype)
    panel, taus = serial_linalg.geqrf(jnp.concatenate([rest_t[:w], eye], axis=1).T)
    block = [jnp.zeros((w, lo), cols.dtype), jnp.triu(panel[:w])]
    if lo + w < d:
      trailing = jnp.concatenate([rest_t[w:], jnp.zeros((d - lo - w, w), cols.dtype)], axis=1)
      carried = serial_linalg.ormqr(panel, taus, trailing.T, transpose=True)  # [m + w, d - hi]
      block.append(carried[:w])
      rest_t = carried[w:].T
    out.append(jnp.concatenate(block, axis=1))
  return jnp.concatenate(out)


def _uses_panels(m: int, d: int) -> bool:
  """Whether `_sqrt_factor` of [m, d] rows goes panel by panel (measured faster)."""
  return 3 * m <= d and d > _PANEL


def _sqrt_factor_panels(cols: jax.Array, sqrt_reg: jax.Array) -> jax.Array:
  """R of [rows; sqrt_reg I] for one [d, m] cols = rows^T, m << d, panel by panel; [d, d].

  Householder QR of the stacked matrix, `_PANEL` columns at a time. Panel
  [lo, hi) only involves the m (updated) rows and rows lo..hi of the identity
  part: the identity rows below hi are still zero in these columns, and those
  above lo are finished rows of R. So each panel is a dense QR of the
  (m + w) x w matrix [B_panel; sqrt_reg I_w], whose complete Q then carries the
  trailing columns [B_rest; 0] in one product: its first w rows are R's rows
  lo..hi, the last m the next B. About m (m + w) d^2 / w FLOPs instead of the
  2 (m + d) d^2 of the dense QR.
  (The m rows come first: jaxlib's QR of [sqrt_reg I; B], identity on top,
  loses ~1e-4 relative accuracy of the small diagonal entries in float32.)
  """
  rows = cols.T
  m, d = rows.shape
  out, rest = [], rows
  for lo in range(0, d, _PANEL):
    w = min(_PANEL, d - lo)
    panel = jnp.concatenate([rest[:, :w], sqrt_reg * jnp.eye(w, dtype=rows.dtype)])
    q, r = serial_linalg.qr_complete(panel)                        # [m + w, m + w], [m + w, w]
    carried = _dot("ij,ik->jk", q[:m], rest[:, w:])                 # [m + w, d - lo - w]
    out.append(jnp.concatenate([jnp.zeros((w, lo), rows.dtype), r[:w], carried[:w]], axis=1))
    rest = carried[w:]
  return jnp.concatenate(out)


def _weighted_columns(resp: jax.Array, nk: jax.Array, xt: jax.Array,
                      means: jax.Array) -> jax.Array:
  """[K, d, n] columns sqrt(r_ik / N_k) (x_i - mu_k) from xt = x^T [d, n].

  Their Gram matrix cols_k cols_k^T is the scatter / N_k. Columns rather than rows:
  XLA:CPU multiplies A B^T of row-major A, B faster than A^T B, and [d, n] in
  row-major order is the column-major [n, d] LAPACK's QR wants.
  """
  scale = jnp.sqrt(resp.T / nk[:, None])                        # [K, n]
  return scale[:, None, :] * (xt[None, :, :] - means[:, :, None])


def _gaussian_statistics(x, resp, eps):
  """N_k (with scikit-learn's 10 eps) and means; x [n, d], resp [n, K]."""
  nk = jnp.sum(resp, axis=0) + 10.0 * eps
  means = _dot("nk,nd->kd", resp, x) / nk[:, None]
  return nk, means


def _e_step(log_gauss: jax.Array, log_weights: jax.Array):
  """Mean log-likelihood (the lower bound) and [n, K] log-responsibilities.

  logsumexp written out so that log r_ik = (w_ik - max_k w_ik) - log sum_k exp(.):
  with n < S the log-densities are in the thousands, and subtracting the full
  logsumexp from them would cost float32 ~1e-4 of the responsibilities' digits.
  """
  weighted = log_gauss + log_weights[None, :]
  top = lax.stop_gradient(jnp.max(weighted, axis=1, keepdims=True))
  shifted = weighted - top
  log_sum = jnp.log(jnp.sum(jnp.exp(shifted), axis=1, keepdims=True))
  return jnp.mean(top + log_sum), shifted - log_sum


def _blocks(d: int) -> tuple[int, ...]:
  """Boundaries of the column blocks used for triangular structure, each >= 64 wide.

  XLA:CPU runs a plain 2-D dot about twice as fast per FLOP as a triangular solve
  and faster than a batched dot; splitting a triangular operand into up to four column blocks
  and multiplying only the blocks on and above (or below) the diagonal skips up to
  3/8 of a full product while every piece stays a large 2-D dot.
  """
  b = 1 if d < 128 else min(4, d // 64)
  return tuple(d * i // b for i in range(b + 1))


def _lower_block_rows(block, d: int, bounds: tuple[int, ...]) -> jax.Array:
  """[d, d] from ``block(lo, hi)``, the [hi - lo, hi] block row up to its diagonal
  block, for each column block of ``bounds``; zero above the diagonal blocks."""
  return jnp.concatenate([jnp.pad(block(lo, hi), ((0, 0), (0, d - hi)))
                          for lo, hi in zip(bounds[:-1], bounds[1:])], axis=0)


def _gram_lower(wt: jax.Array, bounds: tuple[int, ...]) -> jax.Array:
  """wt wt^T for [d, n] wt, exact on and below the diagonal blocks, zero above: [d, d].

  The operand is the transpose of the weighted rows: XLA:CPU multiplies A B^T of
  row-major A, B about 20% faster than A^T B, for which it first copies a transpose.
  """
  return _lower_block_rows(lambda lo, hi: _dot("sn,tn->st", wt[lo:hi], wt[:hi]),
                           wt.shape[0], bounds)


def _gram_lower_rows(x: jax.Array, bounds: tuple[int, ...]) -> jax.Array:
  """`_gram_lower` of x^T, from the row-major [n, d] x itself: x^T x, lower block triangle.

  For data that only exist as rows (outside the EM loop, x^T is a transposed view
  of x): the column slices of x enter the products as they are, where slicing
  the view would copy each block of x^T by a transposing loop first (n = 10000,
  d = 1024: 307 -> 148 ms; d = 256: 26 -> 14 ms).
  """
  return _lower_block_rows(lambda lo, hi: _dot("ns,nt->st", x[:, lo:hi], x[:, :hi]),
                           x.shape[1], bounds)


def _regularised_scatters(cols: jax.Array, reg: jax.Array, bounds: tuple[int, ...]
                          ) -> jax.Array:
  """[K, d, d] cols_k cols_k^T + reg I, exact in the lower block triangle; cols [K, d, n]."""
  d = cols.shape[1]
  grams = jnp.stack([_gram_lower(cols[k], bounds) for k in range(cols.shape[0])])
  return grams + reg * jnp.eye(d, dtype=cols.dtype)


def _factor_gram_lower(r: jax.Array, bounds: tuple[int, ...]) -> jax.Array:
  """R^T R for upper-triangular [d, d] R: exact on and below the diagonal blocks, zero above.

  Block row [lo, hi) only involves rows [0, hi) of R (R is zero below them), so
  the products shrink with the block as well as skipping the blocks above.
  """
  return _lower_block_rows(lambda lo, hi: _dot("ls,lt->st", r[:hi, lo:hi], r[:hi, :hi]),
                           r.shape[-1], bounds)


def _symmetrize_lower(g: jax.Array, bounds: tuple[int, ...]) -> jax.Array:
  """The symmetric [..., d, d] matrix whose lower triangle is g's, block by block.

  Only the diagonal blocks' upper triangles and the blocks above them (column
  blocks of `_blocks`) are written, each from a transposed block below the
  diagonal. XLA:CPU runs a transposing elementwise loop several times slower
  than a copy (at d = 1024, K = 2: 7.6 ms for ``where(tril, g, g^T)`` over the
  whole matrix, 4.2-4.5 ms by blocks).
  """
  d = g.shape[-1]
  out = g
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    diag = g[..., lo:hi, lo:hi]
    lower = jnp.tril(jnp.ones((hi - lo, hi - lo), bool))
    out = out.at[..., lo:hi, lo:hi].set(jnp.where(lower, diag, jnp.swapaxes(diag, -1, -2)))
    if hi < d:
      out = out.at[..., lo:hi, hi:].set(jnp.swapaxes(g[..., hi:, lo:hi], -1, -2))
  return out


def _maha_solve(diff: jax.Array, upper: jax.Array, bounds: tuple[int, ...]) -> jax.Array:
  """[n] squared norms of the rows of diff R^{-1}; diff [n, d], R [d, d] upper.

  Block by block (see `_blocks`): solve with a diagonal block of R, then remove
  the solved part from the remaining columns with one 2-D product, so most of
  the n d^2 FLOPs run as matrix products rather than as a triangular solve.
  Each solve is the left-sided R_bb^{-T} diff_b^T: LAPACK reads diff_b^T in
  column-major order, which is diff_b's own row-major order, so XLA passes it
  without a transposing copy (a right-sided solve with diff_b would need one).
  """
  total = jnp.zeros(diff.shape[:-1], diff.dtype)
  rest = diff
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    y_t = serial_linalg.triangular_solve(upper[lo:hi, lo:hi], rest[:, :hi - lo].T,
                                      left_side=True, lower=False, transpose_a=True)
    total = total + jnp.sum(y_t * y_t, axis=0)
    if hi < upper.shape[-1]:
      rest = rest[:, hi - lo:] - _dot("tn,ts->ns", y_t, upper[lo:hi, hi:])
  return total


def _maha_inverse(diff: jax.Array, prec: jax.Array, bounds: tuple[int, ...]) -> jax.Array:
  """[n] squared norms of the rows of diff U for upper-triangular [d, d] U.

  Column block [lo, hi) of diff U only needs rows [0, hi) of U (see `_blocks`).
  """
  total = jnp.zeros(diff.shape[:-1], diff.dtype)
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    y = _dot("ns,st->nt", diff[:, :hi], prec[:hi, lo:hi])
    total = total + jnp.sum(y * y, axis=-1)
  return total


def _log_gauss_full(x, means, upper, prec, n_features, bounds):
  """log N(x_i | mu_k, R_k^T R_k) for upper-triangular R_k: [n, K].

  x [n, d], means [K, d], upper [K, d, d]; prec is R_k^{-1} [K, d, d] (the
  Mahalanobis distances then come from products with it) or None (from triangular
  solves with R_k). ``n_features`` is the ambient dimension S of the normalising
  constant. One 2-D operation per component (K is small and static).
  """
  maha = []
  for k in range(means.shape[0]):
    diff = x - means[k]
    maha.append(_maha_solve(diff, upper[k], bounds) if prec is None
                else _maha_inverse(diff, prec[k], bounds))
  maha = jnp.stack(maha, axis=1)                                    # [n, K]
  log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(upper, axis1=-2, axis2=-1)), -1)
  return -0.5 * (_log_2pi_term(n_features) + maha + log_det[None, :])


def _log_gauss_precision_cholesky(x, means, prec_chol, covariance_type):
  """scikit-learn's ``_estimate_log_gaussian_prob`` with U: [n, K]."""
  n_features = x.shape[-1]
  if covariance_type == "full":
    diff = x[None, :, :] - means[:, None, :]                        # [K, n, S]
    y = _dot("kns,kst->knt", diff, prec_chol)
    maha = jnp.sum(y * y, axis=-1).T
    log_det = jnp.sum(jnp.log(jnp.diagonal(prec_chol, axis1=-2, axis2=-1)), -1)
  else:
    maha = _dot("nks,ks->nk", (x[:, None, :] - means[None, :, :]) ** 2, prec_chol ** 2)
    log_det = jnp.sum(jnp.log(prec_chol), axis=-1)
  return -0.5 * (_log_2pi_term(n_features) + maha) + log_det[None, :]


def _split(d: int) -> int:
  """Where the recursive factorisations split a [d, d] matrix: about half, a multiple of 32."""
  return -(-d // 64) * 32


def _leaf_upper_inverse(r: jax.Array) -> jax.Array:
  eye = jnp.eye(r.shape[-1], dtype=r.dtype)
  return serial_linalg.triangular_solve(r, eye, left_side=True, lower=False)


def _block_pairs(d: int) -> list[tuple[int, int]]:
  bounds = _blocks(d)
  return list(zip(bounds[:-1], bounds[1:]))


def _upper_times(u: jax.Array, m: jax.Array) -> jax.Array:
  """u @ m for upper-triangular [h, h] u and [h, p] m.

  Block row [lo, hi) of u is zero left of column lo, so it only meets rows
  [lo, h) of m: up to 3/8 of the product's FLOPs skipped (see `_blocks`).
  """
  return jnp.concatenate([_dot("ij,jk->ik", u[lo:hi, lo:], m[lo:])
                          for lo, hi in _block_pairs(u.shape[0])], axis=0)


def _times_upper(m: jax.Array, u: jax.Array) -> jax.Array:
  """m @ u for [p, q] m and upper-triangular [q, q] u.

  Block column [lo, hi) of u is zero below row hi, so it only meets columns
  [0, hi) of m.
  """
  return jnp.concatenate([_dot("ij,jk->ik", m[:, :hi], u[:hi, lo:hi])
                          for lo, hi in _block_pairs(u.shape[0])], axis=1)


def _upper_inverse_2d(r: jax.Array) -> jax.Array:
  """R^{-1} for one upper-triangular [d, d] R, by recursive halving.

  [[A, B], [0, C]]^{-1} = [[A^{-1}, -A^{-1} B C^{-1}], [0, C^{-1}]]: the work
  above `_LEAF` runs as matrix products, which XLA:CPU runs several times faster
  per FLOP than the LAPACK triangular solve of the leaves, and the products with
  the triangular A^{-1} and C^{-1} skip their zero blocks (two components at
  d = 1024: 20.8 -> 14.2 ms; d = 512: 3.1 -> 2.3 ms).
  """
  d = r.shape[-1]
  if d <= _LEAF:
    return _leaf_upper_inverse(r)
  h = _split(d)
  a = _upper_inverse_2d(r[:h, :h])
  c = _upper_inverse_2d(r[h:, h:])
  b = -_times_upper(_upper_times(a, r[:h, h:]), c)
  return jnp.block([[a, b], [jnp.zeros((d - h, h), r.dtype), c]])


def _upper_inverse(r: jax.Array) -> jax.Array:
  """R^{-1} for upper-triangular [..., d, d] R (the precision Cholesky of R^T R)."""
  if r.ndim == 2:
    return _upper_inverse_2d(r)
  return jnp.stack([_upper_inverse(r[k]) for k in range(r.shape[0])])


def _cholesky_inverse_2d(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(R, R^{-1}) with R upper triangular, R^T R = a, for one [d, d] SPD matrix.

  Reads only the lower triangle of ``a``. Recursive blocked Cholesky that carries
  the inverse along: with R_11, U_11 = R_11^{-1} from the leading block,
  R_12 = U_11^T a_21^T, R_22 from the Schur complement a_22 - R_12^T R_12, and
  U_12 = -U_11 R_12 U_22. LAPACK factors and inverts only the <= `_LEAF` leaves;
  the rest is matrix products, those with the triangular U_11 and U_22 skipping
  their zero blocks (two components at d = 1024: 39.6 -> 32.5 ms; d = 512:
  6.1 -> 5.2 ms; the Schur complement's Gram matrix, an A^T A product, is faster
  whole). A failed leaf factorisation (not positive definite) makes every later
  entry NaN, which `_FullDirect.m_step` detects.
  """
  d = a.shape[-1]
  if d <= _LEAF:
    r = serial_linalg.cholesky(a, symmetrize_input=False).T
    return r, _leaf_upper_inverse(r)
  h = _split(d)
  r11, u11 = _cholesky_inverse_2d(a[:h, :h])
  a21 = a[h:, :h]
  # U_11^T is lower triangular: block row [lo, hi) of R_12 only needs columns [0, hi).
  r12 = jnp.concatenate([_dot("ji,kj->ik", u11[:hi, lo:hi], a21[:, :hi])
                         for lo, hi in _block_pairs(h)], axis=0)
  r22, u22 = _cholesky_inverse_2d(a[h:, h:] - _dot("ki,kj->ij", r12, r12))
  u12 = -_times_upper(_upper_times(u11, r12), u22)
  zero = jnp.zeros((d - h, h), a.dtype)
  return jnp.block([[r11, r12], [zero, r22]]), jnp.block([[u11, u12], [zero, u22]])


class _FullDirect:
  """'full' covariances in the S feature dimensions (n > S / 2).

  With ``square_root`` (float32 and n <= S: components are rank deficient) every
  M-step factors by QR (point 2 of the module docstring); otherwise it is
  scikit-learn's M-step, a Cholesky factorisation whose pivots are checked, with
  the QR factorisation as fallback (point 4). Parameters: (means [K, S], upper
  factor R_k [K, S, S] with R_k^T R_k = Sigma_k, U_k = R_k^{-1} [K, S, S] or None,
  covariances [K, S, S] correct in their lower triangle, or None).
  """

  def __init__(self, xc, reg_covar, square_root):
    self.x = xc
    self.reg = reg_covar
    self.eps = _eps(xc.dtype)
    n, self.n_features = xc.shape
    self.square_root = square_root
    self.bounds = _blocks(self.n_features)
    # E-step by products with U_k = R_k^{-1} (scikit-learn's precisions_cholesky,
    # 2 n S^2 FLOPs less the skipped blocks, as fast 2-D dots, plus the inverse)
    # once n is a few times S; below that, by triangular solves (n S^2 FLOPs at a
    # lower rate, no inverse).
    self.use_inverse = n >= 2 * self.n_features
    self.xt = xc.T
    if not square_root:
      # Total scatter and column sums of the (centred) data, for `_covariances_from_total`.
      self.total = _gram_lower_rows(xc, self.bounds)
      self.col_sum = jnp.sum(xc, axis=0)

  def _covariances_lower(self, resp, nk, means):
    cols = _weighted_columns(resp, nk, self.xt, means)                # [K, S, n]
    return _regularised_scatters(cols, self.reg, self.bounds)

  def _covariances_from_total(self, resp, nk, means):
    """Covariances (lower triangles), the heaviest one's scatter from the total.

    Point 7 of the module docstring: with m the heaviest component's mean and, for
    every other component j, delta_j = mu_j - m, R_j = sum_i r_ij and
    a_j = sum_i r_ij (x_i - mu_j) (= 10 eps mu_j),
    sum_i r_i,heavy (x_i - m)(x_i - m)^T = X^T X - m s^T - s m^T + n m m^T
      - sum_j [N_j Sigma'_j + delta_j a_j^T + a_j delta_j^T + R_j delta_j delta_j^T],
    s = X^T 1 and Sigma'_j the other components' scatters / N_j: one matrix
    product fewer per M-step, exact up to round-off because sum_k r_ik = 1.
    """
    n, k_count = resp.shape
    heavy = jnp.argmax(nk)
    # The others in cyclic order after the heaviest: component c sits at position
    # (c - heavy - 1) mod K of [others..., heavy].
    others = (heavy + 1 + jnp.arange(k_count - 1)) % k_count
    m = means[heavy]
    cols_o = _weighted_columns(resp[:, others], nk[others], self.xt, means[others])
    grams_o = jnp.stack([_gram_lower(cols_o[j], self.bounds) for j in range(k_count - 1)])
    nk_o = nk[others]
    r_o = jnp.sum(resp, axis=0)[others]
    delta = means[others] - m                                         # [K-1, S]
    a = (nk_o - r_o)[:, None] * means[others]
    s = self.col_sum
    scatter = (self.total - jnp.outer(m, s) - jnp.outer(s, m) + n * jnp.outer(m, m)
               - _dot("j,jst->st", nk_o, grams_o)
               - _dot("js,jt->st", delta, a) - _dot("js,jt->st", a, delta)
               - _dot("js,jt->st", r_o[:, None] * delta, delta))
    eye = self.reg * jnp.eye(self.n_features, dtype=self.x.dtype)
    stacked = jnp.concatenate([grams_o, (scatter / nk[heavy])[None]]) + eye
    # Component c is stacked[(c - heavy - 1) mod K]: a contiguous window of the
    # stack repeated twice (a copy, where a gather runs element by element).
    start = (k_count - 1 - heavy) % k_count
    return lax.dynamic_slice_in_dim(jnp.concatenate([stacked, stacked]), start, k_count)

  def _covariances_checked(self, resp, nk, means):
    """`_covariances_from_total` where its cancellation costs < 1e-6 relative, else direct.

    Its rounding error is about kappa eps times the heaviest covariance, kappa =
    sum_i |x_i - m|^2 / sum_i r_i,heavy |x_i - m|^2 (how much larger the
    subtracted terms are than the result): float64 essentially always takes it,
    float32 when the heaviest component holds a large part of the spread.
    """
    direct = lambda: self._covariances_lower(resp, nk, means)
    if resp.shape[1] < 2:
      return direct()
    heavy = jnp.argmax(nk)
    sq_dist = jnp.sum(jnp.square(self.x - means[heavy]), axis=1)       # [n]
    usable = (jnp.sum(sq_dist) * self.eps
              <= _DERIVED_MAX_LOSS * jnp.sum(resp[:, heavy] * sq_dist))
    return lax.cond(usable, lambda: self._covariances_from_total(resp, nk, means), direct)

  def m_step(self, resp):
    nk, means = _gaussian_statistics(self.x, resp, self.eps)
    cols = lambda: _weighted_columns(resp, nk, self.xt, means)       # [K, S, n]
    if self.square_root:
      # The covariances are only an output: formed once, in `finalize`, as R^T R
      # of the last factor. (n <= S, so the E-step solves with R: no inverse.)
      return nk, (means, _sqrt_factor(cols(), self.reg), None, None)
    cov = self._covariances_checked(resp, nk, means)
    if self.use_inverse:
      upper, prec = map(jnp.stack, zip(*[_cholesky_inverse_2d(c) for c in cov]))
    else:
      upper = jnp.swapaxes(serial_linalg.cholesky(cov, symmetrize_input=False), -1, -2)
      prec = None
    pivots = jnp.diagonal(upper, axis1=-2, axis2=-1)
    diag = jnp.diagonal(cov, axis1=-2, axis2=-1)
    lost = ~jnp.all(jnp.isfinite(upper)) | jnp.any(
        pivots * pivots < _PIVOT_EPS_FACTOR * self.eps * diag)

    def refactor():
      qr_upper = _sqrt_factor(cols(), self.reg)
      return qr_upper, _upper_inverse(qr_upper) if self.use_inverse else None

    upper, prec = lax.cond(lost, refactor, lambda: (upper, prec))
    return nk, (means, upper, prec, cov)

  def log_gauss(self, params):
    means, upper, prec, _ = params
    return _log_gauss_full(self.x, means, upper, prec, self.n_features, self.bounds)

  def finalize(self, params, resp):
    del resp   # the covariances come from the last factor (or M-step), not from resp
    means, upper, prec, cov = params
    if cov is None:
      cov = jnp.stack([_factor_gram_lower(r, self.bounds) for r in upper])
    if prec is None:
      prec = _upper_inverse(upper)
    return means, _symmetrize_lower(cov, self.bounds), prec


class _FullSubspace:
  """'full' covariances in the r = n dimensional span of the centred data (2n <= S).

  Parameters: (means in subspace coordinates [K, r], upper factor R_k [K, r, r]
  with R_k^T R_k = C_k + reg I_r). See point 3 of the module docstring. The
  S-dimensional outputs are formed once, in `finalize`.
  """

  def __init__(self, xc, reg_covar):
    self.x = xc
    self.reg = reg_covar
    self.eps = _eps(xc.dtype)
    self.n_features = xc.shape[1]
    # X_c^T = Q T with Q [S, r] orthonormal; the coordinates X_c Q are T^T, so Q
    # itself is never needed (means and outputs are formed from x directly).
    self.z = serial_linalg.qr_r(xc.T).T
    self.zt = self.z.T
    self.rank = self.z.shape[1]

  def m_step(self, resp):
    nk, means = _gaussian_statistics(self.z, resp, self.eps)
    upper = _sqrt_factor(_weighted_columns(resp, nk, self.zt, means), self.reg)
    return nk, (means, upper)

  def log_gauss(self, params):
    means, upper = params
    # The (S - r) directions orthogonal to the data carry variance reg and no
    # component of any training point.
    outside = (self.n_features - self.rank) * jnp.log(self.reg)
    return (_log_gauss_full(self.z, means, upper, None, self.n_features,
                            _blocks(self.rank))
            - 0.5 * outside)

  def finalize(self, params, resp):
    del params
    nk, means = _gaussian_statistics(self.x, resp, self.eps)
    cols = _weighted_columns(resp, nk, self.x.T, means)              # [K, S, n]
    # Whole products, as scikit-learn forms its covariances: with few columns
    # they cost less than the lower block triangle and its mirror image (two
    # components, S = 1024: n = 45 2.2 against 6.4 ms; at n = S / 2 = 512 about
    # the same, 20.5 against 19.2 ms).
    eye = self.reg * jnp.eye(self.n_features, dtype=cols.dtype)
    cov = jnp.stack([_dot("sn,tn->st", c, c) for c in cols]) + eye
    return means, cov, _upper_inverse(_sqrt_factor(cols, self.reg))


class _Diag:
  """'diag' covariances. State: (means [K, S], variances [K, S])."""

  def __init__(self, xc, reg_covar):
    self.x = xc
    self.reg = reg_covar
    self.eps = _eps(xc.dtype)

  def m_step(self, resp):
    nk, means = _gaussian_statistics(self.x, resp, self.eps)
    sq = (self.x[:, None, :] - means[None, :, :]) ** 2              # [n, K, S]
    variances = _dot("nk,nks->ks", resp, sq) / nk[:, None] + self.reg
    return nk, (means, variances)

  def log_gauss(self, params):
    means, variances = params
    return _log_gauss_precision_cholesky(self.x, means, lax.rsqrt(variances), "diag")

  def finalize(self, params, resp):
    del resp
    means, variances = params
    return means, variances, lax.rsqrt(variances)


def _precision_cholesky_from_precisions(precisions, covariance_type):
  """scikit-learn's ``_compute_precision_cholesky_from_precisions``."""
  if covariance_type == "diag":
    return jnp.sqrt(precisions)
  flipped = jnp.flip(precisions, axis=(-2, -1))
  return jnp.flip(serial_linalg.cholesky(flipped), axis=(-2, -1))


def _check_inputs(x, n_components, covariance_type, init, key, weights_init,
                  means_init, precisions_init, max_iter, reg_covar, n_kmeans_init):
  if x.ndim != 2:
    raise ValueError(f"x must be [n, S], got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be floating point, got {x.dtype}")
  n, s = x.shape
  if not isinstance(n_components, int) or n_components < 1:
    raise ValueError(f"n_components must be a positive int, got {n_components!r}")
  if n < max(2, n_components):
    raise ValueError(f"need n >= max(2, n_components={n_components}) points, got {n}")
  if covariance_type not in _COVARIANCE_TYPES:
    raise ValueError(f"covariance_type must be one of {_COVARIANCE_TYPES}, "
                     f"got {covariance_type!r}")
  if init not in _INITS:
    raise ValueError(f"init must be one of {_INITS}, got {init!r}")
  if isinstance(max_iter, int) and max_iter < 1:
    raise ValueError(f"max_iter must be >= 1, got {max_iter}")
  if isinstance(reg_covar, (int, float)) and reg_covar <= 0:
    raise ValueError(f"reg_covar must be > 0, got {reg_covar}")
  if not isinstance(n_kmeans_init, int) or n_kmeans_init < 1:
    raise ValueError(f"n_kmeans_init must be a positive int, got {n_kmeans_init!r}")
  given = (weights_init, means_init, precisions_init)
  if init == "kmeans":
    if key is None:
      raise ValueError("init='kmeans' needs a PRNG key")
    if any(g is not None for g in given):
      raise ValueError("weights_init/means_init/precisions_init need init='given'")
    return
  if any(g is None for g in given):
    raise ValueError("init='given' needs weights_init, means_init and precisions_init")
  k = n_components
  expected = {"weights_init": (k,), "means_init": (k, s),
              "precisions_init": (k, s, s) if covariance_type == "full" else (k, s)}
  for name, value in zip(expected, given):
    if jnp.shape(value) != expected[name]:
      raise ValueError(f"{name} must have shape {expected[name]}, got {jnp.shape(value)}")


def _full_path(n: int, s: int, dtype) -> str:
  """Which algebra 'full' covariances take (point 4 of the module docstring).

  'subspace' (2 n <= S), 'square_root' (n <= S in float32) or 'cholesky'. In
  float64 the normal equations keep ~10 digits even for singular scatter; in
  float32 they do not once a component has fewer points than dimensions.
  """
  if 2 * n <= s:
    return "subspace"
  if n <= s and _eps(dtype) > 1e-10:
    return "square_root"
  return "cholesky"


def fit_gmm(x: jax.Array, n_components: int, *, key: jax.Array | None = None,
            covariance_type: str = "full", reg_covar: float | jax.Array = 1e-6,
            tol: float | jax.Array = 1e-3, max_iter: int | jax.Array = 100,
            init: str = "kmeans", weights_init: jax.Array | None = None,
            means_init: jax.Array | None = None,
            precisions_init: jax.Array | None = None,
            n_kmeans_init: int = 1) -> GMMResult:
  """Fits a Gaussian mixture by EM (Eq. 8-11), like scikit-learn's GaussianMixture.

  Args:
    x: [n, S] points (the 3M embeddings in UDC); float32 or float64.
    n_components: K (static; 2 in the paper).
    key: PRNG key for the k-means initialisation (needed for init='kmeans').
    covariance_type: 'full' or 'diag' (static).
    reg_covar: added to the covariance diagonals (paper and default: 1e-6).
    tol: EM stops when the mean log-likelihood changes by less than ``tol``
      between iterations (paper and default: 1e-3).
    max_iter: maximum EM iterations, >= 1 (default 100; a traced value below 1
      runs one iteration).
    init: 'kmeans' (responsibilities one-hot on k-means labels, as scikit-learn)
      or 'given' (static).
    weights_init: [K] initial weights (init='given').
    means_init: [K, S] initial means (init='given').
    precisions_init: [K, S, S] ('full') or [K, S] ('diag') initial precisions,
      i.e. inverse covariances (init='given').
    n_kmeans_init: restarts of the initialising k-means (static; scikit-learn: 1).

  Returns:
    GMMResult. How float32 stays finite for n < S, coinciding points and emptied
    components is described in the module docstring.

  Raises:
    ValueError: on bad shapes, dtypes or options.
  """
  # jnp.asarray takes ~8 us even on a JAX array (0.5% of an n = 1000, S = 64 fit).
  x = x if isinstance(x, jax.Array) else jnp.asarray(x)
  _check_inputs(x, n_components, covariance_type, init, key, weights_init,
                means_init, precisions_init, max_iter, reg_covar, n_kmeans_init)
  return _fit_gmm(x, n_components, key=key, covariance_type=covariance_type,
                  reg_covar=reg_covar, tol=tol, max_iter=max_iter, init=init,
                  weights_init=weights_init, means_init=means_init,
                  precisions_init=precisions_init, n_kmeans_init=n_kmeans_init)


@functools.partial(jax.jit, static_argnames=("n_components", "covariance_type", "init",
                                             "n_kmeans_init"))
def _fit_gmm(x, n_components, *, key, covariance_type, reg_covar, tol, max_iter, init,
             weights_init, means_init, precisions_init, n_kmeans_init) -> GMMResult:
  """The jitted body of `fit_gmm` (inputs already checked)."""
  n, s = x.shape
  dtype = x.dtype
  reg_covar = jnp.asarray(reg_covar, dtype)
  tol = jnp.asarray(tol, dtype)
  offset = jnp.mean(x, axis=0)
  xc = x - offset
  path = _full_path(n, s, dtype)
  if covariance_type == "diag":
    model = _Diag(xc, reg_covar)
  elif path == "subspace":
    model = _FullSubspace(xc, reg_covar)
  else:
    model = _FullDirect(xc, reg_covar, square_root=path == "square_root")

  def m_step(resp):
    """N_k, the parameters and their [n, K] log-densities: all a function of resp."""
    nk, params = model.m_step(resp)
    return nk, params, model.log_gauss(params)

  # No M-step yet: placeholders of the right structure, with responsibilities
  # (-1) that no E-step produces, so that the first pass computes its M-step.
  resp_none = jnp.full((n, n_components), -1.0, dtype)
  nk0, params0, log_gauss0 = jax.tree_util.tree_map(
      lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(m_step, resp_none))
  if init == "kmeans":
    # The loop's first pass is M-step 0 from the one-hot k-means labels and
    # E-step 1; it is not an EM iteration. Inside the loop, the M-step reads the
    # loop's copy of the data (transposed once), where a separate M-step before
    # the loop would have XLA re-read x transposed in every fusion that uses it.
    features = model.z if isinstance(model, _FullSubspace) else xc
    labels = kmeans_lib.kmeans(key, features, n_components, n_init=n_kmeans_init).labels
    log_resp1 = jnp.log(jax.nn.one_hot(labels, n_components, dtype=dtype))
    lb1 = jnp.asarray(-jnp.inf, dtype)
  else:
    prec_chol = _precision_cholesky_from_precisions(
        jnp.asarray(precisions_init, dtype), covariance_type)
    log_gauss_init = _log_gauss_precision_cholesky(
        xc, jnp.asarray(means_init, dtype) - offset, prec_chol, covariance_type)
    lb1, log_resp1 = _e_step(log_gauss_init, jnp.log(jnp.asarray(weights_init, dtype)))

  # State after t M-steps: N_k, parameters and log-densities of M-step t, the
  # responsibilities it was computed from, E-step t+1 (log_resp, lb_next) and
  # lb_t, the lower bound scikit-learn reports after iteration t. lb_0 = -inf, so
  # iteration 1 never converges, as in scikit-learn. ``initial``: the next pass
  # is M-step 0 (k-means initialisation), not counted as an iteration.
  state = dict(n_iter=jnp.asarray(0, jnp.int32), n_reused=jnp.asarray(0, jnp.int32),
               nk=nk0, params=params0, log_gauss=log_gauss0, resp_used=resp_none,
               log_resp=log_resp1, lb=jnp.asarray(-jnp.inf, dtype), lb_next=lb1,
               converged=jnp.asarray(False), initial=jnp.asarray(init == "kmeans"))

  # A traced max_iter cannot be checked in Python: run at least one iteration so
  # the placeholders are always replaced.
  max_iter = jnp.maximum(max_iter, 1)

  def cond(state):
    return (state["n_iter"] < max_iter) & ~state["converged"]

  def body(state):
    initial = state["initial"]
    resp = jnp.exp(state["log_resp"])
    # EM's fixed point: responsibilities equal, bit for bit, to those of the last
    # M-step give that M-step's N_k, parameters and log-densities again (point 9
    # of the module docstring), so they are reused, not recomputed.
    reuse = jnp.all(resp == state["resp_used"])
    nk, params, log_gauss = lax.cond(
        reuse, lambda: (state["nk"], state["params"], state["log_gauss"]),
        lambda: m_step(resp))
    # scikit-learn's initial weights are N_k / n, not N_k / sum N_k.
    weights = nk / jnp.where(initial, n, jnp.sum(nk))
    lb_next, log_resp = _e_step(log_gauss, jnp.log(weights))
    lb = jnp.where(initial, state["lb"], state["lb_next"])
    counted = (~initial).astype(jnp.int32)
    return dict(n_iter=state["n_iter"] + counted,
                n_reused=state["n_reused"] + counted * reuse.astype(jnp.int32), nk=nk,
                params=params, log_gauss=log_gauss, resp_used=resp,
                log_resp=log_resp, lb=lb, lb_next=lb_next,
                converged=~initial & (jnp.abs(lb - state["lb"]) < tol),
                initial=jnp.asarray(False))

  state = lax.while_loop(cond, body, state)
  means, covariances, precisions_cholesky = model.finalize(state["params"],
                                                           state["resp_used"])
  return GMMResult(
      weights=state["nk"] / jnp.sum(state["nk"]),
      means=means + offset,
      covariances=covariances,
      precisions_cholesky=precisions_cholesky,
      responsibilities=jnp.exp(state["log_resp"]),
      lower_bound=state["lb"],
      n_iter=state["n_iter"],
      converged=state["converged"],
      n_reused=state["n_reused"])


def _result_log_prob(result: GMMResult, x: jax.Array) -> jax.Array:
  if x.ndim != 2 or x.shape[1] != result.means.shape[-1]:
    raise ValueError(f"x must be [n, {result.means.shape[-1]}], got shape {x.shape}")
  covariance_type = "full" if result.covariances.ndim == 3 else "diag"
  x = jnp.asarray(x, result.means.dtype)
  # Centring at the mixture's mean offset keeps float32 differences small.
  offset = jnp.mean(result.means, axis=0)
  log_gauss = _log_gauss_precision_cholesky(
      x - offset, result.means - offset, result.precisions_cholesky, covariance_type)
  return log_gauss + jnp.log(result.weights)[None, :]


@jax.jit
def score_samples(result: GMMResult, x: jax.Array) -> jax.Array:
  """[n] log-likelihood log sum_k h_k G_k(x_i) of Eq. 8 under the fitted mixture."""
  return jax.nn.logsumexp(_result_log_prob(result, x), axis=1)


@jax.jit
def predict_proba(result: GMMResult, x: jax.Array) -> jax.Array:
  """[n, K] responsibilities r_ik of Eq. 11 for new points."""
  _, log_resp = _e_step(_result_log_prob(result, x), jnp.zeros_like(result.weights))
  return jnp.exp(log_resp)


@jax.jit
def predict(result: GMMResult, x: jax.Array) -> jax.Array:
  """[n] int32 component labels argmax_k r_ik (the UDC pseudo-labels)."""
  return jnp.argmax(_result_log_prob(result, x), axis=1).astype(jnp.int32)
