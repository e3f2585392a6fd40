"""Hair removal scored against ground truth: the Kaggle-kernel mask, skinrecords' and the notebook's.

On a fixed synthetic set drawn at each output size (`skinrecords.data.synthetic` with its exact hair
coverage, hair-free twin and dot/globule/streak positions; every image JPEG q95 round-tripped as
the converter would read it) prints, per method:
  recall of hair-core pixels (coverage >= 0.5), for thin dark (< 3 px at 512), thick dark and
  light hairs; precision (masked pixels that any hair touches); the median fraction of pixels
  masked on the hair-free twins; mean absolute error to the twin inside the hair footprint and
  outside it; dots and globules kept (contrast >= half of the twin's, counting only those no hair
  touches); streaks whose centre is masked on the twins; ms per image on one core (best of
  interleaved rounds).

  python -m benchmarks.hair --num_images=24 --sizes=256,512
"""

from __future__ import annotations

import argparse
import sys
import time

import cv2
import numpy as np

from skinrecords.data import hair
from skinrecords.data import synthetic
from skinrecords.data import synthetic_structures

# name -> (mask function, full removal function)
METHODS = {
    "kernel (old)": (hair.hair_mask_kernel, hair.remove_hair_kernel),
    "hair_mask (new)": (hair.hair_mask, hair.remove_hair),
    "notebook": (hair.notebook_mask, hair.notebook_cleanup),
}
KINDS = {"thin dark": synthetic_structures.HAIR_THIN, "thick dark": synthetic_structures.HAIR_THICK,
         "light": synthetic_structures.HAIR_LIGHT}
TARGETS_512 = (("recall (all hair)", ">=", 0.90), ("precision", ">=", 0.80),
               ("hair-free masked, median", "<=", 0.01), ("dots/globules kept", ">=", 0.95),
               ("ms / image", "<=", 20.0))


def _jpeg(rgb: np.ndarray) -> np.ndarray:
  data = synthetic.encode_jpeg(rgb, 95)
  return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def make_set(size: int, num: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, object]]:
  """[(hairy RGB, hair-free RGB, Truth)]: image i from default_rng([seed, size, i]) alone."""
  out = []
  for i in range(num):
    rng = np.random.default_rng([seed, size, i])
    img, truth = synthetic.make_image(rng, i % 2 == 0, size, size, return_truth=True)
    out.append((_jpeg(img), _jpeg(truth.hair_free), truth))
  return out


def _contrast(gray: np.ndarray, x: float, y: float, r: float) -> float:
  """Surrounding ring mean minus the disk mean: how dark a dot/globule stands out."""
  h, w = gray.shape
  yy, xx = np.ogrid[:h, :w]
  d = np.hypot(xx - x, yy - y)
  disk, ring = d <= max(r, 0.8), (d >= r + 2) & (d <= 2 * r + 4)
  return float(gray[ring].mean() - gray[disk].mean())


def _blobs_kept(truth, twin: np.ndarray, result: np.ndarray) -> tuple[int, int]:
  """(dots/globules with contrast >= 8 on the twin and no hair on them, of those kept >= 50 %)."""
  foot = cv2.dilate((truth.hair_alpha > 0).astype(np.uint8), np.ones((5, 5), np.uint8))
  g0 = cv2.cvtColor(twin, cv2.COLOR_RGB2GRAY).astype(np.float32)
  g1 = cv2.cvtColor(result, cv2.COLOR_RGB2GRAY).astype(np.float32)
  before = after = 0
  for kind, x, y, r in truth.structures:
    xi, yi, ri = int(x), int(y), int(np.ceil(2 * r + 4))
    if kind == "streak" or foot[max(yi - ri, 0):yi + ri + 1, max(xi - ri, 0):xi + ri + 1].any():
      continue
    c0 = _contrast(g0, x, y, r)
    if c0 >= 8:
      before += 1
      after += _contrast(g1, x, y, r) >= 0.5 * c0
  return before, after


