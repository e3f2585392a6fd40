"""Near-duplicate inputs: a perceptual hash per image, candidates by hash bands, groups and conflicts.

The ISIC archive holds re-photographed, rescaled, re-compressed and cropped copies of one lesion;
sha256 (`dedup`) only catches byte-identical ones. Here every input gets `image_hashes` (computed in
the converter's workers, from a grey thumbnail decoded at reduced DCT scale), copies are found by
`find_pairs` without an all-pairs scan, and `groups` turns the pairs into groups that the converter
keeps in one split and fold, merged with the patient groups.

The hash, chosen on the generator's cases (`benchmarks/neardup.py`, figures in BUILD_NOTES): the
signs of the 12x12 lowest DCT coefficients but the DC of a 32x32 grey thumbnail (143 bits). On 80
synthetic lesions and 11 kinds of copy, copies were at most 10 bits away and different lesions at
least 15; a 64-bit difference hash (dHash) put two different lesions 2 bits apart and a 10 %-cropped
copy 26 bits away, because every synthetic (and real) dermoscopy image is a dark central blob on
lighter skin, which a 9x8 gradient sign pattern barely tells apart. Signs (not "above the median",
as classic pHash) make flips free: mirroring negates the odd-frequency coefficients, so a flipped
copy's hash is the original's XOR a fixed mask (`_FLIP_MASKS`). Crops: besides the whole image,
ten sub-windows (90 % and 95 % of each side, at the four corners and the centre) are hashed, so a
copy cropped by up to 10 % matches one of the original's windows.

Plain NumPy + OpenCV (it runs in the workers): no TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import cv2
import numpy as np

from skinrecords import preprocess

HASH_NAME = "dct-sign-12x12 of a 32x32 grey thumbnail (143 bits), 11 windows, flips by XOR masks"
_K = 12
BITS = _K * _K - 1  # the DC (mean brightness) is left out: a colour or exposure shift moves it
# Copies of the generator's cases were <= 10 bits away (re-compressed q60: 3, rescaled 0.5x: 8,
# cropped 10 %: 10, flipped: 10), different lesions >= 15 bits (80 lesions); on 42 small (200-320
# px) ones two different lesions came 10 and 12 bits apart: 10 is the default.
DEFAULT_MAX_DISTANCE = 10
_THUMB = 64  # windows are cut from a 64x64 thumbnail, each resized to 32x32 for its DCT
_WINDOW_FRACTIONS = (0.9, 0.95)
# Bands for candidate search: the 143 bits, in a fixed shuffle, cut into bands of b bits; two
# hashes whose bits differ in fewer places than there are bands share a band exactly (pigeonhole).
# b grows with the number of images so that a bucket holds ~1 unrelated entry whatever N: with
# 13-bit bands 3,000 random hashes already gave 480 k candidate pairs (60 s). So up to ~750 images
# the search is exact to 10 bits (11 bands of 13), at 0.5 M it has 6 bands of 23 bits (exact to 5
# bits, probabilistic beyond; recall measured in BUILD_NOTES). The shuffle spreads every band over
# all frequencies: the lowest frequencies' signs are nearly the same in every dermoscopy image (a
# dark central blob), and bands made of them alone would put most images in one bucket.
_MIN_BAND_BITS, _MAX_BAND_BITS = 13, 28
_SHUFFLE = np.random.default_rng(143).permutation(BITS)


def band_bits(n: int) -> int:
  return int(min(_MAX_BAND_BITS, max(_MIN_BAND_BITS, math.ceil(math.log2(max(11 * n, 2))))))


MODES = ("group", "report", "off")


def _flip_masks() -> tuple[int, ...]:
  """XOR masks that turn a hash into its horizontally, vertically and doubly flipped image's."""
  u, v = np.divmod(np.arange(_K * _K), _K)
  u, v = u[1:], v[1:]
  return tuple(_pack(m) for m in (np.zeros(BITS, bool), v % 2 == 1, u % 2 == 1, (u + v) % 2 == 1))


def _pack(bits: np.ndarray) -> int:
  return int.from_bytes(np.packbits(bits.astype(np.uint8)).tobytes(), "big")


_FLIP_MASKS = _flip_masks()


def _window_hash(window: np.ndarray) -> int:
  small = cv2.resize(window, (32, 32), interpolation=cv2.INTER_AREA)
  return _pack(cv2.dct(small)[:_K, :_K].ravel()[1:] > 0)


