"""Near-duplicate recall and false positives on synthetic cases with known answers.

--num_lesions synthetic lesions (4 per synthetic patient, as `synthetic` draws them: different
lesions of one patient) each get 12 copies: re-compressed at quality 60, 75 and 95, rescaled to
0.5x and 1.5x, cropped by 5 % and 10 % (one corner) and 10 % (centred), flipped horizontally and
vertically, colour-shifted (+20 R, -10 G, -15 B) and gamma 0.8. Every image goes through
`neardup.find_pairs` (the band search the converter uses, not an all-pairs scan) at each
--distances value. Recall: copies paired with their original; false positives: pairs of two
different lesions (same synthetic patient or not). Also compared: a 64-bit difference hash (dHash)
of the whole image, the usual choice, on the same cases (all pairs, best case: flips tried).

With --search_only, the search alone instead: --search_sizes random hash tuples (11 windows), 10 %
of them planted copies of an earlier one (a flip of its whole hash or of a crop window, 0-10 bits
changed), searched by `neardup.find_pairs` (NumPy) and by the first, pure-Python band search (kept
here as the baseline; run up to --python_max inputs, it took 50 s for 20 k at load 16), in
interleaved rounds; also `neardup.connected` on the pairs. Recall: planted copies found.

Examples:
  python -m benchmarks.neardup --num_lesions=200
  python -m benchmarks.neardup --search_only --search_sizes=20000,100000,500000
"""

from __future__ import annotations

import collections
import itertools
import time

from absl import app
from absl import flags

from skinrecords.cli import common as cli_common

_NUM = flags.DEFINE_integer("num_lesions", 200, "Synthetic lesions (originals).")
_DISTANCES = flags.DEFINE_list("distances", ["6", "8", "10", "12"], "Thresholds to report.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic lesions.")
_SEARCH_ONLY = flags.DEFINE_boolean("search_only", False, "Time the search alone (random hashes).")
_SEARCH_SIZES = flags.DEFINE_list("search_sizes", ["20000", "100000", "500000"],
                                  "--search_only: numbers of inputs.")
