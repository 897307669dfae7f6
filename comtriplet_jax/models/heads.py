"""Heads on top of a backbone's pooled features.

COM-Triplet (000, "Architectural Details"): the backbone's dense layers are replaced by
an embedding layer, with "a dropout layer with a 0.3 dropout rate ... between the
backbone CNN architectures and the embedding layer". The direct classifiers (Eq. 1) put
a dense classification layer on the pooled features instead.

Both heads return float32 whatever the compute dtype, so losses and metrics run in
full precision. Dropout is active only with ``train=True`` and then needs a
``'dropout'`` rng.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from comtriplet_jax.models import common


def _check_pooled(pooled: jax.Array, head: str) -> None:
  if pooled.ndim != 2:
    raise ValueError(f"{head} expects pooled features [B, F], got {pooled.shape}")


def _check_rate(rate: float, head: str) -> None:
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"{head} dropout_rate must lie in [0, 1), got {rate}")


class EmbeddingHead(nn.Module):
  """Dropout then a dense layer to the embedding space: [B, F] -> float32 [B, S].

  Attributes:
    embedding_size: S, the embedding dimension the clustering works in.
    dropout_rate: dropout on the pooled features (0.3 in the paper).
    dtype: compute dtype of the dense layer; its parameters are float32.
  """
  embedding_size: int
  dropout_rate: float = 0.3
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled: jax.Array, train: bool) -> jax.Array:
    _check_pooled(pooled, "EmbeddingHead")
    _check_rate(self.dropout_rate, "EmbeddingHead")
    if self.embedding_size < 1:
      raise ValueError(f"embedding_size must be >= 1, got {self.embedding_size}")
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
    x = nn.Dense(self.embedding_size, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=common.KERAS_GLOROT_UNIFORM, name="embedding")(x)
    return x.astype(jnp.float32)


class ClassifierHead(nn.Module):
  """Optional dropout then a dense layer to class logits: [B, F] -> float32 [B, K].

  Attributes:
    num_classes: K; binary tasks use K = 2 with a softmax cross-entropy (Eq. 1).
    dropout_rate: dropout on the pooled features (0 by default).
    dtype: compute dtype of the dense layer; its parameters are float32.
  """
  num_classes: int
  dropout_rate: float = 0.0
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled: jax.Array, train: bool) -> jax.Array:
    _check_pooled(pooled, "ClassifierHead")
    _check_rate(self.dropout_rate, "ClassifierHead")
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=common.KERAS_GLOROT_UNIFORM, name="logits")(x)
    return x.astype(jnp.float32)
