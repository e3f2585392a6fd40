"""Feeding training under any tf.distribute strategy: `train_input` (per-worker file sharding, or a
tf.data service) and `valid_input` (exactly-once padded shares for validation). `data_service.serve`
runs a tf.data service dispatcher or worker (`bin/data_service`), so decoding can run on separate
CPU machines.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from skinrecords.core import manifest
from skinrecords.core import metadata as md
from skinrecords.input import data_service
from skinrecords.input import metadata_input as input_metadata
from skinrecords.input import pipeline
from skinrecords.training import distribute


class ValidInput(NamedTuple):
  dataset: tf.distribute.DistributedDataset
  steps: int  # the same on every worker
  examples: int  # real ones, padding excluded


def valid_input(strategy: tf.distribute.Strategy, info: manifest.DatasetInfo, batch_size: int,
                image_size: int, fold: int | None = None,
                metadata: md.MetadataSpec | None = None) -> ValidInput:
  """The validation split for `strategy`, every example scored exactly once, hang-free.

  Every worker predicts its own share and the predictions are gathered. Shares differ in size (24
  records over 2 workers are 12 + 12, but 5 files of 18 are 54 + 36), and a worker that runs out
  of batches first leaves the others waiting in a collective forever (tensorflow#36153). So every
  worker pads its share with label -1 examples to the same number of full batches, `steps`, and
  the caller drops label -1 after the gather. (The alternative, every worker predicting the whole
  set alone, needs no collectives but costs every worker the full validation time.) The bound on a
  share covers both ways the pipeline shards: by file when there are at least as many files as
  workers, else by record. `batch_size` is global. With `metadata`, padding examples carry a zero
  metadata vector (dropped after scoring like their blank image).
  """
  shards = info.select("valid", fold)
  total = sum(s.num_examples for s in shards)
  workers = distribute.num_workers(strategy)
  per_replica = batch_size // strategy.num_replicas_in_sync
  per_step = per_replica * (strategy.num_replicas_in_sync // workers)  # one worker, one step
  share = -(-total // workers)
  if len(shards) >= workers:
    share = max(share, max(sum(s.num_examples for s in shards[i::workers])
                           for i in range(workers)))
  steps = max(1, -(-share // per_step))

  def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    ds = pipeline.make_dataset(info, "valid", per_replica, training=False, image_size=image_size,
                               fold=fold, input_context=ctx, metadata=metadata)
    blank = tf.zeros((image_size, image_size, 3), tf.uint8)
    blank = input_metadata.as_input(blank, input_metadata.pad_value(metadata) if metadata
                                    else None)
    pad = tf.data.Dataset.from_tensors((blank, tf.constant(-1, tf.int32))).repeat()
    ds = ds.unbatch().concatenate(pad).take(steps * per_step)
    return ds.batch(per_replica, drop_remainder=True).prefetch(pipeline.AUTOTUNE)

  return ValidInput(strategy.distribute_datasets_from_function(fn), steps, total)


def train_input(strategy: tf.distribute.Strategy, info: manifest.DatasetInfo, batch_size: int,
                service_address: str = "", job_key: str = "", **kwargs):
  """Training batches (`batch_size` global), endless; `kwargs` go to `pipeline.make_dataset`.

  Without `data_service`, each worker reads its own files (pipeline.make_dataset shards by file
  when there are enough, and logs which). With `service_address` (grpc://host:port of a dispatcher),
  the pipeline runs on the tf.data service workers: the dispatcher hands whole files to them on
  demand (dynamic sharding: each file once per pass over the data; files a tf.data worker held when
  it died are not handed out again, so at-most-once under failures), and every trainer joins one
  job named from `job_key`, so each batch reaches exactly one trainer.
  """
  if not service_address:
    return strategy.distribute_datasets_from_function(
        pipeline.input_fn(info, "train", batch_size, **kwargs))
  return strategy.distribute_datasets_from_function(
      data_service.service_input_fn(info, batch_size, service_address, job_key, **kwargs))
