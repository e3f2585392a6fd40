"""Ensembles of trained runs: which runs, how their probabilities combine, and what they may be
scored on.

`--model_dir` names one run, a cross-validation folder (`train --fold=all`: every fold_k), or a
comma-separated list of either; all members must have the same classes in the same order. Members
may differ in backbone and image size: each decodes the records at its own size (the records hold
one stored size; `pipeline.decode_image` resizes as in training).

Combining (`combine`):
- mean: the mean of the members' probabilities (after each member's own calibration, if any).
- rank: each member's scores are replaced by their rank among the N predictions, scaled to (0, 1]
  (ties share the mean rank), then averaged — the SIIM-ISIC 2020 winners' rank average, for
  members whose scores are on different scales. Multi-class: each class column is ranked on its
  own, averaged, then each row is divided by its sum so the scores lie in [0, 1] and sum to 1
  (argmax = the class this image ranks highest in, relative to the other images). Rank scores are
  relative to the set they rank: they are not probabilities (no ECE/Brier for them), and a
  threshold chosen on one split does not carry to another.

Leakage, for an ensemble of runs trained on the evaluated records: the members' train/valid splits
are only honest for members that held out the same fold. CV fold members each trained on the
others' held-out folds, so their ensemble is scored on the test split only (its honest
out-of-fold estimate is CV_DIR/oof.csv), and a Youden threshold needs a validation split no member
trained on — there is none for them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from skinrecords.core import fileio
from skinrecords.core import rundir
from skinrecords.evaluation import calibration
from skinrecords.evaluation import thresholds
from skinrecords.model import inference
from skinrecords.model import models

METHODS = ("mean", "rank")


@dataclasses.dataclass
class Member:
  """One run of an ensemble: its directory, model, config.json and calibration.json (or None)."""
  model_dir: str
  model: object
  cfg: rundir.RunConfig
  calibration: dict | None = None
  # The run's metadata.json (None: image only): each member encodes the records' metadata with
  # the statistics it was trained with, so members with and without metadata sit side by side.
  metadata: object = None

  @property
  def classes(self) -> list[str]:
    return [str(c) for c in self.cfg.classes]

  @property
  def image_size(self) -> int:
    return int(self.cfg.image_size)

  @property
  def backbone(self) -> str | None:
    return self.cfg.model.get("backbone")

  def calibrated(self, probs) -> np.ndarray:
    return calibration.apply(self.calibration, probs)


def _expand(entry: str) -> list[str]:
  """One --model_dir entry: a run, or a finished CV folder's folds (refusing an unfinished one)."""
  if not rundir.holds_cv_run(entry):
    return [entry]  # a run, or a missing folder that load_model_dir reports
  if rundir.holds_single_run(entry):
    raise ValueError(f"{entry} holds both a cross-validation run (fold_k/) and a single run "
                     f"({rundir.MODEL_FILE} or {rundir.CONFIG_FILE} at its top); which one to "
                     "use is ambiguous: move one of them to its own folder")
  folds = rundir.cv_fold_dirs(entry)
  finished = {d for d in folds if rundir.run_finished(d)}
  unfinished = [fileio.basename(d) for d in rundir.cv_fold_dirs(entry, finished=False)
                if d not in finished]
  done = ",".join(d for d in folds if d in finished) or "(none)"
  if unfinished or not fileio.exists(fileio.join(entry, rundir.CV_METRICS_FILE)):
    # cv_metrics.json is written after the last fold: without it a fold may not exist at all yet.
    what = (f"whose {', '.join(unfinished)} did not train all its epochs" if unfinished else
            f"that has not finished (no {rundir.CV_METRICS_FILE}, written after the last fold)")
    raise ValueError(f"{entry} is a cross-validation run {what}; finish it (rerun the same train "
                     f"--fold=all command), or pass finished runs: --model_dir={done}")
  return folds


