"""ImageNet weights for the backbones, imported from Keras Applications (issue 6).

The backbones of `comtriplet_jax.models` mirror Keras Applications layer by layer and
key their variables by Keras layer name, so a Keras model converts by walking its
layers:

  Keras layer            Flax 'params'                   Flax 'batch_stats'
  Conv2D                 {kernel [kh,kw,in,out], bias?}  -
  DepthwiseConv2D        {kernel [kh,kw,1,C]} from       -
                         Keras' [kh,kw,C,1]
  BatchNormalization     {scale: gamma, bias: beta}      {mean, var} (moving stats)
  Normalization (EffNet) -                               normalization/{mean,
                                                         variance, count}

Weights come either from Keras' own download (``keras.applications.X(
weights='imagenet')``, needs a network once; Keras caches the file in
``~/.keras/models``) or from a Keras ``.h5`` file on disk: the legacy HDF5 format of
Keras' published ImageNet files (``*_notop.h5``, with or without the top) or a Keras 3
``.weights.h5``. Keras reads the file into a freshly built model (HDF5 via h5py; no
pickle anywhere), and the converter then reads that model by layer name and checks
every name and shape against the Flax backbone, raising a ValueError that names the
architecture when they do not match.

EfficientNet's input normalisation. Keras' ImageNet file stores the ImageNet standard
deviation, not its square, as the Normalization layer's variance, and Keras
compensates with an extra ``Rescaling(1 / sqrt(std))`` that it inserts only when
built with ``weights='imagenet'`` (keras-team, tensorflow#49930). The converter folds
that factor into the variance it writes (variance * std, since
(x - m) / sqrt(v) / sqrt(s) = (x - m) / sqrt(v * s)), so the Flax EfficientNet needs
no flag at load time: leave its ``imagenet_rescaling`` False with converted weights.

The result is an orbax ``StandardCheckpointer`` directory holding ``{'params',
'batch_stats'}`` of the bare backbone, the format `weights.load_backbone_variables`
reads; ``config.init_from='imagenet'`` looks for it in
``$COMTRIPLET_WEIGHTS_DIR/<backbone>`` (default ``~/.cache/comtriplet_jax/weights``).
Fetch and convert once with

  python -m comtriplet_jax.models.keras_import --backbone=densenet121 \\
      [--weights_file=PATH] [--out=DIR]

Input preprocessing is not part of the weights: the backbone expects images
normalised as `models.PREPROCESSING[backbone]` says (Keras' ``preprocess_input``),
i.e. ``config.normalization='backbone'``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import warnings
from typing import Any, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from comtriplet_jax import models
from comtriplet_jax.models import efficientnet

PyTree = Any

# The backbones with a Keras Applications counterpart, and its constructor's name.
KERAS_ARCHITECTURES: dict[str, str] = {
    "vgg16": "VGG16",
    "resnet50": "ResNet50",
    "densenet121": "DenseNet121",
    "densenet169": "DenseNet169",
    "efficientnetb3": "EfficientNetB3",
}

# Layers of Keras' classification tops (include_top=True); they have no Flax
# counterpart and are dropped, so files with the top convert too.
_TOP_LAYERS = frozenset({"fc1", "fc2", "predictions"})

# Where `weights.load_backbone_variables('imagenet', backbone)` looks; keep in step.
WEIGHTS_DIR_ENV = "COMTRIPLET_WEIGHTS_DIR"
DEFAULT_WEIGHTS_ROOT = "~/.cache/comtriplet_jax/weights"

# Keras' ImageNet EfficientNet file stores these (the std) as the variance; a file
# whose variance matches them needs the 1/sqrt(std) rescaling (module docstring).
_IMAGENET_SIGNATURE_RTOL = 1e-3


def default_weights_dir(backbone: str) -> pathlib.Path:
  """``$COMTRIPLET_WEIGHTS_DIR/<backbone>``, default ``~/.cache/comtriplet_jax/weights``."""
  root = os.environ.get(WEIGHTS_DIR_ENV, DEFAULT_WEIGHTS_ROOT)
  return pathlib.Path(root).expanduser() / backbone


def _architecture(backbone: str) -> str:
  if backbone not in KERAS_ARCHITECTURES:
    raise ValueError(
        f"backbone {backbone!r} has no Keras Applications counterpart; ImageNet "
        f"weights exist for {', '.join(KERAS_ARCHITECTURES)}")
  return KERAS_ARCHITECTURES[backbone]


def _keras():
  # Imported on first use so that `import comtriplet_jax.models.keras_import` (and
  # the training loop) never pays for TensorFlow.
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  import keras  # pylint: disable=g-import-not-at-top
  return keras


def build_keras_model(backbone: str, *, weights: str | None = None,
                      include_top: bool = False,
                      input_shape: tuple[int | None, int | None, int] | None = None,
                      pooling: str | None = "avg") -> Any:
  """The Keras Applications model of `backbone` (``keras.applications.X``).

  Args:
    backbone: one of `KERAS_ARCHITECTURES`.
    weights: None (Keras' random initialisation), 'imagenet' (Keras downloads the
      file once into ``~/.keras/models``) or a path Keras loads.
    include_top: with Keras' 1000-class top.
    input_shape: (H, W, 3); None for any size. EfficientNet's stride-2 padding
      depends on the static size (odd sizes pad symmetrically), so give it when
      the model must match the Flax backbone at an odd size.
    pooling: Keras' `pooling` ('avg' gives the Flax backbone's pooled output).

  Returns:
    The `keras.Model`.
  """
  constructor = getattr(_keras().applications, _architecture(backbone))
  if input_shape is None and not include_top:
    input_shape = (None, None, 3)
  return constructor(weights=weights, include_top=include_top,
                     input_shape=input_shape, pooling=None if include_top else pooling)


def _normalization_layer(keras_model: Any) -> Any | None:
  found = [layer for layer in keras_model.layers
           if type(layer).__name__ == "Normalization"]
  if len(found) > 1:
    raise ValueError(f"Keras model {keras_model.name!r} has {len(found)} "
                     "Normalization layers; EfficientNet has one")
  return found[0] if found else None


def has_imagenet_normalization_signature(keras_model: Any) -> bool:
  """True when the model's Normalization variance is the ImageNet std.

  That is what Keras' published EfficientNet ImageNet weights hold (the std where a
  variance belongs); a model normalised with a genuine variance does not match.
  """
  layer = _normalization_layer(keras_model)
  if layer is None:
    return False
  variance = np.asarray(_layer_values(layer)["variance"], np.float64).reshape(-1)
  return variance.shape == (3,) and np.allclose(
      variance, efficientnet.IMAGENET_STDDEV_RGB, rtol=_IMAGENET_SIGNATURE_RTOL,
      atol=0.0)


def apply_imagenet_rescaling(keras_model: Any) -> None:
  """Folds Keras' ImageNet-only ``Rescaling(1/sqrt(std))`` into the variance, in place.

  After this, the model computes what ``keras.applications.EfficientNetB3(
  weights='imagenet')`` computes with the same weights, without that layer.
  """
  layer = _normalization_layer(keras_model)
  if layer is None:
    raise ValueError(f"Keras model {keras_model.name!r} has no Normalization layer "
                     "to apply the ImageNet rescaling to (only EfficientNet has one)")
  values = _layer_values(layer)
  variance = values["variance"] * np.asarray(efficientnet.IMAGENET_STDDEV_RGB,
                                             values["variance"].dtype)
  layer.set_weights([values["mean"], variance, values["count"]])
  # Keras' Normalization divides by copies of its statistics made when it is built
  # or adapted; set_weights alone leaves the call unchanged.
  layer.finalize_state()


def _load_weights_strictly(keras_model: Any, path: pathlib.Path) -> None:
  """`keras_model.load_weights`, failing where Keras would only warn.

  Keras 3 skips parts of a ``.weights.h5`` file it cannot place with a warning and
  leaves those layers at their random initialisation; a conversion must not.
  """
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    keras_model.load_weights(str(path))
  skipped = [str(w.message) for w in caught
             if "freshly-initialized" in str(w.message) or "Skipping" in str(w.message)]
  for w in caught:
    if str(w.message) not in skipped:
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  if skipped:
    raise ValueError(f"Keras left {len(skipped)} parts of the model unloaded, e.g. "
                     f"{skipped[0]}")


def load_keras_model(backbone: str, source: str = "imagenet", *,
                     imagenet_rescaling: bool | None = None) -> Any:
  """Keras' model of `backbone` holding the weights of `source`.

  Args:
    backbone: one of `KERAS_ARCHITECTURES`.
    source: 'imagenet' (Keras' download) or the path of a Keras ``.h5`` (legacy
      HDF5, as Keras publishes its ImageNet weights, with or without the top) or
      ``.weights.h5`` (Keras 3) file of the same architecture.
    imagenet_rescaling: EfficientNet from a file only: fold in the rescaling Keras
      applies to its ImageNet weights (`apply_imagenet_rescaling`). None decides by
      the weights: True when the Normalization variance is the ImageNet std (Keras'
      published file), else False. Keras' download carries its own Rescaling layer.

  Returns:
    The `keras.Model` (input size free, pooling='avg', no top).

  Raises:
    FileNotFoundError: `source` is neither 'imagenet' nor an existing file.
    ValueError: the file does not hold weights of `backbone`'s architecture.
  """
  architecture = _architecture(backbone)
  if source == "imagenet":
    if imagenet_rescaling is not None:
      raise ValueError("imagenet_rescaling applies to a weights file; Keras' "
                       "download already brings its own rescaling")
    return build_keras_model(backbone, weights="imagenet")
  path = pathlib.Path(source).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"Keras {architecture} weights file {path} does not exist")
  if not path.name.endswith((".h5", ".hdf5")):
    raise ValueError(f"{path} is not a Keras HDF5 weights file (.h5, .weights.h5) "
                     f"for {architecture}")
  keras_model = build_keras_model(backbone)
  try:
    _load_weights_strictly(keras_model, path)
  except ValueError as without_top:
    if path.name.endswith(".weights.h5"):
      raise ValueError(f"{path} does not hold Keras {architecture} weights (no top): "
                       f"{_short(without_top)}") from without_top
    # A legacy file is read layer by layer in order; one with the classification
    # top has more layers than the model without it.
    keras_model = build_keras_model(backbone, include_top=True)
    try:
      _load_weights_strictly(keras_model, path)
    except ValueError as with_top:
      raise ValueError(
          f"{path} does not hold Keras {architecture} weights: without the top: "
          f"{_short(without_top)}; with the top: {_short(with_top)}") from with_top
    # Keep the features and drop the top, as the Flax backbone has none.
    keras = _keras()
    last = keras_model.get_layer(
        "block5_pool" if backbone == "vgg16" else
        "top_activation" if backbone == "efficientnetb3" else
        "relu" if backbone.startswith("densenet") else "conv5_block3_out")
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(last.output)
    keras_model = keras.Model(keras_model.inputs, pooled, name=keras_model.name)
  if backbone == "efficientnetb3":
    if imagenet_rescaling is None:
      imagenet_rescaling = has_imagenet_normalization_signature(keras_model)
      logging.info("%s: normalisation variance %s the ImageNet std, so the ImageNet "
                   "rescaling is %sapplied", path,
                   "matches" if imagenet_rescaling else "does not match",
                   "" if imagenet_rescaling else "not ")
    if imagenet_rescaling:
      apply_imagenet_rescaling(keras_model)
  elif imagenet_rescaling:
    raise ValueError(f"imagenet_rescaling applies to EfficientNet only, not {backbone!r}")
  return keras_model


def _short(error: Exception, limit: int = 400) -> str:
  # Keras' load errors can print whole tensors; the head names the problem.
  text = str(error)
  return text if len(text) <= limit else text[:limit] + " ..."


def _layer_values(layer: Any) -> dict[str, np.ndarray]:
  """A Keras layer's variables by their short names ('kernel', 'gamma', ...)."""
  values = {}
  for variable in layer.weights:
    name = variable.name.split("/")[-1].split(":")[0]
    values[name] = np.asarray(variable.numpy())
  return values


