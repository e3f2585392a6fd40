"""The run directory's contract: what training writes to MODEL_DIR, and how everyone reads it.

    MODEL_DIR/model.keras    the best epoch's model (safe-mode loadable)
    MODEL_DIR/config.json    classes, image size, records, preprocessing, model and training config
    MODEL_DIR/history.csv    one row per epoch
    MODEL_DIR/summary.json   which epoch was saved as best, and with what validation metrics
    MODEL_DIR/backup/        the checkpoint a restarted run resumes from
    MODEL_DIR/logs/          TensorBoard
    MODEL_DIR/calibration.json  optional: the temperature or Platt scaling `evaluate --calibrate`
                             fitted
    MODEL_DIR/threshold.json the two-class decision threshold chosen on validation (StoredThreshold)
    MODEL_DIR/metadata.json  a run trained with patient metadata: the columns and the statistics
                             its "metadata" input was encoded with (core.metadata.MetadataSpec)
A cross-validation run (`train --fold=all`) is a folder of such runs, one per fold:
    CV_DIR/fold_0/ ... fold_{K-1}/   each a run directory as above, trained with --fold=k
    CV_DIR/oof.csv, cv_metrics.json, cv_roc.png   out-of-fold predictions and their metrics
    CV_DIR/threshold.json    the ensemble's threshold, chosen on the out-of-fold predictions
Every file is written atomically (temporary name, then rename): a kill during a save used to leave a
0-byte best model that a rerun reported as success.

TensorFlow-free: `check_model_dir` checks a finished run's files and config; loading its model.keras
is `models.load_model_dir`, next to the custom layers a safe-mode load needs registered.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import json
import os
import zipfile

from skinrecords.core import fileio
from skinrecords.core import metadata as md

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
SUMMARY_FILE = "summary.json"
BACKUP_DIR = "backup"
LOGS_DIR = "logs"
CALIBRATION_FILE = "calibration.json"
THRESHOLD_FILE = "threshold.json"
HISTORY_FIELDS = ("epoch", "phase", "loss", "accuracy", "auc", "val_loss", "val_accuracy",
                  "val_auc", "images_per_sec", "seconds")


def _write_json(model_dir: str | os.PathLike, name: str, obj: dict) -> None:
  fileio.write_text_atomic(fileio.join(model_dir, name), json.dumps(obj, indent=2) + "\n")


def _read_json(model_dir: str | os.PathLike, name: str, fix: str = "") -> dict | None:
  """MODEL_DIR/name as parsed JSON, None when absent; ValueError (plus `fix`) when not JSON."""
  path = fileio.join(model_dir, name)
  if not fileio.isfile(path):
    return None
  try:
    return json.loads(fileio.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ValueError(f"{path}: not valid JSON ({err}){fix}") from err


# config.json's format. 1: the files written before this field existed (no "version" key; they
# load as version 1, unchanged). 2: the same keys and values, plus "version". Bump it when a key
# changes meaning, and teach RunConfig.from_dict to read the older shape.
RUN_CONFIG_VERSION = 2


@dataclasses.dataclass
class RunConfig:
  """config.json: what evaluate, predict, export and ensemble need from a run, and what a resume
  must match (check_resumable). The one owner of its keys: train writes it, cv rebuilds it for a
  finished fold's check, every reader goes through from_dict (directly or via check_model_dir).

  "model" and "train" stay the JSON of models.ModelConfig and train.TrainConfig (their to_dict):
  this module is TensorFlow-free, and the resume check compares "train" field by field.
  A field left None is not written (cv's check has no resolved precision to compare; a test's
  hand-made run has no seed); train sets every one, so its files keep every key.
  """
  classes: list
  image_size: int
  records_dir: str | None = None
  records_fingerprint: str | None = None
  fold: int | None = None  # written even when None: a run made without folds is not a fold run
  preprocessing: dict | None = None
  model: dict = dataclasses.field(default_factory=dict)
  train: dict = dataclasses.field(default_factory=dict)
  seed: int | None = None
  deterministic: bool | str | None = None
  replicas: int | None = None
  workers: int | None = None
  mixed_precision: str | None = None  # the resolved policy ("float32", "mixed_float16", ...)
  xla: str | None = None  # the resolved mode
  # The metadata columns the model takes, in input order ([] for an image-only run; a config.json
  # from before issue 24 has none: its run had no metadata). Their encoding: metadata.json.
  metadata: list | None = None
  version: int = RUN_CONFIG_VERSION
  # Keys this version does not know (a newer minor writer, a user's note): kept, written back.
  extra: dict = dataclasses.field(default_factory=dict)

  _ALWAYS = ("classes", "image_size", "records_dir", "records_fingerprint", "fold",
             "preprocessing", "model", "train")

  def to_dict(self) -> dict:
    d = {"version": self.version}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name not in ("version", "extra") and (value is not None or f.name in self._ALWAYS):
        d[f.name] = value
    d.update((k, v) for k, v in self.extra.items() if k not in d)
    return d

  @classmethod
  def from_dict(cls, raw: dict, where: str = CONFIG_FILE) -> "RunConfig":
    """A config.json dict of any version so far (no "version": 1); ValueError (one line, naming
    `where` and the fix) for a newer version or a file that is not a run's config."""
    if not isinstance(raw, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
      raise ValueError(f"{where}: 'version' must be a positive integer, got {version!r}")
    if version > RUN_CONFIG_VERSION:
      raise ValueError(f"{where} has version {version}, this skinrecords reads up to "
                       f"{RUN_CONFIG_VERSION}; upgrade skinrecords")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra", "version"}
    known = {k: v for k, v in raw.items() if k in names}
    known.setdefault("classes", None)
    known.setdefault("image_size", None)
    for key in ("model", "train"):
      if known.get(key) is None:
        known[key] = {}
    extra = {k: v for k, v in raw.items() if k not in names and k != "version"}
    return cls(**known, version=RUN_CONFIG_VERSION, extra=extra)

  def validate(self, where: str = CONFIG_FILE) -> None:
    """ValueError unless it names at least 2 classes and an image size (what every reader needs)."""
    if not isinstance(self.classes, list) or len(self.classes) < 2:
      raise ValueError(f"{where}: 'classes' must list at least 2 class names in id order, "
                       f"got {self.classes!r}")
    size = self.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ValueError(f"{where}: 'image_size' must be a positive integer, got {size!r}")


def write_config(model_dir: str | os.PathLike, config: RunConfig | dict) -> None:
  """config.json, always through RunConfig (a dict is a test's or an old caller's hand-made one)."""
  run = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
  _write_json(model_dir, CONFIG_FILE, run.to_dict())


def write_summary(model_dir: str | os.PathLike, summary: dict) -> None:
  _write_json(model_dir, SUMMARY_FILE, summary)


def write_cv_metrics(model_dir: str | os.PathLike, cv_metrics: dict) -> None:
  _write_json(model_dir, CV_METRICS_FILE, cv_metrics)


def read_run_config(model_dir: str | os.PathLike) -> RunConfig | None:
  """config.json as a RunConfig, or None when the run has not written one yet."""
  raw = _read_json(model_dir, CONFIG_FILE)
  return None if raw is None else RunConfig.from_dict(raw, fileio.join(model_dir, CONFIG_FILE))


def read_summary(model_dir: str | os.PathLike) -> dict | None:
  """summary.json as a dict; None when absent or unreadable (a killed save: the run rewrites it
  after its next epoch, so callers treat it as not finished)."""
  try:
    summary = _read_json(model_dir, SUMMARY_FILE)
  except ValueError:
    return None
  return summary if isinstance(summary, dict) else None


# The settings a run's backup, model.keras and config.json depend on: resuming with any of them
# changed would continue one model under another's description (a changed --image_size resumed
# silently and model.keras no longer matched config.json).
RESUME_KEYS = ("records_fingerprint", "backbone", "image_size", "classes", "num_classes", "fold")
# The recipe (recipes.RecipeConfig, flat in config.json's "train") is compared with every other
# "train" field by changed_training_settings: resuming under another loss silently mixed two
# losses in one history, and another optimizer or schedule failed deep in the restore ("Received
# incompatible tensor with shape ()").
# The fields of config.json's "train" (train.TrainConfig, model.* and augment.* flattened) that MAY
# differ on resume; every other one is refused by name (issue 27: --learning_rate=0.05
# --balance=oversample --noaugment resumed a 1e-4 run silently and rewrote config.json, so the saved
# best epoch was described by settings it was not trained with). A refuse-by-default rule: a field
# added to TrainConfig later is covered without a change here. What may change does not change the
# model a run trains, only how far, where from, how fast or how it is shown:
RESUME_MAY_CHANGE = (
    "epochs",  # train further (or stop sooner); refused with lr_schedule=cosine (_epochs_fixed)
    "early_stopping_patience",  # when to stop, not what one epoch does
    "records_dir",  # the records may move: their fingerprint is compared instead
    "model_dir", "overwrite", "progress",  # where, and how it is shown
    "cache", "data_service",  # where the same input comes from
    "strategy", "xla",  # which devices, and how fast (a preempted run may resume on others)
    # Op determinism orders floating-point reductions; it does not change what an epoch trains.
    # Runs from before issue 21 stored False, which `auto` now resolves to True on a CPU.
    "deterministic",
    "mixed_precision",  # the flag ("auto"); config.json's resolved top-level value is compared
    "restore_model",  # a repair of model.keras from backup/, asked for once
    # --metadata=all and --metadata=age,sex may name the same columns: check_resumable compares
    # the resolved column list (config.json's top-level "metadata") instead.
    "metadata",
)
# Top-level config.json values compared besides RESUME_KEYS: float16 or float32 compute.
_RESOLVED_KEYS = ("mixed_precision",)
# What `clear` removes for --overwrite: only files training writes.
_RUN_FILES = (MODEL_FILE, CONFIG_FILE, HISTORY_FILE, SUMMARY_FILE, "accuracy.png", "loss.png",
              "auc.png", CALIBRATION_FILE, THRESHOLD_FILE, md.SPEC_FILE)


FOLD_PREFIX = "fold_"
OOF_FILE = "oof.csv"
CV_METRICS_FILE = "cv_metrics.json"


def fold_dir(model_dir: str | os.PathLike, fold: int) -> str:
  """Where fold `fold` of a cross-validation run in `model_dir` lives."""
  return fileio.join(model_dir, f"{FOLD_PREFIX}{int(fold)}")


def cv_fold_dirs(model_dir: str | os.PathLike, finished: bool = True) -> list[str]:
  """The fold run directories of a CV run, in fold order; [] when `model_dir` is not one.

  finished=True: only folders named fold_<k> holding a model.keras (an unfinished fold has none
  yet); False: every fold_<k> folder.
  """
  if not fileio.isdir(model_dir):
    return []
  folds = []
  for name in fileio.listdir(model_dir):
    suffix, child = name[len(FOLD_PREFIX):], fileio.join(model_dir, name)
    if (name.startswith(FOLD_PREFIX) and suffix.isdigit() and fileio.isdir(child) and
        (not finished or fileio.isfile(fileio.join(child, MODEL_FILE)))):
      folds.append((int(suffix), child))
  return [path for _, path in sorted(folds)]


def holds_cv_run(model_dir: str | os.PathLike) -> bool:
  """Whether MODEL_DIR holds (part of) a cross-validation run: fold_k folders or CV files."""
  return bool(cv_fold_dirs(model_dir, finished=False)) or any(
      fileio.exists(fileio.join(model_dir, name)) for name in (OOF_FILE, CV_METRICS_FILE))


def holds_single_run(model_dir: str | os.PathLike) -> bool:
  return any(fileio.exists(fileio.join(model_dir, name)) for name in (MODEL_FILE, CONFIG_FILE))


def run_finished(run_dir: str | os.PathLike) -> bool:
  """Whether a run trained all its planned epochs (or stopped early), by its summary.json."""
  summary = read_summary(run_dir) or {}
  done, planned = summary.get("epochs_done"), summary.get("epochs_planned")
  return bool(summary.get("stopped_early")) or (isinstance(done, int) and isinstance(
      planned, int) and done >= planned)


CALIBRATION_METHODS = ("temperature", "platt")


def write_calibration(model_dir: str | os.PathLike, calibration: dict) -> None:
  """calibration.json: {"method": "temperature", "temperature": T, ...} or {"method": "platt",
  "slope": a, "intercept": b, ...}, with where it was fitted."""
  _write_json(model_dir, CALIBRATION_FILE, calibration)


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_calibration(model_dir: str | os.PathLike) -> dict | None:
  """calibration.json as a dict, or None when the run has none; ValueError when it is unusable."""
  path = fileio.join(model_dir, CALIBRATION_FILE)
  fix = "; delete it or refit with --calibrate=temperature or --calibrate=platt"
  cal = _read_json(model_dir, CALIBRATION_FILE, fix)
  if cal is None:
    return None
  method = cal.get("method") if isinstance(cal, dict) else None
  if method == "temperature" and _finite(cal.get("temperature")) and cal["temperature"] > 0:
    return cal
  # A slope <= 0 would reverse the ranking: no validation fit should give one (ensemble refuses).
  if method == "platt" and _finite(cal.get("slope")) and cal["slope"] > 0 and \
      _finite(cal.get("intercept")):
    return cal
  raise ValueError(f"{path}: expected {{\"method\": \"temperature\", \"temperature\": T > 0}} "
                   f"or {{\"method\": \"platt\", \"slope\": a > 0, \"intercept\": b}}, got "
                   f"{cal!r}{fix}")


@dataclasses.dataclass(frozen=True)
class StoredThreshold:
  """threshold.json: the two-class decision threshold on P(class 1) a run (or a CV folder) chose
  without test data, and how. evaluate, predict and export apply it unless told otherwise."""
  value: float
  rule: str  # thresholds.parse_rule syntax: youden | sensitivity:S | fixed:T
  source: str  # human: "Youden's J on 120 validation predictions"
  split: str  # "valid" (a run) or "oof" (a CV folder: the fold models' out-of-fold predictions)
  n: int  # predictions it was chosen on (0 for a fixed rule)
  fold: int | None = None
  model_sha256: str | None = None  # the model.keras it was chosen for (None for a CV folder)

  def describe(self, where: str | os.PathLike = "") -> str:
    """Where it came from (the value itself is printed beside it by the caller)."""
    return self.source + (f", {fileio.join(where, THRESHOLD_FILE)}" if where else "")


def write_threshold(model_dir: str | os.PathLike, threshold: StoredThreshold) -> None:
  _write_json(model_dir, THRESHOLD_FILE, dataclasses.asdict(threshold))


def read_threshold(model_dir: str | os.PathLike) -> StoredThreshold | None:
  """threshold.json, None when absent; ValueError (one line, with the fix) when unusable."""
  path = fileio.join(model_dir, THRESHOLD_FILE)
  raw = _read_json(model_dir, THRESHOLD_FILE, "; delete it, or train again")
  if raw is None:
    return None
  fields = {f.name for f in dataclasses.fields(StoredThreshold)}
  try:
    t = StoredThreshold(**{k: v for k, v in raw.items() if k in fields})
  except TypeError as err:
    raise ValueError(f"{path}: {err}; delete it, or train again") from err
  if not (_finite(t.value) and 0.0 < t.value < 1.0):
    raise ValueError(f"{path}: value={t.value!r} is not a threshold in (0, 1); delete it, or "
                     "train again")
  return t


def write_metadata(model_dir: str | os.PathLike, spec: md.MetadataSpec) -> None:
  """metadata.json (atomically): the spec a run's "metadata" input was encoded with."""
  _write_json(model_dir, md.SPEC_FILE, spec.to_dict())


def read_metadata(model_dir: str | os.PathLike) -> md.MetadataSpec:
  """metadata.json as a MetadataSpec; an empty one when the run has none (image only); ValueError
  (one line, with the fix) when it is unusable."""
  fix = "; copy the run's metadata.json back, or train again"
  raw = _read_json(model_dir, md.SPEC_FILE, fix)
  if raw is None:
    return md.MetadataSpec()
  try:
    return md.MetadataSpec.from_dict(raw)
  except (KeyError, TypeError, ValueError, AttributeError) as err:
    raise ValueError(f"{fileio.join(model_dir, md.SPEC_FILE)}: not a metadata spec "
                     f"({type(err).__name__}: {err}){fix}") from err


class RunDirError(ValueError):
  """MODEL_DIR holds a run this one must not continue (or cannot be written); one-line message."""


def resume_settings(config: dict) -> dict:
  """The RESUME_KEYS a config.json dict holds (an older file, or a partial caller, lacks some:
  those are left out, and not compared)."""
  model = config.get("model") or {}
  found = [(k, config) for k in ("records_fingerprint", "image_size", "classes", "fold")]
  found += [(k, model) for k in ("backbone", "num_classes")]
  return {k: where[k] for k, where in found if k in where}


def _flatten(d: dict, prefix: str = "") -> dict:
  """{"model": {"dropout": .3}} -> {"dropout": .3}: the nested configs' fields are flags too."""
  flat = {}
  for key, value in d.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, prefix))
    else:
      flat[prefix + key] = value
  return flat


