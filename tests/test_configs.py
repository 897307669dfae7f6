"""Config files, argument strings and validation."""

import importlib.util
import pathlib

import pytest

from comtriplet_jax import configlib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_classifier_defaults_follow_the_paper():
  config = load_config("classifier")
  configlib.validate(config)
  assert config.image_size == 256
  assert config.batch_size == 15
  assert (config.learning_rate, config.adam_b1, config.adam_b2, config.adam_eps) == (
      1e-5, 0.9, 0.99, 1e-7)
  assert config.num_epochs == 15
  assert config.split_scheme == "75/12.5/12.5"


@pytest.mark.parametrize("strategy,init_from,augment,weighting", [
    ("NP", "", False, "none"),
    ("TL", "imagenet", False, "none"),
    ("TL+DA", "imagenet", True, "none"),
    ("TL+LW", "imagenet", False, "batch"),
    ("np+da", "", True, "none"),
])
def test_strategies(strategy, init_from, augment, weighting):
  config = load_config("classifier", f"strategy={strategy}")
  assert (config.init_from, config.augment, config.loss_weighting) == (
      init_from, augment, weighting)


def test_runlocal_and_overrides():
  config = load_config("classifier", "runlocal,backbone=resnet50,size=96")
  assert config.backbone == "resnet50" and config.image_size == 96
  assert config.num_train_steps > 0
  config = load_config("classifier", "runlocal")
  assert config.backbone == "small_resnet"
  configlib.validate(config)


@pytest.mark.parametrize("arg,message", [
    ("colour=red", "unknown config argument 'colour'"),
    ("size=big", "'size' must be a int"),
    ("strategy=XX", "strategy 'XX'"),
    ("strategy=NP+TL", "both NP and TL"),
    ("backbone", "needs a value"),
])
def test_bad_arguments_are_named(arg, message):
  with pytest.raises(ValueError, match=message):
    load_config("classifier", arg)


@pytest.mark.parametrize("field,value,message", [
    ("backbone", "alexnet", "config.backbone='alexnet' is not allowed; choose one of vgg16"),
    ("task", "everything", "config.task"),
    ("parallelism", "pjit", "config.parallelism"),
    ("batch_size", 0, "config.batch_size=0 must be > 0"),
    ("train_class_counts", "4500-75", "config.train_class_counts"),
    ("val_fraction", 1.5, "config.val_fraction"),
    ("image_size", 16, "config.image_size"),
])
def test_validate_names_the_field(field, value, message):
  config = load_config("classifier")
  config[field] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    configlib.validate(config)
