"""The training loop: tf.distribute + XLA, with the augmentation inside the compiled step.

Why a custom loop and not `model.fit`: Keras 3 turns XLA off in `fit` whenever a tf.distribute
strategy is active (keras#18716), and forcing it fails with a replica resource-device error. Here the
per-replica forward + backward (augmentation included) is one `jit_compile=True` function called
inside `strategy.run`; the optimizer's `apply_gradients` outside it all-reduces (sums) the gradients
across replicas and updates the mirrored weights. Per-replica losses are divided by the GLOBAL batch
so the sum is the mean over the global batch, whatever the replica count.

Multi-worker (MultiWorkerMirroredStrategy, one process per host): every worker runs the same number
of steps (the training input repeats forever and each epoch is `steps_per_epoch` steps, so no worker
meets an uneven last batch, tensorflow#36153); only the chief writes model.keras, history, plots,
config.json and TensorBoard logs; every worker takes part in each backup save (collective saving),
the chief into MODEL_DIR/backup and the others into temporary folders they remove; on restart every
worker restores the chief's backup (MODEL_DIR must be on a filesystem all workers see).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time

import keras
import numpy as np
import tensorflow as tf

from skinrecords import augment
from skinrecords import data_service
from skinrecords import distribute
from skinrecords import inference
from skinrecords import metrics
from skinrecords import manifest
from skinrecords import models
from skinrecords import pipeline
from skinrecords import plots
from skinrecords import rundir

BALANCE = ("none", "oversample", "class_weights")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  records_dir: str
  model_dir: str
  model: models.ModelConfig = models.ModelConfig()
  augment: augment.AugmentConfig = augment.AugmentConfig()
  strategy: str = "auto"
  xla: str = "auto"  # auto | on | off | augment (distribute.resolve_xla)
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
  data_service: str = ""  # grpc://host:port of a tf.data service dispatcher for the train input

  def validate(self) -> None:
    if self.balance not in BALANCE:
      raise ValueError(f"balance={self.balance!r}; choose one of {', '.join(BALANCE)}")
    for name in ("batch_size", "epochs"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.steps_per_epoch < 0 or not 0 <= self.warmup_epochs <= self.epochs:
      raise ValueError(f"steps_per_epoch={self.steps_per_epoch} must be >= 0 and warmup_epochs="
                       f"{self.warmup_epochs} within 0..epochs={self.epochs}")
    if self.data_service:
      data_service.parse_address(self.data_service, "data_service")
      if self.cache:
        raise ValueError(f"cache=True with data_service={self.data_service!r}: each tf.data "
                         "worker would cache only the files it happened to get; drop cache")
    if self.xla not in distribute.XLA_SETTINGS:
      raise ValueError(f"xla={self.xla!r}; choose one of {', '.join(distribute.XLA_SETTINGS)}")
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


class Steps:
  """The compiled train and predict steps for one model/optimizer pair (rebuilt after unfreezing)."""

  def __init__(self, strategy, model, optimizer, config: TrainConfig, class_weights,
               xla_mode: str | None = None):
    xla_mode = xla_mode or distribute.resolve_xla(config.xla, distribute.replica_devices(strategy),
                                                  config.augment.enabled)
    loss_fn = _loss_fn(len(class_weights))
    global_batch = float(config.batch_size)
    weights = tf.constant(class_weights, tf.float32)
    mixed = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    aug = config.augment

    # "augment": the warp compiled on its own (it needs XLA: ~5x faster at 512 px), the model on
    # TensorFlow's oneDNN kernels (an XLA conv net ran at ~0.5x of them on the CPU).
    @tf.function(jit_compile=xla_mode != "off")
    def augment_fn(images, seed):
      return augment.augment_batch(images, seed, aug)

    @tf.function(jit_compile=xla_mode == "on")
    def forward_backward(images, labels, seed):
      x = augment_fn(images, seed) if aug.enabled else tf.cast(images, tf.float32)
      with tf.GradientTape() as tape:
        logits = model(x, training=True)
        per_example = loss_fn(labels, logits) * tf.gather(weights, labels)
        loss = tf.reduce_sum(per_example) / global_batch
        scaled = optimizer.scale_loss(loss) if mixed else loss
      grads = tape.gradient(scaled, model.trainable_variables)
      return loss, grads, inference.probabilities(logits)

    # Not XLA-compiled on purpose: a jit-compiled forward inside strategy.run failed under
    # MirroredStrategy on 2 logical CPUs ("Trying to access resource .../replica_1 ... from device
    # CPU:0"), while the jit-compiled forward + backward above works.
    @tf.function
    def forward(images, labels):
      logits = model(tf.cast(images, tf.float32), training=False)
      # Padding examples carry label -1 (distribute.valid_input); a sparse cross-entropy rejects
      # negative labels, so they are scored as class 0 here and dropped after the gather.
      per_example = loss_fn(tf.maximum(labels, 0), logits)
      return per_example, inference.probabilities(logits)

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


def _evaluate(steps: Steps, valid: distribute.ValidInput, classes) -> dict:
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
  return {"loss": float(np.mean(losses[real])), **_scores(probs[real], labels[real], classes)}


def _make_optimizer(learning_rate: float, mixed: bool):
  opt = keras.optimizers.Adam(learning_rate)
  return keras.optimizers.LossScaleOptimizer(opt) if mixed else opt


def train(config: TrainConfig, strategy: tf.distribute.Strategy | None = None) -> dict:
  """Trains, writing model.keras (best validation AUC), config.json, history.csv, plots and
  TensorBoard logs to `config.model_dir` (the chief only, under multi-worker training); resumes
  from its backup when restarted. Returns the final history row plus paths."""
  config.validate()
  strategy = strategy or distribute.make_strategy(config.strategy)
  distribute.log_strategy(strategy)
  replicas = strategy.num_replicas_in_sync
  if config.batch_size % replicas:
    raise ValueError(f"batch_size={config.batch_size} does not split evenly over {replicas} "
                     f"replicas; use a multiple of {replicas}")
  out = distribute.WriteDir(config.model_dir, distribute.is_chief(strategy),
                            tag=distribute.task_name(strategy))
  try:
    return _train(config, strategy, out)
  finally:
    out.cleanup()


def _train(config: TrainConfig, strategy: tf.distribute.Strategy,
           out: distribute.WriteDir) -> dict:
  mixed = distribute.use_mixed_precision(config.mixed_precision)
  devices = distribute.replica_devices(strategy)
  xla_mode = distribute.resolve_xla(config.xla, devices, config.augment.enabled)
  logging.info("XLA: %s (xla=%s on %s)", xla_mode, config.xla, ", ".join(devices))
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
    class_weights = [w for _, w in sorted(manifest.class_weights(info, "train", fold).items())]
  has_valid = "valid" in info.shards if fold is None else True
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
    best_var = tf.Variable(-np.inf, dtype=tf.float64, trainable=False)
  ckpt = tf.train.Checkpoint(model=model, warmup_optimizer=warm_opt, optimizer=main_opt,
                             epoch=epoch_var, best=best_var)
  # Saves go to this process's folder (a temporary one off the chief); restores always read the
  # chief's backup, so every worker resumes from the same state.
  manager = tf.train.CheckpointManager(ckpt, str(out.path / rundir.BACKUP_DIR), max_to_keep=1)
  latest = tf.train.latest_checkpoint(str(pathlib.Path(config.model_dir) / rundir.BACKUP_DIR))
  if latest:
    ckpt.restore(latest).expect_partial()
    logging.info("resuming from %s at epoch %d", latest, int(epoch_var.numpy()))
  start = int(epoch_var.numpy())
  workers = distribute.num_workers(strategy)
  if workers > 1 and not distribute.same_on_all_workers(strategy, start):
    raise RuntimeError(f"workers restored different epochs from {config.model_dir}/backup "
                       f"(this one: {start}); model_dir must be on a filesystem shared by all "
                       "workers")
  history = rundir.read_history(out.path, start) if out.chief else []
  if out.chief:
    run_config = {"classes": list(info.classes), "image_size": size,
                  "records_dir": str(config.records_dir), "fold": fold,
                  "preprocessing": (info.manifest or {}).get("preprocessing"),
                  "model": model_config.to_dict(), "train": config.to_dict(),
                  "replicas": strategy.num_replicas_in_sync, "workers": workers,
                  "mixed_precision": mixed, "xla": xla_mode}
    rundir.write_config(out.path, run_config)

  kwargs = dict(training=True, image_size=size, fold=fold, seed=config.seed + start,
                balance="oversample" if config.balance == "oversample" else None,
                cache=config.cache)
  # With a tf.data service, one job per run and resumed epoch, shared by all trainers.
  job = (f"{pathlib.Path(config.model_dir).resolve()}|{info.records_dir}|{fold}|{config.seed}|"
         f"{start}")
  iterator = iter(distribute.train_input(strategy, info, config.batch_size, config.data_service,
                                         job, **kwargs))
  valid = (distribute.valid_input(strategy, info, config.batch_size, size, fold) if has_valid
           else None)
  writer = tf.summary.create_file_writer(str(out.path / rundir.LOGS_DIR)) if out.chief else None
  phase, steps = None, None
  result = dict(history[-1]) if history else {}
  for epoch in range(start, config.epochs):
    new_phase = "warmup" if epoch < config.warmup_epochs else "train"
    if new_phase != phase:
      phase = new_phase
      models.set_freeze(model, "all" if phase == "warmup" else model_config.freeze)
      steps = Steps(strategy, model, warm_opt if phase == "warmup" else main_opt, config,
                    class_weights, xla_mode)
    row = _run_epoch(steps, iterator, epoch, steps_per_epoch, config, valid, info)
    row["phase"] = phase
    history.append(row)
    # Every worker gathered the same predictions, so every worker takes the same decision here.
    score = row["val_auc"] if valid is not None else -row["loss"]
    improved = bool(np.isfinite(score) and score > float(best_var.numpy()))
    if improved:
      best_var.assign(score)
    if out.chief:
      if improved or not (out.path / rundir.MODEL_FILE).exists():
        rundir.save_model(model, out.path)
      # History before the backup: a kill in between leaves a row that the resumed run drops.
      rundir.write_history(out.path, history)
    epoch_var.assign(epoch + 1)
    manager.save()  # on every worker: saving takes part in collectives
    if writer:
      with writer.as_default(step=epoch + 1):
        for k, v in row.items():
          if isinstance(v, float):
            tf.summary.scalar(k, v)
    if out.chief:
      plots.plot_history(history, out.path)
    logging.info("epoch %d/%d %s", epoch + 1, config.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
    result = dict(row)
  digest = distribute.weights_digest(model.get_weights())
  logging.info("final weights sha256 %s (%s)", digest, distribute.task_name(strategy))
  result.update(model_dir=str(config.model_dir), epochs_run=config.epochs - start,
                weights_sha256=digest, chief=out.chief)
  # Measured with 2 workers on one host: destroying the training iterator blocked 0-10 s in a
  # tf.data thread join on one worker or the other. Destroy it here, then wait for every worker,
  # so that no worker leaves the cluster while another still needs it (the one left behind logs
  # "tasks are unhealthy" errors otherwise).
  del iterator
  if workers > 1:
    distribute.same_on_all_workers(strategy, config.epochs)
  return result


def _run_epoch(steps: Steps, iterator, epoch: int, num_steps: int, config: TrainConfig,
               valid, info: manifest.DatasetInfo) -> dict:
  import tqdm  # pylint: disable=g-import-not-at-top

  losses, probs, labels = [], [], []
  bar = tqdm.tqdm(total=num_steps, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                  disable=not config.progress, leave=True)
  t0 = time.perf_counter()
  for s in range(num_steps):
    step = tf.constant(epoch * num_steps + s, tf.int64)
    loss, p, y = pipeline_guard(steps.train_step, iterator, step, info)
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
  train_m = _scores(np.concatenate(probs), np.concatenate(labels), info.classes)
  row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "accuracy": train_m["accuracy"],
         "auc": train_m["auc"], "images_per_sec": float(ips), "seconds": float(seconds)}
  if valid is not None:
    val = _evaluate(steps, valid, info.classes)
    row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], val_auc=val["auc"])
  else:
    row.update(val_loss=float("nan"), val_accuracy=float("nan"), val_auc=float("nan"))
  return row


def pipeline_guard(fn, iterator, step, info: manifest.DatasetInfo):
  """Calls a train step; a corrupt shard's anonymous DataLossError becomes one naming the file."""
  try:
    return fn(iterator, step)
  except tf.errors.DataLossError as err:
    files = [s.path for shards in info.shards.values() for s in shards]
    raise pipeline.corrupt_shard_error(files, err, info.records_dir) from err
