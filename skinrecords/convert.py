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
import multiprocessing
import os
import pathlib
import platform
import shutil

import numpy as np

import skinrecords
from skinrecords import features
from skinrecords import fileio
from skinrecords import manifest
from skinrecords import preprocess
from skinrecords import records
from skinrecords import sources
from skinrecords import splits

STATE_DIR = ".make_records_state"
PLAN = "plan.json"

# A 512^2 JPEG at quality 95 of dermoscopy-like content is ~60 KB (measured on the synthetic data and
# in FIELD_NOTES): 0.08 bytes per pixel-channel. PNG is ~6x larger. Only used to pick shard counts.
_BYTES_PER_VALUE = {"jpeg": 0.08, "png": 0.5}


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
  input_dir: str
  output_dir: str
  labels_csv: str | None = None
  image_column: str = "image_name"
  label_column: str = "target"
  patient_column: str | None = None
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
    if self.labels_csv is None and self.patient_column:
      raise ValueError("patient_column needs labels_csv")
    self.preprocess.validate()

  def plan_dict(self) -> dict:
    """Settings that change the output bytes (not where it goes or how fast it is made)."""
    d = dataclasses.asdict(self)
    for key in ("output_dir", "workers", "strict", "overwrite", "progress"):
      d.pop(key)
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
  h = hashlib.sha256(json.dumps(config.plan_dict(), sort_keys=True).encode())
  for item in listing.items:  # the inputs themselves: a changed folder must not resume.
    h.update(f"{item.relpath}\t{os.path.getsize(item.path)}\t{item.label}\n".encode())
  return h.hexdigest()


def _ours(name: str) -> bool:
  base = name[:-4] if name.endswith(".tmp") else name
  return base == manifest.FILE or base == STATE_DIR or features.parse_shard_name(base) is not None


