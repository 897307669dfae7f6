"""Keras Applications weights -> Flax backbones (issue 6), without a network.

Each Keras model is built with random weights (``weights=None``) and random
BatchNormalization statistics, saved to a file in one of the formats Keras uses,
converted, and the Flax backbone (inference mode) must give the same pooled
features and named early exits on the same random images, to 1e-4 of the largest
magnitude of each Keras tensor, at 224x224 (batch 1) and at 67x67 (batch 2; odd,
so Keras' asymmetric stride-2 padding and floor pooling are exercised).
EfficientNet's ImageNet-only rescaling is served through Keras' own ``weights=
'imagenet'`` code path with its download redirected to a local file. Then a
fine-tune starts from a converted checkpoint through the real training loop.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

keras = pytest.importorskip("keras")

from comtriplet_jax import configlib  # noqa: E402
from comtriplet_jax import models  # noqa: E402
from comtriplet_jax import train  # noqa: E402
from comtriplet_jax.data import augment  # noqa: E402
from comtriplet_jax.models import efficientnet  # noqa: E402
from comtriplet_jax.models import keras_import  # noqa: E402
from comtriplet_jax.models import weights  # noqa: E402


SMALL = 67
RTOL = 1e-4
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

# The file format each backbone is saved in, so that all three that Keras reads are
# covered: 'legacy' is the HDF5 layout of Keras' published ImageNet files,
# 'legacy_top' the same with the 1000-class top, 'keras3' `save_weights`.
FORMATS = {
    "vgg16": "legacy",
    "resnet50": "keras3",
    "densenet121": "legacy_top",
    "densenet169": "keras3",
    "efficientnetb3": "legacy",
}

PREPROCESS_MODULES = {
    "vgg16": keras.applications.vgg16,
    "resnet50": keras.applications.resnet50,
    "densenet121": keras.applications.densenet,
    "densenet169": keras.applications.densenet,
    "efficientnetb3": keras.applications.efficientnet,
}


def keras_application(backbone: str, **kwargs):
  return getattr(keras.applications, keras_import.KERAS_ARCHITECTURES[backbone])(
      weights=kwargs.pop("weights", None), **kwargs)


def randomise(model, rng: np.random.Generator, *,
              normalization: tuple[np.ndarray, np.ndarray] | None = None) -> None:
  """Random biases, BatchNorm affine and moving statistics, Normalization stats.

  Kernels keep Keras' initialisation, which keeps activations finite in depth.
  """
  for layer in model.layers:
    kind = type(layer).__name__
    if kind == "BatchNormalization":
      gamma, beta, mean, var = layer.get_weights()
      layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                         rng.normal(0, 0.5, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    elif kind in ("Conv2D", "Dense") and layer.use_bias:
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
    elif kind == "Normalization":
      mean, variance = normalization or (rng.uniform(0.3, 0.6, 3),
                                         rng.uniform(0.03, 0.09, 3))
      layer.set_weights([mean, variance, np.asarray(1000)])
      # The layer divides by copies made at build time; refresh them.
      layer.finalize_state()


def copy_weights(source, target) -> None:
  """Copies weights layer by layer by name (the models' layers match)."""
  for layer in target.layers:
    if type(layer).__name__ == "Normalization":
      # Keras numbers auto-named layers per process: 'normalization_3' and so on.
      layer.set_weights(keras_import._normalization_layer(source).get_weights())
      layer.finalize_state()
    elif layer.weights:
      layer.set_weights(source.get_layer(layer.name).get_weights())


def save(model, backbone: str, fmt: str, folder: pathlib.Path,
         rng: np.random.Generator) -> pathlib.Path:
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top
  if fmt == "keras3":
    path = folder / f"{backbone}.weights.h5"
    model.save_weights(path)
    return path
  if fmt == "legacy_top":
    top_model = keras_application(backbone, include_top=True)
    randomise(top_model, rng)
    for layer in top_model.layers:
      if layer.weights and layer.name not in ("predictions", "fc1", "fc2"):
        layer.set_weights(model.get_layer(layer.name).get_weights())
    model = top_model
  path = folder / f"{backbone}_notop.h5"
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
  return path


def random_images(backbone: str, batch: int, size: int,
                  rng: np.random.Generator) -> np.ndarray:
  pixels = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
  return np.asarray(augment.normalize(jnp.asarray(pixels),
                                      models.PREPROCESSING[backbone]))


def relative_error(got, want) -> float:
  want = np.asarray(want, np.float64)
  return float(np.max(np.abs(np.asarray(got, np.float64) - want))
               / max(np.max(np.abs(want)), 1e-30))


def assert_same_outputs(keras_model, variables, backbone: str, images: np.ndarray,
                        **backbone_overrides) -> None:
  """Pooled output and every named early exit agree to RTOL."""
  names = models.FEATURES[backbone]
  probe = keras.Model(keras_model.inputs,
                      [keras_model.output] + [keras_model.get_layer(n).output
                                              for n in names])
  want = probe([images], training=False)
  module = models.get_backbone(backbone, **backbone_overrides)
  # XLA's CPU backend optimisations triple the compile time of these deep
  # one-off graphs (DenseNet-169: 16 s vs 6 s) and change no result beyond
  # float32 rounding.
  forward = jax.jit(lambda v, x: module.apply(v, x, train=False)).lower(
      variables, images).compile({"xla_backend_optimization_level": 0})
  pooled, features = forward(variables, images)
  assert pooled.shape == tuple(want[0].shape)
  errors = {"pooled": relative_error(pooled, want[0])}
  for name, reference in zip(names, want[1:]):
    assert features[name].shape == tuple(reference.shape), name
    errors[name] = relative_error(features[name], reference)
  # A conversion with any wrong tensor is off by O(1); also make sure the
  # reference is not degenerate (all zeros would compare equal to anything).
  assert np.max(np.abs(np.asarray(want[0]))) > 1e-3
  assert max(errors.values()) <= RTOL, (backbone, images.shape, errors)


@pytest.mark.parametrize("backbone", list(FORMATS))
def test_preprocessing_matches_keras(backbone):
  pixels = np.random.default_rng(0).uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
  want = PREPROCESS_MODULES[backbone].preprocess_input(pixels.copy())
  got = augment.normalize(jnp.asarray(pixels), models.PREPROCESSING[backbone])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backbone", list(FORMATS))
def test_converted_backbone_matches_keras(backbone, tmp_path):
  rng = np.random.default_rng(sorted(FORMATS).index(backbone))
  is_efficientnet = backbone == "efficientnetb3"
  # EfficientNet's stride-2 padding is fixed when Keras builds the graph, from the
  # static input size: it needs a model per size. The others take any size.
  keras_model = keras_application(
      backbone, include_top=False, pooling="avg",
      input_shape=(224, 224, 3) if is_efficientnet else (None, None, 3))
  randomise(keras_model, rng)
  path = save(keras_model, backbone, FORMATS[backbone], tmp_path, rng)

  variables = keras_import.convert(backbone, str(path))

  if is_efficientnet:
    # Random statistics are not Keras' ImageNet signature: no rescaling folded.
    normalization = keras_import._normalization_layer(keras_model).get_weights()
    np.testing.assert_allclose(variables["batch_stats"]["normalization"]["variance"],
                               normalization[1], rtol=1e-6)
  assert_same_outputs(keras_model, variables, backbone,
                      random_images(backbone, 1, 224, rng))
  if is_efficientnet:
    small_model = keras_application(backbone, include_top=False, pooling="avg",
                                    input_shape=(SMALL, SMALL, 3))
    copy_weights(keras_model, small_model)
    keras_model = small_model
  assert_same_outputs(keras_model, variables, backbone,
                      random_images(backbone, 2, SMALL, rng))


def test_efficientnet_imagenet_rescaling_is_folded_into_the_variance(
    tmp_path, monkeypatch):
  rng = np.random.default_rng(7)
  std = np.asarray(efficientnet.IMAGENET_STDDEV_RGB)
  shape = (SMALL, SMALL, 3)
  model = keras_application("efficientnetb3", include_top=False, pooling="avg",
                            input_shape=shape)
  # What Keras' published file holds: the ImageNet mean, and the std as variance.
  randomise(model, rng, normalization=(np.asarray([0.485, 0.456, 0.406]), std))
  path = tmp_path / "efficientnetb3_notop.weights.h5"
  model.save_weights(path)
  # Keras' own ImageNet code path, with its download served from that file.
  monkeypatch.setattr(keras.src.utils.file_utils, "get_file",
                      lambda *args, **kwargs: str(path))
  keras_imagenet = keras_application("efficientnetb3", weights="imagenet",
                                     include_top=False, pooling="avg",
                                     input_shape=shape)
  rescalings = [layer for layer in keras_imagenet.layers
                if type(layer).__name__ == "Rescaling"]
  assert len(rescalings) == 2, "Keras no longer adds its ImageNet rescaling"

  from_download = keras_import.convert("efficientnetb3", "imagenet")
  from_file = keras_import.convert("efficientnetb3", str(path))  # detected
  unscaled = keras_import.convert("efficientnetb3", str(path),
                                  imagenet_rescaling=False)
  # Folding 1/sqrt(std) into a variance of std gives the true variance std^2.
  for variables in (from_download, from_file):
    np.testing.assert_allclose(variables["batch_stats"]["normalization"]["variance"],
                               std**2, rtol=1e-6)
  np.testing.assert_allclose(unscaled["batch_stats"]["normalization"]["variance"],
                             std, rtol=1e-6)

  images = random_images("efficientnetb3", 2, SMALL, rng)
  assert_same_outputs(keras_imagenet, from_file, "efficientnetb3", images)
  # The model's flag, with unfolded statistics, computes the same thing.
  assert_same_outputs(keras_imagenet, unscaled, "efficientnetb3", images,
                      imagenet_rescaling=True)


def test_wrong_architecture_is_named(tmp_path):
  vgg = keras_application("vgg16", include_top=False)
  path = tmp_path / "vgg16.weights.h5"
  vgg.save_weights(path)
  with pytest.raises(ValueError, match="does not hold Keras ResNet50 weights"):
    keras_import.convert("resnet50", str(path))

  # Right names, wrong shapes: caught by the check against the Flax backbone.
  impostor = keras.Sequential([
      keras.Input((None, None, 3)),
      keras.layers.Conv2D(8, 3, padding="same", name="block1_conv1")])
  with pytest.raises(ValueError, match=r"Keras VGG16 weights do not fit the Flax "
                     r"backbone 'vgg16'.*missing.*block1_conv2.*wrong shape.*"
                     r"block1_conv1/kernel"):
    keras_import.convert_keras_model(impostor, "vgg16")

  with pytest.raises(ValueError, match="'tiny_resnet' has no Keras Applications"):
    keras_import.convert("tiny_resnet", str(path))
  with pytest.raises(FileNotFoundError, match="Keras DenseNet121 weights file"):
    keras_import.convert("densenet121", str(tmp_path / "absent.h5"))
  with pytest.raises(ValueError, match="EfficientNet only"):
    keras_import.convert("vgg16", str(path), imagenet_rescaling=True)


@pytest.fixture
def fake_ham(tmp_path) -> pathlib.Path:
  """A HAM10000-like folder of 24 images (tests/test_train.py's pattern)."""
  root = tmp_path / "ham"
  (root / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
  for i, dx in enumerate(["nv"] * 16 + ["mel"] * 8):
    base = 60 if dx == "nv" else 190
    pixels = rng.normal(base, 25, size=(30, 40, 3)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "images" / f"ISIC_{i:07d}.jpg", quality=95)
    rows.append(f"HAM_{i:07d},ISIC_{i:07d},{dx},histo,50.0,male,back")
  (root / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
  return root


def final_state(workdir: pathlib.Path):
  mngr = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  return mngr.latest_step(), mngr.restore(mngr.latest_step())


# VGG16: the cheapest full backbone to compile for training on a CPU (ResNet50 took
# minutes); the BatchNorm statistics path is exercised by the equivalence tests.
FINE_TUNE_BACKBONE = "vgg16"


def test_fine_tune_from_converted_checkpoint(fake_ham, tmp_path, monkeypatch, capsys):
  rng = np.random.default_rng(3)
  keras_model = keras_application(FINE_TUNE_BACKBONE, include_top=False,
                                  pooling="avg", input_shape=(32, 32, 3))
  randomise(keras_model, rng)
  weights_file = tmp_path / f"{FINE_TUNE_BACKBONE}.weights.h5"
  keras_model.save_weights(weights_file)
  monkeypatch.setenv(keras_import.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))

  written = keras_import.main([f"--backbone={FINE_TUNE_BACKBONE}",
                               f"--weights_file={weights_file}", "--verify_size=32"])
  assert written == (tmp_path / "weights" / FINE_TUNE_BACKBONE).absolute()
  assert "max relative difference" in capsys.readouterr().out
  with pytest.raises(SystemExit):  # never overwrites without being asked
    keras_import.main([f"--backbone={FINE_TUNE_BACKBONE}",
                       f"--weights_file={weights_file}"])

  # 'imagenet' finds the converted checkpoint where the converter put it.
  loaded = weights.load_backbone_variables("imagenet", FINE_TUNE_BACKBONE)
  converted = keras_import.convert(FINE_TUNE_BACKBONE, str(weights_file))
  assert jax.tree.structure(loaded) == jax.tree.structure(converted)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(converted), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)

  learning_rate, steps = 1e-5, 2
  config = configlib.base_config()
  config.update(dict(
      method="classifier", dataset="ham10000", manual_dir=str(fake_ham),
      tfds_data_dir=str(tmp_path / "tfds"), task="melanoma_vs_nevus", image_size=32,
      normalization="backbone", backbone=FINE_TUNE_BACKBONE, init_from="imagenet",
      batch_size=8, eval_batch_size=8, learning_rate=learning_rate,
      num_train_steps=steps, log_every_steps=1, eval_every_steps=steps,
      checkpoint_every_steps=steps, heatmap_images=0))
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  # Every test image is scored once (the metrics themselves are checked elsewhere).
  assert sum(map(sum, results["test"]["confusion_matrix"])) == (
      results["num_examples"]["test"])
  step, state = final_state(tmp_path / "run")
  assert step == steps
  # Adam moves each parameter by at most ~learning_rate per step, so the trained
  # backbone is the converted one plus at most steps * learning_rate.
  trained = state["params"]["backbone"]
  flat_trained = {k: np.asarray(v) for k, v in
                  jax.tree_util.tree_leaves_with_path(trained)}
  flat_converted = dict(jax.tree_util.tree_leaves_with_path(converted["params"]))
  assert flat_trained.keys() == flat_converted.keys()
  drift = max(float(np.max(np.abs(flat_trained[k] - flat_converted[k])))
              for k in flat_trained)
  assert drift <= 1.1 * steps * learning_rate, drift
  assert drift > 0.0, "the backbone did not train"


def _load_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name,pretrained,scratch", [
    ("classifier", "strategy=TL", "strategy=NP"),
    ("sdc", "strategy=TL", "strategy=NP"),
    ("udc", "strategy=TL", "strategy=NP"),
    ("biigma", "pretrained=true", "pretrained=false"),
])
def test_configs_take_init_from(name, pretrained, scratch):
  if not (CONFIGS / f"{name}.py").exists():
    pytest.skip(f"configs/{name}.py is not in this checkout")
  assert _load_config(name, pretrained).init_from == "imagenet"
  config = _load_config(name, scratch)
  assert config.init_from == ""
  config.init_from = "/some/converted/checkpoint"
  configlib.validate(config)
