"""Times on-device augmentation on the CPU: Keras' layer chain vs skinrecords' fused XLA warp.

Paths, all on the same random batch and in the same process so their ratios are comparable:
  (a) keras.layers RandomFlip + RandomRotation + RandomTranslation + RandomShear, float32, in
      a tf.function (these layers cannot be XLA-compiled: ImageProjectiveTransformV3 has no
      XLA kernel);
  (b) skinrecords.input.augment.augment_batch under tf.function(jit_compile=True), float32 and uint8
      input;
  (c) augment_batch in a plain tf.function without XLA.
Compilation and the first call are not timed. Prints images per wall second and per CPU second
of this process (robust to other processes sharing the cores), each with its ratio to (a).

Example:
  bench_augment --image_size=512 --batch_size=32 --iters=3
"""

import math
import os
import time

from absl import app
from absl import flags

from skinrecords.cli import common as cli_common

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "Side of the square test images in pixels.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per timed call (one batch).")
_ITERS = flags.DEFINE_integer("iters", 3, "Timed calls per path after one untimed warm-up call "
                              "(path (a) takes ~1-4 s per 512² batch of 32 on 2 cores).")
_INTERPOLATION = flags.DEFINE_enum("interpolation", "bilinear", ["bilinear", "nearest"],
                                   "Resampling used by every path (AugmentConfig.interpolation).")
_BFC = flags.DEFINE_boolean("bfc_allocator", True, "Set TF_CPU_ALLOCATOR_USE_BFC=true so "
                            "TensorFlow reuses CPU buffers. Without it every call faults in fresh "
                            "pages for its outputs: measured here, a bare uint8->float32 cast of "
                            "a 512² batch of 32 ran at ~150 img/s instead of ~1,400, which swamps "
                            "what is timed.")



def benchmark(image_size: int = 512, batch_size: int = 32, iters: int = 3,
              config=None) -> list[tuple[str, float, float]]:
  """Keras' layer chain vs `augment_batch` with and without XLA, on the default device.

  Returns (path, images per wall second, images per CPU second of this process). Every path is
  called once untimed (compilation), then the paths take turns `iters` times, each call with a
  fresh seed, so a load change on shared cores hits all of them alike; the wall rate uses the median
  call, the CPU rate (robust to other processes on the cores) the total.
  """
  # Imported here: main() sets TF_CPU_ALLOCATOR_USE_BFC, which TensorFlow reads on import.
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from skinrecords.input import augment  # pylint: disable=g-import-not-at-top

  config = config or augment.AugmentConfig()
  config.validate()
  images = tf.random.stateless_uniform([batch_size, image_size, image_size, 3], [0, 0], 0, 256,
                                       tf.int32)
  images_u8, images_f32 = tf.cast(images, tf.uint8), tf.cast(images, tf.float32)
  same = dict(fill_mode=config.fill_mode, fill_value=config.fill_value,
              interpolation=config.interpolation)
  # Keras' shear factor is the tangent of the shear angle; ours is the angle in degrees.
  shear = math.tan(math.radians(config.shear_range))
  chain = keras.Sequential([
      keras.layers.RandomFlip("horizontal_and_vertical", seed=1),
      keras.layers.RandomRotation(config.rotation_range / 360.0, seed=2, **same),
      keras.layers.RandomTranslation(config.height_shift_range, config.width_shift_range, seed=3,
                                     **same),
      keras.layers.RandomShear(shear, shear, seed=4, **same)])
  ours = lambda x, s: augment.augment_batch(x, s, config)
  paths = [
      ("(a) keras.layers Flip+Rotation+Translation+Shear, float32, tf.function",
       tf.function(lambda x, s: chain(x, training=True)), images_f32),
      ("(b) augment_batch, tf.function(jit_compile=True), float32", tf.function(
          ours, jit_compile=True), images_f32),
      ("(b) augment_batch, tf.function(jit_compile=True), uint8", tf.function(
          ours, jit_compile=True), images_u8),
      ("(c) augment_batch, tf.function without XLA, float32", tf.function(ours), images_f32)]
  for _, fn, x in paths:
    fn(x, tf.constant([0, 0])).numpy()  # compile + warm-up
  # Fetch one value, not the batch: `.numpy()` of a 100 MB result would time a copy into fresh,
  # page-faulting memory (~0.1 s here), not the augmentation.
  walls, cpus = [[] for _ in paths], [[] for _ in paths]
  for i in range(iters):
    for k, (_, fn, x) in enumerate(paths):
      wall, cpu = time.perf_counter(), time.process_time()
      fn(x, tf.constant([0, i + 1]))[0, 0, 0, 0].numpy()
      walls[k].append(time.perf_counter() - wall)
      cpus[k].append(time.process_time() - cpu)
  return [(name, batch_size / sorted(w)[len(w) // 2], iters * batch_size / sum(c))
          for (name, _, _), w, c in zip(paths, walls, cpus)]


def main(argv):
  del argv  # Unused.
  for name, value, least in (("image_size", _IMAGE_SIZE.value, 2),
                             ("batch_size", _BATCH_SIZE.value, 1), ("iters", _ITERS.value, 1)):
    if value < least:
      raise app.UsageError(f"--{name}={value}: must be an integer >= {least}")
  # Must be set before TensorFlow creates its CPU allocator, i.e. before it is imported.
  os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true" if _BFC.value else "false"

  from skinrecords.input import augment  # pylint: disable=g-import-not-at-top

  config = augment.AugmentConfig(interpolation=_INTERPOLATION.value)
  rows = benchmark(_IMAGE_SIZE.value, _BATCH_SIZE.value, _ITERS.value, config)
  print(f"image_size={_IMAGE_SIZE.value} batch_size={_BATCH_SIZE.value} iters={_ITERS.value} "
        f"bfc_allocator={_BFC.value} cpus={os.cpu_count()} {config}")
  print(f"{'path':70s} {'img/s':>7s} {'vs (a)':>7s} {'img/CPU-s':>9s} {'vs (a)':>7s}")
  for name, rate, cpu_rate in rows:
    print(f"{name:70s} {rate:7.1f} {rate / rows[0][1]:6.1f}x {cpu_rate:9.1f} "
          f"{cpu_rate / rows[0][2]:6.1f}x")


def run():
  """Console entry point (`bin/bench_augment`)."""
  cli_common.run(main, "bench_augment")


if __name__ == "__main__":
  run()
