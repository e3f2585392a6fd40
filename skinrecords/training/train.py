"""The training loop: tf.distribute + XLA, with the augmentation inside the compiled step.

Why a custom loop and not `model.fit`: Keras 3 turns XLA off in `fit` whenever a tf.distribute
strategy is active (keras#18716), and forcing it fails with a replica resource-device error. Here the
per-replica forward + backward (augmentation included) is one `jit_compile=True` function called
inside `strategy.run` (steps.py), and this module runs the epochs around it.

A run is reproducible from its seed: initialisation, input order and augmentation all derive from
`seed`; with `deterministic=True` the ops too (bit-identical weights on the CPU). A run directory
holds one run: resuming checks the records' fingerprint, backbone, image size, classes and fold
against its config.json (`overwrite=True` starts afresh instead), and summary.json says which epoch
model.keras holds and why (selection.SELECTION).

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
import time

import keras
import tensorflow as tf
# TF 2.21 exports enable_op_determinism only; its query and switch-off live here.
from tensorflow.python.framework import config as tf_framework_config

from skinrecords.core import fileio
from skinrecords.core import manifest
from skinrecords.core import metadata as md
from skinrecords.core import rundir
from skinrecords.evaluation import plots
from skinrecords.evaluation import thresholds
from skinrecords.input import augment
from skinrecords.input import data_service
from skinrecords.input import metadata_input as input_metadata
from skinrecords.input import pipeline
from skinrecords.model import models
from skinrecords.model import recipes
from skinrecords.model import xla
from skinrecords.training import distribute
from skinrecords.training import feeding
from skinrecords.training import run_state
from skinrecords.training import selection
from skinrecords.training import steps as steps_lib

BALANCE = ("none", "oversample", "class_weights")
DETERMINISTIC = ("auto", "on", "off", True, False)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  records_dir: str
  model_dir: str
  model: models.ModelConfig = models.ModelConfig()
  augment: augment.AugmentConfig = augment.AugmentConfig()
  strategy: str = "auto"
  xla: str = "auto"  # auto | on | off | augment (xla.resolve_xla)
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
  # Op determinism (tf.config.experimental.enable_op_determinism) for bit-identical runs from one
  # seed; it also forces tf.data's interleave and map into order. True/"on", False/"off", or
  # "auto": on without a GPU, where it cost <= 5 % (BUILD_NOTES, "Deterministic training"); off on
  # GPUs, where deterministic cuDNN/XLA kernels can be much slower and some ops have none.
  deterministic: bool | str = "auto"
  # Which epoch model.keras keeps: selection.RULES, or "auto" (selection.DEFAULT; cv.run_cv
  # makes it "last" for its folds, so that no fold's validation images choose its epoch).
  select_by: str = "auto"
  # The two-class decision threshold chosen on validation after training (thresholds.py).
  threshold_rule: str = "youden"
  overwrite: bool = False  # start afresh in a model_dir holding another run, instead of refusing
  # The recipe (optimizer, schedule, loss, sync BatchNorm, early stopping): recipes.RecipeConfig.
  recipe: recipes.RecipeConfig = recipes.RecipeConfig()
  # A model.keras found damaged on resume, whose best epoch backup/ no longer holds, is replaced by
  # backup/'s epoch (summary.json then names that epoch); without it such a resume is refused.
  restore_model: bool = False
  # Patient metadata as a second model input (issue 24): "" (none), "all" (every column the records
  # hold) or "COL,COL"; encoded with the training split's statistics (fold k's training part with
  # fold=k), which MODEL_DIR/metadata.json keeps. The branch: model.metadata_width/_dropout.
  metadata: str = ""

  # How configs validate (TrainConfig, models.ModelConfig, augment.AugmentConfig,
  # recipes.RecipeConfig, rundir.RunConfig): a .validate() method raising a one-line ValueError
  # naming the field, called by whoever runs the config (train.train, cv.run_cv, the CLI), never in
  # __post_init__. The CLI assembles the whole config first and turns the first ValueError into one
  # UsageError line (cli/train.py); cv derives each fold's config with dataclasses.replace and
  # validates the result once; and a config rebuilt from an older config.json must load, to be
  # compared and shown, even where today's rules are stricter. EvalConfig, PredictConfig,
  # ExportConfig, PreprocessConfig and manifest.RecordSchema follow the same rule.
  def validate(self) -> None:
    if self.balance not in BALANCE:
      raise ValueError(f"balance={self.balance!r}; choose one of {', '.join(BALANCE)}")
    _check_learning_rates(self)
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
      # keras.utils.set_random_seed fails on -5 with a traceback from numpy (issue 27).
      raise ValueError(f"seed={self.seed} must be an integer in [0, 2**32)")
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
    if self.xla not in xla.XLA_SETTINGS:
      raise ValueError(f"xla={self.xla!r}; choose one of {', '.join(xla.XLA_SETTINGS)}")
    if self.select_by != "auto":
      selection.check_rule(self.select_by)
    if self.select_by == "last" and self.recipe.early_stopping_patience:
      raise ValueError("early_stopping_patience stops on a validation score, select_by=last keeps "
                       "the last epoch whatever it scores; drop one of them")
    if self.deterministic not in DETERMINISTIC:
      raise ValueError(f"deterministic={self.deterministic!r}; choose one of auto, on, off")
    thresholds.parse_rule(self.threshold_rule)
    self.recipe.validate()
    self.model.validate()
    self.augment.validate()

  def to_dict(self) -> dict:
    """config.json's "train": model and augment nested, the recipe's fields flat (as before
    RecipeConfig existed, so that older runs resume: rundir compares "train" field by field)."""
    d = dataclasses.asdict(self)
    d["model"], d["augment"] = self.model.to_dict(), self.augment.to_dict()
    d.update(d.pop("recipe"))
    return d


# Adam steps are about learning_rate in size whatever the gradient: 1e-5..1e-2 are the usual rates;
# at 1 a weight moves by 1 per step and the loss diverges (issue 27: -1 "trained" to loss 1.6e10 and
# saved that model, nan/inf/1e6 ended in tracebacks). 0 stays allowed: nothing moves, which the
# early-stopping test uses for an epoch that never improves.
_MAX_LEARNING_RATE = 1.0


def _check_learning_rates(config) -> None:
  for name in ("learning_rate", "fine_tune_learning_rate"):
    value = getattr(config, name)
    if not (isinstance(value, (int, float)) and math.isfinite(value)
            and 0 <= value <= _MAX_LEARNING_RATE):
      raise ValueError(f"{name}={value} must be a number in [0, {_MAX_LEARNING_RATE:g}] "
                       "(Adam's usual rates are 1e-5..1e-2)")


class TrainError(RuntimeError):
  """A run that cannot go on for a reason the user can fix; the message says how, in one line."""


_METRICS = ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc")


@dataclasses.dataclass
class _Setup:
  """Everything the run derives from its config and records before building anything."""
  info: manifest.DatasetInfo
  model_config: models.ModelConfig
  mixed: bool  # float16: the optimizer scales the loss (bfloat16 needs no scaling)
  precision: str  # the Keras dtype policy (distribute.resolve_mixed_precision)
  xla_mode: str
  class_counts: list
  class_weights: list
  steps_per_epoch: int
  has_valid: bool
  workers: int
  metadata: md.MetadataSpec = md.MetadataSpec()  # empty: an image-only model


def train(config: TrainConfig, strategy: tf.distribute.Strategy | None = None) -> dict:
  """Trains, writing model.keras (the best epoch: selection.SELECTION), config.json, history.csv,
  summary.json, plots and TensorBoard logs to `config.model_dir` (the chief only, under
  multi-worker training); resumes from its backup when restarted with the same settings.
  Returns the summary (best epoch and its metrics) plus the final weights' digest.

  Raises rundir.RunDirError (model_dir holds another run, or cannot be written), TrainError
  (an unusable weights file), and the pipeline's FileNotFoundError / CorruptShardError.
  """
  config.validate()
  strategy = strategy or distribute.make_strategy(config.strategy)
  distribute.log_strategy(strategy)
  replicas = strategy.num_replicas_in_sync
  if config.batch_size % replicas:
    raise ValueError(f"batch_size={config.batch_size} does not split evenly over {replicas} "
                     f"replicas; use a multiple of {replicas}")
  chief = distribute.is_chief(strategy)
  if chief:
    rundir.check_writable(config.model_dir)  # before anything long: nothing computed is lost
    if rundir.holds_cv_run(config.model_dir):
      # A single run beside fold_k/ made evaluate read the folder as that one model, silently.
      raise rundir.RunDirError(f"{config.model_dir} holds a cross-validation run (fold_k/, "
                               "oof.csv); train a single run into another --model_dir")
  out = distribute.ChiefOutputDir(config.model_dir, chief, tag=distribute.task_name(strategy))
  was_deterministic = tf_framework_config.is_op_determinism_enabled()
  config = resolved(config)
  deterministic = config.deterministic
  try:
    # Initialisation always comes from the seed. It used to come from Keras' global generator,
    # i.e. from whatever ran earlier in the process (other tests, other folds in a notebook).
    keras.utils.set_random_seed(config.seed)
    if deterministic:
      tf.config.experimental.enable_op_determinism()
    return _train(config, strategy, out)
  finally:
    out.cleanup()
    if deterministic and not was_deterministic:
      # Process-wide: leave a notebook (or the test process) as it was.
      tf_framework_config.disable_op_determinism()


def resolved(config: TrainConfig) -> TrainConfig:
  """`config` with its "auto" settings decided, as config.json's "train" records them (cv compares
  a finished fold's file with this: an unresolved deterministic="auto" refused every rerun)."""
  return dataclasses.replace(config, deterministic=resolve_deterministic(config.deterministic),
                             select_by=resolve_select_by(config.select_by))


