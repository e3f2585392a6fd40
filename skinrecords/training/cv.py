"""K-fold cross-validation: one run directory per fold, then out-of-fold predictions and metrics.

`run_cv` trains fold 0 ... K-1 of a records folder one after another into MODEL_DIR/fold_k (each a
normal run directory, `train.train` with fold=k), then has each fold's best model (model.keras)
predict the fold it did not train on. Every labelled training example is thus predicted exactly
once, by the one model that never saw it: MODEL_DIR/oof.csv. MODEL_DIR/cv_metrics.json holds the
per-fold metrics, their mean ± std (`metrics.summarize_folds`) and the pooled out-of-fold metrics
with patient-level bootstrap CIs; cv_roc.png every fold's ROC and the pooled one (rundir owns the
layout).

Resuming: a fold whose summary.json says it holds all requested epochs is skipped (after the same
settings check a resumed run gets); any other fold goes through `train.train`, which resumes from
the fold's own backup. A killed CV run restarted with the same command therefore continues at the
unfinished fold. The out-of-fold files are recomputed at the end of every run (seconds: one forward
pass over the training split) rather than cached, so they always match the fold models.

Folds are the records' own: `make_records --folds=K` (fold per train shard), or for a folder of
SIIM-ISIC Kaggle files K = min(5, train files) over the file indices (kaggle.folds_of).

Multi-worker: one strategy for all folds (a new cluster per fold would need new processes: a
MultiWorkerMirroredStrategy must exist before any other TF op). Every worker trains every fold; only
the chief predicts and writes the CV files, while the others wait at a barrier so that none leaves
the cluster while the chief still belongs to it.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import io
import logging
from typing import Callable

import numpy as np

from skinrecords.core import fileio
from skinrecords.core import manifest
from skinrecords.core import rundir
from skinrecords.core import tflog
from skinrecords.evaluation import metrics
from skinrecords.evaluation import plots
from skinrecords.evaluation import thresholds
from skinrecords.input import metadata_input as input_metadata
from skinrecords.input import pipeline
from skinrecords.model import inference
from skinrecords.model import models
from skinrecords.training import distribute
from skinrecords.training import train

CV_ROC_FILE = "cv_roc.png"
_CV_FILES = (rundir.OOF_FILE, rundir.CV_METRICS_FILE, CV_ROC_FILE, rundir.THRESHOLD_FILE)


def fold_ids(info: manifest.DatasetInfo) -> list[int]:
  """The folds of a records folder's training split; ValueError (one line) when under two."""
  folds = sorted({s.fold for s in info.shards.get("train", ()) if s.fold >= 0})
  if len(folds) < 2:
    found = f"only fold {folds[0]}" if folds else "no folds"
    raise ValueError(f"{info.records_dir} has {found}; fold=all needs records converted with "
                     "make_records --folds=K (K >= 2), or SIIM-ISIC Kaggle files (>= 2 train "
                     "files)")
  return folds


def cv_config(config: train.TrainConfig) -> train.TrainConfig:
  """The CV's settings with select_by=auto resolved to "last": a fold whose own validation images
  (its out-of-fold images) chose its epoch makes the pooled out-of-fold AUC optimistic by
  construction (with early stopping, more so); the last epoch of the schedule was chosen by no
  split. A validation rule is still allowed on request, and the estimate is then flagged."""
  if config.select_by != "auto":
    return config
  return dataclasses.replace(config, select_by="last")


def estimate_note(select_by: str) -> tuple[bool, str]:
  """(honest, what the out-of-fold estimate is) for the folds' selection rule."""
  if select_by == "last":
    return True, ("each fold model is its last epoch (select_by=last): no out-of-fold image "
                  "chose it, so the pooled out-of-fold metrics are an honest estimate")
  return False, (f"OPTIMISTIC: each fold's epoch was chosen by select_by={select_by} on the very "
                 "images it then predicts out of fold; train with --select_by=last (the "
                 "default for --fold=all) for an honest estimate")


