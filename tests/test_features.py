"""The record schema, one table (`features.SCHEMA`): the writer, the reader's spec, the manifest's
"features" entry and `RecordSchema.ours` all come from it and agree with what is written."""

from __future__ import annotations

import pytest
import tensorflow as tf

from skinrecords.core import features
from skinrecords.core import manifest
from skinrecords.core import tfrecord


def _values(**overrides):
  values = dict(image=b"\xff\xd8jpeg", image_name="ISIC_1", target=1, patient_id="P7", fold=2,
                height=64, width=48)
  return {**values, **overrides}


def test_the_spec_reads_back_every_feature_written():
  parsed = tf.io.parse_single_example(tfrecord.serialize_example(**_values()),
                                      features.feature_spec())
  got = {k: v.numpy() for k, v in parsed.items()}
  assert got == {"image": b"\xff\xd8jpeg", "image_name": b"ISIC_1", "target": 1,
                 "patient_id": b"P7", "fold": 2, "height": 64, "width": 48}


def test_optional_features_take_their_default_and_required_ones_are_required():
  record = tfrecord.serialize_example(**{k: v for k, v in _values().items()
                                         if k not in ("patient_id", "fold")})
  assert record == tfrecord.serialize_example(**_values(patient_id="", fold=-1))
  with pytest.raises(TypeError, match="missing feature 'height'"):
    tfrecord.serialize_example(**{k: v for k, v in _values().items() if k != "height"})
  with pytest.raises(TypeError, match="unknown feature"):
    tfrecord.serialize_example(**_values(colour="red"))


def test_schema_dtypes_match_what_is_written():
  example = tf.train.Example.FromString(tfrecord.serialize_example(**_values()))
  written = {k: ("bytes" if v.bytes_list.value else "int64")
             for k, v in example.features.feature.items()}
  assert written == features.dtypes() == dict(manifest.RecordSchema.ours("jpeg").dtypes)
  assert list(features.manifest_entry()) == [f.key for f in features.SCHEMA]
  # The release's manifests hold exactly this entry; readers of old folders rely on it.
  assert features.manifest_entry() == {k: k for k in ("image", "image_name", "target",
                                                      "patient_id", "fold", "height", "width")}


def test_built_and_read_manifests_give_the_same_dataset_info(tmp_path):
  classes = ["benign", "malignant"]
  plan = [("train-00000-of-00001.tfrecord", "train", 0, None),
          ("test-00000-of-00001.tfrecord", "test", -1, None)]
  done = {plan[0][0]: {"num_examples": 3, "sha256": "a", "class_counts": [2, 1], "rejected": []},
          plan[1][0]: {"num_examples": 1, "sha256": "b", "class_counts": [0, 1], "rejected": []}}
  built = manifest.build(fingerprint="f", classes=classes, plan=plan, done=done, image_size=32,
                         image_format="png", folds=1, inputs={}, conversion={},
                         preprocessing={"image_size": 32}, versions={})
  manifest.write(tmp_path, built)
  read = manifest.read_info(tmp_path)
  assert read == manifest.info_of(tmp_path, built)
  assert read.from_manifest and read.fingerprint == "f" and read.preprocessing == {"image_size": 32}
  assert read.schema("train") == manifest.RecordSchema.ours("png")
  assert read.class_counts("train") == [2, 1] and read.num_examples("test") == 1