def changed_training_settings(old: dict, new: dict) -> list[tuple[str, object, object]]:
  """(field, stored value, new value) for every training setting a resume must not change.

  Compares config.json's "train" field by field (RESUME_MAY_CHANGE excepted) and the resolved
  mixed precision; a field one side lacks (a config.json from before it existed) is not compared.
  """
  before, now = _flatten(old.get("train") or {}), _flatten(new.get("train") or {})
  changed = [(k, before[k], now[k]) for k in before
             if k in now and k not in RESUME_MAY_CHANGE and before[k] != now[k]]
  changed = _augment_as_one(changed, old.get("train") or {}, new.get("train") or {})
  if _epochs_fixed(before) and "epochs" in before and "epochs" in now \
      and before["epochs"] != now["epochs"]:
    changed.append(("epochs", before["epochs"], now["epochs"]))
  for key in _RESOLVED_KEYS:
    if key in old and key in new and old[key] != new[key]:
      changed.append((key, old[key], new[key]))
  return changed


def _augment_as_one(changed: list, old: dict, new: dict) -> list:
  """--noaugment changes six fields at once: say --augment=true (now false) instead."""
  was, now = old.get("augment"), new.get("augment")
  if not (isinstance(was, dict) and isinstance(now, dict)) or _augments(was) == _augments(now):
    return changed
  fields = set(was) | set(now)
  return [c for c in changed if c[0] not in fields] + [("augment", _augments(was), _augments(now))]


