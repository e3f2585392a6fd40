"""OpenCV preprocessing: validate, decode, square-resize, optionally remove hair, re-encode.

Runs in `spawn`ed converter workers and in `bin/predict`, so it imports OpenCV and NumPy only,
never TensorFlow (importing TF costs seconds and GBs per worker). Arrays are RGB uint8 everywhere;
OpenCV's BGR appears only at the decode and `encode` edges.

Untrusted bytes are checked before OpenCV sees them: the format is sniffed from the signature
(JPEG, PNG, BMP, TIFF, WebP; anything else is rejected), the dimensions are read from the header
so a decompression bomb is refused without being decoded, and a JPEG must end its scan data with an
EOI marker. Every problem with the data is a `RejectedImage` carrying a short `reason`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
from typing import Any

import cv2
import numpy as np

MIN_SIDE = 8  # Smaller sources carry no usable lesion detail (thumbnails, icons, broken exports).
IMAGE_FORMATS = ("jpeg", "png")
SOURCE_FORMATS = ("jpeg", "png", "bmp", "tiff", "webp")
_MAX_IMAGE_SIZE = 8192

# Flags. IMREAD_COLOR* apply EXIF orientation (IMREAD_UNCHANGED does not) and always yield 3
# channels: gray is replicated and alpha is DROPPED, not composited (checked on cv2 5.0). JPEGs are
# 8-bit, so libjpeg-turbo writes RGB directly. Everything else is read as BGR with IMREAD_ANYDEPTH
# (16-bit kept, we scale by >> 8) and converted: cv2 5.0 scrambles the samples of 16-bit RGB TIFFs
# when IMREAD_COLOR_RGB is combined with IMREAD_ANYDEPTH.
_JPEG_FLAGS = cv2.IMREAD_COLOR_RGB
_OTHER_FLAGS = cv2.IMREAD_COLOR_BGR | cv2.IMREAD_ANYDEPTH
# Reduced flags (BGR, EXIF applied): libjpeg-turbo scales inside the IDCT; a 4000x3000 JPEG takes
# ~37 ms at 1/4 against ~100-150 ms in full.
_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                  (2, cv2.IMREAD_REDUCED_COLOR_2))

_BOOL_FIELDS = ("remove_hair", "notebook_cleanup", "reduced_decode")

# Rejection reasons: short and stable (fit for counting). The converter's manifest and bin/predict
# both word a rejection with `describe_rejection`, so one bad file reads the same everywhere.
ZERO_BYTE = "zero-byte file"
NOT_AN_IMAGE = "not an image"
TOO_MANY_PIXELS = "too many pixels"
TOO_SMALL = "image too small"
TRUNCATED_JPEG = "truncated JPEG"
UNSUPPORTED_SAMPLES = "unsupported sample type"
UNSUPPORTED_CHANNELS = "unsupported channel layout"
UNREADABLE = "unreadable file"
UNEXPECTED = "unexpected error"


def corrupt_header(fmt: str) -> str:
  return f"corrupt {fmt.upper()} header"


def undecodable(fmt: str) -> str:
  return f"undecodable {fmt.upper()}"



class RejectedImage(ValueError):
  """Bad input data. `reason` is short and stable (fit for counting), `detail` says more."""

  def __init__(self, reason: str, detail: str = "", path: str | os.PathLike | None = None):
    self.reason = reason
    self.detail = detail
    self.path = None if path is None else os.fspath(path)
    msg = reason if not detail else f"{reason}: {detail}"
    super().__init__(msg if self.path is None else f"{self.path}: {msg}")

  def with_path(self, path: str | os.PathLike) -> RejectedImage:
    return RejectedImage(self.reason, self.detail, path)

  def __reduce__(self):  # Keeps reason/detail/path when a spawned worker pickles it back.
    return RejectedImage, (self.reason, self.detail, self.path)


def describe_rejection(err: BaseException) -> str:
  """The one wording of why a file was not used: "reason: detail" (no path; callers list it)."""
  if isinstance(err, RejectedImage):
    return f"{err.reason}: {err.detail}" if err.detail else err.reason
  return f"{UNEXPECTED}: {type(err).__name__}: {err}"


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """How source images become stored images. Validated on construction."""

  image_size: int = 512  # Output is image_size x image_size.
  image_format: str = "jpeg"  # "jpeg" | "png"
  jpeg_quality: int = 95
  remove_hair: bool = False  # `hair_mask` (long thin dark/light lines) + inpaint.
  notebook_cleanup: bool = False  # The notebook's contour inpaint + bilateral filter, size-scaled.
  reduced_decode: bool = True  # IMREAD_REDUCED_COLOR_{2,4,8}: JPEGs >= 2x image_size.
  max_pixels: int = 178_956_970  # Source width*height from its header (Pillow's error limit).

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the field, its value and what would be accepted."""

    def _int(name, lo, hi):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"PreprocessConfig.{name}={v!r}: expected an integer in [{lo}, {hi}]")

    _int("image_size", MIN_SIDE, _MAX_IMAGE_SIZE)
    if self.image_format not in IMAGE_FORMATS:
      raise ValueError(f"PreprocessConfig.image_format={self.image_format!r}: expected one of "
                       f"{', '.join(map(repr, IMAGE_FORMATS))}")
    _int("jpeg_quality", 1, 100)
    for name in _BOOL_FIELDS:
      v = getattr(self, name)
      if not isinstance(v, bool):
        raise ValueError(f"PreprocessConfig.{name}={v!r}: expected True or False")
    _int("max_pixels", MIN_SIDE * MIN_SIDE, 2**62)

  def to_dict(self) -> dict[str, Any]:
    """JSON-able dict for manifest.json; `from_dict` inverts it."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
    """Builds a validated config; unknown keys are an error (a typo must not pass silently)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"PreprocessConfig: unknown key(s) {unknown}; accepted keys: "
                       f"{sorted(known)}")
    return cls(**d)


