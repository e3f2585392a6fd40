"""Bootstrap confidence intervals for ROC AUC, PR AUC, sensitivity and specificity (numpy only).

A bootstrap resample is represented by how many times each unit (image, or patient when patient
ids are given) was drawn, not by a list of indices: every metric is then a weighted sum over the
predictions sorted once, so 1,000 resamples cost a few passes over a [chunk, N] count matrix instead
of 1,000 sorts and 1,000 scikit-learn calls. With ties grouped by distinct score, the weighted sums
are exactly what scikit-learn computes on the resampled predictions (tests/test_metrics.py checks
`weighted_auc_ap` against `roc_auc_score` / `average_precision_score` on explicit resamples).

Patient-level (cluster) resampling draws patients with replacement and keeps all of a patient's
images together: images of one patient are correlated, so resampling them one by one understates
the spread (an ISIC 2020 patient has 16 images on average: 33,126 images from 2,056 patients).
"""

from __future__ import annotations

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
# Resamples are drawn in chunks so the [chunk, N] float64 count matrices stay ~16 MB at N = 10,000.
_CHUNK = 200


class SortedScores:
  """One score column split into positives and negatives, each sorted, with tie positions.

  For each positive (in sorted order) it keeps how many negatives score strictly below it and how
  many at most equal to it, and how many positives score strictly below it: all a weighted AUC
  and AP need, so a resample costs two cumulative sums and three gathers, no sort.
  """

  def __init__(self, scores, positive):
    scores = np.asarray(scores, np.float64).reshape(-1)
    positive = np.asarray(positive, bool).reshape(-1)
    order = np.argsort(scores, kind="stable")
    self.pos_idx = order[positive[order]]
    self.neg_idx = order[~positive[order]]
    pos_s, neg_s = scores[self.pos_idx], scores[self.neg_idx]
    self.neg_lo = np.searchsorted(neg_s, pos_s, side="left")
    self.neg_hi = np.searchsorted(neg_s, pos_s, side="right")
    self.pos_lo = np.searchsorted(pos_s, pos_s, side="left")


def _cumsum0(w: np.ndarray) -> np.ndarray:
  """Cumulative sums along rows with a leading 0 column: out[:, j] = sum of w[:, :j]."""
  out = np.zeros((w.shape[0], w.shape[1] + 1))
  np.cumsum(w, axis=1, out=out[:, 1:])
  return out


def weighted_auc_ap(sorted_scores: SortedScores, weights) -> tuple[np.ndarray, np.ndarray]:
  """ROC AUC and average precision of each row of `weights` [B, N] (counts in original order).

  AUC is the Mann-Whitney statistic: P(positive score > negative score) + 1/2 P(tie). AP is the
  sum over positives of weight x precision at the threshold equal to its score, scikit-learn's
  definition (tied scores are one threshold; no interpolation). Rows without a positive or a
  negative give NaN.
  """
  ss = sorted_scores
  w = np.atleast_2d(np.asarray(weights, np.float64))
  w_pos = w[:, ss.pos_idx]
  cneg, cpos = _cumsum0(w[:, ss.neg_idx]), _cumsum0(w_pos)
  n_pos, n_neg = cpos[:, -1], cneg[:, -1]
  below = cneg[:, ss.neg_lo]
  tied = cneg[:, ss.neg_hi] - below
  with np.errstate(invalid="ignore", divide="ignore"):
    auc = (w_pos * (below + 0.5 * tied)).sum(axis=1) / (n_pos * n_neg)
    # Predicted positive at the threshold s_j: every score >= s_j.
    tp = n_pos[:, None] - cpos[:, ss.pos_lo]
    fp = n_neg[:, None] - below
    ap = (w_pos * tp / np.maximum(tp + fp, 1e-300)).sum(axis=1) / n_pos
  valid = (n_pos > 0) & (n_neg > 0)
  return np.where(valid, auc, np.nan), np.where(valid, ap, np.nan)


def rank_auc(labels, scores) -> float:
  """ROC AUC of one set of predictions through the same rank sums the bootstrap uses."""
  labels = np.asarray(labels).reshape(-1)
  auc, _ = weighted_auc_ap(SortedScores(scores, labels == 1), np.ones((1, len(labels))))
  return float(auc[0])


