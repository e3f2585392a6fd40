"""Writes a synthetic dermoscopy data set: melanoma vs nevus, differing the ABCD way.

  bin/make_synthetic --output_dir=/tmp/synth --num_images=1000 --seed=0
  bin/make_synthetic --output_dir=/tmp/isic_like --num_images=1000 --csv --flat
  bin/make_synthetic --output_dir=/tmp/isic_meta --num_images=1000 --flat --metadata \
      --metadata_signal=1 --image_signal=0.5 --melanoma_fraction=0.2

Without --csv: <output_dir>/Melanoma/*.jpg and <output_dir>/NotMelanoma/*.jpg. With --csv also
<output_dir>/labels.csv (image_name,patient_id,target,diagnosis); with --csv --flat all images go to
<output_dir>/images/ instead (the ISIC layout). With --metadata labels.csv has SIIM-ISIC 2020's
columns (image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,
benign_malignant,target), the metadata carrying a known signal of --metadata_signal; --image_signal
below 1 draws some melanomas as nevi so that the image alone cannot find them. Same flags ->
byte-identical files.
"""

from __future__ import annotations

from absl import app
from absl import flags

from skinrecords.cli import common as cli_common

from skinrecords.data import synthetic

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Directory to create; must not exist yet or be empty.", required=True)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1000, "Number of images to write (>= 1).")
_SEED = flags.DEFINE_integer(
    "seed", 0, "Random seed (>= 0); image i draws from numpy default_rng([seed, i]) alone.")
_MELANOMA_FRACTION = flags.DEFINE_float(
    "melanoma_fraction", 0.5,
    "Fraction of images that are melanomas, in [0, 1]; the count is round(num_images * fraction).")
_MIN_SIZE = flags.DEFINE_string(
    "min_size", "600x450", "Smallest image size, WIDTHxHEIGHT in pixels (each side >= 16).")
_MAX_SIZE = flags.DEFINE_string(
    "max_size", "1024x768",
    "Largest image size, WIDTHxHEIGHT in pixels; sizes are drawn uniformly between the bounds.")
_CSV = flags.DEFINE_bool(
    "csv", False,
    "Also write <output_dir>/labels.csv with image_name,patient_id,target,diagnosis columns.")
_FLAT = flags.DEFINE_bool(
    "flat", False,
    "With --csv: put all images in <output_dir>/images/ instead of one folder per class.")
_IMAGES_PER_PATIENT = flags.DEFINE_integer(
    "images_per_patient", 4,
    "Consecutive images sharing one patient_id in labels.csv; patients are mostly one class.")
_JPEG_QUALITY = flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality, 1-100.")
_HAIR_MASKS_DIR = flags.DEFINE_string(
    "hair_masks_dir", None,
    "Also write each image's exact hair coverage here as <image_name>.png (0-255; > 127 = hair).")
_METADATA = flags.DEFINE_bool(
    "metadata", False,
    "Write SIIM-ISIC 2020-like metadata into labels.csv (implies --csv): sex, age_approx, "
    "anatom_site_general_challenge (and diagnosis, benign_malignant beside target).")
_METADATA_SIGNAL = flags.DEFINE_float(
    "metadata_signal", 1.0,
    "With --metadata, how strongly it follows the label, in [0, 1]: a melanoma patient is "
    "18 * signal years older on average (age alone: AUC ~0.81 at 1, ~0.67 at 0.5), more often "
    "male and more often on head/neck or upper extremity; 0 = independent of the label.")
_METADATA_MISSING = flags.DEFINE_float(
    "metadata_missing", 0.05, "With --metadata, the probability of each metadata cell being "
    "empty (missing), in [0, 1].")
_IMAGE_SIGNAL = flags.DEFINE_float(
    "image_signal", 1.0,
    "Fraction of melanomas drawn with their malignant look, in [0, 1]; the others look exactly "
    "like nevi (the label and CSV stay melanoma), so the image alone cannot find them.")
_WORKERS = flags.DEFINE_integer(
    "workers", 1, "Processes drawing images (spawned); output does not depend on it.")

# Every SyntheticConfig field is the flag of its name (cli_common.ConfigFlags; tests/test_help.py),
# but this one:
_NOT_FLAGS = {"write_csv": "--csv (the flag's name since the first release)"}
_CONFIG_FLAGS = cli_common.ConfigFlags(
    globals(), lambda: (synthetic.SyntheticConfig,), "make_synthetic", _NOT_FLAGS,
    converters={"min_size": synthetic.parse_size, "max_size": synthetic.parse_size})



def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    config = _CONFIG_FLAGS.build(synthetic.SyntheticConfig, write_csv=_CSV.value or _METADATA.value)
    config.validate()
  except ValueError as err:  # in the flags the user typed, not the config's field names
    message = str(err).replace("flat=True", "--flat").replace("write_csv=True", "--csv")
    raise app.UsageError(cli_common.as_flags(message, (
        "seed", "num_images", "melanoma_fraction", "min_size", "max_size", "images_per_patient",
        "jpeg_quality", "workers", "metadata_signal", "metadata_missing",
        "image_signal"))) from err
  try:
    summary = synthetic.write_dataset(_OUTPUT_DIR.value, config,
                                      hair_masks_dir=_HAIR_MASKS_DIR.value)
  except FileExistsError as err:
    raise app.UsageError(str(err)) from err
  counts = ", ".join(f"{name} {n}" for name, n in summary["counts"].items())
  print(f"wrote {sum(summary['counts'].values())} images to {summary['output_dir']} ({counts})"
        + (f"; labels in {summary['csv']}" if summary.get("csv") else ""))


def run():
  """Console entry point (`skinrecords-make-synthetic`)."""
  cli_common.run(main, "skinrecords-make-synthetic")


if __name__ == "__main__":
  run()
