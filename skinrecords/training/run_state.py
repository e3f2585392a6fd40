"""A training run's checkpointed state: the model, its two optimizers and the counters.

What `train` backs up every epoch (MODEL_DIR/backup) and restores on a restart: the weights, both
optimizers' slots and step counts (the head-only warm-up has its own optimizer), the epoch, and
the best epoch with its score and tie-break (selection.py), so a resumed run keeps choosing the
saved model by the same rule as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging

import keras
import numpy as np
import tensorflow as tf

from skinrecords.core import fileio
from skinrecords.core import rundir
from skinrecords.model import models
from skinrecords.model import recipes
from skinrecords.training import distribute


@dataclasses.dataclass
class State:
  """The model, its optimizers and the checkpointed counters (epoch, best epoch and its score)."""
  model: keras.Model
  warm_opt: keras.optimizers.Optimizer
  main_opt: keras.optimizers.Optimizer
  epoch: tf.Variable
  best: tf.Variable
  best_tiebreak: tf.Variable
  best_epoch: tf.Variable
  checkpoint: tf.train.Checkpoint


def phase_steps(config, steps_per_epoch: int) -> dict:
  """Optimizer steps of the head-only warm-up and of the main phase (each has its optimizer)."""
  return {"head-only warm-up": config.warmup_epochs * steps_per_epoch,
          "training": (config.epochs - config.warmup_epochs) * steps_per_epoch}


def build(model: keras.Model, config, freeze: str, steps_per_epoch: int, mixed: bool) -> State:
  """Optimizers and counters for `model` (a train.TrainConfig's recipe); call in strategy.scope()."""
  if config.recipe.sync_batchnorm:
    logging.info("synchronised BatchNorm: %d layers, trained on Keras' unfused code (the fused "
                 "kernel cannot all-reduce its moments; inference stays fused)",
                 recipes.synchronize_batchnorm(model, True))
  warm_steps, main_steps = phase_steps(config, steps_per_epoch).values()
  warm_opt = recipes.make_optimizer(config, config.learning_rate, warm_steps, mixed)
  main_opt = recipes.make_optimizer(
      config, config.fine_tune_learning_rate if config.warmup_epochs else config.learning_rate,
      main_steps, mixed)
  # Optimizer slots are built here, not on the first apply: a mirrored variable created lazily
  # inside the traced step fails ("must feed a value for placeholder ... fn_with_cond").
  if config.warmup_epochs:
    models.set_freeze(model, "all")
    warm_opt.build(model.trainable_variables)
  models.set_freeze(model, freeze)
  main_opt.build(model.trainable_variables)
  counters = [tf.Variable(0, dtype=tf.int64, trainable=False),
              tf.Variable(-np.inf, dtype=tf.float64, trainable=False),
              tf.Variable(-np.inf, dtype=tf.float64, trainable=False),
              tf.Variable(0, dtype=tf.int64, trainable=False)]
  ckpt = tf.train.Checkpoint(model=model, warmup_optimizer=warm_opt, optimizer=main_opt,
                             epoch=counters[0], best=counters[1], best_tiebreak=counters[2],
                             best_epoch=counters[3])
  return State(model, warm_opt, main_opt, *counters, ckpt)


def restore(model_dir: str, strategy, state: State, workers: int) -> int:
  """Restores the chief's backup if there is one; returns the number of epochs already done."""
  latest = tf.train.latest_checkpoint(fileio.join(model_dir, rundir.BACKUP_DIR))
  if latest:
    try:
      state.checkpoint.restore(latest).expect_partial()
    except (ValueError, tf.errors.OpError) as err:
      raise rundir.RunDirError(
          f"{model_dir}/{rundir.BACKUP_DIR} does not fit this model "
          f"({str(err).splitlines()[0][:200]}); use another --model_dir, or --overwrite") from err
    logging.info("resuming from %s at epoch %d (optimizer step %d, weights sha256 %s)", latest,
                 int(state.epoch.numpy()), int(state.main_opt.iterations.numpy()),
                 distribute.weights_digest(state.model.get_weights()))
  start = int(state.epoch.numpy())
  if workers > 1 and not distribute.same_on_all_workers(strategy, start):
    raise RuntimeError(f"workers restored different epochs from {model_dir}/backup "
                       f"(this one: {start}); model_dir must be on a filesystem shared by all "
                       "workers")
  return start
