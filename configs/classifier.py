"""Direct classifiers of the COM-Triplet paper (Tables III, VII; Figure 4).

Arguments after the colon, comma separated (all optional)::

  dataset=ham10000|ph2|isic2017|isic2019|isic2020
  task=melanoma_vs_nevus|malignant_vs_benign|melanoma_vs_rest|sk_vs_rest|all
  backbone=vgg16|resnet50|densenet121|densenet169|efficientnetb3
  size=256            image size (the paper: 256)
  strategy=NP|TL|DA|LW|TL+DA|TL+LW|...   (NP no pretraining, TL ImageNet
                      weights, DA augmentation, LW per-batch loss weighting)
  counts=4500:75      subsample training to majority:minority (imbalance study)
  runlocal            a few-minute run on a 2-core CPU

Example::

  python -m comtriplet_jax.main --config=configs/classifier.py:runlocal \
      --workdir=/tmp/classifier

Sweeps (``get_sweep``, for ``launch/sweep.py``): 'tables' (the direct-classifier
rows of Tables III and VII: the four backbones with TL, then ResNet50 with NP,
TL+DA and TL+LW; ResNet50 with TL is the row both blocks share), 'grid'
(backbones x strategies NP, TL, TL+DA, TL+LW), 'imbalance' (Figure 4's
majority:minority ratios 1, 2, 4, 15, 36, 60 scaled to HAM10000; the paper's
classifier there is VGG16 with TL: append 'strategy=TL'), 'local' (runlocal
with the strategies that need no ImageNet weights, NP, DA and LW: a
laptop-sized sweep); further comma-separated items are appended to every run,
e.g. 'tables,size=128' or 'imbalance,strategy=TL'::

  python launch/sweep.py --config=configs/classifier.py:tables --sweep_dir=/tmp/t3
"""

from comtriplet_jax import configlib

PAPER_BACKBONES = ("vgg16", "resnet50", "densenet169", "efficientnetb3")
PAPER_STRATEGIES = ("NP", "TL", "TL+DA", "TL+LW")
# Table III compares strategies on "the ResNet50 backbone with the highest
# validation performance".
STRATEGY_BACKBONE = "resnet50"
LOCAL_STRATEGIES = ("NP", "DA", "LW")


def get_config(arg=None):
  args = configlib.parse_arg(arg, dict(
      dataset="ham10000", task="melanoma_vs_nevus", backbone="vgg16", size=256,
      strategy="NP", counts="", runlocal=False))
  config = configlib.base_config()
  config.method = "classifier"
  config.dataset = args["dataset"]
  config.task = args["task"]
  config.backbone = args["backbone"]
  config.image_size = args["size"]
  config.train_class_counts = args["counts"]
  config.update(configlib.parse_strategy(args["strategy"]))
  config.selection_metric = "auc" if config.task != "all" else "f1_macro"

  if args["runlocal"]:
    # Sized for a few minutes on a 2-core CPU: a small ResNet at 64 px, 1,800 steps
    # of 32 images (the same 57,600 images as SDC's 1,200 steps of 48).
    # Departures from the paper, recorded in results.json ('departures'): a
    # cosine learning-rate schedule with warm-up, and CPU sizes.
    if "backbone=" not in (arg or ""):
      config.backbone = "small_resnet"
    if "size=" not in (arg or ""):
      config.image_size = 64
    config.batch_size = 32
    config.eval_batch_size = 128
    config.learning_rate = 1e-3
    config.lr_schedule = "cosine"
    config.warmup_steps = 50
    config.num_train_steps = 1800
    config.eval_every_steps = 600
    config.log_every_steps = 100
  return config


def get_sweep(arg=None):
  """Config-argument strings of a sweep: 'tables' (default), 'grid', 'imbalance', 'local'."""
  items = [a.strip() for a in (arg or "tables").split(",") if a.strip()]
  name, extra = (items[0], items[1:]) if items else ("tables", [])
  if name == "tables":
    runs = [f"backbone={b},strategy=TL" for b in PAPER_BACKBONES]
    runs += [f"backbone={STRATEGY_BACKBONE},strategy={s}" for s in PAPER_STRATEGIES
             if s != "TL"]
  elif name == "grid":
    runs = [f"backbone={b},strategy={s}" for b in PAPER_BACKBONES
            for s in PAPER_STRATEGIES]
  elif name == "imbalance":
    from comtriplet_jax.evaluation import imbalance_study  # pylint: disable=g-import-not-at-top
    runs = [f"counts={c}" for c in imbalance_study.ham10000_counts()]
  elif name == "local":
    runs = [f"runlocal,strategy={s}" for s in LOCAL_STRATEGIES]
  else:
    raise ValueError(f"unknown sweep {name!r}; choose tables, grid, imbalance or local")
  return [",".join([r] + extra) if extra else r for r in runs]
