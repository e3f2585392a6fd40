"""Training-step throughput per backbone and XLA mode (off, augment, on), measured in one run.

Times `steps.CompiledSteps.train_step` — augmentation, forward, backward, all-reduce and optimizer update,
exactly the step bin/train runs — on a fixed in-memory uint8 batch, so input reading is excluded
(bin/bench_input measures that). Compilation is excluded: `--warmup` steps run first. On a GPU machine
it runs unchanged (mirrored over all GPUs with --strategy=auto).

With `--batchnorm=keras,fused,tf_keras` it compares BatchNormalization instead (issue 23): the same
backbone with Keras 3's unfused BN, with skinrecords.model.batchnorm's fused one, and built by
tf_keras (the notebook's Keras, fused BN; `pip install -e '.[bench]'`), each trained by one plain
`tf.function` step (forward, loss, backward, Adam) on a fixed float batch, so only the model
differs. It prints CPU seconds per step (all threads of this process: what other work on a shared
machine disturbs least) and wall seconds, medians over interleaved rounds, and ratios to Keras' BN.

Example: bench_train --backbones=simple_cnn,resnet50 --image_size=64 --batch_size=16 --steps=5
         bench_train --backbones=resnet50 --image_size=512 --xla=on,off --mixed_precision=on  (GPU)
         bench_train --backbones=densenet121,resnet50 --image_size=128 --batchnorm=keras,fused,tf_keras
"""

import statistics
import time

from absl import app
from absl import flags

from skinrecords.cli import common as cli_common

_BACKBONES = flags.DEFINE_list("backbones", ["simple_cnn", "vgg16", "resnet50", "densenet121",
                                             "efficientnetv2s"], "Backbones to time.")
_SIZE = flags.DEFINE_integer("image_size", 64, "Image side in pixels.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per configuration.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (tracing and XLA compilation).")
_STRATEGY = flags.DEFINE_enum("strategy", "auto", ["auto", "one_device", "mirrored"],
                              "Distribution strategy, as in bin/train.")
_XLA = flags.DEFINE_list("xla", ["off", "augment", "on"], "XLA modes to compare: off, augment "
                         "(only the augmentation compiled), on (the whole step); auto resolves as "
                         "bin/train would on this machine.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds: each round times --steps steps of "
                               "every mode in turn, so a load change on shared cores hits all "
                               "alike; the median round per mode is reported.")
_DETERMINISTIC = flags.DEFINE_boolean(
    "deterministic", False, "TensorFlow op determinism, as bin/train --deterministic: run once "
    "with and once without to measure its cost (the in-memory batch leaves tf.data out).")
_MIXED = flags.DEFINE_enum("mixed_precision", "auto", ["auto", "on", "off"],
                           "Mixed precision as in bin/train: auto is float16 on tensor-core GPUs, "
                           "bfloat16 on CPUs with native bfloat16, else float32.")
_BATCHNORM = flags.DEFINE_list("batchnorm", ["fused"], "BatchNormalization variants: fused (what "
                               "bin/train builds), keras (Keras 3's unfused layer), tf_keras (the "
                               "backbone built by tf_keras). Two or more: the BN table (CPU and "
                               "wall seconds per plain train step) instead of the XLA table.")
_BN_CHOICES = ("keras", "fused", "tf_keras")


def _build(strategy, backbone, mode, mixed):
  """A fresh model, optimizer and compiled step for one mode, warmed up (compilation untimed)."""
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from skinrecords.model import batchnorm, models
  from skinrecords.training import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from skinrecords.training import train

  keras.mixed_precision.set_global_policy(mixed)
  size, batch = _SIZE.value, _BATCH.value
  model_config = models.ModelConfig(backbone=backbone, image_size=size, weights="none")
  with strategy.scope():
    model = models.build_model(model_config)
    if _BATCHNORM.value == ["keras"]:
      batchnorm.unfuse(model)
    opt = keras.optimizers.Adam(1e-4)
    if mixed == "mixed_float16":
      opt = keras.optimizers.LossScaleOptimizer(opt)
    opt.build(model.trainable_variables)
  config = train.TrainConfig(records_dir="", model_dir="", xla=mode, batch_size=batch,
                             model=model_config)
  steps = steps_lib.CompiledSteps(strategy, model, opt, config, [1.0, 1.0])
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, 2, (batch,), dtype=np.int32)
  ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
  iterator = iter(strategy.experimental_distribute_dataset(ds))
  t0 = time.perf_counter()
  for s in range(_WARMUP.value):
    float(steps.train_step(iterator, tf.constant(s, tf.int64))[0])
  return steps, iterator, time.perf_counter() - t0


