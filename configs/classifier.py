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
"""

from comtriplet_jax import configlib


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
    # Sized for a few minutes on a 2-core CPU: a small ResNet at 64 px.
    if "backbone=" not in (arg or ""):
      config.backbone = "small_resnet"
    if "size=" not in (arg or ""):
      config.image_size = 64
    config.batch_size = 32
    config.eval_batch_size = 128
    config.learning_rate = 1e-3
    config.num_train_steps = 900
    config.eval_every_steps = 300
    config.log_every_steps = 50
  return config
