"""BIIGMA-Net's Table 2 from a sweep directory, beside the paper's ISIC-18 column.

A sweep directory holds one workdir per run (``launch/sweep.py`` or
:func:`run_sweep` below), each with the ``results.json`` of the training loop.
A run is recognised by what it changed from the paper's setting
(``results['biigma']['settings']['departures']``, written by
``methods.biigma.BIIGMA.report``), not by its folder name, so any runner's
naming works:

===============================  ==========================================
Table 2 row                      departures from the paper's setting
===============================  ==========================================
Baseline                         use_mica False, indep none, sampling none
W/O MICA                         use_mica False, indep none
W/O Vector Sampling              sampling none
W/O Lindep                       indep none
Heads = k                        num_heads k ({} for k = 3)
Sigma = s                        sigma s ({} for the dataset's sigma)
Cosine Similarity based Lindep   indep cosine
Best Configuration               our row with the best mean test macro F1
===============================  ==========================================

Runs of several seeds fill a row with their mean (and standard deviation).
Metrics are the test split's, of the model selected on validation macro F1:
F1 = macro F1, Acc = accuracy, Rec = macro recall (the paper's columns), plus
macro precision. Also written: Figure 3's pair, the mean head |cosine| matrices
without and with L_indep (``figure3.png``), when both runs are there.

Usage::

  python -m comtriplet_jax.evaluation.ablation_table --sweep_dir=/tmp/t2
  # run the grid here, one run after the other, then write the table:
  python -m comtriplet_jax.evaluation.ablation_table --sweep_dir=/tmp/t2 \
      --run --sweep=table2,runlocal,steps=300

Writes ``table2.md`` and ``table2.json`` in the sweep directory.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
from typing import Any, Sequence

import numpy as np

# The paper's Table 2, ISIC 18 column: (F1, Acc, Rec).
PAPER_ISIC18: dict[str, tuple[float, float, float]] = {
    "Baseline": (0.7256, 0.8431, 0.7221),
    "W/O MICA": (0.7994, 0.8798, 0.7931),
    "W/O Vector Sampling": (0.7947, 0.8638, 0.8028),
    "W/O Lindep": (0.7869, 0.8738, 0.7627),
    "Heads = 1": (0.7871, 0.8691, 0.7789),
    "Heads = 2": (0.7938, 0.8753, 0.7865),
    "Heads = 3": (0.8220, 0.8833, 0.8094),
    "Heads = 4": (0.7920, 0.8743, 0.7781),
    "Sigma = 0.5": (0.7883, 0.8748, 0.7634),
    "Sigma = 1.0": (0.8220, 0.8833, 0.8094),
    "Sigma = 2.0": (0.7937, 0.8783, 0.7842),
    "Sigma = 4.0": (0.7866, 0.8748, 0.7731),
    "Cosine Similarity based Lindep": (0.7920, 0.8753, 0.7817),
    "Best Configuration": (0.8220, 0.8833, 0.8094),
}
ROWS = tuple(PAPER_ISIC18)
METRICS = (("f1", "f1_macro"), ("accuracy", "accuracy"), ("recall", "recall_macro"),
           ("precision", "precision_macro"))
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def row_departures(paper_sigma: float) -> dict[str, dict[str, Any]]:
  """Table 2's rows (but the best) -> the departures of the run that fills it."""
  rows: dict[str, dict[str, Any]] = {
      "Baseline": {"use_mica": False, "indep_measure": "none", "sampling": "none"},
      "W/O MICA": {"use_mica": False, "indep_measure": "none"},
      "W/O Vector Sampling": {"sampling": "none"},
      "W/O Lindep": {"indep_measure": "none"},
  }
  for k in (1, 2, 3, 4):
    rows[f"Heads = {k}"] = {} if k == 3 else {"num_heads": k}
  for s in (0.5, 1.0, 2.0, 4.0):
    rows[f"Sigma = {s}"] = {} if math.isclose(s, paper_sigma) else {"sigma": s}
  rows["Cosine Similarity based Lindep"] = {"indep_measure": "cosine"}
  return rows


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
  if set(a) != set(b):
    return False
  for key, value in a.items():
    other = b[key]
    if isinstance(value, float) or isinstance(other, float):
      if not (isinstance(other, (int, float)) and math.isclose(value, other)):
        return False
    elif value != other:
      return False
  return True


def collect_runs(sweep_dir: pathlib.Path | str) -> list[dict[str, Any]]:
  """Every BIIGMA-Net run below ``sweep_dir``: its settings and metrics."""
  sweep_dir = pathlib.Path(sweep_dir)
  runs = []
  for path in sorted(sweep_dir.rglob("results.json")):
    results = json.loads(path.read_text())
    if "biigma" not in results:
      continue
    settings = results["biigma"]["settings"]
    runs.append({
        "name": str(path.parent.relative_to(sweep_dir)),
        "settings": settings,
        "departures": settings["departures"],
        "test": {short: float(results["test"][key]) for short, key in METRICS},
        "validation": {short: float(results["validation"][key])
                       for short, key in METRICS},
        "best_step": results.get("best_step"),
        "num_train_steps": results.get("num_train_steps"),
        "head_cosine": results["biigma"].get("head_cosine"),
    })
  return runs


