"""Exports a trained model directory for serving (SavedModel) and for phones (TFLite).

    OUTPUT_DIR/1/                          SavedModel, TensorFlow Serving's versioned layout
    OUTPUT_DIR/model_float32.tflite        uint8 [B, S, S, 3] in, float32 weights
    OUTPUT_DIR/model_dynamic_range.tflite  the same with int8 weights (dynamic-range quantised)
    OUTPUT_DIR/preprocessing.json          what the graph does, and what the client must do first

SavedModel signatures: `serving_default` takes a batch of encoded JPEG/PNG bytes (tf.string [B])
and decodes them with `pipeline.decode_image`, the function training read its records with;
`serving_uint8` takes uint8 [B, S, S, 3]. Both return `probabilities` (P(class 1) [B] for two
classes, [B, K] otherwise), `predicted_class` (int32 [B]) and `predicted_label` (tf.string [B]).

A model trained with patient metadata (issue 24) takes it in every signature: `serving_default`
and `serving_uint8` add one RAW input per metadata column (float32 NaN = missing, or tf.string ""
= missing), encoded in the graph with each member's stored spec; the TFLite files are converted
from `serving_uint8_codes` (images, metadata_numeric float32 [B, N], metadata_codes int32 [B, C]:
serving/metadata_inputs.py). Names, order and vocabularies: preprocessing.json["metadata"].

What the converter did with OpenCV (centre crop, INTER_AREA resize, hair removal, the notebook's
clean-up, the JPEG round trip) is not in the graph: images must arrive as the records stored them.
preprocessing.json holds the exact settings, and hair removal or clean-up is announced loudly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings

import keras
import numpy as np
from sklearn import metrics as skm
import tensorflow as tf

from skinrecords.core import fileio
from skinrecords.core import metadata as md
from skinrecords.core import rundir
from skinrecords.core import tflog
from skinrecords.data import preprocess
from skinrecords.evaluation import ensemble
from skinrecords.input import metadata_input as input_metadata
from skinrecords.input import pipeline
from skinrecords.model import inference
from skinrecords.serving import metadata_inputs
from skinrecords.serving import serving

FORMATS = ("saved_model", "tflite", "all")
TFLITE_FILES = {"float32": "model_float32.tflite", "dynamic_range": "model_dynamic_range.tflite"}
PREPROCESSING_FILE = "preprocessing.json"
# Float32 TFLite runs the same float graph through other kernels: 1e-6-scale differences are
# rounding; anything above 1e-4 in a probability means a wrong conversion, not noise.
FLOAT_TOLERANCE = 1e-4
_OPENCV_ONLY = ("remove_hair", "notebook_cleanup")
IDENTITY_FILE = "assets.extra/skinrecords_export.json"  # inside each SavedModel version folder
SMOKE_SCRIPT = "score_folder.py"  # written next to the SavedModel: TensorFlow only
# A rank ensemble replaces each member's score by its rank among the images scored together: a
# served image would be ranked against whatever else was in its request (alone: rank 1, always).
RANK_REFUSED = ("ensemble=rank ranks each image among the images scored with it, so a served "
                "answer would depend on the other images in the request; export ensemble=mean "
                "(the default), which scores each image on its own")


class ExportCheckError(RuntimeError):
  """The float32 TFLite model disagrees with the Keras model beyond FLOAT_TOLERANCE."""


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """What `export` does (bin/export); `export` validates it (.validate())."""
  model_dir: str
  output_dir: str
  format: str = "all"  # "saved_model" | "tflite" | "all"
  records_dir: str | None = None  # images for the TFLite check; default: config.json's records
  max_examples: int = 256  # TFLite check on at most this many images of the valid (or test) split
  # Two classes: predicted class 1 when P(class 1) >= threshold; None: the run's threshold.json.
  threshold: float | None = None
  version: int = 1  # TF Serving version folder: OUTPUT_DIR/<version>/
  ensemble: str = "mean"  # several members: only "mean" can be served (RANK_REFUSED)
  member_outputs: bool = False  # also return each member's probability (member_probabilities)
  overwrite: bool = False  # replace another model's export in output_dir (else refused)

  def validate(self) -> None:
    if self.format not in FORMATS:
      raise ValueError(f"ExportConfig.format={self.format!r}: expected one of {', '.join(FORMATS)}")
    if self.ensemble not in ensemble.METHODS:
      raise ValueError(f"ExportConfig.ensemble={self.ensemble!r}: expected one of "
                       f"{', '.join(ensemble.METHODS)}")
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
  members: list = dataclasses.field(default_factory=list)  # run folders; > 1: a mean ensemble
  smoke_script: str | None = None  # OUTPUT_DIR/score_folder.py (with a SavedModel)
  metadata_check: str | None = None  # the served-vs-Keras parity line of a metadata model

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
    if self.metadata_check:
      out.append(self.metadata_check)
    out.append(f"wrote {fileio.join(self.output_dir, PREPROCESSING_FILE)}")
    if len(self.members) > 1:
      out.append(f"ensemble: mean of {len(self.members)} runs ({', '.join(self.members)}), each "
                 "with its own temperature where calibration.json has one")
    if self.smoke_script:
      out.append(f"check it without skinrecords: python {self.smoke_script} IMAGE_FOLDER "
                 "(prints predict's CSV)")
    return out


# ------------------------------------------------------------------------------- settings

def preprocessing_settings(cfg: rundir.RunConfig, threshold: float) -> tuple[dict, list[str]]:
  """The contents of preprocessing.json, and the warnings a user must see."""
  size = cfg.image_size
  pre = cfg.preprocessing
  stored = pre.get("image_size") if isinstance(pre, dict) else None
  warn = []
  used = [k for k in _OPENCV_ONLY if isinstance(pre, dict) and pre.get(k)]
  if used:
    warn.append(f"the training records were made with {' and '.join(used)} (OpenCV), which is NOT "
                "inside the exported graph: run skinrecords.data.preprocess.preprocess_file "
                f"(settings in {PREPROCESSING_FILE}) on each image before sending it, or predictions will "
                "differ from evaluation")
  if pre is None:
    warn.append("config.json records no preprocessing (records made elsewhere?): the client-side "
                f"steps in {PREPROCESSING_FILE} are unknown")
  settings = {
      "classes": [str(c) for c in cfg.classes],
      "image_size": size,
      "threshold": threshold if len(cfg.classes) == 2 else None,
      "in_graph": ["decode JPEG/PNG to RGB with EXIF orientation (serving.converter_image)",
                   "centre crop to a square, INTER_AREA down / INTER_CUBIC up to the stored "
                   "size, the stored JPEG round trip (skipped for an image already at the "
                   "stored size without EXIF rotation: taken as client-preprocessed)",
                   f"resize to {size}x{size} (antialiased, rounded) unless already that size",
                   "backbone normalisation, forward pass, sigmoid/softmax"],
      "client_side": pre,  # the converter's PreprocessConfig: crop, size, hair removal, JPEG
      "opencv_only_steps_used": used,
      "note": "serving_default takes the raw JPEG/PNG file (any size, aspect ratio, EXIF "
              "orientation) and applies the converter's geometry in the graph; steps in "
              "opencv_only_steps_used must run on the client first (preprocess_file with "
              f"client_side, which gives {stored or size} px squares, sent as they are); "
              "serving_uint8 and TFLite take pixels at image_size",
  }
  return settings, warn


# ------------------------------------------------------------------------------- SavedModel

# calibration.apply_temperature clips probabilities to [1e-7, 1 - 1e-7] before taking logits:
# logit(1 - 1e-7) = 16.118095. Float32 cannot hold 1 - 1e-7 (its neighbours are 0.99999988 and
# 0.99999994), so the clip is applied to the logit, which float32 holds to 1e-7.
_LOGIT_CLIP = 16.118095


def _calibrated(probs, temperature):
  """calibration.apply_temperature in-graph, so a calibrated run serves the probabilities
  bin/predict prints. Float32 only: TFLite has no float64 Log1p (the conversion failed)."""
  if not temperature:
    return probs
  t = tf.constant(temperature, tf.float32)
  if probs.shape.rank == 1:
    z = tf.math.log(probs) - tf.math.log1p(-probs)
    z = tf.where(probs > 1.0 - 1e-7, _LOGIT_CLIP, tf.where(probs < 1e-7, -_LOGIT_CLIP, z))
    return tf.sigmoid(z / t)
  return tf.nn.softmax(tf.math.log(tf.clip_by_value(probs, 1e-7, 1.0 - 1e-7)) / t, axis=-1)


def _member_probs(member, images, meta=None):
  """One member's calibrated probabilities on uint8 images at its own size (and its encoded
  metadata, for a member trained with it)."""
  x = tf.cast(images, tf.float32)
  logits = member.model(x if meta is None else {"image": x, "metadata": meta}, training=False)
  return _calibrated(inference.probabilities(logits),
                     (member.calibration or {}).get("temperature"))


def _outputs(per_member: list, classes: list[str], threshold: float, member_outputs: bool,
             extra: dict | None = None) -> dict:
  """The signature's outputs from each member's probabilities: their mean (ensemble.combine's
  "mean"), the decision, and optionally each member's own answer."""
  probs = per_member[0] if len(per_member) == 1 else tf.add_n(per_member) / len(per_member)
  if len(classes) == 2:
    predicted = tf.cast(probs >= threshold, tf.int32)
  else:
    predicted = tf.argmax(probs, axis=-1, output_type=tf.int32)
  out = {"probabilities": probs, "predicted_class": predicted,
         "predicted_label": tf.gather(tf.constant(classes), predicted)}
  if member_outputs:
    out["member_probabilities"] = tf.stack(per_member, axis=1)  # [B, M] or [B, M, K]
  out.update(extra or {})
  return out