_PYTHON_MAX = flags.DEFINE_integer("python_max", 20000,
                                   "--search_only: largest size the pure-Python baseline runs at.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "--search_only: interleaved rounds per size.")
_MIN_SIZE = (400, 300)
_MAX_SIZE = (1024, 768)


def copies(rgb, encode) -> dict[str, bytes]:
  """The known-answer copies of one image (RGB uint8)."""
  import cv2  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  h, w = rgb.shape[:2]
  dx, dy = int(w * 0.1), int(h * 0.1)
  shifted = np.clip(rgb.astype(np.int16) + np.array([20, -10, -15]), 0, 255).astype(np.uint8)
  return {
      "jpeg q60": encode(rgb, 60), "jpeg q75": encode(rgb, 75), "jpeg q95": encode(rgb, 95),
      "rescaled 0.5x": encode(cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA), 90),
      "rescaled 1.5x": encode(cv2.resize(rgb, (w * 3 // 2, h * 3 // 2),
                                         interpolation=cv2.INTER_CUBIC), 90),
      "cropped 5% corner": encode(rgb[int(h * 0.05):, :w - int(w * 0.05)], 90),
      "cropped 10% corner": encode(rgb[dy:, dx:], 90),
      "cropped 10% centred": encode(rgb[dy // 2:h - dy // 2, dx // 2:w - dx // 2], 90),
      "flipped h": encode(rgb[:, ::-1], 90), "flipped v": encode(rgb[::-1], 90),
      "colour-shifted": encode(shifted, 90),
      "gamma 0.8": encode((255 * (rgb / 255.0) ** 0.8).astype(np.uint8), 90),
  }


def _dhash(data: bytes):
  import cv2  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  grey = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE).astype(np.float32)
  small = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA)
  return [(s[:, 1:] > s[:, :-1]).ravel() for s in (small, small[:, ::-1], small[::-1],
                                                    small[::-1, ::-1])]


def run_benchmark(num: int, distances: list[int], seed: int) -> str:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from skinrecords.data import neardup  # pylint: disable=g-import-not-at-top
  from skinrecords.data import synthetic  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  originals, kinds, data = [], [], []
  for i in range(num):
    rng = np.random.default_rng([seed, i])
    w, h = synthetic.draw_size(rng, _MIN_SIZE, _MAX_SIZE)
    rgb = synthetic.make_image(rng, i % 2 == 0, w, h)
    originals.append(len(data))
    data.append(synthetic.encode_jpeg(rgb, 95))
    kinds.append(("original", i))
    for kind, blob in copies(rgb, synthetic.encode_jpeg).items():
      data.append(blob)
      kinds.append((kind, i))
  made = time.perf_counter() - start
  start = time.perf_counter()
  hashes = [neardup.image_hashes(d) for d in data]
  hashed = time.perf_counter() - start
  case_names = list(dict.fromkeys(k for k, _ in kinds if k != "original"))
  lines = [f"{num} synthetic lesions ({num // 4} synthetic patients of 4), {len(data)} images "
           f"(made in {made:.0f} s, hashed in {hashed:.1f} s = {1e3 * hashed / len(data):.1f} ms "
           f"each), hash: {neardup.HASH_NAME}", "",
           f"{'case':22s} " + " ".join(f"{f'recall@{d}':>10s}" for d in distances)]
  results = {}
  for d in distances:
    start = time.perf_counter()
    pairs = neardup.find_pairs(hashes, d)
    results[d] = (pairs, time.perf_counter() - start)
  for case in case_names:
    row = []
    for d in distances:
      found = {(i, j) for i, j, _ in results[d][0]}
      want = [(originals[k], idx) for idx, (kind, k) in enumerate(kinds) if kind == case]
      row.append(sum((min(a, b), max(a, b)) in found for a, b in want) / len(want))
    lines.append(f"{case:22s} " + " ".join(f"{r:10.3f}" for r in row))
  all_row, fp_row, fp_patient_row, time_row = [], [], [], []
  lesion_pairs = num * (num - 1) // 2
  same_patient_pairs = sum(len(list(itertools.combinations(range(min(4, num - p)), 2)))
                           for p in range(0, num, 4))
  for d in distances:
    pairs, seconds = results[d]
    wrong = [(i, j) for i, j, _ in pairs if kinds[i][1] != kinds[j][1]]
    same_patient = [(i, j) for i, j in wrong if kinds[i][1] // 4 == kinds[j][1] // 4]
    lesions_hit = {tuple(sorted((kinds[i][1], kinds[j][1]))) for i, j in wrong}
    copies_total = num * len(case_names)
    found = {(i, j) for i, j, _ in pairs}
    true_found = sum((min(originals[k], idx), max(originals[k], idx)) in found
                     for idx, (kind, k) in enumerate(kinds) if kind != "original")
    all_row.append(true_found / copies_total)
    fp_row.append(len(lesions_hit) / lesion_pairs)
    fp_patient_row.append(len({p for p in lesions_hit if p[0] // 4 == p[1] // 4}))
    time_row.append(seconds)
  lines.append(f"{'all copies':22s} " + " ".join(f"{r:10.3f}" for r in all_row))
  lines.append(f"{'FP lesion pairs':22s} " + " ".join(f"{r:10.5f}" for r in fp_row)
               + f"   (of {lesion_pairs} pairs of different lesions)")
  lines.append(f"{'same-patient merges':22s} " + " ".join(f"{r:10d}" for r in fp_patient_row)
               + f"   (of {same_patient_pairs} pairs of one patient's lesions)")
  lines.append(f"{'search seconds':22s} " + " ".join(f"{r:10.2f}" for r in time_row))
  # The alternative: 64-bit dHash of the whole image, all pairs, flips tried.
  dh = [_dhash(d) for d in data]
  orig_h = [dh[o][0] for o in originals]
  neg = [int((orig_h[a] != orig_h[b]).sum()) for a in range(num) for b in range(a + 1, num)]
  lines += ["", "alternative: 64-bit dHash of the whole image (flips tried), all pairs:",
            f"  different lesions: min {min(neg)} bits, 1st percentile {np.percentile(neg, 1):.0f}"]
  for case in case_names:
    ds = [min(int((q != dh[originals[k]][0]).sum()) for q in dh[idx])
          for idx, (kind, k) in enumerate(kinds) if kind == case]
    lines.append(f"  {case:22s} max {max(ds):3d} bits, 90th percentile "
                 f"{np.percentile(ds, 90):4.0f}")
  return "\n".join(lines)


def find_pairs_python(hashes, max_distance=None):
  """neardup.find_pairs as first landed (pure Python, sets and dicts): the baseline here and the
  reference of tests/test_neardup_search.py."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from skinrecords.data import neardup  # pylint: disable=g-import-not-at-top

  if max_distance is None:
    max_distance = neardup.DEFAULT_MAX_DISTANCE
  width = neardup.band_bits(sum(h is not None for h in hashes))

  def bands(h):
    bits = np.unpackbits(np.frombuffer(h.to_bytes(18, "big"), np.uint8))[-neardup.BITS:]
    bits = bits[neardup._SHUFFLE]  # pylint: disable=protected-access
    count = neardup.BITS // width
    return list(enumerate(band.tobytes() for band in bits[:count * width].reshape(count, width)))

  tables = collections.defaultdict(set)
  for i, h in enumerate(hashes):
    if h is not None:
      for w in set(h):
        for key in bands(w):
          tables[key].add(i)
  candidates = set()
  for i, h in enumerate(hashes):
    if h is not None:
      for m in neardup._FLIP_MASKS:  # pylint: disable=protected-access
        for key in bands(h[0] ^ m):
          candidates.update((min(i, j), max(i, j)) for j in tables.get(key, ()) if j != i)
  found = ((i, j, neardup.distance(hashes[i], hashes[j])) for i, j in candidates)
  return sorted(pair for pair in found if pair[2] <= max_distance)


def _random_hashes(n: int, seed: int):
  """n hash tuples, every 10th a copy of an earlier one; returns (hashes, planted (i, j) pairs)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from skinrecords.data import neardup  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  raw = np.frombuffer(rng.bytes(18 * 11 * n), np.uint8).reshape(n, 11, 18)
  hashes = [tuple(int.from_bytes(w.tobytes(), "big") >> 1 for w in row) for row in raw]
  planted = []
  for j in range(10, n, 10):
    i = int(rng.integers(0, j))
    flip = neardup._FLIP_MASKS[int(rng.integers(4))]  # pylint: disable=protected-access
    whole = hashes[i][int(rng.integers(11))] ^ flip
    for bit in rng.choice(neardup.BITS, int(rng.integers(0, 11)), replace=False):
      whole ^= 1 << int(bit)
    hashes[j] = (whole,) + hashes[j][1:]
    planted.append((i, j))
  return hashes, planted


def run_search_benchmark(sizes: list[int], python_max: int, rounds: int, seed: int) -> str:
  from skinrecords.data import neardup  # pylint: disable=g-import-not-at-top

  lines = [f"{'inputs':>8s} {'python s':>9s} {'numpy s':>8s} {'ratio':>7s} {'pairs':>7s} "
           f"{'recall':>7s} {'same':>5s} {'connected s':>11s}"]
  for n in sizes:
    hashes, planted = _random_hashes(n, seed)
    runs = {"python": [], "numpy": []}
    order = ["python", "numpy"] if n <= python_max else ["numpy"]
    results = {}
    for r in range(rounds):
      for name in (order if r % 2 == 0 else order[::-1]):  # interleaved, alternating first
        search = find_pairs_python if name == "python" else neardup.find_pairs
        start = time.perf_counter()
        results[name] = search(hashes, neardup.DEFAULT_MAX_DISTANCE)
        runs[name].append(time.perf_counter() - start)
    pairs = results["numpy"]
    start = time.perf_counter()
    neardup.connected(n, pairs)
    connected_s = time.perf_counter() - start
    found = {(i, j) for i, j, _ in pairs}
    recall = sum((min(p), max(p)) in found for p in planted) / len(planted)
    py = min(runs["python"]) if runs["python"] else float("nan")
    npy = min(runs["numpy"])
    same = str(results["python"] == pairs) if "python" in results else "-"
    lines.append(f"{n:8d} {py:9.2f} {npy:8.2f} {py / npy:6.1f}x {len(pairs):7d} {recall:7.3f} "
                 f"{same:>5s} {connected_s:11.2f}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _SEARCH_ONLY.value:
    try:
      sizes = [int(n) for n in _SEARCH_SIZES.value]
    except ValueError as err:
      raise app.UsageError(f"--search_sizes={_SEARCH_SIZES.value}: expected integers") from err
    if min(sizes) < 20 or _ROUNDS.value < 1:
      raise app.UsageError("--search_sizes must be >= 20 and --rounds >= 1")
    print(run_search_benchmark(sizes, _PYTHON_MAX.value, _ROUNDS.value, _SEED.value), flush=True)
    return
  if _NUM.value < 8:
    raise app.UsageError(f"--num_lesions={_NUM.value}: must be >= 8")
  try:
    distances = [int(d) for d in _DISTANCES.value]
  except ValueError as err:
    raise app.UsageError(f"--distances={_DISTANCES.value}: expected integers") from err
  print(run_benchmark(_NUM.value, distances, _SEED.value), flush=True)


def run():
  cli_common.run(main, "bench_neardup")


if __name__ == "__main__":
  run()
