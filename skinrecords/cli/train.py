r"""Trains a skin-lesion classifier on make_records output, on one GPU, several, or the CPU.

The per-replica forward/backward pass and the augmentation are XLA-compiled inside
`strategy.run`; the gradient all-reduce and optimizer step run outside (Keras 3 `fit` silently turns
XLA off under a strategy). Writes to --model_dir: model.keras (best validation AUC), config.json,
history.csv, accuracy.png / loss.png / auc.png, TensorBoard logs in logs/, and a backup/ it resumes
from when restarted with the same command.

Several hosts: run the same command on every host with --strategy=multi_worker and the cluster
from TF_CONFIG, from --worker_hosts=h1:port,h2:port --task_index=i, or from SLURM (--cluster=slurm,
under srun). Worker 0 is the chief and the only one writing to --model_dir, which must be on a
filesystem all hosts see (restarts resume from its backup). --data_service=grpc://host:port sends
the training input through a tf.data service (bin/data_service) so decoding can run elsewhere.

Example:
  train --records_dir=/data/isic_records --model_dir=/runs/densenet --backbone=densenet121 \
      --weights=imagenet --warmup_epochs=2 --epochs=20 --balance=oversample
  train ... --strategy=multi_worker --worker_hosts=10.0.0.1:12345,10.0.0.2:12345 --task_index=0
"""

import dataclasses
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging

from skinrecords.cli import common as cli_common

_RECORDS_DIR = flags.DEFINE_string("records_dir", None, "Folder written by make_records (or of "
                                   "SIIM-ISIC Kaggle .tfrec files).")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Where the model, curves and logs go.")
_BACKBONE = flags.DEFINE_string("backbone", "densenet121", "Network: simple_cnn (the notebook's "
                                "small CNN, for CPU demos), vgg16, resnet50, densenet121, "
                                "efficientnetv2s, or any keras.applications constructor by name "
                                "(EfficientNetB0..B7, EfficientNetV2B0..L, ConvNeXtTiny..XLarge, "
                                "ResNet50V2, Xception, InceptionV3, MobileNetV3Large, ...), each "
                                "with its own ImageNet preprocessing inside the model.")
_WEIGHTS = flags.DEFINE_string("weights", "auto", "auto (imagenet for the keras.applications "
                               "backbones, none for simple_cnn), imagenet, none, or a path to a "
                               "weights file (.weights.h5/.h5/.keras). Offline, imagenet needs the "
                               "file in ~/.keras/models/.")
_FREEZE = flags.DEFINE_string("freeze", "none", "Backbone layers not trained: all, none, or "
                              "from:LAYER (layers before LAYER frozen, e.g. from:block4_conv1).")
_DROPOUT = flags.DEFINE_float("dropout", 0.3, "Dropout before the classification head.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Training image side in pixels; 0 uses the "
                                   "records' size (other sizes are resized on read).")
_STRATEGY = flags.DEFINE_enum("strategy", "auto", ["auto", "one_device", "mirrored",
                                                   "multi_worker"],
                              "auto: MirroredStrategy over all GPUs if several, else one device. "
                              "multi_worker: one process per host, all-reducing over the network "
                              "(cluster from --cluster).")
_CLUSTER = flags.DEFINE_enum("cluster", "tf_config", ["tf_config", "slurm"],
                             "Where --strategy=multi_worker finds its peers. tf_config: the "
                             "TF_CONFIG environment variable, or --worker_hosts/--task_index "
                             "(neither: a single worker); slurm: the SLURM job step this process "
                             "was started in by srun (tf.distribute.cluster_resolver."
                             "SlurmClusterResolver).")
_WORKER_HOSTS = flags.DEFINE_list("worker_hosts", None, "Every worker's host:port, the same list "
                                  "on every host, e.g. 10.0.0.1:12345,10.0.0.2:12345; the first is "
                                  "the chief. Turned into TF_CONFIG; needs --task_index.")
_TASK_INDEX = flags.DEFINE_integer("task_index", None, "This host's position in --worker_hosts "
                                   "(0-based; 0 is the chief).")
