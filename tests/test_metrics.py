"""Tests for skinrecords.evaluation.metrics and .uncertainty: CIs, operating points, ISIC pAUC,
folds."""
# pylint: disable=protected-access

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from sklearn import metrics as skm

from skinrecords.evaluation import metrics
from skinrecords.evaluation import uncertainty

BINARY = ["NotMelanoma", "Melanoma"]


def _scores(n, seed, prevalence=0.2, shift=0.3):
  """Labels and informative continuous scores (AUC ~0.8), no ties."""
  rng = np.random.default_rng(seed)
  labels = (rng.random(n) < prevalence).astype(np.int64)
  return np.clip(shift * labels + rng.random(n) * (1 - shift), 0, 1), labels


def _width(ci):
  return ci[1] - ci[0]


# Hand-made case: 10 negatives at 0.05, 0.15, ..., 0.95 and 10 positives in between. Walking the
# threshold down the 20 scores, (FPR, TPR) goes (0, .1) at 0.97, (.1, .6) at 0.87, (.2, .6) at
# 0.85, (.5, .8) at 0.52, (.7, .9) at 0.32 and (.9, 1) at 0.12.
HAND_NEG = np.arange(10) * 0.1 + 0.05
HAND_POS = np.array([0.12, 0.32, 0.52, 0.72, 0.87, 0.88, 0.89, 0.91, 0.92, 0.97])
HAND_PROBS = np.r_[HAND_NEG, HAND_POS]
HAND_LABELS = np.r_[np.zeros(10, int), np.ones(10, int)]


def test_rank_auc_and_weighted_ap_equal_sklearn_on_resamples():
  rng = np.random.default_rng(0)
  probs, labels = _scores(3000, 1)
  probs = np.round(probs, 2)  # ~100 distinct scores: ties between classes must count one half
  assert uncertainty.rank_auc(labels, probs) == pytest.approx(skm.roc_auc_score(labels, probs),
                                                              abs=1e-12)
  idx = rng.integers(0, len(labels), size=(4, len(labels)))
  counts = np.stack([np.bincount(i, minlength=len(labels)) for i in idx])
  auc, ap = uncertainty.weighted_auc_ap(uncertainty.SortedScores(probs, labels == 1), counts)
  for r in range(4):
    assert auc[r] == pytest.approx(skm.roc_auc_score(labels[idx[r]], probs[idx[r]]), abs=1e-12)
    assert ap[r] == pytest.approx(skm.average_precision_score(labels[idx[r]], probs[idx[r]]),
                                  abs=1e-12)
  # A resample without positives is NaN (skipped), not 0 or 1.
  no_pos = np.where(labels == 1, 0, 1)[None, :]
  auc, ap = uncertainty.weighted_auc_ap(uncertainty.SortedScores(probs, labels == 1), no_pos)
  assert np.isnan(auc[0]) and np.isnan(ap[0])


def test_ci_contains_estimate_and_widens_as_n_shrinks():
  widths = {}
  for n in (200, 2000):
    probs, labels = _scores(n, 2)
    m = metrics.compute_metrics(probs, labels, BINARY, 0.5, seed=3)
    for key in ("roc_auc", "pr_auc", "sensitivity", "specificity"):
      lo, hi = m[f"{key}_ci"]
      assert lo < m[key] < hi, (n, key, m[key], lo, hi)
      widths[n, key] = hi - lo
    assert m["ci_resamples"] == 1000 and m["ci_level"] == 0.95 and m["ci_unit"] == "image"
    assert m["ci_units"] == n and m["ci_skipped"] == 0
    json.dumps(m, allow_nan=False)  # metrics.json must stay strict JSON
  # The level is right: at a threshold, sensitivity is a binomial proportion, so its 95 % interval
  # is close to 2 x 1.96 standard errors (ratios 0.92-1.03 over 6 seeds; 90 % would give 0.84).
  for key, label in (("sensitivity", 1), ("specificity", 0)):
    se = np.sqrt(m[key] * (1 - m[key]) / np.sum(labels == label))
    assert 0.88 < widths[2000, key] / (2 * 1.959964 * se) < 1.12, key
  for key in ("roc_auc", "pr_auc", "sensitivity", "specificity"):
    # Width scales as 1 / sqrt(n): sqrt(10) ~ 3.2 times wider with 10 times fewer images.
    assert 2.2 < widths[200, key] / widths[2000, key] < 4.5, (key, widths)


