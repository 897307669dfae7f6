"""BIIGMA-Net (Roy et al., MICCAI 2025): MICA heads and background vector sampling.

The network (Fig. 2 of the paper) on a backbone with named early exits:

1. The backbone gives the last feature map R [B, H, W, C] and earlier exits
   R^(l) (DenseNet-121: 'pool3_relu' 28x28x512, 'pool4_relu' 14x14x1024 and the
   final 'relu' 7x7x1024 at 224 px; the last exit is R itself).
2. Clean branch: MICA(R) -> R^CA [B, H, W, K C] (Eq. 4) -> global average
   pooling -> dense classifier G. This is the only branch at inference.
3. Spatial attention (Eq. 5-6), training only: every exit goes through an
   adapter A (1x1 convolution, then max pooling to R's H x W); the adapted maps
   are concatenated into S~; low-variance channels are pruned; M =
   sigmoid(channel mean of S) [B, H, W] and M_inv = 1 - M.
4. Background vector sampling (Eq. 6-7): the non-salient vectors R * M_inv of the
   whole global batch (gathered over the data-parallel axis), minus the zero
   vectors, form the background set; every position of every image draws one
   vector from it at random, giving Theta [B, H, W, C]; the hybrid
   H = M * R + M_inv * Theta goes through the same MICA and the same G.

Choices the paper leaves open, made here and said where they are made:

* Pruning direction. The text says "removing low-variance channels", its formula
  keeps the channels with var < mean(var); the text (and the authors' code,
  which keeps channels above the mean variance on its head maps) wins: a channel
  is kept when its spatial variance is at least the mean over channels, per
  sample (so that an image's map does not depend on the rest of its batch).
  ``>=`` rather than ``>`` keeps at least one channel.
* The adapter's 1x1 convolution keeps the exit's channel count, with a bias and
  no activation (Keras' Conv2D defaults; the paper names only "a 1x1 layer").
* Theta is a sample of the batch, treated like data: it sits under
  ``stop_gradient`` (collectives over the data axis carry no gradient, see
  ``methods/base.py``), while M and R in H keep theirs, so the adapters learn
  through the hybrid's loss.
* The classifier G is global average pooling and one dense layer (the authors'
  code; the paper does not state it).

Switches that reproduce the authors' code (``biigma_official_code.md``):
``adapter='avgpool'`` (pooling only, no 1x1 convolution; ``'maxpool'`` is their
``src/`` variant), ``exit_pruning=False`` (soft map of all 2560 exit channels),
``head_map=True`` (the variance-pruned map of every MICA head, multiplied over
heads, for their map-distance loss) and ``sampling='permutation'`` (one random
permutation of all B H W vectors of the global batch, zero vectors included,
instead of a uniform draw from the non-zero ones).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from comtriplet_jax.models import common
from comtriplet_jax.models import heads as heads_lib
from comtriplet_jax.models import mica as mica_lib

ADAPTERS = ("conv_maxpool", "avgpool", "maxpool")
SAMPLINGS = ("uniform", "permutation")


# ------------------------------------------------------------ pure functions
def pool_to(x: jax.Array, size: tuple[int, int], kind: str) -> jax.Array:
  """Max or average pooling of [B, h, w, c] down to [B, H, W, c] (adapter A).

  The window and stride are (h // H, w // W) (4, 2, 1 for DenseNet-121's exits
  at 224 px); rows and columns past H * (h // H) are dropped, which happens only
  when an odd size was floored on the way down the backbone.
  """
  if x.ndim != 4:
    raise ValueError(f"pool_to expects [B, h, w, c], got {x.shape}")
  height, width = size
  kh, kw = x.shape[1] // height, x.shape[2] // width
  if kh < 1 or kw < 1:
    raise ValueError(f"cannot pool a {x.shape[1]}x{x.shape[2]} exit down to "
                     f"{height}x{width}: exits must be at least as large as R")
  if kind not in ("max", "avg"):
    raise ValueError(f"kind must be 'max' or 'avg', got {kind!r}")
  x = x[:, :height * kh, :width * kw]
  if (kh, kw) == (1, 1):
    return x
  pool = nn.max_pool if kind == "max" else nn.avg_pool
  return pool(x, (kh, kw), strides=(kh, kw), padding="VALID")


def high_variance_channels(features: jax.Array) -> jax.Array:
  """Channels kept by the pruning of Eq. 5: spatial variance >= its channel mean.

  Args:
    features: [B, H, W, C] the adapted, concatenated exits S~.

  Returns:
    [B, C] booleans (no gradient), at least one True per sample.
  """
  variance = jnp.var(jax.lax.stop_gradient(features).astype(jnp.float32), axis=(1, 2))
  return variance >= jnp.mean(variance, axis=-1, keepdims=True)


def channel_mean_attention(features: jax.Array, keep: jax.Array | None = None
                           ) -> jax.Array:
  """M = sigmoid(mean over the kept channels), Eq. 5: [B,H,W,C] -> float32 [B,H,W].

  Args:
    features: [B, H, W, C].
    keep: optional [B, C] mask of the channels to average (all when None); a
      sample with no kept channel gets sigmoid(0) = 0.5 everywhere.
  """
  x = features.astype(jnp.float32)
  if keep is None:
    return jax.nn.sigmoid(jnp.mean(x, axis=-1))
  if keep.shape != (x.shape[0], x.shape[-1]):
    raise ValueError(f"keep must be [B, C] = {(x.shape[0], x.shape[-1])}, got "
                     f"{keep.shape}")
  keep = keep.astype(jnp.float32)
  count = jnp.sum(keep, axis=-1)
  total = jnp.einsum("bhwc,bc->bhw", x, keep)
  return jax.nn.sigmoid(total / jnp.maximum(count, 1.0)[:, None, None])


def head_variance_map(head_outputs: jax.Array, *, axis_name: str | None = None
                      ) -> jax.Array:
  """The authors' MICA map: per head, prune then average, sigmoid; product over heads.

  For each head, a channel is kept where its spatial variance is above the mean
  variance over the batch and the channels (the global batch when
  ``axis_name`` is given: the mean of equal-sized device batches); the kept
  channels are averaged into a map, passed through a sigmoid, and the K head
  maps are multiplied.

  Args:
    head_outputs: [B, K, H, W, C].
    axis_name: data-parallel axis for the batch-mean threshold, or None.

  Returns:
    float32 [B, H, W].
  """
  if head_outputs.ndim != 5:
    raise ValueError(f"head_outputs must be [B, K, H, W, C], got {head_outputs.shape}")
  x = head_outputs.astype(jnp.float32)
  variance = jnp.var(jax.lax.stop_gradient(x), axis=(2, 3))           # [B, K, C]
  threshold = jnp.mean(variance, axis=(0, 2))                           # [K]
  if axis_name is not None:
    threshold = jax.lax.pmean(threshold, axis_name)
  keep = (variance > threshold[None, :, None]).astype(jnp.float32)
  count = jnp.sum(keep, axis=-1)                                        # [B, K]
  mean = jnp.einsum("bkhwc,bkc->bkhw", x, keep) / jnp.maximum(count, 1.0)[..., None, None]
  return jnp.prod(jax.nn.sigmoid(mean), axis=1)


def _shared_key(key: jax.Array, axis_name: str) -> jax.Array:
  """Device 0's key on every device (keys carry no gradient)."""
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  data = jax.random.key_data(key) if typed else key
  data = jax.lax.all_gather(data, axis_name)[0]
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)) if typed else data


