"""Training recipes: optimizer, learning-rate schedule, loss, synchronised BatchNorm, early stop.

`RecipeConfig` owns the recipe's fields (train.TrainConfig.recipe); every function here reads a
TrainConfig's `.recipe`. The defaults reproduce the recipe the project had before they existed:
Adam, a constant learning rate, plain cross-entropy, per-replica BatchNorm, all epochs.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
LOSSES = ("bce", "focal")
# Not decayed by AdamW: biases, and BatchNorm/LayerNorm scales and offsets. Decaying a norm's
# scale towards 0 shrinks its whole channel, and the head's bias starts at the log prior
# (models._initial_bias), which decay would pull towards the 50/50 guess.
_NO_DECAY = ("bias", "gamma", "beta")


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
  """How the model is optimised: the fields a resume compares one by one (rundir), and the flags
  of the same names (cli/train.py). Not here: learning rates and epochs (TrainConfig: the schedule
  of phases), select_by and threshold_rule (what is kept and decided after training)."""
  optimizer: str = "adam"  # adam | adamw
  weight_decay: float = 0.0  # adamw only (decoupled, biases and norm parameters excluded)
  lr_schedule: str = "constant"  # constant | cosine, per training phase
  warmup_steps: int = 0  # linear learning-rate warm-up at the start of each phase
  lr_floor: float = 0.0  # cosine ends at learning_rate * lr_floor
  loss: str = "bce"  # bce (binary or categorical cross-entropy) | focal
  label_smoothing: float = 0.0
  focal_gamma: float = 2.0
  sync_batchnorm: bool = False  # BatchNorm statistics over all replicas and workers
  early_stopping_patience: int = 0  # stop this many epochs after the best one; 0: never

  def validate(self) -> None:
    """ValueError naming the field, its value and what is accepted (see train.TrainConfig for why
    configs validate in .validate(), not __post_init__)."""
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer={self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not self.weight_decay >= 0:
      raise ValueError(f"weight_decay={self.weight_decay} must be >= 0 (decoupled decay per "
                       "step, times the learning rate)")
    if self.optimizer == "adamw" and self.weight_decay == 0:
      raise ValueError("optimizer=adamw with weight_decay=0 is plain Adam; pass a weight_decay "
                       "(e.g. 0.05) or use optimizer=adam")
    if self.optimizer == "adam" and self.weight_decay > 0:
      raise ValueError(f"weight_decay={self.weight_decay} needs optimizer=adamw")
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f"lr_schedule={self.lr_schedule!r}; choose one of "
                       f"{', '.join(LR_SCHEDULES)}")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0 (0: no warm-up)")
    if not 0 <= self.lr_floor < 1:
      raise ValueError(f"lr_floor={self.lr_floor} must be in [0, 1): a fraction of the learning "
                       "rate, where the cosine schedule ends")
    if self.lr_floor and self.lr_schedule != "cosine":
      raise ValueError(f"lr_floor={self.lr_floor} applies to lr_schedule=cosine only")
    if self.loss not in LOSSES:
      raise ValueError(f"loss={self.loss!r}; choose one of {', '.join(LOSSES)}")
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1) (0: hard "
                       "targets; 0.1 is usual)")
    if not self.focal_gamma >= 0:
      raise ValueError(f"focal_gamma={self.focal_gamma} must be >= 0 (0: cross-entropy; 2 is "
                       "usual)")
    if self.focal_gamma != 2.0 and self.loss != "focal":  # 2.0: the default
      raise ValueError(f"focal_gamma={self.focal_gamma} applies to loss=focal only")
    if self.early_stopping_patience < 0:
      raise ValueError(f"early_stopping_patience={self.early_stopping_patience} must be >= 0 "
                       "(0: train every epoch)")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> RecipeConfig:
    """The recipe's fields out of a dict holding them (config.json's "train" keeps them flat)."""
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


FIELDS = tuple(f.name for f in dataclasses.fields(RecipeConfig))


def check_warmup_fits(config, phase_steps: dict) -> None:
  """ValueError when the linear warm-up does not end before a training phase does.

  Args:
    config: the TrainConfig.
    phase_steps: {phase name: optimizer steps in it}; phases with 0 steps are skipped.
  """
  for phase, steps in phase_steps.items():
    if steps and config.recipe.warmup_steps >= steps:
      raise ValueError(f"warmup_steps={config.recipe.warmup_steps} is not shorter than the {phase} "
                       f"phase ({steps} steps: epochs x steps_per_epoch); lower --warmup_steps "
                       "or train longer")


@keras.saving.register_keras_serializable(package="skinrecords")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up to `peak` over `warmup_steps`, then constant or cosine down to peak * floor.

  Step s (0-based) of the warm-up uses peak * (s + 1) / warmup_steps: the first step already moves
  (a 0 learning rate would waste it), the last one reaches the peak.
  """

  def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0,
               kind: str = "constant", floor: float = 0.0):
    self.peak, self.total_steps, self.warmup_steps = float(peak), int(total_steps), warmup_steps
    self.kind, self.floor = kind, float(floor)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    peak = tf.constant(self.peak, tf.float32)
    lr = peak
    if self.kind == "cosine":
      span = float(max(1, self.total_steps - self.warmup_steps))
      done = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
      low = peak * self.floor
      lr = low + (peak - low) * 0.5 * (1.0 + tf.cos(math.pi * done))
    if self.warmup_steps:
      lr = tf.minimum(lr, peak * (step + 1.0) / float(self.warmup_steps))
    return lr

  def get_config(self):
    return {"peak": self.peak, "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps, "kind": self.kind, "floor": self.floor}


def learning_rate(config, peak: float, total_steps: int):
  """A float for the default recipe (constant, no warm-up), else a WarmupSchedule."""
  if config.recipe.lr_schedule == "constant" and not config.recipe.warmup_steps:
    return peak
  return WarmupSchedule(peak, total_steps, config.recipe.warmup_steps, config.recipe.lr_schedule,
                        config.recipe.lr_floor)


def make_optimizer(config, peak: float, total_steps: int, mixed: bool):
  """Adam or AdamW for one training phase of `total_steps` optimizer steps."""
  lr = learning_rate(config, peak, total_steps)
  if config.recipe.optimizer == "adamw":
    opt = keras.optimizers.AdamW(lr, weight_decay=config.recipe.weight_decay)
    opt.exclude_from_weight_decay(var_names=list(_NO_DECAY))
  else:
    opt = keras.optimizers.Adam(lr)
  return keras.optimizers.LossScaleOptimizer(opt) if mixed else opt


def loss_fn(num_classes: int, config=None):
  """(int labels [N], logits [N, 1 or K]) -> float32 per-example loss [N].

  Without `config` (or with the default recipe): plain cross-entropy, binary for 2 classes and
  sparse categorical for more; validation always uses this one, so val_loss (the tie-break and
  fallback selection criterion) means the same thing whatever the training recipe. Multi-class
  label smoothing spreads over all K classes (one-hot, then Keras' categorical losses, which
  smooth as y * (1 - s) + s / K); binary smoothing pulls the target towards 0.5.
  Focal: Keras' BinaryFocalCrossentropy / CategoricalFocalCrossentropy with `focal_gamma` and no
  alpha weighting (alpha=1 in the categorical one, whose default 0.25 would just scale the loss
  by 1/4 and so the learning rate): class balance is --balance's job.
  """
  smoothing = config.recipe.label_smoothing if config else 0.0
  focal = config is not None and config.recipe.loss == "focal"
  if num_classes == 2:
    if focal:
      fn = keras.losses.BinaryFocalCrossentropy(gamma=config.recipe.focal_gamma, from_logits=True,
                                                label_smoothing=smoothing, reduction=None)
    else:
      fn = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=smoothing,
                                           reduction=None)
    # Logits cast to float32: under mixed_float16 the loss is computed in float32 regardless.
    return lambda labels, logits: fn(tf.cast(labels[:, None], tf.float32),
                                     tf.cast(logits, tf.float32))
  if not focal and not smoothing:
    scce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    return lambda labels, logits: scce(labels, tf.cast(logits, tf.float32))
  if focal:
    fn = keras.losses.CategoricalFocalCrossentropy(alpha=1.0, gamma=config.recipe.focal_gamma,
                                                   from_logits=True, label_smoothing=smoothing,
                                                   reduction=None)
  else:
    fn = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing,
                                              reduction=None)
  return lambda labels, logits: fn(tf.one_hot(labels, num_classes, dtype=tf.float32),
                                   tf.cast(logits, tf.float32))


