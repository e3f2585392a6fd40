"""Tests for skinrecords.data.sources: layouts, CSV matching, rejections, duplicates, accounting."""

from __future__ import annotations

import os
import pathlib

import pytest

from skinrecords.data import sources

ISIC_COLUMNS = ("image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,"
                "benign_malignant,target")


def _write(path: pathlib.Path, data: bytes | None = None) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  # Distinct bytes per path by default, so only the tests that want duplicates get them.
  path.write_bytes(str(path).encode() if data is None else data)
  return path


def _check(listing: sources.Listing) -> sources.Listing:
  assert listing.found == len(listing.items) + len(listing.rejected) + len(listing.duplicates)
  relpaths = [item.relpath for item in listing.items]
  assert relpaths == sorted(relpaths)
  assert len(set(relpaths)) == len(relpaths)
  for item in listing.items:
    assert os.path.isabs(item.path) and os.path.isfile(item.path)
    assert "\\" not in item.relpath and not item.relpath.startswith("/")
    assert item.label in listing.classes
  return listing


def _reasons(listing: sources.Listing) -> dict[str, str]:
  return {r.path: r.reason for r in listing.rejected}


def test_class_folders_with_debris(tmp_path):
  root = tmp_path / "in"
  _write(root / "nev" / "b.jpg")
  _write(root / "nev" / "a.PNG")  # Extensions match in any case.
  _write(root / "mel" / "x.jpeg")
  _write(root / "mel" / "nested" / "y.tif")  # Nested folders belong to their class folder.
  _write(root / "mel" / "empty.jpg", b"")  # Zero-byte: kept here, preprocessing rejects it.
  _write(root / "mel" / "notes.txt")
  _write(root / "mel" / "README")
  _write(root / "stray.jpg")
  for debris in (".DS_Store", "mel/.DS_Store", "mel/._x.jpeg", "__MACOSX/mel/._x.jpeg",
                 ".cache/nev/z.jpg", "nev/.hidden/q.jpg"):
    _write(root / debris)
  listing = _check(sources.list_sources(str(root)))
  assert listing.layout == "class_folders"
  assert listing.classes == ["mel", "nev"]
  assert [(i.relpath, i.label, i.image_name, i.split, i.patient_id) for i in listing.items] == [
      ("mel/empty.jpg", "mel", "empty", None, ""),
      ("mel/nested/y.tif", "mel", "y", None, ""),
      ("mel/x.jpeg", "mel", "x", None, ""),
      ("nev/a.PNG", "nev", "a", None, ""),
      ("nev/b.jpg", "nev", "b", None, ""),
  ]
  assert listing.items[0].path == str(root / "mel" / "empty.jpg")
  accepted = ", ".join(sources.IMAGE_EXTENSIONS)
  assert _reasons(listing) == {
      "mel/notes.txt": f"unsupported extension '.txt' (accepted: {accepted})",
      "mel/README": f"unsupported file extension '' (accepted: {accepted})",
      "stray.jpg": "not inside a class folder",
  }
  assert listing.found == 8 and listing.duplicates == []


def test_classes_argument_orders_ids_and_rejects_unknown_labels(tmp_path):
  root = tmp_path / "in"
  for name in ("nev/1.jpg", "mel/2.jpg", "other/3.jpg"):
    _write(root / name)
  listing = _check(sources.list_sources(str(root), classes=["nev", "mel"]))
  assert listing.classes == ["nev", "mel"]
  assert [i.relpath for i in listing.items] == ["mel/2.jpg", "nev/1.jpg"]
  assert _reasons(listing) == {"other/3.jpg": "unknown label 'other' (known: nev, mel)"}
  with pytest.raises(ValueError, match="distinct non-empty"):
    sources.list_sources(str(root), classes=["nev", "nev"])
  with pytest.raises(ValueError, match="class 'bcc' .*matches no class folder"):
    sources.list_sources(str(root), classes=["nev", "mel", "bcc"])


