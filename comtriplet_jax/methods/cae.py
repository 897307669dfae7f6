"""The convolutional auto-encoder (CAE) deep-clustering baseline (COM-Triplet Sec. IV).

"CAE was trained to reconstruct dermoscopic images from their noise-corrupted and
randomly cropped versions. The feature vectors as computed by the encoder were
processed with k-means to obtain two cluster centers. These centers were used as in
UDC for melanoma detection on test images."

Training (one loop, ``python -m comtriplet_jax.main --config=configs/cae.py``): each
image (``'unit'``-normalised, x / 255) is corrupted on the device by
:func:`corrupt`: a random square crop of side ``f * S``, f uniform in
[``crop_min``, 1], at a uniform random position, resized back to S x S (bilinear),
then additive Gaussian noise of std ``noise_std``, clipped to [0, 1]; every image
draws from its own key, ``jax.random.split(key, B)[i]``. The model
(:class:`~comtriplet_jax.models.cae.ConvAutoEncoder`) reconstructs the clean,
uncropped image; the loss is the mean squared error over pixels and channels.

Prototypes. Evaluation scores an image by Eq. 14 with two prototypes in the
encoder's feature space (:func:`comtriplet_jax.clustering.prototypes.prototype_scores`:
nearer prototype = label, score = d_maj - d_min, the smaller cluster = minority =
label 1, cosine distance by default as in UDC). Two sets of prototypes exist:

* running prototypes, in the method state, so that the loop's periodic validation
  (and model selection on validation AUC) can score images: every step the encoder
  features of the step's clean training images (inference mode, under
  ``stop_gradient``) are gathered from all devices and written into a ring buffer of
  the last ``buffer_size`` features; K-Means (the JAX
  :func:`~comtriplet_jax.clustering.kmeans.kmeans`, 2 clusters, ``kmeans_n_init``
  restarts, a key folded from ``config.seed`` and the number of features seen) on
  the buffer gives the prototypes, ordered (majority, minority) by cluster size
  within the buffer. Only a full buffer is clustered: until ``buffer_size``
  features have been seen the prototypes are zero, every cosine distance is 1 and
  every score 0 (AUC 0.5), so evaluate after ``buffer_size / batch_size`` steps.
  Everything is a deterministic function of the gathered features, hence identical
  on every device, and it is checkpointed with the train state. Features in the
  buffer come from the parameters of the last ``buffer_size / batch_size`` steps.
* final prototypes, the paper's: in :meth:`CAE.report`, K-Means with scikit-learn
  (10 restarts, 3000 iterations, as the K-Means baseline) on the encoder features of
  ALL training images under the selected model. With ``final_prototypes=
  'train_kmeans'`` (default) the run's ``validation`` and ``test`` results are these
  prototypes' metrics, and the loop's (running-prototype) metrics are kept under
  ``running_prototypes``; ``'running'`` keeps the loop's as the results.

Model selection uses the loop's validation AUC with the running prototypes (the
loop's evaluation computes classification metrics only, not reconstruction loss);
the reconstruction MSE of the selected model on validation and test is reported in
``results['cae']``. AUC uses the minority-cluster convention of UDC.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from comtriplet_jax import parallel
from comtriplet_jax.baselines import shallow
from comtriplet_jax.clustering import kmeans as kmeans_lib
from comtriplet_jax.clustering import prototypes as prototypes_lib
from comtriplet_jax.data import augment
from comtriplet_jax.data import pipeline
from comtriplet_jax.evaluation import embedding_plot
from comtriplet_jax.evaluation import gradcam
from comtriplet_jax.evaluation import metrics as metrics_lib
from comtriplet_jax.methods import base
from comtriplet_jax.models import cae as cae_model

FINAL_PROTOTYPES = ("train_kmeans", "running")


def default_settings() -> ml_collections.ConfigDict:
  """``config.cae``: architecture, corruption and prototype settings."""
  s = ml_collections.ConfigDict()
  s.filters = (32, 64, 128, 256)  # stride-2 convolutions; S divisible by 2^len
  s.code_size = 128               # the encoder's feature vector
  s.batch_norm = True
  s.noise_std = 0.1               # Gaussian noise std on [0, 1] images
  s.crop_min = 0.8                # crop side fraction f ~ U[crop_min, 1]; 1 = no crop
  s.buffer_size = 1024            # running features for the running prototypes
  s.kmeans_n_init = 10            # restarts of both K-Means
  s.kmeans_max_iter = 300         # running K-Means (every step)
  s.final_kmeans_max_iter = 3000  # final K-Means on all training features
  s.distance = "cosine"           # prototype distance (Eq. 14), as in UDC
  s.final_prototypes = "train_kmeans"
  return s


def corrupt(key: jax.Array, images: jax.Array, *, noise_std: float,
            crop_min: float) -> jax.Array:
  """Random crop resized back, then Gaussian noise, one key per image.

  Image i uses ``jax.random.split(key, B)[i]``: its corruption does not depend on
  the batch it is in. The crop has side ``f * S`` with f ~ U[crop_min, 1] and a
  uniform position (sub-pixel), and is resampled to S x S with bilinear
  interpolation and half-pixel centres (as ``tf.image.resize``); with f = 1 the
  resampling is exactly the identity.

  Args:
    key: PRNG key.
    images: [B, H, W, C] float images in [0, 1].
    noise_std: std of the additive Gaussian noise (>= 0).
    crop_min: smallest crop side fraction, in (0, 1].

  Returns:
    [B, H, W, C] corrupted images, clipped to [0, 1], same dtype.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  if not 0.0 < crop_min <= 1.0:
    raise ValueError(f"crop_min must lie in (0, 1], got {crop_min}")
  if not noise_std >= 0.0:
    raise ValueError(f"noise_std must be >= 0, got {noise_std}")
  batch, height, width, channels = images.shape

  def draw(image_key):
    k_frac, k_top, k_left, k_noise = jax.random.split(image_key, 4)
    frac = jax.random.uniform(k_frac, (), jnp.float32, crop_min, 1.0)
    top = jax.random.uniform(k_top, (), jnp.float32) * (1.0 - frac) * height
    left = jax.random.uniform(k_left, (), jnp.float32) * (1.0 - frac) * width
    # Output pixel centre (r + 0.5) maps to top + (r + 0.5) * frac in the input.
    matrix = jnp.stack([
        jnp.stack([frac, 0.0, top + 0.5 * frac - 0.5]),
        jnp.stack([0.0, frac, left + 0.5 * frac - 0.5]),
        jnp.asarray([0.0, 0.0, 1.0])])
    noise = jax.random.normal(k_noise, (height, width, channels), jnp.float32)
    return matrix, noise

  matrices, noise = jax.vmap(draw)(jax.random.split(key, batch))
  cropped = augment.warp_images(images.astype(jnp.float32), matrices,
                                fill_mode="nearest")
  return jnp.clip(cropped + noise_std * noise, 0.0, 1.0).astype(images.dtype)


