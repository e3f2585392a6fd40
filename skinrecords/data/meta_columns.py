"""The converter's patient metadata: chosen CSV columns read, typed, checked, and their statistics.

`make_records --metadata_columns=sex,age_approx,site` takes the columns from --labels_csv, or from
--metadata_csv (image name -> columns; for class-folder layouts, or ISIC 2019's separate metadata
file). A column is numeric when every present cell parses as a finite number, else categorical;
`name:numeric` / `name:categorical` forces it. Missing cells (`core.metadata.is_missing`) stay
missing: no key in the record, never 0 or "". The derived column `images_per_patient` counts the
listed images of each image's patient (all splits: the SIIM-ISIC 2020 winners counted train and
test together). A column that is the label (or says it in other words, `metadata.LABEL_LEAKS`) or
an identifier is refused: a model given `diagnosis` beside `target` scores ~1.0 in validation and
nothing on new patients.

Statistics (`spec`) come from the written training records only, and per fold from every training
fold but that one; they are computed in item order from the CSV values rounded to float32 (what the
records store), so they never depend on worker order and equal what a reader recomputes. Plain
Python only (the write side imports no TensorFlow).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import posixpath
import struct
from typing import Sequence

from skinrecords.core import metadata as md
from skinrecords.data import labels


@dataclasses.dataclass(frozen=True)
class Request:
  """One --metadata_columns entry: a column name and its forced kind (None: inferred)."""
  name: str
  kind: str | None = None


def parse_requests(entries: Sequence[str]) -> tuple[Request, ...]:
  """["age:numeric", "site"] -> Requests; ValueError for an unknown kind, a repeat or a '/'."""
  out = []
  for entry in entries:
    name, _, kind = (p.strip() for p in str(entry).partition(":"))
    if not name or "/" in name:
      raise ValueError(f"metadata_columns entry {entry!r}: a column name (without '/'), "
                       "optionally :numeric or :categorical")
    if kind and kind not in md.KINDS:
      raise ValueError(f"metadata_columns entry {entry!r}: kind {kind!r}; use {name}:numeric or "
                       f"{name}:categorical (or just {name} to infer it)")
    out.append(Request(name, kind or None))
  names = [r.name for r in out]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"metadata_columns names {', '.join(repeated)} more than once")
  return tuple(out)


@dataclasses.dataclass
class Table:
  """The chosen columns (kinds and sources, no statistics yet) and each listed item's values."""
  columns: tuple[md.Column, ...]
  values: list[dict[str, float | str]]  # per item: {column name: value} of the present values
  notes: list[str] = dataclasses.field(default_factory=list)

  def record_values(self, index: int) -> dict[str, float | str]:
    """Item `index`'s record features: {"meta/<name>": value}; missing values have no key."""
    return {md.record_key(name): value for name, value in self.values[index].items()}

  def fingerprint_lines(self):
    """What changes the records: the columns, their kinds and every value, in item order."""
    yield "metadata\t" + "\t".join(f"{c.name}:{c.kind}" for c in self.columns) + "\n"
    for row in self.values:
      yield "\t".join(f"{k}={v!r}" for k, v in sorted(row.items())) + "\n"


def _refuse(name: str, label_column: str, identifiers: dict[str, str | None]) -> None:
  """ValueError for a column that is the label, says it in other words, or identifies."""
  low = name.lower()
  if low == (label_column or "").lower() or low in md.LABEL_LEAKS:
    raise ValueError(
        f"metadata column {name!r} refused: it is the label (--label_column={label_column}) or "
        "says it in other words (refused: " + ", ".join(md.LABEL_LEAKS) + "); a model given it "
        "scores ~1.0 in validation and nothing on new patients. Leave it out of "
        "--metadata_columns")
  for flag, column in identifiers.items():
    if column and low == column.lower():
      raise ValueError(
          f"metadata column {name!r} refused: it is the {flag} (an identifier: a model would "
          "memorise patients or files). For the number of images per patient use "
          f"{md.IMAGES_PER_PATIENT}")


