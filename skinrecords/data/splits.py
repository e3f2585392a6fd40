"""Seeded, stratified train/valid/test splits and K-fold ids, optionally grouped by patient.

Skin-lesion sets hold many images per patient (ISIC 2020: 33,126 images of 2,056 patients, ~16
each), and images of one patient look alike, so a random split leaks: grouped splits keep every
patient in one split. Melanoma is rare (ISIC 2020: 1.8%), so splits are also stratified: a 20%
validation split of a 584-positive set should hold ~117 positives, not whatever chance gives.

Plain numpy; scikit-learn only for the folds. Every function is deterministic given its seed.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from skinrecords.core import manifest

SPLIT_NAMES = manifest.SPLITS
_SUM_TOLERANCE = 1e-6
_EPS = 1e-9  # Float slack in quotas: 0.29 * 100 is 28.999999999999996.


def check_fractions(fractions: Sequence[float], shown: str | None = None
                    ) -> tuple[float, float, float]:
  """(train, valid, test) from 2 or 3 non-negative fractions summing to 1; ValueError otherwise."""
  shown = shown or ",".join(map(str, fractions))
  if len(fractions) not in (2, 3):
    raise ValueError(f"split fractions {shown}: expected 2 or 3 numbers (train,valid[,test]), "
                     f"e.g. '0.6,0.2,0.2' or '0.8,0.2'")
  values = tuple(float(f) for f in fractions) + (0.0,) * (3 - len(fractions))
  if any(not math.isfinite(v) or v < 0 for v in values):
    raise ValueError(f"split fractions {shown}: each must be a non-negative number")
  if abs(sum(values) - 1.0) > _SUM_TOLERANCE:
    raise ValueError(f"split fractions {shown}: must sum to 1 (they sum to {sum(values):g})")
  if values[0] == 0:
    raise ValueError(f"split fractions {shown}: the train fraction must be above 0")
  return values  # type: ignore[return-value]


def parse_fractions(text: str) -> tuple[float, float, float]:
  """Parses "train,valid[,test]" fractions, e.g. "0.6,0.2,0.2" or "0.8,0.2" (test = 0)."""
  parts = [p.strip() for p in str(text).split(",")]
  try:
    numbers = [float(p) for p in parts]
  except ValueError as err:
    raise ValueError(f"split fractions {text!r}: expected comma-separated numbers "
                     f"(train,valid[,test]) summing to 1, e.g. '0.6,0.2,0.2' or '0.8,0.2'"
                     ) from err
  return check_fractions(numbers, repr(text))


def _as_arrays(labels: Sequence[int], groups: Sequence[str] | None
               ) -> tuple[np.ndarray, np.ndarray | None]:
  """Labels as int64, groups as dense ids (None when every item is its own group)."""
  label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
  if groups is None:
    return label_array, None
  if len(groups) != len(label_array):
    raise ValueError(f"got {len(groups)} group ids for {len(label_array)} labels")
  ids: dict[str, int] = {}
  # "" means "patient unknown": each such item is a group of its own, never merged with others.
  codes = [ids.setdefault(g, len(ids)) if g else -1 - i for i, g in enumerate(groups)]
  _, dense = np.unique(np.asarray(codes, dtype=np.int64), return_inverse=True)
  if dense.size and dense.max() + 1 == dense.size:
    return label_array, None  # All singletons: grouping changes nothing; stratify exactly.
  return label_array, dense.reshape(-1)


def _round_counts(class_sizes: np.ndarray, fractions: np.ndarray, rng: np.random.Generator
                  ) -> np.ndarray:
  """Per-class split counts: each floor or ceil of fraction * class size, summing to the class.

  Which splits a class rounds up is chosen by the running deficit of the split totals (target so
  far minus given so far), so the totals also land within +-1 of fraction * n in practice
  (checked on thousands of random label vectors in tests/test_splits.py). Ties break by the seed.
  """
  counts = np.zeros((len(class_sizes), 3), dtype=np.int64)
  deficit = np.zeros(3)
  for c, size in enumerate(class_sizes):
    quota = fractions * size
    base = np.floor(quota + _EPS)
    spare = quota - base
    deficit += spare
    up = np.zeros(3, dtype=np.int64)
    extra = int(size - base.sum())
    if extra:
      eligible = np.flatnonzero(spare > _EPS)
      if len(eligible) < extra:  # Only from float slack; any split with a share may take it.
        eligible = np.flatnonzero(fractions > 0)
      tiebreak = rng.random(len(eligible))
      order = eligible[np.lexsort((tiebreak, -deficit[eligible]))]
      up[order[:extra]] = 1
    deficit -= up
    counts[c] = base.astype(np.int64) + up
  return counts


def _exact_splits(labels: np.ndarray, fractions: np.ndarray, rng: np.random.Generator
                  ) -> np.ndarray:
  classes, inverse = np.unique(labels, return_inverse=True)
  counts = _round_counts(np.bincount(inverse, minlength=len(classes)), fractions, rng)
  result = np.zeros(len(labels), dtype=np.int64)
  for c in range(len(classes)):
    members = rng.permutation(np.flatnonzero(inverse == c))
    for s, part in enumerate(np.split(members, np.cumsum(counts[c])[:-1])):
      result[part] = s
  return result


def _grouped_splits(labels: np.ndarray, groups: np.ndarray, fractions: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
  """Greedy grouped stratification.

  Groups are shuffled with the seed, then stably sorted by size, largest first (big patients are
  hard to place late; singletons at the end fine-tune the counts). Each group goes to the split
  whose squared relative error sum_c ((assigned_sc - target_sc) / n_c)^2 grows least when the
  group's label counts h_c are added: h_c * (h_c - 2 * deficit_sc) / n_c^2 summed over classes.
  Dividing by n_c weighs classes by their own size, so the 2% positive class is balanced as
  carefully as the 98% negative one instead of being drowned by it. Splits with fraction 0 get
  nothing.
  """
  classes, inverse = np.unique(labels, return_inverse=True)
  n_groups = int(groups.max()) + 1
  histogram = np.zeros((n_groups, len(classes)))
  np.add.at(histogram, (groups, inverse), 1)
  class_sizes = histogram.sum(axis=0)
  target = fractions[:, None] * class_sizes[None, :]
  assigned = np.zeros_like(target)
  weight = 1.0 / np.square(class_sizes)
  closed = fractions <= 0
  order = rng.permutation(n_groups)
  order = order[np.argsort(-histogram[order].sum(axis=1), kind="stable")]
  group_split = np.zeros(n_groups, dtype=np.int64)
  for g in order:
    h = histogram[g]
    present = h > 0
    hp = h[present]
    cost = (hp * (hp - 2.0 * (target[:, present] - assigned[:, present])) *
            weight[present]).sum(axis=1)
    cost[closed] = np.inf
    s = int(np.argmin(cost))
    group_split[g] = s
    assigned[s] += h
  return group_split[groups]


def assign_splits(labels: Sequence[int], groups: Sequence[str] | None,
                  fractions: tuple[float, float, float], seed: int) -> list[str]:
  """Assigns each example to "train", "valid" or "test".

  Args:
    labels: class id per example.
    groups: patient (or lesion) id per example, "" when unknown (such an example is its own
      group); None for no grouping. No group is ever split across two splits.
    fractions: (train, valid, test), non-negative, summing to 1.
    seed: the same inputs and seed always give the same assignment.

  Returns:
    One of SPLIT_NAMES per example. Without groups each split's count of every class is within
    +-1 of fraction * class size (floor or ceil), and split totals within +-1 of fraction * n.
  """
  shares = np.asarray(check_fractions(tuple(fractions), repr(fractions)))
  label_array, group_ids = _as_arrays(labels, groups)
  if not len(label_array):
    return []
  rng = np.random.default_rng(seed)
  if group_ids is None:
    split_ids = _exact_splits(label_array, shares, rng)
  else:
    split_ids = _grouped_splits(label_array, group_ids, shares, rng)
  return [SPLIT_NAMES[s] for s in split_ids]


def assign_folds(labels: Sequence[int], groups: Sequence[str] | None, k: int, seed: int
                 ) -> list[int]:
  """Stratified (group) K-fold ids 0..k-1, seeded, via scikit-learn.

  StratifiedGroupKFold when groups are given ("" = own group), else StratifiedKFold; both with
  shuffle=True, random_state=seed. Classes with fewer than k members only draw a scikit-learn
  warning. Where every class is smaller than k (scikit-learn refuses to stratify) the folds fall
  back to (Group)KFold, still seeded.

  Raises:
    ValueError: k < 2, or k above the number of examples (or of groups).
  """
  # Imported here: scikit-learn takes ~1 s to import and only fold assignment needs it.
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
    raise ValueError(f"number of folds {k!r}: expected an integer >= 2")
  label_array, group_ids = _as_arrays(labels, groups)
  n = len(label_array)
  if k > n:
    raise ValueError(f"number of folds {k} is more than the {n} examples")
  kwargs = {"n_splits": int(k), "shuffle": True, "random_state": seed}
  every_class_small = np.all(np.unique(label_array, return_counts=True)[1] < k)
  if group_ids is None:
    splitter = (model_selection.KFold(**kwargs) if every_class_small else
                model_selection.StratifiedKFold(**kwargs))
  else:
    n_groups = int(group_ids.max()) + 1
    if k > n_groups:
      raise ValueError(f"number of folds {k} is more than the {n_groups} groups (patients)")
    splitter = (model_selection.GroupKFold(**kwargs) if every_class_small else
                model_selection.StratifiedGroupKFold(**kwargs))
  folds = np.full(n, -1, dtype=np.int64)
  for fold, (_, test_index) in enumerate(splitter.split(np.zeros(n), label_array, group_ids)):
    folds[test_index] = fold
  return [int(f) for f in folds]
