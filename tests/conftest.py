"""Shared test set-up.

TensorFlow fixes its device list on first use, so the two logical CPU devices that stand in for two
GPUs in the distribution tests are configured here, before any test touches TensorFlow.
"""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = REPO / "bin"


def _two_logical_cpus():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  cpus = tf.config.list_physical_devices("CPU")
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
  except RuntimeError:
    pass  # Already initialised by an earlier import; the tests that need 2 devices will say so.


_two_logical_cpus()


def run_bin(name, *args, check=True, env=None, timeout=600):
  """Runs bin/<name> with this interpreter; returns the CompletedProcess (text output)."""
  import subprocess  # pylint: disable=g-import-not-at-top

  full_env = dict(os.environ)
  full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
  if env:
    full_env.update(env)
  proc = subprocess.run([sys.executable, str(BIN / name), *map(str, args)], capture_output=True,
                        text=True, env=full_env, timeout=timeout, check=False)
  if check and proc.returncode != 0:
    raise AssertionError(f"bin/{name} {' '.join(map(str, args))} exited {proc.returncode}\n"
                         f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
  return proc
