"""The compiled per-replica train and predict steps, and one epoch of them (train.py drives these).

The per-replica forward + backward (augmentation included) is one `jit_compile=True` function
called inside `strategy.run`; the optimizer's `apply_gradients` outside it all-reduces (sums) the
gradients across replicas and updates the mirrored weights. Per-replica losses are divided by the
GLOBAL batch so the sum is the mean over the global batch, whatever the replica count. `config` is
a train.TrainConfig (read for xla, augment, seed, batch_size, epochs, progress and the loss
recipe: recipes.loss_fn). With xla_mode "on" the validation forward pass is XLA-compiled per
replica too, as a pure function of the weights (`_predict_forward_fn` says why).
"""

from __future__ import annotations

import logging
import math
import time

import keras
import numpy as np
import tensorflow as tf

from skinrecords.core import manifest
from skinrecords.evaluation import metrics
from skinrecords.input import augment
from skinrecords.input import metadata_input as input_metadata
from skinrecords.input import pipeline
from skinrecords.model import inference
from skinrecords.model import recipes
from skinrecords.model import xla
from skinrecords.training import distribute
from skinrecords.training import feeding


class CompiledSteps:
  """The compiled train and predict steps for one model/optimizer pair (rebuilt after unfreezing).

  `train_step(iterator, step)` -> (global mean loss, gathered probabilities, gathered labels);
  `predict_step(images, labels)` -> (gathered per-example losses, probabilities, labels).
  """

  def __init__(self, strategy, model, optimizer, config, class_weights,
               xla_mode: str | None = None):
    xla_mode = xla_mode or xla.resolve_xla(config.xla, distribute.replica_devices(strategy),
                                                  config.augment.enabled)
    # The recipe's loss (label smoothing, focal) trains; validation scores plain cross-entropy.
    # A synchronised BatchNorm all-reduces inside the forward pass; under a nested tf.function
    # that all-reduce fails ("`merge_call` called while defining a new graph"), so the forward +
    # backward is then traced inline into train_step (and cannot be XLA-compiled).
    inline = config.recipe.sync_batchnorm and strategy.num_replicas_in_sync > 1
    if inline and xla_mode == "on":
      raise ValueError(f"sync_batchnorm over {strategy.num_replicas_in_sync} replicas cannot run in "
                       "an XLA-compiled forward pass; use xla=augment or xla=off")
    forward_backward = _forward_backward_fn(model, optimizer, config, class_weights,
                                            recipes.loss_fn(len(class_weights), config), xla_mode,
                                            inline)
    loss_fn = recipes.loss_fn(len(class_weights))

    def replica_train(images, labels, step):
      seed = augment.replica_seed(tf.stack([tf.constant(config.seed, tf.int64), step]))
      loss, grads, probs = forward_backward(images, labels, seed)
      optimizer.apply_gradients(zip(grads, model.trainable_variables))  # all-reduce happens here
      return loss, probs, labels

    @tf.function(autograph=False)
    def train_step(iterator, step):
      images, labels = next(iterator)
      loss, probs, labels = strategy.run(replica_train, args=(images, labels, step))
      return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
              strategy.gather(probs, axis=0), strategy.gather(labels, axis=0))

    forward = _predict_forward_fn(model, loss_fn, jit=xla_mode == "on")

    @tf.function(autograph=False)
    def predict_step(images, labels):
      per_example, probs = strategy.run(forward, args=(images, labels))
      return (strategy.gather(per_example, axis=0), strategy.gather(probs, axis=0),
              strategy.gather(labels, axis=0))

    self.train_step, self.predict_step = train_step, predict_step


def _forward_backward_fn(model, optimizer, config, class_weights, loss_fn, xla_mode: str,
                         inline: bool = False):
  """Augmentation + forward + backward for one replica's batch, compiled per `xla_mode` (or, with
  `inline`, a plain function traced into the caller's graph)."""
  global_batch = float(config.batch_size)
  weights = tf.constant(class_weights, tf.float32)
  mixed = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
  aug = config.augment

  # "augment": the warp compiled on its own (it needs XLA: ~5x faster at 512 px), the model on
  # TensorFlow's oneDNN kernels (an XLA conv net ran at ~0.5x of them on the CPU).
  @tf.function(jit_compile=xla_mode != "off", autograph=False)
  def augment_fn(images, seed):
    return augment.augment_batch(images, seed, aug)

  def forward_backward(images, labels, seed):
    # With metadata `images` is {"image", "metadata"}: only the pixels are augmented.
    pixels = input_metadata.image_of(images)
    x = input_metadata.with_image(images, augment_fn(pixels, seed) if aug.enabled
                                  else tf.cast(pixels, tf.float32))
    with tf.GradientTape() as tape:
      logits = model(x, training=True)
      per_example = loss_fn(labels, logits) * tf.gather(weights, labels)
      loss = tf.reduce_sum(per_example) / global_batch
      scaled = optimizer.scale_loss(loss) if mixed else loss
    grads = tape.gradient(scaled, model.trainable_variables)
    return loss, grads, inference.probabilities(logits)
  return forward_backward if inline else tf.function(forward_backward, autograph=False,
                                                     jit_compile=xla_mode == "on")


