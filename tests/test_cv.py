"""Cross-validation (`train --fold=all`, skinrecords.training.cv): fold runs, out-of-fold files,
resume."""

import csv
import dataclasses
import hashlib
import json
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from sklearn import metrics as skm
import tensorflow as tf

from conftest import bin_env, convert_folder, run_bin, start_bin
from skinrecords.core import features, manifest, rundir
from skinrecords.data import synthetic
from skinrecords.evaluation import metrics
from skinrecords.input import augment, kaggle, pipeline
from skinrecords.model import models
from skinrecords.training import cv, train

# Trains every fold (and kills and resumes a CV run).
pytestmark = pytest.mark.slow

FOLDS = 3


@pytest.fixture(scope="module")
def cv_records(tmp_path_factory):
  """64 synthetic ABCD images with patient ids (4 per patient), 32 px, 3 patient-grouped folds."""
  root = tmp_path_factory.mktemp("cv")
  synthetic.write_dataset(root / "synth", synthetic.SyntheticConfig(
      num_images=64, seed=0, min_size=(48, 40), max_size=(64, 48), write_csv=True, flat=True),
      progress=False)
  return convert_folder(root / "synth" / "images", root / "records", 32,
                        labels_csv=str(root / "synth" / synthetic.CSV_NAME),
                        patient_column="patient_id", folds=FOLDS, min_train_shards=3,
                        split=(0.8, 0.0, 0.2))


def _records_truth(records) -> dict:
  """image_name -> (fold, patient_id, label) of every training example, read from the shards."""
  truth = {}
  for shard in pipeline.load_info(records).shards["train"]:
    for raw in tf.data.TFRecordDataset(shard.path):
      f = tf.train.Example.FromString(raw.numpy()).features.feature
      name = f[features.IMAGE_NAME].bytes_list.value[0].decode()
      assert name not in truth
      truth[name] = (f[features.FOLD].int64_list.value[0],
                     f[features.PATIENT_ID].bytes_list.value[0].decode(),
                     f[features.TARGET].int64_list.value[0])
  return truth


def _read_oof(model_dir) -> list[dict]:
  with open(model_dir / rundir.OOF_FILE, newline="") as f:
    return list(csv.DictReader(f))


def _config(records, model_dir, **kwargs):
  return train.TrainConfig(
      records_dir=str(records), model_dir=str(model_dir), progress=False, strategy="one_device",
      model=models.ModelConfig(backbone="simple_cnn", weights="none", image_size=32),
      augment=augment.AugmentConfig.none(), batch_size=8, steps_per_epoch=2, learning_rate=2e-3,
      **kwargs)


def _md5(path) -> str:
  return hashlib.md5(path.read_bytes()).hexdigest()


