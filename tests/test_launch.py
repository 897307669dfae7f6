"""Launchers and sweeps without a cluster and without training.

The shell launchers are checked for syntax and by what they would run: the SLURM
script's dry run for a two-node job, and its real path with stand-ins for
``srun``/``scontrol`` and for Python that only print what they were given. The
sweep runner is checked on fake workdirs and fake ``results.json`` files:
expansion, run names, skipping finished runs, rerunning failed ones, the job
array (run end to end through the stand-ins) and the collected tables.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import pathlib
import re
import stat
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "launch" / "local.sh"
SLURM_SBATCH = ROOT / "launch" / "slurm.sbatch"
CLASSIFIER = ROOT / "configs" / "classifier.py"


def _load(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


sweep = _load(ROOT / "launch" / "sweep.py", "launch_sweep")


def _clean_env(**extra: str) -> dict[str, str]:
  """This environment without any SLURM variable (the tests may run under SLURM)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(extra)
  return env


def _bash(script: pathlib.Path, *args: str, env: dict[str, str]) -> str:
  done = subprocess.run(["bash", str(script), *args], env=env, capture_output=True,
                        text=True, timeout=60, check=False)
  assert done.returncode == 0, done.stderr + done.stdout
  return done.stdout


def _executable(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


# A stand-in for `python -m comtriplet_jax.main`: prints its arguments and, for
# a config argument without 'fail', writes a results.json into its workdir.
FAKE_PYTHON = r"""#!/bin/bash
echo "python $*"
workdir=""
for a in "$@"; do case $a in --workdir=*) workdir=${a#*=};; esac; done
case "$*" in *fail*) exit 3;; esac
if [[ -n $workdir && ${SLURM_PROCID:-0} == 0 ]]; then
  mkdir -p "$workdir"
  echo '{"best_step": 4, "num_train_steps": 6, "selection_metric": "auc",
         "validation": {"auc": 0.75, "accuracy": 0.8},
         "test": {"auc": 0.5, "accuracy": 0.625, "balanced_accuracy": 0.6,
                  "f1_macro": 0.55, "sensitivity": 0.4, "specificity": 0.8}}' \
    > "$workdir/results.json"
fi
"""

# A stand-in for srun: runs the command once per task, one after the other,
# with the variables SLURM gives a task (block distribution over FAKE_HOSTS).
FAKE_SRUN = r"""#!/bin/bash
ntasks=1; per_node=1
while [[ $1 == --* ]]; do
  case $1 in --ntasks=*) ntasks=${1#*=};; --ntasks-per-node=*) per_node=${1#*=};; esac
  shift
done
read -ra hosts <<< "$FAKE_HOSTS"
echo "srun $ntasks tasks"
for ((t = 0; t < ntasks; t++)); do
  SLURM_PROCID=$t SLURM_LOCALID=$((t % per_node)) SLURM_NTASKS=$ntasks \
    SLURMD_NODENAME=${hosts[t / per_node]} "$@" || exit $?
done
"""
FAKE_SCONTROL = '#!/bin/bash\nprintf "%s\\n" $FAKE_HOSTS\n'


@pytest.fixture()
def fake_bin(tmp_path) -> pathlib.Path:
  """A folder with fake python, srun, scontrol and sbatch (which logs its arguments)."""
  folder = tmp_path / "bin"
  folder.mkdir()
  _executable(folder / "python", FAKE_PYTHON)
  _executable(folder / "srun", FAKE_SRUN)
  _executable(folder / "scontrol", FAKE_SCONTROL)
  _executable(folder / "sbatch",
              f'#!/bin/bash\necho "$*" >> {folder}/sbatch.log\necho "777;cluster"\n')
  return folder


# --------------------------------------------------------------- shell scripts
@pytest.mark.parametrize("script", [LOCAL_SH, SLURM_SBATCH])
def test_shell_scripts_parse_and_print_usage(script):
  subprocess.run(["bash", "-n", str(script)], check=True)
  usage = _bash(script, "--help", env=_clean_env())
  assert "Usage" in usage and "comtriplet_jax.main" in usage


def _task_lines(out: str) -> list[str]:
  return [line for line in out.splitlines() if line.startswith("task ")]


def test_slurm_dry_run_for_two_nodes():
  out = _bash(SLURM_SBATCH, "--dry-run", "--config=configs/sdc.py:runlocal",
              "--workdir=/shared/runs/sdc", "--config.seed=3",
              env=_clean_env(PYTHON="python3"))
  srun = [line for line in out.splitlines() if line.startswith("srun ")]
  assert len(srun) == 1
  assert "--nodes=2" in srun[0] and "--ntasks=2" in srun[0]
  assert "--ntasks-per-node=1" in srun[0]
  tasks = _task_lines(out)
  # Both processes meet at the first node, on a port derived from the job id.
  coordinator = f"node001:{20000 + 4242 % 20000}"
  assert tasks == [
      f"task {i} on {host} (local 0): CUDA_VISIBLE_DEVICES=0,1,2,3 python3 -m "
      f"comtriplet_jax.main --coordinator_address={coordinator} --num_processes=2 "
      f"--process_id={i} --config=configs/sdc.py:runlocal --workdir=/shared/runs/sdc "
      "--config.seed=3" for i, host in enumerate(("node001", "node002"))]


def test_slurm_dry_run_one_process_per_gpu():
  out = _bash(SLURM_SBATCH, "--workdir=/tmp/w",
              env=_clean_env(PYTHON="python3", DRY_RUN="1", DRY_RUN_TASKS_PER_NODE="2",
                             DRY_RUN_GPUS="0,1", COORDINATOR_PORT="29500"))
  tasks = _task_lines(out)
  assert [re.search(r"--process_id=(\d)", t).group(1) for t in tasks] == list("0123")
  assert [re.search(r"CUDA_VISIBLE_DEVICES=(\S*)", t).group(1) for t in tasks] == [
      "0", "1", "0", "1"]
  assert [t.split()[3] for t in tasks] == ["node001", "node001", "node002", "node002"]
  assert all("--num_processes=4" in t and "node001:29500" in t for t in tasks)


def test_slurm_script_inside_a_job_runs_srun_with_every_task(fake_bin, tmp_path):
  env = _clean_env(
      PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", PYTHON=str(fake_bin / "python"),
      SLURM_JOB_ID="91", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES="2",
      SLURM_TASKS_PER_NODE="2(x2)", CUDA_VISIBLE_DEVICES="0,1", FAKE_HOSTS="gpu07 gpu08")
  out = _bash(SLURM_SBATCH, f"--workdir={tmp_path / 'w'}", env=env)
  assert "srun 4 tasks" in out
  runs = [line for line in out.splitlines() if line.startswith("python ")]
  assert len(runs) == 4
  for process_id, line in enumerate(runs):
    assert line.startswith(f"python -m comtriplet_jax.main --coordinator_address="
                           f"gpu07:20091 --num_processes=4 --process_id={process_id} ")
  assert (tmp_path / "w" / "results.json").exists()


def test_local_sh_dry_runs():
  env = _clean_env(PYTHON="python3")
  one = _bash(LOCAL_SH, "-n", "--gpus=0,1", "--config=c.py", "--workdir=/w", env=env)
  assert one.strip() == "CUDA_VISIBLE_DEVICES=0,1 python3 -m comtriplet_jax.main " \
                        "--config=c.py --workdir=/w"
  per_gpu = _bash(LOCAL_SH, "--dry-run", "--per-gpu", "--gpus=2,5", "--port=4321", "--",
                  "--config=c.py", "--workdir=/w", env=env).strip().splitlines()
  assert per_gpu == [
      f"CUDA_VISIBLE_DEVICES={gpu} python3 -m comtriplet_jax.main "
      f"--coordinator_address=127.0.0.1:4321 --num_processes=2 --process_id={i} "
      "--config=c.py --workdir=/w" for i, gpu in enumerate((2, 5))]
  cpu = _bash(LOCAL_SH, "-n", "--cpu-processes=3", "--cpu-devices=2", "--port=1",
              "--config=c.py", env=env).strip().splitlines()
  assert len(cpu) == 3 and all(
      "JAX_PLATFORMS=cpu" in c and "device_count=2" in c and f"--process_id={i}" in c
      for i, c in enumerate(cpu))


def test_local_sh_stops_the_others_when_one_process_fails(tmp_path):
  fake = _executable(tmp_path / "python", "#!/bin/bash\n"
                     'case "$*" in *--process_id=1*) exit 3;; esac\nexec sleep 30\n')
  done = subprocess.run(
      ["bash", str(LOCAL_SH), "--cpu-processes=2", "--port=1",
       f"--log-dir={tmp_path}", "--workdir=/w"],
      env=_clean_env(PYTHON=str(fake)), capture_output=True, text=True, timeout=20,
      check=False)
  assert done.returncode == 3, done.stderr
  assert "stopping the others" in done.stderr


# ----------------------------------------------------------------- expansion
def test_classifier_sweeps_expand_to_the_papers_rows():
  tables = sweep.expand(CLASSIFIER, "tables")
  assert [r.arg for r in tables] == [
      "backbone=vgg16,strategy=TL", "backbone=resnet50,strategy=TL",
      "backbone=densenet169,strategy=TL", "backbone=efficientnetb3,strategy=TL",
      "backbone=resnet50,strategy=NP", "backbone=resnet50,strategy=TL+DA",
      "backbone=resnet50,strategy=TL+LW"]
  assert tables[5].name == "backbone-resnet50_strategy-TL+DA"
  assert len(sweep.expand(CLASSIFIER, "grid")) == 16
  imbalance = sweep.expand(CLASSIFIER, "imbalance,strategy=TL")
  assert imbalance[0].arg == "counts=834:834,strategy=TL"
  assert imbalance[-1].name == "counts-834-14_strategy-TL"
  local = sweep.expand(CLASSIFIER, "local")
  assert [r.arg for r in local] == [f"runlocal,strategy={s}"
                                    for s in ("NP", "DA", "LW")]
  sweep.validate_runs(CLASSIFIER, local)
  with pytest.raises(ValueError, match="unknown sweep 'tabels'"):
    sweep.expand(CLASSIFIER, "tabels")
  with pytest.raises(ValueError, match="run .*backbone=alexnet.*alexnet"):
    sweep.validate_runs(CLASSIFIER, sweep.expand(CLASSIFIER, "local,backbone=alexnet"))


@pytest.mark.parametrize("arg,name", [
    ("", "default"),
    ("runlocal", "runlocal"),
    ("backbone=vgg16,strategy=TL+DA", "backbone-vgg16_strategy-TL+DA"),
    ("counts=834:14", "counts-834-14"),
    ("init_from=/ckpt/x y,seed=1", "init_from--ckpt-x-y_seed-1"),
    ("sigma=0.5", "sigma-0.5"),
    ("..x", "x"),
])
def test_run_names_are_safe_folder_names(arg, name):
  assert sweep.run_name(arg) == name


def test_long_run_names_stay_distinct_and_short():
  a = sweep.run_name("x=" + "a" * 200 + ",seed=1")
  b = sweep.run_name("x=" + "a" * 200 + ",seed=2")
  assert a != b and len(a) == len(b) == sweep.MAX_NAME_LENGTH
  assert re.fullmatch(r"[A-Za-z0-9._+-]+", a)


def test_run_names_match_the_ablation_table_runner():
  from comtriplet_jax.evaluation import ablation_table  # pylint: disable=g-import-not-at-top
  runs = sweep.expand(ROOT / "configs" / "biigma.py", "table2,runlocal,steps=300")
  assert len(runs) > 5
  assert all(r.name == ablation_table.run_name(r.arg) for r in runs)


def test_colliding_run_names_are_refused(tmp_path):
  config = tmp_path / "collide.py"
  config.write_text("def get_sweep(arg=None):\n  return ['a=1:2', 'a=1/2']\n")
  with pytest.raises(ValueError, match="share the workdir name 'a-1-2'"):
    sweep.expand(config, "")
  (tmp_path / "nosweep.py").write_text("def get_config(arg=None):\n  return None\n")
  with pytest.raises(ValueError, match="defines no get_sweep"):
    sweep.expand(tmp_path / "nosweep.py", "")


# ----------------------------------------------------- skipping and resuming
def _fake_sweep(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, list]:
  """A config with four runs and a sweep dir where they are done/failed/started/new."""
  config = tmp_path / "fake_config.py"
  config.write_text(
      "def get_sweep(arg=None):\n"
      "  return ['lr=1', 'lr=2,fail', 'lr=3', 'lr=4']\n")
  sweep_dir = tmp_path / "sweep"
  runs = sweep.expand(config, "")
  done, failed, started, _ = (r.workdir(sweep_dir) for r in runs)
  done.mkdir(parents=True)
  (done / "results.json").write_text(json.dumps(
      {"best_step": 2, "num_train_steps": 6, "selection_metric": "auc",
       "validation": {"auc": 0.9}, "test": {"auc": 0.8, "accuracy": 0.7}}))
  failed.mkdir()
  (failed / sweep.FAILED_MARKER).write_text("1\n")
  (started / "checkpoints" / "3").mkdir(parents=True)
  return config, sweep_dir, runs


def test_statuses_and_local_runner_skip_finished_and_rerun_the_rest(tmp_path, fake_bin):
  config, sweep_dir, runs = _fake_sweep(tmp_path)
  assert [sweep.run_status(r.workdir(sweep_dir)) for r in runs] == [
      "done", "failed", "started", "pending"]
  printed = []
  sweep.run_locally(sweep_dir, config, runs, ["--config.x=1"], python="py",
                    dry_run=True, echo=printed.append)
  commands = [p for p in printed if p.startswith("[")]
  assert [c.split()[0] for c in commands] == ["[1/3]", "[2/3]", "[3/3]"]
  assert commands[0].endswith(f"py -m comtriplet_jax.main --config={config}:lr=2,fail "
                              f"--workdir={sweep_dir / 'lr-2_fail'} --config.x=1")

  codes = sweep.run_locally(sweep_dir, config, runs, ["--config.x=1"],
                            python=str(fake_bin / "python"), echo=printed.append)
  assert codes == {"lr-2_fail": 3, "lr-3": 0, "lr-4": 0}
  assert [sweep.run_status(r.workdir(sweep_dir)) for r in runs] == [
      "done", "failed", "done", "done"]
  record = json.loads((sweep_dir / "lr-3" / sweep.RUN_RECORD).read_text())
  assert record["returncode"] == 0 and record["wall_s"] > 0
  assert "--config.x=1" in (sweep_dir / "lr-3" / "log.txt").read_text()
  # Resubmitting runs only what is not finished.
  codes = sweep.run_locally(sweep_dir, config, runs, [], python=str(fake_bin / "python"),
                            echo=printed.append)
  assert list(codes) == ["lr-2_fail"]
  assert json.loads((sweep_dir / "lr-2_fail" / sweep.RUN_RECORD).read_text())[
      "attempts"] == 2


def test_manifest_keeps_runs_and_warns_on_changed_overrides(tmp_path):
  config, sweep_dir, runs = _fake_sweep(tmp_path)
  sweep.write_manifest(sweep_dir, config, "", runs[:2], ["--config.a=1"])
  warnings = []
  sweep.write_manifest(sweep_dir, config, "", runs[2:], ["--config.a=2"],
                       warn=warnings.append)
  assert len(warnings) == 1 and "--config.a=1" in warnings[0]
  assert sweep.manifest_runs(sweep_dir) == runs


# -------------------------------------------------------------------- SLURM
def test_slurm_array_runs_every_unfinished_run_through_slurm_sbatch(
    tmp_path, fake_bin, monkeypatch):
  config, sweep_dir, runs = _fake_sweep(tmp_path)
  printed = []
  assert sweep.submit_slurm(sweep_dir, config, runs, ["--config.x=1"],
                            python=str(fake_bin / "python"), dry_run=True,
                            sbatch_options=["--gpus-per-node=4"], max_parallel=2,
                            echo=printed.append) is None
  text = "\n".join(printed)
  assert "#SBATCH --array=0-2%2" in text and "#SBATCH --gpus-per-node=4" in text
  assert "#SBATCH --nodes=1" in text
  assert "names=(lr-2_fail lr-3 lr-4)" in text
  assert "--dependency=afterany:JOBID" in text
  assert not (sweep_dir / sweep.ARRAY_SCRIPT).exists()

  env = _clean_env(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("PATH", env["PATH"])
  job = sweep.submit_slurm(sweep_dir, config, runs, ["--config.x=1"],
                           python=str(fake_bin / "python"), echo=printed.append)
  assert job == "777"
  calls = (fake_bin / "sbatch.log").read_text().splitlines()
  assert calls[0] == f"--parsable {sweep_dir / sweep.ARRAY_SCRIPT}"
  assert "--dependency=afterany:777" in calls[1] and "--collect_only" in calls[1]
  script = sweep_dir / sweep.ARRAY_SCRIPT
  subprocess.run(["bash", "-n", str(script)], check=True)

  # Each array task, on a one-node, two-task allocation.
  task_env = dict(env, SLURM_JOB_ID="5", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1",
                  SLURM_NTASKS_PER_NODE="2", FAKE_HOSTS="n1")
  codes = []
  for task in range(3):
    codes.append(subprocess.run(["bash", str(script)], capture_output=True, text=True,
                                env=dict(task_env, SLURM_ARRAY_TASK_ID=str(task)),
                                timeout=60, check=False).returncode)
  assert codes == [3, 0, 0]
  log = (sweep_dir / "lr-3" / "log.txt").read_text()
  assert (f"-m comtriplet_jax.main --coordinator_address=n1:20005 --num_processes=2 "
          f"--process_id=1 --config={config}:lr=3 --workdir={sweep_dir / 'lr-3'} "
          "--config.x=1") in log
  assert [sweep.run_status(r.workdir(sweep_dir)) for r in runs] == [
      "done", "failed", "done", "done"]
  assert (sweep_dir / "lr-2_fail" / sweep.FAILED_MARKER).read_text().strip() == "3"


# --------------------------------------------------------------- collection
def test_tables_collect_every_run(tmp_path):
  config, sweep_dir, runs = _fake_sweep(tmp_path)
  sweep.write_manifest(sweep_dir, config, "", runs, ["--config.num_train_steps=6"])
  rows = sweep.write_tables(sweep_dir)
  assert [r["status"] for r in rows] == ["done", "failed", "started", "pending"]
  markdown = (sweep_dir / sweep.RESULTS_MD).read_text()
  assert "1 of 4 runs done" in markdown and "--config.num_train_steps=6" in markdown
  line = next(l for l in markdown.splitlines() if l.startswith("| lr-1 "))
  cells = [c.strip() for c in line.strip("|").split("|")]
  header = [c.strip() for c in markdown.splitlines()[4].strip("|").split("|")]
  row = dict(zip(header, cells))
  assert (row["config"], row["status"], row["steps"], row["best step"]) == (
      "`lr=1`", "done", "6", "2")
  assert (row["val AUC"], row["test AUC"], row["test acc"], row["test sens."]) == (
      "0.9000", "0.8000", "0.7000", "-")
  table = list(csv.DictReader(io.StringIO((sweep_dir / sweep.RESULTS_CSV).read_text())))
  assert [t["run"] for t in table] == ["lr-1", "lr-2_fail", "lr-3", "lr-4"]
  assert float(table[0]["test_auc"]) == 0.8 and table[1]["test_auc"] == ""
  assert list(table[0]) == list(sweep.CSV_COLUMNS)


def test_command_line_dry_run_and_collect_only(tmp_path):
  sweep_dir = tmp_path / "cli"
  done = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "sweep.py"),
       f"--config={CLASSIFIER}:local", f"--sweep_dir={sweep_dir}", "--dry_run", "--",
       "--config.num_train_steps=100"],
      capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
      env=_clean_env())
  assert done.returncode == 0, done.stderr
  commands = [l for l in done.stdout.splitlines() if l.startswith("[")]
  assert len(commands) == 3
  assert all(c.endswith("--config.num_train_steps=100") for c in commands)
  assert not sweep_dir.exists()
  run = sweep_dir / "runlocal_strategy-NP"
  run.mkdir(parents=True)
  (run / "results.json").write_text(json.dumps({"test": {"auc": 0.5}}))
  done = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "sweep.py"), f"--sweep_dir={sweep_dir}",
       "--collect_only"], capture_output=True, text=True, timeout=60, check=False,
      env=_clean_env())
  assert done.returncode == 0, done.stderr
  assert "| runlocal_strategy-NP | - | done |" in done.stdout
  assert (sweep_dir / sweep.RESULTS_CSV).exists()
