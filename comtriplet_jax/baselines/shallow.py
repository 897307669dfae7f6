"""Shallow unsupervised baselines on backbone embeddings (COM-Triplet paper, Sec. IV).

"Competing Unsupervised Methods" (Tables VI and VIII): images go through a CNN
backbone "of matching architecture to that in UDC" and the pooled features are
handed to scikit-learn:

* shallow clustering: a 2-component ``GaussianMixture`` (tol 1e-3, 100 EM
  iterations, reg_covar 1e-6, k-means initialisation) and ``KMeans`` (10 seeds, 3000
  iterations). "Trained cluster centers were used as in UDC": the two centres (GMM
  means, K-Means centroids) are the prototypes of Eq. 14; the smaller cluster (GMM:
  smaller mixing weight, as UDC takes the smaller-weight component; K-Means: fewer
  training points) is the minority, i.e. melanoma, label 1. An image's label is its
  nearer prototype and its malignancy score ``d_maj - d_min``. The distance is the
  paper's cosine distance d by default (as in UDC), or Euclidean
  (``config.shallow.distance``).
* dimensionality reduction to one dimension: ``KernelPCA`` (polynomial kernel of
  degree 3, the paper's "third-order" kernel), ``FastICA`` (200 iterations,
  ``whiten='unit-variance'``) and ``LocallyLinearEmbedding`` (5 neighbours, reg
  1e-3);
* decomposition: ``DictionaryLearning`` with orthogonal matching pursuit, sparsity 1
  and 1000 iterations. The dictionary has ONE atom (``n_components=1``): the paper
  projects "onto a single dimension via ODL", and with sparsity 1 a code over K > 1
  atoms is one coefficient on a sample-dependent atom, not a coordinate on one axis;
  with one atom the OMP code is exactly the projection on that atom.

Threshold of the reductions ("a threshold in this dimension was learned for
classification"), without labels: the exact 1-D 2-means split of the training
projections (:func:`two_means_threshold`): the partition of the sorted values into
a low and a high group with the smallest within-group sum of squares, and the
threshold halfway between the two group means (the nearest-mean rule, so the
training points fall on the side of their group). The side with fewer training
points is the minority (the label-free convention of UDC); the score for ROC AUC is
the signed projection ``sign * (z - threshold)`` with the sign that makes the
minority side positive, and an image is called minority when its score is > 0.

Entry point (metrics of every baseline on validation and test in ``results.json``,
a markdown table in ``results.md``)::

  python -m comtriplet_jax.baselines.shallow --config=configs/shallow.py:runlocal \\
      --workdir=/tmp/shallow

Embeddings come from the backbone's pooled features in inference mode, jit-compiled
and batched, of a randomly initialised backbone (NP), of ImageNet weights or an
orbax backbone checkpoint (``config.init_from``, TL), or of the ``backbone`` subtree
of a training run's checkpoint (``config.shallow.checkpoint``: a workdir, a
checkpoint folder or one checkpoint; a workdir's ``best_checkpoint`` is preferred).
"""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib
import time
import warnings
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from sklearn import cluster
from sklearn import decomposition
from sklearn import exceptions as sk_exceptions
from sklearn import manifold
from sklearn import mixture

from comtriplet_jax import configlib
from comtriplet_jax import models
from comtriplet_jax.clustering import prototypes as prototypes_lib
from comtriplet_jax.data import augment
from comtriplet_jax.data import eval_split
from comtriplet_jax.data import pipeline
from comtriplet_jax.evaluation import embedding_plot
from comtriplet_jax.evaluation import metrics as metrics_lib
from comtriplet_jax.models import weights

PyTree = Any

CLUSTERINGS = ("gmm", "kmeans")
REDUCTIONS = ("kernel_pca", "fast_ica", "lle", "dictionary_learning")
BASELINES = CLUSTERINGS + REDUCTIONS
DISTANCES = prototypes_lib.DISTANCES
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
# Names as in the paper's Tables VI and VIII.
PAPER_NAMES = {"gmm": "GMM", "kmeans": "K-Means", "kernel_pca": "PCA (kernel)",
               "fast_ica": "Fast ICA", "lle": "LLE", "dictionary_learning": "ODL"}
