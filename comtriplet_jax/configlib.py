"""Shared pieces of the ``configs/*.py`` files: defaults, argument strings, validation.

A config file is ``get_config(arg)`` returning an ``ml_collections.ConfigDict``; the
argument is what follows the colon in ``--config=configs/classifier.py:ARG``, a
comma-separated list of ``key=value`` pairs and bare flags, e.g.
``runlocal,backbone=resnet50,strategy=TL+DA``. :func:`parse_arg` turns it into a dict
and rejects keys the file does not know, naming the allowed ones.

:func:`validate` checks every enumerated or ranged field before anything is built or
compiled and names the field and its allowed values on error.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

DATASETS = ("ham10000", "ph2", "isic2017", "isic2019", "isic2020")
TASKS = ("melanoma_vs_nevus", "malignant_vs_benign", "melanoma_vs_rest",
         "sk_vs_rest", "all")
SPLIT_SCHEMES = ("75/12.5/12.5", "80/20")
SPLIT_BY = ("lesion", "image")
NORMALIZATIONS = ("unit", "backbone", "imagenet_caffe", "imagenet_torch", "raw")
LOSS_WEIGHTINGS = ("none", "dataset", "batch")
PARALLELISMS = ("pmap", "shard_map")
DTYPES = ("float32", "bfloat16")
LR_SCHEDULES = ("constant", "cosine")
STRATEGY_PARTS = ("NP", "TL", "DA", "LW")


def parse_arg(arg: str | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
  """Parses ``key=value,flag,...`` against ``defaults`` (which fixes keys and types).

  A bare ``flag`` sets a boolean default to True. Values are converted to the type
  of the default. Unknown keys raise ``ValueError`` naming the allowed keys.
  """
  out = dict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; allowed: "
                       f"{', '.join(sorted(defaults))}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
      continue
    out[key] = _convert(key, value.strip(), default)
  return out


def _convert(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes"):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"config argument {key!r} must be true or false, got {value!r}")
  try:
    if isinstance(default, int):
      return int(value)
    if isinstance(default, float):
      return float(value)
  except ValueError:
    raise ValueError(f"config argument {key!r} must be a {type(default).__name__}, "
                     f"got {value!r}") from None
  return value


def parse_strategy(strategy: str) -> dict[str, Any]:
  """The COM-Triplet paper's learning strategies as config fields.

  ``NP`` no pretraining, ``TL`` transfer learning (ImageNet weights), ``DA`` data
  augmentation, ``LW`` loss weighting (inverse class counts within each batch);
  combined with ``+``, e.g. ``TL+DA``.
  """
  parts = [p.strip().upper() for p in strategy.split("+") if p.strip()]
  bad = [p for p in parts if p not in STRATEGY_PARTS]
  if bad or not parts:
    raise ValueError(f"strategy {strategy!r}: parts must be among {STRATEGY_PARTS} "
                     "joined by '+'")
  if "NP" in parts and "TL" in parts:
    raise ValueError(f"strategy {strategy!r} asks for both NP and TL")
  return {
      "init_from": "imagenet" if "TL" in parts else "",
      "augment": "DA" in parts,
      "loss_weighting": "batch" if "LW" in parts else "none",
  }


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every method (the COM-Triplet paper's settings)."""
  c = ml_collections.ConfigDict()
  c.method = "classifier"
  c.seed = 0

  # Data.
  c.dataset = "ham10000"
  c.tfds_data_dir = ""      # where TFDS writes prepared data; "" = TFDS default
  c.manual_dir = ""         # the raw folder; "" = COMTRIPLET_HAM10000_DIR or ../shared
  c.task = "melanoma_vs_nevus"
  c.split_scheme = "75/12.5/12.5"
  c.split_seed = 0
  # 'lesion' (default): every image of a lesion or patient in one split.
  # 'image': each image its own group, which leaks lesions across splits; only
  # for measuring that leakage (the study's claim L1), never for results.
  c.split_by = "lesion"
  # A run's splits.csv: its split column replaces the seeded split (scheme,
  # seed and split_by unused), to train or evaluate on exactly those examples.
  c.split_file = ""
  c.val_fraction = 0.1      # 80/20 scheme only: share of the train part for validation
  c.train_class_counts = ""  # e.g. "4500:75" majority:minority (imbalance study)
  c.image_size = 256
  c.cache_images = True
  c.normalization = "unit"  # 'unit' = x/255; 'backbone' = the backbone's Keras scheme
  c.augment = False

  # Model.
  c.backbone = "vgg16"
  c.init_from = ""          # "" (none), "imagenet", or a path to an orbax checkpoint
  c.dtype = "float32"       # compute dtype; parameters stay float32
  c.sync_batch_norm = True  # batch statistics over the global batch

  # Optimisation (the COM-Triplet paper: Adam 1e-5, betas .9/.99, eps 1e-7, 15 epochs).
  c.batch_size = 15         # global, across devices
  c.eval_batch_size = 64
  c.learning_rate = 1e-5
  c.lr_schedule = "constant"  # or 'cosine': warm-up over warmup_steps, cosine decay to 0
  c.warmup_steps = 0
  c.adam_b1 = 0.9
  c.adam_b2 = 0.99
  c.adam_eps = 1e-7
  c.num_epochs = 15.0
  c.num_train_steps = -1    # > 0 overrides num_epochs
  c.loss_weighting = "none"

  # Loop.
  c.parallelism = "pmap"
  c.log_every_steps = 50
  c.eval_every_steps = -1   # -1: once per epoch
  c.checkpoint_every_steps = -1  # -1: at every evaluation
  c.max_checkpoints_to_keep = 3
  c.selection_metric = "auc"  # validation metric for model selection (higher is better)
  # Binary tasks: the operating point that predict and evaluate use, chosen on
  # validation at the end of the run: 'paper' (argmax / nearest prototype),
  # 'youden', or 'sensitivity=0.90' (any target in (0, 1]).
  c.operating_point = "paper"
  c.heatmap_images = 8      # test images in the run's Grad-CAM grid (0: none)
  return c


