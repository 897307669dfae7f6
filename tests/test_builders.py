"""TFDS builders on tiny generated folders, and on the real HAM10000."""

from __future__ import annotations

import collections
import csv
import io
import logging
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
  _write_image(folder / "images" / "IMD999.bmp", 9)  # Not listed: ignored.
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


# PH2 as its authors publish it (the PH2Dataset archive). Name -> Clinical
# Diagnosis code (0 common nevus, 1 atypical nevus, 2 melanoma).
_PH2_DIAGNOSES = {"IMD002": 0, "IMD003": 1, "IMD009": 2, "IMD010": 0}
_PH2_TXT_HEADER = (
    "||   Name  | Histological Diagnosis | Clinical Diagnosis | Asymmetry | "
    "Pigment Network | Dots/Globules | Streaks | Regression Areas | "
    "Blue-Whitish Veil | Colors ||")
_PH2_TXT_LEGEND = """
Legends:

 Clinical Diagnosis:
    0 - Common Nevus;
    1 - Atypical Nevus;
    2 - Melanoma.

 Asymmetry:
    0 - Fully Symmetric; 1 - Symetric in 1 axe; 2 - Fully Asymmetric.
"""


def _ph2_archive(root: pathlib.Path, diagnoses=None) -> dict[str, np.ndarray]:
  """The images of the archive: a folder per image; returns their pixels.

  Beside each dermoscopic image lie the lesion mask and the ROI folder, which
  must not be read, and an image no table lists (IMD999), to be ignored.
  """
  pixels = {}
  for seed, name in enumerate(list(diagnoses or _PH2_DIAGNOSES) + ["IMD999"]):
    case = root / "PH2 Dataset images" / name
    pixels[name] = _write_image(
        case / f"{name}_Dermoscopic_Image" / f"{name}.bmp", seed)
    _write_image(case / f"{name}_lesion" / f"{name}_lesion.bmp", 50 + seed)
    _write_image(case / f"{name}_roi" / f"{name}_R1_Label1.bmp", 80 + seed)
  return pixels


def _ph2_txt(path: pathlib.Path, diagnoses=None) -> pathlib.Path:
  """PH2_dataset.txt as published: |-separated cells, blank lines, legend."""
  rows = [f"|| {name} | {'Melanoma' if code == 2 else ''} | {code} | 0 | T | "
          f"A | A | A | A | 3 4 ||"
          for name, code in (diagnoses or _PH2_DIAGNOSES).items()]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(_PH2_TXT_HEADER + "\n\n" + "\n".join(rows) + "\n\n"
                  + _PH2_TXT_LEGEND, encoding="utf-8")
  return path


def _xlsx_cell(reference: str, value) -> str:
  if value is None:
    return ""
  if isinstance(value, int):
    return f'<c r="{reference}"><v>{value}</v></c>'
  if isinstance(value, tuple):  # (index in sharedStrings,)
    return f'<c r="{reference}" t="s"><v>{value[0]}</v></c>'
  text = value.replace("&", "&amp;").replace("<", "&lt;")
  return f'<c r="{reference}" t="inlineStr"><is><t>{text}</t></is></c>'


def _write_xlsx(path: pathlib.Path, rows: list[list]) -> pathlib.Path:
  """A minimal one-sheet .xlsx; a cell is None, an int, a str (inline) or a
  1-tuple (an index into the shared strings 'X', 'Melanoma')."""
  main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
  rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
  package = "http://schemas.openxmlformats.org/package/2006/relationships"
  xml_rows = []
  for number, cells in enumerate(rows, start=1):
    xml = "".join(_xlsx_cell(f"{chr(ord('A') + i)}{number}", value)
                  for i, value in enumerate(cells))
    xml_rows.append(f'<row r="{number}">{xml}</row>')
  members = {
      "[Content_Types].xml": (
          '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://'
          'schemas.openxmlformats.org/package/2006/content-types"><Default '
          'Extension="xml" ContentType="application/xml"/></Types>'),
      "xl/workbook.xml": (
          f'<workbook xmlns="{main}" xmlns:r="{rel}"><sheets><sheet '
          'name="PH2" sheetId="1" r:id="rId1"/></sheets></workbook>'),
      "xl/_rels/workbook.xml.rels": (
          f'<Relationships xmlns="{package}"><Relationship Id="rId1" '
          f'Type="{rel}/worksheet" Target="worksheets/sheet1.xml"/>'
          "</Relationships>"),
      "xl/worksheets/sheet1.xml": (
          f'<worksheet xmlns="{main}"><sheetData>{"".join(xml_rows)}'
          "</sheetData></worksheet>"),
      "xl/sharedStrings.xml": (
          f'<sst xmlns="{main}"><si><t>X</t></si><si><r><t>Mela</t></r>'
          "<r><t>noma</t></r></si></sst>"),
  }
  return _zip(path, {k: v.encode() for k, v in members.items()})


