"""The synthetic images' fine structures and hairs, drawn with exact truth (`Truth`).

Dermoscopic structures (reticular network, dots, globules, border streaks) are what hair removal
must spare, and the hairs what it must remove; `synthetic.make_image` draws both over its lesion
here, with the same random stream, and `Truth` records where they went (tests and
`benchmarks.hair` score masks against it).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

# RGB colours of dark hair.
_HAIR = np.array([[44, 30, 22], [24, 18, 16], [70, 50, 36]], np.float32)
# Light hairs: blond, grey, white. Over pink skin they are a little darker than the skin, over a
# lesion much lighter, so one hair can change polarity along its length (as real blond hair does).
_LIGHT_HAIR = np.array([[206, 172, 118], [176, 172, 168], [226, 222, 214]], np.float32)
HAIR_THIN, HAIR_THICK, HAIR_LIGHT = 1, 2, 3  # kinds in `Truth.hair_kind`
_THICK_FROM = 3.0  # px at 512: dark hairs at least this wide count as thick


@dataclasses.dataclass
class Truth:
  """What `synthetic.make_image(..., return_truth=True)` knows about the image it drew.

  hair_alpha: float32 HxW hair coverage in [0, 1] (0 where no hair touches the pixel).
  hair_kind: uint8 HxW, 0 or HAIR_THIN / HAIR_THICK / HAIR_LIGHT of the most opaque hair there.
  hair_free: uint8 RGB, the same image before the hairs were drawn (the hair-free twin).
  structures: (kind, x, y, radius) of every dot ("dot"), globule ("globule") and streak tip
    ("streak"; radius is half its length) drawn, in pixels.
  """
  hair_alpha: np.ndarray
  hair_kind: np.ndarray
  hair_free: np.ndarray
  structures: list[tuple[str, float, float, float]]

  def hair_mask(self, min_alpha: float = 0.5) -> np.ndarray:
    """uint8 0/255 mask of pixels at least `min_alpha` covered by hair."""
    return np.where(self.hair_alpha >= min_alpha, 255, 0).astype(np.uint8)


def _hair_count(rng: np.random.Generator) -> int:
  # Most images have a few hairs; 1 in 7 is dense (20-40), as on a hairy forearm or scalp.
  return int(rng.integers(20, 41)) if rng.uniform() < 0.15 else int(rng.integers(0, 7))


def draw_hairs(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Hairs composited in place; returns (coverage float32 HxW, kind uint8 HxW).

  Width 1-6 px at 512 (log-uniform, so thin ones dominate), dark or light, straight or curved
  (quadratic Bezier), 0.3-1.1 of the short side long, crossing the lesion and each other. Each hair
  is rasterised alone into a coverage layer (anti-aliased), then blended; sub-pixel widths at small
  sizes are drawn 1 px wide with proportionally lower opacity.
  """
  h, w = img.shape[:2]
  s = min(w, h)
  alpha_all = np.zeros((h, w), np.float32)
  kind_all = np.zeros((h, w), np.uint8)
  n = _hair_count(rng)
  if not n:
    return alpha_all, kind_all
  t = np.linspace(0.0, 1.0, 32, dtype=np.float32)[:, None]
  out = img.astype(np.float32)
  for _ in range(n):
    p0 = rng.uniform([-0.1 * w, -0.1 * h], [1.1 * w, 1.1 * h])
    angle = rng.uniform(0.0, 2 * np.pi)
    p2 = p0 + rng.uniform(0.3, 1.1) * s * np.array([np.cos(angle), np.sin(angle)])
    bend = 0.0 if rng.uniform() < 0.35 else rng.normal(0.0, 0.12) * s
    p1 = (p0 + p2) / 2 + bend * np.array([-np.sin(angle), np.cos(angle)])
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    width512 = float(np.exp(rng.uniform(np.log(1.0), np.log(6.0))))
    width = width512 * s / 512
    light = rng.uniform() < 0.25
    palette = _LIGHT_HAIR if light else _HAIR
    colour = palette[rng.integers(len(palette))] + rng.normal(0.0, 4.0, 3)
    opacity = min(1.0, width) * rng.uniform(0.85, 1.0)
    # Rasterise and blend inside the hair's bounding box only: 40 full-frame blends of a
    # 1024x768 image took ~0.2 s.
    pad = int(width) + 3
    x0, y0 = np.clip(np.floor(pts.min(0)).astype(int) - pad, 0, [w, h])
    x1, y1 = np.clip(np.ceil(pts.max(0)).astype(int) + pad, 0, [w, h])
    if x1 <= x0 or y1 <= y0:
      continue
    layer = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.polylines(layer, [np.round((pts - [x0, y0]) * 16).astype(np.int32)], False, 255,
                  max(1, round(width)), cv2.LINE_AA, shift=4)
    a = layer.astype(np.float32) * (opacity / 255)
    box = out[y0:y1, x0:x1]
    box += a[..., None] * (colour.astype(np.float32) - box)
    kind = HAIR_LIGHT if light else (HAIR_THICK if width512 >= _THICK_FROM else HAIR_THIN)
    kind_box, alpha_box = kind_all[y0:y1, x0:x1], alpha_all[y0:y1, x0:x1]
    kind_box[a > alpha_box] = kind
    np.maximum(alpha_box, a, out=alpha_box)
  img[:] = cv2.convertScaleAbs(out)
  return alpha_all, kind_all


