"""The model-selection rule (selection.py): which epoch becomes model.keras, and the tie rule."""

from __future__ import annotations

import logging
import math

import pytest

from skinrecords.training import selection

NAN = float("nan")


class _Var:
  """Stands in for the checkpointed tf.Variable: .numpy() and .assign()."""

  def __init__(self, value):
    self.value = value

  def numpy(self):
    return self.value

  def assign(self, value):
    self.value = value


def _fresh():
  state = type("State", (), {})()
  state.best, state.best_tiebreak, state.best_epoch = _Var(-math.inf), _Var(-math.inf), _Var(0)
  return state


def _run(rows, has_valid=True, rule="val_auc"):
  state = _fresh()
  won = [selection.update_best(state, r, e, has_valid, e == 0, rule) for e, r in enumerate(rows)]
  return won, state


def test_ties_on_validation_auc_go_to_the_later_epoch_with_lower_loss():
  """Issue 15: AUC reached 1.0 by epoch 4 and the first such epoch (val_loss 0.60) was kept."""
  rows = [dict(loss=0.6, val_auc=0.98, val_loss=0.65), dict(loss=0.5, val_auc=1.0, val_loss=0.60),
          dict(loss=0.4, val_auc=1.0, val_loss=0.10), dict(loss=0.3, val_auc=1.0, val_loss=0.20),
          dict(loss=0.2, val_auc=0.99, val_loss=0.05)]
  won, state = _run(rows)
  assert won == [True, True, True, False, False]
  assert state.best_epoch.value == 3
  assert state.best.value == 1.0 and state.best_tiebreak.value == -0.10


def test_an_equal_auc_with_equal_loss_does_not_replace_the_earlier_epoch():
  rows = [dict(loss=0.5, val_auc=0.9, val_loss=0.3), dict(loss=0.4, val_auc=0.9, val_loss=0.3)]
  assert _run(rows)[0] == [True, False]


def test_criterion_by_what_the_run_has():
  row = dict(loss=0.25, val_auc=0.75, val_loss=0.5)
  assert selection.criterion(row, True, "val_auc") == ("val_auc", 0.75, -0.5)
  assert selection.criterion(row, True) == ("val_loss", -0.5, 0.0)  # the default rule
  assert selection.criterion(row, False) == ("loss", -0.25, 0.0)
  assert selection.criterion(dict(row, val_auc=NAN), True, "val_auc") == (
      "val_loss_fallback", -0.5, 0.0)
  assert set(selection.SELECTION) == set(selection.RULES) | {"val_loss_fallback", "loss"}


@pytest.mark.parametrize("has_valid,auc,expect", [(True, NAN, 2), (False, 1.0, 3)])
def test_without_a_usable_auc_the_lowest_loss_wins(has_valid, auc, expect):
  rows = [dict(loss=0.5, val_auc=auc, val_loss=0.4), dict(loss=0.4, val_auc=auc, val_loss=0.3),
          dict(loss=0.3, val_auc=auc, val_loss=0.35)]
  won, state = _run(rows, has_valid)
  assert state.best_epoch.value == expect, won
  assert won == ([True, True, False] if has_valid else [True, True, True])


def test_a_nan_score_never_wins_even_the_first_epoch():
  won, state = _run([dict(loss=NAN, val_auc=NAN, val_loss=NAN), dict(loss=0.4, val_auc=NAN,
                                                                       val_loss=0.3)])
  assert won == [False, True] and state.best_epoch.value == 2
  assert not selection.beats(NAN, 0.0, -math.inf, -math.inf)
  assert not selection.beats(math.inf, 0.0, -math.inf, -math.inf)
  assert selection.beats(0.5, -1.0, 0.4, 0.0) and not selection.beats(0.4, 1.0, 0.5, 0.0)
  assert isinstance(selection.beats(0.5, 0.0, 0.4, 0.0), bool)


def test_the_undefined_auc_warning_is_logged_once_on_the_first_epoch(caplog):
  rows = [dict(loss=0.5, val_auc=NAN, val_loss=0.4)] * 3
  with caplog.at_level(logging.WARNING):
    _run(rows)
  warned = [r.getMessage() for r in caplog.records if "AUC is undefined" in r.getMessage()]
  assert warned == ["validation AUC is undefined: the best epoch is chosen by "
                    + selection.SELECTION["val_loss_fallback"]]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    _run([dict(loss=0.5, val_auc=0.7, val_loss=0.4)])
    _run([dict(loss=0.5, val_auc=NAN, val_loss=0.4)], has_valid=False)
  assert not caplog.records


# Issue 21's run: epoch 1 reached validation AUC 1.000 with every score on one side of 0.5
# (val_loss 0.57, test accuracy 0.50); epoch 6 had AUC 0.9997 and val_loss 0.145.
_SATURATED = [dict(epoch=1, loss=0.69, val_auc=1.0, val_loss=0.57),
              dict(epoch=2, loss=0.5, val_auc=0.9994, val_loss=0.40),
              dict(epoch=3, loss=0.4, val_auc=0.9997, val_loss=0.145),
              dict(epoch=4, loss=0.3, val_auc=0.9980, val_loss=0.20)]


@pytest.mark.parametrize("rule,kept", [("val_auc", 1), ("val_loss", 3), ("val_auc_loss", 3),
                                       ("last", 4)])
def test_a_saturated_auc_does_not_keep_a_shifted_epoch_by_default(rule, kept):
  assert selection.replay(_SATURATED, True, rule) == kept
  assert selection.DEFAULT != "val_auc"
  assert selection.replay(_SATURATED) == 3


def test_val_auc_loss_prefers_a_clearly_higher_auc_over_a_lower_loss():
  rows = [dict(epoch=1, loss=0.5, val_auc=0.90, val_loss=0.30),
          dict(epoch=2, loss=0.4, val_auc=0.95, val_loss=0.35),  # +0.05 AUC: wins despite loss
          dict(epoch=3, loss=0.3, val_auc=0.947, val_loss=0.32),  # within 0.005, lower loss: wins
          dict(epoch=4, loss=0.2, val_auc=0.93, val_loss=0.10)]  # 0.017 below: loses
  assert _run(rows, rule="val_auc_loss")[0] == [True, True, True, False]


def test_an_unknown_rule_is_refused_by_name():
  with pytest.raises(ValueError, match="select_by='auc'.*val_loss"):
    selection.check_rule("auc")
