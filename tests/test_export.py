"""Export: the SavedModel serves what bin/predict predicts, TFLite agrees with Keras, bad outputs
fail in one line."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from sklearn import metrics as skm
import tensorflow as tf

from conftest import bin_env, convert_folder, run_bin, write_dark_bright
from benchmarks import serving_files
from skinrecords.core import fileio
from skinrecords.core import rundir
from skinrecords.data import preprocess
from skinrecords.evaluation import predict
from skinrecords.input import pipeline
from skinrecords.model import models
from skinrecords.serving import export

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
  ds = pipeline.make_dataset(info, "train", batch_size=16, training=False,
                            image_size=size).repeat().shuffle(
      64, seed=seed).map(lambda x, y: (tf.cast(x, tf.float32), tf.cast(y, tf.float32)[:, None]))
  model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
  images = np.concatenate([x.numpy() for x, _ in pipeline.make_dataset(
      info, "train", training=False, image_size=size)])
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
                      lambda model_bytes, images, **kw: real(model_bytes, images, **kw) + 2e-4)
  out = tmp_path / "e"
  with pytest.raises(export.ExportCheckError, match=r"differs from the Keras model by 2\.0"):
    export.export(export.ExportConfig(model_dir=str(data / "model"), output_dir=str(out)))
  assert out.is_dir() and not list(out.iterdir())


# ------------------------------------------------------------------------------- raw files

def _raw_files(folder: pathlib.Path, pconfig: preprocess.PreprocessConfig) -> dict:
  """Photos as a clinic sends them (synthetic lesions): name -> EXIF orientation they carry."""
  sf = serving_files
  rgb = sf.photo(120, 90)
  files = {"640x480_like.jpg": (sf.jpeg(sf.photo(96, 72, 1)), 1),
           "portrait.jpg": (sf.jpeg(sf.photo(60, 90, 2)), 1),
           "reduced_3000x2000_like.jpg": (sf.jpeg(sf.photo(300, 200, 3)), 1),
           "small_upscaled.jpg": (sf.jpeg(sf.photo(24, 20, 4)), 1),
           "exif6.jpg": (sf.with_exif_jpeg(sf.jpeg(rgb), 6, little=False), 6),
           "exif3.jpg": (sf.with_exif_jpeg(sf.jpeg(rgb), 3), 3),
           "exif8.png": (sf.with_exif_png(sf.png(rgb), 8), 8),
           "photo.png": (sf.png(sf.photo(80, 50, 5)), 1),
           "grey.jpg": (sf.jpeg(rgb[..., 1].copy()), 1),
           "cmyk.jpg": (sf.cmyk_jpeg(rgb), 1)}
  files["client_preprocessed.jpg"] = (preprocess.preprocess_bytes(files["portrait.jpg"][0],
                                                                  pconfig), 1)
  folder.mkdir(parents=True, exist_ok=True)
  for name, (data, _) in files.items():
    (folder / name).write_bytes(data)
  return {str(folder / name): orientation for name, (_, orientation) in files.items()}


# CMYK: OpenCV and TensorFlow round libjpeg's CMYK differently (<= 2 levels); every other raw
# file gives predict's pixels exactly (test_serving), so its probability agrees to rounding.
# A client-preprocessed file is served as it is, where predict preprocesses it once more (one
# more JPEG generation): it is held to 1e-5 against predict on the photo it was made from.
TOLERANCE = {"cmyk.jpg": 0.01, "client_preprocessed.jpg": 0.01}


def _served(saved_model: pathlib.Path, paths: list[str]) -> dict:
  serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
  return {k: v.numpy() for k, v in serve(image_bytes=tf.constant(
      [pathlib.Path(p).read_bytes() for p in paths])).items()}


@pytest.fixture(scope="module")
def raw(data):
  pconfig = preprocess.PreprocessConfig.from_dict(pipeline.load_info(data / "records").preprocessing)
  return data / "raw", _raw_files(data / "raw", pconfig)


@pytest.mark.slow  # exports a trained run (~30 s)
def test_raw_photos_are_served_as_predict_scores_them(data, exported, raw):
  folder, orientations = raw
  out, proc = exported
  rows, rejected, _ = predict.run(predict.PredictConfig(model_dir=str(data / "model"),
                                                        input_dir=str(folder)))
  assert not rejected and [r["image"] for r in rows] == sorted(orientations)
  served = _served(out / "1", [r["image"] for r in rows])
  for r, p, label, o in zip(rows, served["probabilities"], served["predicted_label"],
                            served["exif_orientation"]):
    name = os.path.basename(r["image"])
    assert abs(p - r["probability"]) <= TOLERANCE.get(name, 1e-5), (name, p, r["probability"])
    assert label.decode() == r["predicted"] or TOLERANCE.get(name), name
    assert o == orientations[r["image"]], name
  by_name = {os.path.basename(r["image"]): r["probability"] for r in rows}
  client = served["probabilities"][[os.path.basename(r["image"]) for r in rows].index(
      "client_preprocessed.jpg")]
  assert abs(client - by_name["portrait.jpg"]) <= 1e-5, (client, by_name["portrait.jpg"])
  probs = np.array([r["probability"] for r in rows])
  # Not saturated (0 or 1 would hide any difference) and not one answer for every photo.
  assert 0.02 < probs.min() and probs.max() < 0.98 and probs.std() > 0.005, probs
  assert "XNNPACK" not in proc.stderr + proc.stdout, proc.stderr


def _read_csv(text: str) -> dict:
  return {row["image"]: row for row in csv.DictReader(text.splitlines())}


@pytest.mark.slow  # subprocesses: several exports / predict / a fresh TensorFlow
def test_score_folder_needs_only_tensorflow_and_prints_predicts_csv(data, exported, raw, tmp_path):
  folder, orientations = raw
  out, _ = exported
  script = out / export.SMOKE_SCRIPT
  assert script.is_file()
  shutil.copy(data / "raw" / "grey.jpg", folder / "ignored.txt")  # not an image extension
  # A fresh interpreter in which importing skinrecords fails: the script must not need it.
  argv = [str(script), str(folder)]
  block = (f"import sys, runpy; sys.modules['skinrecords'] = None; sys.argv = {argv!r}; "
           f"runpy.run_path({str(script)!r}, run_name='__main__')")
  env = {k: v for k, v in bin_env().items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, env=env,
                        cwd=tmp_path, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  csv_path = tmp_path / "predict.csv"
  run_bin("predict", f"--model_dir={data / 'model'}", f"--input_dir={folder}",
          f"--output_csv={csv_path}")
  ours, theirs = _read_csv(proc.stdout), _read_csv(csv_path.read_text())
  assert list(ours) == list(theirs) == sorted(orientations)
  assert proc.stdout.splitlines()[0] == csv_path.read_text().splitlines()[0]
  for image, row in ours.items():
    tol = TOLERANCE.get(os.path.basename(image), 1e-5)
    assert abs(float(row["probability"]) - float(theirs[image]["probability"])) <= tol, image
    assert row["predicted"] == theirs[image]["predicted"] or tol > 1e-5, image
  empty = tmp_path / "empty"
  empty.mkdir()
  for args, says in (([str(tmp_path / "missing")], "not a folder"), ([str(empty)], "no images")):
    bad = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                         env=env, timeout=120, check=False)
    assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------- ensembles

@pytest.fixture(scope="module")
def cv_folder(data):
  """A finished two-fold CV folder whose members differ in size (32 and 48 px), one calibrated."""
  cv = data / "cv"
  cv.mkdir()
  shutil.copytree(data / "model", cv / "fold_0")
  train_tiny(data / "records", cv / "fold_1", 48, steps=30, seed=1, max_logit=4.0)
  rundir.write_calibration(cv / "fold_1", {
      "method": "temperature", "temperature": 1.7,
      "model_sha256": fileio.sha256_file(cv / "fold_1" / rundir.MODEL_FILE)})
  for fold in ("fold_0", "fold_1"):
    (cv / fold / "summary.json").write_text(json.dumps({"epochs_done": 1, "epochs_planned": 1}))
  (cv / rundir.CV_METRICS_FILE).write_text("{}")
  return cv


@pytest.mark.slow  # subprocesses: several exports / predict / a fresh TensorFlow
def test_cv_folder_exports_as_one_mean_model_equal_to_predict(data, cv_folder, raw, tmp_path):
  folder, _ = raw
  out = tmp_path / "ensemble"
  proc = run_bin("export", f"--model_dir={cv_folder}", f"--output_dir={out}",
                 "--format=saved_model", "--member_outputs")
  assert "ensemble: mean of 2 runs" in proc.stdout, proc.stdout
  rows, _, _ = predict.run(predict.PredictConfig(model_dir=str(cv_folder), input_dir=str(folder)))
  served = _served(out / "1", [r["image"] for r in rows])
  members = served["member_probabilities"]
  assert members.shape == (len(rows), 2)
  np.testing.assert_allclose(served["probabilities"], members.mean(axis=1), atol=1e-6)
  for r, p in zip(rows, served["probabilities"]):
    assert abs(p - r["probability"]) <= TOLERANCE.get(os.path.basename(r["image"]), 1e-5), r
  # Each member is the run on its own, its temperature applied (fold_1: T = 1.7).
  for k, fold in enumerate(("fold_0", "fold_1")):
    alone, _, _ = predict.run(predict.PredictConfig(model_dir=str(cv_folder / fold),
                                                    input_dir=str(folder)))
    expected = np.array([a["probability"] for a in alone])
    clean = [i for i, a in enumerate(alone) if not TOLERANCE.get(os.path.basename(a["image"]))]
    np.testing.assert_allclose(members[clean, k], expected[clean], atol=1e-5)
  assert np.abs(members[:, 0] - members[:, 1]).max() > 0.01  # two different members
  loaded = tf.saved_model.load(str(out / "1"))
  assert "serving_uint8" not in loaded.signatures  # no single pixel size for 32 and 48 px
  settings = json.loads((out / export.PREPROCESSING_FILE).read_text())
  assert [m["temperature"] for m in settings["model"]["members"]] == [None, 1.7]


@pytest.mark.slow  # trains a CV folder
@pytest.mark.parametrize("case", ["rank", "tflite_sizes"])
def test_ensembles_that_cannot_be_served_are_refused_in_one_line(cv_folder, tmp_path, case):
  args = ["--ensemble=rank", "--format=saved_model"] if case == "rank" else []
  proc = run_bin("export", f"--model_dir={cv_folder}", f"--output_dir={tmp_path / 'e'}", *args,
                 check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert {"rank": "--ensemble=mean", "tflite_sizes": "--format=saved_model"}[case] in proc.stderr
  assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())


@pytest.mark.slow  # subprocesses: several exports / predict / a fresh TensorFlow
def test_two_models_never_mix_in_one_folder(data, cv_folder, tmp_path):
  out = tmp_path / "e"
  run_bin("export", f"--model_dir={data / 'model'}", f"--output_dir={out}",
          "--format=saved_model")
  before = sorted(p.name for p in out.iterdir())
  proc = run_bin("export", f"--model_dir={cv_folder / 'fold_1'}", f"--output_dir={out}",
                 "--format=tflite", check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert "another model's export" in proc.stderr and "--overwrite" in proc.stderr, proc.stderr
  assert sorted(p.name for p in out.iterdir()) == before  # nothing changed
  # The same model again (a new Serving version of it) is no mix.
  run_bin("export", f"--model_dir={data / 'model'}", f"--output_dir={out}",
          "--format=saved_model", "--version=2")
  run_bin("export", f"--model_dir={cv_folder / 'fold_1'}", f"--output_dir={out}",
          "--format=tflite", "--overwrite")
  assert not (out / "1").exists() and not (out / "2").exists()
  settings = json.loads((out / export.PREPROCESSING_FILE).read_text())
  assert settings["model"]["members"][0]["model_dir"].endswith("fold_1")
  assert set(settings["files"]) == set(export.TFLITE_FILES.values())
  # A file set that names no model (an older export, or a file replaced by hand) is refused too.
  (out / export.TFLITE_FILES["float32"]).write_bytes(b"other")
  proc = run_bin("export", f"--model_dir={cv_folder / 'fold_1'}", f"--output_dir={out}",
                 "--format=tflite", check=False)
  assert proc.returncode == 2 and "names no model" in proc.stderr, proc.stderr


def test_in_graph_temperature_is_calibrations_to_float32_rounding():
  """float32 (TFLite has no float64 Log1p), saturated probabilities included: the clip at
  1 - 1e-7 moves to the logit."""
  from skinrecords.evaluation import calibration  # pylint: disable=g-import-not-at-top
  z = np.concatenate([np.linspace(-30, 30, 2001), [16.0, 16.1, 16.2, 17.0]]).astype(np.float32)
  p = tf.sigmoid(z).numpy()
  k = tf.nn.softmax(np.random.default_rng(0).normal(0, 8, (500, 4)).astype(np.float32)).numpy()
  for t in (0.3, 1.7, 10.0):
    np.testing.assert_allclose(export._calibrated(tf.constant(p), t).numpy(),  # pylint: disable=protected-access
                               calibration.apply_temperature(p, t), atol=1e-6)
    np.testing.assert_allclose(export._calibrated(tf.constant(k), t).numpy(),  # pylint: disable=protected-access
                               calibration.apply_temperature(k, t), atol=1e-6)