def _input_rescaling(keras_model: Any) -> np.ndarray:
  """The product of the Rescaling layers after the Normalization (EfficientNet).

  Keras' EfficientNet has Rescaling(1/255) before its Normalization, which the Flax
  model hard-codes, and with ImageNet weights a per-channel Rescaling after it,
  which the converter folds into the variance.
  """
  scale = np.ones((3,), np.float64)
  seen_normalization = False
  for layer in keras_model.layers:
    kind = type(layer).__name__
    if kind == "Normalization":
      seen_normalization = True
    elif kind == "Rescaling":
      layer_scale = np.broadcast_to(np.asarray(layer.scale, np.float64), (3,))
      if np.any(np.asarray(layer.offset) != 0):
        raise ValueError(f"Keras layer {layer.name!r} rescales with an offset "
                         f"({layer.offset}); EfficientNet's do not")
      if seen_normalization:
        scale = scale * layer_scale
      elif not np.allclose(layer_scale, 1.0 / 255.0):
        raise ValueError(f"Keras layer {layer.name!r} scales the input by "
                         f"{layer.scale}; the Flax EfficientNet divides by 255")
    elif layer.weights:
      break
  return scale


def convert_keras_model(keras_model: Any, backbone: str) -> dict[str, PyTree]:
  """Flax ``{'params', 'batch_stats'}`` of `backbone` from a built Keras model.

  The Flax backbone with these variables (inference mode) computes what
  `keras_model` computes, including any input rescaling after EfficientNet's
  Normalization, which is folded into its variance.

  Args:
    keras_model: a Keras Applications model of `backbone`'s architecture, with or
      without the top (top layers are dropped).
    backbone: one of `KERAS_ARCHITECTURES`.

  Returns:
    Nested dicts of float32 numpy arrays keyed as the Flax backbone's variables.

  Raises:
    ValueError: a layer the converter does not know, or variables whose names or
      shapes do not fit the Flax backbone; the message names the architecture.
  """
  architecture = _architecture(backbone)
  params: dict[str, dict[str, np.ndarray]] = {}
  batch_stats: dict[str, dict[str, np.ndarray]] = {}
  for layer in keras_model.layers:
    if not layer.weights or layer.name in _TOP_LAYERS:
      continue
    kind = type(layer).__name__
    values = _layer_values(layer)
    try:
      if kind == "Conv2D":
        params[layer.name] = {"kernel": values["kernel"]}
        if "bias" in values:
          params[layer.name]["bias"] = values["bias"]
      elif kind == "DepthwiseConv2D":
        kernel = values["kernel"]
        if kernel.ndim != 4 or kernel.shape[-1] != 1:
          raise ValueError(f"Keras {architecture} layer {layer.name!r}: depthwise "
                           f"kernel {kernel.shape} has a depth multiplier other than 1")
        # Keras [kh, kw, C, 1] -> Flax grouped convolution [kh, kw, 1, C].
        params[layer.name] = {"kernel": np.transpose(kernel, (0, 1, 3, 2))}
        if "bias" in values:
          params[layer.name]["bias"] = values["bias"]
      elif kind == "BatchNormalization":
        params[layer.name] = {"scale": values["gamma"], "bias": values["beta"]}
        batch_stats[layer.name] = {"mean": values["moving_mean"],
                                   "var": values["moving_variance"]}
      elif kind == "Normalization":
        scale = _input_rescaling(keras_model)
        # (x - m) / sqrt(v) * s == (x - m) / sqrt(v / s^2): no flag in Flax.
        variance = values["variance"].astype(np.float64) / scale**2
        batch_stats["normalization"] = {
            "mean": values["mean"], "variance": variance,
            "count": np.asarray(values["count"], np.float32)}
      else:
        raise ValueError(f"Keras {architecture} layer {layer.name!r} of type {kind} "
                         "holds weights the converter does not know")
    except KeyError as missing:
      raise ValueError(f"Keras {architecture} layer {layer.name!r} ({kind}) lacks "
                       f"the variable {missing}; it has {sorted(values)}") from None
  variables = jax.tree.map(lambda v: np.asarray(v, np.float32),
                           {"params": params, "batch_stats": batch_stats})
  check_fits_backbone(variables, backbone)
  return variables


