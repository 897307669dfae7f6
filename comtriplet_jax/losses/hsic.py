"""HSIC independence loss between attention heads, BIIGMA-Net Eq. 1-3.

For one sample and one head k, r^k is the N x C matrix of its feature vectors
(N = H W positions, C channels). Per sample and head:

1. Mean-normalise over positions: r^k <- r^k - mean_j r^k_j (per channel). The
   RBF kernel depends only on differences of rows, so in exact arithmetic this
   changes nothing; in float32 it removes the common offset before the Gram
   matrix, so the squared distances |x|^2 + |y|^2 - 2 <x, y> lose far fewer
   digits to cancellation. For the kernel the code subtracts the first
   position's vector r^k_0 instead of the mean: the same kernel exactly, the same
   offset removed up to one spread, and cheaper (see :func:`squared_distances`). The
   cosine measure, which is not translation-invariant, subtracts the true mean,
   as the paper's "mean-normalized features" intend.
2. RBF kernel K^k = exp(-|r_i - r_j|^2 / (2 sigma^2)), the N x N squared distances
   from one Gram matrix (never an N x N x C tensor).
3. Centre by subtracting row and column means and adding the grand mean:
   Kc = H K H with H = I - 11^T / N, without forming H.
4. HSIC(k1, k2) = Tr(K^k1 H K^k2 H) / N^2 = sum(Kc^k1 * Kc^k2) / N^2 (Eq. 2), the
   elementwise sum. Every head's kernel is computed once and all K x K pairs
   come from one einsum over the flattened kernels; samples are vmapped or
   mapped (see "Implementations").

L_indep = (1/K^2) sum_{k1 != k2} HSIC(k1, k2) (Eq. 3, ordered pairs, so every pair
counts twice), averaged over the batch. The authors' code instead sums the
unordered pairs i < j without the 1/K^2: ``pairs='unordered'`` gives that, which
is K^2 / 2 times the paper's value (4.5 for K = 3). The lambda l2 term of Eq. 3 is
:func:`head_weight_l2`, added by the caller.

Estimators: 'biased' (1/N^2, the paper and the authors' code), 'biased_n1'
(1/(N-1)^2, Gretton et al. 2005) and 'unbiased' (Song et al. 2012), which can be
negative.

Implementations (``implementation=``), equal to round-off:

* 'per_sample' (the default on CPUs): a custom-VJP kernel run by ``lax.map``
  one sample at a time. XLA:CPU runs a vmapped [B K, N, C] x [B K, C, N] product
  at about half the speed of the same products one sample at a time (measured:
  111 vs 77 ms for B = 32, K = 3, N = 196, C = 1024 on one thread). The Gram
  matrix of each head is built from the blocks on and above its diagonal
  (:func:`gram_block_edges`: 2/3 of the FLOPs at N = 196).
* 'vmapped' (the default on GPUs and TPUs): the same custom-VJP kernel vmapped
  over the batch, one full Gram product per head.
* 'autodiff': the plain composition of the steps above, vmapped and
  differentiated by JAX. The only one that supports forward-mode
  differentiation (``jax.jvp``, ``jax.hessian``); the custom-VJP kernels are
  reverse mode only, like the training step.

The custom VJP: with D(a, b) = <K~_a, T(K~_b)> for a self-adjoint linear T (the
centring, or the unbiased estimator's transform) and cotangent C, the gradient
with respect to head a's kernel is sum_b (C_ab + C_ba) T(K~_b): T is
self-adjoint, so it needs no differentiation of its own. Through the exp and
the squared distances the gradient with respect to the features is one product
(Q - diag(Q 1)) x per head, with Q = (2 / sigma^2) K * (that sum). The backward
pass reuses the forward kernels and costs one [N, N] x [N, C] product per head
instead of JAX's differentiation of each step (measured at the size above, loss
and gradient: 183 ms against 313 ms before).

Memory: a batch holds B K N^2 kernel entries. When that exceeds
``memory_budget_bytes``, or ``chunk_size`` is set, samples are processed in chunks
with ``lax.map`` and each chunk is rematerialised in the backward pass
(the custom-VJP kernels recompute the chunk's kernels; 'autodiff' uses
``jax.checkpoint``), so neither the forward nor the gradient ever holds more
than one chunk's kernels; the values are those of the unchunked computation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from comtriplet_jax.losses import distances

ESTIMATORS = ("biased", "biased_n1", "unbiased")
MEASURES = ("hsic", "cosine")
PAIRS = ("ordered", "unordered")
IMPLEMENTATIONS = ("auto", "per_sample", "vmapped", "autodiff")
# The default cap on B K N^2 kernel entries held at once (in bytes of their dtype).
DEFAULT_MEMORY_BUDGET_BYTES = 128 * 2**20


def _check_sigma(sigma) -> None:
  if isinstance(sigma, str):
    if sigma != "median":
      raise ValueError(f"sigma must be a positive number or 'median', got {sigma!r}")
  elif isinstance(sigma, (int, float)) and not (math.isfinite(sigma) and sigma > 0):
    raise ValueError(f"sigma must be a finite number > 0, got {sigma}")


def squared_distances(x: jax.Array, *, precision="highest") -> jax.Array:
  """All squared Euclidean distances between rows, from one Gram matrix.

  The rows are first shifted by the first row (distances do not change), which
  removes their common offset, so that |x|^2 + |y|^2 - 2 <x, y> does not cancel
  away the digits of a small spread around a large mean in float32. A slice
  rather than the mean: XLA:CPU fuses a mean reduction into the Gram matmul,
  which then runs ~4x slower.

  Args:
    x: [..., N, C] sets of N vectors.
    precision: matmul precision of the Gram matrix ('highest' keeps GPUs off
      TF32, whose 10-bit mantissa would swamp the distances).

  Returns:
    [..., N, N] with entry (i, j) = |x_i - x_j|^2 >= 0, exactly 0 on the diagonal.
  """
  return _gram_distances(x - x[..., :1, :], precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _gram_distances(x: jax.Array, precision) -> jax.Array:
  gram = jnp.einsum("...nc,...mc->...nm", x, x, precision=precision)
  # Norms from the Gram diagonal, not recomputed, so that d(x, x) is exactly 0
  # and coincident rows are exactly 0 apart.
  norms = jnp.diagonal(gram, axis1=-2, axis2=-1)
  return jnp.maximum(norms[..., :, None] + norms[..., None, :] - 2.0 * gram, 0.0)


@_gram_distances.defjvp
def _gram_distances_jvp(precision, primals, tangents):
  # Differentiating the einsum of x with itself would give two matmuls in the
  # backward pass (one per operand). Written with the single product P = x dx^T,
  # dD_ij = 2 (x_i.dx_i + x_j.dx_j) - 2 (P_ij + P_ji), whose transpose is one
  # matmul (W + W^T) x: the gradient costs one Gram matrix instead of two.
  (x,), (dx,) = primals, tangents
  dist = _gram_distances(x, precision)
  product = jnp.einsum("...nc,...mc->...nm", x, dx, precision=precision)
  dnorms = 2.0 * jnp.sum(x * dx, axis=-1)
  ddist = (dnorms[..., :, None] + dnorms[..., None, :]
           - 2.0 * (product + jnp.swapaxes(product, -1, -2)))
  # Zero where the distance is 0 (coincident points: a minimum) or was clamped.
  return dist, jnp.where(dist > 0, ddist, 0.0)


def median_sigma(sq_dist: jax.Array) -> jax.Array:
  """Median heuristic bandwidth: sqrt(median of the nonzero squared distances / 2).

  Then 2 sigma^2 is the median squared distance: the kernel is exp(-1) at the
  median pair. The median is taken over the pairs i < j with a nonzero distance
  (coincident points do not shrink it); when every pair coincides the kernel is
  all ones whatever sigma is, and sigma = 1 is returned. The bandwidth is a
  statistic of the data, not something to train: it sits under
  ``stop_gradient``, so the loss is differentiated at a fixed kernel.

  Args:
    sq_dist: [..., N, N] squared distances (symmetric).

  Returns:
    [...] bandwidths.
  """
  n = sq_dist.shape[-1]
  rows, cols = jnp.triu_indices(n, k=1)
  upper = jax.lax.stop_gradient(sq_dist)[..., rows, cols]
  nonzero = upper > 0
  count = jnp.sum(nonzero, axis=-1)
  # The median of m values is the mean of the order statistics (m-1)//2 and m//2.
  ranks = jnp.stack([jnp.maximum((count - 1) // 2, 0), count // 2], axis=-1)
  middle = _order_statistics(jnp.where(nonzero, upper, jnp.inf), ranks)
  median = 0.5 * (middle[..., 0] + middle[..., 1])
  return jnp.where(count > 0, jnp.sqrt(median / 2.0), 1.0)


def _order_statistics(values: jax.Array, ranks: jax.Array) -> jax.Array:
  """Exact k-th smallest values of non-negative floats, by bisection on their bits.

  For non-negative IEEE floats the integer bit patterns are ordered like the
  values, so the k-th smallest value is the smallest bit pattern t with
  #{bits <= t} >= k + 1: a bisection over [0, bits(inf)] that takes one counting
  pass per bit (32 for float32). On XLA:CPU this is ~8x faster than sorting the
  N(N-1)/2 distances, and it gives exactly the sorted entries.

  Args:
    values: [..., M] non-negative floats (+inf allowed).
    ranks: [..., R] integer ranks in [0, M).

  Returns:
    [..., R] the values of those ranks.
  """
  int_type = {4: jnp.int32, 8: jnp.int64}[values.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(values, int_type)
  infinity = jax.lax.bitcast_convert_type(jnp.array(jnp.inf, values.dtype), int_type)
  ranks = ranks.astype(int_type)

  def halve(_, bounds):
    low, high = bounds
    middle = low + (high - low) // 2
    enough = jnp.sum(bits[..., None, :] <= middle[..., None], axis=-1) > ranks
    return jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high)

  low, _ = jax.lax.fori_loop(
      0, 8 * values.dtype.itemsize, halve,
      (jnp.zeros(ranks.shape, int_type), jnp.full(ranks.shape, infinity)))
  return jax.lax.bitcast_convert_type(low, values.dtype)


def rbf_kernel_matrices(x: jax.Array, *, sigma: float | jax.Array | str,
                        precision="highest") -> jax.Array:
  """RBF kernel matrices exp(-|x_i - x_j|^2 / (2 sigma^2)) of sets of vectors.

  Args:
    x: [..., N, C] sets of N vectors (for BIIGMA-Net [B, K, N, C]).
    sigma: bandwidth > 0, a number or an array broadcastable to the leading
      axes [...], or 'median' for :func:`median_sigma` per set.
    precision: matmul precision of the Gram matrix.

  Returns:
    [..., N, N] symmetric kernel matrices with ones on the diagonal.
  """
  _check_sigma(sigma)
  x = jnp.asarray(x)
  if x.ndim < 2 or x.shape[-2] == 0 or x.shape[-1] == 0:
    raise ValueError(f"x must be [..., N, C] with N, C >= 1, got shape {x.shape}")
  x = x.astype(jnp.result_type(x.dtype, jnp.float32))
  sq_dist = squared_distances(x, precision=precision)
  if isinstance(sigma, str):
    sigma = median_sigma(sq_dist)
  sigma = jnp.asarray(sigma, x.dtype)
  return jnp.exp(-sq_dist / (2.0 * jnp.square(sigma)[..., None, None]))


def _centre(kernel: jax.Array) -> jax.Array:
  """H K H for symmetric K [..., N, N]: minus row and column means, plus grand mean."""
  means = jnp.mean(kernel, axis=-1)
  grand = jnp.mean(means, axis=-1)
  return (kernel - means[..., :, None] - means[..., None, :]
          + grand[..., None, None])


def _pair_sums(a: jax.Array, b: jax.Array, precision) -> jax.Array:
  """sum(a[k1] * b[k2]) for all head pairs: [K, N, N] x [K, N, N] -> [K, K]."""
  return jnp.einsum("anm,bnm->ab", a, b, precision=precision)


def _sample_hsic(kernels: jax.Array, estimator: str, precision) -> jax.Array:
  """HSIC of every head pair of one sample: [K, N, N] kernels -> [K, K]."""
  n = kernels.shape[-1]
  if estimator == "unbiased":
    # Song et al. (2012), the unbiased estimator: with K~ the kernel with a zero
    # diagonal,
    # [Tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)).
    tilde = kernels * (1.0 - jnp.eye(n, dtype=kernels.dtype))
    row_sums = jnp.sum(tilde, axis=-1)                     # [K, N]: K~ 1
    totals = jnp.sum(row_sums, axis=-1)                    # [K]: 1'K~1
    trace_term = _pair_sums(tilde, tilde, precision)      # Tr(K~ L~), symmetric
    cross = jnp.einsum("an,bn->ab", row_sums, row_sums, precision=precision)
    return (trace_term + jnp.outer(totals, totals) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * cross) / (n * (n - 3))
  centred = _centre(kernels)
  denominator = n * n if estimator == "biased" else (n - 1) * (n - 1)
  return _pair_sums(centred, centred, precision) / denominator


def _sample_dependence(features: jax.Array, sigma, estimator: str, measure: str,
                       precision) -> jax.Array:
  """Dependence of every head pair of one sample: [K, N, C] -> [K, K]."""
  if measure == "cosine":
    features = features - jnp.mean(features, axis=-2, keepdims=True)
    unit = distances.unit_vectors(features.reshape(features.shape[0], -1))
    return jnp.abs(jnp.einsum("ai,bi->ab", unit, unit, precision=precision))
  # Mean-normalisation (step 1) happens inside: distances ignore translation.
  sq_dist = squared_distances(features, precision=precision)
  bandwidth = median_sigma(sq_dist) if isinstance(sigma, str) else jnp.full(
      features.shape[:1], sigma, features.dtype)
  kernels = jnp.exp(-sq_dist / (2.0 * jnp.square(bandwidth)[:, None, None]))
  return _sample_hsic(kernels, estimator, precision)


# ------------------------------------------------------ the custom-VJP kernel
def gram_block_edges(n: int) -> tuple[int, ...]:
  """Edges of the row blocks in which the 'per_sample' kernel builds a Gram matrix.

  The Gram matrix x x^T is symmetric, so only the blocks on and above the
  diagonal are multiplied, and the rest are their transposes: with b blocks,
  (b + 1) / (2 b) of the matrix product's FLOPs (3 blocks: 2/3). Blocks of
  about 64 rows with edges on multiples of 16 keep each product at full speed
  on XLA:CPU (measured at N = 196, C = 1024: edges (0, 64, 128, 196) 59 ms,
  (0, 65, 131, 196) 62 ms, one block 77 ms, for 96 Gram matrices).

  Args:
    n: rows (positions N).

  Returns:
    Increasing edges from 0 to n; (0, n) below 32 rows.
  """
  if n < 32:
    return (0, n)
  blocks = min(4, max(2, round(n / 64)))
  inner = sorted({16 * round(i * n / (16 * blocks)) for i in range(1, blocks)})
  return (0, *[e for e in inner if 0 < e < n], n)


def _gram(x: jax.Array, edges: tuple[int, ...], precision) -> jax.Array:
  """[K, N, C] -> [K, N, N] x x^T, from the blocks on and above the diagonal."""
  if len(edges) == 2:
    return jnp.einsum("knc,kmc->knm", x, x, precision=precision)
  parts = [x[:, a:b] for a, b in zip(edges[:-1], edges[1:])]
  rows: list[list[Any]] = [[None] * len(parts) for _ in parts]
  for i, part in enumerate(parts):
    for j in range(i, len(parts)):
      rows[i][j] = jnp.einsum("knc,kmc->knm", part, parts[j], precision=precision)
      if j > i:
        rows[j][i] = jnp.swapaxes(rows[i][j], -1, -2)
  return jnp.concatenate([jnp.concatenate(row, axis=-1) for row in rows], axis=-2)


def _pair_operator(kernels: jax.Array, estimator: str) -> tuple[jax.Array, jax.Array]:
  """(K~, T(K~)) with D(a, b) = <K~_a, T(K~_b)> for every head pair.

  T is self-adjoint and linear, so the gradient of D(a, b) with respect to K~_a
  is T(K~_b). 'biased' / 'biased_n1': K~ = K and T(K) = H K H / N^2 (or
  (N-1)^2), since <K_a, H K_b H> = <H K_a H, H K_b H>. 'unbiased': K~ is K with
  a zero diagonal and T(K~) = [K~ + 1'K~1 / ((n-1)(n-2)) - (K~1 1' + 1 1'K~) /
  (n-2)] / (n(n-3)), which expands to Song et al.'s estimator.
  """
  n = kernels.shape[-1]
  if estimator == "unbiased":
    tilde = jnp.where(jnp.eye(n, dtype=bool), 0.0, kernels)
    rows = jnp.sum(tilde, axis=-1)
    total = jnp.sum(rows, axis=-1)
    transformed = (tilde + (total / ((n - 1) * (n - 2)))[:, None, None]
                   - (rows[:, :, None] + rows[:, None, :]) / (n - 2)) / (n * (n - 3))
    return tilde, transformed
  denominator = n * n if estimator == "biased" else (n - 1) * (n - 1)
  return kernels, _centre(kernels) / denominator


@dataclasses.dataclass(frozen=True)
class _KernelPlan:
  """Static choices of the custom-VJP kernel (hashable: a nondiff argument)."""
  sigma: float | str
  estimator: str
  precision: Any
  edges: tuple[int, ...]       # Gram row blocks (see gram_block_edges)
  batch_size: int | None       # samples per lax.map step; None: vmap the batch
  save_kernels: bool           # keep the B K N^2 kernels for the backward pass


def _sample_forward(plan: _KernelPlan, x: jax.Array, x0: jax.Array):
  """One sample: [K, N, C] features, [K, C] shift -> ([K, K], kernels, 1/(2 sigma^2))."""
  shifted = x - x0[:, None, :]
  gram = _gram(shifted, plan.edges, plan.precision)
  norms = jnp.diagonal(gram, axis1=-2, axis2=-1)
  sq_dist = jnp.maximum(norms[:, :, None] + norms[:, None, :] - 2.0 * gram, 0.0)
  sigma = (median_sigma(sq_dist) if isinstance(plan.sigma, str)
           else jnp.full(x.shape[:1], plan.sigma, x.dtype))
  coef = 0.5 / jnp.square(sigma)
  kernels = jnp.exp(-coef[:, None, None] * sq_dist)
  tilde, transformed = _pair_operator(kernels, plan.estimator)
  heads = x.shape[0]
  # <K~_a, T(K~_b)> for all pairs as one product, symmetrised against rounding.
  pairs = jnp.einsum("ai,bi->ab", tilde.reshape(heads, -1),
                     transformed.reshape(heads, -1), precision=plan.precision)
  return 0.5 * (pairs + pairs.T), kernels, coef


def _sample_backward(plan: _KernelPlan, x, x0, kernels, coef, cotangent):
  """d sum(cotangent * D) / d x for one sample, given its kernels.

  With W = C + C^T, d/dK_a = A_a = sum_b W_ab T(K~_b); through K = exp(-c D)
  and D_ij = |x_i - x_j|^2 this is dx = (Q - diag(Q 1)) x with
  Q = 4 c K * A off the diagonal: one [N, N] x [N, C] product per head. Q is 0
  where K = 1 (coincident points, where the distance has no gradient).
  """
  _, transformed = _pair_operator(kernels, plan.estimator)
  weights = cotangent + cotangent.T
  adjoint = jnp.einsum("ab,bnm->anm", weights, transformed, precision=plan.precision)
  q = jnp.where(kernels < 1.0, 4.0 * coef[:, None, None] * kernels * adjoint, 0.0)
  n = kernels.shape[-1]
  laplacian = jnp.where(jnp.eye(n, dtype=bool), -jnp.sum(q, axis=-1)[:, :, None], q)
  # Rows of the Laplacian sum to 0, so the shift changes nothing but rounding.
  return jnp.einsum("knm,kmc->knc", laplacian, x - x0[:, None, :],
                    precision=plan.precision)


def _over_samples(plan: _KernelPlan, fn, *args):
  if plan.batch_size is None:
    return jax.vmap(fn)(*args)
  step = lambda a: fn(*a)
  if plan.batch_size == 1:
    return jax.lax.map(step, args)
  return jax.lax.map(step, args, batch_size=plan.batch_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _kernel_dependence(features: jax.Array, plan: _KernelPlan) -> jax.Array:
  return _kernel_dependence_fwd(features, plan)[0]


def _kernel_dependence_fwd(features, plan):
  forward = functools.partial(_sample_forward, plan)
  if plan.save_kernels:
    pairs, kernels, coef = _over_samples(plan, forward, features, features[:, :, 0])
    return pairs, (features, kernels, coef)
  pairs = _over_samples(plan, lambda x, x0: forward(x, x0)[0], features,
                        features[:, :, 0])
  return pairs, (features, None, None)


def _kernel_dependence_bwd(plan, residuals, cotangent):
  features, kernels, coef = residuals
  backward = functools.partial(_sample_backward, plan)
  if plan.save_kernels:
    grad = _over_samples(plan, backward, features, features[:, :, 0], kernels, coef,
                         cotangent)
  else:
    # Rematerialised per chunk: only one chunk's kernels exist at a time.
    def recompute(x, x0, ct):
      _, kern, c = _sample_forward(plan, x, x0)
      return backward(x, x0, kern, c, ct)
    grad = _over_samples(plan, recompute, features, features[:, :, 0], cotangent)
  return (grad,)


_kernel_dependence.defvjp(_kernel_dependence_fwd, _kernel_dependence_bwd)


def resolve_implementation(implementation: str = "auto") -> str:
  """'auto' -> 'per_sample' on a CPU backend, 'vmapped' on GPUs and TPUs."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if implementation != "auto":
    return implementation
  return "per_sample" if jax.default_backend() == "cpu" else "vmapped"


