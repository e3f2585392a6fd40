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
import weakref

import keras
import numpy as np
import tensorflow as tf

from skinrecords import features
from skinrecords import metrics
from skinrecords import models  # pylint: disable=unused-import  (registers layers for load_model)
from skinrecords import pipeline
from skinrecords import plots

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
# Test-time augmentation order: tta=n averages the probabilities of the first n of these.
DIHEDRAL = ("identity", "flip_left_right", "flip_up_down", "rot90", "rot180", "rot270",
            "transpose", "transverse")
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
    if self.split not in features.SPLITS:
      raise ValueError(f"EvalConfig.split={self.split!r}: expected one of {features.SPLITS}")
    if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or \
        self.batch_size < 1:
      raise ValueError(f"EvalConfig.batch_size={self.batch_size!r}: expected an integer >= 1")
    if self.fold is not None and (isinstance(self.fold, bool) or not isinstance(self.fold, int)
                                  or self.fold < 0):
      raise ValueError(f"EvalConfig.fold={self.fold!r}: expected None or an integer >= 0")
    _check_tta(self.tta, "EvalConfig.tta")
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


def _check_tta(tta, what: str = "tta") -> None:
  if isinstance(tta, bool) or not isinstance(tta, int) or not 0 <= tta <= len(DIHEDRAL):
    raise ValueError(f"{what}={tta!r}: expected 0 (off) or 1..{len(DIHEDRAL)} (the first n of "
                     f"{', '.join(DIHEDRAL)})")


