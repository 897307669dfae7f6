"""One-matrix-at-a-time LAPACK wrappers: same values, no batched CPU kernels, no hang."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comtriplet_jax.clustering import gmm
from comtriplet_jax.clustering import serial_linalg

# Batch shapes: none, unrolled (<= 8 matrices), lax.map (> 8).
BATCHES = [(), (3,), (2, 6)]


def _spd(rng, batch, d):
  a = rng.normal(size=batch + (d, 2 * d))
  return a @ np.swapaxes(a, -1, -2) / (2 * d) + np.eye(d)


def _upper(rng, batch, d):
  return np.triu(rng.normal(size=batch + (d, d))) + 3.0 * np.eye(d)


@pytest.mark.parametrize("batch", BATCHES)
def test_cholesky_equals_numpy(batch):
  a = _spd(np.random.default_rng(0), batch, 7)
  got = jax.jit(serial_linalg.cholesky)(jnp.asarray(a, jnp.float32))
  np.testing.assert_allclose(got, np.linalg.cholesky(a), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("left_side,lower,transpose_a", [
    (True, False, False), (False, False, False), (True, True, True), (False, True, False)])
def test_triangular_solve_equals_numpy(batch, left_side, lower, transpose_a):
  rng = np.random.default_rng(1)
  t = _upper(rng, batch, 6)
  if lower:
    t = np.swapaxes(t, -1, -2)
  b = rng.normal(size=batch + ((6, 4) if left_side else (4, 6)))
  op = np.swapaxes(t, -1, -2) if transpose_a else t
  # left: op(t) x = b; right: x op(t) = b.
  expected = (np.linalg.solve(op, b) if left_side
              else np.swapaxes(np.linalg.solve(np.swapaxes(op, -1, -2),
                                               np.swapaxes(b, -1, -2)), -1, -2))
  got = serial_linalg.triangular_solve(
      jnp.asarray(t, jnp.float32), jnp.asarray(b, jnp.float32), left_side=left_side,
      lower=lower, transpose_a=transpose_a)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", BATCHES)
def test_qr_r_equals_numpy_up_to_row_signs(batch):
  a = np.random.default_rng(2).normal(size=batch + (9, 5))
  got = np.asarray(serial_linalg.qr_r(jnp.asarray(a, jnp.float32)))
  expected = np.linalg.qr(a, mode="r")
  assert got.shape == expected.shape == batch + (5, 5)
  np.testing.assert_allclose(np.abs(got), np.abs(expected), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.tril(got, -1), 0.0, atol=0)


@pytest.mark.parametrize("batch", BATCHES)
def test_qr_complete_is_a_complete_qr(batch):
  a = np.random.default_rng(5).normal(size=batch + (9, 5))
  q, r = map(np.asarray, serial_linalg.qr_complete(jnp.asarray(a, jnp.float32)))
  assert q.shape == batch + (9, 9) and r.shape == batch + (9, 5)
  np.testing.assert_allclose(q @ r, a, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.swapaxes(q, -1, -2) @ q, np.broadcast_to(np.eye(9), q.shape),
                             atol=1e-5)
  np.testing.assert_allclose(np.abs(r[..., :5, :]), np.abs(np.linalg.qr(a, mode="r")),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.tril(r, -1), 0.0, atol=0)
  vmapped = jax.jit(jax.vmap(serial_linalg.qr_complete))(jnp.asarray(a.reshape((-1, 9, 5)),
                                                                     jnp.float32))
  np.testing.assert_allclose(vmapped[0].reshape(q.shape), q, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not serial_linalg.reflectors_available(),
                    reason="geqrf is used on CPU only")
@pytest.mark.parametrize("batch", BATCHES)
def test_geqrf_reflectors_apply_q_transpose(batch):
  rng = np.random.default_rng(6)
  a = jnp.asarray(rng.normal(size=batch + (9, 5)), jnp.float32)
  c = jnp.asarray(rng.normal(size=batch + (9, 4)), jnp.float32)
  factored, taus = serial_linalg.geqrf(a)
  assert factored.shape == a.shape and taus.shape == batch + (5,)
  q = np.linalg.qr(np.asarray(a, np.float64), mode="complete")[0]
  r = np.triu(np.asarray(factored)[..., :5, :])
  # Q R = a for the reflectors' Q, whose first 5 columns are numpy's up to sign.
  qt_a = np.asarray(serial_linalg.ormqr(factored, taus, a, transpose=True))
  np.testing.assert_allclose(qt_a[..., :5, :], r, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(qt_a[..., 5:, :], 0.0, atol=1e-5)
  qt_c = np.asarray(serial_linalg.ormqr(factored, taus, c, transpose=True))
  expected = np.swapaxes(q, -1, -2) @ np.asarray(c, np.float64)
  np.testing.assert_allclose(np.abs(qt_c[..., :5, :]), np.abs(expected[..., :5, :]),
                             rtol=1e-4, atol=1e-5)
  back = np.asarray(serial_linalg.ormqr(factored, taus, jnp.asarray(qt_c), transpose=False))
  np.testing.assert_allclose(back, c, rtol=1e-4, atol=1e-5)


def test_vmap_and_broadcast_equal_the_loop():
  rng = np.random.default_rng(3)
  a = jnp.asarray(_spd(rng, (4, 2), 5), jnp.float32)
  b = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)       # broadcast over a's batch
  chol = jax.jit(jax.vmap(serial_linalg.cholesky))(a)
  np.testing.assert_allclose(chol, serial_linalg.cholesky(a), rtol=1e-6, atol=1e-6)
  solve = jax.vmap(lambda l: serial_linalg.triangular_solve(l, b, left_side=True, lower=True))
  got = jax.jit(solve)(chol)
  expected = np.linalg.solve(np.asarray(chol, np.float64), np.asarray(b, np.float64))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _lapack_batch_dims(hlo: str) -> list[int]:
  calls = [line for line in hlo.splitlines() if "@lapack_" in line]
  return [int(re.search(r'num_batch_dims = "(\d+)"', line).group(1)) for line in calls]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the wrappers act on CPU only")
@pytest.mark.parametrize("n,s,vmapped", [(300, 64, False), (300, 64, True), (30, 80, True),
                                         (60, 64, False), (20, 200, True),
                                         (150, 256, True)])
def test_fit_gmm_calls_no_batched_lapack_kernel(n, s, vmapped):
  rng = np.random.default_rng(4)
  fit = lambda x: gmm.fit_gmm(x, 2, key=jax.random.key(0))
  if vmapped:
    x = jnp.asarray(rng.normal(size=(3, n, s)), jnp.float32)
    fit = jax.vmap(fit)
  else:
    x = jnp.asarray(rng.normal(size=(n, s)), jnp.float32)
  dims = _lapack_batch_dims(jax.jit(fit).lower(x).as_text())
  assert dims and all(d == 0 for d in dims), dims
  # The reference point: the plain batched call is what would otherwise appear.
  plain = jax.jit(jnp.linalg.cholesky).lower(jnp.ones((2, 4, 4))).as_text()
  assert _lapack_batch_dims(plain) == [1]


_STRESS = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from comtriplet_jax.clustering import serial_linalg as sl
    rng = np.random.default_rng(0)
    r = jnp.asarray(np.triu(rng.normal(size=(2, 192, 192))) + 20 * np.eye(192), jnp.float32)
    eye = jnp.broadcast_to(jnp.eye(192, dtype=jnp.float32), r.shape)

    @jax.jit
    def f(r):
      total = 0.0
      for j in range(4):   # independent batched factorisations and solves
        rr = r * (1.0 + j)
        total += sl.triangular_solve(rr, eye, left_side=True).sum()
        total += sl.cholesky(rr @ jnp.swapaxes(rr, -1, -2)).sum()
      return total

    for i in range(150):
      jax.block_until_ready(f(r + i * 1e-3))
    print("done")
""")


def test_independent_batched_calls_do_not_hang():
  # jaxlib's batched CPU kernels hang on such a function within a few calls
  # on a 2-core machine (see the module docstring); the wrappers must not.
  result = subprocess.run([sys.executable, "-c", _STRESS], capture_output=True,
                          text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith("done")
