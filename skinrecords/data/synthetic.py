"""A synthetic dermoscopy data set whose two classes differ the way the ABCD rule says.

Real dermoscopy data cannot ship with the tests, so this draws look-alikes: a skin-toned, textured
background with a dermatoscope vignette, one lesion and a few dark hairs. Melanomas are Asymmetric
(low-order radius terms plus overlapping lobes), have an irregular Border (jagged high-frequency
radius noise, abrupt edge), a variegated Colour (2-4 of dark brown, black, blue-grey, red-brown) and
a larger Diameter; benign nevi are round or oval, smooth-edged, one tan/brown colour and smaller.
Sizes overlap on purpose so that a classifier has to look at more than the diameter.

Every image draws from ``np.random.default_rng([seed, index])`` alone, so output is byte-identical
across runs and independent of the number of workers. Drawing scales with ``min(width, height)``,
so 64x48 test images and 1024x768 ones show the same lesion, just sampled differently.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import multiprocessing
import pathlib
import re

import cv2
import numpy as np

from skinrecords.data import synthetic_structures

CLASSES = ("Melanoma", "NotMelanoma")
FLAT_DIR = "images"
CSV_NAME = "labels.csv"
CSV_COLUMNS = ("image_name", "patient_id", "target", "diagnosis")
# With metadata: the SIIM-ISIC 2020 train.csv's columns, in its order.
METADATA_CSV_COLUMNS = ("image_name", "patient_id", "sex", "age_approx",
                        "anatom_site_general_challenge", "diagnosis", "benign_malignant", "target")
# ISIC 2020's sites and their shares of its 33,126 training images (the 527 without a site left
# out); melanomas at metadata_signal=1 lean to head/neck and the upper extremity instead.
SITES = ("torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital")
_SITE_BENIGN = np.array([0.51, 0.26, 0.15, 0.056, 0.011, 0.004])
_SITE_MELANOMA = np.array([0.33, 0.20, 0.24, 0.20, 0.02, 0.01])
# Age: patients of ISIC 2020 are ~49 +- 14 years; a melanoma patient is AGE_SHIFT * signal older
# (18 years at signal 1: age alone then ranks melanoma images with an AUC of ~0.8; ISIC's own ~7
# years gives ~0.63).
AGE_MEAN, AGE_STD, AGE_SHIFT = 48.0, 15.0, 18.0
_MALE_BENIGN, _MALE_SHIFT = 0.5, 0.15  # P(male) of a benign patient; + signal * shift if melanoma
_MIN_SIDE = 16  # below this a lesion, its border and a hair are no longer distinguishable

# RGB colours. Skin under polarised dermoscopy is pink to light tan.
_SKIN = np.array([[238, 196, 178], [228, 178, 150], [214, 160, 128], [196, 140, 108],
                  [242, 204, 196]], np.float32)
_NEVUS = np.array([[186, 128, 96], [166, 110, 80], [146, 94, 66], [126, 80, 56]], np.float32)
# Dark brown, black, blue-grey, red-brown: the melanoma colours of the ABCD rule.
_MELANOMA = np.array([[92, 56, 38], [38, 28, 30], [96, 106, 124], [140, 78, 62]], np.float32)
_MELANOMA_KEY = (1, 2)  # black, blue-grey


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """What `write_dataset` writes. Sizes are (width, height) in pixels."""
  num_images: int
  seed: int = 0
  melanoma_fraction: float = 0.5
  min_size: tuple[int, int] = (600, 450)
  max_size: tuple[int, int] = (1024, 768)
  write_csv: bool = False
  flat: bool = False  # with write_csv: all images in <output_dir>/images/ (the ISIC layout)
  images_per_patient: int = 4
  jpeg_quality: int = 95
  workers: int = 1
  # Patient metadata with a known signal (`draw_metadata`): labels.csv gets ISIC 2020's columns.
  metadata: bool = False
  metadata_signal: float = 1.0  # 0: independent of the label; 1: age, site and sex all shifted
  metadata_missing: float = 0.05  # each metadata cell missing (empty) with this probability
  # Fraction of melanomas drawn with their malignant cues; the rest look exactly like nevi (the
  # image then cannot tell them apart; metadata still can). 1.0: every image is informative.
  image_signal: float = 1.0

  def validate(self) -> None:
    """Raises ValueError naming the bad value and what would be accepted."""
    if self.seed < 0:
      raise ValueError(f"seed={self.seed}: must be >= 0 (numpy SeedSequence entropy)")
    if self.num_images < 1:
      raise ValueError(f"num_images={self.num_images}: need at least 1")
    if not 0.0 <= self.melanoma_fraction <= 1.0:
      raise ValueError(f"melanoma_fraction={self.melanoma_fraction}: must lie in [0, 1]")
    for name, size in (("min_size", self.min_size), ("max_size", self.max_size)):
      if len(size) != 2 or min(size) < _MIN_SIDE:
        raise ValueError(f"{name}={size}: need (width, height), both >= {_MIN_SIDE} pixels")
    if self.min_size[0] > self.max_size[0] or self.min_size[1] > self.max_size[1]:
      raise ValueError(f"min_size={self.min_size} exceeds max_size={self.max_size} in width or "
                       "height: need min <= max in both")
    if self.images_per_patient < 1:
      raise ValueError(f"images_per_patient={self.images_per_patient}: need at least 1")
    if not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f"jpeg_quality={self.jpeg_quality}: must lie in [1, 100]")
    if self.workers < 1:
      raise ValueError(f"workers={self.workers}: need at least 1")
    for name in ("metadata_signal", "metadata_missing", "image_signal"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name}={getattr(self, name)}: must lie in [0, 1]")
    if self.metadata and not self.write_csv:
      raise ValueError("metadata=True needs write_csv=True: the metadata goes into labels.csv")
    if self.flat and not self.write_csv:
      raise ValueError("flat=True needs write_csv=True: without the CSV the labels would be lost")


def parse_size(text: str) -> tuple[int, int]:
  """'600x450' -> (600, 450); ValueError for anything else."""
  m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
  if not m:
    raise ValueError(f"size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 600x450")
  return int(m[1]), int(m[2])


def image_name(index: int) -> str:
  return f"synth_{index:06d}"


def patient_id(index: int, images_per_patient: int) -> str:
  return f"P{index // images_per_patient:05d}"


def assign_labels(config: SyntheticConfig) -> np.ndarray:
  """Melanoma flags (bool, one per image): exactly round(N * fraction) melanomas, by patient.

  Patients take contiguous runs of a sorted label list in a random order, so at most one patient
  mixes classes. The third seed word keeps this stream apart from the per-image [seed, index] ones.
  """
  n, k = config.num_images, config.images_per_patient
  sorted_labels = np.arange(n) < round(n * config.melanoma_fraction)
  starts = np.arange(0, n, k)
  order = np.random.default_rng([config.seed, n, 0x1ABE1]).permutation(len(starts))
  labels = np.empty(n, bool)
  taken = 0
  for p in order:
    stop = min(starts[p] + k, n)
    labels[starts[p]:stop] = sorted_labels[taken:taken + stop - starts[p]]
    taken += stop - starts[p]
  return labels


def draw_metadata(config: SyntheticConfig, labels: np.ndarray) -> list[dict[str, str]]:
  """ISIC-2020-like metadata per image ({column: cell}, "" for missing), drawn given the labels.

  Sex and age are the patient's (from the patient's class: melanoma if any of its images is one),
  the site is the image's. At signal s a melanoma patient is s * AGE_SHIFT years older on average,
  male with probability 0.5 + s * 0.15, and its site is drawn from (1-s) * benign shares + s *
  melanoma shares; at s = 0 the metadata is independent of the label. Each cell is then emptied
  with probability `metadata_missing`. One stream of its own ([seed, n, 0x3E7A]): images unchanged.
  """
  rng = np.random.default_rng([config.seed, config.num_images, 0x3E7A])
  s, k = config.metadata_signal, config.images_per_patient
  benign, malignant = _SITE_BENIGN / _SITE_BENIGN.sum(), _SITE_MELANOMA / _SITE_MELANOMA.sum()
  site_p = {False: benign, True: (1 - s) * benign + s * malignant}
  rows = []
  for start in range(0, len(labels), k):
    sick = bool(labels[start:start + k].any())
    male = rng.uniform() < _MALE_BENIGN + (_MALE_SHIFT * s if sick else 0.0)
    age = float(np.clip(5 * round((rng.normal(AGE_MEAN + (AGE_SHIFT * s if sick else 0.0),
                                               AGE_STD)) / 5), 0, 90))
    for i in range(start, min(start + k, len(labels))):
      site = SITES[rng.choice(len(SITES), p=site_p[bool(labels[i])])]
      row = {"sex": "male" if male else "female", "age_approx": f"{age:.1f}",
             "anatom_site_general_challenge": site}
      gone = rng.uniform(size=len(row)) < config.metadata_missing
      rows.append({c: "" if g else v for (c, v), g in zip(row.items(), gone)})
  return rows


def disguised(config: SyntheticConfig, index: int, melanoma: bool) -> bool:
  """Whether melanoma `index` is drawn without its malignant cues (`image_signal` < 1): a stream of
  its own, so the other images keep their bytes."""
  if not melanoma or config.image_signal >= 1.0:
    return False
  return bool(np.random.default_rng([config.seed, index, 0xD15C]).uniform() >= config.image_signal)


def draw_size(rng: np.random.Generator, min_size: tuple[int, int],
              max_size: tuple[int, int]) -> tuple[int, int]:
  """(width, height) between the bounds; one shared draw keeps the aspect near the bounds' 4:3."""
  t = rng.uniform()
  th = float(np.clip(t + rng.normal(0.0, 0.08), 0.0, 1.0))
  width = round(min_size[0] + t * (max_size[0] - min_size[0]))
  height = round(min_size[1] + th * (max_size[1] - min_size[1]))
  return width, height


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
  """Uint8 HxWx3 skin: uneven tone, fine grain and a dermatoscope vignette.

  The smooth parts are drawn at 1/16 resolution and the grain at 1/2, with OpenCV calls, then
  upsampled once as uint8. Full-resolution numpy float work made this ~20 ms of a 1024x768 image
  (broadcasting over 2.4 M floats; a cubic resize from 4x5 to 513x385 alone took 8 ms).
  """
  hw, hh = w // 2 + 1, h // 2 + 1
  # 1/16 resolution, but at least ~48 cells across so that the field stop's edge stays round.
  sw, sh = min(hw, max(w // 16, 48)), min(hh, max(h // 16, 36))
  mix = rng.dirichlet(np.ones(len(_SKIN)) * 0.5)
  base = (mix @ _SKIN + rng.normal(0.0, 6.0, 3)).astype(np.float32)
  # A 4x5 grid upsampled: blotchy tone a few percent deep, mostly brightness and a little hue
  # (independent channels at full strength turned the skin green and yellow in places).
  low = rng.standard_normal((4, 5, 1), np.float32) + 0.3 * rng.standard_normal((4, 5, 3),
                                                                              np.float32)
  low = cv2.resize(low, (sw, sh), interpolation=cv2.INTER_CUBIC)
  xs = np.linspace(-1.0, 1.0, sw, dtype=np.float32) ** 2
  ys = np.linspace(-1.0, 1.0, sh, dtype=np.float32) ** 2
  r2 = xs[None, :] + ys[:, None]  # 0 at the centre, 2 in the corners
  shade = 1.0 - rng.uniform(0.04, 0.16) * r2
  if rng.uniform() < 0.1:  # some show the scope's dark circular field stop in the corners
    shade *= np.clip((rng.uniform(1.2, 1.6) - r2) / 0.12, 0.15, 1.0)
  smooth = base * (1.0 + rng.uniform(0.02, 0.05) * low) * shade[..., None]
  smooth = cv2.resize(smooth, (hw, hh), interpolation=cv2.INTER_LINEAR)
  # Multiplicative grain of 1-2.5 % (uniform noise: 3x cheaper than normals), dimmed with the rest.
  grain = rng.random((hh, hw), np.float32)
  grain = cv2.merge([cv2.addWeighted(grain, rng.uniform(0.03, 0.08), grain, 0.0, 0.97)] * 3)
  half = cv2.convertScaleAbs(cv2.multiply(smooth, grain))
  return cv2.resize(half, (w, h), interpolation=cv2.INTER_LINEAR)


def _radius(rng: np.random.Generator, theta: np.ndarray, melanoma: bool) -> np.ndarray:
  """Relative radius r(theta) ~ 1 of one lesion outline: an ellipse times exp(harmonics)."""
  aspect = rng.uniform(1.0, 1.5 if melanoma else 1.35)
  psi = rng.uniform(0.0, np.pi)
  a, b = np.sqrt(aspect), 1.0 / np.sqrt(aspect)
  rad = 1.0 / np.sqrt((np.cos(theta - psi) / a) ** 2 + (np.sin(theta - psi) / b) ** 2)
  if melanoma:
    # Asymmetry: harmonics 1-3 of 5-14 % each. Irregular border: harmonics 4-40 with amplitude
    # ~ 1/k, an overall radius std of ~7-11 %: notched and jagged, not star-shaped.
    ks = np.arange(1, 41)
    amps = np.concatenate([rng.uniform(0.05, 0.14, 3),
                           rng.normal(0.0, rng.uniform(0.2, 0.3), 37) / ks[3:]])
  else:
    # A small smooth wobble of 0-2.5 %: a nevus is round or oval.
    ks, amps = np.arange(2, 5), rng.uniform(0.0, 0.025, 3)
  phases = rng.uniform(0.0, 2 * np.pi, ks.size)
  wobble = np.cos(ks[:, None] * theta[None, :] + phases[:, None]).T @ amps
  return (rad * np.exp(wobble)).astype(np.float32)


def _outline(rng, melanoma, cx, cy, r0) -> np.ndarray:
  theta = np.linspace(0.0, 2 * np.pi, 360 if melanoma else 180, endpoint=False, dtype=np.float32)
  rad = r0 * _radius(rng, theta, melanoma)
  return np.stack([cx + rad * np.cos(theta), cy + rad * np.sin(theta)], axis=1)


def _lesion_colour(rng: np.random.Generator, melanoma: bool, bw: int,
                   bh: int) -> tuple[np.ndarray, np.ndarray]:
  """Pigment (float32 bh x bw x 3) and opacity (bh x bw) over the lesion's bounding box."""
  cells = 48
  field = cv2.resize(rng.standard_normal((5, 5), np.float32), (cells, cells),
                     interpolation=cv2.INTER_CUBIC)
  if melanoma:
    # 2-4 colours, always with black or blue-grey, the most melanoma-specific of the four: with
    # only dark and red-brown a small CNN confused them with dark nevi (78 % after 10 epochs).
    k = int(rng.integers(2, 5))
    first = rng.choice(_MELANOMA_KEY)
    rest = rng.choice([i for i in range(len(_MELANOMA)) if i != first], k - 1, replace=False)
    colours = _MELANOMA[np.concatenate([[first], rest])]
    colours = colours * rng.uniform(0.9, 1.1, (k, 1)) + rng.normal(0.0, 3.0, colours.shape)
    # Shares of the lesion per colour; the key colour takes the largest.
    shares = np.sort(rng.dirichlet(np.full(k, 2.0)))[::-1]
    cuts = np.quantile(field, np.cumsum(shares)[:-1])
    # Blotches of each colour with soft (~2 cell) transitions, not a cartoon's hard edges.
    small = cv2.GaussianBlur(colours[np.searchsorted(cuts, field)].astype(np.float32), (0, 0),
                             1.5)
    # Regression: patches where the pigment thins out to 70 %.
    opacity = 1.0 - 0.3 * np.clip(cv2.resize(rng.standard_normal((4, 4), np.float32),
                                             (cells, cells), interpolation=cv2.INTER_CUBIC), 0, 1)
  else:
    # Jitter brightness, barely hue: +-8 per channel independently turned some nevi olive.
    colour = _NEVUS[rng.integers(len(_NEVUS))] * rng.uniform(0.9, 1.1) + rng.normal(0.0, 3.0, 3)
    # One colour, a touch darker in the centre and a few percent of mottling.
    yy, xx = np.mgrid[-1:1:cells * 1j, -1:1:cells * 1j].astype(np.float32)
    shade = 1.0 - rng.uniform(0.0, 0.12) * (1.0 - np.minimum(xx ** 2 + yy ** 2, 1.0))
    small = (colour * (shade * (1.0 + 0.03 * field))[..., None]).astype(np.float32)
    opacity = np.ones((cells, cells), np.float32)
  pigment = cv2.resize(small, (bw, bh), interpolation=cv2.INTER_LINEAR)
  # Pigment texture: mid-frequency grain, stronger and patchier in melanoma.
  grain = cv2.resize(rng.standard_normal((max(bh // 4, 2), max(bw // 4, 2)), np.float32), (bw, bh))
  pigment *= 1.0 + (0.07 if melanoma else 0.04) * grain[..., None]
  return pigment, cv2.resize(opacity, (bw, bh), interpolation=cv2.INTER_LINEAR)


def make_image(rng: np.random.Generator, melanoma: bool, width: int, height: int,
               return_truth: bool = False):
  """One synthetic dermoscopy image, uint8 RGB, height x width x 3.

  With `return_truth`, returns (image, Truth): the hair coverage and kinds, the hair-free twin and
  the positions of dots, globules and streaks. The drawing is the same either way.
  """
  if min(width, height) < _MIN_SIDE:
    raise ValueError(f"image size {width}x{height}: both sides must be >= {_MIN_SIDE} pixels")
  img = _background(rng, width, height)
  s = min(width, height)
  # Radii as a fraction of the short side; they overlap (0.16-0.21) so size alone is not enough.
  r0 = s * (rng.uniform(0.16, 0.32) if melanoma else rng.uniform(0.09, 0.21))
  cx = width / 2 + rng.normal(0.0, 0.04) * s
  cy = height / 2 + rng.normal(0.0, 0.04) * s
  polys = [_outline(rng, melanoma, cx, cy, r0)]
  if melanoma:
    for _ in range(int(rng.integers(0, 3))):  # overlapping lobes make the blob asymmetric
      phi = rng.uniform(0.0, 2 * np.pi)
      dist = r0 * rng.uniform(0.5, 0.9)
      polys.append(_outline(rng, True, cx + dist * np.cos(phi), cy + dist * np.sin(phi),
                            r0 * rng.uniform(0.35, 0.6)))
  # Nevi fade out gradually; melanoma pigment stops abruptly at the border.
  sigma = r0 * (rng.uniform(0.01, 0.03) if melanoma else rng.uniform(0.04, 0.09))
  # Work inside the bounding box (plus blur margin) only: a lesion covers ~5-25% of the image.
  allpts = np.concatenate(polys)
  margin = int(np.ceil(3 * sigma)) + 2
  x0, y0 = np.maximum(np.floor(allpts.min(0)).astype(int) - margin, 0)
  x1 = min(int(np.ceil(allpts[:, 0].max())) + margin, width)
  y1 = min(int(np.ceil(allpts[:, 1].max())) + margin, height)
  bw, bh = x1 - x0, y1 - y0
  mask = np.zeros((bh, bw), np.uint8)
  offset = np.array([x0, y0], np.float32)
  for p in polys:  # one call per polygon: fillPoly of overlapping polygons leaves holes
    cv2.fillPoly(mask, [np.round((p - offset) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
  alpha = mask.astype(np.float32) / 255.0
  if sigma > 0.5:
    alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
  alpha *= rng.uniform(0.85, 1.0) if melanoma else rng.uniform(0.8, 0.95)
  pigment, opacity = _lesion_colour(rng, melanoma, bw, bh)
  box = img[y0:y1, x0:x1].astype(np.float32)
  # Pigment takes the skin's brightness (vignette, grain) but not its hue: multiplying by the RGB
  # skin colour turned blue-grey pink.
  light = cv2.cvtColor(box, cv2.COLOR_RGB2GRAY) / 200.0
  box += (alpha * opacity)[..., None] * (pigment * light[..., None] - box)
  dot_colours = _MELANOMA[:2] if melanoma else _NEVUS[-1:] * 0.6
  structures = synthetic_structures.draw_structures(rng, box, mask, polys, offset, s, melanoma,
                                                     dot_colours)
  img[y0:y1, x0:x1] = cv2.convertScaleAbs(box)  # saturating float -> uint8; values are >= 0
  hair_free = img.copy() if return_truth else None
  alpha, kind = synthetic_structures.draw_hairs(rng, img)
  if not return_truth:
    return img
  return img, synthetic_structures.Truth(alpha, kind, hair_free, structures)


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
  ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                         [cv2.IMWRITE_JPEG_QUALITY, quality])
  if not ok:
    raise RuntimeError(f"cv2.imencode failed for an image of shape {rgb.shape}")
  return buf.tobytes()


def render(config: SyntheticConfig, index: int, melanoma: bool) -> bytes:
  """JPEG bytes of image `index`; depends only on (seed, index, melanoma, sizes, quality)."""
  rng = np.random.default_rng([config.seed, index])
  width, height = draw_size(rng, config.min_size, config.max_size)
  looks = melanoma and not disguised(config, index, melanoma)
  return encode_jpeg(make_image(rng, looks, width, height), config.jpeg_quality)


def render_with_truth(config: SyntheticConfig, index: int,
                      melanoma: bool) -> tuple[np.ndarray, synthetic_structures.Truth]:
  """Image `index` as RGB uint8 (before JPEG) and its `Truth`; the same pixels `render` encodes."""
  rng = np.random.default_rng([config.seed, index])
  width, height = draw_size(rng, config.min_size, config.max_size)
  looks = melanoma and not disguised(config, index, melanoma)
  return make_image(rng, looks, width, height, return_truth=True)


def hair_mask_png(truth: synthetic_structures.Truth) -> bytes:
  """The hair coverage as an 8-bit PNG: 0 no hair, 255 fully hair (> 127: the hair's core)."""
  ok, buf = cv2.imencode(".png", np.round(truth.hair_alpha * 255).astype(np.uint8))
  if not ok:
    raise RuntimeError("cv2.imencode failed for a hair mask")
  return buf.tobytes()


def _render_job(config: SyntheticConfig, with_mask: bool, index: int,
                melanoma: bool) -> tuple[bytes, bytes | None]:
  if not with_mask:
    return render(config, index, melanoma), None
  rgb, truth = render_with_truth(config, index, melanoma)
  return encode_jpeg(rgb, config.jpeg_quality), hair_mask_png(truth)


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(path)


def _worker_init() -> None:
  cv2.setNumThreads(1)  # one process per core already; OpenCV threads would oversubscribe


def write_dataset(output_dir: str | pathlib.Path, config: SyntheticConfig,
                  progress: bool = True, hair_masks_dir: str | pathlib.Path | None = None) -> dict:
  """Writes the data set; returns {"counts": {class: n}, "csv": path or None, "output_dir": path}.

  Refuses a non-empty `output_dir`: left-over images of a larger earlier run would silently join
  the new data set. With `hair_masks_dir`, also writes <hair_masks_dir>/<image_name>.png, the exact
  hair coverage of each image (see `hair_mask_png`); the images themselves do not change.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  config.validate()
  out = pathlib.Path(output_dir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"output_dir {out} exists and is not an empty directory: "
                          "choose a new one or delete it")
  labels = assign_labels(config)
  meta = draw_metadata(config, labels) if config.metadata else None
  folders = {c: out / (FLAT_DIR if config.flat else c) for c in CLASSES}
  for folder in set(folders.values()):
    folder.mkdir(parents=True, exist_ok=True)
  rows = []
  indices = range(config.num_images)
  masks = None if hair_masks_dir is None else pathlib.Path(hair_masks_dir)
  if masks is not None:
    masks.mkdir(parents=True, exist_ok=True)
  job = functools.partial(_render_job, config, masks is not None)
  bar = tqdm(total=config.num_images, unit="img", desc="synthetic", disable=not progress)
  with _pool(config.workers) as pool:
    chunks = max(1, min(64, config.num_images // (4 * config.workers)))
    for i, (data, mask) in zip(indices, pool.map(job, indices, labels.tolist(),
                                                 chunksize=chunks)):
      cls = CLASSES[0] if labels[i] else CLASSES[1]
      (folders[cls] / f"{image_name(i)}.jpg").write_bytes(data)
      if mask is not None:
        _write_atomic(masks / f"{image_name(i)}.png", mask)
      rows.append(_csv_row(config, i, bool(labels[i]), meta[i] if meta else None))
      bar.update()
  bar.close()
  csv_path = None
  if config.write_csv:
    csv_path = out / CSV_NAME
    with csv_path.open("w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(METADATA_CSV_COLUMNS if config.metadata else CSV_COLUMNS)
      writer.writerows(rows)
  counts = {CLASSES[0]: int(labels.sum()), CLASSES[1]: int((~labels).sum())}
  return {"counts": counts, "csv": str(csv_path) if csv_path else None, "output_dir": str(out)}


def _csv_row(config: SyntheticConfig, i: int, melanoma: bool, meta: dict | None) -> tuple:
  name, patient = image_name(i), patient_id(i, config.images_per_patient)
  diagnosis = "melanoma" if melanoma else "nevus"
  if meta is None:
    return (name, patient, int(melanoma), diagnosis)
  return (name, patient, meta["sex"], meta["age_approx"], meta["anatom_site_general_challenge"],
          diagnosis, "malignant" if melanoma else "benign", int(melanoma))


class _SerialPool:
  """`Executor.map` stand-in for workers=1: no process start-up (~0.5 s with spawn)."""

  def map(self, fn, *iterables, chunksize=1):
    del chunksize
    return map(fn, *iterables)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _pool(workers: int):
  """An executor with `map`; a context manager either way."""
  if workers == 1:
    return _SerialPool()
  # spawn, not fork: OpenCV's thread pools do not survive fork (opencv#5150).
  return concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