def score(method: str, data) -> dict[str, float]:
  """Every figure but the timing, for one method on one size's set."""
  mask_fn, remove_fn = METHODS[method]
  hit, core_n, masked_n, true_pos = {k: 0 for k in KINDS}, {k: 0 for k in KINDS}, 0, 0
  free_frac, err_in, err_out, n_in, n_out, blobs, streaks = [], 0.0, 0.0, 0, 0, [0, 0], [0, 0]
  for hairy, twin, truth in data:
    mask = mask_fn(hairy) > 0
    core = truth.hair_alpha >= 0.5
    for name, kind in KINDS.items():
      sel = core & (truth.hair_kind == kind)
      core_n[name] += int(sel.sum())
      hit[name] += int((sel & mask).sum())
    masked_n += int(mask.sum())
    true_pos += int((mask & (truth.hair_alpha > 0)).sum())
    free_mask = mask_fn(twin) > 0
    free_frac.append(float(free_mask.mean()))
    for kind, x, y, _ in truth.structures:
      if kind == "streak" and 0 <= int(y) < free_mask.shape[0] and 0 <= int(x) < free_mask.shape[1]:
        streaks[0] += 1
        streaks[1] += bool(free_mask[int(y), int(x)])
    result = remove_fn(hairy)
    err = np.abs(result.astype(np.float32) - twin).mean(axis=2)
    foot = truth.hair_alpha > 0
    err_in, n_in = err_in + float(err[foot].sum()), n_in + int(foot.sum())
    err_out, n_out = err_out + float(err[~foot].sum()), n_out + int((~foot).sum())
    b, a = _blobs_kept(truth, twin, result)
    blobs[0], blobs[1] = blobs[0] + b, blobs[1] + a
  row = {f"recall ({k})": hit[k] / max(core_n[k], 1) for k in KINDS}
  row["recall (all hair)"] = sum(hit.values()) / max(sum(core_n.values()), 1)
  row["precision"] = true_pos / max(masked_n, 1)
  row["hair-free masked, median"] = float(np.median(free_frac))
  row["MAE in hair (gray levels)"] = err_in / max(n_in, 1)
  row["MAE outside hair"] = err_out / max(n_out, 1)
  row["dots/globules kept"] = blobs[1] / max(blobs[0], 1)
  row["dots/globules before/after"] = f"{blobs[0]}/{blobs[1]}"
  row["streaks masked (hair-free)"] = streaks[1] / max(streaks[0], 1)
  return row


def time_methods(data, rounds: int) -> dict[str, float]:
  """Best-of-rounds ms per image of each full removal, rounds interleaved across methods."""
  best = {m: float("inf") for m in METHODS}
  for _ in range(rounds):
    for method, (_, remove_fn) in METHODS.items():
      start = time.perf_counter()
      for hairy, _, _ in data:
        remove_fn(hairy)
      best[method] = min(best[method], (time.perf_counter() - start) * 1000 / len(data))
  return best


def _fmt(v) -> str:
  return v if isinstance(v, str) else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def report(size: int, rows: dict[str, dict]) -> list[str]:
  names = list(rows)
  lines = [f"\n## {size} px", f"{'':34s}" + "".join(f"{n:>18s}" for n in names)]
  for metric in rows[names[0]]:
    lines.append(f"{metric:34s}" + "".join(f"{_fmt(rows[n][metric]):>18s}" for n in names))
  return lines


def verdicts(row: dict) -> list[str]:
  out = []
  for metric, op, target in TARGETS_512:
    ok = row[metric] >= target if op == ">=" else row[metric] <= target
    out.append(f"{'PASS' if ok else 'MISS'} hair_mask (new) at 512: {metric} {_fmt(row[metric])} "
               f"{op} {target}")
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="bench_hair", description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=24, help="images per size (>= 2)")
  parser.add_argument("--sizes", default="256,512", help="comma-separated output sizes in px")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
  args = parser.parse_args(argv)
  try:
    sizes = [int(x) for x in args.sizes.split(",")]
  except ValueError:
    parser.error(f"--sizes={args.sizes!r}: expected integers like 256,512")
  if args.num_images < 2 or min(sizes) < 32:
    parser.error("need --num_images >= 2 and every size >= 32")
  cv2.setNumThreads(1)  # one core, as in a converter worker
  for size in sizes:
    data = make_set(size, args.num_images, args.seed)
    ms = time_methods(data, args.rounds)
    rows = {m: {**score(m, data), "ms / image": ms[m]} for m in METHODS}
    print("\n".join(report(size, rows)), flush=True)
    if size == 512:
      print("\n".join(verdicts(rows["hair_mask (new)"])))
  return 0


def run():
  """Entry point of bin/bench_hair."""
  sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
  raise SystemExit(main())
