"""Tests for skinrecords.data.splits: fractions, stratified (grouped) splits and folds."""
# pylint: disable=protected-access

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest

from skinrecords.data import splits


def test_parse_fractions():
  assert splits.parse_fractions("0.6,0.2,0.2") == (0.6, 0.2, 0.2)
  assert splits.parse_fractions(" 0.8 , 0.2 ") == (0.8, 0.2, 0.0)
  assert splits.parse_fractions("1,0,0") == (1.0, 0.0, 0.0)
  assert splits.parse_fractions("0.7,0.2,0.1") == (0.7, 0.2, 0.1)  # Sums to 1 within 1e-6.


@pytest.mark.parametrize("text", ["0.5,0.2", "0.6,0.2,0.1,0.1", "1", "a,b", "", "0.6;0.4",
                                  "-0.2,0.6,0.6", "0,0.5,0.5", "nan,0.5,0.5", "0.6,0.2,0.20001"])
def test_parse_fractions_errors(text):
  with pytest.raises(ValueError) as info:
    splits.parse_fractions(text)
  assert repr(text) in str(info.value)


def _check_exact(labels, out, fractions):
  out = np.asarray(out)
  labels = np.asarray(labels)
  for s, name in enumerate(splits.SPLIT_NAMES):
    in_split = out == name
    assert abs(in_split.sum() - fractions[s] * len(labels)) <= 1 + 1e-9
    for c in np.unique(labels):
      members = labels == c
      quota = fractions[s] * members.sum()
      count = (in_split & members).sum()
      assert np.floor(quota + 1e-9) <= count <= np.ceil(quota - 1e-9), (c, name, count, quota)


def test_exact_stratification_on_random_label_vectors():
  rng = np.random.default_rng(123)
  for trial in range(400):
    n_classes = int(rng.integers(1, 12))
    labels = rng.choice(n_classes, size=int(rng.integers(1, 300)),
                        p=rng.dirichlet(np.full(n_classes, 0.5)))
    fractions = [(0.6, 0.2, 0.2), (0.8, 0.2, 0.0), (0.7, 0.15, 0.15),
                 tuple(rng.dirichlet(np.ones(3)))][trial % 4]
    out = splits.assign_splits(labels.tolist(), None, fractions, seed=trial)
    assert len(out) == len(labels) and set(out) <= set(splits.SPLIT_NAMES)
    _check_exact(labels, out, fractions)
    if fractions[2] == 0:
      assert "test" not in out


def test_notebook_sized_split():
  # The notebook's 17,804 images at 0.6/0.2/0.2; 9.1% positives stands in for its class mix.
  labels = np.repeat([0, 1], [16184, 1620])
  out = splits.assign_splits(labels, None, (0.6, 0.2, 0.2), seed=0)
  counts = collections.Counter(out)
  # 0.6 * 17,804 = 10,682.4 and 0.2 * 17,804 = 3,560.8: within +-1 and summing to 17,804 leaves
  # 10,682 / 3,561 / 3,561 (the notebook's 3,560 / 3,562 puts test 1.2 off its share).
  assert counts == {"train": 10682, "valid": 3561, "test": 3561}
  _check_exact(labels, out, (0.6, 0.2, 0.2))


def test_splits_are_deterministic_and_seeded():
  labels = np.random.default_rng(0).integers(0, 3, 500)
  first = splits.assign_splits(labels, None, (0.6, 0.2, 0.2), seed=7)
  assert splits.assign_splits(labels, None, (0.6, 0.2, 0.2), seed=7) == first
  assert splits.assign_splits(labels, None, (0.6, 0.2, 0.2), seed=8) != first
  groups = [f"p{i // 4}" for i in range(500)]
  grouped = splits.assign_splits(labels, groups, (0.6, 0.2, 0.2), seed=7)
  assert splits.assign_splits(labels, groups, (0.6, 0.2, 0.2), seed=7) == grouped
  assert splits.assign_splits(labels, groups, (0.6, 0.2, 0.2), seed=8) != grouped


def test_bad_arguments():
  with pytest.raises(ValueError, match="group ids"):
    splits.assign_splits([0, 1], ["a"], (0.6, 0.2, 0.2), seed=0)
  with pytest.raises(ValueError, match="sum to 1"):
    splits.assign_splits([0, 1], None, (0.6, 0.2, 0.3), seed=0)
  assert splits.assign_splits([], None, (0.6, 0.2, 0.2), seed=0) == []


