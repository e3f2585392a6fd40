"""Grad-CAM: where in the image the model looked for the class it predicted.

Grad-CAM (Selvaraju et al., 2017) weights the feature maps of the backbone's last convolutional
block by the mean gradient of the predicted class's logit over each map, sums them and keeps the
positive part. Models from `models.build_model` nest the backbone as one sub-model
(`image -> preprocess -> backbone -> pool -> dropout -> logits`); `cam_model` rebuilds that chain
around a backbone that also returns its last convolutional block, so the same weights give both
the feature maps and the logits in one pass.

Use:
    heat = explain.gradcam(model, images)           # [B, h, w] in 0..1 (h = S/8 .. S/32)
    rgb = explain.overlay(images[0], heat[0])       # uint8 [S, S, 3], heat in the jet palette
    explain.gallery(path, images, heat, titles)     # a PNG grid: image | overlay per example
"""

from __future__ import annotations

import os
import weakref

import cv2
import keras
import numpy as np
import tensorflow as tf

from skinrecords.core import fileio
from skinrecords.evaluation import plots
from skinrecords.model import models

_CAM_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
OVERLAY_ALPHA = 0.45  # heat over the image: enough colour to read, the lesion still visible


def last_conv_layer(model: keras.Model) -> keras.layers.Layer:
  """The backbone's last layer with a spatial [B, h, w, C] output that is not a pooling layer.

  That is the output of the last convolutional block: block4_conv (simple_cnn), block5_conv3
  (VGG16), conv5_block3_out (ResNet50), relu (DenseNet121), top_activation (EfficientNetV2-S).
  Pooling after it only halves the map Grad-CAM is read from (2x2 at 64 px for simple_cnn).
  """
  backbone = models.get_backbone(model)
  for layer in reversed(backbone.layers):
    shape = getattr(layer, "output", None)
    shape = getattr(shape, "shape", None)
    if (shape is not None and len(shape) == 4 and not isinstance(layer, keras.layers.InputLayer)
        and "pool" not in type(layer).__name__.lower()):
      return layer
  raise ValueError(f"backbone {backbone.name!r} has no layer with a [B, h, w, C] output")


def cam_model(model: keras.Model) -> keras.Model:
  """`inputs -> (last conv block's maps, logits)` sharing `model`'s weights (cached per model).

  The inputs are the model's own: the image, and for a model with patient metadata (issue 24) the
  "metadata" vector too, which reaches the logits through its dense branch without touching the
  maps. The model's graph is replayed with the backbone swapped for one that also returns its
  maps, so any head around the backbone (a metadata branch fused before the logits) is kept."""
  if model in _CAM_MODELS:
    return _CAM_MODELS[model]
  backbone = models.get_backbone(model)
  inner = keras.Model(backbone.inputs, [last_conv_layer(model).output, backbone.outputs[0]])
  # The model's own input structure (a dict {"image", "metadata"} for a metadata model).
  inputs = keras.tree.map_structure(
      lambda t: keras.Input(t.shape[1:], dtype=t.dtype, name=t.name), model.input)
  seen = {}

  def with_maps(x, **kwargs):
    seen["maps"], features = inner(x, **kwargs)
    return features

  # Keras 3's own graph walk (Functional.call uses it): the same layers on new inputs, in order.
  logits = model._run_through_graph(  # pylint: disable=protected-access
      inputs, operation_fn=lambda op: with_maps if op is backbone else op)
  if isinstance(logits, (list, tuple)):
    logits = logits[0]
  _CAM_MODELS[model] = keras.Model(inputs, [seen["maps"], logits])
  return _CAM_MODELS[model]


def _model_inputs(model: keras.Model, images, metadata=None):
  """What `model` is called with: the images, or {"image", "metadata"} for a metadata model; a
  metadata model without `metadata` is refused, never fed zeros."""
  x = tf.cast(tf.convert_to_tensor(images), tf.float32)
  if not isinstance(model.input, dict):
    return x
  if metadata is None:
    raise ValueError(f"model {model.name!r} takes patient metadata ({', '.join(model.input)}): "
                     "pass the images' metadata vectors (core.metadata.encode_rows) too")
  return {"image": x, "metadata": tf.cast(tf.convert_to_tensor(metadata), tf.float32)}


