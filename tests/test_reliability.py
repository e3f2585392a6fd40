"""Issue 27 (reliability, round 3), through the commands where the issue describes a command:
resume under other settings, nonsense learning rates, a damaged model.keras, unique image names,
a class without training images, tracebacks turned into one line, clearer messages, peak memory."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, bin_env, convert_folder, run_bin, synthetic_records
from skinrecords.data import convert
from skinrecords.data import sources
from skinrecords.input import pipeline
from skinrecords.training import train

TINY = ("--backbone=simple_cnn", "--weights=none", "--batch_size=16", "--noprogress")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  return synthetic_records(tmp_path_factory.mktemp("rel"), 120, (64, 48), (96, 72), 32)


@pytest.fixture(scope="module")
def trained(records, tmp_path_factory):
  """A 2-epoch run through bin/train."""
  out = tmp_path_factory.mktemp("run") / "m"
  run_bin("train", f"--records_dir={records}", f"--model_dir={out}", "--epochs=2", *TINY)
  return out


def _one_line_error(proc, *needles, rc=2):
  assert proc.returncode == rc, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in proc.stderr, proc.stderr[-2000:]


# --- item 1: a resume under other settings -------------------------------------------------------

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
  # A field no list names (dropout) is refused too: every training field is compared.
  proc = run_bin("train", f"--records_dir={records}", f"--model_dir={run}", "--epochs=2", *TINY,
                 "--dropout=0.1", check=False)
  _one_line_error(proc, "--dropout=0.3 (now 0.1)")
  # Allowed: more epochs, progress bars, another XLA mode, verbosity.
  run_bin("train", f"--records_dir={records}", f"--model_dir={run}", "--epochs=3", *TINY,
          "--progress", "--xla=off", "--verbosity=-1")
  summary = json.loads((run / "summary.json").read_text())
  assert summary["epochs_done"] == 3 and summary["epochs_this_run"] == 1
  config = json.loads((run / "config.json").read_text())
  assert config["train"]["learning_rate"] == 1e-4 and config["train"]["epochs"] == 3


def test_new_training_fields_are_compared_without_being_listed():
  from skinrecords.core import rundir  # pylint: disable=g-import-not-at-top
  old = {"train": {"epochs": 3, "select_by": "val_auc", "model": {"dropout": 0.3}}}
  new = {"train": {"epochs": 5, "select_by": "val_loss", "model": {"dropout": 0.3}}}
  assert rundir.changed_training_settings(old, new) == [("select_by", "val_auc", "val_loss")]
  # A cosine schedule decays over the planned epochs: then --epochs may not change.
  old["train"].update(lr_schedule="cosine", select_by="x")
  new["train"].update(lr_schedule="cosine", select_by="x")
  assert rundir.changed_training_settings(old, new) == [("epochs", 3, 5)]


# --- item 2: nonsense learning rates -------------------------------------------------------------

@pytest.mark.parametrize("value", [-1.0, -1e-9, float("nan"), float("inf"), 1e6])
def test_nonsense_learning_rates_are_refused(value):
  for name in ("learning_rate", "fine_tune_learning_rate"):
    with pytest.raises(ValueError, match=f"{name}=.* must be a number in \\[0, 1\\]"):
      train.TrainConfig(records_dir="r", model_dir="m", **{name: value}).validate()


@pytest.mark.slow
def test_a_negative_learning_rate_is_one_line_and_trains_nothing(records, tmp_path):
  proc = run_bin("train", f"--records_dir={records}", f"--model_dir={tmp_path / 'm'}",
                 "--epochs=1", *TINY, "--learning_rate=-1", check=False)
  _one_line_error(proc, "--learning_rate=-1.0 must be a number in [0, 1]")
  assert not (tmp_path / "m" / "model.keras").exists()


# --- item 7: a damaged model.keras ---------------------------------------------------------------

def _set_backup_best_epoch(run: pathlib.Path, records, best: int) -> None:
  """Rewrites the run's backup as if its best epoch were `best` (not the last one)."""
  from skinrecords.model import models  # pylint: disable=g-import-not-at-top
  from skinrecords.training import run_state  # pylint: disable=g-import-not-at-top
  config = train.TrainConfig(records_dir=str(records), model_dir=str(run), batch_size=16,
                             epochs=2, model=models.ModelConfig(backbone="simple_cnn",
                                                                weights="none", image_size=32))
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  setup = train._resolve(config, strategy)
  state = train._build_state(config, strategy, setup)
  assert run_state.restore(str(run), strategy, state, 1) == 2
  state.best_epoch.assign(best)
  tf.train.CheckpointManager(state.checkpoint, str(run / "backup"), max_to_keep=1).save()


