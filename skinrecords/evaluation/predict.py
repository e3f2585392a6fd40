"""Predictions for image files, preprocessed exactly as the model's training records were, or for
the records of one split of a records folder (e.g. the SIIM-ISIC Kaggle test files, which carry no
labels and so cannot be evaluated).

No train/serve skew: each file goes through the converter's own function
(`preprocess.preprocess_file` with the PreprocessConfig recorded in config.json), which returns the
encoded bytes the converter would have stored, JPEG artefacts included; those bytes are decoded and,
when the model's image_size differs from the stored size, resized exactly as `pipeline` does. Bad
files are reported with a reason, never fatal. Records go through `pipeline.make_dataset` as in
evaluation; the "image" column then holds each record's image_name.

A model trained with patient metadata (MODEL_DIR/metadata.json) takes each image's metadata too:
from `metadata_csv` for image files (`metadata_csv`: image name -> columns, encoded with the run's
own spec; missing cells encoded as missing), from the records themselves for records_dir, as
evaluate reads them. Such a model without its metadata is refused, never fed "all missing".

`model_dir` may name an ensemble (a CV folder or a comma list, see `ensemble`): each member
preprocesses and decodes at its own settings, its stored temperature (calibration.json) is applied,
and the members' probabilities are combined. `format` picks the CSV: ours, the ISIC Challenge's or
the SIIM-ISIC 2020 Kaggle submission (`submission`).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import io
import logging
import os

import numpy as np

from skinrecords.core import fileio
from skinrecords.core import manifest
from skinrecords.core import rundir
from skinrecords.data import preprocess
from skinrecords.data import sources
from skinrecords.evaluation import ensemble
from skinrecords.evaluation import explain
from skinrecords.evaluation import metadata_csv as metadata_csv_lib
from skinrecords.evaluation import submission
from skinrecords.input import metadata_input as input_metadata
from skinrecords.input import pipeline
from skinrecords.model import inference
from skinrecords.model import models


@dataclasses.dataclass(frozen=True)
class PredictConfig:
  """What `run` does (bin/predict); `run` validates it (.validate())."""
  model_dir: str
  images: tuple[str, ...] = ()
  input_dir: str | None = None  # every image under it, recursively (hidden files skipped)
  output_csv: str | None = None
  batch_size: int = 32
  # Two classes: predicted class 1 when P(class 1) >= threshold. "stored" (or None): the run's
  # threshold.json, chosen on validation by training; 0.5, said loudly, when it has none.
  threshold: float | str | None = "stored"
  tta: int = 0  # as EvalConfig.tta
  records_dir: str | None = None  # instead of images: every record of `split` in this folder
  split: str = "test"
  explain_dir: str | None = None  # also write a Grad-CAM overlay per image here
  ensemble: str = "mean"  # how several members combine: ensemble.METHODS
  format: str = "default"  # submission.FORMATS
  isic_columns: str | None = None  # "Class:Column,..." renames for format=isic
  metadata_csv: str | None = None  # image files' patient metadata (evaluation/metadata_csv.py)

  def validate(self) -> None:
    if self.records_dir and (self.images or self.input_dir):
      raise ValueError("records_dir scores records; image paths and input_dir score image files: "
                       "pass one or the other")
    if not self.images and not self.input_dir and not self.records_dir:
      raise ValueError("no images given: pass image paths, an input_dir, or both (or a "
                       "records_dir)")
    if self.split not in manifest.SPLITS:
      raise ValueError(f"PredictConfig.split={self.split!r}: expected one of {manifest.SPLITS}")
    if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or \
        self.batch_size < 1:
      raise ValueError(f"PredictConfig.batch_size={self.batch_size!r}: expected an integer >= 1")
    if self.threshold not in (None, "stored") and (not isinstance(self.threshold, (int, float))
                                                   or not 0.0 < self.threshold < 1.0):
      raise ValueError(f"PredictConfig.threshold={self.threshold!r}: expected None (the run's "
                       "stored threshold) or a float strictly between 0 and 1")
    inference.check_tta(self.tta, "PredictConfig.tta")
    if self.ensemble not in ensemble.METHODS:
      raise ValueError(f"PredictConfig.ensemble={self.ensemble!r}: expected one of "
                       f"{', '.join(ensemble.METHODS)}")
    if self.format not in submission.FORMATS:
      raise ValueError(f"PredictConfig.format={self.format!r}: expected one of "
                       f"{', '.join(submission.FORMATS)}")
    if self.format != "default" and not self.output_csv:
      raise ValueError(f"format={self.format} describes the CSV file: pass output_csv too")
    if self.metadata_csv and self.records_dir:
      raise ValueError("metadata_csv gives image files their metadata; records carry their own "
                       "(read as evaluate reads them): drop metadata_csv with records_dir")
    if self.isic_columns and self.format != "isic":
      raise ValueError("isic_columns renames the columns of format=isic; pass format=isic too")


def list_images(input_dir) -> list[str]:
  """Sorted paths of the image files under `input_dir` (recursive; hidden files/folders skipped)."""
  return sources.list_image_files(input_dir)


def _preprocess(path: str, config: preprocess.PreprocessConfig) -> bytes | str:
  """Encoded bytes, or the reason the file was rejected."""
  try:
    return preprocess.preprocess_file(path, config)
  except Exception as err:  # pylint: disable=broad-except  (one odd file must not end the run)
    return preprocess.describe_rejection(err)


def _decode(data: bytes, image_size: int, stored_size: int) -> np.ndarray:
  return pipeline.decode_image(data, image_size, stored_size).numpy()


def _preprocess_config(cfg: rundir.RunConfig, model_dir) -> preprocess.PreprocessConfig:
  if cfg.preprocessing:
    try:
      return preprocess.PreprocessConfig.from_dict(cfg.preprocessing)
    except (TypeError, ValueError) as err:
      raise ValueError(f"{model_dir}/{rundir.CONFIG_FILE}: bad 'preprocessing' ({err})") from err
  logging.warning("%s/%s records no preprocessing (records made elsewhere?): using a plain "
                  "%d px centre crop, JPEG q95; predictions may differ from evaluation", model_dir,
                  rundir.CONFIG_FILE, cfg.image_size)
  return preprocess.PreprocessConfig(image_size=cfg.image_size)


def _batches(paths, pconfig, image_size, batch_size, rejected):
  """Yields full (images, labels=-1, paths) batches; rejected files go to `rejected`."""
  # Threads, not processes: OpenCV releases the GIL while decoding and resizing, and a spawned
  # process would pay ~2 s start-up. Work is submitted a few batches ahead to bound memory.
  workers = max(1, min(4, os.cpu_count() or 1))
  images, names = [], []
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    step = batch_size * 4
    for start in range(0, len(paths), step):
      chunk = paths[start:start + step]
      for path, result in zip(chunk, pool.map(_preprocess, chunk, [pconfig] * len(chunk))):
        if isinstance(result, str):
          rejected.append({"image": path, "reason": result})
          continue
        images.append(_decode(result, image_size, pconfig.image_size))
        names.append(path)
        if len(images) == batch_size:
          yield np.stack(images), np.full(len(images), -1), names
          images, names = [], []
  if images:
    yield np.stack(images), np.full(len(images), -1), names


def _explaining(batches, model, classes, threshold, folder, overlay_names=None):
  """Passes batches through, writing FOLDER/<name>.gradcam.png for each image on the way;
  `overlay_names` maps a file path to its unique name (gray.png, gray.jpg and sub/gray.png shared
  one heatmap, issue 27)."""
  for batch in batches:
    names = batch[2].numpy() if hasattr(batch[2], "numpy") else batch[2]
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    if overlay_names:
      names = [overlay_names.get(n, n) for n in names]
    meta = batch[0].get(input_metadata.INPUT) if isinstance(batch[0], dict) else None
    explain.write_overlays(folder, model, np.asarray(input_metadata.image_of(batch[0])), names,
                           classes, threshold, None if meta is None else np.asarray(meta))
    yield batch


def _with_metadata(batches, spec, table):
  """(images, labels, paths) -> ({"image", "metadata"}, labels, paths): each image's CSV row
  encoded with the run's spec (core.metadata.encode_rows; no row: every value missing)."""
  for images, labels, names in batches:
    meta = metadata_csv_lib.encode(spec, metadata_csv_lib.rows_for(table, names))
    yield input_metadata.as_input(images, meta), labels, names


