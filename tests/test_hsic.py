"""HSIC independence loss (BIIGMA-Net Eq. 1-3) against NumPy float64 references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util

from comtriplet_jax import losses
from comtriplet_jax.losses import hsic


# ------------------------------------------------------------ NumPy references
# Written like the authors' code: loops over samples and head pairs, explicit
# N x N x C differences and an explicit centring matrix H.
def np_sq_dist(x):
  x = np.asarray(x, np.float64)
  return np.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1)


def np_median_sigma(x):
  d = np_sq_dist(x)[np.triu_indices(len(x), k=1)]
  d = d[d > 0]
  return 1.0 if d.size == 0 else np.sqrt(np.median(d) / 2.0)


def np_rbf(x, sigma):
  return np.exp(-np_sq_dist(x) / (2.0 * sigma**2))


def np_hsic(k, l, estimator):
  n = len(k)
  if estimator == "unbiased":  # Song et al. (2012)
    kt = k - np.diag(np.diag(k))
    lt = l - np.diag(np.diag(l))
    one = np.ones(n)
    return (np.trace(kt @ lt)
            + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))
  h = np.eye(n) - np.ones((n, n)) / n
  denominator = n**2 if estimator == "biased" else (n - 1) ** 2
  return np.trace(k @ h @ l @ h) / denominator


def np_dependence_matrix(features, sigma=1.0, estimator="biased", measure="hsic",
                         fixed_sigmas=None):
  """[B, K, N, C] -> [B, K, K]; `fixed_sigmas` [B, K] overrides the bandwidths."""
  features = np.asarray(features, np.float64)
  batch, heads = features.shape[:2]
  out = np.zeros((batch, heads, heads))
  for b in range(batch):
    centred = [f - f.mean(axis=0) for f in features[b]]
    if measure == "cosine":
      flat = [c.ravel() for c in centred]
      for i in range(heads):
        for j in range(heads):
          norms = np.linalg.norm(flat[i]) * np.linalg.norm(flat[j])
          out[b, i, j] = 0.0 if norms == 0 else abs(flat[i] @ flat[j]) / norms
      continue
    kernels = []
    for k, c in enumerate(centred):
      if fixed_sigmas is not None:
        s = fixed_sigmas[b, k]
      else:
        s = np_median_sigma(c) if sigma == "median" else sigma
      kernels.append(np_rbf(c, s))
    for i in range(heads):
      for j in range(heads):
        out[b, i, j] = np_hsic(kernels[i], kernels[j], estimator)
  return out


def np_loss(matrix, pairs="ordered"):
  heads = matrix.shape[-1]
  total = []
  for m in matrix:
    if pairs == "ordered":
      total.append(sum(m[i, j] for i in range(heads) for j in range(heads) if i != j)
                   / heads**2)
    else:
      total.append(sum(m[i, j] for i in range(heads) for j in range(i + 1, heads)))
  return np.mean(total)


def dependent_heads(seed, batch=3, heads=3, n=12, c=6, scale=0.4, dtype=np.float32):
  """Heads that depend on each other (linearly and not), at a scale where an RBF
  kernel with sigma = 1 is neither all ones nor the identity."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(batch, n, c))
  out = [base]
  for k in range(1, heads):
    out.append(np.tanh(k * base) + 0.5 * rng.normal(size=(batch, n, c)))
  return (scale * np.stack(out, axis=1)).astype(dtype)


# ---------------------------------------------------------------- kernels
def test_rbf_kernel_matrices_match_numpy_with_sigma_per_set():
  x = dependent_heads(0, batch=2, heads=2)
  sigma = np.array([[0.5, 1.0], [2.0, 4.0]])
  got = jax.jit(functools.partial(losses.rbf_kernel_matrices, sigma=sigma))(x)
  assert got.shape == (2, 2, 12, 12)
  for b in range(2):
    for k in range(2):
      np.testing.assert_allclose(got[b, k], np_rbf(x[b, k], sigma[b, k]), rtol=1e-5,
                                 atol=1e-6)
  np.testing.assert_array_equal(np.diagonal(got, axis1=-2, axis2=-1), 1.0)
  median = jax.jit(functools.partial(losses.rbf_kernel_matrices, sigma="median"))(
      x[0, 0])
  np.testing.assert_allclose(median, np_rbf(x[0, 0], np_median_sigma(x[0, 0])),
                             rtol=1e-5, atol=1e-6)


