"""The records folder's contract: `manifest.json`, written by the converter, read by everyone else.

TensorFlow-free (the converter's spawned workers and `verify_records` import it). `DatasetInfo` is
the one typed view of a records folder, in the spirit of TFDS' `dataset_info.json`: the writer
builds the manifest with `build`, readers get `read_info` (or `pipeline.load_info`, which also
accepts a folder of SIIM-ISIC Kaggle files without a manifest). Both sides meet in `info_of`:
`read_info` is `info_of` of the file, and `info_of(folder, build(...))` is the same view before it
is written.
"""

from __future__ import annotations

import dataclasses
import json
import os

from skinrecords.core import features
from skinrecords.core import fileio
from skinrecords.core import metadata as metadata_lib

FILE = "manifest.json"
VERSION = 1
SPLITS = ("train", "valid", "test")  # the only split names, in this order, everywhere


@dataclasses.dataclass(frozen=True)
class Shard:
  path: str
  num_examples: int
  fold: int = -1
  class_counts: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class RecordSchema:
  """The features one group of files stores: name -> "bytes" | "int64" | "float", and how images
  are encoded ("jpeg", "png", or "any" when not known: decoded by sniffing, slower).

  Our manifests get `ours(image_format)`; a folder of SIIM-ISIC Kaggle files gets one per split,
  learnt from its first record (`kaggle.read_info`), because the public sets store `patient_id`
  as int64 where ours stores bytes, and their test files carry no `target`. Readers parse only the
  features they need, with the dtype the files have.
  """
  dtypes: tuple[tuple[str, str], ...]  # (feature name, dtype), sorted by name
  image_format: str = "any"

  DTYPES = ("bytes", "int64", "float")
  FORMATS = ("jpeg", "png", "any")

  def validate(self) -> None:
    bad = [(k, v) for k, v in self.dtypes if v not in self.DTYPES]
    if bad or self.image_format not in self.FORMATS:
      raise ValueError(f"RecordSchema: dtypes {bad} / image_format {self.image_format!r}; "
                       f"expected dtypes in {self.DTYPES}, formats in {self.FORMATS}")

  @classmethod
  def of(cls, dtypes: dict[str, str], image_format: str = "any") -> "RecordSchema":
    """The one way to make one: validated (ValueError naming a dtype or format it does not know)."""
    schema = cls(tuple(sorted(dtypes.items())), image_format)
    schema.validate()
    return schema

  @classmethod
  def ours(cls, image_format: str = "any") -> "RecordSchema":
    """What `tfrecord.serialize_example` writes (`features.SCHEMA`)."""
    return cls.of(features.dtypes(), image_format)

  def dtype(self, name: str) -> str | None:
    return dict(self.dtypes).get(name)

  @property
  def has_labels(self) -> bool:
    return self.dtype(features.TARGET) is not None


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What readers need to know about a records folder (from manifest.json, or guessed)."""
  records_dir: str
  classes: tuple[str, ...]
  image_size: int | None  # None: sizes vary (Kaggle files of mixed sizes); resize on read
  shards: dict[str, tuple[Shard, ...]]  # split -> shards in manifest order
  manifest: dict | None = None
  schemas: dict[str, RecordSchema] | None = None  # split -> its files' schema; None: ours
  # The metadata of files without a manifest (the SIIM-ISIC Kaggle files' int64 codes); ours is
  # the manifest's "metadata" entry. Read both through `metadata`.
  metadata_spec: metadata_lib.MetadataSpec | None = None

  def schema(self, split: str) -> RecordSchema:
    """The features `split`'s files store (with fold=k, "valid" is read from "train" files)."""
    if self.schemas is None:
      return RecordSchema.ours((self.manifest or {}).get("image_format", "any"))
    found = self.schemas.get(split) or (self.schemas.get("train") if split == "valid" else None)
    if found is None:
      raise ValueError(f"{self.records_dir}: no split {split!r}; it has {sorted(self.schemas)}")
    return found

  def has_labels(self, split: str) -> bool:
    return self.schema(split).has_labels

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def select(self, split: str, fold: int | None = None) -> tuple[Shard, ...]:
    """Shards of `split`; with `fold=k`, "train" is every fold but k and "valid" is fold k."""
    if fold is None:
      if split not in self.shards:
        raise ValueError(f"{self.records_dir}: no split {split!r}; it has {sorted(self.shards)}")
      return self.shards[split]
    train = self.shards.get("train", ())
    folds = sorted({s.fold for s in train if s.fold >= 0})
    if fold not in folds:
      raise ValueError(f"{self.records_dir}: fold={fold} not available; folds present: "
                       f"{folds or 'none (convert with --folds=K)'}")
    if split == "train":
      return tuple(s for s in train if s.fold != fold)
    if split == "valid":
      return tuple(s for s in train if s.fold == fold)
    return self.select(split)

  def num_examples(self, split: str, fold: int | None = None) -> int:
    return sum(s.num_examples for s in self.select(split, fold))

  def class_counts(self, split: str, fold: int | None = None) -> list[int]:
    counts = [0] * self.num_classes
    for s in self.select(split, fold):
      counts = [a + b for a, b in zip(counts, s.class_counts)]
    return counts

  @property
  def from_manifest(self) -> bool:
    """True for a folder with our manifest.json (class names known); False for guessed info."""
    return self.manifest is not None

  @property
  def fingerprint(self) -> str | None:
    return (self.manifest or {}).get("fingerprint")

  @property
  def preprocessing(self) -> dict | None:
    return (self.manifest or {}).get("preprocessing")

  @property
  def metadata(self) -> metadata_lib.MetadataSpec:
    """The records' metadata columns, their statistics and how they are stored (empty: none)."""
    if self.metadata_spec is not None:
      return self.metadata_spec
    return metadata_lib.MetadataSpec.from_dict((self.manifest or {}).get("metadata"))


