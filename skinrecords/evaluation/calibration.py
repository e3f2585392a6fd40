"""Probability calibration: expected calibration error, Brier score, NLL and temperature scaling.

Definitions (the ones reported in metrics.json):
- ECE is the top-label expected calibration error of Guo et al. 2017 ("On Calibration of Modern
  Neural Networks"): the confidence of the predicted class (two classes: max(p, 1 - p)) in
  `ECE_BINS` equal-width bins, and the example-weighted mean |accuracy - confidence| over the bins.
- Brier score: the mean over examples of sum_k (p_k - y_k)^2 over ALL classes. For two classes this
  is 2x the "binary" Brier mean((p - y)^2) that sklearn's `brier_score_loss` reports; the
  multi-class form is used for every K so that one number means one thing.
- NLL: the mean negative log-likelihood of the true class, probabilities clipped to [1e-7, 1].

Temperature scaling divides the logits by one scalar T fitted by minimising the NLL on the
validation split. Models output logits but every caller sees probabilities (`inference`), so the
logits are recovered from them: logit(p) for one output, log(p) for softmax (softmax is invariant to
the constant lost). float32 sigmoid saturates at logit ~16.6 (1 - 6e-8 is float32's last step below
1), so a deliberately over-confident model's largest logits all read 16.6: temperature still fits
and still lowers the NLL (tested), it just cannot tell those apart. T > 0 is monotone, so the
predicted class (argmax, or p >= 0.5) never changes; thresholds other than 0.5 do move with T.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15  # Guo et al. 2017's choice; with a few hundred test images more bins sit empty
_EPS = 1e-7
# The search range for T: 1/20 sharpens the softest model we would want to help, 20 flattens a
# network whose logits are 20x too large (over-confident ResNets in Guo et al. need T ~ 1.5-3).
T_RANGE = (0.05, 20.0)


def _one_hot_probs(probs) -> np.ndarray:
  """[N] P(class 1) -> [N, 2]; [N, K] unchanged (float64)."""
  p = np.asarray(probs, np.float64)
  return np.stack([1.0 - p, p], axis=1) if p.ndim == 1 else p


def confidence_and_correct(probs, labels) -> tuple[np.ndarray, np.ndarray]:
  """Top-label confidence and whether the top label is right (two classes: the 0.5 rule)."""
  p = _one_hot_probs(probs)
  predicted = p.argmax(axis=1)
  return p.max(axis=1), predicted == np.asarray(labels)


def reliability_bins(probs, labels, bins: int = ECE_BINS) -> list[dict]:
  """Per non-empty bin: its range, count, mean confidence and accuracy (for the diagram)."""
  conf, correct = confidence_and_correct(probs, labels)
  edges = np.linspace(0.0, 1.0, bins + 1)
  which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
  out = []
  for b in range(bins):
    mask = which == b
    if mask.any():
      out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(mask.sum()),
                  "confidence": float(conf[mask].mean()), "accuracy": float(correct[mask].mean())})
  return out


def expected_calibration_error(probs, labels, bins: int = ECE_BINS) -> float:
  n = len(labels)
  if n == 0:
    return float("nan")
  return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"])
                   for b in reliability_bins(probs, labels, bins)) / n)


def brier_score(probs, labels) -> float:
  p = _one_hot_probs(probs)
  y = np.eye(p.shape[1])[np.asarray(labels, np.int64)]
  return float(np.mean(np.sum((p - y) ** 2, axis=1)))


def nll(probs, labels) -> float:
  p = _one_hot_probs(probs)
  true = p[np.arange(len(p)), np.asarray(labels, np.int64)]
  return float(-np.mean(np.log(np.clip(true, _EPS, 1.0))))


def calibration_metrics(probs, labels) -> dict:
  """ece, brier and nll, as written to metrics.json."""
  return {"ece": expected_calibration_error(probs, labels), "brier": brier_score(probs, labels),
          "nll": nll(probs, labels), "ece_bins": ECE_BINS}


def to_logits(probs) -> np.ndarray:
  """Logits that give back `probs`: logit(p) for [N], log(p) for [N, K] (up to a constant)."""
  p = np.clip(np.asarray(probs, np.float64), _EPS, 1.0 - _EPS)
  return np.log(p) - np.log1p(-p) if p.ndim == 1 else np.log(p)


def apply_temperature(probs, temperature: float) -> np.ndarray:
  """Probabilities of logits / T (same shape and dtype float64)."""
  z = to_logits(probs) / float(temperature)
  if z.ndim == 1:
    return 1.0 / (1.0 + np.exp(-z))
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def _nll_of_logits(z: np.ndarray, labels: np.ndarray) -> float:
  """Mean NLL computed from logits, unclipped: clipping probabilities at 1e-7 (as `nll` does for
  reporting) caps a confident mistake's cost at 16.1, and the fit then sharpened a model with 17 %
  wrong answers towards T = 0.05 (seen on a 12-image validation split)."""
  if z.ndim == 1:
    signed = np.where(labels == 1, -z, z)  # -log sigmoid(z) = softplus(-z) for label 1
    return float(np.mean(np.logaddexp(0.0, signed)))
  top = z.max(axis=1, keepdims=True)
  lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
  return float(np.mean(lse - z[np.arange(len(z)), labels]))


def fit_temperature(probs, labels) -> float:
  """T in T_RANGE minimising the NLL of `labels` under apply_temperature(probs, T).

  The NLL is convex in 1/T (a log-sum-exp of a linear function of it), so a bounded scalar search
  over 1/T finds the global minimum; scipy comes with scikit-learn."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top

  labels = np.asarray(labels, np.int64)
  if len(labels) == 0:
    raise ValueError("cannot fit a temperature on 0 examples")
  z = to_logits(probs)
  result = optimize.minimize_scalar(lambda inv_t: _nll_of_logits(z * inv_t, labels),
                                    bounds=(1.0 / T_RANGE[1], 1.0 / T_RANGE[0]), method="bounded",
                                    options={"xatol": 1e-6})
  t = 1.0 / float(result.x)
  return t if math.isfinite(t) else 1.0