def test_integer_class_folders_sort_numerically(tmp_path):
  root = tmp_path / "in"
  for name in ("10/a.jpg", "2/b.jpg", "0/c.jpg"):
    _write(root / name)
  assert _check(sources.list_sources(str(root))).classes == ["0", "2", "10"]


def test_presplit_with_val(tmp_path):
  root = tmp_path / "in"
  for name in ("train/0/a.jpg", "train/1/b.jpg", "val/0/c.jpg", "test/0/d.jpg", "test/2/e.jpg",
               "train/loose.jpg", "readme.md"):
    _write(root / name)
  _write(root / ".git" / "HEAD")  # Hidden folders do not break pre-split detection.
  listing = _check(sources.list_sources(str(root)))
  assert listing.layout == "presplit"
  assert listing.classes == ["0", "1", "2"]  # Union over splits.
  assert [(i.relpath, i.label, i.split) for i in listing.items] == [
      ("test/0/d.jpg", "0", "test"), ("test/2/e.jpg", "2", "test"),
      ("train/0/a.jpg", "0", "train"), ("train/1/b.jpg", "1", "train"),
      ("val/0/c.jpg", "0", "valid")]
  assert _reasons(listing) == {"train/loose.jpg": "not inside a class folder",
                               "readme.md": "not inside a class folder"}


def test_split_names_mixed_with_classes_mean_class_folders(tmp_path):
  root = tmp_path / "in"
  _write(root / "train" / "a.jpg")
  _write(root / "mel" / "b.jpg")
  listing = _check(sources.list_sources(str(root)))
  assert listing.layout == "class_folders" and listing.classes == ["mel", "train"]


def test_duplicates_keep_first_across_classes_and_splits(tmp_path):
  root = tmp_path / "in"
  same, other = b"\xff\xd8same-bytes", b"\xff\xd8diff-bytes"  # Same size, different content.
  _write(root / "train" / "nev" / "b.jpg", same)
  _write(root / "train" / "mel" / "z.jpg", same)
  _write(root / "test" / "mel" / "c.jpg", same)
  _write(root / "train" / "nev" / "a.jpg", other)
  _write(root / "train" / "nev" / "zero1.jpg", b"")
  _write(root / "train" / "nev" / "zero2.jpg", b"")  # Zero-byte files are not duplicates.
  _write(root / "train" / "nev" / "d.jpg", b"\xff\xd8same-nevus")
  _write(root / "test" / "nev" / "e.jpg", b"\xff\xd8same-nevus")
  _write(root / "train" / "mel" / "m.jpg", b"\xff\xd8mel-only")  # 'mel' keeps one image
  listing = _check(sources.list_sources(str(root)))
  # One label across the copies: the first by relpath is kept, the others are duplicates.
  assert listing.duplicates == [sources.Duplicate("train/nev/d.jpg", "test/nev/e.jpg")]
  assert [i.relpath for i in listing.items] == [
      "test/nev/e.jpg", "train/mel/m.jpg", "train/nev/a.jpg", "train/nev/zero1.jpg",
      "train/nev/zero2.jpg"]
  # Two labels ('mel' and 'nev') on the same bytes: every copy is a label conflict.
  conflicts = {r.path for r in listing.rejected if r.reason.startswith(sources.LABEL_CONFLICT)}
  assert conflicts == {"test/mel/c.jpg", "train/mel/z.jpg", "train/nev/b.jpg"}
  kept_all = _check(sources.list_sources(str(root), deduplicate=False))
  assert len(kept_all.items) == 9 and kept_all.duplicates == []