def test_median_sigma_ignores_coincident_points_and_falls_back_to_one():
  x = np.array([[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.ones((4, 2))])
  # Nonzero squared distances 1, 1, 4, 4, 5: median 4, sigma = sqrt(2); the
  # second set has no nonzero distance.
  got = jax.jit(lambda z: losses.median_sigma(losses.squared_distances(z)))(x)
  np.testing.assert_allclose(got, [np.sqrt(2.0), 1.0], rtol=1e-6)


# ------------------------------------------------------------- dependence
@pytest.mark.parametrize("estimator", ["biased", "biased_n1", "unbiased"])
@pytest.mark.parametrize("sigma", [1.0, "median"])
def test_hsic_matrix_equals_explicit_trace_formula(estimator, sigma):
  x = dependent_heads(1)
  fn = jax.jit(functools.partial(losses.head_dependence_matrix, sigma=sigma,
                                 estimator=estimator))
  got = fn(x)
  expected = np_dependence_matrix(x, sigma, estimator)
  assert got.shape == (3, 3, 3)
  assert np.min(np.abs(expected)) > 1e-4  # a non-trivial reference
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("sigma", [0.5, 2.5])
def test_loss_matches_numpy_and_pair_conventions(sigma):
  x = dependent_heads(2, heads=4)
  matrix = np_dependence_matrix(x, sigma)
  got = {}
  for pairs in ("ordered", "unordered"):
    got[pairs] = jax.jit(functools.partial(losses.hsic_independence_loss, sigma=sigma,
                                           pairs=pairs))(x)
    np.testing.assert_allclose(got[pairs], np_loss(matrix, pairs), rtol=2e-4)
  # The authors' unordered sum is K^2 / 2 times the paper's value.
  np.testing.assert_allclose(got["unordered"], 16 / 2 * got["ordered"], rtol=1e-5)


def test_cosine_measure_matches_numpy():
  x = dependent_heads(3)
  x[1, 2] = 0.0  # a zero head: cosine 0, not NaN
  got = jax.jit(functools.partial(losses.head_dependence_matrix, measure="cosine"))(x)
  np.testing.assert_allclose(got, np_dependence_matrix(x, measure="cosine"),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      jax.jit(functools.partial(losses.hsic_independence_loss, measure="cosine"))(x),
      np_loss(np_dependence_matrix(x, measure="cosine")), rtol=1e-5)


@pytest.mark.parametrize("estimator", ["biased", "biased_n1", "unbiased"])
def test_zero_for_constant_heads(estimator):
  rng = np.random.default_rng(4)
  constant = np.broadcast_to(rng.normal(size=(2, 3, 1, 5)), (2, 3, 10, 5))
  fn = jax.jit(functools.partial(losses.head_dependence_matrix, estimator=estimator))
  # The unbiased estimator cancels terms of order 1: float32 rounding remains.
  atol = 1e-6 if estimator == "unbiased" else 1e-7
  np.testing.assert_allclose(fn(constant.astype(np.float32)), 0.0, atol=atol)
  # One constant head is independent of any other head.
  x = dependent_heads(5, batch=2, n=10, c=5)
  x[:, 1] = constant[:, 1]
  matrix = fn(x)
  np.testing.assert_allclose(matrix[:, 1, :], 0.0, atol=atol)
  assert np.min(np.abs(matrix[:, 0, 2])) > 1e-4


def test_symmetric_and_invariant_to_head_and_position_permutations():
  # In float64, so that only a real asymmetry or dependence on order would show.
  x = dependent_heads(6, heads=4, n=16, dtype=np.float64)
  positions = np.random.default_rng(0).permutation(16)
  heads = np.array([2, 0, 3, 1])
  with jax.enable_x64(True):
    for estimator in ("biased", "unbiased"):
      fn = jax.jit(functools.partial(losses.head_dependence_matrix, sigma="median",
                                     estimator=estimator))
      matrix = np.asarray(fn(x))
      assert matrix.dtype == np.float64
      np.testing.assert_allclose(matrix, np.swapaxes(matrix, 1, 2), rtol=1e-12)
      np.testing.assert_allclose(fn(x[:, :, positions]), matrix, rtol=1e-10)
      np.testing.assert_allclose(fn(x[:, heads]), matrix[:, heads][:, :, heads],
                                 rtol=1e-10)


def test_hsic_sees_dependence_that_cosine_misses():
  # head 2 = head 1 squared: uncorrelated (odd moments of a symmetric variable
  # vanish) but fully dependent. Independent heads give an unbiased HSIC near 0.
  rng = np.random.default_rng(7)
  h1 = rng.normal(size=(4, 49, 4))
  dependent = np.stack([h1, h1**2], axis=1).astype(np.float32)
  independent = np.stack([h1, rng.normal(size=h1.shape)], axis=1).astype(np.float32)
  hsic = jax.jit(functools.partial(losses.hsic_independence_loss,
                                   estimator="unbiased"))
  assert hsic(dependent) > 10 * abs(hsic(independent))
  cosine = jax.jit(functools.partial(losses.hsic_independence_loss, measure="cosine"))
  assert cosine(dependent) < 0.1


def test_mean_normalisation_keeps_float32_accurate_under_large_offsets():
  x = dependent_heads(8)
  shifted = x + np.float32(300.0)  # a common offset, as after a ReLU
  expected = np_loss(np_dependence_matrix(x, 1.0))
  np.testing.assert_allclose(jax.jit(losses.hsic_independence_loss)(shifted),
                             expected, rtol=1e-3)


# ------------------------------------------------------------------ memory
@pytest.mark.parametrize("implementation", ["per_sample", "vmapped", "autodiff"])
def test_chunked_equals_unchunked_values_and_gradients(implementation):
  x = dependent_heads(9, batch=5)
  def run(**kw):
    fn = jax.jit(jax.value_and_grad(functools.partial(
        losses.hsic_independence_loss, implementation=implementation, **kw)))
    return fn(x)
  value, grad = run()
  # 2 does not divide 5; the budget of 2000 bytes allows one sample per chunk.
  for kw in ({"chunk_size": 2}, {"memory_budget_bytes": 2000}):
    chunked_value, chunked_grad = run(**kw)
    np.testing.assert_allclose(chunked_value, value, rtol=1e-6)
    np.testing.assert_allclose(chunked_grad, grad, rtol=1e-5, atol=1e-9)
  # The median bandwidth is per sample, so chunks cannot change it.
  matrix = functools.partial(losses.head_dependence_matrix, sigma="median",
                             implementation=implementation)
  np.testing.assert_allclose(jax.jit(functools.partial(matrix, chunk_size=2))(x),
                             jax.jit(matrix)(x), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("implementation", ["vmapped", "autodiff"])
def test_automatic_chunking_follows_the_memory_budget(implementation):
  x = jnp.zeros((8, 3, 20, 4))
  # One sample's kernels: 3 * 20 * 20 * 4 bytes = 4800; 8 samples = 38400.
  def uses_map(budget):
    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(
        losses.hsic_independence_loss, memory_budget_bytes=budget,
        implementation=implementation)))(x)
    return "scan" in str(jaxpr)
  assert not uses_map(38400)
  assert uses_map(38399)


