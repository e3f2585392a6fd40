"""Metrics from gathered predictions: accuracy, ROC/PR AUC, confusion matrix, collapse, Youden.

AUC is computed with scikit-learn from all predictions gathered on one process, never in-graph:
in-graph AUC under a distribution strategy has been reported above 1 (tensorflow#48152). Training
(per epoch) and evaluation use the same `compute_metrics`.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm

from skinrecords.evaluation import uncertainty

COLLAPSE_FRACTION = 0.99
# Clinical operating points: a melanoma triage tool is judged at high specificity (few needless
# excisions) or high sensitivity (few missed melanomas), not at one arbitrary threshold.
SPECIFICITY_TARGETS = (0.80, 0.90, 0.95)
SENSITIVITY_TARGETS = (0.90, 0.95)


def youden_threshold(probs, labels) -> float:
  """The P(class 1) threshold maximising TPR - FPR (Youden's J) for `probs >= threshold`.

  Every threshold in (next lower score, s] gives the same J as the score s where the maximum is
  first reached (scanning from high to low, so ties go to fewer positives); the midpoint of that
  interval is returned, so a new score just below s is not decided by a hair (with well separated
  validation scores, s itself can be 0.9999). Raises ValueError when labels hold only one class or
  no threshold beats chance (max J <= 0: the scores are uninformative or the classes inverted).
  """
  probs = np.asarray(probs, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  present = set(np.unique(labels).tolist())
  if present != {0, 1}:
    raise ValueError(f"youden threshold needs labels of both classes 0 and 1; got "
                     f"{sorted(present)}")
  # drop_intermediate=False keeps every distinct score: thresholds[i + 1] is the next lower one.
  fpr, tpr, thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
  j = tpr - fpr
  best = int(np.argmax(j))  # thresholds decrease, so the first maximum is the highest threshold
  if j[best] <= 0 or not math.isfinite(thresholds[best]):
    raise ValueError(f"no threshold beats chance on these {len(labels)} predictions (max TPR-FPR "
                     f"= {j[best]:.3f}); use a fixed threshold such as 0.5")
  if best + 1 < len(thresholds):
    return float((thresholds[best] + thresholds[best + 1]) / 2)
  return float(thresholds[best])


def compute_metrics(probs, labels, classes, threshold: float | None = 0.5, *, groups=None,
                    bootstrap: int = uncertainty.DEFAULT_RESAMPLES, seed: int = 0) -> dict:
  """Accuracy, ROC AUC, PR AUC (average precision), confusion matrix, per-class report, collapse.

  Two classes: `probs` is [N] P(class 1), predicted positive when >= threshold; adds sensitivity
  and specificity at the threshold, the clinical operating points and the ISIC `auc_sens_80`.
  K > 2: `probs` is [N, K], predicted = argmax (threshold unused), AUCs are one-vs-rest and
  macro-averaged over the classes present in `labels` (per class too); classes with no image are
  named in `absent_classes`. AUCs are None when undefined (one class present).

  `bootstrap` resamples (0: none) give 95 % percentile intervals (`roc_auc_ci`, ...), resampling
  patients when `groups` holds one patient id per prediction, images otherwise; `seed` fixes them.
  """
  classes, probs, labels = _checked(probs, labels, classes)
  k, n = len(classes), len(labels)
  if k == 2:
    threshold = float(threshold)
    predicted = (probs >= threshold).astype(np.int64)
  else:
    threshold = None
    predicted = probs.argmax(axis=1)
  ids = list(range(k))
  label_counts = np.bincount(labels, minlength=k)
  out = {
      "n": n,
      "classes": classes,
      "threshold": threshold,
      "accuracy": float(skm.accuracy_score(labels, predicted)),
      "roc_auc": None,
      "pr_auc": None,
      "label_counts": dict(zip(classes, label_counts.tolist())),
      "predicted_counts": dict(zip(classes, np.bincount(predicted, minlength=k).tolist())),
      "absent_classes": [c for c, count in zip(classes, label_counts) if count == 0],
      "confusion_matrix": skm.confusion_matrix(labels, predicted, labels=ids).tolist(),
      "classification_report": skm.classification_report(
          labels, predicted, labels=ids, target_names=classes, output_dict=True, zero_division=0),
  }
  out.update(_binary_metrics(probs, labels, predicted) if k == 2 else
             _multiclass_aucs(probs, labels, classes))
  top = max(out["predicted_counts"], key=out["predicted_counts"].get)
  count = out["predicted_counts"][top]
  out["collapsed"] = n >= 2 and count >= COLLAPSE_FRACTION * n
  out["warning"] = _collapse_warning(out, top, count) if out["collapsed"] else None
  if bootstrap:
    out.update(uncertainty.bootstrap_ci(probs, labels, threshold=threshold, groups=groups,
                                        resamples=bootstrap, seed=seed))
  return out


def _checked(probs, labels, classes):
  """Arrays of the right shapes and dtypes, or a ValueError naming what is wrong."""
  classes = [str(c) for c in classes]
  k = len(classes)
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  probs = np.asarray(probs, np.float64)
  if k == 2:
    probs = probs.reshape(-1)
  n = len(labels)
  if n == 0:
    raise ValueError("no predictions to evaluate (the split is empty)")
  if probs.shape != ((n,) if k == 2 else (n, k)):
    raise ValueError(f"probabilities of shape {probs.shape} do not fit {n} labels and {k} classes")
  bad = int(np.sum(~np.isfinite(probs)))
  if bad:
    raise ValueError(f"{bad} of {probs.size} probabilities are NaN or infinite: the model's "
                     "weights have diverged")
  if labels.min() < 0 or labels.max() >= k:
    raise ValueError(f"labels range over [{labels.min()}, {labels.max()}] but there are {k} "
                     f"classes {classes}")
  return classes, probs, labels


def _binary_metrics(probs, labels, predicted) -> dict:
  positives, negatives = labels == 1, labels == 0
  out = {
      "sensitivity": float(predicted[positives].mean()) if positives.any() else None,
      "specificity": float(1 - predicted[negatives].mean()) if negatives.any() else None,
  }
  if positives.any() and negatives.any():
    out["roc_auc"] = float(skm.roc_auc_score(labels, probs))
    out["pr_auc"] = float(skm.average_precision_score(labels, probs))
    out["auc_sens_80"] = auc_above_sensitivity(probs, labels, 0.80)
    out.update(operating_points(probs, labels))
  return out


def _multiclass_aucs(probs, labels, classes) -> dict:
  roc, pr = {}, {}
  for c, name in enumerate(classes):
    y = labels == c
    if 0 < y.sum() < len(labels):
      roc[name] = float(skm.roc_auc_score(y, probs[:, c]))
      pr[name] = float(skm.average_precision_score(y, probs[:, c]))
  out = {"roc_auc_per_class": roc, "pr_auc_per_class": pr}
  if roc:
    out["roc_auc"] = float(np.mean(list(roc.values())))
    out["pr_auc"] = float(np.mean(list(pr.values())))
  return out


def operating_points(probs, labels) -> dict:
  """Sensitivity at fixed specificities and specificity at fixed sensitivities, from the ROC curve.

  No interpolation between ROC points: each value is reached by a real threshold (`probs >=
  threshold`), the best one meeting the constraint. Interpolating would report a rate no single
  threshold gives (only a coin flip between two thresholds would), which overstates it on small
  splits. Ties between points with the same target rate keep the better other rate.
  """
  fpr, tpr, thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
  points, sens_at, spec_at = [], {}, {}
  eps = 1e-12  # rates are ratios of counts: 1 - 2/10 must count as specificity 0.80
  for target in SPECIFICITY_TARGETS:
    ok = np.flatnonzero(1 - fpr >= target - eps)  # a prefix: FPR grows along the curve
    i = ok[np.argmax(tpr[ok])]  # first maximum: same sensitivity at the lowest FPR
    sens_at[f"{target:.2f}"] = float(tpr[i])
    points.append(_point(f"specificity >= {target:.2f}", tpr[i], fpr[i], thresholds[i]))
  for target in SENSITIVITY_TARGETS:
    ok = np.flatnonzero(tpr >= target - eps)  # a suffix, never empty: the last point has TPR 1
    i = ok[np.flatnonzero(fpr[ok] == fpr[ok].min())[-1]]  # lowest FPR, then highest TPR
    spec_at[f"{target:.2f}"] = float(1 - fpr[i])
    points.append(_point(f"sensitivity >= {target:.2f}", tpr[i], fpr[i], thresholds[i]))
  return {"sensitivity_at_specificity": sens_at, "specificity_at_sensitivity": spec_at,
          "operating_points": points}


def _point(constraint, tpr, fpr, threshold) -> dict:
  # roc_curve's first threshold is +inf (nothing predicted positive): JSON has no infinity.
  return {"constraint": constraint, "sensitivity": float(tpr), "specificity": float(1 - fpr),
          "threshold": float(threshold) if math.isfinite(threshold) else None}


def auc_above_sensitivity(probs, labels, min_sensitivity: float = 0.80) -> float:
  """ROC area over the part of the curve with sensitivity >= `min_sensitivity` (ISIC `auc_sens_80`).

  Computed as the ISIC Challenge scorer (isic-challenge-scoring, `auc_above_sensitivity`) does: not
  scikit-learn's `max_fpr` partial AUC, which applies the McClish correction, but the raw area
  under the ROC curve between the FPR where the curve first reaches `min_sensitivity` (linear
  between ROC points) and FPR 1. Perfect scores give 1; chance gives 0.18 at 0.80. Note: the 2024
  Kaggle ISIC pAUC is a different number (the area above TPR 0.80 only, at most 0.2).
  """
  if not 0 < min_sensitivity <= 1:
    raise ValueError(f"min_sensitivity must be in (0, 1]; got {min_sensitivity}")
  fpr, tpr, _ = skm.roc_curve(labels, probs, drop_intermediate=False)
  i = int(np.searchsorted(tpr, min_sensitivity, side="left"))  # first point at or above it
  # TPR starts at 0 < min_sensitivity, so i >= 1 and the segment [i - 1, i] straddles the target.
  start = np.interp(min_sensitivity, tpr[i - 1:i + 1], fpr[i - 1:i + 1])
  return float(skm.auc(np.r_[start, fpr[i:]], np.r_[min_sensitivity, tpr[i:]]))


def _collapse_warning(m: dict, top: str, count: int) -> str:
  msg = (f"{count} of {m['n']} predictions ({count / m['n']:.1%}) are class {top!r}: the "
         "classifier has collapsed to one class.")
  auc = m["roc_auc"]
  if m["threshold"] is not None and auc is not None and auc >= 0.6:
    return msg + (f" ROC AUC {auc:.3f} says the scores still rank the classes, so the threshold "
                  f"{m['threshold']:g} may be what is wrong: try threshold='youden'.")
  return msg + (" The scores do not separate the classes either" +
                (f" (ROC AUC {auc:.3f})" if auc is not None else "") +
                ": check that the model was fed RGB 0..255 images (no extra rescaling), the class "
                "balance (class weights or oversampling) and the training curves.")


def format_report(m: dict) -> str:
  """Human text: classification report, AUCs with CIs, operating points, threshold, confusion."""
  lines = []
  if "records_dir" in m:
    fold = f" (fold {m['fold']})" if m.get("fold") is not None else ""
    lines.append(f"{m['split']} split{fold} of {m['records_dir']}: {m['n']} images, model "
                 f"{m['model_dir']}, TTA {m['tta'] or 'off'}")
  width = max(12, *(len(c) for c in m["classes"]))
  rep = m["classification_report"]
  lines.append(f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}")
  for name in (*m["classes"], "macro avg", "weighted avg"):
    r = rep[name]
    if name == "macro avg":
      lines.append(f"{'accuracy':>{width}} {'':>9} {'':>9} {m['accuracy']:>9.4f} {m['n']:>9d}")
    lines.append(f"{name:>{width}} {r['precision']:>9.4f} {r['recall']:>9.4f} "
                 f"{r['f1-score']:>9.4f} {int(r['support']):>9d}")
  lines += [""] + _estimate_lines(m)
  if m.get("roc_auc_per_class"):
    lines.append("per class ROC AUC / PR AUC: " + ", ".join(
        f"{c} {m['roc_auc_per_class'][c]:.4f} / {m['pr_auc_per_class'][c]:.4f}"
        for c in m["roc_auc_per_class"]))
  lines += _operating_point_lines(m)
  if m["threshold"] is not None:
    lines.append(f"threshold: P({m['classes'][1]}) >= {m['threshold']:.6g}"
                 f"{' (' + m['threshold_source'] + ')' if m.get('threshold_source') else ''}")
  else:
    lines.append("decision: the class with the highest probability")
  lines.append("confusion matrix (rows: true class, columns: predicted class, order "
               f"{', '.join(m['classes'])}):")
  lines += ["  " + " ".join(f"{v:>7d}" for v in row) for row in m["confusion_matrix"]]
  if m.get("absent_classes") and len(m["classes"]) > 2:
    present = len(m["classes"]) - len(m["absent_classes"])
    lines += ["", f"WARNING: no image of class {', '.join(map(repr, m['absent_classes']))} in "
                  f"this split: its AUCs are undefined and the macro averages cover the other "
                  f"{present} classes only."]
  if m["collapsed"]:
    lines += ["", f"WARNING: {m['warning']}"]
  return "\n".join(lines)


def _estimate_lines(m: dict) -> list[str]:
  """Point estimates, each with its bootstrap interval in an aligned column when computed."""
  fmt = lambda v: "undefined (one class present)" if v is None else f"{v:.4f}"
  avg = " (one-vs-rest, macro)" if len(m["classes"]) > 2 else ""
  rows = [(f"ROC AUC{avg}", "roc_auc"), (f"PR AUC (average precision){avg}", "pr_auc")]
  if m["threshold"] is not None:
    rows += [("sensitivity at the threshold", "sensitivity"),
             ("specificity at the threshold", "specificity")]
  texts = [f"{name}: {fmt(m.get(key))}" for name, key in rows]
  if "ci_level" not in m:
    return texts
  level = f"{m['ci_level']:.0%} CI"
  pad = max(map(len, texts)) + 2
  lines = [f"{t:<{pad}}{level} " + (f"[{m[key + '_ci'][0]:.4f}, {m[key + '_ci'][1]:.4f}]"
                                    if m.get(key + "_ci") else "undefined")
           for t, (_, key) in zip(texts, rows)]
  skipped = (f"; {m['ci_skipped']} skipped for lacking a class" if m["ci_skipped"] else "")
  lines.append(f"({level}: percentile bootstrap, {m['ci_resamples']} resamples of "
               f"{m['ci_units']} {m['ci_unit']}s, seed {m['ci_seed']}{skipped})")
  if m["ci_unit"] == "image":
    lines.append("(images resampled one by one: if patients have several images here, these "
                 "intervals are too narrow)")
  return lines


def _operating_point_lines(m: dict) -> list[str]:
  if not m.get("operating_points"):
    return []
  lines = [f"ISIC partial AUC above 80% sensitivity (auc_sens_80): {m['auc_sens_80']:.4f} "
           "(chance 0.18, perfect 1)",
           "operating points (each reached by a real threshold, no interpolation"
           + (f"; {m['operating_points_source']}" if m.get("operating_points_source") else "")
           + "):",
           f"  {'constraint':<30} {'sensitivity':>11} {'specificity':>11} {'threshold':>11}"]

  def rate(x):
    return f"{'-':>11}" if x is None else f"{x:>11.4f}"
  for p in m["operating_points"]:
    t = "none" if p["threshold"] is None else f"{p['threshold']:.6g}"
    lines.append(f"  {p['constraint']:<30} {rate(p['sensitivity'])} {rate(p['specificity'])} "
                 f"{t:>11}")
  return lines


# Scalar metrics averaged over folds; nested dicts of scalars (operating points) are flattened.
FOLD_KEYS = ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "auc_sens_80",
             "sensitivity_at_specificity", "specificity_at_sensitivity")


def summarize_folds(fold_metrics: list[dict]) -> dict:
  """Mean ± sample standard deviation over cross-validation folds of each `FOLD_KEYS` metric.

  std uses ddof=1 (folds are a sample of possible splits; ddof=0 would understate the spread of 5
  folds by 11 %). Folds where a metric is undefined (None) are left out of its mean and counted:
  `n` says how many folds it averages. The pooled CI is `compute_metrics` on the concatenated
  out-of-fold predictions with patient ids, not computed here.
  """
  if not fold_metrics:
    raise ValueError("no fold metrics to summarize")
  values: dict[str, list] = {}
  for m in fold_metrics:
    for key in FOLD_KEYS:
      v = m.get(key)
      items = v.items() if isinstance(v, dict) else [(None, v)]
      for sub, x in items:
        values.setdefault(key if sub is None else f"{key}_{sub}", []).append(x)
  out = {"n_folds": len(fold_metrics)}
  for key, xs in values.items():
    defined = np.array([x for x in xs if x is not None], np.float64)
    if not len(defined):
      continue
    out[key] = {"mean": float(defined.mean()),
                "std": float(defined.std(ddof=1)) if len(defined) > 1 else None,
                "n": len(defined), "values": [None if x is None else float(x) for x in xs]}
  return out


def format_folds(summary: dict) -> str:
  """One line per metric: `roc_auc  0.9123 ± 0.0131  (5 folds)`."""
  lines = [f"mean ± std over {summary['n_folds']} folds:"]
  for key, s in summary.items():
    if key != "n_folds":
      std = "" if s["std"] is None else f" ± {s['std']:.4f}"
      lines.append(f"  {key:<36} {s['mean']:.4f}{std}  ({s['n']} folds)")
  return "\n".join(lines)


# -------------------------------------------------------------------------------------- evaluate


def transferred_operating_points(valid_probs, valid_labels, probs, labels) -> list[dict]:
  """The clinical operating points with their thresholds chosen on (valid_probs, valid_labels) and
  their sensitivity and specificity measured on (probs, labels): what a user who fixed the
  threshold before seeing the test images gets. Chosen on the split reported, they are optimistic
  by construction (each picks the best of every threshold for the images it is scored on)."""
  probs, labels = np.asarray(probs, np.float64).reshape(-1), np.asarray(labels).reshape(-1)
  pos, neg = labels == 1, labels == 0
  out = []
  for p in operating_points(valid_probs, valid_labels)["operating_points"]:
    t = math.inf if p["threshold"] is None else p["threshold"]
    predicted = probs >= t
    out.append({"constraint": p["constraint"] + " on valid",
                "sensitivity": float(predicted[pos].mean()) if pos.any() else None,
                "specificity": float(1 - predicted[neg].mean()) if neg.any() else None,
                "threshold": p["threshold"], "valid_sensitivity": p["sensitivity"],
                "valid_specificity": p["specificity"]})
  return out
