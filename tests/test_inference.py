"""Using a trained run: predict on image files, evaluate on another dataset.

One tiny melanoma-vs-nevus classifier is trained on the generated HAM10000-like
folder (module fixture); the tests score files with ``predict`` and a generated
PH2 folder, laid out as its authors publish it, with ``evaluate``.
"""

import csv
import json
import pathlib

import numpy as np
from PIL import Image
import pytest
from sklearn import metrics as skm
import tensorflow as tf

from comtriplet_jax import configlib
from comtriplet_jax import evaluate
from comtriplet_jax import predict
from comtriplet_jax import runs
from comtriplet_jax import train

# PH2 Clinical Diagnosis codes: 0 common nevus, 1 atypical nevus, 2 melanoma.
PH2_CODES = {"IMD002": 0, "IMD003": 1, "IMD004": 2, "IMD005": 0, "IMD006": 1,
             "IMD007": 2, "IMD008": 0, "IMD009": 2}


@pytest.fixture(scope="module")
def run(fake_ham, tmp_path_factory):
  config = configlib.base_config()
  config.update(dict(
      method="classifier", manual_dir=str(fake_ham),
      tfds_data_dir=str(tmp_path_factory.mktemp("tfds")), image_size=32,
      backbone="tiny_vgg", batch_size=8, eval_batch_size=8, learning_rate=1e-3,
      num_train_steps=4, log_every_steps=2, eval_every_steps=2,
      checkpoint_every_steps=2, operating_point="youden", heatmap_images=0))
  workdir = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(config, str(workdir))
  return workdir


