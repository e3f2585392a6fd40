"""The tf.train.Example schema, defined once for the writer (records) and the reader (pipeline).

Keys follow the public SIIM-ISIC Kaggle melanoma TFRecords (`image`, `image_name`, `target`) so those
files read without conversion; `patient_id`, `fold`, `height` and `width` are ours. The Kaggle files
store `patient_id` as int64 (ours: bytes) and their test files have no `target`: readers therefore
parse with the schema the files actually have (`manifest.RecordSchema`, `pipeline.parse_spec`),
never with `feature_spec`, which is our writer's full schema. Shard file names follow tensorflow/models: ``{split}-{i:05d}-of-{n:05d}.tfrecord``.
"""

from __future__ import annotations

import re

IMAGE = "image"  # encoded JPEG or PNG bytes, RGB
IMAGE_NAME = "image_name"  # file stem, unique within a dataset
TARGET = "target"  # int64 class id (index into manifest["classes"])
PATIENT_ID = "patient_id"  # "" when unknown
FOLD = "fold"  # int64 fold of a training example, -1 when no folds
HEIGHT = "height"
WIDTH = "width"

# Keys our records always hold (the Kaggle test files lack TARGET).
REQUIRED_KEYS = (IMAGE, IMAGE_NAME, TARGET)

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


def serialize_example(*, image: bytes, image_name: str, target: int, patient_id: str = "",
                      fold: int = -1, height: int, width: int) -> bytes:
  """One record as serialized `tf.train.Example` bytes (built without TensorFlow, see `tfrecord`)."""
  from skinrecords import tfrecord  # pylint: disable=g-import-not-at-top  (tfrecord imports this module)

  return tfrecord.serialize_example(image=image, image_name=image_name, target=target,
                                    patient_id=patient_id, fold=fold, height=height, width=width)


def feature_spec():
  """`tf.io.parse_example` spec of every key our converter writes (tests, verify_records)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return {
      IMAGE: tf.io.FixedLenFeature([], tf.string),
      IMAGE_NAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
      TARGET: tf.io.FixedLenFeature([], tf.int64),
      PATIENT_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
      FOLD: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
      HEIGHT: tf.io.FixedLenFeature([], tf.int64, default_value=0),
      WIDTH: tf.io.FixedLenFeature([], tf.int64, default_value=0),
  }
