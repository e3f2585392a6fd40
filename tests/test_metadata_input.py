"""Tests for skinrecords.input.metadata_input: metadata parsed from records and encoded in TensorFlow
exactly as core.metadata.encode_rows, and the pipeline's {"image", "metadata"} elements."""

import math

import numpy as np
import pytest
import tensorflow as tf

from metadata_records import add_metadata
from skinrecords.core import metadata as md
from skinrecords.input import metadata_input
from skinrecords.input import pipeline
from tiny_runs import make_records


def _spec():
  age = md.Column("age", md.NUMERIC, md.Stats(52.5, 13.7))
  site = md.Column("site", md.CATEGORICAL, md.Stats(vocabulary=("head", "lower extremity",
                                                                 "torso")))
  # The SIIM-ISIC Kaggle files: bare int64 names, -1 (or absence) missing; codes are categories.
  k_sex = md.Column("sex", md.CATEGORICAL, md.Stats(vocabulary=("0", "1")), record_key="sex",
                    record_dtype="int64", missing_code=-1)
  k_age = md.Column("age_approx", md.NUMERIC, md.Stats(48.0, 14.0), record_key="age_approx",
                    record_dtype="int64", missing_code=-1)
  return md.MetadataSpec((age, site, k_sex, k_age))


ROWS = [  # raw values as records store them; None: the feature is absent
    {"age": 45.0, "site": "torso", "sex": 1, "age_approx": 60},
    {"age": None, "site": None, "sex": None, "age_approx": None},  # everything missing
    {"age": 0.0, "site": "palms/soles", "sex": -1, "age_approx": -1},  # 0 is an age; unseen site
    {"age": 87.25, "site": " head ", "sex": 0, "age_approx": 0},
    {"age": float("nan"), "site": "unknown", "sex": 2, "age_approx": 35},  # unseen Kaggle code
    {"age": 33.3, "site": "lower extremity", "sex": 1, "age_approx": 90},
]


def _serialized(spec, row) -> bytes:
  ex = tf.train.Example()
  for c in spec.columns:
    value = row.get(c.name)
    if value is None:
      continue
    f = ex.features.feature[c.key]
    if c.dtype == "float":
      f.float_list.value.append(value)
    elif c.dtype == "int64":
      f.int64_list.value.append(value)
    else:
      f.bytes_list.value.append(value.encode())
  return ex.SerializeToString()


def _reference(spec, row) -> dict:
  """What encode_rows is given: the stored value (float32 for ours), -1 codes as missing."""
  out = {}
  for c in spec.columns:
    value = row.get(c.name)
    if c.missing_code is not None and value == c.missing_code:
      value = None
    if c.dtype == "float" and value is not None:
      value = float(np.float32(value))
    out[c.name] = value
  return out


def test_tensorflow_encoding_equals_the_numpy_reference_bit_for_bit():
  spec = _spec()
  parse = metadata_input.parse_spec(spec)
  got = np.stack([metadata_input.encode(spec, tf.io.parse_single_example(
      _serialized(spec, r), parse)).numpy() for r in ROWS])
  want = np.asarray(md.encode_rows(spec, [_reference(spec, r) for r in ROWS]), np.float32)
  assert got.dtype == np.float32 and got.shape == (len(ROWS), spec.width) == (6, 2 + 4 + 3 + 2)
  np.testing.assert_array_equal(got, want)
  # The cases that matter, spelt out: missing numeric -> [0, 1]; unseen or missing category ->
  # the unknown slot; a Kaggle -1 code -> missing.
  assert list(got[1]) == [0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 1]
  assert list(got[2][2:6]) == [0, 0, 0, 1] and list(got[2][6:]) == [0, 0, 1, 0, 1]
  assert got[2][0] == np.float32((0.0 - 52.5) / 13.7) and got[2][1] == 0  # age 0 is not missing
  assert list(got[4][6:9]) == [0, 0, 1]  # sex code 2: never seen in training


