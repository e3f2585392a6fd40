"""The exported model's patient-metadata inputs (issue 24): raw values in, encoded in the graph.

A client should not re-implement core.metadata's encoding (standardisation with the training
statistics, missing indicators, one-hot with an unknown slot), so the SavedModel signatures take
each metadata column RAW, one input per column, named after it:

    numeric      float32 [B]   NaN = missing            e.g. age_approx = 55.0
    categorical  tf.string [B]  "" (or NA, unknown, ...) = missing; a value training never saw is
                                encoded as unknown      e.g. sex = "male"

and each member encodes them with its own run's spec (input/metadata_input.py's `encode`, the
TensorFlow twin of core.metadata.encode_rows), so a cross-validation ensemble whose folds have different
statistics is served from one set of raw values.

TFLite has no string kernels without the Flex delegate, so its model takes two numeric inputs
instead (`serving_uint8_codes`), still member-independent:

    metadata_numeric  float32 [B, N]  the numeric columns, raw, in `layout` order; NaN = missing
    metadata_codes    int32 [B, C]    per categorical column the index of its value in that
                                      column's `vocabulary` (preprocessing.json); -1 = missing or
                                      a value not listed (encoded as unknown)

`codes_inputs` builds them from raw rows (what a phone client does, in ten lines). Both are
recorded in preprocessing.json["metadata"], in input order.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from skinrecords.core import metadata as md
from skinrecords.input import metadata_input as input_metadata

RESERVED = ("image_bytes", "images", "metadata_numeric", "metadata_codes")
NUMERIC_INPUT, CODES_INPUT = "metadata_numeric", "metadata_codes"
CODES_SIGNATURE = "serving_uint8_codes"


@dataclasses.dataclass(frozen=True)
class RawColumn:
  """One raw input: the training column `name`, its signature input `arg`, its kind, and (for
  categoricals) the vocabulary its TFLite codes index: every member's, in first-seen order."""
  name: str
  arg: str
  kind: str
  vocabulary: tuple[str, ...] = ()

  def to_dict(self) -> dict:
    out = {"input": self.arg, "column": self.name, "kind": self.kind,
           "dtype": "float32" if self.kind == md.NUMERIC else "string",
           "missing": "NaN" if self.kind == md.NUMERIC else '"" (or NA, nan, unknown)'}
    if self.kind == md.CATEGORICAL:
      out["vocabulary"] = list(self.vocabulary)
    return out


def _arg(name: str) -> str:
  """A signature input name for column `name` (letters, digits, _; not one of RESERVED)."""
  arg = re.sub(r"\W", "_", name)
  arg = arg if re.match(r"[A-Za-z]", arg) else f"meta_{arg}"
  return f"meta_{arg}" if arg in RESERVED else arg


def layout(specs: Sequence[md.MetadataSpec | None]) -> list[RawColumn]:
  """The raw inputs of every member's columns (by name, first-seen order); ValueError when two
  members use one name as different kinds, or two names map to one input."""
  kinds: dict[str, str] = {}
  vocab: dict[str, list[str]] = {}
  for spec in specs:
    for c in (spec.columns if spec else ()):
      if kinds.setdefault(c.name, c.kind) != c.kind:
        raise ValueError(f"ensemble members use metadata column {c.name!r} as both "
                         f"{kinds[c.name]} and {c.kind}; export runs trained on the same records")
      vocab.setdefault(c.name, [])
      vocab[c.name] += [v for v in c.stats.vocabulary if v not in vocab[c.name]]
  out = [RawColumn(n, _arg(n), k, tuple(vocab[n])) for n, k in kinds.items()]
  args = [c.arg for c in out]
  if len(set(args)) != len(args):
    raise ValueError(f"metadata columns {', '.join(kinds)} give clashing input names {args}; "
                     "rename a column")
  return out


def raw_signature(columns: Sequence[RawColumn]) -> list[tf.TensorSpec]:
  return [tf.TensorSpec([None], tf.float32 if c.kind == md.NUMERIC else tf.string, name=c.arg)
          for c in columns]


def encode_raw(spec: md.MetadataSpec, columns: Sequence[RawColumn], values) -> tf.Tensor:
  """float32 [B, spec.width]: one member's "metadata" input from the raw inputs (`values` in
  `columns` order)."""
  by_name = dict(zip([c.name for c in columns], values))
  return input_metadata.encode(spec, {c.key: by_name[c.name] for c in spec.columns})


