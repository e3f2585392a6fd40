"""The converter's geometry as a TensorFlow graph: raw photo bytes in, the pixels predict sees out.

`bin/predict` sends each file through `preprocess.preprocess_file` (OpenCV): decode with EXIF
orientation (JPEGs with a shorter side >= 2x the stored size decoded at 1/2, 1/4 or 1/8 scale),
centre crop to a square, INTER_AREA down / INTER_CUBIC up to the stored size, re-encode (JPEG q95
by default), then `pipeline.decode_image` at the model's size. `converter_image` does the same
steps with TensorFlow ops so the exported `serving_default` signature can take a phone's or a
dermatoscope's file as it is:

- decode: JPEG with libjpeg's accurate integer DCT (`INTEGER_ACCURATE`: bit-identical to OpenCV's
  decode, full and reduced, on synthetic photos; TensorFlow's default fast DCT was 7 levels off);
  other formats through `tf.io.decode_image` (3 channels, alpha dropped, 16-bit >> 8, as OpenCV).
- EXIF orientation: the Orientation tag (0x0112) of IFD0, read in-graph from a JPEG's APP1 `Exif`
  segment or a PNG's `eXIf` chunk, both byte orders (II and MM), and applied the way OpenCV's
  `ApplyExifOrientation` does; the value is returned so a client can see it.
- crop and resize: the centre square, then a [S, side] weight matrix applied to rows and columns:
  OpenCV's INTER_AREA box weights when shrinking, its INTER_CUBIC (A = -0.75, replicated border)
  when enlarging. OpenCV rounds in fixed point for cubic, so pixels may differ by one level.
- store: JPEG re-encoded at the recorded quality (`tf.io.encode_jpeg` gave the same decoded pixels
  as OpenCV's q95 encoder, checked), then decoded and resized to the model's size by
  `pipeline.decode_image`, the function training and predict read with.

An image that is already S x S (S = the stored size) with no EXIF rotation is taken as the client
preprocessed it (today's contract, equal to predict to 1e-5): it is not re-encoded.
Hair removal and the notebook clean-up have no graph version; export warns when records used them.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from skinrecords.data import preprocess
from skinrecords.input import pipeline

# The header bytes searched for the EXIF block: APP0 (JFIF, ~18 bytes) + a whole APP1 (<= 64 KiB)
# fit in 70 KB; an ICC profile (APP2) before the APP1 is rare but allowed, hence 256 KiB.
_HEADER_BYTES = 262144
_MAX_SEGMENTS = 64  # JPEG marker segments / PNG chunks walked before giving up
_MAX_IFD_ENTRIES = 64  # IFD0 entries searched for the Orientation tag (typically 10-20)
ORIENTATION_TAG = 0x0112


# ------------------------------------------------------------------------------- EXIF in-graph

def _bytes(data) -> tf.Tensor:
  """The first _HEADER_BYTES of `data` as int32, padded with zeros so reads past the end give 0."""
  head = tf.io.decode_raw(tf.strings.substr(data, 0, _HEADER_BYTES), tf.uint8)
  return tf.pad(tf.cast(head, tf.int32), [[0, 16]])


def _at(buf, i):
  """buf[i] for any int32 i (0 outside the buffer)."""
  n = tf.shape(buf)[0]
  inside = tf.logical_and(i >= 0, i < n)
  return tf.where(inside, tf.gather(buf, tf.clip_by_value(i, 0, n - 1)), 0)


def _u16(buf, i, little):
  a, b = _at(buf, i), _at(buf, i + 1)
  return tf.where(little, a + b * 256, a * 256 + b)


def _u32(buf, i, little):
  lo, hi = _u16(buf, i, little), _u16(buf, i + 2, little)
  # Offsets >= 2**31 point far outside a header anyway; int32 wraps them negative, read as absent.
  return tf.where(little, lo + hi * 65536, lo * 65536 + hi)


def _jpeg_tiff_start(buf):
  """Offset of the TIFF header inside the first APP1 `Exif\\0\\0` segment, or -1."""
  exif = tf.constant([0x45, 0x78, 0x69, 0x66, 0, 0], tf.int32)

  def cond(i, found, k):
    return tf.logical_and(tf.logical_and(found < 0, k < _MAX_SEGMENTS),
                          tf.logical_and(_at(buf, i) == 0xFF, i + 4 <= tf.shape(buf)[0]))

  def body(i, found, k):
    marker = _at(buf, i + 1)
    length = _u16(buf, i + 2, False)
    is_exif = tf.logical_and(marker == 0xE1, tf.reduce_all(
        tf.stack([_at(buf, i + 4 + j) for j in range(6)]) == exif))
    stop = tf.logical_or(marker == 0xDA, marker == 0xD9)  # scan data or end: no EXIF before it
    fill = marker == 0xFF
    no_length = tf.logical_or(marker == 0x01, tf.logical_and(marker >= 0xD0, marker <= 0xD8))
    found = tf.where(is_exif, i + 10, found)
    nxt = tf.where(fill, i + 1, tf.where(no_length, i + 2, i + 2 + tf.maximum(length, 2)))
    nxt = tf.where(stop, tf.shape(buf)[0], nxt)
    return nxt, found, k + 1

  _, found, _ = tf.while_loop(cond, body, (tf.constant(2), tf.constant(-1), tf.constant(0)))
  return found


def _png_tiff_start(buf):
  """Offset of the `eXIf` chunk's data (a TIFF header) before the first IDAT, or -1."""
  def tag(text):
    return sum(ord(c) << (8 * (3 - j)) for j, c in enumerate(text))

  def cond(i, found, k):
    return tf.logical_and(tf.logical_and(found < 0, k < _MAX_SEGMENTS),
                          i + 8 <= tf.shape(buf)[0])

  def body(i, found, k):
    length = _u32(buf, i, False)
    kind = _u32(buf, i + 4, False)
    found = tf.where(kind == tag("eXIf"), i + 8, found)
    stop = tf.logical_or(tf.logical_or(kind == tag("IDAT"), kind == tag("IEND")), length < 0)
    return tf.where(stop, tf.shape(buf)[0], i + 12 + length), found, k + 1

  _, found, _ = tf.while_loop(cond, body, (tf.constant(8), tf.constant(-1), tf.constant(0)))
  return found


