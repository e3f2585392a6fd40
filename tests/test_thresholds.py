"""The decision threshold training chooses on validation (thresholds.py) and its file (rundir)."""

from __future__ import annotations

import numpy as np
import pytest

from skinrecords.core import rundir
from skinrecords.evaluation import thresholds


def _shifted(n=200, seed=0):
  """Perfectly ranked validation scores that all sit above 0.5 (issue 21's saturated epoch)."""
  rng = np.random.default_rng(seed)
  labels = np.r_[np.zeros(n // 2, int), np.ones(n // 2, int)]
  probs = np.where(labels == 1, rng.uniform(0.8, 0.99, n), rng.uniform(0.55, 0.75, n))
  return probs, labels


def test_youden_on_validation_follows_a_shifted_boundary():
  probs, labels = _shifted()
  value, source = thresholds.choose("youden", probs, labels)
  assert 0.75 < value < 0.8 and "Youden" in source and "200 validation" in source
  test_probs, test_labels = _shifted(seed=1)
  assert ((test_probs >= value) == test_labels).mean() > 0.95
  assert ((test_probs >= 0.5) == test_labels).mean() == 0.5  # the fixed 0.5: all positive


def test_sensitivity_rule_keeps_the_sensitivity_on_validation():
  rng = np.random.default_rng(2)
  labels = (rng.random(500) < 0.2).astype(int)
  probs = np.clip(0.3 * labels + rng.normal(0.35, 0.15, 500), 0.001, 0.999)
  value, _ = thresholds.choose("sensitivity:0.9", probs, labels)
  sens = (probs[labels == 1] >= value).mean()
  assert 0.9 <= sens < 0.93  # the highest threshold that meets it
  assert thresholds.choose("fixed:0.3", probs, labels)[0] == 0.3


@pytest.mark.parametrize("bad", ["yuden", "sensitivity", "sensitivity:1.5", "fixed:0", "fixed:x",
                                 "youden:0.5"])
def test_bad_rules_are_refused_naming_the_choices(bad):
  with pytest.raises(ValueError, match="youden, sensitivity:S"):
    thresholds.parse_rule(bad)


def test_a_rule_that_cannot_apply_falls_back_to_half_and_says_why():
  value, source = thresholds.choose("youden", np.array([0.2, 0.7]), np.array([1, 1]))
  assert value == 0.5 and "could not be applied" in source


def test_threshold_file_round_trip_and_refusals(tmp_path):
  t = rundir.StoredThreshold(0.63, "youden", "Youden's J on 120 validation predictions", "valid",
                             120, None, "abc")
  rundir.write_threshold(tmp_path, t)
  assert rundir.read_threshold(tmp_path) == t
  assert t.describe(tmp_path).startswith("Youden's J on 120 validation predictions, ")
  assert rundir.read_threshold(tmp_path / "none") is None
  (tmp_path / rundir.THRESHOLD_FILE).write_text('{"value": 1.5, "rule": "youden", "source": "x", '
                                                '"split": "valid", "n": 1}')
  with pytest.raises(ValueError, match="not a threshold in"):
    rundir.read_threshold(tmp_path)
  (tmp_path / rundir.THRESHOLD_FILE).write_text('{"value": 0.5}')
  with pytest.raises(ValueError, match="delete it"):
    rundir.read_threshold(tmp_path)
