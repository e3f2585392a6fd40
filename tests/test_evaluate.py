"""Evaluation and prediction: labels stay with their images, sklearn metrics, collapse, TTA, skew.

Private helpers (_write_outputs, _dihedral, _preprocess, _decode) are tested directly where a whole
model run would only add compile time.
"""
# pylint: disable=protected-access

from __future__ import annotations

import csv
import json
import pathlib
import shutil

import cv2
import keras
import numpy as np
import pytest
from sklearn import metrics as skm
import tensorflow as tf

from conftest import convert_folder, run_bin, write_dark_bright
from skinrecords.core import rundir
from skinrecords.data import preprocess
from skinrecords.evaluation import evaluate
from skinrecords.evaluation import metrics
from skinrecords.evaluation import predict
from skinrecords.input import pipeline
from skinrecords.model import inference
from skinrecords.model import models
from skinrecords.training import train

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """45 dark (class a) and 30 bright (class b) non-square PNGs -> 32 px JPEG records."""
  root = tmp_path_factory.mktemp("eval")
  # Non-square sources: crop + INTER_AREA resize both ways.
  write_dark_bright(root / "in", {"a": (45, 50), "b": (30, 200)}, 40,
                    lambda i: (40, 48, 3) if i % 2 else (52, 40, 3))
  convert_folder(root / "in", root / "records", SIZE, split=(0.6, 0.2, 0.2), min_train_shards=2)
  return root


def _save(model, root: pathlib.Path, name: str) -> pathlib.Path:
  """A model directory as training writes it: model.keras + config.json."""
  records = root / "records"
  manifest = json.loads((records / "manifest.json").read_text())
  out = root / name
  out.mkdir()
  model.save(out / rundir.MODEL_FILE)
  rundir.write_config(out, rundir.RunConfig(
      classes=manifest["classes"], image_size=SIZE, records_dir=str(records), fold=None,
      preprocessing=manifest["preprocessing"],
      model=models.ModelConfig(backbone="simple_cnn", image_size=SIZE).to_dict()))
  return out


def _cnn():
  return models.build_model(models.ModelConfig(backbone="simple_cnn", image_size=SIZE,
                                               weights="none"))


def _layer(model, name):
  """A layer of the model or of its nested simple_cnn backbone."""
  if name in [layer.name for layer in model.layers]:
    return model.get_layer(name)
  return model.get_layer("simple_cnn").get_layer(name)


@pytest.fixture(scope="module")
def perfect_dir(data):
  """Weights built by hand: logit = 30 * (max-pooled brightness - 0.55), so bright = class b.

  Each conv passes the mean colour (block 1) or channel 0 (blocks 2-4) through its centre tap with
  zero bias; ReLU and max pooling keep it. Batch norm, where the backbone has it, keeps its
  identity initialisation (mean 0, variance 1).
  """
  model = _cnn()
  for i in range(1, 5):
    weights = [np.zeros_like(w) for w in _layer(model, f"block{i}_conv").get_weights()]
    weights[0][1, 1, :, 0] = 1 / 3 if i == 1 else 0
    weights[0][1, 1, 0, 0] = 1 / 3 if i == 1 else 1
    _layer(model, f"block{i}_conv").set_weights(weights)
  head = np.zeros((128, 1), np.float32)
  head[0, 0] = 30.0
  _layer(model, "logits").set_weights([head, np.array([-30 * 0.55], np.float32)])
  return _save(model, data, "perfect")


@pytest.fixture(scope="module")
def constant_dir(data):
  model = _cnn()
  _layer(model, "logits").set_weights([np.zeros((128, 1), np.float32),
                                       np.array([50.0], np.float32)])
  return _save(model, data, "constant")


@pytest.fixture(scope="module")
def random_dir(data):
  """Random conv weights (sensitive to every pixel); the head is rescaled so the logits spread
  over ~N(0, 2) on the training images instead of sitting near 0."""
  keras.utils.set_random_seed(3)
  model = _cnn()
  features = keras.Model(model.input, model.get_layer("pool").output)
  images = np.concatenate([b[0].numpy() for b in pipeline.make_dataset(
      data / "records", "train", training=False)])
  kernel, _ = model.get_layer("logits").get_weights()
  z = features(images.astype(np.float32)).numpy() @ kernel[:, 0]
  scale = 2.0 / z.std()
  bias = np.array([-np.median(z) * scale], np.float32)
  _layer(model, "logits").set_weights([kernel * scale, bias])
  return _save(model, data, "random")


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _records(records_dir, split):
  ds = pipeline.make_dataset(records_dir, split, training=False, with_names=True)
  return {n.decode(): int(t) for b in ds for n, t in zip(b[2].numpy(), b[1].numpy())}