def load_model_dir(model_dir) -> tuple[keras.Model, dict]:
  """Loads MODEL_DIR/model.keras (safe mode) and MODEL_DIR/config.json; checks they agree."""
  d = pathlib.Path(model_dir)
  need = f"a model directory holds {MODEL_FILE} (model.save()) and {CONFIG_FILE} from training"
  if not d.is_dir():
    raise FileNotFoundError(f"{d}: model directory not found; {need}")
  missing = [name for name in (MODEL_FILE, CONFIG_FILE) if not (d / name).is_file()]
  if missing:
    raise FileNotFoundError(f"{d}: missing {' and '.join(missing)}; {need}")
  try:
    cfg = json.loads((d / CONFIG_FILE).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ValueError(f"{d / CONFIG_FILE}: not valid JSON ({err})") from err
  classes = cfg.get("classes") if isinstance(cfg, dict) else None
  if not isinstance(classes, list) or len(classes) < 2:
    raise ValueError(f"{d / CONFIG_FILE}: 'classes' must list at least 2 class names in id order, "
                     f"got {classes!r}")
  size = cfg.get("image_size")
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ValueError(f"{d / CONFIG_FILE}: 'image_size' must be a positive integer, got {size!r}")
  try:
    model = keras.models.load_model(d / MODEL_FILE, compile=False)  # safe_mode stays on
  except Exception as err:  # pylint: disable=broad-except  (Keras raises many types here)
    raise ValueError(f"{d / MODEL_FILE}: could not load the Keras model "
                     f"({type(err).__name__}: {err})") from err
  units = model.outputs[0].shape[-1]
  expected = 1 if len(classes) == 2 else len(classes)
  if units != expected:
    raise ValueError(f"{d / MODEL_FILE}: the model outputs {units} logit(s) but {CONFIG_FILE} "
                     f"lists {len(classes)} classes {classes}; expected {expected}")
  return model, cfg


# ------------------------------------------------------------------------------------ prediction


def _dihedral(x: tf.Tensor, k: int) -> tf.Tensor:
  """Transform k of DIHEDRAL on a [B, H, W, C] batch of square images (numpy equivalents noted)."""
  t = [0, 2, 1, 3]
  return [
      lambda: x,
      lambda: tf.reverse(x, [2]),  # np.flip(x, 2)
      lambda: tf.reverse(x, [1]),  # np.flip(x, 1)
      lambda: tf.transpose(tf.reverse(x, [2]), t),  # np.rot90(x, 1, axes=(1, 2))
      lambda: tf.reverse(x, [1, 2]),  # np.rot90(x, 2, axes=(1, 2))
      lambda: tf.reverse(tf.transpose(x, t), [2]),  # np.rot90(x, 3, axes=(1, 2))
      lambda: tf.transpose(x, t),  # x.transpose(0, 2, 1, 3)
      lambda: tf.transpose(tf.reverse(x, [1, 2]), t),  # rot180 then transpose: anti-diagonal
  ][k]()


_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward(model: keras.Model, tta: int):
  """One compiled forward pass per (model, tta): images -> probabilities ([B] or [B, K])."""
  fns = _FORWARD.setdefault(model, {})
  if tta not in fns:
    ref = weakref.ref(model)  # a strong reference here would keep the cache key alive forever

    def forward(images):
      x = tf.cast(images, tf.float32)
      probs = []
      for k in range(max(tta, 1)):
        logits = tf.cast(ref()(_dihedral(x, k), training=False), tf.float32)
        probs.append(tf.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else
                     tf.nn.softmax(logits, axis=-1))
      return tf.add_n(probs) / float(len(probs))  # mean probability, not mean logit

    fns[tta] = tf.function(forward, jit_compile=True)
  return fns[tta]


def _as_str(name) -> str:
  return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def predict_dataset(model: keras.Model, ds, tta: int = 0, *,
                    info: pipeline.DatasetInfo | None = None, split: str = "test",
                    fold: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Probabilities ([N] P(class 1) for one logit, [N, K] otherwise), labels [N] and names.

  `ds` yields (images, labels[, names]) batches; a tf.data.Dataset or any iterable of arrays.
  With `info`, it is read through `pipeline.iterate(ds, info, split, fold)` so a corrupt shard is
  named. Names default to the running index when batches carry none. The last partial batch is
  padded to the first batch's size so XLA compiles one shape only (DenseNet121 took ~95 s to
  compile on 2 CPU cores; a second shape would cost that again).
  """
  _check_tta(tta)
  forward = _forward(model, tta)
  batches = pipeline.iterate(ds, info, split, fold) if info is not None else iter(ds)
  probs, labels, names, full = [], [], [], None
  for batch in batches:
    images = tf.convert_to_tensor(batch[0])
    n = int(images.shape[0])
    full = full or n
    if n < full:
      pad = tf.zeros([full - n, *images.shape[1:]], images.dtype)
      images = tf.concat([images, pad], axis=0)
    probs.append(forward(images).numpy()[:n])
    labels.append(np.asarray(batch[1]).astype(np.int64).reshape(-1))
    if len(batch) > 2:
      raw = batch[2].numpy() if hasattr(batch[2], "numpy") else batch[2]
      names += [_as_str(x) for x in raw]
    else:
      names += [str(len(names) + i) for i in range(n)]
  if not probs:
    return np.zeros((0,), np.float32), np.zeros((0,), np.int64), []
  return np.concatenate(probs), np.concatenate(labels), names


def _check_classes(info: pipeline.DatasetInfo, classes: list[str], model_dir) -> None:
  if len(info.classes) != len(classes) or (info.manifest is not None and
                                           list(info.classes) != list(classes)):
    raise ValueError(f"{model_dir}/{CONFIG_FILE} lists classes {classes} but {info.records_dir} "
                     f"holds {list(info.classes)}; evaluate on records made with the same classes "
                     "in the same order")


def evaluate(config: EvalConfig) -> dict:
  """Predicts `config.split`, computes metrics, writes the report files; returns the metrics."""
  config.validate()
  model, cfg = load_model_dir(config.model_dir)
  classes = [str(c) for c in cfg["classes"]]
  records_dir = config.records_dir or cfg.get("records_dir")
  if not records_dir:
    raise ValueError(f"{config.model_dir}/{CONFIG_FILE} names no records_dir; pass records_dir")
  info = pipeline.load_info(records_dir)
  _check_classes(info, classes, config.model_dir)
  fold = config.fold if config.fold is not None else cfg.get("fold")
  threshold = config.threshold_value
  if threshold == "youden" and len(classes) != 2:
    raise ValueError(f"threshold='youden' needs a two-class model; {config.model_dir} has "
                     f"{len(classes)} classes (decided by argmax, no threshold)")

  def run(split):
    split_fold = fold if split in ("train", "valid") else None
    ds = pipeline.make_dataset(info, split, batch_size=config.batch_size, training=False,
                               image_size=cfg["image_size"], fold=split_fold, with_names=True)
    return predict_dataset(model, ds, config.tta, info=info, split=split, fold=split_fold)

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
