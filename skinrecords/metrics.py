"""Metrics from gathered predictions: accuracy, ROC/PR AUC, confusion matrix, collapse, Youden.

AUC is computed with scikit-learn from all predictions gathered on one process, never in-graph:
in-graph AUC under a distribution strategy has been reported above 1 (tensorflow#48152). Training
(per epoch) and evaluation use the same `compute_metrics`.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm

COLLAPSE_FRACTION = 0.99


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


def compute_metrics(probs, labels, classes, threshold: float | None = 0.5) -> dict:
  """Accuracy, ROC AUC, PR AUC (average precision), confusion matrix, per-class report, collapse.

  Two classes: `probs` is [N] P(class 1), predicted positive when >= threshold. K > 2: `probs` is
  [N, K], predicted = argmax (threshold unused), AUCs are one-vs-rest and macro-averaged over the
  classes present in `labels` (per class too). AUCs are None when undefined (one class present).
  """
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
  if k == 2:
    threshold = float(threshold)
    predicted = (probs >= threshold).astype(np.int64)
  else:
    threshold = None
    predicted = probs.argmax(axis=1)
  ids = list(range(k))
  out = {
      "n": n,
      "classes": classes,
      "threshold": threshold,
      "accuracy": float(skm.accuracy_score(labels, predicted)),
      "roc_auc": None,
      "pr_auc": None,
      "label_counts": dict(zip(classes, np.bincount(labels, minlength=k).tolist())),
      "predicted_counts": dict(zip(classes, np.bincount(predicted, minlength=k).tolist())),
      "confusion_matrix": skm.confusion_matrix(labels, predicted, labels=ids).tolist(),
      "classification_report": skm.classification_report(
          labels, predicted, labels=ids, target_names=classes, output_dict=True, zero_division=0),
  }
  if k == 2:
    if len(np.unique(labels)) == 2:
      out["roc_auc"] = float(skm.roc_auc_score(labels, probs))
      out["pr_auc"] = float(skm.average_precision_score(labels, probs))
  else:
    roc, pr = {}, {}
    for c, name in enumerate(classes):
      y = labels == c
      if 0 < y.sum() < n:
        roc[name] = float(skm.roc_auc_score(y, probs[:, c]))
        pr[name] = float(skm.average_precision_score(y, probs[:, c]))
    out["roc_auc_per_class"], out["pr_auc_per_class"] = roc, pr
    if roc:
      out["roc_auc"], out["pr_auc"] = float(np.mean(list(roc.values()))), float(
          np.mean(list(pr.values())))
  top = max(out["predicted_counts"], key=out["predicted_counts"].get)
  count = out["predicted_counts"][top]
  out["collapsed"] = n >= 2 and count >= COLLAPSE_FRACTION * n
  out["warning"] = _collapse_warning(out, top, count) if out["collapsed"] else None
  return out


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
  """Human text: classification report, AUCs, threshold and confusion matrix (also report.txt)."""
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
  fmt = lambda v: "undefined (one class present)" if v is None else f"{v:.4f}"
  avg = " (one-vs-rest, macro)" if len(m["classes"]) > 2 else ""
  lines += ["", f"ROC AUC{avg}: {fmt(m['roc_auc'])}",
            f"PR AUC (average precision){avg}: {fmt(m['pr_auc'])}"]
  if m.get("roc_auc_per_class"):
    lines.append("per class ROC AUC / PR AUC: " + ", ".join(
        f"{c} {m['roc_auc_per_class'][c]:.4f} / {m['pr_auc_per_class'][c]:.4f}"
        for c in m["roc_auc_per_class"]))
  if m["threshold"] is not None:
    lines.append(f"threshold: P({m['classes'][1]}) >= {m['threshold']:.6g}"
                 f"{' (' + m['threshold_source'] + ')' if m.get('threshold_source') else ''}")
  else:
    lines.append("decision: the class with the highest probability")
  lines.append("confusion matrix (rows: true class, columns: predicted class, order "
               f"{', '.join(m['classes'])}):")
  lines += ["  " + " ".join(f"{v:>7d}" for v in row) for row in m["confusion_matrix"]]
  if m["collapsed"]:
    lines += ["", f"WARNING: {m['warning']}"]
  return "\n".join(lines)


# -------------------------------------------------------------------------------------- evaluate
