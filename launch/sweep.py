"""Sweeps: a config file's grid of runs, here one after another or as a SLURM job array.

A config file may define ``get_sweep(arg) -> list[str]``: the config-argument
strings of the runs of a grid (``configs/classifier.py``: 'tables', 'grid',
'imbalance', 'local'; ``configs/sdc.py``, ``configs/udc.py``,
``configs/biigma.py``: their papers' tables). This runner

1. expands ``--config=FILE:ARG`` into runs, each with its own workdir
   ``<sweep_dir>/<run name>``, the run name being the sanitised argument string
   (:func:`run_name`; the same names as ``evaluation/ablation_table.py``'s runner,
   so both share workdirs);
2. runs every run that is not finished (no ``results.json``) either here, one
   after the other (``python -m comtriplet_jax.main --config=FILE:RUN_ARG
   --workdir=...``, output appended to ``<workdir>/log.txt``), or as a SLURM job
   array (``--slurm``: writes ``<sweep_dir>/slurm_array.sbatch``, one array task
   per unfinished run, each task started through ``launch/slurm.sbatch``, so a
   task may span several nodes; submits it with ``sbatch`` and a dependent job
   that collects the table when the array ends; ``--dry_run`` prints instead);
3. collects every run's ``results.json`` into ``<sweep_dir>/results.md`` and
   ``results.csv`` (``--collect_only`` does only this).

Resubmitting the same command skips finished runs; an interrupted run (killed,
pre-empted, failed) starts again and the training loop resumes it from its
latest checkpoint. Arguments after ``--`` are passed to every run, e.g. config
overrides; they are not part of run names, so a sweep directory should hold one
set of overrides (``sweep.json`` records them and a change is warned about).

Usage::

  python launch/sweep.py --config=configs/classifier.py:local \\
      --sweep_dir=/tmp/sweep -- --config.num_train_steps=100
  python -m launch.sweep --config=configs/sdc.py:tables --sweep_dir=/shared/sdc \\
      --slurm --sbatch=--gpus-per-node=1 --sbatch=--time=08:00:00 [--dry_run]
  python launch/sweep.py --sweep_dir=/tmp/sweep --collect_only
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# `python launch/sweep.py` puts launch/ first on sys.path, not the repository;
# the config files import comtriplet_jax from it.
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

MANIFEST = "sweep.json"
ARRAY_SCRIPT = "slurm_array.sbatch"
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
RUN_RECORD = "sweep_run.json"  # what the local runner measured (wall time, exit code)
FAILED_MARKER = "FAILED"       # exit code of the last failed attempt
MAX_NAME_LENGTH = 100


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its folder name and its config-argument string."""
  name: str
  arg: str

  def workdir(self, sweep_dir: pathlib.Path) -> pathlib.Path:
    return sweep_dir / self.name