PAPER_GROUPS = {"gmm": "Shallow clustering", "kmeans": "Shallow clustering",
                "kernel_pca": "Dimensionality reduction",
                "fast_ica": "Dimensionality reduction",
                "lle": "Dimensionality reduction",
                "dictionary_learning": "Decomposition"}


def default_settings() -> ml_collections.ConfigDict:
  """``config.shallow``: the paper's hyper-parameters and this module's choices."""
  s = ml_collections.ConfigDict()
  s.methods = "+".join(BASELINES)   # '+'-separated subset of BASELINES
  s.distance = "cosine"             # prototype distance of the clusterings (Eq. 14)
  s.checkpoint = ""                 # a training run's checkpoint/workdir, or ""
  s.standardize = False             # z-score features with training statistics
  s.max_fit_examples = 0            # > 0: fit on a seeded subset (O(n^2) methods)
  s.gmm_covariance_type = "full"    # scikit-learn's default; the paper names none
  s.gmm_tol = 1e-3
  s.gmm_max_iter = 100
  s.gmm_reg_covar = 1e-6
  s.kmeans_n_init = 10
  s.kmeans_max_iter = 3000
  s.kernel_pca_degree = 3
  s.ica_max_iter = 200
  s.lle_n_neighbors = 5
  s.lle_reg = 1e-3
  s.dictionary_max_iter = 1000
  s.dictionary_n_components = 1
  return s


def parse_methods(methods: str) -> tuple[str, ...]:
  """'gmm+lle' -> ('gmm', 'lle'); rejects unknown names, naming the allowed ones."""
  names = tuple(m.strip() for m in methods.split("+") if m.strip())
  bad = [m for m in names if m not in BASELINES]
  if bad or not names:
    raise ValueError(f"config.shallow.methods={methods!r}: choose '+'-separated names "
                     f"among {', '.join(BASELINES)}")
  if len(set(names)) != len(names):
    raise ValueError(f"config.shallow.methods={methods!r} names a baseline twice")
  return names


