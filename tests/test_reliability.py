"""Issue 27 (reliability, round 3), through the commands: resume under other settings, nonsense
learning rates, a damaged model.keras, a class without training images, one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_bin, synthetic_records

TINY = ("--backbone=simple_cnn", "--weights=none", "--batch_size=16", "--noprogress")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  return synthetic_records(tmp_path_factory.mktemp("rel"), 120, (64, 48), (96, 72), 32)


@pytest.fixture(scope="module")
def trained(records, tmp_path_factory):
  """A 2-epoch run through bin/train (about 20 s)."""
  out = tmp_path_factory.mktemp("run") / "m"
  run_bin("train", f"--records_dir={records}", f"--model_dir={out}", "--epochs=2", *TINY)
  return out


def _one_line_error(proc, *needles):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_resume_under_other_training_settings_is_refused_naming_them(records, trained,
                                                                       tmp_path):
  run = tmp_path / "m"
  shutil.copytree(trained, run)
  config_before = (run / "config.json").read_text()
  proc = run_bin("train", f"--records_dir={records}", f"--model_dir={run}", "--epochs=3", *TINY,
                 "--learning_rate=0.05", "--balance=oversample", "--noaugment", check=False)
  _one_line_error(proc, "--learning_rate=0.0001 (now 0.05)", "--balance=none (now oversample)",
                  "--augment=true (now false)", "--overwrite")
  assert (run / "config.json").read_text() == config_before  # not rewritten
  # A field nobody listed (dropout) is refused as well: the rule is generic.
  proc = run_bin("train", f"--records_dir={records}", f"--model_dir={run}", "--epochs=2", *TINY,
                 "--dropout=0.1", check=False)
  _one_line_error(proc, "--dropout=0.3 (now 0.1)")
  # Allowed: more epochs, another verbosity and progress setting, another XLA mode.
  proc = run_bin("train", f"--records_dir={records}", f"--model_dir={run}", "--epochs=3", *TINY,
                 "--progress", "--xla=off", "--verbosity=-1")
  assert "epoch 3 of 3" in proc.stdout or "of 3 (best" in proc.stdout, proc.stdout
  summary = json.loads((run / "summary.json").read_text())
  assert summary["epochs_done"] == 3 and summary["epochs_this_run"] == 1
  assert json.loads((run / "config.json").read_text())["train"]["learning_rate"] == 1e-4


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1e6", "0"])
def test_nonsense_learning_rates_are_refused(records, tmp_path, value):
  proc = run_bin("train", f"--records_dir={records}", f"--model_dir={tmp_path / 'm'}",
                 "--epochs=1", *TINY, f"--learning_rate={value}", check=False)
  _one_line_error(proc, "--learning_rate=", "must be a number in (0, 1]")
  assert not (tmp_path / "m" / "model.keras").exists()