def test_patient_resampling_is_wider_when_patients_repeat_images():
  probs, labels = _scores(300, 4)
  # Each of 300 patients has 5 identical images: 1,500 images carry the information of 300.
  dup_probs, dup_labels = np.repeat(probs, 5), np.repeat(labels, 5)
  patients = np.repeat([f"p{i}" for i in range(300)], 5)
  by_image = uncertainty.bootstrap_ci(dup_probs, dup_labels, threshold=0.5, seed=5)
  by_patient = uncertainty.bootstrap_ci(dup_probs, dup_labels, threshold=0.5, groups=patients,
                                        seed=5)
  alone = uncertainty.bootstrap_ci(probs, labels, threshold=0.5, seed=5)
  assert by_patient["ci_unit"] == "patient" and by_patient["ci_units"] == 300
  for key in ("roc_auc_ci", "pr_auc_ci", "sensitivity_ci", "specificity_ci"):
    ratio = _width(by_patient[key]) / _width(by_image[key])
    assert 1.7 < ratio < 3.0, (key, ratio)  # sqrt(5) ~ 2.24
    # Resampling patients of the duplicated set is resampling the 300 originals.
    assert _width(by_patient[key]) == pytest.approx(_width(alone[key]), rel=0.25), key


def test_empty_patient_ids_are_units_of_their_own():
  probs, labels = _scores(40, 6)
  groups = ["a"] * 10 + ["b"] * 10 + [""] * 10 + [None] * 10
  ci = uncertainty.bootstrap_ci(probs, labels, groups=groups, resamples=50)
  assert ci["ci_units"] == 22
  with pytest.raises(ValueError, match="one id per prediction"):
    uncertainty.bootstrap_ci(probs, labels, groups=groups[:-1])


def test_bootstrap_is_seeded():
  probs, labels = _scores(500, 7)
  a = metrics.compute_metrics(probs, labels, BINARY, 0.5, seed=11)
  b = metrics.compute_metrics(probs, labels, BINARY, 0.5, seed=11)
  c = metrics.compute_metrics(probs, labels, BINARY, 0.5, seed=12)
  keys = ("roc_auc_ci", "pr_auc_ci", "sensitivity_ci", "specificity_ci")
  assert all(a[k] == b[k] for k in keys) and a["ci_seed"] == 11
  assert all(a[k] != c[k] for k in keys)


def test_resamples_lacking_a_class_are_skipped_and_counted():
  # 1 positive in 20: a resample misses it with probability (19/20)^20 = 0.358.
  probs = np.linspace(0, 1, 20)
  labels = np.zeros(20, int)
  labels[15] = 1
  ci = uncertainty.bootstrap_ci(probs, labels, threshold=0.5, resamples=1000, seed=0)
  assert 300 < ci["ci_skipped"] < 420, ci["ci_skipped"]
  assert ci["sensitivity_ci"] == [1.0, 1.0]  # every kept resample holds the one positive, caught
  one_class = metrics.compute_metrics(probs, np.zeros(20, int), BINARY, 0.5, bootstrap=100)
  assert one_class["roc_auc_ci"] is None and one_class["ci_skipped"] == 100


def test_operating_points_hand_made():
  m = metrics.compute_metrics(HAND_PROBS, HAND_LABELS, BINARY, 0.5, bootstrap=0)
  points = {p["constraint"]: p for p in m["operating_points"]}
  expected = {  # constraint: (sensitivity, specificity reached, threshold)
      "specificity >= 0.80": (0.6, 0.9, 0.87),  # 0.85 gives the same 0.6 at specificity 0.8
      "specificity >= 0.90": (0.6, 0.9, 0.87),
      "specificity >= 0.95": (0.1, 1.0, 0.97),
      "sensitivity >= 0.90": (0.9, 0.3, 0.32),
      "sensitivity >= 0.95": (1.0, 0.1, 0.12),
  }
  assert list(points) == list(expected)
  for constraint, (sens, spec, t) in expected.items():
    p = points[constraint]
    assert (p["sensitivity"], p["specificity"], p["threshold"]) == pytest.approx((sens, spec, t))
    predicted = HAND_PROBS >= p["threshold"]  # the threshold really gives these rates
    assert predicted[HAND_LABELS == 1].mean() == pytest.approx(sens)
    assert 1 - predicted[HAND_LABELS == 0].mean() == pytest.approx(spec)
  assert m["sensitivity_at_specificity"] == pytest.approx({"0.80": 0.6, "0.90": 0.6, "0.95": 0.1})
  assert m["specificity_at_sensitivity"] == pytest.approx({"0.90": 0.3, "0.95": 0.1})
  # Several thresholds reach the target sensitivity at the same specificity: the one that also
  # catches the most melanomas is reported. Curve: (0, .85), (.25, .85), (.25, .9), (.25, .95),
  # (.25, 1) for thresholds 0.96, 0.95, 0.5, 0.49, 0.48.
  probs = np.r_[np.linspace(0.96, 0.99, 17), 0.5, 0.49, 0.48, 0.95, 0.3, 0.2, 0.1]
  labels = np.r_[np.ones(20, int), np.zeros(4, int)]
  at_sens = metrics.operating_points(probs, labels)["operating_points"][3]
  assert at_sens == {"constraint": "sensitivity >= 0.90", "sensitivity": 1.0,
                     "specificity": 0.75, "threshold": 0.48}
  # At threshold 0.5: positives 0.52 ... 0.97 (8 of 10) and negatives 0.55 ... 0.95 (5 of 10).
  assert (m["sensitivity"], m["specificity"]) == pytest.approx((0.8, 0.5))


