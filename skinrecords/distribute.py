"""Choosing a tf.distribute strategy, mixed precision, and which process may write files.

MultiWorkerMirroredStrategy must be created before any other TensorFlow op runs, with TF_CONFIG
already set ("Collective ops must be configured at program startup", tensorflow#34568), so the
binaries call `make_strategy` first thing.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile

import tensorflow as tf

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
MIXED_PRECISION = ("auto", "on", "off")


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
  """auto: MirroredStrategy over all GPUs when there are several, else one device (GPU or CPU).

  Without GPUs, `mirrored` mirrors over the logical CPU devices (the tests make two of them to stand
  in for two GPUs).
  """
  if name not in STRATEGIES:
    raise ValueError(f"strategy={name!r}; choose one of {', '.join(STRATEGIES)}")
  if name == "multi_worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  gpus = tf.config.list_logical_devices("GPU")
  devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
  if name == "mirrored" or (name == "auto" and len(gpus) > 1):
    return tf.distribute.MirroredStrategy(devices)
  return tf.distribute.OneDeviceStrategy(devices[0])


def use_mixed_precision(setting: str) -> bool:
  """auto: float16 on GPU (Tensor Cores), off on CPU, where float16 matmuls are slower, not faster."""
  if setting not in MIXED_PRECISION:
    raise ValueError(f"mixed_precision={setting!r}; choose one of {', '.join(MIXED_PRECISION)}")
  if setting == "auto":
    return bool(tf.config.list_physical_devices("GPU"))
  return setting == "on"


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True for the one process that writes results (always true outside multi-worker training)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type is None:
    return True
  cluster = resolver.cluster_spec().as_dict()
  if "chief" in cluster:
    return task_type == "chief"
  return task_type == "worker" and task_id == 0


class WriteDir:
  """Where this process writes: the real folder on the chief, a temporary one elsewhere.

  Keras 3's ModelCheckpoint and BackupAndRestore have no chief logic (every worker writes the same
  file); the old tf.keras wrote non-chief copies to temporary paths, which collective saving still
  needs (every worker must take part in a save). `cleanup()` removes the temporary copy.
  """

  def __init__(self, model_dir: str | os.PathLike, chief: bool, tag: str = "worker"):
    self.chief = chief
    if chief:
      self.path = pathlib.Path(model_dir)
    else:
      self.path = pathlib.Path(tempfile.mkdtemp(prefix=f"skinrecords_{tag}_"))
    self.path.mkdir(parents=True, exist_ok=True)

  def cleanup(self) -> None:
    if not self.chief:
      shutil.rmtree(self.path, ignore_errors=True)


def tf_config_from_hosts(worker_hosts: list[str], task_index: int) -> str:
  """The TF_CONFIG JSON for `--worker_hosts=h1:p,h2:p --task_index=i`."""
  if not 0 <= task_index < len(worker_hosts):
    raise ValueError(f"task_index={task_index} outside 0..{len(worker_hosts) - 1} for "
                     f"{len(worker_hosts)} worker hosts")
  return json.dumps({"cluster": {"worker": list(worker_hosts)},
                     "task": {"type": "worker", "index": task_index}})


def log_strategy(strategy: tf.distribute.Strategy) -> None:
  logging.info("strategy %s with %d replica(s)", type(strategy).__name__,
               strategy.num_replicas_in_sync)