def resolve_deterministic(setting: bool | str) -> bool:
  """deterministic=auto|on|off (or a bool) -> whether op determinism is on for this run."""
  if setting in ("auto",):
    # CPU: measured at <= 5 % (BUILD_NOTES). GPU: left off, its cost is per model and kernel.
    return not tf.config.list_physical_devices("GPU")
  return setting in (True, "on")


def resolve_select_by(rule: str) -> str:
  return selection.DEFAULT if rule == "auto" else rule


def _train(config: TrainConfig, strategy: tf.distribute.Strategy,
           out: distribute.ChiefOutputDir) -> dict:
  setup = _resolve(config, strategy)
  run_config = _run_config(config, strategy, setup)
  if config.overwrite:
    if out.chief:
      rundir.clear(out.dir)
  else:
    rundir.check_resumable(config.model_dir, run_config)
  state = _build_state(config, strategy, setup)
  start = 0 if config.overwrite else run_state.restore(config.model_dir, strategy, state, setup.workers)
  history = rundir.read_history(out.dir, start) if out.chief else []
  if out.chief and start:
    _repair_model(config, state, out, history, start, setup)
  if start >= config.epochs:
    return _already_done(config, start, state, history, setup, out.chief)
  if out.chief:
    if setup.metadata:  # before config.json: a config naming columns always has its spec
      rundir.write_metadata(out.dir, setup.metadata)
    rundir.write_config(out.dir, run_config)
  iterator, valid = _inputs(config, strategy, setup, start)
  _fit(config, strategy, setup, state, out, iterator, valid, history, start)
  digest = distribute.weights_digest(state.model.get_weights())
  logging.info("final weights sha256 %s (%s)", digest, distribute.task_name(strategy))
  result = _summary(config, state, history, setup, start)
  result.update(final_weights_sha256=digest, chief=out.chief)
  if out.chief:
    result["threshold"] = dataclasses.asdict(_choose_threshold(config, setup, out.dir))
    rundir.write_summary(out.dir, result)
  # Measured with 2 workers on one host: destroying the training iterator blocked 0-10 s in a
  # tf.data thread join on one worker or the other. Destroy it here, then wait for every worker,
  # so that no worker leaves the cluster while another still needs it (the one left behind logs
  # "tasks are unhealthy" errors otherwise).
  del iterator
  if setup.workers > 1:
    distribute.same_on_all_workers(strategy, config.epochs)
  return result


