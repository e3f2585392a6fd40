"""The converter: image folder or CSV -> preprocessed, sharded, verified-by-hash TFRecords.

Order of work, each step deterministic for a given seed:
  1. list and de-duplicate the inputs (`sources`), 2. assign splits and folds (`splits`),
  3. plan shards (which example goes to which file) from the counts alone, 4. preprocess in `spawn`ed
  OpenCV workers and write shard by shard, each renamed into place when complete with a small state
  file beside it, 5. write `manifest.json` last.
Because the plan is fixed before any pixel is touched, a killed run restarted with the same flags
skips the finished shards and ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform

import numpy as np

from skinrecords.core import features
from skinrecords.core import fileio
from skinrecords.core import interop
from skinrecords.core import manifest
from skinrecords.data import dedup
from skinrecords.data import meta_columns
from skinrecords.data import neardup
from skinrecords.data import preprocess
from skinrecords.data import pseudonyms
from skinrecords.data import records
from skinrecords.data import sources
from skinrecords.data import splits
from skinrecords.data import workers
import skinrecords

STATE_DIR = ".make_records_state"
PLAN = "plan.json"
HASHES = "near_duplicate_hashes.json"  # in the state folder: a resumed run does not hash again
SET_FILE = "records_set.json"  # several --image_size values: OUT/<size>/ each, this file in OUT

# A 512^2 JPEG at quality 95 of dermoscopy-like content is ~60 KB (measured on the synthetic data and
# in FIELD_NOTES): 0.08 bytes per pixel-channel. PNG is ~6x larger. Only used to pick shard counts.
_BYTES_PER_VALUE = {"jpeg": 0.08, "png": 0.5}
# The smallest --image_size training accepts (models._MIN_IMAGE_SIZE: keras.applications refuses
# smaller inputs); records below it could never be trained on, so conversion refuses them.
MIN_TRAIN_IMAGE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
  input_dir: str
  output_dir: str
  labels_csv: str | None = None
  image_column: str = "image_name"
  label_column: str = "target"
  patient_column: str | None = None
  patients_csv: str | None = None  # Folder layouts: image -> patient CSV (image/patient_column).
  classes: tuple[str, ...] | None = None
  split: tuple[float, float, float] = (0.6, 0.2, 0.2)
  folds: int = 0
  seed: int = 0
  shard_size_mb: float = 100.0
  min_train_shards: int = 16
  workers: int = 0  # 0: all cores
  strict: bool = False
  overwrite: bool = False
  progress: bool = True
  preprocess: preprocess.PreprocessConfig = preprocess.PreprocessConfig()
  # A salt file: patient ids (and image names with pseudonymize_names) are stored as keyed hashes
  # (skinrecords.data.pseudonyms); its path and secret stay out of the output.
  pseudonymize_patients: str | None = None
  pseudonymize_names: bool = False
  # Several output sizes in one pass (one records folder each, output_dir/<size>/); empty: one
  # size, preprocess.image_size, written to output_dir itself. With sizes, preprocess.image_size
  # must be the largest (decoding is planned for it).
  image_sizes: tuple[int, ...] = ()
  near_duplicates: str = "group"  # neardup.MODES
  near_duplicate_distance: int = neardup.DEFAULT_MAX_DISTANCE
  # Patient metadata stored in every record (data/meta_columns): "name" or "name:numeric|
  # categorical", from labels_csv or metadata_csv (image_column -> columns).
  metadata_columns: tuple[str, ...] = ()
  metadata_csv: str | None = None

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(sorted(set(self.image_sizes))) or (self.preprocess.image_size,)

  @property
  def multi_size(self) -> bool:
    return len(self.sizes) > 1

  def size_dirs(self) -> list[str]:
    """The records folder of each size, in `sizes` order."""
    if not self.multi_size:
      return [self.output_dir]
    return [fileio.join(self.output_dir, str(size)) for size in self.sizes]

  def validate(self) -> None:
    """Raises ValueError naming the field, its value and what would be accepted."""
    self.preprocess.validate()
    splits.check_fractions(self.split)
    if self.folds == 1 or self.folds < 0:
      raise ValueError(f"folds={self.folds}: use 0 (no folds) or a number >= 2")
    if self.workers < 0:
      raise ValueError(f"workers={self.workers}: use 0 (all cores) or a positive number")
    if self.shard_size_mb <= 0 or self.min_train_shards < 1:
      raise ValueError(f"shard_size_mb={self.shard_size_mb} must be > 0 and min_train_shards="
                       f"{self.min_train_shards} >= 1")
    if self.patient_column and self.labels_csv is None and self.patients_csv is None:
      raise ValueError("patient_column needs labels_csv (its patient column) or patients_csv (a "
                       "CSV of image_column -> patient_column for a folder layout)")
    if self.patients_csv and (self.labels_csv or not self.patient_column):
      raise ValueError("patients_csv is for folder layouts and needs patient_column; with "
                       "labels_csv give patient_column alone")
    if self.pseudonymize_names and not self.pseudonymize_patients:
      raise ValueError("pseudonymize_names needs pseudonymize_patients=SALT_FILE (the key)")
    self.preprocess.validate()
    for size in self.sizes:
      if size < MIN_TRAIN_IMAGE_SIZE:
        raise ValueError(f"image_size={size}: training needs at least "
                         f"{MIN_TRAIN_IMAGE_SIZE} px; use image_size >= {MIN_TRAIN_IMAGE_SIZE}")
    if self.multi_size and self.preprocess.image_size != self.sizes[-1]:
      raise ValueError(f"image_size={self.preprocess.image_size}: with image_sizes "
                       f"{list(self.sizes)} it must be the largest, {self.sizes[-1]}")
    self._validate_metadata()
    if self.near_duplicates not in neardup.MODES:
      raise ValueError(f"near_duplicates={self.near_duplicates!r}: use one of "
                       f"{', '.join(neardup.MODES)}")
    if not 0 <= self.near_duplicate_distance < neardup.BITS // 4:
      raise ValueError(f"near_duplicate_distance={self.near_duplicate_distance}: use 0 to "
                       f"{neardup.BITS // 4 - 1} bits (default {neardup.DEFAULT_MAX_DISTANCE})")

  def _validate_metadata(self) -> None:
    requests = meta_columns.parse_requests(self.metadata_columns)
    if self.metadata_csv and not requests:
      raise ValueError("metadata_csv needs metadata_columns (which of its columns to store)")
    if (any(r.name != "images_per_patient" for r in requests) and not self.labels_csv
        and not self.metadata_csv):
      raise ValueError("metadata_columns need the CSV they are in: labels_csv, or metadata_csv="
                       "CSV (image name -> columns) for a folder layout")
    if any(r.name == "images_per_patient" for r in requests) and not self.patient_column:
      raise ValueError("metadata_columns images_per_patient needs patient_column (with "
                       "labels_csv or patients_csv)")

  def plan_dict(self) -> dict:
    """Settings that change the output bytes (not where it goes or how fast it is made)."""
    d = dataclasses.asdict(self)
    for key in ("output_dir", "workers", "strict", "overwrite", "progress",
                "pseudonymize_patients"):
      d.pop(key)
    if not self.pseudonymize_patients:  # records made before these fields keep their fingerprint
      d.pop("pseudonymize_names")
    if not self.metadata_columns:  # likewise: records without metadata keep their fingerprint
      d.pop("metadata_columns")
      d.pop("metadata_csv")
    else:
      d["metadata_columns"] = list(self.metadata_columns)
    d["preprocess"] = self.preprocess.to_dict()
    d["classes"] = list(self.classes) if self.classes else None
    d["split"] = list(self.split)
    d["image_sizes"] = list(self.sizes)
    return d


class OutputExistsError(RuntimeError):
  pass


@dataclasses.dataclass
class Result:
  manifest: dict  # with several sizes: the smallest size's (splits and inputs are the same)
  output_dir: str
  resumed_shards: int
  folders: dict[int, str] = dataclasses.field(default_factory=dict)  # size -> records folder

  @property
  def rejected(self) -> list[dict]:
    return self.manifest["inputs"]["rejected"]


def _num_shards(n: int, image_size: int, image_format: str, shard_mb: float, minimum: int) -> int:
  if n == 0:
    return 0
  est = n * image_size * image_size * 3 * _BYTES_PER_VALUE[image_format]
  return max(math.ceil(est / (shard_mb * 1e6)), min(minimum, n), 1)


def _plan_shards(split_items: dict[str, list[int]], folds: list[int], config: ConvertConfig):
  """Returns [(split, fold, [item indices])] in file order; train shards hold one fold each."""
  rng = np.random.default_rng([config.seed, 1])
  size, fmt = config.preprocess.image_size, config.preprocess.image_format
  plan = []
  for split in manifest.SPLITS:
    idx = list(split_items.get(split, []))
    if not idx:
      continue
    idx = [idx[i] for i in rng.permutation(len(idx))]  # mix classes within every shard
    if split == "train" and config.folds:
      per_fold_min = math.ceil(config.min_train_shards / config.folds)
      for fold in range(config.folds):
        members = [i for i in idx if folds[i] == fold]
        n = _num_shards(len(members), size, fmt, config.shard_size_mb, per_fold_min)
        plan += [("train", fold, list(c)) for c in np.array_split(members, n)] if n else []
    else:
      minimum = config.min_train_shards if split == "train" else 1
      n = _num_shards(len(idx), size, fmt, config.shard_size_mb, minimum)
      plan += [(split, -1, list(c)) for c in np.array_split(idx, n)]
  named = []
  for split in manifest.SPLITS:
    mine = [p for p in plan if p[0] == split]
    for i, (_, fold, members) in enumerate(mine):
      named.append((features.shard_name(split, i, len(mine)), split, fold, [int(m) for m in members]))
  return named


def _fingerprint(config: ConvertConfig, listing: sources.Listing,
                 table: meta_columns.Table | None = None) -> str:
  """The flags and the inputs themselves: a changed folder must not resume or reuse old shards.

  Content hashes, not sizes alone: an image replaced by one of the same size (a re-export, a
  corrected crop) must not reuse its old shard. Patient ids too: a corrected patient column
  changes the splits. Hashing all of 1,000 1024x768 JPEGs (308 MB, in the page cache) took
  0.24-0.30 s here, against ~33 s to convert them at ~30 img/s: under 1 %, so every run hashes
  (de-duplication has already hashed the files whose size is shared; those are not read twice).
  """
  h = hashlib.sha256(json.dumps(config.plan_dict(), sort_keys=True).encode())
  hashes = dedup.content_hashes(listing)
  for item in listing.items:
    h.update(f"{item.relpath}\t{item.label}\t{item.patient_id}\t{hashes[item.relpath]}\n"
             .encode())
  for line in (table.fingerprint_lines() if table else ()):  # a corrected cell must not resume
    h.update(line.encode())
  return h.hexdigest()


def check_output_dir(config: ConvertConfig) -> list[str]:
  """Refuses an output folder that cannot be written, before any work; returns warnings.

  Raises:
    ValueError: the path (or a folder above it) is a file, or it cannot be written.
  """
  if fileio.is_remote(config.output_dir):  # made now: object stores have no parents to walk
    fileio.check_writable_dir(config.output_dir, "output_dir")
    return []  # Inputs are local, so a remote output cannot sit inside them.
  out = existing = os.path.abspath(config.output_dir)
  while not fileio.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)  # the nearest folder that exists: it will hold `out`
  if not fileio.isdir(existing):
    raise ValueError(f"output_dir {config.output_dir}: {existing} is a file, not a folder; "
                     "choose a folder for the shards")
  probe = fileio.join(existing, f".make_records_probe_{os.getpid()}")
  try:  # A real write: os.access says yes to root on a read-only mount.
    fileio.write_bytes_atomic(probe, b"")
    fileio.remove(probe)
  except OSError as err:
    raise ValueError(f"output_dir {config.output_dir}: cannot write in {existing} "
                     f"({err.strerror or err}); choose a writable folder") from err
  warnings = []
  if sources.inside(os.path.realpath(out), os.path.realpath(config.input_dir)):
    warnings.append(f"output_dir {config.output_dir} is inside input_dir {config.input_dir}: "
                    "it is left out of the listing, but a copy of the input will carry the "
                    "shards along; an output folder beside the input is safer")
  return warnings


def patient_warning(listing: sources.Listing) -> str | None:
  """Says loudly when images are split without patient ids (or some lack one)."""
  if listing.patient_source is None:
    kept = ("the given splits are kept as they are and cannot be checked"
            if listing.layout == "presplit" else "splits and folds are drawn per image")
    return (f"NOT GROUPED BY PATIENT: no patient ids were given, so {kept}. ISIC and HAM10000 "
            "hold several images per patient or lesion; one patient's images in train and valid "
            "inflate validation scores. Give --patients_csv=CSV --patient_column=patient_id "
            "(image name -> patient or lesion id), or --labels_csv with --patient_column")
  if listing.missing_patient:
    return (f"{listing.missing_patient} of {len(listing.items)} images have no patient id (empty "
            f"cell or no row in the {listing.patient_source}): each is treated as its own patient")
  return None


LOCK = ".make_records.lock"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _take_lock(out: str) -> str | None:
  """OUT/.make_records.lock holding this pid; ValueError when a live make_records holds it.

  Two make_records on one output folder: the loser died on a missing plan.json.tmp (issue 27).
  A lock left by a killed run (its pid is gone) is taken over. Local outputs only: an object
  store has no atomic create-if-absent here, and a pid means nothing across hosts.
  """
  if fileio.is_remote(out):
    return None
  fileio.makedirs(out)
  path = fileio.join(out, LOCK)
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        pid = int(fileio.read_text(path).strip() or 0)
      except (OSError, ValueError):
        pid = 0
      if pid and pid != os.getpid() and _pid_alive(pid):
        raise ValueError(f"another make_records is writing here (pid {pid}, lock {path}): wait "
                         "for it to finish; delete the lock only if no make_records runs")
      fileio.remove(path)  # stale: its process is gone
      continue
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(f"{os.getpid()}\n")
    return path
  raise ValueError(f"cannot take the lock {path}; delete it if no make_records runs")


def _written_by_converter(name: str) -> bool:
  base = name[:-4] if name.endswith(".tmp") else name
  return (base in (manifest.FILE, STATE_DIR, interop.INDEX_DIR, *interop.TFDS_FILES)
          or features.parse_shard_name(base) is not None)


def _prepare_output(out: str, fingerprint: str, overwrite: bool) -> bool:
  """Makes `out` ready; returns True when the finished output already matches (nothing to do)."""
  state = fileio.join(out, STATE_DIR, PLAN)
  existing = [n for n in (fileio.listdir(out) if fileio.isdir(out) else []) if n != LOCK]
  if existing and not overwrite:
    try:
      if manifest.exists(out):
        if manifest.read(out).get("fingerprint") == fingerprint:
          return True
      elif json.loads(fileio.read_text(state))["fingerprint"] == fingerprint:
        return False  # resume
    except (OSError, ValueError, KeyError):
      pass
    raise OutputExistsError(
        f"{out} already holds {len(existing)} entries ({', '.join(existing[:5])}"
        f"{', ...' if len(existing) > 5 else ''}) that were not made by this command with these "
        "flags and inputs. Pass --overwrite to replace them, or choose another --output_dir.")
  if existing:  # overwrite: remove only what a converter writes; never unrelated files.
    for name in existing:
      if _written_by_converter(name):
        target = fileio.join(out, name)
        fileio.rmtree(target) if fileio.isdir(target) else fileio.remove(target)
  fileio.makedirs(fileio.join(out, STATE_DIR))
  fileio.makedirs(fileio.join(out, interop.INDEX_DIR))
  fileio.write_json_atomic(state, {"fingerprint": fingerprint})
  return False



def _write_shards(outs: list[str], todo, results, items, labels, num_classes, bar) -> list[dict]:
  """Appends the workers' records shard by shard in plan order, the same shard in every size's
  folder (`outs`); returns one {shard name: summary} per folder. `results` yield (a list of
  records, one per folder, or None, reason)."""
  done = [{} for _ in outs]
  for name, _, fold, members in todo:
    rejected = []
    writers = [records.ShardWriter(fileio.join(out, name), num_classes) for out in outs]
    lengths = [[] for _ in outs]
    try:
      for i in members:
        recs, reason = next(results)
        bar.update(1)
        if recs is None:
          rejected.append({"path": items[i].relpath, "reason": reason})
          continue
        for writer, record, kept in zip(writers, recs, lengths):
          writer.write_record(record, labels[i])
          kept.append(len(record))
      for k, (out, writer) in enumerate(zip(outs, writers)):
        summary = writer.close()
        summary.update(rejected=rejected, fold=fold)
        # Index and state first, then the shard: a shard under its final name has both.
        interop.write_index(out, name, lengths[k])
        fileio.write_json_atomic(fileio.join(out, STATE_DIR, name + ".json"), summary)
        done[k][name] = summary
      for writer in writers:
        writer.commit()
    finally:
      for writer in writers:
        writer.__exit__(None, None, None)
  return done


def _tensorflow_version() -> str:
  """TensorFlow's version without importing it: the import for this one string made the peak
  memory of make_records 49 -> 748 MB (VmHWM, measured), after all the work was done (issue 27)."""
  import sys  # pylint: disable=g-import-not-at-top
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"].__version__
  for dist in ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-nightly"):
    try:
      return metadata.version(dist)
    except metadata.PackageNotFoundError:
      continue
  return "unknown"


def _versions() -> dict:
  import cv2  # pylint: disable=g-import-not-at-top

  return {"skinrecords": skinrecords.__version__, "tensorflow": _tensorflow_version(),
          "opencv": cv2.__version__, "numpy": np.__version__,
          "python": platform.python_version()}


def convert(config: ConvertConfig, pool: workers.RecordPool | None = None) -> Result:
  """Runs the whole conversion; see the module docstring. Returns the manifest written.

  `pool`: workers already started (`workers.RecordPool`) to use instead of starting
  `config.workers` new ones; their preprocessing settings must be `config.preprocess` (and, with
  several sizes, their `sizes` these sizes).
  """
  config.validate()
  warnings = check_output_dir(config)
  sizes = config.sizes if config.multi_size else None
  if pool is not None and (pool.config != config.preprocess or pool.sizes != sizes):
    raise ValueError("convert: the RecordPool was started for other preprocessing settings "
                     "than config.preprocess (or other sizes); start one with those")
  listing = sources.list_sources(
      config.input_dir, labels_csv=config.labels_csv, image_column=config.image_column,
      label_column=config.label_column, patient_column=config.patient_column,
      patients_csv=config.patients_csv, classes=list(config.classes) if config.classes else None,
      exclude=None if fileio.is_remote(config.output_dir) else config.output_dir)
  table = _metadata_table(config, listing)  # before pseudonyms rename images: rows match names
  key = _pseudonymize(config, listing)
  fingerprint = _fingerprint(config, listing, table)
  lock = _take_lock(config.output_dir)
  try:
    return _convert_locked(config, listing, key, fingerprint, warnings, pool, table)
  finally:
    if lock:
      fileio.remove(lock)


def _metadata_table(config: ConvertConfig, listing: sources.Listing
                    ) -> meta_columns.Table | None:
  """--metadata_columns' values for the listed items (None without metadata columns)."""
  requests = meta_columns.parse_requests(config.metadata_columns)
  if not requests:
    return None
  table = meta_columns.read(
      listing.items, requests, csv_path=config.metadata_csv or config.labels_csv,
      csv_kind="metadata CSV" if config.metadata_csv else "labels CSV",
      image_column=config.image_column, label_column=config.label_column,
      patient_column=config.patient_column)
  listing.warnings += table.notes
  return table


