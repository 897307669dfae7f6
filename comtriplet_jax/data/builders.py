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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

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


class Ph2(_SkinLesionBuilder):
  """PH2: 200 dermoscopic images of melanocytic lesions, 3 classes."""

  name = "ph2"
  CLASS_NAMES = ("common_nevus", "atypical_nevus", "melanoma")
  DIAGNOSES = {"common_nevus": "nevus", "atypical_nevus": "atypical_nevus",
               "melanoma": "melanoma"}
  BUILDER_CONFIGS = [
      _folder_config("PH2_dataset.csv + images/ in a manual folder.")]
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
  Download PH2Dataset from https://www.fc.up.pt/addi/ph2%20database.html and
  put in <manual_dir>:
    <manual_dir>/images/IMD002.bmp, ... (each IMDxxx_Dermoscopic_Image/
    IMDxxx.bmp of the archive, .bmp or .jpg)
    <manual_dir>/PH2_dataset.csv with columns Name (IMDxxx), Clinical
    Diagnosis (0 common nevus, 1 atypical nevus, 2 melanoma) and Asymmetry
    (the archive's PH2_dataset.xlsx saved as CSV)."""

  _CSV = "PH2_dataset.csv"
  _CODES = {"0": "common_nevus", "1": "atypical_nevus", "2": "melanoma"}

  def _folder_splits(self, folder: pathlib.Path) -> dict[str, Iterator]:
    self._check_folder(folder, [self._CSV], ["images"])
    csv_path = folder / self._CSV
    rows = _read_csv(csv_path, ("Name", "Clinical Diagnosis"))
    records = []
    for row in rows:
      code = row["Clinical Diagnosis"]
      if code not in self._CODES:
        raise ValueError(
            f"{row.where()}: Clinical Diagnosis must be 0, 1 or 2, got "
            f"{code!r}")
      records.append(_Record(image_id=row["Name"], label=self._CODES[code],
                             group_id=row["Name"]))
    return {"train": self._folder_examples(
        folder, _by_image_id(rows, records), ["images"], csv_path,
        suffix=".bmp")}


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
