"""The tf.data input pipeline: shards -> (uint8 images [B,H,W,3], int32 labels [B]).

Images leave the host as uint8 — 4x less to copy to the accelerator than float32 — and every float op
(augmentation, the backbone's own normalisation) runs on the device inside the compiled step.
Measured on 2 cores, 512^2 JPEG: a plain TFRecord -> decode_jpeg pipeline reads ~990 img/s against a
~1,470 img/s decode limit; ImageDataGenerator with the notebook's augmentations reached 28 img/s.
Per CPU second (robust on this shared host), the training pipeline reads 0.89-0.91 of the decode
limit (0.84-0.86 before parsing only the needed features with decode_jpeg in one map, issue 8); the
rest is reading the files (~50-60 us of CPU per 60 KB record, 16-20k records per CPU second read
alone) and shuffling the serialized records (~15 us), which in-memory bytes do not pay.
"""

from __future__ import annotations

import logging
import os
import re

import tensorflow as tf

from skinrecords.core import features
from skinrecords.core import fileio
from skinrecords.core import manifest
from skinrecords.core import metadata as md
from skinrecords.input import kaggle
from skinrecords.input import metadata_input as input_metadata

AUTOTUNE = tf.data.AUTOTUNE
NO_LABEL = -1  # the label of records that carry none (SIIM-ISIC test files)


class CorruptShardError(RuntimeError):
  """A shard failed its CRC while reading; the message names the file."""


def load_info(records_dir: str | os.PathLike) -> manifest.DatasetInfo:
  """Reads manifest.json; a folder of SIIM-ISIC Kaggle `.tfrec` files without one also works
  (`kaggle.read_info`: one counting pass, cached)."""
  records_dir = os.fspath(records_dir)  # a str: gs:// would not survive pathlib
  if not fileio.isdir(records_dir):
    raise FileNotFoundError(f"{records_dir}: no such folder")
  if manifest.exists(records_dir):
    return manifest.read_info(records_dir)
  try:
    return kaggle.read_info(records_dir)
  except tf.errors.DataLossError as err:
    raise corrupt_shard_error(kaggle.list_files(records_dir), err,
                              records_dir) from err


def decode_image(encoded, image_size: int | None, stored_size: int | None = None,
                 image_format: str = "any") -> tf.Tensor:
  """Encoded JPEG/PNG -> uint8 [S, S, 3]; resized (antialiased, rounded) only when S differs from
  the stored size. `bin/predict` decodes through this too, so serving sees the training pixels.
  `image_format="jpeg"` calls decode_jpeg directly (the same pixels as decode_image's sniffing)."""
  if image_format == "jpeg":
    image = tf.io.decode_jpeg(encoded, channels=3)
  elif image_format == "png":
    image = tf.io.decode_png(encoded, channels=3)
  else:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  if image_size and image_size != stored_size:
    image = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
        image, (image_size, image_size), antialias=True)), 0, 255), tf.uint8)
  if image_size:
    image = tf.ensure_shape(image, (image_size, image_size, 3))
  return image


_TF_DTYPES = {"bytes": tf.string, "int64": tf.int64, "float": tf.float32}


def parse_spec(schema: manifest.RecordSchema, keys) -> dict:
  """A parse spec for `keys` only, each with the dtype the files store (absent keys left out)."""
  return {k: tf.io.FixedLenFeature([], _TF_DTYPES[schema.dtype(k)]) for k in keys
          if schema.dtype(k)}


def _label(ex: dict) -> tf.Tensor:
  if features.TARGET not in ex:
    return tf.constant(NO_LABEL, tf.int32)
  return tf.cast(ex[features.TARGET], tf.int32)


def _name(ex: dict) -> tf.Tensor:
  name = ex.get(features.IMAGE_NAME, tf.constant(""))
  return name if name.dtype == tf.string else tf.strings.as_string(name)