_CLUSTER_TIMEOUT = flags.DEFINE_float("cluster_timeout", 600.0, "With --strategy=multi_worker: "
                                      "seconds to wait at start for every other worker to come "
                                      "up (a line every 10 s names the ones missing), then give "
                                      "up with exit 2. Ctrl-C/SIGTERM stop the wait at once.")
_SLURM_PORT = flags.DEFINE_integer("slurm_port_base", 8888, "With --cluster=slurm: the port of "
                                   "each node's first task; further tasks on a node add 1, 2, ...")
_DATA_SERVICE = flags.DEFINE_string("data_service", "", "grpc://host:port of a tf.data service "
                                    "dispatcher (bin/data_service): the training input is read and "
                                    "decoded by its workers, files handed out dynamically; "
                                    "validation stays local. Empty: input built in this process.")
_DATA_SERVICE_TIMEOUT = flags.DEFINE_float("data_service_timeout", 300.0, "With --data_service: "
                                           "seconds to wait at start for the dispatcher to "
                                           "answer (a line every 10 s), then give up with exit 2.")
_XLA = flags.DEFINE_enum("xla", "auto", ["auto", "on", "off", "augment"],
                         "XLA compilation of the per-replica train step. on: augmentation, forward "
                         "and backward in one XLA program; augment: only the augmentation (the "
                         "model runs on TensorFlow's kernels); off: none. auto: on with GPUs/TPUs; "
                         "augment on the CPU, where XLA's convolutions ran at ~0.5x of TensorFlow's "
                         "oneDNN ones but the fused augmentation needs XLA (off if --noaugment).")
_MIXED = flags.DEFINE_enum("mixed_precision", "auto", ["auto", "on", "off"],
                           "Mixed-precision compute (float32 weights and statistics). auto: "
                           "float16 on GPUs with tensor cores (compute capability >= 7.0), "
                           "bfloat16 on CPUs with native bfloat16 (avx512_bf16/amx_bf16), else "
                           "float32. on: float16 on GPUs, bfloat16 on such CPUs; on a CPU "
                           "without native low precision it runs ~6x slower than float32 (a "
                           "warning says so). The choice is logged and stored in config.json.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch size, split evenly over all "
                              "replicas of all workers (must be a multiple of their number).")
_LR = flags.DEFINE_float("learning_rate", 1e-4, "Adam learning rate (head-only during warm-up).")
_FT_LR = flags.DEFINE_float("fine_tune_learning_rate", 1e-5, "Learning rate after the warm-up.")
_WARMUP = flags.DEFINE_integer("warmup_epochs", 0, "Epochs training only the head (backbone "
                               "frozen) before applying --freeze.")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Total epochs, warm-up included.")
_STEPS = flags.DEFINE_integer("steps_per_epoch", 0, "0: train examples // batch size (manifest).")
_FOLD = flags.DEFINE_string("fold", None, "k: train on every fold but k, validate on it (records "
                            "made with --folds). all: cross-validation, every fold in turn into "
                            "MODEL_DIR/fold_k (resumable), then MODEL_DIR/oof.csv (out-of-fold "
                            "predictions), cv_metrics.json and cv_roc.png.")
_OOF_TTA = flags.DEFINE_integer("oof_tta", 0, "With --fold=all: test-time augmentation of the "
                                "out-of-fold predictions (0: off; n: mean over the first n "
                                "dihedral transforms, as evaluate --tta).")
_BALANCE = flags.DEFINE_enum("balance", "none", ["none", "oversample", "class_weights"],
                             "Class imbalance: class-balanced sampling, or loss weights n/(k*n_c).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for initialisation, input order and augmentation.")
_DETERMINISTIC = flags.DEFINE_enum(
    "deterministic", "auto", ["auto", "on", "off"], "Bit-identical runs from one --seed: "
    "TensorFlow op determinism, tf.data in order. auto: on without a GPU (it cost <= 5 %% on the "
    "CPU), off on GPUs (deterministic GPU kernels can cost much more; pass on to have it there "
    "too). BUILD_NOTES, 'Deterministic training'.")
