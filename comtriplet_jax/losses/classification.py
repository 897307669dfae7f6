"""Weighted cross-entropy: Eq. 1 of the COM-Triplet paper and L_WCE of BIIGMA-Net.

L = 1/Z sum_i w_{y_i} (-log p_i[y_i]) over the Z valid (unmasked) examples, with
p = softmax(logits) for [B, C] logits (BIIGMA-Net, any number of classes), or
p = sigmoid(logit) for [B] logits of the binary problem, which is Eq. 1 exactly:
-(w_min Y log Y' + w_maj (1 - Y) log(1 - Y')) with class 1 the minority (melanoma).

Class weights:

* 'none': every w = 1, plain cross-entropy.
* 'given': fixed weights, e.g. :func:`class_weights_from_counts` of the training
  set (BIIGMA-Net's inverse class frequency).
* 'batch': the same formula on the class counts of the current batch (the
  COM-Triplet paper's LW strategy after [56]; what BIIGMA-Net's code does). With
  these weights the loss equals the mean over the classes present in the batch of
  each class's mean cross-entropy: a class-balanced loss.

Data parallelism. With ``axis_name`` (inside ``jax.pmap`` or ``jax.shard_map``)
the batch class counts, the weighted sum and the count of valid examples are
summed over devices with ``lax.psum``: every device returns the loss of the
global batch, equal to what one device computes on the concatenated batch. Its
gradient is right too: ``lax.pmean`` of the per-device gradients (what the
training loop does) equals the gradient of the global loss. Under pmap (and
shard_map with ``check_vma=False``) psum transposes to psum, so each device's
gradient is (devices x its share); under shard_map with ``check_vma=True`` the
gradient with respect to replicated parameters is already the global one. All
three are tested.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTINGS = ("none", "given", "batch")
REDUCTIONS = ("mean", "sum", "none")


def _weights_from_counts(counts: jax.Array) -> jax.Array:
  """Inverse-frequency weights of (possibly traced) counts; 0 for empty classes."""
  counts = counts.astype(jnp.result_type(counts.dtype, jnp.float32))
  present = counts > 0
  num_present = jnp.sum(present)
  total = jnp.sum(counts)
  safe_counts = jnp.where(present, counts, 1.0)
  return jnp.where(present, total / (num_present * safe_counts), 0.0)


def class_weights_from_counts(counts: Sequence[float] | jax.Array) -> jax.Array:
  """Inverse class-frequency weights normalised to a weighted mean of 1 over the data.

  w_c = Z / (C' n_c) for the C' classes with n_c > 0 examples (Z = sum_c n_c), and
  w_c = 0 for classes without examples. Then sum_c n_c w_c = Z: averaged over the
  examples the weights are 1, so the weighted loss keeps the scale of the
  unweighted one, and every present class carries the same total weight Z / C'
  (scikit-learn's ``class_weight='balanced'``).

  Args:
    counts: [C] non-negative example counts per class, at least one positive.

  Returns:
    [C] float32 weights (float64 under x64 with float64 counts).
  """
  try:
    concrete = np.asarray(counts, dtype=np.float64)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    concrete = None
  if concrete is not None:
    if concrete.ndim != 1 or concrete.size == 0:
      raise ValueError(f"counts must be a non-empty vector [C], got shape "
                       f"{concrete.shape}")
    if not np.all(np.isfinite(concrete)) or np.any(concrete < 0):
      raise ValueError(f"counts must be finite and >= 0, got {concrete}")
    if not np.any(concrete > 0):
      raise ValueError("counts are all zero: no class to weight")
  counts = jnp.asarray(counts)
  if counts.ndim != 1:
    raise ValueError(f"counts must be a vector [C], got shape {counts.shape}")
  return _weights_from_counts(counts)


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                           class_weights: jax.Array | None = None,
                           weighting: str | None = None,
                           mask: jax.Array | None = None,
                           axis_name: str | None = None,
                           reduction: str = "mean") -> jax.Array:
  """Class-weighted cross-entropy (COM-Triplet Eq. 1; BIIGMA-Net L_WCE).

  Args:
    logits: [B, C] class logits (softmax, C >= 2), or [B] logits of class 1 for the
      binary sigmoid form of Eq. 1.
    labels: [B] integer classes in [0, C) (binary: 0 majority, 1 minority). A
      label outside that range gives a zero term: such examples must be masked.
    class_weights: [C] weights for ``weighting='given'`` (C = 2 for [B] logits).
    weighting: 'none', 'given' or 'batch' (see the module docstring). None picks
      'given' when ``class_weights`` is passed and 'none' otherwise.
    mask: optional [B] booleans (or 0/1); False drops a padded example from the
      loss, the class counts and the normaliser Z.
    axis_name: a mapped axis (pmap / shard_map) to sum counts and normaliser over;
      the result is then the loss of the global batch on every device.
    reduction: 'mean' (sum of weighted terms / Z, Eq. 1; 0 when Z = 0), 'sum', or
      'none' (the [B] weighted per-example terms, 0 where masked; with
      ``axis_name`` and 'batch' weighting the weights are the global ones).

  Returns:
    A float32 scalar, or [B] for reduction='none'.
  """
  if weighting is None:
    weighting = "none" if class_weights is None else "given"
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  if (weighting == "given") != (class_weights is not None):
    raise ValueError(f"class_weights must be given exactly when weighting='given' "
                     f"(weighting={weighting!r}, class_weights "
                     f"{'given' if class_weights is not None else 'None'})")
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be [B], got shape {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer classes, got dtype {labels.dtype}")
  batch = labels.shape[0]
  # bf16/f16 logits from a mixed-precision model: the log-probabilities in float32.
  dtype = jnp.result_type(logits.dtype, jnp.float32)
  logits = logits.astype(dtype)
  if logits.shape == (batch,):
    num_classes = 2
    # log p(class 1) = log sigmoid(x), log p(class 0) = log sigmoid(-x): Eq. 1
    # without forming Y' (stable for large |x|).
    log_probs = jnp.stack([jax.nn.log_sigmoid(-logits), jax.nn.log_sigmoid(logits)],
                          axis=-1)
  elif logits.ndim == 2 and logits.shape[0] == batch and logits.shape[1] >= 2:
    num_classes = logits.shape[1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
  else:
    raise ValueError(f"logits must be [B, C] with C >= 2 or [B] (binary), with "
                     f"B = {batch} from labels; got shape {logits.shape}")
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=dtype)
  if mask is None:
    valid = jnp.ones((batch,), dtype)
  else:
    mask = jnp.asarray(mask)
    if mask.shape != (batch,):
      raise ValueError(f"mask must be [B] = [{batch}], got shape {mask.shape}")
    valid = mask.astype(bool).astype(dtype)
  one_hot = one_hot * valid[:, None]

  def total(x):
    return x if axis_name is None else jax.lax.psum(x, axis_name)

  if weighting == "none":
    weights = jnp.ones((num_classes,), dtype)
  elif weighting == "given":
    weights = jnp.asarray(class_weights, dtype)
    if weights.shape != (num_classes,):
      raise ValueError(f"class_weights must be [C] = [{num_classes}], got shape "
                       f"{weights.shape}")
  else:
    weights = _weights_from_counts(total(jnp.sum(one_hot, axis=0)))
  # Masked rows of one_hot are zero, so their terms are exactly 0; `where` keeps a
  # non-finite logit of a padded example out of the sum.
  per_example = -jnp.sum(one_hot * jnp.where(valid[:, None] > 0, log_probs, 0.0),
                         axis=-1)
  # An elementwise sum, not a matrix product: GPUs may round f32 matmuls to TF32.
  per_example = per_example * jnp.sum(one_hot * weights, axis=-1)
  if reduction == "none":
    return per_example
  weighted_sum = total(jnp.sum(per_example))
  if reduction == "sum":
    return weighted_sum
  count = total(jnp.sum(valid))
  return jnp.where(count > 0, weighted_sum / jnp.maximum(count, 1.0), 0.0)