def _decoder(schema: manifest.RecordSchema, image_size: int | None, stored_size: int | None,
             with_names: bool, metadata: md.MetadataSpec | None = None):
  """serialized -> (image, label[, name]) in one map: only the features used are parsed (a
  Kaggle record holds 8; parsing them all cost time), and JPEG decodes without sniffing. With a
  metadata spec the first element is {"image": image, "metadata": float32 [width]}."""
  spec = parse_spec(schema, (features.IMAGE, features.TARGET) +
                    ((features.IMAGE_NAME,) if with_names else ()))
  if metadata:
    # Absent keys parse to each column's missing mark (input_metadata.parse_spec).
    spec.update(input_metadata.parse_spec(metadata))

  def decode(serialized):
    ex = tf.io.parse_single_example(serialized, spec)
    image = decode_image(ex[features.IMAGE], image_size, stored_size, schema.image_format)
    if metadata:
      image = input_metadata.as_input(image, input_metadata.encode(metadata, ex))
    if with_names:
      return image, _label(ex), _name(ex)
    return image, _label(ex)
  return decode


def _available_memory() -> int:
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    return 0


def _check(info: manifest.DatasetInfo, split: str, fold: int | None, training: bool,
           balance: str | None, image_size: int | None) -> tuple[list[str], int]:
  """Phase 1: the shard files to read and the output size, or an error saying what to change."""
  if balance not in (None, "none", "oversample"):
    raise ValueError(f"balance={balance!r}; use None, 'none' or 'oversample'")
  shards = info.select(split, fold)
  if not shards:
    raise ValueError(f"{info.records_dir}: split {split!r} (fold {fold}) has no shards")
  if not info.has_labels(split) and (training or balance == "oversample"):
    raise ValueError(f"{info.records_dir}: split {split!r} has no labels ({features.TARGET!r} "
                     "is not in its records); it can be predicted, not trained on")
  counts = info.class_counts(split, fold) if balance == "oversample" else []
  if any(counts) and not all(counts):
    # sample_from_datasets waits forever on a class filter that never yields (it hung).
    empty = [info.classes[c] for c, n in enumerate(counts) if not n]
    where = f"split {split!r}" + (f" (fold {fold})" if fold is not None else "")
    raise ValueError(f"{info.records_dir}: {where} "
                     f"has no {', '.join(map(repr, empty))} examples, so balance='oversample' "
                     "cannot sample them; use balance='class_weights' or 'none'")
  size = image_size or info.image_size
  if size is None:
    raise ValueError(f"{info.records_dir}: images come in several sizes; pass image_size")
  files = [s.path for s in shards]
  missing = [f for f in files if not fileio.exists(f)]
  if missing:
    raise FileNotFoundError(f"{missing[0]}: listed for split {split!r} but missing "
                            f"({len(missing)} of {len(files)} shard files missing)")
  return files, size


def _read(files: list[str], split: str, training: bool, seed: int, cache: bool,
          input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
  """Phase 2: serialized records, this pipeline's share; training interleaves shuffled files."""
  ds = tf.data.Dataset.from_tensor_slices(files)
  shard_data = None
  if input_context and input_context.num_input_pipelines > 1:
    n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
    if len(files) >= n:
      ds = ds.shard(n, i)
      logging.info("input pipeline %d/%d reads %d of %d %r files: %s", i, n, len(files[i::n]),
                   len(files), split, ", ".join(fileio.basename(f) for f in files[i::n]))
    else:
      # Evaluation sets are small and often one file: reading every file is expected there.
      (logging.warning if training else logging.info)(
          "input pipeline %d/%d: only %d %r shard files, sharding by record (every pipeline reads "
          "every file)%s", i, n, len(files), split,
          f". Convert with --min_train_shards={n} to shard by file." if training else "")
      shard_data = (n, i)
  if training:
    # Sharding by record needs the same record order in every pipeline, or pipelines would pick
    # overlapping records: then files keep their order and the interleave stays deterministic.
    if not shard_data:
      ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=not cache)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 16),
                       num_parallel_calls=AUTOTUNE, deterministic=bool(shard_data))
  else:
    ds = ds.flat_map(tf.data.TFRecordDataset)  # file order, record order: fixed
  if shard_data:
    ds = ds.shard(*shard_data)
  if cache:
    need = sum(fileio.size(f) for f in files)
    if need > _available_memory() > 0:
      logging.warning("cache=True keeps %.1f GB of encoded records in memory but only %.1f GB "
                      "is available", need / 1e9, _available_memory() / 1e9)
    ds = ds.cache()  # encoded bytes only: decoded 512^2 images would be ~13x larger
  return ds