def _pixel_specs(members) -> list[tuple]:
  """The distinct (preprocessing, model size) pairs: members sharing one share its pixels."""
  keys = []
  for m in members:
    key = (_pconfig(m.cfg), m.image_size)
    if key not in keys:
      keys.append(key)
  return keys


def _pconfig(cfg: rundir.RunConfig) -> preprocess.PreprocessConfig:
  """The converter's settings the run's records were made with (predict's default without)."""
  if cfg.preprocessing:
    return preprocess.PreprocessConfig.from_dict(cfg.preprocessing)
  return preprocess.PreprocessConfig(image_size=cfg.image_size)


def _encoders(specs, columns):
  """Per member: raw inputs -> its "metadata" vector (None for an image-only member)."""
  return [None if not spec else
          (lambda values, spec=spec: metadata_inputs.encode_raw(spec, columns, values))
          for spec in specs]


def write_saved_model(members, classes: list[str], path, threshold: float = 0.5,
                      member_outputs: bool = False, specs=None) -> None:
  """SavedModel at `path` with `serving_default` (raw encoded bytes) and, when every member takes
  the same size, `serving_uint8`. `members`: ensemble.Member (one for a single run); `specs`: each
  member's metadata spec (None: image only), whose raw columns every signature then takes."""
  pixel_specs = _pixel_specs(members)
  which = [pixel_specs.index((_pconfig(m.cfg), m.image_size)) for m in members]
  specs = list(specs or [None] * len(members))
  columns = metadata_inputs.layout(specs) if any(specs) else []
  encoders = _encoders(specs, columns)

  def probs(images_per_member, raw):
    return [_member_probs(m, x, enc and enc(raw))
            for m, x, enc in zip(members, images_per_member, encoders)]

  def from_bytes(image_bytes, *raw):
    def one(data):
      images = [serving.converter_image(data, pconfig, size)[0] for pconfig, size in pixel_specs]
      return (*images, serving.exif_orientation(data))

    signature = (*[tf.TensorSpec([size, size, 3], tf.uint8) for _, size in pixel_specs],
                 tf.TensorSpec([], tf.int32))
    *images, orientation = tf.map_fn(one, image_bytes, fn_output_signature=signature)
    return _outputs(probs([images[k] for k in which], raw), classes, threshold, member_outputs,
                    {"exif_orientation": orientation})

  def from_uint8(images, *raw):
    return _outputs(probs([images] * len(members), raw), classes, threshold, member_outputs)

  def from_codes(images, *coded):
    numeric = coded[0] if any(c.kind == "numeric" for c in columns) else None
    codes = coded[-1] if any(c.kind == "categorical" for c in columns) else None
    per_member = [_member_probs(m, images, spec and metadata_inputs.encode_codes(
        spec, columns, numeric, codes)) for m, spec in zip(members, specs)]
    return _outputs(per_member, classes, threshold, member_outputs)

  archive = keras.export.ExportArchive()
  for m in members:
    archive.track(m.model)
  raw_specs = metadata_inputs.raw_signature(columns)
  archive.add_endpoint("serving_default", from_bytes, input_signature=[
      tf.TensorSpec([None], tf.string, name="image_bytes"), *raw_specs])
  sizes = {m.image_size for m in members}
  if len(sizes) == 1:
    size = sizes.pop()
    pixels = tf.TensorSpec([None, size, size, 3], tf.uint8, name="images")
    archive.add_endpoint("serving_uint8", from_uint8, input_signature=[pixels, *raw_specs])
    if columns:
      archive.add_endpoint(metadata_inputs.CODES_SIGNATURE, from_codes, input_signature=[
          pixels, *metadata_inputs.codes_signature(columns)])
  archive.write_out(str(path), verbose=False)


