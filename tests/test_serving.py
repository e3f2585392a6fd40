"""The serving graph's geometry (serving.converter_image) against the converter's OpenCV path, pixel
by pixel: EXIF orientation in every value and byte order, crop and area/cubic resize, reduced JPEG
decode, grey, CMYK and 16-bit files. No model: a geometry bug shows here as whole pixels moved."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from benchmarks.serving_files import cmyk_jpeg, jpeg, photo, png, with_exif_jpeg, with_exif_png
from skinrecords.data import preprocess
from skinrecords.input import pipeline
from skinrecords.serving import serving


def _predict_pixels(data: bytes, stored: int, model_size: int, **kwargs) -> np.ndarray:
  """What bin/predict feeds the model for these file bytes (preprocess, then pipeline decode)."""
  pconfig = preprocess.PreprocessConfig(image_size=stored, **kwargs)
  return pipeline.decode_image(preprocess.preprocess_bytes(data, pconfig), model_size,
                               stored).numpy()


def _served_pixels(data: bytes, stored: int, model_size: int, **kwargs):
  pconfig = preprocess.PreprocessConfig(image_size=stored, **kwargs)
  image, orientation = serving.converter_image(tf.constant(data), pconfig, model_size)
  return image.numpy(), int(orientation)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
@pytest.mark.parametrize("little", [True, False], ids=["II", "MM"])
def test_every_exif_orientation_is_applied_as_opencv_does(fmt, little):
  base = jpeg(photo(60, 40)) if fmt == "jpeg" else png(photo(60, 40))
  add = with_exif_jpeg if fmt == "jpeg" else with_exif_png
  for value in range(0, 10):
    data = add(base, value, little)
    expected = 1 if not 1 <= value <= 8 else value  # out of range: as stored, as OpenCV does
    assert int(serving.exif_orientation(tf.constant(data))) == expected
    opencv = preprocess.decode(data, preprocess.PreprocessConfig(image_size=16))
    ours = serving.orient(serving._decode(tf.constant(data), 16, True), expected).numpy()
    assert ours.shape == opencv.shape, (value, ours.shape, opencv.shape)
    np.testing.assert_array_equal(ours, opencv)


def test_no_exif_and_garbage_headers_read_as_orientation_1():
  base = jpeg(photo(40, 30))
  cut = with_exif_jpeg(base, 6)[:40]  # the EXIF block cut short
  for data in (base, png(photo(40, 30)), cut, b"", b"\xff\xd8\xff\xe1\xff\xff" + b"\0" * 8):
    assert int(serving.exif_orientation(tf.constant(data))) == 1


# (width, height, stored size, model size): shrink (area), enlarge (cubic), portrait, a JPEG
# decoded at 1/2 and 1/4 (reduced_decode), the model at another size than the records.
GEOMETRIES = [(64, 48, 32, 32), (48, 64, 32, 32), (20, 26, 32, 32), (130, 90, 32, 32),
              (300, 200, 32, 32), (70, 50, 32, 48), (90, 70, 32, 24)]


@pytest.mark.parametrize("width,height,stored,model_size", GEOMETRIES)
def test_raw_jpeg_gives_predicts_pixels(width, height, stored, model_size):
  data = jpeg(photo(width, height))
  served, orientation = _served_pixels(data, stored, model_size)
  np.testing.assert_array_equal(served, _predict_pixels(data, stored, model_size))
  assert orientation == 1


@pytest.mark.parametrize("case", ["exif6_jpeg", "exif8_png", "png", "grey_jpeg", "grey_png",
                                  "png16", "png_stored", "no_reduced_decode"])
def test_other_files_give_predicts_pixels(case):
  kwargs = {}
  rgb = photo(90, 60)
  data = {"exif6_jpeg": lambda: with_exif_jpeg(jpeg(rgb), 6, little=False),
          "exif8_png": lambda: with_exif_png(png(rgb), 8),
          "png": lambda: png(rgb), "grey_jpeg": lambda: jpeg(rgb[..., 1].copy()),
          "grey_png": lambda: png(rgb[..., 0].copy()),
          "png16": lambda: png((rgb[..., 2].astype(np.uint16) * 257 + 3)),
          "png_stored": lambda: png(rgb), "no_reduced_decode": lambda: jpeg(photo(260, 200))}[case]()
  if case == "png_stored":
    kwargs["image_format"] = "png"
  if case == "no_reduced_decode":
    kwargs["reduced_decode"] = False
  served, orientation = _served_pixels(data, 32, 32, **kwargs)
  np.testing.assert_array_equal(served, _predict_pixels(data, 32, 32, **kwargs))
  assert orientation == {"exif6_jpeg": 6, "exif8_png": 8}.get(case, 1)


def test_cmyk_jpeg_within_two_levels():
  """libjpeg hands both decoders CMYK; OpenCV and TensorFlow round its conversion to RGB
  differently (one level before the resize)."""
  data = cmyk_jpeg(photo(80, 60))
  served, _ = _served_pixels(data, 32, 32)
  diff = np.abs(served.astype(int) - _predict_pixels(data, 32, 32))
  assert diff.max() <= 2 and diff.mean() < 1.5, (diff.max(), diff.mean())


def test_client_preprocessed_file_is_taken_as_it_is():
  """An image already at the stored size (what preprocess_file writes) is decoded as the records
  are, not cropped, resized or re-encoded again: the served pixels are the records' pixels."""
  pconfig = preprocess.PreprocessConfig(image_size=32)
  stored = preprocess.preprocess_bytes(jpeg(photo(70, 50)), pconfig)
  served, _ = _served_pixels(stored, 32, 32)
  np.testing.assert_array_equal(served, pipeline.decode_image(stored, 32, 32).numpy())


def test_resize_weights_are_opencvs():
  """Rows sum to 1; shrinking by an integer factor is a plain block mean."""
  for side, size in ((96, 32), (70, 32), (20, 32), (32, 32)):
    w = serving.numpy_weights(side, size)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
  np.testing.assert_allclose(serving.numpy_weights(96, 32)[0, :4], [1 / 3, 1 / 3, 1 / 3, 0])
  np.testing.assert_array_equal(serving.numpy_weights(32, 32), np.eye(32))
