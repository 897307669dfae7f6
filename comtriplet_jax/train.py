"""The one training loop: state, step, evaluation, checkpoints and logging.

Read top to bottom: :class:`TrainState`; the per-device train and predict steps;
evaluation of a split; checkpoint helpers; :func:`train_and_evaluate`, which ties
them together for any method of ``comtriplet_jax.methods``.

Determinism and resumption: every random number comes from ``config.seed`` folded
with the step and the device index, and the training stream is a pure function of
``(config.seed, step)``; a run killed at any moment restarts from its latest orbax
checkpoint and continues the same stream, so it ends with the same parameters as a
run that was never interrupted. A resume first checks the workdir's
``config.json`` (:func:`check_resumable`) and reconciles the best-model record
with its checkpoint (:func:`reconcile_best`); ``faults.point`` marks the moments
where the crash tests kill a run.

Non-finite losses: the step applies an update only when the loss and every
gradient are finite (otherwise it keeps the previous state and counts the step
in the ``nonfinite`` metric); the host checks that count at each log and
checkpoint and stops with :class:`NonFiniteLossError`, so no checkpoint ever holds
a state produced by a NaN or infinite update.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Iterator

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from comtriplet_jax import configlib
from comtriplet_jax import faults
from comtriplet_jax import parallel
from comtriplet_jax import runs
from comtriplet_jax.data import eval_split
from comtriplet_jax.data import pipeline
from comtriplet_jax.data import split_file
from comtriplet_jax.evaluation import metrics as metrics_lib
from comtriplet_jax.evaluation import run_pictures
from comtriplet_jax import methods
from comtriplet_jax.methods import base
from comtriplet_jax.models import weights

PyTree = Any


class NonFiniteLossError(FloatingPointError):
  """Raised when training produced a NaN or infinite loss or gradient."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  method_state: PyTree

  def variables(self) -> dict[str, PyTree]:
    return {"params": self.params, "batch_stats": self.batch_stats}


def learning_rate(config: ml_collections.ConfigDict, num_steps: int | None = None
                  ) -> float | optax.Schedule:
  """``config.learning_rate``, constant (both papers), or warm-up then cosine decay.

  ``lr_schedule='cosine'``: linear warm-up from 0 over ``warmup_steps``, then a
  cosine decay to 0 at ``num_steps`` (``optax.warmup_cosine_decay_schedule``).
  A run shorter than the warm-up keeps at least one step of decay.
  """
  if config.lr_schedule == "constant":
    return config.learning_rate
  if num_steps is None:
    raise ValueError("config.lr_schedule='cosine' needs the number of training steps")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=min(config.warmup_steps, num_steps - 1), decay_steps=num_steps,
      end_value=0.0)


def create_optimizer(config: ml_collections.ConfigDict, num_steps: int | None = None
                     ) -> optax.GradientTransformation:
  """Adam with the paper's settings (beta1 0.9, beta2 0.99, eps 1e-7 by default)."""
  return optax.adam(learning_rate(config, num_steps), b1=config.adam_b1,
                    b2=config.adam_b2, eps=config.adam_eps)