# --------------------------------------------------------------------------------- pure metrics


def test_youden_threshold_hand_made():
  # Negatives 0.1 0.2 0.3 0.45, positives 0.4 0.6 0.7 0.8 0.9. With "p >= t": any t in (0.45, 0.6]
  # gives TPR 4/5, FPR 0, J 0.8; t in (0.4, 0.45] J 0.8 - 0.25; t in (0.3, 0.4] TPR 1, FPR 1/4,
  # J 0.75; t in (0.6, 0.7] J 0.6. The maximum is the interval (0.45, 0.6]: its midpoint 0.525.
  probs = [0.1, 0.2, 0.3, 0.45, 0.4, 0.6, 0.7, 0.8, 0.9]
  labels = [0, 0, 0, 0, 1, 1, 1, 1, 1]
  t = metrics.youden_threshold(probs, labels)
  assert t == pytest.approx(0.525)
  pred = np.array(probs) >= t
  assert pred[4:].mean() - pred[:4].mean() == pytest.approx(0.8)
  # Perfect separation: halfway between the highest negative and the lowest positive.
  assert metrics.youden_threshold([0.2, 0.3, 0.7, 0.9], [0, 0, 1, 1]) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="both classes"):
    metrics.youden_threshold([0.2, 0.3], [1, 1])
  with pytest.raises(ValueError, match="chance"):
    metrics.youden_threshold([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1])  # inverted scores


def test_compute_metrics_equal_sklearn_and_collapse():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 200)
  probs = np.clip(0.3 * labels + rng.uniform(0, 0.7, 200), 0, 1)
  m = metrics.compute_metrics(probs, labels, ["benign", "malignant"], 0.4)
  pred = (probs >= 0.4).astype(int)
  assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probs))
  assert m["pr_auc"] == pytest.approx(skm.average_precision_score(labels, probs))
  assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
  assert m["confusion_matrix"] == skm.confusion_matrix(labels, pred).tolist()
  assert m["classification_report"]["malignant"]["recall"] == pytest.approx(
      skm.recall_score(labels, pred))
  assert not m["collapsed"] and m["warning"] is None
  # 3 classes: one-vs-rest macro AUC as sklearn computes it.
  y3 = rng.integers(0, 3, 300)
  logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[y3]
  p3 = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  m3 = metrics.compute_metrics(p3, y3, ["x", "y", "z"], None)
  assert m3["roc_auc"] == pytest.approx(skm.roc_auc_score(y3, p3, multi_class="ovr"))
  assert m3["pr_auc"] == pytest.approx(skm.average_precision_score(np.eye(3)[y3], p3))
  assert m3["accuracy"] == pytest.approx(np.mean(p3.argmax(1) == y3)) and not m3["collapsed"]
  # Collapse: 199 of 200 predicted positive fires, 197 of 200 does not.
  for n_neg, collapsed in ((1, True), (3, False)):
    p = np.full(200, 0.9)
    p[:n_neg] = 0.1
    m = metrics.compute_metrics(p, labels, ["benign", "malignant"], 0.5)
    assert m["collapsed"] is collapsed
    assert (m["warning"] is not None) is collapsed
  assert "'malignant'" in metrics.compute_metrics(np.full(200, 0.9), labels, ["benign",
                                                   "malignant"], 0.5)["warning"]
  with pytest.raises(ValueError, match="NaN"):
    metrics.compute_metrics(np.full(200, np.nan), labels, ["benign", "malignant"], 0.5)