def test_auc_sens_80_hand_made():
  # TPR reaches 0.8 on the vertical step at FPR 0.5; then TPR .8 to FPR .7, .9 to .9, 1 to 1:
  # 0.2 * 0.8 + 0.2 * 0.9 + 0.1 * 1 = 0.44.
  assert metrics.auc_above_sensitivity(HAND_PROBS, HAND_LABELS) == pytest.approx(0.44)
  # Ties make a diagonal segment: positives .9 .8 .7 .5 .5, negatives .5 .5 .2 .1. The curve goes
  # (0, .6) -> (.5, 1) through the tie, crossing TPR .8 at FPR .25: 0.25 * 0.9 + 0.5 * 1 = 0.725.
  probs = [0.9, 0.8, 0.7, 0.5, 0.5, 0.5, 0.5, 0.2, 0.1]
  labels = [1, 1, 1, 1, 1, 0, 0, 0, 0]
  assert metrics.auc_above_sensitivity(probs, labels) == pytest.approx(0.725)
  assert metrics.auc_above_sensitivity([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="min_sensitivity"):
    metrics.auc_above_sensitivity(probs, labels, 0.0)


def test_auc_sens_80_equals_independent_computation():
  # Independent route through scikit-learn's partial AUC: with labels and scores flipped, the
  # area at FPR' <= 0.2 is the ROC area above TPR 0.8 (McClish-corrected; undo it). Adding the
  # rectangle below TPR 0.8, from FPR* (where TPR first reaches 0.8, exact without ties) to 1,
  # gives the ISIC scorer's area.
  for seed in range(3):
    probs, labels = _scores(1000, 20 + seed)
    corrected = skm.roc_auc_score(1 - labels, 1 - probs, max_fpr=0.2)
    lo, hi = 0.5 * 0.2**2, 0.2
    above = lo + (2 * corrected - 1) * (hi - lo)
    fpr, tpr, _ = skm.roc_curve(labels, probs)
    fpr_star = fpr[np.argmax(tpr >= 0.8)]
    expected = above + 0.8 * (1 - fpr_star)
    m = metrics.compute_metrics(probs, labels, BINARY, 0.5, bootstrap=0)
    assert m["auc_sens_80"] == pytest.approx(expected, abs=1e-9)
    assert m["auc_sens_80"] != pytest.approx(corrected, abs=1e-3)  # not sklearn's max_fpr number


def test_multiclass_absent_classes_and_per_class_aucs():
  rng = np.random.default_rng(9)
  labels = rng.integers(0, 3, 400)  # class 3 ("vasc") never occurs
  logits = rng.normal(size=(400, 4)) + 1.5 * np.eye(4)[labels]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  classes = ["mel", "nv", "bkl", "vasc"]
  m = metrics.compute_metrics(probs, labels, classes, None, seed=1)
  assert m["absent_classes"] == ["vasc"]
  assert list(m["roc_auc_per_class"]) == ["mel", "nv", "bkl"]
  for c, name in enumerate(classes[:3]):
    assert m["roc_auc_per_class"][name] == pytest.approx(skm.roc_auc_score(labels == c,
                                                                           probs[:, c]))
  assert m["roc_auc"] == pytest.approx(np.mean(list(m["roc_auc_per_class"].values())))
  lo, hi = m["roc_auc_ci"]
  assert lo < m["roc_auc"] < hi and "sensitivity_ci" not in m and "operating_points" not in m
  report = metrics.format_report(m)
  assert "WARNING: no image of class 'vasc'" in report and "other 3 classes" in report
  full = metrics.compute_metrics(probs[labels < 3][:, :3], labels[labels < 3], classes[:3], None,
                                 bootstrap=0)
  assert full["absent_classes"] == [] and "WARNING" not in metrics.format_report(full)


def test_backward_compatible_keys_and_no_bootstrap():
  probs, labels = _scores(300, 10)
  m = metrics.compute_metrics(probs, labels, BINARY, 0.4, bootstrap=0)
  for key in ("n", "classes", "threshold", "accuracy", "roc_auc", "pr_auc", "label_counts",
              "predicted_counts", "confusion_matrix", "classification_report", "collapsed",
              "warning"):
    assert key in m
  assert not any(k.startswith("ci_") or k.endswith("_ci") for k in m)
  assert m["sensitivity"] == pytest.approx(m["classification_report"]["Melanoma"]["recall"])
  assert m["specificity"] == pytest.approx(m["classification_report"]["NotMelanoma"]["recall"])
  assert "95% CI" not in metrics.format_report(m)


def test_report_shows_intervals_and_operating_points():
  probs, labels = _scores(600, 12)
  patients = [f"p{i // 3}" for i in range(600)]
  m = metrics.compute_metrics(probs, labels, BINARY, 0.5, groups=patients, bootstrap=200)
  report = metrics.format_report(m)
  lo, hi = m["roc_auc_ci"]
  assert f"ROC AUC: {m['roc_auc']:.4f}" in report and f"95% CI [{lo:.4f}, {hi:.4f}]" in report
  assert "200 resamples of 200 patients, seed 0" in report
  assert f"(auc_sens_80): {m['auc_sens_80']:.4f}" in report
  row = next(line for line in report.splitlines() if "specificity >= 0.90" in line).split()
  p = m["operating_points"][1]
  assert row[-3:] == [f"{p['sensitivity']:.4f}", f"{p['specificity']:.4f}",
                      f"{p['threshold']:.6g}"]


def test_summarize_folds():
  folds = [
      {"roc_auc": 0.8, "pr_auc": 0.4, "sensitivity_at_specificity": {"0.90": 0.5}},
      {"roc_auc": 0.9, "pr_auc": 0.6, "sensitivity_at_specificity": {"0.90": 0.7}},
      {"roc_auc": None, "pr_auc": 0.5, "sensitivity_at_specificity": {"0.90": 0.6}},
  ]
  s = metrics.summarize_folds(folds)
  assert s["n_folds"] == 3
  assert s["roc_auc"] == pytest.approx({"mean": 0.85, "std": 0.0707107, "n": 2,
                                        "values": [0.8, 0.9, None]})
  assert s["pr_auc"]["mean"] == pytest.approx(0.5) and s["pr_auc"]["std"] == pytest.approx(0.1)
  assert s["sensitivity_at_specificity_0.90"]["mean"] == pytest.approx(0.6)
  assert "accuracy" not in s  # no fold had it
  text = metrics.format_folds(s)
  assert "roc_auc" in text and "0.8500 ± 0.0707  (2 folds)" in text
  with pytest.raises(ValueError, match="no fold"):
    metrics.summarize_folds([])


# ------------------------------------------ report text, checked whole (tools/mutation found the
# report's lines untested beyond a few substrings)

_HAND_PROBS = [0.1, 0.2, 0.3, 0.45, 0.4, 0.6, 0.7, 0.8, 0.9]
_HAND_LABELS = [0, 0, 0, 0, 1, 1, 1, 1, 1]

# By hand: one inverted pair (0.4 positive below 0.45 negative) of 20: ROC AUC 19/20. At 0.5: TP 4,
# FN 1 (0.4), TN 4: accuracy 8/9, sensitivity 0.8, specificity 1. AP = (1+1+1+1+5/6)/5 = 0.9667.
# auc_sens_80: TPR 0.8 from FPR 0 to 0.25, then 1: 0.8 * 0.25 + 0.75 = 0.95.
_BINARY_REPORT = """\
test split (fold 2) of /r: 9 images, model /m, TTA off
             precision    recall  f1-score   support
 NotMelanoma    0.8000    1.0000    0.8889         4
    Melanoma    1.0000    0.8000    0.8889         5
    accuracy                        0.8889         9
   macro avg    0.9000    0.9000    0.8889         9
weighted avg    0.9111    0.8889    0.8889         9

ROC AUC: 0.9500                       95% CI [{roc_auc_ci}]
PR AUC (average precision): 0.9667    95% CI [{pr_auc_ci}]
sensitivity at the threshold: 0.8000  95% CI [{sensitivity_ci}]
specificity at the threshold: 1.0000  95% CI [{specificity_ci}]
(95% CI: percentile bootstrap, 50 resamples of 7 patients, seed 0)
ISIC partial AUC above 80% sensitivity (auc_sens_80): 0.9500 (chance 0.18, perfect 1)
operating points (each reached by a real threshold, no interpolation):
  constraint                     sensitivity specificity   threshold
  specificity >= 0.80                 0.8000      1.0000         0.6
  specificity >= 0.90                 0.8000      1.0000         0.6
  specificity >= 0.95                 0.8000      1.0000         0.6
  sensitivity >= 0.90                 1.0000      0.7500         0.4
  sensitivity >= 0.95                 1.0000      0.7500         0.4
threshold: P(Melanoma) >= 0.5 (fixed)
confusion matrix (rows: true class, columns: predicted class, order NotMelanoma, Melanoma):
        4       0
        1       4"""


def test_binary_report_text_is_exactly_the_metrics():
  groups = ["a", "a", "b", "c", "d", "d", "e", "f", "g"]
  m = metrics.compute_metrics(_HAND_PROBS, _HAND_LABELS, BINARY, 0.5, groups=groups, bootstrap=50)
  m.update(records_dir="/r", split="test", fold=2, model_dir="/m", tta=0, threshold_source="fixed")
  cis = {f"{k}_ci": f"{m[k + '_ci'][0]:.4f}, {m[k + '_ci'][1]:.4f}"
         for k in ("roc_auc", "pr_auc", "sensitivity", "specificity")}
  assert metrics.format_report(m) == _BINARY_REPORT.format(**cis)
  assert (m["roc_auc"], m["accuracy"], m["confusion_matrix"]) == (0.95, 8 / 9, [[4, 0], [1, 4]])
  assert m["auc_sens_80"] == pytest.approx(0.95) and m["pr_auc"] == pytest.approx(29 / 30)
  # Images resampled one by one: the report says the intervals may be too narrow, and how many
  # resamples of 9 images drew a single class.
  m = metrics.compute_metrics(_HAND_PROBS, _HAND_LABELS, BINARY, 0.5, bootstrap=50)
  assert m["ci_skipped"] == 1
  assert metrics.format_report(m).splitlines()[11:13] == [
      "(95% CI: percentile bootstrap, 50 resamples of 9 images, seed 0; 1 skipped for lacking a "
      "class)",
      "(images resampled one by one: if patients have several images here, these intervals are "
      "too narrow)"]


def test_multiclass_report_text_is_exactly_the_metrics():
  # mel: both mel images score above the rest, AUC 1. nv: of 6 (nv, other) pairs one ties
  # (0.3 = 0.3): AUC 5.5/6 = 0.9167. Accuracy 3/5 (argmax).
  p3 = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1],
                 [0.5, 0.3, 0.2]])
  m = metrics.compute_metrics(p3, [0, 0, 1, 1, 1], ["mel", "nv", "bkl"], None, bootstrap=0)
  assert metrics.format_report(m) == """\
             precision    recall  f1-score   support
         mel    0.5000    1.0000    0.6667         2
          nv    1.0000    0.3333    0.5000         3
         bkl    0.0000    0.0000    0.0000         0
    accuracy                        0.6000         5
   macro avg    0.5000    0.4444    0.3889         5
weighted avg    0.8000    0.6000    0.5667         5

ROC AUC (one-vs-rest, macro): 0.9583
PR AUC (average precision) (one-vs-rest, macro): 0.9583
per class ROC AUC / PR AUC: mel 1.0000 / 1.0000, nv 0.9167 / 0.9167
decision: the class with the highest probability
confusion matrix (rows: true class, columns: predicted class, order mel, nv, bkl):
        2       0       0
        2       1       0
        0       0       0

WARNING: no image of class 'bkl' in this split: its AUCs are undefined and the macro averages \
cover the other 2 classes only."""


