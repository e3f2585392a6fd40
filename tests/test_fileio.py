"""Remote storage (issue 12): every user path goes through `fileio`, so `gs://` works.

`ram://` is TensorFlow's in-memory file system with the gfile interface gs:// has; it lives in one
process, so the end-to-end parts here are library calls in the test process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, bin_env, run_bin
from test_kaggle import write_kaggle
from skinrecords.core import fileio
from skinrecords.core import rundir
from skinrecords.data import convert
from skinrecords.data import preprocess
from skinrecords.data import records
from skinrecords.data import synthetic
from skinrecords.data import workers
from skinrecords.evaluation import plots
from skinrecords.input import augment
from skinrecords.input import pipeline
from skinrecords.model import models
from skinrecords.serving import export
from skinrecords.training import distribute

SIZE = 32


def _ram(tag: str) -> str:
  """A fresh ram:// folder: the file system is shared by every test in this process."""
  return f"ram://{tag}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "ram"])
def base(request, tmp_path):
  return str(tmp_path / "d") if request.param == "local" else _ram("fileio")


def test_join_keeps_the_scheme():
  # pathlib.Path("gs://b/x") would be "gs:/b/x": a local folder named "gs:".
  assert fileio.join("gs://bucket/runs", "a", "model.keras") == "gs://bucket/runs/a/model.keras"
  assert fileio.basename("gs://bucket/runs/a/") == "a"
  assert fileio.dirname("gs://bucket/runs/a") == "gs://bucket/runs"
  assert fileio.is_remote("ram://x") and not fileio.is_remote("/tmp/x")


def test_fileio_writes_lists_and_renames(base):
  fileio.makedirs(fileio.join(base, "sub"))
  fileio.write_json_atomic(fileio.join(base, "a.json"), {"b": 1, "a": [1, 2]})
  fileio.write_text_atomic(fileio.join(base, "sub", "t.txt"), "héllo\r\n")
  assert json.loads(fileio.read_text(fileio.join(base, "a.json"))) == {"a": [1, 2], "b": 1}
  assert fileio.read_text(fileio.join(base, "sub", "t.txt")) == "héllo\r\n"
  assert fileio.listdir(base) == ["a.json", "sub"]  # no .tmp left behind
  assert fileio.glob(fileio.join(base, "*.json")) == [fileio.join(base, "a.json")]
  assert fileio.isdir(fileio.join(base, "sub")) and fileio.isfile(fileio.join(base, "a.json"))
  assert not fileio.isfile(fileio.join(base, "sub"))
  assert fileio.size(fileio.join(base, "sub", "t.txt")) == len("héllo\r\n".encode())
  assert fileio.walk_files(base) == ["a.json", "sub/t.txt"]

  fileio.write_bytes_atomic(fileio.join(base, "b.bin"), b"new")
  with pytest.raises(FileExistsError):
    fileio.rename(fileio.join(base, "b.bin"), fileio.join(base, "a.json"), overwrite=False)
  fileio.rename(fileio.join(base, "b.bin"), fileio.join(base, "a.json"), overwrite=True)
  assert fileio.read_bytes(fileio.join(base, "a.json")) == b"new"
  assert not fileio.exists(fileio.join(base, "b.bin"))
  with fileio.open(fileio.join(base, "w.txt"), "w") as f:
    f.write("x,y\n")
  assert fileio.read_text(fileio.join(base, "w.txt")) == "x,y\n"

  with pytest.raises(FileNotFoundError):  # tf.errors.NotFoundError comes back as an OSError
    fileio.read_bytes(fileio.join(base, "missing"))
  with pytest.raises(FileNotFoundError):
    fileio.listdir(fileio.join(base, "missing"))
  fileio.remove(fileio.join(base, "missing"))  # missing_ok
  fileio.rmtree(fileio.join(base, "sub"))
  assert fileio.listdir(base) == ["a.json", "w.txt"]


def test_check_writable_dir_makes_the_folder_and_refuses_a_file(base):
  out = fileio.check_writable_dir(fileio.join(base, "out", "deeper"))
  assert fileio.isdir(out) and fileio.listdir(out) == []
  fileio.write_text_atomic(fileio.join(base, "file"), "")
  with pytest.raises(ValueError, match="is a file, not a folder"):
    fileio.check_writable_dir(fileio.join(base, "file"))


def test_unknown_scheme_is_one_clear_error():
  with pytest.raises(ValueError, match="not writable.*tensorflow-io"):
    convert.check_output_dir(convert.ConvertConfig(input_dir="in",
                                                   output_dir="nosuchfs://bucket/out"))
  with pytest.raises(ValueError, match="not writable.*tensorflow-io"):
    fileio.check_writable_dir("nosuchfs://bucket/out")