def synchronize_batchnorm(model: keras.Model, on: bool = True) -> int:
  """Makes every BatchNormalization layer compute its batch statistics over all replicas (and
  workers) when `on`; returns how many layers there are.

  Keras 3 BatchNormalization(synchronized=True) all-reduces sum, sum of squares and count inside
  the replica context, so the normalisation and the moving statistics use the global batch: at
  512 px a per-replica batch of 4-8 gives noisy statistics on its own. The attribute is read when
  the step is traced, and saved with the model (harmless outside a strategy: no replica context,
  plain moments).
  """
  layers = [l for l in model._flatten_layers(include_self=False, recursive=True)  # pylint: disable=protected-access
            if isinstance(l, keras.layers.BatchNormalization)]
  for layer in layers:
    layer.synchronized = on
  return len(layers)


def xla_mode(config, resolved: str, replicas: int) -> str:
  """The XLA mode with synchronised BatchNorm over several replicas: its all-reduce cannot sit in
  an XLA-compiled (nested) forward pass, so "on" becomes "augment" (the augmentation, the part
  that needs XLA, stays compiled); an explicit xla=on is refused instead of silently changed."""
  if not (config.recipe.sync_batchnorm and replicas > 1 and resolved == "on"):
    return resolved
  if config.xla == "on":
    raise ValueError(f"sync_batchnorm over {replicas} replicas cannot run in an XLA-compiled "
                     "forward pass; use xla=augment (or auto), or drop sync_batchnorm")
  return "augment"


def should_stop(config, epochs_done: int, best_epoch: int) -> bool:
  """Early stopping: `early_stopping_patience` epochs after the best one without a better one.

  The best epoch is the one the run state keeps for model.keras (selection.SELECTION), so stopping and
  saving agree. Never during the head-only warm-up (`warmup_epochs`): the backbone has not
  started training yet.
  """
  patience = config.recipe.early_stopping_patience
  return bool(patience and epochs_done > config.warmup_epochs and best_epoch
              and epochs_done - best_epoch >= patience)
