"""Times input pipelines, old and ours, on the same synthetic images and checks the speed targets.

--num_images synthetic --image_size^2 JPEGs are written as class folders (read by the old paths) and
converted with `convert.convert` (read by ours). Paths, all measured in this one process:
  (1) the notebook's tf_keras ImageDataGenerator(rescale=1/255, rotation_range=60, shear_range=0.3,
      width/height_shift_range=0.3, both flips, fill_mode="nearest").flow_from_directory(...,
      class_mode="binary");
  (2) keras.utils.image_dataset_from_directory + the Keras 3 layers RandomFlip, RandomRotation,
      RandomTranslation and RandomShear (the same ranges) in the dataset's map;
  (3) skinrecords pipeline.make_dataset(records, "train", training=True) alone;
  (4) (3) + augment.augment_batch (default AugmentConfig) under tf.function(jit_compile=True) on
      each batch, as the train step does, but on the CPU here;
  (5) the decode limit: the stored JPEG bytes of (3) in memory, from_tensor_slices -> decode_jpeg
      (AUTOTUNE) -> batch: no files, no parsing.
And augmentation alone on one in-memory uint8 batch: the Keras layer chain (cast to float32, in a
tf.function; these layers cannot be XLA-compiled) vs augment_batch with XLA.

Each path is timed over --batches batches (--batches_slow for (1), (2) and the Keras chain) after
--warmup untimed ones (which also compile). Rates are images per wall second (`time.perf_counter`)
and per CPU second of this process (all its threads; robust to other processes on the machine).
(3) and (5) run --rounds times, interleaved (3, 5, 3, 5, ...), and each reports its best round: on
a shared 2-core host one round of either varied by 10-15 % minutes apart, more than the gap
measured. Targets: (3)/(5) >= 0.95; augmentation alone, ours / Keras >= 30; (4)/(1) >= 20.

Example:
  bench_input --num_images=512 --batch_size=32 --batches=30 --batches_slow=5
  bench_input --reader_only --rounds=3 --num_images=384 --batches=40   # only (3)/(5)
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import pathlib
import time

from absl import app
from absl import flags

from benchmarks import common as bench_common
from skinrecords.cli import common as cli_common

_NUM_IMAGES = flags.DEFINE_integer("num_images", 512, "Synthetic images, half of them melanomas.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "Side of the square images in pixels (also "
                                   "the target size of paths (1) and (2)).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per batch in every path.")
_BATCHES = flags.DEFINE_integer("batches", 30, "Timed batches for (3), (4), (5) and our "
                                "augmentation alone.")
_BATCHES_SLOW = flags.DEFINE_integer("batches_slow", 5, "Timed batches for the slow paths (1), (2) "
                                     "and the Keras chain alone (~1 s per 512^2 batch of 32).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed batches before each timed run (they also "
                               "trace and compile).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds of (3) and (5); each reports its "
                                "best.")
_READER_ONLY = flags.DEFINE_boolean("reader_only", False, "Time only (3) and (5), the reader and "
                                    "its decode limit (skips the minutes-long slow paths).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic images and of the shuffles.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder in which a fresh bench_input-* folder is "
                               "made for images and records (default: the system temp folder).")
_KEEP = flags.DEFINE_boolean("keep", False, "Keep the bench_input-* folder instead of removing it "
                             "at the end.")
_BFC = flags.DEFINE_boolean("bfc_allocator", True, "Set TF_CPU_ALLOCATOR_USE_BFC=true so "
                            "TensorFlow reuses CPU buffers (as bin/bench_augment does; without it every call "
                            "faults in fresh pages, ~10x slower for a 512^2 batch of 32).")

_TARGETS = (("(3)/(5)", "3", "5", 0.95, "our reader vs the decode limit"),
            ("aug ours/Keras", "aug_ours", "aug_keras", 30.0, "augmentation alone"),
            ("(4)/(1)", "4", "1", 20.0, "our reader + XLA augment vs the notebook"))
_LABELS = {
    "1": "(1) tf_keras ImageDataGenerator.flow_from_directory + notebook aug",
    "2": "(2) keras image_dataset_from_directory + Keras 3 aug layers in map",
    "3": "(3) skinrecords make_dataset (train)",
    "4": "(4) (3) + augment_batch, jit_compile=True, per batch",
    "5": "(5) decode limit: in-memory bytes -> decode_jpeg, AUTOTUNE",
    "aug_keras": "aug alone: Keras Flip+Rotation+Translation+Shear, tf.function",
    "aug_ours": "aug alone: augment_batch, uint8, jit_compile=True",
}
_NA_TF_KERAS = "n/a (pip install -e .[bench])"
_SKIPPED = "skipped (--reader_only)"


def _time(next_batch, warmup: int, batches: int) -> tuple[float, float]:
  """(images per wall second, per CPU second) over `batches` calls of `next_batch` -> #images."""
  for _ in range(warmup):
    next_batch()
  wall, cpu = time.perf_counter(), time.process_time()
  images = sum(next_batch() for _ in range(batches))
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return images / wall, images / max(cpu, 1e-9)