def _float32(text: str) -> float | None:
  """The cell as the float32 the record stores, or None when it is no finite number."""
  try:
    x = float(text)
  except ValueError:
    return None
  if not math.isfinite(x):
    return None
  return struct.unpack("<f", struct.pack("<f", x))[0]


def _row_index(rows, image_column: str) -> dict[str, tuple[int, dict]]:
  """{image key: (line, row)}: the first row of each image name (patients.attach_patients' rule)."""
  index = {}
  for line, row in rows:
    key = (row.get(image_column) or "").strip().replace("\\", "/")
    if key:
      index.setdefault(key, (line, row))
  return index


def _match(item, index: dict):
  stem = posixpath.splitext(posixpath.basename(item.relpath))[0]
  for key in (item.relpath, posixpath.splitext(item.relpath)[0],
              posixpath.basename(item.relpath), stem, item.image_name):
    if key in index:
      return index[key]
  return None


def _typed(request: Request, cells: list[tuple[int, str | None]], where: str
           ) -> tuple[str, list[float | str | None]]:
  """(kind, value per item) of one column's raw cells ((line, text) per item; None: no row)."""
  present = [(line, text.strip()) for line, text in cells
             if text is not None and not md.is_missing(text)]
  if not present:
    raise ValueError(f"metadata column {request.name!r}: no listed image has a value in {where}; "
                     "leave it out of --metadata_columns")
  parsed = {text: _float32(text) for _, text in present}
  kind = request.kind or (md.NUMERIC if all(x is not None for x in parsed.values())
                          else md.CATEGORICAL)
  if kind == md.NUMERIC:
    bad = next(((line, text) for line, text in present if parsed[text] is None), None)
    if bad:
      raise ValueError(f"metadata column {request.name!r} (numeric): {bad[1]!r} on {where} line "
                       f"{bad[0]} is not a finite number; fix the cell, or give "
                       f"{request.name}:categorical")
  values = []
  for _, text in cells:
    if text is None or md.is_missing(text):
      values.append(None)
    else:
      text = text.strip()
      values.append(parsed[text] if kind == md.NUMERIC else text)
  return kind, values


def read(items: Sequence, requests: Sequence[Request], *, csv_path: str | None, csv_kind: str,
         image_column: str, label_column: str, patient_column: str | None) -> Table:
  """The requested columns' kinds and the listed items' values (see the module docstring).

  `items`: the listing's items (relpath, image_name, patient_id), in order; `csv_path`: the CSV the
  columns come from (--labels_csv or --metadata_csv; None when only derived columns are asked).

  Raises:
    ValueError: an unknown column (naming the CSV's columns), a refused one, an unreadable CSV, a
      numeric column with a non-number, a column without any value, images_per_patient without
      patient ids.
  """
  identifiers = {"--image_column": image_column, "--patient_column": patient_column}
  for r in requests:
    if r.name != md.IMAGES_PER_PATIENT:
      _refuse(r.name, label_column, identifiers)
  from_csv = [r for r in requests if r.name != md.IMAGES_PER_PATIENT]
  cells: dict[str, list] = {}
  notes = []
  if from_csv:
    if csv_path is None:
      raise ValueError("metadata_columns needs the CSV they are in: --labels_csv, or "
                       "--metadata_csv=CSV (image name -> columns) for a folder layout")
    fieldnames, rows = labels.read_csv(csv_path, csv_kind)
    labels.check_columns(csv_path, csv_kind, fieldnames, {"image_column": image_column})
    unknown = [r.name for r in from_csv if r.name not in fieldnames]
    if unknown:
      raise ValueError(f"metadata column {unknown[0]!r} (given in --metadata_columns) not in "
                       f"{csv_kind} {csv_path}; its columns: {', '.join(fieldnames)}"
                       f" (derived: {md.IMAGES_PER_PATIENT})")
    index = _row_index(rows, image_column)
    matched = [_match(item, index) for item in items]
    lost = sum(m is None for m in matched)
    if lost:
      notes.append(f"{lost} of {len(items)} images have no row in {csv_kind} {csv_path}: all "
                   "their metadata is missing")
    for r in from_csv:
      cells[r.name] = [(0, None) if m is None else (m[0], m[1].get(r.name)) for m in matched]
  return _table(items, requests, cells, csv_path, csv_kind, patient_column, notes)