def _resolve(config: TrainConfig, strategy) -> _Setup:
  precision = distribute.resolve_mixed_precision(config.mixed_precision)
  logging.info("precision: %s (%s)", precision.policy, precision.reason)
  if precision.warning:
    logging.warning("%s", precision.warning)
  devices = distribute.replica_devices(strategy)
  try:
    xla_mode = recipes.xla_mode(config, xla.resolve_xla(config.xla, devices,
                                                               config.augment.enabled),
                                strategy.num_replicas_in_sync)
  except ValueError as err:
    raise TrainError(str(err)) from err
  logging.info("XLA: %s (xla=%s on %s)", xla_mode, config.xla, ", ".join(devices))
  keras.mixed_precision.set_global_policy(precision.policy)
  info = pipeline.load_info(config.records_dir)
  fold = config.fold
  class_weights = [1.0] * info.num_classes
  if config.balance == "class_weights":
    class_weights = [w for _, w in sorted(manifest.class_weights(info, "train", fold).items())]
  has_valid = "valid" in info.shards if fold is None else True
  if not has_valid:
    logging.warning("no validation split: the best epoch is chosen by %s",
                    selection.SELECTION["loss"])
  _check_every_class_trains(info, fold, config.records_dir)
  steps_per_epoch = config.steps_per_epoch or max(
      1, info.num_examples("train", fold) // config.batch_size)
  try:
    spec = input_metadata.select(info, config.metadata, fold)
  except ValueError as err:
    raise TrainError(str(err)) from err
  if spec:
    logging.info("metadata: %s -> %d input features (%s statistics)", ", ".join(spec.names),
                 spec.width, "the training split's" if fold is None else
                 f"fold {fold}'s training part's")
  try:
    recipes.check_warmup_fits(config, run_state.phase_steps(config, steps_per_epoch))
  except ValueError as err:
    raise TrainError(str(err)) from err
  return _Setup(
      info=info, model_config=dataclasses.replace(config.model, num_classes=info.num_classes,
                                                  metadata_features=spec.width),
      mixed=precision.policy == "mixed_float16", precision=precision.policy, xla_mode=xla_mode,
      class_counts=info.class_counts("train", fold),
      class_weights=class_weights, steps_per_epoch=steps_per_epoch,
      has_valid=has_valid, workers=distribute.num_workers(strategy), metadata=spec)


def _build_state(config: TrainConfig, strategy, setup: _Setup) -> run_state.State:
  counts = setup.class_counts
  with strategy.scope():
    try:
      model = models.build_model(setup.model_config, class_counts=counts if all(counts) else None)
    except ValueError as err:
      if str(err).startswith("freeze="):  # from:NOPE: the layers are known once the model is built
        raise TrainError(str(err)) from err
      if config.model.weights in ("imagenet", "none"):
        raise
      raise TrainError(f"--weights={config.model.weights} is not usable: {err}") from err
    return run_state.build(model, config, setup.model_config.freeze, setup.steps_per_epoch,
                           setup.mixed)


def _run_config(config: TrainConfig, strategy, setup: _Setup) -> rundir.RunConfig:
  """config.json: what evaluate and predict need, and what a resume must match (rundir)."""
  info = setup.info
  return rundir.RunConfig(
      classes=list(info.classes), image_size=config.model.image_size,
      records_dir=str(config.records_dir), records_fingerprint=info.fingerprint,
      fold=config.fold, preprocessing=info.preprocessing,
      model=setup.model_config.to_dict(), train=config.to_dict(), seed=config.seed,
      deterministic=config.deterministic, replicas=strategy.num_replicas_in_sync,
      workers=setup.workers, mixed_precision=setup.precision, xla=setup.xla_mode,
      metadata=list(setup.metadata.names))


def _already_done(config: TrainConfig, start: int, state: run_state.State, history, setup,
                  chief: bool) -> dict:
  if start > config.epochs:
    raise rundir.RunDirError(
        f"{config.model_dir} already holds {start} trained epochs, more than --epochs="
        f"{config.epochs}; pass --epochs={start + 1} or more to train further, or --overwrite")
  logging.info("%s already holds all %d epochs; nothing to train", config.model_dir, start)
  result = _summary(config, state, history, setup, start)
  result["final_weights_sha256"] = distribute.weights_digest(state.model.get_weights())
  result["chief"] = chief
  return result


def _inputs(config: TrainConfig, strategy, setup: _Setup, start: int):
  info, fold, size = setup.info, config.fold, config.model.image_size
  kwargs = dict(training=True, image_size=size, fold=fold, seed=config.seed + start,
                balance="oversample" if config.balance == "oversample" else None,
                cache=config.cache, metadata=setup.metadata or None)
  # With a tf.data service, one job per run and resumed epoch, shared by all trainers.
  job = (f"{fileio.canonical(config.model_dir)}|{info.records_dir}|{fold}|{config.seed}|"
         f"{start}")
  iterator = iter(feeding.train_input(strategy, info, config.batch_size, config.data_service,
                                         job, **kwargs))
  valid = (feeding.valid_input(strategy, info, config.batch_size, size, fold,
                               setup.metadata or None) if setup.has_valid else None)
  return iterator, valid


# Drawing accuracy/loss/auc.png costs ~1.2 s a time (matplotlib; 2.3 of a 32 px run's 8.4 CPU s
# for 2 epochs), ~15 % of a 128 px simple_cnn epoch here. So the curves are redrawn at most once a
# minute and after the last epoch: a long run still shows them live (TensorBoard too, every
# epoch), a short one no longer pays for them every epoch.
PLOT_EVERY_S = 60.0


def _fit(config: TrainConfig, strategy, setup: _Setup, state: run_state.State, out, iterator, valid,
         history: list, start: int) -> None:
  writer = tf.summary.create_file_writer(out.join(rundir.LOGS_DIR)) if out.chief else None
  # Saves go to this process's folder (a temporary one off the chief); restores always read the
  # chief's backup (run_state.restore), so every worker resumes from the same state.
  manager = tf.train.CheckpointManager(state.checkpoint, out.join(rundir.BACKUP_DIR),
                                       max_to_keep=1)
  phase = steps = None
  plotted_at, unplotted = -math.inf, False
  for epoch in range(start, config.epochs):
    if recipes.should_stop(config, epoch, int(state.best_epoch.numpy())):
      logging.info("early stopping after epoch %d: no better epoch than %d in %d epochs", epoch,
                   int(state.best_epoch.numpy()), config.recipe.early_stopping_patience)
      break
    new_phase = "warmup" if epoch < config.warmup_epochs else "train"
    if new_phase != phase:
      phase = new_phase
      models.set_freeze(state.model, "all" if phase == "warmup" else setup.model_config.freeze)
      steps = steps_lib.CompiledSteps(strategy, state.model,
                            state.warm_opt if phase == "warmup" else state.main_opt, config,
                            setup.class_weights, setup.xla_mode)
    row = steps_lib.run_epoch(steps, iterator, epoch, setup.steps_per_epoch, config, valid, setup.info)
    _check_finite(row, epoch, config)
    row["phase"] = phase
    history.append(row)
    improved = selection.update_best(state, row, epoch, valid is not None, first=epoch == start,
                                     rule=config.select_by)
    _save_epoch(config, state, out, history, improved, (manager, writer), setup, start)
    unplotted = True
    if out.chief and (epoch == config.epochs - 1 or time.monotonic() - plotted_at >= PLOT_EVERY_S):
      plots.plot_history(history, out.dir)
      plotted_at, unplotted = time.monotonic(), False
    logging.info("epoch %d/%d %s%s", epoch + 1, config.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)),
                 " (best so far, saved)" if improved else "")
  if out.chief and unplotted:  # early stopping ended the run before its last planned epoch
    plots.plot_history(history, out.dir)
  if writer:
    writer.close()


