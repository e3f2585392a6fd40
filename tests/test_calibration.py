"""Calibration: ECE, Brier and NLL on hand-made numbers, temperature scaling on synthetic and on a
deliberately over-confident model, stored with the model and applied by evaluate and predict."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from conftest import run_bin
from skinrecords.core import fileio
from skinrecords.core import rundir
from skinrecords.evaluation import calibration
from skinrecords.evaluation import ensemble
from skinrecords.evaluation import evaluate
from skinrecords.evaluation import predict
import tiny_runs


def test_ece_brier_nll_hand_made():
  # Binary P(class 1) 0.9, 0.8, 0.3, 0.6 with labels 1, 0, 0, 1: top-label confidences 0.9, 0.8,
  # 0.7, 0.6, correct T F T T. With 15 bins each lands in its own bin, so
  # ECE = (|1-.9| + |0-.8| + |1-.7| + |1-.6|) / 4 = (0.1 + 0.8 + 0.3 + 0.4) / 4 = 0.4.
  p, y = np.array([0.9, 0.8, 0.3, 0.6]), np.array([1, 0, 0, 1])
  assert calibration.expected_calibration_error(p, y) == pytest.approx(0.4)
  # Multi-class Brier: sum over both classes = 2 * (p - y)^2 per image.
  assert calibration.brier_score(p, y) == pytest.approx(2 * skm.brier_score_loss(y, p))
  assert calibration.nll(p, y) == pytest.approx(skm.log_loss(y, p))
  three = np.array([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
  assert calibration.brier_score(three, [0, 1]) == pytest.approx(
      ((0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2) + (0.2 ** 2 + 0.8 ** 2 + 0.6 ** 2)) / 2)
  # Perfectly calibrated in one bin: 10 images at 0.8 confidence, 8 right.
  assert calibration.expected_calibration_error(
      np.full(10, 0.8), np.r_[np.ones(8), np.zeros(2)].astype(int)) == pytest.approx(0.0)


@pytest.mark.parametrize("k", [2, 4])
def test_temperature_recovers_the_over_confidence_factor(k):
  rng = np.random.default_rng(0)
  n = 4000
  z = rng.normal(0, 1.5, (n, 1 if k == 2 else k))
  if k == 2:
    labels = (rng.random(n) < 1 / (1 + np.exp(-z[:, 0]))).astype(int)
    over = 1 / (1 + np.exp(-4 * z[:, 0]))  # logits 4x too large
  else:
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(k, p=row) for row in p])
    over = np.exp(4 * z) / np.exp(4 * z).sum(axis=1, keepdims=True)
  t = calibration.fit_temperature(over, labels)
  assert t == pytest.approx(4.0, rel=0.15)
  fixed = calibration.apply_temperature(over, t)
  assert calibration.nll(fixed, labels) < calibration.nll(over, labels) - 0.1
  assert calibration.expected_calibration_error(fixed, labels) < \
      calibration.expected_calibration_error(over, labels)
  argmax = (lambda q: q >= 0.5) if k == 2 else (lambda q: q.argmax(axis=1))
  assert (argmax(fixed) == argmax(over)).all()


@pytest.fixture(scope="module")
def over_confident(tmp_path_factory):
  """A random simple_cnn whose logits spread with standard deviation 20 (most probabilities
  within 1e-6 of 0 or 1) on overlapping classes (grey 115 vs 125, noise +-60): 90 % right on
  valid (30 images), where the fitted temperature was 4.3."""
  root = tmp_path_factory.mktemp("cal")
  records = tiny_runs.make_records(root, size=32, counts=(90, 60), levels=(115, 125))
  model = tiny_runs.random_model(records, 32, seed=7, spread=20.0)
  return root, records, tiny_runs.save_run(model, root / "over", records, 32)


def _predicted(path):
  with open(path, newline="") as f:
    return [r["predicted"] for r in csv.DictReader(f)]


@pytest.mark.slow
def test_temperature_fitted_on_valid_is_stored_and_applied(over_confident, tmp_path):
  root, records, run = over_confident
  plain = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(run), bootstrap=0,
                                                output_dir=str(tmp_path / "plain")))
  assert plain["calibration"]["method"] is None and plain["ece"] > 0.02
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(run), calibrate="temperature",
                                            bootstrap=0, output_dir=str(tmp_path / "cal")))
  cal = rundir.read_calibration(run)
  t = cal["temperature"]
  assert cal["model_sha256"] == fileio.sha256_file(run / rundir.MODEL_FILE)
  assert t > 2 and cal["fitted_on"] == {"records_dir": str(records), "split": "valid",
                                        "fold": None, "tta": 0, "n": 30}
  # It lowers the validation NLL (0.53 -> 0.24 when written), measured from the model's outputs.
  pv, yv, _ = tiny_runs.member_probs(run, records, "valid")
  assert calibration.nll(calibration.apply_temperature(pv, t), yv) < 0.6 * calibration.nll(pv, yv)
  assert cal["nll_after"] < cal["nll_before"]
  # On test: the metrics record it, the probabilities change, the predicted classes (0.5) do not.
  assert m["calibration"]["temperatures"] == {str(run): t}
  assert m["uncalibrated"]["nll"] == pytest.approx(plain["nll"])
  assert m["nll"] != pytest.approx(plain["nll"])  # applied (lower or not: the test split is 30)
  assert m["roc_auc"] == pytest.approx(plain["roc_auc"], abs=1e-9)
  assert _predicted(tmp_path / "cal" / "predictions.csv") == _predicted(
      tmp_path / "plain" / "predictions.csv")
  assert (tmp_path / "cal" / "calibration.png").stat().st_size > 1000
  assert "without calibration" in (tmp_path / "cal" / "report.txt").read_text()
  # Stored: a later evaluate and predict apply it; calibrate=none ignores it.
  again = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(run), bootstrap=0,
                                                output_dir=str(tmp_path / "again")))
  assert again["nll"] == pytest.approx(m["nll"])
  off = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(run), bootstrap=0, calibrate="none",
                                              output_dir=str(tmp_path / "off")))
  assert off["nll"] == pytest.approx(plain["nll"])
  pt, _, _ = tiny_runs.member_probs(run, records, "test")
  rows, _, _ = predict.run(predict.PredictConfig(model_dir=str(run), records_dir=str(records)))
  got = np.array([r["probability"] for r in rows])
  # 1e-4: predict batches by 32, this by 64, and float32 logits of ~20 differ in the 6th digit.
  np.testing.assert_allclose(got, calibration.apply_temperature(pt, t), atol=1e-4)
  assert np.abs(got - pt).max() > 0.1
  saved = json.loads((tmp_path / "cal" / "metrics.json").read_text())
  assert saved["ece"] == pytest.approx(m["ece"]) and saved["reliability"]


@pytest.mark.slow
def test_bad_calibration_file_and_unwritable_output(over_confident, tmp_path):
  root, records, run = over_confident
  bad = tiny_runs.save_run(tiny_runs.random_model(records, 32, seed=8), tmp_path / "bad", records,
                           32)
  (bad / rundir.CALIBRATION_FILE).write_text('{"method": "temperature", "temperature": -1}')
  proc = run_bin("evaluate", f"--model_dir={bad}", "--bootstrap=0", check=False)
  assert proc.returncode == 2 and "calibration.json: expected" in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr
  # A temperature fitted for an earlier model.keras (the run was retrained since) is refused.
  (bad / rundir.CALIBRATION_FILE).write_text(json.dumps(
      {"method": "temperature", "temperature": 2.0, "model_sha256": "0" * 64}))
  with pytest.raises(ValueError, match="fitted for an earlier model.keras"):
    evaluate.evaluate(evaluate.EvalConfig(model_dir=str(bad), bootstrap=0,
                                          output_dir=str(tmp_path / "o")))
  assert evaluate.evaluate(evaluate.EvalConfig(model_dir=str(bad), bootstrap=0, calibrate="none",
                                               output_dir=str(tmp_path / "o")))["nll"] > 0
  # An unusable output path is refused before the temperature is fitted (nothing is lost):
  # root ignores permissions, so the "folder" is a file.
  blocker = tmp_path / "file"
  blocker.write_text("")
  proc = run_bin("evaluate", f"--model_dir={run}", "--calibrate=none", "--bootstrap=0",
                 f"--output_dir={blocker / 'out'}", check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_overwrite_removes_a_stored_temperature(tmp_path):
  """train --overwrite starts a new model: the old model's temperature must not outlive it."""
  rundir.write_calibration(tmp_path, {"method": "temperature", "temperature": 2.0})
  assert rundir.read_calibration(tmp_path)["temperature"] == 2.0
  rundir.clear(tmp_path)
  assert rundir.read_calibration(tmp_path) is None


