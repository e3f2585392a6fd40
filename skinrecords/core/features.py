"""The tf.train.Example schema: one table, `SCHEMA`, from which the writer (`tfrecord`), the reader's
spec (`feature_spec`), the manifest's "features" entry and `manifest.RecordSchema.ours` are derived.

Keys follow the public SIIM-ISIC Kaggle melanoma TFRecords (`image`, `image_name`, `target`) so those
files read without conversion; `patient_id`, `fold`, `height` and `width` are ours. The Kaggle files
store `patient_id` as int64 (ours: bytes) and their test files have no `target`: readers therefore
parse with the schema the files actually have (`manifest.RecordSchema`, `pipeline.parse_spec`),
never with `feature_spec`, which is our writer's full schema. Shard file names follow
tensorflow/models: ``{split}-{i:05d}-of-{n:05d}.tfrecord``. TensorFlow-free (the converter's workers
import it).
"""

from __future__ import annotations

import dataclasses
import re

IMAGE = "image"  # encoded JPEG or PNG bytes, RGB
IMAGE_NAME = "image_name"  # file stem, unique within a dataset
TARGET = "target"  # int64 class id (index into manifest["classes"])
PATIENT_ID = "patient_id"  # "" when unknown
FOLD = "fold"  # int64 fold of a training example, -1 when no folds
HEIGHT = "height"
WIDTH = "width"


@dataclasses.dataclass(frozen=True)
class Feature:
  """One feature of our records."""
  key: str
  dtype: str  # "bytes" | "int64" (manifest.RecordSchema.DTYPES)
  default: str | int | None  # the reader's value when a record lacks it; None: required
  optional: bool = False  # the writer fills `default` when the caller gives no value


# Our records, in the order the writer fills them (the manifest's "features" entry keeps it too).
SCHEMA = (
    Feature(IMAGE, "bytes", None),
    Feature(IMAGE_NAME, "bytes", ""),
    Feature(TARGET, "int64", None),
    Feature(PATIENT_ID, "bytes", "", optional=True),
    Feature(FOLD, "int64", -1, optional=True),
    Feature(HEIGHT, "int64", 0),
    Feature(WIDTH, "int64", 0),
)

_SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord$")


def shard_name(split: str, index: int, count: int) -> str:
  """Canonical shard file name, e.g. ``train-00003-of-00016.tfrecord``."""
  return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def parse_shard_name(name: str) -> tuple[str, int, int] | None:
  """Inverse of `shard_name`; None for anything else."""
  m = _SHARD_RE.match(name)
  if not m:
    return None
  return m["split"], int(m["index"]), int(m["count"])


# The dynamic part of the schema: patient metadata columns, one feature each, keyed METADATA_PREFIX +
# column name (core.metadata.PREFIX), float (numeric) or bytes (categorical), absent when missing.
# Which columns a records folder has is the manifest's "metadata" entry (core.metadata.MetadataSpec).
METADATA_PREFIX = "meta/"


def check_metadata_value(key: str, value) -> None:
  """TypeError unless `key` is a metadata key and `value` a finite number or a non-empty str."""
  import math  # pylint: disable=g-import-not-at-top

  if not key.startswith(METADATA_PREFIX) or len(key) == len(METADATA_PREFIX):
    raise TypeError(f"metadata feature {key!r}: keys are {METADATA_PREFIX}<column>")
  if isinstance(value, str):
    if not value.strip():
      raise TypeError(f"metadata feature {key!r}: an empty string; a missing value is left out")
  elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise TypeError(f"metadata feature {key!r}: {value!r} is neither a finite number nor a str")


def feature_spec():
  """`tf.io.parse_example` spec of every key our converter writes (tests, verify_records)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf_dtype = {"bytes": tf.string, "int64": tf.int64}
  return {f.key: (tf.io.FixedLenFeature([], tf_dtype[f.dtype]) if f.default is None else
                  tf.io.FixedLenFeature([], tf_dtype[f.dtype], default_value=f.default))
          for f in SCHEMA}


def dtypes() -> dict[str, str]:
  """{key: dtype} of every feature we write (`manifest.RecordSchema.ours`)."""
  return {f.key: f.dtype for f in SCHEMA}


def manifest_entry() -> dict[str, str]:
  """The manifest's "features" entry: each feature's role -> its key in the records."""
  return {f.key: f.key for f in SCHEMA}
