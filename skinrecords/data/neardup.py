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
import logging
import math

import cv2
import numpy as np

from skinrecords.data import preprocess

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


# Band search in NumPy (18 bytes per hash, MSB first as `int.to_bytes(18, "big")`): 20,000 hashes
# took 50 s in the pure-Python version at load ~16; figures for 20 k-500 k in BUILD_NOTES.
_BYTES = 18
# A bucket (one band value) shared by more than this many images, e.g. hundreds of identical blank
# thumbnails, is not expanded into all its pairs (n^2: 10,000 blanks would be 5e7 candidates per
# band): each image looking it up is compared with the bucket's first _MAX_BUCKET images (lowest
# index) only. Identical copies still end up connected (through those first members), the pairs
# listed are a subset, and `find_pairs` logs a warning naming how many buckets and lookups were cut.
# Below the cap the search is exactly the band search documented above.
_MAX_BUCKET = 64
_PAIR_CHUNK = 32_768  # pairs per distance block: 32 k x 4 flips x 11 windows x 3 words = 35 MB


def _hash_bytes(values) -> np.ndarray:
  return np.frombuffer(b"".join(v.to_bytes(_BYTES, "big") for v in values), np.uint8
                       ).reshape(-1, _BYTES)


def _words(raw: np.ndarray) -> np.ndarray:
  """(..., 18) bytes -> (..., 3) uint64 words for XOR + popcount."""
  pad = np.zeros(raw.shape[:-1] + (24,), np.uint8)
  pad[..., 6:] = raw
  return pad.view(">u8").astype(np.uint64)


def _band_keys(raw: np.ndarray, width: int) -> np.ndarray:
  """(rows, 18) bytes -> (rows, bands) uint64: each band's bits (in `_SHUFFLE` order) packed."""
  count = BITS // width
  keys = np.empty((len(raw), count), np.uint64)
  for lo in range(0, len(raw), 65_536):  # 64 k rows x 144 bits = 9 MB of bits at a time
    bits = np.unpackbits(raw[lo:lo + 65_536], axis=1)[:, -BITS:][:, _SHUFFLE[:count * width]]
    packed = np.packbits(bits.reshape(-1, count, width), axis=-1)
    full = np.zeros(packed.shape[:2] + (8,), np.uint8)
    full[..., 8 - packed.shape[2]:] = packed
    keys[lo:lo + 65_536] = full.view(">u8")[..., 0]
  return keys


def _popcount(x: np.ndarray) -> np.ndarray:
  if hasattr(np, "bitwise_count"):  # NumPy >= 2.0
    return np.bitwise_count(x)
  table = np.array([bin(b).count("1") for b in range(256)], np.uint8)
  return table[x.view(np.uint8)].reshape(x.shape + (8,)).sum(-1, dtype=np.uint8)


def _unique(x: np.ndarray) -> np.ndarray:
  """Sorted unique values: np.unique's hash path (NumPy 2.4) took 1.5 s of a 4 s search at 20 k."""
  x = np.sort(x)
  return x[np.concatenate(([True], x[1:] != x[:-1]))] if len(x) else x


def _bucket_pairs(table: np.ndarray, query: np.ndarray, n: int) -> tuple[np.ndarray, int, int]:
  """One band: unique codes i * n + j (i < j) of query entries (key << 32 | i) meeting table
  entries (key << 32 | j) of the same key, j != i; also (buckets cut, lookups cut) by `_MAX_BUCKET`.
  Keys are < 2^32 (bands <= 28 bits) and images < 2^32."""
  table, query = _unique(table), _unique(query)  # a bucket's first are its lowest indices
  low = np.uint64(0xFFFFFFFF)
  table_key, query_key = table >> np.uint64(32), query >> np.uint64(32)
  left = np.searchsorted(table_key, query_key, "left")
  count = np.searchsorted(table_key, query_key, "right") - left
  cut = count > _MAX_BUCKET
  buckets_cut = len(_unique(query_key[cut]))
  count = np.minimum(count, _MAX_BUCKET)
  total = int(count.sum())
  i = np.repeat(query & low, count)
  start = np.repeat(np.cumsum(count) - count, count)
  j = table[np.repeat(left, count) + np.arange(total) - start] & low
  keep = i != j
  a, b = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
  return _unique(a * np.uint64(n) + b), buckets_cut, int(cut.sum())