def _time_round(steps, iterator) -> float:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  for s in range(_STEPS.value):
    loss = steps.train_step(iterator, tf.constant(s, tf.int64))[0]
  float(loss)  # waits for the last step
  return _STEPS.value * _BATCH.value / (time.perf_counter() - t0)


def _measure(strategy, backbone, modes, mixed) -> dict:
  """{mode: (median img/s over rounds, warm-up seconds)}, rounds interleaved across modes."""
  built = {m: _build(strategy, backbone, m, mixed) for m in modes}
  rates = {m: [] for m in modes}
  for _ in range(_ROUNDS.value):
    for m in modes:
      rates[m].append(_time_round(*built[m][:2]))
  return {m: (statistics.median(rates[m]), built[m][2]) for m in modes}


def main(argv):
  del argv
  for name, value in (("steps", _STEPS.value), ("rounds", _ROUNDS.value),
                      ("batch_size", _BATCH.value)):
    if value < 1:
      raise app.UsageError(f"--{name}={value}: must be >= 1")
  bn = list(dict.fromkeys(_BATCHNORM.value))
  bad = [b for b in bn if b not in _BN_CHOICES]
  if bad or not bn:
    raise app.UsageError(f"--batchnorm={','.join(_BATCHNORM.value)}: choose from "
                         f"{', '.join(_BN_CHOICES)}")
  if bn == ["tf_keras"]:
    raise app.UsageError("--batchnorm=tf_keras alone: the XLA table times skinrecords' own step; "
                         "give --batchnorm=keras,fused,tf_keras for the BatchNorm table")
  from skinrecords.model import xla  # pylint: disable=g-import-not-at-top
  from skinrecords.training import distribute  # pylint: disable=g-import-not-at-top

  bad = [x for x in _XLA.value if x not in xla.XLA_SETTINGS]
  if bad:
    raise app.UsageError(f"--xla={','.join(_XLA.value)}: choose from "
                         f"{', '.join(xla.XLA_SETTINGS)}")
  strategy = distribute.make_strategy(_STRATEGY.value)
  if _DETERMINISTIC.value:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.experimental.enable_op_determinism()
  mixed = distribute.resolve_mixed_precision(_MIXED.value).policy
  if len(bn) > 1:
    _batchnorm_table(strategy, bn, mixed)
    return
  modes = list(dict.fromkeys(xla.resolve_xla(x, distribute.replica_devices(strategy))
                             for x in _XLA.value))
  print(f"{type(strategy).__name__}, {strategy.num_replicas_in_sync} replica(s), "
        f"{_SIZE.value}px, global batch {_BATCH.value}, {mixed}, BN {bn[0]}, "
        f"{_ROUNDS.value} interleaved rounds x {_STEPS.value} steps, median round, "
        f"op determinism {_DETERMINISTIC.value}")
  base = modes[0]
  print(f"{'backbone':16s} " + " ".join(f"{'xla=' + m + ' img/s':>18s} {'warm-up s':>9s}"
                                       for m in modes) +
        "".join(f" {m + '/' + base:>12s}" for m in modes[1:]))
  for backbone in _BACKBONES.value:
    results = _measure(strategy, backbone, modes, mixed)
    line = f"{backbone:16s} " + " ".join(f"{results[m][0]:18.1f} {results[m][1]:9.1f}"
                                         for m in modes)
    line += "".join(f" {results[m][0] / results[base][0]:11.2f}x" for m in modes[1:])
    print(line, flush=True)


def _bn_model(variant: str, backbone: str, mixed: str):
  """(model, optimizer) of one BN variant: skinrecords' model with fused or Keras BN, or the same
  layers built by tf_keras (as bin/bench_e2e's notebook way)."""
  import keras  # pylint: disable=g-import-not-at-top

  from skinrecords.model import batchnorm, models  # pylint: disable=g-import-not-at-top

  if variant == "tf_keras":
    import tf_keras  # pylint: disable=g-import-not-at-top

    from benchmarks import common  # pylint: disable=g-import-not-at-top
    tf_keras.mixed_precision.set_global_policy(mixed)
    model = common.notebook_model(backbone, _SIZE.value, 1e-4)
    tf_keras.mixed_precision.set_global_policy("float32")
    opt = model.optimizer
    if mixed == "mixed_float16":
      opt = tf_keras.mixed_precision.LossScaleOptimizer(opt)
    return model, opt
  keras.mixed_precision.set_global_policy(mixed)
  model = models.build_model(models.ModelConfig(backbone=backbone, image_size=_SIZE.value,
                                                weights="none"))
  keras.mixed_precision.set_global_policy("float32")
  if variant == "keras":
    batchnorm.unfuse(model)
  opt = keras.optimizers.Adam(1e-4)
  if mixed == "mixed_float16":
    opt = keras.optimizers.LossScaleOptimizer(opt)
  opt.build(model.trainable_variables)
  return model, opt