def _ph2_xlsx(path: pathlib.Path, diagnoses=None, name_on_group_row=False
              ) -> pathlib.Path:
  """PH2_dataset.xlsx as published: title rows, a 'Clinical Diagnosis' group
  header over one X-marked column per class, the legend below the data.

  `name_on_group_row` puts 'Image Name' on the group header's row (as a cell
  merged over both header rows keeps it) instead of the class names' row.
  """
  name = "Image Name"
  rows = [["PH2 Database - Dermoscopic images"], [],
          [name if name_on_group_row else None, None, "Clinical Diagnosis",
           None, None, "Asymmetry"],
          [None if name_on_group_row else name, "Histological Diagnosis",
           "Common Nevus", "Atypical Nevus", (1,), "(0/1/2)"]]
  for name, code in (diagnoses or _PH2_DIAGNOSES).items():
    marks = [None, None, None]
    marks[code] = (0,) if code != 1 else "x"  # shared and inline strings
    rows.append([name, (1,) if code == 2 else None, *marks, 0])
  rows += [[], ["Legend:"], ["Asymmetry", None, None, None, None,
                             "0 - Fully Symmetric"]]
  return _write_xlsx(path, rows)


def _ph2_expected(diagnoses=None) -> dict[str, tuple[str, str]]:
  names = builders.Ph2.CLASS_NAMES
  return {name: (names[code], name)
          for name, code in (diagnoses or _PH2_DIAGNOSES).items()}


def test_ph2_published_txt_from_the_folder_above(tmp_path):
  # The archive unpacked inside the manual folder: found one level down.
  archive = tmp_path / "manual" / "PH2Dataset"
  pixels = _ph2_archive(archive)
  _ph2_txt(archive / "PH2_dataset.txt")
  builder = _prepared("ph2", tmp_path, tmp_path / "manual")
  examples = _examples(builder)
  assert _labels_and_groups(examples) == _ph2_expected()
  # The dermoscopic image, not the lesion mask or the ROI beside it.
  for name in _PH2_DIAGNOSES:
    np.testing.assert_array_equal(
        np.asarray(PIL.Image.open(io.BytesIO(examples[name]["image"]))),
        pixels[name])


@pytest.mark.parametrize("name_on_group_row", [False, True])
def test_ph2_published_xlsx(tmp_path, name_on_group_row):
  folder = tmp_path / "PH2Dataset"
  _ph2_archive(folder)
  _ph2_xlsx(folder / "PH2_dataset.xlsx", name_on_group_row=name_on_group_row)
  builder = _prepared("ph2", tmp_path, folder)
  assert _labels_and_groups(_examples(builder)) == _ph2_expected()


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0)])
def test_ph2_txt_with_double_bars_and_code_column_xlsx(tmp_path, order):
  """The txt with || between column groups, its columns found by their
  header in any order (a ruling line under it); an xlsx with a code column.
  """
  folder = tmp_path / "PH2Dataset"
  _ph2_archive(folder)
  first = ["  Name", "Histological Diagnosis", "Clinical Diagnosis"]
  lines = ["|| " + " || ".join(first[i] for i in order)
           + " || Asymmetry | Pigment Network || Colors ||", "|-----||-----||"]
  for name, code in _PH2_DIAGNOSES.items():
    cells = [name, "      ", f"  {code}"]
    lines.append("|| " + " || ".join(cells[i] for i in order)
                 + " ||  0 | T ||  3  4 ||")
  (folder / "PH2_dataset.txt").write_text(
      "\n".join(lines) + "\n" + _PH2_TXT_LEGEND, encoding="utf-8")
  _write_xlsx(folder / "PH2_dataset.xlsx", [["PH2"], [
      "Name", "Clinical Diagnosis"]] + [
          [name, code] for name, code in _PH2_DIAGNOSES.items()])
  builder = _prepared("ph2", tmp_path, folder)
  assert _labels_and_groups(_examples(builder)) == _ph2_expected()


