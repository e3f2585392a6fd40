"""Ensembles: members of different image sizes, mean and rank against the members' own
predictions, CV folders, and the refusals that keep training data out of an ensemble's scores."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np

import pytest
from scipy import stats
from sklearn import metrics as skm

from conftest import run_bin
from skinrecords.core import rundir
from skinrecords.evaluation import ensemble
from skinrecords.evaluation import evaluate
from skinrecords.evaluation import predict
import tiny_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Records at 48 px (2 train folds); run a at 32 px, run b at 48 px (no fold), and a CV folder
  whose fold_0 / fold_1 runs held out fold 0 / 1."""
  root = tmp_path_factory.mktemp("ens")
  records = tiny_runs.make_records(root, size=48, folds=2)
  a = tiny_runs.save_run(tiny_runs.random_model(records, 32, seed=3), root / "a", records, 32)
  b = tiny_runs.save_run(tiny_runs.random_model(records, 48, seed=4), root / "b", records, 48)
  for k in range(2):
    tiny_runs.save_run(tiny_runs.random_model(records, 32, seed=10 + k), root / "cv" / f"fold_{k}",
                       records, 32, fold=k)
  (root / "cv" / rundir.CV_METRICS_FILE).write_text("{}")  # written after the last fold
  return root, records, a, b


def _csv_probs(path):
  with open(path, newline="") as f:
    return {r["image_name"]: float(r["probability"]) for r in csv.DictReader(f)}


@pytest.mark.slow
def test_mean_of_members_at_their_own_sizes_equals_the_members_own_predictions(runs, tmp_path):
  root, records, a, b = runs
  pa, labels, names = tiny_runs.member_probs(a, records)
  pb, labels_b, names_b = tiny_runs.member_probs(b, records)
  assert names == names_b and (labels == labels_b).all()
  assert np.abs(pa - pb).max() > 0.05  # the members disagree, so the mean is a real test
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=f"{a},{b}", output_dir=str(tmp_path / "o"),
                                            bootstrap=0))
  got = _csv_probs(tmp_path / "o" / "predictions.csv")
  np.testing.assert_allclose([got[n] for n in names], (pa + pb) / 2, atol=2e-6)
  assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, (pa + pb) / 2), abs=1e-9)
  assert [r["image_size"] for r in m["members"]] == [32, 48]
  assert m["members"][0]["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, pa), abs=1e-9)
  assert m["members"][1]["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, pb), abs=1e-9)
  assert m["ensemble"] == {"method": "mean", "members": [str(a), str(b)]}
  report = (tmp_path / "o" / "report.txt").read_text()
  assert "members and ensemble" in report and "ensemble (mean of 2)" in report
  saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
  assert saved["members"][1]["model_dir"] == str(b)

  # bin/predict with the same list gives the same probabilities.
  rows, _, _ = predict.run(predict.PredictConfig(model_dir=f"{a},{b}", records_dir=str(records)))
  np.testing.assert_allclose([r["probability"] for r in rows], (pa + pb) / 2, atol=2e-6)


@pytest.mark.slow
def test_rank_average_is_the_mean_of_rank_normalised_member_scores(runs, tmp_path):
  root, records, a, b = runs
  pa, labels, _ = tiny_runs.member_probs(a, records)
  pb, _, _ = tiny_runs.member_probs(b, records)
  want = (stats.rankdata(pa) + stats.rankdata(pb)) / (2 * len(pa))
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=f"{a},{b}", ensemble="rank", bootstrap=0,
                                            output_dir=str(tmp_path / "r")))
  assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, want), abs=1e-9)
  assert m["ece"] is None and m["brier"] is None  # rank scores are not probabilities
  # Multi-class: per-class columns ranked, averaged, rows normalised to sum 1.
  p1 = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
  p2 = np.array([[0.5, 0.4, 0.1], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8]])
  got = ensemble.combine([p1, p2], "rank")
  r = (stats.rankdata(p1, axis=0) + stats.rankdata(p2, axis=0)) / 6
  np.testing.assert_allclose(got, r / r.sum(axis=1, keepdims=True))
  np.testing.assert_allclose(ensemble.combine([p1, p2], "mean"), (p1 + p2) / 2)