def member_dirs(model_dir: str) -> list[str]:
  """The run directories `model_dir` names (see the module docstring), in order, no repeats."""
  entries = [e.strip() for e in str(model_dir).split(",") if e.strip()]
  if not entries:
    raise ValueError("model_dir is empty; pass a run directory, a CV folder or a comma list")
  dirs = [d for e in entries for d in _expand(e)]
  resolved = [fileio.canonical(d) for d in dirs]
  repeats = sorted({d for d, r in zip(dirs, resolved) if resolved.count(r) > 1})
  if repeats:
    raise ValueError(f"model_dir names {repeats} more than once; each member counts once")
  return dirs


def _stored_calibration(model_dir: str) -> dict | None:
  """calibration.json, refused when model.keras changed since it was fitted (a resumed or
  retrained run would otherwise get the old model's temperature, silently)."""
  cal = rundir.read_calibration(model_dir)
  if cal and cal.get("model_sha256") and cal["model_sha256"] != fileio.sha256_file(
      fileio.join(model_dir, rundir.MODEL_FILE)):
    raise ValueError(f"{model_dir}/{rundir.CALIBRATION_FILE} was fitted for an earlier "
                     f"{rundir.MODEL_FILE} (retrained since); refit with --calibrate=temperature, "
                     "or ignore it with --calibrate=none")
  return cal


def load_members(model_dir: str, use_stored_calibration: bool = True) -> list[Member]:
  """Loads every member; ValueError when their classes differ."""
  members = []
  for d in member_dirs(model_dir):
    model, cfg = models.load_model_dir(d)
    members.append(Member(d, model, cfg, _stored_calibration(d) if use_stored_calibration
                          else None, inference.run_metadata(model, d)))
  first = members[0]
  for m in members[1:]:
    if m.classes != first.classes:
      raise ValueError(f"ensemble members disagree on classes: {first.model_dir} has "
                       f"{first.classes}, {m.model_dir} has {m.classes}; combine runs trained "
                       "on the same classes in the same order")
  return members


def stored_threshold(model_dir: str, members) -> tuple[float, str, bool]:
  """(threshold on the probabilities the members report, where it came from, whether it is the
  0.5 fallback): MODEL_DIR's threshold.json, chosen on validation (a run) or on the out-of-fold
  predictions (a CV folder), mapped through the member's calibration when there is one."""
  single, cal = len(members) == 1, members[0].calibration
  where = members[0].model_dir if single else model_dir
  stored = (rundir.read_threshold(where) if single or (
      "," not in str(model_dir) and rundir.holds_cv_run(model_dir)) else None)
  if stored and single and stored.model_sha256 and stored.model_sha256 != fileio.sha256_file(
      fileio.join(where, rundir.MODEL_FILE)):
    stored = None  # a model.keras retrained since (e.g. by hand): the threshold is not its own
  if stored is None or stored.split == "none":
    why = (stored.source if stored else
           f"{where} has no {rundir.THRESHOLD_FILE} chosen without test data" +
           ("" if single else " (a list of runs has no shared validation split)"))
    return (thresholds.FALLBACK, f"fixed {thresholds.FALLBACK} by default ({why}); pass "
            "--threshold to choose one", True)
  if stored.split == "fixed":  # --threshold_rule=fixed:T: chosen by no split
    return (calibration.map_threshold(cal, stored.value) if single else stored.value,
            f"fixed {stored.value:g} ({stored.source}, "
            f"{fileio.join(where, rundir.THRESHOLD_FILE)})",
            False)
  if single and cal:
    return (calibration.map_threshold(cal, stored.value),
            f"{stored.value:.4g} before calibration ({stored.describe(where)}), mapped through "
            f"the {cal['method']} calibration", False)
  if cal or any(m.calibration for m in members):
    return stored.value, (stored.describe(where) + "; chosen on uncalibrated out-of-fold "
                          "predictions, applied to calibrated members"), False
  return stored.value, stored.describe(where), False


def default_output_dir(model_dir: str, split: str) -> str:
  """MODEL_DIR/eval_<split> for one run or one CV folder; a list of runs must name a folder."""
  entries = [e.strip() for e in str(model_dir).split(",") if e.strip()]
  if len(entries) > 1:
    raise ValueError("an ensemble of several model_dir entries has no folder of its own; pass "
                     "output_dir")
  return fileio.join(entries[0], f"eval_{split}")