def _convert_locked(config: ConvertConfig, listing: sources.Listing, key: bytes | None,
                    fingerprint: str, warnings: list[str], pool,
                    table: meta_columns.Table | None = None) -> Result:
  """convert()'s writing half, with the output folder's lock held: near-duplicates, the plan,
  the shards of every size, then the manifests."""
  import tqdm  # pylint: disable=g-import-not-at-top

  items, classes = listing.items, list(listing.classes)
  labels = [classes.index(it.label) for it in items]
  outs = config.size_dirs()
  if all([_prepare_output(out, fingerprint, config.overwrite) for out in outs]):
    m = manifest.read(outs[0])
    return Result(m, str(config.output_dir), resumed_shards=sum(
        len(info["shards"]) for info in m["splits"].values()), folders=dict(zip(config.sizes, outs)))
  own, bar = pool is None, None
  try:
    near = _near_duplicates(config, listing, lambda: pool or _start_pool(config), outs[0])
    if own and near is not None and near.pool is not None:
      pool = near.pool
    keys = ([it.patient_id for it in items] if near is None or config.near_duplicates != "group"
            else neardup.merged_groups([it.patient_id for it in items], near.pairs))
    grouped = any(it.patient_id for it in items)
    plan = _assign(config, listing, labels, keys if any(keys) else None)
    for name in _untrained_classes(classes, labels, plan):
      warnings.append(f"class {name!r} has no image in the train split: train refuses these "
                      "records (a model would never learn it); add training images of it")
    done_all = _finished(outs, plan)
    todo = [p for p in plan if p[0] not in done_all[0]]
    tasks = [(items[i].path, items[i].image_name, labels[i], items[i].patient_id, fold)
             + ((table.record_values(i),) if table else ())
             for _, _, fold, members in todo for i in members]
    bar = tqdm.tqdm(total=sum(len(p[3]) for p in plan), initial=sum(
        len(p[3]) for p in plan if p[0] in done_all[0]), unit="img", desc="convert",
                    smoothing=0.1, disable=not config.progress)
    if tasks and pool is None:
      pool = _start_pool(config)
    results = iter(())
    if tasks:
      results = pool.imap(tasks) if config.multi_size else (
          (None if rec is None else [rec], reason) for rec, reason in pool.imap(tasks))
    for done, new in zip(done_all, _write_shards(outs, todo, results, items, labels,
                                                 len(classes), bar)):
      done.update(new)
  finally:
    if own and pool is not None:
      pool.close()
    if bar is not None:
      bar.close()
  written = _write_manifests(config, listing, key, plan, done_all, fingerprint, grouped,
                             warnings, near, keys, table)
  return Result(written, str(config.output_dir), resumed_shards=len(plan) - len(todo),
                folders=dict(zip(config.sizes, outs)))


