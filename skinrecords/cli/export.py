"""Exports a trained model directory for TensorFlow Serving (SavedModel) and phones (TFLite).

Writes OUTPUT_DIR/1/ (SavedModel: `serving_default` takes the raw JPEG/PNG files, any size, and
does the converter's EXIF orientation, centre crop and resize in the graph; `serving_uint8` takes
uint8 [B, S, S, 3]), OUTPUT_DIR/score_folder.py (scores a folder with TensorFlow only), OUTPUT_DIR/model_float32.tflite and model_dynamic_range.tflite (uint8
input), and OUTPUT_DIR/preprocessing.json (what the client must do before sending an image). The
TFLite models are checked against the Keras model on the records' valid (or test) split; the
export fails, writing nothing, when float32 differs by more than 1e-4. A run trained with patient
metadata exports signatures that also take each metadata column raw (float32, NaN = missing; string,
"" = missing), encoded in the graph with the run's statistics; TFLite takes metadata_numeric and
metadata_codes (preprocessing.json["metadata"]); served-vs-Keras parity is checked on rows with
missing values and an unseen category.

Example:
  export --model_dir=/runs/densenet_fold0 --output_dir=/serving/melanoma
  export --model_dir=/runs/densenet_fold0 --output_dir=/app/assets --format=tflite
  export --model_dir=/runs/cv_densenet --output_dir=/serving/melanoma_cv   # a 5-fold ensemble
  python /serving/melanoma/score_folder.py photos/    # the deployment's own check
"""

import sys

from absl import app
from absl import flags

from skinrecords.cli import common as cli_common
from skinrecords.core import fileio

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Folder written by training (model.keras and "
                                 "config.json), a cross-validation folder (every fold_k), or a "
                                 "comma list of either: exported as one ensemble, the mean of "
                                 "the runs' calibrated probabilities.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write the export (created; "
                                  "checked writable before any work).")
_FORMAT = flags.DEFINE_enum("format", "all", ["saved_model", "tflite", "all"],
                            "What to export.")
_RECORDS_DIR = flags.DEFINE_string("records_dir", None, "Records whose valid (or test) split the "
                                   "TFLite models are checked on; default: the model's training "
                                   "records from config.json.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 256, "Check TFLite on at most this many "
                                     "images.")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Two classes: the exported predicted_class is "
                                "1 when P(class 1) >= threshold (as bin/predict --threshold). "
                                "Default: the threshold training chose on the validation split "
                                "(MODEL_DIR/threshold.json; 0.5 when there is none); written to "
                                "preprocessing.json with its source.")
_VERSION = flags.DEFINE_integer("version", 1, "TensorFlow Serving version folder: "
                                "OUTPUT_DIR/VERSION/ (replaced if present).")
_ENSEMBLE = flags.DEFINE_enum("ensemble", "mean", ["mean", "rank"],
                              "Several runs in --model_dir: how they combine. Only mean can be "
                              "served (rank scores each image against the others in its request, "
                              "so it is refused).")
_MEMBER_OUTPUTS = flags.DEFINE_boolean("member_outputs", False, "An ensemble's signatures also "
                                       "return member_probabilities ([B, members] or [B, "
                                       "members, K]), each member's calibrated answer.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace another model's export found in "
                                  "--output_dir (refused otherwise: two models' files in one "
                                  "folder would be served together).")
flags.mark_flags_as_required(["model_dir", "output_dir"])


def _configs() -> tuple:
  from skinrecords.serving import export  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return (export.ExportConfig,)


# Every ExportConfig field is the flag of its name (cli_common.ConfigFlags; tests/test_help.py).
_CONFIG_FLAGS = cli_common.ConfigFlags(globals(), _configs, "export")


_FLAG_NAMES = ("format", "max_examples", "threshold", "version", "records_dir", "ensemble",
               "member_outputs", "overwrite=True", "output_dir", "model_dir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every input is a flag")
  # Imports TensorFlow, so only here.
  from skinrecords.serving import export  # pylint: disable=g-import-not-at-top

  config = _CONFIG_FLAGS.usage_config(export.ExportConfig)
  try:
    report = export.export(config)
  except (FileNotFoundError, ValueError, export.ExportCheckError) as err:
    print(f"export: {cli_common.as_flags(str(err), _FLAG_NAMES)}", file=sys.stderr)
    return 2
  except OSError as err:  # a remote output that failed mid-upload (network, permissions)
    print(f"export: {fileio.describe_error(err)}", file=sys.stderr)
    return 2
  for warning in report.warnings:  # loud: stderr too, where a pipeline's log would keep it
    print(f"export: WARNING: {warning}", file=sys.stderr)
  print("\n".join(report.lines()))
  return 0


def run():
  """Console entry point (`skinrecords-export`)."""
  cli_common.run(main, "skinrecords-export")


if __name__ == "__main__":
  run()