def _predict_forward_fn(model, loss_fn, jit: bool):
  """One replica's validation forward pass: (images, labels) -> (per-example losses, probabilities).

  With `jit`, XLA compiles a pure function of the weights (`model.stateless_call`) and each replica
  reads its own copy outside it: compiling `model(x)`, which captures the mirrored variables,
  failed under MirroredStrategy ("Trying to access resource ... located in device CPU:1 from device
  CPU:0"; BUILD_NOTES "Validation forward pass under XLA"). Only for xla_mode "on" (auto: GPUs and
  TPUs): on 2 logical CPUs the compiled pass took 1.4-1.9x the time of TensorFlow's kernels.
  """

  def scored(logits, labels):
    # Padding examples carry label -1 (feeding.valid_input); a sparse cross-entropy rejects
    # negative labels, so they are scored as class 0 here and dropped after the gather.
    return loss_fn(tf.maximum(labels, 0), logits), inference.probabilities(logits)

  if not jit:
    @tf.function(autograph=False)
    def forward(images, labels):
      return scored(model(_as_float(images), training=False), labels)
    return forward

  @tf.function(jit_compile=True, autograph=False)
  def pure_forward(trainable, non_trainable, images, labels):
    logits, _ = model.stateless_call(trainable, non_trainable, _as_float(images),
                                     training=False)
    return scored(logits, labels)

  def forward(images, labels):
    # Read here, in the replica context: each replica's own copy, on its own device.
    return pure_forward([tf.identity(v.value) for v in model.trainable_variables],
                        [tf.identity(v.value) for v in model.non_trainable_variables],
                        images, labels)
  return forward


def _as_float(images):
  """The model input with its pixels as float32 (the metadata vector already is)."""
  return input_metadata.with_image(images, tf.cast(input_metadata.image_of(images), tf.float32))


def scores(probs, labels, classes) -> dict:
  """Accuracy and ROC AUC (NaN when undefined) for the training curves."""
  # No bootstrap: per-epoch curves, not reported figures (1,000 resamples per epoch would cost
  # more than a small epoch).
  m = metrics.compute_metrics(probs, labels, classes, bootstrap=0)
  return {"accuracy": m["accuracy"], "auc": math.nan if m["roc_auc"] is None else m["roc_auc"]}


def evaluate(steps: CompiledSteps, valid: feeding.ValidInput, classes) -> dict:
  """Validation loss, accuracy and AUC over every real (unpadded) example, exactly once."""
  dist_ds, num_steps, total = valid
  losses, probs, labels = [], [], []
  iterator = iter(dist_ds)
  for _ in range(num_steps):  # the same count on every worker: no end-of-data collective
    images, lab = next(iterator)
    l, p, y = steps.predict_step(images, lab)
    losses.append(l.numpy())
    probs.append(p.numpy())
    labels.append(y.numpy())
  losses, probs, labels = np.concatenate(losses), np.concatenate(probs), np.concatenate(labels)
  real = labels >= 0
  if int(real.sum()) != total:
    raise RuntimeError(f"validation scored {int(real.sum())} examples but the manifest lists "
                       f"{total}: the per-worker shares were not exactly-once")
  logging.info("validated %d examples", total)
  return {"loss": float(np.mean(losses[real])), **scores(probs[real], labels[real], classes)}


def run_epoch(steps: CompiledSteps, iterator, epoch: int, num_steps: int, config,
              valid, info: manifest.DatasetInfo) -> dict:
  """`num_steps` train steps, then validation: one history row."""
  import tqdm  # pylint: disable=g-import-not-at-top

  losses, probs, labels = [], [], []
  bar = tqdm.tqdm(total=num_steps, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                  disable=not config.progress, leave=True)
  t0 = time.perf_counter()
  for s in range(num_steps):
    step = tf.constant(epoch * num_steps + s, tf.int64)
    loss, p, y = call_naming_corrupt_shard(steps.train_step, iterator, step, info)
    losses.append(float(loss))
    probs.append(p.numpy())
    labels.append(y.numpy())
    if s == 0:
      t_first = time.perf_counter()  # excludes tracing/XLA compilation from images/s
    bar.update(1)
    bar.set_postfix(loss=f"{np.mean(losses):.4f}")
  seconds = time.perf_counter() - t0
  timed = time.perf_counter() - t_first
  ips = (num_steps - 1) * config.batch_size / timed if num_steps > 1 and timed > 0 else (
      config.batch_size / seconds)
  bar.set_postfix(loss=f"{np.mean(losses):.4f}", img_s=f"{ips:.0f}")
  bar.close()
  train_m = scores(np.concatenate(probs), np.concatenate(labels), info.classes)
  row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "accuracy": train_m["accuracy"],
         "auc": train_m["auc"], "images_per_sec": float(ips), "seconds": float(seconds)}
  val = (call_naming_corrupt_shard(lambda *_: evaluate(steps, valid, info.classes), None, None,
                                   info) if valid is not None
         else {"loss": math.nan, "accuracy": math.nan, "auc": math.nan})
  row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], val_auc=val["auc"])
  return row


def call_naming_corrupt_shard(fn, iterator, step, info: manifest.DatasetInfo):
  """Calls a train step; a corrupt shard's anonymous DataLossError becomes one naming the file."""
  try:
    return fn(iterator, step)
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
    files = [s.path for split in manifest.SPLITS for s in info.shards.get(split, [])]
    named = pipeline.read_error(err, files, info.records_dir)
    if named is None:
      raise
    raise named from err
