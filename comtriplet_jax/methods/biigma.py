"""BIIGMA-Net: independence-guided multi-head channel attention and background sampling.

The model is ``models/biigma.py`` (backbone exits, MICA, spatial attention,
background vector sampling, classifier G). Each step, per device:

1. One backbone pass; clean logits G(R^CA); with sampling, M, Theta from the
   global batch's background set, the hybrid H and its logits G(H^CA).
2. L_classif (Eq. 8) = WCE(clean) + WCE(hybrid), class weights from the inverse
   class frequency of the training set (``losses.class_weights_from_counts``;
   every present class carries the same total weight). The WCE is that of the
   global batch (``axis_name``), as in the direct classifier. The hybrid term
   is 0 before ``sampling_start_epoch`` (20 in the paper), computed from the
   traced ``step`` and ``steps_per_epoch``.
3. L_indep (Eq. 3) = (1/K^2) sum_{k1 != k2} HSIC(r^k1, r^k2) over the clean
   heads' outputs reshaped to [B, K, HW, C] (``losses.hsic_independence_loss``,
   RBF bandwidth sigma, biased 1/(HW)^2 estimator, batch mean) plus
   lambda l2_norm(W_heads) over the heads' 1x1 convolution kernels
   (``losses.head_weight_l2``, lambda = 1). Read literally, as Eq. 3 writes it:
   the l2 norm of all head kernels, not its square. The squared form
   (``l2_squared=True``, Keras' L2 regulariser) with lambda = 1 outweighs the
   classification loss by orders of magnitude (3 x 1024^2 kernel entries for
   DenseNet-121, sum of squares ~3000 at initialisation): under Adam it drives
   the kernels to ~0 within a few hundred steps and training stalls (seen on
   HAM10000 with the tiny DenseNet: validation macro F1 0.08 against 0.19 without
   L_indep after the same steps).
4. L = L_classif + L_indep (Eq. 9).

Inference: the clean branch only; scores are the softmax probabilities
(class 1's for binary tasks).

Config section ``config.biigma`` (``configs/biigma.py``; the paper's values,
then the authors' code's where it departs, set together by ``:official``):

=======================  ======================  ======================
field                    paper                   authors' code
=======================  ======================  ======================
exits                    '' (last three exits)   same
use_mica, num_heads      True, 3                 True, 3
head_features            0 (R's channels)        0 (1024)
se_reduction             16                      16
dropout_rate             0.0                     0.0 (notebook)
adapter                  'conv_maxpool'          'avgpool'
exit_pruning             True                    False
sampling                 'uniform'               'permutation'
sampling_start_epoch     20                      10
indep_measure            'hsic'                  'hsic'
sigma                    1 (ISIC-18/19), 2 (17)  2.5
hsic_estimator           'biased' (1/N^2)        'biased'
hsic_pairs               'ordered' (1/K^2 ...)   'unordered' (sum i<j)
indep_weight             1.0                     0.5
l2_weight, l2_squared    1.0, False              0.0
clean_weight             1.0                     0.5
hybrid_weight            1.0                     0.5
kl_weight, kl_temperature  0.0, 2.0              0.5, 2.0
map_distance_weight      0.0                     0.5
class_weighting          'dataset'               'batch'
=======================  ======================  ======================

Ablations (Table 2): ``use_mica=False`` (W/O MICA; needs indep_measure='none'),
``sampling='none'`` (W/O vector sampling), ``indep_measure='none'`` (W/O
L_indep: neither the HSIC nor the l2 term), ``num_heads``, ``sigma``,
``indep_measure='cosine'`` (|cosine| of the mean-normalised heads instead of
HSIC). The baseline is no MICA and no sampling.

The authors' extra terms: ``kl_weight`` KL(softmax(clean/T) || softmax(hybrid/T))
with T = ``kl_temperature``, batch mean, from the sampling start like the hybrid
WCE; ``map_distance_weight`` the root-mean-square difference between the exits'
map M and the MICA map (``models.biigma.head_variance_map``), per sample then
averaged (so that the mean over devices is the global value), from step 0.
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
from comtriplet_jax import models
from comtriplet_jax import parallel
from comtriplet_jax.data import eval_split
from comtriplet_jax.evaluation import gradcam
from comtriplet_jax.methods import base
from comtriplet_jax.models import biigma as biigma_model
from comtriplet_jax.models import mica as mica_lib

ADAPTERS = biigma_model.ADAPTERS
SAMPLINGS = ("uniform", "permutation", "none")
INDEP_MEASURES = ("hsic", "cosine", "none")
HSIC_PAIRS = losses.hsic.PAIRS
HSIC_ESTIMATORS = losses.hsic.ESTIMATORS
CLASS_WEIGHTINGS = ("dataset", "batch")
# Fields that size a run rather than define the method (see BIIGMA.departures).
_SIZING_FIELDS = ("exits", "head_features", "sampling_start_epoch", "report_images",
                  "backbone_overrides")
# Training fields whose paper values are the same for every run of the paper.
_PAPER_TRAINING = {"augment": False, "lr_schedule": "constant"}

# Where the HSIC kernel is computed: 'highest' keeps GPUs off TF32 for the Gram
# matrices, whose cancellation would otherwise swamp small distances.
_PRECISION = "highest"


def paper_sigma(dataset: str, task: str) -> float:
  """The paper's RBF bandwidth per dataset: 2.0 for ISIC-17, 1.0 for ISIC-18/19."""
  del task
  return 2.0 if dataset == "isic2017" else 1.0