def build_table(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Table 2 from ``collect_runs``: our mean (std) per row and the paper's ISIC-18."""
  if not runs:
    raise ValueError("no BIIGMA-Net results.json found in the sweep directory")
  datasets = {(r["settings"]["dataset"], r["settings"]["task"]) for r in runs}
  if len(datasets) > 1:
    raise ValueError(f"the sweep mixes datasets {sorted(datasets)}: make one table "
                     "per dataset (one sweep directory each)")
  paper_sigma = float(runs[0]["settings"]["paper_sigma"])
  wanted = row_departures(paper_sigma)
  # Departures outside the ablated fields that every run shares (runlocal's
  # lambda, say) are the sweep's setting, not an ablation: matched without them.
  ablated = set().union(*wanted.values())
  base = {k: v for k, v in runs[0]["departures"].items()
          if k not in ablated and all(k in r["departures"] and _same(
              {k: r["departures"][k]}, {k: v}) for r in runs)}
  ablation = {r["name"]: {k: v for k, v in r["departures"].items() if k not in base}
              for r in runs}
  rows: dict[str, Any] = {}
  unmatched = [r["name"] for r in runs
               if not any(_same(ablation[r["name"]], d) for d in wanted.values())]
  for row, departures in wanted.items():
    members = [r for r in runs if _same(ablation[r["name"]], departures)]
    entry: dict[str, Any] = {
        "paper_isic18": dict(zip(("f1", "accuracy", "recall"), PAPER_ISIC18[row])),
        "departures": departures,
        "runs": [r["name"] for r in members],
        "seeds": sorted({r["settings"]["seed"] for r in members}),
    }
    if members:
      for short, _ in METRICS:
        values = np.array([r["test"][short] for r in members])
        entry[short] = float(values.mean())
        entry[f"{short}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    rows[row] = entry
  filled = [row for row in wanted if "f1" in rows[row]]
  best = max(filled, key=lambda row: rows[row]["f1"]) if filled else None
  best_entry = {"paper_isic18": dict(zip(("f1", "accuracy", "recall"),
                                         PAPER_ISIC18["Best Configuration"])),
                "row": best}
  if best is not None:
    best_entry.update({k: v for k, v in rows[best].items()
                       if k not in ("paper_isic18", "departures")})
  rows["Best Configuration"] = best_entry
  first = runs[0]["settings"]
  return {
      "rows": rows,
      "setting": {
          "dataset": first["dataset"], "task": first["task"],
          "backbones": sorted({r["settings"]["backbone"] for r in runs}),
          "image_sizes": sorted({r["settings"]["image_size"] for r in runs}),
          "batch_sizes": sorted({r["settings"]["batch_size"] for r in runs}),
          "train_steps": sorted({r["num_train_steps"] for r in runs
                                 if r["num_train_steps"] is not None}),
          "sampling_start_steps": sorted({r["settings"]["sampling_start_step"]
                                          for r in runs}),
          "seeds": sorted({r["settings"]["seed"] for r in runs}),
          "num_runs": len(runs),
          "shared_departures": base,
      },
      "unmatched_runs": unmatched,
  }


def _cell(entry: dict[str, Any], short: str) -> str:
  if short not in entry:
    return "-"
  std = entry.get(f"{short}_std", 0.0)
  return f"{entry[short]:.4f}" + (f" ± {std:.4f}" if std > 0 else "")


def to_markdown(table: dict[str, Any]) -> str:
  """Table 2 as a markdown table: our F1/Acc/Rec/Prec beside the paper's ISIC-18."""
  s = table["setting"]
  lines = [
      f"# Table 2 (ablations): {s['dataset']} / {s['task']}",
      "",
      f"Ours: test split, model selected on validation macro F1; backbone "
      f"{', '.join(s['backbones'])}, {', '.join(map(str, s['image_sizes']))} px, "
      f"batch {', '.join(map(str, s['batch_sizes']))}, "
      f"{', '.join(map(str, s['train_steps']))} steps (sampling from step "
      f"{', '.join(map(str, s['sampling_start_steps']))}), seeds "
      f"{', '.join(map(str, s['seeds']))} ({s['num_runs']} runs); mean ± std over "
      "seeds where there are several. Paper: ISIC 18 column of Table 2 "
      "(DenseNet-121, ImageNet, 224 px, up to 100 epochs).",
      *([f"Every run departs from the paper in {s['shared_departures']}."]
        if s.get("shared_departures") else []),
      "",
      "| Setting | F1 | Acc | Rec | Prec | paper F1 | paper Acc | paper Rec | runs |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for row in ROWS:
    entry = table["rows"][row]
    paper = entry["paper_isic18"]
    label = row
    if row == "Best Configuration" and entry.get("row"):
      label = f"Best Configuration ({entry['row']})"
    lines.append(
        f"| {label} | {_cell(entry, 'f1')} | {_cell(entry, 'accuracy')} | "
        f"{_cell(entry, 'recall')} | {_cell(entry, 'precision')} | "
        f"{paper['f1']:.4f} | {paper['accuracy']:.4f} | {paper['recall']:.4f} | "
        f"{len(entry.get('runs', []))} |")
  if table["unmatched_runs"]:
    lines += ["", "Runs that fill no row: " + ", ".join(table["unmatched_runs"])]
  return "\n".join(lines) + "\n"


def write_figure3(runs: Sequence[dict[str, Any]], table: dict[str, Any],
                  path: pathlib.Path) -> pathlib.Path | None:
  """Figure 3's pair (W/O L_indep, with it) from the runs' mean head |cosine|."""
  from comtriplet_jax.evaluation import biigma_plots  # pylint: disable=g-import-not-at-top
  by_name = {r["name"]: r for r in runs}
  panels = {}
  for label, row in (("without L_indep", "W/O Lindep"), ("with L_indep", "Heads = 3")):
    matrices = [by_name[n]["head_cosine"] for n in table["rows"][row]["runs"]
                if by_name[n]["head_cosine"] is not None]
    if not matrices:
      return None
    panels[label] = np.mean(np.asarray(matrices, np.float64), axis=0)
  return biigma_plots.plot_head_correlation(
      panels, path, title="Mean |cosine| between MICA heads (test split)")


def write_table(sweep_dir: pathlib.Path | str) -> dict[str, Any]:
  """Reads the sweep, writes table2.md, table2.json (and figure3.png); returns it."""
  sweep_dir = pathlib.Path(sweep_dir)
  runs = collect_runs(sweep_dir)
  table = build_table(runs)
  (sweep_dir / "table2.md").write_text(to_markdown(table))
  (sweep_dir / "table2.json").write_text(json.dumps(table, indent=2, sort_keys=True))
  figure = write_figure3(runs, table, sweep_dir / "figure3.png")
  table["figure3"] = figure.name if figure else None
  return table


# ------------------------------------------------------------ local runner
def load_sweep(config_file: pathlib.Path | str, sweep: str) -> list[str]:
  """``get_sweep(sweep)`` of a config file (configs/ is not a package)."""
  config_file = pathlib.Path(config_file)
  spec = importlib.util.spec_from_file_location("_sweep_config", config_file)
  if spec is None or spec.loader is None:
    raise ValueError(f"cannot load config file {config_file}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{config_file} defines no get_sweep")
  return module.get_sweep(sweep)


def run_name(arg: str) -> str:
  """A folder name for a run's argument string ('' -> 'default')."""
  name = arg.replace(",", "_").replace("=", "-").replace("/", "-")
  return name or "default"


def run_sweep(sweep_dir: pathlib.Path | str, *, sweep: str = "table2,runlocal",
              config_file: pathlib.Path | str = REPO_ROOT / "configs" / "biigma.py",
              python: str = sys.executable, dry_run: bool = False) -> list[str]:
  """Runs every missing run of the sweep here, one after the other.

  Each run is ``python -m comtriplet_jax.main --config=<file>:<arg>
  --workdir=<sweep_dir>/<name>`` (what ``launch/sweep.py`` runs), its output in
  ``<workdir>/log.txt``; a run with a ``results.json`` is skipped, and an
  interrupted one resumes from its checkpoint.

  Returns:
    The commands run (or, with ``dry_run``, that would run).
  """
  sweep_dir = pathlib.Path(sweep_dir)
  commands = []
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
  for arg in load_sweep(config_file, sweep):
    workdir = sweep_dir / run_name(arg)
    if (workdir / "results.json").exists():
      continue
    command = [python, "-m", "comtriplet_jax.main", f"--config={config_file}:{arg}",
               f"--workdir={workdir}"]
    commands.append(" ".join(command))
    if dry_run:
      continue
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "log.txt", "ab") as log:
      subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                     cwd=REPO_ROOT, env=env)
  return commands


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.run:
    for command in run_sweep(f.sweep_dir, sweep=f.sweep, config_file=f.config_file,
                             dry_run=f.dry_run):
      print(command, flush=True)
    if f.dry_run:
      return
  write_table(f.sweep_dir)
  print((pathlib.Path(f.sweep_dir) / "table2.md").read_text())


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("sweep_dir", None, "Directory of the sweep's run workdirs.")
  flags.DEFINE_bool("run", False, "Run the sweep's missing runs here first.")
  flags.DEFINE_string("sweep", "table2,runlocal",
                      "Argument of get_sweep: 'table2' then items for every run.")
  flags.DEFINE_string("config_file", str(REPO_ROOT / "configs" / "biigma.py"),
                      "The config file whose get_sweep gives the runs.")
  flags.DEFINE_bool("dry_run", False, "With --run: print the commands only.")
  flags.mark_flag_as_required("sweep_dir")
  app.run(main)
