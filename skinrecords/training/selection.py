"""Which epoch a training run keeps as model.keras, by rule (RULES), and how they fall back.

Pure Python (no TensorFlow import): the state it updates is anything with `best`, `best_tiebreak`
and `best_epoch` holding `.numpy()` / `.assign()` (train.py's checkpointed tf.Variables), so the
rules can be tested, and replayed offline over saved histories (benchmarks/selection.py), in
milliseconds.

Why the default is not the highest validation AUC (issue 21): with 60+60 validation images the AUC
moves in steps of 1/3600 and saturates at 1.000 early, and an epoch whose scores all sit on one side
of 0.5 (val_accuracy 0.50, val_loss 0.57) beat a later one at 0.9997 with val_loss 0.145: test
accuracy 0.50. AUC is blind to a shifted decision boundary; the loss is not. The replay over many
seeds that chose DEFAULT is in BUILD_NOTES ("Epoch selection and the decision threshold").
"""

from __future__ import annotations

import logging
import math

# --select_by: how the epoch saved as model.keras is chosen.
RULES = {
    "val_loss": "the lowest validation loss",
    "val_auc_loss": "the lowest validation loss among epochs whose validation AUC is within "
                    "AUC_TOLERANCE of the kept one's (a clearly higher AUC wins)",
    "val_auc": "the highest validation ROC AUC; a later epoch with equal AUC and lower "
               "validation loss wins (the rule before issue 21: a saturated AUC can keep a "
               "mis-calibrated epoch)",
    "last": "the last epoch trained (chosen by the schedule, by no split: the cross-validation "
            "default, so the out-of-fold estimate is honest)",
}
DEFAULT = "val_loss"
# A difference in validation AUC below this is noise, not a better ranking: the issue-21 runs'
# saturated epochs differed by 1/3600 to 3/3600 (60+60 images), and the bootstrap standard error of
# an AUC of 0.99 on 120 images is ~0.006.
AUC_TOLERANCE = 0.005
# Fallbacks, said in the log and summary.json.
SELECTION = {
    **{name: f"validation: {text}" for name, text in RULES.items()},
    "val_loss_fallback": "validation loss, because the validation AUC is undefined (the "
                         "validation split holds a single class)",
    "loss": "training loss, because there is no validation split (e.g. Kaggle files without "
            "--fold); the saved epoch may overfit",
}


def check_rule(rule: str) -> None:
  if rule not in RULES:
    raise ValueError(f"select_by={rule!r}; choose one of {', '.join(RULES)}")


def criterion(row: dict, has_valid: bool, rule: str = DEFAULT) -> tuple[str, float, float]:
  """(criterion, score, tie-break) for one history row: higher is better for both."""
  if rule == "last":
    return "last", float(row["epoch"]), 0.0
  if not has_valid:
    return "loss", -row["loss"], 0.0
  if rule == "val_loss":
    return "val_loss", -row["val_loss"], 0.0
  if math.isfinite(row["val_auc"]):
    return rule, row["val_auc"], -row["val_loss"]
  return "val_loss_fallback", -row["val_loss"], 0.0


def beats(score: float, tiebreak: float, best: float, best_tiebreak: float,
          name: str = "val_auc") -> bool:
  """Whether (score, tiebreak) beats the best so far under criterion `name`; NaN never does."""
  if not math.isfinite(score):
    return False
  if name == "val_auc_loss" and math.isfinite(best):
    return bool(score > best + AUC_TOLERANCE or
                (score >= best - AUC_TOLERANCE and tiebreak > best_tiebreak))
  return bool(score > best or (score == best and tiebreak > best_tiebreak))


def update_best(state, row: dict, epoch: int, has_valid: bool, first: bool,
                rule: str = DEFAULT) -> bool:
  """Whether this epoch beats the kept one under `rule`; records it in the checkpointed state.
  Every worker gathered the same predictions, so every worker takes the same decision."""
  name, score, tiebreak = criterion(row, has_valid, rule)
  if first and name == "val_loss_fallback":
    logging.warning("validation AUC is undefined: the best epoch is chosen by %s",
                    SELECTION["val_loss_fallback"])
  improved = beats(score, tiebreak, float(state.best.numpy()), float(state.best_tiebreak.numpy()),
                   name)
  if improved:
    state.best.assign(score)
    state.best_tiebreak.assign(tiebreak)
    state.best_epoch.assign(epoch + 1)
  return improved


def replay(rows: list[dict], has_valid: bool = True, rule: str = DEFAULT) -> int:
  """The epoch (1-based) `rule` keeps over these history rows, as training would."""
  state = _ReplayState()
  for i, row in enumerate(rows):
    update_best(state, row, i, has_valid, first=i == 0, rule=rule)
  return int(state.best_epoch.numpy())


class _Value:
  def __init__(self, v):
    self.v = v

  def numpy(self):
    return self.v

  def assign(self, v):
    self.v = v


class _ReplayState:
  def __init__(self):
    self.best, self.best_tiebreak, self.best_epoch = _Value(-math.inf), _Value(-math.inf), _Value(0)