def test_per_sample_keeps_kernels_for_the_backward_pass_only_within_budget():
  # The per-sample kernel always loops over samples; the budget decides whether
  # the B K N^2 kernels are kept between the passes or recomputed per sample.
  def plan(budget, chunk_size=None):
    return hsic._kernel_plan((8, 3, 20, 4), 4, 1.0, "biased", "highest", chunk_size,
                             budget, "per_sample")
  assert plan(38400).save_kernels and plan(38400).batch_size == 1
  assert not plan(38399).save_kernels and plan(38399).batch_size == 1
  assert not plan(38400, chunk_size=3).save_kernels
  assert plan(38400, chunk_size=3).batch_size == 3
  vmapped = hsic._kernel_plan((8, 3, 20, 4), 4, 1.0, "biased", "highest", None,
                              9600, "vmapped")
  assert vmapped.batch_size == 2 and not vmapped.save_kernels


# --------------------------------------------------------------- gradients
@pytest.mark.parametrize("implementation", ["per_sample", "vmapped", "autodiff"])
@pytest.mark.parametrize("estimator, measure", [
    ("biased", "hsic"), ("unbiased", "hsic"), ("biased_n1", "hsic"),
    ("biased", "cosine")])
def test_gradients_check_grads(estimator, measure, implementation):
  x = dependent_heads(10, batch=2, n=6, c=3, dtype=np.float64)
  # The custom-VJP kernels are reverse mode only; 'autodiff' supports both.
  modes = (("fwd", "rev") if implementation == "autodiff" or measure == "cosine"
           else ("rev",))
  with jax.enable_x64(True):
    fn = jax.jit(functools.partial(losses.hsic_independence_loss, sigma=0.7,
                                   estimator=estimator, measure=measure,
                                   implementation=implementation))
    test_util.check_grads(fn, (jnp.asarray(x),), order=1, modes=modes)