def _augments(aug: dict) -> bool:
  """Whether an AugmentConfig dict does anything: a flip, a range or a colour change (its
  interpolation and fill settings alone do not; augment.AugmentConfig.none() has them)."""
  return any(v for k, v in aug.items() if not isinstance(v, str) and k != "fill_value")


def _epochs_fixed(train: dict) -> bool:
  """A cosine schedule decays over the planned epochs: more epochs would change every step's rate."""
  return train.get("lr_schedule") == "cosine"


def _as_flag(value) -> str:
  return str(value).lower() if isinstance(value, bool) else str(value)


def check_resumable(model_dir: str | os.PathLike, config: RunConfig | dict) -> None:
  """Raises RunDirError naming the setting(s) in which MODEL_DIR's run differs from `config`."""
  old = _read_json(model_dir, CONFIG_FILE)
  if old is None:
    return
  try:  # the version check; the keys are compared as the file has them (a key it lacks is not)
    RunConfig.from_dict(old, fileio.join(model_dir, CONFIG_FILE))
  except ValueError as err:  # a newer version, or not a run's config
    raise RunDirError(f"{err}; use another --model_dir, or --overwrite") from err
  if isinstance(config, RunConfig):
    config = config.to_dict()
  before, now = resume_settings(old), resume_settings(config)
  for key in RESUME_KEYS:
    if key not in before or key not in now or before[key] is None and key != "fold":
      continue
    if before[key] != now[key] and key == "records_fingerprint":
      raise RunDirError(
          f"{model_dir} holds a run trained on other records ({old.get('records_dir')}, "
          f"another fingerprint than {config.get('records_dir') or 'these'}); use another "
          "--model_dir, or --overwrite to start afresh there")
    if before[key] != now[key]:
      raise RunDirError(
          f"{model_dir} holds a run with {key}={before[key]!r}, this one has {key}={now[key]!r}; "
          "use another --model_dir, or --overwrite to start afresh there")
  was, now = old.get("metadata") or [], config.get("metadata")
  if now is not None and list(was) != list(now):
    raise RunDirError(
        f"{model_dir} holds a run trained with metadata columns {','.join(was) or '(none)'}, this "
        f"one has {','.join(now) or '(none)'}; resume with --metadata="
        f"{','.join(was) or '(empty)'}, use another --model_dir, or --overwrite to start afresh "
        "there")
  changed = changed_training_settings(old, config)
  if changed:
    shown = ", ".join(f"--{k}={_as_flag(a)} (now {_as_flag(b)})" for k, a, b in changed)
    raise RunDirError(
        f"{model_dir} holds a run trained with other settings: {shown}; resume with the run's "
        "settings (only --epochs, --early_stopping_patience, --records_dir, --cache, "
        "--data_service, --strategy, --xla, --deterministic, --progress may change), use another "
        "--model_dir, or --overwrite to start afresh there")