# ------------------------------------------------------------------ expansion
def split_config(spec: str) -> tuple[pathlib.Path, str]:
  """'configs/x.py:ARG' -> (absolute path of the file, 'ARG'), like config_flags."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path).expanduser()
  if not file.is_absolute():
    file = (pathlib.Path.cwd() / file).resolve()
  if not file.is_file():
    raise ValueError(f"--config={spec!r}: no config file at {file}")
  return file, arg


def _load_module(config_file: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f"_sweep_{config_file.stem}",
                                                config_file)
  if spec is None or spec.loader is None:
    raise ValueError(f"cannot load config file {config_file}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(config_file: pathlib.Path, sweep_arg: str) -> list[str]:
  """``get_sweep(sweep_arg)`` of a config file (``configs/`` is not a package)."""
  module = _load_module(config_file)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{config_file} defines no get_sweep(arg); sweepable configs: "
                     "classifier.py, sdc.py, udc.py, biigma.py")
  args = module.get_sweep(sweep_arg or None)
  if not args or not all(isinstance(a, str) for a in args):
    raise ValueError(f"{config_file.name}: get_sweep({sweep_arg!r}) must return a "
                     f"non-empty list of strings, got {args!r}")
  return list(args)


def run_name(arg: str, max_length: int = MAX_NAME_LENGTH) -> str:
  """A folder name for a run's argument string.

  ',' -> '_', '=' -> '-' (as ``evaluation/ablation_table.run_name``), any other
  character outside ``[A-Za-z0-9._+-]`` -> '-', '' -> 'default'. A name longer
  than ``max_length`` keeps its start and ends with 8 hex digits of the
  argument's SHA-1, so distinct long arguments keep distinct names.
  """
  name = arg.strip().replace(",", "_").replace("=", "-")
  name = re.sub(r"[^A-Za-z0-9._+-]", "-", name).lstrip(".")
  if not name:
    return "default"
  if len(name) > max_length:
    digest = hashlib.sha1(arg.encode()).hexdigest()[:8]
    name = f"{name[:max_length - 9]}-{digest}"
  return name


def expand(config_file: pathlib.Path, sweep_arg: str) -> list[Run]:
  """The runs of a sweep, in the order ``get_sweep`` gives them.

  Raises:
    ValueError: when two runs have the same argument string or the same name.
  """
  runs: list[Run] = []
  seen: dict[str, str] = {}
  for arg in load_sweep(config_file, sweep_arg):
    name = run_name(arg)
    if name in seen:
      raise ValueError(f"runs {seen[name]!r} and {arg!r} of sweep {sweep_arg!r} "
                       f"share the workdir name {name!r}: make their arguments "
                       "differ in letters or digits")
    seen[name] = arg
    runs.append(Run(name, arg))
  return runs


def validate_runs(config_file: pathlib.Path, runs: Sequence[Run]) -> None:
  """Builds and validates every run's config here, before anything is started."""
  from comtriplet_jax import configlib  # pylint: disable=g-import-not-at-top
  module = _load_module(config_file)
  for run in runs:
    try:
      configlib.validate(module.get_config(run.arg or None))
    except ValueError as e:
      raise ValueError(f"run {run.name} ({config_file.name}:{run.arg}): {e}") from e


# -------------------------------------------------------------------- status
def run_status(workdir: pathlib.Path) -> str:
  """'done' (results.json), 'failed' (last attempt failed), 'started', 'pending'."""
  if (workdir / "results.json").exists():
    return "done"
  if (workdir / FAILED_MARKER).exists():
    return "failed"
  if (workdir / "checkpoints").exists() or (workdir / "log.txt").exists():
    return "started"
  return "pending"


def main_command(python: str, config_file: pathlib.Path, run: Run,
                 workdir: pathlib.Path, overrides: Sequence[str]) -> list[str]:
  """``python -m comtriplet_jax.main --config=FILE:ARG --workdir=DIR OVERRIDES``."""
  config = f"{config_file}:{run.arg}" if run.arg else str(config_file)
  return [python, "-m", "comtriplet_jax.main", f"--config={config}",
          f"--workdir={workdir}", *overrides]


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


# ----------------------------------------------------------------- manifest
def write_manifest(sweep_dir: pathlib.Path, config_file: pathlib.Path,
                   sweep_arg: str, runs: Sequence[Run], overrides: Sequence[str],
                   warn: Callable[[str], None] = print) -> None:
  """Records the sweep in ``sweep.json`` (runs of earlier submissions kept)."""
  path = sweep_dir / MANIFEST
  old = _read_json(path)
  if old and list(old.get("overrides", [])) != list(overrides):
    warn(f"warning: {path} was written with overrides {old.get('overrides')}, now "
         f"{list(overrides)}: finished runs keep their old settings")
  if old and old.get("config_file") != str(config_file):
    warn(f"warning: {path} was written for {old.get('config_file')}, now "
         f"{config_file}")
  merged = {r["name"]: r["arg"] for r in old.get("runs", [])}
  merged.update({r.name: r.arg for r in runs})
  sweep_dir.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({
      "config_file": str(config_file), "sweep": sweep_arg,
      "overrides": list(overrides),
      "runs": [{"name": n, "arg": a} for n, a in merged.items()],
  }, indent=2) + "\n")


