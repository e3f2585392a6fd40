"""Multi-worker training and the tf.data service with real processes on loopback (127.0.0.1).

Every worker is a separate `bin/train` process with one CPU device, talking over gRPC on free ports;
every wait is bounded and leftover processes are killed in `finally`. These are the slowest tests of
the suite (the file took 216 s on 2 busy cores: 63 s two workers, 97 s kill and resume, which starts
two clusters, 44 s the tf.data service), so each run checks several things. Which example the
tf.data service sends to which trainer is counted, by image name, in test_data_service.py.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import BIN, bin_env, run_bin, synthetic_records
from skinrecords.input import data_service
from skinrecords.input import pipeline
from skinrecords.model import models
from skinrecords.training import distribute
from skinrecords.training import train

# Real worker processes on loopback: the slowest file of the suite (216 s on 2 busy cores).
pytestmark = pytest.mark.slow

# Augmentation stays on (the default): multi-worker training must run the per-replica XLA warp.
TRAIN_FLAGS = ("--backbone=simple_cnn", "--weights=none", "--batch_size=16",
               "--strategy=multi_worker", "--learning_rate=2e-3")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  """120 synthetic lesions as 32 px records, in shards of ~5 images (shard_size_mb=0.0013 at ~246
  bytes an image): 72 train images in 14 shards, 24 valid in 5 (5, 5, 5, 5, 4), 24 test in 5.
  With 2 workers the validation shares are 14 and 10 images, so valid_input pads both."""
  return synthetic_records(tmp_path_factory.mktemp("mw"), 120, (64, 48), (80, 60), 32,
                           min_train_shards=4, shard_size_mb=0.0013)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra) -> dict:
  env = bin_env(**{"TF_CPP_MIN_LOG_LEVEL": "2", **extra})
  env.pop("TF_CONFIG", None)
  return env


class _Cluster:
  """Two `bin/train --strategy=multi_worker` processes; logs in files (no pipe can fill up)."""

  def __init__(self, tmp_path, name: str):
    self.tmp_path, self.name, self.procs, self.logs = tmp_path, name, [], []

  def start(self, flags, tf_config_for_chief: bool = False):
    hosts = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    for i in range(2):
      tmpdir = self.tmp_path / f"tmp{i}"  # each worker's TMPDIR: where non-chief copies go
      tmpdir.mkdir(exist_ok=True)
      env = _env(TMPDIR=str(tmpdir))
      if i == 0 and tf_config_for_chief:  # one worker from TF_CONFIG, the other from flags
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": hosts},
                                       "task": {"type": "worker", "index": 0}})
        cluster = []
      else:
        cluster = [f"--worker_hosts={','.join(hosts)}", f"--task_index={i}"]
      log = self.tmp_path / f"{self.name}{i}.log"
      with open(log, "w") as f:
        self.procs.append(subprocess.Popen(
            [sys.executable, str(BIN / "train"), *flags, *TRAIN_FLAGS, *cluster], env=env,
            stdout=f, stderr=subprocess.STDOUT))
      self.logs.append(log)

  def wait(self, proc_index: int, timeout: float) -> int:
    try:
      return self.procs[proc_index].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"worker {proc_index} still running after {timeout:.0f} s:\n"
                           f"{self.text(proc_index)[-3000:]}") from None

  def text(self, i: int) -> str:
    return self.logs[i].read_text()

  def kill(self):
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _history(model_dir):
  with open(model_dir / "history.csv") as f:
    return list(csv.DictReader(f))


def _digest(log: str) -> str:
  found = re.findall(r"final weights sha256 ([0-9a-f]{64})", log)
  assert len(found) == 1, log[-3000:]
  return found[0]


def _leftovers(tmp_path, i):
  return sorted(p.name for p in (tmp_path / f"tmp{i}").glob("skinrecords_*"))


def _valid_shares(info, workers: int = 2) -> list[int]:
  """Validation images per worker when the pipeline shards the files round-robin."""
  shards = info.select("valid")
  assert len(shards) >= workers  # sharding by file, as the fixture intends
  return [sum(s.num_examples for s in shards[i::workers]) for i in range(workers)]


def _evaluate_alone(model_dir, info) -> dict:
  """Loss, accuracy and AUC of model_dir's model.keras on the validation split, in this process,
  one device, no padding: what the workers' exactly-once validation must have computed."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  from skinrecords.model import inference  # pylint: disable=g-import-not-at-top

  model, _ = models.load_model_dir(model_dir)
  ds = pipeline.make_dataset(info, "valid", 8, training=False, with_names=True)
  probs, labels, names = inference.predict_dataset(model, ds, info=info, split="valid")
  p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
  loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  return {"names": names, "val_loss": loss, "val_accuracy": np.mean((p > 0.5) == labels),
          "val_auc": skm.roc_auc_score(labels, p)}