@pytest.mark.parametrize("changed, message", [
    ({"IMD009": 1}, r"IMD009: \S*PH2_dataset.txt, line \d+ says '2' "
                    r"\(melanoma\); \S*PH2_dataset.xlsx, sheet 'PH2' row \d+ "
                    r"says \"Atypical Nevus='x'\" \(atypical_nevus\)"),
    ({"IMD004": 0}, r"IMD004: \S*PH2_dataset.txt does not list it"),
], ids=["class", "listed_in_one"])
def test_ph2_txt_and_xlsx_must_agree(tmp_path, changed, message):
  folder = tmp_path / "PH2Dataset"
  _ph2_archive(folder)
  _ph2_txt(folder / "PH2_dataset.txt")
  _ph2_xlsx(folder / "PH2_dataset.xlsx", {**_PH2_DIAGNOSES, **changed})
  builder = builders.get_builder("ph2", data_dir=tmp_path / "tfds",
                                 manual_dir=folder)
  with pytest.raises(ValueError, match=message):
    builders.prepare(builder)


_PH2_CSV_HEADER = ["Name", "Histological Diagnosis", "Clinical Diagnosis",
                   "Asymmetry"]
# The legend rows of the spreadsheet, as a CSV export carries them.
_PH2_CSV_LEGEND = [["", "", "", ""], ["Legends:", "", "", ""],
                   ["Clinical Diagnosis", "", "", "0 - Common Nevus"],
                   ["", "", "", "1 - Atypical Nevus"]]


def _ph2_csv_folder(root: pathlib.Path, rows: list[list]) -> pathlib.Path:
  for seed, name in enumerate(list(_PH2_DIAGNOSES) + ["IMD999"]):
    _write_image(root / "images" / f"{name}.bmp", seed)
  _write_csv(root / "PH2_dataset.csv", _PH2_CSV_HEADER, rows)
  return root


def test_ph2_csv_export_skips_the_legend(tmp_path, caplog):
  rows = [[name, "", str(code), "0"] for name, code in _PH2_DIAGNOSES.items()]
  folder = _ph2_csv_folder(tmp_path / "ph2", rows + _PH2_CSV_LEGEND)
  with caplog.at_level(logging.INFO):
    builder = _prepared("ph2", tmp_path, folder)
  assert _labels_and_groups(_examples(builder)) == _ph2_expected()
  # Lines 2-5 hold the data, 6 is blank, the legend is lines 7 to 9.
  notes = [r.getMessage() for r in caplog.records if "legend" in r.getMessage()]
  assert len(notes) == 1 and "skipped 3 " in notes[0]
  assert "from line 7 on" in notes[0], notes


@pytest.mark.parametrize("change, message", [
    # A data row with an image name and no (or a bad) diagnosis.
    ({1: ["IMD003", "", "", "0"]},
     r"PH2_dataset.csv, line 3: Clinical Diagnosis of IMD003 must be 0, 1 or "
     r"2, got ''"),
    ({3: ["IMD010", "", "3", "0"]},
     r"PH2_dataset.csv, line 5: Clinical Diagnosis of IMD010 must be 0, 1 or "
     r"2, got '3'"),
    # The last data row, just above the legend, is still data.
    ({3: ["IMD010", "", "", "0"]},
     r"PH2_dataset.csv, line 5: Clinical Diagnosis of IMD010 must be 0, 1 or "
     r"2, got ''"),
    # A diagnosis on a row whose Name is no image name, within the data.
    ({1: ["IMD 003", "", "1", "0"]},
     r"PH2_dataset.csv, line 3: Name 'IMD 003' is not an image name"),
    # A diagnosis below the last image row is not legend.
    ({5: ["Legends:", "", "2", ""]},
     r"PH2_dataset.csv, line 7: Clinical Diagnosis '2' on a row whose Name "
     r"'Legends:' is not an image name"),
], ids=["no_code", "bad_code", "last_row_no_code", "bad_name",
        "code_in_legend"])
