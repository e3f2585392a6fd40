"""Smoke tests for bin/bench_convert (benchmarks/convert.py) and bin/bench_input at a tiny size, so that they cannot rot.

The speed targets live in the benchmarks themselves; here only the report's shape is checked: every
row printed with a positive rate, one PASS/MISS verdict per target, the work folder removed (or kept
with --keep).
"""

from __future__ import annotations

import re

from benchmarks import augment as bench_augment
from conftest import run_bin

_RATE = r"\s+(\d+(?:\.\d+)?)"


def _rate(stdout: str, label: str, middle: str = "") -> float:
  m = re.search(re.escape(label) + middle + _RATE, stdout)
  assert m, f"row {label!r} missing from:\n{stdout}"
  return float(m[1])


def _verdicts(stdout: str) -> list[str]:
  return [line for line in stdout.splitlines() if re.match(r"(PASS|MISS|n/a) ", line)]


def test_bench_convert_prints_every_row_and_removes_its_folder(tmp_path):
  proc = run_bin("bench_convert", "--num_images=8", "--num_large=2", "--source_size=128x96",
                 "--large_size=384x288", "--image_size=64", "--rounds=2", f"--workdir={tmp_path}")
  out = proc.stdout
  lines = out.splitlines()
  number = r"\s+(\d+\.\d+)x?"
  for label in ("1", "2", "median"):
    row = next((line for line in lines if line.startswith(f"{label} ")), None)
    assert row, f"round {label!r} missing from:\n{out}"
    values = re.fullmatch(re.escape(label) + number * 9, row)
    assert values and all(float(v) > 0 for v in values.groups()), row
    ceiling_1, ceiling_n, ceiling, convert_1, convert_n, scaling, of_ceiling = map(
        float, values.groups()[:7])
    if label != "median":  # the ratios are those of the rates in the same row
      assert abs(ceiling - ceiling_n / ceiling_1) < 0.01 + 0.01 * ceiling, row
      assert abs(scaling - convert_n / convert_1) < 0.01 + 0.01 * scaling, row
      assert abs(of_ceiling - scaling / ceiling) < 0.01 + 0.01 * of_ceiling, row
  assert re.search(r"coordinator: \d+\.\d{3} ms CPU per image, \d+\.\d\d ms per MB", out), out
  projected = re.findall(r"^\s+(\d+) workers:\s+(\d+) img/s \((workers|coordinator)-bound\)$",
                         out, re.M)
  assert [int(w) for w, _, _ in projected] == [8, 16, 32, 64], out
  rates = [int(r) for _, r, _ in projected]
  assert rates == sorted(rates) and rates[0] > 0
  assert _rate(out, "reduced_decode=True", r"\s+\d+\.\d+") > 0
  assert _rate(out, "reduced_decode=False", r"\s+\d+\.\d+") > 0
  verdicts = _verdicts(out)
  assert [v.split()[1] for v in verdicts] == ["A", "A", "A", "B"], out
  assert ">= 25 img/s" in verdicts[0] and ">= 0.90 of the machine's 2-process ceiling" in verdicts[1]
  assert "<= 1.0 ms CPU per image" in verdicts[2] and ">= 2.0x" in verdicts[3]
  assert list(tmp_path.iterdir()) == []  # sources and records removed


def test_bench_convert_runs_as_a_module(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from conftest import REPO, bin_env  # pylint: disable=g-import-not-at-top

  proc = subprocess.run([sys.executable, "-m", "benchmarks.convert", "--image_size=64",
                         "--large_size=120x100", f"--workdir={tmp_path}"], cwd=REPO,
                        capture_output=True, text=True, env=bin_env(), timeout=120, check=False)
  assert proc.returncode != 0 and "--large_size=120x100" in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr


def test_bench_convert_rejects_a_large_size_too_small_for_reduced_decoding(tmp_path):
  proc = run_bin("bench_convert", "--image_size=64", "--large_size=120x100",
                 f"--workdir={tmp_path}", check=False)
  assert proc.returncode != 0
  assert "--large_size=120x100" in proc.stderr and "2 x --image_size=64" in proc.stderr
  assert list(tmp_path.iterdir()) == []


def test_bench_input_prints_every_row_and_keeps_its_folder(tmp_path):
  proc = run_bin("bench_input", "--num_images=16", "--image_size=64", "--batch_size=8",
                 "--batches=2", "--batches_slow=1", "--warmup=1", "--keep", f"--workdir={tmp_path}")
  out = proc.stdout
  lines = out.splitlines()
  for label in ("(2) keras image_dataset_from_directory + Keras 3 aug layers in map",
                "(3) skinrecords make_dataset (train)",
                "(4) (3) + augment_batch, jit_compile=True, per batch",
                "(5) decode limit: in-memory bytes -> decode_jpeg, AUTOTUNE",
                "aug alone: Keras Flip+Rotation+Translation+Shear, tf.function",
                "aug alone: augment_batch, uint8, jit_compile=True"):
    row = next((line for line in lines if line.startswith(label)), None)
    assert row, f"row {label!r} missing from:\n{out}"
    rates = re.fullmatch(re.escape(label) + r"\s+(\d+\.\d)\s+(\d+\.\d)", row)
    assert rates and float(rates[1]) > 0 and float(rates[2]) > 0, row
  # Row (1) needs tf_keras (the [bench] extra); without it the row says how to get it.
  row1 = next(line for line in lines if line.startswith("(1) tf_keras"))
  assert re.search(r"\s\d+\.\d\s+\d+\.\d$", row1) or row1.endswith("n/a (pip install -e .[bench])")
  verdicts = _verdicts(out)
  assert [v.split()[1] for v in verdicts] == ["(3)/(5)", "aug", "(4)/(1)"], out
  assert all(re.search(r": \d+\.\d\d \[\d+\.\d\d\]$", v) for v in verdicts if v[:4] != "n/a "), out
  kept = list(tmp_path.iterdir())
  assert len(kept) == 1 and kept[0].name.startswith("bench_input-"), kept
  assert f"kept {kept[0]}" in out
  assert (kept[0] / "records" / "manifest.json").is_file()
  assert len(list((kept[0] / "images").glob("*/*.jpg"))) == 16


def test_benchmark_reports_every_path():
  rows = bench_augment.benchmark(image_size=24, batch_size=2, iters=1)
  assert [row[0][:3] for row in rows] == ["(a)", "(b)", "(b)", "(c)"]
  assert all(rate > 0 and cpu_rate > 0 for _, rate, cpu_rate in rows)