def _save_epoch(config: TrainConfig, state: run_state.State, out, history, improved: bool, savers,
                setup: _Setup, start: int) -> None:
  """model.keras if improved, history, backup, summary.json and TensorBoard (plots: _fit)."""
  manager, writer = savers
  row = history[-1]
  if out.chief:
    if improved or not fileio.exists(out.join(rundir.MODEL_FILE)):
      rundir.save_model(state.model, out.dir)
    # History before the backup: a kill in between leaves a row that the resumed run drops.
    rundir.write_history(out.dir, history)
  state.epoch.assign(int(row["epoch"]))
  manager.save()  # on every worker: saving takes part in collectives
  if out.chief:
    rundir.write_summary(out.dir, _summary(config, state, history, setup, start))
    with writer.as_default(step=int(row["epoch"])):
      for k, v in row.items():
        if isinstance(v, float):
          tf.summary.scalar(k, v)


def _summary(config: TrainConfig, state: run_state.State, history: list, setup: _Setup,
             start: int) -> dict:
  """summary.json: which epoch model.keras holds, chosen how, with what metrics."""
  best_epoch = int(state.best_epoch.numpy())
  row = next((r for r in history if int(r["epoch"]) == best_epoch), None)
  best = {k: _number(row[k]) for k in _METRICS} if row else {}
  criterion = (selection.criterion({"epoch": best_epoch, **{k: float(row[k]) for k in _METRICS}},
                                   setup.has_valid, config.select_by)[0] if row else None)
  return {"model_dir": str(config.model_dir), "model_file": rundir.MODEL_FILE,
          "best_epoch": best_epoch or None, "best_metrics": best, "selected_by": criterion,
          "selection_rule": selection.SELECTION.get(criterion), "select_by": config.select_by,
          "epochs_done": len(history),
          "epochs_planned": config.epochs, "epochs_this_run": max(0, len(history) - start),
          "stopped_early": (len(history) < config.epochs
                            and recipes.should_stop(config, len(history), best_epoch)),
          "fold": config.fold, "records_fingerprint": setup.info.fingerprint}