def test_every_training_example_is_predicted_once_by_the_model_that_held_it_out(
    cv_records, tmp_path, monkeypatch):
  out = tmp_path / "cv"
  lines = []
  result = cv.run_cv(_config(cv_records, out, epochs=1), bootstrap=200, echo=lines.append)
  assert [int(re.match(r"fold (\d) ", line)[1]) for line in lines] == list(range(FOLDS))
  for k in range(FOLDS):
    assert json.loads((out / f"fold_{k}" / rundir.CONFIG_FILE).read_text())["fold"] == k
  assert rundir.cv_fold_dirs(out) == [rundir.fold_dir(out, k) for k in range(FOLDS)]

  # oof.csv against the records themselves: every labelled training example once, with its own
  # fold, patient and label, and probabilities over both classes.
  truth, rows = _records_truth(cv_records), _read_oof(out)
  assert list(rows[0]) == ["image_name", "patient_id", "fold", "target", "p_0", "p_1"]
  assert sorted(r["image_name"] for r in rows) == sorted(truth)
  assert len(rows) == pipeline.load_info(cv_records).num_examples("train")
  for r in rows:
    assert (int(r["fold"]), r["patient_id"], int(r["target"])) == truth[r["image_name"]]
    assert float(r["p_0"]) + float(r["p_1"]) == pytest.approx(1.0, abs=1e-6)
  assert len({r["fold"] for r in rows}) == FOLDS and all(r["patient_id"] for r in rows)

  # Each row's probability is its held-out fold's model.keras on its image (recomputed here with
  # a plain Keras call), and the other folds' models give other numbers.
  p1 = {r["image_name"]: float(r["p_1"]) for r in rows}
  info = pipeline.load_info(cv_records)
  fold_models = [models.load_model_dir(rundir.fold_dir(out, k))[0] for k in range(FOLDS)]
  for k in range(FOLDS):
    images, _, names = next(iter(pipeline.make_dataset(
        info, "valid", batch_size=64, training=False, fold=k, with_names=True)))
    names = [n.decode() for n in names.numpy()]
    mine = [p1[n] for n in names]
    for j, model in enumerate(fold_models):
      direct = tf.sigmoid(model(tf.cast(images, tf.float32))[:, 0]).numpy()
      close = np.allclose(direct, mine, atol=1e-5)
      assert close == (j == k), (k, j)

  # cv_metrics.json against sklearn on oof.csv.
  m = json.loads((out / rundir.CV_METRICS_FILE).read_text())
  y = np.array([int(r["target"]) for r in rows])
  p = np.array([float(r["p_1"]) for r in rows])
  fold_of = np.array([int(r["fold"]) for r in rows])
  per_fold = [skm.roc_auc_score(y[fold_of == k], p[fold_of == k]) for k in range(FOLDS)]
  assert [f["fold"] for f in m["folds"]] == list(range(FOLDS))
  assert [f["roc_auc"] for f in m["folds"]] == pytest.approx(per_fold)
  assert [f["num_examples"] for f in m["folds"]] == [int((fold_of == k).sum())
                                                     for k in range(FOLDS)]
  assert m["mean_roc_auc"] == pytest.approx(np.mean(per_fold))
  assert m["std_roc_auc"] == pytest.approx(np.std(per_fold, ddof=1))
  assert m["oof_roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
  assert m["oof_pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
  low, high = m["oof_roc_auc_ci"][:2]
  assert low <= m["oof_roc_auc"] <= high and low < high
  assert m["bootstrap"] == {"resamples": 200, "unit": "patient"}
  assert result["oof_roc_auc"] == m["oof_roc_auc"]
  assert (out / cv.CV_ROC_FILE).stat().st_size > 10_000
  formatted = cv.format_cv(m)
  assert f"pooled out-of-fold ROC AUC {m['oof_roc_auc']:.4f}" in formatted
  assert f"{m['mean_roc_auc']:.4f} ± {m['std_roc_auc']:.4f}" in formatted

  # The same command again trains nothing and leaves every fold's files as they were.
  models_before = {k: _md5(out / f"fold_{k}" / rundir.MODEL_FILE) for k in range(FOLDS)}

  def no_training(*args, **kwargs):
    raise AssertionError("a finished fold was trained again")
  monkeypatch.setattr(train, "train", no_training)
  lines.clear()
  again = cv.run_cv(_config(cv_records, out, epochs=1), bootstrap=200, echo=lines.append)
  assert all("already finished, skipped" in line for line in lines) and len(lines) == FOLDS
  assert {k: _md5(out / f"fold_{k}" / rundir.MODEL_FILE) for k in range(FOLDS)} == models_before
  assert _read_oof(out) == rows and again["oof_roc_auc"] == m["oof_roc_auc"]

  # A fold folder holding a run with other settings is refused as a resume would be.
  with pytest.raises(rundir.RunDirError, match="image_size=32, this one has image_size=40"):
    cfg = _config(cv_records, out, epochs=1)
    cv.run_cv(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_size=40)),
              echo=lines.append)