def _tiff_orientation(buf, tiff):
  """The Orientation value of IFD0 of the TIFF header at `tiff` (1 when absent or not 1..8)."""
  order = _at(buf, tiff)
  little = order == 0x49  # "II"; "MM" is big-endian
  valid = tf.logical_and(tiff >= 0, tf.logical_or(
      tf.logical_and(little, _at(buf, tiff + 1) == 0x49),
      tf.logical_and(order == 0x4D, _at(buf, tiff + 1) == 0x4D)))
  ifd = tiff + _u32(buf, tiff + 4, little)
  count = tf.minimum(_u16(buf, ifd, little), _MAX_IFD_ENTRIES)
  k = tf.range(_MAX_IFD_ENTRIES)
  entries = ifd + 2 + 12 * k
  tags, values = _u16(buf, entries, little), _u16(buf, entries + 8, little)
  hit = tf.logical_and(tags == ORIENTATION_TAG, k < count)
  value = tf.reduce_sum(tf.where(
      tf.logical_and(hit, tf.cumsum(tf.cast(hit, tf.int32)) == 1), values, 0))
  ok = tf.logical_and(tf.logical_and(valid, tf.reduce_any(hit)),
                      tf.logical_and(value >= 1, value <= 8))
  return tf.where(tf.logical_and(ok, ifd > tiff), value, 1)


def exif_orientation(data) -> tf.Tensor:
  """EXIF Orientation (1..8, 1 = as stored) of one encoded JPEG or PNG; 1 for other formats."""
  buf = _bytes(data)
  is_png = tf.reduce_all(buf[:8] == tf.constant([137, 80, 78, 71, 13, 10, 26, 10], tf.int32))
  is_jpeg = tf.reduce_all(buf[:3] == tf.constant([0xFF, 0xD8, 0xFF], tf.int32))
  start = tf.cond(is_jpeg, lambda: _jpeg_tiff_start(buf),
                  lambda: tf.cond(is_png, lambda: _png_tiff_start(buf), lambda: tf.constant(-1)))
  return tf.where(start >= 0, _tiff_orientation(buf, start), 1)


def orient(image, orientation):
  """OpenCV's ApplyExifOrientation: 2 flip, 3 rotate 180, 4 flip vertically, 5 transpose, 6
  rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise."""
  t = lambda x: tf.transpose(x, [1, 0, 2])  # noqa: E731
  branches = [lambda: image, lambda: image, lambda: tf.reverse(image, [1]),
              lambda: tf.reverse(image, [0, 1]), lambda: tf.reverse(image, [0]),
              lambda: t(image), lambda: tf.reverse(t(image), [1]),
              lambda: tf.reverse(t(image), [0, 1]), lambda: tf.reverse(t(image), [0])]
  return tf.switch_case(tf.clip_by_value(orientation, 0, 8), branches)


