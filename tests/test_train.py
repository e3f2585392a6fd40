"""Training: 2 replicas match 1, XLA step, real learning on the synthetic ABCD data, kill-and-resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import signal
import subprocess
import time
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_bin, start_bin, synthetic_records
from skinrecords.core import rundir
from skinrecords.input import augment
from skinrecords.input import pipeline
from skinrecords.model import models
from skinrecords.model import xla
from skinrecords.training import distribute
from skinrecords.training import selection
from skinrecords.training import steps as steps_lib
from skinrecords.training import train

NO_AUGMENT = augment.AugmentConfig.none()


@pytest.fixture(scope="module")
def abcd_records(tmp_path_factory):
  """Synthetic ABCD dermoscopy, 32 px records, split 0.6/0.2/0.2 (240/80/80 images)."""
  return synthetic_records(tmp_path_factory.mktemp("abcd"), 400, (96, 72), (128, 96), 32,
                           min_train_shards=4)


def _weights_after_steps(strategy, init, images, labels, xla="on", steps=3):
  with strategy.scope():
    model = models.build_model(models.ModelConfig(backbone="simple_cnn", weights="none", image_size=32, dropout=0.0))
    model.set_weights(init)
    opt = keras.optimizers.Adam(1e-2)
    opt.build(model.trainable_variables)
  config = train.TrainConfig(records_dir="", model_dir="", augment=NO_AUGMENT, xla=xla,
                             batch_size=len(images))
  step_fns = steps_lib.CompiledSteps(strategy, model, opt, config, [1.0, 1.0])
  ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(len(images)).repeat()
  iterator = iter(strategy.experimental_distribute_dataset(ds))
  losses = [float(step_fns.train_step(iterator, tf.constant(s, tf.int64))[0]) for s in range(steps)]
  return [w.numpy() for w in model.weights], losses


@pytest.mark.slow
def test_two_replicas_with_xla_match_one_replica():
  assert len(tf.config.list_logical_devices("CPU")) == 2, "conftest sets up 2 logical CPUs"
  rng = np.random.default_rng(0)
  half = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  half_labels = np.array([0, 1, 1, 0], np.int32)
  # Two identical halves: each replica's batch-norm statistics then equal the global ones, so the
  # only thing that can differ is how gradients are combined.
  images, labels = np.concatenate([half, half]), np.concatenate([half_labels, half_labels])
  init = models.build_model(models.ModelConfig(backbone="simple_cnn", weights="none", image_size=32, dropout=0.0)).get_weights()
  one, loss1 = _weights_after_steps(distribute.make_strategy("one_device"), init, images, labels)
  two, loss2 = _weights_after_steps(distribute.make_strategy("mirrored"), init, images, labels)
  assert not np.allclose(one[0], init[0])  # it trained
  np.testing.assert_allclose(loss1, loss2, rtol=1e-4)
  for a, b in zip(one, two):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_simple_cnn_learns_the_synthetic_abcd_task(abcd_records, tmp_path):
  config = train.TrainConfig(
      records_dir=str(abcd_records), model_dir=str(tmp_path / "m"),
      model=models.ModelConfig(backbone="simple_cnn", weights="none", image_size=32), strategy="mirrored", batch_size=32,
      learning_rate=2e-3, epochs=10, progress=False,
      augment=augment.AugmentConfig(rotation_range=30.0, width_shift_range=0.1,
                                    height_shift_range=0.1))
  result = train.train(config)
  out = tmp_path / "m"
  for name in ("model.keras", "config.json", "history.csv", "accuracy.png", "loss.png", "auc.png"):
    assert (out / name).exists(), name
  assert list((out / "logs").iterdir())
  with open(out / "history.csv") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["epoch"]) for r in rows] == list(range(1, 11))
  assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
  saved = json.loads((out / "config.json").read_text())
  assert saved["classes"] == ["NotMelanoma", "Melanoma"] and saved["replicas"] == 2
  assert saved["preprocessing"]["image_size"] == 32
  # The best model, reloaded in safe mode, on the untouched test split.
  model = keras.models.load_model(out / "model.keras")
  info = pipeline.load_info(abcd_records)
  ds = pipeline.make_dataset(info, "test", batch_size=64, training=False)
  correct = total = 0
  for images, labels in ds:
    probs = tf.sigmoid(model(tf.cast(images, tf.float32), training=False)[:, 0]).numpy()
    correct += int(np.sum((probs >= 0.5) == labels.numpy()))
    total += len(labels)
  assert total == info.num_examples("test")
  assert correct / total >= 0.85, (correct / total, result)
  # model.keras is the epoch summary.json names, chosen by the lowest validation loss (issue 21).
  summary = json.loads((out / "summary.json").read_text())
  best = min(rows, key=lambda r: float(r["val_loss"]))
  assert summary["best_epoch"] == int(best["epoch"]) and summary["selected_by"] == "val_loss"
  assert saved["train"]["select_by"] == "val_loss" and saved["train"]["threshold_rule"] == "youden"
  # The threshold was chosen on the saved model's validation predictions (Youden), and stored.
  stored = rundir.read_threshold(out)
  assert stored.split == "valid" and stored.n == info.num_examples("valid")
  assert "Youden" in stored.source and summary["threshold"]["value"] == stored.value
  assert saved["records_fingerprint"] == info.fingerprint and saved["fold"] is None
  val_loss = _val_loss(model, info)
  assert val_loss == pytest.approx(float(best["val_loss"]), rel=1e-3, abs=1e-4)


def _val_loss(model, info) -> float:
  losses = []
  for images, labels in pipeline.make_dataset(info, "valid", batch_size=64, training=False):
    logits = model(tf.cast(images, tf.float32), training=False)
    losses.append(keras.losses.binary_crossentropy(
        tf.cast(labels[:, None], tf.float32), logits, from_logits=True).numpy())
  return float(np.mean(np.concatenate(losses)))


def test_ties_on_validation_auc_go_to_the_later_epoch_with_lower_loss():
  """Issue 15: AUC saturated at 1.0 from epoch 4 and the first such epoch (probabilities on one
  side of 0.5, val_loss 0.60) was kept; test accuracy 0.64."""
  state = types.SimpleNamespace(best=tf.Variable(-np.inf, dtype=tf.float64),
                                best_tiebreak=tf.Variable(-np.inf, dtype=tf.float64),
                                best_epoch=tf.Variable(0, dtype=tf.int64))
  rows = [dict(loss=0.6, val_auc=0.98, val_loss=0.65), dict(loss=0.5, val_auc=1.0, val_loss=0.60),
          dict(loss=0.4, val_auc=1.0, val_loss=0.10), dict(loss=0.3, val_auc=1.0, val_loss=0.20),
          dict(loss=0.2, val_auc=0.99, val_loss=0.05)]
  won = [selection.update_best(state, r, e, True, e == 0, "val_auc") for e, r in enumerate(rows)]
  assert won == [True, True, True, False, False] and int(state.best_epoch.numpy()) == 3
  for has_valid, auc, expect in ((True, float("nan"), 2), (False, 1.0, 3)):
    state.best.assign(-np.inf), state.best_tiebreak.assign(-np.inf)
    rows = [dict(loss=0.5, val_auc=auc, val_loss=0.4), dict(loss=0.4, val_auc=auc, val_loss=0.3),
            dict(loss=0.3, val_auc=auc, val_loss=0.35)]
    for e, r in enumerate(rows):
      selection.update_best(state, r, e, has_valid, e == 0, "val_auc")
    assert int(state.best_epoch.numpy()) == expect, (has_valid, auc)


@pytest.mark.slow
def test_killed_training_resumes_and_runs_the_planned_epochs(abcd_records, tmp_path):
  model_dir = tmp_path / "run"
  flags = [f"--records_dir={abcd_records}", f"--model_dir={model_dir}", "--backbone=simple_cnn",
           "--weights=none", "--batch_size=16", "--epochs=3", "--steps_per_epoch=4",
           "--strategy=one_device", "--noprogress", "--learning_rate=1e-3"]
  proc = start_bin("train", *flags, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not (model_dir / "backup" / "checkpoint").exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with open(model_dir / "history.csv") as f:
    done = len(list(csv.DictReader(f)))
  assert 1 <= done < 3, "the run must be killed mid-way"
  backup = tf.train.latest_checkpoint(str(model_dir / "backup"))
  saved_epoch = int(tf.train.load_checkpoint(backup).get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE"))
  # The backup's weights, restored here independently, and a fresh model's, for comparison.
  model = models.build_model(models.ModelConfig(backbone="simple_cnn", weights="none",
                                                image_size=32, num_classes=2))
  fresh = distribute.weights_digest(model.get_weights())
  tf.train.Checkpoint(model=model).restore(backup).expect_partial()
  backed_up = distribute.weights_digest(model.get_weights())
  assert backed_up != fresh
  result = run_bin("train", *flags)
  restored = re.search(r"resuming from .* at epoch (\d+) \(optimizer step (\d+), weights sha256 "
                       r"([0-9a-f]{64})\)", result.stderr)
  assert restored, result.stderr[-3000:]
  assert int(restored[1]) == saved_epoch >= 1
  assert int(restored[2]) == saved_epoch * 4  # 4 steps per epoch: the optimizer's own counter
  assert restored[3] == backed_up  # the weights carried on, not re-initialised
  with open(model_dir / "history.csv") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
  assert (model_dir / "model.keras").exists()
  summary = json.loads((model_dir / "summary.json").read_text())
  assert summary["epochs_done"] == 3 and summary["epochs_this_run"] == 3 - saved_epoch
  assert f"holds epoch {summary['best_epoch']} of 3" in result.stdout


@pytest.mark.slow
def test_bad_flags_are_usage_errors(abcd_records, tmp_path):
  proc = run_bin("train", f"--records_dir={abcd_records}", f"--model_dir={tmp_path}",
                 "--fold=3", "--weights=none", check=False)
  assert proc.returncode != 0 and "fold=3" in proc.stderr
  proc = run_bin("train", f"--records_dir={tmp_path / 'nope'}", f"--model_dir={tmp_path}",
                 check=False)
  assert proc.returncode != 0 and "nope" in proc.stderr
  proc = run_bin("train", f"--records_dir={abcd_records}", f"--model_dir={tmp_path}",
                 "--threshold_rule=sensitivity:90", "--weights=none", check=False)
  assert proc.returncode != 0 and "--threshold_rule='sensitivity:90'" in proc.stderr
  assert "youden, sensitivity:S" in proc.stderr and "Traceback" not in proc.stderr
  proc = run_bin("train", f"--records_dir={abcd_records}", f"--model_dir={tmp_path}",
                 "--select_by=last", "--early_stopping_patience=2", "--weights=none", check=False)
  assert proc.returncode != 0 and "--select_by=last" in proc.stderr


@pytest.mark.slow
def test_imagenet_weights_offline_fail_fast_with_the_file_to_place(abcd_records, tmp_path):
  # How fast: one attempt under a socket timeout (test_models); no wall-clock assertion here.
  proc = run_bin("train", f"--records_dir={abcd_records}", f"--model_dir={tmp_path / 'm'}",
                 "--backbone=vgg16", "--weights=imagenet", "--strategy=one_device",
                 check=False, env={"KERAS_HOME": str(tmp_path / "keras_home")})
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in proc.stderr
  assert "--weights" in proc.stderr


@pytest.mark.slow
def test_corrupt_training_shard_is_named(abcd_records, tmp_path):
  records = tmp_path / "records"
  shutil.copytree(abcd_records, records)
  for shard in records.glob("train-*.tfrecord"):
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
  proc = run_bin("train", f"--records_dir={records}", f"--model_dir={tmp_path / 'm'}",
                 "--backbone=simple_cnn", "--weights=none", "--epochs=1", "--noprogress",
                 "--strategy=one_device", check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "corrupt TFRecord shard" in proc.stderr and "train-000" in proc.stderr


def test_xla_auto_resolves_by_device():
  cpu, gpus = ["/job:localhost/replica:0/task:0/device:CPU:0"], ["/device:GPU:0", "/device:GPU:1"]
  assert xla.resolve_xla("auto", cpu) == "augment"
  assert xla.resolve_xla("auto", cpu, augmenting=False) == "off"
  assert xla.resolve_xla("auto", gpus) == "on"
  assert xla.resolve_xla("auto", ["/job:worker/replica:0/task:1/device:TPU:0"]) == "on"
  for setting in ("on", "off", "augment"):
    assert xla.resolve_xla(setting, gpus) == setting
  with pytest.raises(ValueError, match="xla='yes'"):
    xla.resolve_xla("yes", cpu)
  with pytest.raises(ValueError, match="xla='yes'"):
    train.TrainConfig(records_dir="r", model_dir="m", xla="yes").validate()


@pytest.mark.slow
def test_every_xla_mode_takes_the_same_augmented_step():
  """off, augment and on compute the same step: the warp is bit-identical with and without XLA,
  so only float rounding in the convolutions may differ."""
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
  labels = np.array([0, 1] * 4, np.int32)
  init = models.build_model(models.ModelConfig(backbone="simple_cnn", weights="none",
                                               image_size=32, dropout=0.0)).get_weights()
  strategy = distribute.make_strategy("one_device")
  results = {}
  for mode in ("off", "augment", "on"):
    with strategy.scope():
      model = models.build_model(models.ModelConfig(backbone="simple_cnn", weights="none",
                                                    image_size=32, dropout=0.0))
      model.set_weights(init)
      # SGD, not Adam: Adam's m / sqrt(v) turns a rounding-level gradient difference near zero
      # into a full step (a shuffled suite run saw 0.15 % on the second loss with Adam).
      opt = keras.optimizers.SGD(0.1)
      opt.build(model.trainable_variables)
    config = train.TrainConfig(records_dir="", model_dir="", xla=mode, batch_size=8)
    steps = steps_lib.CompiledSteps(strategy, model, opt, config, [1.0, 1.0])
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
    iterator = iter(strategy.experimental_distribute_dataset(ds))
    results[mode] = [float(steps.train_step(iterator, tf.constant(s, tf.int64))[0])
                     for s in range(2)]
  assert results["off"][0] != results["off"][1]  # the weights moved between the steps
  np.testing.assert_allclose(results["augment"], results["off"], rtol=1e-4)
  np.testing.assert_allclose(results["on"], results["off"], rtol=1e-3)


def _tiny(records, model_dir, **kwargs):
  kwargs.setdefault("augment", augment.AugmentConfig(rotation_range=30.0))
  return train.TrainConfig(
      records_dir=str(records), model_dir=str(model_dir), progress=False,
      model=models.ModelConfig(backbone="simple_cnn", weights="none", image_size=32),
      batch_size=16, steps_per_epoch=3, learning_rate=2e-3, **kwargs)


@pytest.mark.slow
def test_deterministic_runs_end_with_bit_identical_weights(abcd_records, tmp_path):
  """Two mirrored (2 logical CPUs) runs, augmentation on, with the DEFAULT settings (issue 21:
  deterministic=auto is on without a GPU): same seed, same digest; another seed is the control
  that the digest can differ."""
  digests = [train.train(_tiny(abcd_records, tmp_path / f"m{i}", epochs=2, strategy="mirrored",
                               seed=seed))["final_weights_sha256"]
             for i, seed in enumerate((7, 7, 8))]
  assert digests[0] == digests[1] and digests[2] != digests[0]
  saved = json.loads((tmp_path / "m0" / "config.json").read_text())
  assert saved["deterministic"] is True and saved["seed"] == 7
  assert saved["train"]["deterministic"] is True
  from tensorflow.python.framework import config as tf_config  # pylint: disable=g-import-not-at-top
  assert not tf_config.is_op_determinism_enabled()  # switched back off for the rest of the process


@pytest.fixture(scope="module")
def fold_records(tmp_path_factory):
  """Synthetic ABCD, 32 px, 3 folds over train+valid, no valid split of its own."""
  return synthetic_records(tmp_path_factory.mktemp("folds"), 160, (64, 48), (80, 60), 32,
                           folds=3, min_train_shards=3, split=(0.8, 0.0, 0.2))


@pytest.mark.slow
@pytest.mark.parametrize("balance,fold", [("oversample", 1), ("class_weights", 0)])
def test_training_on_a_fold_with_balancing(fold_records, tmp_path, balance, fold):
  info = pipeline.load_info(fold_records)
  result = train.train(_tiny(fold_records, tmp_path / "m", epochs=2, fold=fold, balance=balance,
                             strategy="one_device"))
  saved = json.loads((tmp_path / "m" / "config.json").read_text())
  assert saved["fold"] == fold and saved["records_fingerprint"] == info.fingerprint
  assert saved["train"]["balance"] == balance
  assert result["selected_by"] == "val_loss" and result["best_epoch"] in (1, 2)
  assert rundir.read_threshold(tmp_path / "m").source.endswith(f"(fold {fold})")
  assert result["best_metrics"]["val_auc"] is not None
  with open(tmp_path / "m" / "history.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 and all(np.isfinite(float(r["val_loss"])) for r in rows)


@pytest.mark.slow
def test_without_a_validation_split_the_epoch_is_chosen_by_training_loss(fold_records, tmp_path,
                                                                          caplog):
  with caplog.at_level("WARNING"):
    result = train.train(_tiny(fold_records, tmp_path / "m", epochs=2, strategy="one_device"))
  assert "no validation split" in caplog.text
  summary = json.loads((tmp_path / "m" / "summary.json").read_text())
  assert summary["selected_by"] == result["selected_by"] == "loss"
  assert "training loss" in summary["selection_rule"]
  assert summary["best_metrics"]["val_auc"] is None
  stored = rundir.read_threshold(tmp_path / "m")  # nothing but test data could choose one
  assert stored.value == 0.5 and stored.split == "none" and "no validation split" in stored.source


@pytest.mark.slow
def test_a_run_dir_resumes_only_the_same_run(abcd_records, tmp_path):
  out = tmp_path / "m"
  train.train(_tiny(abcd_records, out, epochs=2, strategy="one_device"))
  for change, name in ((dict(model=models.ModelConfig(backbone="vgg16", weights="none",
                                                      image_size=32)), "backbone"),
                       (dict(model=models.ModelConfig(backbone="simple_cnn", weights="none",
                                                      image_size=40)), "image_size")):
    config = dataclasses.replace(_tiny(abcd_records, out, epochs=3, strategy="one_device"),
                                 **change)
    with pytest.raises(rundir.RunDirError, match=f"{name}=.*--overwrite"):
      train.train(config)
  with pytest.raises(rundir.RunDirError, match=r"already holds 2 trained epochs, more than "
                                               r"--epochs=1"):
    train.train(_tiny(abcd_records, out, epochs=1, strategy="one_device"))
  done = train.train(_tiny(abcd_records, out, epochs=2, strategy="one_device"))
  assert done["epochs_this_run"] == 0 and done["best_epoch"] in (1, 2)
  # 0-byte model (a kill mid-save before saves were atomic): loading says so.
  (out / "model.keras").write_bytes(b"")
  with pytest.raises(ValueError, match="empty"):
    models.load_model_dir(out)
  over = dataclasses.replace(_tiny(abcd_records, out, epochs=1, strategy="one_device"),
                             model=models.ModelConfig(backbone="simple_cnn", weights="none",
                                                      image_size=40), overwrite=True)
  assert train.train(over)["epochs_this_run"] == 1
  assert json.loads((out / "config.json").read_text())["image_size"] == 40


@pytest.mark.slow
def test_user_errors_are_one_line(abcd_records, tmp_path):
  garbage = tmp_path / "garbage.weights.h5"
  garbage.write_bytes(b"not an h5 file" * 10)
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  records = tmp_path / "records"
  shutil.copytree(abcd_records, records)
  next(records.glob("train-*.tfrecord")).unlink()
  errors = [(dict(model=models.ModelConfig(backbone="simple_cnn", weights=str(garbage),
                                            image_size=32), model_dir=str(tmp_path / "w")),
             train.TrainError, "garbage.weights.h5"),
            (dict(model_dir=str(blocker / "sub")), rundir.RunDirError, "cannot be written"),
            (dict(records_dir=str(records)), FileNotFoundError, "missing")]
  for change, error, expect in errors:
    config = dataclasses.replace(_tiny(abcd_records, tmp_path / "m", epochs=1,
                                       strategy="one_device"), **change)
    with pytest.raises(error, match=expect):
      train.train(config)
  # The command turns each into one line and exit 2 (one case run: each costs a TF start-up).
  proc = run_bin("train", f"--records_dir={records}", f"--model_dir={tmp_path / 's'}",
                 "--backbone=simple_cnn", "--weights=none", "--strategy=one_device", check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("train: ") and "missing" in proc.stderr


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_keeps_the_finished_epochs(abcd_records, tmp_path):
  err = tmp_path / "stderr.txt"
  with open(err, "w") as f:
    # SIGINT back to its default: a shell without job control starts background jobs with SIGINT
    # ignored, and Python then never raises KeyboardInterrupt.
    proc = start_bin("train", f"--records_dir={abcd_records}", f"--model_dir={tmp_path / 'm'}",
                     "--backbone=simple_cnn", "--epochs=500", "--noprogress", stdout=f, stderr=f,
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while "epoch 2/500" not in err.read_text() and time.monotonic() < deadline:
      assert proc.poll() is None, err.read_text()[-3000:]
      time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
  text = err.read_text()
  assert "Traceback" not in text and text.strip().splitlines()[-1].startswith("train: interrupted")
  assert (tmp_path / "m" / "model.keras").stat().st_size > 0  # epochs already done are kept
