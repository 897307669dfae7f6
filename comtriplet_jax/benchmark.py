"""Loss-kernel throughput: this project's JAX kernels against what a user would run.

``python -m comtriplet_jax.benchmark [--only=hsic,gmm,triplet] [--sizes=default]
[--repeats=N] [--threads=1] [--malloc=auto] [--json_out=PATH]``

Every kernel is timed in this one process against the reference a user would
otherwise run, on the same random inputs, and the two results are checked to
agree. Each case prints a row: sizes, this project's time, the reference's time,
their ratio (reference time / our time: > 1 means this project is faster), the
agreement, and the fraction of the machine's floor that our time reaches.

Kernels and references
----------------------
* ``hsic``: :func:`comtriplet_jax.losses.hsic.hsic_independence_loss` with the
  authors' conventions (sigma 2.5, biased 1/N^2, ``pairs='unordered'``: the sum
  over head pairs i < j of the batch-mean HSIC), forward and loss+gradient,
  against references written like the authors' Keras code: a loop over samples
  and over head pairs that builds, for every pair, both RBF kernels from a Gram
  matrix and centres them with an explicit centring matrix H (H K H). With
  ``--hsic_reference=per_head`` each head's kernel is built once per sample
  instead of once per pair (a cheaper reference than the authors' code).

  - ``numpy_loop``: NumPy forward (the target reference of the forward). NumPy
    evaluates ``x @ x.T`` as a symmetric rank-k update (BLAS syrk), half the
    multiplications of the general product that XLA runs.
  - ``numpy_loop`` loss+grad: the same loop with a hand-written backward pass
    (H G H through the centring, the exp, and the Gram matrix), informational.
  - ``tf_loop``: TensorFlow, the same loop traced once by ``tf.function``
    (graph mode, no XLA ``jit_compile``: what a Keras user gets by default
    outside ``model.fit``), samples and heads split with ``tf.unstack`` so the
    gradient of the split is one concatenation, loss+grad by
    ``tf.GradientTape`` (the target reference of loss+grad). TensorFlow's
    graph optimiser (grappler) removes the repeated kernels of the pair loop
    as common subexpressions in the forward pass (measured: the same time as
    building each head's kernel once), not in the gradient.
  - ``tf_batched``: the authors' code as written, batched over samples by
    ``tf.matmul`` and looping over head pairs only, loss+grad, informational.

  TensorFlow always runs on the CPU (its GPUs are hidden), JAX on its default
  device. Inputs: a latent shared by the heads plus independent noise per
  head, scaled so that squared distances are about 2 sigma^2 (the kernels are
  neither all ones nor the identity, and the HSIC is far from 0).
* ``gmm``: :func:`comtriplet_jax.clustering.gmm.fit_gmm` against scikit-learn's
  ``GaussianMixture`` with the same settings (2 components, full covariances,
  tol 1e-3, reg_covar 1e-6, max_iter 100, k-means initialisation, one
  initialisation), on the same two well separated Gaussian clusters (a third
  minority). scikit-learn gets float64 (it refuses float32 when n < S), the JAX
  fit ``--gmm_dtype`` (float32 by default, the training dtype). Agreement: the
  labels up to a permutation of the components, and each fitted model's mean
  log-likelihood of the data; the number of NaNs in each fit's parameters is
  counted and must be 0.
* ``triplet`` / ``com_triplet``: :func:`comtriplet_jax.losses.triplet.triplet_loss`
  (margin 0.2) and :func:`~comtriplet_jax.losses.triplet.com_triplet_loss`
  (adaptive margin, gradient through it), value and gradients with respect to
  anchor, positive and negative, against vectorised NumPy with hand-written
  gradients of the cosine distances.

Timing
------
Each function is called once first (compilation, tracing, caches; its output is
the one checked for agreement), then timed with ``time.perf_counter`` around a
call whose outputs are synchronised (``jax.block_until_ready``; references
return host arrays), each function in its own block of consecutive calls
(:func:`time_calls` says why not alternating). Repeats are adaptive: until at
least ``min_repeats`` (3) calls and ``min_time_s`` (0.5 s) of timed calls, or
``max_time_s`` (2 s) or ``max_repeats`` (200) is reached, at least once;
``--repeats`` fixes the count. The reported time is the median.

Threads
-------
``--threads`` (default 1) caps every library in the process at the same number
of CPU threads, this project's kernels and the references alike: OpenBLAS
(NumPy, SciPy, scikit-learn and the LAPACK calls inside JAX's CPU linear
algebra), XLA's CPU thread pool and TensorFlow's pools (see
:func:`limit_threads`). One thread is the default because this benchmark runs
on a small CPU shared with other jobs: there, a multithreaded OpenBLAS call
spin-waits for any of its threads that the scheduler has taken away, and one
QR or Cholesky factorisation took from 2 ms to 2 s from one call to the next,
which made ratios meaningless (in favour of whichever side called BLAS
less). ``--threads=0`` leaves every library at its default. The machine
floor is measured under the same cap. On a GPU only the references and
JAX's host-side work are affected.

Memory allocator
----------------
``--malloc=retain`` (what the default, ``auto``, picks on CPU) makes glibc's
malloc keep freed memory for reuse before any library starts (one arena; mmap
and trim thresholds of 1 GiB, :func:`retain_freed_memory`), for every library
in the process alike. Why: XLA:CPU takes each output buffer from malloc, and
glibc serves a request above 32 MB (the largest mmap threshold it adapts to)
with a fresh ``mmap`` and hands it back with ``munmap`` when freed, so every
call pays the page faults of its whole output afresh; TensorFlow keeps its own
pool. Measured here on one thread
for a fresh 77 MB output (the HSIC gradient at B = 32, N = 196, C = 1024) of
``x * 2``: JAX 36.6 ms with glibc's defaults, 6.8 ms retained, TensorFlow
5.6 ms. The one arena costs small kernels time: every thread now allocates
from it and they wait for each other (under ``perf``, glibc's ``_int_malloc``
took 6.9% of the samples instead of 1.8%, plus the kernel's futex wake-ups).
Measured 2026-11-25, one process per setting, three processes each, retained
against glibc's defaults: ``fit_gmm`` at n = 1000, S = 64 1.78-1.83 against
1.59-1.60 ms (scikit-learn 6.52-7.31 against 6.14-6.54 ms), at n = 1000,
S = 256 8.65-9.24 against 6.99-7.66 ms; the HSIC loss with its gradient at
B = 8, N = 49, C = 256 1.30-1.31 against 1.11-1.12 ms, but at B = 32,
N = 196, C = 1024 149 against 181-182 ms. The 1 GiB thresholds without the
one arena do not help that large case (178 ms): a thread's own arena holds no
chunk above 64 MB, and glibc maps a larger one afresh whatever the threshold.
``--malloc=default`` leaves glibc as it is; the header says which.
``auto`` picks ``default`` when JAX is going to run on a GPU or TPU (judged
before its backends start: ``JAX_PLATFORMS``, else an installed PJRT plugin or
libtpu, :func:`accelerator_expected`): there the kernels' outputs live on the
device, and one arena serialises the host allocations of every thread. On an
H100 machine (16 cores) the benchmark under ``retain`` needed 50 to 100 s per
case where a plain script compiled and timed the same kernels in under 12 s;
that the single arena is the cause is not yet measured.

Floor
-----
The machine's floor for a kernel is ``max(flops / matmul_rate, bytes /
copy_rate)``, where ``matmul_rate`` is measured in the same run by a jitted
square matrix product of the kernel's dtype at ``Precision.HIGHEST`` (the
precision the kernels use) and ``copy_rate`` by a jitted in-place ``x + 1`` (donated
buffer) on an array much larger than the caches (read + write bytes / time),
each measured at the start and at the end of the run, the faster of the two
kept (load from other jobs only slows a measurement). ``floor_fraction =
floor_s / time_s``: 1 means the kernel runs at the speed of a large matrix
product (or of a copy), 0.5 means within 2x of it. FLOPs and bytes are counted
analytically (multiply and add count 2; the cheap O(N^2) or O(M) elementwise
terms are included where they are the same order, and transcendental functions
count 1), for the algorithm that this project's kernel runs:

* HSIC forward, per sample: K Gram matrices 2 N^2 C (on CPU, where the kernel
  multiplies only the blocks on and above the diagonal, 2 C sum_{i <= j} n_i
  n_j over its row blocks: 2/3 of that at N = 196), the kernel entries
  (distance, exp, centring) ~10 K N^2, the pair sums 2 K^2 N^2. Loss+grad adds
  one [N, N] x [N, C] product per head (the custom VJP) 2 N^2 C and
  ~10 K N^2 + 2 K^2 N^2. Bytes: the compulsory traffic, the [B, K, N, C]
  features read (and, with the gradient, the same size written); the kernels
  ([B, K, N, N]) could stay in cache and are not counted.
* GMM, per EM iteration (n points, S features, K components, r = n), on the
  path that ``fit_gmm`` takes:

  - Cholesky path (n > S, or n > S / 2 in float64): M-step means and weighted
    rows ~4 n S K; K - 1 covariances, the lower block triangle of a Gram
    product (up to four column blocks: n S^2 (b + 1) / b), the last one from
    the total scatter (computed once); then either a Cholesky factor,
    S^3 / 3 K, and an E-step by triangular solves, n S^2 K, or, when
    n >= 2 S, per component the Cholesky factor together with its inverse
    (recursive halving into products that skip the zero blocks of triangular
    operands, LAPACK below 64: 1.15 S^3 at S = 256, 0.97 S^3 at S = 1024) and a
    block-triangular product.
  - square-root path (float32, S / 2 < n <= S): the M-step factors the stacked
    [(n + S), S] matrix by Householder QR, 2 (n + S) S^2 - 2 S^3 / 3 per
    component (on CPU for S >= 256 by 64-column panels whose reflectors carry
    the trailing columns, about 2 n S^2), instead of covariance and Cholesky;
    E-step n S^2 K; once, for the outputs, the inverse factors and the
    covariances as R^T R (lower block triangle, inner dimension cut at the
    block's end: 0.94 S^3 with four blocks).
  - subspace path (2 n <= S): one QR of the [S, n] data, 2 S n^2 - 2 n^3 / 3; per
    iteration the QR path in r = n dimensions; then, once, the S-dimensional
    outputs: covariances (whole products, 2 n S^2), the QR factor of [(n + S), S]
    per component (for 3 n <= S panel by panel, skipping the identity's zeros: a
    dense QR of [n + 64, 64] per panel, its complete Q, and a product with the
    trailing columns, about n (n + 64) S^2 / 64 in all) and the triangular inverse
    (recursive halving, zero blocks skipped: 0.43 S^3 at S = 1024).

  Iterations: the JAX fit's ``n_iter`` M-steps and E-steps plus the initial
  ones, less the ``n_reused`` iterations at EM's fixed point, which reuse the
  previous M-step (their few [n, K] operations are not counted); the k-means
  initialisation is not counted (so the floor is a little low and the fraction
  conservative). Bytes: the data read twice per computed iteration.
* Triplet losses with gradients, per triplet: 6 row dot products 12 S forward,
  each of the 3 gradients a combination of the 3 inputs ~6 S each backward:
  30 S FLOPs; bytes: 3 inputs read and 3 gradients written, 6 S words. These
  kernels are bandwidth bound, and cases that fit in the caches can exceed a
  fraction of 1.

Targets (from issue 3, "Done when"), recorded per row as ``target_ratio`` and
``meets_target``: HSIC loss+grad >= 3x ``tf_loop`` and forward >= 2x
``numpy_loop`` at every size; GMM >= 5x scikit-learn at n = 1000 and >= 1x
elsewhere, with no NaN; triplet losses with gradients >= 2x NumPy for M >= 256;
the largest HSIC and GMM cases at ``floor_fraction`` >= 0.5
(``floor_target``, ``meets_floor_target``).

JSON (``--json_out``)
---------------------
``{"machine": {...}, "settings": {...}, "rows": [...], "targets": [...],
"wall_s": float}``. ``machine``: backend, device, device_count, cpu_count,
platform, versions, ``load_average_start``/``_end`` (1, 5, 15 min),
``matmul_flops_per_s`` ({dtype: FLOP/s}), ``copy_bytes_per_s`` (the faster
of ``machine_start`` and ``machine_end``, the two measurements), the sizes
used to measure them, and ``threads`` (the cap and which libraries it
reached, see :func:`limit_threads`, and under ``malloc`` what
:func:`retain_freed_memory` did). ``settings``: sizes, only, repeats, the timing
policy, hsic_reference, gmm_dtype. Each row has the fields of :class:`Row`:
kernel, mode, case ({name: size}), dtype, reference, time_s, ref_time_s,
ratio, repeats, ref_repeats, first_call_s, ref_first_call_s, agrees, error,
tolerance, agreement ({detail: value}), flops, bytes, floor_s,
floor_fraction, target_ratio, meets_target, floor_target,
meets_floor_target. ``targets``: one entry per target with the rows it covers
and whether all meet it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from comtriplet_jax.clustering import gmm as gmm_lib
from comtriplet_jax.losses import hsic as hsic_lib
from comtriplet_jax.losses import triplet as triplet_lib

KERNELS = ("hsic", "gmm", "triplet")
HSIC_SIGMA = 2.5                 # the authors' code
HSIC_REFERENCES = ("authors", "per_head")
TRIPLET_MARGIN = 0.2
GMM_SETTINGS = dict(covariance_type="full", tol=1e-3, reg_covar=1e-6, max_iter=100)
# float32 kernels against float32 references: a few hundred ulps of relative
# error is round-off; a kernel off by 1% is wrong.
TOLERANCE = 2e-3
GMM_LABEL_AGREEMENT = 0.99
GMM_LOGLIK_ATOL = 1e-3
GMM_LOGLIK_RTOL = 1e-4
FLOOR_TARGET = 0.5


# ----------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class HsicCase:
  """HSIC sizes: B samples, K heads, N = H W positions, C channels."""
  batch: int
  heads: int
  positions: int
  channels: int

  def sizes(self) -> dict[str, int]:
    return dict(B=self.batch, K=self.heads, N=self.positions, C=self.channels)


@dataclasses.dataclass(frozen=True)
class GmmCase:
  """GMM sizes: n points of S features, K components."""
  points: int
  features: int
  components: int = 2

  def sizes(self) -> dict[str, int]:
    return dict(n=self.points, S=self.features, K=self.components)


@dataclasses.dataclass(frozen=True)
class TripletCase:
  """Triplet sizes: M triplets of S-dimensional embeddings."""
  triplets: int
  features: int

  def sizes(self) -> dict[str, int]:
    return dict(M=self.triplets, S=self.features)


SIZES: dict[str, dict[str, list[Any]]] = {
    # For tests: seconds in all.
    "tiny": dict(
        hsic=[HsicCase(2, 3, 9, 8)],
        gmm=[GmmCase(45, 16)],
        triplet=[TripletCase(15, 16)]),
    # A quick look at one size of each papers' setting.
    "small": dict(
        hsic=[HsicCase(8, 3, 49, 256)],
        gmm=[GmmCase(45, 64), GmmCase(1000, 64)],
        triplet=[TripletCase(15, 128), TripletCase(256, 128)]),
    # The papers' settings (issue 3).
    "default": dict(
        hsic=[HsicCase(b, 3, n, c) for b in (8, 32) for n in (49, 196)
              for c in (256, 1024)],
        gmm=[GmmCase(n, s) for n in (45, 1000, 10000) for s in (64, 256, 1024)],
        triplet=[TripletCase(m, s) for m in (15, 256, 4096) for s in (128, 512)]),
}

# The tiny sizes only check that the benchmark works: a small machine
# measurement keeps them fast (their floor fractions mean nothing).
MACHINE_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(matmul_size=256, copy_elements=2**20)}


# ---------------------------------------------------------------------- timing
@dataclasses.dataclass(frozen=True)
class TimingPolicy:
  """How many timed calls: see "Timing" in the module docstring."""
  repeats: int | None = None
  min_repeats: int = 3
  min_time_s: float = 0.5
  max_time_s: float = 2.0
  max_repeats: int = 200

  def __post_init__(self):
    if self.repeats is not None and self.repeats < 1:
      raise ValueError(f"repeats must be >= 1 or None, got {self.repeats}")
    if self.min_repeats < 1 or self.max_repeats < self.min_repeats:
      raise ValueError(f"need 1 <= min_repeats <= max_repeats, got "
                       f"{self.min_repeats}, {self.max_repeats}")


@dataclasses.dataclass(frozen=True)
class Timing:
  """Median of the timed calls, their number, and the first (warm-up) call."""
  median_s: float
  repeats: int
  first_call_s: float


def time_call(fn: Callable[[], Any], policy: TimingPolicy) -> tuple[Any, Timing]:
  """Calls ``fn`` once to warm up, then times it; returns (first output, Timing).

  Outputs are synchronised with ``jax.block_until_ready`` (a no-op on host
  arrays), so asynchronous dispatch never hides device time.
  """
  (output,), (timing,) = time_calls([fn], policy)
  return output, timing


def time_calls(fns: Sequence[Callable[[], Any]], policy: TimingPolicy
               ) -> tuple[list[Any], list[Timing]]:
  """Times each function in turn, each in its own block of consecutive calls.

  Each block is one warm-up call, then timed calls until the policy is met.
  Blocks rather than alternating calls: a kernel called back to back, as in a
  training loop, finds its thread pool awake, while one called between calls
  of another library waits for its worker thread to be woken up and
  scheduled. On this shared 2-core machine (load average about 4),
  alternating call by call made a small JAX kernel up to 1.5x slower than
  back-to-back calls, and its times erratic.

  Returns:
    (the first, warm-up, output of each function; its Timing).
  """
  outputs, timings = [], []
  for fn in fns:
    start = time.perf_counter()
    outputs.append(jax.block_until_ready(fn()))
    first = time.perf_counter() - start
    times: list[float] = []
    while True:
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
      total = sum(times)
      if policy.repeats is not None:
        if len(times) >= policy.repeats:
          break
      elif (len(times) >= policy.max_repeats or total >= policy.max_time_s
            or (len(times) >= policy.min_repeats and total >= policy.min_time_s)):
        break
    timings.append(Timing(statistics.median(times), len(times), first))
  return outputs, timings


# --------------------------------------------------------------------- threads
def limit_threads(threads: int, stack: contextlib.ExitStack) -> dict[str, Any]:
  """Gives every library in this process at most ``threads`` CPU threads.

  0 leaves every library at its default. Otherwise, equally for this
  project's kernels and the references:

  * OpenBLAS/MKL (NumPy, SciPy, scikit-learn, and the LAPACK routines that
    JAX's CPU QR, Cholesky and triangular solves call) through
    ``threadpoolctl``, undone when ``stack`` closes;
  * XLA's CPU thread pool, sized from the CPUs the starting thread may run
    on: the backends are started with this thread restricted to ``threads``
    CPUs, then every thread's affinity is restored (the pool keeps its size,
    not the pinning). Only possible before JAX's backends start (not under
    pytest, whose fixtures have started them);
  * TensorFlow's intra- and inter-op pools, in :func:`_tensorflow` (only
    before TensorFlow's runtime starts).

  Why: on a CPU shared with other jobs, a multithreaded BLAS call whose
  worker thread is descheduled spin-waits for it at every synchronisation
  (measured: a 2 ms QR taking 2 s at load average 6), which makes timings and
  ratios irreproducible. One thread per library is the reproducible setting.

  Args:
    threads: the cap, or 0.
    stack: owns the BLAS limit.

  Returns:
    {'threads', 'blas': [(library, threads)], 'xla_cpu_pool_limited',
    'tensorflow_limited'} ('tensorflow_limited' is filled in later).
  """
  if threads < 0:
    raise ValueError(f"threads must be >= 0, got {threads}")
  info: dict[str, Any] = dict(threads=threads, blas=[], xla_cpu_pool_limited=False,
                              tensorflow_limited=None)
  if threads == 0:
    return info
  # Load every BLAS first: threadpoolctl only limits the libraries loaded.
  import scipy.linalg  # pylint: disable=g-import-not-at-top,unused-import
  import sklearn.mixture  # pylint: disable=g-import-not-at-top,unused-import
  import threadpoolctl  # pylint: disable=g-import-not-at-top
  stack.enter_context(threadpoolctl.threadpool_limits(limits=threads))
  info["blas"] = [(f"{lib['internal_api']}:{os.path.basename(lib['filepath'])}",
                   lib["num_threads"]) for lib in threadpoolctl.threadpool_info()]
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if (hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task")
      and not xla_bridge.backends_are_initialized()):
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(allowed)[:threads])
    try:
      jax.devices()
    finally:
      for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
          os.sched_setaffinity(int(task), allowed)
    info["xla_cpu_pool_limited"] = True
  return info


MALLOC_CHOICES = ("auto", "retain", "default")
_ACCELERATOR_PLATFORMS = ("cuda", "gpu", "rocm", "tpu")


def accelerator_expected(platforms: str | None = None) -> bool:
  """Whether JAX will run on a GPU or TPU, judged without starting its backends.

  ``platforms`` (default: ``jax_platforms``, i.e. ``JAX_PLATFORMS``) decides
  when set: its first entry. Else an installed PJRT plugin (the ``jax_plugins``
  namespace or entry points, how the CUDA and ROCm plugins register) or libtpu
  says an accelerator backend will be tried; if its device is missing, JAX
  falls back to the CPU, which this cannot see.
  """
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pkgutil  # pylint: disable=g-import-not-at-top
  if platforms is None:
    platforms = jax.config.jax_platforms
  platforms = (platforms or "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() in _ACCELERATOR_PLATFORMS
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
    if any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
      return True
  except ImportError:
    pass
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  return importlib.util.find_spec("libtpu") is not None


def resolve_malloc(malloc: str) -> str:
  """'retain' or 'default' for a --malloc choice ('auto': retain unless on an accelerator)."""
  if malloc not in MALLOC_CHOICES:
    raise ValueError(f"malloc must be one of {MALLOC_CHOICES}, got {malloc!r}")
  if malloc == "auto":
    return "default" if accelerator_expected() else "retain"
  return malloc


def retain_freed_memory(enable: bool) -> dict[str, Any]:
  """Makes glibc's malloc keep freed memory for reuse, for the whole process.

  ``mallopt``: one arena (M_ARENA_MAX = 1), so that the threads of XLA's CPU
  pool allocate from the main heap, whose chunks may exceed the 64 MB of a
  thread arena; mmap and trim thresholds of 1 GiB (M_MMAP_THRESHOLD,
  M_TRIM_THRESHOLD), so that large buffers come from the heap and freed ones
  stay there for the next call instead of going back to the operating system.
  Best before JAX's backends start (their threads otherwise keep their arenas).

  Args:
    enable: False leaves malloc at its defaults.

  Returns:
    {'malloc': 'retain' or 'default', 'applied': bool, 'backends_started': bool}.
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  info = dict(malloc="retain" if enable else "default", applied=False,
              backends_started=xla_bridge.backends_are_initialized())
  if not enable or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return info
  import ctypes  # pylint: disable=g-import-not-at-top
  libc = ctypes.CDLL(None)
  m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
  results = [libc.mallopt(m_arena_max, 1),
             libc.mallopt(m_mmap_threshold, 1 << 30),
             libc.mallopt(m_trim_threshold, 1 << 30)]
  info["applied"] = all(r == 1 for r in results)
  return info