def test_two_workers_train_in_step_on_disjoint_shards(records, tmp_path):
  model_dir = tmp_path / "model"
  info = pipeline.load_info(records)
  shares = _valid_shares(info)
  assert shares[0] != shares[1], shares  # uneven shares: the padding path must run
  cluster = _Cluster(tmp_path, "w")
  try:
    cluster.start([f"--records_dir={records}", f"--model_dir={model_dir}", "--epochs=3",
                   "--steps_per_epoch=15", "--noprogress"], tf_config_for_chief=True)
    for i in range(2):
      assert cluster.wait(i, 240) == 0, cluster.text(i)[-3000:]
  finally:
    cluster.kill()
  logs = [cluster.text(0), cluster.text(1)]
  # Only the chief writes, and the non-chief's temporary copies are gone.
  assert {p.name for p in model_dir.iterdir()} == {
      "model.keras", "config.json", "history.csv", "summary.json", "accuracy.png", "loss.png",
      "auc.png", "logs", "backup", "threshold.json"}
  assert _leftovers(tmp_path, 1) == [] and _leftovers(tmp_path, 0) == []
  saved = json.loads((model_dir / "config.json").read_text())
  assert saved["workers"] == 2 and saved["replicas"] == 2
  # Augmentation on, XLA-compiled per replica (xla=auto on a CPU: "augment").
  assert saved["train"]["augment"]["rotation_range"] > 0 and saved["xla"] == "augment", saved
  # Each worker read its own training shards, and together all of them.
  train_files = {os.path.basename(s.path) for s in info.select("train")}
  read = []
  for i, log in enumerate(logs):
    m = re.search(rf"input pipeline {i}/2 reads \d+ of {len(train_files)} 'train' files: (.*)",
                  log)
    assert m, log[-3000:]
    read.append(set(m[1].strip().split(", ")))
  assert not read[0] & read[1] and read[0] | read[1] == train_files, read
  # The all-reduce keeps the replicas identical, and the model learns.
  assert _digest(logs[0]) == _digest(logs[1])
  rows = _history(model_dir)
  assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
  # Learning shows first in the ranking: 45 steps of simple_cnn sit on the loss plateau near ln 2
  # (the README job leaves it after ~60 steps), and with deterministic runs by default a plateau
  # that happened to end 7e-6 above its start failed a loss comparison every time.
  assert float(rows[-1]["auc"]) > float(rows[0]["auc"]) + 0.05, rows
  # Validation: each worker scored its uneven share padded to full batches, yet the chief's
  # figures for the saved epoch are those of one process scoring every example exactly once.
  best = json.loads((model_dir / "summary.json").read_text())["best_epoch"]
  row = next(r for r in rows if int(r["epoch"]) == best)
  alone = _evaluate_alone(model_dir, info)
  assert len(alone["names"]) == len(set(alone["names"])) == info.num_examples("valid")
  for key in ("val_loss", "val_accuracy", "val_auc"):
    assert float(row[key]) == pytest.approx(alone[key], abs=2e-4), (key, row, alone)


def test_killed_worker_then_restarted_job_resumes(records, tmp_path):
  model_dir = tmp_path / "model"
  steps = 12
  flags = [f"--records_dir={records}", f"--model_dir={model_dir}", "--epochs=3",
           f"--steps_per_epoch={steps}", "--progress",
           "--noaugment"]  # no XLA warp to compile, twice: augmentation runs in the test above
  # tqdm's bar for epoch 2 with 1..steps-1 steps done: the kill lands mid-epoch.
  mid_epoch_2 = re.compile(rf"epoch 2/3: +\d+%\|[^|]*\| ([1-9]|1[01])/{steps} ")
  first = _Cluster(tmp_path, "first")
  try:
    first.start(flags)
    deadline = time.time() + 240
    while time.time() < deadline and not mid_epoch_2.search(first.text(0)):
      assert first.procs[0].poll() is None, first.text(0)[-3000:]
      time.sleep(0.02)
    first.procs[1].send_signal(signal.SIGKILL)
    first.procs[1].wait(timeout=30)
    # The survivor's next all-reduce fails: it exits on its own instead of hanging.
    assert first.wait(0, 90) != 0
  finally:
    first.kill()
  assert mid_epoch_2.search(first.text(0)), first.text(0)[-3000:]
  assert [int(r["epoch"]) for r in _history(model_dir)] == [1], "killed in epoch 2"
  assert _leftovers(tmp_path, 1), "the killed worker leaves its temporary copy behind"

  second = _Cluster(tmp_path, "second")
  try:
    second.start(flags)
    for i in range(2):
      assert second.wait(i, 240) == 0, second.text(i)[-3000:]
  finally:
    second.kill()
  logs = [second.text(0), second.text(1)]
  for log in logs:
    # Epoch 1's weights and optimizer state come back from the chief's backup; the half-done
    # epoch 2 is run again from its start, and epoch 1 is not.
    assert re.search(rf"resuming from .*backup.*ckpt-\d+ at epoch 1 \(optimizer step {steps},",
                     log), log[-3000:]
    assert "epoch 1/3" not in log and "epoch 3/3: 100%" in log, log[-3000:]
  assert [int(r["epoch"]) for r in _history(model_dir)] == [1, 2, 3]
  assert (model_dir / "model.keras").exists()
  assert _digest(logs[0]) == _digest(logs[1])
  assert _leftovers(tmp_path, 1) == []  # the restarted worker removed its predecessor's copy


