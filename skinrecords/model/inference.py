"""The forward pass, once, for training's validation, evaluate, predict and test-time augmentation.

Models output logits (a float32 head); probabilities are P(class 1) for one logit, softmax for
more. Test-time augmentation averages probabilities, not logits, over the first n of the eight
dihedral transforms.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf

from skinrecords.core import fileio
from skinrecords.core import manifest
from skinrecords.core import metadata as md
from skinrecords.core import rundir
from skinrecords.input import metadata_input as input_metadata
from skinrecords.input import pipeline
from skinrecords.model import models
from skinrecords.model import xla

# Test-time augmentation order: tta=n averages the probabilities of the first n of these.
DIHEDRAL = ("identity", "flip_left_right", "flip_up_down", "rot90", "rot180", "rot270",
            "transpose", "transverse")


def probabilities(logits) -> tf.Tensor:
  """[B] P(class 1) from one logit, [B, K] softmax from K."""
  logits = tf.cast(logits, tf.float32)
  return tf.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else tf.nn.softmax(logits, axis=-1)


def check_tta(tta, what: str = "tta") -> None:
  if isinstance(tta, bool) or not isinstance(tta, int) or not 0 <= tta <= len(DIHEDRAL):
    raise ValueError(f"{what}={tta!r}: expected 0 (off) or 1..{len(DIHEDRAL)} (the first n of "
                     f"{', '.join(DIHEDRAL)})")


def dihedral(x: tf.Tensor, k: int) -> tf.Tensor:
  """Transform k of DIHEDRAL on a [B, H, W, C] batch of square images (numpy equivalents noted)."""
  t = [0, 2, 1, 3]
  return [
      lambda: x,
      lambda: tf.reverse(x, [2]),  # np.flip(x, 2)
      lambda: tf.reverse(x, [1]),  # np.flip(x, 1)
      lambda: tf.transpose(tf.reverse(x, [2]), t),  # np.rot90(x, 1, axes=(1, 2))
      lambda: tf.reverse(x, [1, 2]),  # np.rot90(x, 2, axes=(1, 2))
      lambda: tf.reverse(tf.transpose(x, t), [2]),  # np.rot90(x, 3, axes=(1, 2))
      lambda: tf.transpose(x, t),  # x.transpose(0, 2, 1, 3)
      lambda: tf.transpose(tf.reverse(x, [1, 2]), t),  # rot180 then transpose: anti-diagonal
  ][k]()


_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forward(model: keras.Model, tta: int):
  """One compiled forward pass per (model, tta): images -> probabilities ([B] or [B, K]).

  XLA only with a GPU/TPU (`xla.resolve_xla`): on this CPU DenseNet121's forward pass took
  15-30 s to compile, so a 60-image test split predicted 2.6-5x slower than without XLA
  (`bin/bench_e2e`), and XLA's CPU convolutions are slower than TensorFlow's oneDNN ones anyway.
  """
  fns = _FORWARD.setdefault(model, {})
  if tta not in fns:
    ref = weakref.ref(model)  # a strong reference here would keep the cache key alive forever

    def forward(images):
      # With metadata, `images` is {"image", "metadata"}: TTA transforms the pixels only.
      x = tf.cast(input_metadata.image_of(images), tf.float32)
      probs = []
      for k in range(max(tta, 1)):
        inputs = input_metadata.with_image(images, dihedral(x, k))
        probs.append(probabilities(ref()(inputs, training=False)))
      return tf.add_n(probs) / float(len(probs))  # mean probability, not mean logit

    devices = [d.name for d in tf.config.list_logical_devices()]
    jit = xla.resolve_xla("auto", devices, augmenting=False) == "on"
    fns[tta] = tf.function(forward, jit_compile=jit, autograph=False)
  return fns[tta]


def _as_str(name) -> str:
  return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def predict_dataset(model: keras.Model, ds, tta: int = 0, *,
                    info: manifest.DatasetInfo | None = None, split: str = "test",
                    fold: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Probabilities ([N] P(class 1) for one logit, [N, K] otherwise), labels [N] and names.

  `ds` yields (images, labels[, names]) batches; a tf.data.Dataset or any iterable of arrays;
  for a model with metadata, images are {"image": ..., "metadata": ...} dicts.
  With `info`, it is read through `pipeline.iterate(ds, info, split, fold)` so a corrupt shard is
  named. Names default to the running index when batches carry none. The last partial batch is
  padded to the first batch's size so XLA compiles one shape only (DenseNet121 took ~95 s to
  compile on 2 CPU cores; a second shape would cost that again).
  """
  check_tta(tta)
  fn = forward(model, tta)
  batches = pipeline.iterate(ds, info, split, fold) if info is not None else iter(ds)
  probs, labels, names, full = [], [], [], None
  for batch in batches:
    images = tf.nest.map_structure(tf.convert_to_tensor, batch[0])
    n = int(input_metadata.image_of(images).shape[0])
    full = full or n
    if n < full:
      images = tf.nest.map_structure(lambda t: tf.concat(
          [t, tf.zeros([full - n, *t.shape[1:]], t.dtype)], axis=0), images)
    probs.append(fn(images).numpy()[:n])
    labels.append(np.asarray(batch[1]).astype(np.int64).reshape(-1))
    if len(batch) > 2:
      raw = batch[2].numpy() if hasattr(batch[2], "numpy") else batch[2]
      names += [_as_str(x) for x in raw]
    else:
      names += [str(len(names) + i) for i in range(n)]
  if not probs:
    return np.zeros((0,), np.float32), np.zeros((0,), np.int64), []
  return np.concatenate(probs), np.concatenate(labels), names


