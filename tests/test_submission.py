"""ISIC Challenge and SIIM-ISIC (Kaggle) submission files, scored with the official ISIC scorer."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from conftest import run_bin
from skinrecords.evaluation import evaluate
from skinrecords.evaluation import predict
from skinrecords.evaluation import submission
import tiny_runs


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.reader(f))


def test_isic_columns_mapping_and_its_errors():
  classes = ["NotMelanoma", "Melanoma"]
  assert submission.parse_isic_columns(None, classes) == classes
  assert submission.parse_isic_columns("NotMelanoma:NV, Melanoma:MEL", classes) == ["NV", "MEL"]
  assert submission.parse_isic_columns("Melanoma:MEL", classes) == ["NotMelanoma", "MEL"]
  with pytest.raises(ValueError, match="class 'melanoma', which the model does not have; its "
                     "classes are NotMelanoma, Melanoma"):
    submission.parse_isic_columns("melanoma:MEL", classes)
  with pytest.raises(ValueError, match="expected CLASS:COLUMN"):
    submission.parse_isic_columns("Melanoma=MEL", classes)
  with pytest.raises(ValueError, match="twice"):
    submission.parse_isic_columns("Melanoma:NotMelanoma", classes)


def test_file_layouts(tmp_path):
  names = ["/x/ISIC_001.jpg", "ISIC_002", "y/ISIC_003.v2.png"]
  probs = np.array([0.25, 0.5, 0.1234567890123])
  submission.write_isic(tmp_path / "p.csv", names, probs, ["NV", "MEL"])
  rows = _rows(tmp_path / "p.csv")
  assert rows[0] == ["image", "NV", "MEL"]
  assert [r[0] for r in rows[1:]] == ["ISIC_001", "ISIC_002", "ISIC_003.v2"]
  assert [float(r[2]) for r in rows[1:]] == probs.tolist()  # exact: repr round-trips
  assert [float(r[1]) for r in rows[1:]] == (1 - probs).tolist()
  submission.write_isic_truth(tmp_path / "t.csv", names, [1, 0, 1], ["NV", "MEL"])
  assert _rows(tmp_path / "t.csv")[1:] == [["ISIC_001", "0.0", "1.0"], ["ISIC_002", "1.0", "0.0"],
                                           ["ISIC_003.v2", "0.0", "1.0"]]
  submission.write_kaggle(tmp_path / "k.csv", names, probs, ["NotMelanoma", "Melanoma"])
  assert _rows(tmp_path / "k.csv")[0] == ["image_name", "target"]
  assert float(_rows(tmp_path / "k.csv")[3][1]) == probs[2]
  # Two classes sorted by name put melanoma first: the target is still P(melanoma), not P(id 1).
  submission.write_kaggle(tmp_path / "k2.csv", names, 1 - probs, ["melanoma", "nevus"])
  assert [float(r[1]) for r in _rows(tmp_path / "k2.csv")[1:]] == pytest.approx(probs, abs=1e-15)
  submission.write_kaggle(tmp_path / "k01.csv", names, probs, ["0", "1"])  # ISIC's target column
  assert [float(r[1]) for r in _rows(tmp_path / "k01.csv")[1:]] == probs.tolist()
  three = np.array([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]])
  submission.write_kaggle(tmp_path / "k3.csv", names[:2], three, ["BCC", "MEL", "NV"])
  assert [float(r[1]) for r in _rows(tmp_path / "k3.csv")[1:]] == [0.7, 0.1]
  with pytest.raises(ValueError, match="none of the classes .* is named melanoma"):
    submission.write_kaggle(tmp_path / "k4.csv", names[:2], three, ["a", "b", "c"])
  with pytest.raises(ValueError, match="both called 'ISIC_001'"):
    submission.write_isic(tmp_path / "d.csv", ["a/ISIC_001.jpg", "b/ISIC_001.png"],
                          probs[:2], ["NV", "MEL"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("sub")
  records = tiny_runs.make_records(root, size=32, counts=(45, 30), levels=(110, 130))
  return root, records, tiny_runs.save_run(tiny_runs.random_model(records, 32, seed=3),
                                           root / "run", records, 32)


@pytest.mark.slow
def test_official_isic_scorer_agrees_with_metrics_json(run, tmp_path):
  scoring = pytest.importorskip(
      "isic_challenge_scoring", reason="the official scorer is the test extra "
      "isic-challenge-scoring (needs pandas<3); pip install it to run this test")
  _, records, model_dir = run
  cols = "a:NotMel,b:MEL"
  run_bin("evaluate", f"--model_dir={model_dir}", "--bootstrap=0",
          f"--output_dir={tmp_path / 'eval'}", f"--isic_truth_csv={tmp_path / 'truth.csv'}",
          f"--isic_columns={cols}")
  run_bin("predict", f"--model_dir={model_dir}", f"--records_dir={records}", "--format=isic",
          f"--isic_columns={cols}", f"--output_csv={tmp_path / 'pred.csv'}")
  m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  assert 0.0 < m["roc_auc"] < 1.0  # not perfect either way: ties and order both matter
  score = {metric: scoring.ClassificationScore.from_file(
      tmp_path / "truth.csv", tmp_path / "pred.csv", metric)
           for metric in (scoring.ClassificationMetric.AUC,
                          scoring.ClassificationMetric.AVERAGE_PRECISION)}
  auc = score[scoring.ClassificationMetric.AUC]
  ap = score[scoring.ClassificationMetric.AVERAGE_PRECISION]
  assert auc.overall == pytest.approx(m["roc_auc"], abs=1e-6)
  assert auc.per_category.loc["MEL", "auc"] == pytest.approx(m["roc_auc"], abs=1e-6)
  assert ap.per_category.loc["MEL", "ap"] == pytest.approx(m["pr_auc"], abs=1e-6)
  # The scorer's overall AP is the mean over BOTH columns, the negative class's AP included.
  with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  y = np.array([r["label"] == "b" for r in rows])
  p = np.array([float(r["probability"]) for r in rows])
  negative_ap = skm.average_precision_score(~y, 1 - p)
  assert ap.overall == pytest.approx((m["pr_auc"] + negative_ap) / 2, abs=1e-6)
  assert ap.overall != pytest.approx(m["pr_auc"], abs=1e-3)


@pytest.mark.slow
def test_official_scorer_on_a_three_class_ensemble(tmp_path):
  """ISIC 2019-style multi-class: the scorer's macro AUC and AP are our roc_auc and pr_auc."""
  scoring = pytest.importorskip(
      "isic_challenge_scoring", reason="the official scorer is the test extra "
      "isic-challenge-scoring (needs pandas<3); pip install it to run this test")
  records = tiny_runs.make_records(tmp_path, size=48, counts=(30, 25, 25), levels=(80, 120, 160))
  runs = [tiny_runs.save_run(tiny_runs.random_model(records, size, seed=seed, classes=3),
                             tmp_path / f"r{size}", records, size)
          for size, seed in ((32, 1), (48, 2))]
  members = ",".join(map(str, runs))
  m = evaluate.evaluate(evaluate.EvalConfig(
      model_dir=members, output_dir=str(tmp_path / "eval"), bootstrap=0,
      isic_truth_csv=str(tmp_path / "truth.csv"), isic_columns="a:NV,b:BKL,c:MEL"))
  predict.run(predict.PredictConfig(model_dir=members, records_dir=str(records), format="isic",
                                    isic_columns="a:NV,b:BKL,c:MEL",
                                    output_csv=str(tmp_path / "pred.csv")))
  assert _rows(tmp_path / "pred.csv")[0] == ["image", "NV", "BKL", "MEL"]
  for metric, ours in ((scoring.ClassificationMetric.AUC, m["roc_auc"]),
                       (scoring.ClassificationMetric.AVERAGE_PRECISION, m["pr_auc"])):
    score = scoring.ClassificationScore.from_file(tmp_path / "truth.csv", tmp_path / "pred.csv",
                                                  metric)
    assert score.overall == pytest.approx(ours, abs=1e-6), metric
  assert 0.0 < m["roc_auc"] < 1.0 and len(m["members"]) == 2