def test_symlinks_in_folders(tmp_path):
  root = tmp_path / "in"
  outside = _write(tmp_path / "outside" / "secret.jpg")
  inside = _write(root / "mel" / "a.jpg")
  (root / "mel" / "escape.jpg").symlink_to(outside)
  (root / "mel" / "alias.jpg").symlink_to(inside)
  (root / "mel" / "broken.jpg").symlink_to(root / "mel" / "gone.jpg")
  (root / "mel" / "linked_dir").symlink_to(tmp_path / "outside", target_is_directory=True)
  (root / "nev").symlink_to(tmp_path / "outside", target_is_directory=True)
  _write(root / "mel" / "sub" / "s.jpg")
  (root / "mel" / "loop").symlink_to(root / "mel", target_is_directory=True)
  _write(root / "bcc" / "b.jpg")  # A second class: one class alone is refused.
  listing = _check(sources.list_sources(str(root)))
  assert [i.relpath for i in listing.items] == ["bcc/b.jpg", "mel/a.jpg", "mel/sub/s.jpg"]
  assert listing.duplicates == [sources.Duplicate("mel/alias.jpg", "mel/a.jpg")]
  assert _reasons(listing) == {"mel/escape.jpg": "path escapes input folder",
                               "mel/broken.jpg": "broken symbolic link",
                               "mel/linked_dir": "path escapes input folder",
                               "mel/loop": "symbolic link to a folder (not followed)",
                               "nev": "path escapes input folder"}


def _isic_input(tmp_path):
  root = tmp_path / "isic"
  images = root / "jpeg" / "train"
  for name in ("ISIC_0001.jpg", "ISIC_0002.jpg", "ISIC_0003.JPG", "ISIC_0004.jpg",
               "ISIC_0009.jpg", "ISIC_0009.png", "ISIC_0010.jpg"):
    _write(images / name)
  _write(images / "ISIC_0001.txt")  # A sidecar must not make ISIC_0001 ambiguous.
  _write(images / "ISIC_0004_copy.jpg", (images / "ISIC_0004.jpg").read_bytes())
  outside = _write(tmp_path / "elsewhere" / "ISIC_0011.jpg")
  (images / "ISIC_0011.jpg").symlink_to(outside)
  rows = [
      "ISIC_0001,IP_1,male,45.0,torso,unknown,benign,0",
      "ISIC_0002,IP_1,male,45.0,torso,melanoma,malignant,1",
      "jpeg/train/ISIC_0003.JPG,IP_2,female,60.0,,nevus,benign,0",  # Relative path.
      "jpeg/train/ISIC_0004,,female,60.0,,nevus,benign,0",  # Relative path without extension.
      "ISIC_0004_copy.jpg,IP_3,female,30.0,,nevus,benign,0",  # By file name; same bytes.
      "ISIC_0005,IP_4,male,50.0,,nevus,benign,0",  # Missing.
      "ISIC_0009,IP_4,male,50.0,,nevus,benign,0",  # Ambiguous.
      "ISIC_0010,IP_5,male,50.0,,nevus,benign,",  # Empty label.
      "../elsewhere/ISIC_0011.jpg,IP_5,male,50.0,,nevus,benign,0",
      f"{outside},IP_5,male,50.0,,nevus,benign,0",
      "ISIC_0011,IP_5,male,50.0,,nevus,benign,0",  # A link inside pointing outside.
      "ISIC_0001.txt,IP_6,male,50.0,,nevus,benign,0",
      "ISIC_0002,IP_1,male,45.0,torso,melanoma,malignant,1",  # Same file again.
      ",IP_7,male,50.0,,nevus,benign,0",
  ]
  csv_path = root / "train.csv"
  csv_path.write_text(ISIC_COLUMNS + "\n" + "\n".join(rows) + "\n")
  return root, csv_path, outside, len(rows)


