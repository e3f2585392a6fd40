"""Classes that make sense, or a clear error (issue 9 section 2): empty and single classes, CSV
label values, --classes typos, label conflicts, and the sorted-binary class-order warning."""

from __future__ import annotations

import pathlib

import pytest

from conftest import run_bin
from skinrecords.data import sources


def _write(path: pathlib.Path, data: bytes | None = None) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(str(path).encode() if data is None else data)  # Distinct bytes per path.
  return path


def _folders(root: pathlib.Path, counts: dict[str, int]) -> pathlib.Path:
  for cls, n in counts.items():
    (root / cls).mkdir(parents=True, exist_ok=True)
    for i in range(n):
      _write(root / cls / f"{cls}_{i}.jpg")
  return root


def _csv(tmp_path: pathlib.Path, labels: list[str], names: list[str] | None = None
         ) -> tuple[pathlib.Path, pathlib.Path]:
  root = tmp_path / "images"
  names = names or [f"ISIC_{i:04d}" for i in range(len(labels))]
  for name in set(names):
    _write(root / f"{name}.jpg")
  path = tmp_path / "labels.csv"
  path.write_text("image_name,target\n" + "".join(f"{n},{t}\n" for n, t in zip(names, labels)))
  return root, path


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
  root = _folders(tmp_path / "in", {"Melanoma": 2, "NotMelanoma": 2, "Nevus": 0})
  with pytest.raises(ValueError, match="class 'Nevus' has no usable images"):
    sources.list_sources(str(root))
  _write(root / "Nevus" / "notes.txt")  # Only a rejected file: still no images.
  with pytest.raises(ValueError, match="class 'Nevus' has no usable images"):
    sources.list_sources(str(root))


def test_given_class_without_folder_is_an_error_naming_it(tmp_path):
  root = _folders(tmp_path / "in", {"Melanoma": 2, "NotMelanoma": 2})
  with pytest.raises(ValueError) as info:
    sources.list_sources(str(root), classes=["NotMelanoma", "Melanoma", "Nevus"])
  assert "class 'Nevus' (from --classes) matches no class folder" in str(info.value)
  assert "found: Melanoma, NotMelanoma" in str(info.value)


def test_case_typo_in_classes_names_the_near_match(tmp_path):
  root = _folders(tmp_path / "in", {"Melanoma": 2, "NotMelanoma": 2})
  with pytest.raises(ValueError, match="'melanoma' .*did you mean 'Melanoma'"):
    sources.list_sources(str(root), classes=["NotMelanoma", "melanoma"])
  with pytest.raises(ValueError, match="'NotMelanom' .*did you mean 'NotMelanoma'"):
    sources.list_sources(str(root), classes=["NotMelanom", "Melanoma"])


def test_single_class_is_refused(tmp_path):
  root = _folders(tmp_path / "in", {"Melanoma": 3})
  with pytest.raises(ValueError, match="only one class \\('Melanoma'\\).*at least 2"):
    sources.list_sources(str(root))
  root, csv_path = _csv(tmp_path, ["1", "1.0", "1"])
  with pytest.raises(ValueError, match="only one class \\('1'\\)"):
    sources.list_sources(str(root), labels_csv=str(csv_path))


def test_float_csv_labels_are_integers(tmp_path):
  root, csv_path = _csv(tmp_path, ["0", "1.0", "1", "0.0", "01"])
  listing = sources.list_sources(str(root), labels_csv=str(csv_path))
  assert listing.classes == ["0", "1"]
  assert [i.label for i in listing.items] == ["0", "1", "1", "0", "1"]


def test_unexpected_csv_labels_fail_with_counts_or_are_rejected_per_row(tmp_path):
  root, csv_path = _csv(tmp_path, ["0", "1", "0", "yes", "1", "yes", "0"])
  with pytest.raises(ValueError) as info:
    sources.list_sources(str(root), labels_csv=str(csv_path))
  assert "unexpected labels" in str(info.value) and "'yes' (2)" in str(info.value)
  assert "--classes=" in str(info.value)
  listing = sources.list_sources(str(root), labels_csv=str(csv_path), classes=["0", "1"])
  assert listing.classes == ["0", "1"] and len(listing.items) == 5
  assert [r.reason for r in listing.rejected] == ["unknown label 'yes' (known: 0, 1)"] * 2


def test_text_label_typos_fail_naming_the_likely_label(tmp_path):
  root, csv_path = _csv(tmp_path, ["mel", "nev", "mel", "Mel", "nev", "nevv", "nev"])
  with pytest.raises(ValueError) as info:
    sources.list_sources(str(root), labels_csv=str(csv_path))
  assert "'Mel' (1, like 'mel')" in str(info.value)
  assert "'nevv' (1, like 'nev')" in str(info.value)
  assert "'mel' (" not in str(info.value) and "'nev' (" not in str(info.value)


def test_same_image_with_two_labels_is_a_conflict_not_a_duplicate(tmp_path):
  names = ["ISIC_0000", "ISIC_0001", "ISIC_0000", "ISIC_0002", "ISIC_0002", "ISIC_0003"]
  root, csv_path = _csv(tmp_path, ["0", "1", "1", "0", "0", "1"], names)
  listing = sources.list_sources(str(root), labels_csv=str(csv_path))
  assert listing.found == len(listing.items) + len(listing.rejected) + len(listing.duplicates)
  assert [i.image_name for i in listing.items] == ["ISIC_0001", "ISIC_0002", "ISIC_0003"]
  assert [d.path for d in listing.duplicates] == ["ISIC_0002.jpg"]  # Same label twice.
  conflict = (f"label conflict: listed as '0' (line 2), '1' (line 4) in {csv_path}; "
              "fix the CSV")
  # Listed and counted once per image, with all its lines (issue 27: twice, counted per row).
  assert [(r.path, r.reason) for r in listing.rejected] == [("ISIC_0000.jpg", conflict)]


@pytest.mark.parametrize("names, warned", [
    (("Melanoma", "NotMelanoma"), "--classes=NotMelanoma,Melanoma"),
    (("mel", "nev"), "--classes=nev,mel"),
    (("Malignant", "Other"), "--classes=Other,Malignant"),
    (("benign", "malignant"), None),
    (("Melanoma", "non_melanoma"), "--classes=non_melanoma,Melanoma"),
    (("0", "1"), None),
])
def test_sorted_binary_classes_warn_when_the_positive_looks_first(tmp_path, names, warned):
  root = _folders(tmp_path / "in", dict.fromkeys(names, 2))
  listing = sources.list_sources(str(root))
  assert listing.classes == list(names)
  order = [w for w in listing.warnings if w.startswith("class order")]
  if warned is None:
    assert order == []
  else:
    assert len(order) == 1 and order[0].endswith(warned) and f"'{names[0]}' is class 0" in order[0]
  # Given explicitly, the order is the user's: no warning.
  given = sources.list_sources(str(root), classes=list(names))
  assert not [w for w in given.warnings if w.startswith("class order")]


def test_make_records_empty_class_is_a_one_line_error(tmp_path):
  root = _folders(tmp_path / "in", {"Melanoma": 2, "NotMelanoma": 2})
  proc = run_bin("make_records", f"--input_dir={root}", f"--output_dir={tmp_path / 'out'}",
                 "--classes=NotMelanoma,Melanoma,Nevus", "--image_size=32", check=False)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "class 'Nevus'" in lines[0], proc.stderr
  assert not (tmp_path / "out").exists()
