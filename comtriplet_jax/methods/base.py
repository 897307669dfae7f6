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
* :meth:`Method.train_stream` gives the host batches the method trains on, from a
  given step (labelled random batches by default; triplets for SDC); it must be a
  pure function of the config's seeds and the step so that resumed runs continue
  exactly.
* :meth:`Method.report` runs once at the end on the chief process with the
  selected model, to write the method's own metrics and pictures.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from comtriplet_jax import models
from comtriplet_jax import parallel
from comtriplet_jax.data import augment
from comtriplet_jax.data import pipeline

PyTree = Any


class Method:
  """Base class: image preparation and the pieces shared by all methods."""

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

  def departures(self) -> dict[str, Any]:
    """Training fields that differ from what both papers fix (results.json).

    Both papers train with a constant learning rate; the CPU recipes
    (``runlocal``) schedule it. Methods add their own (BIIGMA-Net).
    """
    if self.config.lr_schedule != "constant":
      return {"lr_schedule": self.config.lr_schedule,
              "warmup_steps": self.config.warmup_steps}
    return {}

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
