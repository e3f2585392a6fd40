"""The one file-system helper: every user path (records, runs, reports) goes through it.

A path with a scheme (`gs://bucket/x`, `ram://x`, `s3://` with tensorflow-io installed) goes to
`tf.io.gfile`; a local path to `os` and the builtins. TensorFlow is imported only when a remote
path is met: the converter's spawned workers import this module, and a TensorFlow import costs each
of them 3.4-3.8 s and 675 MB. Paths stay `str`: `pathlib.Path("gs://b/x")` silently becomes
`gs:/b/x`, a local folder named `gs:`. Errors from `tf.io.gfile` come back as the matching `OSError`
subclass (`FileNotFoundError`, ...), so callers catch one family whatever the path.

Atomic writes: written to `NAME.tmp` beside the target, then renamed over it, so a reader (or a run
restarted after a kill) never sees half a file — a 0-byte `model.keras` after a kill during a save
was the failure that made this the only way the package writes its files.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import glob as _glob
import hashlib
import json
import os
import posixpath
import shutil

_HASH_CHUNK = 1 << 20  # 1 MiB reads keep hashing streamed; dermoscopy files are 0.1-20 MB.


def is_remote(path: str | os.PathLike) -> bool:
  """True for `scheme://...` paths (gs, s3, ram, hdfs): those go through tf.io.gfile."""
  return "://" in os.fspath(path)


def _str(path: str | os.PathLike) -> str:
  return os.fspath(path)


def join(base: str | os.PathLike, *names: str) -> str:
  """`base/name/...` as a string; keeps the `scheme://` of a remote base."""
  base = _str(base)
  if is_remote(base):
    return posixpath.join(base, *names)
  return os.path.join(base, *names)


def canonical(path: str | os.PathLike) -> str:
  """One spelling per location, to tell whether two paths name the same folder: a local path
  absolute with links resolved, a remote one without trailing slashes."""
  path = _str(path)
  return path.rstrip("/") if is_remote(path) else os.path.realpath(path)


def basename(path: str | os.PathLike) -> str:
  path = _str(path)
  return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def dirname(path: str | os.PathLike) -> str:
  path = _str(path)
  if not is_remote(path):
    return os.path.dirname(path)
  parent = posixpath.dirname(path.rstrip("/"))
  # "ram://x" -> "ram:" would be a LOCAL folder named "ram:" (one appeared in the checkout).
  return parent if "://" in parent else path[:path.index("://") + 3]


@contextlib.contextmanager
def _os_errors(path):
  """tf.errors.* -> the OSError subclass a local call would raise, naming `path`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (remote paths only)

  kinds = ((tf.errors.NotFoundError, FileNotFoundError, errno.ENOENT),
           (tf.errors.AlreadyExistsError, FileExistsError, errno.EEXIST),
           (tf.errors.PermissionDeniedError, PermissionError, errno.EACCES),
           (tf.errors.UnauthenticatedError, PermissionError, errno.EACCES))
  try:
    yield
  except tf.errors.UnimplementedError as err:  # "File system scheme 's3' not implemented"
    scheme = _str(path).split("://", 1)[0]
    raise OSError(errno.EPROTONOSUPPORT, f"this TensorFlow has no file system for {scheme}:// "
                  "(gs:// is built in; s3:// needs `pip install tensorflow-io`)", str(path)) from err
  except tf.errors.OpError as err:
    message = " ".join((err.message or type(err).__name__).split())  # GCS errors span lines
    for tf_kind, os_kind, code in kinds:
      if isinstance(err, tf_kind):
        raise os_kind(code, message, str(path)) from err
    raise OSError(errno.EIO, message, str(path)) from err


def describe_error(err: OSError) -> str:
  """One line for a user: "PATH: what went wrong" (no errno, no traceback)."""
  what = err.strerror or str(err)
  return f"{err.filename}: {what}" if err.filename else what


def _gfile(path):
  """tf.io.gfile (remote `path` only)."""
  del path
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def exists(path: str | os.PathLike) -> bool:
  if is_remote(path):
    with _os_errors(path):
      return _gfile(path).exists(_str(path))
  return os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
  if is_remote(path):
    with _os_errors(path):
      return _gfile(path).isdir(_str(path))
  return os.path.isdir(path)


