"""Multi-process start-up: ``jax.distributed.initialize`` before JAX touches a device.

Data-parallel training over several hosts runs one copy of the program per host (or
per GPU); :func:`initialize` connects the copies so that ``jax.devices()`` lists every
device of the job, collectives span all of them, and orbax checkpoints are written
together. It must run before anything creates a JAX backend (``main.py`` calls it
first thing).

Where the process count, the process id and the coordinator come from, in order:

1. explicit values (the absl flags ``--coordinator_address``, ``--num_processes``,
   ``--process_id``, ``--local_device_ids``, or the environment variable
   ``JAX_COORDINATOR_ADDRESS``), e.g. from ``launch/local.sh``;
2. a multi-process launcher seen in the environment: SLURM (``srun`` with more than
   one task), Open MPI (``mpirun``), Cloud TPU VMs (single host or pod slice) and
   Kubernetes indexed Jobs. JAX's own cluster auto-detection then fills in whatever
   was not given (``--coordinator_address`` alone may be given, e.g. to pin a port);
3. otherwise a single process: nothing to do.

``--distributed=on`` calls ``jax.distributed.initialize()`` even where this module
sees no launcher (any environment JAX detects by itself); ``off`` never calls it.

CPU: collectives between processes on CPU need an implementation, chosen before the
CPU backend starts; :func:`initialize` selects 'gloo' (bundled with jaxlib) unless
'mpi' was chosen. That is what lets the multi-process tests run on a laptop.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Mapping, Sequence

from absl import flags
from absl import logging
import jax

MODES = ("auto", "on", "off")
LAUNCHERS = ("slurm", "openmpi", "cloud_tpu", "kubernetes")

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", MODES,
    "Multi-process start-up: 'auto' when flags or a launcher (SLURM, Open MPI, "
    "Cloud TPU, Kubernetes) say so, 'on' always, 'off' never.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator service (all processes give the same).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of the job.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id in [0, num_processes).", lower_bound=0)
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None,
    "Accelerators this process uses, e.g. '0' for one process per GPU (default: "
    "all visible; under SLURM/Open MPI on GPUs JAX picks one per local rank).")

_SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                    "SLURM_PROCID", "SLURM_LOCALID")


def detect_launcher(environ: Mapping[str, str] | None = None) -> str | None:
  """The multi-process launcher this process runs under, or None.

  Only launchers that start several processes count: a single SLURM task or a
  single ``mpirun`` rank is a single process and needs no coordinator.

  Args:
    environ: the environment to inspect (default ``os.environ``).

  Returns:
    One of ``LAUNCHERS`` or None.
  """
  env = os.environ if environ is None else environ

  def count(name: str) -> int:
    try:
      return int(env.get(name, "1"))
    except ValueError:
      return 1

  if all(v in env for v in _SLURM_VARIABLES) and count("SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  # TPU VMs: JAX asks the VM's metadata server or reads these variables (GKE).
  if importlib.util.find_spec("libtpu") is not None and (
      "TPU_WORKER_HOSTNAMES" in env or "TPU_PROCESS_ADDRESSES" in env
      or pathlib.Path("/dev/accel0").exists() or pathlib.Path("/dev/vfio/0").exists()):
    return "cloud_tpu"
  # JAX finds the pods of an indexed Job through the Kubernetes API, which needs
  # the `kubernetes` package (jax[k8s]).
  if ("KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env
      and importlib.util.find_spec("kubernetes") is not None):
    return "kubernetes"
  return None


def initialize(*, mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None,
               environ: Mapping[str, str] | None = None,
               initialization_timeout: int = 300) -> bool:
  """Connects this process to the others of its job, if it has any.

  Args:
    mode: 'auto', 'on' or 'off' (see the module docstring).
    coordinator_address: 'host:port' of process 0's coordinator, or None.
    num_processes: number of processes, or None.
    process_id: this process's id, or None.
    local_device_ids: accelerators of this process, or None for the default.
    environ: environment to detect launchers in (default ``os.environ``).
    initialization_timeout: seconds to wait for every process to connect.

  Returns:
    True when ``jax.distributed.initialize`` was called (this is, or may be,
    one of several processes), False for a plain single-process run.

  Raises:
    ValueError: on an unknown mode, on a partial explicit specification that
      no launcher completes, or on an inconsistent process id.
  """
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r} is not allowed; choose one of "
                     f"{', '.join(MODES)}")
  if mode == "off":
    return False
  env = os.environ if environ is None else environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  explicit = {"coordinator_address": coordinator_address,
              "num_processes": num_processes, "process_id": process_id}
  given = {k for k, v in explicit.items() if v is not None}
  launcher = detect_launcher(env)
  if mode == "auto" and not given and launcher is None:
    return False
  if given and launcher is None and mode == "auto" and len(given) < 3:
    missing = sorted(set(explicit) - given)
    raise ValueError(
        f"multi-process run without a launcher: --{' and --'.join(sorted(given))} "
        f"given, but --{' and --'.join(missing)} missing (give all three, or run "
        "under SLURM, Open MPI, Cloud TPU or Kubernetes)")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1")
  if process_id is not None and num_processes is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes="
                     f"{num_processes})")
  if coordinator_address is not None and ":" not in coordinator_address:
    raise ValueError(f"--coordinator_address={coordinator_address!r} must be "
                     "host:port")

  # Cross-process collectives on CPU (the multi-process tests, CPU clusters)
  # need an implementation picked before the CPU backend is created; accelerator
  # backends ignore this setting.
  if jax.config.jax_cpu_collectives_implementation != "mpi":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize: launcher %s, coordinator %s, %s "
               "processes, process id %s, local devices %s", launcher or "none",
               coordinator_address or "auto", num_processes or "auto",
               process_id if process_id is not None else "auto",
               local_device_ids or "default")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id,
      local_device_ids=list(local_device_ids) if local_device_ids else None,
      initialization_timeout=initialization_timeout)
  return True


def initialize_from_flags() -> bool:
  """:func:`initialize` with the values of this module's absl flags."""
  ids = _LOCAL_DEVICE_IDS.value
  try:
    local_device_ids = [int(i) for i in ids] if ids else None
  except ValueError:
    raise ValueError(f"--local_device_ids={','.join(ids)} must be comma-separated "
                     "integers") from None
  return initialize(mode=_DISTRIBUTED.value,
                    coordinator_address=_COORDINATOR_ADDRESS.value,
                    num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                    local_device_ids=local_device_ids)
