"""End to end, the notebook's way against ours: same images, backbone, size, batch and epochs.

--num_images synthetic --image_size^2 lesions are split once (stratified, seeded) into
train/<class>/ and test/<class>/ folders; both ways read exactly these files:
  notebook: tf_keras ImageDataGenerator(rescale=1/255, rotation_range=60, width/height_shift_range
            =0.3, shear_range=0.3, both flips, fill_mode="nearest").flow_from_directory(train)
            into a tf_keras model (the same layers as skinrecords.model.models: backbone, global
            average pooling, dropout, one sigmoid unit) trained by `model.fit` (binary cross-entropy, Adam);
            the test folder is predicted with `model.predict` on an un-augmented generator;
  ours:     `convert.convert` of the same folders into records (timed once), `train.train` (tf.data
            pipeline, the same augmentations inside the compiled step, xla=auto) and
            `inference.predict_dataset` on the test records of the saved model.
Both get --epochs epochs of (train images // --batch_size) steps, Adam at --learning_rate, no
validation split and no pretrained weights. The test ROC AUC is scikit-learn's on Melanoma
probabilities for both. Epoch times: the notebook's from a fit callback (epoch begin to end), ours
from history.csv (`seconds`: the epoch's steps). The first epoch includes tracing and compilation,
so later epochs are reported apart (median). The two ways run one after the other, so on a shared
machine compare only figures from one run.

Example: bench_e2e                                  (CPU: simple_cnn and densenet121 at 128 px)
         bench_e2e --image_size=512 --num_images=2000 --batch_size=32 --epochs=5   (GPU)
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import os
import pathlib
import shutil
import statistics
import time

from absl import app
from absl import flags

from benchmarks import common as bench_common
from skinrecords.cli import common as cli_common

_BACKBONES = flags.DEFINE_list("backbones", ["simple_cnn", "densenet121"],
                               "Backbones to compare, each trained both ways.")
_SIZE = flags.DEFINE_integer("image_size", 128, "Side of the square images in pixels.")
_NUM = flags.DEFINE_integer("num_images", 300, "Synthetic images, half of them melanomas.")
_TEST = flags.DEFINE_float("test_fraction", 0.2, "Share of each class held out for the test AUC.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Batch size of both ways.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs of both ways (>= 2: the first one compiles).")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate of both ways.")
_XLA = flags.DEFINE_string("xla", "auto", "Ours: XLA mode as in skinrecords-train (auto, on, off, "
                           "augment).")
_MIXED = flags.DEFINE_enum("mixed_precision", "auto", ["auto", "on", "off"],
                           "Ours: mixed precision as in skinrecords-train (auto: float16 on "
                           "tensor-core GPUs, bfloat16 on CPUs with native bfloat16, else "
                           "float32). The notebook's way stays float32, as the notebook did.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the images, the split and both trainings.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder in which a fresh bench_e2e-* folder is "
                               "made for images, records and models (default: the temp folder).")
_KEEP = flags.DEFINE_boolean("keep", False, "Keep the bench_e2e-* folder instead of removing it.")

CLASSES = ("NotMelanoma", "Melanoma")  # id 1 = melanoma, the positive class of the AUC
_NO_TF_KERAS = "tf_keras is not installed; it runs the notebook's way: pip install -e '.[bench]'"


def _prepare(root: pathlib.Path, num: int, size: int, test_fraction: float, seed: int):
  """Writes root/images/{train,test}/<class>/*.jpg; returns (images, counts per split)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from skinrecords.data import synthetic  # pylint: disable=g-import-not-at-top

  flat, images = root / "synthetic", root / "images"
  workers = max(1, min(os.cpu_count() or 1, num // 64))  # a spawn pool costs ~1 s to start
  synthetic.write_dataset(flat, synthetic.SyntheticConfig(
      num, seed=seed, min_size=(size, size), max_size=(size, size), workers=workers),
                          progress=False)
  rng = np.random.default_rng(seed)
  counts = {"train": 0, "test": 0}
  for cls in CLASSES:
    files = sorted((flat / cls).iterdir())
    n_test = min(len(files) - 1, max(1, round(len(files) * test_fraction)))
    for rank, i in enumerate(rng.permutation(len(files))):
      split = "test" if rank < n_test else "train"
      (images / split / cls).mkdir(parents=True, exist_ok=True)
      os.replace(files[i], images / split / cls / files[i].name)
      counts[split] += 1
  shutil.rmtree(flat)
  return images, counts


def _convert(images: pathlib.Path, records: pathlib.Path, size: int, seed: int) -> float:
  """Ours, once for every backbone: the pre-split folders into records; returns seconds."""
  from skinrecords.data import convert  # pylint: disable=g-import-not-at-top
  from skinrecords.data import preprocess  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  result = convert.convert(convert.ConvertConfig(
      input_dir=str(images), output_dir=str(records), classes=CLASSES, seed=seed,
      progress=False, preprocess=preprocess.PreprocessConfig(image_size=size)))
  seconds = time.perf_counter() - start
  if result.rejected:
    raise RuntimeError(f"{images}: convert rejected synthetic images: {result.rejected[:3]}")
  return seconds


def _epoch_timer():
  """A tf_keras callback, and the list it fills with each epoch's wall seconds (begin to end)."""
  import tf_keras  # pylint: disable=g-import-not-at-top

  seconds = []

  class EpochTimer(tf_keras.callbacks.Callback):

    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      seconds.append(time.perf_counter() - self.start)

  return EpochTimer(), seconds


def _notebook_way(backbone: str, images: pathlib.Path, counts: dict, opts: dict) -> dict:
  """Trains and tests the notebook's way; returns epoch seconds, totals and the test AUC."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  from sklearn import metrics  # pylint: disable=g-import-not-at-top

  size, batch = opts["size"], opts["batch"]
  tf_keras.utils.set_random_seed(opts["seed"])
  flow = dict(target_size=(size, size), batch_size=batch, class_mode="binary",
              classes=list(CLASSES), seed=opts["seed"])
  augmenting = tf_keras.preprocessing.image.ImageDataGenerator(
      rescale=1 / 255, rotation_range=60, width_shift_range=0.3, height_shift_range=0.3,
      shear_range=0.3, horizontal_flip=True, vertical_flip=True, fill_mode="nearest")
  plain = tf_keras.preprocessing.image.ImageDataGenerator(rescale=1 / 255)
  with contextlib.redirect_stdout(io.StringIO()):  # "Found N images belonging to 2 classes."
    train_it = augmenting.flow_from_directory(str(images / "train"), **flow)
    test_it = plain.flow_from_directory(str(images / "test"), shuffle=False, **flow)

  start, cpu = time.perf_counter(), time.process_time()
  model = bench_common.notebook_model(backbone, size, opts["learning_rate"])
  timer, epoch_seconds = _epoch_timer()
  model.fit(train_it, epochs=opts["epochs"], steps_per_epoch=counts["train"] // batch,
            callbacks=[timer], verbose=0)
  train_s, train_cpu = time.perf_counter() - start, time.process_time() - cpu

  start = time.perf_counter()
  probs = model.predict(test_it, verbose=0).reshape(-1)
  predict_s = time.perf_counter() - start
  auc = metrics.roc_auc_score(test_it.classes, probs)
  del model, train_it, test_it
  tf_keras.backend.clear_session()
  return {"epochs": epoch_seconds, "train": train_s, "train_cpu": train_cpu, "predict": predict_s,
          "auc": auc}


def _our_way(backbone: str, records: pathlib.Path, model_dir: pathlib.Path, opts: dict) -> dict:
  """Trains from the records and tests the saved model; the same result keys as _notebook_way."""
  import keras  # pylint: disable=g-import-not-at-top
  from sklearn import metrics  # pylint: disable=g-import-not-at-top

  from skinrecords.core import rundir  # pylint: disable=g-import-not-at-top
  from skinrecords.input import pipeline  # pylint: disable=g-import-not-at-top
  from skinrecords.model import inference  # pylint: disable=g-import-not-at-top
  from skinrecords.model import models  # pylint: disable=g-import-not-at-top
  from skinrecords.training import train  # pylint: disable=g-import-not-at-top

  config = train.TrainConfig(
      records_dir=str(records), model_dir=str(model_dir),
      model=models.ModelConfig(backbone=backbone, image_size=opts["size"], weights="none"),
      xla=opts["xla"], mixed_precision=opts["mixed"], batch_size=opts["batch"],
      learning_rate=opts["learning_rate"], epochs=opts["epochs"], seed=opts["seed"],
      progress=False)
  start, cpu = time.perf_counter(), time.process_time()
  train.train(config)
  train_s, train_cpu = time.perf_counter() - start, time.process_time() - cpu
  history = rundir.read_history(model_dir, opts["epochs"])

  # As `skinrecords-evaluate` does: load the saved model, then predict. The notebook predicts with
  # the model still in memory, so the load is its own row (with DenseNet121 ~4.8 CPU s of the
  # prediction were the load: Keras rebuilds ~430 layers and reads the weights).
  start = time.perf_counter()
  model, _ = models.load_model_dir(model_dir)
  load_s = time.perf_counter() - start
  start = time.perf_counter()
  info = pipeline.load_info(records)
  ds = pipeline.make_dataset(info, "test", batch_size=opts["batch"], training=False)
  probs, labels, _ = inference.predict_dataset(model, ds, info=info, split="test")
  predict_s = time.perf_counter() - start
  auc = metrics.roc_auc_score(labels, probs)
  del model, ds
  keras.backend.clear_session()
  return {"epochs": [float(row["seconds"]) for row in history], "train": train_s,
          "train_cpu": train_cpu, "load": load_s, "predict": predict_s, "auc": auc}


def _rows(nb: dict, ours: dict, convert_s: float, images_per_epoch: int):
  """(label, notebook value or None, ours, gain): gain > 1 means ours is better on that row."""
  nb_later, our_later = statistics.median(nb["epochs"][1:]), statistics.median(ours["epochs"][1:])
  nb_total = nb["train"] + nb["predict"]
  our_total = convert_s + ours["train"] + ours["load"] + ours["predict"]
  return [
      ("conversion, once (s)", None, convert_s, None),
      ("first epoch (s)", nb["epochs"][0], ours["epochs"][0], nb["epochs"][0] / ours["epochs"][0]),
      ("later epochs, median (s)", nb_later, our_later, nb_later / our_later),
      ("later epochs (img/s)", images_per_epoch / nb_later, images_per_epoch / our_later,
       nb_later / our_later),
      ("training in all (s)", nb["train"], ours["train"], nb["train"] / ours["train"]),
      # CPU seconds of this process (all threads): what other work on the machine disturbs least.
      ("training in all (CPU s)", nb["train_cpu"], ours["train_cpu"],
       nb["train_cpu"] / ours["train_cpu"]),
      ("loading model.keras (s)", None, ours["load"], None),
      ("test prediction (s)", nb["predict"], ours["predict"], nb["predict"] / ours["predict"]),
      ("images to test AUC (s)", nb_total, our_total, nb_total / our_total),
      ("test ROC AUC", nb["auc"], ours["auc"], ours["auc"] / nb["auc"]),
  ]


def _table(backbone: str, nb: dict, ours: dict, convert_s: float, images_per_epoch: int) -> str:
  lines = [f"{backbone}:", f"  {'':26s} {'notebook':>10s} {'skinrecords':>12s} {'gain':>8s}"]
  for label, a, b, gain in _rows(nb, ours, convert_s, images_per_epoch):
    nb_text = f"{a:10.3f}" if a is not None else f"{'-':>10s}"
    gain_text = f"{gain:7.2f}x" if gain is not None else f"{'-':>8s}"
    lines.append(f"  {label:26s} {nb_text} {b:12.3f} {gain_text}")
  lines.append("  epochs (s): notebook " + " ".join(f"{s:.2f}" for s in nb["epochs"]) +
               "; skinrecords " + " ".join(f"{s:.2f}" for s in ours["epochs"]))
  return "\n".join(lines)


def run_benchmark(root: pathlib.Path, opts: dict) -> None:
  """Prepares the data under `root`, then prints one table per backbone as it finishes."""
  images, counts = _prepare(root, opts["num"], opts["size"], opts["test_fraction"], opts["seed"])
  if counts["train"] < opts["batch"]:
    raise app.UsageError(f"--batch_size={opts['batch']} exceeds the {counts['train']} training "
                         "images: raise --num_images or lower --batch_size")
  from skinrecords.training import distribute  # pylint: disable=g-import-not-at-top

  records = root / "records"
  convert_s = _convert(images, records, opts["size"], opts["seed"])
  steps = counts["train"] // opts["batch"]
  print(f"{counts['train']} train / {counts['test']} test synthetic {opts['size']}x{opts['size']} "
        f"images under {root}; batch {opts['batch']}, {opts['epochs']} epochs of {steps} steps, "
        f"Adam {opts['learning_rate']:g}, no pretrained weights; ours: xla={opts['xla']}, "
        f"mixed_precision={opts['mixed']} "
        f"({distribute.resolve_mixed_precision(opts['mixed']).policy}), fused BatchNorm",
        flush=True)
  print("gain: notebook / ours for seconds, ours / notebook for img/s and the AUC (> 1: ours "
        "better)\n", flush=True)
  for backbone in opts["backbones"]:
    nb = _notebook_way(backbone, images, counts, opts)
    gc.collect()
    ours = _our_way(backbone, records, root / f"model_{backbone}", opts)
    gc.collect()
    print(_table(backbone, nb, ours, convert_s, steps * opts["batch"]), flush=True)


def _check_flags() -> dict:
  """Every flag checked before any work; returns them as one dict."""
  why = {"image_size": " (the smallest input keras.applications accept)",
         "num_images": " (2 per class, one of them for testing)",
         "epochs": " (the first epoch traces and compiles; the later ones are the measure)"}
  for flag, least in ((_SIZE, 32), (_NUM, 4), (_BATCH, 1), (_EPOCHS, 2), (_SEED, 0)):
    if flag.value < least:
      raise app.UsageError(f"--{flag.name}={flag.value}: must be an integer >= {least}"
                           f"{why.get(flag.name, '')}")
  if not 0.0 < _TEST.value < 1.0:
    raise app.UsageError(f"--test_fraction={_TEST.value}: must lie strictly between 0 and 1")
  if _LR.value <= 0:
    raise app.UsageError(f"--learning_rate={_LR.value}: must be > 0")
  # Only now TensorFlow (~4 s): the number checks above answer at once.
  from skinrecords.model import models  # pylint: disable=g-import-not-at-top
  from skinrecords.model import xla  # pylint: disable=g-import-not-at-top

  bad = [b for b in _BACKBONES.value if b not in models.BACKBONES]
  if bad or not _BACKBONES.value:
    raise app.UsageError(f"--backbones={','.join(_BACKBONES.value)}: choose from "
                         f"{', '.join(models.BACKBONES)}")
  if _XLA.value not in xla.XLA_SETTINGS:
    raise app.UsageError(f"--xla={_XLA.value}: choose from {', '.join(xla.XLA_SETTINGS)}")
  return {"backbones": _BACKBONES.value, "size": _SIZE.value, "num": _NUM.value,
          "test_fraction": _TEST.value, "batch": _BATCH.value, "epochs": _EPOCHS.value,
          "learning_rate": _LR.value, "xla": _XLA.value, "mixed": _MIXED.value,
          "seed": _SEED.value}


def main(argv):
  del argv  # Unused.
  opts = _check_flags()
  if importlib.util.find_spec("tf_keras") is None:
    raise app.UsageError(_NO_TF_KERAS)
  with bench_common.work_folder("bench_e2e-", _WORKDIR.value, _KEEP.value) as root:
    run_benchmark(root, opts)


def run():
  """Console entry point (`bin/bench_e2e`)."""
  cli_common.run(main, "bench_e2e")


if __name__ == "__main__":
  run()