def test_batched_encoding_and_text_values_agree_with_the_reference():
  spec = _spec()
  batch = tf.io.parse_example([_serialized(spec, r) for r in ROWS], metadata_input.parse_spec(spec))
  want = np.asarray(md.encode_rows(spec, [_reference(spec, r) for r in ROWS]), np.float32)
  np.testing.assert_array_equal(metadata_input.encode(spec, batch).numpy(), want)
  # Text, as a CSV gives it (predict): missing words and blanks are missing.
  text = md.MetadataSpec(spec.columns[:2])
  rows = [{"age": "61", "site": "torso"}, {"age": " NA ", "site": "Unknown"}, {"age": "", "site": ""}]
  got = metadata_input.encode(text, {"meta/age": tf.constant([r["age"] for r in rows]),
                                     "meta/site": tf.constant([r["site"] for r in rows])})
  np.testing.assert_array_equal(got.numpy(), np.asarray(md.encode_rows(text, rows), np.float32))


def test_select_names_what_the_records_have(tmp_path):
  records = make_records(tmp_path, size=32, folds=2)
  info = pipeline.load_info(records)
  with pytest.raises(ValueError, match="holds no metadata columns; convert with make_records "
                                       "--metadata_columns"):
    metadata_input.select(info, "all")
  assert not metadata_input.select(info, "")
  add_metadata(records, {"age": md.NUMERIC, "site": md.CATEGORICAL},
               lambda name, label: {"age": 40 + label, "site": "torso"})
  info = pipeline.load_info(records)
  with pytest.raises(ValueError, match=r"metadata=age,sexx: no column 'sexx'; .* has age, site"):
    metadata_input.select(info, "age,sexx")
  assert metadata_input.select(info, "all").names == ("age", "site")
  assert metadata_input.select(info, "site,age").names == ("site", "age")
  full, fold0 = metadata_input.select(info, "age"), metadata_input.select(info, "age", 0)
  assert fold0.columns[0].stats == metadata_input.records_spec(info).columns[0].fold_stats[0]
  assert fold0.columns[0].stats != full.columns[0].stats  # fold 0's images are left out
  assert not fold0.columns[0].fold_stats  # the model's spec keeps only what it uses


def _values(name, label):
  i = int(name[1:])
  return {"age": None if i % 5 == 0 else 30.0 + 3 * i + 10 * label,
          "site": [None, "head", "torso", "palms"][i % 4]}


def test_pipeline_yields_image_and_metadata_only_when_asked(tmp_path):
  records = make_records(tmp_path, size=32)
  spec = add_metadata(records, {"age": md.NUMERIC, "site": md.CATEGORICAL}, _values)
  info = pipeline.load_info(records)
  plain = list(pipeline.make_dataset(info, "valid", batch_size=8, training=False,
                                     with_names=True))
  assert isinstance(plain[0][0], tf.Tensor) and plain[0][0].shape[1:] == (32, 32, 3)
  both = list(pipeline.make_dataset(info, "valid", batch_size=8, training=False, with_names=True,
                                    metadata=spec))
  for (x, y, n), (image, y0, n0) in zip(both, plain):
    assert set(x) == {"image", "metadata"}
    np.testing.assert_array_equal(x["image"].numpy(), image.numpy())
    np.testing.assert_array_equal(y.numpy(), y0.numpy())
    names = [b.decode() for b in n.numpy()]
    labels = y.numpy()
    want = md.encode_rows(spec, [_values(a, int(b)) for a, b in zip(names, labels)])
    np.testing.assert_allclose(x["metadata"].numpy(), np.asarray(want, np.float32), rtol=0,
                               atol=1e-6)
  assert sum(len(b[1]) for b in both) == info.num_examples("valid")
  # Training batches too (shuffled, endless), with the metadata's shape fixed for XLA.
  x, _ = next(iter(pipeline.make_dataset(info, "train", batch_size=4, metadata=spec)))
  assert x["metadata"].shape == (4, spec.width) and x["metadata"].dtype == tf.float32
  assert not math.isnan(float(tf.reduce_sum(x["metadata"])))
