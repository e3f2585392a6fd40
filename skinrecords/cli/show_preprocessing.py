"""Contact sheet of what hair removal does to N random inputs: original | mask | result.

  bin/show_preprocessing --input_dir=DIR --output=sheet.png --num=6 --image_size=512
"""

from __future__ import annotations

import sys

import cv2
import numpy as np
from absl import flags

from skinrecords.cli import common as cli_common
from skinrecords.core import fileio
from skinrecords.data import hair
from skinrecords.data import preprocess as pp
from skinrecords.data import sources

_INPUT_DIR = flags.DEFINE_string("input_dir", None, "Folder searched recursively for images.")
_OUTPUT = flags.DEFINE_string("output", "preprocessing.png", "Contact sheet PNG to write.")
_NUM = flags.DEFINE_integer("num", 6, "Random images shown (>= 1).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "Output size the converter would use.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for picking the images.")


class _FileError(ValueError):
  """An image the converter would reject; the message names the file."""


def sheet(paths: list[str], size: int) -> np.ndarray:
  """RGB rows original | mask (red on grey) | result, each size x size."""
  config = pp.PreprocessConfig(image_size=size)
  rows = []
  for path in paths:
    try:
      rgb = pp.preprocess_array(pp.decode(fileio.read_bytes(path), config), config)
    except (pp.RejectedImage, ValueError) as err:  # an oversize file went unnamed (issue 27)
      raise _FileError(f"{path}: {err}") from err
    mask = hair.hair_mask(rgb)
    shown = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB) // 2
    shown[mask > 0] = (255, 40, 40)
    rows.append(np.hstack([rgb, shown, hair.remove_hair(rgb)]))
  return np.vstack(rows)


def main(argv):
  if len(argv) > 1 or not _INPUT_DIR.value or _NUM.value < 1:
    print("show_preprocessing: need --input_dir=DIR (a folder of images) and --num >= 1",
          file=sys.stderr)
    return 2
  try:  # before listing: --image_size=0 read as a config name (PreprocessConfig.image_size=0)
    pp.PreprocessConfig(image_size=_IMAGE_SIZE.value).validate()
  except ValueError as err:
    print(f"show_preprocessing: --image_size={_IMAGE_SIZE.value}: "
          f"{str(err).split(': ', 1)[-1]}", file=sys.stderr)
    return 2
  folder = _INPUT_DIR.value
  files = list(sources.list_image_files(folder)) if fileio.isdir(folder) else []
  if not files:
    print(f"show_preprocessing: no images under {_INPUT_DIR.value}; point --input_dir at a "
          "folder of JPEG/PNG files", file=sys.stderr)
    return 2
  rng = np.random.default_rng(_SEED.value)
  picked = [files[i] for i in sorted(rng.choice(len(files), min(_NUM.value, len(files)), False))]
  try:
    img = sheet(picked, _IMAGE_SIZE.value)
  except _FileError as err:
    print(f"show_preprocessing: {err}; remove or fix that file", file=sys.stderr)
    return 2
  out = _OUTPUT.value
  _, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_PNG_COMPRESSION, 9])
  try:
    fileio.write_bytes_atomic(out, png.tobytes())
  except OSError as err:
    print(f"show_preprocessing: cannot write --output={out} ({fileio.describe_error(err)}); "
          "choose another path", file=sys.stderr)
    return 2
  print(f"wrote {out} ({len(picked)} images: original | hair mask | result)")
  return 0


def run():
  """Console entry point (`skinrecords-show-preprocessing`)."""
  cli_common.run(main, "skinrecords-show-preprocessing")