def _isic_like(seed, n_patients=700):
  """~16 images per patient (geometric sizes), ~2% positives concentrated in a few patients."""
  rng = np.random.default_rng(seed)
  labels, groups = [], []
  for patient, size in enumerate(rng.geometric(1 / 16, n_patients)):
    patient_labels = np.zeros(size, dtype=int)
    if rng.random() < 0.2:
      patient_labels[rng.choice(size, min(size, int(rng.integers(1, 3))), replace=False)] = 1
    labels += patient_labels.tolist()
    groups += [f"IP_{patient:05d}"] * size
  for _ in range(40):  # Images without a patient id: each is its own group.
    labels.append(int(rng.random() < 0.02))
    groups.append("")
  return np.asarray(labels), groups


def _groups_by_split(groups, out):
  seen = collections.defaultdict(set)
  for group, split in zip(groups, out):
    if group:
      seen[group].add(split)
  return seen


@pytest.mark.parametrize("seed, fractions", [(0, (0.6, 0.2, 0.2)), (1, (0.8, 0.2, 0.0)),
                                             (2, (0.7, 0.1, 0.2))])
def test_grouped_splits_keep_patients_together_and_stratify(seed, fractions):
  labels, groups = _isic_like(seed)
  out = np.asarray(splits.assign_splits(labels, groups, fractions, seed=seed))
  assert all(len(s) == 1 for s in _groups_by_split(groups, out).values())
  n, positives = len(labels), labels.sum()
  assert 0.01 < positives / n < 0.04
  for s, name in enumerate(splits.SPLIT_NAMES):
    in_split = out == name
    if fractions[s] == 0:
      assert not in_split.any()
      continue
    assert abs(in_split.sum() / n - fractions[s]) < 0.01
    # Positives: within 2 images of the exact share (~45-190 per split here).
    assert abs(labels[in_split].sum() - fractions[s] * positives) <= 2


def test_unknown_patients_are_not_merged():
  labels = [0] * 30 + [1] * 30
  all_unknown = splits.assign_splits(labels, [""] * 60, (0.5, 0.5, 0.0), seed=3)
  assert all_unknown == splits.assign_splits(labels, None, (0.5, 0.5, 0.0), seed=3)
  assert collections.Counter(all_unknown) == {"train": 30, "valid": 30}


def test_folds_without_groups():
  rng = np.random.default_rng(5)
  labels = rng.choice(3, size=203, p=[0.7, 0.25, 0.05])
  folds = np.asarray(splits.assign_folds(labels, None, 5, seed=1))
  assert set(folds.tolist()) == set(range(5))  # Covers everything; one fold per example.
  for c in range(3):  # Stratified: each fold holds within +-1 of class size / k.
    per_fold = np.bincount(folds[labels == c], minlength=5)
    assert per_fold.max() - per_fold.min() <= 1
  assert splits.assign_folds(labels, None, 5, seed=1) == folds.tolist()
  assert splits.assign_folds(labels, None, 5, seed=2) != folds.tolist()


def test_folds_with_groups():
  labels, groups = _isic_like(4, n_patients=300)
  folds = np.asarray(splits.assign_folds(labels, groups, 5, seed=0))
  assert set(folds.tolist()) == set(range(5))
  assert all(len(s) == 1 for s in _groups_by_split(groups, folds).values())
  sizes = np.bincount(folds)
  assert sizes.min() > 0.8 * len(labels) / 5
  assert splits.assign_folds(labels, groups, 5, seed=0) == folds.tolist()


