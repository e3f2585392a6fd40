"""Reading the public SIIM-ISIC melanoma TFRecords (the `melanoma-NxN` Kaggle sets) as published.

Those folders hold `train00-2071.tfrec` ... `train14-2061.tfrec` and `test00-687.tfrec` ... (the
count after the dash) and no manifest. Their records store `image` (JPEG bytes) and `image_name`
(bytes) like ours, but `patient_id`, `sex`, `age_approx`, `anatom_site_general_challenge`,
`diagnosis` and `target` as int64 (label-encoded), and the test files have no `target`. So:

- each split's schema is learnt from the first record of each of its files (all must agree), and
  the pipeline parses only what it needs with the dtype found there;
- one counting pass over every record gives the per-file class counts (class weights, the head's
  initial bias) and the image sizes (`extract_jpeg_shape` reads the JPEG header only): when every
  image has the same square size it becomes `image_size`, otherwise images are resized on read;
- folds are K-fold over the training *file* indices, as the public notebooks do it: K = min(5,
  number of train files), fold k = the k-th contiguous group of files (15 files: 0-2, 3-5, ...).
  The published training files were built patient-stratified, so no patient spans two files and a
  file-level fold does not leak patients.
- their int64 `sex`, `age_approx` and `anatom_site_general_challenge` are patient metadata
  (`DatasetInfo.metadata`): age numeric, sex and site categorical with the code's decimal string
  as the category, -1 (pandas' code for NaN) or an absent feature missing. The counting pass reads
  them too; statistics come from the training files, and per fold from the other folds' files.

`pipeline.load_info` calls `read_info` for any folder without manifest.json; the result is cached
per folder listing (names, sizes, mtimes), so `bin/train`'s two look-ups cost one pass.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time

from google.protobuf import message
import numpy as np
import tensorflow as tf

from skinrecords.core import features
from skinrecords.core import fileio
from skinrecords.core import manifest
from skinrecords.core import metadata
from skinrecords.data import preprocess

CLASSES = ("0", "1")  # `target`: 0 benign, 1 melanoma (id 1 is the positive class in metrics)
MAX_FOLDS = 5  # the public notebooks' K
_COUNT = re.compile(r"-(\d+)\.tfrec(ord)?$")  # train00-2071.tfrec: 2071 records
_KINDS = {"bytes_list": "bytes", "int64_list": "int64", "float_list": "float"}
_CACHE: dict[tuple, manifest.DatasetInfo] = {}
# The metadata the published files carry, label-encoded (README "Metadata" says what is known of
# the codes). `diagnosis` is the label in other words: never metadata.
METADATA_COLUMNS = (("sex", metadata.CATEGORICAL), ("age_approx", metadata.NUMERIC),
                    ("anatom_site_general_challenge", metadata.CATEGORICAL))
MISSING_CODE = -1  # pandas.factorize's code for NaN


def list_files(records_dir: str) -> list[str]:
  files = [p for p in fileio.glob(fileio.join(records_dir, "*.tfrec*"))
           if not p.endswith(".tmp") and not fileio.isdir(p)]
  if not files:
    raise FileNotFoundError(f"{records_dir}: neither {manifest.FILE} nor *.tfrec/*.tfrecord "
                            "files; point --records_dir at a make_records output folder or a "
                            "folder of SIIM-ISIC TFRecords")
  return files


def split_of(name: str) -> str:
  """The split a Kaggle file belongs to, from its name prefix ("train" for anything else)."""
  return next((s for s in manifest.SPLITS if name.startswith(s)), "train")


def folds_of(num_files: int) -> list[int]:
  """Fold of each train file: K = min(5, files) contiguous groups, as even as they go."""
  k = min(MAX_FOLDS, num_files)
  return [i * k // num_files for i in range(num_files)]


def _image_format(data: bytes) -> str:
  """"jpeg" or "png" (what the reader decodes by format), else "any" (decoded by sniffing)."""
  fmt = preprocess.sniff_format(data)
  return fmt if fmt in preprocess.IMAGE_FORMATS else "any"


def _first_record(path) -> bytes:
  """The first record's bytes, read straight from the framing (uint64 length, uint32 CRC, data):
  a tf.data pipeline per file cost ~0.1 s here, times 31 files. CRCs are checked by the
  counting pass that follows."""
  with fileio.open(path, "rb") as f:
    header = f.read(12)
    if len(header) < 12:
      raise ValueError(f"{path}: no records (an empty or truncated file)")
    length = struct.unpack("<Q", header[:8])[0]
    if length > fileio.size(path) - 16:  # garbage framing: read(2**63) ended in MemoryError
      raise ValueError(f"{path}: not a TFRecord file (its first record claims {length} bytes, "
                       f"the file holds {fileio.size(path)})")
    data = f.read(length)
  if len(data) != length:
    raise ValueError(f"{path}: truncated first record ({len(data)} of {length} bytes)")
  return data


def inspect(path: str | os.PathLike) -> manifest.RecordSchema:
  """The schema of one file, from its first record."""
  try:
    example = tf.train.Example.FromString(_first_record(path))
  except message.DecodeError as err:
    raise ValueError(f"{path}: the first record is not a tf.train.Example ({err})") from err
  dtypes = {k: _KINDS.get(f.WhichOneof("kind"), "bytes") for k, f in
            example.features.feature.items()}
  if dtypes.get(features.IMAGE) != "bytes":
    raise ValueError(f"{path}: records have no bytes feature {features.IMAGE!r} (features: "
                     f"{sorted(dtypes)}); not image TFRecords")
  image = example.features.feature[features.IMAGE].bytes_list.value[0]
  return manifest.RecordSchema.of(dtypes, _image_format(image))


def _group_schema(files: list[str]) -> manifest.RecordSchema:
  """One schema for a group of files; an error naming the first file that differs."""
  schema = inspect(files[0])
  for path in files[1:]:
    other = inspect(path)
    if other != schema:
      raise ValueError(f"{path}: features {dict(other.dtypes)} ({other.image_format}) differ from "
                       f"{fileio.basename(files[0])}'s {dict(schema.dtypes)} ({schema.image_format}); keep one "
                       "kind of file per split in the folder")
  return schema


def _metadata_keys(schema: manifest.RecordSchema) -> list[str]:
  """The METADATA_COLUMNS these files store as int64 codes (the published form; a file that
  stores them otherwise was not made the published way, and they are not read as metadata)."""
  return [name for name, _ in METADATA_COLUMNS if schema.dtype(name) == "int64"]


def _count_dataset(files: list[str], schema: manifest.RecordSchema) -> tf.data.Dataset:
  """(file index, target or -1, height, width, metadata [n, columns] as float64) per record, in
  large batches; an absent metadata feature reads as MISSING_CODE."""
  spec = {features.IMAGE: tf.io.FixedLenFeature([], tf.string)}
  keys = _metadata_keys(schema)
  for key in keys:
    spec[key] = tf.io.FixedLenFeature([], tf.int64, default_value=MISSING_CODE)
  label_dtype = schema.dtype(features.TARGET)
  if label_dtype:
    spec[features.TARGET] = tf.io.FixedLenFeature([], tf.float32 if label_dtype == "float"
                                                  else tf.int64)

  def parse(i, serialized):
    ex = tf.io.parse_single_example(serialized, spec)
    if schema.image_format == "jpeg":
      shape = tf.io.extract_jpeg_shape(ex[features.IMAGE])  # the header only: no decode
    else:
      shape = tf.shape(tf.io.decode_image(ex[features.IMAGE], channels=3,
                                          expand_animations=False))
    label = tf.cast(ex[features.TARGET], tf.int64) if label_dtype else tf.constant(-1, tf.int64)
    meta = tf.stack([tf.cast(ex[k], tf.float64) for k in keys]) if keys else tf.zeros([0],
                                                                                     tf.float64)
    return i, label, tf.cast(shape[0], tf.int64), tf.cast(shape[1], tf.int64), meta

  ds = tf.data.Dataset.from_tensor_slices((tf.range(len(files), dtype=tf.int64),
                                           list(files)))
  ds = ds.interleave(lambda i, f: tf.data.TFRecordDataset(f).map(lambda r: (i, r)),
                     cycle_length=min(len(files), 8), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(4096)


def _count(files, schema, num_classes: int):
  """Per file: records, class counts and metadata values ([records, columns] of
  `_metadata_keys(schema)`); and the set of (height, width) seen."""
  records = np.zeros(len(files), np.int64)
  counts = np.zeros((len(files), num_classes), np.int64)
  sizes: set[tuple[int, int]] = set()
  meta: list[list[np.ndarray]] = [[] for _ in files]
  for i, label, h, w, values in _count_dataset(files, schema).as_numpy_iterator():
    for j in np.unique(i):
      meta[int(j)].append(values[i == j])
    np.add.at(records, i, 1)
    labelled = label >= 0
    if np.any(labelled & (label >= num_classes)):
      bad = int(label[label >= num_classes][0])
      raise ValueError(f"{files[int(i[label >= num_classes][0])]}: target={bad}; SIIM-ISIC files "
                       f"hold 0 (benign) or 1 (melanoma)")
    np.add.at(counts, (i[labelled], label[labelled]), 1)
    sizes.update(zip(h.tolist(), w.tolist()))
  width = len(_metadata_keys(schema))
  return records, counts, sizes, [np.concatenate(m) if m else np.zeros((0, width)) for m in meta]


def _shards(files, schema, records, counts, folds) -> tuple[manifest.Shard, ...]:
  shards = []
  for j, path in enumerate(files):
    m = _COUNT.search(fileio.basename(path))
    if m and int(m[1]) != records[j]:
      logging.warning("%s: the name says %s records, the file holds %d", path, m[1], records[j])
    shards.append(manifest.Shard(path, int(records[j]), folds[j] if folds else -1,
                                 tuple(int(c) for c in counts[j]) if schema.has_labels else ()))
  return tuple(shards)


def _image_size(records_dir, all_sizes: set) -> int | None:
  if len(all_sizes) == 1 and len({*next(iter(all_sizes))}) == 1:
    size = next(iter(all_sizes))[0]
    logging.info("%s: every image is %dx%d: image_size=%d (inferred from the records)",
                 records_dir, size, size, size)
    return size
  shown = ", ".join(f"{h}x{w}" for h, w in sorted(all_sizes)[:4])
  logging.info("%s: images come in %d sizes (%s%s): resized on read to the image_size asked for",
               records_dir, len(all_sizes), shown, ", ..." if len(all_sizes) > 4 else "")
  return None


def metadata_spec(schemas: dict, shards: dict, values: dict) -> metadata.MetadataSpec:
  """The files' metadata as a MetadataSpec: statistics from the training files (per fold: from
  the other folds' files), missing counts per split. `values[split][j]`: file j's
  [records, columns] array of `_metadata_keys(schemas[split])`, MISSING_CODE where missing."""
  train = schemas.get("train")
  columns = []
  for name, kind in METADATA_COLUMNS:
    if train is None or name not in _metadata_keys(train):
      continue

    def column_of(split, files, name=name, kind=kind):
      keys = _metadata_keys(schemas[split])
      if name not in keys:  # a split without it: every record misses it
        return [None] * sum(len(v) for v in files)
      # Sorted: the statistics never depend on the order records were counted in.
      codes = sorted(float(x) for v in files for x in v[:, keys.index(name)])
      return [None if x == MISSING_CODE else (str(int(x)) if kind == metadata.CATEGORICAL else x)
              for x in codes]

    folds = [s.fold for s in shards["train"]]
    fold_stats = {k: metadata.compute_stats(kind, column_of(
        "train", [v for v, f in zip(values["train"], folds) if f != k])) for k in sorted(set(folds))
                  if k >= 0}
    missing = {split: sum(v is None for v in column_of(split, values[split])) for split in values}
    columns.append(metadata.Column(
        name, kind, metadata.compute_stats(kind, column_of("train", values["train"])), fold_stats,
        missing, source="SIIM-ISIC Kaggle int64 code", record_key=name, record_dtype="int64",
        missing_code=MISSING_CODE))
  spec = metadata.MetadataSpec(tuple(columns))
  spec.validate()
  return spec


def _key(records_dir: str, files) -> tuple:
  return (fileio.canonical(records_dir),) + tuple((fileio.basename(p), *fileio.stat(p)) for p in files)


def read_info(records_dir: str | os.PathLike) -> manifest.DatasetInfo:
  """A `DatasetInfo` for a folder of SIIM-ISIC files: schemas, counts, sizes, file folds."""
  records_dir = os.fspath(records_dir)
  files = list_files(records_dir)
  key = _key(records_dir, files)
  if key in _CACHE:
    return _CACHE[key]
  groups: dict[str, list[str]] = {}
  for p in files:
    groups.setdefault(split_of(fileio.basename(p)), []).append(p)
  start = time.perf_counter()
  shards, schemas, sizes, values = {}, {}, set(), {}
  for split, group in groups.items():
    schema = schemas[split] = _group_schema(group)
    records, counts, split_sizes, values[split] = _count(group, schema, len(CLASSES))
    folds = folds_of(len(group)) if split == "train" else None
    shards[split] = _shards(group, schema, records, counts, folds)
    sizes |= split_sizes
  logging.info("%s: no manifest; counted %d records in %d SIIM-ISIC files in %.1f s (%s)",
               records_dir, sum(s.num_examples for g in shards.values() for s in g), len(files),
               time.perf_counter() - start, "; ".join(
                   f"{k}: {len(v)} files{'' if schemas[k].has_labels else ', no target'}"
                   for k, v in shards.items()))
  info = manifest.DatasetInfo(str(records_dir), CLASSES, _image_size(records_dir, sizes), shards,
                              None, schemas, metadata_spec(schemas, shards, values))
  _CACHE[key] = info
  return info