def test_a_temperature_at_the_end_of_its_range_is_not_applied(tmp_path):
  """Perfectly separated validation predictions drive T to the bottom of its range (sharper is
  always better there): no estimate, so the member stays uncalibrated and the file says why."""
  (tmp_path / rundir.MODEL_FILE).write_bytes(b"model")
  member = ensemble.Member(str(tmp_path), None, {})
  labels = np.array([0, 0, 0, 1, 1, 1])
  probs = np.array([0.2, 0.3, 0.4, 0.6, 0.7, 0.8])
  assert calibration.fit_temperature(probs, labels) == pytest.approx(min(calibration.T_RANGE))
  cal = ensemble.fit_temperature(member, probs, labels, {"split": "valid"})
  assert cal["temperature"] == 1.0 and "left uncalibrated" in cal["warning"]
  assert rundir.read_calibration(tmp_path)["temperature"] == 1.0
  np.testing.assert_allclose(member.calibrated(probs), probs)


def test_platt_moves_the_boundary_a_temperature_cannot():
  """Issue 21: a model whose well-ranked scores all sit above 0.5 (logits shifted by +3): a
  temperature keeps every sign (accuracy at 0.5 unchanged), Platt's intercept moves them back."""
  rng = np.random.default_rng(1)
  n = 2000
  z = rng.normal(0, 2.0, n)
  labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
  shifted = 1 / (1 + np.exp(-(z + 3.0)))
  t = calibration.fit_temperature(shifted, labels)
  by_t = calibration.apply_temperature(shifted, t)
  a, b = calibration.fit_platt(shifted, labels)
  by_platt = calibration.apply_platt(shifted, a, b)
  assert a == pytest.approx(1.0, abs=0.15) and b == pytest.approx(-3.0, abs=0.35)
  def acc(p):
    return float(((p >= 0.5) == labels).mean())
  assert acc(by_t) == acc(shifted) < acc(by_platt) - 0.1
  ece = calibration.expected_calibration_error
  assert ece(by_platt, labels) < 0.5 * ece(by_t, labels)
  assert skm.roc_auc_score(labels, by_platt) == pytest.approx(skm.roc_auc_score(labels, shifted))
  # A threshold maps through it: the same decisions on raw and calibrated probabilities.
  cal = {"method": "platt", "slope": a, "intercept": b}
  t_raw = 0.7
  assert ((shifted >= t_raw) == (by_platt >= calibration.map_threshold(cal, t_raw))).mean() > 0.999
  with pytest.raises(ValueError, match="both classes"):
    calibration.fit_platt(shifted[:5], np.zeros(5, int))


def test_a_stored_platt_calibration_is_read_back_and_a_bad_one_refused(tmp_path):
  rundir.write_calibration(tmp_path, {"method": "platt", "slope": 0.8, "intercept": -1.2})
  assert rundir.read_calibration(tmp_path)["intercept"] == -1.2
  rundir.write_calibration(tmp_path, {"method": "platt", "slope": -0.8, "intercept": 0.0})
  with pytest.raises(ValueError, match="slope.*> 0"):
    rundir.read_calibration(tmp_path)
