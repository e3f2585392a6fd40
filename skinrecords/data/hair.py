"""Hair detection and removal, and the notebook's contour cleanup: masks and inpainting.

`preprocess.preprocess_array` calls `remove_hair` and `notebook_cleanup` after resizing (their cost
scales with the pixels they see); `benchmarks.hair` scores the masks against synthetic truth.
OpenCV and NumPy only, never TensorFlow: this runs in the converter's spawned workers. Arrays are
square RGB uint8.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np


def _odd(x: float, minimum: int = 3) -> int:
  k = max(minimum, int(round(x)))
  return k if k % 2 else k + 1


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
_HAIR_MIN_LENGTH = 512 / 20  # nor those shorter (perimeter / 2)
_HAIR_MAX_FILL = 0.35  # bounding-box fill above which a wide component is a mesh


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


def remove_hair_kernel(rgb: np.ndarray) -> np.ndarray:
  """The old `--remove_hair`: Kaggle-kernel mask, Telea radius 1 at 512."""
  mask = hair_mask_kernel(rgb)
  if not cv2.countNonZero(mask):
    return rgb
  return cv2.inpaint(rgb, mask, max(1, round(rgb.shape[0] / 512)), cv2.INPAINT_TELEA)


def notebook_mask(rgb: np.ndarray) -> np.ndarray:
  """The mask `notebook_cleanup` inpaints (see there); uint8 0/255."""
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


def notebook_cleanup(rgb: np.ndarray) -> np.ndarray:
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