def _units(n: int, groups) -> tuple[np.ndarray | None, int, str]:
  """Maps each prediction to its resampling unit; an empty or None patient id is its own unit."""
  if groups is None:
    return None, n, "image"
  groups = [str(g) if g is not None and str(g) != "" else None for g in groups]
  if len(groups) != n:
    raise ValueError(f"{len(groups)} patient ids for {n} predictions; give one id per prediction")
  keys = [g if g is not None else f"\0image {i}" for i, g in enumerate(groups)]
  _, inverse = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
  return inverse.reshape(-1), int(inverse.max()) + 1, "patient"


def _draw_counts(rng, b: int, units: int, inverse) -> np.ndarray:
  """[b, N] times each prediction appears in b resamples of `units` units drawn with replacement."""
  # int32 draws are ~3x faster than int64 ones; they fit while b * units < 2**31.
  dtype = np.int32 if b * units < 2**31 else np.int64
  draws = rng.integers(0, units, size=(b, units), dtype=dtype)
  draws += (units * np.arange(b, dtype=dtype))[:, None]
  counts = np.bincount(draws.reshape(-1), minlength=b * units).reshape(b, units)
  if inverse is not None:  # patients: each image counts as often as its patient was drawn
    counts = counts[:, inverse]
  return counts.astype(np.float64)


def _interval(values: np.ndarray, level: float):
  values = values[np.isfinite(values)]
  if not len(values):
    return None
  lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
  return [float(lo), float(hi)]


def bootstrap_ci(probs, labels, *, threshold: float | None = None, groups=None,
                 resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 level: float = DEFAULT_LEVEL) -> dict:
  """Percentile bootstrap intervals for ROC AUC, PR AUC and, with a threshold, sens/specificity.

  Two classes: `probs` [N] P(class 1). K > 2: `probs` [N, K]; the AUCs are the one-vs-rest macro
  averages over the classes present in `labels`, as in `metrics.compute_metrics`, and a resample
  missing any of them is skipped. Two classes: a resample without a positive or a negative is
  skipped. Skipped resamples are counted in `ci_skipped`, never silently replaced.
  """
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  probs = np.asarray(probs, np.float64)
  n = len(labels)
  inverse, units, unit = _units(n, groups)
  binary = probs.ndim == 1
  present = [1] if binary else [c for c in range(probs.shape[1]) if 0 < np.sum(labels == c) < n]
  columns = [SortedScores(probs if binary else probs[:, c], labels == c) for c in present]
  rng = np.random.default_rng(seed)
  aucs, aps, sens, spec = [], [], [], []
  for start in range(0, resamples, _CHUNK):
    counts = _draw_counts(rng, min(_CHUNK, resamples - start), units, inverse)
    per_class = [weighted_auc_ap(col, counts) for col in columns]
    aucs.append(np.mean([a for a, _ in per_class], axis=0) if per_class else
                np.full(len(counts), np.nan))
    aps.append(np.mean([p for _, p in per_class], axis=0) if per_class else
               np.full(len(counts), np.nan))
    if binary and threshold is not None:
      predicted = probs >= threshold
      with np.errstate(invalid="ignore", divide="ignore"):
        sens.append(counts @ (predicted & (labels == 1)) / (counts @ (labels == 1)))
        spec.append(counts @ (~predicted & (labels == 0)) / (counts @ (labels == 0)))
  auc = np.concatenate(aucs)
  out = {"roc_auc_ci": _interval(auc, level), "pr_auc_ci": _interval(np.concatenate(aps), level)}
  if binary and threshold is not None:
    # Same resamples as the AUCs: those skipped there (one class missing) are skipped here too.
    keep = np.isfinite(auc)
    out["sensitivity_ci"] = _interval(np.concatenate(sens)[keep], level)
    out["specificity_ci"] = _interval(np.concatenate(spec)[keep], level)
  out.update(ci_resamples=int(resamples), ci_skipped=int(np.sum(~np.isfinite(auc))),
             ci_level=float(level), ci_unit=unit, ci_units=units, ci_seed=int(seed))
  return out
