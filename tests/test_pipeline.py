"""The tf.data pipeline: exactly-once evaluation, balance, folds, per-worker sharding, corrupt shards
(SIIM-ISIC Kaggle files: test_kaggle.py)."""
# pylint: disable=protected-access

from __future__ import annotations

import collections
import dataclasses
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from conftest import convert_folder, write_dark_bright
from skinrecords.core import manifest
from skinrecords.input import pipeline

SIZE = 32


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  """60 "dark" (class a) and 20 "bright" (class b) images: the label is visible in the pixels."""
  root = tmp_path_factory.mktemp("pipe")
  write_dark_bright(root / "in", {"a": (60, 40), "b": (20, 210)}, 30, lambda i: (40, 40, 3))
  return convert_folder(root / "in", root / "out", SIZE, split=(0.6, 0.2, 0.2), folds=3,
                        min_train_shards=6)


def _collect(ds):
  images, labels, names = [], [], []
  for batch in ds:
    images.append(batch[0].numpy())
    labels.append(batch[1].numpy())
    if len(batch) > 2:
      names += [n.decode() for n in batch[2].numpy()]
  return np.concatenate(images), np.concatenate(labels), names


def test_evaluation_yields_every_record_once_with_its_label(records_dir):
  info = pipeline.load_info(records_dir)
  for split in ("train", "valid", "test"):
    ds = pipeline.make_dataset(info, split, batch_size=7, training=False, with_names=True)
    images, labels, names = _collect(ds)
    assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
    assert len(names) == len(set(names)) == info.num_examples(split)
    # Label travels with its own image: bright images are class b (id 1).
    np.testing.assert_array_equal(labels, (images.mean(axis=(1, 2, 3)) > 128).astype(int))
    np.testing.assert_array_equal(labels, [n.startswith("b") for n in names])
    # Fixed order: a second pass is identical.
    assert _collect(ds)[2] == names


@pytest.mark.slow
def test_training_batches_are_full_shuffled_and_repeat(records_dir):
  info = pipeline.load_info(records_dir)
  n = info.num_examples("train")
  ds = pipeline.make_dataset(info, "train", batch_size=8, seed=1, with_names=True)
  # Twenty epochs' worth: it must not end after one. Records are shuffled after the repeat (a
  # buffer spanning epochs), so coverage is statistical: each name is missed with p ~ e^-20.
  batches = list(ds.take(20 * n // 8))
  assert len(batches) == 20 * n // 8
  assert all(b[0].shape == (8, SIZE, SIZE, 3) for b in batches)
  names = [x.decode() for b in batches for x in b[2].numpy()]
  in_order = _collect(pipeline.make_dataset(info, "train", batch_size=8, training=False,
                                            with_names=True))[2]
  assert set(names) == set(in_order)  # every training example came round
  assert names[:n] != in_order and sorted(names[:16]) != sorted(in_order[:16])  # shuffled
  labels = np.concatenate([b[1].numpy() for b in batches])
  np.testing.assert_array_equal(labels, [x.startswith("b") for x in names])


def test_oversample_gives_balanced_classes(records_dir):
  ds = pipeline.make_dataset(records_dir, "train", batch_size=50, balance="oversample", seed=3)
  labels = np.concatenate([b[1].numpy() for b in ds.take(20)])
  assert abs(labels.mean() - 0.5) < 0.05  # the split itself is 25% class b
  weights = manifest.class_weights(pipeline.load_info(records_dir))
  assert weights[1] == pytest.approx(2 * weights[0] * 1.5, rel=0.05)  # 3:1 imbalance, n/(k*n_c)


@pytest.mark.slow
def test_folds_are_disjoint_and_cover_train(records_dir):
  info = pipeline.load_info(records_dir)
  all_train = set(_collect(pipeline.make_dataset(info, "train", training=False,
                                                 with_names=True))[2])
  valid_sets = []
  for k in range(3):
    tr = set(_collect(pipeline.make_dataset(info, "train", fold=k, training=False,
                                            with_names=True))[2])
    va = set(_collect(pipeline.make_dataset(info, "valid", fold=k, training=False,
                                            with_names=True))[2])
    assert tr and va and not tr & va and tr | va == all_train
    valid_sets.append(va)
  assert set.union(*valid_sets) == all_train and sum(map(len, valid_sets)) == len(all_train)
  with pytest.raises(ValueError, match="fold=7"):
    info.select("train", fold=7)


@pytest.mark.parametrize("pipelines", [3, 20])  # 3 <= shard files: by file; 20 > files: by record
def test_multi_worker_sharding_is_disjoint_and_complete(records_dir, pipelines):
  info = pipeline.load_info(records_dir)
  n_files = len(info.select("train"))
  assert (pipelines <= n_files) == (pipelines == 3)
  seen = []
  for i in range(pipelines):
    ctx = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=i,
                                     num_replicas_in_sync=pipelines)
    ds = pipeline.make_dataset(info, "train", batch_size=1000, training=False, with_names=True,
                               input_context=ctx)
    seen.append(_collect(ds)[2] if any(True for _ in ds) else [])
  flat = [n for names in seen for n in names]
  assert len(flat) == len(set(flat)) == info.num_examples("train")


@pytest.mark.slow
def test_training_input_fn_per_replica_batch(records_dir):
  fn = pipeline.input_fn(records_dir, "train", global_batch_size=8)
  ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1,
                                   num_replicas_in_sync=2)
  images, labels = next(iter(fn(ctx)))
  assert images.shape[0] == 4 and labels.shape == (4,)
  # The function shards by its context (a mutant passing no context to make_dataset survived):
  # two pipelines read disjoint halves that together are the split once (the split it was given,
  # not the default); a DatasetInfo works too.
  info = pipeline.load_info(records_dir)
  seen = []
  for i in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i,
                                     num_replicas_in_sync=2)
    fn = pipeline.input_fn(info if i else str(records_dir), "valid", global_batch_size=2000,
                           training=False, with_names=True)
    seen.append(list(_collect(fn(ctx))[2]))
  assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
  assert len(seen[0]) + len(seen[1]) == info.num_examples("valid")