# --------------------------------------------------------------------------------------- headers

# Start-of-frame markers (C4 = DHT, C8 = JPG extension and CC = DAC are not frames).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_scan(data: bytes) -> tuple[int, int, int] | None:
  """(width, height, offset of the first SOS marker or -1) from the marker segments, else None."""
  i, n = 2, len(data)
  size = None
  while i + 4 <= n:
    if data[i] != 0xFF:
      return None
    marker = data[i + 1]
    if marker == 0xFF:  # Fill byte before a marker.
      i += 1
      continue
    if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # Markers without a length.
      i += 2
      continue
    if marker == 0xD9:
      break
    if marker == 0xDA:
      return None if size is None else (*size, i)
    seg_len = int.from_bytes(data[i + 2:i + 4], "big")
    if seg_len < 2:
      return None
    if marker in _JPEG_SOF and i + 9 <= n:
      h, w = struct.unpack(">HH", data[i + 5:i + 9])
      size = (w, h) if w and h else None  # Height 0 means "defined later by DNL": too exotic.
    i += 2 + seg_len
  return None if size is None else (*size, -1)


def _tiff_size(data: bytes) -> tuple[int, int] | None:
  bo = "<" if data[:2] == b"II" else ">"
  magic = struct.unpack(bo + "H", data[2:4])[0]
  if magic == 42:
    (ifd,) = struct.unpack(bo + "I", data[4:8])
    (count,) = struct.unpack(bo + "H", data[ifd:ifd + 2])
    start, entry, count_fmt = ifd + 2, 12, "I"
  else:  # 43: BigTIFF, 8-byte offsets.
    (ifd,) = struct.unpack(bo + "Q", data[8:16])
    (count,) = struct.unpack(bo + "Q", data[ifd:ifd + 8])
    start, entry, count_fmt = ifd + 8, 20, "Q"
  value_fmt = {3: "H", 4: "I", 16: "Q"}
  dims = {}
  for k in range(min(count, 4096)):
    e = data[start + k * entry:start + (k + 1) * entry]
    tag, typ = struct.unpack(bo + "HH", e[:4])
    if tag in (256, 257) and typ in value_fmt:  # ImageWidth, ImageLength: stored inline.
      value_at = 4 + struct.calcsize(count_fmt)
      fmt = bo + value_fmt[typ]
      dims[tag] = struct.unpack(fmt, e[value_at:value_at + struct.calcsize(fmt)])[0]
  if 256 in dims and 257 in dims:
    return dims[256], dims[257]
  return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
  chunk = data[12:16]
  if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
    w, h = struct.unpack("<HH", data[26:30])
    return w & 0x3FFF, h & 0x3FFF
  if chunk == b"VP8L" and data[20] == 0x2F:
    (bits,) = struct.unpack("<I", data[21:25])
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
  if chunk == b"VP8X":
    return (int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
  return None


def _sniff(data: bytes) -> str | None:
  """Source format from the signature; None for anything we do not accept."""
  if data[:3] == b"\xff\xd8\xff":
    return "jpeg"
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "png"
  if data[:2] == b"BM":
    return "bmp"
  if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
    return "tiff"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "webp"
  return None


def _header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
  try:
    if fmt == "jpeg":
      info = _jpeg_scan(data)
      return None if info is None else info[:2]
    if fmt == "png":
      if data[12:16] != b"IHDR":
        return None
      return struct.unpack(">II", data[16:24])
    if fmt == "bmp":
      (hdr,) = struct.unpack("<I", data[14:18])
      if hdr == 12:  # BITMAPCOREHEADER (OS/2): 16-bit unsigned sizes.
        return struct.unpack("<HH", data[18:22])
      w, h = struct.unpack("<ii", data[18:26])
      return abs(w), abs(h)  # Negative height = rows stored top-down.
    if fmt == "tiff":
      return _tiff_size(data)
    if fmt == "webp":
      return _webp_size(data)
  except (struct.error, IndexError, ValueError):
    return None  # Header cut short.
  return None


def image_dimensions(data: bytes) -> tuple[int, int] | None:
  """(width, height) as stored (before EXIF rotation), read from the header only; None if unknown.

  Understands JPEG (SOFn), PNG (IHDR), BMP, TIFF and BigTIFF (first IFD) and WebP.
  """
  data = bytes(data)
  fmt = _sniff(data)
  return None if fmt is None else _header_size(data, fmt)


# ---------------------------------------------------------------------------------------- decode


def _check(data: bytes, config: PreprocessConfig) -> tuple[str, int, int]:
  """Validates the bytes without decoding; returns (format, width, height)."""
  if len(data) == 0:
    raise RejectedImage(ZERO_BYTE)
  fmt = _sniff(data)
  if fmt is None:
    raise RejectedImage(NOT_AN_IMAGE, f"unrecognised signature {bytes(data[:8]).hex()}; "
                        f"accepted formats: {', '.join(SOURCE_FORMATS)}")
  size = _header_size(data, fmt)
  if size is None:
    raise RejectedImage(corrupt_header(fmt), f"no readable dimensions in {len(data)} "
                        "bytes")
  w, h = size
  if w * h > config.max_pixels:
    raise RejectedImage(TOO_MANY_PIXELS, f"{w}x{h} = {w * h} pixels > max_pixels="
                        f"{config.max_pixels} (possible decompression bomb; not decoded)")
  if min(w, h) < MIN_SIDE:
    raise RejectedImage(TOO_SMALL, f"{w}x{h}; each side must be >= {MIN_SIDE} px")
  if fmt == "jpeg":
    sos = _jpeg_scan(data)[2]
    # Scan data byte-stuffs 0xFF (FF00) and only allows RSTn markers, so an FFD9 after the first SOS
    # is the EOI. OpenCV 4.x decoded truncated JPEGs with grey fill; check it ourselves.
    if sos < 0 or data.rfind(b"\xff\xd9", sos) < 0:
      raise RejectedImage(TRUNCATED_JPEG, f"no EOI marker (FFD9) after the scan data; "
                          f"{len(data)} bytes")
  return fmt, w, h


def _to_uint8(img: np.ndarray) -> np.ndarray:
  if img.dtype == np.uint8:
    return img
  if img.dtype == np.uint16:
    return (img >> 8).astype(np.uint8)  # Scale, not clip: 65535 -> 255, 32768 -> 128.
  # Float / 32-bit TIFFs have no agreed range (and cv2 5.0 cannot convert them itself).
  raise RejectedImage(UNSUPPORTED_SAMPLES, f"{img.dtype} samples; accepted: 8 or 16-bit")


def decode(data: bytes, config: PreprocessConfig | None = None) -> np.ndarray:
  """Bytes -> RGB uint8 HxWx3 with EXIF orientation applied; raises RejectedImage.

  Gray is replicated to 3 channels, alpha is dropped (not composited) and 16-bit samples are
  scaled by >> 8. With `config.reduced_decode`, a JPEG whose shorter side is at least twice
  `config.image_size` is decoded at 1/2, 1/4 or 1/8 scale (the largest that keeps the shorter side
  >= image_size), so the result can be smaller than the source.
  """
  config = config or PreprocessConfig()
  data = bytes(data)  # No copy for bytes; accepts bytearray / memoryview.
  fmt, w, h = _check(data, config)
  buf = np.frombuffer(data, np.uint8)
  flags = _JPEG_FLAGS if fmt == "jpeg" else _OTHER_FLAGS
  if config.reduced_decode and fmt == "jpeg":
    short = min(w, h)  # EXIF rotation swaps width and height but never changes the shorter side.
    for factor, reduced in _REDUCED_FLAGS:
      if short // factor >= config.image_size:
        flags = reduced
        break
  try:
    img = cv2.imdecode(buf, flags)
  except cv2.error as err:  # E.g. over OPENCV_IO_MAX_IMAGE_PIXELS (2**30 by default).
    raise RejectedImage(undecodable(fmt), str(err).strip().splitlines()[-1]) from err
  if img is None:
    raise RejectedImage(undecodable(fmt), "OpenCV could not decode it (truncated or "
                        "corrupt)")
  img = _to_uint8(img)
  if img.ndim != 3 or img.shape[2] != 3:
    raise RejectedImage(UNSUPPORTED_CHANNELS, f"decoded shape {img.shape}")
  return img if flags == _JPEG_FLAGS else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# ------------------------------------------------------------------------------------ preprocess


def _odd(x: float, minimum: int = 3) -> int:
  k = max(minimum, int(round(x)))
  return k if k % 2 else k + 1


def _resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
  """Centre square crop, then resize to size x size.

  Same content as "shorter side to size, then centre crop", but the crop comes first so the
  discarded margins are never resampled (25% less work for 4:3) and the output is exactly square
  without rounding.
  """
  h, w = rgb.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  sq = rgb[top:top + side, left:left + side]
  if side == size:
    return sq.copy()  # Never hand back (a view of) the caller's array.
  interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
  return cv2.resize(sq, (size, size), interpolation=interp)


# Hair detection. Sizes are in pixels at a 512-px output and scale with the side S; each was chosen
# on `python -m benchmarks.hair` (synthetic hairs 1-6 px wide at 512, dots, globules, a pigment
# network and border streaks, all with exact truth; 12 images at 512, figures below are from it).
_HAIR_HAT = 9  # black/top-hat square: wider than the thickest hair (6 px) plus anti-aliasing
_HAIR_LINE = 26  # line opening ~ S/20: longer than a network mesh (10-18 px) or a streak (<= 17)
_HAIR_ANGLES = 16  # 11.25 deg apart: a 26-px line is off by <= 1.3 px at its ends
# Seed level = max(floor, k * median line response). Hair-free images reached a line response of
# 9-25 (network, grain); the 10 % weakest thin dark hairs 30. Floor 14: 1.4 % of hair-free pixels
# masked and 26 % of dots lost; 20: none masked, 1 % of dots lost, recall 0.90 -> 0.89; 26: recall
# 0.86. k = 4 lifts the level only on coarse textures (median response 1-4 on smooth ones).
_HAIR_FLOOR = 20.0
_HAIR_NOISE_K = 4.0
_HAIR_LOW = 0.6  # hysteresis: grow seeds down to this fraction (0.5: 0.3 % hair-free masked)
_HAIR_PIXEL = 0.5  # a masked pixel's own hat response is >= this fraction of the seed level
_HAIR_DILATE = 1.0  # px at 512 that `remove_hair` adds around the mask (anti-aliased edges):
# MAE inside hair 7.3 -> 5.8 gray levels.
# Telea radius in px at 512: 3 took 25 ms a 512^2 image, 1 takes 10 ms.
_INPAINT_RADIUS = 1.0
_HAIR_MAX_WIDTH = 512 / 40  # components wider on average (2 * area / perimeter) are not hair;
# S/60 cut thick-hair recall to 0.69: the response of a 6-px hair is ~9 px wide.
# ...but never below 4.5 px: the 3x3 blur and anti-aliasing make even a 1-px line ~3.3 px wide
# in the response (six crossing 1-px lines at 128 px measured 3.34).
_HAIR_WIDTH_PX = 4.5
_HAIR_MIN_LENGTH = 512 / 20
_HAIR_MAX_FILL = 0.35  # bounding-box fill above which a wide component is a mesh  # nor those shorter (perimeter / 2)


def _line_kernels(length: int, angles: int) -> list[np.ndarray]:
  """Binary line structuring elements of `length` px at `angles` orientations over 180 deg."""
  kernels = []
  c = length // 2
  for a in np.arange(angles) * np.pi / angles:
    k = np.zeros((length, length), np.uint8)
    dx, dy = c * np.cos(a), c * np.sin(a)
    cv2.line(k, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1, 1)
    kernels.append(k)
  return kernels


@functools.lru_cache(maxsize=8)
def _hair_kernels(size: int) -> tuple[np.ndarray, list[np.ndarray]]:
  s = size / 512
  hat = cv2.getStructuringElement(cv2.MORPH_RECT, (_odd(_HAIR_HAT * s), _odd(_HAIR_HAT * s)))
  return hat, _line_kernels(_odd(_HAIR_LINE * s, 5), _HAIR_ANGLES)


def _line_response(hat: np.ndarray, lines: list[np.ndarray]) -> np.ndarray:
  """Supremum of openings by lines: how strongly each pixel lies on a long straight ridge.

  A slight blur first widens 1-px hairs so that the nearest of the 16 orientations still fits.
  """
  hat = cv2.GaussianBlur(hat, (3, 3), 0)
  out = np.zeros_like(hat)
  for k in lines:
    np.maximum(out, cv2.morphologyEx(hat, cv2.MORPH_OPEN, k), out=out)
  return out


def _long_thin(mask: np.ndarray, size: int) -> np.ndarray:
  """Keeps the connected components of `mask` that are long and thin (hair-shaped)."""
  count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
  if count < 2:
    return mask
  # Perimeter per component, holes included, so that crossing hairs (which enclose holes) keep
  # 2 * area / perimeter near their width.
  perim = np.zeros(count)
  contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
  for c in contours:
    x, y = c[0, 0]
    perim[labels[y, x]] += cv2.arcLength(c, closed=True)
  s = size / 512
  area = stats[:, cv2.CC_STAT_AREA]
  length = perim / 2
  width = area / np.maximum(length, 1)
  keep = (length >= _HAIR_MIN_LENGTH * s) & (width <= max(_HAIR_WIDTH_PX, _HAIR_MAX_WIDTH * s))
  # A mesh of short thin lines (a dense pigment network) is thin and long by perimeter too, but
  # fills its bounding box: a 2-px honeycomb patch filled 63 %, 20 crossing hairs ~11 %.
  bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
  keep &= (np.minimum(bw, bh) < _HAIR_MIN_LENGTH * s) | (area < _HAIR_MAX_FILL * bw * bh)
  keep[0] = False
  return np.where(keep, 255, 0).astype(np.uint8)[labels]


def hair_mask(rgb: np.ndarray) -> np.ndarray:
  """uint8 0/255 mask of hairs in a square RGB image: long, thin, dark or light lines.

  Black-hat (dark) and top-hat (light) find structures thinner than ~11 px at 512; the supremum
  of line openings keeps only those that run straight for S/20 (a dot, a globule, a network mesh
  or a border streak never does); a seed threshold adapted to the image's texture (k times the
  median line response) with hysteresis; then only long, thin components, trimmed to pixels that
  are themselves darker (lighter) than their surround. `remove_hair` dilates it before inpainting.
  """
  size = rgb.shape[0]
  hat_k, lines = _hair_kernels(size)
  gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
  dark = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, hat_k)
  light = cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, hat_k)
  resp = np.maximum(_line_response(dark, lines), _line_response(light, lines))
  high = max(_HAIR_FLOOR, _HAIR_NOISE_K * float(np.median(resp)))
  weak = np.where(resp >= _HAIR_LOW * high, 255, 0).astype(np.uint8)
  if not cv2.countNonZero(weak):
    return weak
  count, labels = cv2.connectedComponents(weak, connectivity=8)
  seeded = np.zeros(count, bool)
  seeded[np.unique(labels[resp >= high])] = True
  seeded[0] = False
  mask = _long_thin(np.where(seeded, 255, 0).astype(np.uint8)[labels], size)
  # The blur in `_line_response` widens the response by ~1 px a side; keep only pixels that are
  # themselves darker (lighter) than their surround, then dilate to cover anti-aliased edges.
  return mask & np.where(np.maximum(dark, light) >= _HAIR_PIXEL * high, 255, 0).astype(np.uint8)


