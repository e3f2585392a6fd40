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

import skinrecords
from skinrecords import dedup
from skinrecords import features
from skinrecords import fileio
from skinrecords import manifest
from skinrecords import preprocess
from skinrecords import pseudonyms
from skinrecords import records
from skinrecords import sources
from skinrecords import splits
from skinrecords import workers

STATE_DIR = ".make_records_state"
PLAN = "plan.json"

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
  # (skinrecords.pseudonyms); its path and secret stay out of the output.
  pseudonymize_patients: str | None = None
  pseudonymize_names: bool = False

  def validate(self) -> None:
    """Raises ValueError naming the field, its value and what would be accepted."""
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
    if self.preprocess.image_size < MIN_TRAIN_IMAGE_SIZE:
      raise ValueError(f"image_size={self.preprocess.image_size}: training needs at least "
                       f"{MIN_TRAIN_IMAGE_SIZE} px; use image_size >= {MIN_TRAIN_IMAGE_SIZE}")

  def plan_dict(self) -> dict:
    """Settings that change the output bytes (not where it goes or how fast it is made)."""
    d = dataclasses.asdict(self)
    for key in ("output_dir", "workers", "strict", "overwrite", "progress",
                "pseudonymize_patients"):
      d.pop(key)
    if not self.pseudonymize_patients:  # records made before these fields keep their fingerprint
      d.pop("pseudonymize_names")
    d["preprocess"] = self.preprocess.to_dict()
    d["classes"] = list(self.classes) if self.classes else None
    d["split"] = list(self.split)
    return d


class OutputExistsError(RuntimeError):
  pass


@dataclasses.dataclass
class Result:
  manifest: dict
  output_dir: str
  resumed_shards: int

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


def _fingerprint(config: ConvertConfig, listing: sources.Listing) -> str:
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
  return base == manifest.FILE or base == STATE_DIR or features.parse_shard_name(base) is not None


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
  fileio.write_json_atomic(state, {"fingerprint": fingerprint})
  return False



