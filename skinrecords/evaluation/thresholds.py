"""The two-class decision threshold a run chooses on its validation split (--threshold_rule).

A fixed 0.5 trusts the model's probabilities to be centred: the issue-21 runs kept an epoch whose
validation scores were perfectly ranked (AUC 1.000) but all sat above 0.5, and predicted every test
image Melanoma (accuracy 0.50). A threshold chosen on validation follows the boundary wherever the
model put it: replaying 18 such runs, Youden's J on validation left none below test accuracy 0.975.
Pure numpy (the rules are tested without TensorFlow).
"""

from __future__ import annotations

import math

import numpy as np

from skinrecords.evaluation import metrics

DEFAULT_RULE = "youden"
FALLBACK = 0.5
_HELP = "youden, sensitivity:S (S in (0, 1), e.g. sensitivity:0.9) or fixed:T (T in (0, 1))"


def parse_rule(text: str) -> tuple[str, float | None]:
  """("youden", None) | ("sensitivity", S) | ("fixed", T); ValueError naming the choices."""
  kind, _, arg = str(text).strip().lower().partition(":")
  if kind == "youden" and not arg:
    return "youden", None
  if kind in ("sensitivity", "fixed") and arg:
    try:
      value = float(arg)
    except ValueError:
      value = math.nan
    if 0.0 < value < 1.0:
      return kind, value
  raise ValueError(f"threshold_rule={text!r}; expected {_HELP}")


def sensitivity_threshold(probs, labels, target: float) -> float:
  """The highest threshold whose sensitivity on (probs, labels) is >= target (so the best
  specificity that meets it), placed midway to the next lower score as youden_threshold is."""
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top

  probs, labels = np.asarray(probs, np.float64).reshape(-1), np.asarray(labels).reshape(-1)
  if set(np.unique(labels).tolist()) != {0, 1}:
    raise ValueError("a sensitivity threshold needs labels of both classes 0 and 1")
  fpr, tpr, thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
  i = int(np.flatnonzero(tpr >= target - 1e-12)[0])  # thresholds decrease: the first is highest
  if i + 1 < len(thresholds):
    return float((thresholds[i] + thresholds[i + 1]) / 2)
  return float(thresholds[i])


def choose(rule: str, probs, labels) -> tuple[float, str]:
  """(threshold, how it was chosen) by `rule` on these (validation) predictions; a rule that
  cannot be applied (one class, no better than chance) gives FALLBACK and says why."""
  kind, arg = parse_rule(rule)
  n = len(labels)
  if kind == "fixed":
    return float(arg), f"fixed {arg:g} (--threshold_rule={rule})"
  try:
    if kind == "youden":
      return metrics.youden_threshold(probs, labels), f"Youden's J on {n} validation predictions"
    return (sensitivity_threshold(probs, labels, arg),
            f"sensitivity >= {arg:g} on {n} validation predictions")
  except ValueError as err:
    return FALLBACK, f"{FALLBACK} because {rule} could not be applied on validation ({err})"
