"""Exports a trained model directory for TensorFlow Serving (SavedModel) and phones (TFLite).

Writes OUTPUT_DIR/1/ (SavedModel: `serving_default` takes encoded JPEG/PNG bytes, `serving_uint8`
takes uint8 [B, S, S, 3]), OUTPUT_DIR/model_float32.tflite and model_dynamic_range.tflite (uint8
input), and OUTPUT_DIR/preprocessing.json (what the client must do before sending an image). The
TFLite models are checked against the Keras model on the records' valid (or test) split; the
export fails, writing nothing, when float32 differs by more than 1e-4.

Example:
  export --model_dir=/runs/densenet_fold0 --output_dir=/serving/melanoma
  export --model_dir=/runs/densenet_fold0 --output_dir=/app/assets --format=tflite
"""

import sys

from absl import app
from absl import flags

from skinrecords import fileio
from skinrecords.cli import common as cli_common

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Folder written by training: model.keras and "
                                 "config.json.")
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
flags.mark_flags_as_required(["model_dir", "output_dir"])

_FLAG_NAMES = ("format", "max_examples", "threshold", "version", "records_dir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every input is a flag")
  from skinrecords import export  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

  config = cli_common.make_config(
      export.ExportConfig,
      model_dir=_MODEL_DIR.value, output_dir=_OUTPUT_DIR.value, format=_FORMAT.value,
      records_dir=_RECORDS_DIR.value, max_examples=_MAX_EXAMPLES.value,
      threshold=_THRESHOLD.value, version=_VERSION.value)
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
