"""TFDS builders on tiny generated folders, and on the real HAM10000."""

from __future__ import annotations

import collections
import csv
import io
import pathlib
import shutil
import time
import zipfile

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from comtriplet_jax.data import builders

_BUCKET = "https://isic-challenge-data.s3.amazonaws.com"


# ----------------------------------------------------------------- helpers --


def _pixels(seed: int, size: tuple[int, int] = (10, 12)) -> np.ndarray:
  """A smooth random RGB image (uint8, H x W x 3), distinct for each seed.

  Smooth so JPEG keeps it close; different seeds differ by tens of levels.
  """
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[0:size[0], 0:size[1]]
  image = (rng.integers(30, 200, 3)
           + 5 * rows[..., None] * rng.integers(-3, 4, 3)
           + 4 * cols[..., None] * rng.integers(-3, 4, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
  buffer = io.BytesIO()
  options = {"quality": 95, "subsampling": 0} if image_format == "JPEG" else {}
  PIL.Image.fromarray(pixels).save(buffer, format=image_format, **options)
  return buffer.getvalue()


def _write_image(path: pathlib.Path, seed: int) -> np.ndarray:
  """Writes a JPEG or BMP (by suffix) of `_pixels(seed)`; returns the pixels."""
  pixels = _pixels(seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(_encode(pixels, "BMP" if path.suffix == ".bmp" else "JPEG"))
  return pixels


def _write_csv(path: pathlib.Path, header: list[str], rows: list[list],
               *, bom: bool = False) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  encoding = "utf-8-sig" if bom else "utf-8"
  with open(path, "w", newline="", encoding=encoding) as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return path


def _prepared(name: str, tmp_path: pathlib.Path, manual_dir=None,
              config=None) -> tfds.core.DatasetBuilder:
  builder = builders.get_builder(name, data_dir=tmp_path / "tfds",
                                 manual_dir=manual_dir, config=config)
  builders.prepare(builder)
  return builder


def _examples(builder, split: str = "train", decode: bool = False
              ) -> dict[str, dict]:
  """image id -> example as NumPy; the image stays encoded unless `decode`."""
  decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
  dataset = builder.as_dataset(split=split, decoders=decoders)
  examples = {}
  for example in tfds.as_numpy(dataset):
    example["label"] = builder.info.features["label"].int2str(example["label"])
    for key in ("group_id", "image_id", "diagnosis"):
      if key in example:
        example[key] = example[key].decode()
    examples[example["image_id"]] = example
  return examples


def _labels_and_groups(examples: dict[str, dict]) -> dict[str, tuple[str, str]]:
  return {k: (v["label"], v["group_id"]) for k, v in examples.items()}


# (image id, lesion id, dx) of the fake HAM10000.
_HAM_ROWS = [
    ("ISIC_0000001", "HAM_01", "mel"),
    ("ISIC_0000002", "HAM_01", "mel"),
    ("ISIC_0000003", "HAM_02", "nv"),
    ("ISIC_0000004", "HAM_03", "nv"),
    ("ISIC_0000005", "HAM_03", "nv"),
    ("ISIC_0000006", "", "bkl"),  # no lesion id: grouped alone
    ("ISIC_0000007", "HAM_04", "vasc"),
]


def _ham_folder(root: pathlib.Path, image_dirs=("images",)) -> pathlib.Path:
  """A HAM10000 manual folder; images spread over `image_dirs`."""
  for i, (image_id, _, _) in enumerate(_HAM_ROWS):
    _write_image(root / image_dirs[i % len(image_dirs)] / f"{image_id}.jpg", i)
  # An image the CSV does not list is ignored.
  _write_image(root / image_dirs[0] / "ISIC_0009999.jpg", 99)
  _write_csv(root / "HAM10000_metadata.csv",
             ["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
              "localization"],
             [[lesion, image, dx, "histo", "50.0", "male", "back"]
              for image, lesion, dx in _HAM_ROWS])
  return root


# ----------------------------------------------------------------- folders --


@pytest.mark.parametrize("image_dirs", [
    ("images",), ("HAM10000_images_part_1", "HAM10000_images_part_2")])
def test_ham10000_folder(tmp_path, image_dirs):
  folder = _ham_folder(tmp_path / "ham", image_dirs)
  builder = _prepared("ham10000", tmp_path, folder)
  assert builder.builder_config.name == "folder"
  assert builder.info.splits["train"].num_examples == len(_HAM_ROWS)
  examples = _examples(builder)
  assert _labels_and_groups(examples) == {
      image: (dx, lesion or image) for image, lesion, dx in _HAM_ROWS}
  # The stored bytes are the file's (no re-encoding) and decode to its image.
  decoded = _examples(builder, decode=True)
  for i, (image_id, _, _) in enumerate(_HAM_ROWS):
    path = folder / image_dirs[i % len(image_dirs)] / f"{image_id}.jpg"
    assert examples[image_id]["image"] == path.read_bytes()
    np.testing.assert_allclose(
        decoded[image_id]["image"], np.asarray(PIL.Image.open(path)), atol=8)


def test_ph2_bom_bmp_and_whitespace(tmp_path):
  folder = tmp_path / "ph2"
  diagnoses = {"IMD002": 0, "IMD003": 1, "IMD004": 2, "IMD005": 2}
  suffixes = {"IMD002": ".bmp", "IMD003": ".bmp", "IMD004": ".jpg",
              "IMD005": ".bmp"}
  pixels = {name: _write_image(folder / "images" / f"{name}{suffixes[name]}", i)
            for i, name in enumerate(diagnoses)}
  # Hand-made CSV: byte-order mark, padded headers and values, a blank line.
  _write_csv(folder / "PH2_dataset.csv",
             [" Name ", " Clinical Diagnosis", "Asymmetry "],
             [[f" {name}", f" {code} ", "0"]
              for name, code in diagnoses.items()] + [["", "", ""]],
             bom=True)
  builder = _prepared("ph2", tmp_path, folder)
  examples = _examples(builder)
  names = builders.Ph2.CLASS_NAMES
  assert _labels_and_groups(examples) == {
      name: (names[code], name) for name, code in diagnoses.items()}
  decoded = _examples(builder, decode=True)
  for name, suffix in suffixes.items():
    stored = examples[name]["image"]
    if suffix == ".bmp":  # Converted to PNG, losslessly.
      assert stored.startswith(b"\x89PNG")
      np.testing.assert_array_equal(decoded[name]["image"], pixels[name])
    else:
      assert stored == (folder / "images" / f"{name}.jpg").read_bytes()


def test_isic2017_official_splits(tmp_path):
  folder = tmp_path / "isic2017"
  truth = {
      "Training": [("ISIC_0000000", 0, 0), ("ISIC_0000001", 1, 0),
                   ("ISIC_0000002", 0, 1)],
      "Validation": [("ISIC_0001000", 1.0, 0.0), ("ISIC_0001001", 0.0, 0.0)],
  }
  seed = 0
  for tag, rows in truth.items():
    _write_csv(folder / f"ISIC-2017_{tag}_Part3_GroundTruth.csv",
               ["image_id", "melanoma", "seborrheic_keratosis"], rows)
    for image_id, _, _ in rows:
      # Validation images in images/, the other accepted place.
      subdir = f"ISIC-2017_{tag}_Data" if tag == "Training" else "images"
      _write_image(folder / subdir / f"{image_id}.jpg", seed)
      seed += 1
  # The official archives also hold superpixel PNGs, which are not examples.
  _write_image(folder / "ISIC-2017_Training_Data" /
               "ISIC_0000000_superpixels.bmp", 50)
  builder = _prepared("isic2017", tmp_path, folder)
  assert set(builder.info.splits) == {"train", "validation"}
  assert _labels_and_groups(_examples(builder, "train")) == {
      "ISIC_0000000": ("nevus", "ISIC_0000000"),
      "ISIC_0000001": ("melanoma", "ISIC_0000001"),
      "ISIC_0000002": ("seborrheic_keratosis", "ISIC_0000002"),
  }
  assert _labels_and_groups(_examples(builder, "validation")) == {
      "ISIC_0001000": ("melanoma", "ISIC_0001000"),
      "ISIC_0001001": ("nevus", "ISIC_0001001"),
  }


_ISIC2019_COLUMNS = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC",
                     "UNK"]
# (image, class column, lesion id)
_ISIC2019_ROWS = [
    ("ISIC_0000000", "NV", "BCN_0000001"),
    ("ISIC_0000001", "MEL", "BCN_0000001"),
    ("ISIC_0000002_downsampled", "SCC", ""),
    ("ISIC_0000003", "AK", "HAM_0000002"),
]


def _isic2019_csvs(folder: pathlib.Path) -> None:
  _write_csv(folder / "ISIC_2019_Training_GroundTruth.csv",
             ["image"] + _ISIC2019_COLUMNS,
             [[image] + [float(c == column) for c in _ISIC2019_COLUMNS]
              for image, column, _ in _ISIC2019_ROWS])
  _write_csv(folder / "ISIC_2019_Training_Metadata.csv",
             ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
             [[image, "55.0", "head/neck", lesion, "female"]
              for image, _, lesion in _ISIC2019_ROWS])


_ISIC2019_EXPECTED = {
    image: (column.lower(), lesion or image)
    for image, column, lesion in _ISIC2019_ROWS}


def test_isic2019_folder(tmp_path):
  folder = tmp_path / "isic2019"
  _isic2019_csvs(folder)
  for i, (image, _, _) in enumerate(_ISIC2019_ROWS):
    _write_image(folder / "ISIC_2019_Training_Input" / f"{image}.jpg", i)
  builder = _prepared("isic2019", tmp_path, folder)
  assert _labels_and_groups(_examples(builder)) == _ISIC2019_EXPECTED


_ISIC2020_HEADER = ["image_name", "patient_id", "sex", "age_approx",
                    "anatom_site_general_challenge", "diagnosis",
                    "benign_malignant", "target"]
_ISIC2020_ROWS = [
    ["ISIC_2637011", "IP_7279968", "male", "45.0", "head/neck", "unknown",
     "benign", "0"],
    ["ISIC_0015719", "IP_3075186", "female", "45.0", "upper extremity",
     "nevus", "benign", "0"],
    ["ISIC_0052212", "IP_7279968", "male", "50.0", "lower extremity",
     "melanoma", "malignant", "1"],
]
_ISIC2020_EXPECTED = {
    "ISIC_2637011": ("benign", "IP_7279968", "unknown"),
    "ISIC_0015719": ("benign", "IP_3075186", "nevus"),
    "ISIC_0052212": ("malignant", "IP_7279968", "melanoma"),
}


@pytest.mark.parametrize("csv_name, image_dir", [
    ("train.csv", "jpeg/train"),
    ("ISIC_2020_Training_GroundTruth.csv", "train")])
def test_isic2020_folder(tmp_path, csv_name, image_dir):
  folder = tmp_path / "isic2020"
  _write_csv(folder / csv_name, _ISIC2020_HEADER, _ISIC2020_ROWS)
  for i, row in enumerate(_ISIC2020_ROWS):
    _write_image(folder / image_dir / f"{row[0]}.jpg", i)
  examples = _examples(_prepared("isic2020", tmp_path, folder))
  assert {k: (v["label"], v["group_id"], v["diagnosis"])
          for k, v in examples.items()} == _ISIC2020_EXPECTED


def test_prepared_data_follows_the_source_folder(tmp_path):
  folder = _ham_folder(tmp_path / "ham")
  builder = _prepared("ham10000", tmp_path, folder)
  first = pathlib.Path(builder.data_dir)
  assert first.is_relative_to(tmp_path / "tfds" / "sources")
  # The same files, even from another path (copied with their times): reused.
  copy = tmp_path / "copy"
  shutil.copytree(folder, copy)
  for source in (folder, copy):
    again = builders.get_builder("ham10000", data_dir=tmp_path / "tfds",
                                 manual_dir=source)
    assert pathlib.Path(again.data_dir) == first and again.is_prepared()
  # 1 row fewer in the CSV: another fingerprint, prepared again, never the stale one.
  csv_file = copy / "HAM10000_metadata.csv"
  rows = csv_file.read_text().splitlines()
  csv_file.write_text("\n".join(rows[:-1]) + "\n")
  changed = builders.get_builder("ham10000", data_dir=tmp_path / "tfds",
                                 manual_dir=copy)
  assert pathlib.Path(changed.data_dir) != first and not changed.is_prepared()
  builders.prepare(changed)
  assert changed.info.splits["train"].num_examples == len(_HAM_ROWS) - 1
  # An image replaced (same name, other bytes) changes the fingerprint too.
  before = builders.source_fingerprint(copy)
  image = sorted((copy / "images").iterdir())[0]
  image.write_bytes(image.read_bytes() + b"\0")
  assert builders.source_fingerprint(copy) != before
  # The first version is still there for the runs made from it.
  assert builders.get_builder("ham10000", data_dir=tmp_path / "tfds",
                              manual_dir=folder).is_prepared()


# ------------------------------------------------------------------ errors --


def test_missing_manual_folder_says_what_and_where(tmp_path):
  absent = tmp_path / "no_such_folder"
  builder = builders.get_builder("ph2", data_dir=tmp_path / "tfds",
                                 manual_dir=absent)
  with pytest.raises(builders.ManualDataError) as error:
    builders.prepare(builder)
  message = str(error.value)
  assert str(absent) in message
  assert "PH2_dataset.csv" in message and "images/IMD002.bmp" in message
  assert "https://www.fc.up.pt/addi/ph2%20database.html" in message


def test_incomplete_folder_lists_missing_parts(tmp_path):
  folder = tmp_path / "isic2019"
  _write_csv(folder / "ISIC_2019_Training_GroundTruth.csv",
             ["image"] + _ISIC2019_COLUMNS, [])
  builder = builders.get_builder("isic2019", data_dir=tmp_path / "tfds",
                                 manual_dir=folder)
  with pytest.raises(builders.ManualDataError) as error:
    builders.prepare(builder)
  message = str(error.value)
  assert str(folder / "ISIC_2019_Training_Metadata.csv") in message
  assert str(folder / "ISIC_2019_Training_Input") in message
  assert "https://isic-challenge-data.s3.amazonaws.com/2019/" in message
  assert "GroundTruth.csv" not in message.split("What to download")[0]


def test_missing_image_names_the_file(tmp_path):
  folder = _ham_folder(tmp_path / "ham")
  (folder / "images" / "ISIC_0000004.jpg").unlink()
  builder = builders.get_builder("ham10000", data_dir=tmp_path / "tfds",
                                 manual_dir=folder)
  with pytest.raises(builders.ManualDataError,
                     match=str(folder / "images" / "ISIC_0000004.jpg")):
    builders.prepare(builder)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_image_names_the_file(tmp_path, damage):
  folder = _ham_folder(tmp_path / "ham")
  path = folder / "images" / "ISIC_0000003.jpg"
  data = path.read_bytes()
  if damage == "truncate":
    # Cut the entropy-coded data, not the header, which still parses: only
    # decoding the pixels finds the damage.
    data = data[:-30]
    assert PIL.Image.open(io.BytesIO(data)).size == (12, 10)
  else:
    data = b"not an image at all" * 10
  path.write_bytes(data)
  builder = builders.get_builder("ham10000", data_dir=tmp_path / "tfds",
                                 manual_dir=folder)
  with pytest.raises(builders.CorruptImageError, match=str(path)):
    builders.prepare(builder)


@pytest.mark.parametrize("name, csv_name, header, column", [
    ("ham10000", "HAM10000_metadata.csv", ["lesion_id", "image_id", "sex"],
     "dx"),
    ("ph2", "PH2_dataset.csv", ["Name", "Asymmetry"], "Clinical Diagnosis"),
    ("isic2020", "train.csv", ["image_name", "target"], "patient_id"),
])
def test_missing_column_names_column_and_file(tmp_path, name, csv_name, header,
                                              column):
  folder = tmp_path / name
  (folder / "images").mkdir(parents=True)
  csv_path = _write_csv(folder / csv_name, header, [])
  builder = builders.get_builder(name, data_dir=tmp_path / "tfds",
                                 manual_dir=folder)
  with pytest.raises(ValueError) as error:
    builders.prepare(builder)
  assert repr(column) in str(error.value) and str(csv_path) in str(error.value)


@pytest.mark.parametrize("rows, match", [
    ([["HAM_1", "ISIC_0000001", "melanoma"]], "line 2: unknown dx 'melanoma'"),
    ([["HAM_1", "ISIC_0000001", "mel"], ["HAM_1", "ISIC_0000001", "mel"]],
     "line 3: image ISIC_0000001 is listed twice"),
])
def test_bad_csv_values_name_the_line(tmp_path, rows, match):
  folder = tmp_path / "ham"
  _write_image(folder / "images" / "ISIC_0000001.jpg", 0)
  _write_csv(folder / "HAM10000_metadata.csv",
             ["lesion_id", "image_id", "dx"], rows)
  builder = builders.get_builder("ham10000", data_dir=tmp_path / "tfds",
                                 manual_dir=folder)
  with pytest.raises(ValueError, match=match):
    builders.prepare(builder)


def test_isic2017_rejects_two_positive_labels(tmp_path):
  folder = tmp_path / "isic2017"
  _write_csv(folder / "ISIC-2017_Training_Part3_GroundTruth.csv",
             ["image_id", "melanoma", "seborrheic_keratosis"],
             [["ISIC_0000000", "1.0", "1.0"]])
  _write_image(folder / "images" / "ISIC_0000000.jpg", 0)
  builder = builders.get_builder("isic2017", data_dir=tmp_path / "tfds",
                                 manual_dir=folder)
  with pytest.raises(ValueError, match="both melanoma and seborrheic"):
    builders.prepare(builder)


# ------------------------------------------------------------ API, labels --


def test_get_builder_names_and_configs(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="ham10000, ph2, isic2017, isic2019"):
    builders.get_builder("isic2016")
  with pytest.raises(ValueError, match="folder, official"):
    builders.get_builder("isic2019", config="isic2018")
  data_dir = tmp_path / "tfds"
  assert builders.get_builder(
      "isic2019", data_dir=data_dir).builder_config.name == "official"
  assert builders.get_builder(
      "isic2019", data_dir=data_dir,
      manual_dir=tmp_path).builder_config.name == "folder"
  assert builders.get_builder(
      "ph2", data_dir=data_dir).builder_config.name == "folder"
  # HAM10000 finds the shared folder; without it, it downloads.
  monkeypatch.setattr(builders.paths, "ham10000_dir", lambda: tmp_path)
  found = builders.get_builder("ham10000", data_dir=data_dir)
  assert (found.builder_config.name, found.manual_dir) == ("folder", tmp_path)
  monkeypatch.setattr(builders.paths, "ham10000_dir", lambda: None)
  assert builders.get_builder(
      "ham10000", data_dir=data_dir).builder_config.name == "isic2018"


def test_class_names_and_diagnoses(tmp_path):
  assert set(builders.DATASETS) == {
      "ham10000", "ph2", "isic2017", "isic2019", "isic2020"}
  assert builders.MALIGNANT_DIAGNOSES <= builders.CANONICAL_DIAGNOSES
  for name, builder_cls in builders.DATASETS.items():
    assert set(builder_cls.DIAGNOSES) == set(builder_cls.CLASS_NAMES), name
    assert set(builder_cls.DIAGNOSES.values()) <= builders.CANONICAL_DIAGNOSES
    builder = builders.get_builder(name, data_dir=tmp_path, config="folder")
    assert builder.info.features["label"].names == list(
        builder_cls.CLASS_NAMES)
  assert builders.Ham10000.DIAGNOSES["bkl"] == "bkl"
  assert builders.Isic2020.DIAGNOSES == {"benign": "benign",
                                         "malignant": "melanoma"}


# --------------------------------------------- downloads, served offline --


def _zip(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  return path


def _serve(monkeypatch, files: dict[str, pathlib.Path]) -> list[str]:
  """Makes the download manager return local `files` for their URLs.

  Everything past the network (nesting, extraction, archive iteration) is
  TFDS's own. An unexpected URL fails with KeyError.
  """
  requested = []

  def resolve(urls):
    if isinstance(urls, dict):
      return {key: resolve(value) for key, value in urls.items()}
    requested.append(urls)
    return files[urls]

  monkeypatch.setattr(tfds.download.DownloadManager, "download",
                      lambda self, urls: resolve(urls))
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                      lambda self, urls: self.extract(resolve(urls)))
  return requested


def _jpegs(folder: str, image_ids, seed: int = 0) -> dict[str, bytes]:
  return {f"{folder}/{image_id}.jpg": _encode(_pixels(seed + i), "JPEG")
          for i, image_id in enumerate(image_ids)}


def test_ham10000_isic2018_download(tmp_path, monkeypatch):
  images = _jpegs("ISIC2018_Task3_Training_Input",
                  [image for image, _, _ in _HAM_ROWS])
  images["ISIC2018_Task3_Training_Input/LICENSE.txt"] = b"CC BY-NC"
  columns = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
  truth = tmp_path / "truth.csv"
  _write_csv(truth, ["image"] + columns,
             [[image] + [float(c.lower() == dx) for c in columns]
              for image, _, dx in _HAM_ROWS])
  files = {
      f"{_BUCKET}/2018/ISIC2018_Task3_Training_Input.zip":
          _zip(tmp_path / "web" / "input.zip", images),
      f"{_BUCKET}/2018/ISIC2018_Task3_Training_GroundTruth.zip":
          _zip(tmp_path / "web" / "truth.zip", {
              "ISIC2018_Task3_Training_GroundTruth/"
              "ISIC2018_Task3_Training_GroundTruth.csv": truth.read_bytes()}),
      f"{_BUCKET}/2018/ISIC2018_Task3_Training_LesionGroupings.csv":
          _write_csv(tmp_path / "web" / "groupings.csv",
                     ["image", "lesion_id", "diagnosis_confirm_type"],
                     [[image, lesion, "histopathology"]
                      for image, lesion, _ in _HAM_ROWS]),
  }
  requested = _serve(monkeypatch, files)
  builder = _prepared("ham10000", tmp_path, config="isic2018")
  assert sorted(requested) == sorted(files)
  examples = _examples(builder)
  assert _labels_and_groups(examples) == {
      image: (dx, lesion or image) for image, lesion, dx in _HAM_ROWS}
  for member, data in images.items():
    if member.endswith(".jpg"):
      assert examples[pathlib.PurePath(member).stem]["image"] == data


def test_isic2017_download_keeps_official_splits(tmp_path, monkeypatch):
  files = {}
  split_ids = {}
  for i, tag in enumerate(["Training", "Validation", "Test_v2"]):
    ids = [f"ISIC_00{i}0000", f"ISIC_00{i}0001"]
    split_ids[tag] = ids
    files[f"{_BUCKET}/2017/ISIC-2017_{tag}_Data.zip"] = _zip(
        tmp_path / "web" / f"{tag}.zip",
        _jpegs(f"ISIC-2017_{tag}_Data", ids, seed=10 * i))
    files[f"{_BUCKET}/2017/ISIC-2017_{tag}_Part3_GroundTruth.csv"] = _write_csv(
        tmp_path / "web" / f"{tag}.csv",
        ["image_id", "melanoma", "seborrheic_keratosis"],
        [[ids[0], "1.0", "0.0"], [ids[1], "0.0", "1.0"]])
  requested = _serve(monkeypatch, files)
  builder = _prepared("isic2017", tmp_path, config="official")
  assert sorted(requested) == sorted(files)
  for split, tag in [("train", "Training"), ("validation", "Validation"),
                     ("test", "Test_v2")]:
    ids = split_ids[tag]
    assert _labels_and_groups(_examples(builder, split)) == {
        ids[0]: ("melanoma", ids[0]), ids[1]: ("seborrheic_keratosis", ids[1])}


def _isic2019_web(tmp_path: pathlib.Path, image_rows
                  ) -> dict[str, pathlib.Path]:
  web = tmp_path / "web"
  _isic2019_csvs(web)
  return {
      f"{_BUCKET}/2019/ISIC_2019_Training_Input.zip": _zip(
          web / "input.zip",
          _jpegs("ISIC_2019_Training_Input", [r[0] for r in image_rows])),
      f"{_BUCKET}/2019/ISIC_2019_Training_GroundTruth.csv":
          web / "ISIC_2019_Training_GroundTruth.csv",
      f"{_BUCKET}/2019/ISIC_2019_Training_Metadata.csv":
          web / "ISIC_2019_Training_Metadata.csv",
  }


def test_isic2019_download(tmp_path, monkeypatch):
  files = _isic2019_web(tmp_path, _ISIC2019_ROWS)
  requested = _serve(monkeypatch, files)
  builder = _prepared("isic2019", tmp_path)
  assert sorted(requested) == sorted(files)
  assert _labels_and_groups(_examples(builder)) == _ISIC2019_EXPECTED


def test_archive_missing_an_image_names_it(tmp_path, monkeypatch):
  _serve(monkeypatch, _isic2019_web(tmp_path, _ISIC2019_ROWS[:-1]))
  builder = builders.get_builder("isic2019", data_dir=tmp_path / "tfds")
  with pytest.raises(builders.ManualDataError, match="ISIC_0000003"):
    builders.prepare(builder)


def test_isic2020_download(tmp_path, monkeypatch):
  files = {
      f"{_BUCKET}/2020/ISIC_2020_Training_JPEG.zip": _zip(
          tmp_path / "web" / "jpeg.zip",
          _jpegs("train", [row[0] for row in _ISIC2020_ROWS])),
      f"{_BUCKET}/2020/ISIC_2020_Training_GroundTruth.csv": _write_csv(
          tmp_path / "web" / "truth.csv", _ISIC2020_HEADER, _ISIC2020_ROWS),
  }
  requested = _serve(monkeypatch, files)
  examples = _examples(_prepared("isic2020", tmp_path))
  assert sorted(requested) == sorted(files)
  assert {k: (v["label"], v["group_id"], v["diagnosis"])
          for k, v in examples.items()} == _ISIC2020_EXPECTED


# --------------------------------------------------------- real HAM10000 --


@pytest.fixture(scope="session")
def real_ham10000(ham10000_dir, tmp_path_factory):
  """The real HAM10000 prepared once per session into a fresh data_dir."""
  builder = builders.get_builder(
      "ham10000", data_dir=tmp_path_factory.mktemp("tfds_real"),
      manual_dir=ham10000_dir)
  start = time.perf_counter()
  builders.prepare(builder)
  print(f"\nprepared the real HAM10000 in {time.perf_counter() - start:.1f} s")
  return builder


def test_real_ham10000_counts(real_ham10000):
  dataset = real_ham10000.as_dataset(
      split="train", decoders={"image": tfds.decode.SkipDecoding()})
  dataset = dataset.map(lambda e: (e["label"], e["group_id"])).batch(4096)
  labels, groups = [], []
  for label_batch, group_batch in tfds.as_numpy(dataset):
    labels.extend(label_batch.tolist())
    groups.extend(group_batch.tolist())
  names = real_ham10000.info.features["label"].names
  assert collections.Counter(names[i] for i in labels) == {
      "nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327,
      "vasc": 142, "df": 115}
  assert len(labels) == 10_015
  assert len(set(groups)) == 7_470


def test_real_ham10000_bytes_unchanged(real_ham10000, ham10000_dir):
  dataset = real_ham10000.as_dataset(
      split="train", decoders={"image": tfds.decode.SkipDecoding()}).take(20)
  for example in tfds.as_numpy(dataset):
    image_id = example["image_id"].decode()
    assert example["image"] == (
        ham10000_dir / "images" / f"{image_id}.jpg").read_bytes()
