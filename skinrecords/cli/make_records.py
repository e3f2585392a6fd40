r"""Converts a folder or CSV of skin-lesion images into sharded, verified TFRecords.

Inputs: class folders ROOT/<class>/*, the pre-split layout ROOT/{train,valid|val,test}/<class>/*, or
--labels_csv with images found under --input_dir by name. Writes
OUTPUT/{split}-{i:05d}-of-{n:05d}.tfrecord and OUTPUT/manifest.json (classes, counts, sha256 of every
shard, every rejected or duplicate input with the reason, preprocessing settings, versions).

Killed and started again with the same flags, it resumes and ends with the same output.

Example:
  make_records --input_dir=/data/isic --labels_csv=/data/ISIC_2020_Training_GroundTruth.csv \
      --patient_column=patient_id --output_dir=/data/isic_records --remove_hair --folds=5
"""

import sys

from absl import app
from absl import flags

from skinrecords.cli import common as cli_common
from skinrecords.core import fileio

_INPUT_DIR = flags.DEFINE_string("input_dir", None, "Folder of images (class folders, pre-split "
                                 "train/valid|val/test folders, or any tree with --labels_csv).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where shards and manifest.json are written.")
_LABELS_CSV = flags.DEFINE_string("labels_csv", None, "CSV of labels, e.g. ISIC_2020_Training_"
                                  "GroundTruth.csv or HAM10000_metadata.csv. Images are looked up "
                                  "under --input_dir by relative path, file name or stem.")
_IMAGE_COLUMN = flags.DEFINE_string("image_column", "image_name", "CSV column naming the image "
                                    "(ISIC: image_name, HAM10000: image_id).")
_LABEL_COLUMN = flags.DEFINE_string("label_column", "target", "CSV column with the class "
                                    "(ISIC: target, HAM10000: dx).")
_PATIENT_COLUMN = flags.DEFINE_string("patient_column", None, "CSV column grouping images that must "
                                      "stay in one split (ISIC: patient_id, HAM10000: lesion_id)"
                                      ", in --labels_csv or --patients_csv.")
_PATIENTS_CSV = flags.DEFINE_string("patients_csv", None, "For class-folder or pre-split inputs: a "
                                    "CSV of image name (--image_column) -> patient or lesion id "
                                    "(--patient_column), so that splits and folds keep each "
                                    "patient's images together. Without patient ids images are "
                                    "split one by one (the summary warns).")
_METADATA_COLUMNS = flags.DEFINE_list(
    "metadata_columns", [], "Patient metadata to store in every record, e.g. sex,age_approx,"
    "anatom_site_general_challenge (from --labels_csv, or --metadata_csv). Numeric when every "
    "present cell is a number, else categorical; force with NAME:numeric or NAME:categorical. "
    "Empty/NaN/unknown cells are stored as missing (no feature), never 0. images_per_patient "
    "(derived; needs --patient_column) counts each patient's images. The manifest keeps each "
    "column's kind, vocabulary or mean/std from the train split only (and per fold), and the "
    "missing counts per split. The label and its synonyms (diagnosis, benign_malignant, ...) "
    "are refused.")
_METADATA_CSV = flags.DEFINE_string(
    "metadata_csv", None, "CSV of image name (--image_column) -> the --metadata_columns, for "
    "class-folder or pre-split inputs, or when the metadata sits apart from the labels (ISIC "
    "2019's ISIC_2019_Training_Metadata.csv: --image_column=image).")
_CLASSES = flags.DEFINE_list("classes", None, "Class names in id order (binary: negative first, so "
                             "id 1 is the positive class), e.g. NotMelanoma,Melanoma. Default: "
                             "sorted names (warned when that makes e.g. Melanoma class 0). Inputs with other labels are "
                             "rejected.")
_SPLIT = flags.DEFINE_string("split", "0.6,0.2,0.2", "train,valid[,test] fractions, stratified by "
                             "label and grouped by patient. Ignored for a pre-split layout.")
_FOLDS = flags.DEFINE_integer("folds", 0, "If >= 2, assign a stratified (patient-grouped) fold to "
                              "every training example; each train shard holds one fold.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for splits, folds and shard order; same seed and "
                             "inputs give byte-identical output.")