def _inside_points(rng, mask: np.ndarray, n: int, min_level: int = 200) -> np.ndarray:
  """Up to n (x, y) points drawn uniformly where the lesion mask is >= min_level."""
  ys, xs = np.nonzero(mask >= min_level)
  if not n or not xs.size:
    return np.zeros((0, 2), np.float32)
  pick = rng.integers(0, xs.size, n)
  return np.stack([xs[pick], ys[pick]], 1).astype(np.float32) + rng.uniform(0, 1, (n, 2))


def _network(rng, mask: np.ndarray, s: int, melanoma: bool) -> np.ndarray:
  """Reticular pigment network: Voronoi cell edges, float32 0-1, fading towards the border.

  Holes 10-18 px across at 512 and lines 1.5-3 px wide, so that no line runs straight for more
  than about one hole: that is what sets a network apart from a hair. Melanomas get an atypical
  network: thicker, darker lines in patches with the network missing elsewhere.
  """
  bh, bw = mask.shape
  cell = s * rng.uniform(0.02, 0.035)
  # Seeds on a jittered, rotated hexagonal lattice: a honeycomb-like mesh as in a typical network.
  # Poisson seeds gave some cells 3x the others, and a square grid lines running straight across
  # many cells; no real network has either.
  r = np.hypot(bw, bh) / 2 + cell
  gy, gx = np.mgrid[-r:r:cell * 0.866, -r:r:cell].reshape(2, -1)
  gx += (np.round(gy / (cell * 0.866)) % 2) * cell / 2
  phi = rng.uniform(0.0, np.pi)
  gx, gy = (bw / 2 + gx * np.cos(phi) - gy * np.sin(phi), bh / 2 + gx * np.sin(phi) + gy * np.cos(phi))
  jit = rng.uniform(-0.25, 0.25, (2, gx.size)) * cell
  gx, gy = gx + jit[0], gy + jit[1]
  inside_box = (gx >= 0) & (gx < bw) & (gy >= 0) & (gy < bh)
  sx, sy = gx[inside_box].astype(int), gy[inside_box].astype(int)
  seeds = np.full((bh, bw), 255, np.uint8)
  seeds[sy, sx] = 0
  _, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 3,
                                              labelType=cv2.DIST_LABEL_CCOMP)
  # Wavy lines: warp the cells by a smooth displacement of ~cell/6.
  amp = cell / 6
  small = (max(2, int(bh / cell)), max(2, int(bw / cell)))
  dx, dy = (cv2.resize(rng.standard_normal(small, np.float32) * amp, (bw, bh),
                       interpolation=cv2.INTER_CUBIC) for _ in range(2))
  xx, yy = np.meshgrid(np.arange(bw, dtype=np.float32), np.arange(bh, dtype=np.float32))
  labels = cv2.remap(labels.astype(np.float32), xx + dx, yy + dy, cv2.INTER_NEAREST,
                     borderMode=cv2.BORDER_REPLICATE)
  lw = s * rng.uniform(0.003, 0.006) * (1.4 if melanoma else 1.0)
  k = np.ones((2, 2), np.uint8)
  edges = (cv2.dilate(labels, k) != cv2.erode(labels, k)).astype(np.float32)  # ~2 px wide edges
  edges = cv2.GaussianBlur(edges, (0, 0), max(0.4, lw / 4))
  net = np.clip(edges * 1.6 * min(1.0, lw / 2), 0.0, 1.0)
  inside = (mask.astype(np.float32) / 255) ** 2
  if melanoma:  # patchy: present on ~60 % of the lesion
    patch = cv2.resize(rng.standard_normal((4, 4), np.float32), (bw, bh),
                       interpolation=cv2.INTER_CUBIC)
    inside *= np.clip(patch + 0.3, 0.0, 1.0)
  return net * inside * rng.uniform(0.35, 0.6)


