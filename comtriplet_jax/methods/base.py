"""What every method gives the training loop.

A method owns its model and its loss; the loop in ``train.py`` owns everything
else (data parallelism, optimiser, checkpoints, evaluation, logging). A method is a
small object built from the config:

* :meth:`Method.init` returns the initial variables (``params``, ``batch_stats``)
  and the method's own state (cluster centres for SDC/UDC, ``{}`` otherwise), which
  lives in the train state, is updated inside the jitted step and is checkpointed.
* :meth:`Method.loss` is a pure function of one device's slice of a batch. It may
  use collectives over the ``data`` axis only on quantities without gradient
  (counts, gathered embeddings under ``stop_gradient``); the loop averages
  gradients with ``lax.pmean``, so a loss must be the per-device term whose mean
  over devices is the global loss.
* :meth:`Method.update_state` advances the method state from the loss' auxiliary
  output; its result must be identical on every device.
* :meth:`Method.predict` scores a batch for evaluation.
* :meth:`Method.heatmap_target` gives Grad-CAM (``evaluation/gradcam.py``) the
  last convolutional feature map and the value to explain, computed from it
  along the path of :meth:`Method.predict`.
* :meth:`Method.train_stream` gives the host batches the method trains on, from a
  given step (labelled random batches by default; triplets for SDC); it must be a
  pure function of the config's seeds and the step so that resumed runs continue
  exactly.
* :meth:`Method.report` runs once at the end on the chief process with the
  selected model, to write the method's own metrics and pictures.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Iterator, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from comtriplet_jax import models
from comtriplet_jax import parallel
from comtriplet_jax.data import augment
from comtriplet_jax.data import pipeline
from comtriplet_jax.evaluation import gradcam
from comtriplet_jax.models import common

PyTree = Any
_T = TypeVar("_T")


class Method:
  """Base class: image preparation and the pieces shared by all methods.

  ``decision_boundary``: for binary tasks, the score above which the method's
  own rule predicts the positive class (label 1): 0.5 for the argmax of two
  softmax probabilities; prototype methods (score d_maj - d_min) use 0.
  """

  decision_boundary = 0.5

  def __init__(self, config: ml_collections.ConfigDict, *, num_classes: int,
               train_class_counts, steps_per_epoch: int = 1):
    self.config = config
    self.num_classes = num_classes
    self.steps_per_epoch = steps_per_epoch
    self.train_class_counts = jnp.asarray(train_class_counts, jnp.float32)
    self.dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    self.axis_name = parallel.AXIS if config.sync_batch_norm else None

  # -------------------------------------------------------------- to override
  def build_model(self) -> nn.Module:
    raise NotImplementedError

  def loss(self, params: PyTree, batch_stats: PyTree, method_state: PyTree,
           batch: dict[str, jax.Array], rng: jax.Array, *, step: jax.Array
           ) -> tuple[jax.Array, tuple[PyTree, dict[str, jax.Array], PyTree]]:
    """Returns ``loss, (new_batch_stats, metrics, aux)`` for one device's batch.

    ``step`` is the number of updates done so far (a traced int32 scalar).
    """
    raise NotImplementedError

  def predict(self, variables: PyTree, method_state: PyTree, images: jax.Array
              ) -> dict[str, jax.Array]:
    """Returns ``scores`` [b] (binary) or [b, C] and ``predictions`` [b]."""
    raise NotImplementedError

  def heatmap_target(self, variables: PyTree, method_state: PyTree, images: jax.Array,
                     *, class_index: int | jax.Array | None = None,
                     feature_delta: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """What Grad-CAM explains: ``(feature_map [b, h, w, C], target [b])``.

    ``feature_map`` is the last convolutional map before global pooling, and
    ``target`` is computed from ``feature_map + feature_delta`` through the same
    ``model.apply`` as :meth:`predict` (``feature_delta=None``: nothing added);
    see ``evaluation/gradcam.py`` for why the delta. ``class_index`` picks the
    class explained (int or [b]); each method documents its default.
    """
    del variables, method_state, images, class_index, feature_delta
    raise NotImplementedError(f"{type(self).__name__} has no Grad-CAM target")

  def departures(self) -> dict[str, Any]:
    """Training fields that differ from what both papers fix (results.json).

    Both papers train with a constant learning rate; the CPU recipes
    (``runlocal``) schedule it. Methods add their own (BIIGMA-Net).
    """
    if self.config.lr_schedule != "constant":
      return {"lr_schedule": self.config.lr_schedule,
              "warmup_steps": self.config.warmup_steps}
    return {}

  def inference_state(self, method_state: PyTree, results: dict[str, Any]) -> PyTree:
    """The method state that scores images like the run's final results.

    ``results`` is the run's ``results.json``. The state of the selected
    checkpoint, unless the final report replaced part of it (the CAE's final
    prototypes).
    """
    del results
    return method_state

  def init_method_state(self, variables: PyTree) -> PyTree:
    del variables
    return {}

  def update_state(self, method_state: PyTree, aux: PyTree) -> PyTree:
    del aux
    return method_state

  def train_stream(self, data: pipeline.Datasets, start_step: int
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Host batches ``[local_devices, per_device, ...]`` from ``start_step`` on."""
    return pipeline.iterate_train(data, start_step)

  def report(self, state: PyTree, data: pipeline.Datasets, par: parallel.DataParallel,
             workdir: pathlib.Path, p_predict: Callable) -> dict[str, Any]:
    """Method-specific final outputs (files in ``workdir``); extra results keys."""
    del state, data, par, workdir, p_predict
    return {}

  # ---------------------------------------------------------------- shared
  @property
  def model(self) -> nn.Module:
    if not hasattr(self, "_model"):
      self._model = self.build_model()
    return self._model

  def backbone(self) -> nn.Module:
    return models.get_backbone(self.config.backbone, dtype=self.dtype,
                               axis_name=self.axis_name)

  def normalization_mode(self) -> str:
    """'unit' (x/255, both papers) or the Keras scheme of the backbone."""
    if self.config.normalization == "backbone":
      return models.PREPROCESSING[self.config.backbone]
    return self.config.normalization

  def prepare_images(self, images: jax.Array, rng: jax.Array | None, *,
                     train: bool) -> jax.Array:
    """uint8 [b, H, W, 3] -> normalised float, augmented when training with DA."""
    x = images.astype(jnp.float32)
    if train and self.config.augment:
      x = augment.augment(rng, x)
    return augment.normalize(x, self.normalization_mode())

  def init(self, rng: jax.Array, image_size: int) -> tuple[PyTree, PyTree]:
    """Initial ``{'params', 'batch_stats'}`` and method state, on the host."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params_rng, dropout_rng = jax.random.split(rng)
    # Initialise outside any named axis: BatchNorm's cross-device statistics are
    # only used in training mode.
    variables = jax.jit(lambda r, d: self.model.init(
        {"params": r, "dropout": dropout_rng}, d, train=False))(params_rng, dummy)
    variables = {"params": variables["params"],
                 "batch_stats": variables.get("batch_stats", {})}
    return variables, self.init_method_state(variables)

  # ------------------------------------------------------------ Grad-CAM
  def call_with_feature_map(self, run: Callable[[], _T],
                            feature_delta: jax.Array | None = None, *,
                            feature_name: str | None = None) -> tuple[jax.Array, _T]:
    """Runs ``run()`` exposing (and shifting) one feature map of the model's backbone.

    Every backbone already returns its feature maps (``models.FEATURES``) next to
    the pooled vector, and the method models read ``pooled`` (or an exit) from
    that call. The call of the submodule ``backbone`` inside ``run`` (e.g.
    :meth:`predict` or ``self.model.apply``) is intercepted
    (``gradcam.tap_submodule``): the map ``feature_name`` (default: the last,
    the one pooled) is read, ``feature_delta`` is added to it, and when it is the
    last map the pooled vector is recomputed from the shifted map exactly as the
    backbones compute it (``common.global_average_pool``), so that everything
    downstream of the map sees the shift. Nothing in the models changes, and
    the code path is the one ``run`` takes anyway.

    Args:
      run: a thunk calling this method's model once.
      feature_delta: added to the map, of its shape; None adds nothing.
      feature_name: a key of the backbone's features; the last by default.

    Returns:
      (the feature map, shifted, [b, h, w, C]; what ``run`` returned).

    Raises:
      ValueError: for an unknown feature name or a delta of the wrong shape.
      RuntimeError: when ``run`` does not call the backbone exactly once.
    """
    names = models.FEATURES[self.config.backbone]
    name = feature_name or names[-1]
    if name not in names:
      raise ValueError(f"feature {name!r} is not among the maps of backbone "
                       f"{self.config.backbone!r}: {', '.join(names)}")
    captured = []

    def edit(call, args, kwargs):
      pooled, features = call(*args, **kwargs)
      feature_map = features[name]
      if feature_delta is not None:
        if feature_delta.shape != feature_map.shape:
          raise ValueError(f"feature_delta has shape {feature_delta.shape}; the map "
                           f"{name!r} has {feature_map.shape}")
        feature_map = feature_map + feature_delta.astype(feature_map.dtype)
        features = {**features, name: feature_map}
        if name == names[-1]:
          pooled = common.global_average_pool(feature_map)
      captured.append(feature_map)
      return pooled, features

    with gradcam.tap_submodule(("backbone",), edit) as calls:
      out = run()
    if calls[0] != 1:
      raise RuntimeError(f"{type(self).__name__}: expected one call of the backbone, "
                         f"got {calls[0]}")
    return captured[0], out

  def class_logit_target(self, logits: jax.Array,
                         class_index: int | jax.Array | None) -> jax.Array:
    """The logit Grad-CAM explains; default: class 1 if binary, else the predicted.

    For a binary task class 1 (the positive class, melanoma) is the class whose
    probability :meth:`predict` reports as the score, whatever the prediction;
    with more classes the default is the predicted class (argmax).
    """
    if class_index is None:
      class_index = 1 if self.num_classes == 2 else jnp.argmax(logits, axis=-1)
    return gradcam.class_logit(logits, class_index)