def _number(value) -> float | None:
  """A history value as a float for JSON, None for NaN (JSON has no NaN)."""
  value = float(value)
  return value if math.isfinite(value) else None


def _check_every_class_trains(info: manifest.DatasetInfo, fold, records_dir) -> None:
  """TrainError when a class has no training image: class_weights trained a model that never saw a
  positive without a word, and oversample ended in a traceback (issue 27)."""
  counts = info.class_counts("train", fold)
  empty = [name for name, n in zip(info.classes, counts) if not n]
  if empty:
    where = "the train split" if fold is None else f"the training folds (all but fold {fold})"
    raise TrainError(
        f"{records_dir}: class {', '.join(map(repr, empty))} has no image in {where} "
        f"(training counts: {dict(zip(info.classes, counts))}); a model would never learn it. "
        "Add images of it to the training split and convert again")


def _check_finite(row: dict, epoch: int, config: TrainConfig) -> None:
  """A diverged epoch (loss inf or NaN) stops the run before anything of it is saved."""
  loss = float(row.get("loss", 0.0))
  if not math.isfinite(loss):
    raise TrainError(
        f"training diverged in epoch {epoch + 1} (loss={loss}) at learning_rate="
        f"{config.learning_rate}: lower --learning_rate (or --fine_tune_learning_rate); "
        "what earlier epochs saved is kept")


