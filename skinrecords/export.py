"""Exports a trained model directory for serving (SavedModel) and for phones (TFLite).

    OUTPUT_DIR/1/                          SavedModel, TensorFlow Serving's versioned layout
    OUTPUT_DIR/model_float32.tflite        uint8 [B, S, S, 3] in, float32 weights
    OUTPUT_DIR/model_dynamic_range.tflite  the same with int8 weights (dynamic-range quantised)
    OUTPUT_DIR/preprocessing.json          what the graph does, and what the client must do first

SavedModel signatures: `serving_default` takes a batch of encoded JPEG/PNG bytes (tf.string [B])
and decodes them with `pipeline.decode_image`, the function training read its records with;
`serving_uint8` takes uint8 [B, S, S, 3]. Both return `probabilities` (P(class 1) [B] for two
classes, [B, K] otherwise), `predicted_class` (int32 [B]) and `predicted_label` (tf.string [B]).

What the converter did with OpenCV (centre crop, INTER_AREA resize, hair removal, the notebook's
clean-up, the JPEG round trip) is not in the graph: images must arrive as the records stored them.
preprocessing.json holds the exact settings, and hair removal or clean-up is announced loudly.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings

import keras
import numpy as np
from sklearn import metrics as skm
import tensorflow as tf

from skinrecords import fileio
from skinrecords import inference
from skinrecords import pipeline
from skinrecords import rundir

FORMATS = ("saved_model", "tflite", "all")
TFLITE_FILES = {"float32": "model_float32.tflite", "dynamic_range": "model_dynamic_range.tflite"}
PREPROCESSING_FILE = "preprocessing.json"
# Float32 TFLite runs the same float graph through other kernels: 1e-6-scale differences are
# rounding; anything above 1e-4 in a probability means a wrong conversion, not noise.
FLOAT_TOLERANCE = 1e-4
_OPENCV_ONLY = ("remove_hair", "notebook_cleanup")


class ExportCheckError(RuntimeError):
  """The float32 TFLite model disagrees with the Keras model beyond FLOAT_TOLERANCE."""


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """What `export` does (bin/export). Validated on construction."""
  model_dir: str
  output_dir: str
  format: str = "all"  # "saved_model" | "tflite" | "all"
  records_dir: str | None = None  # images for the TFLite check; default: config.json's records
  max_examples: int = 256  # TFLite check on at most this many images of the valid (or test) split
  # Two classes: predicted class 1 when P(class 1) >= threshold; None: the run's threshold.json.
  threshold: float | None = None
  version: int = 1  # TF Serving version folder: OUTPUT_DIR/<version>/

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    if self.format not in FORMATS:
      raise ValueError(f"ExportConfig.format={self.format!r}: expected one of {', '.join(FORMATS)}")
    for name in ("max_examples", "version"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"ExportConfig.{name}={v!r}: expected an integer >= 1")
    if self.threshold is not None and (not isinstance(self.threshold, (int, float)) or
                                       not 0.0 < self.threshold < 1.0):
      raise ValueError(f"ExportConfig.threshold={self.threshold!r}: expected a float strictly "
                       "between 0 and 1")


@dataclasses.dataclass
class ExportReport:
  """What `export` wrote and measured; `lines()` is what bin/export prints."""
  output_dir: str
  saved_model: str | None = None
  tflite: dict = dataclasses.field(default_factory=dict)  # kind -> path
  sizes: dict = dataclasses.field(default_factory=dict)  # path -> bytes
  max_diff: dict = dataclasses.field(default_factory=dict)  # kind -> max |p_tflite - p_keras|
  auc: dict = dataclasses.field(default_factory=dict)  # "keras" / kind -> ROC AUC (two classes)
  checked_on: str = ""  # e.g. "64 images of valid split of /data/records"
  warnings: list = dataclasses.field(default_factory=list)

  def lines(self) -> list[str]:
    out = [f"WARNING: {w}" for w in self.warnings]
    for path in [self.saved_model, *self.tflite.values()]:
      if path:
        out.append(f"wrote {path} ({self.sizes[path] / 1e6:.2f} MB)")
    for kind, diff in self.max_diff.items():
      auc = (f", AUC {self.auc[kind]:.4f} vs Keras {self.auc['keras']:.4f}" if kind in self.auc
             else "")
      out.append(f"{kind} TFLite: largest probability difference vs Keras {diff:.2e}{auc} "
                 f"({self.checked_on})")
    out.append(f"wrote {fileio.join(self.output_dir, PREPROCESSING_FILE)}")
    return out


# ------------------------------------------------------------------------------- settings

def preprocessing_settings(cfg: dict, threshold: float) -> tuple[dict, list[str]]:
  """The contents of preprocessing.json, and the warnings a user must see."""
  size = cfg["image_size"]
  pre = cfg.get("preprocessing")
  stored = pre.get("image_size") if isinstance(pre, dict) else None
  warn = []
  used = [k for k in _OPENCV_ONLY if isinstance(pre, dict) and pre.get(k)]
  if used:
    warn.append(f"the training records were made with {' and '.join(used)} (OpenCV), which is NOT "
                "inside the exported graph: run skinrecords.preprocess.preprocess_file (settings "
                f"in {PREPROCESSING_FILE}) on each image before sending it, or predictions will "
                "differ from evaluation")
  if pre is None:
    warn.append("config.json records no preprocessing (records made elsewhere?): the client-side "
                f"steps in {PREPROCESSING_FILE} are unknown")
  settings = {
      "classes": [str(c) for c in cfg["classes"]],
      "image_size": size,
      "threshold": threshold if len(cfg["classes"]) == 2 else None,
      "in_graph": ["decode JPEG/PNG to RGB (pipeline.decode_image)",
                   f"resize to {size}x{size} (antialiased, rounded) unless already that size",
                   "backbone normalisation, forward pass, sigmoid/softmax"],
      "client_side": pre,  # the converter's PreprocessConfig: crop, size, hair removal, JPEG
      "opencv_only_steps_used": used,
      "note": "send each image as the converter stored it: centre-cropped to a square, at "
              f"{stored or size} px, through skinrecords.preprocess.preprocess_file with "
              "client_side; other sizes are resized (a non-square image is stretched)",
  }
  return settings, warn


# ------------------------------------------------------------------------------- SavedModel

def _outputs(model: keras.Model, images, classes: list[str], threshold: float) -> dict:
  probs = inference.probabilities(model(tf.cast(images, tf.float32), training=False))
  if len(classes) == 2:
    predicted = tf.cast(probs >= threshold, tf.int32)
  else:
    predicted = tf.argmax(probs, axis=-1, output_type=tf.int32)
  return {"probabilities": probs, "predicted_class": predicted,
          "predicted_label": tf.gather(tf.constant(classes), predicted)}


def write_saved_model(model: keras.Model, classes: list[str], path, threshold: float = 0.5) -> None:
  """SavedModel at `path` with `serving_default` (encoded bytes) and `serving_uint8`."""
  size = int(model.inputs[0].shape[1])
  spec = tf.TensorSpec([size, size, 3], tf.uint8)

  def from_bytes(image_bytes):
    # stored_size=None: an image already at `size` is left as is (resize is exact identity then,
    # checked), any other size is resized the way pipeline resizes records.
    images = tf.map_fn(lambda b: pipeline.decode_image(b, size, None), image_bytes,
                       fn_output_signature=spec)
    return _outputs(model, images, classes, threshold)

  def from_uint8(images):
    return _outputs(model, images, classes, threshold)

  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint("serving_default", from_bytes,
                       input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  archive.add_endpoint("serving_uint8", from_uint8,
                       input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8,
                                                      name="images")])
  archive.write_out(str(path), verbose=False)


# ------------------------------------------------------------------------------- TFLite

def convert_tflite(saved_model_dir, quantize: bool) -> bytes:
  """The `serving_uint8` signature as TFLite; `quantize`: int8 weights, float activations."""
  converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir),
                                                       signature_keys=["serving_uint8"])
  if quantize:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: dynamic range
  return converter.convert()


def tflite_probabilities(model_bytes: bytes, images: np.ndarray, batch_size: int = 32):
  """Runs a TFLite model from this module on uint8 [N, S, S, 3]; returns probabilities."""
  with warnings.catch_warnings():
    # tf.lite.Interpreter warns it moves to ai_edge_litert; it still works in TF 2.21.
    warnings.simplefilter("ignore")
    runner = tf.lite.Interpreter(model_content=model_bytes).get_signature_runner("serving_uint8")
  out = [runner(images=images[i:i + batch_size])["probabilities"]
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def check_images(cfg: dict, records_dir, max_examples: int):
  """Up to `max_examples` (images, labels) of the valid split (fold-aware), else test; and where."""
  info = pipeline.load_info(records_dir)
  fold = cfg.get("fold")
  split = "valid" if ("valid" in info.shards or fold is not None) else "test"
  if split == "test" and "test" not in info.shards:
    raise ValueError(f"{records_dir} has neither a valid nor a test split to check TFLite on; "
                     "pass --records_dir with one")
  ds = pipeline.make_dataset(info, split, batch_size=64, training=False,
                             image_size=cfg["image_size"], fold=fold if split == "valid" else None)
  images, labels, n = [], [], 0
  for x, y in pipeline.iterate(ds, info, split, fold):
    images.append(x.numpy())
    labels.append(y.numpy())
    n += len(labels[-1])
    if n >= max_examples:
      break
  images, labels = np.concatenate(images)[:max_examples], np.concatenate(labels)[:max_examples]
  where = f"{split}{f' fold {fold}' if split == 'valid' and fold is not None else ''}"
  return images, labels, f"{len(labels)} images of the {where} split of {records_dir}"


def _auc(probs, labels):
  if probs.ndim != 1 or len(set(labels.tolist())) < 2:
    return None
  return float(skm.roc_auc_score(labels, probs))


# ------------------------------------------------------------------------------- the command

def _check_records(config: ExportConfig, cfg: dict) -> str | None:
  """The records folder the TFLite check reads; fails before any conversion work."""
  if config.format == "saved_model":
    return None
  records = config.records_dir or cfg.get("records_dir")
  if not records or not fileio.isdir(records):
    raise FileNotFoundError(
        f"records {records!r} for the TFLite check not found (the training records named in "
        "config.json by default); pass records_dir=FOLDER holding a valid or test split")
  return str(records)


def _check_tflite(tmp: str, model, cfg, records, config, report) -> dict:
  """Converts both TFLite models into `tmp`, compares them with Keras; returns kind -> tmp path."""
  images, labels, report.checked_on = check_images(cfg, records, config.max_examples)
  keras_probs, _, _ = inference.predict_dataset(
      model, [(images[i:i + 32], labels[i:i + 32]) for i in range(0, len(images), 32)])
  if (auc := _auc(keras_probs, labels)) is not None:
    report.auc["keras"] = auc
  written = {}
  for kind, quantize in (("float32", False), ("dynamic_range", True)):
    data = convert_tflite(os.path.join(tmp, "saved_model"), quantize)
    written[kind] = os.path.join(tmp, TFLITE_FILES[kind])
    fileio.write_bytes_atomic(written[kind], data)
    probs = tflite_probabilities(data, images)
    report.max_diff[kind] = float(np.max(np.abs(probs - keras_probs)))
    if (auc := _auc(probs, labels)) is not None:
      report.auc[kind] = auc
  if report.max_diff["float32"] > FLOAT_TOLERANCE:
    raise ExportCheckError(
        f"float32 TFLite differs from the Keras model by {report.max_diff['float32']:.2e} "
        f"(> {FLOAT_TOLERANCE:g}) on {report.checked_on}; nothing was written")
  return written


def _install(src: str, dst: str, trash: str) -> None:
  """Puts the local folder `src` at `dst`. Local: renamed over it, an old folder moved into
  `trash` first (rename is atomic). Remote: uploaded beside it (`.NAME.tmp/`), the old folder
  removed, then each file renamed into place with saved_model.pb last: an object store cannot
  swap a folder at once, and a loader that finds the .pb finds its variables too."""
  if not fileio.is_remote(dst):
    if fileio.isdir(dst):
      fileio.rename(dst, os.path.join(trash, fileio.basename(dst) + ".old"))
    fileio.rename(src, dst)
    return
  staging = fileio.join(fileio.dirname(dst), f".{fileio.basename(dst)}.tmp")
  fileio.rmtree(staging)
  files = sorted(fileio.walk_files(src), key=lambda rel: (rel == "saved_model.pb", rel))
  for rel in files:
    fileio.makedirs(fileio.dirname(fileio.join(staging, rel)))
    fileio.copy(os.path.join(src, rel), fileio.join(staging, rel))
  fileio.rmtree(dst)
  for rel in files:
    fileio.makedirs(fileio.dirname(fileio.join(dst, rel)))
    fileio.rename(fileio.join(staging, rel), fileio.join(dst, rel))
  fileio.rmtree(staging)


def export(config: ExportConfig) -> ExportReport:
  """bin/export: writes what `config.format` asks for into config.output_dir.

  Everything is built in a hidden folder inside output_dir and renamed into place only when every
  check passed, so a failed export leaves the previous one intact.

  Raises:
    FileNotFoundError / ValueError: bad model directory, output or records (before any work).
    ExportCheckError: float32 TFLite disagrees with Keras (nothing is written).
  """
  config.validate()
  model, cfg = rundir.load_model_dir(config.model_dir)
  out = fileio.check_writable_dir(config.output_dir)
  records = _check_records(config, cfg)
  classes = [str(c) for c in cfg["classes"]]
  stored = rundir.read_threshold(config.model_dir) if config.threshold is None else None
  if config.threshold is not None:
    threshold, source = config.threshold, "fixed (--threshold)"
  elif stored and stored.split != "none":
    threshold, source = stored.value, stored.describe(config.model_dir)
  else:
    threshold, source = 0.5, "0.5 by default: the run stored no threshold chosen on validation"
  config = dataclasses.replace(config, threshold=threshold)
  settings, warn = preprocessing_settings(cfg, config.threshold)
  settings["threshold_source"] = source if len(classes) == 2 else None
  report = ExportReport(output_dir=out, warnings=warn)
  # Built locally: in a hidden folder inside a local output (renamed into place, atomically), in
  # a temporary folder for a remote one (uploaded at the end, only when every check passed).
  tmp = tempfile.mkdtemp(prefix=".export-", dir=None if fileio.is_remote(out) else out)
  try:
    write_saved_model(model, classes, os.path.join(tmp, "saved_model"), config.threshold)
    tflite = _check_tflite(tmp, model, cfg, records, config, report) if records else {}
    if config.format != "tflite":
      report.saved_model = fileio.join(out, str(config.version))
      _install(os.path.join(tmp, "saved_model"), report.saved_model, tmp)
      report.sizes[report.saved_model] = sum(
          fileio.size(fileio.join(report.saved_model, rel))
          for rel in fileio.walk_files(report.saved_model))
    for kind, path in tflite.items():
      report.tflite[kind] = fileio.join(out, os.path.basename(path))
      fileio.publish(path, report.tflite[kind])
      report.sizes[report.tflite[kind]] = fileio.size(report.tflite[kind])
    fileio.write_json_atomic(fileio.join(out, PREPROCESSING_FILE), settings)
  finally:
    fileio.rmtree(tmp)
  return report