def _prepare_output(out: pathlib.Path, fingerprint: str, overwrite: bool) -> bool:
  """Makes `out` ready; returns True when the finished output already matches (nothing to do)."""
  state = out / STATE_DIR / PLAN
  existing = sorted(p.name for p in out.iterdir()) if out.exists() else []
  if existing and not overwrite:
    try:
      if (out / manifest.FILE).exists():
        if manifest.read(out).get("fingerprint") == fingerprint:
          return True
      elif json.loads(state.read_text())["fingerprint"] == fingerprint:
        return False  # resume
    except (OSError, ValueError, KeyError):
      pass
    raise OutputExistsError(
        f"{out} already holds {len(existing)} entries ({', '.join(existing[:5])}"
        f"{', ...' if len(existing) > 5 else ''}) that were not made by this command with these "
        "flags and inputs. Pass --overwrite to replace them, or choose another --output_dir.")
  if existing:  # overwrite: remove only what a converter writes; never unrelated files.
    for name in existing:
      if _ours(name):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
  (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
  fileio.write_json_atomic(state, {"fingerprint": fingerprint})
  return False


def _init_worker(config: preprocess.PreprocessConfig) -> None:
  import cv2  # pylint: disable=g-import-not-at-top

  cv2.setNumThreads(1)  # N processes x OpenCV's own pool oversubscribes the cores (opencv#5150).
  global _WORKER_CONFIG
  _WORKER_CONFIG = config


_WORKER_CONFIG: preprocess.PreprocessConfig | None = None


def _work(path: str):
  """Worker: returns (encoded bytes, None) or (None, reason). Never raises for a bad file."""
  try:
    return preprocess.preprocess_file(path, _WORKER_CONFIG), None
  except preprocess.RejectedImage as err:
    return None, err.reason
  except Exception as err:  # pylint: disable=broad-except  (one odd file must not end the run)
    return None, f"unexpected {type(err).__name__}: {err}"


def _imap(paths: list[str], config: ConvertConfig):
  workers = config.workers or os.cpu_count() or 1
  if workers == 1:  # in-process: no spawn start-up (~2 s), same code path otherwise.
    _init_worker(config.preprocess)
    yield from map(_work, paths)
    return
  ctx = multiprocessing.get_context("spawn")  # fork + OpenCV threads can deadlock (opencv#5150).
  with ctx.Pool(workers, initializer=_init_worker, initargs=(config.preprocess,)) as pool:
    yield from pool.imap(_work, paths, chunksize=4)


def _versions() -> dict:
  import cv2  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return {"skinrecords": skinrecords.__version__, "tensorflow": tf.__version__,
          "opencv": cv2.__version__, "numpy": np.__version__,
          "python": platform.python_version()}


def convert(config: ConvertConfig) -> Result:
  """Runs the whole conversion; see the module docstring. Returns the manifest written."""
  import tqdm  # pylint: disable=g-import-not-at-top

  config.preprocess.validate()
  listing = sources.list_sources(
      config.input_dir, labels_csv=config.labels_csv, image_column=config.image_column,
      label_column=config.label_column, patient_column=config.patient_column,
      classes=list(config.classes) if config.classes else None)
  items, classes = listing.items, list(listing.classes)
  labels = [classes.index(it.label) for it in items]
  grouped = any(it.patient_id for it in items)

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
  plan = _plan_shards(split_items, folds, config)

  out = pathlib.Path(config.output_dir)
  fingerprint = _fingerprint(config, listing)
  if _prepare_output(out, fingerprint, config.overwrite):
    return Result(manifest.read(out), str(out), resumed_shards=len(plan))
  state_dir = out / STATE_DIR

  done = {}
  for name, *_ in plan:
    state_file = state_dir / (name + ".json")
    if (out / name).exists() and state_file.exists():
      done[name] = json.loads(state_file.read_text())
  todo = [p for p in plan if p[0] not in done]
  paths = [items[i].path for _, _, _, members in todo for i in members]
  size = config.preprocess.image_size
  bar = tqdm.tqdm(total=sum(len(p[3]) for p in plan), initial=sum(
      len(p[3]) for p in plan if p[0] in done), unit="img", desc="convert", smoothing=0.1,
                  disable=not config.progress)
  results = _imap(paths, config)
  for name, split, fold, members in todo:
    rejected = []
    with records.ShardWriter(out / name, len(classes)) as writer:
      for i in members:
        image, reason = next(results)
        bar.update(1)
        item = items[i]
        if image is None:
          rejected.append({"path": item.relpath, "reason": reason})
          continue
        writer.write(image=image, image_name=item.image_name, target=labels[i],
                     patient_id=item.patient_id, fold=fold, height=size, width=size)
      summary = writer.close()
      summary.update(rejected=rejected, fold=fold)
      # State first, then the shard: a shard under its final name always has its state file.
      fileio.write_json_atomic(state_dir / (name + ".json"), summary)
      writer.commit()
    done[name] = summary
  bar.close()

  written = _manifest(config, listing, classes, plan, done, fingerprint, grouped)
  manifest.write(out, written)
  shutil.rmtree(state_dir)
  return Result(written, str(out), resumed_shards=len(plan) - len(todo))


def _manifest(config, listing, classes, plan, done, fingerprint, grouped) -> dict:
  inputs = {"input_dir": config.input_dir, "labels_csv": config.labels_csv,
            "layout": listing.layout, "grouped_by_patient": grouped, "found": listing.found,
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
  for split, info in m["splits"].items():
    counts = ", ".join(f"{k}={v}" for k, v in info["class_counts"].items())
    lines.append(f"  {split:5s} {info['num_examples']:7d}  ({counts}) in {len(info['shards'])} shards")
  for kind, entries, key in (("rejected", inputs["rejected"], "reason"),
                             ("duplicate", inputs["duplicates"], "duplicate_of")):
    for e in entries[:max_listed]:
      lines.append(f"  {kind}: {e['path']}: {e[key]}")
    if len(entries) > max_listed:
      lines.append(f"  ... {len(entries) - max_listed} more {kind} (see manifest.json)")
  return "\n".join(lines)