def check_classes(info: manifest.DatasetInfo, classes, model_dir) -> None:
  """ValueError unless the records hold the model's classes (names and order, where the records
  name them; a folder without a manifest only knows how many)."""
  if len(info.classes) != len(classes) or (info.from_manifest and
                                           list(info.classes) != list(classes)):
    raise ValueError(f"{model_dir}/{rundir.CONFIG_FILE} lists classes {list(classes)} but "
                     f"{info.records_dir} holds {list(info.classes)}; use records made with the "
                     "same classes in the same order")


def check_metadata(model: keras.Model, spec: md.MetadataSpec | None, model_dir) -> None:
  """ValueError unless `spec` (the run's metadata.json) fits the model's "metadata" input: a
  model with metadata scored without its spec would have nothing to encode new images with."""
  want, have = models.metadata_features(model), (spec.width if spec else 0)
  if want != have:
    raise ValueError(
        f"{model_dir}: the model takes {want} metadata features but "
        f"{fileio.join(str(model_dir), md.SPEC_FILE)} " +
        (f"encodes {have} ({', '.join(spec.names)})" if spec else "is missing") +
        "; copy the run's metadata.json back, or train again")


def run_metadata(model: keras.Model, model_dir) -> md.MetadataSpec | None:
  """The metadata spec a run was trained with (MODEL_DIR/metadata.json), checked against its
  model; None for an image-only run."""
  spec = rundir.read_metadata(model_dir)
  check_metadata(model, spec, model_dir)
  return spec or None


def predict_split(model: keras.Model, info: manifest.DatasetInfo, split: str, *, image_size: int,
                  batch_size: int, tta: int = 0, fold: int | None = None,
                  through=None, metadata: md.MetadataSpec | None = None,
                  model_dir=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(probabilities, labels, names) of `model` on every record of `split` (with `fold=k`, "valid"
  is fold k), decoded at `image_size`, the model's own. `through(batches)`, if given, sees every
  batch on its way to the model (predict's Grad-CAM overlays). A model with metadata needs
  `metadata`, its run's spec (rundir.read_metadata): the records' values are encoded with the
  statistics it was trained with, whatever statistics these records carry (`model_dir` names the
  run in errors)."""
  if models.metadata_features(model) and not metadata:
    raise ValueError(f"model {model.name!r} takes metadata: pass its run's spec "
                     "(inference.run_metadata(model, model_dir))")
  input_metadata.check_records(info, metadata, model_dir or f"model {model.name!r}")
  ds = pipeline.make_dataset(info, split, batch_size=batch_size, training=False,
                             image_size=image_size, fold=fold, with_names=True,
                             metadata=metadata or None)
  if through:
    return predict_dataset(model, through(ds), tta)
  return predict_dataset(model, ds, tta, info=info, split=split, fold=fold)