def _keras_chain(config, seed: int):
  """Keras 3 layers with AugmentConfig's ranges (as skinrecords.input.augment.benchmark builds
  them)."""
  import keras  # pylint: disable=g-import-not-at-top

  same = dict(fill_mode=config.fill_mode, interpolation=config.interpolation)
  shear = math.tan(math.radians(config.shear_range))  # Keras' shear factor is a tangent
  return keras.Sequential([
      keras.layers.RandomFlip("horizontal_and_vertical", seed=seed + 1),
      keras.layers.RandomRotation(config.rotation_range / 360.0, seed=seed + 2, **same),
      keras.layers.RandomTranslation(config.height_shift_range, config.width_shift_range,
                                     seed=seed + 3, **same),
      keras.layers.RandomShear(shear, shear, seed=seed + 4, **same)])


def _path_1(src: pathlib.Path, size: int, batch: int, seed: int, warmup: int, batches: int):
  try:
    from tf_keras.preprocessing import image  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  gen = image.ImageDataGenerator(rescale=1 / 255, rotation_range=60, shear_range=0.3,
                                 width_shift_range=0.3, height_shift_range=0.3,
                                 horizontal_flip=True, vertical_flip=True, fill_mode="nearest")
  with contextlib.redirect_stdout(io.StringIO()):  # "Found N images belonging to 2 classes."
    it = gen.flow_from_directory(str(src), target_size=(size, size), batch_size=batch,
                                 class_mode="binary", seed=seed)
  return _time(lambda: len(next(it)[0]), warmup, batches)