def _write_shards(out: str, todo, results, items, labels, num_classes, bar) -> dict:
  """Appends the workers' records shard by shard in plan order; returns {shard name: summary}."""
  done = {}
  for name, _, fold, members in todo:
    rejected = []
    with records.ShardWriter(fileio.join(out, name), num_classes) as writer:
      for i in members:
        record, reason = next(results)
        bar.update(1)
        if record is None:
          rejected.append({"path": items[i].relpath, "reason": reason})
        else:
          writer.write_record(record, labels[i])
      summary = writer.close()
      summary.update(rejected=rejected, fold=fold)
      # State first, then the shard: a shard under its final name always has its state file.
      fileio.write_json_atomic(fileio.join(out, STATE_DIR, name + ".json"), summary)
      writer.commit()
    done[name] = summary
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
  `config.workers` new ones; their preprocessing settings must be `config.preprocess`.
  """
  import tqdm  # pylint: disable=g-import-not-at-top

  config.validate()
  warnings = check_output_dir(config)
  if pool is not None and pool.config != config.preprocess:
    raise ValueError("convert: the RecordPool was started for other preprocessing settings "
                     "than config.preprocess; start one with config.preprocess")
  listing = sources.list_sources(
      config.input_dir, labels_csv=config.labels_csv, image_column=config.image_column,
      label_column=config.label_column, patient_column=config.patient_column,
      patients_csv=config.patients_csv, classes=list(config.classes) if config.classes else None,
      exclude=None if fileio.is_remote(config.output_dir) else config.output_dir)
  key = _pseudonymize(config, listing)
  items, classes = listing.items, list(listing.classes)
  labels = [classes.index(it.label) for it in items]
  grouped = any(it.patient_id for it in items)
  plan = _assign(config, listing, labels, grouped)
  for name in _untrained_classes(classes, labels, plan):
    warnings.append(f"class {name!r} has no image in the train split: train refuses these "
                    "records (a model would never learn it); add training images of it")

  out = config.output_dir  # a str: it may be gs://, which pathlib would mangle
  fingerprint = _fingerprint(config, listing)
  lock = _take_lock(out)
  try:
    return _convert_locked(config, listing, classes, labels, plan, grouped, warnings,
                           fingerprint, pool)
  finally:
    if lock:
      fileio.remove(lock)


def _convert_locked(config, listing, classes, labels, plan, grouped, warnings, fingerprint,
                    pool) -> Result:
  """convert()'s writing half, with the output folder's lock held."""
  import tqdm  # pylint: disable=g-import-not-at-top

  out, items = config.output_dir, listing.items
  if _prepare_output(out, fingerprint, config.overwrite):
    return Result(manifest.read(out), str(out), resumed_shards=len(plan))
  state_dir = fileio.join(out, STATE_DIR)

  done = _finished(out, plan)
  todo = [p for p in plan if p[0] not in done]
  tasks = [(items[i].path, items[i].image_name, labels[i], items[i].patient_id, fold)
           for _, _, fold, members in todo for i in members]
  bar = tqdm.tqdm(total=sum(len(p[3]) for p in plan), initial=sum(
      len(p[3]) for p in plan if p[0] in done), unit="img", desc="convert", smoothing=0.1,
                  disable=not config.progress)
  own = pool is None and bool(tasks)
  if own:
    pool = workers.RecordPool(config.workers or os.cpu_count() or 1, config.preprocess)
  try:
    done.update(_write_shards(out, todo, pool.imap(tasks) if tasks else iter(()), items, labels,
                              len(classes), bar))
  finally:
    if own:
      pool.close()
  bar.close()

  written = _manifest(config, listing, classes, plan, done, fingerprint, grouped, warnings)
  if key is not None:
    written["inputs"]["pseudonymized"] = pseudonyms.manifest_entry(config.pseudonymize_names)
    if config.pseudonymize_names:
      pseudonyms.scrub_paths(written["inputs"], key)
  manifest.write(out, written)
  fileio.rmtree(state_dir)
  return Result(written, str(out), resumed_shards=len(plan) - len(todo))


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


def _assign(config: ConvertConfig, listing: sources.Listing, labels: list[int], grouped: bool):
  """Splits (given by a pre-split layout, else drawn), train folds, then the shard plan."""
  items = listing.items
  if listing.layout == "presplit":
    assigned = [("valid" if it.split == "val" else it.split) for it in items]
  else:
    assigned = splits.assign_splits(labels, [it.patient_id for it in items] if grouped else None,
                                    config.split, config.seed)
  split_items = {s: [i for i, a in enumerate(assigned) if a == s] for s in manifest.SPLITS}
  folds = [-1] * len(items)
  if config.folds:
    train = split_items["train"]
    train_folds = splits.assign_folds([labels[i] for i in train],
                                      [items[i].patient_id for i in train] if grouped else None,
                                      config.folds, config.seed)
    for i, f in zip(train, train_folds):
      folds[i] = f
  return _plan_shards(split_items, folds, config)


def _finished(out: str, plan) -> dict:
  """{shard name: its state} of the shards an interrupted run of the same plan completed."""
  done = {}
  present = set(fileio.listdir(out))  # one listing, not two requests a shard on a remote output
  states = set(fileio.listdir(fileio.join(out, STATE_DIR)))
  for name, *_ in plan:
    if name in present and name + ".json" in states:
      done[name] = json.loads(fileio.read_text(fileio.join(out, STATE_DIR, name + ".json")))
  return done


def _manifest(config, listing, classes, plan, done, fingerprint, grouped, warnings) -> dict:
  inputs = {"input_dir": config.input_dir, "labels_csv": config.labels_csv,
            "patients_csv": config.patients_csv, "layout": listing.layout,
            "grouped_by_patient": grouped, "patient_warning": patient_warning(listing),
            "missing_patient_ids": listing.missing_patient,
            "warnings": warnings + listing.warnings, "found": listing.found,
            "rejected": [dataclasses.asdict(r) for r in listing.rejected],
            "duplicates": [dataclasses.asdict(d) for d in listing.duplicates]}
  return manifest.build(fingerprint=fingerprint, classes=classes, plan=plan, done=done,
                        image_size=config.preprocess.image_size,
                        image_format=config.preprocess.image_format, folds=config.folds,
                        inputs=inputs, conversion=config.plan_dict(),
                        preprocessing=config.preprocess.to_dict(), versions=_versions())


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
