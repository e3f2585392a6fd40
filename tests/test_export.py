"""Export: the SavedModel serves what bin/predict predicts, TFLite agrees with Keras, bad outputs
fail in one line."""

from __future__ import annotations

import json
import os
import pathlib

import keras
import numpy as np
import pytest
from sklearn import metrics as skm
import tensorflow as tf

from conftest import convert_folder, run_bin, write_dark_bright
from skinrecords import export
from skinrecords import models
from skinrecords import pipeline
from skinrecords import predict
from skinrecords import preprocess
from skinrecords import rundir

SIZE = 32


def train_tiny(records: pathlib.Path, model_dir: pathlib.Path, size: int, steps: int,
               max_logit: float = 3.0, seed: int = 0) -> pathlib.Path:
  """simple_cnn trained `steps` Adam steps on the records' train split, saved as training does.

  The head is then scaled so the largest training |logit| is `max_logit`: a trained model answers
  P = 0.00000 or 1.00000, where a wrong channel order or float16 weights changed no probability by
  1e-5 (tried); at |logit| <= 3 they move probabilities by 1e-3 and more. AUC is unchanged.
  """
  keras.utils.set_random_seed(seed)
  info = pipeline.load_info(records)
  model = models.build_model(models.ModelConfig(backbone="simple_cnn", image_size=size,
                                                weights="none"), info.class_counts("train"))
  model.compile(keras.optimizers.Adam(3e-3),
                keras.losses.BinaryCrossentropy(from_logits=True))
  # A fixed batch order (training=False, repeated, batches shuffled with the seed): the training
  # input's non-deterministic interleave made the blob model miss its bound 1 run in 3.
  ds = pipeline.make_dataset(info, "train", batch_size=16, training=False).repeat().shuffle(
      64, seed=seed).map(lambda x, y: (tf.cast(x, tf.float32), tf.cast(y, tf.float32)[:, None]))
  model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
  images = np.concatenate([x.numpy() for x, _ in pipeline.make_dataset(info, "train",
                                                                       training=False)])
  scale = max_logit / float(np.abs(model.predict(images.astype(np.float32), verbose=0)).max())
  kernel, bias = model.get_layer("logits").get_weights()
  model.get_layer("logits").set_weights([kernel * scale, bias * scale])
  model_dir.mkdir(parents=True)
  rundir.save_model(model, model_dir)
  rundir.write_config(model_dir, {
      "classes": list(info.classes), "image_size": size, "records_dir": str(records),
      "fold": None, "preprocessing": info.preprocessing,
      "model": models.ModelConfig(backbone="simple_cnn", image_size=size).to_dict(), "train": {}})
  return model_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Dark (class a) / bright (class b) 36x30 PNGs -> 32 px JPEG records; a model trained on them."""
  root = tmp_path_factory.mktemp("export")
  write_dark_bright(root / "in", {"a": (40, 60), "b": (40, 170)}, 60, lambda i: (36, 30, 3))
  convert_folder(root / "in", root / "records", SIZE, split=(0.6, 0.2, 0.2), min_train_shards=2)
  train_tiny(root / "records", root / "model", SIZE, steps=30)
  return root


@pytest.fixture(scope="module")
def exported(data):
  out = data / "exported"
  proc = run_bin("export", f"--model_dir={data / 'model'}", f"--output_dir={out}")
  return out, proc


def _test_split(records):
  """(images uint8 [N, S, S, 3], labels) of the test split."""
  batches = list(pipeline.make_dataset(records, "test", training=False))
  return (np.concatenate([b[0].numpy() for b in batches]),
          np.concatenate([b[1].numpy() for b in batches]))


@pytest.mark.slow
def test_saved_model_on_encoded_bytes_matches_predict(data, exported):
  out, _ = exported
  paths = sorted(str(p) for p in (data / "in").rglob("*.png"))[::7]
  rows, rejected = predict.predict_files(data / "model", paths)
  assert not rejected and len(rows) == len(paths)
  # The client's side: the converter's preprocessing, as recorded next to the model.
  settings = json.loads((out / export.PREPROCESSING_FILE).read_text())
  pconfig = preprocess.PreprocessConfig.from_dict(settings["client_side"])
  encoded = [preprocess.preprocess_file(p, pconfig) for p in paths]
  serve = tf.saved_model.load(str(out / "1")).signatures["serving_default"]
  result = serve(image_bytes=tf.constant(encoded))
  probs = result["probabilities"].numpy()
  expected = np.array([r["probability"] for r in rows])
  # A model that answers 0 or 1 would prove nothing (see train_tiny).
  assert 0.1 < expected.std() and 0.02 < expected.min() and expected.max() < 0.98, expected
  np.testing.assert_allclose(probs, expected, atol=1e-5)
  labels = [x.decode() for x in result["predicted_label"].numpy()]
  assert labels == [r["predicted"] for r in rows]
  # The uint8 signature on the decoded pixels gives the same answer.
  pixels = np.stack([pipeline.decode_image(e, SIZE, SIZE).numpy() for e in encoded])
  u8 = tf.saved_model.load(str(out / "1")).signatures["serving_uint8"]
  np.testing.assert_allclose(u8(images=tf.constant(pixels))["probabilities"].numpy(), expected,
                             atol=1e-5)


@pytest.mark.slow
def test_tflite_float_matches_and_quantised_keeps_auc(data, exported):
  out, proc = exported
  assert "float32 TFLite: largest probability difference" in proc.stdout, proc.stdout
  assert "MB)" in proc.stdout and "preprocessing.json" in proc.stdout
  images, labels = _test_split(data / "records")
  model, _ = models.load_model_dir(data / "model")
  keras_probs = tf.sigmoid(model(images.astype(np.float32))[:, 0]).numpy()
  float_probs = export.tflite_probabilities(
      (out / export.TFLITE_FILES["float32"]).read_bytes(), images)
  np.testing.assert_allclose(float_probs, keras_probs, atol=1e-4)
  quant_probs = export.tflite_probabilities(
      (out / export.TFLITE_FILES["dynamic_range"]).read_bytes(), images)
  keras_auc = skm.roc_auc_score(labels, keras_probs)
  assert keras_auc > 0.9, keras_auc  # the model separates the classes, so AUC can move
  assert abs(skm.roc_auc_score(labels, quant_probs) - keras_auc) <= 0.01
  assert (out / export.TFLITE_FILES["dynamic_range"]).stat().st_size < 0.5 * (
      out / export.TFLITE_FILES["float32"]).stat().st_size  # int8 weights, ~4x smaller
  assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.slow
def test_hair_removal_is_announced_and_recorded(data, tmp_path):
  pre = dict(pipeline.load_info(data / "records").preprocessing, remove_hair=True)
  cfg = json.loads((data / "model" / rundir.CONFIG_FILE).read_text())
  model_dir = tmp_path / "hairy"
  model_dir.mkdir()
  os.symlink(data / "model" / rundir.MODEL_FILE, model_dir / rundir.MODEL_FILE)
  rundir.write_config(model_dir, dict(cfg, preprocessing=pre))
  proc = run_bin("export", f"--model_dir={model_dir}", f"--output_dir={tmp_path / 'e'}",
                 "--format=saved_model")
  assert "remove_hair" in proc.stderr and "WARNING" in proc.stderr, proc.stderr
  assert "WARNING" in proc.stdout and "remove_hair" in proc.stdout, proc.stdout
  settings = json.loads((tmp_path / "e" / export.PREPROCESSING_FILE).read_text())
  assert settings["client_side"] == pre and settings["opencv_only_steps_used"] == ["remove_hair"]
  assert (tmp_path / "e" / "1" / "saved_model.pb").is_file()
  assert not list((tmp_path / "e").glob("*.tflite"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["read_only", "is_a_file", "missing_model", "bad_format"])
def test_bad_inputs_fail_in_one_line(data, tmp_path, case):
  out, model = tmp_path / "out", data / "model"
  if case == "read_only":
    out.mkdir()
    out.chmod(0o500)
    if os.access(out, os.W_OK):
      out = pathlib.Path("/proc/export-test")  # running as root: a folder nobody can create
  elif case == "is_a_file":
    out.write_text("x")
  elif case == "missing_model":
    model = tmp_path / "no_such_model"
  args = [f"--model_dir={model}", f"--output_dir={out}"]
  proc = run_bin("export", *args, *(["--format=onnx"] if case == "bad_format" else []),
                 check=False)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert "Traceback" not in proc.stderr and 1 <= len(lines) <= 2, proc.stderr
  assert {"read_only": "not writable", "is_a_file": "is a file", "missing_model": "not found",
          "bad_format": "onnx"}[case] in proc.stderr, proc.stderr
  assert case == "is_a_file" or not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_float_tflite_beyond_tolerance_fails_and_writes_nothing(data, tmp_path, monkeypatch):
  real = export.tflite_probabilities
  monkeypatch.setattr(export, "tflite_probabilities",
                      lambda model_bytes, images: real(model_bytes, images) + 2e-4)
  out = tmp_path / "e"
  with pytest.raises(export.ExportCheckError, match=r"differs from the Keras model by 2\.0"):
    export.export(export.ExportConfig(model_dir=str(data / "model"), output_dir=str(out)))
  assert out.is_dir() and not list(out.iterdir())
