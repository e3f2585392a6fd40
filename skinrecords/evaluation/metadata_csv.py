"""predict --metadata_csv: the patient metadata of image files, read from a CSV, for models trained
with metadata (issue 24).

The CSV has one row per image: a name column (the first of NAME_COLUMNS it has: image_name as in
SIIM-ISIC 2020, image as in ISIC 2019, image_id as in HAM10000, isic_id) and the metadata columns
by their training names (MODEL_DIR/metadata.json). A row belongs to an image file when its name is
the file's name without folder and extension (ISIC_0000000 for /x/ISIC_0000000.jpg, as predict's
isic/kaggle CSVs write it) or with its extension. Empty cells, "NA", "nan", "unknown" are missing
(core.metadata.is_missing) and encoded as missing, never as 0; an image without a row has every
value missing. Extra columns are ignored. A column the model needs that the CSV lacks altogether
is an error naming it: a typo must not turn into "every value missing" without a word.

Encoding is core.metadata.encode_rows, the NumPy reference the TensorFlow encoder equals, with the
spec the run was trained with (its statistics and vocabularies, whatever this CSV holds).
TensorFlow-free.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from skinrecords.core import fileio
from skinrecords.core import metadata as md

NAME_COLUMNS = ("image_name", "image", "image_id", "isic_id")


@dataclasses.dataclass(frozen=True)
class MetadataTable:
  """The CSV's rows by image name (raw cell text; "" for an empty cell) and its columns."""
  path: str
  name_column: str
  columns: tuple[str, ...]
  rows: Mapping[str, Mapping[str, str]]

  def check_columns(self, spec: md.MetadataSpec, who: str) -> None:
    """ValueError naming each column `spec` needs that the CSV lacks (with a close match)."""
    absent = [c for c in spec.names if c not in self.columns]
    if not absent:
      return
    hints = []
    for name in absent:
      close = difflib.get_close_matches(name, self.columns, n=1, cutoff=0.6)
      hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise ValueError(f"metadata_csv={self.path} has no column {', '.join(hints)}, which {who} was "
                     f"trained with; it has {', '.join(self.columns)}. Name the columns as in "
                     "training (empty cells are allowed and count as missing)")

  def check_numbers(self, spec: md.MetadataSpec) -> None:
    """ValueError at the first numeric cell that is neither missing nor a number."""
    numeric = [c.name for c in spec.columns if c.kind == md.NUMERIC]
    for name, row in self.rows.items():
      for col in numeric:
        value = row.get(col)
        if md.is_missing(value):
          continue
        try:
          float(value)
        except ValueError:
          raise ValueError(f"metadata_csv={self.path}: {self.name_column}={name}: {col}="
                           f"{value!r} is not a number; write a number, or leave the cell empty "
                           "for missing") from None

  def lookup(self, path: str) -> Mapping[str, str] | None:
    """The row of image file `path`, or None when the CSV has none."""
    base = os.path.basename(str(path).replace("\\", "/").rstrip("/"))
    return self.rows.get(os.path.splitext(base)[0], self.rows.get(base))


def read(path: str) -> MetadataTable:
  """Reads the CSV (local or remote); ValueError in one line for what it cannot use."""
  try:
    text = fileio.read_text(path)
  except FileNotFoundError:
    raise ValueError(f"metadata_csv={path}: no such file") from None
  except UnicodeDecodeError:
    raise ValueError(f"metadata_csv={path}: not a UTF-8 text CSV") from None
  reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))  # Excel writes a byte-order mark
  columns = tuple((c or "").strip() for c in (reader.fieldnames or ()))
  name_column = next((c for c in NAME_COLUMNS if c in columns), None)
  if name_column is None:
    raise ValueError(f"metadata_csv={path}: no image name column; expected one of "
                     f"{', '.join(NAME_COLUMNS)}, found {', '.join(columns) or 'no header'}")
  rows: dict[str, dict[str, str]] = {}
  for line, raw in enumerate(reader, start=2):
    row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
    name = row.get(name_column, "")
    if not name:
      continue
    if name in rows and rows[name] != row:
      raise ValueError(f"metadata_csv={path} line {line}: {name_column}={name} appears twice "
                       "with different values; keep one row per image")
    rows[name] = row
  if not rows:
    raise ValueError(f"metadata_csv={path}: no rows with an {name_column}")
  return MetadataTable(str(path), name_column, columns, rows)


@dataclasses.dataclass
class Coverage:
  """What the CSV gave for the predicted images: the report `summary()` prints."""
  images: int = 0
  without_row: int = 0  # images the CSV has no row for (every value missing)
  with_missing: int = 0  # images with at least one missing value (those without a row included)
  missing: dict = dataclasses.field(default_factory=dict)  # column -> images missing it
  unseen: dict = dataclasses.field(default_factory=dict)  # column -> {value: images}

  def summary(self) -> list[str]:
    """One or two lines for stderr."""
    per = ", ".join(f"{c} {n}" for c, n in self.missing.items() if n)
    lines = [f"metadata: {self.with_missing} of {self.images} images had missing values "
             f"(encoded as missing{'; ' + per if per else ''})"
             + (f"; {self.without_row} had no row in the CSV" if self.without_row else "")]
    if self.unseen:
      shown = "; ".join(f"{c}: " + ", ".join(f"{v!r} ({n})" for v, n in sorted(vals.items()))
                        for c, vals in self.unseen.items())
      lines.append(f"metadata: categories training never saw, encoded as unknown: {shown}")
    return lines


def rows_for(table: MetadataTable, paths: Sequence[str]) -> list[dict]:
  """The raw row of each image (empty for an image without one), in order."""
  return [dict(table.lookup(p) or {}) for p in paths]


def coverage(specs: Iterable[md.MetadataSpec], table: MetadataTable,
             paths: Sequence[str]) -> Coverage:
  """How complete the metadata of `paths` is, over the columns any of `specs` uses; a category is
  unseen when no member's training saw it (CV folds' vocabularies differ)."""
  columns: dict[str, md.Column] = {}
  seen: dict[str, set] = {}
  for spec in specs:
    for c in spec.columns:
      columns.setdefault(c.name, c)
      seen.setdefault(c.name, set()).update(c.stats.vocabulary)
  out = Coverage(images=len(paths), missing={c: 0 for c in columns})
  for path in paths:
    row = table.lookup(path)
    out.without_row += row is None
    row = row or {}
    gaps = [c for c in columns if md.is_missing(row.get(c))]
    out.with_missing += bool(gaps)
    for c in gaps:
      out.missing[c] += 1
    for name, column in columns.items():
      value = row.get(name)
      if column.kind == md.CATEGORICAL and not md.is_missing(value) and \
          value.strip() not in seen[name]:
        out.unseen.setdefault(name, {}).setdefault(value.strip(), 0)
        out.unseen[name][value.strip()] += 1
  return out


def encode(spec: md.MetadataSpec, rows: Sequence[Mapping]) -> np.ndarray:
  """float32 [len(rows), spec.width]: the model's "metadata" input (core.metadata.encode_rows)."""
  return np.asarray(md.encode_rows(spec, rows), np.float32).reshape(len(rows), spec.width)
