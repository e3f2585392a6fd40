"""A model trained with patient metadata, on the inference side (issue 24): predict with a metadata
CSV equals feeding core.metadata.encode_rows by hand, the exported SavedModel takes the raw values
and serves what predict predicts, TFLite takes the codes, score_folder takes the CSV, Grad-CAM
explains the image branch."""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import bin_env, run_bin
from tiny_runs import make_records
from skinrecords.core import metadata as md
from skinrecords.core import rundir
from skinrecords.data import preprocess
from skinrecords.evaluation import explain
from skinrecords.evaluation import predict
from skinrecords.input import pipeline
from skinrecords.model import models
from skinrecords.serving import export
from skinrecords.serving import metadata_inputs

SIZE = 32
SPEC = md.MetadataSpec((
    md.Column("age_approx", md.NUMERIC, md.Stats(mean=50.0, std=15.0)),
    md.Column("sex", md.CATEGORICAL, md.Stats(vocabulary=("female", "male"))),
    md.Column("anatom_site_general_challenge", md.CATEGORICAL,
              md.Stats(vocabulary=("head/neck", "lower extremity", "torso"))),
))


def metadata_model(records, seed: int = 0, spec: md.MetadataSpec = SPEC) -> keras.Model:
  """simple_cnn with the metadata branch, random weights; the metadata branch's output scaled up
  so that the metadata moves P by tenths (a branch whose effect is 1e-6 would prove nothing)."""
  keras.utils.set_random_seed(seed)
  model = models.build_model(models.ModelConfig(
      backbone="simple_cnn", image_size=SIZE, weights="none", metadata_features=spec.width,
      metadata_width=8))
  kernel, bias = model.get_layer("metadata_dense1").get_weights()
  model.get_layer("metadata_dense1").set_weights([kernel * 3.0, bias + 0.5])
  return model


