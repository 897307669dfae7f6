"""The loss-kernel benchmark: it runs, checks agreement, and its references are right.

Speed is never asserted: only that every number is computed, that the agreement
checks pass for this project's kernels and fail for a perturbed one, and that the
NumPy and TensorFlow references equal independent formulas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy.spatial import distance

from comtriplet_jax import benchmark as bm

TINY = bm.TimingPolicy(repeats=1)
quiet = lambda *args, **kwargs: None


def run_tiny(**kwargs):
  # malloc='default': the allocator setting is process-wide, not for pytest.
  kwargs = {**dict(sizes="tiny", policy=TINY, threads=0, malloc="default", log=quiet),
            **kwargs}
  return bm.run_benchmark(**kwargs)


@pytest.fixture(scope="module")
def report_and_log():
  messages = []
  return run_tiny(log=messages.append), messages


@pytest.fixture(scope="module")
def report(report_and_log):
  return report_and_log[0]


# ---------------------------------------------------------------- the report
def test_progress_log_times_every_row(report_and_log):
  report, messages = report_and_log
  # Every message carries the seconds since the start, never decreasing.
  elapsed = [float(m[1:m.index(" s]")]) for m in messages]
  assert all(m.startswith("[") for m in messages) and elapsed == sorted(elapsed)
  assert elapsed[-1] <= report["wall_s"] + 0.05     # printed to 0.1 s
  # One progress line per row, in order, with its medians and first calls.
  lines = [m for m in messages if " vs " in m and "first calls" in m]
  assert len(lines) == len(report["rows"])
  for line, row in zip(lines, report["rows"]):
    expected = bm.progress_line(bm.Row(**row))
    assert line.endswith(expected)
    assert f"{row['mode']} vs {row['reference']}" in line
    assert f"{row['first_call_s']:.2f} s and {row['ref_first_call_s']:.2f} s" in line


def test_report_has_the_documented_fields(report):
  assert set(report) == {"machine", "settings", "rows", "targets", "wall_s"}
  machine = report["machine"]
  for field in ("backend", "device", "device_count", "cpu_count", "versions",
                "load_average_start", "load_average_end", "matmul_flops_per_s",
                "copy_bytes_per_s", "matmul_size", "copy_array_bytes", "threads",
                "machine_start", "machine_end"):
    assert field in machine, field
  # The floor uses the faster of the two machine measurements.
  assert machine["matmul_flops_per_s"]["float32"] == max(
      machine["machine_start"]["matmul_flops_per_s"]["float32"],
      machine["machine_end"]["matmul_flops_per_s"]["float32"])
  assert len(machine["load_average_start"]) == 3
  assert machine["matmul_flops_per_s"]["float32"] > 0
  assert machine["copy_bytes_per_s"] > 0
  assert machine["threads"]["malloc"]["malloc"] == "default"
  assert not machine["threads"]["malloc"]["applied"]
  assert report["settings"]["sizes"] == "tiny"
  assert report["settings"]["policy"]["repeats"] == 1
  # The report is JSON as written by --json_out, and reads back into rows.
  again = json.loads(json.dumps(report))
  assert [bm.Row(**r) for r in again["rows"]]
  assert report["wall_s"] > 0

  fields = {f.name for f in dataclasses.fields(bm.Row)}
  kinds = set()
  for row in report["rows"]:
    assert set(row) == fields
    kinds.add((row["kernel"], row["mode"], row["reference"]))
    assert row["time_s"] > 0 and row["ref_time_s"] > 0
    assert row["repeats"] == row["ref_repeats"] == 1
    assert row["ratio"] == pytest.approx(row["ref_time_s"] / row["time_s"])
    assert row["flops"] > 0 and row["bytes"] > 0
    rates = machine["matmul_flops_per_s"][row["dtype"]]
    assert row["floor_s"] == pytest.approx(
        max(row["flops"] / rates, row["bytes"] / machine["copy_bytes_per_s"]))
    assert row["floor_fraction"] == pytest.approx(row["floor_s"] / row["time_s"])
    if row["target_ratio"] is not None:
      assert row["meets_target"] == (row["ratio"] >= row["target_ratio"]
                                     and row["agrees"])
  expected = {("hsic", "forward", "numpy_loop"), ("hsic", "loss+grad", "numpy_loop"),
              ("gmm", "fit", "sklearn"), ("triplet", "loss+grad", "numpy"),
              ("com_triplet", "loss+grad", "numpy")}
  if machine["versions"].get("tensorflow"):
    expected |= {("hsic", "loss+grad", "tf_loop"), ("hsic", "loss+grad", "tf_batched")}
  assert kinds == expected


def test_real_kernels_agree_with_every_reference(report):
  for row in report["rows"]:
    assert row["agrees"], row
    assert row["error"] <= row["tolerance"]
  gmm = next(r for r in report["rows"] if r["kernel"] == "gmm")
  assert gmm["agreement"]["label_agreement"] == 1.0
  assert gmm["agreement"]["nan_count"] == 0
  assert math.isfinite(gmm["agreement"]["loglik"])
  targets = {t["target"]: t for t in report["targets"]}
  assert targets["all results agree with their references"]["met"]
  # The largest HSIC and GMM cases carry the floor target.
  floor_rows = [r for r in report["rows"] if r["floor_target"] is not None]
  assert {r["kernel"] for r in floor_rows} == {"hsic", "gmm"}
  assert all(r["meets_floor_target"] == (r["floor_fraction"] >= 0.5)
             for r in floor_rows)


def test_printed_table_has_a_line_per_row(report):
  text = bm.format_report(report)
  table_lines = [l for l in text.splitlines()
                 if l.split() and l.split()[0] in ("hsic", "gmm", "triplet",
                                                   "com_triplet")]
  assert len(table_lines) == len(report["rows"])
  assert "targets:" in text and "wall time" in text


# ------------------------------------------------------ wrong kernels are caught
def _scale_gradient(fn, factor):
  """The same value as fn, a gradient `factor` times too large."""
  def wrong(*args, **kwargs):
    value = fn(*args, **kwargs)
    return value + (factor - 1.0) * (value - jax.lax.stop_gradient(value))
  return wrong


def test_perturbed_hsic_fails_the_agreement(monkeypatch):
  right = bm._default_hsic_loss
  monkeypatch.setattr(bm, "_default_hsic_loss",
                      lambda f, *, sigma: 1.01 * right(f, sigma=sigma))
  rows = run_tiny(only=["hsic"], use_tensorflow=False)["rows"]
  assert rows and not any(r["agrees"] for r in rows)
  assert not any(r["meets_target"] for r in rows if r["target_ratio"])
  # A right value with a wrong gradient fails the loss+grad rows only.
  monkeypatch.setattr(bm, "_default_hsic_loss", _scale_gradient(right, 1.01))
  rows = run_tiny(only=["hsic"], use_tensorflow=False)["rows"]
  assert {(r["mode"], r["agrees"]) for r in rows} == {("forward", True),
                                                      ("loss+grad", False)}
  grad_row = next(r for r in rows if r["mode"] == "loss+grad")
  assert grad_row["agreement"]["loss_error"] < grad_row["tolerance"]
  assert grad_row["agreement"]["grad_error"] > grad_row["tolerance"]


def test_perturbed_triplet_losses_fail_the_agreement(monkeypatch):
  monkeypatch.setitem(bm.TRIPLET_LOSSES, "triplet",
                      lambda a, p, n: 1.01 * bm.triplet_lib.triplet_loss(
                          a, p, n, margin=bm.TRIPLET_MARGIN))
  monkeypatch.setitem(bm.TRIPLET_LOSSES, "com_triplet",
                      _scale_gradient(bm.triplet_lib.com_triplet_loss, 1.01))
  report = run_tiny(only=["triplet"])
  rows = {r["kernel"]: r for r in report["rows"]}
  assert not rows["triplet"]["agrees"] and not rows["com_triplet"]["agrees"]
  assert rows["com_triplet"]["agreement"]["loss_error"] < bm.TOLERANCE
  targets = {t["target"]: t for t in report["targets"]}
  assert not targets["all results agree with their references"]["met"]


def test_perturbed_gmm_fails_the_agreement(monkeypatch):
  right = bm._default_gmm_fit

  def shifted_means(x, n_components, *, key):
    result = right(x, n_components, key=key)
    return result._replace(means=result.means + 0.2)

  monkeypatch.setattr(bm, "_default_gmm_fit", shifted_means)
  row = run_tiny(only=["gmm"])["rows"][0]
  assert not row["agrees"]
  assert row["agreement"]["loglik_abs_diff"] > 1e-2
  assert not row["meets_target"]

  def nan_covariances(x, n_components, *, key):
    result = right(x, n_components, key=key)
    return result._replace(covariances=result.covariances * np.nan)

  monkeypatch.setattr(bm, "_default_gmm_fit", nan_covariances)
  row = run_tiny(only=["gmm"])["rows"][0]
  assert not row["agrees"]
  assert row["agreement"]["nan_count"] > 0


# ---------------------------------------- the references against independent formulas
def explicit_hsic_loss(features, sigma):
  """Mean over samples of sum_{k1 < k2} Tr(K H L H) / N^2, from scipy distances."""
  batch, heads, n, _ = features.shape
  h = np.eye(n) - np.ones((n, n)) / n
  total = 0.0
  for b in range(batch):
    kernels = [np.exp(-distance.cdist(f, f, "sqeuclidean") / (2 * sigma**2))
               for f in features[b]]
    for k1 in range(heads):
      for k2 in range(k1 + 1, heads):
        total += np.trace(kernels[k1] @ h @ kernels[k2] @ h) / n**2
  return total / batch


def test_numpy_hsic_reference_equals_the_trace_formula_and_its_own_gradient():
  features = bm.hsic_inputs(bm.HsicCase(2, 3, 6, 4), seed=3).astype(np.float64)
  expected = explicit_hsic_loss(features, bm.HSIC_SIGMA)
  assert expected > 1e-3  # inputs with real dependence between heads
  for per_pair in (True, False):
    value, grad = bm.hsic_numpy_loop(features, per_pair_kernels=per_pair,
                                     with_grad=True)
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    # The hand-written backward pass against central finite differences.
    step = 1e-6
    numeric = np.zeros_like(features)
    for index in np.ndindex(features.shape):
      plus, minus = features.copy(), features.copy()
      plus[index] += step
      minus[index] -= step
      numeric[index] = (bm.hsic_numpy_loop(plus)[0]
                        - bm.hsic_numpy_loop(minus)[0]) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)


def test_tensorflow_hsic_references_equal_the_trace_formula():
  tf, _ = bm._tensorflow()
  if tf is None:
    pytest.skip("TensorFlow is not installed")
  features = bm.hsic_inputs(bm.HsicCase(2, 3, 6, 4), seed=4)
  expected = explicit_hsic_loss(features.astype(np.float64), bm.HSIC_SIGMA)
  _, numpy_grad = bm.hsic_numpy_loop(features.astype(np.float64), with_grad=True)
  with tf.device("/CPU:0"):
    for batched in (False, True):
      forward, loss_and_grad = bm.make_tf_hsic(tf, batched=batched)
      np.testing.assert_allclose(forward(tf.constant(features)).numpy(), expected,
                                 rtol=1e-5)
      value, grad = loss_and_grad(tf.constant(features))
      np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5)
      np.testing.assert_allclose(grad.numpy(), numpy_grad, rtol=1e-4,
                                 atol=1e-5 * np.abs(numpy_grad).max())


def explicit_triplet_loss(anchor, positive, negative, com, margin):
  """Eq. 2 or Eq. 3-5 triplet by triplet, with scipy's cosine distance."""
  total = 0.0
  for a, p, n in zip(anchor, positive, negative):
    d_ap, d_an, d_pn = (distance.cosine(a, p), distance.cosine(a, n),
                        distance.cosine(p, n))
    if com:
      total += max(0.0, d_ap - 0.5 * (d_an + d_pn) + (1.0 - d_pn))
    else:
      total += max(0.0, d_ap - d_an + margin)
  return total / len(anchor)


