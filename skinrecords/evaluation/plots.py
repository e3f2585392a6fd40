"""Figures: training curves, confusion matrix, ROC and precision-recall curves, reliability."""

from __future__ import annotations

import io
import math
import os

import numpy as np
from sklearn import metrics as skm

from skinrecords.core import fileio

# matplotlib's object API (Figure + savefig) renders with Agg and never touches pyplot's global
# state or a display, so it works headless and from threads.


def save_figure(fig, path) -> None:
  """Renders to memory, then one atomic write (fileio): a killed run never leaves half a PNG, and
  a gs:// path works (savefig itself only writes local files)."""
  buf = io.BytesIO()
  fig.savefig(buf, format=os.path.splitext(os.fspath(path))[1].lstrip(".") or "png")
  fileio.write_bytes_atomic(path, buf.getvalue())


def _figure(width=6.0, height=5.0):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (import ~0.3 s)
  fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
  return fig, fig.add_subplot()


def _title(m: dict, what: str) -> str:
  fold = f" fold {m['fold']}" if m.get("fold") is not None else ""
  return f"{what} - {m.get('split', '')}{fold} split, n={m['n']}"


def plot_confusion(path: str | os.PathLike, m: dict) -> None:
  cm = np.asarray(m["confusion_matrix"])
  k = len(m["classes"])
  fig, ax = _figure(max(5.0, 1.0 + 0.9 * k), max(4.2, 0.8 + 0.8 * k))
  rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # colour: fraction of the true class
  im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
  fig.colorbar(im, ax=ax, label="fraction of the true class")
  for i in range(k):
    for j in range(k):
      ax.text(j, i, f"{cm[i, j]}\n({rows[i, j]:.0%})", ha="center", va="center",
              color="white" if rows[i, j] > 0.5 else "black")
  ax.set_xticks(range(k), m["classes"], rotation=30 if k > 3 else 0, ha="right" if k > 3 else
                "center")
  ax.set_yticks(range(k), m["classes"])
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  rule = (f"P({m['classes'][1]}) >= {m['threshold']:.3g}" if m["threshold"] is not None
          else "argmax")
  ax.set_title(f"{_title(m, 'Confusion matrix')}\naccuracy {m['accuracy']:.3f}, {rule}"
               + ("\nWARNING: collapsed to one class" if m["collapsed"] else ""),
               color="red" if m["collapsed"] else "black")
  save_figure(fig, path)


def plot_curves(roc_path: str | os.PathLike, pr_path: str | os.PathLike, probs, labels, m: dict) -> None:
  classes = m["classes"]
  binary = len(classes) == 2
  # (name, y_true, score) per curve: the positive class for two classes, one-vs-rest otherwise.
  curves = [(classes[1], labels == 1, probs)] if binary else [
      (c, labels == i, probs[:, i]) for i, c in enumerate(classes)]
  curves = [c for c in curves if 0 < c[1].sum() < len(labels)]
  fig_roc, ax_roc = _figure()
  fig_pr, ax_pr = _figure()
  for name, y, score in curves:
    fpr, tpr, _ = skm.roc_curve(y, score)
    precision, recall, _ = skm.precision_recall_curve(y, score)
    auc = skm.roc_auc_score(y, score)
    ap = skm.average_precision_score(y, score)
    label = "" if binary else f"{name}: "
    ax_roc.plot(fpr, tpr, lw=2, label=f"{label}AUC = {auc:.3f}")
    ax_pr.step(recall, precision, where="post", lw=2, label=f"{label}AP = {ap:.3f}")
    if binary:
      pred = score >= m["threshold"]
      point = (pred[~y].mean(), pred[y].mean())
      ax_roc.plot(*point, "o", color="red", label=f"threshold {m['threshold']:.3g}")
      ax_pr.axhline(y.mean(), ls="--", color="grey", label=f"chance (prevalence {y.mean():.3f})")
  ax_roc.plot([0, 1], [0, 1], ls="--", color="grey", label="chance")
  if not curves:
    for ax in (ax_roc, ax_pr):
      ax.text(0.5, 0.5, "undefined: only one class present", ha="center", va="center")
  positive = f" ({classes[1]} positive)" if binary else " (one-vs-rest)"
  for ax, fig, path, what, xlabel, ylabel in (
      (ax_roc, fig_roc, roc_path, "ROC", "false positive rate (1 - specificity)",
       "true positive rate (sensitivity)"),
      (ax_pr, fig_pr, pr_path, "Precision-recall", "recall (sensitivity)",
       "precision (positive predictive value)")):
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(_title(m, what + positive))
    ax.grid(alpha=0.3)
    if curves:
      ax.legend(loc="lower right" if what == "ROC" else "lower left")
    save_figure(fig, path)