_SELECT_BY = flags.DEFINE_enum(
    "select_by", "auto", ["auto", "val_loss", "val_auc_loss", "val_auc", "last"],
    "Which epoch model.keras keeps (early stopping counts from it). val_loss: the lowest "
    "validation loss; val_auc_loss: the lowest validation loss among epochs within 0.005 "
    "validation AUC of the kept one; val_auc: the highest validation AUC (a saturated AUC can keep "
    "an epoch whose scores all sit on one side of 0.5); last: the last epoch. auto: val_loss, and "
    "last for the folds of --fold=all (so the out-of-fold estimate is honest).")
_THRESHOLD_RULE = flags.DEFINE_string(
    "threshold_rule", "youden", "Two classes: how the decision threshold stored in "
    "MODEL_DIR/threshold.json is chosen on the validation split after training, for evaluate, "
    "predict and export: youden (max sensitivity + specificity), sensitivity:0.9 (the best "
    "specificity with sensitivity >= 0.9), or fixed:0.5. Without a validation split: 0.5.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Start afresh in a --model_dir that holds "
                                  "another run (its model, history, backup and logs are deleted) "
                                  "instead of refusing; without it a matching run is resumed.")
_RESTORE_MODEL = flags.DEFINE_boolean(
    "restore_model", False, "When model.keras is found damaged (0 bytes, truncated) and backup/ "
    "no longer holds its best epoch, save backup/'s last epoch as model.keras (summary.json says "
    "which epoch it is) and go on. A damaged model.keras whose epoch backup/ holds is restored "
    "without it.")
# Patient metadata (issue 24; README "Metadata").
_METADATA = flags.DEFINE_string(
    "metadata", "", "Patient metadata as a second model input: all (every column the records "
    "hold: make_records --metadata_columns, or the SIIM-ISIC files' sex, age_approx and "
    "anatom_site_general_challenge) or COL,COL. Numeric columns are standardised with the "
    "training split's statistics (with --fold, that fold's training part's) plus a missing "
    "indicator; categorical ones one-hot with an 'unknown' slot. The encoding is kept in "
    "MODEL_DIR/metadata.json. Empty: image only.")
_METADATA_WIDTH = flags.DEFINE_integer("metadata_width", 32, "With --metadata: units of each of "
                                       "the two dense layers of the metadata branch, whose "
                                       "output joins the pooled image features before the head.")
_METADATA_DROPOUT = flags.DEFINE_float("metadata_dropout", 0.3, "With --metadata: dropout after "
                                       "each dense layer of the metadata branch.")
_CACHE = flags.DEFINE_boolean("cache", False, "Keep the encoded records in memory after epoch 1.")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show progress bars.")
# Training recipe (skinrecords/model/recipes.py); the defaults are the recipe from before these
# flags.
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adam", ["adam", "adamw"], "adamw: decoupled weight "
                               "decay (--weight_decay; biases and norm parameters not decayed).")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay, e.g. 0.05; needs "
                                   "--optimizer=adamw.")
_LR_SCHEDULE = flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine"],
                                 "Learning rate over each phase (head-only warm-up, then training): "
                                 "constant, or cosine down to --lr_floor x the learning rate.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 0, "Linear learning-rate warm-up over this "
                                     "many optimizer steps at the start of each phase.")
_LR_FLOOR = flags.DEFINE_float("lr_floor", 0.0, "Where the cosine schedule ends, as a fraction of "
                               "the learning rate, in [0, 1).")
_LOSS = flags.DEFINE_enum("loss", "bce", ["bce", "focal"], "bce: cross-entropy (binary, or "
                          "categorical with more classes); focal: focal loss (--focal_gamma).")
_LABEL_SMOOTHING = flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing in [0, 1) for "
                                      "either loss (validation loss stays unsmoothed).")
_FOCAL_GAMMA = flags.DEFINE_float("focal_gamma", 2.0, "Focusing parameter of --loss=focal (0: "
                                  "cross-entropy).")
