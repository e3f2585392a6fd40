"""The tf.data service: a dispatcher and workers that run the training input on other machines.

`bin/data_service --role=dispatcher|worker` serves; `bin/train --data_service=grpc://host:port`
reads through it. The dispatcher hands whole files to workers on demand (dynamic sharding: each
file once per pass over the data; files a worker held when it died are not handed out again, so
at-most-once under failures), and every trainer joins one job, so each batch reaches exactly one
trainer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import socket
import sys
import time

import tensorflow as tf

from skinrecords.core import fileio
from skinrecords.core import manifest
from skinrecords.core import waiting
from skinrecords.input import pipeline

ROLES = ("dispatcher", "worker")
# [grpc://]host:port, the host a name, an IPv4 address or a bracketed IPv6 address.
ADDRESS = re.compile(r"^(?:grpc://)?(?P<host>[^:/\s]+|\[[0-9a-fA-F:]+\]):(?P<port>\d+)$")


def service_input_fn(info: manifest.DatasetInfo, batch_size: int, address: str, job_key: str,
                     **kwargs):
  """An input function for `distribute_datasets_from_function` reading through the service at
  `address`; every trainer with the same `job_key` shares one job."""
  service = tf.data.experimental.service
  job = f"skinrecords_{hashlib.sha256(job_key.encode()).hexdigest()[:16]}"
  logging.info("training input from the tf.data service at %s, job %s (dynamic sharding by "
               "file)", address, job)

  def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    ds = pipeline.make_dataset(info, "train", ctx.get_per_replica_batch_size(batch_size),
                               **kwargs)
    ds = ds.apply(service.distribute(processing_mode=service.ShardingPolicy.DYNAMIC,
                                     service=address, job_name=job))
    return ds.prefetch(pipeline.AUTOTUNE)

  return fn


def parse_address(address: str, what: str = "address") -> tuple[str, int]:
  """'grpc://host:port' or 'host:port' -> (host, port); ValueError naming the value otherwise."""
  m = ADDRESS.match(address or "")
  if not m or not 0 < int(m["port"]) < 65536:
    raise ValueError(f"{what}={address!r} is not [grpc://]host:port (e.g. grpc://10.0.0.5:5050)")
  return m["host"], int(m["port"])


@dataclasses.dataclass(frozen=True)
class DataServiceConfig:
  """One tf.data service server. A dispatcher hands out work; workers run the input pipelines.

  port: 0 picks a free port (printed at start). worker_address: how trainers reach this worker,
  `%port%` standing for the bound port; "" means `<hostname>:%port%`. work_dir (dispatcher only):
  a journal folder that lets a restarted dispatcher recover its jobs (fault-tolerant mode).
  """
  role: str
  port: int = 0
  dispatcher_address: str = ""
  worker_address: str = ""
  work_dir: str = ""
  # Worker only: how long the dispatcher may be unreachable (at start, or later) before the worker
  # gives up with one line; a line every `progress_interval` s meanwhile. A dispatcher restarted
  # with --work_dir within this time is rejoined.
  dispatcher_timeout: float = 300.0
  progress_interval: float = 10.0

  def validate(self) -> None:
    if self.role not in ROLES:
      raise ValueError(f"role={self.role!r}; choose one of {', '.join(ROLES)}")
    if not 0 <= self.port < 65536:
      raise ValueError(f"port={self.port} must be within 0..65535 (0: any free port)")
    if not (self.dispatcher_timeout > 0 and self.progress_interval > 0):
      raise ValueError(f"dispatcher_timeout={self.dispatcher_timeout} must be above 0 seconds")
    if self.role == "worker":
      parse_address(self.dispatcher_address, "dispatcher_address")
      if self.work_dir:
        raise ValueError(f"work_dir={self.work_dir!r} is for the dispatcher only")
    elif self.dispatcher_address or self.worker_address:
      raise ValueError("dispatcher_address and worker_address are for role=worker only")


def start_server(config: DataServiceConfig):
  """Starts the server, which serves in the background, and returns it (keep a reference).

  ValueError names the problem when it cannot start: a work_dir that is a file or not writable,
  or a port in use (TensorFlow raises a bare RuntimeError with a traceback for both).
  """
  config.validate()
  service = tf.data.experimental.service
  if config.work_dir:
    fileio.check_writable_dir(config.work_dir, "work_dir")
  waiting.check_port_free(config.port, f"tf.data service {config.role}")
  if config.role == "worker":
    host, port = parse_address(config.dispatcher_address, "dispatcher_address")
    try:  # TensorFlow's worker starts without its dispatcher and then waits silently
      waiting.wait_until_reachable([waiting.Peer("the dispatcher", host, port)],
                                   config.dispatcher_timeout, config.progress_interval,
                                   "--dispatcher_timeout")
    except waiting.WaitTimeout as err:
      raise ValueError(f"dispatcher_address={config.dispatcher_address}: {err}") from err
  try:
    if config.role == "dispatcher":
      return service.DispatchServer(service.DispatcherConfig(
          port=config.port, work_dir=config.work_dir or None,
          fault_tolerant_mode=bool(config.work_dir)))
    host, port = parse_address(config.dispatcher_address, "dispatcher_address")
    worker_address = config.worker_address or f"{socket.gethostname()}:%port%"
    return service.WorkerServer(service.WorkerConfig(
        dispatcher_address=f"{host}:{port}", worker_address=worker_address, port=config.port))
  except RuntimeError as err:
    raise ValueError(f"the {config.role} could not start on port {config.port} ({err}); is "
                     "another server using it? choose another port (0: any free one)") from err


def serve(config: DataServiceConfig, server=None) -> int:
  """Runs a tf.data service dispatcher or worker (`server`, else one started here) until the
  process is killed (a dispatcher), or until its dispatcher has been unreachable for
  `dispatcher_timeout` seconds (a worker: returns 1 after one line)."""
  server = server or start_server(config)
  if config.role == "dispatcher":
    port = server.target.rsplit(":", 1)[1]
    print(waiting.security_note(port, "tf.data service dispatcher"), file=sys.stderr, flush=True)
    print(f"tf.data service dispatcher listening on port {port}; train with "
          f"--data_service=grpc://{socket.gethostname()}:{port}", flush=True)
    # A Python loop, not server.join(): join() blocks in C++, where Ctrl-C cannot reach it.
    while True:
      time.sleep(1.0)
  port = server._address.rsplit(":", 1)[1]  # pylint: disable=protected-access
  print(waiting.security_note(port, "tf.data service worker"), file=sys.stderr, flush=True)
  print(f"tf.data service worker listening on port {port}, registered with dispatcher "
        f"{config.dispatcher_address}", flush=True)
  return watch_dispatcher(config)


def watch_dispatcher(config: DataServiceConfig) -> int:
  """A worker whose dispatcher died ran on silently forever (issue 27): check it every second; a
  line every `progress_interval` s while it is unreachable; 1 after `dispatcher_timeout` s."""
  host, port = parse_address(config.dispatcher_address, "dispatcher_address")
  lost = next_line = None
  while True:
    time.sleep(1.0)
    now = time.monotonic()
    if waiting.reachable(host, port):
      if lost is not None:
        print(f"the dispatcher at {host}:{port} answers again", file=sys.stderr, flush=True)
      lost = None
      continue
    if lost is None:
      lost, next_line = now, now
    if now - lost >= config.dispatcher_timeout:
      print(f"gave up: the dispatcher at {host}:{port} has not answered for "
            f"{config.dispatcher_timeout:.0f} s (--dispatcher_timeout); restart it (with its "
            "--work_dir it recovers its jobs) and this worker", file=sys.stderr, flush=True)
      return 1
    if now >= next_line:
      print(f"waiting for the dispatcher at {host}:{port}: unreachable for {now - lost:.0f} s of "
            f"{config.dispatcher_timeout:.0f} s (--dispatcher_timeout)", file=sys.stderr,
            flush=True)
      next_line += config.progress_interval
