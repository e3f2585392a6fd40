"""The public SIIM-ISIC TFRecords as published: int64 ids, test files without `target`, no manifest.

The files written here follow the `melanoma-NxN` sets exactly: `image` (JPEG bytes), `image_name`
(bytes), int64 `patient_id`, `sex`, `age_approx`, `anatom_site_general_challenge`, `diagnosis` and
(train only) `target`; names `train00-2071.tfrec`-style, the count after the dash.
"""

from __future__ import annotations

import csv
import logging
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_bin
from skinrecords.evaluation import evaluate
from skinrecords.evaluation import predict
from skinrecords.input import kaggle
from skinrecords.input import pipeline

SIZE = 32
_INT64 = ("patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis")


def _example(image: np.ndarray, name: str, ints: dict) -> bytes:
  feature = {
      "image": tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[tf.io.encode_jpeg(image, quality=95).numpy()])),
      "image_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()])),
  }
  for key, value in ints.items():
    feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_kaggle(folder: pathlib.Path, train_files=6, test_files=2, per_file=6, size=SIZE,
                 sizes=None) -> dict:
  """Kaggle-style train/test files; returns {image_name: target or -1}. Melanomas (target 1) are
  bright, benign images dark, so a label can be checked against its own pixels."""
  folder.mkdir(parents=True)
  rng = np.random.default_rng(7)
  truth = {}
  for split, n_files in (("train", train_files), ("test", test_files)):
    for f in range(n_files):
      with tf.io.TFRecordWriter(str(folder / f"{split}{f:02d}-{per_file}.tfrec")) as w:
        for j in range(per_file):
          target = int(j % 3 == 0) if split == "train" else -1
          side = sizes[(f + j) % len(sizes)] if sizes else size
          base = 200 if target == 1 else 40 if target == 0 else 120
          image = (base + rng.integers(0, 20, (side, side, 3))).astype(np.uint8)
          name = f"ISIC_{split[:2]}{f:02d}{j:02d}"
          ints = {k: int(rng.integers(0, 2000 if k == "patient_id" else 5)) for k in _INT64}
          if target >= 0:
            ints["target"] = target
          w.write(_example(image, name, ints))
          truth[name] = target
  return truth


def _collect(ds):
  images, labels, names = [], [], []
  for batch in ds:
    images.append(batch[0].numpy())
    labels.append(batch[1].numpy())
    names += [n.decode() for n in batch[2].numpy()]
  return np.concatenate(images), np.concatenate(labels), names


@pytest.fixture(scope="module")
def kaggle_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("kaggle") / "melanoma-32x32"
  return root, write_kaggle(root)


@pytest.mark.slow
def test_train_files_read_as_published(kaggle_dir):
  root, truth = kaggle_dir
  info = pipeline.load_info(root)
  schema = info.schema("train")
  assert schema.dtype("patient_id") == "int64" and schema.image_format == "jpeg"
  assert info.image_size == SIZE  # inferred: every record is 32x32
  assert info.num_examples("train") == 36 and info.class_counts("train") == [24, 12]
  # No image_size passed: the inferred one is used.
  images, labels, names = _collect(pipeline.make_dataset(root, "train", batch_size=5,
                                                         training=False, with_names=True))
  assert images.shape == (36, SIZE, SIZE, 3) and images.dtype == np.uint8
  assert {n: int(l) for n, l in zip(names, labels)} == {n: t for n, t in truth.items() if t >= 0}
  np.testing.assert_array_equal(labels, images.mean(axis=(1, 2, 3)) > 128)
  batch = next(iter(pipeline.make_dataset(root, "train", batch_size=8, seed=1)))
  assert batch[0].shape == (8, SIZE, SIZE, 3) and set(batch[1].numpy()) <= {0, 1}


def test_test_files_without_target_read_with_no_label(kaggle_dir):
  root, truth = kaggle_dir
  info = pipeline.load_info(root)
  assert not info.has_labels("test") and info.has_labels("train")
  assert info.schema("test").dtype("target") is None
  images, labels, names = _collect(pipeline.make_dataset(info, "test", batch_size=5,
                                                         training=False, image_size=16,
                                                         with_names=True))
  assert images.shape == (12, 16, 16, 3)
  assert (labels == pipeline.NO_LABEL).all()
  assert names == sorted(n for n, t in truth.items() if t < 0)
  with pytest.raises(ValueError, match="no labels"):
    pipeline.make_dataset(info, "test", training=True)


def test_folds_are_contiguous_groups_of_files(kaggle_dir):
  root, _ = kaggle_dir
  info = pipeline.load_info(root)
  assert kaggle.folds_of(15) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
  assert kaggle.folds_of(3) == [0, 1, 2]
  names = lambda shards: [pathlib.Path(s.path).name[:7] for s in shards]  # noqa: E731
  assert names(info.select("valid", fold=0)) == ["train00", "train01"]
  assert names(info.select("valid", fold=4)) == ["train05"]
  assert names(info.select("train", fold=0)) == [f"train{i:02d}" for i in range(2, 6)]
  assert info.class_counts("valid", fold=0) == [8, 4]
  with pytest.raises(ValueError, match="fold=5"):
    info.select("valid", fold=5)