def test_folds_small_classes_and_errors():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # scikit-learn: least populated class < k.
    folds = splits.assign_folds([0] * 20 + [1] * 2, None, 5, seed=0)
    assert sorted(set(folds)) == list(range(5)) and len(folds) == 22
    # Every class smaller than k: falls back to unstratified folds.
    assert sorted(splits.assign_folds([0, 0, 1, 1, 2, 2], None, 4, seed=0)) == [0, 0, 1, 1, 2, 3]
    grouped = splits.assign_folds([0, 0, 1, 1, 2, 2], ["a", "a", "b", "c", "d", "e"], 4, seed=0)
    assert grouped[0] == grouped[1] and sorted(set(grouped)) == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="integer >= 2"):
    splits.assign_folds([0, 1, 0, 1], None, 1, seed=0)
  with pytest.raises(ValueError, match="5 is more than the 4 examples"):
    splits.assign_folds([0, 1, 0, 1], None, 5, seed=0)
  with pytest.raises(ValueError, match="3 is more than the 2 groups"):
    splits.assign_folds([0, 1, 0, 1], ["a", "a", "b", "b"], 3, seed=0)


# --------------------------------------------- edges found by mutation testing (tools/mutation)


def test_fraction_errors_show_the_fractions_as_given():
  with pytest.raises(ValueError, match=r"^split fractions 0\.5,0\.6: must sum to 1"):
    splits.check_fractions([0.5, 0.6])
  with pytest.raises(ValueError, match=r"^split fractions \(0\.5, 0\.6\): must sum to 1"):
    splits.assign_splits([0, 1], None, (0.5, 0.6), seed=0)


def test_unknown_patients_never_share_a_group_with_a_known_one():
  # Index 1 and 0 are where an off-by-one in the unknowns' codes would hit the known ids 0 and 1.
  _, dense = splits._as_arrays([0] * 6, ["", "", "B", "B", "C", ""])
  assert dense[2] == dense[3]
  assert len({dense[0], dense[1], dense[2], dense[4], dense[5]}) == 5


def test_rounding_slack_never_reaches_a_closed_split():
  """Fractions within the 1e-6 sum tolerance but short of 1 leave whole examples unassigned by
  the floors with no fractional part to round up; they go to splits that have a share."""
  fractions = np.array(splits.check_fractions((0.5, 0.4999995, 0.0)))
  for seed in range(6):
    counts = splits._round_counts(
        np.array([4_000_000, 7]), fractions, np.random.default_rng(seed))
    assert counts.sum(axis=1).tolist() == [4_000_000, 7]
    assert counts[:, 2].tolist() == [0, 0]


def test_one_huge_patient_is_placed_first_so_the_totals_still_fit():
  # 40 images of one patient, then 80 single-image patients: placed last, the big patient would
  # land on a split already at its target and overshoot it by up to 40.
  labels = [0] * 40 + [0] * 60 + [1] * 20
  groups = ["BIG"] * 40 + [f"p{i}" for i in range(80)]
  for seed in range(3):
    out = collections.Counter(splits.assign_splits(labels, groups, (0.6, 0.2, 0.2), seed=seed))
    assert abs(out["train"] - 72) <= 2 and abs(out["valid"] - 24) <= 2, out


def test_two_folds_as_many_folds_as_examples_or_groups_and_integral_k():
  assert sorted(splits.assign_folds([0, 1] * 5, None, 2, seed=0)) == [0] * 5 + [1] * 5
  assert sorted(splits.assign_folds([0, 1, 0, 1], None, 4, seed=0)) == [0, 1, 2, 3]
  grouped = splits.assign_folds([0, 1, 0, 1], ["a", "a", "b", "b"], 2, seed=0)
  assert grouped[0] == grouped[1] != grouped[2] == grouped[3]
  for k in (2.0, "2", True):
    with pytest.raises(ValueError, match="integer >= 2"):
      splits.assign_folds([0, 1, 0, 1], None, k, seed=0)


@pytest.mark.parametrize("seed", range(4))
def test_classes_of_exactly_k_members_are_still_stratified(seed):
  folds = np.asarray(splits.assign_folds([0] * 3 + [1] * 3, None, 3, seed=seed))
  labels = np.array([0] * 3 + [1] * 3)
  assert [sorted(labels[folds == f].tolist()) for f in range(3)] == [[0, 1]] * 3


def test_grouped_folds_are_stratified():
  # 12 positive and 48 negative patients of 2 images: GroupKFold alone ignores the labels.
  labels = [1] * 24 + [0] * 96
  groups = [f"p{i // 2}" for i in range(120)]
  for seed in range(3):
    folds = np.asarray(splits.assign_folds(labels, groups, 4, seed=seed))
    assert np.bincount(folds[:24], minlength=4).tolist() == [6, 6, 6, 6], seed
