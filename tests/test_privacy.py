"""What records give away: pseudonymous patient ids and names, and no source metadata (issue 28)."""

from __future__ import annotations

import csv
import io
import json
import pathlib
import struct

import cv2
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import run_bin
from skinrecords.core import features
from skinrecords.data import convert
from skinrecords.data import preprocess
from skinrecords.data import pseudonyms

SIZE = 32


def _config(input_dir, output_dir, **kw) -> convert.ConvertConfig:
  pre = preprocess.PreprocessConfig(image_size=SIZE, **kw.pop("pre", {}))
  return convert.ConvertConfig(input_dir=str(input_dir), output_dir=str(output_dir),
                               preprocess=pre, workers=1, progress=False, **kw)


def _csv_dataset(root: pathlib.Path, patients=24, per_patient=3, seed=5) -> pathlib.Path:
  """ISIC-like flat folder and labels CSV; patient ids look like a hospital's (MRN-...)."""
  rng = np.random.default_rng(seed)
  rows = []
  (root / "images").mkdir(parents=True)
  for p in range(patients):
    for j in range(per_patient):
      name = f"ISIC_{p:03d}{j}"
      img = cv2.resize(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8), (48, 40),
                       interpolation=cv2.INTER_NEAREST)
      cv2.imwrite(str(root / "images" / f"{name}.jpg"), img)
      rows.append({"image_name": name, "patient_id": f"MRN-{700000 + p}", "target": int(p % 3 == 0)})
  with open(root / "labels.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return root / "labels.csv"


def _records(out: pathlib.Path) -> list[dict]:
  """Every record of every split: split, fold, image_name, patient_id, image bytes."""
  m = json.loads((out / "manifest.json").read_text())
  spec = features.feature_spec()
  rows = []
  for split, info in m["splits"].items():
    for shard in info["shards"]:
      for raw in tf.data.TFRecordDataset(str(out / shard["file"])):
        ex = {k: v.numpy() for k, v in tf.io.parse_single_example(raw, spec).items()}
        rows.append({"split": split, "fold": int(ex[features.FOLD]),
                     "image_name": ex[features.IMAGE_NAME].decode(),
                     "patient_id": ex[features.PATIENT_ID].decode(),
                     "image": ex[features.IMAGE]})
  return rows


def _all_bytes(folder: pathlib.Path) -> bytes:
  return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_pseudonymized_ids_keep_splits_and_folds_and_leave_no_identifier(tmp_path):
  labels = _csv_dataset(tmp_path / "in")
  salt = tmp_path / "secret" / "salt.key"
  kw = dict(labels_csv=str(labels), patient_column="patient_id", folds=3, min_train_shards=4)
  convert.convert(_config(tmp_path / "in" / "images", tmp_path / "plain", **kw))
  m = convert.convert(_config(tmp_path / "in" / "images", tmp_path / "pseudo",
                              pseudonymize_patients=str(salt), **kw)).manifest
  plain, pseudo = _records(tmp_path / "plain"), _records(tmp_path / "pseudo")
  key = salt.read_bytes().strip()
  assert len(key) >= 32  # created on first use
  # Same images in the same splits and folds; every raw id replaced by its keyed hash.
  by_name = {r["image_name"]: r for r in pseudo}
  assert sorted(by_name) == sorted(r["image_name"] for r in plain)
  for r in plain:
    twin = by_name[r["image_name"]]
    assert (twin["split"], twin["fold"]) == (r["split"], r["fold"]), r["image_name"]
    assert twin["patient_id"] == pseudonyms.pseudonym(key, "patient", r["patient_id"])
    assert twin["patient_id"] != r["patient_id"]
  assert len({r["patient_id"] for r in pseudo}) == len({r["patient_id"] for r in plain}) == 24
  # Nothing in the output holds a raw id or the key; the manifest says how ids were made.
  everything = _all_bytes(tmp_path / "pseudo")
  assert b"MRN-" not in everything and key not in everything and b"salt.key" not in everything
  assert m["inputs"]["pseudonymized"]["patient_id"] == pseudonyms.METHOD
  assert not m["inputs"]["pseudonymized"]["image_name"]
  # The same key again: the same ids (records stay comparable across conversions).
  again = convert.convert(_config(tmp_path / "in" / "images", tmp_path / "again",
                                  pseudonymize_patients=str(salt), **kw))
  assert again.manifest["fingerprint"] == m["fingerprint"]


def test_pseudonymized_names_mapping_lies_beside_the_key(tmp_path):
  labels = _csv_dataset(tmp_path / "in", patients=6)
  salt = tmp_path / "salt.key"
  salt.write_text("0123456789abcdef0123456789abcdef\n")
  convert.convert(_config(tmp_path / "in" / "images", tmp_path / "out", labels_csv=str(labels),
                          patient_column="patient_id", pseudonymize_patients=str(salt),
                          pseudonymize_names=True))
  rows = _records(tmp_path / "out")
  mapping = {r["image_name"]: r["original_path"]
             for r in csv.DictReader(open(pseudonyms.mapping_path(str(salt))))}
  assert sorted(mapping) == sorted(r["image_name"] for r in rows) and len(mapping) == 18
  assert sorted(mapping.values()) == sorted(f"ISIC_{p:03d}{j}.jpg" for p in range(6)
                                            for j in range(3))
  assert b"ISIC_" not in _all_bytes(tmp_path / "out")


@pytest.mark.slow
def test_make_records_pseudonymizes_and_evaluate_predict_read_it(tmp_path):
  """Through the commands: make_records with a salt file, evaluate and predict on its records
  (patient-level bootstrap over the pseudonyms), then wrong uses of the flag."""
  from tiny_runs import random_model, save_run  # pylint: disable=g-import-not-at-top

  labels = _csv_dataset(tmp_path / "in", patients=12)
  salt = tmp_path / "salt.key"
  out = tmp_path / "out"
  proc = run_bin("make_records", f"--input_dir={tmp_path / 'in' / 'images'}",
                 f"--output_dir={out}", f"--labels_csv={labels}", "--patient_column=patient_id",
                 f"--pseudonymize_patients={salt}", "--image_size=32", "--workers=1",
                 "--noprogress")
  assert "pseudonymised: patient_id" in proc.stdout and str(salt) in proc.stdout, proc.stdout
  assert salt.exists() and b"MRN-" not in _all_bytes(out)
  run = save_run(random_model(out, 32, seed=1), tmp_path / "run", out, 32)
  report = run_bin("evaluate", f"--model_dir={run}", "--split=test", "--bootstrap=50")
  assert "patient" in report.stdout, report.stdout[-2000:]
  assert b"MRN-" not in _all_bytes(run)
  pred = run_bin("predict", f"--model_dir={run}", f"--records_dir={out}", "--split=test",
                 f"--output_csv={tmp_path / 'pred.csv'}")
  assert "MRN-" not in pred.stdout + (tmp_path / "pred.csv").read_text()
  for args, message in (
      ([f"--pseudonymize_patients={tmp_path / 'out2' / 'k'}"], "inside"),
      (["--pseudonymize_names"], "needs --pseudonymize_patients")):
    bad = run_bin("make_records", f"--input_dir={tmp_path / 'in' / 'images'}",
                  f"--output_dir={tmp_path / 'out2'}", f"--labels_csv={labels}",
                  "--patient_column=patient_id", "--image_size=32", "--noprogress", *args,
                  check=False)
    assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr
  short = tmp_path / "short.key"
  short.write_text("abc")
  bad = run_bin("make_records", f"--input_dir={tmp_path / 'in' / 'images'}",
                f"--output_dir={tmp_path / 'out3'}", f"--labels_csv={labels}",
                "--patient_column=patient_id", "--image_size=32", "--noprogress",
                f"--pseudonymize_patients={short}", check=False)
  assert bad.returncode == 2 and "at least 16" in bad.stderr, bad.stderr[-2000:]


# --- source metadata ------------------------------------------------------------------------------

GPS_SENTINEL = "N51d30m26s-SENTINEL"
DATE_SENTINEL = "2019:05:04 12:34:56"
SERIAL_SENTINEL = "SN-7731-SENTINEL"
XMP_SENTINEL = b"xmp-creator-SENTINEL"
ICC_SENTINEL = b"icc-desc-SENTINEL"
COMMENT_SENTINEL = b"comment-SENTINEL"
SENTINELS = (GPS_SENTINEL.encode(), DATE_SENTINEL.encode(), SERIAL_SENTINEL.encode(), XMP_SENTINEL,
             ICC_SENTINEL, COMMENT_SENTINEL, b"SENTINEL")


def _segment(marker: int, payload: bytes) -> bytes:
  return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _jpeg_with_metadata(path: pathlib.Path, rng) -> None:
  """A JPEG carrying EXIF (GPS, date, camera serial), XMP, an ICC profile and a comment."""
  img = cv2.resize(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8), (64, 48),
                   interpolation=cv2.INTER_NEAREST)
  exif = Image.Exif()
  exif[0x0132] = DATE_SENTINEL  # DateTime
  exif[0x010F] = "Dermatoscope Inc"  # Make
  exif.get_ifd(0x8769)[0xA431] = SERIAL_SENTINEL  # Exif IFD: BodySerialNumber
  exif.get_ifd(0x8769)[0x9003] = DATE_SENTINEL  # DateTimeOriginal
  exif.get_ifd(0x8825)[0x0001] = "N"  # GPS IFD: GPSLatitudeRef
  exif.get_ifd(0x8825)[0x001B] = GPS_SENTINEL  # GPSProcessingMethod
  buf = io.BytesIO()
  Image.fromarray(img[..., ::-1]).save(buf, "JPEG", exif=exif.tobytes(), quality=90)
  data = buf.getvalue()
  path.parent.mkdir(parents=True, exist_ok=True)
  xmp = (b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta><dc:creator>" + XMP_SENTINEL +
         b"</dc:creator></x:xmpmeta>")
  icc = b"ICC_PROFILE\0\x01\x01" + ICC_SENTINEL * 4
  extra = _segment(0xE1, xmp) + _segment(0xE2, icc) + _segment(0xFE, COMMENT_SENTINEL)
  path.write_bytes(data[:2] + extra + data[2:])  # right after SOI
  assert all(s in path.read_bytes() for s in SENTINELS)
  assert cv2.imread(str(path)) is not None  # still a valid JPEG


