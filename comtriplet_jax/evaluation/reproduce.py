"""The papers' claims on real data, with seeds and intervals, in one command.

::

  python -m comtriplet_jax.evaluation.reproduce --preset=cpu --seeds=3 --out=/tmp/study
  python -m comtriplet_jax.evaluation.reproduce --preset=smoke --seeds=2 \\
      --out=/tmp/smoke --only=C1,C5

Each claim (:data:`CLAIMS`) names the arms it compares, each arm a config file and
argument string of this project (``configs/<config>.py:<arg>``). The study runs
every arm once per seed (seed k sets ``config.seed = k``; the split stays that
of ``config.split_seed``, so all seeds train on the same split and are scored on
the same test images), each run in its own workdir ``<out>/runs/<run name>``:

* a run whose ``results.json`` exists is finished and is read, not rerun;
* any other run is started, and the training loop resumes it from its latest
  checkpoint, so an interrupted study continues where it stopped.

Then, per claim, the per-seed paired difference of the test metric (the claimed
better arm minus the best of the others, seed by seed; for C3 the difference of
the two methods' slopes of AUC against log ratio), its mean and 95% t-interval
over seeds, and a verdict: "holds" when the interval lies above 0, "reversed"
when it lies below, "inconclusive" otherwise (always, with one seed). Written to
``<out>/report.json``, ``<out>/report.md`` and ``<out>/claim_<id>.png``.

Presets size the runs (:data:`PRESETS`): ``smoke`` a few steps of every run on
real data, for checks; ``cpu`` the ``runlocal`` recipes of the configs,
shortened (:data:`PRESETS` says how) so that 3 seeds fit about 100 minutes; ``gpu``
the papers' image sizes and backbones from scratch (ImageNet weights cannot be
fetched on the machines this was written on). ``--set=FIELD=VALUE`` overrides a
config field of every run (e.g. ``--set=manual_dir=/data/ham10000``).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from comtriplet_jax.evaluation import imbalance_study

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
VERDICTS = ("holds", "reversed", "inconclusive")
CONFIDENCE = 0.95


# ---------------------------------------------------------------------- claims
@dataclasses.dataclass(frozen=True)
class Arm:
  """One trained configuration of a claim.

  Attributes:
    label: the paper's name for it, e.g. 'SDC_COM-Triplet'.
    config: config file stem (``configs/<config>.py``).
    arg: config argument string (the preset's items and the seed are added).
    overrides: config fields set on top, ``((dotted_field, value), ...)``.
    result: for the shallow baselines, which baseline's metrics of the run.
    group, ratio: for a curve claim (C3): the curve and its x value.
  """
  label: str
  config: str
  arg: str = ""
  overrides: tuple[tuple[str, Any], ...] = ()
  result: str = ""
  group: str = ""
  ratio: float = 0.0


@dataclasses.dataclass(frozen=True)
class Claim:
  """A claim of a paper, as a comparison of arms on one test metric.

  ``kind='gain'``: the first arm is claimed better than every other; the
  per-seed difference is first minus the best other. ``kind='slope'``: arms in
  two groups along ``ratio``; the difference is the slope of the metric against
  log(ratio) of ``groups[0]`` minus that of ``groups[1]`` (claimed > 0: the
  first group falls more slowly).
  """
  id: str
  paper: str
  statement: str
  metric: str
  arms: tuple[Arm, ...]
  paper_figures: str
  kind: str = "gain"
  groups: tuple[str, ...] = ()


_SDC = Arm("SDC_COM-Triplet", "sdc")
_SDC_TRIPLET = Arm("SDC_Triplet", "sdc", "loss=triplet")
_UDC = Arm("UDC_COM-Triplet", "udc")
_BIIGMA = Arm("BIIGMA-Net", "biigma")
# HAM10000 melanoma vs nevus training counts at ratios 1, 15 and 60, the
# majority fixed as in the imbalance study: 834:834, 834:56, 834:14.
_RATIOS = (1, 15, 60)
_IMBALANCE = dict(zip(_RATIOS, imbalance_study.ham10000_counts(_RATIOS)))

CLAIMS: tuple[Claim, ...] = (
    Claim("C1", "COM-Triplet", "SDC_COM-Triplet has a higher AUC than SDC_Triplet",
          "auc", (_SDC, _SDC_TRIPLET),
          "Table VII, HAM10000 AUC: 98.76 vs 98.46"),
    Claim("C2", "COM-Triplet",
          "SDC_COM-Triplet reaches at least the AUC of the best direct classifier "
          "(NP, LW)", "auc",
          (_SDC, Arm("classifier NP", "classifier", "strategy=NP"),
           Arm("classifier LW", "classifier", "strategy=LW")),
          "Table VII, HAM10000 AUC: 98.76 vs classifiers 96.29-98.62"),
    Claim("C3", "COM-Triplet",
          "as the imbalance grows, the classifier's AUC falls faster than SDC's",
          "auc",
          tuple(Arm(f"{name} 1:{r}" if r > 1 else f"{name} 1:1", config,
                    f"counts={counts}", group=config, ratio=float(r))
                for name, config in (("SDC", "sdc"), ("classifier", "classifier"))
                for r, counts in _IMBALANCE.items()),
          "Figure 4 (ISIC 2019, ratios 1-60): SDC's AUC stays higher and falls less",
          kind="slope", groups=("sdc", "classifier")),
    Claim("C4", "COM-Triplet",
          "UDC_COM-Triplet has a higher AUC than UDC_Triplet, the shallow GMM and "
          "K-Means, and the CAE", "auc",
          (_UDC, Arm("UDC_Triplet", "udc", "loss=triplet"),
           Arm("GMM", "shallow", "methods=gmm+kmeans", result="gmm"),
           Arm("K-Means", "shallow", "methods=gmm+kmeans", result="kmeans"),
           Arm("CAE", "cae")),
          "Table VIII, HAM10000 AUC: 77.97 vs UDC_Triplet 75.67, GMM 76.13, "
          "K-Means 75.45, CAE 77.82"),
    Claim("C5", "COM-Triplet", "the adaptive margin beats a fixed margin of 0.2",
          "auc", (_SDC, Arm("SDC_COM-Triplet margin 0.2", "sdc", "margin=0.2")),
          "Table II, ISIC 2020 test AUC: adaptive 88.11 vs 0.2 84.87"),
    Claim("B1", "BIIGMA-Net", "the full model's macro F1 beats the baseline's",
          "f1_macro", (_BIIGMA, Arm("baseline", "biigma", "baseline")),
          "Table 2, ISIC 18 F1: 0.8220 vs 0.7256"),
    Claim("B2", "BIIGMA-Net", "without L_indep, macro F1 is lower", "f1_macro",
          (_BIIGMA, Arm("W/O L_indep", "biigma", "no_indep")),
          "Table 2, ISIC 18 F1: 0.8220 vs 0.7869"),
    Claim("B3", "BIIGMA-Net", "HSIC beats cosine L_indep", "f1_macro",
          (_BIIGMA, Arm("cosine L_indep", "biigma", "cosine_indep")),
          "Table 2, ISIC 18 F1: 0.8220 vs 0.7920"),
    Claim("B4", "BIIGMA-Net", "without vector sampling, macro F1 is lower",
          "f1_macro", (_BIIGMA, Arm("W/O sampling", "biigma", "no_sampling")),
          "Table 2, ISIC 18 F1: 0.8220 vs 0.7947"),
    Claim("L1", "this project",
          "splitting HAM10000 by image instead of by lesion inflates test AUC",
          "auc",
          (Arm("classifier, split by image", "classifier", "strategy=NP",
               overrides=(("split_by", "image"),)),
           Arm("classifier, split by lesion", "classifier", "strategy=NP")),
          "not in the papers: 2,545 of HAM10000's 10,015 images repeat a lesion"),
)


# --------------------------------------------------------------------- presets
@dataclasses.dataclass(frozen=True)
class Preset:
  """How big every run is: items appended to each config's argument, overrides."""
  name: str
  description: str
  args: Mapping[str, str]
  overrides: Mapping[str, tuple[tuple[str, Any], ...]] = dataclasses.field(
      default_factory=dict)


_TRAINED = ("classifier", "sdc", "udc", "cae", "biigma")
_SMOKE_STEPS = (("num_train_steps", 4), ("eval_every_steps", 2),
                ("checkpoint_every_steps", 2), ("log_every_steps", 2))



def _steps(n: int) -> tuple[tuple[str, Any], ...]:
  """A run of n steps, evaluated (and checkpointed) three times."""
  return (("num_train_steps", n), ("eval_every_steps", n // 3))


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        "smoke", "the runlocal recipes cut to 4 steps: a check that every run works",
        args={c: "runlocal" for c in (*_TRAINED, "shallow")},
        overrides={c: _SMOKE_STEPS for c in _TRAINED}),
    "cpu": Preset(
        "cpu", "the configs' runlocal recipes, shortened to fit about 100 minutes "
        "for 3 seeds on a 2-core CPU: the classifier, SDC, UDC and BIIGMA-Net "
        "train 600 steps (their recipes: 1,800, 1,200, 600, 1,800), with the "
        "same schedule shape (warm-up, cosine decay to the shorter end) and "
        "without the embedding plots; the CAE and the shallow baselines as in "
        "their recipes",
        args={c: "runlocal" for c in (*_TRAINED, "shallow")},
        overrides={
            **{c: _steps(600) for c in ("classifier", "biigma")},
            **{c: (*_steps(600), (f"{c}.embedding_plot", False))
               for c in ("sdc", "udc")}}),
    "gpu": Preset(
        "gpu", "the papers' sizes from scratch: 224 px (256 for the shallow "
        "baselines), VGG16 for COM-Triplet, DenseNet-121 for BIIGMA-Net; not yet "
        "sized on a GPU",
        args={"classifier": "backbone=vgg16,size=224",
              "sdc": "backbone=vgg16,size=224", "udc": "backbone=vgg16,size=224",
              "cae": "size=224", "biigma": "pretrained=false",
              "shallow": "backbone=vgg16,size=256"}),
}


# ------------------------------------------------------------------------ runs
@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run: a config, its argument, field overrides and the seed.

  ``name`` (its workdir's) comes from the arm and the seed only: what the
  preset and ``--set`` add is the same for every run of a study folder, and is
  recorded once in its ``study.json``.
  """
  name: str
  config: str
  arg: str
  overrides: tuple[tuple[str, Any], ...]
  seed: int

  def config_spec(self) -> str:
    return f"configs/{self.config}.py" + (f":{self.arg}" if self.arg else "")


def select_claims(only: Sequence[str] = ()) -> list[Claim]:
  """The claims named in ``only`` (all when empty), in :data:`CLAIMS` order."""
  known = {c.id: c for c in CLAIMS}
  bad = [c for c in only if c not in known]
  if bad:
    raise ValueError(f"unknown claim(s) {bad}; choose among {', '.join(known)}")
  return [c for c in CLAIMS if not only or c.id in only]


def run_for(arm: Arm, preset: Preset, seed: int,
            extra: Sequence[tuple[str, Any]] = ()) -> RunSpec:
  """The run of an arm under a preset, for one seed."""
  if arm.config not in preset.args:
    raise ValueError(f"preset {preset.name!r} does not size config {arm.config!r}")
  arg = ",".join(p for p in (arm.arg, preset.args[arm.config]) if p)
  overrides = (*preset.overrides.get(arm.config, ()), *arm.overrides, *extra)
  identity = ",".join([arm.arg or "default", *(f"{k}={v}" for k, v in arm.overrides)])
  slug = re.sub(r"[^A-Za-z0-9=.+-]+", "_", identity)
  return RunSpec(f"{arm.config}__{slug}__seed{seed}", arm.config, arg, tuple(overrides),
                 seed)


def plan(claims: Sequence[Claim], preset: Preset, seeds: Sequence[int],
         extra: Sequence[tuple[str, Any]] = ()) -> list[RunSpec]:
  """Every distinct run the claims need, each once."""
  runs: dict[str, RunSpec] = {}
  for claim in claims:
    for arm in claim.arms:
      for seed in seeds:
        spec = run_for(arm, preset, seed, extra)
        runs.setdefault(spec.name, spec)
  return list(runs.values())


def _load_config(spec: RunSpec):
  path = CONFIG_DIR / f"{spec.config}.py"
  module_spec = importlib.util.spec_from_file_location(f"config_{spec.config}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(spec.arg or None)
  config.seed = spec.seed
  for field, value in spec.overrides:
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if leaf not in node:
      raise ValueError(f"--set {field}: configs/{spec.config}.py has no such field")
    node[leaf] = value
  return config


def run_in_process(spec: RunSpec, workdir: pathlib.Path) -> None:
  """Trains (or, for the shallow baselines, fits) one run in this process."""
  config = _load_config(spec)
  if spec.config == "shallow":
    from comtriplet_jax.baselines import shallow  # pylint: disable=g-import-not-at-top
    shallow.run(config, str(workdir))
  else:
    from comtriplet_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, str(workdir))


def run_in_subprocess(spec: RunSpec, workdir: pathlib.Path) -> None:
  """Runs the command a user would type, its output appended to ``run.log``."""
  module = ("comtriplet_jax.baselines.shallow" if spec.config == "shallow"
            else "comtriplet_jax.main")
  command = [sys.executable, "-m", module, f"--config={spec.config_spec()}",
             f"--workdir={workdir}", f"--config.seed={spec.seed}"]
  command += [f"--config.{k}={v}" for k, v in spec.overrides]
  with open(workdir / "run.log", "a") as log:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    proc = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  if proc.returncode:
    raise RuntimeError(f"run {spec.name} failed (exit {proc.returncode}); see "
                       f"{workdir / 'run.log'}")


def execute(runs: Sequence[RunSpec], out: pathlib.Path, *,
            runner: Callable[[RunSpec, pathlib.Path], None] = run_in_subprocess,
            log: Callable[[str], None] = print) -> None:
  """Runs every unfinished run; finished ones (``results.json``) are skipped."""
  for i, spec in enumerate(runs, 1):
    workdir = out / "runs" / spec.name
    if (workdir / "results.json").exists():
      log(f"[{i}/{len(runs)}] {spec.name}: finished, read")
      continue
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"[{i}/{len(runs)}] {spec.name}: {spec.config_spec()} seed {spec.seed}")
    start = time.perf_counter()
    runner(spec, workdir)
    if not (workdir / "results.json").exists():
      raise RuntimeError(f"run {spec.name} ended without {workdir / 'results.json'}")
    wall = time.perf_counter() - start
    record = workdir / "study_run.json"
    previous = json.loads(record.read_text())["seconds"] if record.exists() else 0.0
    record.write_text(json.dumps({"seconds": previous + wall}))
    log(f"[{i}/{len(runs)}] {spec.name}: done in {wall:.0f} s")


# ------------------------------------------------------------------ statistics
def t_quantile(p: float, df: int) -> float:
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.t.ppf(p, df))


def paired_interval(differences: Sequence[float], confidence: float = CONFIDENCE
                    ) -> tuple[float, float, float]:
  """Mean of the per-seed differences and its t-interval (NaN bounds for n < 2)."""
  d = np.asarray(differences, np.float64)
  if d.size == 0 or not np.all(np.isfinite(d)):
    return math.nan, math.nan, math.nan
  mean = float(d.mean())
  if d.size < 2:
    return mean, math.nan, math.nan
  half = t_quantile(0.5 + confidence / 2, d.size - 1) * float(d.std(ddof=1)) / math.sqrt(
      d.size)
  return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
  """'holds' above 0, 'reversed' below 0, otherwise (or undefined) 'inconclusive'."""
  if low > 0:
    return "holds"
  if high < 0:
    return "reversed"
  return "inconclusive"


def slope(ratios: Sequence[float], values: Sequence[float]) -> float:
  """Least-squares slope of values against log(ratio)."""
  x = np.log(np.asarray(ratios, np.float64))
  y = np.asarray(values, np.float64)
  x = x - x.mean()
  return float(np.sum(x * (y - y.mean())) / np.sum(x * x))


def claim_differences(claim: Claim, values: Mapping[str, Mapping[int, float]],
                      seeds: Sequence[int]) -> list[float]:
  """Per-seed paired differences (see :class:`Claim`); ``values[label][seed]``."""
  out = []
  for seed in seeds:
    if claim.kind == "gain":
      first, *others = claim.arms
      out.append(values[first.label][seed]
                 - max(values[a.label][seed] for a in others))
    elif claim.kind == "slope":
      slopes = []
      for group in claim.groups:
        arms = [a for a in claim.arms if a.group == group]
        slopes.append(slope([a.ratio for a in arms],
                            [values[a.label][seed] for a in arms]))
      out.append(slopes[0] - slopes[1])
    else:
      raise ValueError(f"claim {claim.id}: unknown kind {claim.kind!r}")
  return out


# ---------------------------------------------------------------------- report
def _metric(workdir: pathlib.Path, arm: Arm, metric: str, split: str = "test"
            ) -> tuple[float, dict[str, Any]]:
  results = json.loads((workdir / "results.json").read_text())
  if arm.result:
    results = results[arm.result]
  metrics = results[split]
  return float(metrics.get(metric, math.nan)), metrics


def evaluate_claims(claims: Sequence[Claim], preset: Preset, seeds: Sequence[int],
                    out: pathlib.Path, extra: Sequence[tuple[str, Any]] = ()
                    ) -> list[dict[str, Any]]:
  """Per claim: arm values per seed, differences, mean, interval and verdict."""
  report = []
  for claim in claims:
    values: dict[str, dict[int, float]] = {}
    arms = []
    for arm in claim.arms:
      values[arm.label] = {}
      runs = {}
      for seed in seeds:
        spec = run_for(arm, preset, seed, extra)
        value, _ = _metric(out / "runs" / spec.name, arm, claim.metric)
        values[arm.label][seed] = value
        runs[seed] = spec.name
      per_seed = [values[arm.label][s] for s in seeds]
      arms.append({"label": arm.label, "config": f"configs/{arm.config}.py",
                   "arg": arm.arg, "overrides": [list(o) for o in arm.overrides],
                   "result": arm.result, "group": arm.group, "ratio": arm.ratio,
                   "per_seed": per_seed, "mean": float(np.mean(per_seed)),
                   "runs": [runs[s] for s in seeds]})
    differences = claim_differences(claim, values, seeds)
    mean, low, high = paired_interval(differences)
    report.append({
        "id": claim.id, "paper": claim.paper, "statement": claim.statement,
        "metric": claim.metric, "kind": claim.kind,
        "paper_figures": claim.paper_figures, "arms": arms, "seeds": list(seeds),
        "differences": differences, "mean_difference": mean,
        "interval": [low, high], "confidence": CONFIDENCE,
        "verdict": verdict(low, high)})
  return report


def _fmt(x: float, digits: int = 4) -> str:
  return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def to_markdown(report: dict[str, Any]) -> str:
  """The verdict table and, per claim, each arm's per-seed values."""
  lines = [f"# Claims of the papers, measured ({report['preset']} preset, "
           f"{len(report['seeds'])} seeds)", "",
           f"Machine: {report['machine']}. Wall time: {report['wall_seconds'] / 60:.1f} "
           "min for the runs this invocation made.", "",
           "| claim | statement | metric | paper | measured (mean over seeds) | "
           "difference, 95% interval | verdict |",
           "|---|---|---|---|---|---|---|"]
  for c in report["claims"]:
    measured = "; ".join(f"{a['label']} {_fmt(a['mean'])}" for a in c["arms"])
    low, high = c["interval"]
    lines.append(
        f"| {c['id']} | {c['statement']} | {c['metric']} | {c['paper_figures']} | "
        f"{measured} | {_fmt(c['mean_difference'])} [{_fmt(low)}, {_fmt(high)}] | "
        f"**{c['verdict']}** |")
  lines += ["", "Verdict: the paired difference per seed (claimed better arm minus the "
            "best other; C3: SDC's slope of AUC against log ratio minus the "
            "classifier's) holds when its 95% t-interval lies above 0, is reversed "
            "below 0, and is inconclusive otherwise.", ""]
  for c in report["claims"]:
    lines += [f"## {c['id']}: {c['statement']}", "",
              "| arm | " + " | ".join(f"seed {s}" for s in c["seeds"]) + " | mean |",
              "|---|" + "---|" * (len(c["seeds"]) + 1)]
    for a in c["arms"]:
      lines.append(f"| {a['label']} | " + " | ".join(_fmt(v) for v in a["per_seed"])
                   + f" | {_fmt(a['mean'])} |")
    lines += ["", "Differences per seed: "
              + ", ".join(_fmt(d) for d in c["differences"]), ""]
  return "\n".join(lines) + "\n"


def plot_claim(claim: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """Every seed's value per arm (C3: the metric against the ratio, mean and interval)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(max(4.0, 1.3 * len(claim["arms"])), 3.4))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  if claim["kind"] == "slope":
    for group in dict.fromkeys(a["group"] for a in claim["arms"]):
      arms = [a for a in claim["arms"] if a["group"] == group]
      ratios = [a["ratio"] for a in arms]
      values = np.asarray([a["per_seed"] for a in arms])
      means = values.mean(1)
      ax.plot(ratios, means, marker="o", label=group)
      if values.shape[1] > 1:
        half = t_quantile(0.5 + CONFIDENCE / 2, values.shape[1] - 1) * values.std(
            1, ddof=1) / math.sqrt(values.shape[1])
        ax.fill_between(ratios, means - half, means + half, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("majority:minority ratio of the training split")
    ax.legend(fontsize=8)
  else:
    for i, a in enumerate(claim["arms"]):
      ax.scatter([i] * len(a["per_seed"]), a["per_seed"], s=18, alpha=0.7)
      ax.hlines(a["mean"], i - 0.25, i + 0.25, color="black")
    ax.set_xticks(range(len(claim["arms"])))
    ax.set_xticklabels([a["label"] for a in claim["arms"]], rotation=20, ha="right",
                       fontsize=8)
  ax.set_ylabel(f"test {claim['metric']}")
  ax.set_title(f"{claim['id']}: {claim['verdict']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  return path


def machine_description() -> str:
  try:
    import jax  # pylint: disable=g-import-not-at-top
    devices = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  except Exception:  # pylint: disable=broad-except
    devices = "JAX devices unknown"
  return f"{platform.machine()}, {os.cpu_count()} CPU cores, {devices}"


def write_report(out: pathlib.Path, claims: list[dict[str, Any]], *, preset: str,
                 seeds: Sequence[int], wall_seconds: float, command: str
                 ) -> dict[str, Any]:
  report = {"preset": preset, "seeds": list(seeds), "command": command,
            "machine": machine_description(), "wall_seconds": wall_seconds,
            "claims": claims}
  for claim in claims:
    claim["figure"] = plot_claim(claim, out / f"claim_{claim['id']}.png").name
  (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
  (out / "report.md").write_text(to_markdown(report))
  return report


def _check_manifest(out: pathlib.Path, preset: str,
                    extra: Sequence[tuple[str, Any]]) -> None:
  """A study folder holds runs of one preset and one set of ``--set`` fields."""
  manifest = out / "study.json"
  current = {"preset": preset, "set": [[k, v] for k, v in extra]}
  if manifest.exists():
    recorded = json.loads(manifest.read_text())
    differ = [k for k in current if recorded.get(k) != json.loads(json.dumps(current[k]))]
    if differ:
      raise ValueError(
          f"{out} holds a study made with " + ", ".join(
              f"{k}={recorded.get(k)!r}" for k in differ) + "; this command asks for "
          + ", ".join(f"{k}={current[k]!r}" for k in differ) + ". Its finished runs "
          "would be mixed with runs of another size: use another --out.")
  else:
    manifest.write_text(json.dumps(current, indent=2))


def run_study(out: pathlib.Path | str, *, preset: str = "cpu", seeds: int = 3,
              only: Sequence[str] = (), extra: Sequence[tuple[str, Any]] = (),
              runner: Callable[[RunSpec, pathlib.Path], None] = run_in_subprocess,
              log: Callable[[str], None] = print, command: str = "") -> dict[str, Any]:
  """Runs what the selected claims need, then writes the report (see module doc)."""
  if preset not in PRESETS:
    raise ValueError(f"--preset={preset!r}: choose one of {', '.join(PRESETS)}")
  if seeds < 1:
    raise ValueError(f"--seeds={seeds} must be >= 1")
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  claims = select_claims(only)
  seed_list = list(range(seeds))
  _check_manifest(out, preset, extra)
  runs = plan(claims, PRESETS[preset], seed_list, extra)
  log(f"{len(claims)} claims, {len(runs)} runs ({seeds} seeds) in {out / 'runs'}")
  start = time.perf_counter()
  execute(runs, out, runner=runner, log=log)
  wall = time.perf_counter() - start
  measured = evaluate_claims(claims, PRESETS[preset], seed_list, out, extra)
  report = write_report(out, measured, preset=preset, seeds=seed_list,
                        wall_seconds=wall, command=command)
  for claim in measured:
    low, high = claim["interval"]
    log(f"{claim['id']}: {claim['verdict']} (difference {_fmt(claim['mean_difference'])}"
        f" [{_fmt(low)}, {_fmt(high)}])")
  return report


def parse_set(items: Sequence[str]) -> list[tuple[str, Any]]:
  """'field=value' items; values are Python literals where they parse, else strings."""
  out = []
  for item in items:
    field, sep, raw = item.partition("=")
    if not sep or not field.strip():
      raise ValueError(f"--set={item!r} must look like FIELD=VALUE, e.g. "
                       "manual_dir=/data/ham10000")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    out.append((field.strip(), value))
  return out


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m comtriplet_jax.evaluation.reproduce",
      description="Runs the papers' claims with seeds and writes report.md/json.")
  parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--out", required=True)
  parser.add_argument("--only", default="", help="claims, e.g. C1,C5 (default: all)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a config field for every run, e.g. manual_dir=/data")
  parser.add_argument("--in_process", action="store_true",
                      help="train in this process instead of one process per run")
  args = parser.parse_args(argv)
  only = [c.strip() for c in args.only.split(",") if c.strip()]
  run_study(args.out, preset=args.preset, seeds=args.seeds, only=only,
            extra=parse_set(args.set),
            runner=run_in_process if args.in_process else run_in_subprocess,
            command=" ".join(["python -m comtriplet_jax.evaluation.reproduce",
                              *(argv if argv is not None else sys.argv[1:])]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
