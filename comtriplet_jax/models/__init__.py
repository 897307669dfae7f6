"""Backbones chosen by name, with the input normalisation each one expects.

Every backbone is a Flax Linen module called as

  pooled, features = module.apply(variables, images, train=train,
                                  mutable=['batch_stats'] if train else False)

with images float [B, H, W, 3] already normalised per `PREPROCESSING[name]`; `pooled` is
the float32 [B, F] global average of the last feature map (Keras `pooling='avg'`) and
`features` maps the names in `FEATURES[name]` to [B, h, w, c] maps in the compute dtype.
Variables are 'params' and 'batch_stats' only, with one entry per Keras layer that
holds weights, keyed by its Keras Applications layer name (see `common`).

The tiny variants run the same code with few layers and narrow widths for tests at
32x32. They expose the same feature keys as their full-size counterparts, also where
Keras' key encodes the depth ('conv5_block3_out', 'block6f_add'): there the key names
the role the tensor plays in the full model, since no Keras model of that size exists.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from comtriplet_jax.models import common
from comtriplet_jax.models import densenet
from comtriplet_jax.models import efficientnet
from comtriplet_jax.models import resnet
from comtriplet_jax.models import vgg

_RESNET50_FEATURES = (
    "conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out")
_B3_STAGE_FEATURES = efficientnet.EfficientNet(
    width_coefficient=1.2, depth_coefficient=1.4).stage_output_names()

_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "vgg16": (vgg.VGG, dict(convs_per_block=(2, 2, 3, 3, 3),
                            block_filters=(64, 128, 256, 512, 512))),
    "resnet50": (resnet.ResNet, dict(stage_sizes=(3, 4, 6, 3),
                                     stage_filters=(64, 128, 256, 512))),
    "densenet121": (densenet.DenseNet, dict(blocks=(6, 12, 24, 16))),
    "densenet169": (densenet.DenseNet, dict(blocks=(6, 12, 32, 32))),
    "efficientnetb3": (efficientnet.EfficientNet,
                       dict(width_coefficient=1.2, depth_coefficient=1.4)),
    "tiny_vgg": (vgg.VGG, dict(convs_per_block=(1, 1, 1, 1, 1),
                               block_filters=(4, 8, 8, 16, 16))),
    "tiny_resnet": (resnet.ResNet, dict(stage_sizes=(1, 1, 1, 1),
                                        stage_filters=(4, 4, 8, 8), stem_filters=8,
                                        feature_names=_RESNET50_FEATURES)),
    # Small enough for a few-minute CPU run (configs' runlocal), wide enough to learn.
    "small_resnet": (resnet.ResNet, dict(stage_sizes=(1, 1, 1, 1),
                                         stage_filters=(16, 32, 64, 128),
                                         stem_filters=32,
                                         feature_names=_RESNET50_FEATURES)),
    "tiny_densenet": (densenet.DenseNet, dict(blocks=(1, 2, 2, 1), growth_rate=4,
                                              stem_filters=8)),
    # Depth 0.3 keeps one repeat per stage except stage 6 (two), so stochastic depth
    # on an identity skip is still exercised.
    "tiny_efficientnet": (efficientnet.EfficientNet,
                          dict(width_coefficient=0.125, depth_coefficient=0.3,
                               depth_divisor=4, top_filters=256,
                               stage_feature_names=_B3_STAGE_FEATURES)),
}

BACKBONES: tuple[str, ...] = tuple(_REGISTRY)

# The input normalisation of Keras Applications for each backbone, applied by the data
# pipeline to RGB pixels in [0, 255]:
#   'imagenet_caffe': RGB -> BGR, minus the ImageNet BGR mean (103.939, 116.779,
#       123.68), no scaling (keras.applications.vgg16/resnet50.preprocess_input);
#   'imagenet_torch': x / 255, minus the mean (0.485, 0.456, 0.406), divided by the
#       std (0.229, 0.224, 0.225) per RGB channel (densenet.preprocess_input);
#   'raw': pixels unchanged in [0, 255]; EfficientNet normalises inside the model.
PREPROCESSING: dict[str, str] = {
    "vgg16": "imagenet_caffe",
    "resnet50": "imagenet_caffe",
    "densenet121": "imagenet_torch",
    "densenet169": "imagenet_torch",
    "efficientnetb3": "raw",
    "tiny_vgg": "imagenet_caffe",
    "tiny_resnet": "imagenet_caffe",
    "small_resnet": "imagenet_caffe",
    "tiny_densenet": "imagenet_torch",
    "tiny_efficientnet": "raw",
}

_VGG_FEATURES = tuple(f"block{b}_pool" for b in range(1, 6))
_DENSENET_FEATURES = ("pool2_relu", "pool3_relu", "pool4_relu", "relu")
_EFFICIENTNET_FEATURES = ("stem_activation", *_B3_STAGE_FEATURES, "top_activation")

# The keys of each backbone's `features`, from the shallowest to the deepest map (jit
# and eval_shape return dicts with sorted keys, so do not rely on the dict's order).
FEATURES: dict[str, tuple[str, ...]] = {
    "vgg16": _VGG_FEATURES,
    "resnet50": _RESNET50_FEATURES,
    "densenet121": _DENSENET_FEATURES,
    "densenet169": _DENSENET_FEATURES,
    "efficientnetb3": _EFFICIENTNET_FEATURES,
    "tiny_vgg": _VGG_FEATURES,
    "tiny_resnet": _RESNET50_FEATURES,
    "small_resnet": _RESNET50_FEATURES,
    "tiny_densenet": _DENSENET_FEATURES,
    "tiny_efficientnet": _EFFICIENTNET_FEATURES,
}


def get_backbone(name: str, *, dtype: common.Dtype = jnp.float32,
                 axis_name: str | None = None, **overrides: Any) -> nn.Module:
  """Builds the backbone `name`.

  Args:
    name: one of `BACKBONES`.
    dtype: compute dtype (bfloat16 on GPU); parameters stay float32 and the pooled
      output is float32.
    axis_name: mapped axis name over which BatchNorm averages batch statistics (the
      data-parallel 'data' axis under pmap/shard_map), or None.
    **overrides: fields of the module that replace the registered architecture,
      e.g. `drop_connect_rate=0.0` or `imagenet_rescaling=True` for EfficientNet.

  Returns:
    The unbound Flax module.

  Raises:
    ValueError: for an unknown name, an unknown override or a non-float dtype.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise ValueError(f"dtype must be a float type, got {dtype}")
  cls, architecture = _REGISTRY[name]
  allowed = {f.name for f in dataclasses.fields(cls)} - {"parent", "dtype", "axis_name"}
  unknown = sorted(set(overrides) - allowed)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {unknown} for backbone {name!r}; "
                     f"allowed: {sorted(allowed)}")
  return cls(**{**architecture, **overrides}, dtype=dtype, axis_name=axis_name)
