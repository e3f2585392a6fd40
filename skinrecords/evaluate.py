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
prediction is positive when P(class 1) >= threshold.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import sys


from skinrecords import inference
from skinrecords import manifest
from skinrecords import metrics
from skinrecords import pipeline
from skinrecords import plots
from skinrecords import rundir

_THRESHOLD_CHOICES = "a float strictly between 0 and 1, or 'youden'"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What `evaluate` does. Validated on construction."""
  model_dir: str
  records_dir: str | None = None  # default: config.json's records_dir
  split: str = "test"
  fold: int | None = None  # default: config.json's fold (used for split "train"/"valid")
  batch_size: int = 64
  threshold: str = "0.5"  # a float in (0, 1), or "youden" (chosen on the validation split)
  tta: int = 0  # 0: off; n in 1..8: mean probability over the first n transforms of DIHEDRAL
  output_dir: str | None = None  # default: MODEL_DIR/eval_<split>

  def __post_init__(self):
    self.validate()

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
    parse_threshold(self.threshold)

  @property
  def threshold_value(self) -> float | str:
    return parse_threshold(self.threshold)


def parse_threshold(text: str | float) -> float | str:
  """"youden" or a float in (0, 1); ValueError otherwise."""
  if isinstance(text, str) and text.strip().lower() == "youden":
    return "youden"
  try:
    value = float(text)
  except (TypeError, ValueError) as err:
    raise ValueError(f"threshold={text!r}: expected {_THRESHOLD_CHOICES}") from err
  if not 0.0 < value < 1.0:
    raise ValueError(f"threshold={text!r}: expected {_THRESHOLD_CHOICES}")
  return value


def _check_classes(info: manifest.DatasetInfo, classes: list[str], model_dir) -> None:
  if len(info.classes) != len(classes) or (info.manifest is not None and
                                           list(info.classes) != list(classes)):
    raise ValueError(f"{model_dir}/{rundir.CONFIG_FILE} lists classes {classes} but {info.records_dir} "
                     f"holds {list(info.classes)}; evaluate on records made with the same classes "
                     "in the same order")


def evaluate(config: EvalConfig) -> dict:
  """Predicts `config.split`, computes metrics, writes the report files; returns the metrics."""
  config.validate()
  model, cfg = rundir.load_model_dir(config.model_dir)
  classes = [str(c) for c in cfg["classes"]]
  records_dir = config.records_dir or cfg.get("records_dir")
  if not records_dir:
    raise ValueError(f"{config.model_dir}/{rundir.CONFIG_FILE} names no records_dir; pass records_dir")
  info = pipeline.load_info(records_dir)
  _check_classes(info, classes, config.model_dir)
  if not info.has_labels(config.split):
    raise ValueError(f"{records_dir}: split {config.split!r} has no labels (SIIM-ISIC test files "
                     "carry no target), so it cannot be evaluated; score it with bin/predict "
                     f"--model_dir={config.model_dir} --records_dir={records_dir} "
                     f"--split={config.split}")
  fold = config.fold if config.fold is not None else cfg.get("fold")
  threshold = config.threshold_value
  if threshold == "youden" and len(classes) != 2:
    raise ValueError(f"threshold='youden' needs a two-class model; {config.model_dir} has "
                     f"{len(classes)} classes (decided by argmax, no threshold)")

  def run(split):
    split_fold = fold if split in ("train", "valid") else None
    ds = pipeline.make_dataset(info, split, batch_size=config.batch_size, training=False,
                               image_size=cfg["image_size"], fold=split_fold, with_names=True)
    return inference.predict_dataset(model, ds, config.tta, info=info, split=split, fold=split_fold)

  probs, labels, names = run(config.split)
  source = "fixed"
  if threshold == "youden":
    valid_probs, valid_labels, _ = run("valid")
    threshold = metrics.youden_threshold(valid_probs, valid_labels)
    where = f"valid{f' fold {fold}' if fold is not None else ''}"
    source = f"Youden's J on {len(valid_labels)} {where} predictions"
    if config.split == "valid":
      source += ", the split evaluated here (optimistic)"
  m = metrics.compute_metrics(probs, labels, classes, threshold if len(classes) == 2 else None)
  out = pathlib.Path(config.output_dir or pathlib.Path(config.model_dir) / f"eval_{config.split}")
  m.update(model_dir=str(config.model_dir), records_dir=str(records_dir), split=config.split,
           fold=fold if config.split in ("train", "valid") else None, tta=config.tta,
           threshold_source=source if len(classes) == 2 else None, output_dir=str(out))
  _write_outputs(out, m, probs, labels, names)
  if m["collapsed"]:
    bar = "!" * 100
    print(f"{bar}\nWARNING: {m['warning']}\n{bar}", file=sys.stderr, flush=True)
  return m


def _write_outputs(out: pathlib.Path, m: dict, probs, labels, names) -> None:
  out.mkdir(parents=True, exist_ok=True)
  classes = m["classes"]
  binary = len(classes) == 2
  predicted = (probs >= m["threshold"]).astype(int) if binary else probs.argmax(axis=1)
  with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["image_name", "label", "probability", "predicted"] +
               ([] if binary else [f"p_{c}" for c in classes]))
    for i, name in enumerate(names):
      p = probs[i] if binary else probs[i, predicted[i]]  # multi-class: P(predicted class)
      w.writerow([name, classes[labels[i]], f"{p:.8g}", classes[predicted[i]]] +
                 ([] if binary else [f"{q:.8g}" for q in probs[i]]))
  m["files"] = {name: str(out / name) for name in (
      "metrics.json", "report.txt", "predictions.csv", "confusion_matrix.png", "roc.png", "pr.png")}
  plots.plot_confusion(out / "confusion_matrix.png", m)
  plots.plot_curves(out / "roc.png", out / "pr.png", probs, labels, m)
  (out / "report.txt").write_text(metrics.format_report(m) + "\n", encoding="utf-8")
  (out / "metrics.json").write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