def test_fileio_does_not_import_tensorflow_for_local_paths(tmp_path):
  # The converter's spawned workers import fileio: TensorFlow would cost each 3.4-3.8 s, 675 MB.
  code = ("import sys; from skinrecords.core import fileio; "
          "from skinrecords.data import records, workers; "
          f"fileio.write_json_atomic({str(tmp_path / 'x.json')!r}, {{}}); "
          f"fileio.listdir({str(tmp_path)!r}); fileio.join('gs://b', 'c'); "
          "print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=bin_env(), check=True, cwd=REPO).stdout
  assert out.strip() == "False"


# ------------------------------------------------------------------- converter and pipeline

@pytest.fixture(scope="module")
def images(tmp_path_factory):
  root = tmp_path_factory.mktemp("storage")
  synthetic.write_dataset(root / "images", synthetic.SyntheticConfig(
      num_images=24, seed=0, min_size=(64, 48), max_size=(80, 64)), progress=False)
  return root / "images"


def _config(images, output_dir, **kwargs):
  return convert.ConvertConfig(
      input_dir=str(images), output_dir=str(output_dir), classes=("NotMelanoma", "Melanoma"),
      workers=1, progress=False, min_train_shards=6,
      preprocess=preprocess.PreprocessConfig(image_size=SIZE), **kwargs)


@pytest.fixture(scope="module")
def local_records(images, tmp_path_factory):
  out = tmp_path_factory.mktemp("local") / "records"
  convert.convert(_config(images, out))
  return str(out)


def _same_files(a: str, b: str) -> None:
  names = fileio.listdir(a)
  assert names == fileio.listdir(b)
  for name in names:
    if fileio.isdir(fileio.join(a, name)):  # idx/: the shards' index files
      _same_files(fileio.join(a, name), fileio.join(b, name))
      continue
    assert fileio.read_bytes(fileio.join(a, name)) == fileio.read_bytes(fileio.join(b, name)), name


def _examples(records_dir, split):
  ds = pipeline.make_dataset(records_dir, split, batch_size=4, training=False, with_names=True)
  images, labels, names = zip(*ds.as_numpy_iterator())
  return np.concatenate(images), np.concatenate(labels), np.concatenate(names)


def test_converter_writes_a_remote_output_that_verifies_and_reads(images, local_records):
  out = _ram("records")
  result = convert.convert(_config(images, out))
  assert result.output_dir == out and result.resumed_shards == 0
  assert not any(n.endswith(".tmp") or n == convert.STATE_DIR for n in fileio.listdir(out))
  _same_files(out, local_records)  # the same bytes, manifest included, as a local run
  report = records.verify(out, progress=False)
  assert report.ok, report.problems
  assert report.examples == 24
  info = pipeline.load_info(out)
  assert info.records_dir == out and info.shards["train"][0].path.startswith(out + "/")
  for split in ("valid", "test"):
    for remote, local in zip(_examples(out, split), _examples(local_records, split)):
      np.testing.assert_array_equal(remote, local)
  batch = next(iter(pipeline.make_dataset(out, "train", batch_size=4, training=True)))
  assert batch[0].shape == (4, SIZE, SIZE, 3)
  # The same flags again: nothing to do; other flags: refused, nothing deleted.
  assert convert.convert(_config(images, out)).resumed_shards == len(
      [s for split in result.manifest["splits"].values() for s in split["shards"]])
  with pytest.raises(convert.OutputExistsError):
    convert.convert(_config(images, out, seed=1))
  _same_files(out, local_records)


class _InterruptedPool:
  """A one-process RecordPool that stops the run after `limit` images (a kill, in-process)."""

  def __init__(self, config, limit):
    self.config, self.limit, self.sizes = config, limit, None
    self._pool = workers.RecordPool(1, config)

  def imap(self, tasks):
    for i, result in enumerate(self._pool.imap(tasks)):
      if i == self.limit:
        raise KeyboardInterrupt("killed")
      yield result

  def hashes(self, paths):
    return self._pool.hashes(paths)

  def close(self):
    self._pool.close()


def test_interrupted_remote_conversion_resumes_to_identical_output(images, local_records):
  out = _ram("resume")
  config = _config(images, out)
  with pytest.raises(KeyboardInterrupt):
    convert.convert(config, pool=_InterruptedPool(config.preprocess, limit=10))
  assert not fileio.exists(fileio.join(out, "manifest.json"))
  finished = [n for n in fileio.listdir(out) if n.endswith(".tfrecord")]
  assert len(finished) >= 2
  result = convert.convert(config)
  assert result.resumed_shards == len(finished)
  _same_files(out, local_records)


def test_kaggle_files_read_from_a_remote_folder(tmp_path):
  local = tmp_path / "melanoma-32x32"
  write_kaggle(local, train_files=3, test_files=1, per_file=4)
  remote = _ram("kaggle")
  fileio.makedirs(remote)
  for name in fileio.listdir(local):
    fileio.copy(str(local / name), fileio.join(remote, name))
  fileio.write_bytes_atomic(fileio.join(remote, "train09-4.tfrec.tmp"), b"")  # not a shard
  info, ref = pipeline.load_info(remote), pipeline.load_info(local)
  assert info.image_size == ref.image_size == 32
  for split in ("train", "test"):
    assert [fileio.basename(s.path) for s in info.shards[split]] == [
        fileio.basename(s.path) for s in ref.shards[split]]
    assert [(s.num_examples, s.fold, s.class_counts) for s in info.shards[split]] == [
        (s.num_examples, s.fold, s.class_counts) for s in ref.shards[split]]
  for a, b in zip(_examples(remote, "train"), _examples(str(local), "train")):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------- run directory and figures

def _tiny_model():
  inputs = keras.Input((SIZE, SIZE, 3))
  x = keras.layers.GlobalAveragePooling2D()(inputs)
  return keras.Model(inputs, keras.layers.Dense(1)(x))


def test_run_directory_files_on_a_remote_folder():
  d = _ram("run")
  rundir.check_writable(d)
  model = _tiny_model()
  rundir.save_model(model, d)
  rundir.write_config(d, {"classes": ["a", "b"], "image_size": SIZE})
  rows = [{k: 1 for k in rundir.HISTORY_FIELDS}, {k: 2 for k in rundir.HISTORY_FIELDS}]
  rundir.write_history(d, rows)
  assert [r["epoch"] for r in rundir.read_history(d, upto=1)] == ["1"]
  loaded, cfg = models.load_model_dir(d)
  x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
  np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-6)
  assert cfg.classes == ["a", "b"]
  assert fileio.listdir(d) == ["config.json", "history.csv", "model.keras"]
  fileio.makedirs(rundir.fold_dir(d, 1))
  rundir.save_model(model, rundir.fold_dir(d, 1))
  assert rundir.cv_fold_dirs(d) == [fileio.join(d, "fold_1")]
  rundir.clear(d)
  assert fileio.listdir(d) == ["fold_1"]


