"""Tests for skinrecords.data.synthetic and bin/make_synthetic."""

from __future__ import annotations

import csv
import pathlib
import re

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import run_bin
from skinrecords.data import synthetic

TINY = dict(min_size=(64, 48), max_size=(96, 72))


def _write(path, **kwargs) -> dict:
  config = synthetic.SyntheticConfig(**{**TINY, **kwargs})
  return synthetic.write_dataset(path, config, progress=False)


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode(path: pathlib.Path) -> np.ndarray:
  bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
  assert bgr is not None, path
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def test_same_seed_same_bytes_other_seed_or_workers(tmp_path):
  a = _files(pathlib.Path(_write(tmp_path / "a", num_images=8, seed=3)["output_dir"]))
  b = _files(pathlib.Path(_write(tmp_path / "b", num_images=8, seed=3)["output_dir"]))
  c = _files(pathlib.Path(_write(tmp_path / "c", num_images=8, seed=4)["output_dir"]))
  d = _files(pathlib.Path(_write(tmp_path / "d", num_images=8, seed=3, workers=2)["output_dir"]))
  assert len(a) == 8 and a == b
  assert a == d  # spawned workers produce the same bytes: images depend on (seed, index) only
  assert set(a) != set(c) or a != c
  assert all(a[k] != c[k] for k in set(a) & set(c))  # every single image changes with the seed


def test_class_counts_layout_and_names(tmp_path):
  summary = _write(tmp_path, num_images=10, melanoma_fraction=0.3)
  assert summary["counts"] == {"Melanoma": 3, "NotMelanoma": 7}
  assert summary["csv"] is None
  assert sorted(p.name for p in tmp_path.iterdir()) == ["Melanoma", "NotMelanoma"]
  mel = sorted(p.name for p in (tmp_path / "Melanoma").iterdir())
  nev = sorted(p.name for p in (tmp_path / "NotMelanoma").iterdir())
  assert len(mel) == 3 and len(nev) == 7
  assert not set(mel) & set(nev)
  assert all(re.fullmatch(r"synth_\d{6}\.jpg", n) for n in mel + nev)
  assert sorted(mel + nev) == [f"synth_{i:06d}.jpg" for i in range(10)]


@pytest.mark.parametrize("fraction,expected", [(0.0, 0), (1.0, 5), (0.5, 2)])
def test_extreme_fractions(fraction, expected):
  # round(5 * 0.5) = 2 (banker's rounding), so the count is exact and predictable.
  labels = synthetic.assign_labels(synthetic.SyntheticConfig(num_images=5,
                                                            melanoma_fraction=fraction))
  assert int(labels.sum()) == expected


def test_sizes_within_bounds_and_vary(tmp_path):
  _write(tmp_path, num_images=12)
  sizes = [_decode(p).shape for p in tmp_path.rglob("*.jpg")]
  assert all(48 <= h <= 72 and 64 <= w <= 96 and c == 3 for h, w, c in sizes)
  assert len({s[:2] for s in sizes}) > 6  # sizes really vary
  fixed = tmp_path / "fixed"
  _write(fixed, num_images=3, min_size=(80, 60), max_size=(80, 60))
  assert {_decode(p).shape for p in fixed.rglob("*.jpg")} == {(60, 80, 3)}


def test_make_image_scales_and_rejects_tiny():
  for w, h in [(16, 16), (96, 72), (300, 225)]:
    img = synthetic.make_image(np.random.default_rng(0), True, w, h)
    assert img.shape == (h, w, 3) and img.dtype == np.uint8
    assert 20 < img.mean() < 235 and img.std() > 5
  with pytest.raises(ValueError, match="15x40"):
    synthetic.make_image(np.random.default_rng(0), False, 15, 40)


