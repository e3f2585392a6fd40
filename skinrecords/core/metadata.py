"""Patient metadata (age, sex, anatomic site, ...): the one owner of how it is stored and encoded.

The converter stores each chosen column in every record; the manifest keeps, per column, its kind,
its vocabulary and its numeric statistics, computed on the training images only (and again for each
fold's training part: no statistic may come from the images that validate it); a training run keeps
the `MetadataSpec` it used in MODEL_DIR/metadata.json, so evaluate, predict and export encode new
images exactly as the model was trained, whatever records they read.

    record feature   "meta/<name>": float (numeric) or bytes (categorical); ABSENT when missing.
                     Missing is never stored as 0 or "" (a 0-year-old and an unknown age differ).
    model input      "metadata": float32 [batch, spec.width], the concatenation per column of
                       numeric:     [(x - mean) / std, 1.0 if missing else 0.0] (missing x -> 0.0)
                       categorical: one-hot over vocabulary + one last "unknown" slot, used for a
                                    missing value and for a category the training split never had.

`encode_rows` is the NumPy reference of that encoding (predict's CSV, tests); the TensorFlow
version (`input/metadata_input.py`) must equal it. TensorFlow-free: the converter's workers
import it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

from skinrecords.core import features

NUMERIC, CATEGORICAL = "numeric", "categorical"
KINDS = (NUMERIC, CATEGORICAL)
PREFIX = features.METADATA_PREFIX  # record feature key of column c: PREFIX + c ("meta/")
INPUT = "metadata"  # the model's metadata input name (the image input is "image")
SPEC_FILE = "metadata.json"  # in a run directory
# A derived, opt-in column: how many images the patient has (the SIIM-ISIC 2020 winners used it).
IMAGES_PER_PATIENT = "images_per_patient"
# The label in other words: never a model input (FIELD_NOTES: SIIM-ISIC 2020's CSV carries both).
LABEL_LEAKS = ("diagnosis", "benign_malignant", "dx", "dx_type", "target", "label", "melanoma")


def record_key(name: str) -> str:
  return PREFIX + name


def is_missing(value) -> bool:
  """None, NaN, and empty or blank strings (and "nan"/"NA"/"unknown" as CSVs write them)."""
  if value is None:
    return True
  if isinstance(value, float):
    return math.isnan(value)
  if isinstance(value, str):
    return value.strip().lower() in ("", "nan", "na", "n/a", "none", "null", "unknown")
  return False


@dataclasses.dataclass(frozen=True)
class Stats:
  """What encoding a column needs, learnt from one set of training images."""
  mean: float = 0.0  # numeric
  std: float = 1.0  # numeric; 1.0 when the training values are constant or absent
  vocabulary: tuple[str, ...] = ()  # categorical, sorted

  def to_dict(self, kind: str) -> dict:
    if kind == NUMERIC:
      return {"mean": self.mean, "std": self.std}
    return {"vocabulary": list(self.vocabulary)}

  @classmethod
  def from_dict(cls, raw: Mapping) -> "Stats":
    return cls(float(raw.get("mean", 0.0)), float(raw.get("std", 1.0)),
               tuple(str(v) for v in raw.get("vocabulary", ())))


def compute_stats(kind: str, values: Iterable) -> Stats:
  """Stats of one column over training values (missing ones skipped)."""
  present = [v for v in values if not is_missing(v)]
  if kind == CATEGORICAL:
    return Stats(vocabulary=tuple(sorted({str(v).strip() for v in present})))
  xs = [float(v) for v in present]
  if not xs:
    return Stats()
  mean = sum(xs) / len(xs)
  std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
  return Stats(mean, std if std > 1e-12 else 1.0)


@dataclasses.dataclass(frozen=True)
class Column:
  """One metadata column as the manifest records it.

  `stats` are the training split's; `fold_stats[k]` those of fold k's training part (every fold
  but k) when the records have folds. `missing[split]` counts the records of each split that lack
  the value.
  """
  name: str
  kind: str
  stats: Stats = Stats()
  fold_stats: Mapping[int, Stats] = dataclasses.field(default_factory=dict)
  missing: Mapping[str, int] = dataclasses.field(default_factory=dict)
  source: str = ""  # where the values came from, e.g. "labels_csv:age_approx" or "kaggle int64 code"
  # How the records store it. Ours: "meta/<name>", float (numeric) or bytes (categorical), absent
  # when missing. The SIIM-ISIC Kaggle files: the bare name, int64, with -1 (or absence) as missing;
  # a categorical int64 code is encoded as its decimal string ("0", "1", ...).
  record_key: str = ""  # "" -> PREFIX + name
  record_dtype: str = ""  # "float" | "bytes" | "int64"; "" -> float for numeric, bytes otherwise
  missing_code: int | None = None  # int64 only: the stored value that means missing (Kaggle: -1)

  def validate(self) -> None:
    if self.kind not in KINDS:
      raise ValueError(f"metadata column {self.name!r}: kind {self.kind!r}, expected one of {KINDS}")
    if self.record_dtype not in ("", "float", "bytes", "int64"):
      raise ValueError(f"metadata column {self.name!r}: record dtype {self.record_dtype!r}")
    if not self.name or "/" in self.name:
      raise ValueError(f"metadata column {self.name!r}: a name must be non-empty, without '/'")

  @property
  def key(self) -> str:
    return self.record_key or record_key(self.name)

  @property
  def dtype(self) -> str:
    return self.record_dtype or ("float" if self.kind == NUMERIC else "bytes")

  def for_fold(self, fold: int | None) -> "Column":
    """This column with the statistics of `fold`'s training part (None: the training split's)."""
    if fold is None:
      return self
    if fold not in self.fold_stats:
      raise ValueError(f"metadata column {self.name!r} has no statistics for fold {fold} (folds "
                       f"with statistics: {sorted(self.fold_stats) or 'none'})")
    return dataclasses.replace(self, stats=self.fold_stats[fold], fold_stats={})

  def width(self) -> int:
    return 2 if self.kind == NUMERIC else len(self.stats.vocabulary) + 1

  def to_dict(self) -> dict:
    out = {"name": self.name, "kind": self.kind, "key": self.key, "dtype": self.dtype,
           "source": self.source, **self.stats.to_dict(self.kind), "missing": dict(self.missing)}
    if self.missing_code is not None:
      out["missing_code"] = self.missing_code
    if self.fold_stats:
      out["folds"] = {str(k): s.to_dict(self.kind) for k, s in sorted(self.fold_stats.items())}
    return out

  @classmethod
  def from_dict(cls, raw: Mapping) -> "Column":
    name, kind = str(raw["name"]), str(raw["kind"])
    key, dtype = str(raw.get("key", "")), str(raw.get("dtype", ""))
    key = "" if key == record_key(name) else key  # the defaults stay implicit: round trips equal
    dtype = "" if dtype == ("float" if kind == NUMERIC else "bytes") else dtype
    column = cls(name, kind, Stats.from_dict(raw),
                 {int(k): Stats.from_dict(v) for k, v in (raw.get("folds") or {}).items()},
                 {str(k): int(v) for k, v in (raw.get("missing") or {}).items()},
                 str(raw.get("source", "")), key, dtype,
                 None if raw.get("missing_code") is None else int(raw["missing_code"]))
    column.validate()
    return column


@dataclasses.dataclass(frozen=True)
class MetadataSpec:
  """The metadata columns of a records folder (manifest "metadata") or of a trained model
  (MODEL_DIR/metadata.json), in input order."""
  columns: tuple[Column, ...] = ()

  def validate(self) -> None:
    names = [c.name for c in self.columns]
    if len(set(names)) != len(names):
      raise ValueError(f"metadata columns repeat a name: {names}")
    for c in self.columns:
      c.validate()

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(c.name for c in self.columns)

  @property
  def width(self) -> int:
    """Length of the encoded "metadata" input vector."""
    return sum(c.width() for c in self.columns)

  def __bool__(self) -> bool:
    return bool(self.columns)

  def column(self, name: str) -> Column:
    for c in self.columns:
      if c.name == name:
        return c
    raise ValueError(f"no metadata column {name!r}; the records have "
                     f"{', '.join(self.names) or 'none (convert with --metadata_columns)'}")

  def select(self, names: Sequence[str] | str) -> "MetadataSpec":
    """The columns `names` asks for, in that order; "all" (or ["all"]) keeps every column."""
    if isinstance(names, str):
      names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["all"]:
      return self
    return MetadataSpec(tuple(self.column(n) for n in names))

  def for_fold(self, fold: int | None) -> "MetadataSpec":
    return MetadataSpec(tuple(c.for_fold(fold) for c in self.columns))

  def feature_names(self) -> list[str]:
    """One name per element of the encoded vector, e.g. age_approx, age_approx:missing, sex=male,
    sex:unknown (reports, preprocessing.json)."""
    out = []
    for c in self.columns:
      if c.kind == NUMERIC:
        out += [c.name, f"{c.name}:missing"]
      else:
        out += [f"{c.name}={v}" for v in c.stats.vocabulary] + [f"{c.name}:unknown"]
    return out

  def to_dict(self) -> dict:
    return {"columns": [c.to_dict() for c in self.columns]}

  @classmethod
  def from_dict(cls, raw: Mapping | None) -> "MetadataSpec":
    spec = cls(tuple(Column.from_dict(c) for c in (raw or {}).get("columns", ())))
    spec.validate()
    return spec


def encode_value(column: Column, value) -> list[float]:
  """One column's slice of the model input (the module docstring's encoding)."""
  if column.kind == NUMERIC:
    if is_missing(value):
      return [0.0, 1.0]
    return [(float(value) - column.stats.mean) / column.stats.std, 0.0]
  vocab = column.stats.vocabulary
  hot = [0.0] * (len(vocab) + 1)
  text = None if is_missing(value) else str(value).strip()
  hot[vocab.index(text) if text in vocab else len(vocab)] = 1.0
  return hot


def encode_rows(spec: MetadataSpec, rows: Iterable[Mapping]) -> list[list[float]]:
  """The "metadata" input of each row ({column name: raw value}; an absent key is missing)."""
  return [[x for c in spec.columns for x in encode_value(c, row.get(c.name))] for row in rows]