def _write_manifests(config, listing, key, plan, done_all, fingerprint, grouped, warnings, near,
                     keys, table=None) -> dict:
  """Each size folder's manifest (and TFDS metadata), the set file; the first size's manifest."""
  written = {}
  for size, out, done in zip(config.sizes, config.size_dirs(), done_all):
    m = _manifest(config, listing, list(listing.classes), plan, done, fingerprint, grouped,
                  warnings, size, near, keys)
    if table is not None:
      spec = _metadata_spec(table, listing, plan, done)
      m["metadata"] = spec.to_dict()
      m["inputs"]["warnings"] += _metadata_warnings(spec, m["splits"])
    if key is not None:
      m["inputs"]["pseudonymized"] = pseudonyms.manifest_entry(config.pseudonymize_names)
      if config.pseudonymize_names:
        pseudonyms.scrub_paths(m["inputs"], key)
    interop.write_tfds_metadata(out, m, dict(manifest.RecordSchema.ours().dtypes))
    manifest.write(out, m)
    fileio.rmtree(fileio.join(out, STATE_DIR))
    written[size] = m
  if config.multi_size:
    fileio.write_json_atomic(fileio.join(config.output_dir, SET_FILE), {
        "fingerprint": fingerprint, "sizes": list(config.sizes),
        "folders": [str(size) for size in config.sizes]})
  return written[config.sizes[0]]


