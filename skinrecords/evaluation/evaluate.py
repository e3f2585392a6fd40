"""Evaluates a trained model directory on one split of a records folder.

Why it is built this way:
- Every example is read exactly once, in file order, with its label and name in the same tuple as
  its image (`pipeline.make_dataset(training=False, with_names=True)`). The original notebook
  predicted on a shuffled generator and compared the result with the unshuffled label list.
- AUCs come from scikit-learn on ALL gathered predictions: in-graph AUC under a tf.distribute
  strategy has been reported above 1 (tensorflow#48152).
- A collapsed classifier (>= 99% of predictions in one class) is reported loudly: the notebook's
  ResNet50 predicted one class for all 3,560 test images and nobody noticed.

A model directory holds `model.keras` (a Keras model: RGB 0..255 images [B,H,W,3] -> logits, [B,1]
for two classes, [B,K] for K > 2) and `config.json` (classes in id order, image_size, records_dir,
fold, preprocessing, model and train settings). For two classes, id 1 is the positive class and a
prediction is positive when P(class 1) >= threshold. `model_dir` may name an ensemble (`ensemble`:
leakage guards per member and for the ensemble); calibration metrics and temperature scaling come
from `calibration`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys

import numpy as np


from skinrecords.core import fileio
from skinrecords.core import manifest
from skinrecords.core import rundir
from skinrecords.evaluation import calibration
from skinrecords.evaluation import ensemble
from skinrecords.evaluation import explain
from skinrecords.evaluation import metrics
from skinrecords.evaluation import plots
from skinrecords.evaluation import submission
from skinrecords.input import pipeline
from skinrecords.model import inference

_THRESHOLD_CHOICES = ("'stored' (the run's threshold.json), a float strictly between 0 and 1, "
                      "or 'youden'")
# stored: apply MODEL_DIR/calibration.json when there is one; temperature / platt: fit it now on
# the validation split (and store it); none: ignore a stored one.
CALIBRATE_CHOICES = ("stored", "temperature", "platt", "none")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What `evaluate` does; `evaluate` validates it (.validate())."""
  model_dir: str
  records_dir: str | None = None  # default: config.json's records_dir
  split: str = "test"
  fold: int | None = None  # default: config.json's fold (used for split "train"/"valid")
  batch_size: int = 64
  # "stored": the threshold training chose on validation (threshold.json; 0.5, said loudly, when
  # the run has none); a float in (0, 1); or "youden" (chosen now on the validation split).
  threshold: str = "stored"
  tta: int = 0  # 0: off; n in 1..8: mean probability over the first n transforms of DIHEDRAL
  output_dir: str | None = None  # default: MODEL_DIR/eval_<split>
  # train/valid splits of records other than the model's training records: refused unless True
  # (a different fold of other records is no leak, but usually a mistake worth stopping).
  allow_other_records: bool = False
  bootstrap: int = 1000  # resamples for the 95 % confidence intervals; 0: none
  ensemble: str = "mean"  # how several members combine: ensemble.METHODS
  calibrate: str = "stored"  # CALIBRATE_CHOICES
  isic_truth_csv: str | None = None  # also write the ISIC ground-truth CSV here
  isic_columns: str | None = None  # "Class:Column,..." renames for the ISIC CSV

  def validate(self) -> None:
    """Raises ValueError naming the field, its value and what would be accepted."""
    if self.split not in manifest.SPLITS:
      raise ValueError(f"EvalConfig.split={self.split!r}: expected one of {manifest.SPLITS}")
    if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or \
        self.batch_size < 1:
      raise ValueError(f"EvalConfig.batch_size={self.batch_size!r}: expected an integer >= 1")
    if self.fold is not None and (isinstance(self.fold, bool) or not isinstance(self.fold, int)
                                  or self.fold < 0):
      raise ValueError(f"EvalConfig.fold={self.fold!r}: expected None or an integer >= 0")
    inference.check_tta(self.tta, "EvalConfig.tta")
    if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int) or \
        self.bootstrap < 0:
      raise ValueError(f"EvalConfig.bootstrap={self.bootstrap!r}: expected an integer >= 0")
    parse_threshold(self.threshold)
    if self.ensemble not in ensemble.METHODS:
      raise ValueError(f"EvalConfig.ensemble={self.ensemble!r}: expected one of "
                       f"{', '.join(ensemble.METHODS)}")
    if self.calibrate not in CALIBRATE_CHOICES:
      raise ValueError(f"EvalConfig.calibrate={self.calibrate!r}: expected one of "
                       f"{', '.join(CALIBRATE_CHOICES)}")
    if self.isic_columns and not self.isic_truth_csv:
      raise ValueError("isic_columns renames the columns of the ISIC truth CSV; pass "
                       "isic_truth_csv too")

  @property
  def threshold_value(self) -> float | str:
    return parse_threshold(self.threshold)