def _rank01(scores: np.ndarray) -> np.ndarray:
  """Ranks 1..N (ties: their mean rank) divided by N, along axis 0."""
  from scipy import stats  # pylint: disable=g-import-not-at-top  (scipy comes with scikit-learn)
  return stats.rankdata(scores, axis=0) / max(len(scores), 1)


def combine(member_probs: list[np.ndarray], method: str = "mean") -> np.ndarray:
  """The ensemble's scores from each member's [N] or [N, K] probabilities (module docstring)."""
  if method not in METHODS:
    raise ValueError(f"ensemble={method!r}: expected one of {', '.join(METHODS)}")
  if len(member_probs) == 1:
    return member_probs[0]
  stacked = np.stack([np.asarray(p, np.float64) for p in member_probs])
  if method == "mean":
    return stacked.mean(axis=0)
  ranked = np.stack([_rank01(p) for p in stacked]).mean(axis=0)
  return ranked if ranked.ndim == 1 else ranked / ranked.sum(axis=1, keepdims=True)


def check_leakage(members: list[Member], split: str, youden: bool, folds: list,
                  same_records: list[bool]) -> None:
  """The ensemble-level refusals (each member's own checks run as for one model)."""
  if len(members) < 2:
    return
  trained_here = [m for m, same in zip(members, same_records) if same]
  differ = len({f for f, same in zip(folds, same_records) if same}) > 1
  if trained_here and differ and split in ("train", "valid"):
    raise ValueError(f"split={split}: these members hold out different folds "
                     f"({sorted(set(map(str, folds)))}), so each would be scored on examples "
                     "other members trained on; evaluate split=test (the out-of-fold estimate of "
                     "a CV run is in its oof.csv)")
  if youden and trained_here and differ:
    raise ValueError("threshold=youden for an ensemble needs a validation split that no member "
                     f"trained on, and these members hold out different folds "
                     f"({sorted(set(map(str, folds)))}); use a fixed threshold (e.g. 0.5), or "
                     "choose one on the CV run's oof.csv")


def predict_member(member: Member, info, split: str, fold, batch_size: int, tta: int):
  """(probabilities before calibration, labels, names) of one member on one split, decoded at the
  member's own image size."""
  return inference.predict_split(member.model, info, split, image_size=member.image_size,
                                 batch_size=batch_size, tta=tta, fold=fold,
                                 metadata=member.metadata, model_dir=member.model_dir)


def check_aligned(names_per_member: list[list[str]], dirs: list[str]) -> None:
  for names, d in zip(names_per_member[1:], dirs[1:]):
    if names != names_per_member[0]:
      raise ValueError(f"{d} predicted the images in a different order from {dirs[0]}; this is a "
                       "bug (the evaluation pipeline reads in file order): please report it")


def fit_temperature(member: Member, probs, labels, where: dict) -> dict:
  """Fits T on the member's validation predictions; writes calibration.json; returns it."""
  t = calibration.fit_temperature(probs, labels)
  warning = None
  if min(abs(t - b) / b for b in calibration.T_RANGE) < 1e-3:
    # A temperature at the end of its range is no estimate: stored, 0.05 on one CV fold made the
    # ensemble's ECE 0.06 -> 0.25 and flipped predictions (trial run); leave the member as it is.
    warning = (f"the temperature stopped at the end of its search range {calibration.T_RANGE} "
               f"(T = {t:.3g}): the validation split cannot pin it down (too few images, or the "
               "model barely separates them); left uncalibrated (T = 1)")
    t = 1.0
  cal = {"method": "temperature", "temperature": t, "fitted_on": dict(where, n=len(labels)),
         "model_sha256": fileio.sha256_file(fileio.join(member.model_dir, rundir.MODEL_FILE)),
         "nll_before": calibration.nll(probs, labels),
         "nll_after": calibration.nll(calibration.apply_temperature(probs, t), labels)}
  if warning:
    cal["warning"] = warning
  rundir.write_calibration(member.model_dir, cal)
  member.calibration = cal
  return cal


