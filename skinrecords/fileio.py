"""Small file helpers every stage shares: one sha256, and atomic writes.

Atomic: written to a temporary name beside the target, then renamed over it, so a reader (or a run
restarted after a kill) never sees half a file — a 0-byte `model.keras` after a kill during a save
was the failure that made this the only way the package writes its files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

_HASH_CHUNK = 1 << 20  # 1 MiB reads keep hashing streamed; dermoscopy files are 0.1-20 MB.


def sha256_file(path: str | os.PathLike, chunk: int = _HASH_CHUNK) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def temporary_name(path: str | os.PathLike) -> pathlib.Path:
  """`NAME.tmp`: the name a file is written under before the rename (the converter's clean-up
  recognises its own files by it; only one process writes any given file)."""
  path = pathlib.Path(path)
  return path.with_name(path.name + ".tmp")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  path = pathlib.Path(path)
  tmp = temporary_name(path)
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
  """JSON with sorted keys and a final newline, written atomically."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> pathlib.Path:
  """Creates `path` if needed and proves a file can be written there, before any long work.

  Raises ValueError naming the folder: a read-only output used to lose every prediction after
  they had been computed.
  """
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise ValueError(f"{what} {path} is a file, not a folder; choose another path")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as err:
    raise ValueError(f"{what} {path} is not writable ({err.strerror}); choose another path or "
                     "fix its permissions") from err
  return path
