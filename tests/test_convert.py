"""The converter end to end: layouts, bad inputs, duplicates, splits, reproducibility, resume, verify."""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import signal
import time

import cv2
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_bin, start_bin
from skinrecords.core import features
from skinrecords.core import fileio
from skinrecords.core import manifest
from skinrecords.data import convert
from skinrecords.data import preprocess
from skinrecords.data import records
from skinrecords.data.workers import RecordPool

SIZE = 32


def _image(rng, w=48, h=40):
  """A distinct small image: random blocks, so no two files are identical."""
  small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
  return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def _write(path: pathlib.Path, rng, ext=".jpg", **kw) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  ok, buf = cv2.imencode(ext, _image(rng, **kw))
  assert ok
  path.write_bytes(buf.tobytes())
  return path


def _class_folders(root: pathlib.Path, counts: dict[str, int], seed=0) -> None:
  rng = np.random.default_rng(seed)
  for cls, n in counts.items():
    for i in range(n):
      _write(root / cls / f"{cls.lower()}_{i:04d}.jpg", rng)


def _config(input_dir, output_dir, **kw) -> convert.ConvertConfig:
  pre = preprocess.PreprocessConfig(image_size=SIZE, **kw.pop("pre", {}))
  kw.setdefault("workers", 1)
  kw.setdefault("progress", False)
  return convert.ConvertConfig(input_dir=str(input_dir), output_dir=str(output_dir), preprocess=pre,
                               **kw)


def _read_split(out: pathlib.Path, manifest: dict, split: str) -> list[dict]:
  spec = features.feature_spec()
  rows = []
  for shard in manifest["splits"][split]["shards"]:
    for raw in tf.data.TFRecordDataset(str(out / shard["file"])):
      ex = tf.io.parse_single_example(raw, spec)
      rows.append({k: (v.numpy().decode() if v.dtype == tf.string and k != features.IMAGE
                       else v.numpy()) for k, v in ex.items()} | {"shard": shard["file"]})
  return rows


def _invariant(manifest):
  inputs = manifest["inputs"]
  assert inputs["found"] == (inputs["converted"] + len(inputs["rejected"])
                             + len(inputs["duplicates"]))
  assert inputs["converted"] == sum(s["num_examples"] for s in manifest["splits"].values())


def test_shard_writer_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  written = []
  for k in range(3):
    with records.ShardWriter(tmp_path / features.shard_name("train", k, 3), 2) as w:
      for j in range(5):
        img = _image(rng, SIZE, SIZE)
        data = cv2.imencode(".png", img)[1].tobytes()
        written.append((f"im{k}_{j}", j % 2, f"P{k}", data, img))
        w.write(image=data, image_name=f"im{k}_{j}", target=j % 2, patient_id=f"P{k}", fold=k,
                height=SIZE, width=SIZE)
      summary = w.close()
      w.commit()
    assert summary["num_examples"] == 5 and summary["class_counts"] == [3, 2]
    assert summary["sha256"] == fileio.sha256_file(w.path)
    assert not os.path.exists(w.tmp)
  files = sorted(str(p) for p in tmp_path.glob("train-*.tfrecord"))
  assert [features.parse_shard_name(os.path.basename(f)) for f in files] == [
      ("train", k, 3) for k in range(3)]
  spec = features.feature_spec()
  got = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(files)]
  assert len(got) == len(written)
  for ex, (name, target, patient, data, img) in zip(got, written):
    assert ex[features.IMAGE_NAME].numpy().decode() == name
    assert int(ex[features.TARGET]) == target
    assert ex[features.PATIENT_ID].numpy().decode() == patient
    assert ex[features.IMAGE].numpy() == data
    np.testing.assert_array_equal(tf.io.decode_png(ex[features.IMAGE]).numpy()[..., ::-1], img)