# ------------------------------------------------------------------------------- TFLite

def convert_tflite(saved_model_dir, quantize: bool, signature: str = "serving_uint8") -> bytes:
  """The `serving_uint8` signature (for a metadata model `serving_uint8_codes`) as TFLite;
  `quantize`: int8 weights, float activations."""
  converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir),
                                                       signature_keys=[signature])
  if quantize:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: dynamic range
  return converter.convert()


_XNNPACK_INFO = "Created TensorFlow Lite XNNPACK delegate"


def tflite_probabilities(model_bytes: bytes, images: np.ndarray, batch_size: int = 32,
                         metadata: dict | None = None):
  """Runs a TFLite model from this module on uint8 [N, S, S, 3] (and, for a metadata model, its
  `metadata_inputs.codes_inputs`); returns probabilities."""
  metadata = metadata or {}
  # TFLite's C++ runtime prints `INFO: Created TensorFlow Lite XNNPACK delegate for CPU.` on every
  # interpreter, whatever TF_CPP_MIN_LOG_LEVEL says; it read like a problem in export's output.
  with warnings.catch_warnings(), tflog.stderr_held_back(replay=True, drop=_XNNPACK_INFO):
    # tf.lite.Interpreter warns it moves to ai_edge_litert; it still works in TF 2.21.
    warnings.simplefilter("ignore")
    interpreter = tf.lite.Interpreter(model_content=model_bytes)
    runner = interpreter.get_signature_runner(next(iter(interpreter.get_signature_list())))
    out = [runner(images=images[i:i + batch_size],
                  **{k: v[i:i + batch_size] for k, v in metadata.items()})["probabilities"]
           for i in range(0, len(images), batch_size)]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def check_images(cfg: rundir.RunConfig, records_dir, max_examples: int):
  """Up to `max_examples` (images, labels) of the valid split (fold-aware), else test; and where."""
  info = pipeline.load_info(records_dir)
  fold = cfg.fold
  split = "valid" if ("valid" in info.shards or fold is not None) else "test"
  if split == "test" and "test" not in info.shards:
    raise ValueError(f"{records_dir} has neither a valid nor a test split to check TFLite on; "
                     "pass --records_dir with one")
  ds = pipeline.make_dataset(info, split, batch_size=64, training=False,
                             image_size=cfg.image_size, fold=fold if split == "valid" else None)
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