def gradcam(model: keras.Model, images, class_index=None, metadata=None) -> np.ndarray:
  """Grad-CAM heatmaps [B, h, w] in 0..1 for the predicted class (or `class_index` [B]).

  `images`: RGB 0..255, [B, S, S, 3] (uint8 or float). With one binary logit the score is the
  logit for class 1 and its negative for class 0. A map with no positive evidence is all zeros.
  `metadata`: a metadata model's encoded input [B, width], held at each image's own values: the
  gradient is taken with respect to the image branch's maps only, so the heatmap shows where in
  the image the evidence is, given that patient's metadata.
  """
  x = _model_inputs(model, images, metadata)
  with tf.GradientTape() as tape:
    maps, logits = cam_model(model)(x, training=False)
    tape.watch(maps)
    if logits.shape[-1] == 1:
      predicted = tf.cast(logits[:, 0] >= 0, tf.int32)
      target = predicted if class_index is None else tf.constant(class_index, tf.int32)
      score = tf.where(target == 1, logits[:, 0], -logits[:, 0])
    else:
      predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
      target = predicted if class_index is None else tf.constant(class_index, tf.int32)
      score = tf.gather(logits, target[:, None], batch_dims=1)[:, 0]
  grads = tape.gradient(score, maps)
  weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # one weight per channel
  cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1)).numpy()
  peak = cam.max(axis=(1, 2), keepdims=True)
  return np.where(peak > 0, cam / np.maximum(peak, 1e-12), 0.0).astype(np.float32)