def test_resize_only_when_sizes_differ(records_dir):
  images, _, _ = _collect(pipeline.make_dataset(records_dir, "test", batch_size=4, training=False,
                                                image_size=16).take(1))
  assert images.shape[1:] == (16, 16, 3) and images.dtype == np.uint8


def test_corrupt_shard_error_names_the_file(tmp_path, records_dir):
  """The manifest is read before the damage, so only the read itself meets the bad CRC."""
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.copytree(records_dir, tmp_path / "r")
  info = pipeline.load_info(tmp_path / "r")
  bad = pathlib.Path(info.select("train")[1].path)
  data = bytearray(bad.read_bytes())
  data[len(data) // 2] ^= 0x55
  bad.write_bytes(bytes(data))
  ds = pipeline.make_dataset(info, "train", batch_size=4, training=False)
  with pytest.raises(pipeline.CorruptShardError, match=bad.name):
    collections.deque(pipeline.iterate(ds, info, "train"), maxlen=0)


def test_only_needed_features_are_parsed_with_the_files_dtypes():
  schema = manifest.RecordSchema.of({"image": "bytes", "image_name": "bytes", "target": "int64",
                                     "patient_id": "int64", "sex": "int64"}, "jpeg")
  spec = pipeline.parse_spec(schema, ("image", "target", "fold"))
  assert sorted(spec) == ["image", "target"]  # "fold" is not in these files: left out
  assert spec["target"].dtype == tf.int64 and spec["image"].dtype == tf.string
  ours = manifest.DatasetInfo("x", ("a", "b"), 8, {}, {"image_format": "jpeg"}).schema("train")
  assert ours.image_format == "jpeg" and ours.dtype("patient_id") == "bytes" and ours.has_labels


def test_oversampling_an_empty_class_fails_fast_naming_it(records_dir):
  info = pipeline.load_info(records_dir)
  no_second = {split: tuple(dataclasses.replace(s, class_counts=(s.class_counts[0], 0))
                            for s in shards) for split, shards in info.shards.items()}
  broken = dataclasses.replace(info, shards=no_second)
  with pytest.raises(ValueError, match=repr(info.classes[1])):
    pipeline.make_dataset(broken, "train", balance="oversample")
  pipeline.make_dataset(info, "train", balance="oversample")  # both classes present: fine


# ---------------------------------------------- found by mutation testing (tools/mutation)


def _corrupt(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x55
  path.write_bytes(bytes(data))


def test_a_corrupt_shard_of_a_fold_is_named_and_an_unfound_one_is_counted(tmp_path, records_dir,
                                                                          monkeypatch):
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.copytree(records_dir, tmp_path / "r")
  info = pipeline.load_info(tmp_path / "r")
  bad = pathlib.Path(info.select("valid", fold=1)[0].path)
  _corrupt(bad)
  ds = pipeline.make_dataset(info, "valid", fold=1, batch_size=4, training=False)
  # The files searched are fold 1's, not the separate "valid" split's.
  with pytest.raises(pipeline.CorruptShardError, match=f"corrupt TFRecord shard .*{bad.name}: "):
    collections.deque(pipeline.iterate(ds, info, "valid", fold=1), maxlen=0)
  # When rereading each file alone finds nothing, the message counts the files it searched and
  # keeps TensorFlow's own message.
  monkeypatch.setattr(pipeline, "find_corrupt_shard", lambda files: None)
  n = len(info.select("valid", fold=1))
  with pytest.raises(pipeline.CorruptShardError) as caught:
    collections.deque(pipeline.iterate(ds, info, "valid", fold=1), maxlen=0)
  message = str(caught.value)
  assert message.startswith(f"corrupt TFRecord shard one of {n} shards (")
  assert message.endswith(f"); run bin/verify_records --records_dir={tmp_path / 'r'}")
  assert "corrupted record" in message or "checksum" in message.lower(), message


def test_names_default_to_empty_and_integer_names_become_text():
  assert pipeline._name({}).numpy() == b""
  assert pipeline._name({"image_name": tf.constant(7, tf.int64)}).numpy() == b"7"
  assert pipeline._name({"image_name": tf.constant("ISIC_1")}).numpy() == b"ISIC_1"
