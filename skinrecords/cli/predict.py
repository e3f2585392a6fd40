"""Predicts image files (or the records of one split) with a trained model directory.

Each image goes through the preprocessing recorded in MODEL_DIR/config.json (the converter's own
code: crop, resize, hair removal, JPEG round trip), so predictions match what evaluation sees.
Prints a table (image, probability, predicted class), writes it as CSV with --output_csv, and lists
images that could not be read on stderr. Exits 0 when at least one image was predicted, else 1.
With --records_dir, scores every record of --split of a records folder instead (a make_records
folder, or the SIIM-ISIC Kaggle TFRecords whose test files carry no labels); the image column is
then each record's image_name.

Example:
  predict --model_dir=/runs/densenet_fold0 --input_dir=/clinic/today --output_csv=today.csv
  predict --model_dir=/runs/densenet_fold0 lesion1.jpg lesion2.png
  predict --model_dir=/runs/densenet_fold0 --records_dir=/data/melanoma-512x512 --split=test \
      --output_csv=submission_probs.csv
  predict --model_dir=/runs/cv5 --records_dir=/data/melanoma-512x512 --format=kaggle \
      --output_csv=submission.csv      # the 5 folds' mean, as Kaggle wants it
  predict --model_dir=/runs/meta --input_dir=/clinic/today --metadata_csv=today_patients.csv
      # a model trained with --metadata: image_name,age_approx,sex,... per image
"""

import sys

from absl import app
from absl import flags

from skinrecords.cli import common as cli_common

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Folder written by training (model.keras and "
                                 "config.json), a cross-validation folder (its fold_k runs form "
                                 "an ensemble), or a comma-separated list of runs with the same "
                                 "classes. A run's calibration.json (bin/evaluate "
                                 "--calibrate=temperature) is applied.")
_INPUT_DIR = flags.DEFINE_string("input_dir", None, "Predict every image under this folder "
                                 "(recursive, sorted; hidden files skipped). Can be combined with "
                                 "image paths given as arguments.")
_OUTPUT_CSV = flags.DEFINE_string("output_csv", None, "Also write the predictions to this CSV, "
                                  "laid out by --format (default: image, probability, "
                                  "predicted, plus per-class columns for more than two classes).")
_RECORDS_DIR = flags.DEFINE_string("records_dir", None, "Score the records of --split in this "
                                   "folder (make_records output or SIIM-ISIC .tfrec files) "
                                   "instead of image files.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "valid", "test"], "With --records_dir: "
                           "the split to score.")
_THRESHOLD = flags.DEFINE_string("threshold", "stored", "Two-class decision threshold on P(class "
                                 "1): stored (the one training chose on the validation split, "
                                 "MODEL_DIR/threshold.json; for a cross-validation folder the one "
                                 "chosen on its out-of-fold predictions; 0.5, with a warning, "
                                 "when there is none), or a float strictly between 0 and 1.")
