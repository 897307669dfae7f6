"""Supervised deep clustering (SDC) with the COM-Triplet loss, Algorithm 1.

Model: backbone -> global average pooling -> dropout 0.3 -> dense embedding of
size S (``heads.EmbeddingHead``; S = 128 by default: the paper does not give S,
and 128 is the usual embedding size of triplet-loss clustering [Ho et al.],
small enough for the 45-point GMM of UDC).

Each step (per device, b = M / D triplets; see ``data/triplets.py`` for how
triplets are drawn):

1. One forward pass over the 3b images [A; P; N] (one set of batch statistics,
   averaged over devices with sync BatchNorm), embeddings E_A, E_P, E_N [b, S].
2. Loss: COM-Triplet, Eq. 3-5 (adaptive margin by default; fixed margins 0.2 /
   0.6 as the paper's ablation), or the classic triplet loss, Eq. 2, margin 0.2
   (SDC_Triplet). The per-device loss is the mean over its b triplets; the
   loop's mean over devices is the paper's 1/M sum over the global batch.
3. Centres, Eq. 6 in its per-class form (``clustering/prototypes.py``), from the
   embeddings of the whole global batch: every device all-gathers the
   stop-gradient embeddings and their classes (A, P: the anchor's class, N: the
   other) and computes the same two means, so the centres are identical on
   every device without any gradient through the collective.
4. :meth:`SDC.update_state`, inside the jitted step: the monotone update of
   Eq. 7 (or, as an ablation, always the latest pair). The pair lives in the
   method state and is checkpointed with the train state.

Evaluation (Eq. 14): cosine distances of a test embedding (eval mode, no
dropout) to the stored prototypes; the label is the nearer prototype's and the
malignancy score is d_maj - d_min (label 1 = minority = melanoma).

:meth:`SDC.report` adds, for the model selected on validation: the metrics with
the prototypes' feature selection under each configured threshold rule
(``results['feature_selection'][rule]``; the loop's metrics are those without), the
prototypes' separation, and a PNG of the test embeddings projected to 2-D.

Config section ``config.sdc`` (see ``configs/sdc.py``): embedding_size,
dropout_rate, loss ('com_triplet' | 'triplet'), margin ('adaptive' or a number
>= 0 as a string), margin_gradient, centre_update ('monotone' | 'last'),
feature_selection ('none', or the rules of ``prototypes.feature_mask`` to
report, comma separated: 'range', 'mean_difference'), feature_selection_scale,
embedding_plot.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from comtriplet_jax import losses
from comtriplet_jax import parallel
from comtriplet_jax.clustering import prototypes
from comtriplet_jax.data import eval_split
from comtriplet_jax.data import triplets
from comtriplet_jax.evaluation import gradcam
from comtriplet_jax.evaluation import metrics as metrics_lib
from comtriplet_jax.methods import base
from comtriplet_jax.models import heads

LOSSES = ("com_triplet", "triplet")
CENTRE_UPDATES = ("monotone", "last")


class EmbeddingModel(nn.Module):
  """Backbone then dropout and the embedding layer: images -> float32 [B, S]."""
  backbone: nn.Module
  embedding_size: int
  dropout_rate: float = 0.3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    pooled, _ = self.backbone(images, train=train)
    return heads.EmbeddingHead(self.embedding_size, self.dropout_rate,
                               dtype=self.dtype, name="head")(pooled, train=train)


def parse_margin(value: Any, field: str) -> float | None:
  """'adaptive' -> None (Eq. 5); a number (or its string) -> that fixed margin."""
  if isinstance(value, str) and value.strip().lower() == "adaptive":
    return None
  try:
    margin = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{field}={value!r} must be 'adaptive' or a number >= 0, "
                     "e.g. 0.2 or 0.6") from None
  if not (math.isfinite(margin) and margin >= 0):
    raise ValueError(f"{field}={value!r} must be 'adaptive' or a number >= 0")
  return margin


def parse_feature_selection(value: str, field: str) -> tuple[str, ...]:
  """'none' -> (); 'range' or 'range,mean_difference' -> the rules to report."""
  rules = tuple(r.strip() for r in str(value).split(",") if r.strip())
  if rules == ("none",):
    return ()
  bad = [r for r in rules if r not in prototypes.FEATURE_SELECTION_RULES]
  if bad or not rules:
    raise ValueError(f"{field}={value!r} is not allowed; choose 'none' or one or more "
                     f"of {', '.join(prototypes.FEATURE_SELECTION_RULES)} joined by ','")
  return rules


def _one_of(section: str, cfg: ml_collections.ConfigDict, field: str,
            allowed: tuple[str, ...]) -> None:
  value = cfg.get(field)
  if value not in allowed:
    raise ValueError(f"config.{section}.{field}={value!r} is not allowed; choose one "
                     f"of {', '.join(allowed)}")


class SDC(base.Method):
  """Supervised deep clustering; the config section is ``config.sdc``."""

  section = "sdc"

  def __init__(self, config: ml_collections.ConfigDict, *, num_classes: int,
               train_class_counts, steps_per_epoch: int = 1):
    super().__init__(config, num_classes=num_classes,
                     train_class_counts=train_class_counts,
                     steps_per_epoch=steps_per_epoch)
    if num_classes != 2:
      raise ValueError(
          f"{type(self).__name__} clusters two classes (minority vs majority); "
          f"config.task={config.task!r} has {num_classes}: use a binary task such "
          "as melanoma_vs_nevus")
    if self.section not in config:
      raise ValueError(f"config.{self.section} is missing: use configs/"
                       f"{self.section}.py or add the section")
    self.cfg = config[self.section]
    self._validate()
    self._train_images: triplets.TrainImages | None = None

  # ------------------------------------------------------------ configuration
  def _validate(self) -> None:
    s, cfg = self.section, self.cfg
    if not isinstance(cfg.embedding_size, int) or cfg.embedding_size < 1:
      raise ValueError(f"config.{s}.embedding_size={cfg.embedding_size!r} must be a "
                       "positive integer")
    if not 0.0 <= cfg.dropout_rate < 1.0:
      raise ValueError(f"config.{s}.dropout_rate={cfg.dropout_rate!r} must lie in "
                       "[0, 1)")
    _one_of(s, cfg, "loss", LOSSES)
    _one_of(s, cfg, "centre_update", CENTRE_UPDATES)
    self.feature_selection_rules = parse_feature_selection(
        cfg.feature_selection, f"config.{s}.feature_selection")
    self.margin = parse_margin(cfg.margin, f"config.{s}.margin")
    if cfg.loss == "triplet" and self.margin is None:
      raise ValueError(f"config.{s}.margin='adaptive' needs config.{s}.loss="
                       "'com_triplet'; the classic triplet loss takes a fixed margin "
                       "(0.2 in the paper)")
    if not cfg.feature_selection_scale >= 0:
      raise ValueError(f"config.{s}.feature_selection_scale="
                       f"{cfg.feature_selection_scale!r} must be >= 0")

  # -------------------------------------------------------------------- model
  def build_model(self) -> nn.Module:
    return EmbeddingModel(self.backbone(), self.cfg.embedding_size,
                          self.cfg.dropout_rate, dtype=self.dtype)

  def init_method_state(self, variables):
    del variables
    return {"centres": prototypes.initial_centres(self.cfg.embedding_size)._asdict()}

  def embed(self, variables, images: jax.Array) -> jax.Array:
    """uint8 [b, H, W, 3] -> float32 [b, S] embeddings in eval mode."""
    x = self.prepare_images(images, None, train=False)
    return self.model.apply(variables, x, train=False)

  def _train_embeddings(self, params, batch_stats, images, rng):
    aug_rng, dropout_rng = jax.random.split(rng)
    x = self.prepare_images(images, aug_rng, train=True)
    embeddings, updates = self.model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    return embeddings, updates.get("batch_stats", batch_stats)

  # --------------------------------------------------------------------- loss
  def triplet_loss(self, anchor, positive, negative) -> jax.Array:
    """[b, S] x 3 -> per-triplet losses [b] (Eq. 2 or Eq. 3-5)."""
    if self.cfg.loss == "triplet":
      return losses.triplet_loss(anchor, positive, negative, margin=self.margin,
                                 reduction="none")
    return losses.com_triplet_loss(anchor, positive, negative, margin=self.margin,
                                   margin_gradient=self.cfg.margin_gradient,
                                   reduction="none")

  def loss(self, params, batch_stats, method_state, batch, rng, *, step):
    del step
    anchor_label = batch["anchor_label"].astype(jnp.int32)
    b = anchor_label.shape[0]
    images = jnp.concatenate([batch["anchor"], batch["positive"], batch["negative"]])
    embeddings, batch_stats = self._train_embeddings(params, batch_stats, images, rng)
    anchor, positive, negative = embeddings[:b], embeddings[b:2 * b], embeddings[2 * b:]
    per_triplet = self.triplet_loss(anchor, positive, negative)
    loss = jnp.mean(per_triplet)

    # Eq. 6 on the global batch: the same gathered arrays on every device give
    # the same centres everywhere; nothing differentiates through the gather.
    labels = jnp.concatenate([anchor_label, anchor_label, 1 - anchor_label])
    gathered = parallel.all_gather(jax.lax.stop_gradient(embeddings))
    gathered_labels = parallel.all_gather(labels)
    centre_min, centre_maj, valid = prototypes.class_centres(gathered, gathered_labels)

    stored = method_state["centres"]
    metrics = {
        "active_fraction": jnp.mean((per_triplet > 0).astype(jnp.float32)),
        "batch_separation": losses.cosine_distance(centre_min, centre_maj),
        "prototype_separation": stored["separation"],
        "minority_anchor_fraction": jnp.mean(anchor_label.astype(jnp.float32)),
    }
    aux = {"centre_min": centre_min, "centre_maj": centre_maj, "valid": valid}
    return loss, (batch_stats, metrics, aux)

  def update_state(self, method_state, aux):
    """Eq. 7 (or the latest pair) on the batch's centres; same on every device."""
    stored = prototypes.Centres(**method_state["centres"])
    update = (prototypes.update_centres if self.cfg.centre_update == "monotone"
              else prototypes.replace_centres)
    new = update(stored, aux["centre_min"], aux["centre_maj"], aux["valid"])
    return dict(method_state, centres=new._asdict())

  # ----------------------------------------------------------------- predict
  decision_boundary = 0.0    # the nearer prototype: d_maj - d_min > 0

  def predict(self, variables, method_state, images):
    centres = method_state["centres"]
    # scores, predictions, and the distances d_min, d_maj to the prototypes.
    return prototypes.prototype_scores(self.embed(variables, images),
                                       centres["centre_min"], centres["centre_maj"])

  def heatmap_target(self, variables, method_state, images, *, class_index=None,
                     feature_delta=None):
    """The backbone's last map and :meth:`predict`'s score d_maj - d_min.

    The target is ``predict(...)['scores']`` itself, run with the map tapped
    (:meth:`call_with_feature_map`). ``class_index`` 1 (default) explains the
    score, the evidence for the minority prototype; 0 explains its negative, the
    evidence for the majority prototype (``gradcam.signed_score``).
    """
    feature_map, out = self.call_with_feature_map(
        lambda: self.predict(variables, method_state, images), feature_delta)
    return feature_map, gradcam.signed_score(out["scores"], class_index)

  # ------------------------------------------------------------------- data
  def train_images(self, data) -> triplets.TrainImages:
    if self._train_images is None:
      self._train_images = triplets.load_train_images(data)
    return self._train_images

  def train_stream(self, data, start_step):
    return triplets.triplet_stream(
        self.train_images(data), batch_size=self.config.batch_size,
        num_local_devices=jax.local_device_count(), seed=self.config.seed,
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count())

  # ----------------------------------------------------------------- report
  def auc_convention(self) -> str:
    return ("score = d_maj - d_min to the prototypes (Eq. 14); positive class = "
            "label 1 = the minority class (melanoma)")

  def report(self, state, data, par, workdir: pathlib.Path, p_predict) -> dict[str, Any]:
    """Feature-selection metrics, prototype facts and the embedding picture.

    Runs on the chief only (no collective): embeddings are computed with a plain
    jit on this process's share of each evaluation split (all of it in a
    single-process run).
    """
    del p_predict
    from comtriplet_jax.evaluation import embedding_plot  # pylint: disable=g-import-not-at-top
    host = par.unreplicate(state)
    variables = {"params": host.params, "batch_stats": host.batch_stats}
    centres = host.method_state["centres"]
    centre_min = np.asarray(centres["centre_min"])
    centre_maj = np.asarray(centres["centre_maj"])
    out: dict[str, Any] = {
        "prototypes": {
            "separation": float(centres["separation"]),
            "num_updates": int(centres["num_updates"]),
            "centre_update": self.cfg.centre_update,
            "embedding_size": int(centre_min.size),
        },
        "auc_convention": self.auc_convention(),
    }
    if not self.feature_selection_rules and not self.cfg.embedding_plot:
      return out
    embed = jax.jit(self.embed)
    split_embeddings = {split: _embed_split(embed, variables, data.eval[split])
                        for split in data.eval}

    scale = float(self.cfg.feature_selection_scale)
    for rule in self.feature_selection_rules:
      mask = np.asarray(prototypes.feature_mask(centre_min, centre_maj, rule=rule,
                                                scale=scale))
      selected: dict[str, Any] = {
          "rule": rule, "scale": scale,
          "threshold": float(prototypes.feature_threshold(
              centre_min, centre_maj, rule=rule, scale=scale)),
          "num_features_kept": int(mask.sum()),
      }
      for split, (embeddings, index) in split_embeddings.items():
        labels = data.eval_labels[split][index]
        scored = prototypes.prototype_scores(embeddings, centre_min, centre_maj, mask)
        selected[split] = metrics_lib.classification_metrics(
            labels, np.asarray(scored["predictions"]), np.asarray(scored["scores"]),
            num_classes=2)
      out.setdefault("feature_selection", {})[rule] = selected
    if self.cfg.embedding_plot and "test" in split_embeddings:
      embeddings, index = split_embeddings["test"]
      path = embedding_plot.plot_embeddings(
          workdir / "embeddings_test.png", embeddings, data.eval_labels["test"][index],
          centre_min, centre_maj, class_names=data.class_names,
          title=f"{type(self).__name__} ({self.config.backbone}): test embeddings")
      out["embedding_plot"] = str(path)
    return out


def _embed_split(embed, variables, dataset) -> tuple[np.ndarray, np.ndarray]:
  """Embeddings [n, S] of a padded evaluation split and their example indices."""
  out, indices = eval_split.outputs(
      lambda batch: {"embedding": embed(variables, batch["image"])}, dataset)
  return out["embedding"], indices