# ---------------------------------------------------------------- machine floor
def measure_machine(dtypes: Sequence[str], policy: TimingPolicy, *,
                    matmul_size: int | None = None,
                    copy_elements: int | None = None) -> dict[str, Any]:
  """Measured matmul FLOP/s per dtype and copy bytes/s on JAX's default device.

  Args:
    dtypes: the matmul dtypes to measure.
    policy: timing policy.
    matmul_size: side of the square matrices (default: large enough to run at
      full rate, small enough to take well under a second).
    copy_elements: float32 elements copied (default: far beyond the caches).

  Returns:
    {'matmul_flops_per_s': {dtype: float}, 'copy_bytes_per_s': float,
    'matmul_size': int, 'copy_array_bytes': int}.
  """
  accelerator = jax.default_backend() != "cpu"
  size = matmul_size or (8192 if accelerator else 2048)
  copy_elements = copy_elements or (2**28 if accelerator else 2**25)
  matmul = jax.jit(functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST))
  rates = {}
  for i, dtype in enumerate(dtypes):
    keys = jax.random.split(jax.random.key(i))
    a = jax.random.normal(keys[0], (size, size), dtype)
    b = jax.random.normal(keys[1], (size, size), dtype)
    _, timing = time_call(lambda: matmul(a, b), policy)
    rates[dtype] = 2.0 * size**3 / timing.median_s
  # In place (a donated buffer): a fresh output buffer would also time the
  # operating system's first-touch page faults, ~10x slower than the copy on CPU.
  add_one = jax.jit(lambda v: v + 1.0, donate_argnums=0)
  state = [jnp.zeros((copy_elements,), jnp.float32)]

  def copy_step():
    state[0] = add_one(state[0])
    return state[0]

  _, timing = time_call(copy_step, policy)
  nbytes = copy_elements * 4
  return dict(matmul_flops_per_s=rates, copy_bytes_per_s=2.0 * nbytes / timing.median_s,
              matmul_size=size, copy_array_bytes=nbytes)


