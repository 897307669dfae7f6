"""Shallow unsupervised baselines on backbone embeddings (Tables VI, VIII).

Run with the baselines' own entry point (not ``comtriplet_jax.main``)::

  python -m comtriplet_jax.baselines.shallow --config=configs/shallow.py:runlocal \
      --workdir=/tmp/shallow

Arguments after the colon, comma separated (all optional)::

  dataset=ham10000|ph2|isic2017|isic2019|isic2020
  task=melanoma_vs_nevus|malignant_vs_benign|melanoma_vs_rest|sk_vs_rest
  backbone=vgg16|resnet50|densenet121|densenet169|efficientnetb3|small_resnet|...
  size=256            image size (the paper: 256)
  strategy=NP|TL      NP: randomly initialised backbone, TL: ImageNet weights
  init_from=PATH      an orbax backbone checkpoint (overrides strategy's weights)
  checkpoint=PATH     a training run (workdir or checkpoint) whose 'backbone'
                      parameters embed the images, e.g. a UDC run's
  methods=gmm+kmeans+kernel_pca+fast_ica+lle+dictionary_learning   (a subset)
  distance=cosine|euclidean   prototype distance of GMM and K-Means (Eq. 14)
  standardize         z-score the features with training statistics first
  counts=4500:75      subsample training to majority:minority
  runlocal            a few-minute run on a 2-core CPU (small_resnet, 64 px)
"""

from comtriplet_jax import configlib
from comtriplet_jax.baselines import shallow


def get_config(arg=None):
  args = configlib.parse_arg(arg, dict(
      dataset="ham10000", task="melanoma_vs_nevus", backbone="vgg16", size=256,
      strategy="NP", init_from="", checkpoint="", methods="+".join(shallow.BASELINES),
      distance="cosine", standardize=False, counts="", runlocal=False))
  config = configlib.base_config()
  config.method = "shallow"
  config.dataset = args["dataset"]
  config.task = args["task"]
  config.backbone = args["backbone"]
  config.image_size = args["size"]
  config.train_class_counts = args["counts"]
  strategy = configlib.parse_strategy(args["strategy"])
  if strategy["augment"] or strategy["loss_weighting"] != "none":
    raise ValueError(f"strategy={args['strategy']!r}: the shallow baselines train no "
                     "network, so only NP or TL apply")
  config.init_from = args["init_from"] or strategy["init_from"]
  config.eval_batch_size = 64
  config.shallow = shallow.default_settings()
  config.shallow.methods = args["methods"]
  config.shallow.distance = args["distance"]
  config.shallow.checkpoint = args["checkpoint"]
  config.shallow.standardize = args["standardize"]
  shallow.validate_settings(config.shallow)

  if args["runlocal"]:
    # A few minutes on a 2-core CPU: a small ResNet at 64 px.
    if "backbone=" not in (arg or ""):
      config.backbone = "small_resnet"
    if "size=" not in (arg or ""):
      config.image_size = 64
    config.eval_batch_size = 128
  return config
