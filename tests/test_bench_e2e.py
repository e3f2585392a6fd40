"""Smoke tests for bin/bench_e2e (benchmarks/e2e.py) at a tiny size, so that it cannot rot.

Only the report's shape is checked: every row printed with positive numbers for both ways, the
gains being the ratios of the printed values, and the work folder removed. Two epochs, not one:
the later-epochs rows need an epoch after the compiling first one.
"""

from __future__ import annotations

import re

import pytest

from conftest import run_bin

# Trains models end to end, both ways.
pytestmark = pytest.mark.slow

_NUM = r"\s+(\d+\.\d+)"
_ROWS = ("first epoch (s)", "later epochs, median (s)", "later epochs (img/s)",
         "training in all (s)", "training in all (CPU s)", "test prediction (s)",
         "images to test AUC (s)", "test ROC AUC")


def _row(out: str, label: str, pattern: str) -> tuple[float, ...]:
  m = re.search(r"^  " + re.escape(label) + pattern + r"\s*$", out, re.M)
  assert m, f"row {label!r} missing or malformed in:\n{out}"
  return tuple(float(v) for v in m.groups())


def test_bench_e2e_prints_every_row_and_removes_its_folder(tmp_path):
  proc = run_bin("bench_e2e", "--backbones=simple_cnn", "--image_size=32", "--num_images=40",
                 "--epochs=2", "--batch_size=8", f"--workdir={tmp_path}", timeout=300)
  out = proc.stdout
  assert re.search(r"^32 train / 8 test synthetic 32x32 images .* 2 epochs of 4 steps", out,
                   re.M), out
  assert "simple_cnn:" in out, out
  (convert_s,) = _row(out, "conversion, once (s)", r"\s+-" + _NUM + r"\s+-")
  assert convert_s > 0
  (load_s,) = _row(out, "loading model.keras (s)", r"\s+-" + _NUM + r"\s+-")
  assert load_s > 0
  values = {label: _row(out, label, _NUM * 2 + r"\s+(\d+\.\d+)x") for label in _ROWS}
  for label, (notebook, ours, gain) in values.items():
    assert notebook > 0 and ours > 0 and gain > 0, (label, out)
    higher_is_better = label in ("later epochs (img/s)", "test ROC AUC")
    expected = ours / notebook if higher_is_better else notebook / ours  # > 1: ours better
    assert abs(gain - expected) <= 0.01 + 0.01 * expected, (label, out)
  assert all(0.0 < v <= 1.0 for v in values["test ROC AUC"][:2]), out
  # 32 images an epoch: the rate row is the median row's inverse (printed to 0.001 s).
  for way in (0, 1):
    seconds = values["later epochs, median (s)"][way]
    assert abs(values["later epochs (img/s)"][way] - 32 / seconds) <= (
        0.01 + 32 * 0.0006 / seconds ** 2), out
  epochs = re.search(r"epochs \(s\): notebook ([\d. ]+); skinrecords ([\d. ]+)$", out, re.M)
  assert epochs and all(len(e.split()) == 2 for e in epochs.groups()), out
  assert list(tmp_path.iterdir()) == []  # images, records and models removed


def test_bench_e2e_refuses_bad_flags_in_one_line(tmp_path):
  for args, words in ((["--epochs=1"], "--epochs=1"),
                      (["--backbones=simple_cnn,densenet12"], "choose from"),
                      (["--test_fraction=1"], "--test_fraction=1"),
                      ([f"--workdir={tmp_path / 'file'}/x"], "--workdir")):
    (tmp_path / "file").write_text("not a folder")
    proc = run_bin("bench_e2e", *args, check=False)
    assert proc.returncode == 2, (args, proc.stderr)
    assert words in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 2, proc.stderr  # the message + "see --help"
