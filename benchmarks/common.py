"""What the benchmarks share: a work folder that is removed afterwards unless kept."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import tempfile

from absl import app


@contextlib.contextmanager
def work_folder(prefix: str, base: str | None, keep: bool):
  """A fresh folder under `base` (the system's temporary folder if None) for one run; removed at
  the end, or kept and named when `keep`. An unusable `base` is a usage error."""
  try:
    if base:
      pathlib.Path(base).mkdir(parents=True, exist_ok=True)
    root = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=base))
  except OSError as err:
    raise app.UsageError(f"--workdir={base}: cannot make a folder there ({err.strerror}); pass "
                         "a writable --workdir") from err
  try:
    yield root
  finally:
    if keep:
      print(f"kept {root}")
    else:
      shutil.rmtree(root, ignore_errors=True)
