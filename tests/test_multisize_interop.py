"""Issue 25 through the commands: several sizes in one pass, near-duplicate grouping, DALI index
files read by an independent reader, TFDS metadata loaded by TFDS itself."""

from __future__ import annotations

import csv
import json
import pathlib
import shutil

import cv2
import numpy as np
import pytest

from conftest import run_bin
from skinrecords.core import interop
from skinrecords.core import manifest
from skinrecords.data import neardup
from skinrecords.data import synthetic

SIZES = (32, 48, 64)


def _dataset(root: pathlib.Path) -> pathlib.Path:
  """24 synthetic lesions (12 patients of 2, flat ISIC layout + CSV), plus known copies:
  a re-compressed copy and a flipped copy (new patients, same label), a cropped copy filed under
  the other label (a near-duplicate label conflict) and a broken file."""
  synthetic.write_dataset(root, synthetic.SyntheticConfig(
      num_images=24, min_size=(300, 225), max_size=(400, 300), write_csv=True, flat=True,
      images_per_patient=2),
      progress=False)
  rows = list(csv.DictReader(open(root / "labels.csv", encoding="utf-8")))
  target = {r["image_name"]: r["target"] for r in rows}
  images = root / "images"
  one, two, three = (cv2.imread(str(images / f"synth_00000{i}.jpg")) for i in (1, 5, 9))
  cv2.imwrite(str(images / "copy_q60.jpg"), one, [cv2.IMWRITE_JPEG_QUALITY, 60])
  cv2.imwrite(str(images / "copy_flipped.jpg"), two[:, ::-1])
  h, w = three.shape[:2]
  cv2.imwrite(str(images / "copy_cropped.jpg"), three[h // 10:, w // 10:])
  (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
  rows += [{"image_name": "copy_q60", "patient_id": "PX1", "target": target["synth_000001"]},
           {"image_name": "copy_flipped", "patient_id": "PX2", "target": target["synth_000005"]},
           {"image_name": "copy_cropped", "patient_id": "PX3",
            "target": str(1 - int(target["synth_000009"]))},
           {"image_name": "broken", "patient_id": "PX4", "target": "0"}]
  with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=["image_name", "patient_id", "target", "diagnosis"],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return root


def _flags(data: pathlib.Path, out: pathlib.Path, *extra) -> list[str]:
  return [f"--input_dir={data / 'images'}", f"--labels_csv={data / 'labels.csv'}",
          "--patient_column=patient_id", f"--output_dir={out}", "--folds=2",
          "--min_train_shards=2", "--noprogress", "--workers=1", *extra]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("multisize")
  data = _dataset(root / "data")
  out = root / "out"
  proc = run_bin("make_records", *_flags(data, out, "--image_size=" + ",".join(map(str, SIZES))))
  return data, out, proc


def _where(m: dict) -> dict:
  return {s: [(e["file"], e["num_examples"], e.get("fold", -1), e["class_counts"])
              for e in info["shards"]] for s, info in m["splits"].items()}


@pytest.mark.slow  # make_records and verify_records as commands (subprocesses)
def test_sizes_share_splits_folds_groups_rejections_and_verify(converted):
  data, out, proc = converted
  manifests = [manifest.read(out / str(size)) for size in SIZES]
  assert json.loads((out / "records_set.json").read_text())["sizes"] == list(SIZES)
  for size, m in zip(SIZES, manifests):
    assert m["image_size"] == size and m["preprocessing"]["image_size"] == size
    assert _where(m) == _where(manifests[0])
    for key in ("rejected", "duplicates", "near_duplicates", "found", "converted"):
      assert m["inputs"][key] == manifests[0]["inputs"][key], key
  assert [r["path"] for r in manifests[0]["inputs"]["rejected"]] == ["broken.jpg"]
  # The records themselves: the same image names in the same shards, at each size's pixels.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from skinrecords.core import features  # pylint: disable=g-import-not-at-top

  names = {}
  for size in SIZES:
    for path in sorted((out / str(size)).glob("*.tfrecord")):
      for raw in tf.data.TFRecordDataset(str(path)):
        ex = tf.io.parse_single_example(raw, features.feature_spec())
        assert tf.io.decode_jpeg(ex["image"]).shape == (size, size, 3)
        names.setdefault(size, []).append((path.name, ex["image_name"].numpy(), int(ex["fold"])))
  assert names[SIZES[0]] == names[SIZES[1]] == names[SIZES[2]]
  assert len(names[SIZES[0]]) == manifests[0]["inputs"]["converted"] == 27
  verified = run_bin("verify_records", f"--records_dir={out}", "--noprogress")
  assert verified.stdout.count(": OK") == len(SIZES) + 1, verified.stdout
  assert "label conflict" in proc.stdout and "copy_cropped.jpg" in proc.stdout


def test_near_duplicates_grouped_conflict_reported_patients_not_merged(converted):
  _, out, _ = converted
  m = manifest.read(out / str(SIZES[0]))
  near = m["inputs"]["near_duplicates"]
  pairs = {(p["path"], p["near"]) for p in near["pairs"]}
  assert pairs == {("copy_q60.jpg", "synth_000001.jpg"), ("copy_flipped.jpg", "synth_000005.jpg"),
                   ("copy_cropped.jpg", "synth_000009.jpg")}  # and no two different lesions
  assert [(c["path"], c["near"]) for c in near["conflicts"]] == [
      ("copy_cropped.jpg", "synth_000009.jpg")]
  for group in near["groups"]:
    assert len(group["splits"]) == 1, group  # copy and original in one split and fold


@pytest.mark.slow  # make_records and verify_records as commands (subprocesses)
def test_verify_catches_a_near_duplicate_group_across_splits_and_a_bad_index(converted, tmp_path):
  _, out, _ = converted
  folder = tmp_path / "copy"
  shutil.copytree(out / str(SIZES[0]), folder)
  m = manifest.read(folder)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  first = {}  # split -> the image name of its first record
  for split in ("train", "valid"):  # claim a group of one train and one valid image
    raw = next(iter(tf.data.TFRecordDataset(str(folder / m["splits"][split]["shards"][0]["file"]))))
    ex = tf.train.Example.FromString(raw.numpy())
    first[split] = ex.features.feature["image_name"].bytes_list.value[0].decode()
  m["inputs"]["near_duplicates"]["groups"].append(
      {"paths": ["a.jpg", "b.jpg"], "image_names": [first["train"], first["valid"]],
       "splits": ["?"]})
  manifest.write(folder, m)
  idx = folder / interop.index_name(m["splits"]["valid"]["shards"][0]["file"])
  idx.write_text(idx.read_text().replace(" ", "  ", 1).replace("0  ", "1 ", 1))
  proc = run_bin("verify_records", f"--records_dir={folder}", "--noprogress", check=False)
  assert proc.returncode == 1
  assert "near-duplicate group a.jpg, b.jpg lies across" in proc.stderr
  assert "idx/valid-00000-of-00001.idx: does not match" in proc.stderr


_READ_WITH_INDEX = """
import json, sys
from tfrecord import reader
shard, index = sys.argv[1], sys.argv[2]
names = [bytes(r["image_name"]).decode() for r in reader.tfrecord_loader(
    shard, index, {"image_name": "byte", "target": "int"}, shard=(0, 1))]
# Shard 2 of 2 of the records: starts at the offset the index gives for its first record.
half = [bytes(r["image_name"]).decode()
        for r in reader.tfrecord_loader(shard, index, {"image_name": "byte"}, shard=(1, 2))]
print(json.dumps([names, half]))
"""


def test_index_files_read_by_the_tfrecord_package(converted):
  """The `tfrecord` package (test extra; its own example_pb2 clashes with TensorFlow's in one
  process, so it runs in a fresh one without TensorFlow) reads every record through our index."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  assert importlib.util.find_spec("tfrecord"), "pip install -e '.[test]' (test extra tfrecord)"
  _, out, _ = converted
  folder = out / str(SIZES[-1])
  m = manifest.read(folder)
  total = 0
  for info in m["splits"].values():
    for entry in info["shards"]:
      index = folder / interop.index_name(entry["file"])
      proc = subprocess.run([sys.executable, "-c", _READ_WITH_INDEX, str(folder / entry["file"]),
                             str(index)], capture_output=True, text=True, check=False)
      assert proc.returncode == 0, proc.stderr
      names, half = json.loads(proc.stdout)
      assert len(names) == entry["num_examples"] == len(index.read_text().splitlines())
      assert half == names[len(names) // 2:]  # read from the index's offset of record n/2
      total += len(names)
  assert total == m["inputs"]["converted"]


def test_tfds_builder_from_directory_loads_the_splits(converted):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (test extra)
  _, out, _ = converted
  folder = out / str(SIZES[1])
  m = manifest.read(folder)
  builder = tfds.builder_from_directory(str(folder))
  assert builder.info.features["target"].names == m["classes"]
  assert builder.info.features["image"].shape == (SIZES[1], SIZES[1], 3)
  for split, info in m["splits"].items():
    assert builder.info.splits[split].num_examples == info["num_examples"]
    examples = list(builder.as_dataset(split=split).as_numpy_iterator())
    assert len(examples) == info["num_examples"]
    assert examples[0]["image"].shape == (SIZES[1], SIZES[1], 3)
    counts = np.bincount([e["target"] for e in examples], minlength=len(m["classes"]))
    assert dict(zip(m["classes"], counts.tolist())) == info["class_counts"]


def test_hash_is_flip_invariant_and_tells_lesions_apart():
  rng = np.random.default_rng([0, 3])
  img = synthetic.make_image(rng, True, 200, 150)
  other = synthetic.make_image(np.random.default_rng([0, 4]), True, 200, 150)
  h = neardup.image_hashes(synthetic.encode_jpeg(img))
  assert neardup.distance(h, neardup.image_hashes(synthetic.encode_jpeg(img[::-1, ::-1]))) <= 6
  assert neardup.distance(h, neardup.image_hashes(synthetic.encode_jpeg(other))) > 10


@pytest.mark.slow
def test_several_sizes_killed_mid_run_resume_to_identical_output(tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  from conftest import start_bin  # pylint: disable=g-import-not-at-top
  from skinrecords.data import convert  # pylint: disable=g-import-not-at-top

  synthetic.write_dataset(tmp_path / "in", synthetic.SyntheticConfig(
      num_images=120, min_size=(640, 480), max_size=(800, 600)), progress=False)
  flags = [f"--input_dir={tmp_path / 'in'}", "--image_size=48,64", "--remove_hair",
           "--workers=1", "--noprogress", "--min_train_shards=16",
           "--classes=NotMelanoma,Melanoma"]
  run_bin("make_records", *flags, f"--output_dir={tmp_path / 'ref'}")
  out = tmp_path / "out"
  proc = start_bin("make_records", *flags, f"--output_dir={out}")
  deadline = time.time() + 180
  state = out / "64" / convert.STATE_DIR
  while time.time() < deadline and len(list(state.glob("train-*.json"))) < 3:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "records_set.json").exists(), "the run finished before it could be killed"
  proc = run_bin("make_records", *flags, f"--output_dir={out}")
  assert "shards reused" in proc.stdout
  for ref in (tmp_path / "ref").rglob("*"):
    if ref.is_file():
      assert (out / ref.relative_to(tmp_path / "ref")).read_bytes() == ref.read_bytes(), ref
  assert not list(out.rglob("*.tmp")) and not state.exists()
  assert run_bin("verify_records", f"--records_dir={out}", "--noprogress").returncode == 0