def test_write_outputs_three_classes(tmp_path):
  rng = np.random.default_rng(2)
  y = rng.integers(0, 3, 40)
  p = rng.dirichlet(np.ones(3), 40)
  m = metrics.compute_metrics(p, y, ["mel", "nv", "bkl"], None)
  m.update(split="test", fold=None)
  evaluate._write_outputs(tmp_path, m, p, y, [f"img{i}" for i in range(40)])
  rows = _read_csv(tmp_path / "predictions.csv")
  assert [r["label"] for r in rows] == [["mel", "nv", "bkl"][i] for i in y]
  assert [r["predicted"] for r in rows] == [["mel", "nv", "bkl"][i] for i in p.argmax(1)]
  np.testing.assert_allclose([float(r["p_nv"]) for r in rows], p[:, 1], rtol=1e-6)
  for name in ("roc.png", "pr.png", "confusion_matrix.png"):
    assert cv2.imread(str(tmp_path / name)) is not None
  report = (tmp_path / "report.txt").read_text()
  assert "one-vs-rest" in report and f"nv {m['roc_auc_per_class']['nv']:.4f}" in report


def test_dihedral_order_matches_numpy():
  x = np.random.default_rng(4).integers(0, 255, (2, 5, 5, 3)).astype(np.float32)
  expected = [x, np.flip(x, 2), np.flip(x, 1), np.rot90(x, 1, (1, 2)), np.rot90(x, 2, (1, 2)),
              np.rot90(x, 3, (1, 2)), x.transpose(0, 2, 1, 3),
              np.rot90(x, 2, (1, 2)).transpose(0, 2, 1, 3)]
  got = [inference.dihedral(tf.constant(x), k).numpy() for k in range(8)]
  for k in range(8):
    np.testing.assert_array_equal(got[k], expected[k], err_msg=inference.DIHEDRAL[k])
  assert len({g.tobytes() for g in got}) == 8


# ---------------------------------------------------------------------------------- with models


def test_tta8_is_the_mean_over_the_eight_transforms(data, random_dir):
  model, _ = models.load_model_dir(random_dir)
  images = np.concatenate([b[0].numpy() for b in pipeline.make_dataset(
      data / "records", "test", training=False)])
  got, _, _ = inference.predict_dataset(model, [(images, np.zeros(len(images)))], tta=8)
  x = images.astype(np.float32)
  views = [x, np.flip(x, 2), np.flip(x, 1), np.rot90(x, 1, (1, 2)), np.rot90(x, 2, (1, 2)),
           np.rot90(x, 3, (1, 2)), x.transpose(0, 2, 1, 3),
           np.rot90(x, 2, (1, 2)).transpose(0, 2, 1, 3)]
  each = np.stack([1 / (1 + np.exp(-model(np.ascontiguousarray(v)).numpy()[:, 0]))
                   for v in views])
  assert np.ptp(each, axis=0).max() > 0.05  # the transforms really change this model's output
  np.testing.assert_allclose(got, each.mean(0), atol=1e-5)


@pytest.mark.slow
def test_evaluate_labels_line_up_and_perfect_model_scores_one(data, perfect_dir, capsys):
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(perfect_dir), threshold="youden",
                                            batch_size=8))
  out = perfect_dir / "eval_test"
  rows = _read_csv(out / "predictions.csv")
  truth = _records(data / "records", "test")
  assert len(rows) == len(truth) == m["n"]
  assert {r["image_name"]: r["label"] for r in rows} == {n: "ab"[t] for n, t in truth.items()}
  assert all(r["image_name"][0] == r["label"] == r["predicted"] for r in rows)  # a000 is class a
  probs = np.array([float(r["probability"]) for r in rows])
  labels = np.array([r["label"] == "b" for r in rows], int)
  assert m["roc_auc"] == skm.roc_auc_score(labels, probs) == 1.0
  assert m["pr_auc"] == pytest.approx(skm.average_precision_score(labels, probs))
  assert skm.roc_auc_score(np.random.default_rng(0).permutation(labels), probs) < 0.9
  assert m["accuracy"] == 1.0 and not m["collapsed"] and "WARNING" not in capsys.readouterr().err
  assert 0 < m["threshold"] < 1 and "valid" in m["threshold_source"]
  assert probs[labels == 0].max() < m["threshold"] < probs[labels == 1].min()  # well separated
  saved = json.loads((out / "metrics.json").read_text())
  n_b = sum(truth.values())
  assert saved["roc_auc"] == 1.0 and saved["confusion_matrix"] == [[len(truth) - n_b, 0], [0, n_b]]
  report = (out / "report.txt").read_text()
  assert "ROC AUC: 1.0000" in report and "precision" in report
  for name in ("roc.png", "pr.png", "confusion_matrix.png"):
    assert cv2.imread(str(out / name)).shape[0] > 300