def _path_2(src: pathlib.Path, size: int, batch: int, seed: int, warmup: int, batches: int,
            config):
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  chain = _keras_chain(config, seed)
  ds = keras.utils.image_dataset_from_directory(str(src), label_mode="binary",
                                                image_size=(size, size), batch_size=batch,
                                                shuffle=True, seed=seed, verbose=False)
  ds = ds.repeat().map(lambda x, y: (chain(x, training=True), y),
                       num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
  it = iter(ds)
  return _time(lambda: int(next(it)[0].shape[0]), warmup, batches)


def _path_3_4(records: pathlib.Path, batch: int, seed: int, warmup: int, batches: int,
              config=None):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from skinrecords.input import augment  # pylint: disable=g-import-not-at-top
  from skinrecords.input import pipeline  # pylint: disable=g-import-not-at-top

  it = iter(pipeline.make_dataset(str(records), "train", batch_size=batch, training=True,
                                  seed=seed))
  if config is None:
    return _time(lambda: int(next(it)[0].shape[0]), warmup, batches)
  fn = tf.function(lambda x, s: augment.augment_batch(x, s, config), jit_compile=True)
  step = [0]

  def next_batch():
    step[0] += 1
    images = next(it)[0]
    fn(images, tf.constant([seed, step[0]], tf.int64)).numpy()
    return int(images.shape[0])
  return _time(next_batch, warmup, batches)


def _decode_limit_dataset(blobs: list[bytes], batch: int):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  options = tf.data.Options()
  options.deterministic = False  # as our training pipeline: an upper bound for it
  return (tf.data.Dataset.from_tensor_slices(blobs).repeat()
          .map(lambda b: tf.io.decode_jpeg(b, channels=3), num_parallel_calls=tf.data.AUTOTUNE)
          .batch(batch).with_options(options).prefetch(tf.data.AUTOTUNE))


def _path_5(blobs: list[bytes], batch: int, warmup: int, batches: int):
  it = iter(_decode_limit_dataset(blobs, batch))
  return _time(lambda: int(next(it).shape[0]), warmup, batches)


def _augment_alone(blobs, batch, seed, warmup, batches, batches_slow, config):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from skinrecords.input import augment  # pylint: disable=g-import-not-at-top

  images = next(iter(_decode_limit_dataset(blobs, batch)))  # one real uint8 batch
  chain = _keras_chain(config, seed)
  keras_fn = tf.function(lambda x: chain(tf.cast(x, tf.float32), training=True))
  ours = tf.function(lambda x, s: augment.augment_batch(x, s, config), jit_compile=True)
  step = [0]

  def keras_batch():
    keras_fn(images).numpy()
    return int(images.shape[0])

  def ours_batch():
    step[0] += 1
    ours(images, tf.constant([seed, step[0]], tf.int64)).numpy()
    return int(images.shape[0])
  return (_time(keras_batch, warmup, batches_slow), _time(ours_batch, warmup, batches))


def _stored_jpegs(records: pathlib.Path) -> list[bytes]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from skinrecords.core import features  # pylint: disable=g-import-not-at-top
  from skinrecords.input import pipeline  # pylint: disable=g-import-not-at-top

  spec = {features.IMAGE: features.feature_spec()[features.IMAGE]}
  files = [s.path for s in pipeline.load_info(records).select("train")]
  ds = tf.data.TFRecordDataset(files).map(
      lambda r: tf.io.parse_single_example(r, spec)[features.IMAGE])
  return [b.numpy() for b in ds]


def _prepare(root: pathlib.Path, num: int, size: int, seed: int) -> tuple[pathlib.Path,
                                                                          pathlib.Path]:
  """Writes the class folders and converts them (all to "train"); returns both folders."""
  from skinrecords.data import convert  # pylint: disable=g-import-not-at-top
  from skinrecords.data import preprocess  # pylint: disable=g-import-not-at-top
  from skinrecords.data import synthetic  # pylint: disable=g-import-not-at-top

  src, records = root / "images", root / "records"
  workers = max(1, min(os.cpu_count() or 1, num // 64))  # a spawn pool costs ~1 s to start
  synthetic.write_dataset(src, synthetic.SyntheticConfig(
      num, seed=seed, min_size=(size, size), max_size=(size, size), workers=workers),
                          progress=False)
  result = convert.convert(convert.ConvertConfig(
      input_dir=str(src), output_dir=str(records), split=(1.0, 0.0, 0.0), seed=seed,
      workers=workers, progress=False, preprocess=preprocess.PreprocessConfig(image_size=size)))
  if result.rejected:
    raise RuntimeError(f"{src}: convert rejected synthetic images: {result.rejected[:3]}")
  return src, records


def _fmt(rate) -> str:
  return f"{rate:9.1f}" if rate is not None else f"{'n/a':>9s}"


def _best(a, b):
  """The better of two (img/s, img/CPU-s) rounds, each rate on its own."""
  return b if a is None else (max(a[0], b[0]), max(a[1], b[1]))


def _reader_rounds(records, blobs, batch, seed, warmup, batches, rounds) -> tuple:
  """(3) and (5), interleaved `rounds` times: the best round of each."""
  best3 = best5 = None
  for _ in range(rounds):
    best3 = _best(best3, _path_3_4(records, batch, seed, warmup, batches))
    gc.collect()
    best5 = _best(best5, _path_5(blobs, batch, warmup, batches))
    gc.collect()
  return best3, best5


def run_benchmark(num: int, size: int, batch: int, batches: int, batches_slow: int, warmup: int,
                  seed: int, root: pathlib.Path, rounds: int = 3,
                  reader_only: bool = False) -> str:
  """Prepares the data under `root`, times every path, returns the printed report."""
  from skinrecords.input import augment  # pylint: disable=g-import-not-at-top

  config = augment.AugmentConfig()
  start = time.perf_counter()
  src, records = _prepare(root, num, size, seed)
  blobs = _stored_jpegs(records)
  prep = time.perf_counter() - start

  rows = dict.fromkeys(_LABELS, _SKIPPED)  # key -> (img/s, img/CPU-s), None (no tf_keras), skipped
  # One path at a time; each iterator dies with its function, which stops its prefetch threads.
  rows["3"], rows["5"] = _reader_rounds(records, blobs, batch, seed, warmup, batches, rounds)
  if not reader_only:
    rows["1"] = _path_1(src, size, batch, seed, warmup, batches_slow)
    gc.collect()
    rows["2"] = _path_2(src, size, batch, seed, warmup, batches_slow, config)
    gc.collect()
    rows["4"] = _path_3_4(records, batch, seed, warmup, batches, config)
    gc.collect()
    rows["aug_keras"], rows["aug_ours"] = _augment_alone(blobs, batch, seed, warmup, batches,
                                                         batches_slow, config)

  mean_kb = sum(map(len, blobs)) / len(blobs) / 1e3
  lines = [f"{num} synthetic {size}x{size} JPEGs (stored: mean {mean_kb:.0f} KB) prepared in "
           f"{prep:.1f} s under {root}",
           f"cpus={os.cpu_count()} batch_size={batch} warmup={warmup} batches={batches} "
           f"batches_slow={batches_slow} rounds={rounds} "
           f"bfc_allocator={os.environ.get('TF_CPU_ALLOCATOR_USE_BFC')}"
           f" config=AugmentConfig() defaults", "",
           f"{'path':68s} {'img/s':>9s} {'img/CPU-s':>9s}"]
  for key, label in _LABELS.items():
    if rows[key] is None or rows[key] == _SKIPPED:
      lines.append(f"{label:68s} {rows[key] or _NA_TF_KERAS}")
    else:
      lines.append(f"{label:68s} {_fmt(rows[key][0])} {_fmt(rows[key][1])}")
  lines += ["", "verdicts (on img/s; the CPU-second ratio in brackets):"]
  for name, num_key, den_key, target, what in _TARGETS:
    if _SKIPPED in (rows[num_key], rows[den_key]):
      lines.append(f"n/a   {name} >= {target:g} ({what}): {_SKIPPED}")
      continue
    if rows[num_key] is None or rows[den_key] is None:
      lines.append(f"n/a   {name} >= {target:g} ({what}): path (1) {_NA_TF_KERAS}")
      continue
    ratio = rows[num_key][0] / rows[den_key][0]
    cpu_ratio = rows[num_key][1] / rows[den_key][1]
    lines.append(f"{'PASS' if ratio >= target else 'MISS'}  {name} >= {target:g} ({what}): "
                 f"{ratio:.2f} [{cpu_ratio:.2f}]")
  return "\n".join(lines)


def main(argv):
  del argv  # Unused.
  for flag, least in ((_NUM_IMAGES, 2), (_IMAGE_SIZE, 16), (_BATCH_SIZE, 1), (_BATCHES, 1),
                      (_BATCHES_SLOW, 1), (_WARMUP, 1), (_SEED, 0), (_ROUNDS, 1)):
    if flag.value < least:
      raise app.UsageError(f"--{flag.name}={flag.value}: must be an integer >= {least}")
  if _BATCH_SIZE.value > _NUM_IMAGES.value:
    raise app.UsageError(f"--batch_size={_BATCH_SIZE.value} exceeds --num_images="
                         f"{_NUM_IMAGES.value}: the training pipeline keeps full batches only, so "
                         "it would yield none")
  # Must be set before TensorFlow creates its CPU allocator, i.e. before it is imported.
  os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true" if _BFC.value else "false"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  with bench_common.work_folder("bench_input-", _WORKDIR.value, _KEEP.value) as root:
    print(run_benchmark(_NUM_IMAGES.value, _IMAGE_SIZE.value, _BATCH_SIZE.value, _BATCHES.value,
                        _BATCHES_SLOW.value, _WARMUP.value, _SEED.value, root,
                        _ROUNDS.value, _READER_ONLY.value), flush=True)


def run():
  """Console entry point (`bin/bench_input`)."""
  cli_common.run(main, "bench_input")


if __name__ == "__main__":
  run()