def save_run(model, out: pathlib.Path, records: pathlib.Path, spec=SPEC) -> pathlib.Path:
  manifest = json.loads((records / "manifest.json").read_text())
  out.mkdir(parents=True)
  rundir.save_model(model, out)
  rundir.write_config(out, rundir.RunConfig(
      classes=manifest["classes"], image_size=SIZE, records_dir=str(records),
      records_fingerprint=manifest["fingerprint"], preprocessing=manifest["preprocessing"],
      model=models.ModelConfig(backbone="simple_cnn", image_size=SIZE).to_dict(),
      metadata=list(spec.names) if spec else []))
  rundir.write_summary(out, {"epochs_done": 1, "epochs_planned": 1, "fold": None})
  if spec:
    rundir.write_metadata(out, spec)
  return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Records, a metadata run, an image-only run, 8 image files and their metadata CSV (one
  missing age, one unseen site, one image without a row, extra columns)."""
  root = tmp_path_factory.mktemp("meta_serving")
  records = make_records(root, size=SIZE)
  run = save_run(metadata_model(records), root / "meta_run", records)
  plain = models.build_model(models.ModelConfig(backbone="simple_cnn", image_size=SIZE,
                                                weights="none"))
  image_only = save_run(plain, root / "image_run", records, spec=None)
  paths = sorted(str(p) for p in (root / "in").rglob("*.png"))[::8][:8]
  rows = [{"age_approx": 30 + 7 * i, "sex": ("male", "female")[i % 2],
           "anatom_site_general_challenge": ("torso", "head/neck", "lower extremity")[i % 3]}
          for i in range(len(paths))]
  rows[1]["age_approx"] = ""  # missing
  rows[2]["anatom_site_general_challenge"] = "palms/soles"  # never seen in training
  rows[3]["sex"] = "NA"
  with open(root / "meta.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge"])
    for i, (p, r) in enumerate(zip(paths, rows)):
      if i == 4:
        continue  # no row: every value missing
      w.writerow([pathlib.Path(p).stem, f"P{i}", r["sex"], r["age_approx"],
                  r["anatom_site_general_challenge"]])
  rows[4] = {}
  return {"root": root, "records": records, "run": run, "image_only": image_only,
          "paths": paths, "rows": rows, "csv": root / "meta.csv"}


def _pixels(paths, run):
  """The pixels predict feeds for each file (the converter's own preprocessing)."""
  pconfig = preprocess.PreprocessConfig.from_dict(rundir.read_run_config(run).preprocessing)
  encoded = [preprocess.preprocess_file(p, pconfig) for p in paths]
  return np.stack([pipeline.decode_image(e, SIZE, pconfig.image_size).numpy() for e in encoded]
                  ), encoded


def _by_hand(world, run=None):
  """P(class 1) from model.keras fed the images and encode_rows of the raw rows, by hand."""
  model, _ = models.load_model_dir(run or world["run"])
  pixels, _ = _pixels(world["paths"], world["run"])
  meta = np.asarray(md.encode_rows(SPEC, world["rows"]), np.float32)
  logits = model({"image": pixels.astype(np.float32), "metadata": meta}, training=False)
  return tf.sigmoid(logits[:, 0]).numpy()


def test_predict_with_a_metadata_csv_equals_encode_rows_by_hand(world):
  config = predict.PredictConfig(model_dir=str(world["run"]), images=tuple(world["paths"]),
                                 metadata_csv=str(world["csv"]), threshold=0.5)
  rows, rejected, _ = predict.run(config)
  assert not rejected
  got = np.array([r["probability"] for r in rows])
  want = _by_hand(world)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # The metadata matters: the same images with every value missing answer differently.
  model, _ = models.load_model_dir(world["run"])
  pixels, _ = _pixels(world["paths"], world["run"])
  blank = tf.sigmoid(model({"image": pixels.astype(np.float32), "metadata": np.asarray(
      md.encode_rows(SPEC, [{}] * len(pixels)), np.float32)})[:, 0]).numpy()
  assert np.abs(blank - want).max() > 0.01, (blank, want)
  lines = predict.run.last_metadata
  assert "3 of 8 images had missing values" in lines[0], lines  # rows 1, 3 and the no-row 4
  assert "1 had no row in the CSV" in lines[0]
  assert "'palms/soles' (1)" in lines[1]


def test_predict_refuses_a_metadata_model_without_its_csv_or_a_column(world, tmp_path):
  with pytest.raises(ValueError, match=r"trained with patient metadata \(age_approx, sex, "
                     r"anatom_site_general_challenge\): pass metadata_csv"):
    predict.run(predict.PredictConfig(model_dir=str(world["run"]), images=tuple(world["paths"])))
  typo = tmp_path / "typo.csv"
  typo.write_text(world["csv"].read_text().replace("age_approx", "age_aprox"))
  with pytest.raises(ValueError, match=r"no column age_approx \(did you mean age_aprox\?\)"):
    predict.run(predict.PredictConfig(model_dir=str(world["run"]), images=tuple(world["paths"]),
                                      metadata_csv=str(typo)))
  other = tmp_path / "other_names.csv"
  other.write_text("image_name,age_approx,sex,anatom_site_general_challenge\n"
                   "ISIC_9,50,male,torso\n")
  with pytest.raises(ValueError, match=r"has a row for none of the 8 images"):
    predict.run(predict.PredictConfig(model_dir=str(world["run"]), images=tuple(world["paths"]),
                                      metadata_csv=str(other)))


def test_an_ensemble_mixes_members_with_and_without_metadata(world):
  dirs = f"{world['run']},{world['image_only']}"
  rows, _, _ = predict.run(predict.PredictConfig(
      model_dir=dirs, images=tuple(world["paths"]), metadata_csv=str(world["csv"]),
      threshold=0.5))
  plain, _ = models.load_model_dir(world["image_only"])
  pixels, _ = _pixels(world["paths"], world["run"])
  alone = tf.sigmoid(plain(pixels.astype(np.float32))[:, 0]).numpy()
  np.testing.assert_allclose([r["probability"] for r in rows], (_by_hand(world) + alone) / 2,
                             atol=1e-6)
  assert "used by 1 of 2 members" in predict.run.last_metadata[-1]


def test_gradcam_explains_the_image_branch_at_each_images_metadata(world, tmp_path):
  model, _ = models.load_model_dir(world["run"])
  pixels, _ = _pixels(world["paths"], world["run"])
  meta = np.asarray(md.encode_rows(SPEC, world["rows"]), np.float32)
  maps, logits = explain.cam_model(model)(
      {"image": pixels.astype(np.float32), "metadata": meta}, training=False)
  np.testing.assert_allclose(logits.numpy(), model({"image": pixels.astype(np.float32),
                                                    "metadata": meta}).numpy(), atol=1e-6)
  heat = explain.gradcam(model, pixels, metadata=meta)
  assert heat.shape[0] == len(pixels) and heat.max() > 0
  with pytest.raises(ValueError, match="takes patient metadata"):
    explain.gradcam(model, pixels)
  folder = tmp_path / "cams"
  folder.mkdir()
  predict.run(predict.PredictConfig(model_dir=str(world["run"]), images=tuple(world["paths"]),
                                    metadata_csv=str(world["csv"]), explain_dir=str(folder)))
  assert len(list(folder.glob("*.gradcam.png"))) == len(world["paths"])


@pytest.fixture(scope="module")
def exported(world):
  out = world["root"] / "exported"
  report = export.export(export.ExportConfig(model_dir=str(world["run"]), output_dir=str(out),
                                             threshold=0.5))
  return out, report


@pytest.mark.slow
def test_export_serves_raw_metadata_as_predict_and_tflite_takes_codes(world, exported):
  out, report = exported
  assert report.metadata_check and "unseen category" in report.metadata_check
  assert report.max_diff["float32"] <= export.FLOAT_TOLERANCE
  settings = json.loads((out / export.PREPROCESSING_FILE).read_text())
  inputs = settings["metadata"]["inputs"]
  assert [i["input"] for i in inputs] == ["age_approx", "sex", "anatom_site_general_challenge"]
  assert [i["dtype"] for i in inputs] == ["float32", "string", "string"]
  # The served model on the raw files and raw values (NaN, "", "NA", an unseen site, a row
  # absent) answers what predict answers.
  _, encoded = _pixels(world["paths"], world["run"])
  serve = tf.saved_model.load(str(out / "1")).signatures["serving_default"]
  raw = metadata_inputs.raw_inputs(metadata_inputs.layout([SPEC]), world["rows"])
  result = serve(image_bytes=tf.constant(encoded),
                 **{k: tf.constant(v.astype(str) if v.dtype == object else v)
                    for k, v in raw.items()})
  want = _by_hand(world)
  np.testing.assert_allclose(result["probabilities"].numpy(), want, atol=1e-5)
  # TFLite takes the numeric columns raw and the categories as codes into the vocabularies.
  pixels, _ = _pixels(world["paths"], world["run"])
  codes = metadata_inputs.codes_inputs(metadata_inputs.layout([SPEC]), world["rows"])
  assert codes["metadata_codes"][2].tolist() == [1, -1]  # female, palms/soles unseen
  got = export.tflite_probabilities((out / export.TFLITE_FILES["float32"]).read_bytes(), pixels,
                                    metadata=codes)
  np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.slow
def test_score_folder_takes_the_metadata_csv(world, exported, tmp_path):
  out, _ = exported
  folder = tmp_path / "photos"
  folder.mkdir()
  for p in world["paths"]:
    (folder / pathlib.Path(p).name).write_bytes(pathlib.Path(p).read_bytes())
  script = out / export.SMOKE_SCRIPT
  proc = subprocess.run([sys.executable, str(script), str(folder),
                         f"--metadata_csv={world['csv']}"], capture_output=True, text=True,
                        env=bin_env(PYTHONPATH=""), timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  got = {pathlib.Path(r["image"]).name: float(r["probability"])
         for r in csv.DictReader(proc.stdout.splitlines())}
  want = dict(zip([pathlib.Path(p).name for p in world["paths"]], _by_hand(world)))
  assert got.keys() == want.keys()
  np.testing.assert_allclose([got[k] for k in want], list(want.values()), atol=1e-5)
  assert "3 of 8 images had missing values" in proc.stderr
  proc = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True,
                        text=True, env=bin_env(PYTHONPATH=""), timeout=300, check=False)
  assert proc.returncode == 2 and "pass --metadata_csv" in proc.stderr, proc.stderr


# A second metadata run as a CV fold would have it: other statistics, a vocabulary without
# head/neck (its fold's training part never had one), so one raw value encodes differently.
SPEC2 = md.MetadataSpec((
    md.Column("age_approx", md.NUMERIC, md.Stats(mean=40.0, std=10.0)),
    md.Column("sex", md.CATEGORICAL, md.Stats(vocabulary=("female", "male"))),
    md.Column("anatom_site_general_challenge", md.CATEGORICAL,
              md.Stats(vocabulary=("lower extremity", "torso"))),
))


@pytest.mark.slow
def test_an_ensemble_of_members_with_other_specs_and_none_exports_as_one_mean_model(world):
  second = save_run(metadata_model(world["records"], seed=1, spec=SPEC2),
                    world["root"] / "meta_run2", world["records"], spec=SPEC2)
  dirs = f"{world['run']},{second},{world['image_only']}"
  out = world["root"] / "ens"
  report = export.export(export.ExportConfig(model_dir=dirs, output_dir=str(out),
                                             threshold=0.5))
  assert report.metadata_check and report.max_diff["float32"] <= export.FLOAT_TOLERANCE
  pixels, encoded = _pixels(world["paths"], world["run"])
  plain, _ = models.load_model_dir(world["image_only"])
  model2, _ = models.load_model_dir(second)
  alone = tf.sigmoid(plain(pixels.astype(np.float32))[:, 0]).numpy()
  other = tf.sigmoid(model2({"image": pixels.astype(np.float32), "metadata": np.asarray(
      md.encode_rows(SPEC2, world["rows"]), np.float32)})[:, 0]).numpy()
  want = (_by_hand(world) + other + alone) / 3
  rows, _, _ = predict.run(predict.PredictConfig(
      model_dir=dirs, images=tuple(world["paths"]), metadata_csv=str(world["csv"]),
      threshold=0.5))
  np.testing.assert_allclose([r["probability"] for r in rows], want, atol=1e-6)
  serve = tf.saved_model.load(str(out / "1")).signatures["serving_default"]
  columns = metadata_inputs.layout([SPEC, SPEC2, None])
  raw = metadata_inputs.raw_inputs(columns, world["rows"])
  result = serve(image_bytes=tf.constant(encoded),
                 **{k: tf.constant(v.astype(str) if v.dtype == object else v)
                    for k, v in raw.items()})
  np.testing.assert_allclose(result["probabilities"].numpy(), want, atol=1e-5)
  # TFLite: one code per category over both vocabularies; each member maps it to its own slot.
  got = export.tflite_probabilities((out / export.TFLITE_FILES["float32"]).read_bytes(), pixels,
                                    metadata=metadata_inputs.codes_inputs(columns, world["rows"]))
  np.testing.assert_allclose(got, want, atol=1e-4)