def _min_bits(flipped: np.ndarray, words: np.ndarray, x: np.ndarray, y: np.ndarray,
              used: int) -> np.ndarray:
  """Fewest differing bits, over the first `used` words only, between x's whole hash (4 flips) and
  y's windows, or the other way round."""
  best = []
  for a, b in ((x, y), (y, x)):
    fa, wb = flipped[a], words[b]
    bits = sum(_popcount(fa[:, :, None, k] ^ wb[:, None, :, k]) for k in range(used))
    best.append(bits.reshape(len(a), -1).min(1))
  return np.minimum(*best)


def _distances(flipped: np.ndarray, words: np.ndarray, i: np.ndarray, j: np.ndarray,
               max_distance: int) -> tuple[np.ndarray, np.ndarray]:
  """`distance` of the pairs (i, j) -> (which are within max_distance, their distances).

  flipped (n, 4, 3) whole hashes, words (n, windows, 3). The first word alone (64 of 143 bits)
  is a lower bound that already rules out nearly every unrelated candidate, at a third of the work.
  """
  near, dist = [], []
  for lo in range(0, len(i), _PAIR_CHUNK):
    a, b = i[lo:lo + _PAIR_CHUNK], j[lo:lo + _PAIR_CHUNK]
    maybe = np.flatnonzero(_min_bits(flipped, words, a, b, 1) <= max_distance)
    d = _min_bits(flipped, words, a[maybe], b[maybe], 3).astype(np.int64)
    near.append(lo + maybe[d <= max_distance])
    dist.append(d[d <= max_distance])
  empty = [np.zeros(0, np.int64)]
  return np.concatenate(near or empty), np.concatenate(dist or empty)


def find_pairs(hashes: list[tuple[int, ...] | None], max_distance: int = DEFAULT_MAX_DISTANCE
               ) -> list[tuple[int, int, int]]:
  """(i, j, distance) with i < j for every pair within `max_distance`; None entries are skipped.

  No all-pairs scan: every window hash of every image goes into band tables (`band_bits`);
  each image's whole-image hash, in its four flips, is looked up band by band, and only the images
  sharing a band are compared (buckets over `_MAX_BUCKET` images: see there). A crop is found from
  its whole hash against the original's window. Sorted by (i, j).
  """
  index = np.array([k for k, h in enumerate(hashes) if h is not None], np.int64)
  valid = [hashes[k] for k in index]
  n = len(valid)
  if n < 2:
    return []
  windows = max(map(len, valid))  # shorter tuples padded with their whole hash: same set, same min
  raw = _hash_bytes(w for h in valid for w in h + (h[0],) * (windows - len(h)))
  raw = raw.reshape(n, windows, _BYTES)
  words, masks = _words(raw), _words(_hash_bytes(_FLIP_MASKS))
  flipped = words[:, 0, None] ^ masks[None]
  width = band_bits(n)
  table_keys = _band_keys(raw.reshape(-1, _BYTES), width).reshape(n, windows, -1)
  query_keys = _band_keys(raw[:, 0], width)[:, None] ^ _band_keys(_hash_bytes(_FLIP_MASKS), width)
  ids = np.arange(n, dtype=np.uint64)
  codes, cut_buckets, cut_lookups = [], 0, 0
  for band in range(table_keys.shape[2]):
    table = table_keys[:, :, band].ravel() << np.uint64(32) | np.repeat(ids, windows)
    query = query_keys[:, :, band].ravel() << np.uint64(32) | np.repeat(ids, len(_FLIP_MASKS))
    band_codes, buckets, lookups = _bucket_pairs(table, query, n)
    codes.append(band_codes)
    cut_buckets, cut_lookups = cut_buckets + buckets, cut_lookups + lookups
  if cut_buckets:
    logging.warning("near-duplicates: %d hash buckets held more than %d images (identical or blank "
                    "thumbnails?); %d lookups compared with their first %d only", cut_buckets,
                    _MAX_BUCKET, cut_lookups, _MAX_BUCKET)
  pairs = _unique(np.concatenate(codes))
  i, j = (pairs // np.uint64(n)).astype(np.int64), (pairs % np.uint64(n)).astype(np.int64)
  near, d = _distances(flipped, words, i, j, max_distance)
  return list(zip(index[i[near]].tolist(), index[j[near]].tolist(), d.tolist()))


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