def plot_history(history: list[dict], out_dir: str | os.PathLike) -> list[str]:
  """The notebook's curves, train vs validation: accuracy.png, loss.png, auc.png."""
  epochs = [int(r["epoch"]) for r in history]
  paths = []
  for key, title in (("accuracy", "Accuracy"), ("loss", "Loss"), ("auc", "ROC AUC")):
    fig, ax = _figure(6.0, 4.0)
    for prefix, label in (("", "train"), ("val_", "validation")):
      values = [float(r[prefix + key]) for r in history]
      if not all(math.isnan(v) for v in values):
        ax.plot(epochs, values, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.set_title(f"{title}: train vs validation")
    ax.grid(alpha=0.3)
    ax.legend()
    path = fileio.join(out_dir, f"{key}.png")
    save_figure(fig, path)
    paths.append(path)
  return paths


def _roc_input(probs, labels, classes) -> tuple[np.ndarray, np.ndarray]:
  """(y_true, score) of one ROC curve: the positive class for two classes, else micro-averaged
  one-vs-rest (every (example, class) pair is one binary decision)."""
  probs, labels = np.asarray(probs), np.asarray(labels)
  if len(classes) == 2:
    return labels == 1, probs
  return (labels[:, None] == np.arange(len(classes))[None, :]).ravel(), probs.ravel()


def cv_roc(path, folds, probs, labels, classes) -> None:
  """cv_roc.png: each fold's out-of-fold ROC (thin) and the pooled one over all folds (thick).

  `folds` is [(fold, probs, labels)]; `probs`/`labels` are the pooled predictions. Folds whose
  validation part holds a single class have no ROC and are named in the legend as undefined.
  """
  fig, ax = _figure()
  for fold, fold_probs, fold_labels in folds:
    y, score = _roc_input(fold_probs, fold_labels, classes)
    if 0 < y.sum() < len(y):
      fpr, tpr, _ = skm.roc_curve(y, score)
      ax.plot(fpr, tpr, lw=1, alpha=0.7, label=f"fold {fold}: AUC = {skm.auc(fpr, tpr):.3f}")
    else:
      ax.plot([], [], lw=1, label=f"fold {fold}: undefined (one class)")
  y, score = _roc_input(probs, labels, classes)
  if 0 < y.sum() < len(y):
    fpr, tpr, _ = skm.roc_curve(y, score)
    ax.plot(fpr, tpr, lw=2.5, color="black", label=f"pooled: AUC = {skm.auc(fpr, tpr):.3f}")
  ax.plot([0, 1], [0, 1], ls="--", color="grey", label="chance")
  what = f"class '{classes[1]}' positive" if len(classes) == 2 else "micro-averaged one-vs-rest"
  ax.set_title(f"Out-of-fold ROC, {len(folds)} folds, n={len(np.asarray(labels))} ({what})")
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.set_xlabel("false positive rate (1 - specificity)")
  ax.set_ylabel("true positive rate (sensitivity)")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  save_figure(fig, path)


def plot_reliability(path, bins: list[dict], m: dict) -> None:
  """Reliability diagram: per confidence bin, accuracy against mean confidence (top label), with
  the bin counts underneath; the diagonal is perfect calibration."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6.0, 6.0), dpi=110, layout="constrained")
  ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
  widths = [b["high"] - b["low"] for b in bins]
  lows = [b["low"] for b in bins]
  ax.bar(lows, [b["accuracy"] for b in bins], width=widths, align="edge", edgecolor="black",
         alpha=0.7, label="accuracy in bin")
  ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="red",
          label="(mean confidence, accuracy)")
  ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfectly calibrated")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_ylabel("accuracy")
  ece = m.get("ece")
  temp = (m.get("calibration") or {}).get("note")
  ax.set_title(_title(m, "Reliability") + (f"\nECE {ece:.4f}, Brier {m['brier']:.4f}"
                                           if ece is not None else "") +
               (f"\n{temp}" if temp else ""))
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left")
  ax_n.bar(lows, [b["count"] for b in bins], width=widths, align="edge", edgecolor="black")
  ax_n.set_xlabel("confidence of the predicted class")
  ax_n.set_ylabel("images")
  save_figure(fig, path)