def _check_records(config: ExportConfig, cfg: rundir.RunConfig) -> str | None:
  """The records folder the TFLite check reads; fails before any conversion work."""
  if config.format == "saved_model":
    return None
  records = config.records_dir or cfg.records_dir
  if not records or not fileio.isdir(records):
    raise FileNotFoundError(
        f"records {records!r} for the TFLite check not found (the training records named in "
        "config.json by default); pass records_dir=FOLDER holding a valid or test split")
  return str(records)


def keras_probabilities(members, specs, images, rows, labels=None) -> np.ndarray:
  """The reference the exports are checked against, computed as bin/predict does: each member's
  forward pass (a metadata member fed core.metadata.encode_rows of the raw `rows`, the NumPy
  reference encoding), its temperature, the mean."""
  labels = np.zeros(len(images), np.int64) if labels is None else labels
  out = []
  for m, spec in zip(members, specs or [None] * len(members)):
    meta = (np.asarray(md.encode_rows(spec, rows), np.float32).reshape(len(images), spec.width)
            if spec else None)
    batches = [(input_metadata.as_input(images[i:i + 32], None if meta is None else
                                        meta[i:i + 32]), labels[i:i + 32])
               for i in range(0, len(images), 32)]
    out.append(m.calibrated(inference.predict_dataset(m.model, batches)[0]))
  return ensemble.combine(out, "mean")