@pytest.mark.slow
def test_constant_model_warns_collapse_and_corrupt_shard_is_named(data, constant_dir, tmp_path,
                                                                  capsys):
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(constant_dir)))
  assert m["collapsed"] and m["predicted_counts"] == {"a": 0, "b": m["n"]}
  err = capsys.readouterr().err
  assert "WARNING" in err and "collapsed" in err and "'b'" in err
  assert "WARNING" in (constant_dir / "eval_test" / "report.txt").read_text()
  # A corrupt shard is named, not an anonymous DataLossError.
  bad = tmp_path / "records"
  shutil.copytree(data / "records", bad)
  shard = sorted(bad.glob("test-*.tfrecord"))[0]
  raw = bytearray(shard.read_bytes())
  raw[len(raw) // 2] ^= 0x55
  shard.write_bytes(bytes(raw))
  with pytest.raises(pipeline.CorruptShardError, match=shard.name):
    evaluate.evaluate(evaluate.EvalConfig(model_dir=str(constant_dir), records_dir=str(bad),
                                          output_dir=str(tmp_path / "out")))


def test_load_model_dir_names_missing_files(tmp_path, constant_dir):
  with pytest.raises(FileNotFoundError, match="not found"):
    models.load_model_dir(tmp_path / "nope")
  (tmp_path / "m").mkdir()
  shutil.copy(constant_dir / "config.json", tmp_path / "m")
  with pytest.raises(FileNotFoundError, match="model.keras"):
    models.load_model_dir(tmp_path / "m")
  with pytest.raises(ValueError, match="youden"):
    evaluate.EvalConfig(model_dir="m", threshold="1.5").validate()
  with pytest.raises(ValueError, match="tta=9"):
    evaluate.EvalConfig(model_dir="m", tta=9).validate()


@pytest.mark.slow
def test_predict_matches_evaluate_and_reports_bad_files(data, random_dir):
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(random_dir), batch_size=8))
  evaluated = {r["image_name"]: float(r["probability"])
               for r in _read_csv(random_dir / "eval_test" / "predictions.csv")}
  assert np.std(list(evaluated.values())) > 0.1 and m["n"] == len(evaluated)
  paths = [str(data / "in" / name[0] / f"{name}.png") for name in sorted(evaluated)]
  bad = data / "not_an_image.jpg"
  bad.write_text("hello, I am text")
  rows, rejected = predict.predict_files(random_dir, paths[:5] + [str(bad)] + paths[5:],
                                         batch_size=4)
  assert rejected == [{"image": str(bad), "reason": rejected[0]["reason"]}]
  assert "not an image" in rejected[0]["reason"]
  assert [r["image"] for r in rows] == paths
  got = {pathlib.Path(r["image"]).stem: r["probability"] for r in rows}
  np.testing.assert_allclose([got[n] for n in sorted(got)], [evaluated[n] for n in sorted(got)],
                             atol=1e-5)
  assert all(r["predicted"] == "ab"[r["probability"] >= 0.5] for r in rows)
  assert predict.list_images(data / "in") == sorted(str(p) for p in (data / "in").rglob("*.png"))


def test_predict_pixels_equal_the_pipeline(data):
  """Train/serve skew check on pixels: predict's path == the records read by pipeline, also when
  the model's size differs from the stored size (pipeline resizes on read)."""
  manifest = json.loads((data / "records" / "manifest.json").read_text())
  config = preprocess.PreprocessConfig.from_dict(manifest["preprocessing"])
  for size in (SIZE, 24):
    ds = pipeline.make_dataset(data / "records", "valid", training=False, with_names=True,
                               image_size=size)
    for images, _, names in ds:
      for image, name in zip(images.numpy(), names.numpy()):
        name = name.decode()
        encoded = predict._preprocess(str(data / "in" / name[0] / f"{name}.png"), config)
        np.testing.assert_array_equal(predict._decode(encoded, size, SIZE), image)