def fold_config(config: train.TrainConfig, fold: int) -> train.TrainConfig:
  """The config of fold `fold`'s run: the CV's settings, its own folder, that fold held out."""
  return dataclasses.replace(config, model_dir=rundir.fold_dir(config.model_dir, fold), fold=fold)


def _finished(config: train.TrainConfig, info: manifest.DatasetInfo) -> dict | None:
  """The fold's summary.json when it already holds exactly `config.epochs` epochs, else None.

  Raises rundir.RunDirError when the folder holds a run with other settings (as a resume would).
  """
  d = config.model_dir
  summary = rundir.read_summary(d)
  if summary is None or not fileio.isfile(fileio.join(d, rundir.MODEL_FILE)):
    return None  # not started, killed before its first epoch, or a save cut short
  # What rundir.check_resumable compares (train._run_config sets the rest: the resolved precision
  # and XLA mode, unknown here, are left out and so not compared).
  rundir.check_resumable(d, rundir.RunConfig(
      classes=list(info.classes), image_size=config.model.image_size,
      records_dir=str(config.records_dir), records_fingerprint=info.fingerprint, fold=config.fold,
      model={"backbone": config.model.backbone, "num_classes": info.num_classes},
      train=train.resolved(config).to_dict(),
      metadata=list(input_metadata.select(info, config.metadata, config.fold).names)))
  return summary if summary.get("epochs_done") == config.epochs else None


def train_folds(config: train.TrainConfig, strategy, info: manifest.DatasetInfo,
                echo: Callable[[str], None]) -> list[dict]:
  """Trains (or skips, when finished) every fold in turn; returns each fold's summary."""
  folds, chief = fold_ids(info), distribute.is_chief(strategy)
  summaries = []
  for fold in folds:
    cfg = fold_config(config, fold)
    summary = None if config.overwrite else _finished(cfg, info)
    if summary is None:
      summary = train.train(cfg, strategy)
      gc.collect()  # the finished fold's model and optimizers, before the next fold builds its own
      how = f"trained {summary['epochs_this_run']} epoch(s)"
    else:
      how = "already finished, skipped"
    summaries.append(summary)
    if chief:
      auc = (summary.get("best_metrics") or {}).get("val_auc")
      echo(f"fold {fold} ({len(summaries)}/{len(folds)}): validation AUC "
           f"{'undefined' if auc is None else f'{auc:.4f}'} at epoch {summary.get('best_epoch')} "
           f"of {summary.get('epochs_done')} ({how}) -> {cfg.model_dir}")
  return summaries


def predict_fold(info: manifest.DatasetInfo, model_dir: str, fold: int, batch_size: int,
                 tta: int = 0) -> dict:
  """Fold `fold`'s model on the fold it held out: probs ([N] or [N, K]), labels, names, groups."""
  model, cfg = models.load_model_dir(model_dir)
  probs, labels, names = inference.predict_split(model, info, "valid", image_size=cfg.image_size,
                                                 batch_size=batch_size, tta=tta, fold=fold,
                                                 metadata=inference.run_metadata(model, model_dir),
                                                 model_dir=model_dir)
  groups = pipeline.patient_ids(info, "valid", fold, names)
  return {"fold": fold, "probs": probs, "labels": labels, "names": names,
          "groups": groups or [""] * len(names)}


def _pooled(predictions: list[dict]) -> tuple[np.ndarray, np.ndarray, list[str]]:
  probs = np.concatenate([p["probs"] for p in predictions])
  labels = np.concatenate([p["labels"] for p in predictions])
  groups = [g for p in predictions for g in p["groups"]]
  return probs, labels, groups


