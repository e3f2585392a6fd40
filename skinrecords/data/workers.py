"""The converter's workers: one image file in, one framed TFRecord (or a rejection reason) out.

`RecordPool` runs `_preprocess_and_frame` in this process or in a `spawn`ed pool. The spawned
workers import this module, so it (and everything it imports: `preprocess`, `hair`, `tfrecord`)
must never import TensorFlow: that costs 3.4-3.8 s and 675 MB per worker (tests/test_tfrecord.py checks it).
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import queue

from skinrecords.core import fileio
from skinrecords.core import tfrecord
from skinrecords.data import preprocess

# One example for a worker: (source path, image_name, target, patient_id, fold[, metadata]); the
# optional last element is {"meta/<name>": float | str} of the values present (tfrecord's
# `metadata`): a missing value has no key.
Task = tuple


def _init_worker(config: preprocess.PreprocessConfig, ready=None, sizes=None) -> None:
  import cv2  # pylint: disable=g-import-not-at-top

  cv2.setNumThreads(1)  # N processes x OpenCV's own pool oversubscribes the cores (opencv#5150).
  global _WORKER_CONFIG, _WORKER_SIZES
  _WORKER_CONFIG = config
  _WORKER_SIZES = sizes
  if ready is not None:  # RecordPool(wait_ready=True)
    ready.put(os.getpid())


_WORKER_CONFIG: preprocess.PreprocessConfig | None = None
_WORKER_SIZES: tuple[int, ...] | None = None  # several output sizes: `_preprocess_sizes`


def _preprocess_and_frame(task: Task):
  """Worker: returns (framed TFRecord, None) or (None, reason). Never raises for a bad file.

  All per-image work happens here (decode, preprocess, encode, the Example, its framing and CRCs),
  so the coordinator only appends bytes: with TensorFlow building the Example and writing the
  record in the coordinator, 2 workers reached 0.75-0.77 of this machine's 2-process ceiling
  (issue 17).
  """
  path, image_name, target, patient_id, fold, *meta = task
  try:
    image = preprocess.preprocess_file(path, _WORKER_CONFIG)
    size = _WORKER_CONFIG.image_size
    return tfrecord.example_record(image=image, image_name=image_name, target=target,
                                   patient_id=patient_id, fold=fold, height=size, width=size,
                                   metadata=meta[0] if meta else None), None
  except Exception as err:  # pylint: disable=broad-except  (one odd file must not end the run)
    return None, preprocess.describe_rejection(err)


def _preprocess_sizes(task: Task):
  """Worker, several sizes: ([framed TFRecord per size], None) or (None, reason).

  The source is decoded once, at the reduced DCT scale that serves the largest size
  (`_WORKER_CONFIG.image_size` is the largest), then cropped, resized and encoded per size: for
  2000x1500 sources to 256/384/512, separate runs decode at 1/4, 1/2 and 1/2.
  """
  path, image_name, target, patient_id, fold, *meta = task
  try:
    data = fileio.read_bytes(path)
  except OSError as err:
    return None, preprocess.describe_rejection(
        preprocess.RejectedImage(preprocess.UNREADABLE, err.strerror or str(err)))
  try:
    rgb = preprocess.decode(data, _WORKER_CONFIG)
    out = []
    for size in _WORKER_SIZES:
      config = dataclasses.replace(_WORKER_CONFIG, image_size=size)
      image = preprocess.encode(preprocess.preprocess_array(rgb, config), config)
      out.append(tfrecord.example_record(image=image, image_name=image_name, target=target,
                                         patient_id=patient_id, fold=fold, height=size,
                                         width=size, metadata=meta[0] if meta else None))
    return out, None
  except Exception as err:  # pylint: disable=broad-except  (one odd file must not end the run)
    return None, preprocess.describe_rejection(err)


def _hash_file(path: str):
  """Worker: the near-duplicate hashes of one file (`neardup.image_hashes`), or None if it cannot
  be decoded (preprocessing then rejects it with the reason)."""
  from skinrecords.data import neardup  # pylint: disable=g-import-not-at-top

  try:
    return neardup.image_hashes(fileio.read_bytes(path), _WORKER_CONFIG.max_pixels)
  except Exception:  # pylint: disable=broad-except  (rejected with its reason when converted)
    return None


# Tasks per pool message. multiprocessing.Pool costs the coordinator ~0.1-0.2 ms of CPU per message
# in its helper threads whatever the payload (60 bytes or 60 KB, measured here), so in a 200-image,
# 2-worker conversion the coordinator spent 0.52-0.68 ms per image with 4 tasks a message and
# 0.29-0.37 ms with 8 or 16 (interleaved rounds, same wall time). A chunk is handed out whole, so
# the last `workers x chunk` tasks go one by one: no worker idles at the end while another still
# holds a whole chunk (up to 16 x ~25 ms).
_MAX_CHUNK = 16
_CHUNKS_PER_WORKER = 8


class RecordPool:
  """The converter's workers: `imap(tasks)` yields `_preprocess_and_frame`'s (record, reason) per
  task, in order.

  One worker runs in this process (no spawn start-up); more are a `spawn` pool (fork + OpenCV
  threads can deadlock, opencv#5150), each importing NumPy, OpenCV and skinrecords but not
  TensorFlow (0.15 s each). With `wait_ready` the constructor returns only once every worker has
  started, so a benchmark can keep start-up out of its timing. `convert` makes one per run unless
  it is given one.
  """

  def __init__(self, workers: int, config: preprocess.PreprocessConfig, wait_ready: bool = False,
               timeout: float = 300.0, sizes: tuple[int, ...] | None = None):
    """`sizes`: several output sizes (the largest is `config.image_size`); `imap` then yields a
    list of records, one per size, for each task."""
    config.validate()  # here, not in each spawned worker's first task
    self.workers, self.config, self.sizes = workers, config, sizes
    self._pool = None
    if workers == 1:
      _init_worker(config, sizes=sizes)
      return
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue() if wait_ready else None
    self._pool = ctx.Pool(workers, initializer=_init_worker, initargs=(config, ready, sizes))
    try:
      for _ in range(workers if wait_ready else 0):
        ready.get(timeout=timeout)
    except queue.Empty as err:
      self.close()
      raise RuntimeError(f"{workers} spawned workers did not all start within {timeout:.0f} s") \
          from err

  def imap(self, tasks: list[Task]):
    """Yields `_preprocess_and_frame(task)` (with `sizes`: `_preprocess_sizes`) per task, in order."""
    return self._imap(_preprocess_sizes if self.sizes else _preprocess_and_frame, tasks)

  def hashes(self, paths: list[str]):
    """Yields `_hash_file(path)` (near-duplicate hashes or None) per path, in order."""
    return self._imap(_hash_file, paths)

  def _imap(self, fn, tasks):
    if self._pool is None:
      return map(fn, tasks)
    chunk = max(1, min(_MAX_CHUNK, len(tasks) // (self.workers * _CHUNKS_PER_WORKER)))
    tail = max(0, len(tasks) - self.workers * chunk) if chunk > 1 else 0
    # Both are queued now, in this order: workers take the chunks first, then the single tasks.
    return itertools.chain(self._pool.imap(fn, tasks[:tail], chunksize=chunk),
                           self._pool.imap(fn, tasks[tail:], chunksize=1))

  def close(self) -> None:
    if self._pool is not None:
      self._pool.terminate()
      self._pool.join()
      self._pool = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