def check_operating_point(rule: str, where: str = "config.operating_point") -> None:
  """Rejects a rule that is not 'paper', 'youden' or 'sensitivity=X', X in (0, 1].

  The rules are parsed in one place, ``operating_points.parse_rule``; this names
  the field that holds the rule.
  """
  from comtriplet_jax.evaluation import operating_points  # pylint: disable=g-import-not-at-top
  try:
    operating_points.parse_rule(rule)
  except ValueError as e:
    raise ValueError(f"{where}={rule!r} is not allowed: {e}") from None


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects bad values before any data is read or anything compiled."""
  def one_of(field, allowed):
    value = config.get(field)
    if value not in allowed:
      raise ValueError(f"config.{field}={value!r} is not allowed; choose one of "
                       f"{', '.join(map(str, allowed))}")

  def positive(field, *, allow_minus_one=False):
    value = config.get(field)
    if allow_minus_one and value == -1:
      return
    if not isinstance(value, (int, float)) or value <= 0:
      extra = " (or -1)" if allow_minus_one else ""
      raise ValueError(f"config.{field}={value!r} must be > 0{extra}")

  one_of("dataset", DATASETS)
  one_of("task", TASKS)
  one_of("split_scheme", SPLIT_SCHEMES)
  one_of("split_by", SPLIT_BY)
  from comtriplet_jax import models  # pylint: disable=g-import-not-at-top
  one_of("backbone", models.BACKBONES)
  one_of("normalization", NORMALIZATIONS)
  one_of("loss_weighting", LOSS_WEIGHTINGS)
  one_of("parallelism", PARALLELISMS)
  one_of("dtype", DTYPES)
  one_of("lr_schedule", LR_SCHEDULES)
  check_operating_point(config.get("operating_point", "paper"))
  heatmaps = config.get("heatmap_images", 0)
  if not isinstance(heatmaps, int) or heatmaps < 0:
    raise ValueError(f"config.heatmap_images={heatmaps!r} must be an integer >= 0")
  if not isinstance(config.warmup_steps, int) or config.warmup_steps < 0:
    raise ValueError(f"config.warmup_steps={config.warmup_steps!r} must be an integer "
                     ">= 0")
  for field in ("image_size", "batch_size", "eval_batch_size", "learning_rate",
                "num_epochs", "log_every_steps", "max_checkpoints_to_keep"):
    positive(field)
  for field in ("num_train_steps", "eval_every_steps", "checkpoint_every_steps"):
    positive(field, allow_minus_one=True)
  if config.image_size < 32:
    raise ValueError(f"config.image_size={config.image_size} must be >= 32")
  if not 0.0 < config.val_fraction < 1.0:
    raise ValueError(f"config.val_fraction={config.val_fraction} must be in (0, 1)")
  counts = config.train_class_counts
  if counts:
    parts = counts.split(":")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise ValueError(f"config.train_class_counts={counts!r} must look like "
                       "'MAJORITY:MINORITY' with positive integers, e.g. '4500:75'")
  for field in ("adam_b1", "adam_b2"):
    if not 0.0 <= config.get(field) < 1.0:
      raise ValueError(f"config.{field}={config.get(field)} must be in [0, 1)")
