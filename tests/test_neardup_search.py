"""The NumPy band search (`neardup.find_pairs`) against the first, pure-Python one, kept in
benchmarks/neardup.py as the reference: same pairs, same distances, same order, on random hashes
with planted near-duplicates (flipped, cropped = matching one of the original's windows, a few
bits changed)."""

import logging
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from benchmarks.neardup import find_pairs_python as reference_find_pairs
from conftest import bin_env
from skinrecords.data import neardup


def planted(n, seed):
  """n hash tuples: random ones, and copies of an earlier one: a flip of its whole hash or of one
  of its crop windows, with 0-16 bits changed (so some land beyond every threshold); some None."""
  rng = np.random.default_rng(seed)
  masks = neardup._FLIP_MASKS  # pylint: disable=protected-access

  def random_hash():
    return int.from_bytes(rng.bytes(18), "big") >> (144 - neardup.BITS)

  hashes = []
  for i in range(n):
    kind = rng.random()
    if i and kind < 0.3 and hashes[-1] is not None:
      source = hashes[int(rng.integers(max(0, i - 20), i))] or hashes[-1]
      whole = source[int(rng.integers(len(source)))] ^ masks[int(rng.integers(4))]
      for bit in rng.choice(neardup.BITS, int(rng.integers(0, 17)), replace=False):
        whole ^= 1 << int(bit)
      windows = [random_hash() for _ in range(10)]
      if rng.random() < 0.3:  # the original is a crop of the copy: its whole hash is our window
        windows[int(rng.integers(10))] = source[0] ^ masks[int(rng.integers(4))]
      hashes.append((whole, *windows))
    elif kind < 0.33:
      hashes.append(None)
    elif kind < 0.36 and hashes:  # an exact copy (same tuple)
      hashes.append(hashes[-1])
    else:
      hashes.append(tuple(random_hash() for _ in range(11)))
  return hashes


@pytest.mark.parametrize("n,seed", [(300, 0), (1200, 1)])
def test_same_pairs_distances_and_order_as_the_reference(n, seed):
  hashes = planted(n, seed)
  for max_distance in (6, 10, 14):
    want = reference_find_pairs(hashes, max_distance)
    got = neardup.find_pairs(hashes, max_distance)
    assert got == want
    assert all(type(v) is int for pair in got for v in pair)  # JSON-ready, as before
  assert len(want) > n // 10  # the planted copies are there to be found
  assert {d for _, _, d in want} >= {0, 14}


def test_short_tuples_none_and_tiny_inputs():
  rng = np.random.default_rng(5)
  hashes = [tuple(int.from_bytes(rng.bytes(18), "big") >> 1 for _ in range(int(k)))
            for k in rng.integers(1, 12, 200)]
  hashes[10] = (hashes[3][0] ^ 0b101,)
  hashes[20] = None
  assert neardup.find_pairs(hashes) == reference_find_pairs(hashes)
  assert (3, 10, 2) in neardup.find_pairs(hashes)
  assert neardup.find_pairs([]) == [] and neardup.find_pairs([None, hashes[0]]) == []
  assert neardup.find_pairs([hashes[0], None, hashes[0]]) == [(0, 2, 0)]


def test_a_huge_bucket_is_capped_reported_and_still_one_group(caplog):
  rng = np.random.default_rng(7)
  blank = tuple(int.from_bytes(rng.bytes(18), "big") >> 1 for _ in range(11))
  n_blank = 5 * neardup._MAX_BUCKET  # pylint: disable=protected-access
  hashes = [blank] * n_blank + [tuple(int.from_bytes(rng.bytes(18), "big") >> 1
                                      for _ in range(11)) for _ in range(100)]
  with caplog.at_level(logging.WARNING):
    pairs = neardup.find_pairs(hashes)
  assert "hash buckets held more than" in caplog.text
  assert len(pairs) < n_blank * (n_blank - 1) // 2  # not every pair of the bucket
  assert all(d == 0 and j < n_blank for _, j, d in pairs)
  assert neardup.connected(len(hashes), pairs) == [list(range(n_blank))]


def test_search_benchmark_runs_and_agrees():
  proc = subprocess.run([sys.executable, "-m", "benchmarks.neardup", "--search_only",
                         "--search_sizes=400", "--rounds=1"], capture_output=True, text=True,
                        env=bin_env(), cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  header, row = proc.stdout.strip().splitlines()
  assert header.split()[:3] == ["inputs", "python", "s"]
  fields = row.split()
  assert fields[0] == "400" and fields[6] == "True" and float(fields[5]) > 0.5
  bad = subprocess.run([sys.executable, "-m", "benchmarks.neardup", "--search_only",
                        "--search_sizes=lots"], capture_output=True, text=True,
                       env=bin_env(), cwd=REPO, timeout=300, check=False)
  assert bad.returncode != 0 and "expected integers" in bad.stderr
  assert "Traceback" not in bad.stderr