def codes_signature(columns: Sequence[RawColumn]) -> list[tf.TensorSpec]:
  n = sum(c.kind == md.NUMERIC for c in columns)
  m = len(columns) - n
  out = []
  if n:
    out.append(tf.TensorSpec([None, n], tf.float32, name=NUMERIC_INPUT))
  if m:
    out.append(tf.TensorSpec([None, m], tf.int32, name=CODES_INPUT))
  return out


def encode_codes(spec: md.MetadataSpec, columns: Sequence[RawColumn], numeric, codes):
  """float32 [B, spec.width] from the TFLite inputs, with ops TFLite has (no strings, no IsNan)."""
  numeric_names = [c.name for c in columns if c.kind == md.NUMERIC]
  categorical = [c for c in columns if c.kind == md.CATEGORICAL]
  parts = []
  for col in spec.columns:
    if col.kind == md.NUMERIC:
      x = numeric[:, numeric_names.index(col.name)]
      missing = tf.not_equal(x, x)  # NaN is the one value unequal to itself
      z = tf.where(missing, tf.zeros_like(x),
                   (x - np.float32(col.stats.mean)) / np.float32(col.stats.std))
      parts.append(tf.stack([z, tf.cast(missing, tf.float32)], axis=-1))
      continue
    j = [c.name for c in categorical].index(col.name)
    union = categorical[j].vocabulary
    vocab = col.stats.vocabulary
    # Row u: the member's one-hot for union value u (its unknown slot where it never saw it); the
    # last row, for -1 and out-of-range codes, is the unknown slot.
    table = np.zeros((len(union) + 1, len(vocab) + 1), np.float32)
    for u, value in enumerate(union):
      table[u, vocab.index(value) if value in vocab else len(vocab)] = 1.0
    table[len(union), len(vocab)] = 1.0
    code = codes[:, j]
    code = tf.where((code < 0) | (code >= len(union)), len(union), code)
    parts.append(tf.gather(tf.constant(table), code))
  return tf.concat(parts, axis=-1)


def _number(value) -> float:
  return math.nan if md.is_missing(value) else float(value)


def raw_inputs(columns: Sequence[RawColumn], rows: Sequence[Mapping]) -> dict:
  """{input name: array} for the SavedModel signatures from raw rows ({column: value})."""
  out = {}
  for c in columns:
    values = [r.get(c.name) for r in rows]
    if c.kind == md.NUMERIC:
      out[c.arg] = np.array([_number(v) for v in values], np.float32)
    else:
      out[c.arg] = np.array(["" if md.is_missing(v) else str(v).strip() for v in values],
                            dtype=object)
  return out


def codes_inputs(columns: Sequence[RawColumn], rows: Sequence[Mapping]) -> dict:
  """{input name: array} for the TFLite model (`serving_uint8_codes`) from raw rows."""
  numeric = [c for c in columns if c.kind == md.NUMERIC]
  categorical = [c for c in columns if c.kind == md.CATEGORICAL]
  out = {}
  if numeric:
    out[NUMERIC_INPUT] = np.array([[_number(r.get(c.name)) for c in numeric] for r in rows],
                                  np.float32).reshape(len(rows), len(numeric))
  if categorical:
    def code(c, v):
      text = None if md.is_missing(v) else str(v).strip()
      return c.vocabulary.index(text) if text in c.vocabulary else -1
    out[CODES_INPUT] = np.array([[code(c, r.get(c.name)) for c in categorical] for r in rows],
                                np.int32).reshape(len(rows), len(categorical))
  return out


UNSEEN = "(a category training never saw)"


def check_rows(columns: Sequence[RawColumn], n: int) -> list[dict]:
  """`n` raw rows for export's parity check that cover, column by column, every category, an
  unseen one, missing values and numbers around the statistics: the parity is checked on what
  clients will send, not only on the typical row."""
  rows = []
  for i in range(n):
    row = {}
    for k, c in enumerate(columns):
      if c.kind == md.NUMERIC:
        choices = [20.0, 45.0, None, 70.0, 85.0, 5.0]
      else:
        choices = list(c.vocabulary) + ["", UNSEEN]
      row[c.name] = choices[(i + k) % len(choices)]
    rows.append(row)
  return rows