_TTA = flags.DEFINE_integer("tta", 0, "Test-time augmentation: 0 off, or n in 1..8 dihedral "
                            "transforms averaged (as bin/evaluate --tta).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
_EXPLAIN_DIR = flags.DEFINE_string("explain_dir", None, "Also write a Grad-CAM heatmap of the "
                                   "predicted class over each image here, as "
                                   "<image name>.gradcam.png (from the backbone's last "
                                   "convolutional block; without TTA).")
_ENSEMBLE = flags.DEFINE_enum("ensemble", "mean", ["mean", "rank"], "How ensemble members "
                               "combine: mean probability, or mean rank-normalised score.")
_FORMAT = flags.DEFINE_enum("format", "default", ["default", "isic", "kaggle"], "--output_csv "
                            "layout: default (image, probability, predicted), isic (ISIC "
                            "Challenge: image without extension, one float column per class) or "
                            "kaggle (SIIM-ISIC 2020: image_name,target = P(melanoma)).")
_ISIC_COLUMNS = flags.DEFINE_string("isic_columns", None, "With --format=isic: rename class "
                                    "columns, e.g. NotMelanoma:NV,Melanoma:MEL (the scorer wants "
                                    "the ground truth's exact, case-sensitive names).")
_METADATA_CSV = flags.DEFINE_string("metadata_csv", None, "For a model trained with patient "
                                    "metadata (train --metadata; MODEL_DIR/metadata.json), the "
                                    "images' metadata: a CSV with an image name column "
                                    "(image_name, image, image_id or isic_id: the file name, with "
                                    "or without extension) and the columns the model was trained "
                                    "with (extra columns ignored). Empty cells, NA, unknown are "
                                    "missing and encoded as such; an image without a row has "
                                    "every value missing; a category training never saw is "
                                    "encoded as unknown. Both are counted on stderr. Required for "
                                    "such a model with image files; records carry their own.")
flags.mark_flag_as_required("model_dir")


def _configs() -> tuple:
  from skinrecords.evaluation import predict  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return (predict.PredictConfig,)


# Every PredictConfig field is the flag of its name (cli_common.ConfigFlags; tests/test_help.py).
_NOT_FLAGS = {"images": "the command's arguments"}
_CONFIG_FLAGS = cli_common.ConfigFlags(globals(), _configs, "predict", _NOT_FLAGS)



def main(argv):
  if len(argv) < 2 and not _INPUT_DIR.value and not _RECORDS_DIR.value:
    raise app.UsageError("no images: pass image paths as arguments and/or --input_dir=FOLDER, "
                         "or --records_dir=FOLDER")
  from skinrecords.core import fileio  # pylint: disable=g-import-not-at-top
  from skinrecords.evaluation import predict  # pylint: disable=g-import-not-at-top
  from skinrecords.input import pipeline  # pylint: disable=g-import-not-at-top

  threshold = _threshold()

  config = _CONFIG_FLAGS.usage_config(predict.PredictConfig, images=tuple(argv[1:]),
                                      threshold=threshold)
  try:
    rows, rejected, classes = predict.run(config)
  except (ValueError, pipeline.CorruptShardError) as err:
    print(f"predict: {err}", file=sys.stderr)
    return 2
  except OSError as err:  # a missing run, or a remote path that cannot be read (network, scheme)
    print(f"predict: {fileio.describe_error(err)}", file=sys.stderr)
    return 2
  if rows:
    print(predict.format_table(rows, classes))
  _describe_members(config)
  for line in getattr(predict.run, "last_metadata", None) or []:
    print(line, file=sys.stderr)
  applied = getattr(predict.run, "last_threshold", None)
  if applied:
    line = f"decision threshold {applied[0]:.4g}: {applied[1]}".replace(
        f": fixed {applied[0]:g}", ": fixed")
    bar = "!" * 100
    print(f"{bar}\nWARNING: {line}\n{bar}" if applied[2] else line, file=sys.stderr)
  for r in rejected:
    print(f"predict: rejected {r['image']}: {r['reason']}", file=sys.stderr)
  print(f"{len(rows)} predicted, {len(rejected)} rejected"
        + (f"; wrote {config.output_csv}" if config.output_csv else ""), file=sys.stderr)
  return 0 if rows else 1


def _threshold():
  """--threshold as "stored" or a float; a usage error for anything else."""
  text = _THRESHOLD.value.strip().lower()
  if text == "stored":
    return "stored"
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not 0.0 < value < 1.0:
    raise app.UsageError(f"--threshold={_THRESHOLD.value}: expected 'stored' or a float strictly "
                         "between 0 and 1, e.g. --threshold=0.3")
  return value


def _describe_members(config) -> None:
  """Says on stderr which runs were combined and which calibration was applied."""
  from skinrecords.core import rundir  # pylint: disable=g-import-not-at-top
  from skinrecords.evaluation import ensemble  # pylint: disable=g-import-not-at-top

  dirs = ensemble.member_dirs(config.model_dir)
  cals = {d: rundir.read_calibration(d) for d in dirs}
  if len(dirs) > 1:
    print(f"ensemble: {config.ensemble} of {len(dirs)} runs: {', '.join(dirs)}", file=sys.stderr)
  for d, cal in cals.items():
    if cal and cal["method"] == "platt":
      print(f"{d}: Platt scaling (slope {cal['slope']:.3f}, intercept {cal['intercept']:+.3f}) "
            f"applied ({rundir.CALIBRATION_FILE})", file=sys.stderr)
    elif cal:
      print(f"{d}: temperature {cal['temperature']:.3f} applied ({rundir.CALIBRATION_FILE})",
            file=sys.stderr)


def run():
  """Console entry point (`skinrecords-predict`)."""
  cli_common.run(main, "skinrecords-predict")


if __name__ == "__main__":
  run()