@pytest.mark.slow
def test_a_damaged_model_is_named_everywhere_and_restored_from_the_backup(records, trained,
                                                                         tmp_path):
  run = tmp_path / "m"
  shutil.copytree(trained, run)
  good = (run / "model.keras").read_bytes()
  (run / "model.keras").write_bytes(good[:len(good) // 2])  # truncated
  for cmd, args in (("evaluate", [f"--records_dir={records}"]),
                    ("export", [f"--output_dir={tmp_path / 'exp'}"])):
    proc = run_bin(cmd, f"--model_dir={run}", *args, check=False)
    _one_line_error(proc, "model.keras is damaged: truncated", "rerun the same train command")
    assert "File not found" not in proc.stderr
  # The same train command restores it: backup/ holds epoch 2; make that the best one.
  _set_backup_best_epoch(run, records, 2)
  proc = run_bin("train", f"--records_dir={records}", f"--model_dir={run}", "--epochs=2", *TINY)
  assert "was damaged" in proc.stderr and "restored epoch 2" in proc.stderr, proc.stderr[-2000:]
  proc = run_bin("evaluate", f"--model_dir={run}", f"--records_dir={records}")
  # When the best epoch (1) is not in backup/, train asks for --restore_model, then does it.
  (run / "model.keras").write_bytes(b"")
  _set_backup_best_epoch(run, records, 1)
  proc = run_bin("train", f"--records_dir={records}", f"--model_dir={run}", "--epochs=2", *TINY,
                 check=False)
  _one_line_error(proc, "is damaged: empty (0 bytes)", "--restore_model")
  run_bin("train", f"--records_dir={records}", f"--model_dir={run}", "--epochs=2", *TINY,
          "--restore_model")
  assert json.loads((run / "summary.json").read_text())["best_epoch"] == 2
  run_bin("evaluate", f"--model_dir={run}", f"--records_dir={records}")


# --- item 4: unique image names ------------------------------------------------------------------

def _write(path: pathlib.Path, level: int, ext: str = ".png") -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(level)
  cv2.imwrite(str(path.with_suffix(ext)), rng.integers(0, 255, (40, 40, 3)).astype(np.uint8))


def _names(records) -> list[str]:
  names = []
  for path in sorted(glob.glob(os.path.join(records, "*.tfrecord"))):
    for raw in tf.data.TFRecordDataset(path):
      ex = tf.train.Example.FromString(raw.numpy())
      names.append(ex.features.feature["image_name"].bytes_list.value[0].decode())
  return names


def test_files_of_one_stem_get_distinct_names_and_unique_stems_stay(tmp_path):
  root = tmp_path / "in"
  _write(root / "A" / "gray", 1)
  _write(root / "A" / "gray", 2, ".jpg")
  _write(root / "A" / "sub" / "gray", 3)
  for i in range(4):
    _write(root / "A" / f"ISIC_{i:07d}", 10 + i, ".jpg")
    _write(root / "B" / f"b{i}", 20 + i)
  proc = run_bin("make_records", f"--input_dir={root}", f"--output_dir={tmp_path / 'rec'}",
                 "--image_size=32", "--noprogress", "--split=1,0,0", "--min_train_shards=1")
  names = _names(tmp_path / "rec")
  assert len(names) == len(set(names)) == 11, (names, proc.stdout)
  assert {"A_gray_png", "A_gray_jpg", "A_sub_gray_png", "ISIC_0000000", "b0"} <= set(names)


def test_unique_names_refuses_what_it_cannot_keep_apart():
  with pytest.raises(ValueError, match="would share a name .*a/b/c.png, a_b/c.png"):
    sources.unique_names(["a_b/c.png", "a/b/c.png", "a/b_c.png"])


# --- item 6: a class with no training images -----------------------------------------------------

@pytest.mark.slow
def test_a_class_without_training_images_is_said_at_conversion_and_refused_by_train(tmp_path):
  root = tmp_path / "in"
  for i in range(6):
    _write(root / "train" / "Benign" / f"t{i}", i)
    _write(root / "valid" / "Benign" / f"v{i}", 10 + i)
    _write(root / "valid" / "Melanoma" / f"m{i}", 20 + i)
  (root / "train" / "Melanoma").mkdir()
  proc = run_bin("make_records", f"--input_dir={root}", f"--output_dir={tmp_path / 'rec'}",
                 "--image_size=32", "--noprogress", "--min_train_shards=1")
  assert "WARNING: class 'Melanoma' has no image in the train split" in proc.stdout
  for balance in ("oversample", "class_weights"):
    proc = run_bin("train", f"--records_dir={tmp_path / 'rec'}",
                   f"--model_dir={tmp_path / balance}", "--epochs=1", *TINY,
                   f"--balance={balance}", check=False)
    _one_line_error(proc, "class 'Melanoma' has no image in the train split")
    assert not (tmp_path / balance / "model.keras").exists()


# --- item 10: tracebacks -------------------------------------------------------------------------

def _spoil_one_image(records: pathlib.Path, split: str) -> pathlib.Path:
  """Record 1 of the first `split` shard gets bytes that are no image (its framing stays valid)."""
  path = pathlib.Path(sorted(glob.glob(str(records / f"{split}-*.tfrecord")))[0])
  raws = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
  ex = tf.train.Example.FromString(raws[1])
  ex.features.feature["image"].bytes_list.value[0] = b"\xff\xd8\xff not a jpeg" * 8
  raws[1] = ex.SerializeToString()
  with tf.io.TFRecordWriter(str(path)) as writer:
    for raw in raws:
      writer.write(raw)
  return path


@pytest.mark.slow
def test_a_record_that_does_not_decode_is_named_with_its_shard(records, trained, tmp_path):
  bad = tmp_path / "records"
  shutil.copytree(records, bad)
  shard = _spoil_one_image(bad, "valid")
  proc = run_bin("evaluate", f"--model_dir={trained}", f"--records_dir={bad}", "--split=valid",
                 "--allow_other_records", check=False)
  _one_line_error(proc, f"record 1 (", f"of {shard} does not decode as an image",
                  "bin/verify_records")
  proc = run_bin("train", f"--records_dir={bad}", f"--model_dir={tmp_path / 'm'}", "--epochs=1",
                 *TINY, check=False)
  _one_line_error(proc, f"of {shard} does not decode as an image", "bin/verify_records")


def test_tensorflow_function_node_text_is_stripped():
  text = ("{{function_node __wrapped__IteratorGetNext_output_types_1_device_/job:localhost/"
          "replica:0/task:0/device:CPU:0}} corrupted record at 12 [Op:IteratorGetNext]")
  assert pipeline.clean_message(text) == "corrupted record at 12"


@pytest.mark.parametrize("flag, needle", [
    ("--seed=-5", "--seed=-5 must be an integer in [0, 2**32)"),
    ("--freeze=from:NOPE", "'simple_cnn' has no layer 'NOPE'"),
    ("--image_size=100000", "--image_size=100000: expected 0"),
])
@pytest.mark.slow
def test_bad_flags_are_one_line(records, tmp_path, flag, needle):
  proc = run_bin("train", f"--records_dir={records}", f"--model_dir={tmp_path / 'm'}",
                 "--epochs=1", *TINY, flag, check=False)
  _one_line_error(proc, needle)


@pytest.mark.slow
def test_a_folder_of_garbage_tfrec_files_is_one_line(tmp_path):
  (tmp_path / "k").mkdir()
  for i in range(2):
    (tmp_path / "k" / f"train{i:02d}-10.tfrec").write_bytes(os.urandom(3000))
  proc = run_bin("train", f"--records_dir={tmp_path / 'k'}", f"--model_dir={tmp_path / 'm'}",
                 *TINY, check=False)
  _one_line_error(proc, "not a TFRecord file")


def test_a_full_disk_or_memory_in_train_is_one_line():
  config = train.TrainConfig(records_dir="r", model_dir="/runs/m")
  disk = tf.errors.ResourceExhaustedError(None, None, "{{function_node x}} /runs/m/backup/ckpt; "
                                          "No space left on device [Op:SaveV2]")
  assert train.resource_error(disk, config).startswith(
      "the disk of --model_dir=/runs/m is full (/runs/m/backup/ckpt; No space left on device)")
  oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
  assert "lower --batch_size" in train.resource_error(oom, config)
  assert train.resource_error(ValueError("x"), config) is None


# --- item 11: clearer messages -------------------------------------------------------------------

def test_a_second_make_records_on_one_folder_names_the_first_ones_pid(tmp_path):
  root = tmp_path / "in"
  for i in range(3):
    _write(root / "A" / f"a{i}", i)
    _write(root / "B" / f"b{i}", 10 + i)
  out = tmp_path / "rec"
  out.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (out / convert.LOCK).write_text(f"{holder.pid}\n")
    with pytest.raises(ValueError, match=f"another make_records is writing here \\(pid "
                                         f"{holder.pid}"):
      convert_folder(root, out, 32, split=(1, 0, 0), min_train_shards=1)
  finally:
    holder.kill()
    holder.wait()
  convert_folder(root, out, 32, split=(1, 0, 0), min_train_shards=1)  # a dead pid's lock is stale
  assert not (out / convert.LOCK).exists() and (out / "manifest.json").exists()


def test_a_records_folder_inside_the_input_is_left_out(tmp_path):
  root = tmp_path / "in"
  for i in range(3):
    _write(root / "A" / f"a{i}", i)
    _write(root / "B" / f"b{i}", 10 + i)
  convert_folder(root, tmp_path / "rec", 32, split=(1, 0, 0), min_train_shards=1)
  shutil.copytree(tmp_path / "rec", root / "A" / "old_records")
  shutil.copytree(tmp_path / "rec", root / "old_records")
  listing = sources.list_sources(str(root))
  assert listing.rejected == [] and listing.classes == ["A", "B"] and len(listing.items) == 6
  assert any("left out A/old_records, old_records" in w for w in listing.warnings)


def test_a_class_of_links_out_of_the_input_says_why(tmp_path):
  root, outside = tmp_path / "in", tmp_path / "elsewhere"
  for i in range(3):
    _write(root / "A" / f"a{i}", i)
    _write(outside / f"b{i}", 10 + i)
    (root / "B").mkdir(exist_ok=True)
    (root / "B" / f"b{i}.png").symlink_to(outside / f"b{i}.png")
  with pytest.raises(ValueError, match="class 'B' has no usable images .*all 3 of its files were "
                                       "rejected: 3 x path escapes.*symbolic links must point"):
    sources.list_sources(str(root))


def test_a_resumed_make_records_prints_splits_and_classes_in_the_fresh_order(tmp_path):
  root = tmp_path / "in"
  for i in range(10):
    _write(root / "Zeta" / f"z{i}", i)
    _write(root / "Alpha" / f"a{i}", 10 + i)
  args = (f"--input_dir={root}", f"--output_dir={tmp_path / 'rec'}", "--image_size=32",
          "--noprogress", "--classes=Zeta,Alpha", "--min_train_shards=1")
  fresh, again = run_bin("make_records", *args), run_bin("make_records", *args)
  table = lambda out: [l for l in out.splitlines() if l.startswith("  ") and "shards" in l]
  assert table(fresh.stdout) == table(again.stdout) and len(table(fresh.stdout)) == 3
  assert table(fresh.stdout)[0].lstrip().startswith("train") and "Zeta=" in table(fresh.stdout)[0]
  assert table(fresh.stdout)[0].index("Zeta=") < table(fresh.stdout)[0].index("Alpha=")


def test_show_preprocessing_and_make_synthetic_speak_in_flags(tmp_path):
  big = tmp_path / "big"
  big.mkdir()
  cv2.imwrite(str(big / "huge.png"), np.zeros((14000, 14000), np.uint8))
  proc = run_bin("show_preprocessing", f"--input_dir={big}", f"--output={tmp_path / 's.png'}",
                 check=False)
  _one_line_error(proc, f"{big / 'huge.png'}: too many pixels")
  proc = run_bin("show_preprocessing", f"--input_dir={big}", "--image_size=0", check=False)
  _one_line_error(proc, "--image_size=0: expected an integer")
  assert "PreprocessConfig" not in proc.stderr
  proc = run_bin("make_synthetic", f"--output_dir={tmp_path / 'x'}", "--flat", check=False)
  _one_line_error(proc, "--flat needs --csv")


@pytest.mark.slow
def test_predict_on_an_empty_folder_says_it_found_no_images(trained, tmp_path):
  (tmp_path / "empty").mkdir()
  proc = run_bin("predict", f"--model_dir={trained}", f"--input_dir={tmp_path / 'empty'}",
                 check=False)
  _one_line_error(proc, "found no images there")


# --- peak memory ---------------------------------------------------------------------------------

def test_make_records_does_not_import_tensorflow(tmp_path):
  """TensorFlow's import, for its version string, was make_records' 740 MB peak (issue 27)."""
  root = tmp_path / "in"
  for i in range(3):
    _write(root / "A" / f"a{i}", i)
    _write(root / "B" / f"b{i}", 10 + i)
  code = ("import sys; from skinrecords.data import convert, preprocess; "
          "convert.convert(convert.ConvertConfig("
          f"input_dir={str(root)!r}, output_dir={str(tmp_path / 'rec')!r}, progress=False, "
          "workers=1, split=(1, 0, 0), min_train_shards=1, "
          "preprocess=preprocess.PreprocessConfig(image_size=32))); "
          "print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, env=bin_env(), check=True).stdout
  assert out.strip().splitlines()[-1] == "False", out


def test_a_diverged_epoch_stops_the_run_in_one_line():
  config = train.TrainConfig(records_dir="r", model_dir="m", learning_rate=0.9)
  train._check_finite({"loss": 0.7}, 0, config)
  for loss in (float("nan"), float("inf")):
    with pytest.raises(train.TrainError, match="training diverged in epoch 3 .*at learning_rate="
                                               "0.9: lower --learning_rate"):
      train._check_finite({"loss": loss}, 2, config)