def clear(model_dir: str | os.PathLike) -> None:
  """Removes what training wrote to MODEL_DIR (for --overwrite); other files stay."""
  for name in _RUN_FILES:
    fileio.remove(fileio.join(model_dir, name))
  for name in (BACKUP_DIR, LOGS_DIR):
    fileio.rmtree(fileio.join(model_dir, name))


def check_writable(model_dir: str | os.PathLike) -> None:
  """Creates MODEL_DIR and writes a probe file, before any long work; RunDirError if it can't."""
  try:
    fileio.probe_writable(model_dir)
  except OSError as err:
    raise RunDirError(f"--model_dir={model_dir} cannot be written ({err.strerror or err}); "
                      "choose a writable folder") from err


def save_model(model, model_dir: str | os.PathLike) -> None:
  """model.keras, atomically (Keras insists on the .keras suffix, so the temporary name keeps it)."""
  path = fileio.join(model_dir, MODEL_FILE)
  tmp = fileio.join(model_dir, ".tmp-" + MODEL_FILE)
  try:
    model.save(tmp)  # Keras writes gs:// and ram:// paths itself (through tf.io.gfile)
    fileio.rename(tmp, path, overwrite=True)
  finally:
    fileio.remove(tmp)


def read_history(model_dir: str | os.PathLike, upto: int) -> list[dict]:
  path = fileio.join(model_dir, HISTORY_FILE)
  if not fileio.exists(path):
    return []
  rows = csv.DictReader(io.StringIO(fileio.read_text(path), newline=""))
  return [row for row in rows if int(row["epoch"]) <= upto]