def _overlay_names(paths: list[str]) -> dict[str, str]:
  """{path: unique name} for image files: the stem, or the path below their common folder."""
  if not paths:
    return {}
  root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
  rel = [os.path.relpath(os.path.abspath(p), root).replace(os.sep, "/") for p in paths]
  return dict(zip(paths, sources.unique_names(rel)))


def _rows(probs, names, classes, threshold) -> list[dict]:
  rows = []
  for i, name in enumerate(names):
    if probs.ndim == 1:
      p = float(probs[i])
      rows.append({"image": name, "probability": p, "predicted": classes[int(p >= threshold)]})
    else:
      p = [float(x) for x in probs[i]]
      rows.append({"image": name, "probability": p, "predicted": classes[int(np.argmax(p))]})
  return rows


def _file_probs(model, cfg, paths, batch_size, threshold, tta, model_dir, explain_dir=None,
                metadata=None):
  """(probabilities, names, rejected) for image files; `metadata`: (the run's spec, the
  MetadataTable) for a model with metadata."""
  classes = [str(c) for c in cfg.classes]
  pconfig = _preprocess_config(cfg, model_dir)
  rejected: list[dict] = []
  batches = _batches([str(p) for p in paths], pconfig, cfg.image_size, batch_size, rejected)
  if metadata:
    batches = _with_metadata(batches, *metadata)
  if explain_dir:
    batches = _explaining(batches, model, classes, threshold, explain_dir,
                          _overlay_names([str(p) for p in paths]))
  probs, _, names = inference.predict_dataset(model, batches, tta)
  order = {str(p): i for i, p in enumerate(paths)}
  rejected.sort(key=lambda r: order[r["image"]])
  return probs, names, rejected