@pytest.mark.slow
def test_bins(data, perfect_dir, tmp_path):
  proc = run_bin("evaluate", f"--model_dir={perfect_dir}", "--tta=2", "--threshold=0.5",
                 f"--output_dir={tmp_path / 'ev'}")
  assert "ROC AUC: 1.0000" in proc.stdout and "precision" in proc.stdout
  assert "threshold: P(b) >= 0.5" in proc.stdout and str(tmp_path / "ev") in proc.stdout
  for name in ("metrics.json", "report.txt", "predictions.csv", "roc.png", "pr.png",
               "confusion_matrix.png"):
    assert (tmp_path / "ev" / name).stat().st_size > 0
  assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["tta"] == 2

  folder = tmp_path / "imgs"
  shutil.copytree(data / "in" / "b", folder)
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
  proc = run_bin("predict", f"--model_dir={perfect_dir}", f"--input_dir={folder}",
                 f"--output_csv={tmp_path / 'p.csv'}", f"--explain_dir={tmp_path / 'cam'}",
                 str(data / "in" / "a" / "a000.png"))
  rows = _read_csv(tmp_path / "p.csv")
  overlays = sorted(p.name for p in (tmp_path / "cam").iterdir())
  assert overlays == sorted(f"{pathlib.Path(r['image']).stem}.gradcam.png" for r in rows)
  assert cv2.imread(str(tmp_path / "cam" / overlays[0])).shape == (SIZE, SIZE, 3)
  assert len(rows) == 31 and rows[0]["image"].endswith("a000.png") and rows[0]["predicted"] == "a"
  assert all(r["predicted"] == "b" for r in rows[1:]) and "broken.jpg" in proc.stderr
  assert "a000.png" in proc.stdout

  proc = run_bin("predict", f"--model_dir={perfect_dir}", check=False)
  assert proc.returncode != 0 and "no images" in proc.stderr
  proc = run_bin("evaluate", f"--model_dir={perfect_dir}", "--threshold=high", check=False)
  assert proc.returncode != 0 and "threshold='high'" in proc.stderr and "youden" in proc.stderr


# ------------------------------------------------------------------------- leakage guards, CIs


def _copy_records(data, dest, edit=None):
  shutil.copytree(data / "records", dest)
  if edit:
    m = json.loads((dest / "manifest.json").read_text())
    edit(m)
    (dest / "manifest.json").write_text(json.dumps(m))
  return dest


@pytest.mark.slow
def test_youden_threshold_is_chosen_on_valid_not_test(data, perfect_dir, tmp_path):
  model, _ = models.load_model_dir(perfect_dir)

  def youden(split):
    ds = pipeline.make_dataset(data / "records", split, batch_size=8, training=False)
    probs, labels, _ = inference.predict_dataset(model, ds)
    return metrics.youden_threshold(probs, labels)

  valid_t, test_t = youden("valid"), youden("test")
  assert abs(valid_t - test_t) > 1e-6  # the data makes the two choices differ
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(perfect_dir), threshold="youden",
                                            output_dir=str(tmp_path / "o"), bootstrap=0))
  assert m["threshold"] == pytest.approx(valid_t, abs=1e-9)
  assert "valid" in m["threshold_source"] and "optimistic" not in m["threshold_source"]


@pytest.mark.slow
def test_folds_and_records_other_than_the_training_ones_are_refused(data, random_dir, tmp_path):
  # Trained without folds: any fold's "valid" was training data.
  with pytest.raises(ValueError, match="trained with no fold"):
    evaluate.evaluate(evaluate.EvalConfig(model_dir=str(random_dir), split="valid", fold=1,
                                          output_dir=str(tmp_path / "a")))
  other = _copy_records(data, tmp_path / "other")
  with pytest.raises(ValueError, match="allow_other_records"):
    evaluate.evaluate(evaluate.EvalConfig(model_dir=str(random_dir), records_dir=str(other),
                                          split="valid", output_dir=str(tmp_path / "b")))
  assert not (tmp_path / "b").exists()  # refused before anything was written
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(random_dir), records_dir=str(other),
                                            split="valid", allow_other_records=True,
                                            output_dir=str(tmp_path / "c"), bootstrap=0))
  assert not m["training_records"] and "optimistic" not in m
  assert "NOT the records" in (tmp_path / "c" / "report.txt").read_text()
  # The test split of other records is allowed, with a warning: nothing here can tell whether their
  # test images were in this model's training split.
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(random_dir), records_dir=str(other),
                                            split="test", output_dir=str(tmp_path / "t"),
                                            bootstrap=0))
  assert any("are not the training records of" in w for w in m["warnings"]), m["warnings"]
  assert "are not the training records of" in (tmp_path / "t" / "report.txt").read_text()
  no_valid = _copy_records(data, tmp_path / "no_valid", lambda m: m["splits"].pop("valid"))
  with pytest.raises(ValueError, match="needs a validation split"):
    evaluate.evaluate(evaluate.EvalConfig(model_dir=str(random_dir), records_dir=str(no_valid),
                                          threshold="youden", output_dir=str(tmp_path / "d")))


