"""Patient metadata on the write side: make_records --metadata_columns, the manifest's statistics
(training split only, per fold), verify_records, the SIIM-ISIC Kaggle files' int64 codes, and the
synthetic generator's known metadata signal."""

from __future__ import annotations

import csv
import json
import math
import pathlib

import cv2
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from conftest import run_bin
from skinrecords.core import fileio
from skinrecords.core import manifest
from skinrecords.core import metadata as md
from skinrecords.data import convert
from skinrecords.data import preprocess
from skinrecords.data import records
from skinrecords.data import synthetic
from skinrecords.input import kaggle

SIZE = 32
COLUMNS = ("age", "site", "sex")


def _jpeg(rng) -> bytes:
  small = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
  ok, buf = cv2.imencode(".jpg", cv2.resize(small, (48, 40), interpolation=cv2.INTER_NEAREST))
  assert ok
  return buf.tobytes()


def _csv(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
  with path.open("w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path


def _csv_dataset(root: pathlib.Path, n=36, seed=0) -> pathlib.Path:
  """n images under root/images and root/labels.csv with metadata: age numeric (some empty or
  "NaN"), site categorical (some empty), sex, and the label's synonyms."""
  rng = np.random.default_rng(seed)
  (root / "images").mkdir(parents=True)
  rows = []
  for i in range(n):
    (root / "images" / f"img_{i:03d}.jpg").write_bytes(_jpeg(rng))
    target = i % 3 == 0
    rows.append({"image_name": f"img_{i:03d}", "patient_id": f"P{i // 2:03d}",
                 "target": int(target), "diagnosis": "melanoma" if target else "nevus",
                 "age": "" if i % 7 == 3 else "NaN" if i % 11 == 5 else str(20 + (i * 13) % 60),
                 "site": "" if i % 5 == 4 else ("torso", "head/neck", "palms/soles")[i % 3],
                 "sex": ("male", "female")[i % 2]})
  return _csv(root / "labels.csv", rows)


def _config(input_dir, output_dir, **kw) -> convert.ConvertConfig:
  kw.setdefault("workers", 1)
  kw.setdefault("progress", False)
  kw.setdefault("min_train_shards", 2)
  return convert.ConvertConfig(input_dir=str(input_dir), output_dir=str(output_dir),
                               preprocess=preprocess.PreprocessConfig(image_size=SIZE), **kw)


def _records(out: pathlib.Path, m: dict) -> list[dict]:
  """Every record's split, fold and metadata values ({name: value}; absent when missing)."""
  rows = []
  for split, info in m["splits"].items():
    for shard in info["shards"]:
      for raw in tf.data.TFRecordDataset(str(out / shard["file"])):
        ex = tf.train.Example.FromString(raw.numpy()).features.feature
        row = {"split": split, "fold": ex["fold"].int64_list.value[0], "meta": {}}
        for key, f in ex.items():
          if key.startswith(md.PREFIX):
            kind = f.WhichOneof("kind")
            value = getattr(f, kind).value[0]
            row["meta"][key[len(md.PREFIX):]] = value.decode() if kind == "bytes_list" else value
        rows.append(row)
  return rows


def _convert(root, out, **kw) -> dict:
  config = _config(root / "images", out, labels_csv=str(root / "labels.csv"),
                   patient_column="patient_id", metadata_columns=COLUMNS, **kw)
  return convert.convert(config).manifest


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("meta")
  _csv_dataset(root)
  out = root / "out"
  return root, out, _convert(root, out, folds=3)


def test_records_store_typed_values_and_leave_missing_cells_out(converted):
  root, out, m = converted
  rows = _records(out, m)
  spec = manifest.read_info(out).metadata
  assert spec.names == COLUMNS
  assert [c.kind for c in spec.columns] == [md.NUMERIC, md.CATEGORICAL, md.CATEGORICAL]
  assert [(c.key, c.dtype) for c in spec.columns] == [
      ("meta/age", "float"), ("meta/site", "bytes"), ("meta/sex", "bytes")]
  with (root / "labels.csv").open() as f:
    csv_rows = list(csv.DictReader(f))
  expected_missing = {c: sum(md.is_missing(r[c]) for r in csv_rows) for c in COLUMNS}
  assert expected_missing["age"] > 0 and expected_missing["site"] > 0
  for c in COLUMNS:  # absent, never 0 or "": the records lack exactly the CSV's empty cells
    assert sum(c not in r["meta"] for r in rows) == expected_missing[c]
    assert sum(spec.column(c).missing.values()) == expected_missing[c]
    for split in m["splits"]:
      assert spec.column(c).missing[split] == sum(
          c not in r["meta"] for r in rows if r["split"] == split)
  assert all(isinstance(r["meta"]["age"], float) for r in rows if "age" in r["meta"])
  assert {r["meta"]["site"] for r in rows if "site" in r["meta"]} == {
      "torso", "head/neck", "palms/soles"}


def _same(stats: md.Stats, kind: str, values) -> bool:
  """`stats` are those of `values` (record order here, item order there: sums may differ in the
  last bit)."""
  expected = md.compute_stats(kind, values)
  return (stats.vocabulary == expected.vocabulary and stats.mean == pytest.approx(expected.mean)
          and stats.std == pytest.approx(expected.std))


def test_statistics_come_from_training_records_and_per_fold_from_the_other_folds(converted):
  _, out, m = converted
  rows = _records(out, m)
  spec = manifest.read_info(out).metadata
  train = [r for r in rows if r["split"] == "train"]
  for c in spec.columns:
    assert _same(c.stats, c.kind, [r["meta"].get(c.name) for r in train])
    assert sorted(c.fold_stats) == [0, 1, 2]
    for k, stats in c.fold_stats.items():
      assert _same(stats, c.kind, [r["meta"].get(c.name) for r in train if r["fold"] != k])
  age = spec.column("age")
  everything = md.compute_stats(md.NUMERIC, [r["meta"].get("age") for r in rows])
  assert age.stats.mean != pytest.approx(everything.mean)  # valid/test values were left out
  assert spec.for_fold(1).column("age").stats == age.fold_stats[1]


def test_presplit_layout_with_metadata_csv_never_learns_from_valid(tmp_path):
  """Valid patients are 80-89 and have a site train never had: neither reaches the statistics."""
  rng = np.random.default_rng(3)
  rows = []
  for split, ages in (("train", range(20, 30)), ("valid", range(80, 90))):
    for cls in ("benign", "malignant"):
      for j, age in enumerate(ages):
        name = f"{split}_{cls}_{j}"
        path = tmp_path / "in" / split / cls / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(rng))
        rows.append({"image": name, "age": age, "site": "ear" if split == "valid" else "torso"})
  _csv(tmp_path / "meta.csv", rows)
  m = convert.convert(_config(tmp_path / "in", tmp_path / "out", image_column="image",
                              metadata_csv=str(tmp_path / "meta.csv"),
                              metadata_columns=("age", "site"))).manifest
  spec = md.MetadataSpec.from_dict(m["metadata"])
  assert spec.column("age").stats.mean == pytest.approx(24.5)
  assert spec.column("site").stats.vocabulary == ("torso",)
  assert spec.column("age").missing == {"train": 0, "valid": 0}


def test_same_inputs_same_bytes_and_a_changed_cell_does_not_resume(tmp_path):
  root = tmp_path / "data"
  _csv_dataset(root, n=18)
  a, b = tmp_path / "a", tmp_path / "b"
  ma, mb = _convert(root, a), _convert(root, b)
  assert json.dumps(ma["metadata"]) == json.dumps(mb["metadata"])
  assert ma["fingerprint"] == mb["fingerprint"]
  for name in sorted(p.name for p in a.glob("*.tfrecord")):
    assert (a / name).read_bytes() == (b / name).read_bytes()
  text = (root / "labels.csv").read_text().replace("palms/soles", "upper extremity")
  (root / "labels.csv").write_text(text)
  with pytest.raises(convert.OutputExistsError):
    _convert(root, a)
  plain = convert.convert(_config(root / "images", tmp_path / "plain",
                                  labels_csv=str(root / "labels.csv"))).manifest
  assert "metadata" not in plain and "metadata_columns" not in plain["conversion"]


@pytest.mark.parametrize("columns,message", [
    (("diagnosis",), "'diagnosis' refused: it is the label"),
    (("target",), "'target' refused: it is the label"),
    (("age", "Benign_Malignant"), "'Benign_Malignant' refused"),
    (("patient_id",), "'patient_id' refused: it is the --patient_column"),
    (("agee",), "'agee' .* not in labels CSV .*; its columns: image_name, patient_id, target, "
                "diagnosis, age, site, sex"),
    (("site:numeric",), "'site' \\(numeric\\): 'torso' on labels CSV .* line 2 is not a finite"),
    (("age:ordinal",), "kind 'ordinal'"),
])
def test_wrong_columns_are_refused_with_the_reason(tmp_path, columns, message):
  _csv_dataset(tmp_path, n=6)
  with pytest.raises(ValueError, match=message):
    convert.convert(_config(tmp_path / "images", tmp_path / "out",
                            labels_csv=str(tmp_path / "labels.csv"),
                            patient_column="patient_id", metadata_columns=columns))
  assert not (tmp_path / "out").exists()  # refused before anything was written


def test_forced_kind_and_images_per_patient(tmp_path):
  _csv_dataset(tmp_path, n=9)
  m = convert.convert(_config(tmp_path / "images", tmp_path / "out",
                              labels_csv=str(tmp_path / "labels.csv"), patient_column="patient_id",
                              metadata_columns=("age:categorical", "images_per_patient"))).manifest
  spec = md.MetadataSpec.from_dict(m["metadata"])
  assert spec.column("age").kind == md.CATEGORICAL
  assert all(v.isdigit() for v in spec.column("age").stats.vocabulary)
  rows = _records(tmp_path / "out", m)
  # 9 images, 2 per patient: P000-P003 have 2, P004 has 1.
  assert sorted(r["meta"]["images_per_patient"] for r in rows) == [1.0] + [2.0] * 8
  with pytest.raises(ValueError, match="images_per_patient needs patient_column"):
    _config(tmp_path / "images", tmp_path / "o2", labels_csv=str(tmp_path / "labels.csv"),
            metadata_columns=("images_per_patient",)).validate()


def test_verify_checks_the_metadata_against_the_manifest(tmp_path):
  root = tmp_path / "data"
  _csv_dataset(root, n=12)
  out = tmp_path / "out"
  m = _convert(root, out)
  assert records.verify(out, progress=False).ok
  bad = json.loads((out / manifest.FILE).read_text())
  bad["metadata"]["columns"][0]["missing"]["train"] += 1
  bad["metadata"]["columns"][2]["dtype"] = "float"  # sex stored as bytes
  fileio.write_json_atomic(out / manifest.FILE, bad)
  problems = records.verify(out, progress=False).problems
  assert any("metadata 'age'" in p and "manifest.json says" in p for p in problems), problems
  assert any("'meta/sex' holds 1 bytes_list" in p for p in problems), problems
  del m


def test_commands_refuse_wrong_input_in_one_line(tmp_path):
  root = tmp_path / "data"
  _csv_dataset(root, n=6)
  base = [f"--input_dir={root / 'images'}", f"--labels_csv={root / 'labels.csv'}",
          f"--output_dir={tmp_path / 'out'}", "--image_size=32", "--workers=1",
          "--progress=false"]
  for extra, message in (
      (["--metadata_columns=agee"], "metadata column 'agee'"),
      (["--metadata_columns=diagnosis"], "'diagnosis' refused"),
      (["--metadata_columns=age", f"--metadata_csv={tmp_path / 'nope.csv'}"],
       "cannot read metadata CSV"),
      (["--metadata_csv=x.csv"], "--metadata_csv needs --metadata_columns")):
    proc = run_bin("make_records", *base, *extra, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# --- the SIIM-ISIC Kaggle files -------------------------------------------------------------------

def _kaggle_record(name: str, target: int | None, ints: dict) -> bytes:
  ok, buf = cv2.imencode(".jpg", np.full((SIZE, SIZE, 3), 90, np.uint8))
  feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buf.tobytes()])),
             "image_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()]))}
  for key, value in {**ints, **({} if target is None else {"target": target})}.items():
    feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
  assert ok
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_kaggle_codes_read_as_metadata_from_training_files(tmp_path):
  """5 train files (age 20/30/40/50/60 in file f, sex code f % 2, site code f or -1) and a test
  file of 90-year-olds with a site code train never had; one record lacks `sex`."""
  folder = tmp_path / "melanoma-32x32"
  folder.mkdir()
  for f in range(5):
    with tf.io.TFRecordWriter(str(folder / f"train{f:02d}-4.tfrec")) as w:
      for j in range(4):
        ints = {"patient_id": f * 10 + j, "sex": f % 2, "age_approx": 20 + 10 * f,
                "anatom_site_general_challenge": -1 if j == 3 else f, "diagnosis": 0}
        if f == 0 and j == 1:
          del ints["sex"]  # the feature itself missing
        w.write(_kaggle_record(f"ISIC_{f}{j}", j % 2, ints))
  with tf.io.TFRecordWriter(str(folder / "test00-3.tfrec")) as w:
    for j in range(3):
      w.write(_kaggle_record(f"ISIC_t{j}", None, {
          "patient_id": 99, "sex": 1, "age_approx": 90 if j else -1,
          "anatom_site_general_challenge": 7}))
  spec = kaggle.read_info(str(folder)).metadata
  assert spec.names == ("sex", "age_approx", "anatom_site_general_challenge")
  sex, age, site = spec.columns
  assert (age.key, age.dtype, age.missing_code) == ("age_approx", "int64", -1)
  assert age.stats.mean == pytest.approx(40.0)  # train files only: the test's 90s left out
  assert age.stats.std == pytest.approx(math.sqrt(200.0))
  assert age.fold_stats[0].mean == pytest.approx(45.0)  # files 1-4
  assert age.fold_stats[4].mean == pytest.approx(35.0)  # files 0-3
  assert site.stats.vocabulary == ("0", "1", "2", "3", "4")
  assert site.fold_stats[2].vocabulary == ("0", "1", "3", "4")
  assert "7" not in site.stats.vocabulary
  assert sex.missing == {"train": 1, "test": 0}
  assert site.missing == {"train": 5, "test": 0}
  assert age.missing == {"train": 0, "test": 1}
  assert md.MetadataSpec.from_dict(spec.to_dict()) == spec