def read(records_dir: str | os.PathLike) -> dict:
  """The manifest as a dict; clear errors for a missing, broken or newer-format file."""
  path = fileio.join(records_dir, FILE)
  try:
    manifest = json.loads(fileio.read_text(path))
  except FileNotFoundError as err:
    raise FileNotFoundError(
        f"{path}: no manifest; is {records_dir} a folder written by make_records?") from err
  except json.JSONDecodeError as err:
    raise ValueError(f"{path}: not valid JSON ({err})") from err
  if manifest.get("format_version") != VERSION:
    raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}; this skinrecords "
                     f"reads format_version {VERSION}")
  return manifest


def write(records_dir: str | os.PathLike, manifest: dict) -> None:
  fileio.write_json_atomic(fileio.join(records_dir, FILE), manifest)


def exists(records_dir: str | os.PathLike) -> bool:
  return fileio.exists(fileio.join(records_dir, FILE))


def read_info(records_dir: str | os.PathLike) -> DatasetInfo:
  return info_of(records_dir, read(records_dir))


def info_of(records_dir: str | os.PathLike, m: dict) -> DatasetInfo:
  """The `DatasetInfo` of a manifest dict (as `build` returns it and `read` reads it)."""
  records_dir = os.fspath(records_dir)
  classes = tuple(m["classes"])
  shards = {split: tuple(Shard(fileio.join(records_dir, s["file"]), s["num_examples"], s.get("fold", -1),
                               tuple(s["class_counts"][c] for c in classes))
                         for s in info["shards"])
            for split, info in m["splits"].items()}
  return DatasetInfo(str(records_dir), classes, m["image_size"], shards, m)


def class_weights(info: DatasetInfo, split: str = "train", fold: int | None = None) -> dict[int, float]:
  """Keras-style weights n / (k * n_c): ISIC 2020's 1.8% melanoma gets ~27.8, the rest ~0.51."""
  counts = info.class_counts(split, fold)
  if not any(counts):
    raise ValueError(f"{info.records_dir}: no class counts for split {split!r} (its records carry "
                     "no labels)")
  total, k = sum(counts), len(counts)
  return {c: (total / (k * n) if n else 0.0) for c, n in enumerate(counts)}


def _splits(classes, plan, done, folds: int) -> dict:
  """Per split: example and class counts, and the shards in plan order with their digests."""
  split_info = {}
  for name, split, fold, _ in plan:
    info = split_info.setdefault(split, {"num_examples": 0, "class_counts": [0] * len(classes),
                                         "shards": []})
    s = done[name]
    info["num_examples"] += s["num_examples"]
    info["class_counts"] = [a + b for a, b in zip(info["class_counts"], s["class_counts"])]
    entry = {"file": name, "num_examples": s["num_examples"], "sha256": s["sha256"],
             "class_counts": s["class_counts"]}
    if folds and split == "train":
      entry["fold"] = fold
    info["shards"].append(entry)
  for split, info in split_info.items():
    info["class_counts"] = dict(zip(classes, info["class_counts"]))
    for entry in info["shards"]:
      entry["class_counts"] = dict(zip(classes, entry["class_counts"]))
    if folds and split == "train":
      info["folds"] = folds
  return split_info


def build(*, fingerprint: str, classes: list[str], plan, done: dict, image_size: int,
          image_format: str, folds: int, inputs: dict, conversion: dict, preprocessing: dict,
          versions: dict) -> dict:
  """The manifest of a finished conversion. `plan` is (shard name, split, fold, ...) in write
  order; `done[name]` holds each shard's summary (num_examples, sha256, class_counts, rejected)."""
  split_info = _splits(classes, plan, done, folds)
  rejected = list(inputs.get("rejected", []))
  for name, *_ in plan:
    rejected += done[name]["rejected"]
  rejected.sort(key=lambda r: r["path"])
  converted = sum(info["num_examples"] for info in split_info.values())
  return {
      "format_version": VERSION,
      "fingerprint": fingerprint,
      "classes": classes,
      "image_size": image_size,
      "image_format": image_format,
      "features": features.manifest_entry(),
      "splits": split_info,
      "inputs": {**inputs, "converted": converted, "rejected": rejected},
      "conversion": conversion,
      "preprocessing": preprocessing,
      "versions": versions,
  }