def _check_tflite(tmp: str, members, records, config, report, specs=None) -> dict:
  """Converts both TFLite models into `tmp`, compares them with Keras; returns kind -> tmp path.

  The reference is computed as bin/predict does (each member's forward pass, its temperature,
  the mean), not through the SavedModel being checked. A metadata model is checked on generated
  metadata rows (metadata_inputs.check_rows: every category, missing values, an unseen one) with
  the records' images; its AUCs are not shown, the metadata not being those images'."""
  lead = members[0].cfg
  cfg = dataclasses.replace(lead, fold=lead.fold if len(members) == 1 else None)
  images, labels, report.checked_on = check_images(cfg, records, config.max_examples)
  columns = metadata_inputs.layout(specs) if specs and any(specs) else []
  rows = metadata_inputs.check_rows(columns, len(images)) if columns else []
  if columns:
    report.checked_on += (" with generated metadata (every category, missing values, an unseen "
                          "category; AUC not shown: the metadata is not these images')")
  keras_probs = keras_probabilities(members, specs, images, rows, labels)
  if not columns and (auc := _auc(keras_probs, labels)) is not None:
    report.auc["keras"] = auc
  coded = metadata_inputs.codes_inputs(columns, rows) if columns else None
  signature = metadata_inputs.CODES_SIGNATURE if columns else "serving_uint8"
  written = {}
  for kind, quantize in (("float32", False), ("dynamic_range", True)):
    data = convert_tflite(os.path.join(tmp, "saved_model"), quantize, signature)
    written[kind] = os.path.join(tmp, TFLITE_FILES[kind])
    fileio.write_bytes_atomic(written[kind], data)
    probs = tflite_probabilities(data, images, metadata=coded)
    report.max_diff[kind] = float(np.max(np.abs(probs - keras_probs)))
    if not columns and (auc := _auc(probs, labels)) is not None:
      report.auc[kind] = auc
  if report.max_diff["float32"] > FLOAT_TOLERANCE:
    raise ExportCheckError(
        f"float32 TFLite differs from the Keras model by {report.max_diff['float32']:.2e} "
        f"(> {FLOAT_TOLERANCE:g}) on {report.checked_on}; nothing was written")
  return written


# Rows of metadata_inputs.check_rows: > 2x a site vocabulary + 2. 32, the reference's batch size:
# with 24 each member's forward pass traced a second shape, and TensorFlow printed its retracing
# warning on every CV export.
METADATA_CHECK_IMAGES = 32