def parse_threshold(text: str | float) -> float | str:
  """"stored", "youden" or a float in (0, 1); ValueError otherwise."""
  if isinstance(text, str) and text.strip().lower() in ("youden", "stored"):
    return text.strip().lower()
  try:
    value = float(text)
  except (TypeError, ValueError) as err:
    raise ValueError(f"threshold={text!r}: expected {_THRESHOLD_CHOICES}") from err
  if not 0.0 < value < 1.0:
    raise ValueError(f"threshold={text!r}: expected {_THRESHOLD_CHOICES}")
  return value


def _same_records(info: manifest.DatasetInfo, cfg: rundir.RunConfig) -> bool:
  """Whether `info` is the records the model was trained on: the manifest fingerprint when both
  sides have one (a copied or moved folder still matches), else the resolved path."""
  trained = cfg.records_fingerprint
  if trained and info.fingerprint:
    return trained == info.fingerprint
  return fileio.canonical(info.records_dir) == fileio.canonical(str(cfg.records_dir or ""))


def _check_leakage(config: EvalConfig, cfg: rundir.RunConfig, info: manifest.DatasetInfo,
                   fold, youden: bool, same: bool) -> None:
  """Refuses evaluations that would score (or pick a threshold on) the model's training data;
  `same`: whether `info` holds the model's own training records (_same_records)."""
  trained_fold = cfg.fold
  uses_folds = config.split in ("train", "valid") or youden
  if same and uses_folds and fold != trained_fold:
    trained = (f"fold={trained_fold} (fold {trained_fold} held out)" if trained_fold is not None
               else "no fold (train/valid splits)")
    raise ValueError(f"{config.model_dir} was trained with {trained}; fold={fold}'s validation "
                     "examples were in its training data, so its metrics and Youden threshold "
                     f"would leak. Evaluate with fold={trained_fold}, or on split=test")
  if not same and config.split in ("train", "valid") and not config.allow_other_records:
    raise ValueError(f"split={config.split} of {info.records_dir}, which are not the records "
                     f"{config.model_dir} was trained on ({cfg.records_dir}); pass "
                     "allow_other_records to do it anyway, or evaluate split=test")
  if youden and "valid" not in info.shards and fold is None:
    raise ValueError(f"threshold='youden' needs a validation split to be chosen on, and "
                     f"{info.records_dir} has none (splits: {sorted(info.shards)}); pass a fixed "
                     "threshold or a fold")


def _preprocessing_warnings(cfg: rundir.RunConfig, info: manifest.DatasetInfo) -> list[str]:
  """Differences between the preprocessing of the model's training records and of these."""
  trained, here = cfg.preprocessing or {}, info.preprocessing or {}
  keys = sorted(k for k in set(trained) | set(here)
                if k not in ("jpeg_quality", "max_pixels", "reduced_decode")
                and trained.get(k) != here.get(k))
  if not trained or not here or not keys:
    return []
  diffs = ", ".join(f"{k}: trained {trained.get(k)!r}, here {here.get(k)!r}" for k in keys)
  return [f"these records were preprocessed differently from the model's training records "
          f"({diffs}); its scores here may not reflect its real accuracy"]