# ---------------------------------------------------------------------- steps
def make_train_step(method: base.Method, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict) -> Callable:
  """The per-device train step ``(state, batch, rng) -> (state, metrics)``."""

  def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    rng = parallel.device_rng(rng, state.step)

    def loss_fn(params):
      return method.loss(params, state.batch_stats, state.method_state, batch, rng,
                         step=state.step)

    (loss, (batch_stats, step_metrics, aux)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    grads = parallel.pmean(grads)
    if not config.sync_batch_norm:
      batch_stats = parallel.pmean(batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    method_state = method.update_state(state.method_state, aux)
    step_metrics = parallel.pmean(dict(step_metrics, loss=loss))

    finite = jnp.isfinite(step_metrics["loss"])
    for g in jax.tree.leaves(grads):
      finite &= jnp.all(jnp.isfinite(g))
    keep = lambda new, old: jax.tree.map(  # noqa: E731
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        method_state=keep(method_state, state.method_state))
    step_metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return new_state, step_metrics

  return train_step


def make_predict_step(method: base.Method) -> Callable:
  def predict_step(state: TrainState, batch: dict[str, jax.Array]):
    return method.predict(state.variables(), state.method_state, batch["image"])
  return predict_step


# ----------------------------------------------------------------- evaluation
def evaluate(p_predict: Callable, state: TrainState, dataset, labels: np.ndarray,
             par: parallel.DataParallel, num_classes: int) -> dict[str, Any]:
  """Scores every example of a split exactly once and computes its metrics."""
  scores, predictions = score_split(p_predict, state, dataset, labels.size, par)
  return metrics_lib.classification_metrics(labels, predictions, scores,
                                            num_classes=num_classes)


def score_split(p_predict: Callable, state: TrainState, dataset, num_examples: int,
                par: parallel.DataParallel) -> tuple[np.ndarray, np.ndarray]:
  """Every example's score and prediction, in index order (all processes)."""
  def predict(batch):
    out = par.local_outputs(p_predict(state, par.shard_batch(
        {"image": batch["image"].reshape(par.num_local_devices, -1,
                                         *batch["image"].shape[1:])})))
    return {"scores": out["scores"], "predictions": out["predictions"]}
  scored, _ = eval_split.outputs(predict, dataset, num_examples=num_examples,
                                 gather=True)
  return scored["scores"], scored["predictions"]


# ---------------------------------------------------------------- checkpoints
def _checkpoint_manager(directory: pathlib.Path, max_to_keep: int
                        ) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory.absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def _to_host(state: TrainState, par: parallel.DataParallel) -> TrainState:
  return par.unreplicate(state)


def _prepare_dataset_once(config: ml_collections.ConfigDict) -> None:
  """Process 0 prepares the TFDS dataset while the others wait.

  Processes sharing ``config.tfds_data_dir`` would otherwise all write the same
  files at once; after the barrier the others find it prepared (or, with a
  per-host data dir, prepare their own copy).
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from comtriplet_jax.data import builders  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    builders.prepare(builders.get_builder(
        config.dataset, data_dir=config.tfds_data_dir or None,
        manual_dir=config.manual_dir or None))
  multihost_utils.sync_global_devices("comtriplet_jax: dataset prepared")


def load_data(config: ml_collections.ConfigDict, num_local_devices: int
              ) -> pipeline.Datasets:
  """This process's share of the splits that ``config`` trains and evaluates on."""
  return pipeline.create_datasets(
      dataset=config.dataset, task=config.task, split_scheme=config.split_scheme,
      split_seed=config.split_seed, image_size=config.image_size,
      batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
      num_local_devices=num_local_devices,
      process_index=jax.process_index(), process_count=jax.process_count(),
      data_dir=config.tfds_data_dir or None, manual_dir=config.manual_dir or None,
      train_class_counts=config.train_class_counts, val_fraction=config.val_fraction,
      cache=config.cache_images, shuffle_seed=config.seed, split_by=config.split_by,
      split_file=config.split_file)


# ------------------------------------------------------- what a workdir holds
@dataclasses.dataclass
class _Best:
  step: int = -1
  value: float = -math.inf
  metrics: dict[str, Any] | None = None


CONFIG_FILE = runs.CONFIG_FILE
BEST_FILE = runs.BEST_FILE
RESULTS_FILE = runs.RESULTS_FILE
# Fields that change where data is read or what is logged and kept, not what is
# trained: a resumed run may change them.
RESUMABLE_FIELDS = frozenset({
    "manual_dir", "tfds_data_dir", "log_every_steps", "eval_batch_size",
    "max_checkpoints_to_keep", "sdc.embedding_plot", "udc.embedding_plot",
    "biigma.report_images", "operating_point", "heatmap_images"})


def config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The resolved config as JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def check_resumable(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses to resume a run in ``workdir`` that was made under another config.

  Raises:
    ValueError: naming every differing field that changes training, with both
      values, and how to proceed.
  """
  recorded_file = workdir / CONFIG_FILE
  if not recorded_file.exists():
    if (workdir / "checkpoints").exists():
      logging.warning("%s holds checkpoints but no %s (made by an older version): "
                      "resuming without checking its config", workdir, CONFIG_FILE)
    return
  recorded = flax.traverse_util.flatten_dict(json.loads(recorded_file.read_text()),
                                             sep=".")
  current = flax.traverse_util.flatten_dict(config_record(config), sep=".")
  # A field added to the configs after the run was made holds its default.
  defaults = flax.traverse_util.flatten_dict(config_record(configlib.base_config()),
                                             sep=".")
  for key in current.keys() - recorded.keys():
    if key in defaults and defaults[key] == current[key]:
      recorded[key] = current[key]
  differ = sorted(k for k in recorded.keys() | current.keys()
                  if recorded.get(k, "<absent>") != current.get(k, "<absent>")
                  and k not in RESUMABLE_FIELDS)
  if differ:
    details = "; ".join(f"{k}: {recorded.get(k, '<absent>')!r} in the run, "
                        f"{current.get(k, '<absent>')!r} now" for k in differ)
    raise ValueError(
        f"{workdir} holds a run made with another config ({details}). Resume it "
        "with the config it was made with, choose another --workdir, or pass "
        "--fresh to delete that run and start again.")


def discard_run(workdir: pathlib.Path) -> None:
  """Deletes what a run keeps in ``workdir`` (checkpoints, records, results, logs)."""
  for name in ("checkpoints", "best_checkpoint"):
    shutil.rmtree(workdir / name, ignore_errors=True)
  for name in (CONFIG_FILE, BEST_FILE, RESULTS_FILE, runs.MODEL_FILE, runs.SPLITS_FILE,
               runs.PREDICTIONS_FILE):
    (workdir / name).unlink(missing_ok=True)
  for events in workdir.glob("events.out.tfevents.*"):
    events.unlink()


def reconcile_best(workdir: pathlib.Path, best_ckpt: ocp.CheckpointManager) -> _Best:
  """The best-model record, made to agree with ``best_checkpoint/``.

  The best checkpoint is written before its record ``best.json``, at an
  evaluation that precedes the periodic checkpoint of the same step. A run
  killed between the two leaves a best checkpoint without a record, at a step
  later than any periodic checkpoint: the resumed run evaluates that step again
  and saves it again, so the orphan is deleted here (orbax refuses to write a
  step twice). A record whose checkpoint is gone is dropped the same way.
  """
  best_file = workdir / BEST_FILE
  best = _Best(**json.loads(best_file.read_text())) if best_file.exists() else _Best()
  steps = best_ckpt.all_steps()
  for step in steps:
    if step != best.step:
      logging.warning("best_checkpoint/%d has no record in %s (a run was stopped "
                      "between the two): deleted, the resumed run evaluates that "
                      "step again", step, BEST_FILE)
      best_ckpt.delete(step)
  if best.step >= 0 and best.step not in steps:
    logging.warning("%s names step %d, whose best checkpoint is missing: dropped",
                    BEST_FILE, best.step)
    best = _Best()
  return best


# ----------------------------------------------------------------------- loop
def _write_json(path: pathlib.Path, payload: Any) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float))
  os.replace(tmp, path)


def _selection_value(metrics: dict[str, Any], name: str) -> float:
  if name not in metrics:
    raise ValueError(f"config.selection_metric={name!r} is not among the evaluation "
                     f"metrics: {sorted(k for k in metrics if k != 'confusion_matrix')}")
  value = float(metrics[name])
  return -math.inf if math.isnan(value) else value


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       fresh: bool = False) -> dict[str, Any]:
  """Trains ``config.method``, selects on validation, reports validation and test.

  A workdir that holds a run is resumed, if its ``config.json`` matches
  ``config`` in every field that changes training (:data:`RESUMABLE_FIELDS`
  may differ); otherwise this refuses, naming the fields. ``fresh=True`` first
  deletes the run's checkpoints, records and results, and starts again.
  Nothing is written before every check has passed.

  Returns the final metrics ``{'validation': ..., 'test': ..., 'best_step': ...}``,
  also written to ``<workdir>/results.json``.
  """
  configlib.validate(config)
  method_cls = methods.get_method(config.method)
  workdir = pathlib.Path(workdir)
  par = parallel.DataParallel(config.parallelism)
  if config.batch_size % par.num_devices:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                     f"number of devices ({par.num_devices})")
  if config.eval_batch_size % par.num_devices:
    raise ValueError(f"config.eval_batch_size={config.eval_batch_size} must be "
                     f"divisible by the number of devices ({par.num_devices})")
  is_chief = jax.process_index() == 0
  if fresh:
    if is_chief:
      discard_run(workdir)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("comtriplet_jax: fresh workdir")
  else:
    check_resumable(config, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if is_chief:
    _write_json(workdir / CONFIG_FILE, config_record(config))
  writer = metric_writers.create_default_writer(
      str(workdir), just_logging=not is_chief, asynchronous=False)

  if jax.process_count() > 1:
    _prepare_dataset_once(config)
  data = load_data(config, par.num_local_devices)
  logging.info("data: %s, task %s, classes %s, examples %s, train class counts %s",
               config.dataset, config.task, data.class_names, data.num_examples,
               data.train_class_counts.tolist())
  if is_chief:
    split_file.write(workdir / runs.SPLITS_FILE, data.listing, data.class_names)

  steps_per_epoch = max(1, data.num_examples["train"] // config.batch_size)
  method = method_cls(config, num_classes=data.num_classes,
                      train_class_counts=data.train_class_counts,
                      steps_per_epoch=steps_per_epoch)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  variables, method_state = method.init(init_rng, config.image_size)
  if config.init_from:
    variables = weights.merge_backbone(
        variables, weights.load_backbone_variables(config.init_from, config.backbone),
        config.backbone)
  num_steps = (config.num_train_steps if config.num_train_steps > 0
               else int(math.ceil(config.num_epochs * steps_per_epoch)))
  tx = create_optimizer(config, num_steps)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     batch_stats=variables["batch_stats"],
                     opt_state=tx.init(variables["params"]), method_state=method_state)
  if is_chief:
    parameter_overview.log_parameter_overview(state.params)

  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  ckpt_every = (config.checkpoint_every_steps if config.checkpoint_every_steps > 0
                else eval_every)

  ckpt = _checkpoint_manager(workdir / "checkpoints", config.max_checkpoints_to_keep)
  best_ckpt = _checkpoint_manager(workdir / "best_checkpoint", 1)
  best = reconcile_best(workdir, best_ckpt)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(ckpt.latest_step(), args=ocp.args.StandardRestore(state))
    logging.info("resumed from checkpoint at step %d", int(state.step))
  start_step = int(state.step)

  p_train = par.map(make_train_step(method, tx, config), sharded_argnums=(1,),
                    donate_argnums=(0,))
  p_predict = par.map(make_predict_step(method), sharded_argnums=(1,),
                      sharded_out=True)
  state = par.replicate(state)
  train_rng = par.replicate(train_rng)

  def evaluate_split(split: str, state) -> dict[str, Any]:
    return evaluate(p_predict, state, data.eval[split], data.eval_labels[split], par,
                    data.num_classes)

  def final_scores(split: str, state) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    scores, predictions = score_split(p_predict, state, data.eval[split],
                                      data.eval_labels[split].size, par)
    return scores, predictions, metrics_lib.classification_metrics(
        data.eval_labels[split], predictions, scores, num_classes=data.num_classes)

  def save(state, step: int) -> None:
    ckpt.save(step, args=ocp.args.StandardSave(_to_host(state, par)))
    faults.point("checkpoint_write")   # while the asynchronous write goes on

  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  hooks = [report] if is_chief else []
  train_iter: Iterator = method.train_stream(data, start_step)
  pending: list[dict[str, jax.Array]] = []
  last_log = time.perf_counter()
  last_log_step = start_step
  logging.info("training %s for %d steps (%d per epoch) from step %d on %d devices",
               config.method, num_steps, steps_per_epoch, start_step, par.num_devices)
  try:
    for step in range(start_step + 1, num_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = par.shard_batch(next(train_iter))
        state, step_metrics = p_train(state, batch, train_rng)
        pending.append(step_metrics)
        faults.point("step")
      for hook in hooks:
        hook(step)
      is_last = step == num_steps
      if step % config.log_every_steps == 0 or is_last or step % ckpt_every == 0:
        summary = _summarise(pending, par)
        pending = []
        if summary["nonfinite"] > 0:
          ckpt.wait_until_finished()
          raise NonFiniteLossError(
              f"non-finite loss or gradient by step {step}: training stopped. The "
              f"last good checkpoint (step {ckpt.latest_step()}) is kept in "
              f"{workdir / 'checkpoints'}; lower config.learning_rate or check the data.")
        now = time.perf_counter()
        steps_per_s = (step - last_log_step) / max(now - last_log, 1e-9)
        summary["steps_per_sec"] = steps_per_s
        summary["images_per_sec"] = steps_per_s * config.batch_size
        last_log, last_log_step = now, step
        writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
        logging.info("step %d/%d: loss %.4f, %.2f steps/s, %.1f images/s, %s left",
                     step, num_steps, summary["loss"], steps_per_s,
                     summary["images_per_sec"],
                     _format_seconds((num_steps - step) / max(steps_per_s, 1e-9)))
      if step % eval_every == 0 or is_last:
        with report.timed("eval"):
          val = evaluate_split("validation", state)
        writer.write_scalars(step, {f"validation/{k}": v
                                    for k, v in metrics_lib.scalar_metrics(val).items()})
        value = _selection_value(val, config.selection_metric)
        logging.info("step %d validation: %s %.4f", step, config.selection_metric, value)
        if value > best.value or best.step < 0:
          best = _Best(step=step, value=value, metrics=val)
          best_ckpt.save(step, args=ocp.args.StandardSave(_to_host(state, par)),
                         force=True)
          best_ckpt.wait_until_finished()
          faults.point("best_recorded")
          if is_chief:
            _write_json(workdir / BEST_FILE, dataclasses.asdict(best))
      if step % ckpt_every == 0 or is_last:
        save(state, step)
  finally:
    # An interrupted run (an exception, Ctrl-C) still commits the checkpoint it
    # was writing; a killed one leaves a temporary folder that orbax ignores.
    ckpt.wait_until_finished()
    best_ckpt.wait_until_finished()

  # Final report with the model selected on validation, never on test.
  host_state = _to_host(state, par)
  if best_ckpt.latest_step() is not None:
    host_state = best_ckpt.restore(best_ckpt.latest_step(),
                                   args=ocp.args.StandardRestore(host_state))
  final_state = par.replicate(host_state)
  final = {split: final_scores(split, final_state) for split in data.eval}
  results = {
      "best_step": best.step,
      "selection_metric": config.selection_metric,
      "validation": final["validation"][2],
      "test": final["test"][2],
      "num_train_steps": num_steps,
      "class_names": list(data.class_names),
      "num_examples": {k: int(v) for k, v in data.num_examples.items()},
      "departures": method.departures(),
  }
  for split in ("validation", "test"):
    writer.write_scalars(num_steps, {f"final_{split}/{k}": v for k, v in
                                     metrics_lib.scalar_metrics(results[split]).items()})
  writer.flush()
  if is_chief:
    results.update(method.report(final_state, data, par, workdir, p_predict))
    faults.point("report")
  # The state that scores like the results: the CAE's report replaces its
  # running prototypes by final ones (on one process, which the CAE requires).
  inference = method.inference_state(host_state.method_state, results)
  if inference is not host_state.method_state:
    final_state = par.replicate(host_state.replace(method_state=inference))
    final = {split: final_scores(split, final_state) for split in data.eval}
  decisions = runs.decision_results(
      method, data.eval_labels, {split: scored[0] for split, scored in final.items()})
  results.update(decisions)
  if is_chief:
    runs.write_predictions(workdir, data.listing, data.class_names,
                           {split: scored[:2] for split, scored in final.items()})
    if config.heatmap_images > 0:
      images, indices = eval_split.first_examples(data.eval["test"],
                                                  8 * config.heatmap_images)
      labels = data.eval_labels["test"][indices]
      chosen = run_pictures.balanced_selection(labels, config.heatmap_images)
      run_pictures.gradcam_grid(workdir / "gradcam_test.png", method,
                                host_state.variables(), inference, images[chosen],
                                labels[chosen], data.class_names)
    if "operating_points" in decisions:
      run_pictures.plot_roc(workdir / "roc_test.png", data.eval_labels["test"],
                            final["test"][0], decisions["operating_points"])
    run_pictures.to_tensorboard(writer, num_steps, workdir)
    writer.flush()
    convention = getattr(method, "auc_convention", None)
    runs.write_model_card(workdir, config, method, class_names=data.class_names,
                          best_step=best.step, decisions=decisions,
                          auc_convention=convention() if convention else "")
    _write_json(workdir / RESULTS_FILE, results)
  logging.info("final (best step %d): validation %s %.4f, test %s %.4f", best.step,
               config.selection_metric, results["validation"].get(config.selection_metric, math.nan),
               config.selection_metric, results["test"].get(config.selection_metric, math.nan))
  ckpt.close()
  best_ckpt.close()
  return results


def _summarise(pending: list[dict[str, jax.Array]], par: parallel.DataParallel
               ) -> dict[str, float]:
  """Means of the step metrics since the last log; ``nonfinite`` is summed."""
  host = [par.unreplicate(m) for m in pending]
  out = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  out["nonfinite"] = float(np.sum([m["nonfinite"] for m in host]))
  return out


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