@pytest.mark.slow
def test_moved_training_records_are_recognised_by_fingerprint(data, random_dir, tmp_path):
  moved = _copy_records(data, tmp_path / "moved")
  model_dir = tmp_path / "model"
  shutil.copytree(random_dir, model_dir, ignore=shutil.ignore_patterns("eval_*"))
  cfg = json.loads((model_dir / "config.json").read_text())
  cfg.update(records_dir=str(tmp_path / "gone"),
             records_fingerprint=json.loads((moved / "manifest.json").read_text())["fingerprint"])
  (model_dir / "config.json").write_text(json.dumps(cfg))
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(model_dir), records_dir=str(moved),
                                            split="valid", bootstrap=0))
  assert m["training_records"] and "optimistic" in m["optimistic"]
  assert "OPTIMISTIC" in (model_dir / "eval_valid" / "report.txt").read_text()


@pytest.mark.slow
def test_preprocessing_mismatch_warns_and_cis_are_written(data, random_dir, tmp_path, capsys):
  def hair(m):
    m["preprocessing"]["remove_hair"] = not m["preprocessing"]["remove_hair"]
  other = _copy_records(data, tmp_path / "hair", hair)
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(random_dir), records_dir=str(other),
                                            output_dir=str(tmp_path / "o"), bootstrap=200))
  assert len([w for w in m["warnings"] if "remove_hair" in w]) == 1, m["warnings"]
  assert any("are not the training records" in w for w in m["warnings"])  # another fingerprint
  assert "remove_hair" in capsys.readouterr().err
  saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
  lo, hi = saved["roc_auc_ci"]
  assert lo <= saved["roc_auc"] <= hi and saved["ci_resamples"] == 200
  assert saved["ci_unit"] in ("image", "patient") and len(saved["sensitivity_ci"]) == 2


@pytest.mark.slow
def test_unwritable_output_fails_before_predicting(data, random_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  for bad in (blocker, blocker / "sub"):
    with pytest.raises(ValueError, match="a_file"):
      evaluate.evaluate(evaluate.EvalConfig(model_dir=str(random_dir), output_dir=str(bad)))
  proc = run_bin("evaluate", f"--model_dir={random_dir}", f"--output_dir={blocker}", check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "a_file" in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2


@pytest.mark.slow
def test_galleries_hold_the_most_confident_errors_and_hits(data, random_dir, perfect_dir,
                                                           tmp_path):
  for model_dir in (random_dir, perfect_dir):
    out = tmp_path / model_dir.name
    m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(model_dir), output_dir=str(out),
                                              bootstrap=0))
    rows = _read_csv(out / "predictions.csv")
    p = {r["image_name"]: float(r["probability"]) for r in rows}
    y = {r["image_name"]: r["label"] == "b" for r in rows}
    t = m["threshold"]
    fn = sorted((n for n in p if y[n] and p[n] < t), key=lambda n: p[n])[:4]
    fp = sorted((n for n in p if not y[n] and p[n] >= t), key=lambda n: -p[n])[:4]
    tp = sorted((n for n in p if y[n] and p[n] >= t), key=lambda n: -p[n])[:8]
    expected = {name: kept for name, kept in (("errors.png", fn + fp), ("examples.png", tp))
                if kept}
    assert m["galleries"] == expected
    for name in expected:
      assert cv2.imread(str(out / name)).shape[0] > 100 and name in m["files"]
  assert "errors.png" not in m["galleries"] and m["galleries"]["examples.png"]  # perfect model