def _jpeg_segments(data: bytes) -> list[int]:
  """The markers of a JPEG's header segments, up to the start of scan."""
  assert data[:2] == b"\xff\xd8"
  markers, i = [], 2
  while i < len(data):
    marker = data[i + 1]
    if marker == 0xDA:  # start of scan: entropy-coded data follows
      break
    markers.append(marker)
    i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
  return markers


def _png_chunks(data: bytes) -> list[bytes]:
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  chunks, i = [], 8
  while i < len(data):
    length = struct.unpack(">I", data[i:i + 4])[0]
    chunks.append(data[i + 4:i + 8])
    i += 12 + length
  return chunks


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_records_carry_no_source_metadata(tmp_path, image_format):
  rng = np.random.default_rng(0)
  for cls in ("NotMelanoma", "Melanoma"):
    for i in range(4):
      _jpeg_with_metadata(tmp_path / "in" / cls / f"{cls}_{i}.jpg", rng)
  out = tmp_path / "out"
  m = convert.convert(_config(tmp_path / "in", out, classes=("NotMelanoma", "Melanoma"),
                              min_train_shards=1, pre={"image_format": image_format})).manifest
  assert m["inputs"]["converted"] == 8
  rows = _records(out)
  assert len(rows) == 8
  for r in rows:
    image = r["image"]
    if image_format == "jpeg":
      # SOI, then only JFIF (APP0), quantisation/Huffman tables and the frame header: no APP1
      # (EXIF, XMP), APP2 (ICC), APP13 (IPTC) or COM segment.
      assert set(_jpeg_segments(image)) <= {0xE0, 0xDB, 0xC4, 0xC0, 0xC2, 0xDD}, [
          hex(x) for x in _jpeg_segments(image)]
    else:
      assert set(_png_chunks(image)) <= {b"IHDR", b"IDAT", b"IEND"}, _png_chunks(image)
    assert not any(s in image for s in SENTINELS)
  # Nor anywhere else in the output (shards, manifest).
  everything = _all_bytes(out)
  assert not any(s in everything for s in SENTINELS)
  assert b"Exif\0\0" not in everything and b"ICC_PROFILE" not in everything