def _threshold(config, cfg, run, fold, classes, members=None):
  """(threshold, where it came from) — stored, a fixed value, or Youden's J on validation."""
  threshold = config.threshold_value
  if len(classes) != 2:
    return None, None
  if threshold == "stored":
    value, source, fallback = ensemble.stored_threshold(config.model_dir, members)
    if fallback:
      bar = "!" * 100
      print(f"{bar}\nWARNING: decision threshold {source}\n{bar}", file=sys.stderr, flush=True)
    return value, source
  if threshold != "youden":
    return threshold, f"fixed {threshold:g} (--threshold)"
  valid_probs, valid_labels = run("valid")[:2]
  where = f"valid{f' fold {fold}' if fold is not None else ''}"
  return (metrics.youden_threshold(valid_probs, valid_labels),
          f"Youden's J on {len(valid_labels)} {where} predictions")


GALLERY_SIZE = 8  # examples per picture: enough to see a pattern, small enough to read


def _images_by_name(info, split, fold, image_size, wanted: set[str]) -> dict:
  """The decoded images of the named examples (a second pass: predictions keep no pixels)."""
  found = {}
  ds = pipeline.make_dataset(info, split, batch_size=64, training=False, image_size=image_size,
                             fold=fold, with_names=True)
  for images, _, names in ds:
    for image, name in zip(images.numpy(), names.numpy()):
      name = name.decode("utf-8")
      if name in wanted:
        found[name] = image
  return found