def _pseudonymize(config: ConvertConfig, listing: sources.Listing) -> bytes | None:
  """--pseudonymize_patients: keyed hashes replace the listing's patient ids (and image names),
  before splits, fingerprint and records see them; the names mapping goes beside the key."""
  if not config.pseudonymize_patients:
    return None
  key = pseudonyms.load_key(config.pseudonymize_patients, config.output_dir)
  mapping = pseudonyms.apply(listing, key, names=config.pseudonymize_names)
  if mapping:
    pseudonyms.write_mapping(config.pseudonymize_patients, mapping)
  return key


def _start_pool(config: ConvertConfig) -> workers.RecordPool:
  return workers.RecordPool(config.workers or os.cpu_count() or 1, config.preprocess,
                            sizes=config.sizes if config.multi_size else None)


@dataclasses.dataclass
class _Near:
  pairs: list[tuple[int, int, int]]
  groups: list[list[int]]
  pool: workers.RecordPool | None  # started to hash, kept for the conversion


def _near_duplicates(config: ConvertConfig, listing: sources.Listing, get_pool, out: str
                     ) -> _Near | None:
  """Near-duplicate pairs and groups of the listed items (None when --near_duplicates=off).

  Hashes are computed by the workers and kept in the state folder by content sha256, so a resumed
  run does not decode every image again.
  """
  if config.near_duplicates == "off":
    return None
  cache_path = fileio.join(out, STATE_DIR, HASHES)
  try:
    cache = json.loads(fileio.read_text(cache_path))
  except (OSError, ValueError):
    cache = {}
  sha = listing.sha256
  missing = [it for it in listing.items if sha[it.relpath] not in cache]
  pool = None
  if missing:
    pool = get_pool()
    import tqdm  # pylint: disable=g-import-not-at-top

    for it, h in zip(missing, tqdm.tqdm(pool.hashes([it.path for it in missing]),
                                        total=len(missing), unit="img", desc="near-duplicates",
                                        disable=not config.progress)):
      cache[sha[it.relpath]] = None if h is None else [format(w, "x") for w in h]
    fileio.write_json_atomic(cache_path, cache)
  hashes = [None if cache[sha[it.relpath]] is None else
            tuple(int(w, 16) for w in cache[sha[it.relpath]]) for it in listing.items]
  pairs = neardup.find_pairs(hashes, config.near_duplicate_distance)
  return _Near(pairs, neardup.connected(len(hashes), pairs), pool)