def _repair_model(config: TrainConfig, state: run_state.State, out, history: list, start: int,
                  setup: _Setup) -> None:
  """A damaged model.keras (0 bytes, truncated) found on resume is rewritten from backup/.

  backup/ holds the last epoch's weights: when that epoch is the best one they are exactly what
  model.keras held; otherwise the best epoch's weights are gone, and only restore_model=True puts
  the last epoch in its place (and makes it the best, so summary.json says which epoch it is).
  """
  path = out.join(rundir.MODEL_FILE)
  problem = rundir.model_file_problem(path) if fileio.exists(path) else None
  if not problem:
    return
  best = int(state.best_epoch.numpy())
  if best != start and not config.restore_model:
    raise rundir.RunDirError(
        f"{path} is damaged: {problem}; backup/ holds epoch {start}, not the best epoch {best}, "
        f"whose weights are lost. Pass --restore_model to save epoch {start} as model.keras "
        "(summary.json will say so), or --overwrite to train afresh")
  if best != start:
    row = next((r for r in history if int(r["epoch"]) == start), None)
    if row is None:
      raise rundir.RunDirError(f"{path} is damaged and history.csv has no row for epoch {start}; "
                               "--overwrite to train afresh")
    if setup.workers > 1:
      raise rundir.RunDirError(f"{path} is damaged: rerun with --restore_model on one worker")
    _, score, tiebreak = selection.criterion(
        {k: float(row[k] or "nan") for k in _METRICS}, setup.has_valid)
    state.best.assign(score)
    state.best_tiebreak.assign(tiebreak)
    state.best_epoch.assign(start)
    # backup/ and summary.json must name the epoch model.keras now holds, also when no epoch
    # is left to train (a later resume restores the best epoch from backup/).
    tf.train.CheckpointManager(state.checkpoint, out.join(rundir.BACKUP_DIR), max_to_keep=1).save()
    rundir.write_summary(out.dir, _summary(config, state, history, setup, start))
  rundir.save_model(state.model, out.dir)
  logging.warning("%s was damaged (%s); restored epoch %d from %s/ (%s)", path, problem, start,
                  rundir.BACKUP_DIR, "the best epoch" if best == start else
                  f"the best epoch {best} was lost; --restore_model")