def isfile(path: str | os.PathLike) -> bool:
  if is_remote(path):
    return exists(path) and not isdir(path)
  return os.path.isfile(path)


def makedirs(path: str | os.PathLike) -> None:
  """Creates `path` and its parents; fine if it exists. On ram:// a folder must be made before
  listdir shows what is written in it (a file written into a never-made folder is not listed)."""
  if is_remote(path):
    with _os_errors(path):
      _gfile(path).makedirs(_str(path))
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
  """Sorted entry names (no trailing slashes); FileNotFoundError if `path` is no folder."""
  if is_remote(path):
    with _os_errors(path):
      if not _gfile(path).isdir(_str(path)):
        raise FileNotFoundError(errno.ENOENT, "no such folder", _str(path))
      return sorted(name.rstrip("/") for name in _gfile(path).listdir(_str(path)))
  return sorted(os.listdir(path))


def glob(pattern: str | os.PathLike) -> list[str]:
  """Sorted paths matching `pattern` (`*` within one name)."""
  if is_remote(pattern):
    with _os_errors(pattern):
      return sorted(_gfile(pattern).glob(_str(pattern)))
  return sorted(_glob.glob(_str(pattern)))


def size(path: str | os.PathLike) -> int:
  if is_remote(path):
    with _os_errors(path):
      return _gfile(path).stat(_str(path)).length
  return os.path.getsize(path)


def stat(path: str | os.PathLike) -> tuple[int, int]:
  """(size in bytes, modification time in ns): enough to tell a changed file from a cached one."""
  if is_remote(path):
    with _os_errors(path):
      st = _gfile(path).stat(_str(path))
    return st.length, st.mtime_nsec
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


def remove(path: str | os.PathLike, missing_ok: bool = True) -> None:
  if not missing_ok or exists(path):
    if is_remote(path):
      with _os_errors(path):
        _gfile(path).remove(_str(path))
    else:
      os.remove(path)


def rmtree(path: str | os.PathLike) -> None:
  """Removes a folder and everything in it; nothing to do if it is not there."""
  if is_remote(path):
    try:
      if isdir(path):
        with _os_errors(path):
          _gfile(path).rmtree(_str(path))
    except FileNotFoundError:
      pass  # ram:// says isdir("x/1") when only "x/1.tmp/..." exists (it matches name prefixes)
  elif os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)


def rename(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = True) -> None:
  """Renames `src` to `dst` (same file system). Local renames are atomic; on an object store a
  rename is a server-side copy then a delete, and `dst` appears only once complete."""
  if is_remote(src) or is_remote(dst):
    with _os_errors(dst):
      _gfile(dst).rename(_str(src), _str(dst), overwrite=overwrite)
  elif overwrite:
    os.replace(src, dst)
  else:
    if os.path.exists(dst):
      raise FileExistsError(errno.EEXIST, "already exists", _str(dst))
    os.rename(src, dst)


def copy(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = True) -> None:
  """Copies one file, across file systems too (a local shard to gs://)."""
  if is_remote(src) or is_remote(dst):
    with _os_errors(dst):
      _gfile(dst).copy(_str(src), _str(dst), overwrite=overwrite)
  else:
    if not overwrite and os.path.exists(dst):
      raise FileExistsError(errno.EEXIST, "already exists", _str(dst))
    shutil.copyfile(src, dst)


def walk_files(root: str | os.PathLike) -> list[str]:
  """Sorted '/'-separated paths, relative to `root`, of every file below it."""
  root = _str(root)
  if is_remote(root):
    with _os_errors(root):
      walked = [(d, files) for d, _, files in _gfile(root).walk(root)]
  else:
    walked = [(d, files) for d, _, files in os.walk(root)]
  found = []
  for folder, files in walked:
    rel = folder[len(root):].strip("/").replace(os.sep, "/")
    found += [posixpath.join(rel, f) if rel else f for f in files]
  return sorted(found)


