"""Checks that the method tests share: exact trees, kill-and-resume, rescoring a run.

* :func:`assert_trees_equal`: same tree structure and every leaf bit-identical.
* :func:`kill_and_resume`: a run killed while it fetches a given training batch,
  then resumed in the same workdir, as a user would after a crash.
* :func:`assert_results_match_rescoring`: a finished run's evaluation done again
  outside the training loop: the selected checkpoint restored from disk, every
  example scored by a plain ``jax.jit`` of ``Method.predict`` on one device
  (no pmap, no gather, no reordering by the loop), and the metrics computed by
  scikit-learn here, so that a run's ``results.json`` is checked against
  something other than itself.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from sklearn import metrics as skm

from comtriplet_jax import methods
from comtriplet_jax import train


CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, arg: str | None = None):
  """``configs/<name>.py``'s ``get_config(arg)``."""
  spec = importlib.util.spec_from_file_location(f"{name}_config", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def assert_trees_equal(a, b) -> None:
  """Same structure, and every leaf equal bit for bit (NaN equal to NaN)."""
  assert jax.tree.structure(a) == jax.tree.structure(b), (
      f"the trees differ in structure:\n{jax.tree.structure(a)}\n"
      f"{jax.tree.structure(b)}")
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                          jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def latest_checkpoint(workdir: pathlib.Path, folder: str = "checkpoints"):
  """(step, restored tree) of the newest checkpoint in ``workdir/folder``."""
  mngr = ocp.CheckpointManager((pathlib.Path(workdir) / folder).absolute())
  step = mngr.latest_step()
  assert step is not None, f"no checkpoint in {workdir / folder}"
  restored = mngr.restore(step)
  mngr.close()
  return step, restored


def kill_and_resume(config, workdir: pathlib.Path, *, kill_at_batch: int) -> dict:
  """Runs ``config`` killed while fetching batch ``kill_at_batch``, then resumes it.

  The method's ``train_stream`` raises ``KeyboardInterrupt`` (what Ctrl-C or a
  scheduler's signal raises) when a fresh run asks for that batch; the second
  call finds the checkpoints and continues. Returns the resumed run's results.
  """
  # The pictures of the final report are not what a resume is checked on.
  config = config.copy_and_resolve_references()
  config.heatmap_images = 0
  method_cls = methods.get_method(config.method)
  real_stream = method_cls.train_stream
  starts = []

  def dying_stream(self, data, start_step):
    starts.append(start_step)
    for i, batch in enumerate(real_stream(self, data, start_step)):
      if start_step == 0 and i == kill_at_batch:
        raise KeyboardInterrupt("simulated kill")
      yield batch

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(method_cls, "train_stream", dying_stream)
    with pytest.raises(KeyboardInterrupt, match="simulated kill"):
      train.train_and_evaluate(config, str(workdir))
    killed_at, _ = latest_checkpoint(workdir)
    assert 0 < killed_at <= kill_at_batch, killed_at
    results = train.train_and_evaluate(config, str(workdir))
  # The resumed run asked for the stream from its checkpoint's step, not from 0.
  assert starts == [0, killed_at], starts
  return results


def assert_resumed_run_equals_whole_run(whole: pathlib.Path, resumed: pathlib.Path
                                        ) -> None:
  """Final train state and validation and test results are the same, exactly."""
  step_a, state_a = latest_checkpoint(whole)
  step_b, state_b = latest_checkpoint(resumed)
  assert step_a == step_b
  assert_trees_equal(state_a, state_b)
  best_a, best_b = (latest_checkpoint(w, "best_checkpoint") for w in (whole, resumed))
  assert best_a[0] == best_b[0]
  assert_trees_equal(best_a[1], best_b[1])
  results_a = json.loads((whole / "results.json").read_text())
  results_b = json.loads((resumed / "results.json").read_text())
  for key in ("best_step", "validation", "test"):
    assert results_a[key] == results_b[key], key


def score_splits(config, workdir: pathlib.Path, splits=("validation", "test"), *,
                 state=None):
  """Labels, scores and predictions of every example of some splits, outside the loop.

  ``state`` defaults to the run's selected checkpoint (``best_checkpoint``).
  Every padded evaluation batch goes through one plain ``jax.jit`` of
  ``Method.predict`` on one device; the padding is dropped and the examples put
  in order by their index here. Returns ``(method, data, {split: (labels [n],
  scores [n] or [n, C], predictions [n])})``.
  """
  data = train.load_data(config, num_local_devices=1)
  method = methods.get_method(config.method)(
      config, num_classes=data.num_classes, train_class_counts=data.train_class_counts,
      steps_per_epoch=max(1, data.num_examples["train"] // config.batch_size))
  if state is None:
    _, state = latest_checkpoint(workdir, "best_checkpoint")
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  predict = jax.jit(method.predict)
  out = {}
  for split in splits:
    scores, predictions, indices = [], [], []
    for batch in data.eval[split].as_numpy_iterator():
      images = batch["image"].reshape((-1,) + batch["image"].shape[2:])
      mask = batch["mask"].reshape(-1)
      scored = predict(variables, state["method_state"], images)
      scores.append(np.asarray(scored["scores"])[mask])
      predictions.append(np.asarray(scored["predictions"])[mask])
      indices.append(batch["index"].reshape(-1)[mask])
    indices = np.concatenate(indices)
    assert sorted(indices) == list(range(data.num_examples[split]))
    order = np.argsort(indices)
    out[split] = (data.eval_labels[split], np.concatenate(scores)[order],
                  np.concatenate(predictions)[order])
  return method, data, out


def split_features(fn, dataset) -> np.ndarray:
  """``fn(images)`` of every example of a padded evaluation split, in index order."""
  features, indices = [], []
  for batch in dataset.as_numpy_iterator():
    images = batch["image"].reshape((-1,) + batch["image"].shape[2:])
    mask = batch["mask"].reshape(-1)
    features.append(np.asarray(fn(images))[mask])
    indices.append(batch["index"].reshape(-1)[mask])
  order = np.argsort(np.concatenate(indices))
  return np.concatenate(features).astype(np.float64)[order]


def sklearn_metrics(labels, scores, predictions, num_classes: int) -> dict[str, float]:
  """scikit-learn's accuracy, macro F1 and (all classes present) ROC AUC."""
  out = {"accuracy": skm.accuracy_score(labels, predictions),
         "f1_macro": skm.f1_score(labels, predictions, average="macro",
                                  labels=np.arange(num_classes), zero_division=0),
         "num_examples": labels.size}
  if np.unique(labels).size == num_classes:
    out["auc"] = (skm.roc_auc_score(labels, scores) if num_classes == 2 else
                  skm.roc_auc_score(labels, scores / scores.sum(1, keepdims=True),
                                    multi_class="ovr"))
  return out


def assert_results_match_rescoring(config, workdir: pathlib.Path,
                                   results: dict | None = None) -> None:
  """``results`` (default: the run's results.json) equal scikit-learn's metrics of
  :func:`score_splits` on validation and test."""
  if results is None:
    results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
  _, data, scored = score_splits(config, workdir)
  for split, (labels, scores, predictions) in scored.items():
    expected = sklearn_metrics(labels, scores, predictions, data.num_classes)
    for name, value in expected.items():
      assert results[split][name] == pytest.approx(value, abs=1e-6), (split, name)


def assert_run_is_usable(workdir: pathlib.Path, image_dir: pathlib.Path,
                         out_dir: pathlib.Path) -> dict:
  """A finished run describes itself, and ``predict`` on its test files agrees.

  * ``splits.csv`` lists every evaluated and training example once, with the
    run's example counts, and no lesion in two splits;
  * ``predictions.csv`` holds the scores behind ``results.json``: scikit-learn's
    metrics of its rows are the run's validation and test metrics;
  * binary runs: each operating point's test metrics are those of its threshold
    applied to the test scores, and its threshold reaches its rule on the
    validation scores (checked here for the sensitivity target);
  * ``python -m comtriplet_jax.predict`` on the test split's own image files
    (``image_dir/<image_id>.jpg``) gives the run's test scores to 1e-5 and, at
    the paper's operating point, the run's test predictions.

  Returns the parsed ``model.json``.
  """
  import csv  # pylint: disable=g-import-not-at-top
  from comtriplet_jax import predict  # pylint: disable=g-import-not-at-top
  from comtriplet_jax.evaluation import operating_points  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  results = json.loads((workdir / "results.json").read_text())
  card = json.loads((workdir / "model.json").read_text())
  classes = results["class_names"]
  assert card["class_names"] == classes
  assert (workdir / card["checkpoint"]).is_dir()
  assert card["best_step"] == results["best_step"]

  split_rows = list(csv.DictReader(open(workdir / "splits.csv")))
  for split, count in results["num_examples"].items():
    assert sum(r["split"] == split for r in split_rows) == count, split
  assert len({r["image_id"] for r in split_rows}) == len(split_rows)
  groups = {}
  for r in split_rows:
    groups.setdefault(r["group_id"], set()).add(r["split"])
  assert all(len(s) == 1 for s in groups.values()), "a lesion in two splits"

  rows = list(csv.DictReader(open(workdir / "predictions.csv")))
  multi = len(classes) > 2
  columns = [f"p_{c}" for c in classes] if multi else ["score"]
  by_split = {}
  for split in ("validation", "test"):
    mine = [r for r in rows if r["split"] == split]
    labels = np.array([classes.index(r["label"]) for r in mine])
    scores = np.array([[float(r[c]) for c in columns] for r in mine])
    scores = scores if multi else scores[:, 0]
    predictions = np.array([classes.index(r["prediction"]) for r in mine])
    by_split[split] = (mine, labels, scores, predictions)
    for name, value in sklearn_metrics(labels, scores, predictions,
                                       len(classes)).items():
      assert results[split][name] == pytest.approx(value, abs=1e-6), (split, name)

  if not multi:
    _, val_y, val_s, _ = by_split["validation"]
    _, test_y, test_s, _ = by_split["test"]
    points = results["operating_points"]
    assert set(points) == {"paper", "youden", "sensitivity=0.90"}
    for rule, point in points.items():
      assert card["thresholds"][rule] == point["threshold"]
      predicted = (test_s >= point["threshold"]).astype(int)
      tp = np.sum((predicted == 1) & (test_y == 1))
      assert point["test"]["sensitivity"] == pytest.approx(
          tp / max(1, np.sum(test_y == 1)), abs=1e-9), rule
    # Chosen on the validation rows, never on test.
    for rule in ("youden", "sensitivity=0.90"):
      assert points[rule]["threshold"] == operating_points.choose_threshold(
          val_y, val_s, rule), rule
    target = points["sensitivity=0.90"]["threshold"]
    assert np.mean(val_s[val_y == 1] >= target) >= 0.9
  else:
    assert "temperature" in card and card["temperature"] > 0

  mine, _, scores, predictions = by_split["test"]
  files = [str(image_dir / f"{r['image_id']}.jpg") for r in mine]
  out = out_dir / "predictions_of_test_files.csv"
  result = predict.predict(str(workdir), files, out=str(out), batch_size=8,
                           operating_point="paper")
  assert result["scored"] == len(files) and not result["failed"]
  predicted = list(csv.DictReader(open(out)))
  assert [r["path"] for r in predicted] == files
  got = np.array([[float(r[c]) for c in columns] for r in predicted])
  np.testing.assert_allclose(got if multi else got[:, 0], scores, rtol=1e-5, atol=1e-5)
  assert [classes.index(r["prediction"]) for r in predicted] == predictions.tolist()
  return card