def _choose_threshold(config: TrainConfig, setup: _Setup, model_dir: str) -> rundir.StoredThreshold:
  """threshold.json: the saved model's validation predictions under config.threshold_rule; 0.5,
  said loudly, without a validation split (nothing else can choose it without test data)."""
  from skinrecords.model import inference  # pylint: disable=g-import-not-at-top

  rule, fold = config.threshold_rule, config.fold
  kind, arg = thresholds.parse_rule(rule)
  if setup.info.num_classes != 2:
    stored = rundir.StoredThreshold(thresholds.FALLBACK, rule, "more than two classes: argmax, "
                                    "no threshold", "none", 0, fold)
  elif kind == "fixed":
    stored = rundir.StoredThreshold(arg, rule, f"--threshold_rule={rule}", "fixed", 0, fold)
  elif not setup.has_valid:
    logging.warning("no validation split: the decision threshold stays at %s (nothing but test "
                    "data could choose another); pass one to evaluate and predict with "
                    "--threshold, or train with --threshold_rule=fixed:T", thresholds.FALLBACK)
    stored = rundir.StoredThreshold(thresholds.FALLBACK, rule, f"{thresholds.FALLBACK} by "
                                    "default: the run had no validation split to choose it on",
                                    "none", 0, fold)
  else:
    model, cfg = models.load_model_dir(model_dir)
    ds = pipeline.make_dataset(setup.info, "valid", batch_size=config.batch_size, training=False,
                               image_size=cfg.image_size, fold=fold,
                               metadata=inference.run_metadata(model, model_dir))
    probs, labels, _ = inference.predict_dataset(model, ds, 0, info=setup.info, split="valid",
                                                 fold=fold)
    value, source = thresholds.choose(rule, probs, labels)
    where = f" (fold {fold})" if fold is not None else ""
    stored = rundir.StoredThreshold(value, rule, source + where, "valid", int(len(labels)), fold)
  stored = dataclasses.replace(stored, model_sha256=fileio.sha256_file(
      fileio.join(model_dir, rundir.MODEL_FILE)))
  rundir.write_threshold(model_dir, stored)
  logging.info("decision threshold %.4g: %s", stored.value, stored.describe(model_dir))
  return stored


def resource_error(err: Exception, config: TrainConfig) -> str | None:
  """One line for a full disk while saving the backup (ResourceExhaustedError [Op:SaveV2]; a full
  disk in model.save is an OSError) or for memory too small for the batch; None for others."""
  if not isinstance(err, tf.errors.ResourceExhaustedError):
    return None
  text = pipeline.clean_message(getattr(err, "message", str(err))).splitlines()[0][:300]
  if "SaveV2" in str(err) or "space" in str(err).lower():
    return (f"the disk of --model_dir={config.model_dir} is full ({text}); free space and rerun "
            "the same command: it resumes from the last complete backup")
  return (f"out of memory ({text}); lower --batch_size or --image_size="
          f"{config.model.image_size}")