def manifest_runs(sweep_dir: pathlib.Path) -> list[Run]:
  """The runs recorded in ``sweep.json``, else every sub-folder with results."""
  manifest = _read_json(sweep_dir / MANIFEST)
  if manifest.get("runs"):
    return [Run(r["name"], r["arg"]) for r in manifest["runs"]]
  found = sorted(p.parent.name for p in sweep_dir.glob("*/results.json"))
  if not found:
    raise ValueError(f"{sweep_dir} holds neither {MANIFEST} nor any */results.json")
  return [Run(name, "") for name in found]


# ------------------------------------------------------------- local runner
def run_locally(sweep_dir: pathlib.Path, config_file: pathlib.Path,
                runs: Sequence[Run], overrides: Sequence[str], *, python: str,
                dry_run: bool = False, stop_on_failure: bool = False,
                echo: Callable[[str], None] = print) -> dict[str, int]:
  """Runs the unfinished runs here, one after the other.

  Each run's output goes to ``<workdir>/log.txt`` (appended, so resumed attempts
  keep the earlier output); its wall time and exit code to ``sweep_run.json``
  (wall time summed over attempts); a failure leaves ``FAILED`` with the exit code.

  Returns:
    Run name -> exit code of the runs started (0 = finished).
  """
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
  todo = [r for r in runs if run_status(r.workdir(sweep_dir)) != "done"]
  echo(f"{len(runs) - len(todo)} of {len(runs)} runs finished already; "
       f"{len(todo)} to run")
  codes: dict[str, int] = {}
  for i, run in enumerate(todo, 1):
    workdir = run.workdir(sweep_dir)
    command = main_command(python, config_file, run, workdir, overrides)
    echo(f"[{i}/{len(todo)}] {shlex.join(command)}")
    if dry_run:
      continue
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / FAILED_MARKER).unlink(missing_ok=True)
    record = _read_json(workdir / RUN_RECORD)
    start = time.perf_counter()
    with open(workdir / "log.txt", "ab") as log:
      code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO_ROOT, env=env, check=False).returncode
    wall = time.perf_counter() - start
    record.update(arg=run.arg, command=command, returncode=code,
                  attempts=record.get("attempts", 0) + 1,
                  wall_s=record.get("wall_s", 0.0) + wall)
    (workdir / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    codes[run.name] = code
    if code != 0:
      (workdir / FAILED_MARKER).write_text(f"{code}\n")
      echo(f"    FAILED (exit code {code}) after {wall:.0f} s; see {workdir / 'log.txt'}")
      if stop_on_failure:
        break
      continue
    results = _read_json(workdir / "results.json")
    echo(f"    done in {wall:.0f} s: test AUC "
         f"{_fmt(_metric(results, 'test', 'auc'))}, validation AUC "
         f"{_fmt(_metric(results, 'validation', 'auc'))}")
  return codes


# -------------------------------------------------------------------- SLURM
def slurm_array_script(sweep_dir: pathlib.Path, config_file: pathlib.Path,
                       runs: Sequence[Run], overrides: Sequence[str], *,
                       python: str, sbatch_options: Sequence[str] = (),
                       max_parallel: int = 0) -> str:
  """A SLURM job array with one task per run in ``runs``.

  Every task starts its run through ``launch/slurm.sbatch`` (one process per
  node of the task's allocation, or per GPU with ``--ntasks-per-node``), skips
  it if ``results.json`` appeared meanwhile, and leaves ``FAILED`` on failure.
  """
  if not runs:
    raise ValueError("no runs to submit")
  if max_parallel < 0:
    raise ValueError(f"max_parallel={max_parallel} must be >= 0")
  throttle = f"%{max_parallel}" if max_parallel else ""
  job_name = "sweep-" + run_name(sweep_dir.name, 40)
  has_nodes = any(re.match(r"(--nodes|-N)\b", o) for o in sbatch_options)
  lines = [
      "#!/bin/bash",
      f"#SBATCH --job-name={job_name}",
      f"#SBATCH --array=0-{len(runs) - 1}{throttle}",
      f"#SBATCH --output={sweep_dir}/slurm/%A_%a.out",
  ]
  lines += [] if has_nodes else ["#SBATCH --nodes=1"]
  lines += [f"#SBATCH {o}" for o in sbatch_options]
  lines += [
      f"# Written by launch/sweep.py: {len(runs)} runs of {config_file.name} not "
      "finished at submission.",
      "# Each task runs one of them; resubmitting the sweep skips finished runs and",
      "# an interrupted run resumes from its latest checkpoint.",
      "set -uo pipefail",
      "names=(" + " ".join(shlex.quote(r.name) for r in runs) + ")",
      "args=(" + " ".join(shlex.quote(r.arg) for r in runs) + ")",
      "name=${names[$SLURM_ARRAY_TASK_ID]}",
      "arg=${args[$SLURM_ARRAY_TASK_ID]}",
      f"workdir={shlex.quote(str(sweep_dir))}/$name",
      'if [[ -f $workdir/results.json ]]; then',
      '  echo "$name: finished already"',
      "  exit 0",
      "fi",
      'mkdir -p "$workdir"',
      f'rm -f "$workdir/{FAILED_MARKER}"',
      f"export PYTHON={shlex.quote(python)}",
      f"export REPO={shlex.quote(str(REPO_ROOT))}",
      f'echo "$name: {config_file.name}:$arg -> $workdir"',
      # '--config=FILE' then ':ARG' unless the run's argument is empty.
      'bash "$REPO/launch/slurm.sbatch" ' + shlex.quote(f"--config={config_file}")
      + '"${arg:+:$arg}" \\',
      '    "--workdir=$workdir" ' + " ".join(shlex.quote(o) for o in overrides)
      + ' >> "$workdir/log.txt" 2>&1',
      "code=$?",
      f'if (( code != 0 )); then echo "$code" > "$workdir/{FAILED_MARKER}"; fi',
      'echo "$name: exit code $code"',
      "exit $code",
  ]
  return "\n".join(lines) + "\n"


def sbatch_commands(sweep_dir: pathlib.Path, python: str) -> tuple[list[str], list[str]]:
  """The sbatch command lines of the array and of the dependent collect job.

  The collect job's ``--dependency`` ends with ``JOBID``, replaced by the
  array's job id once it is known.
  """
  array = ["sbatch", "--parsable", str(sweep_dir / ARRAY_SCRIPT)]
  collect_cmd = shlex.join([python, str(REPO_ROOT / "launch" / "sweep.py"),
                            f"--sweep_dir={sweep_dir}", "--collect_only"])
  collect = ["sbatch", "--parsable", "--dependency=afterany:JOBID",
             f"--job-name=collect-{run_name(sweep_dir.name, 40)}", "--ntasks=1",
             f"--output={sweep_dir}/slurm/collect_%j.out", f"--wrap={collect_cmd}"]
  return array, collect


def submit_slurm(sweep_dir: pathlib.Path, config_file: pathlib.Path,
                 runs: Sequence[Run], overrides: Sequence[str], *, python: str,
                 sbatch_options: Sequence[str] = (), max_parallel: int = 0,
                 dry_run: bool = False, echo: Callable[[str], None] = print
                 ) -> str | None:
  """Writes the array script for the unfinished runs and submits it (or prints it).

  Returns:
    The array's job id, or None when nothing was submitted.
  """
  todo = [r for r in runs if run_status(r.workdir(sweep_dir)) != "done"]
  echo(f"{len(runs) - len(todo)} of {len(runs)} runs finished already; "
       f"{len(todo)} to submit")
  if not todo:
    return None
  script = slurm_array_script(sweep_dir, config_file, todo, overrides, python=python,
                              sbatch_options=sbatch_options,
                              max_parallel=max_parallel)
  array, collect = sbatch_commands(sweep_dir, python)
  if dry_run:
    echo(f"# {sweep_dir / ARRAY_SCRIPT} would be:\n{script}")
    echo(shlex.join(array))
    echo(shlex.join(collect))
    return None
  if shutil.which("sbatch") is None:
    raise RuntimeError("sbatch not found: run on a SLURM login node, or without "
                       "--slurm to run here, or with --dry_run to see the script")
  (sweep_dir / "slurm").mkdir(parents=True, exist_ok=True)
  (sweep_dir / ARRAY_SCRIPT).write_text(script)
  job_id = subprocess.run(array, check=True, capture_output=True,
                          text=True).stdout.strip().split(";")[0]
  collect = [c.replace("JOBID", job_id) if c.startswith("--dependency") else c
             for c in collect]
  collect_id = subprocess.run(collect, check=True, capture_output=True,
                              text=True).stdout.strip().split(";")[0]
  echo(f"submitted job array {job_id} ({len(todo)} runs); table by job {collect_id}")
  return job_id


# --------------------------------------------------------------- collection
# (csv column, markdown header or None for CSV only, split, metric key)
_METRIC_COLUMNS = (
    ("val_auc", "val AUC", "validation", "auc"),
    ("val_accuracy", None, "validation", "accuracy"),
    ("val_balanced_accuracy", None, "validation", "balanced_accuracy"),
    ("val_f1_macro", None, "validation", "f1_macro"),
    ("test_auc", "test AUC", "test", "auc"),
    ("test_accuracy", "test acc", "test", "accuracy"),
    ("test_balanced_accuracy", "test bal. acc", "test", "balanced_accuracy"),
    ("test_f1_macro", "test macro F1", "test", "f1_macro"),
    ("test_sensitivity", "test sens.", "test", "sensitivity"),
    ("test_specificity", "test spec.", "test", "specificity"),
    ("test_precision", None, "test", "precision"),
    ("test_f1", None, "test", "f1"),
    ("test_recall_macro", None, "test", "recall_macro"),
)
CSV_COLUMNS = ("run", "config_arg", "status", "best_step", "num_train_steps",
               "selection_metric", *(c[0] for c in _METRIC_COLUMNS), "wall_s",
               "workdir")


def _metric(results: dict[str, Any], split: str, key: str) -> float | None:
  value = results.get(split, {}).get(key)
  return float(value) if isinstance(value, (int, float)) else None


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def collect(sweep_dir: pathlib.Path, runs: Sequence[Run]) -> list[dict[str, Any]]:
  """One row per run: status, settings and the metrics of its ``results.json``."""
  rows = []
  for run in runs:
    workdir = run.workdir(sweep_dir)
    results = _read_json(workdir / "results.json")
    record = _read_json(workdir / RUN_RECORD)
    row: dict[str, Any] = {
        "run": run.name, "config_arg": run.arg, "status": run_status(workdir),
        "best_step": results.get("best_step"),
        "num_train_steps": results.get("num_train_steps"),
        "selection_metric": results.get("selection_metric"),
        "wall_s": record.get("wall_s"), "workdir": str(workdir),
    }
    for column, _, split, key in _METRIC_COLUMNS:
      row[column] = _metric(results, split, key)
    rows.append(row)
  return rows


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
  return out.getvalue()


def to_markdown(rows: Sequence[dict[str, Any]], title: str,
                overrides: Sequence[str] = ()) -> str:
  """The table of the sweep: one line per run, test and validation metrics."""
  done = sum(r["status"] == "done" for r in rows)
  selection = sorted({r["selection_metric"] for r in rows if r["selection_metric"]})
  headers = ["run", "config", "status", "steps", "best step",
             *(c[1] for c in _METRIC_COLUMNS if c[1]), "wall"]
  lines = [
      f"# Sweep {title}",
      "",
      f"{done} of {len(rows)} runs done. Metrics of the model selected on validation "
      f"{', '.join(selection) or '(none yet)'}"
      + (f"; overrides: `{' '.join(overrides)}`" if overrides else "") + ".",
      "",
      "| " + " | ".join(headers) + " |",
      "|" + "---|" * len(headers),
  ]
  for r in rows:
    wall = f"{r['wall_s']:.0f} s" if r["wall_s"] is not None else "-"
    cells = [r["run"], f"`{r['config_arg']}`" if r["config_arg"] else "-", r["status"],
             _fmt(r["num_train_steps"]), _fmt(r["best_step"]),
             *(_fmt(r[c[0]]) for c in _METRIC_COLUMNS if c[1]), wall]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_tables(sweep_dir: pathlib.Path, runs: Sequence[Run] | None = None
                 ) -> list[dict[str, Any]]:
  """Collects the sweep into ``results.md`` and ``results.csv``; returns the rows."""
  manifest = _read_json(sweep_dir / MANIFEST)
  runs = list(runs) if runs is not None else manifest_runs(sweep_dir)
  rows = collect(sweep_dir, runs)
  title = pathlib.Path(manifest.get("config_file", "?")).name
  if manifest.get("sweep"):
    title += f":{manifest['sweep']}"
  (sweep_dir / RESULTS_MD).write_text(
      to_markdown(rows, title, manifest.get("overrides", ())))
  (sweep_dir / RESULTS_CSV).write_text(to_csv(rows))
  return rows


# --------------------------------------------------------------------- main
def main(argv: Sequence[str]) -> int:
  """Expands, runs or submits, and collects; returns the exit status."""
  f = flags.FLAGS
  overrides = list(argv[1:])
  bad = [a for a in overrides if not a.startswith("--")]
  if bad:
    raise app.UsageError(f"arguments after '--' must be flags of "
                          f"comtriplet_jax.main (e.g. --config.num_train_steps=100), "
                          f"got {bad}")
  sweep_dir = pathlib.Path(f.sweep_dir).expanduser().resolve()
  if f.collect_only:
    rows = write_tables(sweep_dir)
    print((sweep_dir / RESULTS_MD).read_text(), end="")
    return 0 if all(r["status"] == "done" for r in rows) else 1
  if not f.config:
    raise app.UsageError("--config=FILE[:SWEEP_ARG] is required (or --collect_only)")
  config_file, sweep_arg = split_config(f.config)
  runs = expand(config_file, sweep_arg)
  if f.validate:
    validate_runs(config_file, runs)
  if not f.dry_run:
    write_manifest(sweep_dir, config_file, sweep_arg, runs, overrides)
  if f.slurm:
    submit_slurm(sweep_dir, config_file, runs, overrides, python=f.python,
                 sbatch_options=f.sbatch or (), max_parallel=f.max_parallel,
                 dry_run=f.dry_run)
    return 0
  start = time.perf_counter()
  codes = run_locally(sweep_dir, config_file, runs, overrides, python=f.python,
                      dry_run=f.dry_run, stop_on_failure=f.stop_on_failure)
  if f.dry_run:
    return 0
  write_tables(sweep_dir, runs)
  print(f"sweep wall time {time.perf_counter() - start:.0f} s; table: "
        f"{sweep_dir / RESULTS_MD}\n")
  print((sweep_dir / RESULTS_MD).read_text(), end="")
  return 1 if any(codes.values()) else 0


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("config", None,
                      "A config file with get_sweep, optionally ':SWEEP_ARG', e.g. "
                      "configs/classifier.py:tables.")
  flags.DEFINE_string("sweep_dir", None, "Directory of the sweep: one workdir per run.")
  flags.DEFINE_bool("slurm", False, "Submit as a SLURM job array instead of running "
                    "here.")
  flags.DEFINE_bool("dry_run", False, "Print the commands (or the array script) only.")
  flags.DEFINE_bool("collect_only", False, "Only write results.md and results.csv.")
  flags.DEFINE_bool("validate", True, "Build and validate every run's config first.")
  flags.DEFINE_bool("stop_on_failure", False, "Local runs: stop at the first failed "
                    "run (default: go on with the others).")
  flags.DEFINE_string("python", sys.executable, "Python interpreter of the runs.")
  flags.DEFINE_multi_string("sbatch", [], "An sbatch option for every array task, "
                            "e.g. --sbatch=--gpus-per-node=4 (repeatable).")
  flags.DEFINE_integer("max_parallel", 0, "SLURM: at most this many array tasks at "
                       "once (0: no limit).", lower_bound=0)
  flags.mark_flag_as_required("sweep_dir")


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
