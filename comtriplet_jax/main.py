"""Entry point: ``python -m comtriplet_jax.main --config=configs/X.py[:ARG] --workdir=DIR``.

Fields of the config can be overridden on the command line, e.g.
``--config.learning_rate=1e-4``. Everything else happens in ``train.py``.

Several processes (hosts, or one process per GPU) run the same command; they find
each other through SLURM, Open MPI, Cloud TPU or Kubernetes, or through the flags
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (see
``distributed.py`` and ``launch/``).
"""

from __future__ import annotations

import logging as py_logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from comtriplet_jax import distributed  # noqa: E402  (defines its flags)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
flags.DEFINE_bool("fresh", False,
                  "Delete the run in --workdir (checkpoints, records, results, "
                  "TensorBoard events) and start again; by default a run resumes, "
                  "and refuses when --workdir holds a run of another config.")
config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file, optionally followed by :ARG.",
    lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(py_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the console and log files."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # TensorFlow is only the input pipeline here: keep it off any accelerator.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  # Before anything creates a JAX backend: every device of the job must be known.
  distributed.initialize_from_flags()
  import jax  # pylint: disable=g-import-not-at-top
  from comtriplet_jax import train  # pylint: disable=g-import-not-at-top

  logging.info("JAX process %d of %d, local devices %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir, fresh=FLAGS.fresh)


if __name__ == "__main__":
  app.run(main)