def predict_files(model_dir, paths, batch_size: int = 32, *, threshold: float = 0.5,
                  tta: int = 0, metadata_csv: str | None = None) -> tuple[list[dict], list[dict]]:
  """Predicts each file in `paths` (in order); `metadata_csv` for a model with metadata.

  Returns rows {"image": path, "probability": P(class 1) (two classes) or [P(class k)...],
  "predicted": class name} and rejected [{"image": path, "reason": str}].
  """
  model, cfg = models.load_model_dir(model_dir)
  table = metadata_csv_lib.read(metadata_csv) if metadata_csv else None
  meta = _file_metadata(inference.run_metadata(model, model_dir), table, model_dir)
  probs, names, rejected = _file_probs(model, cfg, paths, batch_size, threshold, tta, model_dir,
                                       metadata=meta)
  return _rows(probs, names, [str(c) for c in cfg.classes], threshold), rejected


def _file_metadata(spec, table, model_dir):
  """(spec, table) for a member with metadata, None for an image-only one; a member with metadata
  and no CSV, or a CSV without one of its columns, is refused in one line."""
  if not spec:
    return None
  if table is None:
    raise ValueError(f"{model_dir} was trained with patient metadata ({', '.join(spec.names)}): "
                     "pass metadata_csv=FILE with an image_name column and those columns (empty "
                     "cells count as missing); predictions without it would not be the model's")
  table.check_columns(spec, model_dir)
  table.check_numbers(spec)
  return spec, table


def _record_probs(model, cfg, records_dir, split, batch_size, *, threshold, tta, model_dir,
                  explain_dir, metadata=None):
  """(probabilities, names) for every record of `split`; `metadata`: the run's spec, for a model
  with metadata (the records' own values, encoded with it, as evaluate does)."""
  classes = [str(c) for c in cfg.classes]
  info = pipeline.load_info(records_dir)
  inference.check_classes(info, classes, model_dir)
  through = explain_dir and functools.partial(_explaining, model=model, classes=classes,
                                              threshold=threshold, folder=explain_dir)
  probs, _, names = inference.predict_split(model, info, split, image_size=cfg.image_size,
                                            batch_size=batch_size, tta=tta, through=through,
                                            metadata=metadata, model_dir=model_dir)
  return probs, names


def write_csv(rows: list[dict], path, classes: list[str]) -> None:
  """image, probability (P(class 1), or P(predicted) for K > 2), predicted[, p_<class>...]."""
  binary = len(classes) == 2
  f = io.StringIO(newline="")
  w = csv.writer(f)
  w.writerow(["image", "probability", "predicted"] + ([] if binary else
                                                      [f"p_{c}" for c in classes]))
  for r in rows:
    p = r["probability"]
    if binary:
      w.writerow([r["image"], f"{p:.8g}", r["predicted"]])
    else:
      w.writerow([r["image"], f"{max(p):.8g}", r["predicted"]] + [f"{q:.8g}" for q in p])
  fileio.write_text_atomic(path, f.getvalue())


def format_table(rows: list[dict], classes: list[str] | None = None) -> str:
  """A fixed-width text table: image, probability, predicted class."""
  header = "P(predicted)" if rows and isinstance(rows[0]["probability"], list) else (
      f"P({classes[1]})" if classes and len(classes) == 2 else "probability")
  width = max([len("image")] + [len(r["image"]) for r in rows])
  lines = [f"{'image':<{width}}  {header:>12}  predicted"]
  for r in rows:
    p = max(r["probability"]) if isinstance(r["probability"], list) else r["probability"]
    lines.append(f"{r['image']:<{width}}  {p:>12.4f}  {r['predicted']}")
  return "\n".join(lines)


def _check_outputs(config: PredictConfig, classes: list[str], members: int):
  """Output problems are refused before the first forward pass; returns the ISIC columns."""
  if config.explain_dir and members > 1:
    raise ValueError("explain_dir draws one model's Grad-CAM; an ensemble has none of its own: "
                     "pass a single run as model_dir")
  columns = submission.parse_isic_columns(config.isic_columns, classes)
  if config.format == "kaggle":
    submission.melanoma_index(classes)
  return columns


