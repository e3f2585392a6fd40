"""Test photos for the serving graph: synthetic lesions as JPEG/PNG with EXIF orientation (both
byte orders), grey, CMYK and 16-bit variants. No real patient images."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np

from skinrecords.data import synthetic


def photo(width: int, height: int, index: int = 0, melanoma: bool = True) -> np.ndarray:
  """RGB uint8 [height, width, 3] from the synthetic generator."""
  return synthetic.make_image(np.random.default_rng([7, index]), melanoma, width, height)


def jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
  if rgb.ndim == 2:
    return cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
  return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                      [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def png(rgb: np.ndarray) -> bytes:
  if rgb.ndim == 2 or rgb.dtype == np.uint16 and rgb.ndim == 2:
    return cv2.imencode(".png", rgb)[1].tobytes()
  return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def tiff_block(orientation: int, little: bool) -> bytes:
  """A TIFF header whose IFD0 holds ImageWidth, then Orientation, then Software (an offset)."""
  bo = "<" if little else ">"
  head = (b"II" if little else b"MM") + struct.pack(bo + "HI", 42, 8)
  entries = [struct.pack(bo + "HHIHH", 0x0100, 3, 1, 99, 0),
             struct.pack(bo + "HHIHH", 0x0112, 3, 1, orientation, 0),
             struct.pack(bo + "HHII", 0x0131, 2, 8, 8 + 2 + 3 * 12 + 4)]
  return head + struct.pack(bo + "H", len(entries)) + b"".join(entries) + struct.pack(
      bo + "I", 0) + b"skinrec\0"


def with_exif_jpeg(data: bytes, orientation: int, little: bool = True) -> bytes:
  """`data` (a JPEG) with an APP1 Exif segment after its JFIF APP0 (as cameras and phones)."""
  payload = b"Exif\0\0" + tiff_block(orientation, little)
  app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
  at = 2 + 2 + struct.unpack(">H", data[4:6])[0] if data[2:4] == b"\xff\xe0" else 2
  return data[:at] + app1 + data[at:]


def with_exif_png(data: bytes, orientation: int, little: bool = True) -> bytes:
  """`data` (a PNG) with an eXIf chunk after IHDR."""
  body = tiff_block(orientation, little)
  chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(
      ">I", zlib.crc32(b"eXIf" + body) & 0xFFFFFFFF)
  return data[:33] + chunk + data[33:]


def cmyk_jpeg(rgb: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top  (Pillow comes with matplotlib)
  buf = io.BytesIO()
  Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=92)
  return buf.getvalue()
