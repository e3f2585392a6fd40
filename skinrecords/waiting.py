"""Servers on other machines: is a port free here, is a peer up, and bounded waits for peers.

TensorFlow's servers (tf.data service dispatchers and workers, the gRPC server of
MultiWorkerMirroredStrategy) wait for absent peers forever and silently, inside C++ calls that
Python's signal handlers cannot interrupt (a multi-worker trainer with one peer missing ignored
SIGTERM and Ctrl-C for 580 s until kill -9, issue 27). The helpers here give every such wait
progress lines, a timeout and a prompt exit on Ctrl-C/SIGTERM. Pure Python: no TensorFlow.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, NamedTuple

# Printed when a server starts: TensorFlow offers neither authentication nor a choice of interface
# for these servers (tf.data service's DispatcherConfig/WorkerConfig have no bind address and bind
# [::]:port; the std server behind MultiWorkerMirroredStrategy binds 0.0.0.0:port from a ServerDef
# that has none either).
SECURITY_NOTE = ("security: port {port} ({what}) is unauthenticated and listens on every network "
                 "interface (TensorFlow cannot bind it to one); anyone who can reach it can "
                 "{risk}: run it only inside a private network or behind a firewall (README, "
                 "'Security')")


def security_note(port, what: str, risk: str = "receive the training images") -> str:
  return SECURITY_NOTE.format(port=port, what=what, risk=risk)


class Peer(NamedTuple):
  label: str  # "worker 1", "dispatcher"
  host: str
  port: int

  def __str__(self) -> str:
    return f"{self.label} at {self.host}:{self.port}"


class WaitTimeout(Exception):
  """A peer did not answer within the timeout; the message is one line for the user."""


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
  """Whether something accepts TCP connections at host:port."""
  try:
    with socket.create_connection((host.strip("[]"), port), timeout=timeout):
      return True
  except OSError:
    return False


def check_port_free(port: int, what: str) -> None:
  """ValueError "port in use" when a server already listens on `port` (any interface).

  gRPC sets SO_REUSEPORT, so TensorFlow's own bind succeeds beside another TensorFlow server on the
  same port (two dispatchers on one port both listened and split the trainers between them, issue
  27): this probe binds without SO_REUSEPORT, which Linux refuses while a listener holds the port.
  SO_REUSEADDR keeps connections in TIME_WAIT (a server just restarted) from counting as in use.
  Port 0 (the kernel picks a free one) is never in use.
  """
  if not port:
    return
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # no IPv6 on this host
    with probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        probe.bind((host, port))
      except OSError as err:
        if err.errno == errno.EADDRINUSE:
          raise ValueError(f"port {port} in use: another server already listens on it, so the "
                           f"{what} cannot start there; stop that server or choose another port "
                           "(0: any free one)") from err
        if family == socket.AF_INET6:
          continue  # IPv6 disabled: the IPv4 probe decides
        raise ValueError(f"the {what} cannot use port {port}: {err.strerror}") from err
      return  # a dual-stack [::] bind covers IPv4 too


def wait_until_reachable(peers: Iterable[Peer], timeout: float, interval: float, flag: str,
                         echo: Callable[[str], None] | None = None) -> None:
  """Polls `peers` until all accept connections; a progress line per absent peer every `interval`
  seconds; WaitTimeout after `timeout` seconds. Runs in Python, so Ctrl-C/SIGTERM work as usual."""
  echo = echo or _stderr
  pending = list(peers)
  start = time.monotonic()
  next_line = start
  while True:
    pending = [p for p in pending if not reachable(p.host, p.port)]
    if not pending:
      return
    waited = time.monotonic() - start
    if waited >= timeout:
      raise WaitTimeout(_gave_up(pending, timeout, flag))
    if time.monotonic() >= next_line:
      for p in pending:
        echo(f"waiting for {p} ({waited:.0f} s of {timeout:.0f} s, {flag})")
      next_line += interval
    time.sleep(min(1.0, interval))


def _gave_up(pending, timeout: float, flag: str) -> str:
  return (f"gave up after {timeout:.0f} s: {', '.join(map(str, pending))} did not answer; "
          f"start it, check the address and the firewall, or raise {flag}")


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def watchdog(peers: Iterable[Peer], timeout: float, interval: float, flag: str,
             echo: Callable[[str], None] | None = None) -> Iterator[None]:
  """Guards a blocking TensorFlow call in the main thread (the multi-worker strategy's start, which
  waits in C++ until every peer has registered).

  A thread logs "waiting for worker k at host:port" every `interval` seconds for each peer that
  does not accept connections yet, and ends the process with one line (exit 2) after `timeout`
  seconds, or at once (exit 128 + signal) on Ctrl-C or SIGTERM: the C-level signal handler writes
  the signal number to a wakeup fd the thread reads, since the Python-level handler cannot run
  while the main thread is inside TensorFlow.
  """
  echo = echo or _stderr
  peers = list(peers)
  done = threading.Event()
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  handlers = {s: signal.signal(s, _no_op) for s in (signal.SIGINT, signal.SIGTERM)}
  old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  thread = threading.Thread(target=_watch, name="peer-watchdog", daemon=True,
                            args=(peers, timeout, interval, flag, echo, done, read_fd))
  thread.start()
  try:
    yield
  finally:
    done.set()
    os.write(write_fd, b"\0")  # wakes the thread, which sees `done`
    thread.join(timeout=5)
    signal.set_wakeup_fd(old_fd)
    for sig, handler in handlers.items():
      signal.signal(sig, handler)
    os.close(read_fd)
    os.close(write_fd)


def _no_op(signum, frame):  # pylint: disable=unused-argument
  """The Python-level handler while the watchdog runs; the watchdog thread does the work."""


def _watch(peers, timeout, interval, flag, echo, done, read_fd) -> None:
  start = time.monotonic()
  next_line = start + min(interval, 5.0)  # a healthy cluster forms within seconds: no line then
  while not done.is_set():
    ready, _, _ = select.select([read_fd], [], [], 1.0)
    if ready:
      data = os.read(read_fd, 64)
      sigs = [b for b in data if b in (signal.SIGINT, signal.SIGTERM)]
      if sigs and not done.is_set():
        name = signal.Signals(sigs[0]).name
        _exit(echo, f"stopped by {name} while waiting for {', '.join(map(str, peers))}",
              128 + sigs[0])
      continue
    waited = time.monotonic() - start
    if waited >= timeout:
      absent = [p for p in peers if not reachable(p.host, p.port)]
      _exit(echo, _gave_up(absent or peers, timeout, flag), 2)
    if time.monotonic() >= next_line:
      next_line += interval
      for p in peers:
        if not done.is_set() and not reachable(p.host, p.port):
          echo(f"waiting for {p} ({waited:.0f} s of {timeout:.0f} s, {flag})")


def _exit(echo, line: str, code: int) -> None:
  logging.shutdown()
  echo(line)
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access
