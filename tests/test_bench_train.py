"""bin/bench_train's BatchNorm table (issue 23) at a tiny size, so that it cannot rot: one row per
backbone with positive seconds for every variant and ratios that are the printed values' ratios;
bad variants refused in one line."""

from __future__ import annotations

import re

import pytest

from conftest import run_bin


@pytest.mark.slow  # builds and traces MobileNetV2 twice in a subprocess
def test_bench_train_batchnorm_table(tmp_path):
  proc = run_bin("bench_train", "--backbones=MobileNetV2", "--image_size=32", "--batch_size=4",
                 "--steps=1", "--rounds=1", "--warmup=1", "--batchnorm=keras,fused",
                 "--mixed_precision=off", timeout=900)
  out = proc.stdout
  assert "float32" in out and "keras/fused" in out, out
  m = re.search(r"^MobileNetV2\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s*$", out,
                re.M)
  assert m, out
  keras_cpu, keras_wall, fused_cpu, fused_wall, ratio = map(float, m.groups())
  assert min(keras_cpu, keras_wall, fused_cpu, fused_wall) > 0, out
  assert abs(ratio - keras_cpu / fused_cpu) <= 0.01 + 0.05 * ratio, out


def test_bench_train_refuses_an_unknown_batchnorm_variant():
  proc = run_bin("bench_train", "--batchnorm=keras,fussed", check=False, timeout=600)
  assert proc.returncode == 2, proc.stderr
  assert "--batchnorm=keras,fussed" in proc.stderr and "Traceback" not in proc.stderr