_SYNC_BN = flags.DEFINE_boolean("sync_batchnorm", False, "BatchNorm statistics over the global "
                                "batch (all replicas and workers), for small per-replica batches. "
                                "Synchronised layers train unfused (Keras' own code, slower: the "
                                "fused kernel cannot all-reduce its moments).")
_PATIENCE = flags.DEFINE_integer("early_stopping_patience", 0, "Stop after this many epochs "
                                 "without a better epoch than the saved one; 0: never.")
# Augmentation: defaults reproduce the notebook's ImageDataGenerator.
_AUGMENT = flags.DEFINE_boolean("augment", True, "On-device augmentation (off: none at all).")
_HFLIP = flags.DEFINE_boolean("horizontal_flip", True, "Random left-right flips.")
_VFLIP = flags.DEFINE_boolean("vertical_flip", True, "Random up-down flips.")
_ROTATION = flags.DEFINE_float("rotation_range", 60.0, "Max rotation in degrees.")
_SHEAR = flags.DEFINE_float("shear_range", 0.3, "Max shear angle in degrees (ImageDataGenerator "
                            "semantics: 0.3 means 0.3 degrees).")
_WSHIFT = flags.DEFINE_float("width_shift_range", 0.3, "Max shift, fraction of the width.")
_HSHIFT = flags.DEFINE_float("height_shift_range", 0.3, "Max shift, fraction of the height.")
_ZOOM = flags.DEFINE_float("zoom_range", 0.0, "Zoom factor drawn in [1-z, 1+z] per axis.")
_INTERP = flags.DEFINE_enum("interpolation", "bilinear", ["bilinear", "nearest"], "Resampling.")
_FILL = flags.DEFINE_enum("fill_mode", "nearest", ["nearest", "reflect", "constant"],
                          "How pixels from outside the image are filled.")
_FILL_VALUE = flags.DEFINE_float("fill_value", 0.0, "With --fill_mode=constant: the value "
                                 "(0..255) of pixels from outside the image.")
_BRIGHT = flags.DEFINE_float("brightness", 0.0, "Max brightness delta in 0..255 units (0: off).")
_CONTRAST = flags.DEFINE_float("contrast", 0.0, "Contrast factor in [1-c, 1+c] (0: off).")
_SAT = flags.DEFINE_float("saturation", 0.0, "Saturation factor in [1-s, 1+s] (0: off).")
_HUE = flags.DEFINE_float("hue", 0.0, "Max hue delta as a fraction of the circle (0: off).")

flags.mark_flags_as_required(["records_dir", "model_dir"])
_MAX_IMAGE_SIZE = 8192  # make_records' largest --image_size (preprocess)
# The fields of the train configs (train.TrainConfig and the ModelConfig, AugmentConfig and
# RecipeConfig it holds) NOT set from the flag of their name, and why. Every other field must have
# a flag of its name with its default: _from_flags refuses to build a config otherwise, and
# _CONFIG_FLAGS.problems() (tests/test_help.py) checks the defaults, so a field added to a config
# cannot be forgotten here (AugmentConfig.fill_value was: --fill_value exists since issue 22).
_NOT_FLAGS = {
    "model": "a nested config (ModelConfig, from its own fields' flags)",
    "augment": "a nested config (AugmentConfig; --noaugment makes it AugmentConfig.none())",
    "recipe": "a nested config (RecipeConfig, from its own fields' flags)",
    "image_size": "--image_size=0 means the records' size",
    "num_classes": "the records' number of classes",
    "fold": "--fold also takes 'all' (cross-validation)",
    "metadata_features": "the encoded width of --metadata's columns, from the records",
}

def _train_configs() -> tuple:
  # pylint: disable-next=g-import-not-at-top
  from skinrecords.input import augment
  from skinrecords.model import models, recipes
  from skinrecords.training import train
  return train.TrainConfig, models.ModelConfig, augment.AugmentConfig, recipes.RecipeConfig


# Every train config field is the flag of its name but the _NOT_FLAGS (cli_common.ConfigFlags).
_CONFIG_FLAGS = cli_common.ConfigFlags(globals(), _train_configs, "train", _NOT_FLAGS)