def oof_csv(predictions: list[dict], classes: list[str]) -> str:
  """oof.csv: image_name, patient_id, fold, target (class id), p_<class> for every class."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["image_name", "patient_id", "fold", "target"] + [f"p_{c}" for c in classes])
  for p in predictions:
    probs = p["probs"]
    if probs.ndim == 1:  # one logit: P(class 1); the file spells out both classes
      probs = np.stack([1.0 - probs, probs], axis=1)
    for name, group, label, row in zip(p["names"], p["groups"], p["labels"], probs):
      w.writerow([name, group, p["fold"], int(label)] + [f"{q:.8g}" for q in row])
  return buf.getvalue()


def cv_metrics(predictions: list[dict], classes: list[str], bootstrap: int = 1000) -> dict:
  """Per-fold metrics, their mean ± std over folds, and the pooled out-of-fold metrics with 95 %
  CIs from a patient-level bootstrap (image-level when the records carry no patient ids)."""
  per_fold = [metrics.compute_metrics(p["probs"], p["labels"], classes, bootstrap=0)
              for p in predictions]
  spread = metrics.summarize_folds(per_fold)
  probs, labels, groups = _pooled(predictions)
  has_groups = any(groups)
  pooled = metrics.compute_metrics(probs, labels, classes, groups=groups if has_groups else None,
                                   bootstrap=bootstrap)
  auc = spread.get("roc_auc", {})
  return {
      "classes": list(classes),
      "folds": [{"fold": p["fold"], "roc_auc": m["roc_auc"], "pr_auc": m["pr_auc"],
                 "num_examples": m["n"]} for p, m in zip(predictions, per_fold)],
      "mean_roc_auc": auc.get("mean"), "std_roc_auc": auc.get("std"),
      "oof_roc_auc": pooled["roc_auc"], "oof_roc_auc_ci": pooled.get("roc_auc_ci"),
      "oof_pr_auc": pooled["pr_auc"], "oof_pr_auc_ci": pooled.get("pr_auc_ci"),
      "num_examples": int(len(labels)),
      "bootstrap": {"resamples": bootstrap, "unit": "patient" if has_groups else "image"},
      "fold_summary": spread, "oof": pooled,
  }


def format_cv(m: dict) -> str:
  """The console summary: per-fold AUCs, mean ± std, pooled AUC with its CI."""
  def num(x):
    return "undefined" if x is None else f"{x:.4f}"
  lines = [f"cross-validation over {len(m['folds'])} folds, {m['num_examples']} examples:"]
  lines += [f"  fold {f['fold']}: ROC AUC {num(f['roc_auc'])}  ({f['num_examples']} examples)"
            for f in m["folds"]]
  std = "" if m["std_roc_auc"] is None else f" ± {m['std_roc_auc']:.4f}"
  lines.append(f"  mean ROC AUC over folds {num(m['mean_roc_auc'])}{std}")
  ci = m.get("oof_roc_auc_ci")
  ci_text = (f"  (95 % CI {ci[0]:.4f}-{ci[1]:.4f}, {m['bootstrap']['unit']}-level bootstrap)"
             if ci and None not in ci[:2] else "")
  lines.append(f"  pooled out-of-fold ROC AUC {num(m['oof_roc_auc'])}{ci_text}")
  if m.get("estimate"):
    lines.append(f"  {m['estimate']}")
  if m.get("threshold"):
    lines.append(f"  ensemble threshold {m['threshold']['value']:.4g}: {m['threshold']['source']}"
                 f" ({rundir.THRESHOLD_FILE})")
  return "\n".join(lines)


def write_outputs(model_dir, predictions: list[dict], classes: list[str],
                  bootstrap: int = 1000, tta: int = 0, select_by: str = "last",
                  threshold_rule: str = thresholds.DEFAULT_RULE) -> dict:
  """oof.csv, cv_metrics.json, cv_roc.png and threshold.json in `model_dir`, each atomically."""
  m = cv_metrics(predictions, classes, bootstrap)
  m["oof_tta"] = tta
  m["honest"], m["estimate"] = estimate_note(select_by)
  m["select_by"] = select_by
  if len(classes) == 2:
    m["threshold"] = _oof_threshold(model_dir, predictions, threshold_rule)
  fileio.write_text_atomic(fileio.join(model_dir, rundir.OOF_FILE), oof_csv(predictions, classes))
  probs, labels, _ = _pooled(predictions)
  plots.cv_roc(fileio.join(model_dir, CV_ROC_FILE),
               [(p["fold"], p["probs"], p["labels"]) for p in predictions], probs, labels, classes)
  m["files"] = {name: fileio.join(model_dir, name) for name in _CV_FILES
                if name != rundir.THRESHOLD_FILE or len(classes) == 2}
  rundir.write_cv_metrics(model_dir, m)
  return m


def _oof_threshold(model_dir, predictions: list[dict], rule: str) -> dict:
  """threshold.json for the fold models' ensemble: chosen on the pooled out-of-fold predictions,
  the only labelled predictions of these models that no test image is part of. The ensemble's
  mean is smoother than any one fold's scores, so it is an estimate, flagged as such."""
  probs, labels, _ = _pooled(predictions)
  value, source = thresholds.choose(rule, probs, labels)
  stored = rundir.StoredThreshold(
      value, rule, source.replace("validation predictions", "out-of-fold predictions of the fold "
                                  "models (each fold's own model; applied to their ensemble)"),
      "oof", int(len(labels)))
  rundir.write_threshold(model_dir, stored)
  return dataclasses.asdict(stored)


