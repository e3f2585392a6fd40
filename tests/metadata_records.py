"""Test records with patient metadata: the existing writer's shards, each record given `meta/<name>`
features (float numeric, bytes categorical, absent when missing: core/metadata.py's contract) and
the manifest a "metadata" entry with the training split's and each fold's statistics.

(The converter's own --metadata_columns is the write side's; these tests of the read side must not
wait for it, and they need full control over the values, the label's dependence on them included.)
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

import tensorflow as tf

from skinrecords.core import metadata as md


def _records(path) -> list[tf.train.Example]:
  return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]


def _put(example: tf.train.Example, column: md.Column, value) -> None:
  if md.is_missing(value):
    return  # absent: missing is never stored
  feature = example.features.feature[column.key]
  if column.dtype == "float":
    feature.float_list.value.append(float(value))
  elif column.dtype == "int64":
    feature.int64_list.value.append(int(value))
  else:
    feature.bytes_list.value.append(str(value).encode("utf-8"))


def add_metadata(records: pathlib.Path, kinds: dict[str, str],
                 values: Callable[[str, int], dict]) -> md.MetadataSpec:
  """Rewrites every shard of `records` with `values(image_name, label)` ({column: value or None})
  stored as metadata; writes the manifest's "metadata" entry; returns its spec."""
  manifest = json.loads((records / "manifest.json").read_text())
  rows: dict[str, list] = {}  # split -> row dicts; "fold:k" -> rows of train fold k
  columns = [md.Column(name, kind) for name, kind in kinds.items()]
  for split, info in manifest["splits"].items():
    for shard in info["shards"]:
      path = records / shard["file"]
      examples = _records(path)
      with tf.io.TFRecordWriter(str(path)) as writer:
        for ex in examples:
          f = ex.features.feature
          row = values(f["image_name"].bytes_list.value[0].decode(),
                       int(f["target"].int64_list.value[0]))
          for c in columns:
            _put(ex, c, row.get(c.name))
          writer.write(ex.SerializeToString())
          rows.setdefault(split, []).append(row)
          if split == "train" and "fold" in shard:
            rows.setdefault(f"fold:{shard['fold']}", []).append(row)
  folds = sorted(int(k[5:]) for k in rows if k.startswith("fold:"))
  spec = md.MetadataSpec(tuple(md.Column(
      c.name, c.kind, md.compute_stats(c.kind, [r.get(c.name) for r in rows["train"]]),
      {k: md.compute_stats(c.kind, [r.get(c.name) for j in folds if j != k
                                    for r in rows[f"fold:{j}"]]) for k in folds},
      {s: sum(md.is_missing(r.get(c.name)) for r in rows[s]) for s in manifest["splits"]})
      for c in columns))
  manifest["metadata"] = spec.to_dict()
  (records / "manifest.json").write_text(json.dumps(manifest, indent=2))
  return spec
