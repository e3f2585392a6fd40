"""Served vs bin/predict on raw photos: the largest probability difference per file.

    python bin/bench_serving --model_dir=RUN_OR_CV_FOLDER [--work_dir=/tmp/serving_parity]

Writes synthetic lesion photos (benchmarks.serving_files: no patient images) of the sizes, formats
and orientations a clinic sends, exports the model (SavedModel only) into WORK_DIR/export, scores
the folder with `predict.run` and with the SavedModel's `serving_default` on the raw bytes, and
prints one markdown row per file: |served - predict|, and what the previous graph (decode, stretch
the whole photo to the square, no EXIF) gave on the same file.
"""

from __future__ import annotations

import os
import shutil

from absl import app
from absl import flags
import numpy as np

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "A trained run, CV folder or comma list.")
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/serving_parity", "Photos and the export go "
                                "here (replaced).")


def write_photos(folder: str, pconfig) -> dict:
  """name -> (bytes, what it is); the cases of issue 26."""
  from benchmarks import serving_files as sf  # pylint: disable=g-import-not-at-top
  from skinrecords.data import preprocess  # pylint: disable=g-import-not-at-top

  def photo(w, h, i):  # both classes, so the model's answers are not all one end of [0, 1]
    return sf.photo(w, h, i, melanoma=i % 2 == 0)

  big = photo(1024, 768, 10)
  cases = {
      "640x480.jpg": (sf.jpeg(photo(640, 480, 1)), "640x480 JPEG"),
      "1024x768.jpg": (sf.jpeg(big), "1024x768 JPEG"),
      "3000x2000.jpg": (sf.jpeg(photo(3000, 2000, 2)), "3000x2000 JPEG (reduced decode)"),
      "portrait_480x640.jpg": (sf.jpeg(photo(480, 640, 3)), "480x640 portrait JPEG"),
      "exif6_1024x768.jpg": (sf.with_exif_jpeg(sf.jpeg(big), 6, little=False),
                             "1024x768 JPEG, EXIF 6 (MM)"),
      "exif3_800x600.jpg": (sf.with_exif_jpeg(sf.jpeg(photo(800, 600, 4)), 3),
                            "800x600 JPEG, EXIF 3 (II)"),
      "exif8_640x480.png": (sf.with_exif_png(sf.png(photo(640, 480, 5)), 8),
                            "640x480 PNG, EXIF 8"),
      "1200x600.png": (sf.png(photo(1200, 600, 6)), "1200x600 PNG"),
      "grey_640x480.jpg": (sf.jpeg(photo(640, 480, 7)[..., 1].copy()), "640x480 grey JPEG"),
      "cmyk_640x480.jpg": (sf.cmyk_jpeg(photo(640, 480, 8)), "640x480 CMYK JPEG"),
      "160x120.jpg": (sf.jpeg(photo(160, 120, 9)), "160x120 JPEG"),
      "48x40.jpg": (sf.jpeg(photo(48, 40, 11)), "48x40 JPEG (enlarged)"),
  }
  cases["client_preprocessed.jpg"] = (preprocess.preprocess_bytes(cases["640x480.jpg"][0], pconfig),
                                      "640x480 through preprocess_file (client side)")
  os.makedirs(folder, exist_ok=True)
  for name, (data, _) in cases.items():
    with open(os.path.join(folder, name), "wb") as f:
      f.write(data)
  return cases


def _stretched(members, data_list):
  """The previous serving graph: decode, resize the whole photo to the square, no EXIF."""
  from skinrecords.evaluation import ensemble  # pylint: disable=g-import-not-at-top
  from skinrecords.input import pipeline  # pylint: disable=g-import-not-at-top
  from skinrecords.model import inference  # pylint: disable=g-import-not-at-top

  per = []
  for m in members:
    images = np.stack([pipeline.decode_image(d, m.image_size, None).numpy() for d in data_list])
    per.append(m.calibrated(inference.forward(m.model, 0)(images).numpy()))
  return ensemble.combine(per, "mean")


def main(argv):
  del argv
  from skinrecords.evaluation import ensemble  # pylint: disable=g-import-not-at-top
  from skinrecords.evaluation import predict  # pylint: disable=g-import-not-at-top
  from skinrecords.serving import export  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  work = _WORK_DIR.value
  shutil.rmtree(work, ignore_errors=True)
  members = ensemble.load_members(_MODEL_DIR.value)
  cases = write_photos(os.path.join(work, "photos"), export._pconfig(members[0].cfg))  # pylint: disable=protected-access
  export.export(export.ExportConfig(model_dir=_MODEL_DIR.value,
                                    output_dir=os.path.join(work, "export"),
                                    format="saved_model"))
  rows, rejected, _ = predict.run(predict.PredictConfig(model_dir=_MODEL_DIR.value,
                                                        input_dir=os.path.join(work, "photos")))
  assert not rejected, rejected
  data = [open(r["image"], "rb").read() for r in rows]  # pylint: disable=consider-using-with
  serve = tf.saved_model.load(os.path.join(work, "export", "1")).signatures["serving_default"]
  served = serve(image_bytes=tf.constant(data))
  probs, orientation = served["probabilities"].numpy(), served["exif_orientation"].numpy()
  before = _stretched(members, data)
  print(f"model: {_MODEL_DIR.value} ({len(members)} run(s))")
  print("| file | predict P | \\|served − predict\\| | EXIF seen | before (stretched, no EXIF) |")
  print("| --- | --- | --- | --- | --- |")
  by_name = {os.path.basename(r["image"]): r for r in rows}
  for r, p, o, b in zip(rows, probs, orientation, before):
    name = os.path.basename(r["image"])
    what = cases[name][1]
    if name == "client_preprocessed.jpg":  # the contract: equal to predict on the original photo
      r = by_name["640x480.jpg"]
      what += ", vs predict on the original"
    q = np.asarray(r["probability"])
    print(f"| {what} | {np.max(q):.4f} | {np.max(np.abs(p - q)):.1e} | {o} | "
          f"{np.max(np.abs(b - q)):.3f} |")


def run():
  flags.mark_flags_as_required(["model_dir"])
  app.run(main)


if __name__ == "__main__":
  run()