def test_ph2_csv_malformed_data_row_names_the_line(tmp_path, change, message):
  rows = [[name, "", str(code), "0"] for name, code in _PH2_DIAGNOSES.items()]
  rows += _PH2_CSV_LEGEND
  for index, row in change.items():
    rows[index] = row
  folder = _ph2_csv_folder(tmp_path / "ph2", rows)
  builder = builders.get_builder("ph2", data_dir=tmp_path / "tfds",
                                 manual_dir=folder)
  with pytest.raises(ValueError, match=message):
    builders.prepare(builder)


def test_ph2_txt_damaged_row_names_the_line(tmp_path):
  folder = tmp_path / "PH2Dataset"
  _ph2_archive(folder)
  path = _ph2_txt(folder / "PH2_dataset.txt")
  lines = path.read_text().splitlines()
  # The last data row (line 6) loses two cells: not taken for legend.
  lines[5] = "|| IMD010 | 0 | 0 | T | A | A | A | A ||"
  path.write_text("\n".join(lines))
  builder = builders.get_builder("ph2", data_dir=tmp_path / "tfds",
                                 manual_dir=folder)
  with pytest.raises(ValueError, match=(
      r"PH2_dataset.txt, line 6: 8 cells, but the header \(line 1\) has 10, "
      "and it names image IMD010")):
    builders.prepare(builder)


def test_ph2_missing_image_names_it_and_the_paths_tried(tmp_path):
  folder = tmp_path / "PH2Dataset"
  _ph2_archive(folder)
  _ph2_txt(folder / "PH2_dataset.txt", {**_PH2_DIAGNOSES, "IMD004": 1})
  builder = builders.get_builder("ph2", data_dir=tmp_path / "tfds",
                                 manual_dir=folder)
  with pytest.raises(builders.ManualDataError) as error:
    builders.prepare(builder)
  message = str(error.value)
  tried = folder / "PH2 Dataset images" / "IMD004" / "IMD004_Dermoscopic_Image"
  assert "no image for IMD004 (listed at " in message
  assert "PH2_dataset.txt, line 7)" in message
  assert str(tried / "IMD004.bmp") in message
  assert str(tried / "IMD004.jpg") in message


def test_ph2_folder_must_be_unambiguous(tmp_path):
  manual = tmp_path / "manual"
  for copy in ("PH2Dataset", "PH2Dataset_copy"):
    (manual / copy / "PH2 Dataset images").mkdir(parents=True)
  builder = builders.get_builder("ph2", data_dir=tmp_path / "tfds",
                                 manual_dir=manual)
  with pytest.raises(ValueError, match="2 subfolders with 'PH2 Dataset "
                     "images'.*PH2Dataset, .*PH2Dataset_copy"):
    builders.prepare(builder)
  # Nothing to find: the error lists every place looked at.
  empty = tmp_path / "empty"
  (empty / "notes").mkdir(parents=True)
  builder = builders.get_builder("ph2", data_dir=tmp_path / "tfds",
                                 manual_dir=empty)
  with pytest.raises(builders.ManualDataError) as error:
    builders.prepare(builder)
  for looked in (empty / "PH2 Dataset images", empty / "images",
                 empty / "*" / "PH2 Dataset images",
                 empty / "PH2_dataset.txt", empty / "PH2_dataset.xlsx",
                 empty / "PH2_dataset.csv"):
    assert str(looked) in str(error.value)


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