@pytest.mark.slow
def test_export_saved_model_to_a_remote_folder(tmp_path):
  model_dir = _ram("exportrun")
  model = _tiny_model()
  fileio.makedirs(model_dir)
  rundir.save_model(model, model_dir)
  rundir.write_config(model_dir, {"classes": ["a", "b"], "image_size": SIZE})
  out = _ram("export")
  for _ in range(2):  # the second export replaces the first
    report = export.export(export.ExportConfig(model_dir=model_dir, output_dir=out,
                                               format="saved_model"))
  assert report.saved_model == fileio.join(out, "1")
  # No staging left.
  assert fileio.listdir(out) == ["1", export.PREPROCESSING_FILE, export.SMOKE_SCRIPT]
  assert "saved_model.pb" in fileio.walk_files(report.saved_model)
  assert report.sizes[report.saved_model] > 0
  served = tf.saved_model.load(report.saved_model).signatures["serving_uint8"]
  x = np.random.default_rng(0).integers(0, 255, (2, SIZE, SIZE, 3)).astype(np.uint8)
  probs = served(tf.constant(x))["probabilities"].numpy()
  np.testing.assert_allclose(probs, 1 / (1 + np.exp(-model(x.astype(np.float32)).numpy()[:, 0])),
                             rtol=1e-5)


def test_figures_and_chief_output_dir_on_a_remote_folder():
  d = _ram("plots")
  out = distribute.ChiefOutputDir(d, chief=True)
  assert out.dir == d and fileio.isdir(d)
  written = plots.plot_history([{"epoch": e, "loss": 1.0 / e, "val_loss": 1.5 / e,
                                 "accuracy": 0.5, "val_accuracy": 0.5, "auc": 0.6,
                                 "val_auc": float("nan")} for e in (1, 2)], out.dir)
  assert written == [out.join(f"{k}.png") for k in ("accuracy", "loss", "auc")]
  assert all(fileio.read_bytes(p).startswith(b"\x89PNG\r\n\x1a\n") for p in written)
  assert fileio.listdir(d) == ["accuracy.png", "auc.png", "loss.png"]


