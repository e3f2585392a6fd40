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
import os
import struct
from typing import Any

import cv2
import numpy as np

from skinrecords.data import hair

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
  """How source images become stored images. Validated (.validate()) by from_dict, by
  ConvertConfig.validate, by the worker pool and by every function here that takes one."""

  image_size: int = 512  # Output is image_size x image_size.
  image_format: str = "jpeg"  # "jpeg" | "png"
  jpeg_quality: int = 95
  remove_hair: bool = False  # `hair.hair_mask` (long thin dark/light lines) + inpaint.
  notebook_cleanup: bool = False  # `hair.notebook_cleanup`: contour inpaint + bilateral filter.
  reduced_decode: bool = True  # IMREAD_REDUCED_COLOR_{2,4,8}: JPEGs >= 2x image_size.
  max_pixels: int = 178_956_970  # Source width*height from its header (Pillow's error limit).

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
    config = cls(**d)
    config.validate()
    return config


def _valid(config: PreprocessConfig | None) -> PreprocessConfig:
  """`config` (default: PreprocessConfig()), validated: every function here that takes one is an
  entry point (a few microseconds against ~1 ms to decode the smallest image)."""
  config = config or PreprocessConfig()
  config.validate()
  return config


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


def sniff_format(data: bytes) -> str | None:
  """Image format from the signature (the one sniffer: sources, and the Kaggle reader's
  RecordSchema); None for anything we do not accept."""
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
  fmt = sniff_format(data)
  return None if fmt is None else _header_size(data, fmt)


# ---------------------------------------------------------------------------------------- decode


def _check(data: bytes, config: PreprocessConfig) -> tuple[str, int, int]:
  """Validates the bytes without decoding; returns (format, width, height)."""
  if len(data) == 0:
    raise RejectedImage(ZERO_BYTE)
  fmt = sniff_format(data)
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
  config = _valid(config)
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


def preprocess_array(rgb: np.ndarray, config: PreprocessConfig | None = None) -> np.ndarray:
  """RGB uint8 HxWx3 (any size) -> RGB uint8 SxS: crop+resize, then hair removal, then cleanup.

  Hair removal and cleanup run after resizing: their cost scales with the pixels they see.
  """
  config = _valid(config)
  if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or \
      rgb.shape[2] != 3:
    raise ValueError(f"preprocess_array expects an RGB uint8 HxWx3 array, got "
                     f"{getattr(rgb, 'dtype', type(rgb))} {getattr(rgb, 'shape', '')}")
  out = _resize_square(rgb, config.image_size)
  if config.remove_hair:
    out = hair.remove_hair(out)
  if config.notebook_cleanup:
    out = hair.notebook_cleanup(out)
  return out


def encode(rgb: np.ndarray, config: PreprocessConfig | None = None) -> bytes:
  """RGB uint8 -> JPEG or PNG bytes (OpenCV writes BGR, so convert here, at the edge)."""
  config = _valid(config)
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
  config = _valid(config)
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