def _assign(config: ConvertConfig, listing: sources.Listing, labels: list[int],
            groups: list[str] | None):
  """Splits (given by a pre-split layout, else drawn), train folds, then the shard plan.

  `groups`: per item, the key that keeps items together (patients merged with near-duplicate
  groups; "" alone); None: no grouping."""
  items = listing.items
  if listing.layout == "presplit":
    assigned = [("valid" if it.split == "val" else it.split) for it in items]
  else:
    assigned = splits.assign_splits(labels, groups, config.split, config.seed)
  split_items = {s: [i for i, a in enumerate(assigned) if a == s] for s in manifest.SPLITS}
  folds = [-1] * len(items)
  if config.folds:
    train = split_items["train"]
    train_folds = splits.assign_folds([labels[i] for i in train],
                                      [groups[i] for i in train] if groups else None,
                                      config.folds, config.seed)
    for i, f in zip(train, train_folds):
      folds[i] = f
  return _plan_shards(split_items, folds, config)


def _finished(outs: list[str], plan) -> list[dict]:
  """Per folder, {shard name: its state} of the shards an interrupted run of the same plan
  completed in every folder (a shard missing from one size's folder is written again in all)."""
  found = []
  for out in outs:
    present = set(fileio.listdir(out))  # one listing, not two requests a shard on a remote output
    states = set(fileio.listdir(fileio.join(out, STATE_DIR)))
    found.append({name for name, *_ in plan if name in present and name + ".json" in states})
  common = set.intersection(*found) if found else set()
  return [{name: json.loads(fileio.read_text(fileio.join(out, STATE_DIR, name + ".json")))
           for name, *_ in plan if name in common} for out in outs]


