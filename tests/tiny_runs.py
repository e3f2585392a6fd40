"""Tiny run directories for the ensemble, calibration and submission tests: records of dark (class
a) and bright (class b) images, and simple_cnn models whose weights are set, not trained (a trained
run would cost ~20 s each; these cost well under a second)."""

from __future__ import annotations

import json
import pathlib

import keras
import numpy as np

from conftest import convert_folder, write_dark_bright
from skinrecords.core import rundir
from skinrecords.input import pipeline
from skinrecords.model import models


def make_records(root: pathlib.Path, size: int = 48, folds: int = 0, counts=(36, 24),
                 levels=(90, 150)) -> pathlib.Path:
  """Square dark/bright PNGs -> `size` px JPEG records (60/20/20 %, optionally K train folds);
  grey `levels` closer together (noise +-60) make the classes overlap; one class per count."""
  write_dark_bright(root / "in", {"abcd"[i]: (n, level) for i, (n, level) in
                                  enumerate(zip(counts, levels))}, 60,
                    lambda i: (40, 40, 3))
  return convert_folder(root / "in", root / "records", size, split=(0.6, 0.2, 0.2), folds=folds,
                        min_train_shards=2)


def random_model(records, size: int, seed: int, spread: float = 2.0, classes: int = 2):
  """simple_cnn at `size` px with random convolutions, its head rescaled so the logits on the
  training images have standard deviation `spread` around a median of 0 (spread 20: a
  deliberately over-confident model)."""
  keras.utils.set_random_seed(seed)
  model = models.build_model(models.ModelConfig(backbone="simple_cnn", image_size=size,
                                                weights="none", num_classes=classes))
  features = keras.Model(model.input, model.get_layer("pool").output)
  images = np.concatenate([b[0].numpy() for b in pipeline.make_dataset(
      records, "train", training=False, image_size=size)])
  kernel, _ = model.get_layer("logits").get_weights()
  z = features(images.astype(np.float32)).numpy() @ kernel
  scale = spread / z.std(axis=0)
  model.get_layer("logits").set_weights([kernel * scale, (-np.median(z, axis=0) * scale)
                                         .astype(np.float32)])
  return model


def save_run(model, out: pathlib.Path, records: pathlib.Path, size: int, fold=None,
             classes=None) -> pathlib.Path:
  """A finished run directory as training writes it (model.keras, config.json, summary.json)."""
  manifest = json.loads((records / "manifest.json").read_text())
  out.mkdir(parents=True)
  model.save(out / rundir.MODEL_FILE)
  rundir.write_config(out, rundir.RunConfig(
      classes=classes or manifest["classes"], image_size=size, records_dir=str(records),
      records_fingerprint=manifest["fingerprint"], fold=fold,
      preprocessing=manifest["preprocessing"],
      model=models.ModelConfig(backbone="simple_cnn", image_size=size).to_dict()))
  rundir.write_summary(out, {"epochs_done": 1, "epochs_planned": 1, "fold": fold})
  return out


def member_probs(run_dir, records, split="test", fold=None, tta=0) -> tuple:
  """A member's own probabilities, labels and names, computed here without evaluate/ensemble."""
  model, cfg = models.load_model_dir(run_dir)
  probs, labels, names = [], [], []
  for images, y, n in pipeline.make_dataset(records, split, training=False, with_names=True,
                                            image_size=cfg.image_size, fold=fold):
    logits = model(images.numpy().astype(np.float32), training=False).numpy()
    probs.append(1 / (1 + np.exp(-logits[:, 0])) if logits.shape[1] == 1 else
                 np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    labels.append(y.numpy())
    names += [x.decode() for x in n.numpy()]
  return np.concatenate(probs), np.concatenate(labels), names
