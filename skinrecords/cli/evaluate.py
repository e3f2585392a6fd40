"""Evaluates a trained model directory on one split of its records.

Reads every example of the split exactly once with its own label, and writes to --output_dir
(default MODEL_DIR/eval_<split>): metrics.json, report.txt, predictions.csv (image_name, label,
probability, predicted), confusion_matrix.png, roc.png, pr.png and calibration.png (reliability
diagram; ECE and Brier score in metrics.json). Prints the classification report,
ROC AUC, PR AUC and the decision threshold, and warns loudly on stderr when 99% or more of the
predictions fall in one class. Exits 2 when the model directory or records cannot be used.

Example:
  evaluate --model_dir=/runs/densenet_fold0 --split=test --threshold=youden --tta=8
  evaluate --model_dir=/runs/cv5 --split=test --calibrate=temperature   # 5 folds' ensemble
  evaluate --model_dir=/runs/densenet,/runs/effnet --output_dir=/runs/ens --isic_truth_csv=t.csv
"""

import sys

from absl import app
from absl import flags

from skinrecords.cli import common as cli_common

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Folder written by training (model.keras and "
                                 "config.json), a cross-validation folder (train --fold=all: its "
                                 "fold_k runs form an ensemble), or a comma-separated list of "
                                 "runs with the same classes (an ensemble).")
_RECORDS_DIR = flags.DEFINE_string("records_dir", None, "Records folder to evaluate on (default: "
                                   "the records_dir in MODEL_DIR/config.json).")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "valid", "test"], "Split to evaluate. With "
                           "a fold, train/valid are the training folds / the held-out fold.")
_FOLD = flags.DEFINE_integer("fold", None, "Cross-validation fold for --split=train/valid and the "
                             "Youden threshold (default: the fold in MODEL_DIR/config.json).")
_THRESHOLD = flags.DEFINE_string("threshold", "stored", "Two-class decision threshold on P(class "
                                 "1): stored (the one training chose on the validation split, "
                                 "MODEL_DIR/threshold.json, or for a cross-validation folder on "
                                 "its out-of-fold predictions; 0.5 with a warning when there is "
                                 "none), a float strictly between 0 and 1, or 'youden' (maximise "
                                 "TPR - FPR on the validation split now, then apply it to "
                                 "--split). Ignored for more than two classes (argmax).")
_TTA = flags.DEFINE_integer("tta", 0, "Test-time augmentation: 0 off, or n in 1..8 to average the "
                            "probabilities over the first n of identity, flip left-right, flip "
                            "up-down, rot90, rot180, rot270, transpose, transverse.",
                            lower_bound=0, upper_bound=8)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per forward pass.", lower_bound=1)
_ALLOW_OTHER = flags.DEFINE_boolean("allow_other_records", False, "Allow --split=train or valid "
                                    "on records other than the model's training records "
                                    "(refused by default: usually a mix-up).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the 95%% confidence "
                                  "intervals in metrics.json and the report (patients are "
                                  "resampled when the records carry patient ids); 0: none.",
                                  lower_bound=0)
_ENSEMBLE = flags.DEFINE_enum("ensemble", "mean", ["mean", "rank"], "How ensemble members "
                               "combine: mean probability, or mean of per-member rank-normalised "
                               "scores (not probabilities: no ECE/Brier, no Youden threshold).")
_CALIBRATE = flags.DEFINE_enum("calibrate", "stored", ["stored", "temperature", "platt", "none"],
                               "stored: apply MODEL_DIR/calibration.json when present; "
                               "temperature: fit a temperature per member on its validation "
                               "split, store it there (bin/predict then applies it); platt: fit "
                               "a slope and an intercept on the logit instead (two classes; it "
                               "can also move a shifted decision boundary); none: ignore a "
                               "stored one.")
_ISIC_TRUTH_CSV = flags.DEFINE_string("isic_truth_csv", None, "Also write the ISIC Challenge "
                                      "ground-truth CSV of --split (image, one-hot class "
                                      "columns) here, to score bin/predict --format=isic with "
                                      "the official isic-challenge-scoring package.")
_ISIC_COLUMNS = flags.DEFINE_string("isic_columns", None, "Rename classes in the ISIC CSV, e.g. "
                                    "NotMelanoma:NV,Melanoma:MEL (case-sensitive).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the report files go (default: "
                                  "MODEL_DIR/eval_<split>; required for a list of runs).")
flags.mark_flag_as_required("model_dir")


def _configs() -> tuple:
  from skinrecords.evaluation import evaluate  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return (evaluate.EvalConfig,)


# Every EvalConfig field is the flag of its name (cli_common.ConfigFlags; tests/test_help.py).
_CONFIG_FLAGS = cli_common.ConfigFlags(globals(), _configs, "evaluate")



def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from skinrecords.evaluation import evaluate  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from skinrecords.core import fileio  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from skinrecords.input import pipeline  # pylint: disable=g-import-not-at-top

  config = _CONFIG_FLAGS.usage_config(evaluate.EvalConfig)
  try:
    result = evaluate.evaluate(config)
  except (ValueError, pipeline.CorruptShardError) as err:
    print(f"evaluate: {err}", file=sys.stderr)
    return 2
  except OSError as err:  # a missing run, or a remote path that cannot be read (network, scheme)
    print(f"evaluate: {fileio.describe_error(err)}", file=sys.stderr)
    return 2
  print(evaluate.report_text(result))
  paths = list(result["files"].values())
  inside = fileio.canonical(result["output_dir"])
  here = [fileio.basename(p) for p in paths if fileio.canonical(fileio.dirname(p)) == inside]
  print(f"\nwrote {', '.join(here)} to {result['output_dir']}" +
        "".join(f", and {p}" for p in paths if fileio.canonical(fileio.dirname(p)) != inside))
  return 0


def run():
  """Console entry point (`skinrecords-evaluate`)."""
  cli_common.run(main, "skinrecords-evaluate")


if __name__ == "__main__":
  run()