# ------------------------------------------------------------------------------ cross-validation


def _fold_names(records_dir: pathlib.Path, fold: int) -> dict[str, int]:
  """image_name -> label of fold `fold`, read straight from manifest.json's train shards (not
  through DatasetInfo.select, which is what is under test)."""
  m = json.loads((records_dir / "manifest.json").read_text())
  shards = [s for s in m["splits"]["train"]["shards"] if s.get("fold") == fold]
  assert shards, f"no shard of fold {fold}"
  out = {}
  for shard in shards:
    for raw in tf.data.TFRecordDataset(str(records_dir / shard["file"])):
      feature = tf.train.Example.FromString(raw.numpy()).features.feature
      name = feature["image_name"].bytes_list.value[0].decode()
      out[name] = feature["target"].int64_list.value[0]
    assert sum(1 for _ in tf.data.TFRecordDataset(str(records_dir / shard["file"]))) == \
        shard["num_examples"]
  return out


@pytest.mark.slow
def test_evaluate_with_a_fold_scores_exactly_that_fold_with_its_own_threshold(tmp_path):
  """Records with --folds=3 -> train with fold=1 -> bin/evaluate --split=valid --fold=1: the
  metrics cover fold 1's images and no other, and Youden's threshold is chosen on fold 1."""
  write_dark_bright(tmp_path / "in", {"a": (30, 90), "b": (30, 160)}, 60, lambda i: (40, 40, 3))
  records = convert_folder(tmp_path / "in", tmp_path / "records", SIZE, folds=3,
                           min_train_shards=3, split=(0.8, 0.0, 0.2))
  # In-process training (bin/train's own tests cover the command; a second TensorFlow start-up
  # here would double this test's time).
  train.train(train.TrainConfig(
      records_dir=str(records), model_dir=str(tmp_path / "m"), progress=False, fold=1,
      model=models.ModelConfig(backbone="simple_cnn", weights="none", image_size=SIZE),
      batch_size=8, epochs=1, steps_per_epoch=2, strategy="one_device"))
  out = tmp_path / "eval"
  proc = run_bin("evaluate", f"--model_dir={tmp_path / 'm'}", "--split=valid", "--fold=1",
                 "--threshold=youden", "--bootstrap=0", f"--output_dir={out}")
  m = json.loads((out / "metrics.json").read_text())
  rows = _read_csv(out / "predictions.csv")
  expected = _fold_names(records, 1)
  assert m["fold"] == 1 and m["split"] == "valid" and m["n"] == len(expected) == len(rows)
  assert {r["image_name"]: r["label"] for r in rows} == {
      n: ("a", "b")[t] for n, t in expected.items()}
  assert not set(expected) & (set(_fold_names(records, 0)) | set(_fold_names(records, 2)))
  probs = np.array([float(r["probability"]) for r in rows])
  labels = np.array([r["label"] == "b" for r in rows], int)
  assert m["threshold"] == pytest.approx(metrics.youden_threshold(probs, labels), abs=1e-6)
  assert m["threshold_source"].startswith(f"Youden's J on {len(rows)} valid fold 1 predictions")
  assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probs), abs=1e-6)
  report = (out / "report.txt").read_text()  # the report's numbers are metrics.json's
  assert f"valid split (fold 1) of {records}: {m['n']} images" in report
  assert f"ROC AUC: {m['roc_auc']:.4f}" in report
  assert f"accuracy {'':>9} {'':>9} {m['accuracy']:>9.4f} {m['n']:>9d}" in report
  assert f"threshold: P(b) >= {m['threshold']:.6g} (Youden's J on {m['n']} valid fold 1" in report
  # The threshold of another fold differs, so taking it from the wrong fold would show above.
  model, _ = models.load_model_dir(tmp_path / "m")
  other, other_labels, _ = inference.predict_dataset(model, pipeline.make_dataset(
      records, "valid", fold=0, training=False))
  assert abs(metrics.youden_threshold(other, other_labels) - m["threshold"]) > 1e-6
  assert f">= {m['threshold']:.6g}" in proc.stdout


