"""Training with patient metadata (issue 24): the model's metadata branch, train --metadata,
MODEL_DIR/metadata.json with the right statistics (per fold too), resume, evaluate, ensembles of
members with and without metadata, and the command's one-line errors."""

from __future__ import annotations

import json
import random
import re

import keras
import numpy as np
import pytest

from conftest import run_bin
from metadata_records import add_metadata
from skinrecords.core import metadata as md
from skinrecords.core import rundir
from skinrecords.evaluation import evaluate
from skinrecords.model import inference
from skinrecords.model import models
from skinrecords.training import cv
from skinrecords.training import train
from tiny_runs import make_records

KINDS = {"age": md.NUMERIC, "site": md.CATEGORICAL}


def _from_metadata(name, label):
  """The label shows in the metadata only (the images' grey levels are the same for both classes):
  age is 25 years higher for class b, and site says the class 9 times in 10."""
  r = random.Random(name)
  return {"age": None if r.random() < 0.1 else 40 + 25 * label + r.gauss(0, 5),
          "site": ("torso" if label else "head") if r.random() < 0.9 else "palms"}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  root = tmp_path_factory.mktemp("meta")
  out = make_records(root, size=32, folds=2, counts=(60, 60), levels=(120, 120))
  add_metadata(out, KINDS, _from_metadata)
  return out


def _config(records, model_dir, metadata="all", **kwargs):
  kwargs.setdefault("epochs", 3)
  return train.TrainConfig(records_dir=str(records), model_dir=str(model_dir),
                           model=models.ModelConfig(backbone="simple_cnn", image_size=32,
                                                    weights="none"),
                           batch_size=16, learning_rate=3e-3, progress=False, metadata=metadata,
                           **kwargs)


def test_image_only_model_is_unchanged_and_metadata_model_takes_both_inputs(tmp_path):
  config = models.ModelConfig(backbone="simple_cnn", image_size=32, weights="none")
  plain = models.build_model(config)
  assert [layer.name for layer in plain.layers] == ["image", "preprocess", "simple_cnn", "pool",
                                                    "dropout", "logits"]
  assert models.metadata_features(plain) == 0
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    model = models.build_model(config.__class__(**{**config.to_dict(), "metadata_features": 7}))
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert models.metadata_features(model) == 7
  x = {"image": np.zeros((3, 32, 32, 3), np.float32), "metadata": np.ones((3, 7), np.float32)}
  logits = model(x, training=False)
  assert logits.shape == (3, 1) and logits.dtype == "float32"  # float32 head under float16
  assert model.get_layer("image_and_metadata").output.dtype == "float16"
  # The metadata changes the output: the branch is wired to the head.
  other = model({**x, "metadata": -np.ones((3, 7), np.float32)}, training=False)
  assert np.abs(np.asarray(logits) - np.asarray(other)).max() > 1e-4
  with pytest.raises(ValueError, match="metadata_dropout=1.5"):
    models.ModelConfig(metadata_dropout=1.5).validate()


def test_tta_transforms_the_image_and_passes_the_metadata_through():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  keras.utils.set_random_seed(1)
  model = models.build_model(models.ModelConfig(backbone="simple_cnn", image_size=32,
                                                weights="none", metadata_features=3))
  rng = np.random.default_rng(0)
  x = {"image": rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8),
       "metadata": rng.normal(size=(4, 3)).astype(np.float32)}
  got = inference.forward(model, 3)(x).numpy()
  want = np.mean([inference.probabilities(model({"image": inference.dihedral(
      tf.cast(x["image"], tf.float32), k), "metadata": tf.constant(x["metadata"])},
      training=False)).numpy()
                  for k in range(3)], axis=0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # A last partial batch is padded (image and metadata alike) and cut off again.
  probs, _, _ = inference.predict_dataset(model, [(x, np.zeros(4)), (
      {k: v[:1] for k, v in x.items()}, np.zeros(1))], tta=3)
  np.testing.assert_allclose(probs, np.concatenate([want, want[:1]]), rtol=1e-5, atol=1e-6)


def test_a_run_without_its_metadata_json_is_refused_by_name(tmp_path):
  model = models.build_model(models.ModelConfig(backbone="simple_cnn", image_size=32,
                                                weights="none", metadata_features=5))
  with pytest.raises(ValueError, match="takes 5 metadata features but .*metadata.json is missing"):
    inference.check_metadata(model, md.MetadataSpec(), tmp_path)
  spec = md.MetadataSpec((md.Column("age", md.NUMERIC),))
  with pytest.raises(ValueError, match="encodes 2 \\(age\\)"):
    inference.check_metadata(model, spec, tmp_path)
  rundir.write_metadata(tmp_path, spec)
  assert rundir.read_metadata(tmp_path) == spec
  (tmp_path / md.SPEC_FILE).write_text("{not json")
  with pytest.raises(ValueError, match="metadata.json: not valid JSON"):
    rundir.read_metadata(tmp_path)


@pytest.mark.slow
def test_metadata_branch_learns_what_the_image_cannot_show_and_evaluate_resume_ensemble(
    records, tmp_path):
  with_meta = train.train(_config(records, tmp_path / "meta"))
  image_only = train.train(_config(records, tmp_path / "image", metadata=""))
  # The label is a function of the metadata alone: only the model that sees it can rank.
  assert with_meta["best_metrics"]["val_auc"] >= 0.95
  assert image_only["best_metrics"]["val_auc"] <= 0.85
  spec = rundir.read_metadata(tmp_path / "meta")
  cfg = json.loads((tmp_path / "meta" / rundir.CONFIG_FILE).read_text())
  assert spec.names == ("age", "site") and cfg["metadata"] == ["age", "site"]
  assert cfg["model"]["metadata_features"] == spec.width == 2 + 4
  stored = md.MetadataSpec.from_dict(json.loads((records / "manifest.json").read_text())
                                     ["metadata"])
  assert spec.columns[0].stats == stored.columns[0].stats  # the training split's statistics
  assert not (tmp_path / "image" / md.SPEC_FILE).exists()

  # evaluate reads the metadata from the records and says which columns the model used.
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(tmp_path / "meta"), bootstrap=0,
                                            output_dir=str(tmp_path / "eval")))
  assert m["roc_auc"] >= 0.9 and m["metadata"] == {str(tmp_path / "meta"): ["age", "site"]}
  assert "inputs: metadata age, site" in (tmp_path / "eval" / "report.txt").read_text()

  # An ensemble of a member with and one without metadata, each fed what it was trained on.
  both = f"{tmp_path / 'meta'},{tmp_path / 'image'}"
  e = evaluate.evaluate(evaluate.EvalConfig(model_dir=both, bootstrap=0, threshold="0.5",
                                            output_dir=str(tmp_path / "ens"), tta=2,
                                            calibrate="temperature"))
  assert (tmp_path / "meta" / rundir.CALIBRATION_FILE).exists()  # fitted on its valid split
  assert e["members"][0]["roc_auc"] >= 0.9  # with TTA and its own temperature
  report = (tmp_path / "ens" / "report.txt").read_text()
  assert "image only" in report and "metadata age, site" in report

  # Resume: the same columns (named or "all") resume; other columns are refused by name.
  again = train.train(_config(records, tmp_path / "meta", metadata="age,site"))
  assert again["epochs_this_run"] == 0
  for other, was, now in (("age", "age,site", "age"), ("", "age,site", "(none)")):
    with pytest.raises(rundir.RunDirError,
                       match=re.escape(f"metadata columns {was}, this one has {now};")):
      train.train(_config(records, tmp_path / "meta", metadata=other))
  with pytest.raises(rundir.RunDirError, match="metadata columns \\(none\\), this one has age"):
    train.train(_config(records, tmp_path / "image", metadata="age"))