def _blobs(rng, mask, s, melanoma, layer) -> list[tuple[str, float, float, float]]:
  """Dots (r 0.8-1.5 px at 512) and globules (r 2.5-5.6 px) drawn into `layer` (uint8 0-255)."""
  n_dots = int(rng.integers(5, 31) if melanoma else rng.integers(0, 9))
  n_glob = int(rng.integers(2, 13) if melanoma else rng.integers(0, 11))
  placed = []
  for kind, n, lo, hi in (("dot", n_dots, 0.0015, 0.003), ("globule", n_glob, 0.005, 0.011)):
    for x, y in _inside_points(rng, mask, n):
      r = s * rng.uniform(lo, hi) * (rng.uniform(0.7, 1.5) if melanoma else 1.0)
      cv2.circle(layer, (round(x * 16), round(y * 16)), max(1, round(r * 16)), 255, -1,
                 cv2.LINE_AA, shift=4)
      placed.append((kind, float(x), float(y), float(r)))
  return placed


def _streaks(rng, outline, s, layer) -> list[tuple[str, float, float, float]]:
  """Melanoma streaks: 6-16 short radial lines (5-17 px at 512) leaving the border."""
  centre = outline.mean(0)
  placed = []
  for i in rng.integers(0, len(outline), int(rng.integers(6, 17))):
    u = outline[i] - centre
    u /= max(float(np.hypot(*u)), 1e-6)
    length = s * rng.uniform(0.01, 0.033)
    a, b = outline[i] - 0.3 * length * u, outline[i] + 0.7 * length * u
    cv2.line(layer, tuple(np.round(a * 16).astype(int).tolist()),
             tuple(np.round(b * 16).astype(int).tolist()), 255,
             max(1, round(s * rng.uniform(0.003, 0.006))), cv2.LINE_AA, shift=4)
    mid = (a + b) / 2
    placed.append(("streak", float(mid[0]), float(mid[1]), float(length / 2)))
  return placed


def draw_structures(rng, box, mask, polys, offset, s, melanoma, dot_colours):
  """Network, dots, globules and (melanoma) streaks darken `box` (float32 RGB) in place.

  Dots and globules take one of `dot_colours` (a melanoma draws one; a nevus takes the first, with
  no draw, so the random stream is the one the lesion module always used). Returns their positions
  in image coordinates.
  """
  net = _network(rng, mask, s, melanoma)
  layer = np.zeros(mask.shape, np.uint8)
  placed = _blobs(rng, mask, s, melanoma, layer)
  if melanoma and rng.uniform() < 0.6:
    placed += _streaks(rng, polys[0] - offset, s, layer)
  light = cv2.cvtColor(box, cv2.COLOR_RGB2GRAY) / 200.0
  dark = rng.choice(dot_colours) if melanoma else dot_colours[0]
  dots = layer.astype(np.float32) / 255 * rng.uniform(0.75, 0.95)
  for amount, target in ((net, box * 0.55), (dots, dark * light[..., None])):
    box += amount[..., None] * (target - box)
  return [(k, x + offset[0], y + offset[1], r) for k, x, y, r in placed]
