"""A finished run as a model: what its workdir keeps, and loading it back.

A run's workdir (``python -m comtriplet_jax.main --workdir=RUN``) holds:

* ``config.json``: the resolved config (written before training);
* ``splits.csv``: every example of every split (``data/split_file.py``), which
  ``config.split_file`` takes back;
* ``best_checkpoint/<step>``: the model selected on validation;
* ``results.json``: validation and test metrics, with the test metrics at each
  operating point (binary tasks) or the calibration (multi-class);
* ``predictions.csv``: every validation and test example's score and
  prediction under the selected model;
* ``model.json``: the model card, what ``predict`` and ``evaluate`` read: the
  method, task, class names, image size and normalisation, the selected
  checkpoint, the score's meaning, the operating points' thresholds (chosen on
  validation) and the temperature (multi-class).

:func:`load_run` builds the method from ``config.json``, restores the selected
checkpoint and returns a :class:`TrainedModel` whose :meth:`TrainedModel.score`
runs the method's own ``predict``, jitted, on uint8 images prepared by
:func:`prepare_image` exactly as evaluation prepares them.

Operating points (binary tasks). A detector of a rare class is judged at a
threshold, and the papers' rules (argmax, nearest prototype) sit where the
classes' priors put them, which for 1 melanoma in 7 means a low sensitivity.
The rules of :mod:`~comtriplet_jax.evaluation.operating_points` ('paper',
'youden', 'sensitivity=0.90') are chosen on the validation split, never on
test; ``config.operating_point`` names the one ``predict`` and ``evaluate`` use.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf

from comtriplet_jax import methods
from comtriplet_jax.data import pipeline
from comtriplet_jax.evaluation import operating_points
from comtriplet_jax.models import weights

CONFIG_FILE = "config.json"
BEST_FILE = "best.json"
RESULTS_FILE = "results.json"
MODEL_FILE = "model.json"
SPLITS_FILE = "splits.csv"
PREDICTIONS_FILE = "predictions.csv"
RULES = ("paper", "youden", "sensitivity=0.90")


# ---------------------------------------------------------------- at the end
def decision_results(method, labels: dict[str, np.ndarray],
                     scores: dict[str, np.ndarray]) -> dict[str, Any]:
  """Operating points (binary) or calibration (multi-class), fitted on validation.

  Args:
    method: the run's method (``num_classes``, ``decision_boundary``).
    labels, scores: split name -> task labels and the method's scores, in
      index order, for 'validation' and 'test'.

  Returns:
    ``{'operating_points': {rule: {...}}}`` for two classes,
    ``{'calibration': {...}}`` otherwise; ``{}`` without a validation split
    (nothing to choose on).
  """
  if "validation" not in scores:
    return {}
  val_y, val_s = labels["validation"], scores["validation"]
  test_y, test_s = labels["test"], scores["test"]
  if method.num_classes == 2:
    if np.unique(val_y).size < 2:
      return {}
    return {"operating_points": operating_points.operating_point_metrics(
        val_y, val_s, test_y, test_s, RULES,
        paper_threshold=method.decision_boundary)}
  log_val = np.log(np.clip(val_s, 1e-12, 1.0))
  log_test = np.log(np.clip(test_s, 1e-12, 1.0))
  temperature = operating_points.fit_temperature(val_y, log_val)
  scaled = operating_points.apply_temperature(log_test, temperature)
  return {"calibration": {
      "temperature": float(temperature),
      "fitted_on": "validation",
      "test_ece": float(operating_points.expected_calibration_error(test_y, test_s)),
      "test_ece_scaled": float(operating_points.expected_calibration_error(
          test_y, scaled)),
  }}


def write_predictions(workdir: pathlib.Path, listing, class_names,
                      scored: dict[str, tuple[np.ndarray, np.ndarray]]) -> pathlib.Path:
  """Writes ``predictions.csv``: every evaluated example's score and prediction.

  One row per example of each evaluation split, in index order: ``image_id``,
  ``split``, ``label`` (the task's class name), ``score`` (binary) or
  ``p_<class>`` (multi-class), and ``prediction`` by the method's own rule, as
  the run's validation and test metrics count it.
  """
  path = workdir / PREDICTIONS_FILE
  tmp = path.with_name(path.name + ".tmp")
  multi = len(class_names) > 2
  with open(tmp, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    score_columns = [f"p_{n}" for n in class_names] if multi else ["score"]
    writer.writerow(["image_id", "split", "label", *score_columns, "prediction"])
    for split, (scores, predictions) in scored.items():
      ids, labels = listing[split]["image_id"], listing[split]["label"]
      for image_id, label, score, prediction in zip(ids, labels, scores, predictions):
        values = score if multi else [score]
        writer.writerow([image_id, split, class_names[int(label)],
                         *(repr(float(v)) for v in values),
                         class_names[int(prediction)]])
  tmp.replace(path)
  return path


def write_model_card(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                     method, *, class_names, best_step: int,
                     decisions: dict[str, Any], auc_convention: str = "") -> dict:
  """Writes ``model.json``: what :func:`load_run` needs besides the config."""
  card = {
      "method": config.method, "dataset": config.dataset, "task": config.task,
      "class_names": list(class_names), "image_size": int(config.image_size),
      "normalization": config.normalization, "backbone": config.backbone,
      "checkpoint": f"best_checkpoint/{best_step}", "best_step": int(best_step),
      "train_class_counts": np.asarray(method.train_class_counts).astype(int).tolist(),
      "steps_per_epoch": int(method.steps_per_epoch),
      "score": (auc_convention or
                ("probability of each class" if method.num_classes > 2 else
                 "probability of the positive class (label 1)")),
      "decision_boundary": float(method.decision_boundary),
      "operating_point": config.operating_point,
  }
  if "operating_points" in decisions:
    card["thresholds"] = {rule: point["threshold"]
                          for rule, point in decisions["operating_points"].items()}
  if "calibration" in decisions:
    card["temperature"] = decisions["calibration"]["temperature"]
  path = workdir / MODEL_FILE
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(card, indent=2))
  tmp.replace(path)
  return card


# ------------------------------------------------------------------- loading
def prepare_image(encoded: bytes, image_size: int) -> np.ndarray:
  """Encoded JPEG/PNG/BMP bytes -> [S, S, 3] uint8, as evaluation prepares them."""
  return pipeline.decode_and_resize(tf.constant(encoded), image_size).numpy()


@dataclasses.dataclass
class TrainedModel:
  """A run's selected model, ready to score images.

  Attributes:
    workdir: the run.
    config: its resolved config.
    card: its ``model.json``.
    results: its ``results.json``.
    method: the method object built from the config.
    variables: ``{'params', 'batch_stats'}`` of the selected checkpoint.
    method_state: the state that scores like the run's results.
  """
  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  card: dict[str, Any]
  results: dict[str, Any]
  method: Any
  variables: dict[str, Any]
  method_state: Any
  _predict: Callable | None = None
  _thresholds: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def class_names(self) -> list[str]:
    return list(self.card["class_names"])

  @property
  def image_size(self) -> int:
    return int(self.card["image_size"])

  def score(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 images [n, S, S, 3] -> the method's ``predict`` outputs, as NumPy."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"images must be [n, {self.image_size}, {self.image_size}, 3] "
                       f"uint8, got {images.shape}")
    if self._predict is None:
      self._predict = jax.jit(self.method.predict)
    out = self._predict(self.variables, self.method_state, jnp.asarray(images))
    return {k: np.asarray(v) for k, v in out.items()}

  def threshold(self, rule: str | None = None) -> float:
    """The threshold of an operating point ('paper', 'youden', 'sensitivity=…')."""
    rule = rule or self.card["operating_point"]
    if rule not in self._thresholds:
      self._thresholds[rule] = self._threshold(rule)
    return self._thresholds[rule]

  def _threshold(self, rule: str) -> float:
    thresholds = self.card.get("thresholds", {})
    if rule == "paper" and rule not in thresholds:
      # No validation split to choose on: the method's own rule, strict as
      # choose_threshold's 'paper' (score > boundary <=> score >= next float).
      return float(np.nextafter(np.float64(self.card["decision_boundary"]), np.inf))
    if rule in thresholds:
      return float(thresholds[rule])
    if not thresholds:
      raise ValueError(f"{self.workdir / MODEL_FILE} has no operating points (a "
                       "multi-class run, or a run without a validation split)")
    # Another rule (e.g. sensitivity=0.95): chosen now on the run's validation
    # scores, as the run's own rules were.
    labels, scores = self.validation_scores()
    return operating_points.choose_threshold(
        labels, scores, rule, paper_threshold=self.card["decision_boundary"])

  def validation_scores(self) -> tuple[np.ndarray, np.ndarray]:
    """Task labels and binary scores of the validation split, from ``predictions.csv``."""
    path = self.workdir / PREDICTIONS_FILE
    if not path.is_file():
      raise FileNotFoundError(f"{path} is missing: the run's validation scores choose "
                              "operating points")
    names = self.class_names
    labels, scores = [], []
    with open(path, newline="") as f:
      for row in csv.DictReader(f):
        if row["split"] == "validation":
          labels.append(names.index(row["label"]))
          scores.append(float(row["score"]))
    return np.asarray(labels), np.asarray(scores)

  def decide(self, scores: np.ndarray, rule: str | None = None) -> np.ndarray:
    """Predicted task labels: a threshold (binary) or the argmax (multi-class)."""
    if len(self.class_names) > 2:
      return np.argmax(scores, axis=-1)
    return operating_points.apply_threshold(scores, self.threshold(rule))

  def calibrated(self, probabilities: np.ndarray) -> np.ndarray:
    """Multi-class probabilities with the run's temperature (fitted on validation)."""
    if "temperature" not in self.card:
      raise ValueError(f"{self.workdir / MODEL_FILE} has no temperature: only "
                       "multi-class runs with a validation split are calibrated")
    return np.asarray(operating_points.apply_temperature(
        np.log(np.clip(probabilities, 1e-12, 1.0)), self.card["temperature"]))


def _read_json(path: pathlib.Path, what: str) -> dict[str, Any]:
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: {what}")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from e


def load_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The run's resolved config, from its ``config.json``."""
  record = _read_json(workdir / CONFIG_FILE,
                      "not a run's workdir (python -m comtriplet_jax.main writes it)")
  return ml_collections.ConfigDict(record)


def load_run(workdir: str | pathlib.Path) -> TrainedModel:
  """Loads a finished run's selected model (see the module docstring).

  Raises:
    FileNotFoundError: the workdir, its config, card or checkpoint is missing.
    ValueError: the checkpoint does not fit the model the config builds.
  """
  workdir = pathlib.Path(workdir).expanduser()
  if not workdir.is_dir():
    raise FileNotFoundError(f"--workdir={str(workdir)!r}: no such folder")
  config = load_config(workdir)
  card = _read_json(workdir / MODEL_FILE,
                    "the run has not finished (model.json is written with "
                    "results.json at its end), or it was made before model cards "
                    "existed; finish or rerun it")
  results = _read_json(workdir / RESULTS_FILE, "the run has not finished")
  method = methods.get_method(config.method)(
      config, num_classes=len(card["class_names"]),
      train_class_counts=card["train_class_counts"],
      steps_per_epoch=card["steps_per_epoch"])
  variables, method_state = method.init(jax.random.PRNGKey(0), card["image_size"])
  checkpoint = workdir / card["checkpoint"]
  if not checkpoint.is_dir():
    raise FileNotFoundError(f"{checkpoint} is missing: model.json names it as the "
                            "selected checkpoint")
  manager = ocp.CheckpointManager((workdir / "best_checkpoint").absolute())
  restored = manager.restore(card["best_step"], args=ocp.args.StandardRestore())
  manager.close()
  what = f"{checkpoint}'s"
  into = f"the model that {workdir / CONFIG_FILE} builds"
  variables = {name: weights.fit_variables(variables[name], restored.get(name) or {},
                                           f"{what} {name}", into)
               for name in ("params", "batch_stats")}
  method_state = method.inference_state(
      weights.fit_variables(method_state, restored.get("method_state") or {},
                            f"{what} method state", into), results)
  return TrainedModel(workdir, config, card, results, method, variables, method_state)