def _table(items, requests, cells, csv_path, csv_kind, patient_column, notes) -> Table:
  columns, per_item = [], [dict() for _ in items]
  for r in requests:
    if r.name == md.IMAGES_PER_PATIENT:
      if not patient_column or not any(it.patient_id for it in items):
        raise ValueError(f"{md.IMAGES_PER_PATIENT} needs patient ids: give --patient_column "
                         "(with --labels_csv or --patients_csv)")
      if r.kind == md.CATEGORICAL:
        raise ValueError(f"{md.IMAGES_PER_PATIENT} is a count: numeric only")
      count = collections.Counter(it.patient_id for it in items if it.patient_id)
      kind, values = md.NUMERIC, [float(count[it.patient_id]) if it.patient_id else None
                                  for it in items]
      source = f"derived: listed images of the item's {patient_column} (all splits)"
    else:
      kind, values = _typed(r, cells[r.name], f"{csv_kind} {csv_path}")
      source = f"{csv_kind}:{r.name}"
    columns.append(md.Column(r.name, kind, source=source))
    for row, value in zip(per_item, values):
      if value is not None:
        row[r.name] = value
  return Table(tuple(columns), per_item, notes)


def spec(table: Table, written: dict[str, list[int]], train_folds: dict[int, list[int]]
         ) -> md.MetadataSpec:
  """The manifest's MetadataSpec: statistics of the written training items (`written["train"]`),
  per fold k of the written training items of every other fold (`train_folds`: fold -> items), and
  missing counts per split. Item lists are in item order, so sums are too."""
  columns = []
  for c in table.columns:
    of = lambda idx, name=c.name: [table.values[i].get(name) for i in idx]
    train = written.get("train", [])
    fold_stats = {k: md.compute_stats(c.kind, of([i for f, idx in sorted(train_folds.items())
                                                  if f != k for i in idx]))
                  for k in sorted(train_folds)}
    missing = {split: sum(c.name not in table.values[i] for i in idx)
               for split, idx in written.items()}
    columns.append(dataclasses.replace(c, stats=md.compute_stats(c.kind, of(train)),
                                       fold_stats=fold_stats, missing=missing))
  result = md.MetadataSpec(tuple(columns))
  result.validate()
  return result


def describe(spec_: md.MetadataSpec) -> list[str]:
  """Summary lines: per column, kind, training statistics and missing counts per split."""
  lines = []
  for c in spec_.columns:
    if c.kind == md.NUMERIC:
      what = f"numeric, train mean {c.stats.mean:.4g} std {c.stats.std:.4g}"
    else:
      shown = ", ".join(c.stats.vocabulary[:6]) + (", ..." if len(c.stats.vocabulary) > 6 else "")
      what = f"categorical, {len(c.stats.vocabulary)} values in train: {shown}"
    order = ("train", "valid", "test")  # manifest.SPLITS (data/ reads no manifest module here)
    missing = ", ".join(f"{s} {c.missing[s]}" for s in sorted(
        c.missing, key=lambda s: (order.index(s) if s in order else len(order), s)))
    folds = f"; statistics for {len(c.fold_stats)} folds" if c.fold_stats else ""
    lines.append(f"  metadata {c.name}: {what}; missing: {missing or 'none'}{folds}")
  return lines