def _check_options(head_features, sigma, estimator, measure, chunk_size,
                   memory_budget_bytes):
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  if measure not in MEASURES:
    raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
  _check_sigma(sigma)
  head_features = jnp.asarray(head_features)
  if head_features.ndim != 4 or 0 in head_features.shape:
    raise ValueError(f"head_features must be [B, K, N, C] with no empty axis, got "
                     f"shape {head_features.shape}")
  n = head_features.shape[2]
  least = {"biased": 2, "biased_n1": 2, "unbiased": 4}[estimator]
  if measure == "hsic" and n < least:
    raise ValueError(f"the {estimator!r} HSIC estimator needs N >= {least} "
                     f"positions, got N = {n}")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  if memory_budget_bytes <= 0:
    raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
  return head_features.astype(jnp.result_type(head_features.dtype, jnp.float32))


def _static_sigma(sigma) -> float | str | None:
  """The bandwidth as a Python number or 'median'; None when it is traced."""
  if isinstance(sigma, str):
    return sigma
  try:
    return float(sigma)
  except jax.errors.ConcretizationTypeError:
    return None


def _kernel_plan(shape, itemsize, sigma, estimator, precision, chunk_size,
                 memory_budget_bytes, implementation) -> _KernelPlan:
  """How the custom-VJP kernel loops, blocks and stores, from sizes and budget."""
  batch, heads, n, _ = shape
  per_sample_bytes = heads * n * n * itemsize
  fits = batch * per_sample_bytes <= memory_budget_bytes
  if implementation == "per_sample":
    batch_size = 1 if chunk_size is None else min(chunk_size, batch)
    save = chunk_size is None and fits
    edges = gram_block_edges(n)
  else:
    if chunk_size is None:
      batch_size = None if fits else max(1, memory_budget_bytes // per_sample_bytes)
    else:
      batch_size = None if chunk_size >= batch else chunk_size
    save = batch_size is None and fits
    edges = (0, n)
  return _KernelPlan(sigma=sigma, estimator=estimator, precision=precision,
                     edges=edges, batch_size=batch_size, save_kernels=save)


def head_dependence_matrix(head_features: jax.Array, *,
                           sigma: float | str = 1.0,
                           estimator: str = "biased",
                           measure: str = "hsic",
                           chunk_size: int | None = None,
                           memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                           precision="highest",
                           implementation: str = "auto") -> jax.Array:
  """Dependence between every pair of heads, per sample (HSIC, Eq. 2, or cosine).

  measure='hsic': entry (b, k1, k2) = HSIC(r^k1_b, r^k2_b) of the module docstring.
  measure='cosine' (the paper's ablation, Table 2): each head's mean-normalised
  N x C matrix is flattened to one vector v^k of N C numbers, and the entry is
  |<v^k1, v^k2>| / (|v^k1| |v^k2|), the absolute cosine similarity (0 when
  either is zero): the normalised version of the linear covariance of Eq. 1,
  summed over positions and channels. ``sigma`` and ``estimator`` are unused.

  Args:
    head_features: [B, K, N, C] head outputs r^k (B samples, K heads, N = H W
      positions, C channels); bf16/f16 are computed in float32.
    sigma: RBF bandwidth > 0 (paper: 0.5, 1, 2, 4; authors' code: 2.5) or
      'median' (per sample and head, see :func:`median_sigma`).
    estimator: 'biased' (1/N^2), 'biased_n1' (1/(N-1)^2) or 'unbiased'.
    measure: 'hsic' or 'cosine'.
    chunk_size: samples per chunk; None chooses chunks only when B K N^2 entries
      exceed ``memory_budget_bytes``.
    memory_budget_bytes: the cap for the automatic choice.
    precision: matmul precision (see :func:`squared_distances`).
    implementation: 'auto', 'per_sample', 'vmapped' or 'autodiff' (module
      docstring, "Implementations"); the cosine measure has one.

  Returns:
    [B, K, K], symmetric (the diagonal holds each head's dependence on itself).
  """
  head_features = _check_options(head_features, sigma, estimator, measure,
                                 chunk_size, memory_budget_bytes)
  implementation = resolve_implementation(implementation)   # checks it
  static_sigma = _static_sigma(sigma)
  if measure == "hsic" and implementation != "autodiff" and static_sigma is not None:
    plan = _kernel_plan(head_features.shape, head_features.dtype.itemsize,
                        static_sigma, estimator, precision, chunk_size,
                        memory_budget_bytes, implementation)
    return _kernel_dependence(head_features, plan)
  # The cosine measure, 'autodiff', and a traced sigma (the kernels take the
  # bandwidth as a static setting; JAX differentiates this path through it).

  batch, heads, n, _ = head_features.shape

  def per_sample(features):
    return _sample_dependence(features, sigma, estimator, measure, precision)

  if chunk_size is None:
    per_sample_bytes = heads * n * n * head_features.dtype.itemsize
    if batch * per_sample_bytes > memory_budget_bytes:
      chunk_size = max(1, memory_budget_bytes // per_sample_bytes)
  if chunk_size is None or chunk_size >= batch:
    return jax.vmap(per_sample)(head_features)
  # Rematerialised per chunk, so the backward pass keeps only the chunk inputs.
  return jax.lax.map(jax.checkpoint(per_sample), head_features,
                     batch_size=chunk_size)


def hsic_independence_loss(head_features: jax.Array, *,
                           sigma: float | str = 1.0,
                           estimator: str = "biased",
                           measure: str = "hsic",
                           pairs: str = "ordered",
                           chunk_size: int | None = None,
                           memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                           precision="highest",
                           implementation: str = "auto") -> jax.Array:
  """The independence term of L_indep, Eq. 3, without the l2 term.

  pairs='ordered' (the paper): (1/K^2) sum_{k1 != k2} D(k1, k2), batch mean.
  pairs='unordered' (the authors' code): sum_{k1 < k2} D(k1, k2), batch mean;
  K^2 / 2 times the ordered value. D is :func:`head_dependence_matrix`.

  Args:
    head_features: [B, K, N, C] head outputs (see :func:`head_dependence_matrix`).
    sigma: RBF bandwidth > 0 or 'median'.
    estimator: 'biased', 'biased_n1' or 'unbiased'.
    measure: 'hsic' or 'cosine'.
    pairs: 'ordered' or 'unordered'.
    chunk_size: samples per chunk (None: automatic from ``memory_budget_bytes``).
    memory_budget_bytes: cap on B K N^2 kernel entries held at once.
    precision: matmul precision.
    implementation: 'auto', 'per_sample', 'vmapped' or 'autodiff'.

  Returns:
    A scalar (float32 unless the features are float64).
  """
  if pairs not in PAIRS:
    raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
  matrix = head_dependence_matrix(
      head_features, sigma=sigma, estimator=estimator, measure=measure,
      chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes,
      precision=precision, implementation=implementation)
  heads = matrix.shape[-1]
  if pairs == "ordered":
    off_diagonal = 1.0 - jnp.eye(heads, dtype=matrix.dtype)
    per_sample = jnp.sum(matrix * off_diagonal, axis=(-2, -1)) / heads**2
  else:
    upper = jnp.triu(jnp.ones((heads, heads), matrix.dtype), k=1)
    per_sample = jnp.sum(matrix * upper, axis=(-2, -1))
  return jnp.mean(per_sample)


def head_weight_l2(kernels: Any, *, l2_weight: float = 1.0,
                   squared: bool = True) -> jax.Array:
  """The lambda l2 term of Eq. 3 on the projection heads' weights.

  Args:
    kernels: a sequence (or any pytree) of the heads' weight arrays, e.g. the
      1x1 convolution kernels of the K MICA heads.
    l2_weight: lambda (1 in the paper).
    squared: True gives lambda sum ||W||^2, the usual L2 regularisation (Keras'
      ``regularizers.L2``, weight decay); False gives lambda sqrt(sum ||W||^2),
      the L2 norm of all head weights taken as one vector (gradient 0, not NaN,
      when every weight is 0).

  Returns:
    A scalar.
  """
  leaves = jax.tree.leaves(kernels)
  if not leaves:
    raise ValueError("head_weight_l2 needs at least one weight array")
  total = sum(jnp.sum(jnp.square(jnp.asarray(w).astype(
      jnp.result_type(jnp.asarray(w).dtype, jnp.float32)))) for w in leaves)
  if squared:
    return l2_weight * total
  positive = total > 0
  return l2_weight * jnp.where(positive, jnp.sqrt(jnp.where(positive, total, 1.0)),
                               0.0)
