"""Which epoch a training run keeps as model.keras (SELECTION), and the tie rule.

Pure Python (no TensorFlow import): the state it updates is anything with `best`, `best_tiebreak`
and `best_epoch` holding `.numpy()` / `.assign()` (train.py's checkpointed tf.Variables), so the
rule can be tested, and mutation-tested, in milliseconds.
"""

from __future__ import annotations

import logging
import math

# How the epoch saved as model.keras is chosen, by what the run has. Ties on validation AUC are
# common on small or easy validation sets (80 synthetic images reached AUC 1.000 by epoch 4 of 10),
# and keeping the FIRST such epoch kept models whose probabilities were well ranked but sat on one
# side of 0.5 (val_loss 0.60, test accuracy 0.50-0.64: issue 15); the later epoch with the lower
# validation loss wins a tie instead.
SELECTION = {
    "val_auc": "validation ROC AUC; a later epoch with equal AUC and lower validation loss wins",
    "val_loss": "validation loss, because the validation AUC is undefined (the validation split "
                "holds a single class)",
    "loss": "training loss, because there is no validation split (e.g. Kaggle files without "
            "--fold); the saved epoch may overfit",
}


def criterion(row: dict, has_valid: bool) -> tuple[str, float, float]:
  """(criterion, score, tie-break) for one history row: higher is better for both."""
  if not has_valid:
    return "loss", -row["loss"], 0.0
  if math.isfinite(row["val_auc"]):
    return "val_auc", row["val_auc"], -row["val_loss"]
  return "val_loss", -row["val_loss"], 0.0


def beats(score: float, tiebreak: float, best: float, best_tiebreak: float) -> bool:
  """Whether (score, tiebreak) beats the best so far; a NaN score never does."""
  return bool(math.isfinite(score)
              and (score > best or (score == best and tiebreak > best_tiebreak)))


def update_best(state, row: dict, epoch: int, has_valid: bool, first: bool) -> bool:
  """Whether this epoch beats the best so far (SELECTION); records it in the checkpointed state.
  Every worker gathered the same predictions, so every worker takes the same decision."""
  name, score, tiebreak = criterion(row, has_valid)
  if first and name == "val_loss":
    logging.warning("validation AUC is undefined: the best epoch is chosen by %s",
                    SELECTION["val_loss"])
  improved = beats(score, tiebreak, float(state.best.numpy()), float(state.best_tiebreak.numpy()))
  if improved:
    state.best.assign(score)
    state.best_tiebreak.assign(tiebreak)
    state.best_epoch.assign(epoch + 1)
  return improved