def flax_variable_shapes(backbone: str) -> dict[str, PyTree]:
  """``{'params', 'batch_stats'}`` of the Flax backbone as ShapeDtypeStructs."""
  module = models.get_backbone(backbone)
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                          train=False))
  return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}


def check_fits_backbone(variables: dict[str, PyTree], backbone: str) -> None:
  """Raises ValueError naming the architecture unless names and shapes all fit."""
  architecture = KERAS_ARCHITECTURES.get(backbone, backbone)
  expected = flax_variable_shapes(backbone)
  problems = []
  for collection in ("params", "batch_stats"):
    got = flax.traverse_util.flatten_dict(variables.get(collection, {}), sep="/")
    want = flax.traverse_util.flatten_dict(expected[collection], sep="/")
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got)
                   if tuple(np.shape(got[k])) != tuple(want[k].shape))
    if missing:
      problems.append(f"{collection}: {len(missing)} missing, e.g. {missing[:4]}")
    if unexpected:
      problems.append(f"{collection}: {len(unexpected)} unexpected, e.g. "
                      f"{unexpected[:4]}")
    if wrong:
      problems.append(
          f"{collection}: {len(wrong)} of the wrong shape (Keras vs Flax), e.g. "
          f"{[(k, tuple(np.shape(got[k])), tuple(want[k].shape)) for k in wrong[:4]]}")
  if problems:
    raise ValueError(f"Keras {architecture} weights do not fit the Flax backbone "
                     f"{backbone!r}: " + "; ".join(problems))