def publish(local_src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves a finished local file to `dst` so that `dst` appears only complete: a rename when `dst`
  is local, else an upload to `dst.tmp` and a rename (an interrupted upload leaves only the
  `.tmp`, which the next try overwrites), then the local file is removed."""
  if not is_remote(dst):
    rename(local_src, dst, overwrite=True)
    return
  tmp = temporary_name(dst)
  copy(local_src, tmp, overwrite=True)
  rename(tmp, dst, overwrite=True)
  remove(local_src)


def open(path: str | os.PathLike, mode: str = "r"):  # pylint: disable=redefined-builtin
  """A file object: tf.io.gfile.GFile for a remote path (text modes read and write str, as the
  builtin does, with "\\n" kept as is), the builtin open (UTF-8 for text) for a local one."""
  if is_remote(path):
    if "r" in mode and not exists(path):  # GFile opens lazily: fail here, not at the first read.
      raise FileNotFoundError(errno.ENOENT, "no such file", _str(path))
    with _os_errors(path):
      return _gfile(path).GFile(_str(path), mode)
  if "b" in mode:
    return builtins.open(path, mode)
  return builtins.open(path, mode, encoding="utf-8", newline="")


def read_bytes(path: str | os.PathLike) -> bytes:
  if is_remote(path):
    with _os_errors(path), open(path, "rb") as f:
      return f.read()
  with builtins.open(path, "rb") as f:
    return f.read()


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
  return read_bytes(path).decode(encoding)


def sha256_file(path: str | os.PathLike, chunk: int = _HASH_CHUNK) -> str:
  """sha256 of a file (local or remote)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def temporary_name(path: str | os.PathLike) -> str:
  """`NAME.tmp`: the name a file is written under before the rename (the converter's clean-up
  recognises its own files by it; only one process writes any given file)."""
  return _str(path) + ".tmp"


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `NAME.tmp`, then renames it over `path`.

  Remote: an object store publishes an object only when its write closes, so the `.tmp` object is
  complete before the rename (a server-side copy) makes it visible under the final name.
  """
  tmp = temporary_name(path)
  try:
    if is_remote(path):
      with _os_errors(tmp), open(tmp, "wb") as f:
        f.write(data)
    else:
      with builtins.open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    rename(tmp, path, overwrite=True)
  finally:
    remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
  """JSON with sorted keys and a final newline, written atomically."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def probe_writable(folder: str | os.PathLike) -> None:
  """Creates `folder` if needed and writes (then removes) a probe file there; OSError if either
  fails. Every command calls it, through the checks below, before its long work."""
  makedirs(folder)
  probe = join(folder, f".write-test-{os.getpid()}")
  write_bytes_atomic(probe, b"")
  remove(probe)


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> str:
  """Creates `path` if needed and proves a file can be written there, before any long work.

  Raises ValueError naming the folder: a read-only output used to lose every prediction after
  they had been computed.
  """
  try:
    if isfile(path):
      raise ValueError(f"{what} {path} is a file, not a folder; choose another path")
    probe_writable(path)
  except OSError as err:
    raise ValueError(f"{what} {path} is not writable ({err.strerror or err}); choose another path "
                     "or fix its permissions") from err
  return _str(path)


def check_writable_file(path: str | os.PathLike, what: str = "output_csv") -> None:
  """Fails now, before any forward pass, when the file `path` could not be written later.

  Creates its folder and writes a probe there; ValueError names the flag (`what`) and the fix.
  """
  if isdir(path):
    raise ValueError(f"{what}={path} is a folder; give a file name, e.g. "
                     f"{join(path, 'predictions.csv')}")
  folder = dirname(path) or "."
  try:
    probe_writable(folder)
  except (FileExistsError, NotADirectoryError) as err:
    raise ValueError(f"{what}={path}: a part of its folder is a file; choose another "
                     f"{what}") from err
  except OSError as err:
    raise ValueError(f"{what}={path}: cannot write in {folder} ({err.strerror or err}); choose "
                     f"another {what} or fix its permissions") from err