@pytest.mark.parametrize("estimator", ["biased", "biased_n1", "unbiased"])
@pytest.mark.parametrize("sigma", [1.0, "median"])
def test_kernel_implementations_equal_autodiff(estimator, sigma):
  # Random heads with coincident positions (zero distances) and N = 40, which
  # the per-sample kernel splits into Gram blocks; weights on the K x K matrix
  # that are not symmetric, so every pair's cotangent is exercised.
  x = dependent_heads(13, batch=3, n=40, c=7, dtype=np.float64)
  x[1, :, 5] = x[1, :, 9]
  weights = np.random.default_rng(14).normal(size=(3, 3, 3))
  with jax.enable_x64(True):
    def objective(implementation, z):
      matrix = losses.head_dependence_matrix(z, sigma=sigma, estimator=estimator,
                                             implementation=implementation)
      return jnp.sum(matrix * weights)
    expected = jax.jit(jax.value_and_grad(functools.partial(objective, "autodiff")))(x)
    for implementation in ("per_sample", "vmapped"):
      value, grad = jax.jit(jax.value_and_grad(
          functools.partial(objective, implementation)))(x)
      np.testing.assert_allclose(value, expected[0], rtol=1e-10)
      np.testing.assert_allclose(grad, expected[1], rtol=1e-8,
                                 atol=1e-12 * np.max(np.abs(expected[1])))


def test_float32_gradient_stays_accurate_under_large_offsets():
  # Features far from the origin (as after a ReLU): the kernels see only the
  # spread, so the float32 gradient must match the float64 one (measured: 3.2e-5
  # of the largest entry, as the 'autodiff' path, and 9e-7 without the offset).
  x = dependent_heads(15, batch=2, n=30, c=16)
  shifted = x + np.float32(300.0)
  with jax.enable_x64(True):
    expected = jax.grad(functools.partial(
        losses.hsic_independence_loss, implementation="autodiff"))(
            x.astype(np.float64))
  for implementation in ("per_sample", "vmapped"):
    grad = jax.jit(jax.grad(functools.partial(
        losses.hsic_independence_loss, implementation=implementation)))(shifted)
    np.testing.assert_allclose(grad, expected, rtol=0,
                               atol=2e-4 * np.max(np.abs(expected)))


def test_gram_blocks_cover_the_matrix():
  # By hand: one block below 32 rows; otherwise round(n / 64) blocks, at least 2
  # and at most 4, with inner edges on the nearest multiple of 16.
  expected = {2: (0, 2), 31: (0, 31), 32: (0, 16, 32), 49: (0, 32, 49),
              100: (0, 48, 100), 196: (0, 64, 128, 196),
              784: (0, 192, 384, 592, 784)}
  for n, edges in expected.items():
    assert hsic.gram_block_edges(n) == edges, n
  x = np.random.default_rng(16).normal(size=(2, 49, 5))
  with jax.enable_x64(True):
    got = hsic._gram(jnp.asarray(x), hsic.gram_block_edges(49), "highest")
  np.testing.assert_allclose(got, np.einsum("knc,kmc->knm", x, x), rtol=1e-12)