# ------------------------------------------------------------------------------- decode

def _decode(data, stored_size: int, reduced: bool):
  """RGB uint8 [H, W, 3] as preprocess.decode returns it (before EXIF orientation)."""
  def jpeg():
    if not reduced:
      return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
    shape = tf.io.extract_jpeg_shape(data)
    short = tf.minimum(shape[0], shape[1])  # EXIF rotation never changes the shorter side
    # preprocess._REDUCED_FLAGS: the largest of 8, 4, 2 that keeps the shorter side >= stored.
    index = tf.where(short // 8 >= stored_size, 3, tf.where(
        short // 4 >= stored_size, 2, tf.where(short // 2 >= stored_size, 1, 0)))
    return tf.switch_case(index, [
        lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE")
        for r in (1, 2, 4, 8)])

  other = lambda: tf.io.decode_image(data, channels=3, expand_animations=False)  # noqa: E731
  image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  return tf.ensure_shape(image, [None, None, 3])


# ------------------------------------------------------------------------------- resize

def _area_weights(side, size: int):
  """[size, side]: OpenCV INTER_AREA's weights when shrinking (box overlap / scale)."""
  scale = tf.cast(side, tf.float64) / size
  lo = tf.range(size, dtype=tf.float64)[:, None] * scale
  j = tf.range(side, dtype=tf.float64)[None, :]
  overlap = tf.minimum(lo + scale, j + 1.0) - tf.maximum(lo, j)
  return tf.maximum(overlap, 0.0) / scale


def _cubic_weights(side, size: int):
  """[size, side]: OpenCV INTER_CUBIC's weights (A = -0.75, half-pixel centres, edges replicated)."""
  a = -0.75
  scale = tf.cast(side, tf.float64) / size
  fx = (tf.range(size, dtype=tf.float64) + 0.5) * scale - 0.5
  sx = tf.floor(fx)
  x = fx - sx
  c0 = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
  c1 = ((a + 2) * x - (a + 3)) * x * x + 1
  c2 = ((a + 2) * (1 - x) - (a + 3)) * (1 - x) * (1 - x) + 1
  coeffs = [c0, c1, c2, 1.0 - c0 - c1 - c2]
  w = 0.0
  for k, c in enumerate(coeffs):
    idx = tf.clip_by_value(tf.cast(sx, tf.int32) - 1 + k, 0, side - 1)
    w += tf.one_hot(idx, side, dtype=tf.float64) * c[:, None]
  return w


def crop_resize(image, size: int):
  """preprocess._resize_square in-graph: centre square crop, then area down / cubic up."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  side = tf.minimum(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  square = tf.cast(image[top:top + side, left:left + side], tf.float32)
  weights = tf.cast(tf.cond(side >= size, lambda: _area_weights(side, size),
                            lambda: _cubic_weights(side, size)), tf.float32)
  out = tf.einsum("is,sxc->ixc", weights, square)
  out = tf.einsum("jx,ixc->ijc", weights, out)
  return tf.ensure_shape(tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8),
                         [size, size, 3])


# ------------------------------------------------------------------------------- together

def converter_image(data, pconfig: preprocess.PreprocessConfig, model_size: int):
  """(uint8 [model_size, model_size, 3], EXIF orientation) for one encoded image: the pixels
  `bin/predict` feeds the model for the same file (module docstring)."""
  stored = pconfig.image_size
  orientation = exif_orientation(data)
  image = _decode(data, stored, pconfig.reduced_decode)
  shape = tf.shape(image)
  as_stored = tf.logical_and(tf.logical_and(shape[0] == stored, shape[1] == stored),
                             orientation == 1)

  def client_preprocessed():
    return pipeline.decode_image(data, model_size, None)

  def raw():
    pixels = crop_resize(orient(image, orientation), stored)
    if pconfig.image_format == "jpeg":
      encoded = tf.io.encode_jpeg(pixels, quality=pconfig.jpeg_quality)
      return pipeline.decode_image(encoded, model_size, stored)
    if model_size == stored:
      return pixels
    return tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
        pixels, (model_size, model_size), antialias=True)), 0, 255), tf.uint8)

  out = tf.cond(as_stored, client_preprocessed, raw)
  return tf.ensure_shape(out, [model_size, model_size, 3]), orientation


def numpy_weights(side: int, size: int) -> np.ndarray:
  """The [size, side] resize weights as numpy (for tests and the docs)."""
  fn = _area_weights if side >= size else _cubic_weights
  return fn(tf.constant(side), size).numpy()