def _ph2_folder(root: pathlib.Path) -> pathlib.Path:
  """A PH2Dataset-like folder: a folder per image (BMP) and PH2_dataset.txt."""
  rng = np.random.default_rng(3)
  for name, code in PH2_CODES.items():
    case = root / "PH2 Dataset images" / name / f"{name}_Dermoscopic_Image"
    case.mkdir(parents=True)
    base = 190 if code == 2 else 60
    pixels = rng.normal(base, 25, size=(36, 48, 3)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(case / f"{name}.bmp")
  rows = [f"|| {name} |  | {code} | 0 | T | A | A | A | A | 3 4 ||"
          for name, code in PH2_CODES.items()]
  (root / "PH2_dataset.txt").write_text(
      "||   Name  | Histological Diagnosis | Clinical Diagnosis | Asymmetry | "
      "Pigment Network | Dots/Globules | Streaks | Regression Areas | "
      "Blue-Whitish Veil | Colors ||\n\n" + "\n".join(rows)
      + "\n\nLegends:\n Clinical Diagnosis:\n    0 - Common Nevus;\n")
  return root


def test_a_run_loads_as_a_model(run):
  model = runs.load_run(run)
  assert model.class_names == ["nevus", "melanoma"]
  assert model.card["operating_point"] == "youden"
  results = json.loads((run / "results.json").read_text())
  assert model.threshold() == results["operating_points"]["youden"]["threshold"]
  scores = np.array([0.1, 0.5, 0.9])
  np.testing.assert_array_equal(model.decide(scores, "paper"), [0, 0, 1])
  # Another target is chosen on the validation rows of predictions.csv, as the
  # run's own rules were.
  rows = [r for r in csv.DictReader(open(run / "predictions.csv"))
          if r["split"] == "validation"]
  val_y = np.array([r["label"] == "melanoma" for r in rows], int)
  val_s = np.array([float(r["score"]) for r in rows])
  t = model.threshold("sensitivity=0.5")
  assert t in val_s and np.mean(val_s[val_y == 1] >= t) >= 0.5
  above = val_s[val_s > t]
  if above.size:   # the highest such cut: the next one up falls short
    assert np.mean(val_s[val_y == 1] >= above.min()) < 0.5
  assert model.threshold("youden") == results["operating_points"]["youden"]["threshold"]


def test_predict_reads_folders_globs_and_csv_lists_and_names_bad_images(
    run, fake_ham, tmp_path, capsys):
  images = sorted((fake_ham / "images").glob("*.jpg"))[:5]
  folder = tmp_path / "mine"
  (folder / "sub").mkdir(parents=True)
  for i, path in enumerate(images[:3]):
    # Lossless (PNG, BMP) copies of the JPEG files' pixels as TensorFlow decodes
    # them (PIL's JPEG decoder differs by a grey level here and there).
    pixels = tf.io.decode_jpeg(path.read_bytes(), channels=3).numpy()
    Image.fromarray(pixels).save(folder / "sub" / f"copy{i}.{'png' if i % 2 else 'bmp'}")
  (folder / "broken.jpg").write_bytes(b"not an image")
  listing = tmp_path / "list.csv"
  listing.write_text("path\n" + f"{images[3]}\n" + "mine/sub/copy0.bmp\n")
  out = tmp_path / "out" / "p.csv"
  status = predict.main([f"--workdir={run}", str(folder), str(fake_ham / "images" /
                                                              "ISIC_000000[0-1].jpg"),
                         str(listing), f"--out={out}", "--batch_size=4",
                         f"--heatmaps={tmp_path / 'heat'}"])
  err = capsys.readouterr().err
  assert status == 1, err
  assert "broken.jpg" in err and "cannot be read as an image" in err
  rows = list(csv.DictReader(open(out)))
  paths = [r["path"] for r in rows]
  # Every readable image once, in argument order; the broken one left out.
  assert paths == [str(folder / "sub" / f"copy{i}.{'png' if i % 2 else 'bmp'}")
                   for i in range(3)] + [str(images[0]), str(images[1]), str(images[3])]
  assert set(rows[0]) == {"path", "score", "prediction"}
  # One Grad-CAM overlay per scored image, at the run's image size.
  heat = sorted(p.name for p in (tmp_path / "heat").iterdir())
  assert heat == sorted(f"{pathlib.Path(p).stem}_gradcam.png" for p in paths)
  assert Image.open(tmp_path / "heat" / heat[0]).size == (32, 32)
  # A lossless copy scores as its original; the model's own threshold decides.
  model = runs.load_run(run)
  original = {r["path"]: float(r["score"]) for r in rows}
  direct = model.score(runs.prepare_image(images[1].read_bytes(), 32)[None])
  assert original[str(folder / "sub" / "copy1.png")] == pytest.approx(
      float(direct["scores"][0]), abs=1e-5)
  for r in rows:
    expected = "melanoma" if float(r["score"]) >= model.threshold("youden") else "nevus"
    assert r["prediction"] == expected

  # --strict stops at the broken image, writing nothing.
  strict_out = tmp_path / "strict.csv"
  assert predict.main([f"--workdir={run}", str(folder), f"--out={strict_out}",
                       "--strict"]) == 2
  assert "broken.jpg" in capsys.readouterr().err and not strict_out.exists()
  assert not list(tmp_path.glob("strict.csv*")), "a partial file was left"


@pytest.mark.parametrize("args,message", [
    (["nowhere/*.jpg"], "matches no file"),
    (["no_such_file.jpg"], "no such file or folder"),
    (["--operating_point=best"], "--operating_point='best' is not allowed"),
])
def test_predict_errors_name_the_input(run, fake_ham, tmp_path, capsys, args, message):
  argv = [f"--workdir={run}", f"--out={tmp_path / 'p.csv'}"]
  argv += args if args[0].startswith("--") else []
  argv += [a for a in args if not a.startswith("--")] or [str(fake_ham / "images")]
  assert predict.main(argv) == 2
  assert message in capsys.readouterr().err


def test_predict_refuses_an_unfinished_run(tmp_path, capsys):
  (tmp_path / "config.json").write_text(json.dumps(configlib.base_config().to_dict()))
  image = tmp_path / "x.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  assert predict.main([f"--workdir={tmp_path}", str(image)]) == 2
  assert "model.json is missing" in capsys.readouterr().err


def test_evaluate_on_a_ph2_folder_maps_its_classes_and_scores_every_image(
    run, tmp_path):
  folder = _ph2_folder(tmp_path / "PH2Dataset")
  result = evaluate.evaluate_run(str(run), "ph2", manual_dir=str(folder),
                                 data_dir=str(tmp_path / "tfds"))
  # Common and atypical nevi are nevi.
  assert result["counts"]["kept"] == {"nevus": 5, "melanoma": 3}
  assert result["num_examples"] == 8
  written = json.loads((run / "eval_ph2.json").read_text())
  assert written["counts"] == result["counts"]
  # The same images scored through predict, from their files: same AUC and
  # predictions at the run's operating point.
  files = [str(p) for p in sorted(folder.rglob("*_Dermoscopic_Image/*.bmp"))]
  out = tmp_path / "ph2.csv"
  predict.predict(str(run), files, out=str(out))
  rows = list(csv.DictReader(open(out)))
  labels = np.array([int(PH2_CODES[pathlib.Path(r["path"]).stem] == 2) for r in rows])
  scores = np.array([float(r["score"]) for r in rows])
  assert written["metrics"]["auc"] == pytest.approx(skm.roc_auc_score(labels, scores),
                                                    abs=1e-4)
  model = runs.load_run(run)
  at_point = (scores >= model.threshold()).astype(int)
  assert written["operating_point"]["rule"] == "youden"
  assert written["operating_point"]["metrics"]["sensitivity"] == pytest.approx(
      skm.recall_score(labels, at_point))
  assert written["roc_curve"]["fpr"][0] == 0.0 and written["roc_curve"]["tpr"][-1] == 1.0


def test_evaluate_refuses_classes_the_model_never_saw():
  labels = np.array([0, 1, 2])
  with pytest.raises(ValueError, match="class 'scc' .diagnosis 'scc'. is not one"):
    evaluate.map_labels("all", ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
                        "ham10000", labels, ["mel", "nv", "scc"],
                        {"mel": "melanoma", "nv": "nevus", "scc": "scc"}, "isic2019")
  mapped, counts = evaluate.map_labels(
      "all", ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], "ham10000",
      np.array([0, 1, 2, 2]), ["MEL", "NV", "UNK"],
      {"MEL": "melanoma", "NV": "nevus", "UNK": "unknown"}, "isic2019")
  np.testing.assert_array_equal(mapped, [4, 5, -1, -1])
  assert counts["left_out"] == {"UNK": 2}


def test_a_checkpoint_that_does_not_fit_the_config_is_refused(run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  copy = tmp_path / "copy"
  shutil.copytree(run, copy)
  config = json.loads((copy / "config.json").read_text())
  config["backbone"] = "tiny_resnet"
  (copy / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"best_checkpoint/\d+'s params do not fit the "
                     r"model that .*config.json builds: missing \['backbone/"):
    runs.load_run(copy)


@pytest.mark.parametrize("rule", ["best", "sensitivity=1.5", "sensitivity", "youden=1"])
def test_a_bad_operating_point_in_the_config_names_the_field(rule):
  config = configlib.base_config()
  config.operating_point = rule
  with pytest.raises(ValueError, match=r"config.operating_point=.* is not allowed: "):
    configlib.validate(config)
