"""The CSV files the field scores with: ISIC Challenge classification and SIIM-ISIC 2020 (Kaggle).

ISIC (the official `isic-challenge-scoring` package, checked with 5.6.0): a prediction CSV is
`image` (the file name without its extension) then one float column per class, named exactly and
case-sensitively as in the ground-truth CSV, which is `image` plus the same columns one-hot. The
scorer reports ROC AUC and average precision per column and their mean over ALL columns — for two
classes that mean includes the negative class's AP, so it differs from our `pr_auc` (the positive
class's AP); its balanced accuracy is by argmax, so our decision threshold plays no part in it.
Probabilities are written with `repr` (shortest exact float): rounding to 8 digits would create
ties that move the AUC.

Kaggle SIIM-ISIC 2020: `image_name,target` with target = P(melanoma).
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from skinrecords.core import fileio

FORMATS = ("default", "isic", "kaggle")
MELANOMA_NAMES = ("melanoma", "mel")  # what a melanoma class is called, lower-cased


def image_id(name: str) -> str:
  """The ISIC `image` value: the file name without folder and extension (ISIC_0000000.jpg ->
  ISIC_0000000); record names carry none and pass through."""
  base = fileio.basename(str(name))
  return os.path.splitext(base)[0]


def parse_isic_columns(text: str | None, classes: list[str]) -> list[str]:
  """Column names, one per class in id order, from "Class:Column,..." (unnamed classes keep
  their own name). ValueError naming an unknown class, a malformed item or a duplicate column."""
  columns = {c: c for c in classes}
  for item in filter(None, (s.strip() for s in (text or "").split(","))):
    if item.count(":") != 1 or not all(part.strip() for part in item.split(":")):
      raise ValueError(f"isic_columns item {item!r}: expected CLASS:COLUMN, e.g. "
                       f"{classes[-1]}:MEL")
    cls, column = (part.strip() for part in item.split(":"))
    if cls not in columns:
      raise ValueError(f"isic_columns names class {cls!r}, which the model does not have; its "
                       f"classes are {', '.join(classes)} (case-sensitive)")
    columns[cls] = column
  out = [columns[c] for c in classes]
  dupes = sorted({c for c in out if out.count(c) > 1} | ({"image"} & set(out)))
  if dupes:
    raise ValueError(f"isic_columns gives column name(s) {dupes} twice (or 'image', which is the "
                     "id column); each class needs its own column")
  return out


def melanoma_index(classes: list[str]) -> int:
  """The class whose probability is the Kaggle target: the class named melanoma/MEL, else for two
  classes id 1 (the positive class, e.g. ISIC's target "1"); ValueError when there is none.

  The name comes first: records made from a `diagnosis` column sort to ['melanoma', 'nevus'], and
  taking id 1 wrote P(nevus) as the target, an inverted submission (found by a trial run).
  """
  for i, c in enumerate(classes):
    if c.lower() in MELANOMA_NAMES:
      return i
  if len(classes) == 2:
    return 1
  raise ValueError(f"format=kaggle needs P(melanoma), and none of the classes {classes} is named "
                   "melanoma or MEL; use format=isic")


def _class_matrix(probs) -> np.ndarray:
  p = np.asarray(probs, np.float64)
  return np.stack([1.0 - p, p], axis=1) if p.ndim == 1 else p


def _write(path, header: list[str], rows) -> None:
  buf = io.StringIO(newline="")
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(header)
  w.writerows(rows)
  fileio.write_text_atomic(path, buf.getvalue())


def _check_ids(ids: list[str]) -> None:
  seen = set()
  for i in ids:
    if i in seen:
      raise ValueError(f"two images are both called {i!r} without their extension; the ISIC "
                       "format identifies images by that name, so rename one")
    seen.add(i)


def write_isic(path, names, probs, columns: list[str]) -> None:
  """The ISIC prediction CSV: image, then P(class) per column."""
  ids = [image_id(n) for n in names]
  _check_ids(ids)
  p = _class_matrix(probs)
  _write(path, ["image"] + list(columns),
         ([i] + [repr(float(x)) for x in row] for i, row in zip(ids, p)))


def write_isic_truth(path, names, labels, columns: list[str]) -> None:
  """The matching ground truth: image, then 1.0 in the true class's column, 0.0 elsewhere."""
  ids = [image_id(n) for n in names]
  _check_ids(ids)
  k = len(columns)
  _write(path, ["image"] + list(columns),
         ([i] + ["1.0" if j == int(y) else "0.0" for j in range(k)]
          for i, y in zip(ids, labels)))


def write_kaggle(path, names, probs, classes: list[str]) -> None:
  """SIIM-ISIC 2020: image_name,target with P(melanoma)."""
  p = _class_matrix(probs)[:, melanoma_index(classes)]
  ids = [image_id(n) for n in names]
  _check_ids(ids)  # two rows of one image_name: Kaggle scores one of them (issue 27)
  _write(path, ["image_name", "target"], ([i, repr(float(x))] for i, x in zip(ids, p)))