def _from_flags(cls, **given):
  """`cls` with each field from the flag of its name, `given` (the _NOT_FLAGS fields) excepted."""
  return _CONFIG_FLAGS.build(cls, **given)



def _recipe_flags() -> tuple:
  """The recipe's fields, named as --flags in its error messages."""
  from skinrecords.model import recipes  # pylint: disable=g-import-not-at-top
  return recipes.FIELDS


# Other field names the config's one-line errors show as --flags (not all: "augment", "cache" or
# "epochs" also occur as words in those lines).
_NAMED_IN_ERRORS = ("fold", "oof_tta", "seed", "learning_rate", "fine_tune_learning_rate",
                    "select_by", "threshold_rule", "deterministic")


def _fold():
  """--fold as an int, None, or "all" (cross-validation)."""
  text = _FOLD.value
  if text is None or text.strip().lower() == "all":
    return text and "all"
  try:
    fold = int(text)
  except ValueError:
    fold = -1
  if fold < 0:
    raise app.UsageError(f"--fold={text}: expected a fold number (0, 1, ...) or 'all'")
  return fold


def _config():
  # pylint: disable-next=g-import-not-at-top
  from skinrecords.input import augment, pipeline
  from skinrecords.model import inference, models, recipes
  from skinrecords.training import cv, train

  fold = _fold()
  try:
    info = pipeline.load_info(_RECORDS_DIR.value)
  except (OSError, ValueError) as err:
    raise app.UsageError(f"--records_dir={_RECORDS_DIR.value}: {err}") from err
  size = _IMAGE_SIZE.value or info.image_size
  if not size:
    raise app.UsageError(f"--records_dir={_RECORDS_DIR.value} does not record an image size: "
                         "pass --image_size")
  aug = _from_flags(augment.AugmentConfig) if _AUGMENT.value else augment.AugmentConfig.none()
  config = _from_flags(
      train.TrainConfig, fold=None if fold == "all" else fold, augment=aug,
      model=_from_flags(models.ModelConfig, image_size=size, num_classes=max(info.num_classes, 2),
                        metadata_features=0),
      recipe=_from_flags(recipes.RecipeConfig))
  try:
    config.validate()
    info.select("train", config.fold)  # a folder of test files only has no "train" split
    if fold == "all":
      config = cv.cv_config(config)
      config.validate()
      cv.fold_ids(info)
      inference.check_tta(_OOF_TTA.value, "--oof_tta")
  except ValueError as err:
    message = re.sub(r"\b(Model|Augment)Config\.", "--", str(err))  # their fields are flags
    raise app.UsageError(cli_common.as_flags(message, _recipe_flags() + _NAMED_IN_ERRORS)) from err
  if not info.has_labels("train"):
    raise app.UsageError(f"--records_dir={_RECORDS_DIR.value}: the training files carry no "
                         "labels (target); train on labelled records")
  _check_metadata(info, config.metadata, cv.fold_ids(info) if fold == "all" else [config.fold])
  return config


def _check_metadata(info, names: str, folds) -> None:
  """--metadata against the records, before anything is built: every column known, with the
  statistics of each fold that will train (ValueError, one line, naming what the records have)."""
  # pylint: disable-next=g-import-not-at-top
  from skinrecords.input import metadata_input as input_metadata

  for fold in folds:
    try:
      input_metadata.select(info, names, fold)
    except ValueError as err:  # "metadata=...: ..." or a column without fold statistics
      text = str(err)
      raise app.UsageError(("--" if text.startswith("metadata=") else "--metadata: ") +
                           text) from err


def _set_cluster():
  """Turns --worker_hosts/--task_index or SLURM into TF_CONFIG, before TensorFlow runs any op."""
  from skinrecords.training import distribute  # pylint: disable=g-import-not-at-top

  try:
    tf_config = distribute.configure_cluster(_STRATEGY.value, _CLUSTER.value, _WORKER_HOSTS.value,
                                             _TASK_INDEX.value, _SLURM_PORT.value)
  except ValueError as err:
    raise app.UsageError(cli_common.as_flags(str(err), (
        "strategy", "cluster", "worker_hosts", "task_index"))) from err
  if tf_config:
    logging.info("TF_CONFIG=%s", tf_config)


