"""Tests for skinrecords.data.preprocess: rejections, decoding, geometry, hair removal, config."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest

from skinrecords.data import preprocess as pp

SKIN = (205, 150, 130)
LESION = (120, 80, 60)


def _skin(size: int, seed: int = 0) -> np.ndarray:
  """Flat RGB skin with faint noise and a round lesion in the middle."""
  rng = np.random.default_rng(seed)
  img = np.clip(np.full((size, size, 3), SKIN, np.float64) + rng.normal(0, 2, (size, size, 3)), 0,
                255).astype(np.uint8)
  cv2.circle(img, (size // 2, size // 2), size // 5, LESION, -1, cv2.LINE_AA)
  return img


def _hairy(img: np.ndarray, seed: int = 0, thickness: int = 1) -> np.ndarray:
  rng = np.random.default_rng(seed)
  out, size = img.copy(), img.shape[0]
  for _ in range(6):
    p, q = (int(rng.integers(0, size)), 0), (int(rng.integers(0, size)), size - 1)
    cv2.line(out, p, q, (35, 25, 20), thickness, cv2.LINE_AA)
  return out


def _enc(rgb: np.ndarray, ext: str, params=()) -> bytes:
  bgr = rgb[..., ::-1] if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb
  ok, buf = cv2.imencode(ext, np.ascontiguousarray(bgr), list(params))
  assert ok
  return buf.tobytes()


def _jpeg(rgb: np.ndarray) -> bytes:
  return _enc(rgb, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])


def _exif_jpeg(rgb: np.ndarray, orientation: int) -> bytes:
  """JPEG with a minimal EXIF APP1: a little-endian TIFF header and one IFD entry (0x0112)."""
  tiff = (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) +
          struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0))
  payload = b"Exif\x00\x00" + tiff
  app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
  data = _jpeg(rgb)
  return data[:2] + app1 + data[2:]


def _raw_png(width: int, height: int, color_type: int, bit_depth: int, pixels: bytes) -> bytes:
  """A PNG written by hand (for layouts cv2.imencode cannot write, or lying headers)."""

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(pixels)) +
          chunk(b"IEND", b""))


def _reject(data: bytes, config=None) -> pp.RejectedImage:
  with pytest.raises(pp.RejectedImage) as info:
    pp.decode(data, config or pp.PreprocessConfig(image_size=32))
  return info.value


# ------------------------------------------------------------------------------------ rejections


def test_rejects_zero_byte_file_naming_path(tmp_path):
  path = tmp_path / "empty.jpg"
  path.write_bytes(b"")
  with pytest.raises(pp.RejectedImage) as info:
    pp.preprocess_file(path, pp.PreprocessConfig(image_size=32))
  assert info.value.reason == "zero-byte file"
  assert str(path) in str(info.value)


def test_rejected_image_survives_pickling():  # Workers send it back to the parent process.
  err = pickle.loads(pickle.dumps(pp.RejectedImage("truncated JPEG", "no EOI", "/x/a.jpg")))
  assert (err.reason, err.detail, err.path) == ("truncated JPEG", "no EOI", "/x/a.jpg")
  assert str(err) == "/x/a.jpg: truncated JPEG: no EOI"


def test_rejects_text_named_jpg(tmp_path):
  path = tmp_path / "notes.jpg"
  path.write_text("patient notes, not a picture\n")
  with pytest.raises(pp.RejectedImage) as info:
    pp.preprocess_file(path, pp.PreprocessConfig(image_size=32))
  assert info.value.reason == "not an image"
  assert "jpeg" in str(info.value)  # Says what would be accepted.


@pytest.mark.parametrize("cut", [0.5, 0.9, -2])  # -2: only the EOI marker missing.
def test_rejects_truncated_jpeg(cut):
  data = _jpeg(_skin(64))
  end = int(len(data) * cut) if cut > 0 else len(data) + cut
  assert _reject(data[:end]).reason == "truncated JPEG"


def test_jpeg_with_trailing_bytes_after_eoi_is_accepted():
  data = _jpeg(_skin(64)) + b"\x00" * 100
  assert pp.decode(data, pp.PreprocessConfig(image_size=64)).shape == (64, 64, 3)


@pytest.mark.parametrize("cut", [0.5, -12])  # -12: the IEND chunk missing.
def test_rejects_truncated_png(cut):
  data = _enc(_skin(64), ".png")
  end = int(len(data) * cut) if cut > 0 else len(data) + cut
  assert _reject(data[:end]).reason == "undecodable PNG"


def test_rejects_decompression_bomb_without_decoding(monkeypatch):
  bomb = _raw_png(100_000, 100_000, 0, 8, b"\x00" * 1000)
  assert pp.image_dimensions(bomb) == (100_000, 100_000)

  def no_decode(*args, **kwargs):
    raise AssertionError("cv2.imdecode must not be called for a decompression bomb")

  monkeypatch.setattr(pp.cv2, "imdecode", no_decode)
  err = _reject(bomb)
  assert err.reason == "too many pixels"
  assert "100000x100000" in str(err)
  # The limit is the config's: a real 64x48 JPEG is refused at max_pixels=3000 too.
  err = _reject(_jpeg(_skin(64)[:48]), pp.PreprocessConfig(image_size=32, max_pixels=3000))
  assert err.reason == "too many pixels"


def test_rejects_unreadable_paths(tmp_path):
  for path in (tmp_path / "missing.jpg", tmp_path):  # Missing file; a directory.
    with pytest.raises(pp.RejectedImage) as info:
      pp.preprocess_file(path, pp.PreprocessConfig(image_size=32))
    assert info.value.reason == "unreadable file"
    assert isinstance(info.value.__cause__, OSError)


def test_rejects_tiny_corrupt_and_float_images():
  assert _reject(_enc(_skin(64)[:4, :6], ".png")).reason == "image too small"
  float_tiff = _enc(np.random.default_rng(0).random((40, 48, 3), np.float32), ".tiff")
  assert _reject(float_tiff).reason == "unsupported sample type"
  assert _reject(b"\x89PNG\r\n\x1a\n" + b"garbage").reason == "corrupt PNG header"
  assert _reject(b"\xff\xd8\xff\xe0\x00\x10JFIF").reason == "corrupt JPEG header"


# -------------------------------------------------------------------------------------- decoding


def test_exif_orientation_is_applied_full_and_reduced():
  img = np.zeros((64, 96, 3), np.uint8)
  img[:16, :16] = (255, 0, 0)  # Red top-left; Orientation=6 rotates 90 degrees clockwise.
  data = _exif_jpeg(img, 6)
  full = pp.decode(data, pp.PreprocessConfig(image_size=32, reduced_decode=False))
  assert full.shape == (96, 64, 3)
  assert full[:16, -16:, 0].mean() > 200 and full[:16, :16, 0].mean() < 50
  reduced = pp.decode(data, pp.PreprocessConfig(image_size=16))  # Shorter side 64 -> 1/4.
  assert reduced.shape == (24, 16, 3)
  assert reduced[:4, -4:, 0].mean() > 200 and reduced[:4, :4, 0].mean() < 50


def test_gray_alpha_and_16_bit_become_rgb_uint8():
  cfg = pp.PreprocessConfig(image_size=32)
  gray = np.arange(48 * 40, dtype=np.uint32).reshape(40, 48) % 251
  gray = gray.astype(np.uint8)
  out = pp.decode(_enc(gray, ".png"), cfg)
  assert out.dtype == np.uint8 and out.shape == (40, 48, 3)
  np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))

  # Gray + alpha (PNG colour type 4): alpha is dropped, transparent pixels keep their gray.
  alpha = np.where(np.arange(48) < 24, 0, 255).astype(np.uint8)[None].repeat(40, axis=0)
  rows = np.stack([gray, alpha], axis=2).reshape(40, -1)
  raw = b"".join(b"\x00" + r.tobytes() for r in rows)
  out = pp.decode(_raw_png(48, 40, 4, 8, raw), cfg)
  np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))

  # RGBA: alpha dropped, colours kept even where fully transparent.
  rgba = np.zeros((40, 48, 4), np.uint8)
  rgba[..., :3] = (10, 200, 30)
  rgba[:, :24, 3] = 0
  rgba[:, 24:, 3] = 255
  out = pp.decode(_enc(rgba[..., [2, 1, 0, 3]], ".png"), cfg)  # cv2 writes BGRA.
  np.testing.assert_array_equal(out, rgba[..., :3])

  # 16-bit gray PNG, 16-bit RGB PNG and TIFF: scaled by >> 8 (300 -> 1; clipping would give 255).
  g16 = np.array([0, 300, 0x8000, 0xABCD, 0xFFFF, 0x1234] * 8 * 40, np.uint16).reshape(40, 48)
  out = pp.decode(_enc(g16, ".png"), cfg)
  np.testing.assert_array_equal(out, np.repeat((g16 >> 8).astype(np.uint8)[..., None], 3, axis=2))
  rgb16 = np.stack([g16, g16[:, ::-1], 0xFFFF - g16], axis=2)
  for ext in (".png", ".tiff"):
    out = pp.decode(_enc(rgb16, ext), cfg)
    np.testing.assert_array_equal(out, (rgb16 >> 8).astype(np.uint8), err_msg=ext)


def test_colour_order_red_stays_red():
  red = np.zeros((48, 48, 3), np.uint8)
  red[..., 0] = 255
  cfg = pp.PreprocessConfig(image_size=32)
  for data in (_jpeg(red), _enc(red, ".png"), _enc(red, ".bmp"), _enc(red, ".tiff")):
    rgb = pp.decode(data, cfg)
    assert rgb[..., 0].min() > 240 and rgb[..., 1:].max() < 15
    stored = pp.preprocess_bytes(data, cfg)
    bgr = cv2.imdecode(np.frombuffer(stored, np.uint8), cv2.IMREAD_COLOR)  # Any viewer's order.
    assert bgr[..., 2].min() > 240 and bgr[..., :2].max() < 15


def test_accepts_bytearray_and_memoryview():
  data = _enc(_skin(40), ".png")
  expected = pp.decode(data, pp.PreprocessConfig(image_size=32))
  for view in (bytearray(data), memoryview(data)):
    np.testing.assert_array_equal(pp.decode(view, pp.PreprocessConfig(image_size=32)), expected)


def test_image_dimensions_from_headers():
  img = _skin(64)[:23, :37]
  for ext in (".jpg", ".png", ".bmp", ".tiff", ".webp"):
    assert pp.image_dimensions(_enc(img, ext)) == (37, 23), ext
  assert pp.image_dimensions(_exif_jpeg(img, 6)) == (37, 23)  # As stored, before rotation.
  big_tiff_header = b"II+\x00\x08\x00\x00\x00" + struct.pack("<Q", 16)
  ifd = struct.pack("<Q", 2) + struct.pack("<HHQQ", 256, 4, 1, 5000) + struct.pack(
      "<HHQQ", 257, 3, 1, 4000)
  assert pp.image_dimensions(big_tiff_header + ifd) == (5000, 4000)
  for junk in (b"", b"hello", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"):
    assert pp.image_dimensions(junk) is None


# ------------------------------------------------------------------------------ geometry, output


def test_resize_crops_the_centre():
  img = np.zeros((64, 96, 3), np.uint8)
  img[:, :16] = (0, 0, 255)
  img[:, -16:] = (0, 255, 0)
  img[:, 16:-16] = (255, 0, 0)
  out = pp.preprocess_array(img, pp.PreprocessConfig(image_size=32))
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.broadcast_to(np.uint8([255, 0, 0]), (32, 32, 3)))
  tall = np.zeros((96, 40, 3), np.uint8)  # Enlarged to 48: INTER_CUBIC.
  tall[:28] = (0, 0, 255)  # Cropped away (the centre square is rows 28..67).
  tall[68:] = (0, 255, 0)  # Cropped away.
  tall[38:58] = (255, 0, 0)  # Centre band, crop rows 10..29 -> output rows 12..35.
  out = pp.preprocess_array(tall, pp.PreprocessConfig(image_size=48))
  assert out.shape == (48, 48, 3)
  assert out[14:34, :, 0].min() > 200 and out[:8].max() < 20 and out[-8:].max() < 20
  assert out[..., 1:].max() < 20  # No blue or green margin survived.


def test_reduced_decode_matches_full_decode():
  src = cv2.resize(_skin(64), (256, 192), interpolation=cv2.INTER_CUBIC)
  data = _jpeg(src)
  reduced_cfg = pp.PreprocessConfig(image_size=48)
  full_cfg = pp.PreprocessConfig(image_size=48, reduced_decode=False)
  assert pp.decode(data, reduced_cfg).shape == (48, 64, 3)  # 192 // 4 == 48.
  assert pp.decode(data, full_cfg).shape == (192, 256, 3)
  assert pp.decode(data, pp.PreprocessConfig(image_size=16)).shape == (24, 32, 3)  # 1/8.
  assert pp.decode(data, pp.PreprocessConfig(image_size=49)).shape == (96, 128, 3)  # 1/2.
  assert pp.decode(_enc(src, ".png"), reduced_cfg).shape == (192, 256, 3)  # JPEG only.
  a = pp.preprocess_array(pp.decode(data, reduced_cfg), reduced_cfg).astype(int)
  b = pp.preprocess_array(pp.decode(data, full_cfg), full_cfg).astype(int)
  assert a.shape == b.shape == (48, 48, 3)
  assert np.abs(a - b).mean() < 2.0


def test_png_output_is_lossless_and_jpeg_quality_applies():
  img = _skin(48)
  cfg = pp.PreprocessConfig(image_size=48, image_format="png")
  out = pp.preprocess_bytes(_enc(img, ".png"), cfg)
  assert out.startswith(b"\x89PNG")
  np.testing.assert_array_equal(pp.decode(out, cfg), img)
  lo = pp.encode(img, pp.PreprocessConfig(image_size=48, jpeg_quality=20))
  hi = pp.encode(img, pp.PreprocessConfig(image_size=48, jpeg_quality=98))
  assert lo.startswith(b"\xff\xd8") and len(lo) < len(hi)


def test_preprocess_file_is_deterministic(tmp_path):
  path = tmp_path / "lesion.jpg"
  path.write_bytes(_jpeg(cv2.resize(_hairy(_skin(96)), (96, 72))))
  cfg = pp.PreprocessConfig(image_size=64, remove_hair=True, notebook_cleanup=True)
  first = pp.preprocess_file(path, cfg)
  assert first == pp.preprocess_file(path, cfg)
  assert pp.decode(first, cfg).shape == (64, 64, 3)


# ----------------------------------------------------------------------------- artefact removal


def test_hair_removal_removes_thin_dark_lines():
  clean = _skin(128)
  cfg = pp.PreprocessConfig(image_size=128, remove_hair=True)
  hairy = _hairy(clean)
  before = np.abs(hairy.astype(int) - clean).mean()
  after = np.abs(pp.preprocess_array(hairy, cfg).astype(int) - clean).mean()
  assert before > 5 and after < before / 5, (before, after)
  unchanged = np.abs(pp.preprocess_array(clean, cfg).astype(int) - clean).mean()
  assert unchanged < 0.2, unchanged


def test_notebook_cleanup_removes_strokes_keeps_lesion():
  # Its speed target (<= 0.2 s at 512 px) is benchmarks/speed.py's, not a test's.
  clean = _skin(512)
  marked = clean.copy()
  cv2.line(marked, (20, 60), (490, 100), (60, 40, 90), 6)  # An ink stroke.
  cfg = pp.PreprocessConfig(image_size=512, notebook_cleanup=True)
  out = pp.preprocess_array(marked, cfg)
  stroke = np.zeros((512, 512), bool)
  stroke[cv2.line(np.zeros((512, 512), np.uint8), (20, 60), (490, 100), 1, 6) > 0] = True
  assert np.abs(marked[stroke].astype(int) - clean[stroke]).mean() > 80
  assert np.abs(out[stroke].astype(int) - clean[stroke]).mean() < 10
  np.testing.assert_allclose(out[236:276, 236:276].mean(axis=(0, 1)), LESION, atol=3)


# ----------------------------------------------------------------------------------- config, deps


def test_config_validation_names_field_and_value():
  cases = {"image_format": "gif", "image_size": 0, "jpeg_quality": 101, "remove_hair": "yes",
           "max_pixels": -1, "reduced_decode": 1}
  for field, value in cases.items():
    with pytest.raises(ValueError) as info:
      pp.PreprocessConfig(**{field: value}).validate()
    assert field in str(info.value) and repr(value) in str(info.value), str(info.value)
  with pytest.raises(ValueError, match="'jpeg', 'png'"):
    pp.PreprocessConfig(image_format="webp").validate()
  with pytest.raises(ValueError, match="image_size=0"):  # every entry point validates
    pp.preprocess_array(np.zeros((40, 40, 3), np.uint8), pp.PreprocessConfig(image_size=0))
  with pytest.raises(ValueError, match="jpeg_quality=0"):
    pp.PreprocessConfig.from_dict({"jpeg_quality": 0})


def test_config_dict_round_trip_and_unknown_keys():
  cfg = pp.PreprocessConfig(image_size=256, image_format="png", remove_hair=True)
  d = json.loads(json.dumps(cfg.to_dict()))
  assert pp.PreprocessConfig.from_dict(d) == cfg
  with pytest.raises(ValueError, match="imagesize"):
    pp.PreprocessConfig.from_dict({"imagesize": 256})
  with pytest.raises(ValueError, match="jpeg_quality=0"):
    pp.PreprocessConfig.from_dict({"jpeg_quality": 0})


def test_module_does_not_import_tensorflow():
  code = ("import sys, skinrecords.data.preprocess; "
          "sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
