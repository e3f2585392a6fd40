"""Servers and waits on loopback: a port in use, absent peers, a dead dispatcher (issue 27 items 5,
8, 9; issue 28's open-port line).

Every process is a real command (`bin/data_service`, `bin/train`) on 127.0.0.1; every wait is
bounded by a short timeout flag or a signal, and every process still running is killed in
`finally`.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import BIN, bin_env
from skinrecords.core import waiting
from skinrecords.training import distribute

TRAIN = ("--backbone=simple_cnn", "--weights=none", "--batch_size=8", "--epochs=1",
         "--noprogress")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Procs:
  """Background commands with their output in files; `kill_all` ends those still running."""

  def __init__(self, tmp_path):
    self.tmp_path, self.procs, self.logs = tmp_path, {}, {}

  def start(self, name, command, *args, **env):
    self.logs[name] = self.tmp_path / f"{name}.log"
    environment = bin_env(**env)
    environment.pop("TF_CONFIG", None)
    with open(self.logs[name], "w") as f:
      self.procs[name] = subprocess.Popen([sys.executable, str(BIN / command), *map(str, args)],
                                          env=environment, stdout=f, stderr=subprocess.STDOUT)

  def text(self, name) -> str:
    return self.logs[name].read_text()

  def wait_for(self, name, text, timeout=180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if text in self.text(name):
        return
      assert self.procs[name].poll() is None, f"{name} exited:\n{self.text(name)[-3000:]}"
      time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {name}'s output after {timeout} s:\n"
                         f"{self.text(name)[-3000:]}")

  def wait(self, name, timeout) -> int:
    try:
      return self.procs[name].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      raise AssertionError(f"{name} still running after {timeout} s:\n"
                           f"{self.text(name)[-3000:]}") from None

  def kill_all(self) -> None:
    for proc in self.procs.values():
      if proc.poll() is None:
        proc.kill()
      proc.wait(timeout=30)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  from conftest import synthetic_records  # pylint: disable=g-import-not-at-top

  return synthetic_records(tmp_path_factory.mktemp("ports"), 24, (40, 40), (48, 48), 32,
                           min_train_shards=2)


def test_port_checks_and_peer_parsing():
  with socket.socket() as busy:
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    with pytest.raises(ValueError, match="port .* in use"):
      waiting.check_port_free(busy.getsockname()[1], "tf.data service dispatcher")
  waiting.check_port_free(_free_port(), "dispatcher")
  waiting.check_port_free(0, "dispatcher")
  # Not bind()'s OverflowError:
  with pytest.raises(ValueError, match=r"port=70000 must be within 0\.\.65535"):
    waiting.check_port_free(70000, "dispatcher")
  with pytest.raises(ValueError, match="1..65535"):
    distribute.tf_config_from_hosts(["localhost:99999", "localhost:1234"], 0)
  me, peers = distribute.cluster_peers(distribute.tf_config_from_hosts(
      ["127.0.0.1:1001", "127.0.0.1:1002", "h3:1003"], 1))
  assert me == waiting.Peer("worker 1", "127.0.0.1", 1002)
  assert [str(p) for p in peers] == ["worker 0 at 127.0.0.1:1001", "worker 2 at h3:1003"]
  lines = []
  with pytest.raises(waiting.WaitTimeout, match="gave up after 1 s: worker 0 at 127.0.0.1"):
    waiting.wait_until_reachable([waiting.Peer("worker 0", "127.0.0.1", _free_port())], 1.0, 0.5,
                                 "--cluster_timeout", echo=lines.append)
  assert lines and lines[0].startswith("waiting for worker 0 at 127.0.0.1:"), lines


@pytest.mark.slow
def test_second_dispatcher_on_a_port_fails_and_dead_dispatchers_are_given_up(records, tmp_path):
  """Two dispatchers on one port: the second fails with "port in use" (SO_REUSEPORT let both
  listen). A worker pointed at a dead dispatcher and a trainer pointed at a dead service wait
  with progress lines, then end with one line; a worker whose dispatcher dies later gives up too."""
  procs = _Procs(tmp_path)
  port, dead = _free_port(), _free_port()
  try:
    procs.start("dispatcher", "data_service", "--role=dispatcher", f"--port={port}")
    procs.wait_for("dispatcher", "listening on port")
    assert "is unauthenticated" in procs.text("dispatcher")
    procs.start("second", "data_service", "--role=dispatcher", f"--port={port}")
    assert procs.wait("second", 180) == 2
    assert f"port {port} in use" in procs.text("second"), procs.text("second")[-2000:]
    assert "Traceback" not in procs.text("second")

    procs.start("orphan", "data_service", "--role=worker", f"--dispatcher_address=127.0.0.1:{dead}",
                "--dispatcher_timeout=3")
    assert procs.wait("orphan", 180) == 2
    text = procs.text("orphan")
    assert f"waiting for the dispatcher at 127.0.0.1:{dead}" in text and "gave up after 3 s" in text
    assert "Traceback" not in text, text[-2000:]

    procs.start("worker", "data_service", "--role=worker", f"--dispatcher_address=127.0.0.1:{port}",
                "--worker_address=127.0.0.1:%port%", "--dispatcher_timeout=4")
    procs.wait_for("worker", "listening on port")
    assert "is unauthenticated" in procs.text("worker")
    procs.procs["dispatcher"].kill()
    assert procs.wait("worker", 60) == 1
    assert "has not answered for 4 s" in procs.text("worker"), procs.text("worker")[-2000:]

    procs.start("trainer", "train", *TRAIN, f"--records_dir={records}", f"--model_dir={tmp_path}/m",
                f"--data_service=grpc://127.0.0.1:{dead}", "--data_service_timeout=3")
    rc = procs.wait("trainer", 240)
    text = procs.text("trainer")
    assert rc == 2 and "Traceback" not in text, text[-2000:]
    assert f"waiting for the tf.data service dispatcher at 127.0.0.1:{dead}" in text, text[-2000:]
    assert "gave up after 3 s" in text and "--data_service_timeout" in text, text[-2000:]
  finally:
    procs.kill_all()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_waiting_worker_and_trainer_stop_on_a_signal(records, tmp_path, sig):
  """A tf.data worker waiting for its dispatcher and a multi-worker trainer waiting for its peer
  both end within seconds of SIGTERM or Ctrl-C (the trainer ignored both for 580 s)."""
  procs = _Procs(tmp_path)
  hosts = f"127.0.0.1:{_free_port()},127.0.0.1:{_free_port()}"
  try:
    procs.start("worker", "data_service", "--role=worker",
                f"--dispatcher_address=127.0.0.1:{_free_port()}")
    procs.start("trainer", "train", *TRAIN, f"--records_dir={records}", f"--model_dir={tmp_path}/m",
                "--strategy=multi_worker", f"--worker_hosts={hosts}", "--task_index=1")
    procs.wait_for("worker", "waiting for the dispatcher")
    procs.wait_for("trainer", "waiting for worker 0 at 127.0.0.1:")
    assert "is unauthenticated" in procs.text("trainer")
    for name in ("worker", "trainer"):
      procs.procs[name].send_signal(sig)
      assert procs.wait(name, 15) != 0, procs.text(name)[-2000:]
      assert "Traceback" not in procs.text(name), procs.text(name)[-2000:]
  finally:
    procs.kill_all()


@pytest.mark.slow
def test_multi_worker_gives_up_on_an_absent_peer_and_refuses_a_taken_port(records, tmp_path):
  procs = _Procs(tmp_path)
  mine, absent = _free_port(), _free_port()
  try:
    procs.start("alone", "train", *TRAIN, f"--records_dir={records}", f"--model_dir={tmp_path}/m",
                "--strategy=multi_worker", f"--worker_hosts=127.0.0.1:{mine},127.0.0.1:{absent}",
                "--task_index=0", "--cluster_timeout=4")
    assert procs.wait("alone", 240) == 2
    text = procs.text("alone")
    assert f"waiting for worker 1 at 127.0.0.1:{absent}" in text, text[-2000:]
    assert "gave up after 4 s" in text and "--cluster_timeout" in text, text[-2000:]
    assert "Traceback" not in text
    with socket.socket() as busy:
      busy.bind(("0.0.0.0", 0))
      busy.listen()
      taken = busy.getsockname()[1]
      procs.start("taken", "train", *TRAIN, f"--records_dir={records}", f"--model_dir={tmp_path}/n",
                  "--strategy=multi_worker", f"--worker_hosts=127.0.0.1:{taken},127.0.0.1:{absent}",
                  "--task_index=0", "--cluster_timeout=4")
      assert procs.wait("taken", 240) == 2
    assert f"port {taken} in use" in procs.text("taken"), procs.text("taken")[-2000:]
  finally:
    procs.kill_all()
