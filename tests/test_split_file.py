"""splits.csv: written from a split listing, read back into the same split."""

import csv

import numpy as np
import pytest

from comtriplet_jax.data import split_file

CLASSES = ["nevus", "melanoma"]
IDS = np.array([f"IMG_{i}" for i in range(8)])
GROUPS = np.array(["L0", "L0", "L1", "L2", "L3", "L4", "L5", "L6"])
# Task labels; IMG_7 belongs to no class of the task (e.g. a keratosis).
TASK = np.array([0, 0, 1, 0, 1, 0, 1, -1])


def _listing(members):
  return {split: {"image_id": IDS[rows], "group_id": GROUPS[rows],
                  "label": TASK[rows]} for split, rows in members.items()}


def test_a_written_file_reads_back_into_the_same_split(tmp_path):
  members = {"train": np.array([0, 1, 2, 3]), "validation": np.array([4]),
             "test": np.array([5, 6])}
  path = split_file.write(tmp_path / "splits.csv", _listing(members), CLASSES)
  rows = list(csv.DictReader(open(path)))
  assert [r["image_id"] for r in rows] == [f"IMG_{i}" for i in range(7)]
  assert rows[2] == {"image_id": "IMG_2", "group_id": "L1", "label": "melanoma",
                     "split": "train"}
  split_of, names = split_file.read(path, IDS, TASK, CLASSES)
  assert names == ("train", "validation", "test")
  np.testing.assert_array_equal(split_of, [0, 0, 0, 0, 1, 2, 2, -1])


def test_a_file_without_validation_rows_gives_two_splits(tmp_path):
  path = split_file.write(tmp_path / "s.csv", _listing(
      {"train": np.array([0, 2]), "test": np.array([4, 5])}), CLASSES)
  split_of, names = split_file.read(path, IDS, TASK, CLASSES)
  assert names == ("train", "test")
  np.testing.assert_array_equal(split_of, [0, -1, 0, -1, 1, 1, -1, -1])


@pytest.mark.parametrize("lines,message", [
    (["image_id,label", "IMG_0,nevus"], "line 1: missing column"),
    (["image_id,split", "IMG_0,train", "IMG_4,holdout"], "line 3: split must be"),
    (["image_id,split", "IMG_0,train", "IMG_99,test"], "line 3: image 'IMG_99' is not"),
    (["image_id,split", "IMG_0,train", "IMG_0,test"], "listed twice .first on line 2"),
    (["image_id,label,split", "IMG_0,melanoma,train", "IMG_4,melanoma,test"],
     "line 2: image 'IMG_0' is labelled 'melanoma' in the file but 'nevus'"),
    (["image_id,split", "IMG_0,train", "IMG_7,test"], "line 3: image 'IMG_7' belongs"),
    (["image_id,split", "IMG_0,train", "IMG_1,validation"], "no 'test' rows"),
])
def test_bad_files_are_named_with_the_line(tmp_path, lines, message):
  path = tmp_path / "splits.csv"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=message):
    split_file.read(path, IDS, TASK, CLASSES)


def test_a_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="split_file=.*nothing.csv"):
    split_file.read(tmp_path / "nothing.csv", IDS, TASK, CLASSES)


def test_the_file_has_plain_newlines(tmp_path):
  # Unix tools (grep ',test$', cut) read it as it is.
  path = split_file.write(tmp_path / "s.csv", _listing(
      {"train": np.array([0]), "test": np.array([4])}), CLASSES)
  assert path.read_bytes() == (b"image_id,group_id,label,split\n"
                               b"IMG_0,L0,nevus,train\nIMG_4,L3,melanoma,test\n")