@pytest.mark.parametrize("com", [False, True])
def test_numpy_triplet_reference_equals_the_formula_and_finite_differences(com):
  inputs = [v.astype(np.float64) for v in bm.triplet_inputs(bm.TripletCase(12, 5), 1)]
  value, grads = bm.triplet_numpy(*inputs, com=com)
  expected = explicit_triplet_loss(*inputs, com, bm.TRIPLET_MARGIN)
  np.testing.assert_allclose(value, expected, rtol=1e-12)
  assert 0 < value
  step = 1e-6
  for which in range(3):
    numeric = np.zeros_like(inputs[which])
    for index in np.ndindex(numeric.shape):
      plus = [v.copy() for v in inputs]
      minus = [v.copy() for v in inputs]
      plus[which][index] += step
      minus[which][index] -= step
      numeric[index] = (explicit_triplet_loss(*plus, com, bm.TRIPLET_MARGIN)
                        - explicit_triplet_loss(*minus, com, bm.TRIPLET_MARGIN)
                        ) / (2 * step)
    np.testing.assert_allclose(grads[which], numeric, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------- helpers
def test_agreement_helpers():
  labels = np.array([0, 0, 1, 1, 1, 0, 1, 0, 0, 1])
  assert bm.label_agreement(1 - labels, labels, 2) == 1.0
  wrong = labels.copy()
  wrong[0] = 1
  assert bm.label_agreement(1 - wrong, labels, 2) == pytest.approx(0.9)
  assert bm.relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
  assert bm.relative_error(np.array([1.0, 2.2]), np.array([1.0, 2.0])) == (
      pytest.approx(0.1))
  assert bm.relative_error(np.array([np.nan]), np.array([1.0])) == math.inf
  with pytest.raises(ValueError, match="shapes differ"):
    bm.relative_error(np.zeros(2), np.zeros(3))


def test_time_call_warms_up_then_times_the_requested_calls():
  calls = []
  output, timing = bm.time_call(lambda: calls.append(1) or len(calls),
                                bm.TimingPolicy(repeats=4))
  assert output == 1  # the warm-up call's output
  assert len(calls) == 5 and timing.repeats == 4
  assert timing.median_s >= 0 and timing.first_call_s >= 0
  _, timing = bm.time_call(lambda: None, bm.TimingPolicy(max_repeats=7,
                                                         min_time_s=10.0))
  assert timing.repeats == 7
  with pytest.raises(ValueError, match="repeats"):
    bm.TimingPolicy(repeats=0)
  # Each function in its own block: a warm-up call, then its timed calls.
  order = []
  outputs, timings = bm.time_calls([lambda: order.append("a") or "A",
                                    lambda: order.append("b") or "B"],
                                   bm.TimingPolicy(repeats=3))
  assert outputs == ["A", "B"]
  assert order == ["a"] * 4 + ["b"] * 4
  assert [t.repeats for t in timings] == [3, 3]


def test_analytic_counts():
  # B=1, K=1, N=2, C=3: Gram 2 * 4 * 3, kernel entries 10 * 4, pairs 2 * 4.
  assert bm.hsic_flops_bytes(bm.HsicCase(1, 1, 2, 3), False) == (72.0, 24.0)
  assert bm.hsic_flops_bytes(bm.HsicCase(1, 1, 2, 3), True) == (144.0, 48.0)
  # N = 196 on CPU: Gram blocks (0, 64, 128, 196), 3 * 64^2 + 2 * 64 * 68 + 68^2
  # = 25616 of the 38416 entries multiplied.
  blocked, _ = bm.hsic_flops_bytes(bm.HsicCase(1, 1, 196, 8), False,
                                   implementation="per_sample")
  full, _ = bm.hsic_flops_bytes(bm.HsicCase(1, 1, 196, 8), False,
                                implementation="vmapped")
  assert full - blocked == 2 * (38416 - 25616) * 8
  with_grad, _ = bm.hsic_flops_bytes(bm.HsicCase(1, 1, 196, 8), True,
                                     implementation="per_sample")
  assert with_grad == blocked + full
  assert bm.triplet_flops_bytes(bm.TripletCase(2, 3)) == (180.0, 144.0)
  assert bm.gmm_path(bm.GmmCase(45, 1024), "float32") == "subspace"
  assert bm.gmm_path(bm.GmmCase(1000, 1024), "float32") == "square_root"
  assert bm.gmm_path(bm.GmmCase(1000, 1024), "float64") == "cholesky"
  counts = [bm.gmm_flops_bytes(bm.GmmCase(1000, 64), i, "float32") for i in (2, 3, 4)]
  flops = [f for f, _ in counts]
  bytes_2, bytes_4 = counts[0][1], counts[2][1]
  # The same work per EM iteration, on top of a once-only part (the total scatter).
  assert flops[2] - flops[1] == pytest.approx(flops[1] - flops[0])
  assert flops[0] > 3 * (flops[1] - flops[0]) and bytes_4 / bytes_2 == 5 / 3
  # An iteration that reused the previous M-step (EM's fixed point) is no work.
  assert bm.gmm_flops_bytes(bm.GmmCase(1000, 64), 4, "float32", 2) == counts[0]


def test_thread_limit_caps_blas_and_is_undone():
  threadpoolctl = pytest.importorskip("threadpoolctl")
  import scipy.linalg  # pylint: disable=g-import-not-at-top,unused-import
  import sklearn.mixture  # pylint: disable=g-import-not-at-top,unused-import

  def blas_threads():
    return {lib["filepath"]: lib["num_threads"]
            for lib in threadpoolctl.threadpool_info()}

  original = blas_threads()
  with contextlib.ExitStack() as stack:
    info = bm.limit_threads(1, stack)
    assert info["blas"] and all(n == 1 for _, n in info["blas"])
    assert set(blas_threads().values()) == {1}
    # Under pytest JAX's backends have started: its pool keeps its size.
    assert not info["xla_cpu_pool_limited"]
  assert blas_threads() == original
  with contextlib.ExitStack() as stack:
    assert bm.limit_threads(0, stack)["blas"] == []
    with pytest.raises(ValueError, match="threads"):
      bm.limit_threads(-1, stack)


def test_command_line_writes_the_json(tmp_path, capsys):
  path = tmp_path / "bench.json"
  bm.main(["--sizes=tiny", "--only=triplet", "--repeats=1", "--threads=0",
           "--malloc=default", f"--json_out={path}"])
  written = json.loads(path.read_text())
  assert {r["kernel"] for r in written["rows"]} == {"triplet", "com_triplet"}
  assert "com_triplet" in capsys.readouterr().out
  with pytest.raises(ValueError, match="only"):
    bm.run_benchmark(only=["nope"], sizes="tiny", log=quiet)
  with pytest.raises(ValueError, match="sizes"):
    bm.run_benchmark(sizes="huge", log=quiet)
  with pytest.raises(ValueError, match="malloc"):
    bm.run_benchmark(sizes="tiny", malloc="tcmalloc", log=quiet)


def test_auto_malloc_retains_on_cpu_and_not_on_accelerators(monkeypatch):
  assert bm.resolve_malloc("retain") == "retain"
  assert bm.resolve_malloc("default") == "default"
  with pytest.raises(ValueError, match="malloc"):
    bm.resolve_malloc("jemalloc")
  for platforms, accelerator in (("cpu", False), ("cuda,cpu", True), ("tpu", True),
                                 ("cpu,cuda", False), (" ROCM ", True)):
    assert bm.accelerator_expected(platforms) == accelerator, platforms
  # Unset: judged from the installed plugins; this test machine has none.
  assert jax.default_backend() == "cpu"
  assert not bm.accelerator_expected("")
  assert bm.resolve_malloc("auto") == "retain"
  monkeypatch.setattr(bm, "accelerator_expected", lambda platforms=None: True)
  assert bm.resolve_malloc("auto") == "default"


def test_retaining_freed_memory_applies_before_the_backends_start():
  # In a fresh interpreter, as the command line does it (process-wide setting).
  code = ("import json; from comtriplet_jax import benchmark as bm; "
          "print(json.dumps(bm.retain_freed_memory(True)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, timeout=300).stdout
  info = json.loads(out.strip().splitlines()[-1])
  assert info["malloc"] == "retain" and not info["backends_started"]
  assert info["applied"] == (platform.system() == "Linux"
                             and platform.libc_ver()[0] == "glibc")
  assert bm.retain_freed_memory(False) == dict(
      malloc="default", applied=False, backends_started=True)