def _manifest(config, listing, classes, plan, done, fingerprint, grouped, warnings, size, near,
              keys) -> dict:
  inputs = {"input_dir": config.input_dir, "labels_csv": config.labels_csv,
            "patients_csv": config.patients_csv, "layout": listing.layout,
            "grouped_by_patient": grouped, "patient_warning": patient_warning(listing),
            "missing_patient_ids": listing.missing_patient,
            "warnings": warnings + listing.warnings, "found": listing.found,
            "rejected": [dataclasses.asdict(r) for r in listing.rejected],
            "duplicates": [dataclasses.asdict(d) for d in listing.duplicates]}
  inputs["near_duplicates"] = _near_manifest(config, listing, plan, near)
  if inputs["near_duplicates"]["straddling"]:
    how = ("the given splits of this pre-split layout (kept as given)"
           if listing.layout == "presplit" else "splits (--near_duplicates=report)")
    inputs["warnings"].append(
        f"{len(inputs['near_duplicates']['straddling'])} near-duplicate groups lie across {how}: "
        "scores on those images are optimistic")
  pre = dataclasses.replace(config.preprocess, image_size=size)
  m = manifest.build(fingerprint=fingerprint, classes=classes, plan=plan, done=done,
                     image_size=size, image_format=config.preprocess.image_format,
                     folds=config.folds, inputs=inputs, conversion=config.plan_dict(),
                     preprocessing=pre.to_dict(), versions=_versions())
  m["index_files"] = {"format": interop.INDEX_FORMAT, "folder": interop.INDEX_DIR}
  if config.multi_size:
    m["records_set"] = {"sizes": list(config.sizes), "folders": [f"../{s}" for s in config.sizes],
                        "decoded_for": config.sizes[-1]}
  return m


