"""BatchNormalization on TensorFlow's fused kernel, with Keras 3's semantics and saved form.

Keras 3's TensorFlow backend computes BatchNormalization unfused (`tf.nn.batch_normalization` over
separately computed moments, keras-team/keras-core#225), where tf_keras called the fused kernel.
Measured (one tf.function train step, Adam, 128 px, batch 16, CPU seconds per step): DenseNet121
(121 BN layers) Keras 3 1.55-1.61, tf_keras 1.04-1.08, Keras 3 with this layer 1.05 (FIELD_NOTES;
`bin/bench_train --batchnorm=keras,fused,tf_keras` re-measures it).

`FusedBatchNormalization` (class name `BatchNormalization`, registered as
"skinrecords>BatchNormalization") is a subclass with no state of its own: the same weights (gamma, beta,
moving_mean, moving_variance), the same config and the same semantics as Keras' layer -- momentum,
epsilon, center/scale, a frozen layer (`trainable=False`) running in inference mode, moving
variance from the *biased* batch variance (the fused op returns the Bessel-corrected one, which is
converted). `call` uses `tf.raw_ops.FusedBatchNormV3` in training and inference and falls back to
Keras' own code wherever fusing does not apply: another backend, a synchronised layer in training
(its all-reduce of moments cannot sit inside the fused op; `--sync_batchnorm` therefore trains
unfused), renorm, a mask, inputs that are not 4-D channels-last, an epsilon below 1.001e-5 (the
fused kernels' floor, cuDNN's), or a symbolic `training` flag.

`fuse(model)` turns every plain Keras BatchNormalization of a built model into this class in place
(`__class__` assignment: nothing is rebuilt, so ImageNet weights, names and the nesting that
`freeze="from:LAYER"` addresses stay exactly as keras.applications made them), and `unfuse` turns
them back. models.build_model fuses what it builds; rundir fuses models saved before this layer
existed when it loads them. Weights files (.weights.h5, and the weights inside model.keras) are
interchangeable between fused and plain-BN models in both directions: same variables, same keys.
"""

from __future__ import annotations

import keras

# The fused kernels reject a smaller epsilon (cuDNN's CUDNN_BN_MIN_EPSILON; tf_keras clamps to it).
_MIN_EPSILON = 1.001e-5
_FUSED_DTYPES = ("float16", "bfloat16", "float32")


@keras.saving.register_keras_serializable(package="skinrecords")
class BatchNormalization(keras.layers.BatchNormalization):
  """keras.layers.BatchNormalization computed by TensorFlow's fused kernel where it applies.

  Named like Keras' class on purpose: Keras' saving keys each layer's variables by its snake-cased
  class name ("batch_normalization_3/vars"), so with any other name a weights file saved with
  plain BN would not load into a fused model, nor the other way round (52 of MobileNetV2's layers
  "expected 4 variables, but received 0"). The registered name tells the two apart.
  """

  def _fusable(self, inputs, training, mask) -> bool:
    if keras.backend.backend() != "tensorflow" or mask is not None or self.renorm:
      return False
    if training is not None and not isinstance(training, bool):
      return False  # a symbolic flag: Keras' code handles it with its own cond
    if bool(training) and self.trainable and self.synchronized:
      return False  # moments all-reduced across replicas: Keras' code
    rank = len(inputs.shape)
    return (rank == 4 and self.axis % rank == 3 and self.epsilon >= _MIN_EPSILON
            and keras.backend.standardize_dtype(inputs.dtype) in _FUSED_DTYPES)

  def call(self, inputs, training=None, mask=None):
    if not self._fusable(inputs, training, mask):
      return super().call(inputs, training=training, mask=mask)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (TF backend only)

    channels = inputs.shape[-1]
    scale = (tf.convert_to_tensor(self.gamma) if self.scale else tf.ones((channels,), tf.float32))
    offset = (tf.convert_to_tensor(self.beta) if self.center
              else tf.zeros((channels,), tf.float32))
    if training and self.trainable:  # Keras' rule: a frozen layer runs in inference mode
      outputs, mean, variance = _fused_train(inputs, scale, offset, self.epsilon)
      self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
      self.moving_variance.assign(self.moving_variance * self.momentum
                                  + variance * (1.0 - self.momentum))
    else:
      outputs = tf.raw_ops.FusedBatchNormV3(
          x=inputs, scale=scale, offset=offset, mean=tf.convert_to_tensor(self.moving_mean),
          variance=tf.convert_to_tensor(self.moving_variance), epsilon=self.epsilon,
          data_format="NHWC", is_training=False)[0]
    return tf.cast(outputs, self.compute_dtype)


FusedBatchNormalization = BatchNormalization  # the name the rest of the code reads


def _fused_train(inputs, scale, offset, epsilon):
  """(normalised outputs, batch mean, biased batch variance) from one fused training op."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  empty = tf.constant([], tf.float32)
  outputs, mean, unbiased = tf.raw_ops.FusedBatchNormV3(
      x=inputs, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=epsilon,
      exponential_avg_factor=1.0, data_format="NHWC", is_training=True)[:3]
  # The op normalises with the biased variance but returns the Bessel-corrected one (x n/(n-1));
  # Keras' moving variance averages the biased one. n = 1 (one pixel of one image) has variance 0.
  shape = tf.shape(inputs)
  n = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
  variance = tf.where(n > 1.0, unbiased * ((n - 1.0) / tf.maximum(n, 1.0)), tf.zeros_like(unbiased))
  return outputs, mean, variance


def _batchnorm_layers(model: keras.layers.Layer):
  return [l for l in model._flatten_layers(include_self=True, recursive=True)  # pylint: disable=protected-access
          if isinstance(l, keras.layers.BatchNormalization)]


def fuse(model: keras.layers.Layer) -> int:
  """Makes every plain Keras BatchNormalization in `model` a FusedBatchNormalization, in place.

  Only exact keras.layers.BatchNormalization instances change (subclasses may override `call`).
  Call before the train/predict functions are traced. Returns how many layers are fused now.
  """
  for layer in _batchnorm_layers(model):
    if type(layer) is keras.layers.BatchNormalization:  # pylint: disable=unidiomatic-typecheck
      layer.__class__ = FusedBatchNormalization
  return sum(isinstance(l, FusedBatchNormalization) for l in _batchnorm_layers(model))


def unfuse(model: keras.layers.Layer) -> int:
  """The inverse of `fuse` (Keras' own unfused layer again); returns how many layers changed."""
  changed = 0
  for layer in _batchnorm_layers(model):
    if type(layer) is FusedBatchNormalization:  # pylint: disable=unidiomatic-typecheck
      layer.__class__ = keras.layers.BatchNormalization
      changed += 1
  return changed