def _wait_for(path, text: str, proc, timeout: float = 60) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if text in path.read_text():
      return
    assert proc.poll() is None, path.read_text()[-3000:]
    time.sleep(0.1)
  raise AssertionError(f"{text!r} not in {path} after {timeout} s:\n{path.read_text()[-3000:]}")


def test_tf_data_service_feeds_two_multi_worker_trainers(records, tmp_path):
  port = _free_port()
  procs, logs = [], []
  # INFO logs on: a worker that opens a TFRecord file logs it (the proof that it did the reading).
  env = _env(TF_CPP_MIN_LOG_LEVEL="0")
  roles = [["--role=dispatcher", f"--port={port}"],
           ["--role=worker", f"--dispatcher_address=127.0.0.1:{port}",
            "--worker_address=127.0.0.1:%port%"]]
  model_dir = tmp_path / "model"
  cluster = _Cluster(tmp_path, "trainer")
  try:
    for i, role in enumerate(roles):
      logs.append(tmp_path / f"service{i}.log")
      with open(logs[-1], "w") as f:
        procs.append(subprocess.Popen([sys.executable, str(BIN / "data_service"), *role],
                                      env=env, stdout=f, stderr=subprocess.STDOUT))
    for proc, log in zip(procs, logs):
      _wait_for(log, "listening on port", proc)
    cluster.start([f"--records_dir={records}", f"--model_dir={model_dir}", "--epochs=2",
                   "--steps_per_epoch=3", "--noprogress", "--noaugment",
                   f"--data_service=grpc://127.0.0.1:{port}"])
    for i in range(2):
      assert cluster.wait(i, 240) == 0, cluster.text(i)[-3000:]
  finally:
    cluster.kill()
    for proc in procs:
      proc.kill()
      proc.wait(timeout=30)
  trainer_logs = [cluster.text(0), cluster.text(1)]
  for log in trainer_logs:
    # Both trainers took their training batches from the service's one job (which example went
    # where is counted in test_data_service.py) and read no training file themselves.
    assert "training input from the tf.data service at grpc://127.0.0.1" in log, log[-3000:]
    assert "'train' files" not in log, log[-3000:]
  assert "TFRecordDataset" in logs[1].read_text(), logs[1].read_text()[-2000:]
  assert _digest(trainer_logs[0]) == _digest(trainer_logs[1])
  assert [int(r["epoch"]) for r in _history(model_dir)] == [1, 2]


def test_slurm_job_step_becomes_tf_config(monkeypatch):
  # Two nodes with two tasks each; this process is the fourth task (rank 3).
  monkeypatch.setenv("SLURM_PROCID", "3")
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-08]")
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x2)")
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
  monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
  config = json.loads(distribute.tf_config_from_slurm(port_base=9000))
  assert config == {"cluster": {"worker": ["gpu07:9000", "gpu07:9001", "gpu08:9000",
                                           "gpu08:9001"]},
                    "task": {"type": "worker", "index": 3}}
  assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"  # the node's second half of its GPUs
  # SLURM showing this job GPUs 4-7 of the node: the second task on the node gets 6 and 7.
  monkeypatch.delenv("SLURM_GPUS_ON_NODE")
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
  distribute.tf_config_from_slurm()
  assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"
  # A CPU-only node: no GPUs to share out, every task still gets its address.
  monkeypatch.setenv("SLURM_GPUS_ON_NODE", "0")
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
  monkeypatch.setenv("SLURM_PROCID", "1")
  config = json.loads(distribute.tf_config_from_slurm())
  assert config["cluster"]["worker"][:2] == ["gpu07:8888", "gpu07:8889"]
  assert config["task"] == {"type": "worker", "index": 1}
  assert "CUDA_VISIBLE_DEVICES" not in os.environ
  monkeypatch.delenv("SLURM_STEP_NODELIST")
  with pytest.raises(ValueError, match="SLURM_STEP_NODELIST"):
    distribute.tf_config_from_slurm()


def test_cluster_flags_are_checked(records, tmp_path):
  assert json.loads(distribute.tf_config_from_hosts(["a:1", "b:2"], 1)) == {
      "cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
  for hosts, index, message in ((["a:1", "b:2"], 2, "task_index=2"), (["a"], 0, "'a'"),
                                (["a:1", "a:1"], 0, "twice")):
    with pytest.raises(ValueError, match=message):
      distribute.tf_config_from_hosts(hosts, index)
  with pytest.raises(ValueError, match="dispatcher_address"):
    data_service.DataServiceConfig(role="worker", dispatcher_address="nohost").validate()
  base = [f"--records_dir={records}", f"--model_dir={tmp_path / 'm'}", "--weights=none"]
  proc = run_bin("train", *base, "--worker_hosts=127.0.0.1:1,127.0.0.1:2", "--task_index=0",
                 check=False)
  assert proc.returncode != 0 and "--strategy=multi_worker" in proc.stderr
  assert not (tmp_path / "m").exists()
  with pytest.raises(ValueError, match="data_service='localhost'"):
    train.TrainConfig(records_dir="r", model_dir="m", data_service="localhost").validate()
