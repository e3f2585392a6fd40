"""What the benchmarks share: a work folder that is removed afterwards unless kept, and the
notebook's model in tf_keras (bench_e2e trains it, bench_train --batchnorm times its step)."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import tempfile

from absl import app


@contextlib.contextmanager
def work_folder(prefix: str, base: str | None, keep: bool):
  """A fresh folder under `base` (the system's temporary folder if None) for one run; removed at
  the end, or kept and named when `keep`. An unusable `base` is a usage error."""
  try:
    if base:
      pathlib.Path(base).mkdir(parents=True, exist_ok=True)
    root = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=base))
  except OSError as err:
    raise app.UsageError(f"--workdir={base}: cannot make a folder there ({err.strerror}); pass "
                         "a writable --workdir") from err
  try:
    yield root
  finally:
    if keep:
      print(f"kept {root}")
    else:
      shutil.rmtree(root, ignore_errors=True)


def notebook_model(backbone: str, size: int, learning_rate: float):
  """The notebook's model in tf_keras: inputs already scaled to 0..1 by the generator."""
  import tf_keras  # pylint: disable=g-import-not-at-top

  from skinrecords.model import models  # pylint: disable=g-import-not-at-top

  layers = tf_keras.layers
  inputs = tf_keras.Input((size, size, 3))
  if backbone == "simple_cnn":  # skinrecords.model.models' simple_cnn, layer for layer
    x = inputs
    for filters in (32, 64, 128, 128):
      x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
      x = layers.MaxPooling2D(2)(x)
  else:
    apps = {"vgg16": "VGG16", "resnet50": "ResNet50", "densenet121": "DenseNet121",
            "efficientnetv2s": "EfficientNetV2S"}
    net = getattr(tf_keras.applications, apps[backbone])
    x = net(include_top=False, weights=None, input_shape=(size, size, 3))(inputs)
  x = layers.GlobalAveragePooling2D()(x)
  x = layers.Dropout(models.ModelConfig().dropout)(x)
  outputs = layers.Dense(1, activation="sigmoid")(x)
  model = tf_keras.Model(inputs, outputs)
  model.compile(optimizer=tf_keras.optimizers.Adam(learning_rate), loss="binary_crossentropy")
  return model