def check_served_metadata(saved: str, members, specs) -> tuple[float, str]:
  """(largest |served - Keras| probability, what it was measured on) for a metadata model's
  `serving_uint8` fed raw values, against Keras fed encode_rows of the same rows: the in-graph
  encoding (raw strings, NaN, "", an unseen category) must be the NumPy reference's. Noise images
  (seeded): the check is of the graph, not of accuracy."""
  columns = metadata_inputs.layout(specs)
  size = members[0].image_size
  images = np.random.default_rng(0).integers(0, 256, (METADATA_CHECK_IMAGES, size, size, 3),
                                             dtype=np.uint8)
  rows = metadata_inputs.check_rows(columns, len(images))
  serve = tf.saved_model.load(saved).signatures["serving_uint8"]
  raw = {k: tf.constant(v.astype(str) if v.dtype == object else v)
         for k, v in metadata_inputs.raw_inputs(columns, rows).items()}
  served = serve(images=tf.constant(images), **raw)["probabilities"].numpy()
  diff = float(np.max(np.abs(served - keras_probabilities(members, specs, images, rows))))
  missing = sum(any(md.is_missing(v) for v in r.values()) for r in rows)
  unseen = sum(metadata_inputs.UNSEEN in r.values() for r in rows)
  return diff, (f"{len(rows)} noise images with raw metadata ({missing} rows with a missing "
                f"value, {unseen} with an unseen category)")


# ------------------------------------------------------------------------------- which model

def load_members(config: ExportConfig) -> list:
  """The run(s) `model_dir` names (ensemble.load_members), refused when they cannot be served."""
  members = ensemble.load_members(config.model_dir)
  if len(members) > 1 and config.ensemble == "rank":
    raise ValueError(RANK_REFUSED)
  sizes = sorted({m.image_size for m in members})
  if len(sizes) > 1 and config.format != "saved_model":
    raise ValueError(f"the members take different image sizes ({', '.join(map(str, sizes))} px) "
                     "and a TFLite model takes one pixel size; pass format=saved_model (its "
                     "serving_default takes the raw files and sizes them for each member)")
  return members


def model_identity(members, config: ExportConfig, specs=None) -> dict:
  """What the exported files answer with: each member (run folder, model.keras hash,
  temperature) and the settings built into the graph (a metadata member's spec too: its encoding
  is in the graph). `fingerprint` names it in one string."""
  runs = [{"model_dir": fileio.canonical(m.model_dir),
           "model_sha256": fileio.sha256_file(fileio.join(m.model_dir, rundir.MODEL_FILE)),
           "backbone": m.backbone, "image_size": m.image_size,
           "temperature": (m.calibration or {}).get("temperature")} for m in members]
  built_in = {"members": [(r["model_sha256"], r["temperature"]) for r in runs],
              "ensemble": "mean" if len(members) > 1 else None, "threshold": config.threshold,
              "member_outputs": config.member_outputs}
  if specs and any(specs):  # only then: an image-only export keeps the fingerprint it had
    built_in["metadata"] = [spec.to_dict() if spec else None for spec in specs]
  digest = hashlib.sha256(json.dumps(built_in, sort_keys=True).encode()).hexdigest()[:16]
  return {"fingerprint": digest, "ensemble": built_in["ensemble"],
          "member_outputs": config.member_outputs, "members": runs}


def _read_json(path) -> dict | None:
  try:
    value = json.loads(fileio.read_text(path))
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def existing_exports(out: str) -> list[tuple[str, dict | None]]:
  """(file set, the model identity it records, or None when it names none) for each export file
  in `out`."""
  recorded = _read_json(fileio.join(out, PREPROCESSING_FILE))
  top = (recorded or {}).get("model") or None
  sets = [(PREPROCESSING_FILE, top)] if fileio.exists(fileio.join(out, PREPROCESSING_FILE)) else []
  hashes = (recorded or {}).get("files") or {}
  for name in TFLITE_FILES.values():
    path = fileio.join(out, name)
    if fileio.exists(path):
      same = hashes.get(name) == fileio.sha256_file(path)
      sets.append((name, top if same else None))
  for entry in sorted(fileio.listdir(out)):
    name = entry.rstrip("/")
    if name.isdigit() and fileio.exists(fileio.join(out, name, "saved_model.pb")):
      sets.append((f"{name}/", _read_json(fileio.join(out, name, IDENTITY_FILE))))
  return sets