def _data_service_answers() -> bool:
  """Waits (bounded, with progress lines) for the --data_service dispatcher: without it the input
  pipeline waits forever, silently (issue 27)."""
  from skinrecords.core import waiting  # pylint: disable=g-import-not-at-top
  from skinrecords.input import data_service  # pylint: disable=g-import-not-at-top

  host, port = data_service.parse_address(_DATA_SERVICE.value, "--data_service")
  try:
    waiting.wait_until_reachable([waiting.Peer("the tf.data service dispatcher", host, port)],
                                 _DATA_SERVICE_TIMEOUT.value, 10.0, "--data_service_timeout")
  except waiting.WaitTimeout as err:
    print(f"train: --data_service={_DATA_SERVICE.value}: {err}", file=sys.stderr)
    return False
  return True


def _quiet_keras_internals() -> None:
  """TensorFlow's own INFO lines (`functional_saver.py ... Sharding callback duration` at every
  backup save) only with --verbosity >= 1; this package's INFO lines stay."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  if logging.get_verbosity() < 1:
    std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)


def _final_line(result: dict) -> str:
  """The human summary: which epoch model.keras holds, chosen how, with what metrics."""
  m, epoch = result["best_metrics"], result["best_epoch"]
  shown = ", ".join(f"{k} {m[k]:.4f}" for k in ("val_auc", "val_loss", "val_accuracy", "loss")
                    if m.get(k) is not None)
  by = {"val_auc": "validation AUC", "val_loss": "validation loss",
        "val_auc_loss": "validation loss among the epochs within 0.005 of the best validation AUC",
        "val_loss_fallback": "validation loss (AUC undefined)", "last": "last epoch",
        "loss": "training loss (no validation split)"}.get(result["selected_by"], "-")
  stop = (f"; stopped early after epoch {result['epochs_done']} (--early_stopping_patience)"
          if result.get("stopped_early") else "")
  t = result.get("threshold") or {}
  threshold = (f"\ndecision threshold {t['value']:.4g}: {t['source']} (threshold.json; evaluate "
               "and predict use it)" if t.get("split") != "none" else
               f"\ndecision threshold: {t.get('source')}") if t else ""
  from skinrecords.core import fileio, metadata  # pylint: disable=g-import-not-at-top
  spec = (", metadata.json (the encoding of its metadata input)" if fileio.exists(
      fileio.join(result["model_dir"], metadata.SPEC_FILE)) else "")
  return (f"model.keras holds epoch {epoch} of {result['epochs_done']} (best by {by}){stop}: "
          f"{shown}{threshold}\n"
          f"run files in {result['model_dir']}: config.json, history.csv, summary.json, "
          f"accuracy/loss/auc.png, logs/{spec}")


def _cross_validate(config, strategy) -> int:
  """--fold=all: every fold, then the out-of-fold files; one line per fold, the summary last."""
  from skinrecords.training import cv, distribute  # pylint: disable=g-import-not-at-top

  def echo(line):
    print(line, flush=True)
  result = cv.run_cv(config, strategy, oof_tta=_OOF_TTA.value, echo=echo)
  if result["chief"]:
    print(cv.format_cv(result))
    print(f"cross-validation files in {config.model_dir}: fold_0 ... fold_"
          f"{len(result['folds']) - 1}/, oof.csv, cv_metrics.json, cv_roc.png")
  else:
    print(f"worker done ({distribute.task_name(strategy)}); the chief writes {config.model_dir}")
  # As after a single run (below): skip TensorFlow's slow teardown, streams flushed.
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # pylint: disable=protected-access


def _check_flags(argv) -> None:
  """Flag errors before TensorFlow loads (5-15 s here): --fold is parsed now, typos included."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not 0 <= _IMAGE_SIZE.value <= _MAX_IMAGE_SIZE:  # 100000 ran out of memory after 15 s
    raise app.UsageError(f"--image_size={_IMAGE_SIZE.value}: expected 0 (the records' size) or a "
                         f"side in pixels up to {_MAX_IMAGE_SIZE}, as make_records accepts")
  if _fold() != "all" and _OOF_TTA.value:
    raise app.UsageError(f"--oof_tta={_OOF_TTA.value} applies only to --fold=all")
  for flag in (_CLUSTER_TIMEOUT, _DATA_SERVICE_TIMEOUT):
    if not flag.value > 0:
      raise app.UsageError(f"--{flag.name}={flag.value}: give a number of seconds above 0")


