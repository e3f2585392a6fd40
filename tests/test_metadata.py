"""Tests for skinrecords.core.metadata: the stored form and the model-input encoding of metadata."""

import math

import pytest

from skinrecords.core import metadata as md


def _spec():
  age = md.Column("age_approx", md.NUMERIC, md.compute_stats(md.NUMERIC, [30, 50, None, "", 70]),
                  fold_stats={0: md.Stats(40.0, 10.0)}, missing={"train": 2})
  site = md.Column("site", md.CATEGORICAL,
                   md.compute_stats(md.CATEGORICAL, ["torso", "head", None, "torso"]),
                   fold_stats={0: md.Stats(vocabulary=("torso",))})
  return md.MetadataSpec((age, site))


def test_stats_skip_missing_values_and_are_learnt_from_what_is_given():
  spec = _spec()
  age, site = spec.columns
  assert age.stats.mean == pytest.approx(50.0)
  assert age.stats.std == pytest.approx(math.sqrt(800 / 3))
  assert site.stats.vocabulary == ("head", "torso")
  assert md.compute_stats(md.NUMERIC, [5, 5]).std == 1.0  # constant: no division by zero


def test_encoding_standardises_flags_missing_and_has_an_unknown_slot():
  spec = _spec()
  assert spec.width == 2 + 3
  std = math.sqrt(800 / 3)
  rows = md.encode_rows(spec, [{"age_approx": 70, "site": "head"}, {"site": "ear"},
                               {"age_approx": "nan", "site": ""}])
  assert rows[0] == pytest.approx([20 / std, 0.0, 1.0, 0.0, 0.0])
  assert rows[1] == [0.0, 1.0, 0.0, 0.0, 1.0]  # missing age; unseen site -> unknown
  assert rows[2] == [0.0, 1.0, 0.0, 0.0, 1.0]
  assert spec.feature_names() == ["age_approx", "age_approx:missing", "site=head", "site=torso",
                                  "site:unknown"]


def test_round_trip_selection_and_fold_statistics():
  spec = _spec()
  again = md.MetadataSpec.from_dict(spec.to_dict())
  assert again == spec
  assert spec.select("site").names == ("site",)
  assert spec.select("all") == spec
  assert spec.for_fold(0).columns[0].stats == md.Stats(40.0, 10.0)
  with pytest.raises(ValueError, match="no statistics for fold 1"):
    spec.for_fold(1)
  with pytest.raises(ValueError, match="no metadata column 'sex'"):
    spec.select("sex,site")