# Platt scaling (Platt 1999): P = sigmoid(a * logit(p) + b), slope a and intercept b fitted by the
# NLL on the validation split. Unlike a temperature (b = 0), the intercept moves the 0.5 boundary:
# it can fix a model whose well-ranked scores all sit on one side of 0.5 (issue 21). Two classes
# only; a > 0 keeps the ranking (AUCs unchanged), so a threshold maps through it monotonically.
PLATT_SLOPE_RANGE = (1.0 / T_RANGE[1], 1.0 / T_RANGE[0])  # a is 1/T when b = 0: the same bounds


def fit_platt(probs, labels) -> tuple[float, float]:
  """(slope a, intercept b) minimising the NLL of `labels` under apply_platt(probs, a, b); the
  slope is kept in PLATT_SLOPE_RANGE (a tiny validation split can otherwise push it to 0 or +inf).
  The NLL is convex in (a, b), so L-BFGS-B from (1, 0) finds the minimum."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top

  labels = np.asarray(labels, np.int64)
  z = to_logits(probs)
  if z.ndim != 1:
    raise ValueError("Platt scaling is for two-class models (one logit); use temperature")
  if len(labels) == 0 or len(set(labels.tolist())) < 2:
    raise ValueError("Platt scaling needs validation labels of both classes")
  result = optimize.minimize(lambda ab: _nll_of_logits(ab[0] * z + ab[1], labels),
                             x0=np.array([1.0, 0.0]), method="L-BFGS-B",
                             bounds=[PLATT_SLOPE_RANGE, (-50.0, 50.0)])
  a, b = (float(v) for v in result.x)
  return a, b


def apply_platt(probs, slope: float, intercept: float) -> np.ndarray:
  """sigmoid(slope * logit(p) + intercept), float64."""
  z = to_logits(probs)
  return 1.0 / (1.0 + np.exp(-(float(slope) * z + float(intercept))))


def apply(cal: dict | None, probs) -> np.ndarray:
  """A calibration.json dict (temperature or platt) applied to probabilities; None: unchanged."""
  if not cal:
    return probs
  if cal.get("method") == "platt":
    return apply_platt(probs, cal["slope"], cal["intercept"])
  return apply_temperature(probs, cal["temperature"])


def map_threshold(cal: dict | None, threshold: float) -> float:
  """The threshold on calibrated probabilities that decides as `threshold` did on the raw ones
  (both calibrations are increasing maps of P(class 1))."""
  return float(apply(cal, np.array([threshold]))[0]) if cal else float(threshold)