def default_config() -> ml_collections.ConfigDict:
  """``config.biigma`` with the paper's values (see the module docstring)."""
  return ml_collections.ConfigDict(dict(
      exits="",
      use_mica=True,
      num_heads=3,
      head_features=0,
      se_reduction=16,
      dropout_rate=0.0,
      adapter="conv_maxpool",
      exit_pruning=True,
      sampling="uniform",
      sampling_start_epoch=20.0,
      indep_measure="hsic",
      sigma=1.0,
      hsic_estimator="biased",
      hsic_pairs="ordered",
      indep_weight=1.0,
      l2_weight=1.0,
      l2_squared=False,
      clean_weight=1.0,
      hybrid_weight=1.0,
      kl_weight=0.0,
      kl_temperature=2.0,
      map_distance_weight=0.0,
      class_weighting="dataset",
      report_images=8,
      # Fields of the backbone module replacing its registered architecture
      # (``models.get_backbone(**overrides)``), e.g. a wider tiny DenseNet for CPU runs.
      backbone_overrides=ml_collections.ConfigDict(),
  ))


def official_overrides() -> dict[str, Any]:
  """The fields of ``config.biigma`` where the authors' code departs from the paper."""
  return dict(adapter="avgpool", exit_pruning=False, sampling="permutation",
              sampling_start_epoch=10.0, sigma=2.5, hsic_pairs="unordered",
              indep_weight=0.5, l2_weight=0.0, clean_weight=0.5, hybrid_weight=0.5,
              kl_weight=0.5, map_distance_weight=0.5, class_weighting="batch")


def _one_of(cfg, field: str, allowed) -> None:
  value = cfg.get(field)
  if value not in allowed:
    raise ValueError(f"config.biigma.{field}={value!r} is not allowed; choose one of "
                     f"{', '.join(map(str, allowed))}")


def _non_negative(cfg, field: str) -> None:
  value = cfg.get(field)
  if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
    raise ValueError(f"config.biigma.{field}={value!r} must be a finite number >= 0")