def test_mixed_sizes_ask_for_image_size(tmp_path, caplog):
  write_kaggle(tmp_path / "k", train_files=2, test_files=0, per_file=4, sizes=(24, 40))
  with caplog.at_level(logging.INFO):
    info = pipeline.load_info(tmp_path / "k")
  assert info.image_size is None
  assert re.search(r"counted 8 records in 2 SIIM-ISIC files in \d+\.\d s", caplog.text)
  assert "images come in 2 sizes (24x24, 40x40)" in caplog.text
  with pytest.raises(ValueError, match="image_size"):
    pipeline.make_dataset(info, "train", training=False)
  images, _, _ = _collect(pipeline.make_dataset(info, "train", training=False, image_size=SIZE,
                                                with_names=True))
  assert images.shape == (8, SIZE, SIZE, 3)


def test_string_patient_ids_read_too(tmp_path, caplog):
  """Re-encoded sets store patient_id as bytes; the reader never parses it, so both work."""
  root = tmp_path / "s"
  root.mkdir()
  with tf.io.TFRecordWriter(str(root / "train00-2.tfrec")) as w:
    for j in range(2):
      ex = tf.train.Example.FromString(_example(np.full((SIZE, SIZE, 3), 200 * j, np.uint8),
                                                f"ISIC_{j}", {"target": j}))
      ex.features.feature["patient_id"].bytes_list.value.append(b"IP_0001")
      w.write(ex.SerializeToString())
  with caplog.at_level(logging.INFO):
    info = pipeline.load_info(root)
  assert "every image is 32x32: image_size=32 (inferred" in caplog.text
  assert info.schema("train").dtype("patient_id") == "bytes"
  _, labels, names = _collect(pipeline.make_dataset(info, "train", training=False,
                                                    with_names=True))
  assert labels.tolist() == [0, 1] and names == ["ISIC_0", "ISIC_1"]


def test_corrupt_file_is_named_by_the_counting_pass(tmp_path):
  write_kaggle(tmp_path / "k", train_files=3, test_files=0)
  bad = sorted((tmp_path / "k").glob("*.tfrec"))[1]
  data = bytearray(bad.read_bytes())
  data[len(data) // 2] ^= 0x55
  bad.write_bytes(bytes(data))
  with pytest.raises(pipeline.CorruptShardError, match=bad.name):
    pipeline.load_info(tmp_path / "k")


@pytest.mark.slow
def test_train_fold_predict_and_evaluate_through_the_commands(tmp_path, kaggle_dir):
  root, truth = kaggle_dir
  model_dir = tmp_path / "run"
  run_bin("train", f"--records_dir={root}", f"--model_dir={model_dir}", "--backbone=simple_cnn",
          "--weights=none", "--image_size=32", "--epochs=1", "--steps_per_epoch=2", "--fold=0",
          "--batch_size=8", "--warmup_epochs=0", "--noprogress", timeout=300)
  assert (model_dir / "model.keras").is_file()
  out = tmp_path / "preds" / "test.csv"
  proc = run_bin("predict", f"--model_dir={model_dir}", f"--records_dir={root}", "--split=test",
                 f"--output_csv={out}")
  with open(out, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [r["image"] for r in rows] == sorted(n for n, t in truth.items() if t < 0)
  assert all(0.0 <= float(r["probability"]) <= 1.0 and r["predicted"] in ("0", "1") for r in rows)
  assert "12 predicted" in proc.stderr
  # Test files carry no target: evaluation is refused, saying what to run instead (in-process:
  # another command start costs ~10 s; the CLI prints the same ValueError in one line).
  with pytest.raises(ValueError, match=r"no labels .* bin/predict .*--records_dir="):
    evaluate.evaluate(evaluate.EvalConfig(model_dir=str(model_dir), records_dir=str(root),
                                          split="test"))


def test_empty_or_foreign_files_are_named(tmp_path):
  (tmp_path / "e").mkdir()
  (tmp_path / "e" / "train00-0.tfrec").write_bytes(b"")
  with pytest.raises(ValueError, match="train00-0.tfrec: no records"):
    pipeline.load_info(tmp_path / "e")
  with pytest.raises(FileNotFoundError, match="no such folder"):
    pipeline.load_info(tmp_path / "missing")


@pytest.mark.parametrize("kwargs, message", [
    ({"images": ("x.jpg",)}, "one or the other"),  # records and image files at once
    ({"output_csv": "{tmp}"}, "is a folder; give a file name"),
    ({"output_csv": "{tmp}/file.txt/p.csv"}, "a part of its folder is a file"),
])
@pytest.mark.slow
def test_predict_records_refuses_bad_arguments_before_loading(tmp_path, kaggle_dir, kwargs,
                                                             message):
  root, _ = kaggle_dir
  (tmp_path / "file.txt").write_text("x")
  kwargs = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()}
  with pytest.raises(ValueError, match=message):  # tmp_path holds no model: checked before it
    predict.run(predict.PredictConfig(model_dir=str(tmp_path), records_dir=str(root), **kwargs))


@pytest.mark.slow
def test_predict_command_error_is_one_line(tmp_path, kaggle_dir):
  root, _ = kaggle_dir
  proc = run_bin("predict", f"--model_dir={tmp_path}", f"--records_dir={root}",
                 f"--output_csv={tmp_path}", check=False)
  assert proc.returncode == 2 and "is a folder; give a file name" in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2


@pytest.mark.slow
def test_train_on_test_files_only_is_one_line(tmp_path):
  write_kaggle(tmp_path / "k", train_files=0, test_files=1)
  proc = run_bin("train", f"--records_dir={tmp_path / 'k'}", f"--model_dir={tmp_path / 'm'}",
                 "--backbone=simple_cnn", check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  error = [l for l in proc.stderr.splitlines() if not re.match(r"[IW]\d{4} ", l)]
  assert len(error) <= 2 and "no split 'train'" in error[0], proc.stderr  # log lines aside
  assert not (tmp_path / "m").exists()
