"""The tf.data service with real processes on loopback (127.0.0.1): who receives which example.

A dispatcher and workers run as `bin/data_service` processes; each trainer is a separate process
that reads the training split through `data_service.service_input_fn`, the input function `bin/train
--data_service` hands to `distribute_datasets_from_function`, with a one-pass (evaluation-order)
pipeline and image names attached, so every example a trainer receives can be counted. Ports come
from the kernel on 127.0.0.1; every wait is bounded and every process is killed in `finally`.
"""

from __future__ import annotations

import collections
import json
import socket
import subprocess
import sys
import time

import pytest

from conftest import BIN, bin_env, run_bin, synthetic_records
from skinrecords.input import pipeline

# tf.data service dispatchers, workers and trainers in separate processes.
pytestmark = pytest.mark.slow

# One trainer: reads the train split through the service as pipeline `index` of 2, writes the
# image names it received, in order. With a `pause` file it stops after its first batch until
# that file is removed (the test restarts the dispatcher meanwhile).
TRAINER = r"""
import json, os, pathlib, sys, time
import tensorflow as tf
from skinrecords.input import data_service, pipeline

records, address, job_key, index, out, pause = sys.argv[1:7]
ready = pathlib.Path(out).parent / f"ready{index}"
fn = data_service.service_input_fn(pipeline.load_info(records), 4, address, job_key,
                                   training=False, with_names=True)
ds = fn(tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=int(index),
                                   num_replicas_in_sync=2))
ready.write_text("")
while len(list(ready.parent.glob("ready*"))) < 2:  # both trainers join before either reads
  time.sleep(0.05)
names = []
for images, labels, batch_names in ds:
  names += [n.decode() for n in batch_names.numpy()]
  if pause != "-":
    pathlib.Path(pause).write_text(str(len(names)))
    while os.path.exists(pause):
      time.sleep(0.05)
    pause = "-"
  time.sleep(0.1)  # a training step: lets the other trainer take its turn
pathlib.Path(out).write_text(json.dumps(names))
"""


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  """60 synthetic lesions as 32 px records; the 36 training images in 6 shards of 6."""
  return synthetic_records(tmp_path_factory.mktemp("ds"), 60, (48, 40), (64, 48), 32,
                           min_train_shards=6)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Processes:
  """Background processes with their output in files (no pipe can fill up); `kill_all` in
  `finally` ends every one still running."""

  def __init__(self, tmp_path):
    self.tmp_path, self.procs, self.logs = tmp_path, {}, {}

  def start(self, name: str, args) -> subprocess.Popen:
    self.logs[name] = self.tmp_path / f"{name}.log"
    with open(self.logs[name], "w") as f:
      self.procs[name] = subprocess.Popen([sys.executable, *map(str, args)], env=bin_env(),
                                          stdout=f, stderr=subprocess.STDOUT)
    return self.procs[name]

  def text(self, name: str) -> str:
    return self.logs[name].read_text()

  def wait_for(self, name: str, text: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
      if text in self.text(name):
        return
      assert self.procs[name].poll() is None, f"{name} exited:\n{self.text(name)[-3000:]}"
      time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {name}'s output after {timeout} s:\n"
                         f"{self.text(name)[-3000:]}")

  def wait(self, name: str, timeout: float) -> int:
    try:
      return self.procs[name].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      raise AssertionError(f"{name} still running after {timeout:.0f} s:\n"
                           f"{self.text(name)[-3000:]}") from None

  def kill(self, name: str) -> None:
    proc = self.procs[name]
    if proc.poll() is None:
      proc.kill()
    proc.wait(timeout=30)

  def kill_all(self) -> None:
    for name in self.procs:
      self.kill(name)


def _dispatcher(procs, name, port, work_dir=None):
  args = [BIN / "data_service", "--role=dispatcher", f"--port={port}"]
  procs.start(name, args + ([f"--work_dir={work_dir}"] if work_dir else []))
  procs.wait_for(name, "listening on port")


def _worker(procs, name, port):
  procs.start(name, [BIN / "data_service", "--role=worker",
                     f"--dispatcher_address=127.0.0.1:{port}", "--worker_address=127.0.0.1:%port%"])
  procs.wait_for(name, "listening on port")