def run_cv(config: train.TrainConfig, strategy=None, **kwargs) -> dict:
  """Trains every fold of `config.records_dir` into config.model_dir/fold_k, then writes the
  out-of-fold files there (chief only). Returns cv_metrics.json's dict ({"chief": False} on the
  other workers). `config.fold` is ignored; `config.overwrite` retrains every fold afresh.
  Keyword arguments: oof_batch_size (default: config.batch_size), oof_tta (0), bootstrap (1000),
  echo (called with one line per fold; default: logging.info).

  Raises ValueError (records without folds, bad tta), and what `train.train` raises.
  """
  with tflog.expected_retracing():
    return _run_cv(config, strategy, **kwargs)


def _run_cv(config: train.TrainConfig, strategy=None, *, oof_batch_size: int | None = None,
           oof_tta: int = 0, bootstrap: int = 1000,
           echo: Callable[[str], None] = logging.info) -> dict:
  inference.check_tta(oof_tta, "oof_tta")
  config = cv_config(config)
  config.validate()
  info = pipeline.load_info(config.records_dir)
  fold_ids(info)  # before anything long
  strategy = strategy or distribute.make_strategy(config.strategy)
  chief = distribute.is_chief(strategy)
  if chief:
    rundir.check_writable(config.model_dir)
    if rundir.holds_single_run(config.model_dir):
      raise rundir.RunDirError(f"{config.model_dir} holds a single run ({rundir.MODEL_FILE}); "
                               "cross-validate into another --model_dir")
    if config.overwrite:
      for name in _CV_FILES:  # stale CV files must not outlive the folds they describe
        fileio.remove(fileio.join(config.model_dir, name))
  train_folds(config, strategy, info, echo)
  result = {"chief": chief}
  error = None
  if chief:
    try:
      predictions = [predict_fold(info, rundir.fold_dir(config.model_dir, k), k,
                                  oof_batch_size or config.batch_size, oof_tta)
                     for k in fold_ids(info)]
      result.update(write_outputs(config.model_dir, predictions, list(info.classes), bootstrap,
                                  oof_tta, config.select_by, config.threshold_rule), chief=True)
    except Exception as err:  # pylint: disable=broad-except  (re-raised after the barrier)
      error = err
  if distribute.num_workers(strategy) > 1:
    distribute.same_on_all_workers(strategy, 0)  # the other workers wait for the chief's files
  if error is not None:
    raise error
  return result