def _whose(found: list[dict | None], identity: dict) -> str:
  if not all(found):
    return "an export that names no model (or whose files changed since it was written)"
  ours = [m["model_sha256"] for m in identity["members"]]
  if all([m.get("model_sha256") for m in f.get("members", [])] == ours for f in found):
    return ("an export of this model with other settings built in (threshold, member_outputs "
            "or temperatures)")
  runs = sorted({m.get("model_dir", "?") for f in found for m in f.get("members", [])})
  return f"another model's export (of {', '.join(runs)})"


def check_no_mix(out: str, identity: dict, overwrite: bool) -> list[str]:
  """Refuses an output folder holding another model's export; returns what --overwrite removes."""
  other = [(what, found) for what, found in existing_exports(out)
           if (found or {}).get("fingerprint") != identity["fingerprint"]]
  if not other or overwrite:
    return [what for what, _ in other]
  names = ", ".join(what for what, _ in other)
  raise ValueError(f"{out} already holds {_whose([f for _, f in other], identity)}: {names}; "
                   "files of two models in one folder would be served together: export into a "
                   "new output_dir, or pass overwrite=True to replace them")


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


def _remove(out: str, stale: list[str], trash: str) -> None:
  """--overwrite: another model's file sets (existing_exports' names) leave `out`."""
  for what in stale:
    path = fileio.join(out, what.rstrip("/"))
    if what.endswith("/") and not fileio.is_remote(out):
      fileio.rename(path, os.path.join(trash, f"stale-{what.rstrip('/')}"))
    elif what.endswith("/"):
      fileio.rmtree(path)
    else:
      fileio.remove(path)


def metadata_settings(specs) -> dict:
  """preprocessing.json["metadata"]: the raw inputs (names, order, types, missing marks, the
  vocabularies TFLite codes index), the TFLite inputs, and each member's spec."""
  columns = metadata_inputs.layout(specs)
  return {
      "inputs": [c.to_dict() for c in columns],
      "tflite_inputs": [{"input": t.name, "dtype": t.dtype.name, "shape": [None, t.shape[1]],
                         "columns": [c.name for c in columns if (c.kind == md.NUMERIC) ==
                                     (t.name == metadata_inputs.NUMERIC_INPUT)]}
                        for t in metadata_inputs.codes_signature(columns)],
      "members": [spec.to_dict() if spec else None for spec in specs],
      "note": "serving_default and serving_uint8 take each column raw, named by 'input' (numeric "
              "float32, NaN = missing; categorical string, \"\" = missing; a category not in "
              "training is encoded as unknown) and encode it in the graph with each member's "
              "training statistics. The TFLite files take metadata_numeric (the numeric columns, "
              "raw, NaN = missing) and metadata_codes (per categorical column the index of its "
              "value in 'vocabulary', -1 = missing or unlisted)",
  }


def _check_metadata_parity(saved: str, members, specs, report: ExportReport) -> None:
  """The served raw-metadata signature against Keras fed the NumPy encoding; ExportCheckError
  (nothing written) beyond FLOAT_TOLERANCE."""
  diff, where = check_served_metadata(saved, members, specs)
  report.metadata_check = (f"SavedModel with raw metadata: largest probability difference vs "
                           f"Keras on encode_rows {diff:.2e} ({where})")
  if not diff <= FLOAT_TOLERANCE:
    raise ExportCheckError(f"the SavedModel's in-graph metadata encoding differs from Keras fed "
                           f"core.metadata.encode_rows by {diff:.2e} (> {FLOAT_TOLERANCE:g}) on "
                           f"{where}; nothing was written")


