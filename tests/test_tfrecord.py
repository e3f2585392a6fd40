"""skinrecords.core.tfrecord against TensorFlow's own writer and Example, byte for byte."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import tensorflow as tf

from conftest import bin_env
from skinrecords.core import tfrecord


def _tf_example(*, image, image_name, target, patient_id, fold, height, width) -> bytes:
  """The reference: what the converter wrote before the workers built records themselves."""

  def _bytes(v):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

  def _int(v):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

  return tf.train.Example(features=tf.train.Features(feature={
      "image": _bytes(image), "image_name": _bytes(image_name.encode()), "target": _int(target),
      "patient_id": _bytes(patient_id.encode()), "fold": _int(fold), "height": _int(height),
      "width": _int(width)})).SerializeToString(deterministic=True)


def test_frames_match_tfrecordwriter(tmp_path):
  rng = np.random.default_rng(0)
  payloads = [b"", b"x", b"abc", rng.bytes(255), rng.bytes(70_000)]
  path = str(tmp_path / "ref.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for p in payloads:
      writer.write(p)
  with open(path, "rb") as f:
    assert b"".join(tfrecord.frame(p) for p in payloads) == f.read()
  assert [r.numpy() for r in tf.data.TFRecordDataset(path)] == payloads


def test_masked_crc32c_known_values():
  # CRC-32C("123456789") = 0xE3069283 (RFC 3720); masked as in tensorflow/core/lib/hash/crc32c.h.
  crc = 0xE3069283
  assert tfrecord.masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def test_examples_match_tf_train_example():
  rng = np.random.default_rng(1)
  cases = [
      dict(image=rng.bytes(60_000), image_name="ISIC_0000001", target=1, patient_id="IP_0001",
           fold=3, height=512, width=512),
      dict(image=b"", image_name="", target=0, patient_id="", fold=-1, height=0, width=0),
      dict(image=rng.bytes(10), image_name="naïve 名前", target=7, patient_id="p/ü", fold=-1,
           height=2**40, width=-5),
  ]
  for fields in cases:
    assert tfrecord.serialize_example(**fields) == _tf_example(**fields), fields["image_name"]
    assert tfrecord.example_record(**fields) == tfrecord.frame(_tf_example(**fields))


def test_worker_side_modules_do_not_import_tensorflow(tmp_path):
  """A converter worker builds whole records without TensorFlow (3.4-3.8 s and 675 MB each)."""
  import cv2  # pylint: disable=g-import-not-at-top

  source = tmp_path / "a.png"
  cv2.imwrite(str(source), np.full((40, 48, 3), 120, np.uint8))
  out = tmp_path / "one.tfrecord"
  code = (
      "import pathlib, sys\n"
      "from skinrecords.core import tfrecord\n"
      "from skinrecords.data import convert, preprocess, records, workers\n"
      "pool = workers.RecordPool(1, preprocess.PreprocessConfig(image_size=32))\n"
      f"[(record, reason)] = pool.imap([({str(source)!r}, 'a', 1, 'P', -1)])\n"
      "assert reason is None, reason\n"
      f"pathlib.Path({str(out)!r}).write_bytes(record)\n"
      "print('tensorflow' in sys.modules)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=bin_env(), timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["False"], proc.stdout
  from skinrecords.core import features  # pylint: disable=g-import-not-at-top

  [raw] = list(tf.data.TFRecordDataset(str(out)))  # framing and CRCs checked by TensorFlow
  example = tf.io.parse_single_example(raw, features.feature_spec())
  assert example["image_name"].numpy() == b"a" and int(example["target"]) == 1
  assert tf.io.decode_jpeg(example["image"]).shape == (32, 32, 3)
