"""Training: 2 replicas match 1, XLA step, real learning on the synthetic ABCD data, kill-and-resume."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_bin, start_bin, synthetic_records
from skinrecords import augment
from skinrecords import distribute
from skinrecords import models
from skinrecords import pipeline
from skinrecords import train

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
  step_fns = train.Steps(strategy, model, opt, config, [1.0, 1.0])
  ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(len(images)).repeat()
  iterator = iter(strategy.experimental_distribute_dataset(ds))
  losses = [float(step_fns.train_step(iterator, tf.constant(s, tf.int64))[0]) for s in range(steps)]
  return [w.numpy() for w in model.weights], losses


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
  result = run_bin("train", *flags)
  assert "resuming" in result.stderr
  with open(model_dir / "history.csv") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
  assert (model_dir / "model.keras").exists()


def test_bad_flags_are_usage_errors(abcd_records, tmp_path):
  proc = run_bin("train", f"--records_dir={abcd_records}", f"--model_dir={tmp_path}",
                 "--fold=3", "--weights=none", check=False)
  assert proc.returncode != 0 and "fold=3" in proc.stderr
  proc = run_bin("train", f"--records_dir={tmp_path / 'nope'}", f"--model_dir={tmp_path}",
                 check=False)
  assert proc.returncode != 0 and "nope" in proc.stderr


def test_imagenet_weights_offline_fail_fast_with_the_file_to_place(abcd_records, tmp_path):
  start = time.time()
  proc = run_bin("train", f"--records_dir={abcd_records}", f"--model_dir={tmp_path / 'm'}",
                 "--backbone=vgg16", "--weights=imagenet", "--strategy=one_device",
                 check=False, env={"KERAS_HOME": str(tmp_path / "keras_home")})
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in proc.stderr
  assert "--weights" in proc.stderr
  assert time.time() - start < 120


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
  assert distribute.resolve_xla("auto", cpu) == "augment"
  assert distribute.resolve_xla("auto", cpu, augmenting=False) == "off"
  assert distribute.resolve_xla("auto", gpus) == "on"
  assert distribute.resolve_xla("auto", ["/job:worker/replica:0/task:1/device:TPU:0"]) == "on"
  for setting in ("on", "off", "augment"):
    assert distribute.resolve_xla(setting, gpus) == setting
  with pytest.raises(ValueError, match="xla='yes'"):
    distribute.resolve_xla("yes", cpu)
  with pytest.raises(ValueError, match="xla='yes'"):
    train.TrainConfig(records_dir="r", model_dir="m", xla="yes").validate()


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
      opt = keras.optimizers.Adam(1e-2)
      opt.build(model.trainable_variables)
    config = train.TrainConfig(records_dir="", model_dir="", xla=mode, batch_size=8)
    steps = train.Steps(strategy, model, opt, config, [1.0, 1.0])
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
    iterator = iter(strategy.experimental_distribute_dataset(ds))
    results[mode] = [float(steps.train_step(iterator, tf.constant(s, tf.int64))[0])
                     for s in range(2)]
  assert results["off"][0] != results["off"][1]  # the weights moved between the steps
  np.testing.assert_allclose(results["augment"], results["off"], rtol=1e-4)
  np.testing.assert_allclose(results["on"], results["off"], rtol=1e-3)
