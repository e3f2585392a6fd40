"""rundir.RunConfig: config.json round-trips, and files from before its version field still load
and resume (issue 22)."""

import json

import pytest

from skinrecords.core import rundir

# config.json as the release before RunConfig wrote it (train._run_config's dict): no "version",
# the recipe fields flat in "train".
_OLD = json.loads("""{
  "classes": ["NotMelanoma", "Melanoma"], "image_size": 32, "records_dir": "/data/records",
  "records_fingerprint": "abc123", "fold": null,
  "preprocessing": {"image_size": 32, "crop": "center", "remove_hair": false},
  "model": {"backbone": "simple_cnn", "image_size": 32, "weights": "none", "dropout": 0.3,
            "freeze": "none", "num_classes": 2},
  "train": {"records_dir": "/data/records", "model_dir": "/runs/m",
            "model": {"backbone": "simple_cnn", "image_size": 32, "weights": "none",
                      "dropout": 0.3, "freeze": "none", "num_classes": 2},
            "augment": {"horizontal_flip": true, "rotation_range": 60.0},
            "batch_size": 8, "learning_rate": 0.001, "epochs": 3, "seed": 0,
            "optimizer": "adam", "weight_decay": 0.0, "lr_schedule": "constant",
            "warmup_steps": 0, "lr_floor": 0.0, "loss": "bce", "label_smoothing": 0.0,
            "focal_gamma": 2.0, "sync_batchnorm": false, "early_stopping_patience": 0},
  "seed": 0, "deterministic": "auto", "replicas": 1, "workers": 1,
  "mixed_precision": "float32", "xla": "augment"
}""")


def test_run_config_round_trips_and_keeps_every_key():
  run = rundir.RunConfig.from_dict(_OLD)
  assert run.classes == ["NotMelanoma", "Melanoma"] and run.image_size == 32
  assert run.records_fingerprint == "abc123" and run.mixed_precision == "float32"
  again = run.to_dict()
  assert again.pop("version") == rundir.RUN_CONFIG_VERSION
  assert again == _OLD  # the same keys and values as before: only "version" is new
  assert rundir.RunConfig.from_dict(run.to_dict()) == run
  # A key this version does not know survives a read and a write.
  assert rundir.RunConfig.from_dict(dict(_OLD, note="mine")).to_dict()["note"] == "mine"


def test_unset_fields_are_not_written_but_fold_is():
  d = rundir.RunConfig(classes=["a", "b"], image_size=32).to_dict()
  assert d["fold"] is None and "mixed_precision" not in d and "seed" not in d


def test_an_old_config_json_loads_and_resumes(tmp_path):
  (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps(_OLD))
  run = rundir.read_run_config(tmp_path)
  run.validate()
  assert run.version == rundir.RUN_CONFIG_VERSION and run.train["loss"] == "bce"
  # The same run, described as the current code describes it, resumes; another loss does not.
  rundir.check_resumable(tmp_path, rundir.RunConfig.from_dict(_OLD))
  with pytest.raises(rundir.RunDirError, match="--loss=bce \\(now focal\\)"):
    rundir.check_resumable(tmp_path, dict(_OLD, train=dict(_OLD["train"], loss="focal")))


def test_a_newer_or_broken_config_json_is_one_line(tmp_path):
  with pytest.raises(ValueError, match="version 99, this skinrecords reads up to .*upgrade"):
    rundir.RunConfig.from_dict(dict(_OLD, version=99))
  (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps(dict(_OLD, version=99)))
  with pytest.raises(rundir.RunDirError, match="upgrade skinrecords; use another --model_dir"):
    rundir.check_resumable(tmp_path, _OLD)
  with pytest.raises(ValueError, match="'classes' must list at least 2"):
    rundir.RunConfig.from_dict({"image_size": 32}).validate()


def test_op_determinism_may_change_on_resume_but_a_recipe_setting_may_not(tmp_path):
  # Runs from before issue 21 stored deterministic=False; `auto` now resolves to True on a CPU.
  old = json.loads(json.dumps(_OLD))
  old["train"]["deterministic"] = False
  rundir.write_config(tmp_path, rundir.RunConfig.from_dict(old))
  now = json.loads(json.dumps(old))
  now["train"]["deterministic"] = True
  rundir.check_resumable(tmp_path, now)  # no error
  now["train"]["learning_rate"] = 0.05
  with pytest.raises(rundir.RunDirError, match=r"--learning_rate=0\.001 \(now 0\.05\)"):
    rundir.check_resumable(tmp_path, now)
