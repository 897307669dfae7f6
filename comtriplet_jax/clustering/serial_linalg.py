"""Cholesky, triangular solve and QR (also as Householder reflectors) one matrix at a time on CPU.

Why: jaxlib's CPU LAPACK kernels (0.10.2 here) split a *batched* call over
XLA's intra-op thread pool and wait for the pieces on the thread that runs the
call. When as many batched LAPACK calls run at once as the pool has threads,
which XLA does whenever they are independent in the graph, every thread waits
for pieces that no thread is free to run, and the program hangs with all its
threads idle. On a 2-core machine two independent batched Cholesky
factorisations or triangular solves in one jitted function are enough:
``tests/test_serial_linalg.py`` builds such a function and checks that these
wrappers never hang on it. An unbatched (2-D) call runs on its own thread, so
independent unbatched calls are safe.

The functions here take the usual [..., m, n] arrays and, when the computation
runs on CPU, apply the 2-D operation to one matrix at a time: a Python loop over
a small static batch, ``lax.map`` (a sequential loop) over a large one, and,
under ``vmap``, ``lax.map`` over the mapped axis (``custom_vmap``), so that a
vmapped caller does not bring the batched kernels back. On other backends they
are the plain batched operations.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
from jax import lax
import jax.numpy as jnp

try:
  # jax.lax.linalg exports ormqr (apply Householder reflectors) but not geqrf,
  # the factorisation that produces them.
  from jax._src.lax.linalg import geqrf as _geqrf  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - a JAX without it takes the dense QR paths
  _geqrf = None

# Up to this many matrices the loop over a static batch is unrolled (independent
# 2-D calls that XLA may run in parallel); beyond it, lax.map runs them in turn.
_UNROLL_MAX = 8


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def _one_matrix_vmap(fn2d: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """fn2d on 2-D operands, whose vmap is a sequential loop instead of a batch."""

  @jax.custom_batching.custom_vmap
  def call(*operands):
    return fn2d(*operands)

  @call.def_vmap
  def _vmap_rule(axis_size, in_batched, *operands):
    operands = tuple(x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
                     for x, batched in zip(operands, in_batched))
    out = lax.map(lambda xs: call(*xs), operands)
    return out, jax.tree.map(lambda _: True, out)

  return call


def _serially(fn2d: Callable[..., jax.Array], *operands: jax.Array):
  """fn2d over the broadcast leading axes of the operands, one matrix at a time.

  fn2d returns an array or a tuple of arrays.
  """
  if not _on_cpu():
    return fn2d(*operands)
  batch = jnp.broadcast_shapes(*(x.shape[:-2] for x in operands))
  operands = tuple(jnp.broadcast_to(x, batch + x.shape[-2:]) for x in operands)
  call = _one_matrix_vmap(fn2d)
  if not batch:
    return call(*operands)
  count = math.prod(batch)
  flat = tuple(x.reshape((count,) + x.shape[-2:]) for x in operands)
  if count <= _UNROLL_MAX:
    out = jax.tree.map(lambda *xs: jnp.stack(xs),
                       *[call(*(x[i] for x in flat)) for i in range(count)])
  else:
    out = lax.map(lambda xs: call(*xs), flat)
  return jax.tree.map(lambda y: y.reshape(batch + y.shape[1:]), out)


def cholesky(a: jax.Array, *, symmetrize_input: bool = True) -> jax.Array:
  """Lower Cholesky factors of [..., d, d] a (``lax.linalg.cholesky``)."""
  fn = functools.partial(lax.linalg.cholesky, symmetrize_input=symmetrize_input)
  return _serially(fn, a)


def triangular_solve(a: jax.Array, b: jax.Array, *, left_side: bool = False,
                     lower: bool = False, transpose_a: bool = False) -> jax.Array:
  """``lax.linalg.triangular_solve`` of [..., m, m] a against [..., m, n] b."""
  fn = functools.partial(lax.linalg.triangular_solve, left_side=left_side,
                         lower=lower, transpose_a=transpose_a)
  return _serially(fn, a, b)


def qr_r(a: jax.Array) -> jax.Array:
  """The R factor of the reduced QR factorisation of [..., m, n] a."""
  return _serially(functools.partial(jnp.linalg.qr, mode="r"), a)


def qr_complete(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Q [..., m, m] and R [..., m, n] of the complete QR factorisation of [..., m, n] a."""
  return _serially(functools.partial(jnp.linalg.qr, mode="complete"), a)


def reflectors_available() -> bool:
  """Whether `geqrf` and `ormqr` can be used here (JAX has geqrf; running on CPU)."""
  return _geqrf is not None and _on_cpu()


def geqrf(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """LAPACK's Householder QR of [..., m, n] a: R above the diagonal, reflectors below, taus."""
  return _serially(_geqrf, a)


def ormqr(a: jax.Array, taus: jax.Array, c: jax.Array, *, transpose: bool) -> jax.Array:
  """Q^T c (``transpose``) or Q c from `geqrf`'s reflectors, for [..., m, p] c."""
  # taus travel as [..., 1, k] matrices, as `_serially` splits matrices.
  fn = lambda a, t, c: lax.linalg.ormqr(a, t[0], c, left=True, transpose=transpose)
  return _serially(fn, a, taus[..., None, :], c)