def _bn_step(variant: str, backbone: str, mixed: str):
  """A warmed-up plain train step of one BN variant (tracing untimed)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  model, opt = _bn_model(variant, backbone, mixed)
  rng = np.random.default_rng(0)
  # tf_keras' model takes 0..1 (the generator rescales), ours 0..255 (preprocessing inside).
  scale = 1 / 255 if variant == "tf_keras" else 1.0
  images = tf.constant(rng.uniform(0, 255, (_BATCH.value, _SIZE.value, _SIZE.value, 3)) * scale,
                       tf.float32)
  labels = tf.constant(rng.integers(0, 2, (_BATCH.value, 1)), tf.float32)
  scaled = hasattr(opt, "get_scaled_loss") or hasattr(opt, "scale_loss")

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      out = tf.cast(model(images, training=True), tf.float32)
      loss = tf.reduce_mean(tf.keras.losses.binary_crossentropy(labels, out, from_logits=(
          variant != "tf_keras")))
      scaled_loss = (opt.get_scaled_loss(loss) if hasattr(opt, "get_scaled_loss") else
                     opt.scale_loss(loss)) if scaled and mixed == "mixed_float16" else loss
    grads = tape.gradient(scaled_loss, model.trainable_variables)
    if hasattr(opt, "get_unscaled_gradients") and mixed == "mixed_float16":
      grads = opt.get_unscaled_gradients(grads)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  for _ in range(_WARMUP.value):
    float(step())
  return step


def _time_bn_round(step) -> tuple[float, float]:
  """(CPU seconds, wall seconds) per step over --steps steps."""
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(_STEPS.value):
    loss = step()
  float(loss)
  return ((time.process_time() - c0) / _STEPS.value, (time.perf_counter() - t0) / _STEPS.value)


def _batchnorm_table(strategy, variants: list, mixed: str) -> None:
  """Per backbone: CPU and wall seconds per plain train step for each BN variant, interleaved."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  if "tf_keras" in variants and importlib.util.find_spec("tf_keras") is None:
    raise app.UsageError("--batchnorm=tf_keras needs tf_keras: pip install -e '.[bench]'")
  del strategy  # one device: the plain step is the same for every variant
  print(f"plain tf.function train step (forward, loss, backward, Adam), {_SIZE.value}px, batch "
        f"{_BATCH.value}, {mixed}, {_ROUNDS.value} interleaved rounds x {_STEPS.value} steps after "
        f"{_WARMUP.value} warm-up, median round; ratio = keras / variant CPU s (> 1: faster)",
        flush=True)
  base = variants[0]
  print(f"{'backbone':14s} " + " ".join(f"{v + ' CPU s':>13s} {v + ' wall s':>14s}"
                                       for v in variants) +
        "".join(f" {base + '/' + v:>15s}" for v in variants[1:]), flush=True)
  for backbone in _BACKBONES.value:
    steps = {v: _bn_step(v, backbone, mixed) for v in variants}
    cpu, wall = {v: [] for v in variants}, {v: [] for v in variants}
    for _ in range(_ROUNDS.value):
      for v in variants:
        c, w = _time_bn_round(steps[v])
        cpu[v].append(c)
        wall[v].append(w)
    med = {v: (statistics.median(cpu[v]), statistics.median(wall[v])) for v in variants}
    print(f"{backbone:14s} " + " ".join(f"{med[v][0]:13.3f} {med[v][1]:14.3f}" for v in variants)
          + "".join(f" {med[base][0] / med[v][0]:14.2f}x" for v in variants[1:]), flush=True)


def run():
  """Console entry point (`bin/bench_train`)."""
  cli_common.run(main, "bench_train")


if __name__ == "__main__":
  run()