def hair_mask_kernel(rgb: np.ndarray) -> np.ndarray:
  """The common Kaggle kernels' mask (black-hat, 17x17 cross at 512, threshold 10).

  Kept only so that `benchmarks.hair` can compare: it also masks dots, globules and network.
  """
  s = rgb.shape[0] / 512
  kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (_odd(17 * s), _odd(17 * s)))
  gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
  blackhat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, kernel)
  return cv2.threshold(blackhat, 10, 255, cv2.THRESH_BINARY)[1]


def inpaint(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Telea inpainting of the mask's pixels only; `rgb` itself if the mask is empty."""
  if not cv2.countNonZero(mask):
    return rgb
  radius = max(1, round(_INPAINT_RADIUS * rgb.shape[0] / 512))
  return cv2.inpaint(rgb, mask, radius, cv2.INPAINT_TELEA)


def remove_hair(rgb: np.ndarray) -> np.ndarray:
  """`hair_mask`, dilated by 1 px at 512 to cover anti-aliased edges, inpainted (Telea)."""
  mask = hair_mask(rgb)
  r = max(1, round(_HAIR_DILATE * rgb.shape[0] / 512))
  mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
  return inpaint(rgb, mask)


_remove_hair = remove_hair  # the name `preprocess_array` and older callers use


def _remove_hair_kernel(rgb: np.ndarray) -> np.ndarray:
  """The old `--remove_hair`: Kaggle-kernel mask, Telea radius 1 at 512."""
  mask = hair_mask_kernel(rgb)
  if not cv2.countNonZero(mask):
    return rgb
  return cv2.inpaint(rgb, mask, max(1, round(rgb.shape[0] / 512)), cv2.INPAINT_TELEA)


def notebook_mask(rgb: np.ndarray) -> np.ndarray:
  """The mask `_notebook_cleanup` inpaints (see there); uint8 0/255."""
  size = rgb.shape[0]
  kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(size / 16), _odd(size / 16)))
  gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
  blackhat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, kernel)
  _, dark = cv2.threshold(blackhat, 25, 255, cv2.THRESH_BINARY)
  contours, _ = cv2.findContours(dark, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  mask = np.zeros_like(dark)
  if contours:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    keep = []
    for c in contours:
      perimeter = cv2.arcLength(c, closed=True)
      if perimeter < size / 4:
        continue
      x, y = c[0, 0]
      label = labels[y, x]  # Outer contours trace the component's own (8-connected) pixels.
      if 2 * stats[label, cv2.CC_STAT_AREA] / perimeter <= size / 32:
        keep.append(label)
    if keep:
      lut = np.zeros(count, np.uint8)
      lut[keep] = 255
      mask = cv2.dilate(lut[labels], np.ones((3, 3), np.uint8))  # Cover anti-aliased edges.
  return mask


def _notebook_cleanup(rgb: np.ndarray) -> np.ndarray:
  """The notebook's contour inpainting and bilateral filter, with size-scaled parameters.

  Contours: dark structures thinner than ~S/16 (black-hat, threshold 25 - stronger than hair's 10)
  are traced; a contour is inpainted when it is long (perimeter >= S/4, i.e. a stroke >= S/8 long)
  and thin (mean width 2*area/perimeter <= S/32, 16 px at 512). That catches ink strokes, ruler
  ticks and thick hairs but spares the lesion body and small dots/globules, which are diagnostic.
  Bilateral: the notebook's d=-1, sigmaSpace=50 makes OpenCV use a 151-px window (8.8 s per 512^2
  image). We keep d=-1 and sigmaColor=50 but scale sigmaSpace to 3 px at 512, so OpenCV derives a
  9-px window (~25 ms).
  """
  s = rgb.shape[0] / 512
  mask = notebook_mask(rgb)
  if cv2.countNonZero(mask):
    rgb = cv2.inpaint(rgb, mask, max(1, round(2 * s)), cv2.INPAINT_TELEA)
  return cv2.bilateralFilter(rgb, -1, 50, 3 * s)


def preprocess_array(rgb: np.ndarray, config: PreprocessConfig | None = None) -> np.ndarray:
  """RGB uint8 HxWx3 (any size) -> RGB uint8 SxS: crop+resize, then hair removal, then cleanup.

  Hair removal and cleanup run after resizing: their cost scales with the pixels they see.
  """
  config = config or PreprocessConfig()
  if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or \
      rgb.shape[2] != 3:
    raise ValueError(f"preprocess_array expects an RGB uint8 HxWx3 array, got "
                     f"{getattr(rgb, 'dtype', type(rgb))} {getattr(rgb, 'shape', '')}")
  out = _resize_square(rgb, config.image_size)
  if config.remove_hair:
    out = _remove_hair(out)
  if config.notebook_cleanup:
    out = _notebook_cleanup(out)
  return out


def encode(rgb: np.ndarray, config: PreprocessConfig | None = None) -> bytes:
  """RGB uint8 -> JPEG or PNG bytes (OpenCV writes BGR, so convert here, at the edge)."""
  config = config or PreprocessConfig()
  bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
  if config.image_format == "png":
    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
  else:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality])
  if not ok:
    raise RuntimeError(f"cv2.imencode failed for a {rgb.shape} image as {config.image_format}")
  return buf.tobytes()


def preprocess_bytes(data: bytes, config: PreprocessConfig | None = None) -> bytes:
  """decode -> preprocess_array -> encode. Deterministic: same bytes and config, same output."""
  config = config or PreprocessConfig()
  return encode(preprocess_array(decode(data, config), config), config)


def preprocess_file(path: str | os.PathLike, config: PreprocessConfig | None = None) -> bytes:
  """Reads `path` and runs `preprocess_bytes`; every failure is a RejectedImage naming the path."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as err:
    raise RejectedImage(UNREADABLE, err.strerror or str(err), path) from err
  try:
    return preprocess_bytes(data, config)
  except RejectedImage as err:
    raise err.with_path(path) from err
