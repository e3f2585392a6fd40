"""Writing and checking sharded TFRecords: atomic shard files and verification against the manifest.

TensorFlow is imported inside the functions that need it: the converter's `spawn`ed OpenCV workers
import this package too, and a TensorFlow import costs each of them 3.4-3.8 s and 675 MB (`tfrecord`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import tempfile

import numpy as np

from skinrecords.core import features
from skinrecords.core import fileio
from skinrecords.core import manifest
from skinrecords.core import tfrecord

class ShardWriter:
  """Writes one shard to `<name>.tmp`; `close()` returns its summary after the caller renames it.

  Used as a context manager. Nothing under the final name exists until `commit()` renames it, so a
  run killed mid-shard leaves only a `.tmp` file that the next run overwrites. Records arrive
  already framed (`tfrecord.example_record`, built in the converter's workers): this only appends
  them and hashes as it goes, so the shard is never read back and TensorFlow is not imported for a
  local output.

  A remote `path` (gs://...) is written to a local temporary file first; `commit()` uploads it to
  `<name>.tmp` beside the target and renames that into place (`fileio.publish`).
  """

  def __init__(self, path: str | os.PathLike, num_classes: int):
    self.path = os.fspath(path)
    self.tmp = fileio.temporary_name(self.path)  # the name the shard has before commit()
    self._local = self.tmp
    if fileio.is_remote(self.path):
      fd, self._local = tempfile.mkstemp(prefix=fileio.basename(self.path) + ".", suffix=".tmp")
      os.close(fd)
    self._file = fileio.open(self._local, "wb")  # pylint: disable=consider-using-with  (closed in close())
    self._sha256 = hashlib.sha256()
    self.num_examples = 0
    self.class_counts = [0] * num_classes

  def write_record(self, record: bytes, target: int) -> None:
    """Appends one framed TFRecord holding an example of class `target`."""
    self._file.write(record)
    self._sha256.update(record)
    self.num_examples += 1
    self.class_counts[target] += 1

  def write(self, *, image: bytes, image_name: str, target: int, patient_id: str, fold: int,
            height: int, width: int) -> None:
    """Builds, frames and appends one example."""
    self.write_record(tfrecord.example_record(
        image=image, image_name=image_name, target=target, patient_id=patient_id, fold=fold,
        height=height, width=width), target)

  def close(self) -> dict:
    """Flushes the temporary file and returns {num_examples, sha256, class_counts}."""
    self._file.close()
    return {"num_examples": self.num_examples, "sha256": self._sha256.hexdigest(),
            "class_counts": list(self.class_counts)}

  def commit(self) -> None:
    fileio.publish(self._local, self.path)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._file.close()
    if fileio.is_remote(self.path):  # a local staging copy never outlives its writer
      fileio.remove(self._local)


@dataclasses.dataclass
class VerifyReport:
  records_dir: str
  shards: int = 0
  examples: int = 0
  problems: list[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return not self.problems


def _decode_check(image: bytes, height: int, width: int) -> str | None:
  import cv2  # pylint: disable=g-import-not-at-top

  arr = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_UNCHANGED)
  if arr is None:
    return "image does not decode"
  if (height, width) != (0, 0) and arr.shape[:2] != (height, width):
    return f"image is {arr.shape[1]}x{arr.shape[0]}, record says {width}x{height}"
  return None


def verify(records_dir: str | os.PathLike, progress: bool = True) -> VerifyReport:
  """Reads every shard named in the manifest: sha256, record count, labels, and that images decode.

  Problems are collected (file, record index, what is wrong) rather than raised, so one run reports
  everything that is wrong.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top

  records_dir = os.fspath(records_dir)
  m = manifest.read(records_dir)
  report = VerifyReport(records_dir)
  num_classes = len(m["classes"])
  shard_entries = [(split, s) for split, info in m["splits"].items() for s in info["shards"]]
  total = sum(s["num_examples"] for _, s in shard_entries)
  bar = tqdm.tqdm(total=total, unit="img", desc="verify", disable=not progress)
  spec = features.feature_spec()
  meta = _MetadataCheck(manifest.info_of(records_dir, m).metadata)
  placed: dict[str, set[str]] = {}  # image_name -> the splits (and folds) its records are in
  for split, entry in shard_entries:
    path = fileio.join(records_dir, entry["file"])
    report.shards += 1
    if not fileio.exists(path):
      report.problems.append(f"{path}: missing (listed in manifest.json under split {split!r})")
      continue
    report.problems += _file_problems(m, records_dir, entry)
    count = 0
    try:
      for index, raw in enumerate(tf.data.TFRecordDataset(path)):
        count += 1
        try:
          ex = tf.io.parse_single_example(raw, spec)
        except tf.errors.InvalidArgumentError as err:
          report.problems.append(f"{path}: record {index}: not a valid Example ({err.message})")
          continue
        name = ex[features.IMAGE_NAME].numpy().decode("utf-8", "replace")
        report.problems += meta.check(raw.numpy(), split, f"{path}: record {index} ({name})")
        fold = int(ex[features.FOLD])
        placed.setdefault(name, set()).add(split if fold < 0 else f"{split}/fold{fold}")
        target = int(ex[features.TARGET])
        if not 0 <= target < num_classes:
          report.problems.append(f"{path}: record {index}: target {target} outside 0..{num_classes-1}")
        problem = _decode_check(ex[features.IMAGE].numpy(), int(ex[features.HEIGHT]),
                                int(ex[features.WIDTH]))
        if problem:
          name = ex[features.IMAGE_NAME].numpy().decode("utf-8", "replace")
          report.problems.append(f"{path}: record {index} ({name}): {problem}")
        bar.update(1)
    except tf.errors.DataLossError as err:  # tensorflow#20835: the error does not name the file.
      report.problems.append(f"{path}: corrupt after record {count} ({err.message.strip()})")
    if count != entry["num_examples"]:
      report.problems.append(
          f"{path}: {count} records readable, manifest says {entry['num_examples']}")
    report.examples += count
  bar.close()
  report.problems += _near_duplicate_problems(m, placed)
  report.problems += meta.missing_problems(records_dir, m)
  return report


def _file_problems(m: dict, records_dir: str, entry: dict) -> list[str]:
  """What is wrong with one existing shard file as a whole: its sha256, its index file."""
  path = fileio.join(records_dir, entry["file"])
  problems = []
  digest = fileio.sha256_file(path)
  if digest != entry["sha256"]:
    problems.append(f"{path}: sha256 {digest} does not match manifest {entry['sha256']}")
  if "index_files" in m:
    from skinrecords.core import interop  # pylint: disable=g-import-not-at-top

    problem = interop.check_index(records_dir, entry["file"])
    if problem:
      problems.append(problem)
  return problems


class _MetadataCheck:
  """The records' metadata features against the manifest's MetadataSpec: every "meta/" key is a
  listed column, of its dtype, holding one finite value (or absent: missing); and the absent
  counts per split equal the manifest's. A protobuf parse of the record: ~10 us of the ~1 ms a
  record's decode check costs."""

  def __init__(self, spec):
    self.columns = {c.key: c for c in spec.columns}
    self.absent: dict[tuple[str, str], int] = {}  # (column, split) -> records without it

  def check(self, raw: bytes, split: str, where: str) -> list[str]:
    if not self.columns and features.METADATA_PREFIX.encode() not in raw:
      return []  # no metadata listed and none stored (most records folders)
    from skinrecords.core import tfrecord  # pylint: disable=g-import-not-at-top

    feature = tfrecord._example_class().FromString(raw).features.feature  # pylint: disable=protected-access
    problems = [f"{where}: metadata feature {k!r} is not in manifest.json's metadata columns "
                f"({', '.join(c.name for c in self.columns.values()) or 'none'})"
                for k in sorted(feature) if k.startswith(features.METADATA_PREFIX)
                and k not in self.columns]
    for key, column in self.columns.items():
      if key not in feature:
        self.absent[(column.name, split)] = self.absent.get((column.name, split), 0) + 1
        continue
      kind = feature[key].WhichOneof("kind")
      values = list(getattr(feature[key], kind).value) if kind else []
      expected = {"float": "float_list", "bytes": "bytes_list", "int64": "int64_list"}[column.dtype]
      if kind != expected or len(values) != 1:
        problems.append(f"{where}: metadata {key!r} holds {len(values)} {kind or 'nothing'} "
                        f"value(s); manifest.json says one {column.dtype}")
      elif column.dtype == "float" and not math.isfinite(values[0]):
        problems.append(f"{where}: metadata {key!r} is {values[0]} (not a finite number)")
    return problems

  def missing_problems(self, records_dir: str, m: dict) -> list[str]:
    problems = []
    for column in self.columns.values():
      for split, expected in column.missing.items():
        if split not in m["splits"]:
          continue
        found = self.absent.get((column.name, split), 0)
        if found != expected:
          problems.append(f"{records_dir}: metadata {column.name!r}: {found} {split} records "
                          f"lack it, manifest.json says {expected}")
    return problems


def _near_duplicate_problems(m: dict, placed: dict[str, set[str]]) -> list[str]:
  """Re-checks from the records themselves that no near-duplicate group straddles splits/folds."""
  near = m.get("inputs", {}).get("near_duplicates") or {}
  if not near.get("kept_together"):
    return []
  problems = []
  for group in near.get("groups", []):
    where = set().union(*(placed.get(name, set()) for name in group["image_names"]))
    if len(where) > 1:
      problems.append(f"near-duplicate group {', '.join(group['paths'])} lies across "
                      f"{', '.join(sorted(where))} (manifest.json says they were kept together)")
  return problems


def verify_set(records_dir: str | os.PathLike, progress: bool = True) -> list[VerifyReport]:
  """Verifies every size folder of a several-size output (records_set.json) and that they hold
  the same images in the same splits, folds and shards; the last report carries those checks."""
  import json  # pylint: disable=g-import-not-at-top

  records_dir = os.fspath(records_dir)
  listing = json.loads(fileio.read_text(fileio.join(records_dir, "records_set.json")))
  reports = [verify(fileio.join(records_dir, folder), progress) for folder in listing["folders"]]
  manifests = [manifest.read(fileio.join(records_dir, f)) for f in listing["folders"]]
  same = VerifyReport(records_dir)
  keys = ("rejected", "duplicates", "near_duplicates", "found", "converted")
  for folder, m in zip(listing["folders"][1:], manifests[1:]):
    shards = lambda x: {s: [(e["file"], e["num_examples"], e.get("fold", -1), e["class_counts"])
                            for e in info["shards"]] for s, info in x["splits"].items()}
    if shards(m) != shards(manifests[0]):
      same.problems.append(f"{folder}: splits, folds or shard contents differ from "
                           f"{listing['folders'][0]}")
    for key in keys:
      if m["inputs"].get(key) != manifests[0]["inputs"].get(key):
        same.problems.append(f"{folder}: inputs.{key} differs from {listing['folders'][0]}")
  return reports + [same]