def sample_background(features: jax.Array, attention: jax.Array, key: jax.Array, *,
                      mode: str = "uniform", axis_name: str | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """Theta of Eq. 6-7: one background vector for every position of every image.

  The background set is {R_i * M_inv_i} over the images of the batch, as
  point-wise C-vectors: B H W of them per device, gathered over ``axis_name``
  into the global set (index g = (device * B + i) * H W + h W + w).

  * mode='uniform' (the paper): every position draws, independently and with
    replacement, one of the non-zero vectors of the set (all zero when the set
    has none). Each device draws with its own key.
  * mode='permutation' (the authors' code): one random permutation of the whole
    global set, zero vectors included, from device 0's key; device d takes the
    slice of positions it owns, exactly what one device shuffling the
    concatenated batch would give.

  Args:
    features: R [B, H, W, C].
    attention: M [B, H, W], in [0, 1].
    key: PRNG key (this device's).
    mode: 'uniform' or 'permutation'.
    axis_name: data-parallel axis to gather the set over, or None (this batch).

  Returns:
    theta: [B, H, W, C] in R's dtype, without gradient.
    source: int32 [B, H, W], the global index g of the vector each position got.
  """
  if features.ndim != 4:
    raise ValueError(f"features must be [B, H, W, C], got {features.shape}")
  if attention.shape != features.shape[:3]:
    raise ValueError(f"attention must be [B, H, W] = {features.shape[:3]}, got "
                     f"{attention.shape}")
  if mode not in SAMPLINGS:
    raise ValueError(f"mode must be one of {SAMPLINGS}, got {mode!r}")
  batch, height, width, channels = features.shape
  local = batch * height * width
  inverse = (1.0 - attention).astype(features.dtype)
  background = jax.lax.stop_gradient(features * inverse[..., None]).reshape(local, channels)
  offset = 0
  if axis_name is not None:
    background = jax.lax.all_gather(background, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * local
  total = background.shape[0]

  if mode == "uniform":
    valid = jnp.any(background != 0, axis=-1)
    cumulative = jnp.cumsum(valid.astype(jnp.int32))
    count = cumulative[-1]
    draws = jax.random.randint(key, (local,), 0, jnp.maximum(count, 1))
    # The (u+1)-th valid vector is the first index whose running count exceeds u.
    source = jnp.minimum(jnp.searchsorted(cumulative, draws, side="right"), total - 1)
    theta = jnp.where(count > 0, background[source], jnp.zeros((), background.dtype))
  else:
    if axis_name is not None:
      key = _shared_key(key, axis_name)
    permutation = jax.random.permutation(key, total)
    source = jax.lax.dynamic_slice(permutation, (offset,), (local,))
    theta = background[source]
  return (theta.reshape(batch, height, width, channels),
          source.astype(jnp.int32).reshape(batch, height, width))


def hybrid_features(features: jax.Array, attention: jax.Array, background: jax.Array
                    ) -> jax.Array:
  """H = M * R + M_inv * Theta (Eq. 6-7): [B,H,W,C], [B,H,W], [B,H,W,C] -> [B,H,W,C]."""
  if background.shape != features.shape:
    raise ValueError(f"background {background.shape} must match features "
                     f"{features.shape}")
  m = attention.astype(features.dtype)[..., None]
  return m * features + (1.0 - m) * background


# ----------------------------------------------------------------- modules
class SpatialAttention(nn.Module):
  """Adapters, concatenation, channel pruning and M (Eq. 5).

  Attributes:
    exit_names: the exits to use, shallow to deep (each at least R's size).
    adapter: 'conv_maxpool' (paper: 1x1 convolution then max pooling),
      'avgpool' or 'maxpool' (authors' code: pooling only).
    exit_pruning: prune low-variance channels before the mean (paper).
    dtype: compute dtype of the adapters; M is float32.
  """
  exit_names: Sequence[str]
  adapter: str = "conv_maxpool"
  exit_pruning: bool = True
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], size: tuple[int, int]
               ) -> dict[str, jax.Array]:
    """Returns ``map`` M float32 [B, H, W] and ``kept_fraction`` [B] of S~'s channels."""
    if self.adapter not in ADAPTERS:
      raise ValueError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")
    conv = common.conv_factory(self.dtype)
    adapted = []
    for name in self.exit_names:
      x = features[name]
      if self.adapter == "conv_maxpool":
        x = conv(x.shape[-1], (1, 1), use_bias=True, name=f"adapter_{name}")(x)
      adapted.append(pool_to(x, size, "avg" if self.adapter == "avgpool" else "max"))
    stacked = jnp.concatenate(adapted, axis=-1)
    keep = high_variance_channels(stacked) if self.exit_pruning else None
    kept = (jnp.ones(stacked.shape[:1]) if keep is None
            else jnp.mean(keep.astype(jnp.float32), axis=-1))
    return {"map": channel_mean_attention(stacked, keep), "kept_fraction": kept}