def validate_settings(settings: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming ``config.shallow.<field>`` and its allowed values."""
  parse_methods(settings.methods)
  if settings.distance not in DISTANCES:
    raise ValueError(f"config.shallow.distance={settings.distance!r} is not allowed; "
                     f"choose one of {', '.join(DISTANCES)}")
  if settings.gmm_covariance_type not in COVARIANCE_TYPES:
    raise ValueError(f"config.shallow.gmm_covariance_type="
                     f"{settings.gmm_covariance_type!r} is not allowed; choose one of "
                     f"{', '.join(COVARIANCE_TYPES)}")
  for field in ("gmm_max_iter", "kmeans_n_init", "kmeans_max_iter", "kernel_pca_degree",
                "ica_max_iter", "lle_n_neighbors", "dictionary_max_iter",
                "dictionary_n_components"):
    value = settings[field]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.shallow.{field}={value!r} must be an integer >= 1")
  for field in ("gmm_tol", "gmm_reg_covar", "lle_reg"):
    if not settings[field] > 0:
      raise ValueError(f"config.shallow.{field}={settings[field]!r} must be > 0")
  if not isinstance(settings.max_fit_examples, int) or settings.max_fit_examples < 0:
    raise ValueError(f"config.shallow.max_fit_examples={settings.max_fit_examples!r} "
                     "must be 0 (all) or a positive integer")


# ------------------------------------------------------------------ decision rules
def order_prototypes(centres: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, int]:
  """Puts the majority centre first: the smaller cluster is the minority.

  Args:
    centres: [2, S] cluster centres in the clustering's own order.
    sizes: [2] cluster sizes (counts or mixing weights).

  Returns:
    ([2, S] centres ordered (majority, minority), index of the minority in the
    input order; on a tie, cluster 1).
  """
  centres = np.asarray(centres)
  sizes = np.asarray(sizes, dtype=np.float64)
  if centres.ndim != 2 or centres.shape[0] != 2 or sizes.shape != (2,):
    raise ValueError(f"need centres [2, S] and sizes [2], got {centres.shape} and "
                     f"{sizes.shape}")
  minority = 0 if sizes[0] < sizes[1] else 1
  return centres[[1 - minority, minority]], minority


@dataclasses.dataclass(frozen=True)
class ThresholdRule:
  """A threshold on a 1-D projection; score = sign * (z - threshold).

  Attributes:
    threshold: the decision threshold on z.
    sign: +1 when the minority side is z > threshold, -1 when it is z < threshold.
    low_mean: mean of the low 2-means group on the training projections.
    high_mean: mean of the high group.
    minority_size: training points on the minority side.
    majority_size: training points on the majority side.
  """
  threshold: float
  sign: float
  low_mean: float
  high_mean: float
  minority_size: int
  majority_size: int

  def scores(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n] projections -> (scores [n], predictions [n]: 1 where score > 0)."""
    z = np.asarray(z, np.float64)
    if z.ndim != 1:
      raise ValueError(f"projections must be [n], got shape {z.shape}")
    scores = self.sign * (z - self.threshold)
    return scores, (scores > 0).astype(np.int32)


def two_means_threshold(z: np.ndarray) -> ThresholdRule:
  """The exact 2-means split of 1-D data and its minority side.

  Sorted values are split into a low group (the first k) and a high group; the k
  with the smallest total within-group sum of squares wins (every optimal 2-means
  partition of the line is such a split, so scanning all n - 1 of them is exact).
  The threshold is the midpoint of the two group means. The side with fewer
  training points (counted as z > threshold versus z <= threshold; on a tie the
  high side) is the minority.

  Args:
    z: [n] training projections, n >= 2.

  Returns:
    ThresholdRule.
  """
  z = np.asarray(z, np.float64)
  if z.ndim != 1 or z.size < 2:
    raise ValueError(f"need at least 2 projections [n], got shape {z.shape}")
  if not np.all(np.isfinite(z)):
    raise ValueError("projections contain NaN or infinite values")
  n = z.size
  # Centring first keeps the prefix-sum formula free of cancellation.
  zs = np.sort(z - z.mean())
  c1 = np.cumsum(zs)
  c2 = np.cumsum(zs * zs)
  k = np.arange(1, n)
  left = c2[k - 1] - c1[k - 1] ** 2 / k
  right = (c2[-1] - c2[k - 1]) - (c1[-1] - c1[k - 1]) ** 2 / (n - k)
  best = int(np.argmin(left + right)) + 1
  low_mean = float(c1[best - 1] / best + z.mean())
  high_mean = float((c1[-1] - c1[best - 1]) / (n - best) + z.mean())
  threshold = 0.5 * (low_mean + high_mean)
  n_high = int(np.sum(z > threshold))
  n_low = n - n_high
  sign = 1.0 if n_high <= n_low else -1.0
  return ThresholdRule(threshold=threshold, sign=sign, low_mean=low_mean,
                       high_mean=high_mean, minority_size=min(n_high, n_low),
                       majority_size=max(n_high, n_low))


# --------------------------------------------------------------------- baselines
def make_estimator(name: str, settings: ml_collections.ConfigDict, seed: int):
  """The scikit-learn estimator of baseline ``name`` with the paper's settings."""
  if name == "gmm":
    return mixture.GaussianMixture(
        n_components=2, covariance_type=settings.gmm_covariance_type,
        tol=settings.gmm_tol, max_iter=settings.gmm_max_iter,
        reg_covar=settings.gmm_reg_covar, init_params="kmeans", random_state=seed)
  if name == "kmeans":
    return cluster.KMeans(n_clusters=2, n_init=settings.kmeans_n_init,
                          max_iter=settings.kmeans_max_iter, random_state=seed)
  if name == "kernel_pca":
    return decomposition.KernelPCA(n_components=1, kernel="poly",
                                   degree=settings.kernel_pca_degree, random_state=seed)
  if name == "fast_ica":
    return decomposition.FastICA(n_components=1, max_iter=settings.ica_max_iter,
                                 whiten="unit-variance", random_state=seed)
  if name == "lle":
    return manifold.LocallyLinearEmbedding(
        n_neighbors=settings.lle_n_neighbors, n_components=1, reg=settings.lle_reg,
        random_state=seed)
  if name == "dictionary_learning":
    return decomposition.DictionaryLearning(
        n_components=settings.dictionary_n_components,
        max_iter=settings.dictionary_max_iter, transform_algorithm="omp",
        transform_n_nonzero_coefs=1, random_state=seed)
  raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")


@dataclasses.dataclass
class FittedBaseline:
  """A fitted baseline and its decision rule.

  Attributes:
    name: one of BASELINES.
    estimator: the fitted scikit-learn estimator.
    prototypes: [2, S] (majority, minority) for the clusterings, else None.
    rule: the ThresholdRule of the reductions, else None.
    distance: prototype distance of the clusterings.
    details: JSON-able facts about the fit (cluster sizes, threshold, warnings).
  """
  name: str
  estimator: Any
  prototypes: np.ndarray | None
  rule: ThresholdRule | None
  distance: str
  details: dict[str, Any]

  def project(self, features: np.ndarray) -> np.ndarray:
    """[n, S] -> [n] 1-D projection (reductions only)."""
    if self.rule is None:
      raise ValueError(f"{self.name} is a clustering: it has no 1-D projection")
    return _one_dimension(self.estimator.transform(features), self.name)

  def scores(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, S] features -> (scores [n], predictions [n]); score > 0 = minority."""
    if self.prototypes is not None:
      # Rows (majority, minority), as order_prototypes puts them.
      out = prototypes_lib.prototype_scores(
          jnp.asarray(features, jnp.float32), self.prototypes[1], self.prototypes[0],
          distance=self.distance)
      return (np.asarray(out["scores"], np.float64),
              np.asarray(out["predictions"]))
    return self.rule.scores(self.project(features))


def _one_dimension(projected: np.ndarray, name: str) -> np.ndarray:
  projected = np.asarray(projected, np.float64)
  if projected.ndim != 2 or projected.shape[1] < 1:
    raise ValueError(f"{name} returned projections of shape {projected.shape}")
  # DictionaryLearning with several atoms: the coefficient of each sample's one
  # active atom (OMP with sparsity 1) is its coordinate; with one atom (the default)
  # this is the code itself.
  if projected.shape[1] > 1:
    return projected[np.arange(projected.shape[0]),
                     np.argmax(np.abs(projected), axis=1)]
  return projected[:, 0]


def fit_baseline(name: str, features: np.ndarray, *,
                 settings: ml_collections.ConfigDict, seed: int = 0,
                 fit_indices: np.ndarray | None = None) -> FittedBaseline:
  """Fits baseline ``name`` on training features, without labels.

  Args:
    name: one of BASELINES.
    features: [n, S] training embeddings (already standardised if wanted).
    settings: ``config.shallow``.
    seed: random_state of the estimator.
    fit_indices: rows of ``features`` to fit the estimator on (None: all); the
      cluster sizes and the threshold always use all rows.

  Returns:
    FittedBaseline.
  """
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"need training features [n >= 2, S], got {features.shape}")
  fit_x = features if fit_indices is None else features[fit_indices]
  estimator = make_estimator(name, settings, seed)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", sk_exceptions.ConvergenceWarning)
    estimator.fit(fit_x)
  details: dict[str, Any] = {
      "fit_examples": int(fit_x.shape[0]),
      "warnings": sorted({str(w.message)[:200] for w in caught
                          if issubclass(w.category, sk_exceptions.ConvergenceWarning)}),
  }
  if hasattr(estimator, "n_iter_"):
    details["n_iter"] = int(np.max(estimator.n_iter_))
  if name in CLUSTERINGS:
    if name == "gmm":
      centres, sizes = estimator.means_, estimator.weights_
      details["converged"] = bool(estimator.converged_)
    else:
      centres = estimator.cluster_centers_
      sizes = np.bincount(estimator.predict(features), minlength=2)
    prototypes, minority = order_prototypes(centres, sizes)
    details.update(cluster_sizes=[float(s) for s in sizes], minority_cluster=minority,
                   distance=settings.distance)
    return FittedBaseline(name, estimator, prototypes.astype(np.float32), None,
                          settings.distance, details)
  projection = _one_dimension(estimator.transform(features), name)
  rule = two_means_threshold(projection)
  details.update(dataclasses.asdict(rule))
  return FittedBaseline(name, estimator, None, rule, settings.distance, details)


# -------------------------------------------------------------------- embeddings
def _pad_batch(images: np.ndarray, batch_size: int) -> np.ndarray:
  missing = batch_size - images.shape[0]
  if missing <= 0:
    return images
  return np.concatenate([images, np.zeros((missing,) + images.shape[1:], images.dtype)])


def embed_examples(embed_fn: Callable[[np.ndarray], jax.Array],
                   examples: tf.data.Dataset, batch_size: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Embeds a finite dataset of single examples (``Datasets.train_examples``).

  Batches are padded to ``batch_size`` so that ``embed_fn`` compiles once.

  Args:
    embed_fn: uint8 images [batch_size, S, S, 3] -> features [batch_size, F].
    examples: dataset of ``{'image', 'label', 'index'}`` per example.
    batch_size: images per call.

  Returns:
    (features [n, F] float32, labels [n] int, index [n] int), in the dataset's order.
  """
  feats, labels, index = [], [], []
  for batch in examples.batch(batch_size).as_numpy_iterator():
    n = batch["image"].shape[0]
    out = np.asarray(embed_fn(_pad_batch(batch["image"], batch_size)))[:n]
    feats.append(out.astype(np.float32))
    labels.append(batch["label"])
    index.append(batch["index"])
  if not feats:
    raise ValueError("no example to embed")
  return np.concatenate(feats), np.concatenate(labels), np.concatenate(index)


def embed_eval_split(embed_fn: Callable[[np.ndarray], jax.Array],
                     dataset: tf.data.Dataset, num_examples: int) -> np.ndarray:
  """Embeds an evaluation split (``Datasets.eval[split]``) in index order.

  Args:
    embed_fn: uint8 images [B, S, S, 3] -> features [B, F], B = devices x per-device
      batch of the split.
    dataset: batches ``{'image': [D, b, S, S, 3], 'mask', 'index'}`` with padding.
    num_examples: the split's size; every index must appear exactly once.

  Returns:
    [num_examples, F] float32 features, row i for the example of index i.
  """
  out, _ = eval_split.outputs(
      lambda batch: {"features": np.asarray(embed_fn(batch["image"]), np.float32)},
      dataset, num_examples=num_examples)
  return out["features"]


def _resolve_checkpoint(path: pathlib.Path) -> pathlib.Path:
  """A workdir, a CheckpointManager folder or a step folder -> one item folder."""
  if not path.exists():
    raise FileNotFoundError(f"config.shallow.checkpoint={str(path)!r}: no such path")
  if (path / "_METADATA").exists():
    return path
  if (path / "default" / "_METADATA").exists():
    return path / "default"
  for sub in ("best_checkpoint", "checkpoints"):
    if (path / sub).is_dir():
      return _resolve_checkpoint(path / sub)
  steps = sorted((int(p.name), p) for p in path.iterdir()
                 if p.is_dir() and p.name.isdigit())
  if steps:
    return _resolve_checkpoint(steps[-1][1])
  raise FileNotFoundError(f"config.shallow.checkpoint={str(path)!r} holds no orbax "
                          "checkpoint (expected a workdir, a checkpoints folder or a "
                          "step folder)")


def backbone_variables(config: ml_collections.ConfigDict, model, image_size: int
                       ) -> tuple[PyTree, str]:
  """The backbone's variables and a description of where they come from.

  Order: ``config.shallow.checkpoint`` (the ``backbone`` subtree of a training
  run's parameters, or a bare backbone checkpoint), else ``config.init_from``
  (ImageNet or an orbax backbone checkpoint, as the training loop loads it), else a
  random initialisation from ``config.seed`` (the paper's NP).
  """
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

  def init(rng):
    variables = model.init(rng, dummy, train=False)
    return {"params": variables["params"],
            "batch_stats": variables.get("batch_stats", {})}

  key = jax.random.PRNGKey(config.seed)
  if not (config.shallow.checkpoint or config.init_from):
    return jax.jit(init)(key), f"random initialisation (seed {config.seed})"
  # Loaded weights replace everything: the structure is enough, nothing compiles.
  variables = jax.eval_shape(init, key)
  if config.shallow.checkpoint:
    item = _resolve_checkpoint(pathlib.Path(config.shallow.checkpoint).expanduser())
    restored = ocp.StandardCheckpointer().restore(item.absolute())
    if "params" not in restored:
      raise ValueError(f"checkpoint {item} has no 'params' entry")
    params = restored["params"]
    batch_stats = restored.get("batch_stats") or {}
    if "backbone" in params:
      params, batch_stats = params["backbone"], batch_stats.get("backbone", {})
    source, what = f"checkpoint {item}", f"checkpoint {item}"
  elif config.init_from:
    loaded = weights.load_backbone_variables(config.init_from, config.backbone)
    params, batch_stats = loaded["params"], loaded["batch_stats"]
    source, what = f"init_from={config.init_from}", f"init_from={config.init_from!r} weights"
  return {"params": weights.fit_variables(variables["params"], params, what,
                                          "the backbone"),
          "batch_stats": weights.fit_variables(variables["batch_stats"], batch_stats,
                                               what, "the backbone")}, source


def make_backbone_embedder(config: ml_collections.ConfigDict
                           ) -> tuple[Callable[[np.ndarray], jax.Array], str, int]:
  """A jitted ``uint8 images [B, S, S, 3] -> pooled features [B, F]`` function.

  Returns:
    (embed_fn, description of the weights, F).
  """
  dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
  model = models.get_backbone(config.backbone, dtype=dtype)
  variables, source = backbone_variables(config, model, config.image_size)
  mode = (models.PREPROCESSING[config.backbone] if config.normalization == "backbone"
          else config.normalization)

  @jax.jit
  def embed(variables, images):
    x = augment.normalize(images.astype(jnp.float32), mode)
    pooled, _ = model.apply(variables, x, train=False)
    return pooled.astype(jnp.float32)

  size = jax.eval_shape(
      embed, variables,
      jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.uint8))
  return (lambda images: embed(variables, images)), source, int(size.shape[-1])