# --- the synthetic generator's metadata signal ---------------------------------------------------

def _age_auc(signal: float, n=4000) -> float:
  """AUC of age alone on the generated CSV's values (one image per patient: independent ages;
  seeds 0-3 gave 0.48-0.51, 0.65-0.67 and 0.79-0.81 at signal 0, 0.5 and 1)."""
  config = synthetic.SyntheticConfig(num_images=n, melanoma_fraction=0.2, write_csv=True,
                                     metadata=True, metadata_signal=signal, images_per_patient=1)
  labels = synthetic.assign_labels(config)
  rows = synthetic.draw_metadata(config, labels)
  kept = [(float(r["age_approx"]), y) for r, y in zip(rows, labels) if r["age_approx"]]
  return roc_auc_score([y for _, y in kept], [a for a, _ in kept])


def test_metadata_signal_is_tunable_and_absent_at_zero():
  assert _age_auc(1.0) > 0.7
  assert 0.62 < _age_auc(0.5) < _age_auc(1.0)
  assert abs(_age_auc(0.0) - 0.5) < 0.04


def test_generator_writes_isic_columns_and_keeps_image_bytes(tmp_path):
  tiny = dict(min_size=(64, 48), max_size=(96, 72))
  config = synthetic.SyntheticConfig(num_images=40, write_csv=True, flat=True, metadata=True,
                                     metadata_missing=0.2, seed=1, **tiny)
  summary = synthetic.write_dataset(tmp_path / "m", config, progress=False)
  with open(summary["csv"], newline="") as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == synthetic.METADATA_CSV_COLUMNS
  empty = sum(r[c] == "" for r in rows for c in ("sex", "age_approx",
                                                 "anatom_site_general_challenge"))
  assert 0 < empty < 60
  assert {r["anatom_site_general_challenge"] for r in rows} - {""} <= set(synthetic.SITES)
  plain = synthetic.write_dataset(tmp_path / "p", synthetic.SyntheticConfig(
      num_images=40, write_csv=True, flat=True, seed=1, **tiny), progress=False)
  images = lambda d: {p.name: p.read_bytes() for p in (pathlib.Path(d) / "images").iterdir()}
  assert images(summary["output_dir"]) == images(plain["output_dir"])  # metadata: same pixels