def write_history(model_dir: str | os.PathLike, rows: list[dict]) -> None:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\r\n")
  writer.writeheader()
  writer.writerows(rows)
  fileio.write_text_atomic(fileio.join(model_dir, HISTORY_FILE), buf.getvalue())


def model_file_problem(path: str | os.PathLike) -> str | None:
  """Why the model.keras at `path` is damaged ("empty (0 bytes)", "truncated ..."), None when it
  is a complete .keras archive. A .keras file is a zip: a kill or a full disk mid-copy leaves one
  without its central directory, which Keras reported as "File not found" (issue 27)."""
  n = fileio.size(path)
  if n == 0:
    return "empty (0 bytes)"
  try:
    with fileio.open(path, "rb") as f, zipfile.ZipFile(f) as archive:
      bad = archive.testzip()  # reads every member and checks its CRC: ~0.1 s for 30 MB
      names = set(archive.namelist())
  except (zipfile.BadZipFile, EOFError, OSError) as err:
    return f"truncated or corrupt ({n} bytes, not a complete .keras zip archive: {err})"
  if bad is not None:
    return f"corrupt ({n} bytes; the member {bad} fails its checksum)"
  if "config.json" not in names:
    return f"not a Keras model ({n} bytes; a zip without config.json)"
  return None


