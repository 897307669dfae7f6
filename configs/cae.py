"""The convolutional auto-encoder baseline (CAE, Tables VI and VIII).

Arguments after the colon, comma separated (all optional)::

  dataset=ham10000|ph2|isic2017|isic2019|isic2020
  task=melanoma_vs_nevus|malignant_vs_benign|melanoma_vs_rest|sk_vs_rest
  size=256            image size (the paper: 256); divisible by 2**len(filters)
  noise=0.1           std of the Gaussian noise on x/255 images
  crop=0.8            smallest random-crop side fraction (1 = no cropping)
  code=128            length of the encoder's feature vector
  distance=cosine|euclidean   prototype distance (Eq. 14; cosine as in UDC)
  counts=4500:75      subsample training to majority:minority
  runlocal            a few-minute run on a 2-core CPU (64 px, narrow model)

The optimiser settings are the paper's for every trained model (Adam 1e-5, batch
15, 15 epochs); ``config.backbone`` is not used by the CAE.

Example::

  python -m comtriplet_jax.main --config=configs/cae.py:runlocal --workdir=/tmp/cae
"""

from comtriplet_jax import configlib
from comtriplet_jax.methods import cae


def get_config(arg=None):
  args = configlib.parse_arg(arg, dict(
      dataset="ham10000", task="melanoma_vs_nevus", size=256, noise=0.1, crop=0.8,
      code=128, distance="cosine", counts="", runlocal=False))
  config = configlib.base_config()
  config.method = "cae"
  config.dataset = args["dataset"]
  config.task = args["task"]
  config.image_size = args["size"]
  config.train_class_counts = args["counts"]
  config.normalization = "unit"
  config.augment = False
  config.selection_metric = "auc"
  config.cae = cae.default_settings()
  # Five stride-2 layers at 256 px keep the flattened map (8 x 8 x 256) small.
  config.cae.filters = (32, 64, 128, 256, 256)
  config.cae.noise_std = args["noise"]
  config.cae.crop_min = args["crop"]
  config.cae.code_size = args["code"]
  config.cae.distance = args["distance"]

  if args["runlocal"]:
    # Sized for a few minutes on a 2-core CPU.
    if "size=" not in (arg or ""):
      config.image_size = 64
    config.cae.filters = (16, 32, 64, 128)
    if "code=" not in (arg or ""):
      config.cae.code_size = 64
    config.cae.buffer_size = 512
    config.batch_size = 32
    config.eval_batch_size = 128
    config.learning_rate = 1e-3
    config.num_train_steps = 300
    config.eval_every_steps = 100
    config.log_every_steps = 50
  return config