@pytest.mark.slow
def test_submission_errors(run, tmp_path):
  _, records, model_dir = run
  out = str(tmp_path / "p.csv")
  for kwargs, message in [(dict(format="isic"), "pass output_csv too"),
                          (dict(isic_columns="a:X", output_csv=out), "pass format=isic too")]:
    with pytest.raises(ValueError, match=message):
      predict.PredictConfig(model_dir=str(model_dir), records_dir=str(records), **kwargs).validate()
  with pytest.raises(ValueError, match="pass isic_truth_csv too"):  # not silently ignored
    evaluate.EvalConfig(model_dir=str(model_dir), isic_columns="a:X").validate()
  with pytest.raises(ValueError, match="class 'x', which the model does not have"):
    evaluate.evaluate(evaluate.EvalConfig(model_dir=str(model_dir), isic_columns="x:Y",
                                          isic_truth_csv=str(tmp_path / "t.csv"), bootstrap=0))
  # Through the commands: exit 2, one line, no traceback, nothing written.
  for command, args, message in [
      ("predict", [f"--records_dir={records}", "--format=isic", "--isic_columns=Melanoma:MEL",
                   f"--output_csv={out}"], "class 'Melanoma', which the model does not have"),
      ("evaluate", ["--bootstrap=0", f"--isic_truth_csv={tmp_path}"], "is a folder")]:
    proc = run_bin(command, f"--model_dir={model_dir}", *args, check=False)
    assert proc.returncode == 2, (command, args, proc.stderr)
    assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not list(tmp_path.glob("*.csv"))