def _strategy():
  """The tf.distribute strategy (None: the cluster did not come up; said on stderr). It comes
  first: MultiWorkerMirroredStrategy must exist before any other TF op."""
  # pylint: disable-next=g-import-not-at-top
  from skinrecords.core import waiting
  from skinrecords.training import distribute

  _set_cluster()
  try:
    strategy = distribute.make_strategy(_STRATEGY.value, cluster_timeout=_CLUSTER_TIMEOUT.value)
  except ValueError as err:  # this worker's port is in use
    raise app.UsageError(cli_common.as_flags(str(err), ("worker_hosts",))) from err
  except waiting.WaitTimeout as err:
    print(f"train: {err}", file=sys.stderr)
    return None
  _quiet_keras_internals()
  if _BATCH.value % strategy.num_replicas_in_sync:
    raise app.UsageError(f"--batch_size={_BATCH.value} does not split evenly over "
                         f"{strategy.num_replicas_in_sync} replicas; use a multiple of "
                         f"{strategy.num_replicas_in_sync}")
  return strategy


def _train(config, strategy):
  """train.train's result, or the exit status of a user error (said on stderr) or of --fold=all."""
  # pylint: disable-next=g-import-not-at-top
  from skinrecords.core import fileio, rundir
  from skinrecords.input import pipeline
  from skinrecords.model import models
  from skinrecords.training import train

  try:
    if _fold() == "all":
      return _cross_validate(config, strategy)
    return train.train(config, strategy)
  except (models.WeightsUnavailableError, pipeline.CorruptShardError, rundir.RunDirError,
          train.TrainError) as err:
    print(f"train: {cli_common.as_flags(str(err), _recipe_flags() + ('freeze',))}",
          file=sys.stderr)
    return 2
  except OSError as err:  # a missing file, or a remote path that cannot be read (network, scheme)
    print(f"train: {fileio.describe_error(err)}", file=sys.stderr)
    return 2
  except Exception as err:  # pylint: disable=broad-except  (TensorFlow's errors, sorted below)
    line = train.resource_error(err, config)
    if line is None:
      raise
    print(f"train: {line}", file=sys.stderr)
    return 2


def main(argv):
  _check_flags(argv)
  strategy = _strategy()
  if strategy is None:
    return 2
  config = _config()
  if config.data_service and not _data_service_answers():
    return 2
  result = _train(config, strategy)
  if isinstance(result, int):
    return result
  if not result["chief"]:
    from skinrecords.training import distribute  # pylint: disable=g-import-not-at-top
    print(f"worker done ({distribute.task_name(strategy)}); the chief writes {config.model_dir}")
    return 0
  if result["epochs_this_run"] == 0 and result.get("stopped_early"):
    print(f"{config.model_dir} stopped early after {result['epochs_done']} epochs; nothing to "
          "train (raise --early_stopping_patience to continue, or --overwrite)")
  elif result["epochs_this_run"] == 0:
    print(f"{config.model_dir} already holds all {result['epochs_done']} epochs; nothing to train "
          "(raise --epochs to continue, or --overwrite to start afresh)")
  print(_final_line(result))
  # Every file is written and synced (fileio, rundir); what is left is TensorFlow's teardown of
  # tf.data and collective threads at interpreter exit, which took 3-6 s after the "final weights"
  # line here and 19-34 s in 2 of ~10 runs (issue 9). Skip it: exit now, with the streams flushed.
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # pylint: disable=protected-access


def run():
  """Console entry point (`skinrecords-train`)."""
  cli_common.run(main, "skinrecords-train")


if __name__ == "__main__":
  run()