def fit_platt(member: Member, probs, labels, where: dict) -> dict:
  """Fits Platt scaling (slope, intercept) on the member's validation predictions; writes
  calibration.json; returns it."""
  a, b = calibration.fit_platt(probs, labels)
  cal = {"method": "platt", "slope": a, "intercept": b, "fitted_on": dict(where, n=len(labels)),
         "model_sha256": fileio.sha256_file(fileio.join(member.model_dir, rundir.MODEL_FILE)),
         "nll_before": calibration.nll(probs, labels),
         "nll_after": calibration.nll(calibration.apply_platt(probs, a, b), labels),
         "ece_before": calibration.expected_calibration_error(probs, labels),
         "ece_after": calibration.expected_calibration_error(
             calibration.apply_platt(probs, a, b), labels)}
  rundir.write_calibration(member.model_dir, cal)
  member.calibration = cal
  return cal


def _describe(cal: dict | None) -> str | None:
  if not cal:
    return None
  if cal.get("method") == "platt":
    return f"Platt slope {cal['slope']:.3f} intercept {cal['intercept']:+.3f}"
  return f"temperature {cal['temperature']:.3f}"


def calibration_summary(members: list[Member], probs, raw, labels, method: str) -> dict:
  """ece/brier/nll of what is reported, the temperatures used, and the scores without them."""
  temps = [(m.calibration or {}).get("temperature") for m in members]
  methods = sorted({m.calibration["method"] for m in members if m.calibration})
  out = {"calibration": {"method": "+".join(methods) or None,
                         "temperatures": dict(zip([m.model_dir for m in members], temps)),
                         "platt": {m.model_dir: [m.calibration["slope"], m.calibration["intercept"]]
                                   for m in members if (m.calibration or {}).get("method") ==
                                   "platt"}}}
  if methods:
    out["calibration"]["note"] = (", ".join(d for d in map(_describe, (
        m.calibration for m in members)) if d) + " (fitted on the validation split)")
    out["calibration"]["warnings"] = [f"{m.model_dir}: {m.calibration['warning']}"
                                      for m in members if (m.calibration or {}).get("warning")]
  if method == "rank" and len(members) > 1:
    out.update(ece=None, brier=None, nll=None)
    out["calibration"]["note"] = "rank-ensemble scores are not probabilities: no ECE/Brier"
    return out
  out.update(calibration.calibration_metrics(probs, labels))
  out["reliability"] = calibration.reliability_bins(probs, labels)
  if methods:
    out["uncalibrated"] = calibration.calibration_metrics(
        combine(raw, method), labels)
  return out


def member_rows(members: list[Member], member_metrics: list[dict]) -> list[dict]:
  """metrics.json's `members`: each member's own scores on the same split and threshold."""
  keys = ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "auc_sens_80", "ece",
          "brier", "nll")
  return [dict({"model_dir": m.model_dir, "backbone": m.backbone, "image_size": m.image_size,
                "temperature": (m.calibration or {}).get("temperature")},
               **{k: mm.get(k) for k in keys}) for m, mm in zip(members, member_metrics)]


def format_side_by_side(m: dict) -> str:
  """The members and the ensemble, one row each."""
  cols = [("ROC AUC", "roc_auc"), ("PR AUC", "pr_auc"), ("accuracy", "accuracy"),
          ("ECE", "ece"), ("Brier", "brier")]
  rows = [(f"{r['model_dir']} ({r['backbone']}, {r['image_size']} px)", r) for r in m["members"]]
  rows.append((f"ensemble ({m['ensemble']['method']} of {len(m['members'])})", m))
  width = max(len(name) for name, _ in rows)

  def fmt(v) -> str:
    return f"{v:>9.4f}" if isinstance(v, (int, float)) else f"{'-':>9}"

  lines = [f"{'model':<{width}}" + "".join(f"{c:>10}" for c, _ in cols)]
  lines += [f"{name:<{width}}" + "".join(" " + fmt(r.get(k)) for _, k in cols) for name, r in rows]
  return "\n".join(lines)
