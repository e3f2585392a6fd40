"""The validation pass XLA-compiled under MirroredStrategy (issue 12): same predictions as without.

Two logical CPUs stand in for two GPUs (conftest). xla_mode="on" is forced: on a CPU `resolve_xla`
keeps the model on TensorFlow's kernels, and only a GPU/TPU turns it on by itself.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from skinrecords.input import augment
from skinrecords.model import inference
from skinrecords.model import recipes
from skinrecords.training import distribute
from skinrecords.training import feeding
from skinrecords.training import steps as steps_lib
from skinrecords.training import train

SIZE, GLOBAL_BATCH, REAL, PADDED = 32, 8, 13, 16  # 2 steps of 4 per replica; 3 padding examples


def _bn_model(num_classes: int) -> keras.Model:
  """Conv + BatchNorm + logits: BatchNorm's moving statistics are the non-trainable weights that a
  pure function of the weights must be handed too (simple_cnn has none)."""
  inputs = keras.Input((SIZE, SIZE, 3))
  x = keras.layers.Rescaling(1 / 255)(inputs)
  x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(x)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
  outputs = keras.layers.Dense(1 if num_classes == 2 else num_classes, dtype="float32")(x)
  return keras.Model(inputs, outputs)


def _data(num_classes: int):
  rng = np.random.default_rng(num_classes)
  images = rng.integers(0, 256, (PADDED, SIZE, SIZE, 3)).astype(np.uint8)
  labels = rng.integers(0, num_classes, PADDED).astype(np.int32)
  labels[REAL:] = -1  # feeding.valid_input's padding
  return images, labels


def _steps(strategy, weights, num_classes, xla_mode):
  with strategy.scope():
    model = _bn_model(num_classes)
    model.set_weights(weights)
    opt = keras.optimizers.Adam(1e-3)
    opt.build(model.trainable_variables)
  config = train.TrainConfig(records_dir="", model_dir="", augment=augment.AugmentConfig.none(),
                             xla=xla_mode, batch_size=GLOBAL_BATCH)
  return steps_lib.CompiledSteps(strategy, model, opt, config, [1.0] * num_classes,
                                 xla_mode=xla_mode)


def _weights(num_classes):
  """Random weights with moving statistics far from their (0, 1) start, so that dropping or
  swapping the non-trainable weights changes every prediction."""
  model = _bn_model(num_classes)
  rng = np.random.default_rng(7)
  weights = [rng.normal(0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()]
  bn = model.get_layer("bn")
  names = [v.path for v in model.weights]
  weights[names.index(bn.moving_mean.path)] = rng.normal(0.2, 0.1, 8).astype(np.float32)
  weights[names.index(bn.moving_variance.path)] = rng.uniform(0.01, 0.1, 8).astype(np.float32)
  model.set_weights(weights)
  return model, weights


def _xla_functions(steps, images, labels) -> list[str]:
  """Names of the functions that predict_step's graph asks XLA to compile."""
  graph = steps.predict_step.get_concrete_function(images, labels).graph.as_graph_def()
  return [f.signature.name for f in graph.library.function
          if f.attr["_XlaMustCompile"].b]


# The two-replica cases are slow (18-20 s each at load 7): the quick subset keeps one_device.
@pytest.mark.parametrize("strategy_name,num_classes",
                         [pytest.param("mirrored", 2, marks=pytest.mark.slow),
                          pytest.param("mirrored", 3, marks=pytest.mark.slow), ("one_device", 2)])
def test_xla_validation_pass_matches_tf_kernels(strategy_name, num_classes):
  assert len(tf.config.list_logical_devices("CPU")) == 2, "conftest sets up 2 logical CPUs"
  strategy = distribute.make_strategy(strategy_name)
  images, labels = _data(num_classes)
  reference, weights = _weights(num_classes)
  logits = reference(tf.cast(images, tf.float32), training=False)
  expected_probs = inference.probabilities(logits).numpy()
  expected_loss = recipes.loss_fn(num_classes)(tf.maximum(labels, 0), logits).numpy()
  ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(GLOBAL_BATCH)
  valid = feeding.ValidInput(strategy.experimental_distribute_dataset(ds),
                                PADDED // GLOBAL_BATCH, REAL)
  results = {}
  for mode in ("off", "on"):
    steps = _steps(strategy, weights, num_classes, mode)
    batch = next(iter(valid.dataset))
    assert bool(_xla_functions(steps, *batch)) == (mode == "on"), mode
    out = [steps.predict_step(*b) for b in valid.dataset]
    losses, probs, got_labels = (np.concatenate([o[i].numpy() for o in out]) for i in range(3))
    np.testing.assert_array_equal(got_labels, labels)  # gathered in replica order = dataset order
    np.testing.assert_allclose(probs, expected_probs, rtol=1e-4, atol=1e-5, err_msg=mode)
    np.testing.assert_allclose(losses, expected_loss, rtol=1e-4, atol=1e-5, err_msg=mode)
    results[mode] = steps_lib.evaluate(steps, valid, [f"c{i}" for i in range(num_classes)])
  real = labels >= 0
  assert results["on"]["loss"] == pytest.approx(float(expected_loss[real].mean()), rel=1e-4)
  for key in ("loss", "accuracy", "auc"):
    assert results["on"][key] == pytest.approx(results["off"][key], rel=1e-4, abs=1e-6), key