def test_killed_cross_validation_resumes_at_the_unfinished_fold(cv_records, tmp_path):
  out = tmp_path / "cv"
  flags = [f"--records_dir={cv_records}", f"--model_dir={out}", "--fold=all",
           "--backbone=simple_cnn", "--weights=none", "--batch_size=8", "--epochs=3",
           "--steps_per_epoch=2", "--strategy=one_device", "--noprogress", "--noaugment"]
  proc = start_bin("train", *flags, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and not (out / "fold_1" / "backup" / "checkpoint").exists():
    assert proc.poll() is None
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len(rundir.read_history(out / "fold_1", 99))
  assert 1 <= done < 3, "fold 1 must be killed mid-way"
  assert (out / "fold_0" / rundir.SUMMARY_FILE).exists() and not (out / "fold_2").exists()
  assert not (out / rundir.OOF_FILE).exists()
  fold0 = _md5(out / "fold_0" / rundir.MODEL_FILE)

  result = run_bin("train", *flags)
  lines = [l for l in result.stdout.splitlines() if l.startswith("fold ")]
  assert "already finished, skipped" in lines[0]
  assert f"(trained {3 - done} epoch(s))" in lines[1] and "(trained 3 epoch(s))" in lines[2]
  assert re.search(rf"resuming from \S*fold_1\S* at epoch {done} ", result.stderr)
  assert _md5(out / "fold_0" / rundir.MODEL_FILE) == fold0
  assert [int(r["epoch"]) for r in rundir.read_history(out / "fold_1", 99)] == [1, 2, 3]
  rows = _read_oof(out)
  assert sorted(r["image_name"] for r in rows) == sorted(_records_truth(cv_records))
  m = json.loads((out / rundir.CV_METRICS_FILE).read_text())
  assert f"pooled out-of-fold ROC AUC {m['oof_roc_auc']:.4f}" in result.stdout
  assert "Traceback" not in result.stderr


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_workers_run_every_fold_on_one_cluster_and_only_the_chief_writes(cv_records,
                                                                             tmp_path):
  out = tmp_path / "cv"
  hosts = ",".join(f"127.0.0.1:{_free_port()}" for _ in range(2))
  procs, logs = [], [tmp_path / f"w{i}.log" for i in range(2)]
  for i in range(2):
    (tmp_path / f"tmp{i}").mkdir()
    env = bin_env(TMPDIR=str(tmp_path / f"tmp{i}"))  # a non-chief's temporary copies go here
    env.pop("TF_CONFIG", None)
    with open(logs[i], "w") as f:
      procs.append(start_bin(
          "train", f"--records_dir={cv_records}", f"--model_dir={out}", "--fold=all",
          "--backbone=simple_cnn", "--weights=none", "--batch_size=8", "--epochs=1",
          "--steps_per_epoch=2", "--noprogress", "--noaugment", "--strategy=multi_worker",
          f"--worker_hosts={hosts}", f"--task_index={i}", env=env, stdout=f,
          stderr=subprocess.STDOUT))
  try:
    for i, proc in enumerate(procs):
      assert proc.wait(timeout=240) == 0, logs[i].read_text()[-3000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  chief, worker = logs[0].read_text(), logs[1].read_text()
  # One process per worker for all folds: each fold's run was trained by both.
  for k in range(FOLDS):
    assert json.loads((out / f"fold_{k}" / rundir.CONFIG_FILE).read_text())["workers"] == 2
    assert re.search(rf"^fold {k} \({k + 1}/{FOLDS}\)", chief, re.M)
  assert "pooled out-of-fold ROC AUC" in chief and "pooled" not in worker
  assert "worker done (worker 1)" in worker
  rows = _read_oof(out)
  assert sorted(r["image_name"] for r in rows) == sorted(_records_truth(cv_records))
  assert not list((tmp_path / "tmp1").glob("skinrecords_*"))  # the worker's copies are gone


def test_fold_all_needs_folds_and_says_so_in_one_line(cv_records, tmp_path):
  flat = convert_folder(cv_records.parent / "synth" / "images", tmp_path / "nofolds", 32,
                        labels_csv=str(cv_records.parent / "synth" / synthetic.CSV_NAME))
  common = ["--backbone=simple_cnn", "--weights=none", f"--model_dir={tmp_path / 'm'}"]
  for flags, message in (
      ([f"--records_dir={flat}", "--fold=all"], "has no folds; --fold=all needs records "
                                                "converted with make_records --folds=K"),
      ([f"--records_dir={cv_records}", "--fold=al"], "--fold=al: expected a fold number"),
      ([f"--records_dir={cv_records}", "--oof_tta=2"], "--oof_tta=2 applies only to --fold=all")):
    proc = run_bin("train", *common, *flags, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2  # the message and "(see train --help)"
  assert not (tmp_path / "m").exists()


def test_kaggle_folds_are_the_file_groups_and_one_file_is_refused(tmp_path):
  def info(num_files):
    shards = tuple(manifest.Shard(str(tmp_path / f"train{i:02d}-10.tfrec"), 10, fold)
                   for i, fold in enumerate(kaggle.folds_of(num_files)))
    return manifest.DatasetInfo(str(tmp_path), kaggle.CLASSES, None, {"train": shards})
  assert cv.fold_ids(info(15)) == [0, 1, 2, 3, 4]  # K = min(5, files), as the notebooks do
  assert cv.fold_ids(info(3)) == [0, 1, 2]
  with pytest.raises(ValueError, match="only fold 0; fold=all needs"):
    cv.fold_ids(info(1))


def test_single_runs_and_cv_runs_never_share_a_folder(cv_records, tmp_path):
  """A --fold=k run written beside fold_k/ made evaluate read the CV folder as that one model."""
  cv_dir = tmp_path / "cv"
  (cv_dir / "fold_0").mkdir(parents=True)
  with pytest.raises(rundir.RunDirError, match="holds a cross-validation run"):
    train.train(_config(cv_records, cv_dir, epochs=1, fold=1))
  assert sorted(p.name for p in cv_dir.iterdir()) == ["fold_0"]  # nothing written beside it
  single = tmp_path / "single"
  single.mkdir()
  (single / rundir.MODEL_FILE).write_bytes(b"x")
  with pytest.raises(rundir.RunDirError, match="holds a single run"):
    cv.run_cv(_config(cv_records, single, epochs=1), echo=lambda line: None)
  assert sorted(p.name for p in single.iterdir()) == [rundir.MODEL_FILE]


def test_resume_with_another_recipe_is_refused_naming_the_setting(tmp_path):
  """Another loss resumed silently (two losses in one history); another optimizer or schedule
  failed deep in the restore; another learning rate resumed silently (issue 27). Epochs may
  change."""
  run = {"classes": ["a", "b"], "image_size": 32, "fold": None, "records_fingerprint": "f",
         "model": {"backbone": "simple_cnn", "num_classes": 2},
         "train": {"loss": "bce", "optimizer": "adam", "lr_schedule": "constant",
                   "learning_rate": 1e-3, "epochs": 2}}
  rundir.write_config(tmp_path, run)
  for key, value in (("loss", "focal"), ("optimizer", "adamw"), ("lr_schedule", "cosine")):
    changed = dict(run, train=dict(run["train"], **{key: value}))
    with pytest.raises(rundir.RunDirError, match=f"--{key}={run['train'][key]} \\(now "
                       f"{value}\\)"):
      rundir.check_resumable(tmp_path, changed)
  with pytest.raises(rundir.RunDirError, match="--learning_rate=0.001 \\(now 0.0001\\)"):
    rundir.check_resumable(tmp_path, dict(run, train=dict(run["train"], learning_rate=1e-4)))
  rundir.check_resumable(tmp_path, dict(run, train=dict(run["train"], epochs=5)))
  # Other records are named by folder, not by two fingerprints.
  with pytest.raises(rundir.RunDirError, match="trained on other records \\(None, another "
                     "fingerprint than /data/other\\)"):
    rundir.check_resumable(tmp_path, dict(run, records_fingerprint="g", records_dir="/data/other"))
  # A run made without folds is not resumed as a fold (its validation data would change).
  with pytest.raises(rundir.RunDirError, match="fold=None, this one has fold=1"):
    rundir.check_resumable(tmp_path, dict(run, fold=1))
  # Older config.json files without the recipe keys still resume.
  rundir.write_config(tmp_path, dict(run, train={}))
  rundir.check_resumable(tmp_path, dict(run, train=dict(run["train"], loss="focal")))


@pytest.mark.slow
def test_the_out_of_fold_estimate_is_honest_by_default_and_flagged_when_not(cv_records, tmp_path):
  """Issue 21: by default no fold's validation images (its out-of-fold images) choose its epoch
  (select_by=last); a validation rule is allowed on request and the estimate is flagged. The
  ensemble's threshold is chosen on the pooled out-of-fold predictions, never on test."""
  out = tmp_path / "cv"
  m = cv.run_cv(_config(cv_records, out, epochs=2), bootstrap=0, echo=lambda line: None)
  for k in range(FOLDS):
    summary = rundir.read_summary(rundir.fold_dir(out, k))
    assert summary["select_by"] == "last" and summary["best_epoch"] == 2
  assert m["honest"] is True and "honest estimate" in cv.format_cv(m)
  stored = rundir.read_threshold(out)
  rows = _read_oof(out)
  y = np.array([int(r["target"]) for r in rows])
  p = np.array([float(r["p_1"]) for r in rows])
  assert stored.split == "oof" and stored.n == len(rows) and "out-of-fold" in stored.source
  assert stored.value == pytest.approx(metrics.youden_threshold(p, y), abs=1e-6)
  flagged = cv.run_cv(_config(cv_records, tmp_path / "cv2", epochs=2, select_by="val_loss"),
                      bootstrap=0, echo=lambda line: None)
  assert flagged["honest"] is False and "OPTIMISTIC" in cv.format_cv(flagged)
