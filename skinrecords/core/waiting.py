"""Servers on other machines: is a port free here, is a peer up, and bounded waits for peers.

TensorFlow's servers (tf.data service dispatchers and workers, the gRPC server of
MultiWorkerMirroredStrategy) wait for absent peers forever and silently, inside C++ calls that
Python's signal handlers cannot interrupt (a multi-worker trainer with one peer missing ignored
SIGTERM and Ctrl-C for 580 s until kill -9, issue 27). The helpers here give every such wait
progress lines, a timeout and a prompt exit on Ctrl-C/SIGTERM. Pure Python: no TensorFlow.
"""

from __future__ import annotations

import errno
import socket
import sys
import time
from typing import Callable, Iterable, NamedTuple

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
  if not 0 < port < 65536:  # bind() raised OverflowError, a traceback in data_service (issue 22)
    raise ValueError(f"port={port} must be within 0..65535 (0: any free port)")
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


def rendezvous(me: Peer, peers: Iterable[Peer], timeout: float, interval: float, flag: str,
               echo: Callable[[str], None] | None = None) -> None:
  """Before a multi-worker strategy starts: hold this task's port and wait for every peer's.

  MultiWorkerMirroredStrategy's constructor starts the gRPC server and then blocks in C++ until
  every task has registered, forever, holding the GIL (no Python thread runs, so no watchdog can),
  deaf to Ctrl-C, and SIGTERM was ignored too (issue 27: 580 s until kill -9). So the waiting
  happens here, in Python, first: this task listens on its own port (which also refuses a port in
  use: ValueError) until every peer's port accepts connections (a peer's own rendezvous socket, or
  its TensorFlow server once it got past this point), with a line every `interval` s per absent
  peer and WaitTimeout after `timeout` s; Ctrl-C and SIGTERM act as usual. Then the port is
  released for TensorFlow, whose wait now only covers peers that are up.
  """
  holder = _listen(me.port, f"multi-worker gRPC server of {me.label}")
  try:
    wait_until_reachable(peers, timeout, interval, flag, echo)
  finally:
    holder.close()


def _listen(port: int, what: str) -> socket.socket:
  """A socket listening on `port` on every interface (as TensorFlow's server will)."""
  check_port_free(port, what)
  try:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    host = "::"
  except OSError:
    sock, host = socket.socket(socket.AF_INET, socket.SOCK_STREAM), "0.0.0.0"
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
    sock.listen(64)
  except OSError as err:
    sock.close()
    raise ValueError(f"the {what} cannot listen on port {port}: {err.strerror}") from err
  return sock