def _metadata_spec(table: meta_columns.Table, listing: sources.Listing, plan, done):
  """The manifest's metadata entry from the records actually written: a training image that
  preprocessing rejected adds nothing to the statistics (nor to a split's missing count)."""
  rejected = {r["path"] for s in done.values() for r in s["rejected"]}
  written: dict[str, list[int]] = {}
  folds: dict[int, list[int]] = {}
  for _, split, fold, members in plan:
    kept = [i for i in members if listing.items[i].relpath not in rejected]
    written.setdefault(split, []).extend(kept)
    if split == "train" and fold >= 0:
      folds.setdefault(fold, []).extend(kept)
  # Item order, not shard order: the statistics' float sums then never depend on the plan.
  return meta_columns.spec(table, {s: sorted(v) for s, v in written.items()},
                           {k: sorted(v) for k, v in folds.items()})


def _metadata_warnings(spec, split_info: dict) -> list[str]:
  """Columns the training split has no value of: their statistics are placeholders (0 +- 1, no
  vocabulary) and a model can learn nothing from them."""
  train = split_info.get("train", {}).get("num_examples", 0)
  return [f"metadata column {c.name!r} has no value in any of the {train} training images "
          "(every cell empty or unmatched): a model learns nothing from it; check the CSV or "
          "leave it out" for c in spec.columns if train and c.missing.get("train") == train]