def test_isic_csv(tmp_path):
  root, csv_path, outside, n_rows = _isic_input(tmp_path)
  listing = _check(sources.list_sources(str(root), labels_csv=str(csv_path),
                                        patient_column="patient_id"))
  assert listing.layout == "csv" and listing.found == n_rows
  assert listing.classes == ["0", "1"]
  assert [(i.relpath, i.image_name, i.label, i.patient_id, i.split) for i in listing.items] == [
      ("jpeg/train/ISIC_0001.jpg", "ISIC_0001", "0", "IP_1", None),
      ("jpeg/train/ISIC_0002.jpg", "ISIC_0002", "1", "IP_1", None),
      ("jpeg/train/ISIC_0003.JPG", "jpeg/train/ISIC_0003.JPG", "0", "IP_2", None),
      ("jpeg/train/ISIC_0004.jpg", "jpeg/train/ISIC_0004", "0", "", None),
  ]
  assert sorted((d.path, d.duplicate_of) for d in listing.duplicates) == [
      ("jpeg/train/ISIC_0002.jpg", "jpeg/train/ISIC_0002.jpg"),
      ("jpeg/train/ISIC_0004_copy.jpg", "jpeg/train/ISIC_0004.jpg")]
  reasons = _reasons(listing)
  assert reasons["ISIC_0005"] == f"not found under {root}"
  assert reasons["ISIC_0009"] == (
      "ambiguous: matches jpeg/train/ISIC_0009.jpg, jpeg/train/ISIC_0009.png")
  assert reasons["jpeg/train/ISIC_0010.jpg"] == f"empty 'target' cell ({csv_path} line 9)"
  assert reasons["../elsewhere/ISIC_0011.jpg"] == "path escapes input folder"
  assert reasons[str(outside)] == "path escapes input folder"
  assert reasons["jpeg/train/ISIC_0011.jpg"] == "path escapes input folder"
  assert reasons["jpeg/train/ISIC_0001.txt"].startswith("unsupported extension '.txt'")
  assert reasons[""] == f"empty 'image_name' cell ({csv_path} line 15)"
  assert len(listing.rejected) == 8


def test_csv_without_patient_column_and_given_classes(tmp_path):
  root, csv_path, _, _ = _isic_input(tmp_path)
  listing = _check(sources.list_sources(str(root), labels_csv=str(csv_path), classes=["1", "0"]))
  assert listing.classes == ["1", "0"]
  assert [(i.relpath, i.label, i.patient_id) for i in listing.items][:2] == [
      ("jpeg/train/ISIC_0001.jpg", "0", ""), ("jpeg/train/ISIC_0002.jpg", "1", "")]
  assert listing.patient_source is None and listing.missing_patient == 0
  with pytest.raises(ValueError, match=r"classes \['1'\]: expected 2 or more"):
    sources.list_sources(str(root), labels_csv=str(csv_path), classes=["1"])


def test_ham10000_csv(tmp_path):
  root = tmp_path / "ham"
  rows = [("HAM_0000118", "ISIC_0027419", "bkl"), ("HAM_0000118", "ISIC_0025030", "bkl"),
          ("HAM_0002730", "ISIC_0026769", "mel"), ("HAM_0001466", "ISIC_0031633", "nv"),
          ("HAM_0001466", "ISIC_0027850", "nv")]
  for i, (_, image_id, _) in enumerate(rows):
    _write(root / f"HAM10000_images_part_{1 + i % 2}" / f"{image_id}.jpg")
  csv_path = tmp_path / "HAM10000_metadata.csv"
  # Written with a byte-order mark, as spreadsheet exports often are.
  csv_path.write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n" + "".join(
      f"{lesion},{image},{dx},histo,80.0,male,scalp\n" for lesion, image, dx in rows),
                      encoding="utf-8-sig")
  listing = _check(sources.list_sources(str(root), labels_csv=str(csv_path),
                                        image_column="image_id", label_column="dx",
                                        patient_column="lesion_id"))
  assert listing.classes == ["bkl", "mel", "nv"] and listing.rejected == []
  by_name = {i.image_name: (i.label, i.patient_id) for i in listing.items}
  assert by_name == {image: (dx, lesion) for lesion, image, dx in rows}