_IMAGE_SIZE = flags.DEFINE_string("image_size", "512", "Output side in pixels: shorter side resized "
                                  "to this, then centre-cropped to a square. Several sizes, e.g. "
                                  "256,384,512, are made in one pass (each image decoded once, for "
                                  "the largest) into OUTPUT/256/, OUTPUT/384/, OUTPUT/512/: each a "
                                  "complete records folder, all with the same splits, folds and "
                                  "shard contents.")
_FORMAT = flags.DEFINE_enum("image_format", "jpeg", ["jpeg", "png"], "Encoding of stored images.")
_QUALITY = flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality 1-100 (jpeg only).")
_REMOVE_HAIR = flags.DEFINE_boolean("remove_hair", False, "DullRazor-style hair removal "
                                    "(black-hat, threshold, inpaint) after resizing.")
_CLEANUP = flags.DEFINE_boolean("notebook_cleanup", False, "The original notebook's contour inpaint "
                                "+ bilateral filter, with parameters scaled to --image_size.")
_REDUCED = flags.DEFINE_boolean("reduced_decode", True, "Decode JPEGs much larger than the output "
                                "at 1/2, 1/4 or 1/8 scale (~3x faster for 4000x3000 sources).")
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", 178_956_970, "Reject sources whose header claims "
                                   "more pixels than this (decompression bombs).")
_SHARD_MB = flags.DEFINE_float("shard_size_mb", 100.0, "Target shard size in MB (estimated).")
_MIN_TRAIN_SHARDS = flags.DEFINE_integer("min_train_shards", 16, "At least this many train shards "
                                         "when there are enough images, so that many workers can "
                                         "each read their own files.")
_NEAR = flags.DEFINE_enum("near_duplicates", "group", ["group", "report", "off"], "Near-duplicate "
                          "inputs (re-compressed, rescaled, cropped <= 10 %, flipped or colour-"
                          "shifted copies, found by a perceptual hash): 'group' keeps each group "
                          "in one split and fold (merged with patient groups), 'report' only lists "
                          "them in manifest.json, 'off' skips the hashing. Either way pairs with "
                          "different labels are reported as label conflicts.")
_NEAR_DISTANCE = flags.DEFINE_integer("near_duplicate_distance", 10, "Largest hash distance (bits of "
                                      "143) still called a near-duplicate; measured copies were "
                                      "<= 10 bits apart, different lesions >= 15.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Preprocessing processes; 0 means all cores.")
_STRICT = flags.DEFINE_boolean("strict", False, "Exit non-zero if any input was rejected (the "
                               "output is still written).")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace output made with other flags.")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show a progress bar.")
_PSEUDONYMIZE = flags.DEFINE_string("pseudonymize_patients", None, "SALT_FILE: store patient ids "
                                    "as keyed hashes (HMAC-SHA256 with the secret in this file; "
                                    "created with 32 random bytes if absent) in the records and "
                                    "the manifest, for records that are shared. Splits and folds "
                                    "are the same as without. Keep the file outside --output_dir "
                                    "and private: the same key gives the same ids next time.")
_PSEUDONYMIZE_NAMES = flags.DEFINE_boolean("pseudonymize_names", False, "With "
                                           "--pseudonymize_patients: image names too; the mapping "
                                           "(pseudonym -> original path) is written beside the "
                                           "salt file as SALT_FILE.names.csv, never into the "
                                           "records. ISIC submission files then carry pseudonyms.")

flags.mark_flags_as_required(["input_dir", "output_dir"])


def _configs() -> tuple:
  from skinrecords.data import convert, preprocess  # pylint: disable=g-import-not-at-top
  return convert.ConvertConfig, preprocess.PreprocessConfig


def _fractions(text: str) -> tuple:
  from skinrecords.data import splits  # pylint: disable=g-import-not-at-top
  return splits.parse_fractions(text)


# Every ConvertConfig and PreprocessConfig field is the flag of its name (cli_common.ConfigFlags;
# tests/test_help.py), but these:
_NOT_FLAGS = {"preprocess": "a nested config (PreprocessConfig, from its own fields' flags)",
              "image_sizes": "--image_size with several sizes"}