def faster_machine(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
  """The higher matmul rate of each dtype and the higher copy rate of two runs.

  Load from other jobs only ever slows a measurement down, so the faster of
  the measurements at the start and at the end of a run is nearer to what the
  machine can do, and the floor computed from it the more demanding.
  """
  return dict(
      first,
      matmul_flops_per_s={d: max(v, second["matmul_flops_per_s"][d])
                          for d, v in first["matmul_flops_per_s"].items()},
      copy_bytes_per_s=max(first["copy_bytes_per_s"], second["copy_bytes_per_s"]))


def floor_seconds(flops: float, nbytes: float, rates: dict[str, Any],
                  dtype: str) -> float:
  """max(flops / matmul rate of ``dtype``, bytes / copy rate)."""
  return max(flops / rates["matmul_flops_per_s"][dtype],
             nbytes / rates["copy_bytes_per_s"])


# ------------------------------------------------------------------------ rows
@dataclasses.dataclass
class Row:
  """One comparison: this project's kernel against one reference on one case."""
  kernel: str
  mode: str
  case: dict[str, int]
  dtype: str
  reference: str
  time_s: float
  ref_time_s: float
  ratio: float
  repeats: int
  ref_repeats: int
  first_call_s: float
  ref_first_call_s: float
  agrees: bool
  error: float
  tolerance: float
  agreement: dict[str, Any]
  flops: float
  bytes: float
  floor_s: float
  floor_fraction: float
  target_ratio: float | None = None
  meets_target: bool | None = None
  floor_target: float | None = None
  meets_floor_target: bool | None = None


def _row(*, kernel, mode, case, dtype, reference, ours: Timing, ref: Timing,
         agrees, error, tolerance, agreement, flops, nbytes, rates,
         target_ratio=None) -> Row:
  floor = floor_seconds(flops, nbytes, rates, dtype)
  ratio = ref.median_s / ours.median_s
  return Row(kernel=kernel, mode=mode, case=case, dtype=dtype, reference=reference,
             time_s=ours.median_s, ref_time_s=ref.median_s, ratio=ratio,
             repeats=ours.repeats, ref_repeats=ref.repeats,
             first_call_s=ours.first_call_s, ref_first_call_s=ref.first_call_s,
             agrees=bool(agrees), error=float(error), tolerance=float(tolerance),
             agreement=agreement, flops=float(flops), bytes=float(nbytes),
             floor_s=floor, floor_fraction=floor / ours.median_s,
             target_ratio=target_ratio,
             meets_target=None if target_ratio is None else bool(
                 ratio >= target_ratio and agrees))


def progress_line(row: Row) -> str:
  """One row as a progress line: both medians, the ratio and both first calls.

  The first call includes compilation (XLA for the kernels, tracing for the
  TensorFlow references), so a slow run shows where its time went even when it
  is stopped before the table is printed.
  """
  return (f"    {row.mode} vs {row.reference}: {row.time_s * 1e3:.3f} ms vs "
          f"{row.ref_time_s * 1e3:.3f} ms ({row.ratio:.2f}x, agrees: "
          f"{'yes' if row.agrees else 'NO'}); first calls {row.first_call_s:.2f} s "
          f"and {row.ref_first_call_s:.2f} s")


def relative_error(value: Any, reference: Any) -> float:
  """max |value - reference| / max |reference| over all entries (0 if both 0)."""
  value = np.asarray(value, np.float64)
  reference = np.asarray(reference, np.float64)
  if value.shape != reference.shape:
    raise ValueError(f"shapes differ: {value.shape} and {reference.shape}")
  scale = np.max(np.abs(reference)) if reference.size else 0.0
  diff = np.max(np.abs(value - reference)) if reference.size else 0.0
  if not np.isfinite(diff):
    return math.inf
  return float(diff / scale) if scale > 0 else float(diff)


# ------------------------------------------------------------------------ HSIC
def hsic_inputs(case: HsicCase, seed: int = 0,
                sigma: float = HSIC_SIGMA) -> np.ndarray:
  """[B, K, N, C] float32 head features with a latent shared by the heads.

  Each head is 0.6 (shared latent) + 0.8 (own noise), unit variance per entry,
  scaled by sigma / sqrt(C) so that squared distances between positions are
  about 2 sigma^2: kernel entries near exp(-1), HSIC clearly above 0.
  """
  rng = np.random.default_rng(seed)
  b, k, n, c = case.batch, case.heads, case.positions, case.channels
  shared = rng.standard_normal((b, 1, n, c))
  own = rng.standard_normal((b, k, n, c))
  return ((0.6 * shared + 0.8 * own) * (sigma / math.sqrt(c))).astype(np.float32)


def hsic_flops_bytes(case: HsicCase, with_grad: bool, itemsize: int = 4,
                     implementation: str = "auto") -> tuple[float, float]:
  """Analytic FLOPs and compulsory bytes of the JAX HSIC kernel (module docstring).

  ``implementation`` as in :func:`comtriplet_jax.losses.hsic.hsic_independence_loss`
  ('auto' resolves by the default backend): 'per_sample' builds each Gram
  matrix from its blocks on and above the diagonal, the others in full.
  """
  b, k, n, c = case.batch, case.heads, case.positions, case.channels
  implementation = hsic_lib.resolve_implementation(implementation)
  edges = hsic_lib.gram_block_edges(n) if implementation == "per_sample" else (0, n)
  sizes = [hi - lo for lo, hi in zip(edges[:-1], edges[1:])]
  gram_entries = sum(sizes[i] * sizes[j] for i in range(len(sizes))
                     for j in range(i, len(sizes)))
  elementwise = 10 * k * n * n + 2 * k * k * n * n
  forward = 2 * k * gram_entries * c + elementwise
  features_bytes = b * k * n * c * itemsize
  if not with_grad:
    return float(b * forward), float(features_bytes)
  backward = 2 * k * n * n * c + elementwise
  return float(b * (forward + backward)), float(2 * features_bytes)


def _np_rbf(x: np.ndarray, sigma: float) -> np.ndarray:
  """RBF kernel of the rows of x [N, C] from one Gram matrix, as the authors' code."""
  sq = np.einsum("nc,nc->n", x, x)
  dist = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
  return np.exp(dist * (-0.5 / sigma**2))


def _np_rbf_backward(x: np.ndarray, kernel: np.ndarray, grad_kernel: np.ndarray,
                     sigma: float) -> np.ndarray:
  """d loss / d x [N, C] from d loss / d kernel [N, N], for kernel = _np_rbf(x)."""
  grad_dist = grad_kernel * kernel * (-0.5 / sigma**2)
  # dist_ij = |x_i|^2 + |x_j|^2 - 2 x_i.x_j: both (i, j) and (j, i) move x_i.
  both = grad_dist + grad_dist.T
  return 2.0 * (np.sum(both, axis=1)[:, None] * x - both @ x)


def hsic_numpy_loop(features: np.ndarray, *, sigma: float = HSIC_SIGMA,
                    per_pair_kernels: bool = True, with_grad: bool = False
                    ) -> tuple[float, np.ndarray | None]:
  """The authors' HSIC loss as a NumPy loop over samples and head pairs.

  Loss = mean over samples of sum over pairs k1 < k2 of
  sum((H K1 H) * (H K2 H)) / N^2 with H = I - 11^T / N explicit (BIIGMA-Net
  Eq. 2, the authors' convention). With ``with_grad`` the backward pass is
  written by hand: the gradient of the pair term with respect to K1 is
  H (H K2 H) H / (B N^2), then through the exp and the Gram matrix.

  Args:
    features: [B, K, N, C] head features (their dtype is kept).
    sigma: RBF bandwidth.
    per_pair_kernels: True (the authors' code) builds both kernels of every
      pair; False builds each head's kernel once per sample.
    with_grad: also return d loss / d features.

  Returns:
    (loss, [B, K, N, C] gradient or None).
  """
  if features.ndim != 4:
    raise ValueError(f"features must be [B, K, N, C], got shape {features.shape}")
  batch, heads, n, _ = features.shape
  centring = (np.eye(n) - np.full((n, n), 1.0 / n)).astype(features.dtype)
  scale = 1.0 / (batch * n * n)
  total = 0.0
  grad = np.zeros_like(features) if with_grad else None
  for b in range(batch):
    x = features[b]
    if not per_pair_kernels:
      kernels = [_np_rbf(x[k], sigma) for k in range(heads)]
      centred = [centring @ kern @ centring for kern in kernels]
    for k1 in range(heads):
      for k2 in range(k1 + 1, heads):
        if per_pair_kernels:
          kern1, kern2 = _np_rbf(x[k1], sigma), _np_rbf(x[k2], sigma)
          cent1 = centring @ kern1 @ centring
          cent2 = centring @ kern2 @ centring
        else:
          kern1, kern2 = kernels[k1], kernels[k2]
          cent1, cent2 = centred[k1], centred[k2]
        total += float(np.sum(cent1 * cent2)) * scale
        if with_grad:
          grad[b, k1] += _np_rbf_backward(
              x[k1], kern1, centring @ (cent2 * scale) @ centring, sigma)
          grad[b, k2] += _np_rbf_backward(
              x[k2], kern2, centring @ (cent1 * scale) @ centring, sigma)
  return total, grad


def _tensorflow(threads: int = 0) -> tuple[Any, bool | None]:
  """(TensorFlow on the CPU only, its GPUs hidden, or None when not installed;
  whether its pools were limited to ``threads`` threads, None for 0)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None, None
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    pass  # Already initialised: ops are still pinned to the CPU below.
  limited = None
  if threads:
    try:
      tf.config.threading.set_intra_op_parallelism_threads(threads)
      tf.config.threading.set_inter_op_parallelism_threads(threads)
      limited = True
    except RuntimeError:
      # Its runtime has started: the pools keep their size.
      limited = (tf.config.threading.get_intra_op_parallelism_threads() == threads
                 and tf.config.threading.get_inter_op_parallelism_threads() == threads)
  return tf, limited


def make_tf_hsic(tf, sigma: float = HSIC_SIGMA, *, batched: bool = False,
                 per_pair_kernels: bool = True):
  """(forward, loss_and_grad) tf.functions of the authors' HSIC loss.

  ``batched=False``: a loop over samples and head pairs (unrolled when traced);
  ``batched=True``: the authors' code, samples batched in ``tf.matmul``, a loop
  over head pairs. Both centre with an explicit H.
  """

  def kernel(x):
    sq = tf.reduce_sum(tf.square(x), axis=-1, keepdims=True)
    dist = sq - 2.0 * tf.matmul(x, x, transpose_b=True) + tf.linalg.matrix_transpose(sq)
    return tf.exp(dist * (-0.5 / sigma**2))

  def pair_terms(heads, centring, n):
    """Sum over pairs k1 < k2 of sum(H K1 H * H K2 H) / N^2 (per leading index)."""
    centre = lambda kern: tf.matmul(centring, tf.matmul(kern, centring))
    if not per_pair_kernels:
      centred = [centre(kernel(h)) for h in heads]
    total = 0.0
    for k1 in range(len(heads)):
      for k2 in range(k1 + 1, len(heads)):
        if per_pair_kernels:
          cent1, cent2 = centre(kernel(heads[k1])), centre(kernel(heads[k2]))
        else:
          cent1, cent2 = centred[k1], centred[k2]
        total += tf.reduce_sum(cent1 * cent2, axis=[-2, -1]) / float(n * n)
    return total

  def loss(x):
    batch, heads, n, _ = x.shape
    centring = tf.eye(n) - tf.ones((n, n)) / float(n)
    if batched:
      return tf.reduce_mean(pair_terms(tf.unstack(x, axis=1), centring, n))
    return tf.add_n([pair_terms(tf.unstack(sample, axis=0), centring, n)
                     for sample in tf.unstack(x, axis=0)]) / float(batch)

  @tf.function
  def forward(x):
    return loss(x)

  @tf.function
  def loss_and_grad(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      value = loss(x)
    return value, tape.gradient(value, x)

  return forward, loss_and_grad


def _default_hsic_loss(features, *, sigma):
  return hsic_lib.hsic_independence_loss(features, sigma=sigma, pairs="unordered")


def bench_hsic(cases: Sequence[HsicCase], policy: TimingPolicy,
               rates: dict[str, Any], *, loss_fn: Callable[..., jax.Array] | None = None,
               reference: str = "authors", use_tensorflow: bool = True,
               extra_references: bool = True, log=print) -> list[Row]:
  """HSIC rows: forward vs ``numpy_loop``; loss+grad vs ``tf_loop`` (and extras).

  Args:
    cases: sizes.
    policy: timing policy.
    rates: :func:`measure_machine` output.
    loss_fn: the kernel under test, ``loss_fn(features, sigma=...) -> scalar``
      (default: this project's loss with the authors' conventions).
    reference: 'authors' (kernels per pair) or 'per_head'.
    use_tensorflow: run the TensorFlow references when TensorFlow is installed.
    extra_references: also the informational loss+grad rows (``numpy_loop``
      with a hand-written gradient, ``tf_batched``).
    log: progress printer.

  Returns:
    Rows.
  """
  if reference not in HSIC_REFERENCES:
    raise ValueError(f"reference must be one of {HSIC_REFERENCES}, got {reference!r}")
  loss_fn = loss_fn or _default_hsic_loss
  per_pair = reference == "authors"
  tf, _ = _tensorflow() if use_tensorflow else (None, None)
  forward = jax.jit(functools.partial(loss_fn, sigma=HSIC_SIGMA))
  loss_and_grad = jax.jit(jax.value_and_grad(functools.partial(loss_fn, sigma=HSIC_SIGMA)))
  rows = []
  for case in cases:
    log(f"  hsic {case.sizes()}")
    first_row = len(rows)
    features = hsic_inputs(case)
    on_device = jnp.asarray(features)
    common = dict(kernel="hsic", case=case.sizes(), dtype="float32", rates=rates,
                  tolerance=TOLERANCE)

    (value, (ref_value, _)), (ours_fwd, ref) = time_calls(
        [lambda: forward(on_device),
         lambda: hsic_numpy_loop(features, per_pair_kernels=per_pair)], policy)
    error = relative_error(value, ref_value)
    flops, nbytes = hsic_flops_bytes(case, with_grad=False)
    rows.append(_row(mode="forward", reference="numpy_loop", ours=ours_fwd, ref=ref,
                     agrees=error <= TOLERANCE, error=error,
                     agreement=dict(loss=float(value), ref_loss=ref_value,
                                    loss_error=error),
                     flops=flops, nbytes=nbytes, target_ratio=2.0, **common))

    # The kernel and every reference in turn (see `time_calls`).
    references: list[tuple[str, Callable[[], Any], float | None]] = []
    if tf is not None:
      with tf.device("/CPU:0"):
        tf_features = tf.constant(features)
      for name, batched, target in (("tf_loop", False, 3.0),
                                    ("tf_batched", True, None)):
        if batched and not extra_references:
          continue
        _, tf_grad_fn = make_tf_hsic(tf, batched=batched, per_pair_kernels=per_pair)

        def run_tf(tf_grad_fn=tf_grad_fn):
          with tf.device("/CPU:0"):
            return tuple(t.numpy() for t in tf_grad_fn(tf_features))

        references.append((name, run_tf, target))
    if extra_references:
      references.append(("numpy_loop", lambda: hsic_numpy_loop(
          features, per_pair_kernels=per_pair, with_grad=True), None))
    outputs, timings = time_calls(
        [lambda: loss_and_grad(on_device)] + [fn for _, fn, _ in references], policy)
    (value, grad), ours_grad = outputs[0], timings[0]
    flops, nbytes = hsic_flops_bytes(case, with_grad=True)
    for (name, _, target), (ref_value, ref_grad), ref in zip(
        references, outputs[1:], timings[1:]):
      loss_error = relative_error(value, ref_value)
      grad_error = relative_error(grad, ref_grad)
      error = max(loss_error, grad_error)
      rows.append(_row(
          mode="loss+grad", reference=name, ours=ours_grad, ref=ref,
          agrees=error <= TOLERANCE, error=error,
          agreement=dict(loss=float(value), ref_loss=float(ref_value),
                         loss_error=loss_error, grad_error=grad_error),
          flops=flops, nbytes=nbytes, target_ratio=target, **common))
    for row in rows[first_row:]:
      log(progress_line(row))
  return rows


# ------------------------------------------------------------------------- GMM
def gmm_inputs(case: GmmCase, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Two well separated Gaussian clusters, a third of the points in the minority.

  Unit isotropic noise around means 1 apart in every coordinate (sqrt(S)
  apart): every point is far nearer its own mean. Returns ([n, S] float64 data,
  [n] int labels).
  """
  if case.components != 2:
    raise ValueError(f"gmm_inputs makes 2 clusters, got components={case.components}")
  rng = np.random.default_rng(seed)
  labels = (np.arange(case.points) < case.points // 3).astype(np.int64)
  rng.shuffle(labels)
  x = rng.standard_normal((case.points, case.features)) + labels[:, None] * 1.0
  return x + 0.5, labels


def gmm_path(case: GmmCase, dtype: str) -> str:
  """Which algebra ``fit_gmm`` uses ('cholesky', 'square_root' or 'subspace')."""
  return gmm_lib._full_path(case.points, case.features, dtype)  # pylint: disable=protected-access


def gmm_flops_bytes(case: GmmCase, n_iter: int, dtype: str,
                    n_reused: int = 0) -> tuple[float, float]:
  """Analytic FLOPs and bytes of a ``fit_gmm`` run of ``n_iter`` iterations.

  ``n_reused`` of them reused the previous M-step and log-densities (EM's fixed
  point, ``GMMResult.n_reused``) and count as no work.

  Follows the algebra of :mod:`comtriplet_jax.clustering.gmm`: products with a
  symmetric or triangular operand skip the blocks above the diagonal of its
  column blocks (``_blocks``), and on the Cholesky path one scatter per M-step
  comes from the total scatter (its point 7; the benchmark's data pass its
  accuracy check).
  """
  n, s, k = case.points, case.features, case.components
  # Plus the M-step from the k-means labels and its E-step; less the reused ones.
  steps = n_iter + 1 - n_reused

  def qr(rows, cols):
    return 2.0 * rows * cols**2 - 2.0 * cols**3 / 3.0

  def blocks(d):           # as many column blocks as the fit uses
    return len(gmm_lib._blocks(d)) - 1  # pylint: disable=protected-access

  def gram(rows, d):       # the lower block triangle of a [d, d] Gram matrix
    return rows * d * d * (blocks(d) + 1) / blocks(d)

  # The column blocks of a triangular operand, as the fit splits them.
  pairs = gmm_lib._block_pairs  # pylint: disable=protected-access

  def upper_times(h, p):   # [h, h] upper-triangular times [h, p], zero blocks skipped
    return sum(2.0 * (hi - lo) * (h - lo) * p for lo, hi in pairs(h))

  def times_upper(p, q):   # [p, q] times [q, q] upper-triangular, likewise
    return sum(2.0 * p * hi * (hi - lo) for lo, hi in pairs(q))

  def inverse(d):          # recursive halving into products, LAPACK leaves
    if d <= gmm_lib._LEAF:  # pylint: disable=protected-access
      return float(d**3)    # a triangular solve against the identity
    h = gmm_lib._split(d)   # pylint: disable=protected-access
    return inverse(h) + inverse(d - h) + upper_times(h, d - h) + times_upper(h, d - h)

  def cholesky_inverse(d):  # the factor and its inverse together, likewise
    if d <= gmm_lib._LEAF:  # pylint: disable=protected-access
      return d**3 / 3 + float(d**3)
    h = gmm_lib._split(d)   # pylint: disable=protected-access
    r12 = sum(2.0 * (hi - lo) * hi * (d - h) for lo, hi in pairs(h))
    schur = 2.0 * h * (d - h) ** 2
    return (cholesky_inverse(h) + cholesky_inverse(d - h) + r12 + schur
            + upper_times(h, d - h) + times_upper(h, d - h))

  def sqrt_factor(m, d):   # R of [m rows; sqrt(reg) I_d]
    panel = gmm_lib._PANEL  # pylint: disable=protected-access
    total = 0.0
    if gmm_lib._uses_panels(m, d):  # pylint: disable=protected-access
      for lo in range(0, d, panel):  # per panel: QR, its complete Q, the product
        w = min(panel, d - lo)
        total += qr(m + w, w) + 4.0 * (m + w)**2 * w + 2.0 * m * (m + w) * (d - lo - w)
      return total
    if gmm_lib._uses_reflectors(m, d):  # pylint: disable=protected-access
      for lo in range(0, d, panel):  # per panel: QR, its reflectors applied (ormqr)
        w, rest = min(panel, d - lo), max(d - lo - panel, 0)
        total += qr(m + w, w) + 4.0 * (m + w) * w * rest - 2.0 * w * w * rest
      return total
    return qr(m + d, d)

  def factor_gram(d):      # R^T R: lower block triangle, inner dimension cut at hi
    b = gmm_lib._blocks(d)  # pylint: disable=protected-access
    return sum(2.0 * (hi - lo) * hi * hi for lo, hi in zip(b[:-1], b[1:]))

  path = gmm_path(case, dtype)
  if path == "cholesky":
    e_step = (k * (cholesky_inverse(s) + gram(n, s)) if n >= 2 * s
              else k * (s**3 / 3 + n * s * s))
    per_step = 4 * n * s * k + (k - 1) * gram(n, s) + e_step
    once = gram(n, s) + (0.0 if n >= 2 * s else k * inverse(s))
  elif path == "square_root":
    per_step = k * (4 * n * s + sqrt_factor(n, s) + n * s * s)
    once = k * (factor_gram(s) + inverse(s))
  else:
    r = n
    per_step = k * (4 * n * r + sqrt_factor(n, r) + n * r * r)
    once = qr(s, n) + k * (2.0 * n * s * s + sqrt_factor(n, s) + inverse(s))
  itemsize = np.dtype(dtype).itemsize
  return steps * per_step + once, 2.0 * steps * n * s * itemsize


def label_agreement(labels: np.ndarray, ref_labels: np.ndarray,
                    n_components: int) -> float:
  """Fraction of equal labels under the best permutation of the components."""
  from scipy.optimize import linear_sum_assignment  # pylint: disable=g-import-not-at-top
  labels = np.asarray(labels)
  ref_labels = np.asarray(ref_labels)
  counts = np.zeros((n_components, n_components), np.int64)
  np.add.at(counts, (labels, ref_labels), 1)
  rows, cols = linear_sum_assignment(-counts)
  return float(counts[rows, cols].sum() / max(len(labels), 1))


def _nan_count(*arrays) -> int:
  return int(sum(np.count_nonzero(np.isnan(np.asarray(a, np.float64))) for a in arrays))


def _default_gmm_fit(x, n_components, *, key):
  return gmm_lib.fit_gmm(x, n_components, key=key, init="kmeans", **GMM_SETTINGS)


def bench_gmm(cases: Sequence[GmmCase], policy: TimingPolicy, rates: dict[str, Any],
              *, fit_fn: Callable[..., gmm_lib.GMMResult] | None = None,
              dtype: str = "float32", log=print) -> list[Row]:
  """GMM rows: ``fit_gmm`` against scikit-learn's GaussianMixture (float64).

  Args:
    cases: sizes.
    policy: timing policy.
    rates: :func:`measure_machine` output (must have ``dtype``'s matmul rate).
    fit_fn: the fit under test, ``fit_fn(x, n_components, key=key) ->
      GMMResult`` (default: ``fit_gmm`` with the settings of GMM_SETTINGS).
    dtype: the JAX fit's dtype.
    log: progress printer.

  Returns:
    Rows.
  """
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
  from sklearn.mixture import GaussianMixture  # pylint: disable=g-import-not-at-top
  fit_fn = fit_fn or _default_gmm_fit
  rows = []
  for case in cases:
    log(f"  gmm {case.sizes()}")
    data, _ = gmm_inputs(case)
    on_device = jnp.asarray(data, dtype)
    key = jax.random.key(0)

    def fit_reference():
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(n_components=case.components, init_params="kmeans",
                               n_init=1, random_state=0, **GMM_SETTINGS).fit(data)

    (result, reference), (ours, ref) = time_calls(
        [lambda: fit_fn(on_device, case.components, key=key), fit_reference], policy)
    labels = np.asarray(gmm_lib.predict(result, on_device))
    loglik = float(jnp.mean(gmm_lib.score_samples(result, on_device)))
    ref_loglik = float(reference.score(data))
    agreement_fraction = label_agreement(labels, reference.predict(data),
                                         case.components)
    nan_count = _nan_count(result.weights, result.means, result.covariances,
                           result.precisions_cholesky, result.responsibilities,
                           result.lower_bound)
    ref_nan_count = _nan_count(reference.weights_, reference.means_,
                               reference.covariances_)
    loglik_diff = abs(loglik - ref_loglik) if math.isfinite(loglik) else math.inf
    loglik_ok = loglik_diff <= GMM_LOGLIK_ATOL + GMM_LOGLIK_RTOL * abs(ref_loglik)
    agrees = (loglik_ok and agreement_fraction >= GMM_LABEL_AGREEMENT
              and nan_count == 0 and ref_nan_count == 0)
    n_iter, n_reused = int(result.n_iter), int(result.n_reused)
    flops, nbytes = gmm_flops_bytes(case, n_iter, dtype, n_reused)
    rows.append(_row(
        kernel="gmm", mode="fit", case=case.sizes(), dtype=dtype,
        reference="sklearn", ours=ours, ref=ref, agrees=agrees,
        error=loglik_diff / max(abs(ref_loglik), 1.0),
        tolerance=GMM_LOGLIK_RTOL + GMM_LOGLIK_ATOL / max(abs(ref_loglik), 1.0),
        agreement=dict(label_agreement=agreement_fraction, loglik=loglik,
                       ref_loglik=ref_loglik, loglik_abs_diff=loglik_diff,
                       nan_count=nan_count, ref_nan_count=ref_nan_count,
                       n_iter=n_iter, n_reused=n_reused,
                       ref_n_iter=int(reference.n_iter_),
                       converged=bool(result.converged),
                       ref_converged=bool(reference.converged_),
                       path=gmm_path(case, dtype), ref_dtype="float64"),
        flops=flops, nbytes=nbytes, rates=rates,
        target_ratio=5.0 if case.points == 1000 else 1.0))
    log(progress_line(rows[-1]))
  return rows


# --------------------------------------------------------------------- triplets
def triplet_inputs(case: TripletCase, seed: int = 0) -> tuple[np.ndarray, ...]:
  """(anchor, positive, negative) [M, S] float32, about half the hinges active."""
  rng = np.random.default_rng(seed)
  shape = (case.triplets, case.features)
  anchor = rng.standard_normal(shape)
  positive = anchor + 1.0 * rng.standard_normal(shape)
  negative = 0.7 * anchor + 1.0 * rng.standard_normal(shape)
  return tuple(v.astype(np.float32) for v in (anchor, positive, negative))


def _np_cosine(u, v):
  """(d(u, v) [M], unit u, unit v, 1/|u|, 1/|v|, cos) for rows of [M, S]."""
  inv_u = 1.0 / np.sqrt(np.einsum("ms,ms->m", u, u))
  inv_v = 1.0 / np.sqrt(np.einsum("ms,ms->m", v, v))
  unit_u, unit_v = u * inv_u[:, None], v * inv_v[:, None]
  cos = np.einsum("ms,ms->m", unit_u, unit_v)
  return 1.0 - cos, unit_u, unit_v, inv_u, inv_v, cos


def _np_cosine_grads(unit_u, unit_v, inv_u, inv_v, cos, weight):
  """weight_m * (d d / d u, d d / d v): d d/du = -(v^ - cos u^) / |u|."""
  grad_u = -(unit_v - cos[:, None] * unit_u) * (weight * inv_u)[:, None]
  grad_v = -(unit_u - cos[:, None] * unit_v) * (weight * inv_v)[:, None]
  return grad_u, grad_v


def triplet_numpy(anchor, positive, negative, *, com: bool,
                  margin: float = TRIPLET_MARGIN):
  """Triplet (Eq. 2) or COM-Triplet (Eq. 3-5, gradient through alpha) loss and grads.

  Vectorised NumPy with the gradients written by hand.

  Returns:
    (loss, (d anchor, d positive, d negative)), each gradient [M, S].
  """
  count = anchor.shape[0]
  d_ap, ua, up, ia, ip, cos_ap = _np_cosine(anchor, positive)
  d_an, ua2, un, ia2, in_, cos_an = _np_cosine(anchor, negative)
  if com:
    d_pn, up2, un2, ip2, in2, cos_pn = _np_cosine(positive, negative)
    # Dist_wa + alpha = d_ap - 0.5 d_an - 0.5 d_pn + 1 - d_pn.
    hinge = d_ap - 0.5 * d_an - 1.5 * d_pn + 1.0
    weights = (1.0, -0.5, -1.5)
  else:
    hinge = d_ap - d_an + margin
    weights = (1.0, -1.0, 0.0)
  active = (hinge > 0).astype(anchor.dtype) / count
  loss = float(np.sum(np.maximum(hinge, 0.0)) / count)
  ga, gp = _np_cosine_grads(ua, up, ia, ip, cos_ap, weights[0] * active)
  ga2, gn = _np_cosine_grads(ua2, un, ia2, in_, cos_an, weights[1] * active)
  grad_a, grad_p, grad_n = ga + ga2, gp, gn
  if com:
    gp2, gn2 = _np_cosine_grads(up2, un2, ip2, in2, cos_pn, weights[2] * active)
    grad_p, grad_n = grad_p + gp2, grad_n + gn2
  return loss, (grad_a, grad_p, grad_n)


def triplet_flops_bytes(case: TripletCase, itemsize: int = 4) -> tuple[float, float]:
  """Analytic FLOPs and bytes of a triplet loss with its three gradients."""
  m, s = case.triplets, case.features
  return 30.0 * m * s, 6.0 * m * s * itemsize


TRIPLET_LOSSES = {
    "triplet": functools.partial(triplet_lib.triplet_loss, margin=TRIPLET_MARGIN),
    "com_triplet": triplet_lib.com_triplet_loss,
}


def bench_triplet(cases: Sequence[TripletCase], policy: TimingPolicy,
                  rates: dict[str, Any], *,
                  loss_fns: dict[str, Callable[..., jax.Array]] | None = None,
                  log=print) -> list[Row]:
  """Triplet and COM-Triplet loss+grads against NumPy with hand-written gradients.

  Args:
    cases: sizes.
    policy: timing policy.
    rates: :func:`measure_machine` output.
    loss_fns: {'triplet': fn, 'com_triplet': fn}, each ``fn(anchor, positive,
      negative) -> scalar`` (default: this project's losses).
    log: progress printer.

  Returns:
    Rows.
  """
  loss_fns = {**TRIPLET_LOSSES, **(loss_fns or {})}
  rows = []
  for name in ("triplet", "com_triplet"):
    loss_and_grads = jax.jit(jax.value_and_grad(loss_fns[name], argnums=(0, 1, 2)))
    for case in cases:
      log(f"  {name} {case.sizes()}")
      inputs = triplet_inputs(case)
      on_device = tuple(jnp.asarray(v) for v in inputs)
      ((value, grads), (ref_value, ref_grads)), (ours, ref) = time_calls(
          [lambda: loss_and_grads(*on_device),
           lambda: triplet_numpy(*inputs, com=name == "com_triplet")], policy)
      loss_error = relative_error(value, ref_value)
      grad_error = max(relative_error(g, r) for g, r in zip(grads, ref_grads))
      error = max(loss_error, grad_error)
      flops, nbytes = triplet_flops_bytes(case)
      rows.append(_row(
          kernel=name, mode="loss+grad", case=case.sizes(), dtype="float32",
          reference="numpy", ours=ours, ref=ref, agrees=error <= TOLERANCE,
          error=error, tolerance=TOLERANCE,
          agreement=dict(loss=float(value), ref_loss=ref_value,
                         loss_error=loss_error, grad_error=grad_error),
          flops=flops, nbytes=nbytes, rates=rates,
          target_ratio=2.0 if case.triplets >= 256 else None))
      log(progress_line(rows[-1]))
  return rows


# ---------------------------------------------------------------------- report
def _largest(rows: list[Row], kernel: str) -> list[Row]:
  candidates = [r for r in rows if r.kernel == kernel]
  if not candidates:
    return []
  biggest = max(math.prod(r.case.values()) for r in candidates)
  return [r for r in candidates if math.prod(r.case.values()) == biggest]


def mark_floor_targets(rows: list[Row]) -> None:
  """Sets the floor target (fraction >= 0.5) on the largest HSIC and GMM rows."""
  for kernel in ("hsic", "gmm"):
    for row in _largest(rows, kernel):
      row.floor_target = FLOOR_TARGET
      row.meets_floor_target = bool(row.floor_fraction >= FLOOR_TARGET)


def summarise_targets(rows: list[Row]) -> list[dict[str, Any]]:
  """One entry per target of issue 3 with the rows it covers and its outcome."""
  def entry(name, selected, field):
    values = [getattr(r, field) for r in selected]
    return dict(target=name, rows=len(selected),
                met=bool(selected) and all(values),
                missed=[dict(kernel=r.kernel, mode=r.mode, reference=r.reference,
                             case=r.case, ratio=r.ratio,
                             floor_fraction=r.floor_fraction, agrees=r.agrees)
                        for r, v in zip(selected, values) if not v])
  pick = lambda **kw: [r for r in rows if all(getattr(r, k) == v for k, v in kw.items())]
  targets = [
      entry("hsic loss+grad >= 3x tf_loop", pick(kernel="hsic", mode="loss+grad",
                                                  reference="tf_loop"), "meets_target"),
      entry("hsic forward >= 2x numpy_loop", pick(kernel="hsic", mode="forward"),
            "meets_target"),
      entry("gmm >= 5x sklearn at n=1000, >= 1x elsewhere, no NaN",
            pick(kernel="gmm"), "meets_target"),
      entry("triplet losses+grads >= 2x numpy for M >= 256",
            [r for r in rows if r.kernel in TRIPLET_LOSSES and r.target_ratio],
            "meets_target"),
      entry("largest hsic and gmm cases within 2x of the floor",
            [r for r in rows if r.floor_target is not None], "meets_floor_target"),
      entry("all results agree with their references", rows, "agrees"),
  ]
  return [t for t in targets if t["rows"]]


def _format_case(case: dict[str, int]) -> str:
  return " ".join(f"{k}={v}" for k, v in case.items())


def _format_ms(seconds: float) -> str:
  ms = seconds * 1e3
  return f"{ms:10.3f}" if ms < 100 else f"{ms:10.1f}"


def format_table(rows: Sequence[Row]) -> str:
  """The printed table: one line per row."""
  header = (f"{'kernel':<12}{'mode':<10}{'case':<26}{'ours ms':>10} "
            f"{'reference':<12}{'ref ms':>10}{'ratio':>8} {'target':<7}"
            f"{'agree':<6}{'error':>9}{'floor':>7}")
  lines = [header, "-" * len(header)]
  for r in rows:
    target = "" if r.target_ratio is None else (
        f">={r.target_ratio:g}" + ("" if r.meets_target else "!"))
    floor = f"{r.floor_fraction:7.2f}"
    if r.floor_target is not None and not r.meets_floor_target:
      floor += "!"
    lines.append(
        f"{r.kernel:<12}{r.mode:<10}{_format_case(r.case):<26}{_format_ms(r.time_s)} "
        f"{r.reference:<12}{_format_ms(r.ref_time_s)}{r.ratio:8.2f} {target:<7}"
        f"{'yes' if r.agrees else 'NO':<6}{r.error:9.1e}{floor}")
  return "\n".join(lines)


def _versions(tf_loaded: bool) -> dict[str, str]:
  import sklearn  # pylint: disable=g-import-not-at-top
  versions = dict(python=platform.python_version(), jax=jax.__version__,
                  numpy=np.__version__, sklearn=sklearn.__version__)
  if tf_loaded and "tensorflow" in sys.modules:
    versions["tensorflow"] = sys.modules["tensorflow"].__version__
  return versions


def run_benchmark(*, only: Sequence[str] = KERNELS, sizes: str = "default",
                  policy: TimingPolicy = TimingPolicy(),
                  hsic_reference: str = "authors", gmm_dtype: str = "float32",
                  use_tensorflow: bool = True, extra_references: bool = True,
                  threads: int = 0, malloc: str = "auto",
                  log=print) -> dict[str, Any]:
  """Runs the selected benchmarks and returns the JSON-ready report.

  Args:
    only: kernels among KERNELS.
    sizes: a key of SIZES.
    policy: timing policy.
    hsic_reference: 'authors' or 'per_head' (see :func:`hsic_numpy_loop`).
    gmm_dtype: the JAX fit's dtype, 'float32' or 'float64' (float64 needs
      ``jax_enable_x64``).
    use_tensorflow: run the TensorFlow HSIC references if installed.
    extra_references: also the informational HSIC rows.
    threads: CPU threads per library, the same for kernels and references
      (:func:`limit_threads`); 0 leaves the libraries' defaults.
    malloc: 'retain' (:func:`retain_freed_memory`), 'default', or 'auto'
      (:func:`resolve_malloc`).
    log: progress printer.

  Returns:
    The report described under "JSON" in the module docstring.
  """
  unknown = set(only) - set(KERNELS)
  if unknown or not only:
    raise ValueError(f"only must name some of {KERNELS}, got {list(only)}")
  if sizes not in SIZES:
    raise ValueError(f"sizes must be one of {sorted(SIZES)}, got {sizes!r}")
  if gmm_dtype not in ("float32", "float64"):
    raise ValueError(f"gmm_dtype must be float32 or float64, got {gmm_dtype!r}")
  if gmm_dtype == "float64" and "gmm" in only and not jax.config.jax_enable_x64:
    raise ValueError("gmm_dtype='float64' needs jax_enable_x64 (set JAX_ENABLE_X64=1)")
  resolved = resolve_malloc(malloc)
  malloc_info = dict(retain_freed_memory(resolved == "retain"), requested=malloc)
  with contextlib.ExitStack() as stack:
    thread_info = limit_threads(threads, stack)
    thread_info["malloc"] = malloc_info
    if "hsic" in only and use_tensorflow:
      _, thread_info["tensorflow_limited"] = _tensorflow(threads)
    return _run(only=only, sizes=sizes, policy=policy, hsic_reference=hsic_reference,
                gmm_dtype=gmm_dtype, use_tensorflow=use_tensorflow,
                extra_references=extra_references, thread_info=thread_info, log=log)


def _run(*, only, sizes, policy, hsic_reference, gmm_dtype, use_tensorflow,
         extra_references, thread_info, log) -> dict[str, Any]:
  """The body of :func:`run_benchmark`, under its thread limits."""
  start = time.perf_counter()
  printer = log

  def log(message):   # every progress message with the seconds since the start
    printer(f"[{time.perf_counter() - start:7.1f} s] {message}")

  load_start = os.getloadavg()
  dtypes = ["float32"] + ([gmm_dtype] if "gmm" in only and gmm_dtype != "float32" else [])
  log("measuring the machine (matmul, copy)")
  rates_start = measure_machine(dtypes, policy, **MACHINE_SIZES.get(sizes, {}))
  rates = rates_start
  chosen = SIZES[sizes]
  rows: list[Row] = []
  if "hsic" in only:
    rows += bench_hsic(chosen["hsic"], policy, rates, reference=hsic_reference,
                       use_tensorflow=use_tensorflow,
                       extra_references=extra_references, log=log)
  if "gmm" in only:
    rows += bench_gmm(chosen["gmm"], policy, rates, dtype=gmm_dtype, log=log)
  if "triplet" in only:
    rows += bench_triplet(chosen["triplet"], policy, rates, log=log)
  log("measuring the machine again (matmul, copy)")
  rates_end = measure_machine(dtypes, policy, **MACHINE_SIZES.get(sizes, {}))
  rates = faster_machine(rates_start, rates_end)
  for row in rows:
    row.floor_s = floor_seconds(row.flops, row.bytes, rates, row.dtype)
    row.floor_fraction = row.floor_s / row.time_s
  mark_floor_targets(rows)
  device = jax.devices()[0]
  machine = dict(
      backend=jax.default_backend(), device=str(device.device_kind),
      device_count=jax.device_count(), cpu_count=os.cpu_count(),
      platform=platform.platform(), processor=platform.processor(),
      versions=_versions("hsic" in only and use_tensorflow),
      load_average_start=list(load_start), load_average_end=list(os.getloadavg()),
      threads=thread_info, machine_start=rates_start, machine_end=rates_end,
      **rates)
  settings = dict(only=list(only), sizes=sizes, policy=dataclasses.asdict(policy),
                  hsic_reference=hsic_reference, hsic_sigma=HSIC_SIGMA,
                  gmm_dtype=gmm_dtype, gmm_settings=GMM_SETTINGS,
                  tolerance=TOLERANCE, use_tensorflow=use_tensorflow,
                  extra_references=extra_references)
  return dict(machine=machine, settings=settings,
              rows=[dataclasses.asdict(r) for r in rows],
              targets=summarise_targets(rows),
              wall_s=time.perf_counter() - start)


def _format_load(load: Sequence[float]) -> str:
  return "/".join(f"{v:.2f}" for v in load)


def _format_threads(info: dict[str, Any]) -> str:
  if not info["threads"]:
    return "library defaults"
  return (f"{info['threads']} (BLAS {'yes' if info['blas'] else 'no'}, XLA CPU pool "
          f"{'yes' if info['xla_cpu_pool_limited'] else 'no'}, TensorFlow "
          f"{ {True: 'yes', False: 'no', None: '-'}[info['tensorflow_limited']]})")


def _format_malloc(info: dict[str, Any] | None) -> str:
  if not info or info["malloc"] == "default":
    return "glibc defaults" + (" (auto: an accelerator)" if info and
                               info.get("requested") == "auto" else "")
  if not info["applied"]:
    return "retain requested, not applied (not glibc)"
  return ("freed memory retained for reuse (glibc: 1 arena, mmap and trim "
          "thresholds 1 GiB)" + (", set after JAX's backends started"
                                 if info["backends_started"] else ""))


def format_report(report: dict[str, Any]) -> str:
  """The table, the machine line and the target summary of a report."""
  machine = report["machine"]
  rows = [Row(**r) for r in report["rows"]]
  start, end = machine["machine_start"], machine["machine_end"]
  rates = ", ".join(
      f"{d} {v / 1e9:.1f} GFLOP/s (start {start['matmul_flops_per_s'][d] / 1e9:.1f}, "
      f"end {end['matmul_flops_per_s'][d] / 1e9:.1f})"
      for d, v in machine["matmul_flops_per_s"].items())
  lines = [
      f"device: {machine['backend']} ({machine['device']}), {machine['cpu_count']} "
      f"CPUs; load average {_format_load(machine['load_average_start'])} at start, "
      f"{_format_load(machine['load_average_end'])} at end",
      f"threads per library: {_format_threads(machine['threads'])}",
      f"malloc: {_format_malloc(machine['threads'].get('malloc'))}",
      f"floor from: matmul {rates}; copy "
      f"{machine['copy_bytes_per_s'] / 1e9:.1f} GB/s",
      "ratio = reference time / our time; floor = floor time / our time "
      "('!' marks a missed target)",
      format_table(rows), "", "targets:"]
  for t in report["targets"]:
    lines.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']} "
                 f"({t['rows']} rows, {len(t['missed'])} missed)")
  lines.append(f"wall time {report['wall_s']:.1f} s")
  return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m comtriplet_jax.benchmark",
      description="Loss-kernel throughput against NumPy, TensorFlow and scikit-learn.")
  parser.add_argument("--only", default=",".join(KERNELS),
                      help="comma-separated subset of hsic,gmm,triplet")
  parser.add_argument("--sizes", default="default", choices=sorted(SIZES))
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed calls per function (default: adaptive)")
  parser.add_argument("--min_time", type=float, default=TimingPolicy.min_time_s,
                      help="adaptive repeats: at least this many seconds")
  parser.add_argument("--max_time", type=float, default=TimingPolicy.max_time_s,
                      help="adaptive repeats: stop after this many seconds")
  parser.add_argument("--hsic_reference", default="authors", choices=HSIC_REFERENCES)
  parser.add_argument("--gmm_dtype", default="float32", choices=("float32", "float64"))
  parser.add_argument("--no_tensorflow", action="store_true",
                      help="skip the TensorFlow HSIC references")
  parser.add_argument("--no_extra_references", action="store_true",
                      help="skip the informational HSIC rows")
  parser.add_argument("--threads", type=int, default=1,
                      help="CPU threads for every library, kernels and references "
                      "alike (0: each library's default)")
  parser.add_argument("--malloc", default="auto", choices=MALLOC_CHOICES,
                      help="retain: glibc keeps freed memory for reuse, for every "
                      "library alike (see the module docstring); default: as is; "
                      "auto: retain unless JAX runs on a GPU or TPU")
  parser.add_argument("--json_out", default=None, help="write the report as JSON here")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point; returns the report."""
  args = _parse_args(argv)
  only = [k.strip() for k in args.only.split(",") if k.strip()]
  if args.gmm_dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  policy = TimingPolicy(repeats=args.repeats, min_time_s=args.min_time,
                        max_time_s=args.max_time)
  report = run_benchmark(only=only, sizes=args.sizes, policy=policy,
                         hsic_reference=args.hsic_reference,
                         gmm_dtype=args.gmm_dtype,
                         use_tensorflow=not args.no_tensorflow,
                         extra_references=not args.no_extra_references,
                         threads=args.threads, malloc=args.malloc,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
  print(format_report(report))
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