def _read_csv(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def test_csv_labels_and_patients(tmp_path):
  summary = _write(tmp_path, num_images=22, write_csv=True, images_per_patient=4, seed=1)
  rows = _read_csv(summary["csv"])
  assert list(rows[0]) == list(synthetic.CSV_COLUMNS)
  assert [r["image_name"] for r in rows] == [f"synth_{i:06d}" for i in range(22)]
  for r in rows:
    folder = "Melanoma" if r["target"] == "1" else "NotMelanoma"
    assert (tmp_path / folder / f"{r['image_name']}.jpg").is_file()
    assert r["diagnosis"] == ("melanoma" if r["target"] == "1" else "nevus")
  assert sum(r["target"] == "1" for r in rows) == 11
  patients = [r["patient_id"] for r in rows]
  assert patients == [f"P{i // 4:05d}" for i in range(22)]
  by_patient = {}
  for r in rows:
    by_patient.setdefault(r["patient_id"], set()).add(r["target"])
  assert len(by_patient) == 6
  assert sum(len(t) > 1 for t in by_patient.values()) <= 1  # patients are mostly one class


def test_flat_layout(tmp_path):
  summary = _write(tmp_path, num_images=9, write_csv=True, flat=True, melanoma_fraction=1 / 3)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "labels.csv"]
  rows = _read_csv(summary["csv"])
  names = sorted(p.stem for p in (tmp_path / "images").iterdir())
  assert names == sorted(r["image_name"] for r in rows) and len(names) == 9
  assert sum(r["target"] == "1" for r in rows) == 3 == summary["counts"]["Melanoma"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_images=0), "num_images=0"),
    (dict(num_images=4, seed=-1), "seed=-1"),
    (dict(num_images=4, melanoma_fraction=1.5), "melanoma_fraction=1.5"),
    (dict(num_images=4, min_size=(100, 80), max_size=(90, 80)), "min_size=(100, 80)"),
    (dict(num_images=4, min_size=(0, 80)), "min_size=(0, 80)"),
    (dict(num_images=4, flat=True), "flat=True needs write_csv"),
    (dict(num_images=4, images_per_patient=0), "images_per_patient=0"),
])
def test_validation(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    synthetic.write_dataset(tmp_path / "x", synthetic.SyntheticConfig(**kwargs), progress=False)
  assert not (tmp_path / "x").exists()


def test_parse_size_and_non_empty_output_dir(tmp_path):
  assert synthetic.parse_size("600x450") == (600, 450)
  with pytest.raises(ValueError, match="'600by450'"):
    synthetic.parse_size("600by450")
  (tmp_path / "old.jpg").write_bytes(b"x")
  with pytest.raises(FileExistsError, match=str(tmp_path)):
    _write(tmp_path, num_images=2)


def _abcd(rgb: np.ndarray) -> dict[str, float]:
  """Lesion area, border solidity, asymmetry and colour spread, measured on the pixels alone."""
  h, w = rgb.shape[:2]
  gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
  # Closing removes the 1-2 px dark hairs; Otsu on the central crop ignores vignette corners.
  gray = cv2.morphologyEx(gray, cv2.MORPH_CLOSE,
                          cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
  gray = cv2.GaussianBlur(gray, (3, 3), 0)
  t, _ = cv2.threshold(gray[h // 6:h - h // 6, w // 6:w - w // 6], 0, 255,
                       cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
  _, mask = cv2.threshold(gray, t, 255, cv2.THRESH_BINARY_INV)
  _, comp, stats, cents = cv2.connectedComponentsWithStats(mask)
  centre_dist = np.hypot(cents[1:, 0] - w / 2, cents[1:, 1] - h / 2)
  lesion = (comp == 1 + int(np.argmin(centre_dist - 0.01 * stats[1:, cv2.CC_STAT_AREA])))
  m = lesion.astype(np.uint8)
  contour = max(cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0],
                key=cv2.contourArea)
  solidity = cv2.contourArea(contour) / max(cv2.contourArea(cv2.convexHull(contour)), 1.0)
  mo = cv2.moments(m, True)
  cx, cy = mo["m10"] / mo["m00"], mo["m01"] / mo["m00"]
  flipped = cv2.warpAffine(m, np.float32([[-1, 0, 2 * cx], [0, -1, 2 * cy]]), (w, h),
                           flags=cv2.INTER_NEAREST)  # point reflection through the centroid
  asymmetry = 1.0 - (m & flipped).sum() / (m | flipped).sum()
  inner = cv2.erode(m, np.ones((3, 3), np.uint8)).astype(bool)
  lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
  colour = float(lab[inner].std(0).mean()) if inner.sum() > 10 else 0.0
  return dict(area=m.sum() / (w * h), solidity=solidity, asymmetry=asymmetry, colour=colour)


def test_classes_differ_the_abcd_way(tmp_path):
  _write(tmp_path, num_images=40, seed=7, min_size=(96, 72), max_size=(96, 72))
  feats, labels = [], []
  for cls, target in (("Melanoma", 1), ("NotMelanoma", 0)):
    for path in sorted((tmp_path / cls).glob("*.jpg")):
      feats.append(_abcd(_decode(path)))
      labels.append(target)
  assert sum(labels) == 20
  auc = {k: roc_auc_score(labels, [f[k] for f in feats]) for k in feats[0]}
  # Each ABCD criterion alone separates the classes well, in the textbook direction:
  # melanoma larger (D), more asymmetric (A), less convex border (B), more colours (C).
  assert auc["area"] > 0.8, auc
  assert auc["asymmetry"] > 0.8, auc
  assert auc["solidity"] < 0.2, auc
  assert auc["colour"] > 0.85, auc
  # ...but not trivially by size alone: the size ranges overlap.
  areas = np.array([f["area"] for f in feats])
  mel, nev = areas[np.array(labels) == 1], areas[np.array(labels) == 0]
  assert mel.min() < nev.max()


def test_bin_writes_flat_csv_and_rejects_bad_flags(tmp_path):
  out = tmp_path / "out"
  proc = run_bin("make_synthetic", f"--output_dir={out}", "--num_images=6", "--seed=2",
                 "--min_size=64x48", "--max_size=80x60", "--csv", "--flat",
                 "--images_per_patient=2")
  rows = _read_csv(out / "labels.csv")
  assert len(rows) == 6 and len(list((out / "images").glob("*.jpg"))) == 6
  assert sum(r["target"] == "1" for r in rows) == 3
  assert "Melanoma" in proc.stdout
  bad = run_bin("make_synthetic", f"--output_dir={tmp_path / 'bad'}", "--num_images=2",
                "--min_size=64by48", check=False)
  assert bad.returncode != 0 and "64by48" in bad.stderr
  again = run_bin("make_synthetic", f"--output_dir={out}", "--num_images=2", check=False)
  assert again.returncode != 0 and "not an empty directory" in again.stderr