def test_class_folders_stratified_and_round_trip(tmp_path):
  _class_folders(tmp_path / "in", {"Melanoma": 23, "NotMelanoma": 37})
  result = convert.convert(_config(tmp_path / "in", tmp_path / "out",
                                   classes=("NotMelanoma", "Melanoma"), min_train_shards=4))
  m = result.manifest
  _invariant(m)
  assert m["classes"] == ["NotMelanoma", "Melanoma"] and m["inputs"]["converted"] == 60
  assert len(m["splits"]["train"]["shards"]) == 4
  for split, frac in zip(("train", "valid", "test"), (0.6, 0.2, 0.2)):
    counts = m["splits"][split]["class_counts"]
    assert abs(counts["Melanoma"] - 23 * frac) <= 1 and abs(counts["NotMelanoma"] - 37 * frac) <= 1
  seen = {}
  for split in ("train", "valid", "test"):
    rows = _read_split(tmp_path / "out", m, split)
    assert len(rows) == m["splits"][split]["num_examples"]
    for r in rows:
      expected = 1 if r["image_name"].startswith("melanoma") else 0
      assert r["target"] == expected, r["image_name"]
      img = tf.io.decode_jpeg(r["image"]).numpy()
      assert img.shape == (SIZE, SIZE, 3) and (r["height"], r["width"]) == (SIZE, SIZE)
      assert r["image_name"] not in seen
      seen[r["image_name"]] = split
  assert len(seen) == 60
  assert records.verify(tmp_path / "out", progress=False).ok


def test_presplit_layout_is_honoured(tmp_path):
  rng = np.random.default_rng(2)
  for split, n in (("train", 6), ("val", 3), ("test", 2)):
    for cls in ("a", "b"):
      for i in range(n):
        _write(tmp_path / "in" / split / cls / f"{split}_{cls}_{i}.png", rng, ext=".png")
  m = convert.convert(_config(tmp_path / "in", tmp_path / "out")).manifest
  _invariant(m)
  assert {s: v["num_examples"] for s, v in m["splits"].items()} == {
      "train": 12, "valid": 6, "test": 4}
  for split, prefix in (("train", "train_"), ("valid", "val_"), ("test", "test_")):
    assert all(r["image_name"].startswith(prefix) for r in _read_split(tmp_path / "out", m, split))


def _csv_dataset(root: pathlib.Path, patients=30, per_patient=4, seed=3):
  """ISIC-like: flat image folder, CSV with image_name (no extension), patient_id, target."""
  rng = np.random.default_rng(seed)
  rows = []
  for p in range(patients):
    target = int(p % 3 == 0)
    for j in range(per_patient):
      name = f"ISIC_{p:03d}{j}"
      _write(root / "images" / f"{name}.jpg", rng)
      rows.append({"image_name": name, "patient_id": f"IP_{p:03d}", "target": target})
  return rows


def _write_csv(path, rows):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def test_csv_patients_never_cross_splits_and_folds(tmp_path):
  rows = _csv_dataset(tmp_path / "in")
  _write_csv(tmp_path / "labels.csv", rows)
  m = convert.convert(_config(tmp_path / "in", tmp_path / "out", labels_csv=str(
      tmp_path / "labels.csv"), patient_column="patient_id", folds=3, min_train_shards=6)).manifest
  _invariant(m)
  assert m["inputs"]["grouped_by_patient"] and m["inputs"]["converted"] == 120
  owner = {}
  for split in m["splits"]:
    for r in _read_split(tmp_path / "out", m, split):
      assert owner.setdefault(r["patient_id"], split) == split, r["patient_id"]
      expected = next(x["target"] for x in rows if x["image_name"] == r["image_name"])
      assert r["target"] == expected
      if split == "train":
        assert 0 <= r["fold"] < 3
        shard_fold = next(s["fold"] for s in m["splits"]["train"]["shards"]
                          if s["file"] == r["shard"])
        assert r["fold"] == shard_fold  # every train shard holds exactly one fold
      else:
        assert r["fold"] == -1
  train = _read_split(tmp_path / "out", m, "train")
  fold_of_patient = {}
  for r in train:
    assert fold_of_patient.setdefault(r["patient_id"], r["fold"]) == r["fold"]
  assert set(fold_of_patient.values()) == {0, 1, 2}
  # 0.6/0.2/0.2 of 30 patients, whole patients only: train gets roughly 18 patients' images.
  assert 60 <= m["splits"]["train"]["num_examples"] <= 84