def thumbnail(data: bytes, max_pixels: int) -> np.ndarray:
  """64x64 float32 grey thumbnail of the whole image (squashed), via `preprocess.decode`, which
  checks the bytes (bombs, truncation) and decodes a large JPEG at 1/2, 1/4 or 1/8 scale."""
  config = preprocess.PreprocessConfig(image_size=_THUMB, max_pixels=max_pixels)
  grey = cv2.cvtColor(preprocess.decode(data, config), cv2.COLOR_RGB2GRAY)
  return cv2.resize(grey, (_THUMB, _THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)


def thumbnail_hashes(thumb: np.ndarray) -> tuple[int, ...]:
  """The whole image's hash first, then the ten crop windows'."""
  windows = [thumb]
  for fraction in _WINDOW_FRACTIONS:
    m = int(round(_THUMB * fraction))
    o, c = _THUMB - m, (_THUMB - m) // 2
    windows += [thumb[a:a + m, b:b + m] for a, b in ((0, 0), (0, o), (o, 0), (o, o), (c, c))]
  return tuple(_window_hash(w) for w in windows)


def image_hashes(data: bytes, max_pixels: int = preprocess.PreprocessConfig.max_pixels
                 ) -> tuple[int, ...]:
  """`thumbnail_hashes` of encoded image bytes; raises `preprocess.RejectedImage`."""
  return thumbnail_hashes(thumbnail(data, max_pixels))


def distance(a: tuple[int, ...], b: tuple[int, ...]) -> int:
  """Bits between a's whole image (any flip) and b's closest window, or the other way round."""
  return min(map(int.bit_count, [a[0] ^ m ^ w for m in _FLIP_MASKS for w in b]
                 + [b[0] ^ m ^ w for m in _FLIP_MASKS for w in a]))


def _bands(h: int, width: int) -> list[tuple[int, bytes]]:
  bits = np.unpackbits(np.frombuffer(h.to_bytes(18, "big"), np.uint8))[-BITS:][_SHUFFLE]
  count = BITS // width
  return [(i, band.tobytes()) for i, band in enumerate(bits[:count * width].reshape(count, width))]


def find_pairs(hashes: list[tuple[int, ...] | None], max_distance: int = DEFAULT_MAX_DISTANCE
               ) -> list[tuple[int, int, int]]:
  """(i, j, distance) with i < j for every pair within `max_distance`; None entries are skipped.

  No all-pairs scan: every window hash of every image goes into band tables (`band_bits`);
  each image's whole-image hash, in its four flips, is looked up band by band, and only the images
  sharing a band are compared. A crop is found from its whole hash against the original's window.
  """
  width = band_bits(sum(h is not None for h in hashes))
  tables: dict[tuple[int, bytes], set[int]] = collections.defaultdict(set)
  for i, h in enumerate(hashes):
    if h is not None:
      for w in set(h):
        for key in _bands(w, width):
          tables[key].add(i)
  candidates: set[tuple[int, int]] = set()  # each pair once, whichever side's lookup found it
  for i, h in enumerate(hashes):
    if h is not None:
      for m in _FLIP_MASKS:
        for key in _bands(h[0] ^ m, width):
          candidates.update((min(i, j), max(i, j)) for j in tables.get(key, ()) if j != i)
  found = ((i, j, distance(hashes[i], hashes[j])) for i, j in candidates)
  return sorted(pair for pair in found if pair[2] <= max_distance)


@dataclasses.dataclass
class NearDuplicates:
  """What the converter records: the pairs (by item index) and the groups they form."""
  pairs: list[tuple[int, int, int]]
  groups: list[list[int]]  # connected components of the pairs, each sorted, two or more members


def connected(n: int, pairs: list[tuple[int, int, int]]) -> list[list[int]]:
  """Connected components (two or more members) of `pairs` over items 0..n-1, in index order."""
  parent = list(range(n))

  def root(x):
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  for i, j, _ in pairs:
    a, b = root(i), root(j)
    if a != b:
      parent[max(a, b)] = min(a, b)
  members = collections.defaultdict(list)
  for i in range(n):
    members[root(i)].append(i)
  return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])


def merged_groups(patient_ids: list[str], pairs: list[tuple[int, int, int]]) -> list[str]:
  """Group keys for splitting: patients merged with near-duplicate pairs ("" = alone).

  An item untouched by any pair keeps its patient id (so without near-duplicates the splits are
  exactly those of patient grouping); a component joined by a pair gets the key of its first
  member, prefixed so that it cannot collide with a patient id.
  """
  n = len(patient_ids)
  links = list(pairs)
  first_of: dict[str, int] = {}
  for i, p in enumerate(patient_ids):
    if p:
      if p in first_of:
        links.append((first_of[p], i, 0))
      else:
        first_of[p] = i
  touched = {i for i, j, _ in pairs} | {j for i, j, _ in pairs}
  keys = list(patient_ids)
  for component in connected(n, links):
    if touched.intersection(component):
      for i in component:
        keys[i] = f"near-duplicates:{component[0]}"
  return keys