def _order(ds: tf.data.Dataset, schema: manifest.RecordSchema, num_classes: int,
           balance: str | None, seed: int, shuffle_buffer: int) -> tf.data.Dataset:
  """Phase 3 (training): endless, shuffled serialized records; classes equal with oversample."""
  ds = ds.repeat()
  if balance != "oversample":
    return ds.shuffle(shuffle_buffer, seed=seed)  # serialized records: cheaper than images
  target = parse_spec(schema, (features.TARGET,))

  def keep(c):
    return lambda r: tf.equal(tf.cast(tf.io.parse_single_example(r, target)[features.TARGET],
                                      tf.int64), c)
  per_class = [ds.filter(keep(c)) for c in range(num_classes)]
  return tf.data.Dataset.sample_from_datasets(
      [p.shuffle(max(shuffle_buffer // num_classes, 1), seed=seed + c)
       for c, p in enumerate(per_class)],
      weights=[1.0 / num_classes] * num_classes, seed=seed)


def make_dataset(records_dir: str | os.PathLike | manifest.DatasetInfo, split: str = "train",
                 batch_size: int = 64, training: bool | None = None, image_size: int | None = None,
                 fold: int | None = None, balance: str | None = None, seed: int = 0,
                 cache: bool = False, shuffle_buffer: int = 2048, with_names: bool = False,
                 input_context: tf.distribute.InputContext | None = None,
                 metadata: md.MetadataSpec | None = None) -> tf.data.Dataset:
  """The dataset for one split.

  Training (default for split "train"): files shuffled every epoch and read in parallel, records
  shuffled, repeated forever, full batches only, non-deterministic order for speed. Evaluation:
  every example exactly once in a fixed order, last partial batch kept. `balance="oversample"`
  samples classes equally (seeded). With `input_context`, `batch_size` is the per-replica batch and
  input is sharded per pipeline: by file when there are at least as many files as pipelines.
  `with_names=True` adds the image names as a third element (for reports and predictions).
  Records without a label (SIIM-ISIC test files) get label NO_LABEL (-1): predict, not train.
  With `metadata` (a spec with columns), each element's image becomes {"image": uint8 image,
  "metadata": float32 [spec.width]} (input/metadata_input.py); without, elements are as before.
  """
  info = records_dir if isinstance(records_dir, manifest.DatasetInfo) else load_info(records_dir)
  training = (split == "train") if training is None else training
  files, size = _check(info, split, fold, training, balance, image_size)
  schema = info.schema(split)
  ds = _read(files, split, training, seed, cache, input_context)
  if training:
    ds = _order(ds, schema, info.num_classes, balance, seed, shuffle_buffer)
  ds = ds.map(_decoder(schema, size, info.image_size, with_names, metadata),
              num_parallel_calls=AUTOTUNE, deterministic=not training)
  ds = ds.batch(batch_size, drop_remainder=training)
  if training:
    options = tf.data.Options()
    options.deterministic = False
    ds = ds.with_options(options)
  return ds.prefetch(AUTOTUNE)


def input_fn(records_dir, split: str = "train", global_batch_size: int = 64, **kwargs):
  """A function for `strategy.distribute_datasets_from_function`: per-replica batch, sharded."""
  info = records_dir if isinstance(records_dir, manifest.DatasetInfo) else load_info(records_dir)

  def fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
    batch = input_context.get_per_replica_batch_size(global_batch_size)
    return make_dataset(info, split, batch_size=batch, input_context=input_context, **kwargs)
  return fn


def find_corrupt_shard(files) -> tuple[str, str] | None:
  """Reads each file alone to find the one whose CRC fails: (path, error) or None."""
  for path in files:
    try:
      for _ in tf.data.TFRecordDataset(path):
        pass
    except tf.errors.DataLossError as err:
      return path, err.message.strip()
  return None


def clean_message(message: str) -> str:
  """TensorFlow's error text without its `{{function_node __wrapped__...}}` and `[Op:...]` parts."""
  message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", str(message))
  return re.sub(r"\s*\[Op:\w+\]", "", message).strip()


# What TensorFlow's image decoders say about bytes that are not an image (TF 2.21).
_DECODE_ERRORS = ("DecodeJpeg", "DecodePng", "DecodeImage", "DecodeBmp", "DecodeGif",
                  "Invalid JPEG data", "Unknown image file format", "Invalid PNG data")


def is_decode_error(err: Exception) -> bool:
  return isinstance(err, tf.errors.InvalidArgumentError) and any(
      s in str(err) for s in _DECODE_ERRORS)


def find_undecodable(files) -> tuple[str, int, str, str] | None:
  """The first record whose image does not decode: (shard, record index, image_name, error)."""
  spec = {features.IMAGE: tf.io.FixedLenFeature([], tf.string),
          features.IMAGE_NAME: tf.io.FixedLenFeature([], tf.string, default_value="")}
  for path in files:
    try:
      for index, raw in enumerate(tf.data.TFRecordDataset(path)):
        ex = tf.io.parse_single_example(raw, spec)
        try:
          tf.io.decode_image(ex[features.IMAGE], channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError as err:
          name = ex[features.IMAGE_NAME].numpy().decode("utf-8", "replace")
          return path, index, name, clean_message(err.message)
    except tf.errors.OpError:
      continue  # a framing error is corrupt_shard_error's
  return None


def read_error(err: Exception, files, records_dir) -> CorruptShardError | None:
  """One line for a records read that failed (a corrupt shard, or a record whose image does not
  decode: train and evaluate ended in a raw DecodeJpeg traceback, issue 27), naming the shard and
  record; None when `err` is neither."""
  if isinstance(err, tf.errors.DataLossError):
    return corrupt_shard_error(files, err, records_dir)
  if not is_decode_error(err):
    return None
  found = find_undecodable(files)
  where = (f"record {found[1]} ({found[2] or 'no image_name'}) of {found[0]} does not decode as "
           f"an image ({found[3]})" if found else
           f"a record does not decode as an image ({clean_message(err.message)})")
  return CorruptShardError(f"{where}; bin/verify_records --records_dir={records_dir} lists every "
                           "such record; convert those images again")


def corrupt_shard_error(files, err: tf.errors.DataLossError, records_dir) -> CorruptShardError:
  """Names the shard behind TensorFlow's anonymous DataLossError (tensorflow#20835)."""
  found = find_corrupt_shard(files)
  where = (f"{found[0]}: {clean_message(found[1])}" if found else
           f"one of {len(files)} shards ({clean_message(err.message)})")
  return CorruptShardError(f"corrupt TFRecord shard {where}; run bin/verify_records "
                           f"--records_dir={records_dir}")


def iterate(ds: tf.data.Dataset, info: manifest.DatasetInfo, split: str, fold: int | None = None):
  """Iterates `ds`; a corrupt shard raises CorruptShardError naming the file."""
  try:
    yield from ds
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
    named = read_error(err, [s.path for s in info.select(split, fold)], info.records_dir)
    if named is None:
      raise
    raise named from err


def patient_ids(info: manifest.DatasetInfo, split: str, fold, names) -> list[str] | None:
  """Patient ids of `names` (in that order), read from the split's records; None when the records
  carry none (then confidence intervals resample images, not patients)."""
  by_name = {}
  for shard in info.select(split, fold):
    for raw in tf.data.TFRecordDataset(shard.path):
      feature = tf.train.Example.FromString(raw.numpy()).features.feature
      name = feature[features.IMAGE_NAME].bytes_list.value
      patient = feature.get(features.PATIENT_ID)
      if not name or patient is None:
        continue
      # Kaggle's files store patient ids as int64, ours as bytes.
      value = (patient.bytes_list.value or patient.int64_list.value or [b""])[0]
      value = value.decode("utf-8") if isinstance(value, bytes) else str(value)
      by_name[name[0].decode("utf-8")] = value
  groups = [by_name.get(n, "") for n in names]
  return groups if any(groups) else None
