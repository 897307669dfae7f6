#!/usr/bin/env bash
# Data-parallel training on one machine with several GPUs.
#
# Usage: launch/local.sh [OPTIONS] [--] MAIN_FLAGS...
#   MAIN_FLAGS go to `python -m comtriplet_jax.main` (--config=..., --workdir=...).
#
#   (default)           one process that drives every visible GPU (pmap / shard_map
#                       over the local devices; the usual choice on one machine)
#   --gpus=0,2          the GPUs to use (default: CUDA_VISIBLE_DEVICES, else all
#                       that nvidia-smi lists)
#   --per-gpu           one process per GPU, joined through jax.distributed
#                       (coordinator on 127.0.0.1); the layout of a multi-host run,
#                       on one machine
#   --cpu-processes=N   no GPU: N processes on the CPU (tests the multi-process
#   --cpu-devices=M     path), each with M fake CPU devices (default 1)
#   --port=P            coordinator port (default: a free one)
#   --log-dir=DIR       logs of processes 1..N-1 (default: WORKDIR/logs); process
#                       0 writes to this terminal
#   -n, --dry-run       print the commands, run nothing
#   -h, --help          this text
#
# Examples:
#   launch/local.sh --config=configs/sdc.py --workdir=/tmp/sdc
#   launch/local.sh --per-gpu --gpus=0,1,2,3 -- --config=configs/biigma.py \
#       --workdir=/tmp/biigma
#   launch/local.sh --cpu-processes=2 --cpu-devices=2 -- \
#       --config=configs/classifier.py:runlocal --workdir=/tmp/c
# Environment: PYTHON (interpreter, default python3). If one process fails, the
# others are stopped; rerunning the same command resumes from the checkpoint.

set -euo pipefail

usage() {
  sed -n '2,/^$/{/^$/d;s/^# \{0,1\}//;p;}' "$0"
}

die() {
  echo "local.sh: $*" >&2
  exit 2
}

PYTHON=${PYTHON:-python3}
gpus=""
per_gpu=0
cpu_processes=0
cpu_devices=1
port=""
log_dir=""
dry_run=0
while (( $# )); do
  case $1 in
    --gpus=*) gpus=${1#*=} ;;
    --per-gpu) per_gpu=1 ;;
    --cpu-processes=*) cpu_processes=${1#*=} ;;
    --cpu-devices=*) cpu_devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --log-dir=*) log_dir=${1#*=} ;;
    -n | --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;  # the first flag of comtriplet_jax.main
  esac
  shift
done
[[ $cpu_processes =~ ^[0-9]+$ ]] || die "--cpu-processes=$cpu_processes must be an integer"
[[ $cpu_devices =~ ^[1-9][0-9]*$ ]] || die "--cpu-devices=$cpu_devices must be >= 1"
[[ -z $port || $port =~ ^[0-9]+$ ]] || die "--port=$port must be a number"
(( cpu_processes == 0 || per_gpu == 0 )) || die "--per-gpu and --cpu-processes exclude each other"

repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

print_command() {  # ENV=VALUE... -- COMMAND...
  local line=""
  while [[ $1 != -- ]]; do line+="$1 "; shift; done
  shift
  line+=$(printf '%q ' "$@")
  echo "${line% }"
}

# ----------------------------------------------------------------- processes
if (( cpu_processes > 0 )); then
  nproc=$cpu_processes
  devices=()
  for ((i = 0; i < nproc; i++)); do devices+=(""); done
elif (( per_gpu )); then
  if [[ -z $gpus ]]; then
    gpus=${CUDA_VISIBLE_DEVICES:-}
  fi
  if [[ -z $gpus ]]; then
    command -v nvidia-smi > /dev/null || die "--per-gpu: no --gpus given and no nvidia-smi"
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
  fi
  IFS=, read -ra devices <<< "$gpus"
  nproc=${#devices[@]}
  (( nproc > 0 )) || die "--per-gpu: no GPUs found"
else
  # One process with every (chosen) GPU.
  env_parts=()
  [[ -n $gpus ]] && env_parts+=("CUDA_VISIBLE_DEVICES=$gpus")
  if (( dry_run )); then
    print_command "${env_parts[@]}" -- "$PYTHON" -m comtriplet_jax.main "$@"
    exit 0
  fi
  exec env "${env_parts[@]}" "$PYTHON" -m comtriplet_jax.main "$@"
fi

if [[ -z $port ]]; then
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if [[ -z $log_dir ]]; then
  workdir=""
  for ((i = 1; i <= $#; i++)); do
    case ${!i} in
      --workdir=*) workdir=${!i#*=} ;;
      --workdir) j=$((i + 1)); workdir=${!j:-} ;;
    esac
  done
  log_dir=${workdir:+$workdir/logs}
  log_dir=${log_dir:-$(mktemp -d "${TMPDIR:-/tmp}/local_sh.XXXXXX")}
fi

commands=()
for ((i = 0; i < nproc; i++)); do
  if (( cpu_processes > 0 )); then
    env_parts=(JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=
               "XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices")
  else
    env_parts=("CUDA_VISIBLE_DEVICES=${devices[i]}")
  fi
  cmd=("$PYTHON" -m comtriplet_jax.main "--coordinator_address=127.0.0.1:$port"
       "--num_processes=$nproc" "--process_id=$i" "$@")
  if (( dry_run )); then
    print_command "${env_parts[@]}" -- "${cmd[@]}"
  fi
  commands+=("$(declare -p env_parts cmd)")
done
(( dry_run )) && exit 0

mkdir -p "$log_dir"
echo "local.sh: $nproc processes, coordinator 127.0.0.1:$port; processes 1-$((nproc - 1))" \
  "log to $log_dir" >&2
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < nproc; i++)); do
  eval "${commands[i]}"
  if (( i == 0 )); then
    env "${env_parts[@]}" "${cmd[@]}" &
  else
    env "${env_parts[@]}" "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

# The processes need each other for every collective: when one fails, stop
# the rest instead of letting them wait for it until a timeout.
status=0
for ((i = 0; i < nproc; i++)); do
  wait -n || { status=$?; break; }
done
if (( status != 0 )); then
  echo "local.sh: a process exited with status $status; stopping the others" >&2
  stop_all
fi
wait || true
exit "$status"