# ------------------------------------------------------------------------ report
def evaluate_baselines(fitted: Iterable[FittedBaseline],
                       features: dict[str, np.ndarray], labels: dict[str, np.ndarray]
                       ) -> dict[str, dict[str, Any]]:
  """Metrics of every fitted baseline on every split.

  Args:
    fitted: fitted baselines.
    features: split -> [n, S] features.
    labels: split -> [n] labels (1 = minority / positive class).

  Returns:
    name -> split -> ``classification_metrics`` dict.
  """
  out = {}
  for baseline in fitted:
    out[baseline.name] = {}
    for split, x in features.items():
      scores, predictions = baseline.scores(x)
      out[baseline.name][split] = metrics_lib.classification_metrics(
          labels[split], predictions, scores, num_classes=2)
  return out


def markdown_table(results: dict[str, Any], names: Iterable[str]) -> str:
  """The paper's Table VI/VIII columns for each baseline, as markdown."""
  def pct(x):
    return "n/a" if x is None or x != x else f"{100 * x:.2f}"
  lines = [
      "| Group | Method | AUC val | AUC test | Recall | Precision | Specificity | "
      "Accuracy | F1 | Sensitivity (mel) | fit s |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name in names:
    entry = results[name]
    test = entry["test"]
    lines.append(
        f"| {PAPER_GROUPS[name]} | {PAPER_NAMES[name]} | "
        f"{pct(entry['validation'].get('auc'))} | {pct(test.get('auc'))} | "
        f"{pct(test['recall_weighted'])} | {pct(test['precision_weighted'])} | "
        f"{pct(test['specificity_weighted'])} | {pct(test['accuracy'])} | "
        f"{pct(test['f1_weighted'])} | {pct(test['sensitivity'])} | "
        f"{entry['fit_seconds']:.1f} |")
  return "\n".join(lines) + "\n"


def _write_json(path: pathlib.Path, payload: Any) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float))
  os.replace(tmp, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Embeds train/validation/test, fits every baseline, writes the results.

  Returns:
    ``{'settings': ..., '<baseline>': {'validation': metrics, 'test': metrics,
    'fit_seconds': ..., 'details': ...}, ...}``, also written to
    ``<workdir>/results.json``; ``<workdir>/results.md`` holds the table.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  configlib.validate(config)
  if "shallow" not in config:
    raise ValueError("config.shallow is missing: use configs/shallow.py")
  validate_settings(config.shallow)
  names = parse_methods(config.shallow.methods)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)

  start = time.perf_counter()
  data = pipeline.create_datasets(
      dataset=config.dataset, task=config.task, split_scheme=config.split_scheme,
      split_seed=config.split_seed, image_size=config.image_size,
      batch_size=config.eval_batch_size, eval_batch_size=config.eval_batch_size,
      num_local_devices=1, data_dir=config.tfds_data_dir or None,
      manual_dir=config.manual_dir or None,
      train_class_counts=config.train_class_counts, val_fraction=config.val_fraction,
      cache=False, shuffle_seed=config.seed, split_by=config.split_by,
      split_file=config.split_file)
  if data.num_classes != 2:
    raise ValueError(f"the shallow baselines are binary (minority vs majority); task "
                     f"{config.task!r} has {data.num_classes} classes")
  embed_fn, source, dim = make_backbone_embedder(config)
  train_x, train_y, _ = embed_examples(embed_fn, data.train_examples,
                                       config.eval_batch_size)
  features = {"train": train_x}
  labels = {"train": train_y}
  for split in data.eval:
    features[split] = embed_eval_split(embed_fn, data.eval[split],
                                       data.num_examples[split])
    labels[split] = data.eval_labels[split]
  embed_seconds = time.perf_counter() - start
  logging.info("embedded %s with %s (%s): %d features in %.1f s",
               {k: v.shape[0] for k, v in features.items()}, config.backbone, source,
               dim, embed_seconds)

  if config.shallow.standardize:
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    features = {k: (v - mean) / std for k, v in features.items()}
  fit_indices = None
  n_train = features["train"].shape[0]
  if 0 < config.shallow.max_fit_examples < n_train:
    fit_indices = np.sort(np.random.default_rng(config.seed).choice(
        n_train, config.shallow.max_fit_examples, replace=False))

  results: dict[str, Any] = {
      "settings": {
          "dataset": config.dataset, "task": config.task, "backbone": config.backbone,
          "image_size": config.image_size, "weights": source, "feature_size": dim,
          "normalization": config.normalization,
          "shallow": config.shallow.to_dict(),
          "embed_seconds": embed_seconds,
          "class_names": list(data.class_names),
          "num_examples": {k: int(v.shape[0]) for k, v in features.items()},
          "train_class_counts": data.train_class_counts.tolist(),
          "threshold_rule": "exact 1-D 2-means, midpoint of the group means; smaller "
                            "side = minority",
          "auc_convention": "minority cluster/side = positive (label 1)",
      }}
  for name in names:
    t0 = time.perf_counter()
    fitted = fit_baseline(name, features["train"], settings=config.shallow,
                          seed=config.seed, fit_indices=fit_indices)
    fit_seconds = time.perf_counter() - t0
    metrics = evaluate_baselines([fitted], features, labels)[name]
    results[name] = {"validation": metrics["validation"], "test": metrics["test"],
                     "train": metrics["train"], "fit_seconds": fit_seconds,
                     "details": fitted.details}
    if fitted.prototypes is not None:
      # The clusterings' prototypes among the test embeddings, as SDC/UDC draw them.
      plot = embedding_plot.plot_embeddings(
          workdir / f"embeddings_test_{name}.png", features["test"], labels["test"],
          centre_min=fitted.prototypes[1], centre_maj=fitted.prototypes[0],
          class_names=list(data.class_names),
          title=f"{name} on {config.backbone} features: test embeddings")
      results[name]["embedding_plot"] = str(plot)
    logging.info("%s: validation AUC %.4f, test AUC %.4f (fit %.1f s)", name,
                 metrics["validation"]["auc"], metrics["test"]["auc"], fit_seconds)
  _write_json(workdir / "results.json", results)
  table = markdown_table(results, names)
  (workdir / "results.md").write_text(
      f"# Shallow baselines: {config.dataset} {config.task}, {config.backbone} at "
      f"{config.image_size} px, weights: {source}\n\n{table}")
  return results


def main(argv):
  """``python -m comtriplet_jax.baselines.shallow --config=... --workdir=...``."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # TensorFlow is only the input pipeline here: keep it off any accelerator.
  tf.config.set_visible_devices([], "GPU")
  results = run(flags.FLAGS.config, flags.FLAGS.workdir)
  print(markdown_table(results, [k for k in results if k != "settings"]))


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Directory for results.json and results.md.")
  config_flags.DEFINE_config_file(
      "config", None, "configs/shallow.py, optionally followed by :ARG.",
      lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main)