def test_collapse_warnings_say_which_fix_fits():
  labels = np.array([0] * 100 + [1] * 100)
  ranked = np.r_[np.linspace(0.6, 0.8, 100), np.linspace(0.81, 0.99, 100)]  # AUC 1, all >= 0.5
  m = metrics.compute_metrics(ranked, labels, BINARY, 0.5, bootstrap=0)
  assert m["warning"] == (
      "200 of 200 predictions (100.0%) are class 'Melanoma': the classifier has collapsed to one "
      "class. ROC AUC 1.000 says the scores still rank the classes, so the threshold 0.5 may be "
      "what is wrong: try threshold='youden'.")
  assert metrics.format_report(m).endswith("\n\nWARNING: " + m["warning"])
  tail = (": check that the model was fed RGB 0..255 images (no extra rescaling), the class "
          "balance (class weights or oversampling) and the training curves.")
  # AUC 0.6 exactly still ranks; just below it does not.
  for auc, fits_threshold in ((0.6, True), (0.595, False)):
    m = dict(n=200, roc_auc=auc, threshold=0.5)
    text = metrics._collapse_warning(m, "Melanoma", 199)
    assert text.startswith("199 of 200 predictions (99.5%) are class 'Melanoma': the classifier "
                           "has collapsed to one class. ")
    assert text.endswith("try threshold='youden'." if fits_threshold else
                         f" The scores do not separate the classes either (ROC AUC {auc:.3f})"
                         + tail), text
  for m in (dict(n=4, roc_auc=None, threshold=0.5), dict(n=4, roc_auc=0.9, threshold=None)):
    text = metrics._collapse_warning(m, "x", 4)
    auc = "" if m["roc_auc"] is None else " (ROC AUC 0.900)"
    assert text == ("4 of 4 predictions (100.0%) are class 'x': the classifier has collapsed to "
                    f"one class. The scores do not separate the classes either{auc}{tail}")