def kl_divergence(clean_logits: jax.Array, hybrid_logits: jax.Array, *,
                  temperature: float) -> jax.Array:
  """Batch mean of KL(softmax(clean/T) || softmax(hybrid/T)): [B, C] x 2 -> scalar."""
  if clean_logits.shape != hybrid_logits.shape or clean_logits.ndim != 2:
    raise ValueError(f"logits must both be [B, C], got {clean_logits.shape} and "
                     f"{hybrid_logits.shape}")
  log_p = jax.nn.log_softmax(clean_logits / temperature, axis=-1)
  log_q = jax.nn.log_softmax(hybrid_logits / temperature, axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def map_distance(map_a: jax.Array, map_b: jax.Array) -> jax.Array:
  """Mean over samples of the RMS difference of two [B, H, W] maps (0-safe gradient)."""
  if map_a.shape != map_b.shape or map_a.ndim != 3:
    raise ValueError(f"maps must both be [B, H, W], got {map_a.shape} and {map_b.shape}")
  mse = jnp.mean(jnp.square(map_a - map_b), axis=(1, 2))
  positive = mse > 0
  return jnp.mean(jnp.where(positive, jnp.sqrt(jnp.where(positive, mse, 1.0)), 0.0))


class BIIGMA(base.Method):
  """BIIGMA-Net; the config section is ``config.biigma``."""

  def __init__(self, config: ml_collections.ConfigDict, *, num_classes: int,
               train_class_counts, steps_per_epoch: int = 1):
    super().__init__(config, num_classes=num_classes,
                     train_class_counts=train_class_counts,
                     steps_per_epoch=steps_per_epoch)
    if "biigma" not in config:
      raise ValueError("config.biigma is missing: use configs/biigma.py or add the "
                       "section (methods.biigma.default_config())")
    self.cfg = config.biigma
    self._validate()
    # Eq. 8's class weights: inverse class frequency of the training set.
    self.class_weights = losses.class_weights_from_counts(self.train_class_counts)

  # ------------------------------------------------------------ configuration
  def _validate(self) -> None:
    cfg = self.cfg
    for field in ("use_mica", "exit_pruning", "l2_squared"):
      if not isinstance(cfg.get(field), bool):
        raise ValueError(f"config.biigma.{field}={cfg.get(field)!r} must be True or "
                         "False")
    if not isinstance(cfg.num_heads, int) or not 1 <= cfg.num_heads <= 16:
      raise ValueError(f"config.biigma.num_heads={cfg.num_heads!r} must be an integer "
                       "in [1, 16] (the paper: 1-4)")
    for field in ("head_features", "se_reduction", "report_images"):
      value = cfg.get(field)
      least = 1 if field == "se_reduction" else 0
      if not isinstance(value, int) or value < least:
        raise ValueError(f"config.biigma.{field}={value!r} must be an integer >= "
                         f"{least}")
    if not 0.0 <= cfg.dropout_rate < 1.0:
      raise ValueError(f"config.biigma.dropout_rate={cfg.dropout_rate!r} must lie in "
                       "[0, 1)")
    _one_of(cfg, "adapter", ADAPTERS)
    _one_of(cfg, "sampling", SAMPLINGS)
    _one_of(cfg, "indep_measure", INDEP_MEASURES)
    _one_of(cfg, "hsic_estimator", HSIC_ESTIMATORS)
    _one_of(cfg, "hsic_pairs", HSIC_PAIRS)
    _one_of(cfg, "class_weighting", CLASS_WEIGHTINGS)
    for field in ("sampling_start_epoch", "indep_weight", "l2_weight", "clean_weight",
                  "hybrid_weight", "kl_weight", "map_distance_weight"):
      _non_negative(cfg, field)
    sigma = cfg.sigma
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
      raise ValueError(f"config.biigma.sigma={sigma!r} must be a number > 0 (the "
                       "paper: 0.5, 1, 2, 4)")
    if not cfg.kl_temperature > 0:
      raise ValueError(f"config.biigma.kl_temperature={cfg.kl_temperature!r} must "
                       "be > 0")
    if not cfg.use_mica:
      if cfg.indep_measure != "none":
        raise ValueError("config.biigma.use_mica=False leaves no heads to make "
                         "independent: set config.biigma.indep_measure='none'")
      if cfg.map_distance_weight > 0:
        raise ValueError("config.biigma.map_distance_weight > 0 needs the MICA heads' "
                         "map: set config.biigma.use_mica=True")
    if cfg.sampling == "none" and (cfg.kl_weight > 0 or cfg.map_distance_weight > 0):
      raise ValueError("config.biigma.kl_weight and map_distance_weight compare the "
                       "clean and sampling branches: they need config.biigma.sampling "
                       "'uniform' or 'permutation'")
    available = models.FEATURES[self.config.backbone]
    names = self.exit_names()
    bad = [n for n in names if n not in available]
    if bad or not names:
      raise ValueError(f"config.biigma.exits={cfg.exits!r}: {bad or 'empty'} not among "
                       f"the exits of backbone {self.config.backbone!r}: "
                       f"{', '.join(available)}")

  def exit_names(self) -> tuple[str, ...]:
    """The exits used, shallow to deep; '' = the backbone's last three (R last)."""
    if self.cfg.exits:
      return tuple(n.strip() for n in self.cfg.exits.split(",") if n.strip())
    return tuple(models.FEATURES[self.config.backbone][-3:])

  @property
  def sampling_start_step(self) -> int:
    return int(round(self.cfg.sampling_start_epoch * self.steps_per_epoch))

  def departures(self) -> dict[str, Any]:
    """The fields that differ from the paper's setting.

    Those of ``config.biigma`` (the paper's sigma is that of the dataset,
    :func:`paper_sigma`; the fields that only size a run, start epoch, exits,
    head width, report, backbone width, are left out), and the training fields
    the paper fixes: no augmentation, a constant learning rate. So this names
    the ablation (e.g. ``{'num_heads': 2}``; ``{}`` for the paper's best
    configuration) and what a recipe changed.
    """
    paper = default_config()
    paper.sigma = paper_sigma(self.config.dataset, self.config.task)
    out = {k: v for k, v in self.cfg.items()
           if k not in _SIZING_FIELDS and k in paper and paper[k] != v}
    for field, value in _PAPER_TRAINING.items():
      if self.config.get(field, value) != value:
        out[field] = self.config.get(field)
    return out

  def settings(self) -> dict[str, Any]:
    """What identifies the run in an ablation table (written to results.json)."""
    return {
        "dataset": self.config.dataset, "task": self.config.task,
        "backbone": self.config.backbone, "image_size": self.config.image_size,
        "batch_size": self.config.batch_size, "seed": self.config.seed,
        "steps_per_epoch": self.steps_per_epoch,
        "sampling_start_step": self.sampling_start_step,
        "paper_sigma": paper_sigma(self.config.dataset, self.config.task),
        "departures": self.departures(),
        "biigma": self.cfg.to_dict(),
    }

  def init(self, rng, image_size):
    """Like the base class, but also through the sampling branch (its adapters)."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params_rng, dropout_rng, sampling_rng = jax.random.split(rng, 3)
    model = self.build_model(axis_name=None)
    variables = jax.jit(lambda r, d: model.init(
        {"params": r, "dropout": dropout_rng, "sampling": sampling_rng}, d,
        train=False, hybrid=self.cfg.sampling != "none"))(params_rng, dummy)
    variables = {"params": variables["params"],
                 "batch_stats": variables.get("batch_stats", {})}
    return variables, self.init_method_state(variables)

  # -------------------------------------------------------------------- model
  def backbone(self) -> nn.Module:
    return models.get_backbone(self.config.backbone, dtype=self.dtype,
                               axis_name=self.axis_name,
                               **self.cfg.backbone_overrides.to_dict())

  def build_model(self, axis_name: str | None = parallel.AXIS) -> nn.Module:
    cfg = self.cfg
    return biigma_model.BIIGMANet(
        backbone=self.backbone(), num_classes=self.num_classes,
        exit_names=self.exit_names(), use_mica=cfg.use_mica, num_heads=cfg.num_heads,
        head_features=cfg.head_features or None, se_reduction=cfg.se_reduction,
        adapter=cfg.adapter, exit_pruning=cfg.exit_pruning,
        head_map=cfg.map_distance_weight > 0,
        sampling=cfg.sampling if cfg.sampling != "none" else "uniform",
        dropout_rate=cfg.dropout_rate, axis_name=axis_name, dtype=self.dtype)

  # --------------------------------------------------------------------- loss
  def _wce(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    if self.cfg.class_weighting == "batch":
      return losses.weighted_cross_entropy(logits, labels, weighting="batch",
                                           axis_name=parallel.AXIS)
    return losses.weighted_cross_entropy(logits, labels,
                                         class_weights=self.class_weights,
                                         axis_name=parallel.AXIS)

  def independence_terms(self, params, head_outputs: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    """L_indep of Eq. 3 as (dependence term, l2 term) on [B, K, H, W, C] heads."""
    cfg = self.cfg
    b, k, h, w, c = head_outputs.shape
    dependence = losses.hsic_independence_loss(
        head_outputs.reshape(b, k, h * w, c), sigma=float(cfg.sigma),
        estimator=cfg.hsic_estimator, measure=cfg.indep_measure,
        pairs=cfg.hsic_pairs, precision=_PRECISION)
    l2 = (losses.head_weight_l2(mica_lib.projection_kernels(params["mica"]),
                                l2_weight=cfg.l2_weight, squared=cfg.l2_squared)
          if cfg.l2_weight > 0 else jnp.zeros((), jnp.float32))
    return dependence, l2

  def loss(self, params, batch_stats, method_state, batch, rng, *, step):
    del method_state
    cfg = self.cfg
    aug_rng, dropout_rng, sampling_rng = jax.random.split(rng, 3)
    images = self.prepare_images(batch["image"], aug_rng, train=True)
    sampling = cfg.sampling != "none"
    out, updates = self.model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        hybrid=sampling, mutable=["batch_stats"],
        rngs={"dropout": dropout_rng, "sampling": sampling_rng})
    labels = batch["label"]
    zero = jnp.zeros((), jnp.float32)

    wce_clean = self._wce(out["logits"], labels)
    total = cfg.clean_weight * wce_clean
    metrics = {
        "wce_clean": wce_clean,
        "accuracy": jnp.mean(jnp.argmax(out["logits"], -1) == labels),
    }
    if sampling:
      # Eq. 8's hybrid term, off before the start epoch (a 0/1 factor on the
      # traced step: the graph is the same on both sides of the switch).
      active = (step >= self.sampling_start_step).astype(jnp.float32)
      wce_hybrid = self._wce(out["hybrid_logits"], labels)
      total += active * cfg.hybrid_weight * wce_hybrid
      kl = (kl_divergence(out["logits"], out["hybrid_logits"],
                          temperature=cfg.kl_temperature) if cfg.kl_weight > 0 else zero)
      total += active * cfg.kl_weight * kl
      local = int(np.prod(out["background_source"].shape))
      device = jax.lax.axis_index(parallel.AXIS)
      metrics.update(
          wce_hybrid=wce_hybrid, kl=kl, sampling_active=active,
          hybrid_accuracy=jnp.mean(jnp.argmax(out["hybrid_logits"], -1) == labels),
          attention_mean=jnp.mean(out["attention_map"]),
          kept_channel_fraction=jnp.mean(out["kept_fraction"]),
          background_from_other_devices=jnp.mean(
              (out["background_source"] // local != device).astype(jnp.float32)))
      if cfg.map_distance_weight > 0:
        distance = map_distance(out["attention_map"], out["head_map"])
        total += cfg.map_distance_weight * distance
        metrics["map_distance"] = distance
    if cfg.indep_measure != "none":
      dependence, l2 = self.independence_terms(params, out["head_outputs"])
      total += cfg.indep_weight * dependence + l2
      metrics.update(indep=dependence, head_l2=l2)
    return total, (updates.get("batch_stats", batch_stats), metrics, None)

  # ----------------------------------------------------------------- predict
  def predict(self, variables, method_state, images):
    del method_state
    x = self.prepare_images(images, None, train=False)
    logits = self.model.apply(variables, x, train=False)["logits"]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    scores = probs[:, 1] if self.num_classes == 2 else probs
    return {"scores": scores, "predictions": jnp.argmax(probs, axis=-1)}

  # ---------------------------------------------------------------- Grad-CAM
  def heatmap_target(self, variables, method_state, images, *, class_index=None,
                     feature_delta=None):
    """R (the last exit, which MICA and G read) and the clean logit of a class.

    The clean branch of :meth:`predict` with R tapped
    (:meth:`call_with_feature_map`): the delta reaches the logit through MICA,
    pooling and G. Default class: 1 for a binary task, the predicted class
    otherwise (:meth:`class_logit_target`).
    """
    del method_state
    x = self.prepare_images(images, None, train=False)
    feature_map, out = self.call_with_feature_map(
        lambda: self.model.apply(variables, x, train=False), feature_delta,
        feature_name=self.exit_names()[-1])
    return feature_map, self.class_logit_target(out["logits"], class_index)

  def spatial_attention(self, variables, images: jax.Array) -> jax.Array:
    """BIIGMA's own spatial attention M (Eq. 5), upsampled to the images: [b, S, S].

    M is the map that weighs R against the sampled background (H = M R +
    (1 - M) Theta); it is read from the model's sampling branch (eval mode, this
    batch only), whose key draws Theta and does not change M; under ``jit`` the
    unused rest of that branch is dropped. Bilinear upsampling keeps M in [0, 1].

    Raises:
      ValueError: for a model trained without sampling whose adapters have
        weights (``adapter='conv_maxpool'``): it has no trained M.
    """
    if self.cfg.sampling == "none" and self.cfg.adapter == "conv_maxpool":
      raise ValueError("config.biigma.sampling='none': this model has no spatial "
                       "attention (its adapters were never built or trained)")
    model = self.build_model(axis_name=None)
    x = self.prepare_images(images, None, train=False)
    out = model.apply(variables, x, train=False, hybrid=True,
                      rngs={"sampling": jax.random.PRNGKey(0)})
    return gradcam.upsample_maps(out["attention_map"], images.shape[1:3])

  # ------------------------------------------------------------------ report
  def head_dependence(self, variables, images: jax.Array) -> dict[str, jax.Array]:
    """Per-sample [b, K, K] |cosine| (Figure 3) and HSIC between the clean heads."""
    x = self.prepare_images(images, None, train=False)
    heads = self.model.apply(variables, x, train=False)["head_outputs"]
    b, k, h, w, c = heads.shape
    flat = heads.reshape(b, k, h * w, c)
    return {
        "cosine": losses.head_dependence_matrix(flat, measure="cosine",
                                                precision=_PRECISION),
        "hsic": losses.head_dependence_matrix(
            flat, sigma=float(self.cfg.sigma), estimator=self.cfg.hsic_estimator,
            precision=_PRECISION),
    }

  def attention_sample(self, variables, images: jax.Array, key: jax.Array
                       ) -> dict[str, jax.Array]:
    """M, the sources of Theta and the predictions for a few images (eval mode).

    The background set is these images' (one device, no gather).
    """
    model = self.build_model(axis_name=None)
    x = self.prepare_images(images, None, train=False)
    out = model.apply(variables, x, train=False, hybrid=True, rngs={"sampling": key})
    return {k: out[k] for k in ("attention_map", "background_source", "logits",
                                "hybrid_logits")}

  def report(self, state, data, par, workdir: pathlib.Path, p_predict
             ) -> dict[str, Any]:
    """Figure 3's head correlation on the test split, attention pictures, settings."""
    del p_predict
    from comtriplet_jax.evaluation import biigma_plots  # pylint: disable=g-import-not-at-top
    host = par.unreplicate(state)
    variables = {"params": host.params, "batch_stats": host.batch_stats}
    out: dict[str, Any] = {"settings": self.settings(), "figures": []}
    images, labels = _first_test_images(data, max(self.cfg.report_images, 1))

    if self.cfg.use_mica:
      dependence = jax.jit(self.head_dependence)
      sums: dict[str, np.ndarray] = {}
      count = 0
      for batch_images, _ in _test_batches(data):
        values = dependence(variables, batch_images)
        for name, value in values.items():
          sums[name] = sums.get(name, 0.0) + np.asarray(value, np.float64).sum(0)
        count += batch_images.shape[0]
      matrices = {name: total / count for name, total in sums.items()}
      out["head_cosine"] = matrices["cosine"].tolist()
      out["head_hsic"] = matrices["hsic"].tolist()
      out["head_cosine_off_diagonal_mean"] = _off_diagonal_mean(matrices["cosine"])
      path = workdir / "head_correlation.png"
      biigma_plots.plot_head_correlation(
          {"mean |cosine| (Figure 3)": matrices["cosine"],
           f"mean HSIC (sigma={self.cfg.sigma:g})": matrices["hsic"]},
          path, title=f"Head cross-correlation on the test split ({count} images)")
      out["figures"].append(path.name)

    if self.cfg.report_images > 0 and self.cfg.sampling != "none":
      sample = jax.jit(self.attention_sample)(
          variables, images, jax.random.PRNGKey(self.config.seed))
      sample = jax.tree.map(np.asarray, sample)
      path = workdir / "attention_maps.png"
      biigma_plots.plot_attention_samples(
          images, sample["attention_map"], sample["background_source"], labels,
          np.argmax(sample["logits"], -1), list(data.class_names), path)
      out["figures"].append(path.name)
    return {"biigma": out}


def _off_diagonal_mean(matrix: np.ndarray) -> float:
  k = matrix.shape[0]
  if k < 2:
    return float("nan")
  return float((matrix.sum() - np.trace(matrix)) / (k * (k - 1)))


def _test_batches(data):
  """Unpadded (images uint8 [n, S, S, 3], labels [n]) of this process' test share."""
  labels_all = data.eval_labels["test"]
  for batch in eval_split.padded_batches(data.eval["test"]):
    mask = batch["mask"]
    if mask.any():
      yield batch["image"][mask], labels_all[batch["index"][mask]]


def _first_test_images(data, n: int) -> tuple[np.ndarray, np.ndarray]:
  images, indices = eval_split.first_examples(data.eval["test"], n)
  return images, data.eval_labels["test"][indices]