def _trainer(procs, tmp_path, records, port, index, pause="-"):
  script = tmp_path / "trainer.py"
  script.write_text(TRAINER)
  return procs.start(f"trainer{index}", [script, records, f"grpc://127.0.0.1:{port}",
                                         "run-1", index, tmp_path / f"names{index}.json", pause])


def _names(tmp_path, index) -> list[str]:
  return json.loads((tmp_path / f"names{index}.json").read_text())


def _train_names(records) -> list[str]:
  info = pipeline.load_info(records)
  ds = pipeline.make_dataset(info, "train", 64, training=False, with_names=True)
  names = [n.decode() for _, _, batch in ds for n in batch.numpy()]
  assert len(names) == len(set(names)) == info.num_examples("train")
  return names


def test_two_trainers_share_one_job_each_example_reaches_one(records, tmp_path):
  train_names = set(_train_names(records))
  procs = _Processes(tmp_path)
  port = _free_port()
  try:
    _dispatcher(procs, "dispatcher", port)
    for w in range(2):
      _worker(procs, f"worker{w}", port)
    for i in range(2):
      _trainer(procs, tmp_path, records, port, i)
    for i in range(2):
      assert procs.wait(f"trainer{i}", 120) == 0, procs.text(f"trainer{i}")[-3000:]
  finally:
    procs.kill_all()
  got = [_names(tmp_path, i) for i in range(2)]
  # Both trainers took part, neither saw an example the other saw, and together they saw the
  # training split once: the dispatcher handed each file to one worker, each batch to one trainer.
  assert all(got), [len(g) for g in got]
  assert not set(got[0]) & set(got[1]), sorted(set(got[0]) & set(got[1]))
  counts = collections.Counter(got[0] + got[1])
  assert set(counts) == train_names and set(counts.values()) == {1}, counts.most_common(3)


def test_restarted_dispatcher_recovers_its_job_from_work_dir(records, tmp_path):
  train_names = set(_train_names(records))
  procs = _Processes(tmp_path)
  port, work_dir, pause = _free_port(), tmp_path / "journal", tmp_path / "pause"
  try:
    _dispatcher(procs, "dispatcher", port, work_dir)
    _worker(procs, "worker0", port)
    (tmp_path / "ready1").write_text("")  # one trainer: the other's place in the barrier
    _trainer(procs, tmp_path, records, port, 0, pause=pause)
    deadline = time.time() + 120
    while not pause.exists() and time.time() < deadline:
      assert procs.procs["trainer0"].poll() is None, procs.text("trainer0")[-3000:]
      time.sleep(0.05)
    assert pause.exists(), procs.text("trainer0")[-3000:]
    # Mid-job (trainer 0 holds one batch and waits): the dispatcher dies and comes back on the
    # same port with the same journal.
    procs.kill("dispatcher")
    _dispatcher(procs, "dispatcher_again", port, work_dir)
    pause.unlink()
    assert procs.wait("trainer0", 120) == 0, procs.text("trainer0")[-3000:]
  finally:
    procs.kill_all()
  counts = collections.Counter(_names(tmp_path, 0))
  # The job went on where it was: each example once, none twice (at-most-once allows fewer only
  # when a worker dies, and none did).
  assert set(counts) == train_names and set(counts.values()) == {1}, counts.most_common(3)
  assert any(work_dir.iterdir()), "the dispatcher journals into --work_dir"


def test_server_that_cannot_start_says_why_in_one_line(tmp_path):
  """A port in use and a --work_dir that is a file: exit 2 and a line naming the fix (TensorFlow
  raised a bare RuntimeError with a traceback for both)."""
  not_a_folder = tmp_path / "journal"
  not_a_folder.write_text("")
  with socket.socket() as busy:
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    for flag, message in ((f"--port={busy.getsockname()[1]}", "choose another port"),
                          (f"--work_dir={not_a_folder}", "is a file, not a folder")):
      proc = run_bin("data_service", "--role=dispatcher", flag, check=False, timeout=60)
      assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
      assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
