"""Direct classifiers (the COM-Triplet paper's baselines, Section IV).

Backbone, global average pooling, a dense softmax layer; cross-entropy of Eq. 1,
optionally weighted: ``loss_weighting='batch'`` is the paper's LW strategy (class
weights inverse to the class counts within each batch, counted over the global
batch across devices), ``'dataset'`` uses inverse training-set frequencies.
Transfer learning (TL) and augmentation (DA) are the config fields ``init_from``
and ``augment``, handled by the loop and by :meth:`Method.prepare_images`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from comtriplet_jax import losses
from comtriplet_jax import parallel
from comtriplet_jax.methods import base
from comtriplet_jax.models import heads


class BackboneClassifier(nn.Module):
  """Backbone followed by a classifier head; returns logits [B, C]."""
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    pooled, _ = self.backbone(images, train=train)
    return heads.ClassifierHead(self.num_classes, name="head")(pooled, train=train)


class Classifier(base.Method):
  """The direct classifier with the strategies NP, TL, DA and LW."""

  def build_model(self) -> nn.Module:
    return BackboneClassifier(self.backbone(), self.num_classes)

  def loss(self, params, batch_stats, method_state, batch, rng, *, step):
    del method_state, step
    aug_rng, dropout_rng = jax.random.split(rng)
    images = self.prepare_images(batch["image"], aug_rng, train=True)
    logits, updates = self.model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    weighting = self.config.loss_weighting
    loss = losses.weighted_cross_entropy(
        logits, batch["label"],
        class_weights=(losses.class_weights_from_counts(self.train_class_counts)
                       if weighting == "dataset" else None),
        weighting={"none": "none", "dataset": "given", "batch": "batch"}[weighting],
        axis_name=parallel.AXIS)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, (updates.get("batch_stats", batch_stats),
                  {"accuracy": accuracy}, None)

  def predict(self, variables, method_state, images):
    del method_state
    x = self.prepare_images(images, None, train=False)
    logits = self.model.apply(variables, x, train=False)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    scores = probs[:, 1] if self.num_classes == 2 else probs
    return {"scores": scores, "predictions": jnp.argmax(probs, axis=-1)}

  def heatmap_target(self, variables, method_state, images, *, class_index=None,
                     feature_delta=None):
    """The backbone's last map and the logit of ``class_index``, as in :meth:`predict`.

    Default class: 1 for a binary task (the class whose probability is the
    score), the predicted class otherwise (:meth:`class_logit_target`).
    """
    del method_state
    x = self.prepare_images(images, None, train=False)
    feature_map, logits = self.call_with_feature_map(
        lambda: self.model.apply(variables, x, train=False), feature_delta)
    return feature_map, self.class_logit_target(logits, class_index)