@pytest.mark.slow  # trains a run through bin/train (~30 s)
def test_the_stored_validation_threshold_is_applied_and_named(data, random_dir, tmp_path, capsys):
  """Issue 21: evaluate and predict apply the threshold training chose on validation
  (threshold.json) unless told otherwise, and say where it came from; without one, 0.5 loudly."""
  from skinrecords.core import fileio  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  shutil.copytree(random_dir, run)

  def ev(name, **kw):
    return evaluate.evaluate(evaluate.EvalConfig(model_dir=str(run), bootstrap=0,
                                                 output_dir=str(tmp_path / name), **kw))
  m = ev("none")
  assert m["threshold"] == 0.5 and f"no {rundir.THRESHOLD_FILE}" in m["threshold_source"]
  assert "WARNING: decision threshold fixed 0.5 by default" in capsys.readouterr().err
  tiny_probs = _member(run, data)
  probs = tiny_probs[0]
  t = float(np.quantile(probs, 0.3))  # far from 0.5: changes decisions
  rundir.write_threshold(run, rundir.StoredThreshold(
      t, "youden", "Youden's J on 15 validation predictions", "valid", 15, None,
      fileio.sha256_file(run / rundir.MODEL_FILE)))
  m = ev("stored")
  assert m["threshold"] == pytest.approx(t)
  assert "Youden's J on 15 validation" in m["threshold_source"]
  report = (tmp_path / "stored" / "report.txt").read_text()
  assert rundir.THRESHOLD_FILE in report and "optimistic" not in m["threshold_source"].lower()
  rows = _read_csv(tmp_path / "stored" / "predictions.csv")
  assert [r["predicted"] == "b" for r in rows] == [float(r["probability"]) >= t for r in rows]
  assert sum(r["predicted"] == "b" for r in rows) != sum(p >= 0.5 for p in tiny_probs[0])
  assert ev("given", threshold="0.5")["threshold_source"] == "fixed 0.5 (--threshold)"
  # predict applies the same one, and says so.
  rows, _, _ = predict.run(predict.PredictConfig(model_dir=str(run),
                                                 records_dir=str(data / "records")))
  assert [r["predicted"] == "b" for r in rows] == [r["probability"] >= t for r in rows]
  err = run_bin("predict", f"--model_dir={run}", f"--records_dir={data / 'records'}").stderr
  assert f"decision threshold {t:.4g}: Youden's J on 15" in err, err
  proc = run_bin("predict", f"--model_dir={run}", f"--records_dir={data / 'records'}",
                 "--threshold=high", check=False)
  assert proc.returncode != 0 and "--threshold=high: expected 'stored' or a float" in proc.stderr
  # A retrained model.keras does not inherit it.
  rundir.write_threshold(run, rundir.StoredThreshold(t, "youden", "x", "valid", 15, None, "0" * 64))
  assert ev("stale")["threshold"] == 0.5


def _member(run, data):
  model, _ = models.load_model_dir(run)
  ds = pipeline.make_dataset(data / "records", "test", batch_size=8, training=False)
  return inference.predict_dataset(model, ds)


def test_operating_points_come_from_valid_and_train_is_flagged_optimistic(data, random_dir,
                                                                         tmp_path):
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(random_dir), bootstrap=0,
                                            threshold="0.5", output_dir=str(tmp_path / "t")))
  assert "chosen on" in m["operating_points_source"] and "validation" in \
      m["operating_points_source"]
  assert all(p["constraint"].endswith("on valid") for p in m["operating_points"])
  # The thresholds are valid's, the rates are test's: recomputed here from the test predictions.
  probs, labels, _ = _member(random_dir, data)
  for p in m["operating_points"]:
    t = np.inf if p["threshold"] is None else p["threshold"]
    assert p["sensitivity"] == pytest.approx((probs[labels == 1] >= t).mean())
  assert "operating points: thresholds chosen on" in (tmp_path / "t" / "report.txt").read_text()
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(random_dir), bootstrap=0, split="train",
                                            threshold="0.5", output_dir=str(tmp_path / "tr")))
  assert "trained on these images" in m["optimistic"]
  assert "OPTIMISTIC" in (tmp_path / "tr" / "report.txt").read_text()