def convert(backbone: str, source: str = "imagenet", *,
            imagenet_rescaling: bool | None = None) -> dict[str, PyTree]:
  """Flax variables of `backbone` from Keras' ImageNet download or a weights file.

  See `load_keras_model` for `source` and `imagenet_rescaling`, and
  `convert_keras_model` for the result.
  """
  keras_model = load_keras_model(backbone, source,
                                 imagenet_rescaling=imagenet_rescaling)
  return convert_keras_model(keras_model, backbone)


def save_variables(variables: dict[str, PyTree], out: str | os.PathLike[str], *,
                   overwrite: bool = False) -> pathlib.Path:
  """Writes ``{'params', 'batch_stats'}`` as an orbax StandardCheckpointer directory.

  Raises:
    FileExistsError: `out` exists and `overwrite` is False.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(out).expanduser().absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to "
                          "replace it")
  path.parent.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {"params": variables["params"],
                           "batch_stats": variables.get("batch_stats", {})},
                    force=overwrite)
  checkpointer.wait_until_finished()
  checkpointer.close()
  return path


def max_relative_difference(keras_model: Any, variables: dict[str, PyTree],
                            backbone: str, *, image_size: int = 224,
                            batch_size: int = 2, seed: int = 0) -> float:
  """max |flax - keras| / max |keras| of the pooled features on random images.

  Both models see the same images in [0, 255] normalised per
  `models.PREPROCESSING[backbone]`; Flax runs in inference mode. A check of a
  conversion that needs neither data nor the network.
  """
  from comtriplet_jax.data import augment  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  pixels = rng.uniform(0, 255, (batch_size, image_size, image_size, 3))
  images = np.asarray(augment.normalize(jnp.asarray(pixels, jnp.float32),
                                        models.PREPROCESSING[backbone]))
  reference = np.asarray(keras_model(images, training=False), np.float64)
  pooled, _ = jax.jit(
      lambda v, x: models.get_backbone(backbone).apply(v, x, train=False)
  )(variables, images)
  scale = max(float(np.max(np.abs(reference))), 1e-30)
  return float(np.max(np.abs(np.asarray(pooled, np.float64) - reference)) / scale)


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  """The command line; returns the checkpoint directory written."""
  parser = argparse.ArgumentParser(
      prog="python -m comtriplet_jax.models.keras_import",
      description="Convert Keras Applications ImageNet weights into the orbax "
                  "checkpoint that config.init_from='imagenet' loads.")
  parser.add_argument("--backbone", required=True, choices=sorted(KERAS_ARCHITECTURES))
  parser.add_argument("--weights_file", default="",
                      help="a Keras .h5/.weights.h5 file; empty: Keras' download")
  parser.add_argument("--out", default="",
                      help=f"checkpoint directory; empty: ${WEIGHTS_DIR_ENV}/<backbone>"
                           f" or {DEFAULT_WEIGHTS_ROOT}/<backbone>")
  parser.add_argument("--imagenet_rescaling", default="auto",
                      choices=("auto", "true", "false"),
                      help="EfficientNet from a file: fold in Keras' ImageNet-only "
                           "rescaling (auto: when the file looks like Keras' own)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing checkpoint directory")
  parser.add_argument("--verify_size", type=int, default=224,
                      help="compare Keras and Flax pooled features on random "
                           "images of this size after converting; 0 skips")
  args = parser.parse_args(argv)

  source = args.weights_file or "imagenet"
  rescaling = {"auto": None, "true": True, "false": False}[args.imagenet_rescaling]
  out = pathlib.Path(args.out) if args.out else default_weights_dir(args.backbone)
  if out.exists() and not args.overwrite:
    parser.error(f"{out} exists; pass --overwrite to replace it")
  keras_model = load_keras_model(args.backbone, source, imagenet_rescaling=rescaling)
  variables = convert_keras_model(keras_model, args.backbone)
  if args.verify_size:
    difference = max_relative_difference(keras_model, variables, args.backbone,
                                         image_size=args.verify_size)
    print(f"Keras vs Flax pooled features at {args.verify_size}px: max relative "
          f"difference {difference:.2e}")
    if not difference <= 1e-4:
      raise SystemExit(f"conversion check failed for {args.backbone}: relative "
                       f"difference {difference:.2e} > 1e-4; nothing written")
  path = save_variables(variables, out, overwrite=args.overwrite)
  count = sum(np.size(v) for v in jax.tree.leaves(variables["params"]))
  print(f"wrote {args.backbone} ({KERAS_ARCHITECTURES[args.backbone]}, {count:,} "
        f"parameters) from {source} to {path}")
  return path


if __name__ == "__main__":
  main()
