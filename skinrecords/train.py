"""The training loop: tf.distribute + XLA, with the augmentation inside the compiled step.

Why a custom loop and not `model.fit`: Keras 3 turns XLA off in `fit` whenever a tf.distribute
strategy is active (keras#18716), and forcing it fails with a replica resource-device error. Here the
per-replica forward + backward (augmentation included) is one `jit_compile=True` function called
inside `strategy.run`; the optimizer's `apply_gradients` outside it all-reduces (sums) the gradients
across replicas and updates the mirrored weights. Per-replica losses are divided by the GLOBAL batch
so the sum is the mean over the global batch, whatever the replica count.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import pathlib
import time

import keras
import numpy as np
import tensorflow as tf

from skinrecords import augment
from skinrecords import distribute
from skinrecords import metrics
from skinrecords import models
from skinrecords import pipeline
from skinrecords import plots

BALANCE = ("none", "oversample", "class_weights")
HISTORY_FIELDS = ("epoch", "phase", "loss", "accuracy", "auc", "val_loss", "val_accuracy",
                  "val_auc", "images_per_sec", "seconds")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  records_dir: str
  model_dir: str
  model: models.ModelConfig = models.ModelConfig()
  augment: augment.AugmentConfig = augment.AugmentConfig()
  strategy: str = "auto"
  xla: bool = True
  mixed_precision: str = "auto"
  batch_size: int = 32  # global, over all replicas
  learning_rate: float = 1e-4
  fine_tune_learning_rate: float = 1e-5
  warmup_epochs: int = 0  # head only (backbone frozen) for this many epochs, then `model.freeze`
  epochs: int = 10
  steps_per_epoch: int = 0  # 0: train examples // batch_size
  fold: int | None = None
  balance: str = "none"
  seed: int = 0
  cache: bool = False
  progress: bool = True

  def validate(self) -> None:
    if self.balance not in BALANCE:
      raise ValueError(f"balance={self.balance!r}; choose one of {', '.join(BALANCE)}")
    for name in ("batch_size", "epochs"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.steps_per_epoch < 0 or not 0 <= self.warmup_epochs <= self.epochs:
      raise ValueError(f"steps_per_epoch={self.steps_per_epoch} must be >= 0 and warmup_epochs="
                       f"{self.warmup_epochs} within 0..epochs={self.epochs}")
    self.model.validate()
    self.augment.validate()

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["model"], d["augment"] = self.model.to_dict(), self.augment.to_dict()
    return d


def _loss_fn(num_classes: int):
  if num_classes == 2:
    bce = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)
    return lambda labels, logits: bce(tf.cast(labels[:, None], tf.float32), logits)
  scce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
  return scce


def _probabilities(logits):
  logits = tf.cast(logits, tf.float32)
  return tf.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else tf.nn.softmax(logits)


class Steps:
  """The compiled train and predict steps for one model/optimizer pair (rebuilt after unfreezing)."""

  def __init__(self, strategy, model, optimizer, config: TrainConfig, class_weights):
    loss_fn = _loss_fn(len(class_weights))
    global_batch = float(config.batch_size)
    weights = tf.constant(class_weights, tf.float32)
    mixed = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    aug = config.augment

    @tf.function(jit_compile=config.xla)
    def forward_backward(images, labels, seed):
      x = augment.augment_batch(images, seed, aug) if aug.enabled else tf.cast(images, tf.float32)
      with tf.GradientTape() as tape:
        logits = model(x, training=True)
        per_example = loss_fn(labels, logits) * tf.gather(weights, labels)
        loss = tf.reduce_sum(per_example) / global_batch
        scaled = optimizer.scale_loss(loss) if mixed else loss
      grads = tape.gradient(scaled, model.trainable_variables)
      return loss, grads, _probabilities(logits)

    @tf.function
    def forward(images, labels):
      logits = model(tf.cast(images, tf.float32), training=False)
      per_example = loss_fn(labels, logits)
      return per_example, _probabilities(logits)

    def replica_train(images, labels, step):
      seed = augment.replica_seed(tf.stack([tf.constant(config.seed, tf.int64), step]))
      loss, grads, probs = forward_backward(images, labels, seed)
      optimizer.apply_gradients(zip(grads, model.trainable_variables))  # all-reduce happens here
      return loss, probs, labels

    @tf.function
    def train_step(iterator, step):
      images, labels = next(iterator)
      loss, probs, labels = strategy.run(replica_train, args=(images, labels, step))
      return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
              strategy.gather(probs, axis=0), strategy.gather(labels, axis=0))

    @tf.function
    def predict_step(images, labels):
      per_example, probs = strategy.run(forward, args=(images, labels))
      return (strategy.gather(per_example, axis=0), strategy.gather(probs, axis=0),
              strategy.gather(labels, axis=0))

    self.train_step, self.predict_step = train_step, predict_step


def _scores(probs, labels, classes) -> dict:
  m = metrics.compute_metrics(probs, labels, classes)
  return {"accuracy": m["accuracy"], "auc": math.nan if m["roc_auc"] is None else m["roc_auc"]}


def _evaluate(steps: Steps, dist_ds, classes) -> dict:
  losses, probs, labels = [], [], []
  for images, lab in dist_ds:
    l, p, y = steps.predict_step(images, lab)
    losses.append(l.numpy())
    probs.append(p.numpy())
    labels.append(y.numpy())
  probs, labels = np.concatenate(probs), np.concatenate(labels)
  return {"loss": float(np.mean(np.concatenate(losses))), **_scores(probs, labels, classes)}


def _read_history(path: pathlib.Path, upto: int) -> list[dict]:
  if not path.exists():
    return []
  with open(path, newline="") as f:
    return [row for row in csv.DictReader(f) if int(row["epoch"]) <= upto]


def _write_history(path: pathlib.Path, rows: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    writer.writerows(rows)


def _make_optimizer(learning_rate: float, mixed: bool):
  opt = keras.optimizers.Adam(learning_rate)
  return keras.optimizers.LossScaleOptimizer(opt) if mixed else opt


def train(config: TrainConfig, strategy: tf.distribute.Strategy | None = None) -> dict:
  """Trains, writing model.keras (best validation AUC), config.json, history.csv, plots and
  TensorBoard logs to `config.model_dir`; resumes from its backup when restarted. Returns the
  final history row plus paths."""
  config.validate()
  strategy = strategy or distribute.make_strategy(config.strategy)
  distribute.log_strategy(strategy)
  mixed = distribute.use_mixed_precision(config.mixed_precision)
  keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
  info = pipeline.load_info(config.records_dir)
  fold = config.fold
  size = config.model.image_size
  model_config = dataclasses.replace(config.model, num_classes=info.num_classes)
  counts = info.class_counts("train", fold)
  steps_per_epoch = config.steps_per_epoch or max(
      1, info.num_examples("train", fold) // config.batch_size)
  class_weights = [1.0] * info.num_classes
  if config.balance == "class_weights":
    class_weights = [w for _, w in sorted(pipeline.class_weights(info, "train", fold).items())]
  has_valid = "valid" in info.shards if fold is None else True

  out = distribute.WriteDir(config.model_dir, distribute.is_chief(strategy))
  with strategy.scope():
    model = models.build_model(model_config, class_counts=counts if all(counts) else None)
    warm_opt = _make_optimizer(config.learning_rate, mixed)
    main_opt = _make_optimizer(config.fine_tune_learning_rate if config.warmup_epochs
                               else config.learning_rate, mixed)
    # Optimizer slots are built here, not on the first apply: a mirrored variable created lazily
    # inside the traced step fails ("must feed a value for placeholder ... fn_with_cond").
    if config.warmup_epochs:
      models.set_freeze(model, "all")
      warm_opt.build(model.trainable_variables)
    models.set_freeze(model, model_config.freeze)
    main_opt.build(model.trainable_variables)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    best_var = tf.Variable(-1.0, dtype=tf.float64, trainable=False)
  ckpt = tf.train.Checkpoint(model=model, warmup_optimizer=warm_opt, optimizer=main_opt,
                             epoch=epoch_var, best=best_var)
  manager = tf.train.CheckpointManager(ckpt, str(out.path / "backup"), max_to_keep=1)
  if manager.latest_checkpoint:
    ckpt.restore(manager.latest_checkpoint).expect_partial()
    logging.info("resuming from %s at epoch %d", manager.latest_checkpoint, int(epoch_var.numpy()))
  start = int(epoch_var.numpy())
  history = _read_history(out.path / "history.csv", start)
  run_config = {"classes": list(info.classes), "image_size": size,
                "records_dir": str(config.records_dir), "fold": fold,
                "preprocessing": (info.manifest or {}).get("preprocessing"),
                "model": model_config.to_dict(), "train": config.to_dict(),
                "replicas": strategy.num_replicas_in_sync, "mixed_precision": mixed}
  (out.path / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")

  train_ds = strategy.distribute_datasets_from_function(pipeline.input_fn(
      info, "train", config.batch_size, training=True, image_size=size, fold=fold,
      balance="oversample" if config.balance == "oversample" else None,
      seed=config.seed + start, cache=config.cache))
  valid_ds = None
  if has_valid:
    valid_ds = strategy.experimental_distribute_dataset(pipeline.make_dataset(
        info, "valid", config.batch_size, training=False, image_size=size, fold=fold))
  iterator = iter(train_ds)
  writer = tf.summary.create_file_writer(str(out.path / "logs")) if out.chief else None
  phase, steps = None, None
  result = {}
  for epoch in range(start, config.epochs):
    new_phase = "warmup" if epoch < config.warmup_epochs else "train"
    if new_phase != phase:
      phase = new_phase
      models.set_freeze(model, "all" if phase == "warmup" else model_config.freeze)
      steps = Steps(strategy, model, warm_opt if phase == "warmup" else main_opt, config,
                     class_weights)
    row = _run_epoch(steps, iterator, epoch, steps_per_epoch, config, valid_ds, info.classes)
    row["phase"] = phase
    history.append(row)
    score = row["val_auc"] if valid_ds is not None else -row["loss"]
    if np.isfinite(score) and score > float(best_var.numpy()) or not (out.path / "model.keras").exists():
      best_var.assign(score if np.isfinite(score) else -1.0)
      model.save(out.path / "model.keras")
    # History before the backup: a kill in between leaves a row that the resumed run drops.
    _write_history(out.path / "history.csv", history)
    epoch_var.assign(epoch + 1)
    manager.save()
    if writer:
      with writer.as_default(step=epoch + 1):
        for k, v in row.items():
          if isinstance(v, float):
            tf.summary.scalar(k, v)
    plots.plot_history(history, out.path)
    logging.info("epoch %d/%d %s", epoch + 1, config.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
    result = dict(row)
  out.cleanup()
  result.update(model_dir=str(out.path), epochs_run=config.epochs - start)
  return result


def _run_epoch(steps: Steps, iterator, epoch: int, num_steps: int, config: TrainConfig,
               valid_ds, classes) -> dict:
  import tqdm  # pylint: disable=g-import-not-at-top

  losses, probs, labels = [], [], []
  bar = tqdm.tqdm(total=num_steps, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                  disable=not config.progress, leave=True)
  t0 = time.perf_counter()
  for s in range(num_steps):
    step = tf.constant(epoch * num_steps + s, tf.int64)
    loss, p, y = pipeline_guard(steps.train_step, iterator, step, config.records_dir)
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
  train_m = _scores(np.concatenate(probs), np.concatenate(labels), classes)
  row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "accuracy": train_m["accuracy"],
         "auc": train_m["auc"], "images_per_sec": float(ips), "seconds": float(seconds)}
  if valid_ds is not None:
    val = _evaluate(steps, valid_ds, classes)
    row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], val_auc=val["auc"])
  else:
    row.update(val_loss=float("nan"), val_accuracy=float("nan"), val_auc=float("nan"))
  return row


def pipeline_guard(fn, iterator, step, records_dir):
  """Calls a train step; a corrupt shard's anonymous DataLossError becomes one naming the file."""
  try:
    return fn(iterator, step)
  except tf.errors.DataLossError as err:
    info = pipeline.load_info(records_dir)
    files = [s.path for shards in info.shards.values() for s in shards]
    raise pipeline.corrupt_shard_error(files, err, records_dir) from err
