"""TensorFlow Datasets builders for the dermoscopy datasets of the two papers.

Five `tfds.core.GeneratorBasedBuilder`s, all with the same example contract:

  image     tfds.features.Image (None, None, 3), uint8. The original JPEG or PNG
            bytes of the source file, stored as they are (never re-encoded, so
            no second JPEG loss); any other format (PH2's BMP) and JPEG/PNG
            images not in RGB or grey (CMYK, RGBA, palette, 16 bit) are
            converted to an RGB PNG, which is lossless.
  label     tfds.features.ClassLabel with the dataset's own class names, in
            the order of the builder's `CLASS_NAMES`.
  group_id  Text: lesion id (HAM10000, ISIC 2019) or patient id (ISIC 2020);
            the image id where the dataset has none (PH2, ISIC 2017, empty
            lesion ids of ISIC 2019). Splits must never put one group in two
            splits, or near-identical images leak from train into test.
  image_id  Text: the file stem (ISIC_0024306, IMD002, ...).

ISIC 2020 adds `diagnosis` (Text, its free-text diagnosis column).

Datasets, label order (`CLASS_NAMES`) and configs:

  ham10000  mel, nv, bcc, akiec, bkl, df, vasc (the ISIC 2018 Task 3
            ground-truth column order). Config `folder`: a manual folder with
            `HAM10000_metadata.csv` and `images/` (the layout of the
            Harvard Dataverse release, or of ../shared/data/ham10000).
            Config `isic2018`: downloads the ISIC 2018 Task 3 training archives
            (the same 10,015 images at 600x450, one-hot ground truth, lesion
            groupings).
  ph2       common_nevus, atypical_nevus, melanoma (PH2's Clinical Diagnosis
            codes 0, 1, 2). Config `folder` only: PH2 has no download URL.
  isic2017  nevus, melanoma, seborrheic_keratosis. Configs `folder` and
            `official`; splits train/validation/test are the official ones.
  isic2019  mel, nv, bcc, ak, bkl, df, vasc, scc, unk (ground-truth column
            order). Configs `folder` and `official`.
  isic2020  benign, malignant. Configs `folder` and `official`.

Every builder has `DIAGNOSES`, mapping each class name to a canonical diagnosis
shared across datasets, so that tasks (melanoma vs nevus, malignant vs benign)
are defined once. Two mappings are approximations worth knowing:
HAM10000 `bkl` ("benign keratosis-like": seborrheic keratoses, solar lentigines
and lichen-planus like keratoses) stays `bkl`, not `seborrheic_keratosis`; ISIC
2019 `ak` (actinic keratosis; its intraepithelial carcinomas moved to `scc`)
maps to HAM10000's `akiec`. ISIC 2020's malignant cases are all melanomas, so
`malignant` maps to `melanoma`.

Only the `train` split exists except for ISIC 2017: the project makes its own
grouped, stratified splits from it.

Usage:

  builder = get_builder('ham10000', data_dir='/tmp/tfds')  # finds the folder
  prepare(builder)                                          # idempotent
  ds = builder.as_dataset(split='train')

A dataset prepared from a manual folder lives in
`data_dir/sources/<fingerprint>/<name>/<config>/<version>`, where the fingerprint
(`source_fingerprint`) hashes the folder's file list with every file's size and
modification time and the contents of its metadata files (CSV, TXT, XLSX). A
folder that changed in any way (a row removed from the CSV, an image replaced,
added or deleted) has another fingerprint and is prepared again into its own
folder, so stale data is never reused; preparing again was chosen over stopping
with an error because the old version stays usable for the runs made from it
and a user has nothing to delete or rename. An unchanged folder is reused, from
any path. Downloads (the `isic2018` and `official` configs) live in
`data_dir/<name>/<config>/<version>` as TFDS puts them.

Errors name what to fix. A missing or incomplete manual folder raises
`ManualDataError` (a FileNotFoundError) that lists the absent files, or the
first missing images of the CSV with their expected paths, and then says what
to download, from where, and where in that folder to put it
(`MANUAL_DOWNLOAD_INSTRUCTIONS`, the TFDS convention). An image that does not
decode raises `CorruptImageError` naming its file; every image is decoded
while generating, so damage shows here and not in a training job. A CSV
without a required column, or with a bad value, raises ValueError naming the
file, the column and the line.

Downloads and checksums. The `isic2018` and `official` configs fetch the
public archives of the ISIC challenge bucket through `dl_manager`, so TFDS
caches them in `data_dir/downloads`, records their size and SHA-256 and, once
registered, verifies them on every download (a mismatch raises
`NonMatchingChecksumError`). No checksum is registered in this repository yet
(the archives could not be fetched where this was written). A maintainer
registers them once, with internet, from an editable install (`pip install
-e .`), for each download config:

  python -c "from comtriplet_jax.data import builders as b; \
      b.prepare(b.get_builder('ham10000', config='isic2018'), \
                register_checksums=True)"

or, where apache-beam is installed (the `tfds` command of
tensorflow-datasets 4.9 imports it at start-up),

  tfds build ham10000 --config=isic2018 \
      --imports=comtriplet_jax.data.builders --register_checksums

Either writes `comtriplet_jax/data/checksums.tsv` (url, size, sha256, file
name) beside this module, shared by all five builders. Commit it and ship it
as package data. Once it is there, archives already on disk can also be put
in the manual folder under their official names and TFDS uses them instead of
downloading.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import io
import os
import pathlib
import posixpath
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar
from xml.etree import ElementTree

from absl import logging
from etils import epath
import PIL.Image
import tensorflow_datasets as tfds

from comtriplet_jax import faults
from comtriplet_jax.data import paths

FOLDER = "folder"

MALIGNANT_DIAGNOSES = frozenset({"melanoma", "bcc", "akiec", "scc"})
CANONICAL_DIAGNOSES = frozenset({
    "melanoma", "nevus", "atypical_nevus", "bcc", "akiec", "bkl",
    "seborrheic_keratosis", "df", "vasc", "scc", "unknown", "benign",
})

_ISIC_BUCKET = "https://isic-challenge-data.s3.amazonaws.com"
_ISIC_PAGE = "https://challenge.isic-archive.com/data/"
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
# Formats a tf.image.decode_image reads to 3 channels with no loss; anything
# else is converted to PNG once, here, instead of in every training job.
_STORED_FORMATS = frozenset({"JPEG", "PNG"})
_STORED_MODES = frozenset({"RGB", "L"})
# Missing images listed in one error message.
_SHOW_MISSING = 5


class ManualDataError(FileNotFoundError):
  """The manual folder or a downloaded archive lacks files the builder needs."""


class CorruptImageError(ValueError):
  """An image file cannot be decoded; the message names the file."""


# ------------------------------------------------------------------- CSV ----


@dataclasses.dataclass(frozen=True)
class _CsvRow:
  """One data row of a CSV file: its line number and stripped values."""
  path: pathlib.Path
  line: int
  values: Mapping[str, str]

  def __getitem__(self, column: str) -> str:
    return self.values[column]

  def get(self, column: str, default: str = "") -> str:
    return self.values.get(column, default)

  def where(self) -> str:
    return f"{self.path}, line {self.line}"


def _read_csv(path: pathlib.Path, required: Sequence[str]) -> list[_CsvRow]:
  """Reads a CSV with a header row into rows of stripped strings.

  Tolerates a UTF-8 byte-order mark, whitespace around headers and values, and
  blank lines, which the hand-made CSVs of PH2 and others contain.

  Args:
    path: the CSV file.
    required: columns that must be in the header.

  Returns:
    The non-blank data rows.

  Raises:
    ValueError: naming the file and the problem, if the header lacks a
      required column, repeats a column, or a row has the wrong field count.
  """
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    header = [name.strip() for name in next(reader, [])]
    missing = [name for name in required if name not in header]
    if missing:
      raise ValueError(
          f"{path}: missing required column(s) {', '.join(map(repr, missing))}"
          f"; the header has {header}")
    if len(set(header)) != len(header):
      raise ValueError(f"{path}: repeated column names in header {header}")
    rows = []
    for fields in reader:
      if not any(field.strip() for field in fields):
        continue
      if len(fields) != len(header):
        raise ValueError(
            f"{path}, line {reader.line_num}: {len(fields)} fields, but the "
            f"header has {len(header)} columns")
      rows.append(_CsvRow(
          path=path, line=reader.line_num,
          values={k: v.strip() for k, v in zip(header, fields)}))
  return rows


def _binary(row: _CsvRow, column: str) -> int:
  """A 0/1 cell, written as 0, 1, 0.0 or 1.0 in the ISIC ground truths."""
  value = row[column]
  try:
    number = float(value)
  except ValueError:
    number = None
  if number not in (0.0, 1.0):
    raise ValueError(
        f"{row.where()}: column {column!r} must be 0 or 1, got {value!r}")
  return int(number)


def _one_hot_class(row: _CsvRow, columns: Sequence[str]) -> int:
  """Index of the one column set to 1 in a one-hot ground-truth row."""
  hot = [i for i, column in enumerate(columns) if _binary(row, column)]
  if len(hot) != 1:
    raise ValueError(
        f"{row.where()}: expected exactly one of {list(columns)} to be 1, got "
        f"{[row[c] for c in columns]}")
  return hot[0]


# --------------------------------------------------------------- records ----


@dataclasses.dataclass(frozen=True)
class _Record:
  """What the CSVs say about one image; the pixels come separately."""
  image_id: str
  label: str
  group_id: str
  extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _by_image_id(rows: Sequence[_CsvRow], records: Sequence[_Record]
                 ) -> dict[str, _Record]:
  """Records keyed by image id; `rows[i]` is the CSV row of `records[i]`."""
  by_id: dict[str, _Record] = {}
  first_row: dict[str, _CsvRow] = {}
  for row, record in zip(rows, records, strict=True):
    if not record.image_id:
      raise ValueError(f"{row.where()}: empty image id")
    if record.image_id in by_id:
      raise ValueError(
          f"{row.where()}: image {record.image_id} is listed twice (first at "
          f"line {first_row[record.image_id].line})")
    by_id[record.image_id] = record
    first_row[record.image_id] = row
  return by_id


def _lookup(rows: Sequence[_CsvRow], key: str) -> dict[str, _CsvRow]:
  """Rows keyed by the value of column `key` (e.g. the metadata's image)."""
  table: dict[str, _CsvRow] = {}
  for row in rows:
    if row[key] in table:
      raise ValueError(f"{row.where()}: {key} {row[key]!r} is listed twice")
    table[row[key]] = row
  return table


# ---------------------------------------------------------------- images ----


def _storable_image(data: bytes, location: str) -> bytes:
  """The bytes to store for one image, after checking that it decodes.

  JPEG and PNG files in RGB or grey are returned unchanged; other formats and
  modes become an RGB PNG. JPEGs are decoded at 1/8 scale (libjpeg's DCT
  scaling still reads every entropy-coded segment, so truncation is caught)
  which costs ~0.1 ms for a HAM10000 image.

  Args:
    data: the file's bytes.
    location: the file (or archive member) to name in errors.

  Returns:
    Encoded JPEG or PNG bytes.

  Raises:
    CorruptImageError: naming `location`, if the bytes do not decode.
  """
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      image_format, mode = image.format, image.mode
      if image_format == "JPEG":
        image.draft(mode, (max(1, image.width // 8), max(1, image.height // 8)))
      image.load()
    if image_format in _STORED_FORMATS and mode in _STORED_MODES:
      return data
    with PIL.Image.open(io.BytesIO(data)) as image:
      rgb = image.convert("RGB")
    encoded = io.BytesIO()
    rgb.save(encoded, format="PNG")
    return encoded.getvalue()
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError
          ) as e:
    raise CorruptImageError(f"cannot decode image {location}: {e}") from e


def _index_images(folder: pathlib.Path, subdirs: Sequence[str]
                  ) -> dict[str, pathlib.Path]:
  """Image files directly inside `folder/subdir`, keyed by file stem.

  Raises:
    ValueError: if two files share a stem (e.g. IMD002.bmp and IMD002.jpg),
      since silently picking one would make the dataset depend on listing
      order.
  """
  index: dict[str, pathlib.Path] = {}
  for subdir in subdirs:
    directory = folder / subdir
    if not directory.is_dir():
      continue
    with os.scandir(directory) as entries:
      for entry in entries:
        stem, suffix = os.path.splitext(entry.name)
        if suffix.lower() not in _IMAGE_SUFFIXES or not entry.is_file():
          continue
        if stem in index:
          raise ValueError(
              f"two image files for {stem}: {index[stem]} and {entry.path}; "
              "keep one")
        index[stem] = pathlib.Path(entry.path)
  return index


def _find_file(root: pathlib.Path, name: str) -> pathlib.Path:
  """`root/name`, or the one file of that name below `root` (in an archive)."""
  if (root / name).is_file():
    return root / name
  found = sorted(root.rglob(name))
  if not found:
    raise ManualDataError(f"no file {name} in {root}")
  return found[0]


# -------------------------------------------------------------- builders ----


class _SkinLesionBuilder(tfds.core.GeneratorBasedBuilder,
                         skip_registration=True):
  """What the five builders share: features, folder checks, generation.

  A subclass gives its class names, diagnoses, configs, instructions and
  `_folder_splits`; if it can download, `DOWNLOAD_CONFIG` and
  `_download_splits`. Each split maps to `_generate_examples(records, images,
  source)`, where the images come from files or from archive members.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}

  CLASS_NAMES: ClassVar[tuple[str, ...]] = ()
  DIAGNOSES: ClassVar[dict[str, str]] = {}
  # Name of the config that downloads the official archives; None: manual.
  DOWNLOAD_CONFIG: ClassVar[str | None] = None
  HOMEPAGE: ClassVar[str] = ""
  DESCRIPTION: ClassVar[str] = ""
  CITATION: ClassVar[str] = ""

  def __init__(self, *, manual_dir: str | os.PathLike[str] | None = None,
               **kwargs: Any):
    """As `tfds.core.DatasetBuilder`, plus the manual folder for `prepare`.

    Args:
      manual_dir: the folder `prepare` passes to TFDS as the manual dir;
        None leaves TFDS's default (`data_dir/downloads/manual`).
      **kwargs: `data_dir`, `config`, `version`, `file_format`.
    """
    super().__init__(**kwargs)
    self.manual_dir = (None if manual_dir is None
                       else pathlib.Path(manual_dir).expanduser())
    # Kept through pickling, which rebuilds the builder from this dict.
    self._original_state["manual_dir"] = manual_dir

  # TFDS finds a builder's file (and so checksums.tsv beside it) through
  # importlib_resources, which tensorflow-datasets 4.9 only installs on
  # Python < 3.9; every builder here lives in this file.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {}

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        "image": tfds.features.Image(
            shape=(None, None, 3), encoding_format=None,
            doc="original JPEG/PNG bytes of the file; other formats as PNG"),
        "label": tfds.features.ClassLabel(names=self.CLASS_NAMES),
        "group_id": tfds.features.Text(
            doc="lesion or patient id; the image id when there is none"),
        "image_id": tfds.features.Text(doc="file stem of the image"),
        **self._extra_features(),
    }
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        supervised_keys=("image", "label"),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        # Records the manual folder the data came from (see `prepare`).
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    if self.builder_config.name != FOLDER:
      return self._download_splits(dl_manager)
    try:
      folder = pathlib.Path(dl_manager.manual_dir)
    except AssertionError as e:
      # TFDS's message names the missing or empty folder and appends
      # MANUAL_DOWNLOAD_INSTRUCTIONS; re-raised as a FileNotFoundError.
      raise ManualDataError(f"{self.name}: {e}") from e
    self.info.metadata["source"] = str(folder.resolve())
    return self._folder_splits(folder)

  @abc.abstractmethod
  def _folder_splits(self, folder: pathlib.Path) -> dict[str, Iterator]:
    """Split name -> example generator, from the manual folder."""

  def _download_splits(self, dl_manager: tfds.download.DownloadManager
                       ) -> dict[str, Iterator]:
    """Split name -> example generator, from the official archives."""
    raise ValueError(f"{self.name} has no download config")

  def _generate_examples(self, records: Mapping[str, _Record],
                         images: Iterable[tuple[str, str, bytes]],
                         source: str):
    """Yields (image id, example) for each record, as its image arrives.

    Args:
      records: what the CSVs say, keyed by image id.
      images: (image id, location for errors, file bytes), only for ids in
        `records`; from a folder in CSV order, or in archive order.
      source: the folder or archive, to name in the error for missing images.

    Raises:
      CorruptImageError: an image does not decode.
      ManualDataError: some records got no image.
    """
    seen = set()
    for image_id, location, data in images:
      faults.point("prepare")
      if image_id in seen:
        raise ValueError(f"{location}: a second image file for {image_id}")
      seen.add(image_id)
      record = records[image_id]
      yield image_id, {
          "image": _storable_image(data, location),
          "label": record.label,
          "group_id": record.group_id,
          "image_id": image_id,
          **record.extras,
      }
    missing = sorted(records.keys() - seen)
    if missing:
      raise ManualDataError(
          f"{self.name}: {source} has no image for {len(missing)} listed "
          f"image(s), e.g. {missing[:_SHOW_MISSING]}")

  # --- helpers for subclasses ---

  def _instructions(self, folder: pathlib.Path) -> str:
    return self.MANUAL_DOWNLOAD_INSTRUCTIONS.replace("<manual_dir>",
                                                     str(folder))

  def _incomplete(self, folder: pathlib.Path, problems: Sequence[str]
                  ) -> ManualDataError:
    listed = "".join(f"  - {problem}\n" for problem in problems)
    return ManualDataError(
        f"{self.name}: the manual folder {folder} is incomplete:\n{listed}"
        f"What to download, from where, and where to put it:\n"
        f"{self._instructions(folder)}")

  def _check_folder(self, folder: pathlib.Path, files: Sequence[str],
                    image_dirs: Sequence[str]) -> None:
    """Raises ManualDataError listing the required files and folders absent."""
    problems = [f"missing file {folder / name}" for name in files
                if not (folder / name).is_file()]
    if not any((folder / d).is_dir() for d in image_dirs):
      problems.append("missing image folder " + " or ".join(
          str(folder / d) for d in image_dirs))
    if problems:
      raise self._incomplete(folder, problems)

  def _label(self, row: _CsvRow, column: str) -> str:
    value = row[column]
    if value not in self.CLASS_NAMES:
      raise ValueError(
          f"{row.where()}: unknown {column} {value!r}; expected one of "
          f"{list(self.CLASS_NAMES)}")
    return value

  def _folder_examples(self, folder: pathlib.Path,
                       records: Mapping[str, _Record],
                       image_dirs: Sequence[str], csv_path: pathlib.Path,
                       suffix: str = ".jpg") -> Iterator:
    """Example generator for records whose images are files in `image_dirs`.

    Every file is located here, before generation starts, so a missing one
    fails at once; `suffix` only shapes the file name shown in that error.
    """
    index = _index_images(folder, image_dirs)
    missing = [image_id for image_id in records if image_id not in index]
    if missing:
      expected = [str(folder / image_dirs[0] / f"{image_id}{suffix}")
                  for image_id in missing[:_SHOW_MISSING]]
      raise self._incomplete(folder, [
          f"{csv_path.name} lists {len(missing)} image(s) with no file in "
          f"{' or '.join(image_dirs)}, e.g. {', '.join(expected)}"])
    images = ((image_id, str(index[image_id]), index[image_id].read_bytes())
              for image_id in records)
    return self._generate_examples(records, images, str(folder))

  def _archive_examples(self, dl_manager: tfds.download.DownloadManager,
                        archive: pathlib.Path, records: Mapping[str, _Record]
                        ) -> Iterator:
    """Example generator reading images straight from a zip, unextracted."""
    resource = tfds.download.Resource(
        path=archive, extract_method=tfds.download.ExtractMethod.ZIP)

    def images():
      for member, fobj in dl_manager.iter_archive(resource):
        stem, suffix = os.path.splitext(os.path.basename(member))
        if suffix.lower() in _IMAGE_SUFFIXES and stem in records:
          yield stem, f"{archive}:{member}", fobj.read()

    return self._generate_examples(records, images(), str(archive))


def _folder_config(description: str) -> tfds.core.BuilderConfig:
  return tfds.core.BuilderConfig(name=FOLDER, description=description)


class Ham10000(_SkinLesionBuilder):
  """HAM10000 (= ISIC 2018 Task 3 training set): 10,015 images, 7 classes."""

  name = "ham10000"
  CLASS_NAMES = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")
  DIAGNOSES = {
      "mel": "melanoma", "nv": "nevus", "bcc": "bcc", "akiec": "akiec",
      # Benign keratosis-like lesions: seborrheic keratoses together with
      # solar lentigines and lichen-planus like keratoses.
      "bkl": "bkl", "df": "df", "vasc": "vasc",
  }
  DOWNLOAD_CONFIG = "isic2018"
  BUILDER_CONFIGS = [
      _folder_config("HAM10000_metadata.csv + images/ in a manual folder."),
      tfds.core.BuilderConfig(
          name="isic2018",
          description="ISIC 2018 Task 3 training archives, downloaded."),
  ]
  HOMEPAGE = "https://doi.org/10.7910/DVN/DBW86T"
  DESCRIPTION = (
      "HAM10000: 10,015 dermoscopic images of 7,470 pigmented lesions in 7 "
      "diagnostic categories; group_id is the lesion id.")
  CITATION = """\
@article{tschandl2018ham10000,
  title={The {HAM10000} dataset, a large collection of multi-source
         dermatoscopic images of common pigmented skin lesions},
  author={Tschandl, Philipp and Rosendahl, Cliff and Kittler, Harald},
  journal={Scientific Data}, volume={5}, pages={180161}, year={2018}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  From the Harvard Dataverse (https://doi.org/10.7910/DVN/DBW86T) download
  HAM10000_images_part_1.zip, HAM10000_images_part_2.zip and the metadata
  file (original CSV format). Put in <manual_dir>:
    <manual_dir>/HAM10000_metadata.csv  (columns lesion_id,image_id,dx,...)
    <manual_dir>/images/ISIC_0024306.jpg, ... (all images of both zips), or
    the two unzipped folders <manual_dir>/HAM10000_images_part_1/ and
    <manual_dir>/HAM10000_images_part_2/ as they are.
  Or use config `isic2018`, which downloads the same images from the ISIC
  2018 challenge (https://challenge.isic-archive.com/data/#2018)."""

  _IMAGE_DIRS = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2")
  _METADATA = "HAM10000_metadata.csv"
  _URLS = {
      "images": f"{_ISIC_BUCKET}/2018/ISIC2018_Task3_Training_Input.zip",
      "ground_truth":
          f"{_ISIC_BUCKET}/2018/ISIC2018_Task3_Training_GroundTruth.zip",
      "groupings":
          f"{_ISIC_BUCKET}/2018/ISIC2018_Task3_Training_LesionGroupings.csv",
  }
  _ONE_HOT_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")

  def _folder_splits(self, folder: pathlib.Path) -> dict[str, Iterator]:
    self._check_folder(folder, [self._METADATA], self._IMAGE_DIRS)
    csv_path = folder / self._METADATA
    rows = _read_csv(csv_path, ("lesion_id", "image_id", "dx"))
    records = [
        _Record(image_id=row["image_id"], label=self._label(row, "dx"),
                group_id=row["lesion_id"] or row["image_id"])
        for row in rows
    ]
    return {"train": self._folder_examples(
        folder, _by_image_id(rows, records), self._IMAGE_DIRS, csv_path)}

  def _download_splits(self, dl_manager: tfds.download.DownloadManager
                       ) -> dict[str, Iterator]:
    files = dl_manager.download(
        {k: v for k, v in self._URLS.items() if k != "ground_truth"})
    truth_dir = dl_manager.download_and_extract(self._URLS["ground_truth"])
    truth_rows = _read_csv(
        _find_file(pathlib.Path(truth_dir),
                   "ISIC2018_Task3_Training_GroundTruth.csv"),
        ("image",) + self._ONE_HOT_COLUMNS)
    groups = _lookup(_read_csv(pathlib.Path(files["groupings"]),
                               ("image", "lesion_id")), "image")
    records = []
    for row in truth_rows:
      if row["image"] not in groups:
        raise ValueError(
            f"{row.where()}: image {row['image']} has no row in "
            f"{files['groupings']}")
      records.append(_Record(
          image_id=row["image"],
          label=self.CLASS_NAMES[_one_hot_class(row, self._ONE_HOT_COLUMNS)],
          group_id=groups[row["image"]]["lesion_id"] or row["image"]))
    return {"train": self._archive_examples(
        dl_manager, pathlib.Path(files["images"]),
        _by_image_id(truth_rows, records))}


# ------------------------------------------------------------------- PH2 ----

# An image name of PH2 (IMD002, ..., IMD437).
_PH2_IMAGE_ID = re.compile(r"IMD\d+")
# The archive's images folder (one folder per image) and the flat one.
_PH2_PUBLISHED_IMAGES = "PH2 Dataset images"
_PH2_FLAT_IMAGES = "images"
# The tables, in order of preference: the first present gives the labels and
# every other one present must agree with it.
_PH2_TABLES = ("PH2_dataset.txt", "PH2_dataset.xlsx", "PH2_dataset.csv")
_PH2_CODES = {"0": "common_nevus", "1": "atypical_nevus", "2": "melanoma"}
# The spreadsheet's one column per class, in code order (0, 1, 2).
_PH2_CLASS_COLUMNS = ("Common Nevus", "Atypical Nevus", "Melanoma")
_PH2_CODE_VALUES = "0, 1 or 2"
_PH2_X_VALUES = "one X in the columns " + ", ".join(_PH2_CLASS_COLUMNS)
# Header cells of the image name column, as `_header_key` writes them.
_PH2_NAME_KEYS = ("name", "image name")
# Suffixes in the order shown when an image is missing.
_PH2_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".png")
# A ruling line of the text table (|-----|====|), not a row.
_PH2_RULE = re.compile(r"[|\-=+:\s]+")


@dataclasses.dataclass(frozen=True)
class _Ph2Row(_CsvRow):
  """One row under the header of a PH2 table, whatever its format.

  Attributes:
    name: the image name cell, stripped ('' for a line that is no row).
    diagnosis: the clinical diagnosis as written, for messages: the code
      cell, or a description of the spreadsheet's X marks ('' when empty).
    code: '0', '1' or '2'; None when the diagnosis is empty or malformed.
    problem: why a line of the text table is not a row of its cells; ''
      for a row.
    unit: what `line` counts ('line', or "sheet 'Sheet1' row").
  """
  name: str = ""
  diagnosis: str = ""
  code: str | None = None
  problem: str = ""
  unit: str = "line"

  def where(self) -> str:
    return f"{self.path}, {self.unit} {self.line}"


def _header_key(cell: str) -> str:
  """A header cell compared without case and runs of whitespace."""
  return " ".join(cell.split()).casefold()


def _ph2_code_row(path: pathlib.Path, line: int, values: Mapping[str, str],
                  name_column: str, code_column: str, unit: str = "line"
                  ) -> _Ph2Row:
  """A row whose clinical diagnosis is a code cell (0, 1 or 2)."""
  diagnosis = values.get(code_column, "").strip()
  return _Ph2Row(path=path, line=line, values=values,
                 name=values.get(name_column, "").strip(), diagnosis=diagnosis,
                 code=diagnosis if diagnosis in _PH2_CODES else None,
                 unit=unit)


def _ph2_csv_rows(path: pathlib.Path) -> tuple[list[_Ph2Row], str]:
  """The rows of PH2_dataset.csv (header Name, Clinical Diagnosis, ...)."""
  rows = _read_csv(path, ("Name", "Clinical Diagnosis"))
  return [_ph2_code_row(path, row.line, row.values, "Name",
                        "Clinical Diagnosis") for row in rows
          ], _PH2_CODE_VALUES


def _pipe_cells(line: str) -> list[str]:
  """The cells of a text-table line; `|` and `||` both separate cells."""
  cells = [cell.strip() for cell in re.split(r"\|+", line.strip())]
  if cells and not cells[0]:
    cells = cells[1:]
  if cells and not cells[-1]:
    cells = cells[:-1]
  return cells


def _ph2_text_rows(path: pathlib.Path) -> tuple[list[_Ph2Row], str]:
  """The rows of the published PH2_dataset.txt, a table of |-separated cells.

  The header is the first line that starts with `|`; its cells `Name` (or
  `Image Name`) and `Clinical Diagnosis` locate those columns. Blank lines,
  ruling lines and text lines before the header are skipped. Every later
  non-blank line becomes a row: a line of as many cells as the header is
  read by column; any other line (the legend's text, a damaged row) keeps a
  `problem`, which `_ph2_labels` reports if the line is among the data rows.
  The file is read as UTF-8; a byte that does not decode (the legend's text
  may be in another encoding) becomes U+FFFD, which no image name or code
  contains.

  Raises:
    ValueError: naming the file and line, when no header is found, or the
      header lacks or repeats a needed column.
  """
  text = path.read_bytes().decode("utf-8-sig", errors="replace")
  header: list[str] | None = None
  header_line = 0
  rows: list[_Ph2Row] = []
  for number, line in enumerate(text.splitlines(), start=1):
    stripped = line.strip()
    if not stripped or (header is not None
                        and _PH2_RULE.fullmatch(stripped)):
      continue
    is_table = stripped.startswith("|")
    if header is None:
      if not is_table or _PH2_RULE.fullmatch(stripped):
        continue
      header, header_line = _pipe_cells(stripped), number
      keys = [_header_key(cell) for cell in header]
      for column, accepted in (("Name", _PH2_NAME_KEYS),
                               ("Clinical Diagnosis", ("clinical diagnosis",))):
        found = sum(key in accepted for key in keys)
        if found != 1:
          raise ValueError(
              f"{path}, line {number}: the table's first row (its header) "
              f"should have one cell {column!r}, has {found}; its cells are "
              f"{header}")
      # Keyed by the canonical names, so rows read like the CSV's.
      header = ["Name" if key in _PH2_NAME_KEYS else
                "Clinical Diagnosis" if key == "clinical diagnosis" else cell
                for key, cell in zip(keys, header)]
      continue
    cells = _pipe_cells(stripped)
    if is_table and len(cells) == len(header):
      rows.append(_ph2_code_row(path, number, dict(zip(header, cells)),
                                "Name", "Clinical Diagnosis"))
      continue
    problem = (f"{len(cells)} cells, but the header (line {header_line}) has "
               f"{len(header)}" if is_table
               else "not a table row (it does not start with |)")
    rows.append(_Ph2Row(path=path, line=number, values={"line": stripped},
                        problem=problem))
  if header is None:
    raise ValueError(
        f"{path}: no table header: looked for a line of |-separated cells "
        "with the cells 'Name' and 'Clinical Diagnosis'")
  return rows, _PH2_CODE_VALUES


def _xlsx_text(element: ElementTree.Element) -> str:
  """The text of a shared or inline string (`si`, `is`): runs, no phonetics."""
  parts = []
  for child in element:
    tag = child.tag.rsplit("}", 1)[-1]
    if tag == "t":
      parts.append(child.text or "")
    elif tag == "r":
      parts.extend(t.text or "" for t in child.iterfind("{*}t"))
  return "".join(parts)


def _xlsx_column(reference: str) -> int:
  """The 1-based column of a cell reference such as 'C14'."""
  letters = re.match(r"[A-Za-z]*", reference).group(0).upper()
  column = 0
  for letter in letters:
    column = column * 26 + ord(letter) - ord("A") + 1
  return column


def _xlsx_sheets(path: pathlib.Path
                 ) -> list[tuple[str, dict[int, dict[int, str]]]]:
  """Every worksheet of an .xlsx, in workbook order, read with the stdlib.

  Returns:
    (sheet name, {row number: {column number: cell text}}), 1-based as
    Excel numbers them. Numbers with an integral value are written without
    a decimal part (2, not 2.0); formulas give their cached value.

  Raises:
    ValueError: naming the file (and the part inside it), when it is not a
      zip of the spreadsheet XML parts.
  """
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f"{path}: cannot read it as an .xlsx (a zip of XML "
                     f"parts): {e}") from e
  with archive:
    members = set(archive.namelist())

    def part(member: str) -> ElementTree.Element:
      if member not in members:
        raise ValueError(f"{path}: not an .xlsx workbook: it has no part "
                         f"{member}")
      try:
        return ElementTree.fromstring(archive.read(member))
      except ElementTree.ParseError as e:
        raise ValueError(f"{path}: part {member} is not valid XML: {e}"
                         ) from e

    shared = ([_xlsx_text(si) for si in
               part("xl/sharedStrings.xml").iterfind("{*}si")]
              if "xl/sharedStrings.xml" in members else [])
    targets = {rel.get("Id"): rel.get("Target", "") for rel in
               part("xl/_rels/workbook.xml.rels").iterfind("{*}Relationship")}
    sheets = []
    for sheet in part("xl/workbook.xml").iterfind("{*}sheets/{*}sheet"):
      # The relationship id's namespace differs in strict OOXML.
      rel_id = next((value for key, value in sheet.attrib.items()
                     if key.endswith("}id")), None)
      target = targets.get(rel_id)
      if not target:
        raise ValueError(f"{path}: sheet {sheet.get('name')!r} has no target "
                         f"in xl/_rels/workbook.xml.rels (id {rel_id!r})")
      member = (target.lstrip("/") if target.startswith("/")
                else posixpath.normpath(posixpath.join("xl", target)))
      grid: dict[int, dict[int, str]] = {}
      row_number = 0
      for row in part(member).iterfind("{*}sheetData/{*}row"):
        row_number = int(row.get("r", row_number + 1))
        cells: dict[int, str] = {}
        column = 0
        for cell in row.iterfind("{*}c"):
          reference = cell.get("r")
          column = _xlsx_column(reference) if reference else column + 1
          kind = cell.get("t", "n")
          value = cell.find("{*}v")
          raw = (value.text or "") if value is not None else ""
          if kind == "s":
            try:
              text = shared[int(raw)]
            except (ValueError, IndexError) as e:
              raise ValueError(
                  f"{path}: {member} cell {reference or column} refers to "
                  f"shared string {raw!r}, which xl/sharedStrings.xml does "
                  "not have") from e
          elif kind == "inlineStr":
            inline = cell.find("{*}is")
            text = _xlsx_text(inline) if inline is not None else ""
          elif kind == "n" and raw:
            try:
              number = float(raw)
            except ValueError:
              text = raw
            else:
              text = (str(int(number)) if number.is_integer() else raw)
          else:
            text = raw
          cells[column] = text
        grid[row_number] = cells
      sheets.append((sheet.get("name", member), grid))
  if not sheets:
    raise ValueError(f"{path}: xl/workbook.xml lists no sheet")
  return sheets


def _ph2_sheet_header(path: pathlib.Path, sheet: str,
                      grid: Mapping[int, Mapping[int, str]], number: int
                      ) -> tuple[int, int | None, tuple[int, ...]] | None:
  """(name column, code column, class columns) if row `number` is a header.

  A header has an `Image Name` (or `Name`) cell and either a `Clinical
  Diagnosis` code column or the three class columns marked with X. In the
  published spreadsheet `Clinical Diagnosis` is a group header on the row
  above the class columns; class columns are then taken from under it, and
  the name may stand on either row. The group header row itself is no
  header.
  """
  def keys(row: int) -> dict[int, str]:
    return {column: _header_key(text)
            for column, text in grid.get(row, {}).items() if text.strip()}

  here, above = keys(number), keys(number - 1)
  names = [c for c, k in here.items() if k in _PH2_NAME_KEYS]
  classes = {_header_key(name): [c for c, k in here.items()
                                 if k == _header_key(name)]
             for name in _PH2_CLASS_COLUMNS}
  if all(classes.values()):
    group = [c for c, k in above.items() if k == "clinical diagnosis"]
    if len(group) == 1:
      end = min((c for c in above if c > group[0]), default=None)
      classes = {k: [c for c in columns
                     if c >= group[0] and (end is None or c < end)]
                 for k, columns in classes.items()}
    if any(len(columns) != 1 for columns in classes.values()):
      raise ValueError(
          f"{path}, sheet {sheet!r} row {number}: expected one column each "
          f"for {', '.join(_PH2_CLASS_COLUMNS)}"
          + (" under the 'Clinical Diagnosis' group header" if group else "")
          + f", found columns {classes}")
    if not names:
      names = [c for c, k in above.items() if k in _PH2_NAME_KEYS]
    if len(names) != 1:
      raise ValueError(
          f"{path}, sheet {sheet!r} row {number}: the header with the "
          "class columns needs one 'Image Name' (or 'Name') cell on it or "
          f"on the row above, found {len(names)}")
    return names[0], None, tuple(columns[0] for columns in classes.values())
  codes = [c for c, k in here.items() if k == "clinical diagnosis"]
  below = set(keys(number + 1).values())
  if (codes and names
      and not all(_header_key(n) in below for n in _PH2_CLASS_COLUMNS)):
    if len(codes) != 1 or len(names) != 1:
      raise ValueError(
          f"{path}, sheet {sheet!r} row {number}: the header needs one "
          "'Image Name' (or 'Name') and one 'Clinical Diagnosis' cell, has "
          f"{len(names)} and {len(codes)}")
    return names[0], codes[0], ()
  return None


def _ph2_sheet_rows(path: pathlib.Path) -> tuple[list[_Ph2Row], str]:
  """The rows under the header of the published PH2_dataset.xlsx.

  The header row is the first row found by its cells (title rows come
  first; see `_ph2_sheet_header`), on the one sheet that has such a row.
  Empty rows are skipped.

  Raises:
    ValueError: naming the file, when no sheet or several sheets have a
      header, listing what was looked for.
  """
  sheets = _xlsx_sheets(path)
  headers = []
  for sheet, grid in sheets:
    # The first header row of a sheet; the legend below may repeat names.
    for number in sorted(grid):
      columns = _ph2_sheet_header(path, sheet, grid, number)
      if columns is not None:
        headers.append((sheet, grid, number, columns))
        break
  if len(headers) != 1:
    found = "".join(f", sheet {sheet!r} row {number}"
                    for sheet, _, number, _ in headers)
    raise ValueError(
        f"{path}: found {len(headers)} header rows{found}"
        f" in sheets {[sheet for sheet, _ in sheets]}; expected one row with "
        "an 'Image Name' (or 'Name') cell and either a 'Clinical Diagnosis' "
        "cell or the cells " + ", ".join(map(repr, _PH2_CLASS_COLUMNS))
        + " (under a 'Clinical Diagnosis' group header)")
  sheet, grid, header_row, (name_column, code_column, class_columns) = (
      headers[0])
  unit = f"sheet {sheet!r} row"
  rows = []
  for number in sorted(n for n in grid if n > header_row):
    cells = grid[number]
    if not any(text.strip() for text in cells.values()):
      continue
    values = {"Name": cells.get(name_column, "")}
    if code_column is not None:
      values["Clinical Diagnosis"] = cells.get(code_column, "")
      rows.append(_ph2_code_row(path, number, values, "Name",
                                "Clinical Diagnosis", unit))
      continue
    marks = {name: cells.get(column, "").strip()
             for name, column in zip(_PH2_CLASS_COLUMNS, class_columns)}
    values.update(marks)
    marked = [name for name, mark in marks.items() if mark]
    code = None
    if (len(marked) == 1
        and marks[marked[0]].casefold() == "x"):
      code = str(_PH2_CLASS_COLUMNS.index(marked[0]))
    rows.append(_Ph2Row(
        path=path, line=number, values=values,
        name=values["Name"].strip(),
        diagnosis=", ".join(f"{name}={marks[name]!r}" for name in marked),
        code=code, unit=unit))
  return rows, (_PH2_X_VALUES if code_column is None else _PH2_CODE_VALUES)


def _ph2_labels(path: pathlib.Path, rows: Sequence[_Ph2Row], expected: str
                ) -> dict[str, _Ph2Row]:
  """The data rows of one PH2 table, keyed by image name; the legend skipped.

  The data rows run to the last row whose Name is an image name (IMD and
  digits); each must have one and a valid diagnosis. The rows after it are
  the legend of the published tables: skipped, with one log note, if none
  has a diagnosis or (a line that is no table row) names an image.

  Args:
    path: the table, for messages.
    rows: its rows under the header, in file order.
    expected: how a diagnosis is written, for messages ('0, 1 or 2').

  Raises:
    ValueError: naming the file, the line and the value, for a data row
      without an image name or a valid diagnosis, an image listed twice, a
      diagnosis in the legend, or a table with no image rows.
  """
  data_end = max((i for i, row in enumerate(rows)
                  if _PH2_IMAGE_ID.fullmatch(row.name)), default=-1)
  if data_end < 0:
    raise ValueError(
        f"{path}: no image rows: no Name cell of its {len(rows)} rows under "
        "the header is an image name (IMD and digits, e.g. IMD002)")
  last = rows[data_end]
  for row in rows[:data_end + 1]:
    if row.problem:
      raise ValueError(f"{row.where()}: {row.problem}, before the last image "
                       f"row ({last.unit} {last.line})")
    if not _PH2_IMAGE_ID.fullmatch(row.name):
      raise ValueError(
          f"{row.where()}: Name {row.name!r} is not an image name (IMD and "
          f"digits), before the last image row ({last.unit} {last.line}); "
          f"its Clinical Diagnosis is {row.diagnosis!r}")
    if row.code is None:
      raise ValueError(
          f"{row.where()}: Clinical Diagnosis of {row.name} must be "
          f"{expected}, got {row.diagnosis!r}")
  legend = rows[data_end + 1:]
  for row in legend:
    if row.diagnosis:
      raise ValueError(
          f"{row.where()}: Clinical Diagnosis {row.diagnosis!r} on a row "
          f"whose Name {row.name!r} is not an image name (IMD and digits), "
          f"after the last image row ({last.unit} {last.line})")
    mentioned = row.problem and _PH2_IMAGE_ID.search(row.get("line"))
    if mentioned:
      raise ValueError(f"{row.where()}: {row.problem}, and it names image "
                       f"{mentioned.group(0)}, after the last image row "
                       f"({last.unit} {last.line})")
  if legend:
    logging.info(
        "%s: skipped %d non-empty %s(s) after the last image row, from %s %d "
        "on (the legend)", path, len(legend), legend[0].unit.split()[-1],
        legend[0].unit, legend[0].line)
  data = rows[:data_end + 1]
  # Only for its check that no image is listed twice.
  _by_image_id(data, [_Record(image_id=row.name, label=_PH2_CODES[row.code],
                              group_id=row.name) for row in data])
  return {row.name: row for row in data}


def _ph2_label_text(row: _Ph2Row | None, path: pathlib.Path) -> str:
  if row is None:
    return f"{path} does not list it"
  return (f"{row.where()} says {row.diagnosis!r} "
          f"({_PH2_CODES[row.code]})")


class Ph2(_SkinLesionBuilder):
  """PH2: 200 dermoscopic images of melanocytic lesions, 3 classes.

  Reads the PH2Dataset archive as its authors distribute it, or a flat
  folder of images with a CSV. See MANUAL_DOWNLOAD_INSTRUCTIONS.
  """

  name = "ph2"
  CLASS_NAMES = ("common_nevus", "atypical_nevus", "melanoma")
  DIAGNOSES = {"common_nevus": "nevus", "atypical_nevus": "atypical_nevus",
               "melanoma": "melanoma"}
  BUILDER_CONFIGS = [
      _folder_config("The PH2Dataset archive, or PH2_dataset.csv + images/, "
                     "in a manual folder.")]
  HOMEPAGE = "https://www.fc.up.pt/addi/ph2%20database.html"
  DESCRIPTION = (
      "PH2: 200 dermoscopic images (80 common nevi, 80 atypical nevi, 40 "
      "melanomas) of the Pedro Hispano hospital; one image per lesion, so "
      "group_id is the image id.")
  CITATION = """\
@inproceedings{mendonca2013ph2,
  title={{PH2} - A dermoscopic image database for research and benchmarking},
  author={Mendon{\\c{c}}a, Teresa and Ferreira, Pedro M. and Marques, Jorge S.
          and Marcal, Andre R. S. and Rozeira, Jorge},
  booktitle={35th Annual International Conference of the IEEE EMBS},
  pages={5437--5440}, year={2013}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download PH2Dataset from https://www.fc.up.pt/addi/ph2%20database.html
  and unpack it, either as <manual_dir> itself or into <manual_dir> (as its
  only folder with a "PH2 Dataset images" folder, e.g.
  <manual_dir>/PH2Dataset/). The unpacked folder holds, as published:
    PH2 Dataset images/IMD002/IMD002_Dermoscopic_Image/IMD002.bmp, ... (a
      folder per image; the IMDxxx_lesion/ and IMDxxx_roi/ folders beside
      IMDxxx_Dermoscopic_Image/ are not read)
    PH2_dataset.txt and PH2_dataset.xlsx, the tables of diagnoses
      (Clinical Diagnosis 0 common nevus, 1 atypical nevus, 2 melanoma; in
      the .xlsx one column per class, marked X). One of them is enough. The
      labels come from the .txt when it is there; any other table present
      (.xlsx, .csv) must agree with it on every image.
  Or a flat folder of your own:
    <manual_dir>/images/IMD002.bmp, ... (the IMDxxx.bmp of each
      IMDxxx_Dermoscopic_Image/ folder, .bmp or .jpg)
    <manual_dir>/PH2_dataset.csv with a header row with the columns Name
      (IMDxxx) and Clinical Diagnosis (0, 1 or 2), e.g. the archive's
      PH2_dataset.xlsx saved as CSV without its title rows (the legend rows
      after the data may stay).
  Images that no table lists are ignored."""

  def _locate(self, folder: pathlib.Path) -> tuple[pathlib.Path, str]:
    """The folder with the images and tables, and its images folder's name.

    `folder` itself when it has `PH2 Dataset images/` or `images/`; else
    its one subfolder that has `PH2 Dataset images/` (the archive unpacked
    inside it).

    Raises:
      ValueError: both image folders, or several such subfolders, exist.
      ManualDataError: none is found; it lists the places looked at.
    """
    def layouts(directory: pathlib.Path) -> list[str]:
      return [name for name in (_PH2_PUBLISHED_IMAGES, _PH2_FLAT_IMAGES)
              if (directory / name).is_dir()]

    here = layouts(folder)
    if len(here) > 1:
      raise ValueError(
          f"{self.name}: {folder} has both {folder / _PH2_PUBLISHED_IMAGES} "
          f"(the archive's layout) and {folder / _PH2_FLAT_IMAGES} (a flat "
          "folder); keep one")
    if here:
      return folder, here[0]
    below = sorted(path.parent for path in folder.glob(
        f"*/{_PH2_PUBLISHED_IMAGES}") if path.is_dir())
    if len(below) > 1:
      raise ValueError(
          f"{self.name}: {folder} has no images folder of its own and "
          f"{len(below)} subfolders with {_PH2_PUBLISHED_IMAGES!r}: "
          f"{', '.join(map(str, below))}; point the manual folder at one")
    if below:
      return below[0], _PH2_PUBLISHED_IMAGES
    problems = [
        "no images folder; looked for "
        f"{folder / _PH2_PUBLISHED_IMAGES}, {folder / _PH2_FLAT_IMAGES} and "
        f"{folder / '*' / _PH2_PUBLISHED_IMAGES}"]
    if not any((folder / name).is_file() for name in _PH2_TABLES):
      problems.append("no table; looked for " + ", ".join(
          str(folder / name) for name in _PH2_TABLES))
    raise self._incomplete(folder, problems)

  def _folder_splits(self, folder: pathlib.Path) -> dict[str, Iterator]:
    root, images_dir = self._locate(folder)
    tables = [root / name for name in _PH2_TABLES if (root / name).is_file()]
    if not tables:
      raise self._incomplete(root, ["no table; looked for " + ", ".join(
          str(root / name) for name in _PH2_TABLES)])
    readers = {".txt": _ph2_text_rows, ".xlsx": _ph2_sheet_rows,
               ".csv": _ph2_csv_rows}
    labels = [_ph2_labels(path, *readers[path.suffix](path))
              for path in tables]
    first = labels[0]
    for path, other in zip(tables[1:], labels[1:]):
      disagree = [name for name in sorted(first.keys() | other.keys())
                  if name not in first or name not in other
                  or first[name].code != other[name].code]
      if disagree:
        details = "".join(
            f"  - {name}: {_ph2_label_text(first.get(name), tables[0])}; "
            f"{_ph2_label_text(other.get(name), path)}\n"
            for name in disagree[:_SHOW_MISSING])
        raise ValueError(
            f"{self.name}: {tables[0].name} and {path.name} in {root} "
            f"disagree on {len(disagree)} image(s):\n{details}"
            f"Fix or remove one of the two (the labels come from "
            f"{tables[0].name}).")
    records = {name: _Record(image_id=name, label=_PH2_CODES[row.code],
                             group_id=name)
               for name, row in first.items()}
    if images_dir == _PH2_PUBLISHED_IMAGES:
      subdirs = {name: f"{images_dir}/{name}/{name}_Dermoscopic_Image"
                 for name in records}
    else:
      subdirs = {name: images_dir for name in records}
    index = _index_images(root, sorted(set(subdirs.values())))
    missing = [name for name in records if name not in index]
    if missing:
      problems = [
          f"no image for {name} (listed at {first[name].where()}); tried "
          + ", ".join(str(root / subdirs[name] / f"{name}{suffix}")
                      for suffix in _PH2_SUFFIXES)
          for name in missing[:_SHOW_MISSING]]
      if len(missing) > _SHOW_MISSING:
        problems.append(f"and {len(missing) - _SHOW_MISSING} more listed "
                        "image(s) without a file")
      raise self._incomplete(root, problems)
    images = ((name, str(index[name]), index[name].read_bytes())
              for name in records)
    return {"train": self._generate_examples(records, images, str(root))}


class Isic2017(_SkinLesionBuilder):
  """ISIC 2017 Part 3: nevus / melanoma / seborrheic keratosis, 3 splits."""

  name = "isic2017"
  CLASS_NAMES = ("nevus", "melanoma", "seborrheic_keratosis")
  DIAGNOSES = {"nevus": "nevus", "melanoma": "melanoma",
               "seborrheic_keratosis": "seborrheic_keratosis"}
  DOWNLOAD_CONFIG = "official"
  BUILDER_CONFIGS = [
      _folder_config("Official CSVs + images in a manual folder."),
      tfds.core.BuilderConfig(
          name="official", description="ISIC 2017 archives, downloaded."),
  ]
  HOMEPAGE = _ISIC_PAGE + "#2017"
  DESCRIPTION = (
      "ISIC 2017 challenge, Part 3: 2,000 training, 150 validation and 600 "
      "test images; no lesion ids, so group_id is the image id.")
  CITATION = """\
@inproceedings{codella2018isic2017,
  title={Skin lesion analysis toward melanoma detection: A challenge at the
         2017 {ISBI}, hosted by the {ISIC}},
  author={Codella, Noel C. F. and others},
  booktitle={IEEE ISBI}, pages={168--172}, year={2018}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  From https://challenge.isic-archive.com/data/#2017 (files under
  https://isic-challenge-data.s3.amazonaws.com/2017/) download, for each of
  Training, Validation and Test_v2 (only Training is required):
    ISIC-2017_<S>_Data.zip and ISIC-2017_<S>_Part3_GroundTruth.csv
  and put them in <manual_dir>:
    <manual_dir>/ISIC-2017_<S>_Part3_GroundTruth.csv  (image_id,melanoma,
    seborrheic_keratosis)
    <manual_dir>/ISIC-2017_<S>_Data/ISIC_0000000.jpg, ... (the unzipped
    archive), or all images in <manual_dir>/images/.
  Or use config `official`, which downloads them."""

  _SPLITS = (("train", "Training"), ("validation", "Validation"),
             ("test", "Test_v2"))
  _COLUMNS = ("image_id", "melanoma", "seborrheic_keratosis")

  def _records(self, rows: Sequence[_CsvRow]) -> dict[str, _Record]:
    records = []
    for row in rows:
      melanoma = _binary(row, "melanoma")
      keratosis = _binary(row, "seborrheic_keratosis")
      if melanoma and keratosis:
        raise ValueError(
            f"{row.where()}: both melanoma and seborrheic_keratosis are 1")
      label = ("melanoma" if melanoma else
               "seborrheic_keratosis" if keratosis else "nevus")
      records.append(_Record(image_id=row["image_id"], label=label,
                             group_id=row["image_id"]))
    return _by_image_id(rows, records)

  def _folder_splits(self, folder: pathlib.Path) -> dict[str, Iterator]:
    truth = f"ISIC-2017_{self._SPLITS[0][1]}_Part3_GroundTruth.csv"
    self._check_folder(folder, [truth], [
        f"ISIC-2017_{self._SPLITS[0][1]}_Data", "images"])
    splits = {}
    for split, tag in self._SPLITS:
      csv_path = folder / f"ISIC-2017_{tag}_Part3_GroundTruth.csv"
      if not csv_path.is_file():
        continue
      splits[split] = self._folder_examples(
          folder, self._records(_read_csv(csv_path, self._COLUMNS)),
          [f"ISIC-2017_{tag}_Data", "images"], csv_path)
    return splits

  def _download_splits(self, dl_manager: tfds.download.DownloadManager
                       ) -> dict[str, Iterator]:
    urls = {}
    for split, tag in self._SPLITS:
      urls[split] = {
          "images": f"{_ISIC_BUCKET}/2017/ISIC-2017_{tag}_Data.zip",
          "truth": f"{_ISIC_BUCKET}/2017/ISIC-2017_{tag}_Part3_GroundTruth.csv",
      }
    files = dl_manager.download(urls)
    return {
        split: self._archive_examples(
            dl_manager, pathlib.Path(files[split]["images"]),
            self._records(_read_csv(pathlib.Path(files[split]["truth"]),
                                    self._COLUMNS)))
        for split, _ in self._SPLITS
    }


class Isic2019(_SkinLesionBuilder):
  """ISIC 2019 training set: 25,331 images, 8 classes (+ empty `unk`)."""

  name = "isic2019"
  CLASS_NAMES = ("mel", "nv", "bcc", "ak", "bkl", "df", "vasc", "scc", "unk")
  DIAGNOSES = {
      "mel": "melanoma", "nv": "nevus", "bcc": "bcc",
      # Actinic keratosis; 2019 moved intraepithelial carcinoma to `scc`.
      "ak": "akiec",
      "bkl": "bkl", "df": "df", "vasc": "vasc", "scc": "scc", "unk": "unknown",
  }
  DOWNLOAD_CONFIG = "official"
  BUILDER_CONFIGS = [
      _folder_config("Official CSVs + images in a manual folder."),
      tfds.core.BuilderConfig(
          name="official", description="ISIC 2019 archives, downloaded."),
  ]
  HOMEPAGE = _ISIC_PAGE + "#2019"
  DESCRIPTION = (
      "ISIC 2019 training set (HAM10000, BCN20000, MSK): 25,331 images; "
      "group_id is the metadata's lesion id, or the image id where empty.")
  CITATION = """\
@article{combalia2019bcn20000,
  title={{BCN20000}: Dermoscopic lesions in the wild},
  author={Combalia, Marc and Codella, Noel C. F. and Rotemberg, Veronica and
          others},
  journal={arXiv preprint arXiv:1908.02288}, year={2019}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  From https://challenge.isic-archive.com/data/#2019 (files under
  https://isic-challenge-data.s3.amazonaws.com/2019/) download
  ISIC_2019_Training_Input.zip, ISIC_2019_Training_GroundTruth.csv and
  ISIC_2019_Training_Metadata.csv, and put in <manual_dir>:
    <manual_dir>/ISIC_2019_Training_GroundTruth.csv
    <manual_dir>/ISIC_2019_Training_Metadata.csv
    <manual_dir>/ISIC_2019_Training_Input/ISIC_0000000.jpg, ... (the unzipped
    archive), or the images in <manual_dir>/images/.
  Or use config `official`, which downloads them."""

  _TRUTH = "ISIC_2019_Training_GroundTruth.csv"
  _METADATA = "ISIC_2019_Training_Metadata.csv"
  _IMAGE_DIRS = ("ISIC_2019_Training_Input", "images")
  _ONE_HOT_COLUMNS = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC",
                      "UNK")

  def _records(self, truth_csv: pathlib.Path, metadata_csv: pathlib.Path
               ) -> dict[str, _Record]:
    truth_rows = _read_csv(truth_csv, ("image",) + self._ONE_HOT_COLUMNS)
    metadata = _lookup(_read_csv(metadata_csv, ("image", "lesion_id")),
                       "image")
    records = []
    for row in truth_rows:
      if row["image"] not in metadata:
        raise ValueError(
            f"{row.where()}: image {row['image']} has no row in "
            f"{metadata_csv}")
      records.append(_Record(
          image_id=row["image"],
          label=self.CLASS_NAMES[_one_hot_class(row, self._ONE_HOT_COLUMNS)],
          group_id=metadata[row["image"]]["lesion_id"] or row["image"]))
    return _by_image_id(truth_rows, records)

  def _folder_splits(self, folder: pathlib.Path) -> dict[str, Iterator]:
    self._check_folder(folder, [self._TRUTH, self._METADATA], self._IMAGE_DIRS)
    records = self._records(folder / self._TRUTH, folder / self._METADATA)
    return {"train": self._folder_examples(
        folder, records, self._IMAGE_DIRS, folder / self._TRUTH)}

  def _download_splits(self, dl_manager: tfds.download.DownloadManager
                       ) -> dict[str, Iterator]:
    files = dl_manager.download({
        "images": f"{_ISIC_BUCKET}/2019/ISIC_2019_Training_Input.zip",
        "truth": f"{_ISIC_BUCKET}/2019/{self._TRUTH}",
        "metadata": f"{_ISIC_BUCKET}/2019/{self._METADATA}",
    })
    records = self._records(pathlib.Path(files["truth"]),
                            pathlib.Path(files["metadata"]))
    return {"train": self._archive_examples(
        dl_manager, pathlib.Path(files["images"]), records)}


class Isic2020(_SkinLesionBuilder):
  """ISIC 2020 (SIIM-ISIC) training set: 33,126 images, benign/malignant."""

  name = "isic2020"
  CLASS_NAMES = ("benign", "malignant")
  # Every malignant case of ISIC 2020 is a melanoma.
  DIAGNOSES = {"benign": "benign", "malignant": "melanoma"}
  DOWNLOAD_CONFIG = "official"
  BUILDER_CONFIGS = [
      _folder_config("train.csv (or the ground-truth CSV) + images in a "
                     "manual folder."),
      tfds.core.BuilderConfig(
          name="official", description="ISIC 2020 archives, downloaded."),
  ]
  HOMEPAGE = _ISIC_PAGE + "#2020"
  DESCRIPTION = (
      "ISIC 2020 training set: 33,126 images of 2,056 patients, 584 "
      "melanomas; group_id is the patient id.")
  CITATION = """\
@article{rotemberg2021isic2020,
  title={A patient-centric dataset of images and metadata for identifying
         melanomas using clinical context},
  author={Rotemberg, Veronica and others},
  journal={Scientific Data}, volume={8}, pages={34}, year={2021}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  From https://challenge.isic-archive.com/data/#2020 (files under
  https://isic-challenge-data.s3.amazonaws.com/2020/) download
  ISIC_2020_Training_JPEG.zip and ISIC_2020_Training_GroundTruth.csv, and
  put in <manual_dir>:
    <manual_dir>/ISIC_2020_Training_GroundTruth.csv (or Kaggle's train.csv:
    image_name,patient_id,...,diagnosis,benign_malignant,target)
    <manual_dir>/train/ISIC_2637011.jpg, ... (the unzipped archive; also
    accepted: <manual_dir>/jpeg/train/ or <manual_dir>/images/).
  Or use config `official`, which downloads them."""

  # train.csv first: Kaggle's copy, the name the papers' code uses.
  _TRUTH_NAMES = ("train.csv", "ISIC_2020_Training_GroundTruth.csv")
  _IMAGE_DIRS = ("train", "jpeg/train", "images")
  _TARGETS = {"0": "benign", "1": "malignant"}

  def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {"diagnosis": tfds.features.Text(
        doc="free-text diagnosis column (nevus, melanoma, unknown, ...)")}

  def _records(self, truth_csv: pathlib.Path) -> dict[str, _Record]:
    rows = _read_csv(truth_csv, ("image_name", "patient_id", "target"))
    records = []
    for row in rows:
      label = self._TARGETS.get(row["target"])
      if label is None:
        raise ValueError(
            f"{row.where()}: target must be 0 or 1, got {row['target']!r}")
      stated = row.get("benign_malignant")
      if stated and stated != label:
        raise ValueError(
            f"{row.where()}: target {row['target']} contradicts "
            f"benign_malignant {stated!r}")
      records.append(_Record(
          image_id=row["image_name"], label=label,
          group_id=row["patient_id"] or row["image_name"],
          extras={"diagnosis": row.get("diagnosis")}))
    return _by_image_id(rows, records)

  def _folder_splits(self, folder: pathlib.Path) -> dict[str, Iterator]:
    truth = next((folder / name for name in self._TRUTH_NAMES
                  if (folder / name).is_file()), None)
    if truth is None:
      raise self._incomplete(folder, [
          "missing file " + " or ".join(
              str(folder / name) for name in self._TRUTH_NAMES)])
    self._check_folder(folder, [], self._IMAGE_DIRS)
    return {"train": self._folder_examples(
        folder, self._records(truth), self._IMAGE_DIRS, truth)}

  def _download_splits(self, dl_manager: tfds.download.DownloadManager
                       ) -> dict[str, Iterator]:
    files = dl_manager.download({
        "images": f"{_ISIC_BUCKET}/2020/ISIC_2020_Training_JPEG.zip",
        "truth": f"{_ISIC_BUCKET}/2020/ISIC_2020_Training_GroundTruth.csv",
    })
    return {"train": self._archive_examples(
        dl_manager, pathlib.Path(files["images"]),
        self._records(pathlib.Path(files["truth"])))}


DATASETS: dict[str, type[_SkinLesionBuilder]] = {
    cls.name: cls for cls in (Ham10000, Ph2, Isic2017, Isic2019, Isic2020)
}


def get_builder(name: str, *, data_dir: str | os.PathLike[str] | None = None,
                manual_dir: str | os.PathLike[str] | None = None,
                config: str | None = None) -> tfds.core.DatasetBuilder:
  """The builder of dataset `name`, not yet prepared.

  Args:
    name: one of `DATASETS` ('ham10000', 'ph2', 'isic2017', 'isic2019',
      'isic2020').
    data_dir: where TFDS keeps prepared data and downloads; None: TFDS's
      default (TFDS_DATA_DIR or ~/tensorflow_datasets).
    manual_dir: the folder with the dataset's files (config 'folder'). For
      'ham10000' None means `paths.ham10000_dir()` when that exists.
    config: a name from the builder's BUILDER_CONFIGS; None picks 'folder'
      when there is a manual folder (or the dataset has no download), else
      the download config ('isic2018' for HAM10000, 'official' otherwise).

  Raises:
    ValueError: unknown dataset or config, naming the known ones.
  """
  if name not in DATASETS:
    raise ValueError(
        f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
  builder_cls = DATASETS[name]
  if name == Ham10000.name and manual_dir is None and config in (None, FOLDER):
    manual_dir = paths.ham10000_dir()
  if config is None:
    config = (FOLDER if manual_dir is not None
              or builder_cls.DOWNLOAD_CONFIG is None
              else builder_cls.DOWNLOAD_CONFIG)
  configs = [c.name for c in builder_cls.BUILDER_CONFIGS]
  if config not in configs:
    raise ValueError(
        f"unknown config {config!r} for dataset {name!r}; known configs: "
        f"{', '.join(configs)}")
  if config == FOLDER and manual_dir is not None:
    folder = pathlib.Path(manual_dir).expanduser()
    if folder.is_dir():
      base = pathlib.Path(data_dir or os.environ.get("TFDS_DATA_DIR")
                          or "~/tensorflow_datasets").expanduser()
      data_dir = base / "sources" / source_fingerprint(folder)
  return builder_cls(data_dir=data_dir, config=config, manual_dir=manual_dir)


# Files whose contents (not only size and time) enter the fingerprint.
_METADATA_SUFFIXES = (".csv", ".txt", ".tsv", ".xlsx", ".xls", ".json")


def source_fingerprint(folder: str | os.PathLike[str]) -> str:
  """A hash of a manual folder: every file's path, size and modification time,
  and the contents of its metadata files (16 hex digits).

  Any change to the folder changes it; reading it costs one ``stat`` per file
  and reading the metadata files.
  """
  import hashlib  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      path = pathlib.Path(root) / name
      stat = path.stat()
      relative = path.relative_to(folder).as_posix()
      digest.update(f"{relative}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
      if path.suffix.lower() in _METADATA_SUFFIXES:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
  return digest.hexdigest()[:16]


def prepare(builder: tfds.core.DatasetBuilder, *,
            register_checksums: bool = False) -> None:
  """Downloads (if needed) and prepares `builder`'s data; cheap if done.

  Args:
    builder: from `get_builder` (its `manual_dir` is handed to TFDS through
      `DownloadConfig`), or any TFDS builder.
    register_checksums: record the downloaded archives' sizes and SHA-256 in
      checksums.tsv beside this module instead of checking them (maintainers;
      see the module docstring).
  """
  manual_dir = getattr(builder, "manual_dir", None)
  # A builder from `get_builder` with a manual folder reads and writes a
  # data_dir named by the folder's fingerprint, so what is prepared there is
  # always that folder's data (see the module docstring).
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False,
      register_checksums=register_checksums))