@pytest.mark.slow
def test_bad_inputs_are_rejected_with_reasons_and_nothing_lost(tmp_path):
  rows = _csv_dataset(tmp_path / "in", patients=6, per_patient=2)
  img_dir = tmp_path / "in" / "images"
  (img_dir / "empty.jpg").write_bytes(b"")
  (img_dir / "text.jpg").write_text("not an image at all")
  good = (img_dir / "ISIC_0000.jpg").read_bytes()
  (img_dir / "trunc.jpg").write_bytes(good[: len(good) // 2])
  # A PNG whose header claims 100000 x 100000 pixels: must be refused before decoding.
  png = bytearray(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
  png[16:24] = (100000).to_bytes(4, "big") * 2
  (img_dir / "bomb.png").write_bytes(bytes(png))
  (img_dir / "copy.jpg").write_bytes(good)  # labelled 1 as ISIC_0000 is: a plain duplicate
  _write(tmp_path / "outside.jpg", np.random.default_rng(9))
  _write(img_dir / "odd.jpg", np.random.default_rng(10))
  bad = [("empty", 0), ("text", 1), ("trunc", 0), ("bomb.png", 1), ("copy", 1), ("missing", 1),
         ("../outside.jpg", 0), (str(tmp_path / "outside.jpg"), 1), ("odd", "unknown")]
  rows += [{"image_name": n, "patient_id": "X", "target": t} for n, t in bad]
  _write_csv(tmp_path / "labels.csv", rows)
  flags = [f"--input_dir={tmp_path / 'in'}", f"--labels_csv={tmp_path / 'labels.csv'}",
           "--patient_column=patient_id", "--image_size=32", "--classes=0,1", "--workers=2",
           "--noprogress"]
  proc = run_bin("make_records", *flags, f"--output_dir={tmp_path / 'out'}", "--strict",
                 check=False)
  assert proc.returncode == 1, proc.stderr
  m = manifest.read(tmp_path / "out")
  _invariant(m)
  reasons = {r["path"]: r["reason"] for r in m["inputs"]["rejected"]}
  by_name = {pathlib.PurePath(k).name: v for k, v in reasons.items()}
  assert "zero" in by_name["empty.jpg"].lower() or "empty" in by_name["empty.jpg"].lower()
  assert "trunc" in by_name["trunc.jpg"].lower()
  assert "text.jpg" in by_name and "bomb.png" in by_name
  assert "pixel" in by_name["bomb.png"].lower()
  assert any("not found" in v for v in reasons.values())
  assert sum("escape" in v for v in reasons.values()) == 2
  assert any("unknown" in v and "label" in v for v in reasons.values())
  dups = m["inputs"]["duplicates"]
  assert [(pathlib.PurePath(d["path"]).name, pathlib.PurePath(d["duplicate_of"]).name)
          for d in dups] == [("copy.jpg", "ISIC_0000.jpg")]
  assert m["inputs"]["converted"] == 12  # the 12 good rows; copy.jpg is a duplicate.
  assert "rejected" in proc.stdout
  # Without --strict the same input converts and exits 0.
  run_bin("make_records", *flags, f"--output_dir={tmp_path / 'out2'}")


def test_identical_bytes_under_two_classes_are_a_label_conflict(tmp_path):
  """Same bytes, same class: a duplicate (one kept). Same bytes, two classes: which label is right
  is unknowable, so every copy is rejected as a label conflict, as a CSV listing one image under
  two labels is (issue 21: it used to be dropped silently as a "duplicate" of the first copy)."""
  _class_folders(tmp_path / "in", {"a": 5, "b": 5})
  data = (tmp_path / "in" / "a" / "a_0000.jpg").read_bytes()
  (tmp_path / "in" / "b" / "zz_copy.jpg").write_bytes(data)
  (tmp_path / "in" / "b" / "b_0000.jpg").write_bytes(
      (tmp_path / "in" / "b" / "b_0001.jpg").read_bytes())  # same class: a plain duplicate
  m = convert.convert(_config(tmp_path / "in", tmp_path / "out", split=(0.6, 0.4, 0.0))).manifest
  _invariant(m)
  assert m["inputs"]["found"] == 11 and m["inputs"]["converted"] == 8
  assert m["inputs"]["duplicates"] == [{"path": "b/b_0001.jpg", "duplicate_of": "b/b_0000.jpg"}]
  conflicts = {r["path"]: r["reason"] for r in m["inputs"]["rejected"]}
  assert set(conflicts) == {"a/a_0000.jpg", "b/zz_copy.jpg"}
  for reason in conflicts.values():
    assert reason.startswith("label conflict: identical bytes filed as 'a' (a/a_0000.jpg), "
                             "'b' (b/zz_copy.jpg)")


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  _class_folders(tmp_path / "in", {"a": 10, "b": 10})
  shas = []
  for name, seed, workers in (("o1", 0, 1), ("o2", 0, 2), ("o3", 5, 1)):
    m = convert.convert(_config(tmp_path / "in", tmp_path / name, seed=seed,
                                workers=workers)).manifest
    shas.append([s["sha256"] for v in m["splits"].values() for s in v["shards"]])
  assert shas[0] == shas[1]  # worker count does not change a byte
  assert shas[0] != shas[2]
  assert (tmp_path / "o1" / "manifest.json").read_bytes() == (
      tmp_path / "o2" / "manifest.json").read_bytes()


def test_existing_output_from_other_flags_refused_unless_overwrite(tmp_path):
  _class_folders(tmp_path / "in", {"a": 4, "b": 4})
  convert.convert(_config(tmp_path / "in", tmp_path / "out"))
  (tmp_path / "out" / "notes.txt").write_text("mine")
  again = convert.convert(_config(tmp_path / "in", tmp_path / "out"))  # same flags: nothing to do
  assert again.resumed_shards == sum(len(s["shards"]) for s in again.manifest["splits"].values())
  with pytest.raises(convert.OutputExistsError, match="--overwrite"):
    convert.convert(_config(tmp_path / "in", tmp_path / "out", seed=1))
  m = convert.convert(_config(tmp_path / "in", tmp_path / "out", seed=1, overwrite=True)).manifest
  assert m["conversion"]["seed"] == 1
  assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # unrelated files survive


@pytest.mark.slow
def test_killed_run_resumes_to_identical_output(tmp_path):
  # Enough work (hair removal on 640x480 sources) that the first kill lands mid-conversion.
  rng = np.random.default_rng(4)
  for cls in ("a", "b"):
    for i in range(90):
      _write(tmp_path / "in" / cls / f"{cls}{i:03d}.jpg", rng, w=640, h=480)
  flags = [f"--input_dir={tmp_path / 'in'}", "--image_size=64", "--remove_hair", "--workers=1",
           "--noprogress", "--min_train_shards=16"]
  run_bin("make_records", *flags, f"--output_dir={tmp_path / 'ref'}")
  out = tmp_path / "out"
  proc = start_bin("make_records", *flags, f"--output_dir={out}")
  deadline = time.time() + 120
  state = out / convert.STATE_DIR
  while time.time() < deadline and len(list(state.glob("train-*.json"))) < 3:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
  finished = len(list(out.glob("*.tfrecord")))
  assert finished >= 3
  proc = run_bin("make_records", *flags, f"--output_dir={out}")
  assert f"{finished} shards reused" in proc.stdout
  assert (out / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()
  for shard in (tmp_path / "ref").glob("*.tfrecord"):
    assert (out / shard.name).read_bytes() == shard.read_bytes()
  assert not list(out.glob("*.tmp")) and not state.exists()


@pytest.mark.slow
def test_verify_catches_a_corrupted_byte(tmp_path):
  _class_folders(tmp_path / "in", {"a": 6, "b": 6})
  m = convert.convert(_config(tmp_path / "in", tmp_path / "out")).manifest
  assert run_bin("verify_records", f"--records_dir={tmp_path / 'out'}", "--noprogress").returncode == 0
  shard = tmp_path / "out" / m["splits"]["train"]["shards"][0]["file"]
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF
  shard.write_bytes(bytes(data))
  proc = run_bin("verify_records", f"--records_dir={tmp_path / 'out'}", "--noprogress", check=False)
  assert proc.returncode == 1
  assert shard.name in proc.stderr and "sha256" in proc.stderr
  report = records.verify(tmp_path / "out", progress=False)
  assert not report.ok and all(shard.name in p for p in report.problems)


def test_usage_errors_name_the_value(tmp_path):
  proc = run_bin("make_records", f"--input_dir={tmp_path}", f"--output_dir={tmp_path / 'o'}",
                 "--split=0.5,0.6", check=False)
  assert proc.returncode != 0 and "0.5,0.6" in proc.stderr
  proc = run_bin("make_records", f"--input_dir={tmp_path}", f"--output_dir={tmp_path / 'o'}",
                 "--folds=1", check=False)
  assert proc.returncode != 0 and "--folds=1" in proc.stderr


def _reference_shard(path: pathlib.Path, sources: dict, classes, fold: int, pconfig) -> bytes:
  """Rebuilds a shard as the converter did before its workers built records: preprocess in this
  process, tf.train.Example, tf.io.TFRecordWriter. Record order and membership come from `path`."""
  spec = features.feature_spec()
  names = [tf.io.parse_single_example(r, spec)[features.IMAGE_NAME].numpy().decode()
           for r in tf.data.TFRecordDataset(str(path))]
  ref = path.with_name(path.name + ".reference")
  with tf.io.TFRecordWriter(str(ref)) as writer:
    for name in names:
      source = sources.pop(name)  # each source once
      size = pconfig.image_size
      feature = {
          "image": tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[preprocess.preprocess_file(source, pconfig)])),
          "image_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()])),
          "target": tf.train.Feature(int64_list=tf.train.Int64List(
              value=[classes.index(source.parent.name)])),
          "patient_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b""])),
          "fold": tf.train.Feature(int64_list=tf.train.Int64List(value=[fold])),
          "height": tf.train.Feature(int64_list=tf.train.Int64List(value=[size])),
          "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[size])),
      }
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
          deterministic=True))
  data = ref.read_bytes()
  ref.unlink()
  return data