def running_prototypes(key: jax.Array, buffer: jax.Array, *, n_init: int,
                       max_iter: int) -> tuple[jax.Array, jax.Array]:
  """K-Means prototypes of a full feature buffer, ordered (majority, minority).

  Args:
    key: PRNG key of the K-Means restarts.
    buffer: [N, C] features.
    n_init: K-Means restarts.
    max_iter: Lloyd iterations per restart.

  Returns:
    (prototypes [2, C] ordered (majority, minority), cluster sizes [2] float32 in
    the same order; on a tie cluster 1 is the minority).
  """
  result = kmeans_lib.kmeans(key, buffer, 2, n_init=n_init, max_iter=max_iter)
  sizes = jnp.stack([jnp.sum(result.labels == k) for k in (0, 1)]).astype(jnp.float32)
  minority = jnp.where(sizes[0] < sizes[1], 0, 1)
  order = jnp.stack([1 - minority, minority])
  return result.centres[order], sizes[order]


class CAE(base.Method):
  """Denoising, cropping convolutional auto-encoder with K-Means prototypes."""

  def __init__(self, config: ml_collections.ConfigDict, **kwargs):
    super().__init__(config, **kwargs)
    if "cae" not in config:
      raise ValueError("config.cae is missing: use configs/cae.py")
    s = config.cae
    filters = tuple(s.filters)
    if not filters or not all(isinstance(f, int) and f >= 1 for f in filters):
      raise ValueError(f"config.cae.filters={filters!r} must be positive integers")
    if config.image_size % (2 ** len(filters)):
      raise ValueError(f"config.image_size={config.image_size} must be divisible by "
                       f"2**len(config.cae.filters) = {2 ** len(filters)}")
    for field in ("code_size", "kmeans_n_init", "kmeans_max_iter",
                  "final_kmeans_max_iter"):
      if not isinstance(s[field], int) or s[field] < 1:
        raise ValueError(f"config.cae.{field}={s[field]!r} must be an integer >= 1")
    if not s.noise_std >= 0:
      raise ValueError(f"config.cae.noise_std={s.noise_std!r} must be >= 0")
    if not 0 < s.crop_min <= 1:
      raise ValueError(f"config.cae.crop_min={s.crop_min!r} must lie in (0, 1]")
    if not isinstance(s.buffer_size, int) or s.buffer_size < max(2, config.batch_size):
      raise ValueError(f"config.cae.buffer_size={s.buffer_size!r} must be an integer "
                       f">= 2 and >= config.batch_size={config.batch_size}")
    if s.distance not in prototypes_lib.DISTANCES:
      raise ValueError(f"config.cae.distance={s.distance!r} is not allowed; choose one "
                       f"of {', '.join(prototypes_lib.DISTANCES)}")
    if s.final_prototypes not in FINAL_PROTOTYPES:
      raise ValueError(f"config.cae.final_prototypes={s.final_prototypes!r} is not "
                       f"allowed; choose one of {', '.join(FINAL_PROTOTYPES)}")
    if s.final_prototypes == "train_kmeans" and jax.process_count() > 1:
      # Checked here, before training, rather than when the report needs it.
      raise ValueError(
          "config.cae.final_prototypes='train_kmeans' needs every training example "
          "on one process; use final_prototypes='running' on several processes")
    if config.normalization != "unit":
      raise ValueError(f"config.normalization={config.normalization!r} is not allowed "
                       "for the CAE: choose unit (its sigmoid output reconstructs x/255)")
    if self.num_classes != 2:
      raise ValueError(f"the CAE's two prototypes need a binary task; config.task="
                       f"{config.task!r} has {self.num_classes} classes")
    self.settings = s

  def build_model(self) -> nn.Module:
    s = self.settings
    return cae_model.ConvAutoEncoder(
        image_size=self.config.image_size, filters=tuple(s.filters),
        code_size=s.code_size, batch_norm=s.batch_norm, dtype=self.dtype,
        axis_name=self.axis_name)

  def init_method_state(self, variables):
    del variables
    s = self.settings
    return {"features": jnp.zeros((s.buffer_size, s.code_size), jnp.float32),
            "seen": jnp.zeros((), jnp.int32),
            "prototypes": jnp.zeros((2, s.code_size), jnp.float32),
            "cluster_sizes": jnp.zeros((2,), jnp.float32)}

  def loss(self, params, batch_stats, method_state, batch, rng, *, step):
    del method_state, step
    aug_rng, corrupt_rng = jax.random.split(rng)
    clean = self.prepare_images(batch["image"], aug_rng, train=True)
    noisy = corrupt(corrupt_rng, clean, noise_std=self.settings.noise_std,
                    crop_min=self.settings.crop_min)
    variables = {"params": params, "batch_stats": batch_stats}
    (reconstruction, _), updates = self.model.apply(
        variables, noisy, train=True, mutable=["batch_stats"])
    mse = jnp.mean((reconstruction - clean.astype(jnp.float32)) ** 2)
    # The features the running prototypes are built from: clean images, inference
    # mode (as predict sees them), no gradient, the same on every device.
    codes = self.model.apply(variables, clean, train=False, method="encode")
    features = parallel.all_gather(jax.lax.stop_gradient(codes))
    return mse, (updates.get("batch_stats", batch_stats), {"mse": mse},
                 {"features": features})

  def update_state(self, method_state, aux):
    features = aux["features"]
    buffer = method_state["features"]
    size = buffer.shape[0]
    if features.shape[0] > size:
      raise ValueError(f"a step gathers {features.shape[0]} features but "
                       f"config.cae.buffer_size is {size}")
    seen = method_state["seen"]
    rows = (seen + jnp.arange(features.shape[0], dtype=jnp.int32)) % size
    buffer = buffer.at[rows].set(features)
    seen = seen + features.shape[0]
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), seen)

    def refresh(_):
      return running_prototypes(key, buffer, n_init=self.settings.kmeans_n_init,
                                max_iter=self.settings.kmeans_max_iter)

    def keep(_):
      return method_state["prototypes"], method_state["cluster_sizes"]

    # Only a full buffer is clustered, so the prototypes are always K-Means of
    # exactly the last buffer_size features; until then they stay zero.
    prototypes, sizes = jax.lax.cond(seen >= size, refresh, keep, None)
    return {"features": buffer, "seen": seen, "prototypes": prototypes,
            "cluster_sizes": sizes}

  def encode_images(self, variables, images: jax.Array) -> jax.Array:
    """uint8 images [B, S, S, 3] -> encoder features [B, code_size]."""
    x = self.prepare_images(images, None, train=False)
    return self.model.apply(variables, x, train=False, method="encode")

  decision_boundary = 0.0    # the nearer prototype: d_maj - d_min > 0

  def inference_state(self, method_state, results):
    """With ``final_prototypes='train_kmeans'`` the results score against the
    final K-Means prototypes (``results['cae']['prototype_vectors']``), not the
    running ones of the checkpoint."""
    vectors = results.get("cae", {}).get("prototype_vectors")
    if self.settings.final_prototypes != "train_kmeans" or vectors is None:
      return method_state
    vectors = np.asarray(vectors, np.float32)
    expected = np.shape(method_state["prototypes"])
    if vectors.shape != expected:
      raise ValueError(f"results.json's CAE prototypes have shape {vectors.shape}; "
                       f"the model's are {expected}")
    return dict(method_state, prototypes=jnp.asarray(vectors))

  def predict(self, variables, method_state, images):
    codes = self.encode_images(variables, images)
    # scores, predictions, d_min, d_maj; the rows are (majority, minority).
    rows = method_state["prototypes"]
    return prototypes_lib.prototype_scores(codes, rows[1], rows[0],
                                           distance=self.settings.distance)

  def heatmap_target(self, variables, method_state, images, *, class_index=None,
                     feature_delta=None):
    """The encoder's last convolutional map and :meth:`predict`'s prototype score.

    The CAE has no backbone and its encoder flattens the last map (after the last
    ReLU) into the dense ``code`` layer, so the map is the input of that layer:
    the call of the submodule ``encoder/code`` inside :meth:`predict` is
    intercepted (``gradcam.tap_submodule``), its input read as [b, S / 2^L,
    S / 2^L, f_L] (the inverse of the encoder's row-major flatten), shifted by
    ``feature_delta`` and handed on. The model is unchanged and the target is
    ``predict(...)['scores']``, d_maj - d_min to the prototypes; ``class_index``
    as for SDC (1, default: the score; 0: its negative).
    """
    s = self.settings
    side = self.config.image_size // 2 ** len(s.filters)
    captured = []

    def edit(call, args, kwargs):
      flat, *rest = args
      feature_map = flat.reshape(flat.shape[0], side, side, s.filters[-1])
      if feature_delta is not None:
        if feature_delta.shape != feature_map.shape:
          raise ValueError(f"feature_delta has shape {feature_delta.shape}; the "
                           f"encoder's last map has {feature_map.shape}")
        feature_map = feature_map + feature_delta.astype(feature_map.dtype)
      captured.append(feature_map)
      return call(feature_map.reshape(flat.shape), *rest, **kwargs)

    with gradcam.tap_submodule(("encoder", "code"), edit) as calls:
      out = self.predict(variables, method_state, images)
    if calls[0] != 1:
      raise RuntimeError(f"CAE: expected one call of the code layer, got {calls[0]}")
    return captured[0], gradcam.signed_score(out["scores"], class_index)

  # ------------------------------------------------------------------- report
  def _codes_and_errors(self, variables, images: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
    """uint8 images [B, S, S, 3] -> (codes [B, C], reconstruction MSE per image [B])."""
    x = self.prepare_images(images, None, train=False)
    reconstruction, codes = self.model.apply(variables, x, train=False)
    return codes, jnp.mean((reconstruction - x) ** 2, axis=(1, 2, 3))

  def _corrupt_and_reconstruct(self, variables, images: jax.Array, key: jax.Array):
    clean = self.prepare_images(images, None, train=False)
    noisy = corrupt(key, clean, noise_std=self.settings.noise_std,
                    crop_min=self.settings.crop_min)
    reconstruction, _ = self.model.apply(variables, noisy, train=False)
    return clean, noisy, reconstruction

  def report(self, state, data: pipeline.Datasets, par: parallel.DataParallel,
             workdir: pathlib.Path, p_predict: Callable) -> dict[str, Any]:
    """Final K-Means prototypes on all training features, MSE, pictures.

    Writes ``cae_reconstructions.png`` (clean, corrupted, reconstructed validation
    images) and ``cae_embeddings.png`` (test encoder features in 2-D, prototypes
    marked).
    """
    del p_predict
    host = par.unreplicate(state)
    variables = {"params": host.params, "batch_stats": host.batch_stats}
    # One compiled function for every split: evaluation batches and the padded
    # training batches all hold eval_batch_size images.
    codes_and_errors = jax.jit(self._codes_and_errors)
    embed_fn = lambda images: codes_and_errors(variables, images)[0]  # noqa: E731
    s = self.settings
    features, labels, mse = {}, {}, {}
    for split in data.eval:
      features[split] = shallow.embed_eval_split(embed_fn, data.eval[split],
                                                 data.num_examples[split])
      labels[split] = data.eval_labels[split]
      mse[split] = self._mean_error(
          lambda images: codes_and_errors(variables, images)[1], data.eval[split])
    running = {}
    for split, x in features.items():
      rows = host.method_state["prototypes"]
      scored = prototypes_lib.prototype_scores(jnp.asarray(x, jnp.float32), rows[1],
                                               rows[0], distance=s.distance)
      running[split] = metrics_lib.classification_metrics(
          labels[split], np.asarray(scored["predictions"]),
          np.asarray(scored["scores"]), num_classes=2)
    out: dict[str, Any] = {"running_prototypes": running}
    details: dict[str, Any] = {
        "running_cluster_sizes": np.asarray(host.method_state["cluster_sizes"]).tolist(),
        "reconstruction_mse": mse,
        "selection": "validation AUC with the running prototypes",
    }
    if s.final_prototypes == "train_kmeans":
      train_x, _, _ = shallow.embed_examples(embed_fn, data.train_examples,
                                             self.config.eval_batch_size)
      settings = shallow.default_settings()
      settings.kmeans_n_init = s.kmeans_n_init
      settings.kmeans_max_iter = s.final_kmeans_max_iter
      settings.distance = s.distance
      fitted = shallow.fit_baseline("kmeans", train_x, settings=settings,
                                    seed=self.config.seed)
      final = shallow.evaluate_baselines([fitted], features, labels)["kmeans"]
      out.update(final)
      details.update(prototypes=f"K-Means on {train_x.shape[0]} training features",
                     final_cluster_sizes=fitted.details["cluster_sizes"],
                     final_kmeans_n_iter=fitted.details.get("n_iter"))
      logging.info("CAE final prototypes: validation AUC %.4f, test AUC %.4f (running "
                   "prototypes: %.4f, %.4f)", final["validation"].get("auc", np.nan),
                   final["test"]["auc"], running.get("validation", {}).get("auc", np.nan),
                   running["test"]["auc"])
      prototypes = fitted.prototypes
    else:
      details["prototypes"] = "running K-Means on the feature buffer"
      prototypes = np.asarray(host.method_state["prototypes"])
    # Rows (majority, minority): what Eq. 14 scores test images against.
    details["prototype_vectors"] = np.asarray(prototypes, np.float32).tolist()
    picture = self._write_reconstructions(variables, data, workdir)
    if picture:
      details["reconstructions_png"] = picture
    if "test" in features:
      details["embeddings_png"] = str(embedding_plot.plot_embeddings(
          workdir / "cae_embeddings.png", features["test"], labels["test"],
          centre_min=prototypes[1], centre_maj=prototypes[0],
          class_names=data.class_names,
          title=f"CAE encoder features of the test split ({details['prototypes']})"))
    out["cae"] = details
    return out

  @staticmethod
  def _mean_error(errors_fn: Callable[[np.ndarray], jax.Array], dataset) -> float:
    """Mean over a split's real examples of the per-image reconstruction MSE."""
    total, count = 0.0, 0
    for batch in dataset.as_numpy_iterator():
      images = batch["image"].reshape((-1,) + batch["image"].shape[2:])
      mask = batch["mask"].reshape(-1)
      total += float(np.sum(np.asarray(errors_fn(images))[mask]))
      count += int(mask.sum())
    return total / max(count, 1)

  def _write_reconstructions(self, variables, data: pipeline.Datasets,
                             workdir: pathlib.Path, count: int = 8) -> str | None:
    """Clean, corrupted and reconstructed validation (or test) images as a PNG."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
    split = "validation" if "validation" in data.eval else "test"
    batch = next(data.eval[split].as_numpy_iterator())
    images = batch["image"].reshape((-1,) + batch["image"].shape[2:])
    images = images[batch["mask"].reshape(-1)][:count]
    if images.shape[0] == 0:
      return None
    clean, noisy, reconstruction = jax.jit(self._corrupt_and_reconstruct)(
        variables, images, jax.random.PRNGKey(self.config.seed))
    rows = [("clean", clean), ("corrupted", noisy), ("reconstructed", reconstruction)]
    fig, axes = plt.subplots(3, images.shape[0], squeeze=False,
                             figsize=(1.6 * images.shape[0], 5.2))
    for r, (title, x) in enumerate(rows):
      for c in range(images.shape[0]):
        axes[r, c].imshow(np.clip(np.asarray(x[c], np.float32), 0.0, 1.0))
        axes[r, c].set_axis_off()
      axes[r, 0].set_title(title, loc="left", fontsize=9)
    fig.tight_layout()
    path = workdir / "cae_reconstructions.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)