def test_undefined_aucs_and_cis_are_named_in_the_report():
  m = metrics.compute_metrics([0.2, 0.7, 0.9], [1, 1, 1], BINARY, 0.5, bootstrap=20)
  lines = metrics.format_report(m).splitlines()
  estimates = [line for line in lines if line.startswith(("ROC AUC", "PR AUC"))]
  assert [re.sub(r"\s+", " ", e) for e in estimates] == [
      "ROC AUC: undefined (one class present) 95% CI undefined",
      "PR AUC (average precision): undefined (one class present) 95% CI undefined"]
  assert not any("operating points" in line for line in lines)


# ------------------------------------------------- boundaries found by mutation testing (metrics)


def test_boundaries_a_threshold_hit_99_percent_and_two_predictions():
  m = metrics.compute_metrics([0.5, 0.49, 0.8, 0.2], [1, 1, 0, 0], BINARY, 0.5, bootstrap=0)
  assert m["predicted_counts"] == {"NotMelanoma": 2, "Melanoma": 2}  # 0.5 >= 0.5 is positive
  assert m["confusion_matrix"] == [[1, 1], [1, 1]]
  probs = np.r_[np.full(99, 0.9), 0.1]  # exactly 99 % in one class: collapsed
  assert metrics.compute_metrics(probs, [0, 1] * 50, BINARY, 0.5, bootstrap=0)["collapsed"]
  two = metrics.compute_metrics([0.9, 0.8], [0, 1], BINARY, 0.5, bootstrap=0)
  assert two["collapsed"] and two["warning"].startswith("2 of 2 predictions (100.0%)")
  assert not metrics.compute_metrics([0.9], [1], BINARY, 0.5, bootstrap=0)["collapsed"]
  assert metrics.compute_metrics([0.5, 0.2], [1, 0], BINARY, bootstrap=0)["threshold"] == 0.5