_CONFIG_FLAGS = cli_common.ConfigFlags(
    globals(), _configs, "make_records", _NOT_FLAGS,
    converters={"split": _fractions, "classes": lambda names: tuple(names) if names else None,
                "metadata_columns": lambda names: tuple(names or ()),
                # one size or several ("256,384,512"): PreprocessConfig gets the largest
                "image_size": lambda text: max(int(p) for p in text.split(",") if p.strip())})



_FLAG_NAMES = ("folds", "workers", "shard_size_mb", "min_train_shards", "labels_csv",
               "patient_column", "patients_csv", "image_column", "image_size", "image_format", "jpeg_quality", "max_pixels",
               "pseudonymize_patients", "pseudonymize_names", "near_duplicates",
               "near_duplicate_distance", "metadata_columns", "metadata_csv")


def _config():
  from skinrecords.data import convert, preprocess, splits  # pylint: disable=g-import-not-at-top

  try:
    split = splits.parse_fractions(_SPLIT.value)
  except ValueError as err:
    raise app.UsageError(f"--split={_SPLIT.value}: {err}") from err
  sizes = _sizes(convert.MIN_TRAIN_IMAGE_SIZE)
  try:
    pre = _CONFIG_FLAGS.build(preprocess.PreprocessConfig, image_size=max(sizes))
    pre.validate()
  except ValueError as err:
    raise app.UsageError(cli_common.as_flags(str(err).replace("PreprocessConfig.", ""),
                                             _FLAG_NAMES)) from err
  config = _CONFIG_FLAGS.build(convert.ConvertConfig, split=split, preprocess=pre,
                               image_sizes=sizes if len(sizes) > 1 else ())
  try:
    config.validate()
  except ValueError as err:
    raise app.UsageError(cli_common.as_flags(str(err), _FLAG_NAMES)) from err
  return config


def _say_pseudonymized(written: dict, config) -> None:
  from skinrecords.data import pseudonyms  # pylint: disable=g-import-not-at-top

  entry = written["inputs"].get("pseudonymized")
  if entry:
    where = (f"; names mapping in {pseudonyms.mapping_path(config.pseudonymize_patients)}"
             if entry.get("image_name") else "")
    print(f"  {pseudonyms.describe(entry)}; the key stays in {config.pseudonymize_patients} "
          f"(keep it private and outside the records){where}")


def _sizes(minimum: int) -> tuple[int, ...]:
  """--image_size: one size or several, comma-separated."""
  try:
    sizes = tuple(sorted({int(p) for p in _IMAGE_SIZE.value.split(",") if p.strip()}))
  except ValueError as err:
    raise app.UsageError(f"--image_size={_IMAGE_SIZE.value}: expected a size in pixels or several "
                         "separated by commas, e.g. 512 or 256,384,512") from err
  if not sizes or sizes[0] < minimum:  # Before preprocess's wider [8, 8192].
    raise app.UsageError(f"--image_size={_IMAGE_SIZE.value}: training needs at least {minimum} "
                         f"px; use --image_size >= {minimum}")
  return sizes


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from skinrecords.data import convert  # pylint: disable=g-import-not-at-top

  config = _config()
  if str(config.output_dir).startswith("ram://"):
    print(f"make_records: warning: --output_dir={config.output_dir} is TensorFlow's in-memory "
          "file system: the records vanish when this command exits (meant for tests)",
          file=sys.stderr)
  try:
    for warning in convert.check_output_dir(config):  # Before the listing and hashing.
      print(f"make_records: warning: {warning}", file=sys.stderr)
    result = convert.convert(config)
  except (convert.OutputExistsError, ValueError, FileNotFoundError) as err:
    print(f"make_records: {err}", file=sys.stderr)
    return 2
  except OSError as err:  # a remote output that failed mid-run (network, permissions)
    print(f"make_records: {fileio.describe_error(err)}; rerun the same command to resume",
          file=sys.stderr)
    return 1
  print(convert.summary(result))
  _say_pseudonymized(result.manifest, config)
  if config.strict and result.rejected:
    print(f"make_records: --strict: {len(result.rejected)} input(s) rejected", file=sys.stderr)
    return 1
  return 0


def run():
  """Console entry point (`skinrecords-make-records`)."""
  cli_common.run(main, "skinrecords-make-records")


if __name__ == "__main__":
  run()