def test_non_chief_workers_write_to_a_local_temporary_folder():
  first = distribute.ChiefOutputDir("gs://bucket/run", chief=False, tag="worker 1")
  assert not fileio.is_remote(first.dir) and os.path.isdir(first.dir)
  fileio.write_text_atomic(first.join("x.txt"), "")
  again = distribute.ChiefOutputDir("gs://bucket/run", chief=False, tag="worker 1")  # restarted
  assert not os.path.exists(first.dir) and os.path.isdir(again.dir)  # the stale copy went
  again.cleanup()
  assert not os.path.exists(again.dir)


@pytest.mark.slow  # the whole command in a subprocess (the converter's remote output: quick above)
def test_make_records_command_with_a_remote_output(images):
  proc = run_bin("make_records", f"--input_dir={images}", "--output_dir=ram://cli/records",
                 "--image_size=32", "--workers=1", "--noprogress")
  assert "ram://cli/records: 24 images in" in proc.stdout


def test_make_records_command_with_an_unknown_file_system(images):
  proc = run_bin("make_records", f"--input_dir={images}", "--output_dir=nosuchfs://b/records",
                 "--image_size=32", "--noprogress", check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "nosuchfs://b/records" in proc.stderr and "tensorflow-io" in proc.stderr


@pytest.mark.slow
def test_cross_validation_evaluate_and_predict_on_remote_folders(images):
  """Issue 12's end-to-end run with ram:// everywhere: records, a CV run (fold run directories,
  backups, logs, oof.csv), a resumed fold, the ensemble's evaluation (with its ISIC truth CSV)
  and an ISIC submission file."""
  from skinrecords.evaluation import evaluate, predict  # pylint: disable=g-import-not-at-top
  from skinrecords.model import models  # pylint: disable=g-import-not-at-top
  from skinrecords.training import cv, train  # pylint: disable=g-import-not-at-top

  records, runs = _ram("cv-records"), _ram("cv-runs")
  convert.convert(_config(images, records, folds=2, split=(0.75, 0.0, 0.25)))
  config = train.TrainConfig(
      records_dir=records, model_dir=runs, progress=False, strategy="one_device", epochs=1,
      batch_size=4, steps_per_epoch=2, learning_rate=1e-3, augment=augment.AugmentConfig.none(),
      model=models.ModelConfig(backbone="simple_cnn", weights="none", image_size=SIZE))
  m = cv.run_cv(config, echo=lambda line: None)
  assert [f["fold"] for f in m["folds"]] == [0, 1]
  assert rundir.cv_fold_dirs(runs) == [rundir.fold_dir(runs, 0), rundir.fold_dir(runs, 1)]
  for fold_dir in rundir.cv_fold_dirs(runs):
    assert {"model.keras", "config.json", "history.csv", "summary.json", "backup",
            "logs"} <= set(fileio.listdir(fold_dir))
  oof = fileio.read_text(fileio.join(runs, rundir.OOF_FILE)).splitlines()
  assert len(oof) - 1 == pipeline.load_info(records).num_examples("train")
  assert json.loads(fileio.read_text(fileio.join(runs, rundir.CV_METRICS_FILE)))["folds"]

  # One more epoch: each fold resumes from its backup on ram://.
  m = cv.run_cv(dataclasses.replace(config, epochs=2), echo=lambda line: None)
  for fold_dir in rundir.cv_fold_dirs(runs):
    history = fileio.read_text(fileio.join(fold_dir, rundir.HISTORY_FILE)).splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2"]
    summary = json.loads(fileio.read_text(fileio.join(fold_dir, rundir.SUMMARY_FILE)))
    assert summary["epochs_this_run"] == 1, "epoch 1 came from the backup, not retrained"

  out, truth, preds = fileio.join(runs, "eval"), _ram("truth.csv"), _ram("pred.csv")
  result = evaluate.evaluate(evaluate.EvalConfig(
      model_dir=runs, split="test", output_dir=out, bootstrap=10, isic_truth_csv=truth))
  assert result["ensemble"]["members"] == rundir.cv_fold_dirs(runs)
  metrics = json.loads(fileio.read_text(fileio.join(out, "metrics.json")))
  assert metrics["n"] == pipeline.load_info(records).num_examples("test")
  assert {"report.txt", "predictions.csv", "roc.png", "calibration.png"} <= set(
      fileio.listdir(out))
  rows, _, _ = predict.run(predict.PredictConfig(
      model_dir=runs, records_dir=records, split="test", output_csv=preds, format="isic"))
  lines = fileio.read_text(preds).splitlines()
  assert lines[0] == "image,NotMelanoma,Melanoma" and len(lines) == len(rows) + 1
  assert len(fileio.read_text(truth).splitlines()) == len(lines)