def _member_probs(config: PredictConfig, member, paths, spec=None, table=None):
  """One member's calibrated probabilities, names and rejected files; `spec`: its metadata spec
  (None: image only), `table`: the metadata CSV for image files."""
  kwargs = dict(threshold=config.threshold, tta=config.tta, model_dir=member.model_dir,
                explain_dir=config.explain_dir)
  if config.records_dir:
    probs, names = _record_probs(member.model, member.cfg, config.records_dir, config.split,
                                 config.batch_size, metadata=spec, **kwargs)
    rejected = []
  else:
    probs, names, rejected = _file_probs(member.model, member.cfg, paths, config.batch_size,
                                         kwargs.pop("threshold"), config.tta, member.model_dir,
                                         config.explain_dir,
                                         _file_metadata(spec, table, member.model_dir))
  return member.calibrated(probs), names, rejected


def resolve_threshold(config: PredictConfig, members) -> tuple[float, str, bool]:
  """(threshold, where it came from, whether it is the 0.5 fallback) for these members."""
  if config.threshold not in (None, "stored"):
    return float(config.threshold), f"fixed {config.threshold:g} (--threshold)", False
  return ensemble.stored_threshold(config.model_dir, members)


def _metadata(config: PredictConfig, members, paths):
  """(each member's metadata spec or None, the metadata CSV or None), every member's needs
  checked before the first forward pass; `run.last_metadata`: the lines predict prints about it
  (how many images had missing values, unseen categories, a CSV no member uses)."""
  specs = [m.metadata for m in members]  # each run's metadata.json, checked against its model
  table = metadata_csv_lib.read(config.metadata_csv) if config.metadata_csv else None
  run.last_metadata = []
  if config.records_dir:
    return specs, None
  for m, spec in zip(members, specs):
    _file_metadata(spec, table, m.model_dir)
  used = [s for s in specs if s]
  if table is not None and not used:
    run.last_metadata = [f"WARNING: metadata_csv={config.metadata_csv} ignored: "
                         f"{'no member' if len(members) > 1 else 'the model'} was trained with "
                         "metadata"]
  elif used:
    cover = metadata_csv_lib.coverage(used, table, paths)
    if paths and cover.without_row == len(paths):  # a naming mismatch, not patients without data
      example = submission.image_id(paths[0])
      raise ValueError(f"metadata_csv={config.metadata_csv} has a row for none of the "
                       f"{len(paths)} images (looked up by file name without extension, e.g. "
                       f"{example!r}, in its {table.name_column} column); fix the names")
    run.last_metadata = cover.summary()
    if len(used) < len(members):
      run.last_metadata.append(f"metadata: used by {len(used)} of {len(members)} members; the "
                               "others score the image alone")
  return specs, table


def run(config: PredictConfig) -> tuple[list[dict], list[dict], list[str]]:
  """bin/predict: lists the images, predicts them (with every member), writes the CSV when asked.

  Returns (rows, rejected, classes); `config` with the threshold applied is `run.last_threshold`,
  the metadata report `run.last_metadata`.
  """
  config.validate()
  if config.output_csv:
    fileio.check_writable_file(config.output_csv, "output_csv")  # before any forward pass
  if config.explain_dir:
    fileio.check_writable_dir(config.explain_dir, "explain_dir")
  paths = list(config.images) + (list_images(config.input_dir) if config.input_dir else [])
  if config.input_dir and not paths and not config.records_dir:  # said "0 predicted" (issue 27)
    raise ValueError(f"--input_dir={config.input_dir}: found no images there (looked for "
                     f"{', '.join(sources.IMAGE_EXTENSIONS)} files, in subfolders too; hidden "
                     "ones skipped)")
  members = ensemble.load_members(config.model_dir)
  classes = members[0].classes
  columns = _check_outputs(config, classes, len(members))
  specs, table = _metadata(config, members, paths)
  threshold, source, fallback = resolve_threshold(config, members)
  run.last_threshold = (threshold, source, fallback) if len(classes) == 2 else None
  config = dataclasses.replace(config, threshold=threshold)
  results = [_member_probs(config, m, paths, s, table) for m, s in zip(members, specs)]
  ensemble.check_aligned([r[1] for r in results], [m.model_dir for m in members])
  probs = ensemble.combine([r[0] for r in results], config.ensemble)
  names, rejected = results[0][1], results[0][2]
  rows = _rows(probs, names, classes, config.threshold)
  if config.output_csv and config.format == "isic":
    submission.write_isic(config.output_csv, names, probs, columns)
  elif config.output_csv and config.format == "kaggle":
    submission.write_kaggle(config.output_csv, names, probs, classes)
  elif config.output_csv:
    write_csv(rows, config.output_csv, classes)
  return rows, rejected, classes