def _near_manifest(config, listing, plan, near) -> dict:
  """The manifest's near-duplicate section: pairs with distance, groups with where they went,
  and pairs whose labels differ (label conflicts)."""
  items = listing.items
  info = {"mode": config.near_duplicates, "hash": neardup.HASH_NAME,
          "max_distance": config.near_duplicate_distance, "pairs": [], "groups": [],
          "conflicts": [], "straddling": []}
  if near is None:
    return info
  where = {i: (split, fold) for _, split, fold, members in plan for i in members}
  for i, j, d in near.pairs:
    pair = {"path": items[i].relpath, "near": items[j].relpath, "distance": d}
    info["pairs"].append(pair)
    if items[i].label != items[j].label:
      info["conflicts"].append({**pair, "labels": [items[i].label, items[j].label]})
  for group in near.groups:
    placed = sorted({where[i] for i in group}, key=str)
    entry = {"paths": [items[i].relpath for i in group],
             "image_names": [items[i].image_name for i in group],
             "splits": [f"{s}" if f < 0 else f"{s}/fold{f}" for s, f in placed]}
    info["groups"].append(entry)
    if len(placed) > 1:
      info["straddling"].append(entry["paths"])
  info["kept_together"] = (config.near_duplicates == "group" and listing.layout != "presplit")
  return info


def summary(result: Result, max_listed: int = 10) -> str:
  """A few human lines: counts per split and class, and what was rejected or dropped and why."""
  m = result.manifest
  inputs = m["inputs"]
  lines = [f"{result.output_dir}: {inputs['converted']} images in "
           f"{sum(len(s['shards']) for s in m['splits'].values())} shards "
           f"(found {inputs['found']}, rejected {len(inputs['rejected'])}, "
           f"duplicates {len(inputs['duplicates'])})"
           + (f"; {result.resumed_shards} shards reused from an earlier run"
              if result.resumed_shards else "")]
  # In manifest.SPLITS and class-id order: a resumed run read them back from manifest.json in
  # another order than a fresh run printed them (issue 27).
  for split, info in sorted(m["splits"].items(), key=lambda kv: _order(manifest.SPLITS, kv[0])):
    counts = ", ".join(f"{k}={v}" for k, v in sorted(
        info["class_counts"].items(), key=lambda kv: _order(m.get("classes", []), kv[0])))
    lines.append(f"  {split:5s} {info['num_examples']:7d}  ({counts}) in {len(info['shards'])} shards")
  notes = inputs.get("warnings", []) + [inputs.get("patient_warning")]
  lines += [f"  WARNING: {note}" for note in notes if note]
  if m.get("metadata"):
    from skinrecords.core import metadata  # pylint: disable=g-import-not-at-top

    lines += meta_columns.describe(metadata.MetadataSpec.from_dict(m["metadata"]))
  lines += _near_summary(inputs.get("near_duplicates"), max_listed)
  if len(result.folders) > 1:
    lines.append("  one records folder per size, same splits, folds and shard contents: "
                 + ", ".join(f"{size}: {folder}" for size, folder in result.folders.items()))
  for kind, entries, key in (("rejected", inputs["rejected"], "reason"),
                             ("duplicate", inputs["duplicates"], "duplicate_of")):
    for e in entries[:max_listed]:
      lines.append(f"  {kind}: {e['path']}: {e[key]}")
    if len(entries) > max_listed:
      lines.append(f"  ... {len(entries) - max_listed} more {kind} (see manifest.json)")
  return "\n".join(lines)


def _order(names, name) -> tuple:
  return (names.index(name), "") if name in names else (len(names), str(name))


def _untrained_classes(classes: list[str], labels: list[int], plan) -> list[str]:
  """Classes without an image in the train split (a pre-split layout's empty train/Melanoma)."""
  trained = {labels[i] for _, split, _, members in plan if split == "train" for i in members}
  return [c for k, c in enumerate(classes) if trained and k not in trained]


def _near_summary(near: dict | None, max_listed: int) -> list[str]:
  if not near or near["mode"] == "off":
    return []
  kept = ("kept in one split and fold" if near.get("kept_together") else
          "listed only (--near_duplicates=report)" if near["mode"] == "report" else
          "kept as the given splits have them")
  lines = [f"  near-duplicates: {len(near['pairs'])} pairs in {len(near['groups'])} groups "
           f"(within {near['max_distance']} bits), {kept}"]
  for c in near["conflicts"][:max_listed]:
    lines.append(f"  WARNING: label conflict: near-duplicates {c['path']} ('{c['labels'][0]}') and "
                 f"{c['near']} ('{c['labels'][1]}'), {c['distance']} bits apart; check the labels")
  if len(near["conflicts"]) > max_listed:
    lines.append(f"  ... {len(near['conflicts']) - max_listed} more near-duplicate label "
                 "conflicts (see manifest.json)")
  return lines