def upsample(heat: np.ndarray, size: int) -> np.ndarray:
  """A [h, w] heatmap bilinearly resized to [size, size] (cell centres aligned), still 0..1."""
  return np.clip(cv2.resize(np.asarray(heat, np.float32), (size, size),
                            interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def overlay(image, heat, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
  """RGB uint8 [H, W, 3]: `image` (RGB 0..255) blended with `heat` ([h, w], 0..1) in jet colours."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"overlay needs an RGB image [H, W, 3], got shape {image.shape}")
  h, w = image.shape[:2]
  heat = cv2.resize(np.asarray(heat, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
  colour = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)
  colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32)
  blended = (1 - alpha) * image.astype(np.float32) + alpha * colour
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def gallery(path, images, heats, titles, columns: int = 4) -> str:
  """Writes a PNG grid: per example the image and its Grad-CAM overlay, titled.

  Args:
    path: the PNG to write (atomically; the folder must exist).
    images: RGB 0..255 [N, S, S, 3].
    heats: [N, h, w] heatmaps from `gradcam`, or None for images only.
    titles: N strings, e.g. "ISIC_0001\\ntrue Melanoma, predicted NotMelanoma\\nP=0.08".
    columns: examples per row (each example takes two cells with heatmaps).
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (import ~0.3 s)
  n = len(images)
  if heats is not None and len(heats) != n or len(titles) != n:
    raise ValueError(f"gallery: {n} images, {len(titles)} titles and "
                     f"{'no' if heats is None else len(heats)} heatmaps; they must match")
  per = 1 if heats is None else 2
  cols = max(1, min(columns, n)) * per
  rows = max(1, -(-n // max(1, min(columns, n))))
  fig = Figure(figsize=(1.9 * cols, 2.3 * rows), dpi=100, layout="constrained")
  for i in range(rows * cols // per):
    cells = [fig.add_subplot(rows, cols, i * per + k + 1) for k in range(per)]
    for ax in cells:
      ax.axis("off")
    if i >= n:
      continue
    cells[0].imshow(np.asarray(images[i]).astype(np.uint8))
    cells[0].set_title(titles[i], fontsize=7)
    if heats is not None:
      cells[1].imshow(overlay(images[i], heats[i]))
      cells[1].set_title("Grad-CAM", fontsize=7)
  plots.save_figure(fig, path)
  return os.fspath(path)


def example_title(name: str, true: str | None, predicted: str, probability: float) -> str:
  """The standard gallery caption: name, true/predicted class, P(predicted)."""
  truth = f"true {true}, " if true is not None else ""
  return f"{name}\n{truth}predicted {predicted}\nP={probability:.3f}"


def _probabilities(logits: np.ndarray) -> np.ndarray:
  """[B] P(class 1) from one logit, [B, K] softmax from K (as inference.probabilities)."""
  logits = np.asarray(logits, np.float64)
  if logits.shape[-1] == 1:
    return 1 / (1 + np.exp(-logits[:, 0]))
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def explain_batch(model: keras.Model, images, classes, threshold: float = 0.5, metadata=None):
  """(heatmaps [B, h, w], predicted class ids [B], P(predicted) [B]) for a batch.

  Two classes: class 1 when P(class 1) >= threshold (as predict), and Grad-CAM for that class.
  `metadata`: a metadata model's encoded input for these images (see `gradcam`).
  """
  if len(classes) < 2:
    raise ValueError(f"classes={classes!r}: need the class names in id order")
  x = _model_inputs(model, images, metadata)
  probs = _probabilities(model(x, training=False).numpy())
  if probs.ndim == 1:
    predicted = (probs >= threshold).astype(np.int32)
    p_pred = np.where(predicted == 1, probs, 1 - probs)
  else:
    predicted = probs.argmax(axis=-1).astype(np.int32)
    p_pred = probs.max(axis=-1)
  return gradcam(model, images, predicted, metadata), predicted, p_pred


def write_gallery(path, model: keras.Model, images, names, classes, labels=None,
                  threshold: float = 0.5, columns: int = 4, metadata=None) -> str:
  """One call for evaluate's errors.png / examples.png: predicts, explains and renders `images`.

  `labels` (true class ids) are shown when given; titles read "name / true X, predicted Y / P=..".
  `metadata`: a metadata model's encoded input for these images.
  """
  heats, predicted, p_pred = explain_batch(model, images, classes, threshold, metadata)
  titles = [example_title(str(n), None if labels is None else str(classes[int(labels[i])]),
                          str(classes[predicted[i]]), float(p_pred[i]))
            for i, n in enumerate(names)]
  return gallery(path, images, heats, titles, columns)


def write_overlays(folder, model: keras.Model, images, names, classes,
                   threshold: float = 0.5, metadata=None) -> list[str]:
  """predict --explain_dir: FOLDER/<name stem>.gradcam.png per image (RGB overlay, atomic);
  `metadata`: a metadata model's encoded input for these images."""
  heats, _, _ = explain_batch(model, images, classes, threshold, metadata)
  written = []
  for image, heat, name in zip(images, heats, names):
    ok, png = cv2.imencode(".png", cv2.cvtColor(overlay(image, heat), cv2.COLOR_RGB2BGR))
    if not ok:
      raise ValueError(f"could not encode the overlay of {name} as PNG")
    stem = os.path.splitext(os.path.basename(str(name)))[0]  # the image's name, not a path
    written.append(fileio.join(folder, f"{stem}.gradcam.png"))
    fileio.write_bytes_atomic(written[-1], png.tobytes())
  return written


def most_confident(probs, labels, want: str, k: int, threshold: float = 0.5) -> np.ndarray:
  """Indices of the k most confident examples of one kind, most confident first (two classes).

  want: "false_negative" (label 1, lowest P(class 1)), "false_positive" (label 0, highest),
  "true_positive" (label 1, highest), "true_negative" (label 0, lowest).
  """
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  if probs.ndim != 1:
    raise ValueError("most_confident needs P(class 1) [N] from a two-class model")
  label, positive = {"false_negative": (1, False), "false_positive": (0, True),
                     "true_positive": (1, True), "true_negative": (0, False)}[want]
  chosen = np.flatnonzero((labels == label) & ((probs >= threshold) == positive))
  order = np.argsort(-probs[chosen] if positive else probs[chosen], kind="stable")
  return chosen[order][:k]