def test_traced_bandwidth_takes_the_autodiff_path():
  x = dependent_heads(17)
  static = jax.value_and_grad(losses.hsic_independence_loss)(x, sigma=0.8)
  traced = jax.jit(jax.value_and_grad(
      lambda z, s: losses.hsic_independence_loss(z, sigma=s)))(x, 0.8)
  np.testing.assert_allclose(traced[0], static[0], rtol=1e-5)
  np.testing.assert_allclose(traced[1], static[1], rtol=1e-4,
                             atol=1e-6 * np.max(np.abs(static[1])))


def test_auto_implementation_follows_the_backend():
  assert hsic.resolve_implementation("auto") == (
      "per_sample" if jax.default_backend() == "cpu" else "vmapped")
  assert hsic.resolve_implementation("autodiff") == "autodiff"


def test_median_gradient_holds_the_bandwidth_fixed():
  x = dependent_heads(11, batch=2, n=6, c=3, dtype=np.float64)
  sigmas = np.array([[np_median_sigma(h - h.mean(0)) for h in sample] for sample in x])
  with jax.enable_x64(True):
    grad = jax.jit(jax.grad(functools.partial(losses.hsic_independence_loss,
                                              sigma="median")))(x)
  def fixed(z):
    return np_loss(np_dependence_matrix(z, fixed_sigmas=sigmas))
  expected = np.zeros_like(x)
  h = 1e-6
  for idx in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[idx] = h
    expected[idx] = (fixed(x + step) - fixed(x - step)) / (2 * h)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-9)


def test_jit_and_vmap_agree():
  groups = np.stack([dependent_heads(20 + i, batch=2) for i in range(3)])
  fn = functools.partial(losses.hsic_independence_loss, sigma="median")
  separate = [np_loss(np_dependence_matrix(g, "median")) for g in groups]
  np.testing.assert_allclose(jax.jit(jax.vmap(fn))(groups), separate, rtol=2e-4)
  np.testing.assert_allclose([jax.jit(fn)(g) for g in groups], separate, rtol=2e-4)


# -------------------------------------------------------------- l2 and errors
def test_head_weight_l2():
  rng = np.random.default_rng(12)
  kernels = [rng.normal(size=(1, 1, 8, 4)).astype(np.float32) for _ in range(3)]
  total = sum(np.sum(np.asarray(k, np.float64) ** 2) for k in kernels)
  assert losses.head_weight_l2(kernels) == pytest.approx(total, rel=1e-5)
  assert losses.head_weight_l2(kernels, l2_weight=0.5, squared=False) == pytest.approx(
      0.5 * np.sqrt(total), rel=1e-5)
  grad = jax.grad(lambda ks: losses.head_weight_l2(ks, squared=False))(
      [jnp.zeros((2, 2))])
  np.testing.assert_array_equal(grad[0], 0.0)
  with pytest.raises(ValueError, match="at least one"):
    losses.head_weight_l2([])


@pytest.mark.parametrize("kwargs, shape, message", [
    ({}, (3, 12, 6), r"\[B, K, N, C\]"),
    ({"estimator": "unbiased"}, (2, 3, 3, 6), "N >= 4"),
    ({"estimator": "mmd"}, (2, 3, 12, 6), "estimator"),
    ({"measure": "l1"}, (2, 3, 12, 6), "measure"),
    ({"pairs": "all"}, (2, 3, 12, 6), "pairs"),
    ({"sigma": 0.0}, (2, 3, 12, 6), "sigma"),
    ({"sigma": "mean"}, (2, 3, 12, 6), "sigma"),
    ({"chunk_size": 0}, (2, 3, 12, 6), "chunk_size"),
    ({"memory_budget_bytes": 0}, (2, 3, 12, 6), "memory_budget_bytes"),
    ({"implementation": "fast"}, (2, 3, 12, 6), "implementation"),
])
def test_errors_name_the_problem(kwargs, shape, message):
  with pytest.raises(ValueError, match=message):
    losses.hsic_independence_loss(jnp.zeros(shape), **kwargs)