class BIIGMANet(nn.Module):
  """Backbone, MICA, spatial attention, background sampling, classifier.

  Attributes:
    backbone: a backbone of ``models`` returning (pooled, features).
    num_classes: classifier outputs (2 for the binary ISIC-17 tasks).
    exit_names: feature names shallow to deep; the last one is R.
    use_mica: False is the 'W/O MICA' ablation: R goes straight to G.
    num_heads: K.
    head_features: channels per head; None keeps R's.
    se_reduction: the SE block's r.
    adapter: see :class:`SpatialAttention`.
    exit_pruning: see :class:`SpatialAttention`.
    head_map: also return the authors' MICA map (``head_map``).
    sampling: 'uniform' or 'permutation' (see :func:`sample_background`).
    dropout_rate: dropout before G (0: the authors' notebook).
    axis_name: data-parallel axis to gather the background set over, or None.
    dtype: compute dtype; parameters float32; logits and maps float32.
  """
  backbone: nn.Module
  num_classes: int
  exit_names: Sequence[str]
  use_mica: bool = True
  num_heads: int = 3
  head_features: int | None = None
  se_reduction: int = 16
  adapter: str = "conv_maxpool"
  exit_pruning: bool = True
  head_map: bool = False
  sampling: str = "uniform"
  dropout_rate: float = 0.0
  axis_name: str | None = None
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool, hybrid: bool = False
               ) -> dict[str, Any]:
    """Runs the clean branch, and with ``hybrid`` the sampling branch too.

    Args:
      images: float [B, S, S, 3], normalised.
      train: batch statistics in the backbone and dropout when True.
      hybrid: also build M, Theta and H and classify H (training); needs a
        'sampling' rng. False (inference) runs the clean branch only.

    Returns:
      A dict with ``logits`` [B, classes] (clean) and, with MICA,
      ``head_outputs`` [B, K, H, W, C]; with ``hybrid`` also
      ``hybrid_logits``, ``attention_map`` M [B, H, W], ``background_source``
      int32 [B, H, W] (see :func:`sample_background`), ``kept_fraction`` [B],
      and with ``head_map`` the authors' ``head_map`` [B, H, W].
    """
    if not self.exit_names:
      raise ValueError("BIIGMANet needs at least one exit name (the last is R)")
    _, features = self.backbone(images, train=train)
    missing = [n for n in self.exit_names if n not in features]
    if missing:
      raise ValueError(f"exits {missing} are not among the backbone's features "
                       f"{sorted(features)}")
    r = features[self.exit_names[-1]]
    mica = (mica_lib.MICA(self.num_heads, self.head_features, self.se_reduction,
                          dtype=self.dtype, name="mica") if self.use_mica else None)
    classifier = heads_lib.ClassifierHead(self.num_classes, self.dropout_rate,
                                          dtype=self.dtype, name="classifier")

    def classify(x):
      head_outputs = None
      if mica is not None:
        x, head_outputs = mica(x)
      return classifier(common.global_average_pool(x), train=train), head_outputs

    logits, head_outputs = classify(r)
    out: dict[str, Any] = {"logits": logits}
    if head_outputs is not None:
      out["head_outputs"] = head_outputs
    if not hybrid:
      return out

    attention = SpatialAttention(self.exit_names, self.adapter, self.exit_pruning,
                                 dtype=self.dtype, name="spatial_attention")(
                                     features, r.shape[1:3])
    background, source = sample_background(
        r, attention["map"], self.make_rng("sampling"), mode=self.sampling,
        axis_name=self.axis_name)
    out["hybrid_logits"], _ = classify(hybrid_features(r, attention["map"], background))
    out.update(attention_map=attention["map"], background_source=source,
               kept_fraction=attention["kept_fraction"])
    if self.head_map:
      if head_outputs is None:
        raise ValueError("head_map needs MICA (use_mica=True)")
      out["head_map"] = head_variance_map(head_outputs, axis_name=self.axis_name)
    return out
