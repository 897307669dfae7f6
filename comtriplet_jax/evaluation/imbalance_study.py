"""The imbalance study of the COM-Triplet paper (Sec. V.C, Figure 4), one command.

SDC with COM-Triplet against the direct classifier with the same backbone, each
trained on a training split subsampled to majority:minority ratios 1, 2, 4, 15,
36 and 60 (the paper: 4500:4500, 4500:2250, 4500:1125, 4500:300, 4500:125,
4500:75 on ISIC 2019 melanoma vs nevus). Validation and test splits are never
subsampled, so every run is scored on the same images.

Scaling to a dataset: the majority count is fixed across ratios, as in the
paper, at the largest value for which ratio 1 exists, i.e. the number of
minority training images; the minority count at ratio r is round(majority / r).
On HAM10000 melanoma vs nevus (training split 5,029 nevi : 834 melanomas) that
is 834:834, 834:417, 834:208, 834:56, 834:23, 834:14: the paper's counts
scaled by 834/4500.

::

  python -m comtriplet_jax.evaluation.imbalance_study --sweep_dir=/tmp/fig4 --runlocal

runs every missing run as ``python -m comtriplet_jax.main --config=... --workdir=
<sweep_dir>/<method>_ratio<r>`` (a run whose ``results.json`` exists is read, not
rerun, so an interrupted study resumes), then writes ``imbalance_study.json``
(test and validation AUC per method and ratio, counts, wall times) and
``imbalance_auc.png`` (test AUC against the ratio) into the sweep directory.
``--read_only`` only reads and draws.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging

RATIOS = (1, 2, 4, 15, 36, 60)
PAPER_COUNTS = ((4500, 4500), (4500, 2250), (4500, 1125), (4500, 300), (4500, 125),
                (4500, 75))
# HAM10000 melanoma vs nevus, split_seed 0: training minority (melanoma) count.
HAM10000_TRAIN_MELANOMA = 834
METHODS = ("sdc", "classifier")
_CONFIG_FILES = {"sdc": "configs/sdc.py", "classifier": "configs/classifier.py"}
_LABELS = {"sdc": "SDC (COM-Triplet)", "classifier": "direct classifier"}


def scaled_counts(minority_available: int, ratios: Sequence[int] = RATIOS,
                  majority_available: int | None = None) -> list[tuple[int, int]]:
  """(majority, minority) per ratio with the majority fixed (see module docstring).

  Args:
    minority_available: minority training images of the dataset.
    ratios: majority:minority ratios.
    majority_available: majority training images; the fixed majority count is
      min(majority, minority) available.

  Returns:
    [(majority, minority)] per ratio; the minority count is at least 1.
  """
  if minority_available < 1:
    raise ValueError(f"minority_available must be >= 1, got {minority_available}")
  if any(r < 1 for r in ratios):
    raise ValueError(f"ratios must be >= 1, got {list(ratios)}")
  majority = minority_available
  if majority_available is not None:
    majority = min(majority, majority_available)
  return [(majority, max(1, int(round(majority / r)))) for r in ratios]


def ham10000_counts(ratios: Sequence[int] = RATIOS) -> list[str]:
  """'MAJ:MIN' strings of the study on HAM10000 melanoma vs nevus (split_seed 0)."""
  return [f"{a}:{b}" for a, b in scaled_counts(HAM10000_TRAIN_MELANOMA, ratios)]


def available_counts(dataset: str = "ham10000", task: str = "melanoma_vs_nevus",
                     split_scheme: str = "75/12.5/12.5", split_seed: int = 0,
                     data_dir: str | None = None, manual_dir: str | None = None
                     ) -> tuple[int, int]:
  """(majority, minority) training counts of a prepared dataset, images not decoded."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from comtriplet_jax.data import builders  # pylint: disable=g-import-not-at-top
  from comtriplet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  builder = builders.get_builder(dataset, data_dir=data_dir, manual_dir=manual_dir)
  builders.prepare(builder)
  source = pipeline.source_from_builder(builder)
  plan = pipeline.plan_splits(pipeline.read_metadata(source), source, task=task,
                              split_scheme=split_scheme, split_seed=split_seed)
  counts = np.bincount(plan.task_labels[plan.rows["train"]], minlength=2)
  if counts.size != 2:
    raise ValueError(f"task {task!r} is not binary: training counts {counts.tolist()}")
  return int(counts[0]), int(counts[1])


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of the study."""
  method: str
  ratio: int
  counts: tuple[int, int]
  config_arg: str
  overrides: tuple[str, ...]

  @property
  def name(self) -> str:
    return f"{self.method}_ratio{self.ratio}"

  def command(self, workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "comtriplet_jax.main",
            f"--config={_CONFIG_FILES[self.method]}:{self.config_arg}",
            f"--workdir={workdir}", *self.overrides]


def study_runs(counts: Sequence[tuple[int, int]], *, ratios: Sequence[int] = RATIOS,
               methods: Sequence[str] = METHODS, runlocal: bool = False,
               steps: int = 0, backbone: str = "", strategy: str = "",
               dataset: str = "", extra: str = "") -> list[Run]:
  """The runs of the study: every method at every ratio.

  Both methods get the same backbone, image size, strategy and number of steps
  (``steps`` > 0 overrides the configs' defaults through config overrides).
  """
  if len(counts) != len(ratios):
    raise ValueError(f"{len(counts)} counts for {len(ratios)} ratios")
  bad = [m for m in methods if m not in METHODS]
  if bad:
    raise ValueError(f"methods must be among {METHODS}, got {bad}")
  runs = []
  for method in methods:
    for ratio, (majority, minority) in zip(ratios, counts):
      arg = [f"counts={majority}:{minority}"]
      arg += ["runlocal"] if runlocal else []
      arg += [f"backbone={backbone}"] if backbone else []
      arg += [f"strategy={strategy}"] if strategy else []
      arg += [f"dataset={dataset}"] if dataset else []
      arg += [extra] if extra else []
      overrides = ()
      if steps > 0:
        overrides = (f"--config.num_train_steps={steps}",
                     f"--config.eval_every_steps={max(1, steps // 3)}")
      runs.append(Run(method, ratio, (majority, minority), ",".join(arg), overrides))
  return runs


def execute(runs: Sequence[Run], sweep_dir: pathlib.Path, *, repo_root: pathlib.Path
            ) -> None:
  """Runs each run whose results.json is missing; logs to <workdir>/run.log."""
  for run in runs:
    workdir = sweep_dir / run.name
    if (workdir / "results.json").exists():
      logging.info("%s: results.json exists, not rerun", run.name)
      continue
    workdir.mkdir(parents=True, exist_ok=True)
    command = run.command(workdir)
    logging.info("%s: %s", run.name, " ".join(command))
    start = time.perf_counter()
    with open(workdir / "run.log", "a") as log:
      proc = subprocess.run(command, cwd=repo_root, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    wall = time.perf_counter() - start
    if proc.returncode:
      raise RuntimeError(f"{run.name} failed (exit {proc.returncode}); see "
                         f"{workdir / 'run.log'}")
    (workdir / "wall_time.json").write_text(json.dumps({"seconds": wall}))
    logging.info("%s: done in %.0f s", run.name, wall)


def collect(runs: Sequence[Run], sweep_dir: pathlib.Path) -> dict[str, Any]:
  """Table of the finished runs: AUCs per method and ratio."""
  rows = []
  for run in runs:
    path = sweep_dir / run.name / "results.json"
    if not path.exists():
      continue
    results = json.loads(path.read_text())
    wall_file = sweep_dir / run.name / "wall_time.json"
    rows.append({
        "method": run.method, "ratio": run.ratio,
        "counts": f"{run.counts[0]}:{run.counts[1]}",
        "test_auc": results["test"].get("auc", math.nan),
        "validation_auc": results["validation"].get("auc", math.nan),
        "test_f1_weighted": results["test"].get("f1_weighted", math.nan),
        "best_step": results.get("best_step"),
        "num_train_steps": results.get("num_train_steps"),
        "wall_seconds": (json.loads(wall_file.read_text())["seconds"]
                         if wall_file.exists() else None),
        "config": f"{_CONFIG_FILES[run.method]}:{run.config_arg}",
    })
  return {"ratios": sorted({r.ratio for r in runs}), "runs": rows}


def plot(table: dict[str, Any], path: pathlib.Path, *, title: str = "") -> pathlib.Path:
  """Figure 4: test AUC against the majority:minority ratio, one line per method."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6.0, 4.2), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ratios = table["ratios"]
  positions = {r: i for i, r in enumerate(ratios)}
  for method, marker in zip(METHODS, ("o", "s")):
    rows = sorted((r for r in table["runs"] if r["method"] == method),
                  key=lambda r: r["ratio"])
    if not rows:
      continue
    ax.plot([positions[r["ratio"]] for r in rows], [100 * r["test_auc"] for r in rows],
            marker=marker, label=_LABELS[method])
  counts = {r["ratio"]: r["counts"] for r in table["runs"]}
  ax.set_xticks(range(len(ratios)))
  ax.set_xticklabels([f"{r}\n{counts.get(r, '')}" for r in ratios], fontsize=8)
  ax.set_xlabel("majority:minority ratio (training counts)")
  ax.set_ylabel("test AUC (%)")
  ax.set_title(title or "AUC under class imbalance (Figure 4)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path


FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Only when run as a program: importing this module (configs/sdc.py's sweep
  # does) must not add flags to another program's.
  flags.DEFINE_string("sweep_dir", None, "Directory of the study's run workdirs.")
  flags.DEFINE_bool("runlocal", False, "CPU-sized runs (the configs' runlocal).")
  flags.DEFINE_integer("steps", 0, "> 0: training steps of every run.")
  flags.DEFINE_string("backbone", "", "Backbone of both methods ('' = configs' default).")
  flags.DEFINE_string("strategy", "", "Strategy of both methods ('' = default NP).")
  flags.DEFINE_string("dataset", "ham10000", "Dataset (task melanoma_vs_nevus).")
  flags.DEFINE_list("ratios", [str(r) for r in RATIOS], "Majority:minority ratios.")
  flags.DEFINE_list("methods", list(METHODS), "Methods to compare.")
  flags.DEFINE_bool("read_only", False, "Only read finished runs and draw.")


def main(argv):
  del argv
  if not FLAGS.sweep_dir:
    raise app.UsageError("--sweep_dir is required")
  sweep_dir = pathlib.Path(FLAGS.sweep_dir).absolute()
  sweep_dir.mkdir(parents=True, exist_ok=True)
  ratios = [int(r) for r in FLAGS.ratios]
  if FLAGS.dataset == "ham10000":
    counts = scaled_counts(HAM10000_TRAIN_MELANOMA, ratios)
  else:
    majority, minority = available_counts(FLAGS.dataset)
    counts = scaled_counts(minority, ratios, majority_available=majority)
  runs = study_runs(counts, ratios=ratios, methods=FLAGS.methods,
                    runlocal=FLAGS.runlocal, steps=FLAGS.steps, backbone=FLAGS.backbone,
                    strategy=FLAGS.strategy,
                    dataset=FLAGS.dataset if FLAGS.dataset != "ham10000" else "")
  if not FLAGS.read_only:
    execute(runs, sweep_dir, repo_root=pathlib.Path(__file__).resolve().parents[2])
  table = collect(runs, sweep_dir)
  table["paper_counts"] = [f"{a}:{b}" for a, b in PAPER_COUNTS]
  (sweep_dir / "imbalance_study.json").write_text(json.dumps(table, indent=2))
  path = plot(table, sweep_dir / "imbalance_auc.png")
  for row in table["runs"]:
    print(f"{row['method']:>10} ratio {row['ratio']:>2} ({row['counts']:>8}): "
          f"test AUC {row['test_auc']:.4f}, validation AUC {row['validation_auc']:.4f}")
  print(f"wrote {sweep_dir / 'imbalance_study.json'} and {path}")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("sweep_dir")
  app.run(main)