@pytest.mark.parametrize("probs,labels,message", [
    ([], [], r"^no predictions to evaluate \(the split is empty\)$"),
    ([0.1, 0.2, 0.3], [0, 1], r"^probabilities of shape \(3,\) do not fit 2 labels and 2 classes$"),
    ([0.1, np.inf], [0, 1], r"^1 of 2 probabilities are NaN or infinite: the model's weights have "
                            r"diverged$"),
    ([0.1, 0.2], [0, 2], r"^labels range over \[0, 2\] but there are 2 classes "
                         r"\['NotMelanoma', 'Melanoma'\]$"),
    ([0.1, 0.2], [-1, 1], r"^labels range over \[-1, 1\]"),
])
def test_unusable_predictions_are_refused_naming_the_problem(probs, labels, message):
  with pytest.raises(ValueError, match=message):
    metrics.compute_metrics(probs, labels, BINARY, 0.5, bootstrap=0)


def test_single_class_splits_leave_the_missing_rate_undefined():
  positives = metrics.compute_metrics([0.2, 0.7, 0.9], [1, 1, 1], BINARY, 0.5, bootstrap=0)
  negatives = metrics.compute_metrics([0.2, 0.7, 0.9], [0, 0, 0], BINARY, 0.5, bootstrap=0)
  assert (positives["sensitivity"], positives["specificity"]) == (2 / 3, None)
  assert positives["roc_auc"] is None and positives["pr_auc"] is None  # keys kept for JSON readers
  # A class never predicted still has its count (0), so every class is a key.
  low = metrics.compute_metrics([0.1, 0.2, 0.3], [0, 1, 0], BINARY, 0.5, bootstrap=0)
  assert low["predicted_counts"] == {"NotMelanoma": 3, "Melanoma": 0}
  assert negatives["sensitivity"] is None and negatives["specificity"] == pytest.approx(1 / 3)
  report = metrics.format_report(positives)
  assert "WARNING" not in report  # "absent class" warnings are for more than two classes