@pytest.mark.parametrize("kwargs, bad", [
    ({"image_column": "image"}, "'image' (given as image_column)"),
    ({"label_column": "label"}, "'label' (given as label_column)"),
    ({"patient_column": "patient"}, "'patient' (given as patient_column)"),
])
def test_unknown_csv_columns(tmp_path, kwargs, bad):
  root, csv_path, _, _ = _isic_input(tmp_path)
  with pytest.raises(ValueError) as info:
    sources.list_sources(str(root), labels_csv=str(csv_path), **kwargs)
  message = str(info.value)
  assert str(csv_path) in message and bad in message
  assert ISIC_COLUMNS.replace(",", ", ") in message


def test_missing_csv_file(tmp_path):
  (tmp_path / "in").mkdir()
  with pytest.raises(ValueError, match="nope.csv"):
    sources.list_sources(str(tmp_path / "in"), labels_csv=str(tmp_path / "nope.csv"))


def test_empty_inputs_raise(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    sources.list_sources(str(tmp_path / "absent"))
  empty = tmp_path / "empty"
  _write(empty / ".DS_Store")
  with pytest.raises(ValueError) as info:
    sources.list_sources(str(empty))
  assert str(empty) in str(info.value) and "class folders" in str(info.value)
  junk = tmp_path / "junk"
  _write(junk / "mel" / "a.txt")
  _write(junk / "b.jpg")
  with pytest.raises(ValueError, match=r"2 found, 2 rejected.*unsupported extension"):
    sources.list_sources(str(junk))


def test_listing_is_deterministic(tmp_path):
  names = [f"{c}/img_{i:02d}.jpg" for c in ("mel", "nev", "bcc") for i in range(12)]
  listings = []
  for run, order in enumerate((names, names[::-1])):  # Different creation order per folder.
    root = tmp_path / f"run{run}"
    for name in order:
      _write(root / name, name.encode())
    _write(root / "mel" / "copy.jpg", b"mel/img_03.jpg")
    _write(root / "bcc" / "x.gif")
    listings.append(_check(sources.list_sources(str(root))))
  strip = lambda listing: ([(i.relpath, i.label) for i in listing.items], listing.rejected,
                           listing.duplicates, listing.classes, listing.found)
  assert strip(listings[0]) == strip(listings[1])
  assert listings[0].duplicates == [sources.Duplicate("mel/img_03.jpg", "mel/copy.jpg")]


def test_patients_csv_for_presplit_reports_leaks_missing_and_unused_rows(tmp_path):
  root = tmp_path / "in"
  for name in ("train/0/a.jpg", "train/1/b.jpg", "valid/0/c.jpg", "valid/1/d.jpg", "train/0/e.jpg"):
    _write(root / name)
  csv_path = tmp_path / "patients.csv"
  # By stem, file name and relative path; "e" has an empty cell, "zz" names no image.
  csv_path.write_text("image_name,patient_id\na,P1\nc.jpg,P1\ntrain/1/b,P2\nvalid/1/d.jpg,P3\n"
                      "e,\nzz,P9\n")
  listing = _check(sources.list_sources(str(root), patients_csv=str(csv_path),
                                        patient_column="patient_id"))
  assert {i.image_name: i.patient_id for i in listing.items} == {
      "a": "P1", "b": "P2", "c": "P1", "d": "P3", "e": ""}
  assert listing.missing_patient == 1
  assert listing.patient_source == f"patients CSV {csv_path} column 'patient_id'"
  assert listing.warnings[0] == f"patients CSV {csv_path}: 1 of 6 rows name no listed image (first: zz)"
  assert listing.warnings[1].startswith("1 patients have images in more than one of the given "
                                        "splits (first: P1 in train, valid)")
  with pytest.raises(ValueError, match="give the patient_column"):
    sources.list_sources(str(root), patients_csv=str(csv_path))