def test_image_signal_draws_some_melanomas_as_nevi():
  config = synthetic.SyntheticConfig(num_images=400, image_signal=0.25)
  hidden = [synthetic.disguised(config, i, True) for i in range(400)]
  assert 0.65 < np.mean(hidden) < 0.85
  assert not any(synthetic.disguised(config, i, False) for i in range(50))
  full = synthetic.SyntheticConfig(num_images=400, min_size=(64, 48), max_size=(96, 72))
  part = synthetic.SyntheticConfig(num_images=400, min_size=(64, 48), max_size=(96, 72),
                                   image_signal=0.25)
  i = hidden.index(True)
  assert synthetic.render(part, i, True) == synthetic.render(full, i, False)  # drawn as a nevus
  j = hidden.index(False)
  assert synthetic.render(part, j, True) == synthetic.render(full, j, True)


def test_interrupted_run_resumes_to_the_same_records_and_statistics(tmp_path, monkeypatch):
  root = tmp_path / "data"
  _csv_dataset(root, n=24)
  ref = _convert(root, tmp_path / "ref", folds=2)
  commit, done = records.ShardWriter.commit, []

  def killed_after_two(self):
    if len(done) == 2:
      raise KeyboardInterrupt  # a kill between shards: two are in place, with their states
    done.append(self.path)
    commit(self)

  monkeypatch.setattr(records.ShardWriter, "commit", killed_after_two)
  out = tmp_path / "out"
  with pytest.raises(KeyboardInterrupt):
    _convert(root, out, folds=2)
  monkeypatch.undo()
  assert not (out / manifest.FILE).exists()
  config = _config(root / "images", out, labels_csv=str(root / "labels.csv"), folds=2,
                   patient_column="patient_id", metadata_columns=COLUMNS)
  result = convert.convert(config)
  assert result.resumed_shards == 2
  assert result.manifest["metadata"] == ref["metadata"]
  for shard in (tmp_path / "ref").glob("*.tfrecord"):
    assert (out / shard.name).read_bytes() == shard.read_bytes()