def test_multiclass_aucs_with_a_singleton_class_and_with_one_class():
  p = np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1],
                [0.1, 0.2, 0.7]])
  m = metrics.compute_metrics(p, [0, 0, 1, 1, 2], ["a", "b", "c"], None, bootstrap=0)
  assert m["roc_auc_per_class"] == {"a": 1.0, "b": 1.0, "c": 1.0}  # c has one image: still scored
  one = metrics.compute_metrics(p, [0] * 5, ["a", "b", "c"], None, bootstrap=0)
  assert one["roc_auc"] is None and one["roc_auc_per_class"] == {}
  report = metrics.format_report(one)
  assert report.endswith("WARNING: no image of class 'b', 'c' in this split: its AUCs are "
                         "undefined and the macro averages cover the other 1 classes only.")


def test_an_operating_point_reached_only_by_predicting_nothing_has_no_threshold():
  # The top score is a negative, so specificity 0.80 of 4 negatives needs FPR 0: only "nothing
  # positive" (roc_curve's threshold +inf) reaches it; JSON has no infinity.
  m = metrics.compute_metrics([0.9, 0.3, 0.2, 0.1, 0.8, 0.7], [0, 0, 0, 0, 1, 1], BINARY, 0.5,
                              bootstrap=0)
  point = m["operating_points"][0]
  assert point == {"constraint": "specificity >= 0.80", "sensitivity": 0.0, "specificity": 1.0,
                   "threshold": None}
  json.dumps(m, allow_nan=False)
  row = next(line for line in metrics.format_report(m).splitlines()
             if "specificity >= 0.80" in line)
  assert row.split() == ["specificity", ">=", "0.80", "0.0000", "1.0000", "none"]


def test_auc_above_sensitivity_accepts_one_and_refuses_above():
  assert metrics.auc_above_sensitivity([0.1, 0.9], [0, 1], 1.0) == pytest.approx(1.0)
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match=rf"min_sensitivity must be in \(0, 1\]; got {bad}"):
      metrics.auc_above_sensitivity([0.1, 0.9], [0, 1], bad)


def test_report_head_without_a_fold_or_a_threshold_source():
  m = metrics.compute_metrics(_HAND_PROBS, _HAND_LABELS, BINARY, 0.5, bootstrap=0)
  m.update(records_dir="/r", split="test", fold=None, model_dir="/m", tta=8)
  lines = metrics.format_report(m).splitlines()
  assert lines[0] == "test split of /r: 9 images, model /m, TTA 8"
  assert "threshold: P(Melanoma) >= 0.5" in lines


def test_one_defined_fold_has_no_spread():
  s = metrics.summarize_folds([{"roc_auc": 0.8}, {"roc_auc": None}])
  assert s["roc_auc"] == {"mean": 0.8, "std": None, "n": 1, "values": [0.8, None]}
  assert metrics.format_folds(s).splitlines()[1] == f"  {'roc_auc':<36} 0.8000  (1 folds)"
  with pytest.raises(ValueError, match="^no fold metrics to summarize$"):
    metrics.summarize_folds([])
