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


def bin_env(**extra) -> dict:
  """The environment bin/ subprocesses run with: this checkout importable, TF logs quiet."""
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env


def start_bin(name, *args, env=None, **popen_kwargs):
  """Starts bin/<name> with this interpreter in the background (for kill-and-resume tests)."""
  import subprocess  # pylint: disable=g-import-not-at-top

  return subprocess.Popen([sys.executable, str(BIN / name), *map(str, args)],
                          env=env or bin_env(), **popen_kwargs)


def run_bin(name, *args, check=True, env=None, timeout=600):
  """Runs bin/<name> with this interpreter; returns the CompletedProcess (text output)."""
  import subprocess  # pylint: disable=g-import-not-at-top

  proc = subprocess.run([sys.executable, str(BIN / name), *map(str, args)], capture_output=True,
                        text=True, env=bin_env(**(env or {})), timeout=timeout, check=False)
  if check and proc.returncode != 0:
    raise AssertionError(f"bin/{name} {' '.join(map(str, args))} exited {proc.returncode}\n"
                         f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
  return proc


def convert_folder(input_dir, output_dir, image_size, **kwargs):
  """Runs the converter in-process (1 worker, no progress bar); returns the output folder."""
  from skinrecords.data import convert, preprocess  # pylint: disable=g-import-not-at-top

  kwargs.setdefault("workers", 1)
  convert.convert(convert.ConvertConfig(
      input_dir=str(input_dir), output_dir=str(output_dir), progress=False,
      preprocess=preprocess.PreprocessConfig(image_size=image_size), **kwargs))
  return output_dir


def synthetic_records(root, num_images, min_size, max_size, image_size, **kwargs):
  """Synthetic ABCD lesions (NotMelanoma = id 0, Melanoma = id 1) converted to records."""
  from skinrecords.data import synthetic  # pylint: disable=g-import-not-at-top

  synthetic.write_dataset(root / "images", synthetic.SyntheticConfig(
      num_images=num_images, seed=0, min_size=min_size, max_size=max_size), progress=False)
  return convert_folder(root / "images", root / "records", image_size,
                        classes=("NotMelanoma", "Melanoma"), **kwargs)


def write_dark_bright(folder, classes, noise, shape_of, seed=0):
  """Class folders of flat PNGs whose class shows in the pixels: `classes` maps a class name to
  (count, base grey level); `shape_of(i)` gives image i's shape."""
  import cv2  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  for cls, (n, base) in classes.items():
    (folder / cls).mkdir(parents=True)
    for i in range(n):
      img = np.clip(base + rng.integers(-noise, noise, shape_of(i)), 0, 255).astype(np.uint8)
      cv2.imwrite(str(folder / cls / f"{cls}{i:03d}.png"), img)
