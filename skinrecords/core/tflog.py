"""TensorFlow's and Keras' log lines, filtered in one place: the commands' quiet start (`quiet`) and
the retracing warnings cross-validation expects (`ExpectedRetracing`). TensorFlow-free: it only sets
environment variables, logging filters and an import hook.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import tempfile

from absl import logging as absl_logging


@contextlib.contextmanager
def stderr_held_back(replay: bool = False, drop: str = ""):
  """Sends file descriptor 2 (C++ writes there too, past Python's sys.stderr) to a temporary file.

  What was held is replayed when the block raises, or always with `replay`, without the lines that
  contain `drop` (export drops TFLite's XNNPACK INFO line this way)."""
  sys.stderr.flush()
  saved = os.dup(2)
  failed = False
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      failed = True
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      if failed or replay:
        held.seek(0)
        lines = held.read().decode(errors="replace").splitlines(keepends=True)
        sys.stderr.write("".join(line for line in lines if not drop or drop not in line))


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """Runs the first `import tensorflow` with stderr held back.

  TF 2.21 prints `oneDNN custom operations are on`, `Could not find cuda drivers` and, on some
  CPU-only hosts, `E0000 ... failed call to cuInit (303)` from C++ *before* absl::InitializeLog,
  so TF_CPP_MIN_LOG_LEVEL=3 does not hide them (checked here); every CPU run looked like an error.
  Installed as an import hook rather than importing TensorFlow up front, so that flag errors still
  come back in well under a second.
  """

  def find_spec(self, name, path=None, target=None):
    if name != "tensorflow":
      return None
    sys.meta_path.remove(self)
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
      return spec
    real = spec.loader.exec_module

    def exec_module(module):
      with stderr_held_back():
        real(module)
    spec.loader.exec_module = exec_module
    return spec


class _OnlyOurInfo(logging.Filter):
  """Passes warnings and errors from anywhere, INFO lines only from skinrecords itself.

  Keras and TensorFlow log INFO lines of their own through the same root logger, e.g. Keras 3.15's
  `functional_saver.py ... Sharding callback duration: 29 microseconds` on every checkpoint save.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f"{os.sep}skinrecords{os.sep}" in record.pathname


def quiet(verbose: bool) -> None:
  """Quiet by default (TF_CPP_MIN_LOG_LEVEL=2, INFO lines only from skinrecords, TensorFlow's
  import banner held back); `verbose` brings every line back."""
  if verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  absl_logging.get_absl_handler().addFilter(_OnlyOurInfo())
  if "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlowImport())


class ExpectedRetracing(logging.Filter):
  """Drops TensorFlow's "5 out of the last 6 calls to <...train_step> triggered tf.function
  retracing" warnings: every fold builds its own model, train step, forward pass and worker
  barrier (new tf.functions by design), which TensorFlow called excessive from the 4th of 5 folds
  on (seen on Kaggle files), once per function: a page of advice that does not apply."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def expected_retracing():
  """`ExpectedRetracing` on TensorFlow's logger for the duration of the block."""
  tf_logger, quiet_filter = logging.getLogger("tensorflow"), ExpectedRetracing()
  tf_logger.addFilter(quiet_filter)
  try:
    yield
  finally:
    tf_logger.removeFilter(quiet_filter)