def test_worker_built_shards_match_the_tensorflow_writer(tmp_path):
  _class_folders(tmp_path / "in", {"a": 9, "b": 7})
  (tmp_path / "in" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  config = _config(tmp_path / "in", tmp_path / "out", workers=2, folds=2, min_train_shards=4,
                   pre={"remove_hair": True})
  m = convert.convert(config).manifest
  _invariant(m)
  assert m["inputs"]["converted"] == 16 and len(m["inputs"]["rejected"]) == 1
  sources = {p.stem: p for p in (tmp_path / "in").glob("*/*.jpg") if p.stem != "broken"}
  for split, info in m["splits"].items():
    for entry in info["shards"]:
      path = tmp_path / "out" / entry["file"]
      data = path.read_bytes()
      assert data == _reference_shard(path, sources, m["classes"], entry.get("fold", -1),
                                      config.preprocess), entry["file"]
      assert entry["sha256"] == fileio.sha256_file(path)
  assert not sources  # every good source is in exactly one shard
  # Workers started beforehand (as the benchmark runs it) write the same bytes.
  with RecordPool(2, config.preprocess, wait_ready=True) as pool:
    again = dataclasses.replace(config, output_dir=str(tmp_path / "again"))
    convert.convert(again, pool=pool)
    with pytest.raises(ValueError, match="preprocessing settings"):
      convert.convert(dataclasses.replace(again, preprocess=preprocess.PreprocessConfig(
          image_size=SIZE + 8)), pool=pool)
  for path in (tmp_path / "out").rglob("*"):  # shards, manifest, idx/*.idx, TFDS metadata
    if path.is_file():
      twin = tmp_path / "again" / path.relative_to(tmp_path / "out")
      assert twin.read_bytes() == path.read_bytes(), path.name


def test_record_pool_keeps_task_order_across_chunks_and_the_tail(tmp_path):
  _class_folders(tmp_path / "in", {"a": 5})
  (tmp_path / "in" / "a" / "broken.jpg").write_bytes(b"nope")
  paths = sorted(str(p) for p in (tmp_path / "in" / "a").iterdir())
  # 60 tasks over 2 workers: chunks of 3 for the first 54, then one by one; names keep them apart.
  tasks = [(paths[k % len(paths)], f"im{k:03d}", k % 2, "", k % 3 - 1) for k in range(60)]
  pconfig = preprocess.PreprocessConfig(image_size=SIZE)
  with RecordPool(1, pconfig) as one:
    expected = list(one.imap(tasks))
  with RecordPool(2, pconfig) as two:
    got = list(two.imap(tasks))
  assert [reason for _, reason in got].count(None) == 50
  assert got == expected


def _bmp_folders(root: pathlib.Path, per_class=6, seed=5) -> list[pathlib.Path]:
  """BMPs of one size: a replacement image has the same file size as the one it replaces."""
  rng = np.random.default_rng(seed)
  return [_write(root / cls / f"{cls}{i}.bmp", rng, ext=".bmp") for cls in ("a", "b")
          for i in range(per_class)]


def _patients_csv(path: pathlib.Path, patients: dict[str, str]) -> pathlib.Path:
  _write_csv(path, [{"image_name": k, "patient_id": v} for k, v in patients.items()])
  return path


def test_changed_image_or_patient_column_never_reuses_old_shards(tmp_path):
  files = _bmp_folders(tmp_path / "in")
  patients = {f.stem: f"P{i // 2}" for i, f in enumerate(files)}
  csv_path = _patients_csv(tmp_path / "patients.csv", patients)
  config = _config(tmp_path / "in", tmp_path / "out", patients_csv=str(csv_path),
                   patient_column="patient_id", min_train_shards=2)
  first = convert.convert(config).manifest
  assert convert.convert(config).resumed_shards > 0  # Unchanged inputs: reused, nothing to do.
  size = files[0].stat().st_size
  _write(files[0], np.random.default_rng(99), ext=".bmp")
  assert files[0].stat().st_size == size
  with pytest.raises(convert.OutputExistsError, match="--overwrite"):
    convert.convert(config)
  redone = convert.convert(dataclasses.replace(config, overwrite=True))
  assert redone.resumed_shards == 0 and redone.manifest["fingerprint"] != first["fingerprint"]
  _patients_csv(csv_path, patients | {files[1].stem: "P_corrected"})
  with pytest.raises(convert.OutputExistsError):
    convert.convert(config)


def test_interrupted_run_does_not_resume_after_a_same_size_replacement(tmp_path, monkeypatch):
  files = _bmp_folders(tmp_path / "in")
  config = _config(tmp_path / "in", tmp_path / "out", min_train_shards=2)

  def killed(*_):
    raise KeyboardInterrupt  # After every shard, before manifest.json: state files remain.

  monkeypatch.setattr(convert, "_versions", killed)
  for _ in range(2):  # The second run shows an unchanged input would resume.
    with pytest.raises(KeyboardInterrupt):
      convert.convert(config)
  assert (tmp_path / "out" / convert.STATE_DIR).is_dir()
  monkeypatch.undo()
  _write(files[3], np.random.default_rng(98), ext=".bmp")
  with pytest.raises(convert.OutputExistsError):
    convert.convert(config)


def test_patients_csv_groups_class_folders_and_counts_missing_ids(tmp_path):
  rng = np.random.default_rng(6)
  rows = {}
  for p in range(20):
    cls = "Melanoma" if p % 4 == 0 else "NotMelanoma"
    for j in range(3):
      _write(tmp_path / "in" / cls / f"img_{p:02d}_{j}.jpg", rng)
      rows[f"img_{p:02d}_{j}"] = f"P{p:02d}"
  rows.update({"img_19_0": "", "img_19_1": ""})  # Empty cells.
  del rows["img_18_0"], rows["img_18_1"]  # No row at all.
  csv_path = _patients_csv(tmp_path / "patients.csv", rows)
  result = convert.convert(_config(tmp_path / "in", tmp_path / "out", patients_csv=str(csv_path),
                                   patient_column="patient_id", classes=("NotMelanoma", "Melanoma")))
  m = result.manifest
  assert m["inputs"]["grouped_by_patient"] and m["inputs"]["missing_patient_ids"] == 4
  assert m["inputs"]["patient_warning"].startswith("4 of 60 images have no patient id")
  owner = {}
  for split in m["splits"]:
    for r in _read_split(tmp_path / "out", m, split):
      if r["patient_id"]:
        assert owner.setdefault(r["patient_id"], split) == split, r["patient_id"]
  assert len(owner) == 20 and len(set(owner.values())) == 3
  assert "WARNING: 4 of 60 images have no patient id" in convert.summary(result)


def test_ungrouped_split_is_said_loudly(tmp_path):
  _class_folders(tmp_path / "in", {"Melanoma": 4, "NotMelanoma": 4})
  result = convert.convert(_config(tmp_path / "in", tmp_path / "out"))
  inputs = result.manifest["inputs"]
  assert not inputs["grouped_by_patient"]
  assert inputs["patient_warning"].startswith("NOT GROUPED BY PATIENT")
  text = convert.summary(result)
  assert "WARNING: NOT GROUPED BY PATIENT" in text and "--patients_csv" in text
  # Sorted names made Melanoma class 0: said too, with the fix.
  assert "WARNING: class order" in text and "--classes=NotMelanoma,Melanoma" in text


def test_make_records_refuses_bad_sizes_and_outputs_before_work(tmp_path):
  from skinrecords.model import models  # pylint: disable=g-import-not-at-top

  assert convert.MIN_TRAIN_IMAGE_SIZE == models._MIN_IMAGE_SIZE  # pylint: disable=protected-access
  _class_folders(tmp_path / "in", {"a": 3, "b": 3})
  (tmp_path / "file").write_text("x")
  base = [f"--input_dir={tmp_path / 'in'}", "--noprogress", "--workers=1"]
  for flags, expected in (
      (["--image_size=16", f"--output_dir={tmp_path / 'o'}"], "--image_size=16: training needs"),
      ([f"--output_dir={tmp_path / 'file'}"], "is a file, not a folder"),
      ([f"--output_dir={tmp_path / 'file' / 'sub'}"], "is a file, not a folder"),
      (["--output_dir=/proc/skinrecords_out"], "cannot write in /proc"),
  ):
    proc = run_bin("make_records", *base, "--image_size=32", *flags, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 2 and expected in lines[0] and "Traceback" not in proc.stderr, proc.stderr
  assert not (tmp_path / "o").exists()


def test_output_inside_input_warns_and_resumes(tmp_path):
  _class_folders(tmp_path / "in", {"a": 4, "b": 4})
  flags = [f"--input_dir={tmp_path / 'in'}", f"--output_dir={tmp_path / 'in' / 'records'}",
           "--image_size=32", "--noprogress", "--workers=1", "--min_train_shards=2"]
  proc = run_bin("make_records", *flags)
  assert "is inside input_dir" in proc.stderr
  m = manifest.read(tmp_path / "in" / "records")
  assert m["classes"] == ["a", "b"] and m["inputs"]["found"] == 8
  again = run_bin("make_records", *flags)  # The shards are not read as a class "records".
  assert "shards reused" in again.stdout