def _galleries(out, model, info, split, fold, cfg, m, probs, labels, names) -> dict:
  """errors.png (the most confident false negatives, then false positives) and examples.png (the
  most confident true positives), each with Grad-CAM; two-class models only. Without TTA."""
  if len(m["classes"]) != 2 or not names:
    return {}
  k, threshold = GALLERY_SIZE, m["threshold"]
  picks = {"errors.png": np.concatenate([
               explain.most_confident(probs, labels, "false_negative", k // 2, threshold),
               explain.most_confident(probs, labels, "false_positive", k // 2, threshold)]),
           "examples.png": explain.most_confident(probs, labels, "true_positive", k, threshold)}
  picks = {file: idx.astype(int) for file, idx in picks.items() if len(idx)}
  images = _images_by_name(info, split, fold, cfg.image_size,
                           {names[i] for idx in picks.values() for i in idx})
  for file, idx in picks.items():
    explain.write_gallery(fileio.join(out, file), model, np.stack([images[names[i]] for i in idx]),
                          [names[i] for i in idx], m["classes"], labels[idx], threshold)
  return {file: [names[i] for i in idx] for file, idx in picks.items()}


def _inputs(config: EvalConfig):
  """Members, records and the guards that keep training data out of the scores."""
  members = ensemble.load_members(config.model_dir, config.calibrate == "stored")
  lead, classes = members[0], members[0].classes
  records_dir = config.records_dir or lead.cfg.records_dir
  if not records_dir:
    raise ValueError(f"{lead.model_dir}/{rundir.CONFIG_FILE} names no records_dir; pass "
                     "records_dir")
  info = pipeline.load_info(records_dir)
  inference.check_classes(info, classes, lead.model_dir)
  if not info.has_labels(config.split):
    raise ValueError(f"{records_dir}: split {config.split!r} has no labels (SIIM-ISIC test files "
                     "carry no target), so it cannot be evaluated; score it with bin/predict "
                     f"--model_dir={config.model_dir} --records_dir={records_dir} "
                     f"--split={config.split}")
  youden = config.threshold_value == "youden"
  if youden and len(classes) != 2:
    raise ValueError(f"threshold='youden' needs a two-class model; {config.model_dir} has "
                     f"{len(classes)} classes (decided by argmax, no threshold)")
  if youden and config.ensemble == "rank" and len(members) > 1:
    raise ValueError("threshold=youden with ensemble=rank: rank scores are relative to the split "
                     "they rank, so a threshold chosen on valid means nothing on another split; "
                     "use ensemble=mean, or a fixed threshold")
  # The ensemble's own refusals first, on the folds the members trained with: with --fold=1 the
  # per-member check told fold_0 to "evaluate with fold=0", which then failed on fold_1.
  sames = [_same_records(info, m.cfg) for m in members]
  ensemble.check_leakage(members, config.split, youden, [m.cfg.fold for m in members],
                         sames)
  folds = [config.fold if config.fold is not None else m.cfg.fold for m in members]
  for m, f, same in zip(members, folds, sames):
    _check_leakage(dataclasses.replace(config, model_dir=m.model_dir), m.cfg, info, f, youden,
                   same)
  return members, info, records_dir, folds, sames


def _check_outputs(config: EvalConfig, classes) -> tuple[str, list[str]]:
  """Every output folder and file is checked before the first forward pass."""
  out = fileio.check_writable_dir(config.output_dir or ensemble.default_output_dir(
      config.model_dir, config.split))
  columns = submission.parse_isic_columns(config.isic_columns, classes)
  if config.isic_truth_csv:
    fileio.check_writable_file(config.isic_truth_csv, "isic_truth_csv")
  return out, columns


def _fit_calibration(config, members, info, folds, sames) -> None:
  """--calibrate=temperature|platt: each member's calibration on its own validation split (for CV
  folds, the fold it held out: honest for that member), stored in its MODEL_DIR."""
  for m, fold, same in zip(members, folds, sames):
    rundir.check_writable(m.model_dir)
    if "valid" not in info.shards and fold is None:
      raise ValueError(f"calibrate={config.calibrate} fits on a validation split, and "
                       f"{info.records_dir} has none for {m.model_dir} (no valid split, no "
                       "fold); calibrate=none, or records with a validation split")
    _check_leakage(dataclasses.replace(config, model_dir=m.model_dir, split="valid"), m.cfg, info,
                   fold, False, same)
  fit = ensemble.fit_platt if config.calibrate == "platt" else ensemble.fit_temperature
  if config.calibrate == "platt" and len(members[0].classes) != 2:
    raise ValueError("calibrate=platt fits a slope and an intercept to one logit (two classes); "
                     "use calibrate=temperature for more classes")
  for m, fold in zip(members, folds):
    probs, labels, _ = ensemble.predict_member(m, info, "valid", fold, config.batch_size,
                                               config.tta)
    fit(m, probs, labels, {"records_dir": str(info.records_dir), "split": "valid", "fold": fold,
                           "tta": config.tta})


def evaluate(config: EvalConfig) -> dict:
  """Predicts `config.split`, computes metrics, writes the report files; returns the metrics."""
  config.validate()
  members, info, records_dir, folds, sames = _inputs(config)
  classes, fold = members[0].classes, folds[0]
  out, columns = _check_outputs(config, classes)
  if config.calibrate in ("temperature", "platt"):
    _fit_calibration(config, members, info, folds, sames)

  # Predictions (each member at its own image size), the threshold and the metrics.
  cache = {}

  def run(split):
    if split not in cache:
      cache[split] = predict(split)
    return cache[split]

  def predict(split):
    preds = [ensemble.predict_member(m, info, split, f if split in ("train", "valid") else None,
                                     config.batch_size, config.tta)
             for m, f in zip(members, folds)]
    ensemble.check_aligned([p[2] for p in preds], [m.model_dir for m in members])
    raw = [p[0] for p in preds]
    member_probs = [m.calibrated(p) for m, p in zip(members, raw)]
    return (ensemble.combine(member_probs, config.ensemble), preds[0][1], preds[0][2],
            member_probs, raw)

  probs, labels, names, member_probs, raw = run(config.split)
  threshold, source = _threshold(config, members[0].cfg, run, fold, classes, members)
  split_fold = fold if config.split in ("train", "valid") else None
  groups = pipeline.patient_ids(info, config.split, split_fold, names) if config.bootstrap else None
  m = metrics.compute_metrics(probs, labels, classes, threshold, groups=groups,
                              bootstrap=config.bootstrap)
  m.update(ensemble.calibration_summary(members, probs, raw, labels, config.ensemble))
  if len(classes) == 2:
    _validation_operating_points(config, m, run, members, info, folds, sames, probs, labels)
  if len(members) > 1:
    m["ensemble"] = {"method": config.ensemble, "members": [x.model_dir for x in members]}
    m["members"] = ensemble.member_rows(members, [dict(
        metrics.compute_metrics(p, labels, classes, threshold, bootstrap=0),
        **calibration.calibration_metrics(p, labels)) for p in member_probs])
  _annotate(config, m, members, info, records_dir, sames, split_fold, source, out)
  m["metadata"] = _metadata_used(members)
  if len(members) == 1 and not members[0].metadata:
    m["galleries"] = _galleries(out, members[0].model, info, config.split, split_fold,
                                members[0].cfg, m, probs, labels, names)
  _write_outputs(out, m, probs, labels, names)
  if config.isic_truth_csv:
    submission.write_isic_truth(config.isic_truth_csv, names, labels, columns)
    m["files"]["isic_truth_csv"] = str(config.isic_truth_csv)
  for text in m["warnings"] + ([m["warning"]] if m["collapsed"] else []):
    bar = "!" * 100
    print(f"{bar}\nWARNING: {text}\n{bar}", file=sys.stderr, flush=True)
  return m


def _metadata_used(members) -> dict:
  """Which metadata columns each member's model took (read from the records' values, encoded with
  the member's own MODEL_DIR/metadata.json), for the report."""
  return {x.model_dir: list(x.metadata.names) if x.metadata else [] for x in members}


def _metadata_note(m: dict) -> str | None:
  used = m.get("metadata")
  if not used or not any(used.values()):  # image-only reports stay as they were
    return None

  def one(cols):
    return ("metadata " + ", ".join(cols) + " (from the records, encoded with MODEL_DIR/"
            "metadata.json)") if cols else "image only"
  if len(used) == 1:
    cols = next(iter(used.values()))
    return "inputs: " + one(cols) + ("; no Grad-CAM galleries for a model with metadata"
                                     if cols else "")
  return "inputs per member:" + "".join(f"\n  {d}: {one(c)}" for d, c in used.items())


def _validation_operating_points(config, m, run, members, info, folds, sames, probs,
                                 labels) -> None:
  """The operating points with thresholds chosen on the validation split and applied to the split
  evaluated; the split's own (optimistic) choice only where no validation split can be used."""
  why = None
  if config.split == "valid":
    why = "the split evaluated"
  elif "valid" not in info.shards and folds[0] is None:
    why = "there is no validation split"
  elif config.ensemble == "rank" and len(members) > 1:
    why = "rank scores are relative to the split they rank"
  else:
    try:
      ensemble.check_leakage(members, config.split, True, folds, sames)
      for x, f, same in zip(members, folds, sames):
        _check_leakage(dataclasses.replace(config, model_dir=x.model_dir), x.cfg, info, f, True,
                       same)
    except ValueError:
      why = "no validation split is free of every member's training data"
  if why:
    m["operating_points_source"] = (f"thresholds chosen on the {config.split} split itself, as "
                                    f"{why}: OPTIMISTIC for it")
    return
  valid_probs, valid_labels = run("valid")[:2]
  m["operating_points_chosen_on_split"] = m["operating_points"]
  m["operating_points"] = metrics.transferred_operating_points(valid_probs, valid_labels, probs,
                                                               labels)
  m["operating_points_source"] = (f"thresholds chosen on {len(valid_labels)} validation "
                                  f"predictions, rates measured on {config.split}")


def _annotate(config, m, members, info, records_dir, sames, split_fold, source, out) -> None:
  """Where the numbers come from: records, split, threshold, optimism, preprocessing; `sames`
  says per member whether these are its training records."""
  warnings = [w for x in members for w in _preprocessing_warnings(x.cfg, info)]
  warnings += (m.get("calibration") or {}).get("warnings", [])
  same, others = all(sames), [x.model_dir for x, s in zip(members, sames) if not s]
  if others:
    # The splits of two conversions are independent: another seed put half of one's test images
    # in the other's training split (trial run), and nothing here can see that.
    warnings.append(f"{records_dir} are not the training records of {', '.join(others)}: its "
                    "split here may hold images (or patients) those runs trained on; make sure "
                    "the two record sets share none, or evaluate on their own records")
  chosen = bool(source) and not source.startswith("fixed")
  if config.split == "valid" and same:
    m["optimistic"] = ("this validation split chose the saved epoch" +
                       (" and the threshold" if chosen else "") +
                       ": its scores are optimistic; report the test split")
    if chosen:
      source += ", the split evaluated here (optimistic)"
  if config.split == "train" and same:
    m["optimistic"] = ("the model was trained on these images: its scores here measure fit, not "
                       "accuracy on new lesions; report the test split")
  m.update(model_dir=str(config.model_dir), records_dir=str(records_dir),
           training_records=same, split=config.split, fold=split_fold, tta=config.tta,
           threshold_source=source, output_dir=str(out), warnings=list(dict.fromkeys(warnings)))


def _write_outputs(out: str, m: dict, probs, labels, names) -> None:
  classes = m["classes"]
  binary = len(classes) == 2
  predicted = (probs >= m["threshold"]).astype(int) if binary else probs.argmax(axis=1)
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(["image_name", "label", "probability", "predicted"] +
             ([] if binary else [f"p_{c}" for c in classes]))
  for i, name in enumerate(names):
    p = probs[i] if binary else probs[i, predicted[i]]  # multi-class: P(predicted class)
    w.writerow([name, classes[labels[i]], f"{p:.8g}", classes[predicted[i]]] +
               ([] if binary else [f"{q:.8g}" for q in probs[i]]))
  fileio.write_text_atomic(fileio.join(out, "predictions.csv"), buf.getvalue())
  m["files"] = {name: str(fileio.join(out, name)) for name in (
      "metrics.json", "report.txt", "predictions.csv", "confusion_matrix.png", "roc.png", "pr.png",
      *(["calibration.png"] if m.get("reliability") else []), *m.get("galleries", {}))}
  plots.plot_confusion(fileio.join(out, "confusion_matrix.png"), m)
  plots.plot_curves(fileio.join(out, "roc.png"), fileio.join(out, "pr.png"), probs, labels, m)
  if m.get("reliability"):
    plots.plot_reliability(fileio.join(out, "calibration.png"), m["reliability"], m)
  fileio.write_text_atomic(fileio.join(out, "report.txt"), report_text(m) + "\n")
  fileio.write_text_atomic(fileio.join(out, "metrics.json"), json.dumps(m, indent=2) + "\n")


def report_text(m: dict) -> str:
  """The metrics report plus what a reviewer must know about where the numbers come from."""
  notes = []
  if "training_records" in m:
    whose = ("the model's training records" if m["training_records"] else
             "NOT the records the model was trained on")
    fold = f" fold {m['fold']}" if m.get("fold") is not None else ""
    notes.append(f"records: {m['records_dir']} ({whose}), split {m['split']}{fold}")
  if _metadata_note(m):
    notes.append(_metadata_note(m))
  if m.get("threshold_source"):
    notes.append(f"threshold: {m['threshold_source']}")
  if m.get("operating_points_source"):
    notes.append(f"operating points: {m['operating_points_source']}")
  if m.get("ece") is not None:
    notes.append(f"calibration: ECE {m['ece']:.4f} ({m['ece_bins']} bins, top label), Brier "
                 f"{m['brier']:.4f}, NLL {m['nll']:.4f}" +
                 (f"; {m['calibration']['note']}" if (m.get("calibration") or {}).get("note")
                  else ""))
    if m.get("uncalibrated"):
      u = m["uncalibrated"]
      notes.append(f"  without calibration: ECE {u['ece']:.4f}, Brier {u['brier']:.4f}, NLL "
                   f"{u['nll']:.4f}")
  if m.get("members"):
    notes.append("members and ensemble on the same split and threshold:\n" +
                 ensemble.format_side_by_side(m))
  notes += [f"OPTIMISTIC: {m['optimistic']}"] if m.get("optimistic") else []
  notes += [f"WARNING: {w}" for w in m.get("warnings", [])]
  return metrics.format_report(m) + "".join("\n" + n for n in [""] * bool(notes) + notes)