@pytest.mark.slow
def test_each_fold_encodes_with_its_own_training_statistics(records, tmp_path):
  result = cv.run_cv(_config(records, tmp_path / "cv", epochs=1), bootstrap=0)
  assert len(result["folds"]) == 2
  stored = md.MetadataSpec.from_dict(json.loads((records / "manifest.json").read_text())
                                     ["metadata"])
  for k in (0, 1):
    spec = rundir.read_metadata(tmp_path / "cv" / f"fold_{k}")
    assert spec.columns[0].stats == stored.columns[0].fold_stats[k]  # no fold-k image in it
    assert spec.columns[0].stats != stored.columns[0].stats
    assert spec.columns[1].stats == stored.columns[1].fold_stats[k]
  assert (tmp_path / "cv" / rundir.OOF_FILE).exists()
  # A rerun finds both folds finished with the same metadata, and skips them.
  again = cv.run_cv(_config(records, tmp_path / "cv", epochs=1), bootstrap=0)
  assert again["folds"] == result["folds"]


def test_train_command_names_what_the_records_have(records, tmp_path):
  common = ["--records_dir", records, "--backbone=simple_cnn", "--weights=none", "--epochs=1",
            "--model_dir", tmp_path / "run"]
  proc = run_bin("train", *common, "--metadata=age,sexx", check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "--metadata=age,sexx: no column 'sexx'" in proc.stderr and "has age, site" in proc.stderr
  bare = make_records(tmp_path / "bare", size=32)
  proc = run_bin("train", *common[2:], "--records_dir", bare, "--metadata=all", check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "holds no metadata columns; convert with make_records --metadata_columns" in proc.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_published_kaggle_files_train_with_their_int64_codes(tmp_path):
  from test_kaggle import write_kaggle  # pylint: disable=g-import-not-at-top
  from skinrecords.input import metadata_input  # pylint: disable=g-import-not-at-top
  from skinrecords.input import pipeline  # pylint: disable=g-import-not-at-top

  folder = tmp_path / "melanoma-32x32"
  write_kaggle(folder)
  info = pipeline.load_info(folder)
  spec = metadata_input.select(info, "all", 0)
  assert spec.names == ("sex", "age_approx", "anatom_site_general_challenge")
  result = train.train(_config(folder, tmp_path / "run", epochs=1, fold=0))
  assert result["epochs_done"] == 1
  assert rundir.read_metadata(tmp_path / "run") == spec  # fold 0's training files' statistics
  model, _ = models.load_model_dir(tmp_path / "run")
  probs, labels, names = inference.predict_split(
      model, info, "test", image_size=32, batch_size=8,
      metadata=inference.run_metadata(model, tmp_path / "run"))
  assert len(probs) == info.num_examples("test") and (labels == -1).all()
  assert np.isfinite(probs).all()


@pytest.mark.slow
def test_two_replicas_under_xla_with_augmentation_train_the_metadata_model(records, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  assert len(tf.config.list_logical_devices("CPU")) == 2, "conftest sets up 2 logical CPUs"
  # Op determinism off: XLA has no deterministic MaxPool gradient (simple_cnn's), metadata or not.
  result = train.train(_config(records, tmp_path / "m", epochs=2, strategy="mirrored", xla="on",
                               deterministic="off"))
  saved = json.loads((tmp_path / "m" / rundir.CONFIG_FILE).read_text())
  assert saved["replicas"] == 2 and saved["xla"] == "on" and saved["metadata"] == ["age", "site"]
  assert result["best_metrics"]["val_auc"] >= 0.9  # the metadata reached the model on both
