"""Unsupervised deep clustering, UDC (COM-Triplet paper, Tables IV-VI, VIII).

Arguments after the colon, comma separated (all optional)::

  dataset=ham10000|ph2|isic2017|isic2019|isic2020
  task=melanoma_vs_nevus|malignant_vs_benign|melanoma_vs_rest|sk_vs_rest
  backbone=vgg16|resnet50|densenet121|densenet169|efficientnetb3|small_resnet|...
  size=256            image size (the paper: 256)
  margin=adaptive|0.2|0.6|...   adaptive margin of Eq. 12 or a fixed one
  loss=com_triplet|triplet      triplet = UDC_Triplet (margin 0.2 unless given)
  strategy=NP|TL|DA|TL+DA       (LW needs labels and is refused)
  covariance=diag|full          GMM covariance type (see methods/udc.py)
  counts=834:14       subsample training to majority:minority
  steps=0             > 0: number of training steps (overrides epochs)
  seed=0              training seed
  runlocal            a few-minute run on a 2-core CPU

Each step uses 3M images, M = config.batch_size (the paper: 15, so 45 images).

Example::

  python -m comtriplet_jax.main --config=configs/udc.py:runlocal --workdir=/tmp/udc

Sweeps (``get_sweep``): 'tables' (the rows of Tables IV-VI: backbones, margins,
strategies one at a time, and UDC_Triplet) or 'grid' (backbones x margins x
strategies); further comma-separated items are appended to every run.
"""

import ml_collections

from comtriplet_jax import configlib

PAPER_BACKBONES = ("vgg16", "resnet50", "densenet169", "efficientnetb3")
PAPER_MARGINS = ("adaptive", "0.2", "0.6")
PAPER_STRATEGIES = ("NP", "TL", "TL+DA")


def get_config(arg=None):
  args = configlib.parse_arg(arg, dict(
      dataset="ham10000", task="melanoma_vs_nevus", backbone="vgg16", size=256,
      margin="", loss="com_triplet", strategy="NP", covariance="diag", counts="",
      steps=0, seed=0, runlocal=False))
  config = configlib.base_config()
  config.method = "udc"
  config.dataset = args["dataset"]
  config.task = args["task"]
  config.backbone = args["backbone"]
  config.image_size = args["size"]
  config.train_class_counts = args["counts"]
  config.seed = args["seed"]
  strategy = configlib.parse_strategy(args["strategy"])
  if strategy["loss_weighting"] != "none":
    raise ValueError(f"strategy {args['strategy']!r}: LW (loss weighting) needs labels; "
                     "UDC takes NP, TL, DA")
  config.update(strategy)
  margin = args["margin"] or ("0.2" if args["loss"] == "triplet" else "adaptive")

  config.udc = ml_collections.ConfigDict(dict(
      embedding_size=128,       # S (see methods/sdc.py)
      dropout_rate=0.3,
      loss=args["loss"],
      margin=margin,
      margin_gradient=True,     # unused by the centre losses (centres are constants)
      covariance_type=args["covariance"],
      gmm_tol=1e-3,             # the paper's convergence threshold
      gmm_reg_covar=1e-6,       # the paper's covariance regularisation
      gmm_max_iter=100,
      gmm_features="raw",       # the paper fits the raw embeddings; or 'unit'
      assignment="gmm",         # Eq. 11 pseudo-labels; or 'nearest' centre
      centre_update="monotone",  # Eq. 7
      feature_selection="range,mean_difference",  # reported rules, or 'none'
      feature_selection_scale=1.0,
      embedding_plot=True,
  ))

  if args["runlocal"]:
    # About two minutes on a 2-core CPU: small ResNet at 64 px, 3M = 48
    # images/step, 600 steps (the loss is about 0 from step 300 on), cosine
    # learning-rate schedule with warm-up (as SDC's runlocal).
    # The GMM is fitted to the unit embeddings (a departure, in results.json):
    # on the raw ones of this from-scratch network the fit settles on a small
    # component of about 3% of each batch that the loss then confirms, and the
    # test AUC is chance (0.50, seed 0); on unit vectors it is 0.72 after 600
    # steps (see README, 'CPU recipes').
    config.udc.gmm_features = "unit"
    if "backbone=" not in (arg or ""):
      config.backbone = "small_resnet"
    if "size=" not in (arg or ""):
      config.image_size = 64
    config.batch_size = 16
    config.eval_batch_size = 128
    config.learning_rate = 1e-3
    config.lr_schedule = "cosine"
    config.warmup_steps = 50
    config.num_train_steps = 600
    config.eval_every_steps = 200
    config.log_every_steps = 100
  if args["steps"] > 0:
    config.num_train_steps = args["steps"]
    config.eval_every_steps = max(1, args["steps"] // 3)
  return config


def get_sweep(arg=None):
  """Config-argument strings of a sweep: 'tables' (default) or 'grid'."""
  items = [a.strip() for a in (arg or "tables").split(",") if a.strip()]
  name, extra = (items[0], items[1:]) if items else ("tables", [])
  if name == "tables":
    runs = [f"backbone={b},strategy=TL" for b in PAPER_BACKBONES]
    runs += [f"backbone=vgg16,strategy=TL,margin={m}" for m in PAPER_MARGINS[1:]]
    runs += [f"backbone=vgg16,strategy={s}" for s in ("NP", "TL+DA")]
    runs += ["backbone=vgg16,strategy=TL,loss=triplet,margin=0.2"]
  elif name == "grid":
    runs = [f"backbone={b},margin={m},strategy={s}" for b in PAPER_BACKBONES
            for m in PAPER_MARGINS for s in PAPER_STRATEGIES]
  else:
    raise ValueError(f"unknown sweep {name!r}; choose tables or grid")
  return [",".join([r] + extra) if extra else r for r in runs]
