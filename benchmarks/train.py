"""Training-step throughput per backbone and XLA mode (off, augment, on), measured in one run.

Times `steps.CompiledSteps.train_step` — augmentation, forward, backward, all-reduce and optimizer update,
exactly the step bin/train runs — on a fixed in-memory uint8 batch, so input reading is excluded
(bin/bench_input measures that). Compilation is excluded: `--warmup` steps run first. On a GPU machine
it runs unchanged (mirrored over all GPUs with --strategy=auto).

Example: bench_train --backbones=simple_cnn,resnet50 --image_size=64 --batch_size=16 --steps=5
         bench_train --backbones=resnet50 --image_size=512 --xla=on,off --mixed_precision=on  (GPU)
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
                           "float16 compute; auto: on with a GPU.")


def _build(strategy, backbone, mode, mixed):
  """A fresh model, optimizer and compiled step for one mode, warmed up (compilation untimed)."""
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from skinrecords import models, train
  from skinrecords import steps as steps_lib  # pylint: disable=g-import-not-at-top

  keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
  size, batch = _SIZE.value, _BATCH.value
  model_config = models.ModelConfig(backbone=backbone, image_size=size, weights="none")
  with strategy.scope():
    model = models.build_model(model_config)
    opt = keras.optimizers.Adam(1e-4)
    if mixed:
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
  from skinrecords import distribute  # pylint: disable=g-import-not-at-top
  from skinrecords import xla  # pylint: disable=g-import-not-at-top

  bad = [x for x in _XLA.value if x not in xla.XLA_SETTINGS]
  if bad:
    raise app.UsageError(f"--xla={','.join(_XLA.value)}: choose from "
                         f"{', '.join(xla.XLA_SETTINGS)}")
  strategy = distribute.make_strategy(_STRATEGY.value)
  if _DETERMINISTIC.value:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.experimental.enable_op_determinism()
  mixed = distribute.use_mixed_precision(_MIXED.value)
  modes = list(dict.fromkeys(xla.resolve_xla(x, distribute.replica_devices(strategy))
                             for x in _XLA.value))
  print(f"{type(strategy).__name__}, {strategy.num_replicas_in_sync} replica(s), "
        f"{_SIZE.value}px, global batch {_BATCH.value}, mixed precision {mixed}, "
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


def run():
  """Console entry point (`bin/bench_train`)."""
  cli_common.run(main, "bench_train")


if __name__ == "__main__":
  run()
