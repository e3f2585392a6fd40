"""Speed targets that used to be wall-clock assertions in unit tests (a shared machine met or
missed them by chance, and a test must fail only on a wrong result):

  bootstrap CIs of 10,000 predictions, 1,000 resamples   target <= 3.0 s  (best of rounds)
  notebook cleanup (preprocess_array) of one 512 px image  target <= 0.2 s  (best of rounds)

Rounds are interleaved. Prints one row per check with its best and median time and a PASS/MISS
verdict; record the load average (`uptime`) beside the figures.

  python -m benchmarks.speed --rounds=3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import cv2
import numpy as np

from skinrecords.data import preprocess
from skinrecords.evaluation import uncertainty

# check -> target seconds (best of rounds), at the default sizes (n=10,000, 512 px)
TARGETS = {"bootstrap": 3.0, "notebook cleanup": 0.2}


def _bootstrap_case(n: int):
  rng = np.random.default_rng(0)
  labels = (rng.random(n) < 0.1).astype(int)
  probs = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1)
  return lambda: uncertainty.bootstrap_ci(probs, labels, threshold=0.5, resamples=1000)


def _cleanup_case(size: int):
  skin = np.full((size, size, 3), (150, 170, 210), np.uint8)
  cv2.circle(skin, (size // 2, size // 2), size // 8, (60, 70, 110), -1)
  cv2.line(skin, (20, 60), (size - 22, 100), (60, 40, 90), 6)  # an ink stroke
  cfg = preprocess.PreprocessConfig(image_size=size, notebook_cleanup=True)
  return lambda: preprocess.preprocess_array(skin, cfg)


def measure(rounds: int, n: int = 10_000, size: int = 512) -> list[dict]:
  """Per check: its times over `rounds` interleaved rounds, best, median, target and verdict."""
  cases = {"bootstrap": _bootstrap_case(n), "notebook cleanup": _cleanup_case(size)}
  labels = {"bootstrap": f"bootstrap {n} x 1000", "notebook cleanup": f"notebook cleanup {size} px"}
  times = {name: [] for name in cases}
  for _ in range(rounds):
    for name, fn in cases.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return [{"name": labels[name], "best": min(t), "median": statistics.median(t),
           "target": TARGETS[name], "verdict": "PASS" if min(t) <= TARGETS[name] else "MISS"}
          for name, t in times.items()]


def report(rows: list[dict]) -> str:
  lines = [f"{'check':<26} {'best s':>8} {'median s':>9} {'target s':>9}  verdict"]
  lines += [f"{r['name']:<26} {r['best']:8.3f} {r['median']:9.3f} {r['target']:9.3f}  "
            f"{r['verdict']}" for r in rows]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 1)")
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error(f"--rounds={args.rounds}: must be >= 1")
  print(report(measure(args.rounds)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
