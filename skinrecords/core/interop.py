"""What other readers need beside our shards: DALI index files and TFDS metadata.

- Index files (NVIDIA DALI's `tfrecord2idx` format, also read by the `tfrecord` package): one line
  per record, "offset length", where length counts the whole framed record (8-byte length, its
  4-byte CRC, the data, the data's 4-byte CRC). The converter frames every record itself, so it
  writes `idx/<shard stem>.idx` in the same pass from the record lengths; `check_index` re-derives
  the offsets from the shard's own framing for verify_records.
- TFDS metadata (`dataset_info.json`, `features.json`, `target.labels.txt`), so that
  `tfds.builder_from_directory(records_dir)` loads the splits. TFDS 4.9's split entries carry a
  `filepathTemplate`; "{SPLIT}-{SHARD_X_OF_Y}.tfrecord" spells our shard names exactly, so no file
  is renamed or linked. Written by hand (JSON), so the converter does not depend on TFDS.

Plain Python (no TensorFlow): the converter's coordinator imports it.
"""

from __future__ import annotations

import json
import struct

from skinrecords.core import features
from skinrecords.core import fileio

INDEX_DIR = "idx"
INDEX_FORMAT = "DALI tfrecord2idx: one line per record, 'offset length' (whole framed record)"
TFDS_FILES = ("dataset_info.json", "features.json", "target.labels.txt")
TFDS_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.tfrecord"
_HEADER = 12  # uint64 length + uint32 masked CRC of the length
_FOOTER = 4  # uint32 masked CRC of the data


def index_name(shard: str) -> str:
  """`idx/train-00000-of-00016.idx` for `train-00000-of-00016.tfrecord` (relative to the folder)."""
  stem = shard[:-len(".tfrecord")] if shard.endswith(".tfrecord") else shard
  return f"{INDEX_DIR}/{stem}.idx"


def index_text(record_lengths: list[int]) -> str:
  """The index file's text for records of these framed lengths, in file order."""
  lines, offset = [], 0
  for length in record_lengths:
    lines.append(f"{offset} {length}\n")
    offset += length
  return "".join(lines)


def write_index(records_dir: str, shard: str, record_lengths: list[int]) -> None:
  fileio.write_bytes_atomic(fileio.join(records_dir, index_name(shard)),
                            index_text(record_lengths).encode())


def framed_lengths(path: str) -> list[int] | str:
  """Framed record lengths read from the shard's own length fields (CRCs are TensorFlow's to check
  in verify_records); a string says where the framing breaks."""
  lengths = []
  with fileio.open(path, "rb") as f:
    while True:
      header = f.read(_HEADER)
      if not header:
        return lengths
      if len(header) < _HEADER:
        return f"a record header is cut short after record {len(lengths)}"
      (size,) = struct.unpack("<Q", header[:8])
      f.seek(size + _FOOTER, 1)
      lengths.append(_HEADER + size + _FOOTER)


def check_index(records_dir: str, shard: str) -> str | None:
  """None when `idx/<shard>.idx` matches the shard's framing, else what is wrong."""
  idx = fileio.join(records_dir, index_name(shard))
  if not fileio.exists(idx):
    return f"{idx}: missing (the index file of {shard})"
  lengths = framed_lengths(fileio.join(records_dir, shard))
  if isinstance(lengths, str):
    return f"{idx}: cannot be checked: {lengths}"
  if fileio.read_text(idx) != index_text(lengths):
    return (f"{idx}: does not match {shard}'s {len(lengths)} records (offsets and lengths); "
            "rerun make_records with --overwrite to rewrite the folder")
  return None


def _tfds_feature(name: str, dtype: str, image_size: int, image_format: str, num_classes: int):
  if name == features.IMAGE:
    return {"pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
            "image": {"dtype": "uint8", "encodingFormat": image_format,
                      "shape": {"dimensions": [str(image_size), str(image_size), "3"]}}}
  if name == features.TARGET:
    return {"pythonClassName":
            "tensorflow_datasets.core.features.class_label_feature.ClassLabel",
            "classLabel": {"numClasses": str(num_classes)}}
  if dtype == "bytes":
    return {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text", "text": {}}
  return {"pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor",
          "tensor": {"dtype": {"int64": "int64", "float": "float32"}[dtype], "encoding": "none",
                     "shape": {}}}


def tfds_metadata(m: dict, dtypes: dict[str, str], name: str = "skinrecords") -> dict[str, str]:
  """{file name: text} of the TFDS metadata for manifest `m`; `dtypes`: feature -> dtype."""
  feats = {k: _tfds_feature(k, v, m["image_size"], m["image_format"], len(m["classes"]))
           for k, v in sorted(dtypes.items())}
  features_json = {"pythonClassName":
                   "tensorflow_datasets.core.features.features_dict.FeaturesDict",
                   "featuresDict": {"features": feats}}
  splits = [{"name": split, "filepathTemplate": TFDS_TEMPLATE,
             "shardLengths": [str(s["num_examples"]) for s in info["shards"]],
             "numBytes": "0"} for split, info in m["splits"].items()]
  info = {"name": name, "version": "1.0.0", "moduleName": "skinrecords", "fileFormat": "tfrecord",
          "description": "Converted by skinrecords make_records; manifest.json holds the rest "
                         "(patients, folds, rejections, duplicates, preprocessing).",
          "splits": splits}
  return {"dataset_info.json": json.dumps(info, indent=2, sort_keys=True) + "\n",
          "features.json": json.dumps(features_json, indent=2, sort_keys=True) + "\n",
          "target.labels.txt": "".join(f"{c}\n" for c in m["classes"])}


def write_tfds_metadata(records_dir: str, m: dict, dtypes: dict[str, str]) -> None:
  for name, text in tfds_metadata(m, dtypes).items():
    fileio.write_bytes_atomic(fileio.join(records_dir, name), text.encode())