def _smoke_script() -> str:
  return fileio.read_text(os.path.join(os.path.dirname(__file__), SMOKE_SCRIPT))


def _resolve_threshold(config: ExportConfig) -> tuple[ExportConfig, str]:
  """The decision threshold built into the export, and where it came from: --threshold, else the
  run's (or CV folder's) threshold.json chosen on validation, else 0.5, said so."""
  if config.threshold is not None:
    return config, "fixed (--threshold)"
  stored = rundir.read_threshold(config.model_dir)
  if stored and stored.split != "none":
    threshold, source = stored.value, stored.describe(config.model_dir)
  else:
    threshold, source = 0.5, "0.5 by default: the run stored no threshold chosen on validation"
  return dataclasses.replace(config, threshold=threshold), source


def export(config: ExportConfig) -> ExportReport:
  """bin/export: writes what `config.format` asks for into config.output_dir.

  Everything is built in a hidden folder inside output_dir and renamed into place only when every
  check passed, so a failed export leaves the previous one intact.

  Raises:
    FileNotFoundError / ValueError: bad model directory, output or records, another model's
      export in output_dir (before any work).
    ExportCheckError: float32 TFLite disagrees with Keras (nothing is written).
  """
  config.validate()
  members = load_members(config)
  specs = [m.metadata for m in members]  # each run's metadata.json, checked against its model
  cfg = members[0].cfg
  out = fileio.check_writable_dir(config.output_dir)
  config, threshold_source = _resolve_threshold(config)
  identity = model_identity(members, config, specs)
  stale = check_no_mix(out, identity, config.overwrite)
  records = _check_records(config, cfg)
  classes = members[0].classes
  settings, warn = preprocessing_settings(cfg, config.threshold)
  for m in members[1:]:  # every member's client-side steps are announced, not just the first's
    warn += [w for w in preprocessing_settings(m.cfg, config.threshold)[1] if w not in warn]
  settings["model"] = identity
  settings["threshold_source"] = threshold_source if len(classes) == 2 else None
  if any(specs):
    settings["metadata"] = metadata_settings(specs)
  report = ExportReport(output_dir=out, warnings=warn)
  # Built locally: in a hidden folder inside a local output (renamed into place, atomically), in
  # a temporary folder for a remote one (uploaded at the end, only when every check passed).
  tmp = tempfile.mkdtemp(prefix=".export-", dir=None if fileio.is_remote(out) else out)
  try:
    saved = os.path.join(tmp, "saved_model")
    write_saved_model(members, classes, saved, config.threshold, config.member_outputs, specs)
    fileio.makedirs(os.path.dirname(os.path.join(saved, IDENTITY_FILE)))
    fileio.write_json_atomic(os.path.join(saved, IDENTITY_FILE), identity)
    if any(specs) and len({m.image_size for m in members}) == 1:
      _check_metadata_parity(saved, members, specs, report)
    tflite = _check_tflite(tmp, members, records, config, report, specs) if records else {}
    _remove(out, stale, tmp)
    if config.format != "tflite":
      report.saved_model = fileio.join(out, str(config.version))
      _install(saved, report.saved_model, tmp)
      report.sizes[report.saved_model] = sum(
          fileio.size(fileio.join(report.saved_model, rel))
          for rel in fileio.walk_files(report.saved_model))
      report.smoke_script = fileio.join(out, SMOKE_SCRIPT)
      fileio.write_text_atomic(report.smoke_script, _smoke_script())
    settings["files"] = {}
    for kind, path in tflite.items():
      report.tflite[kind] = fileio.join(out, os.path.basename(path))
      settings["files"][os.path.basename(path)] = fileio.sha256_file(path)
      fileio.publish(path, report.tflite[kind])
      report.sizes[report.tflite[kind]] = fileio.size(report.tflite[kind])
    fileio.write_json_atomic(fileio.join(out, PREPROCESSING_FILE), settings)
  finally:
    fileio.rmtree(tmp)
  report.members = [m.model_dir for m in members]
  return report