@pytest.mark.slow
def test_cv_folder_is_an_ensemble_of_its_folds_on_the_test_split_only(runs):
  root, records, _, _ = runs
  cv = root / "cv"
  m = evaluate.evaluate(evaluate.EvalConfig(model_dir=str(cv), bootstrap=0))
  p0, labels, _ = tiny_runs.member_probs(cv / "fold_0", records)
  p1, _, _ = tiny_runs.member_probs(cv / "fold_1", records)
  assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, (p0 + p1) / 2), abs=1e-9)
  assert (cv / "eval_test" / "metrics.json").is_file()
  with pytest.raises(ValueError, match="different folds.*split=test.*oof.csv"):
    evaluate.evaluate(evaluate.EvalConfig(model_dir=str(cv), split="valid", bootstrap=0))
  with pytest.raises(ValueError, match="different folds.*split=test.*oof.csv"):  # not "fold=0"
    evaluate.evaluate(evaluate.EvalConfig(model_dir=str(cv), split="valid", fold=1, bootstrap=0))
  with pytest.raises(ValueError, match="youden for an ensemble needs a validation split that no "
                     "member trained on"):
    evaluate.evaluate(evaluate.EvalConfig(model_dir=str(cv), threshold="youden", bootstrap=0))


@pytest.mark.slow
def test_ensemble_refusals_through_the_command(runs, tmp_path):
  root, records, a, b = runs
  # Mixed classes across members.
  tiny_runs.save_run(tiny_runs.random_model(records, 32, seed=5), tmp_path / "swapped", records,
                     32, classes=["b", "a"])
  # A CV folder with an unfinished fold (config.json written, no model.keras yet), one killed
  # after its first epoch of two (model.keras saved), one not started (no cv_metrics.json yet),
  # and one with a single run written beside its folds.
  cv = tmp_path / "cv"
  for k in range(2):
    (cv / f"fold_{k}").mkdir(parents=True)
  for name in ("model.keras", "config.json", "summary.json"):
    (cv / "fold_0" / name).write_bytes((a / name).read_bytes())
  (cv / "fold_1" / "config.json").write_text((a / "config.json").read_text())
  killed = tmp_path / "killed"
  shutil.copytree(root / "cv", killed)
  rundir.write_summary(killed / "fold_1", {"epochs_done": 1, "epochs_planned": 2})
  not_started = tmp_path / "not_started"
  shutil.copytree(root / "cv" / "fold_0", not_started / "fold_0")
  mixed = tmp_path / "mixed"
  shutil.copytree(root / "cv", mixed)
  shutil.copy(a / "model.keras", mixed / "model.keras")
  for model_dir, message in [(str(cv), "fold_1 did not train all its epochs"),
                             (str(killed), "fold_1 did not train all its epochs"),
                             (str(not_started), "has not finished (no cv_metrics.json"),
                             (str(mixed), "holds both a cross-validation run"),
                             (f"{a},{b}", "pass output_dir"), (f"{a},{a}", "more than once")]:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
      evaluate.evaluate(evaluate.EvalConfig(model_dir=model_dir, bootstrap=0))
  # Through the commands: exit 2, one line, no traceback.
  for command, args, message in [
      ("evaluate", [f"--model_dir={a},{tmp_path / 'swapped'}", "--bootstrap=0"],
       "disagree on classes"),
      ("predict", [f"--model_dir={a},{b}", f"--records_dir={records}",
                   f"--explain_dir={tmp_path / 'x'}"], "an ensemble has none of its own")]:
    proc = run_bin(command, *args, check=False)
    assert proc.returncode == 2, (args, proc.stderr)
    assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