DAMAGED_FIX = ("rerun the same train command into this directory: it restores model.keras from "
               "backup/ (add --restore_model when it asks), or train with --overwrite")


def check_model_dir(model_dir) -> RunConfig:
  """MODEL_DIR/config.json as a RunConfig, once MODEL_DIR holds a non-empty model.keras and a config.json that
  names at least 2 classes and an image size (FileNotFoundError or ValueError otherwise).
  A damaged model.keras (empty or truncated zip) is a ValueError naming the repair."""
  d = os.fspath(model_dir)
  model_path, config_path = fileio.join(d, MODEL_FILE), fileio.join(d, CONFIG_FILE)
  need = f"a model directory holds {MODEL_FILE} (model.save()) and {CONFIG_FILE} from training"
  if not fileio.isdir(d):
    raise FileNotFoundError(f"{d}: model directory not found; {need}")
  missing = [name for name in (MODEL_FILE, CONFIG_FILE) if not fileio.isfile(fileio.join(d, name))]
  if missing:
    raise FileNotFoundError(f"{d}: missing {' and '.join(missing)}; {need}")
  problem = model_file_problem(model_path)
  if problem:
    raise ValueError(f"{model_path} is damaged: {problem}; {DAMAGED_FIX}")
  run = read_run_config(d)
  run.validate(config_path)
  return run
